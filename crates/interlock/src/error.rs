//! One error type for every lock family.
//!
//! Why it is built this way: a lock that fails must say *which* lock, *what*
//! it was doing and *why*, or the user is left with "Resource temporarily
//! unavailable" and no path. So every error carries the operation and, where
//! there is one, the path; the OS error, if any, is kept as the source; and
//! [`Error::kind`] gives a stable, matchable classification.
//!
//! Non-blocking and bounded acquisitions return [`TryLockError`], whose two
//! "did not get it" variants are not errors in the usual sense and so are kept
//! apart from [`Error`]; `?` converts one into the other.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What went wrong, in a form to match on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A non-blocking acquisition found the lock held.
    WouldBlock,
    /// A bounded acquisition reached its deadline.
    TimedOut,
    /// Waiting would close a cycle of owners waiting on each other.
    Deadlock,
    /// A holder died while holding the lock exclusively; the protected data
    /// may be inconsistent (the lock is "poisoned").
    OwnerDied,
    /// A lease ran out, or was taken over, while the holder believed it held it.
    LeaseLost,
    /// The operation is not supported by this lock family, file system or kernel.
    Unsupported,
    /// A caller-supplied argument is unusable (empty range, bad name, ...).
    InvalidInput,
    /// The path, or its parent directory, does not exist.
    NotFound,
    /// The caller lacks permission for the path.
    PermissionDenied,
    /// Something at the path is not what the lock expects: a directory, a
    /// symbolic link, a file with a foreign or damaged header or record.
    Corrupt,
    /// Any other operating-system error.
    Io,
}

impl ErrorKind {
    fn describe(self) -> &'static str {
        match self {
            ErrorKind::WouldBlock => "lock is held",
            ErrorKind::TimedOut => "timed out waiting for the lock",
            ErrorKind::Deadlock => "waiting would deadlock",
            ErrorKind::OwnerDied => "previous holder died holding the lock",
            ErrorKind::LeaseLost => "lease lost",
            ErrorKind::Unsupported => "not supported",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::NotFound => "not found",
            ErrorKind::PermissionDenied => "permission denied",
            ErrorKind::Corrupt => "unexpected content",
            ErrorKind::Io => "I/O error",
        }
    }
}

/// The crate's error: a kind, the operation, the path if any, a detail and
/// the underlying OS error if any.
pub struct Error {
    kind: ErrorKind,
    op: &'static str,
    path: Option<PathBuf>,
    detail: Option<String>,
    source: Option<io::Error>,
}

impl Error {
    /// An error of `kind` while doing `op` (a short verb phrase, e.g. "open lock file").
    pub fn new(kind: ErrorKind, op: &'static str) -> Error {
        Error {
            kind,
            op,
            path: None,
            detail: None,
            source: None,
        }
    }

    /// An OS error while doing `op`; the kind is derived from the errno.
    pub fn io(op: &'static str, source: io::Error) -> Error {
        let kind = kind_of_io(&source);
        Error {
            kind,
            op,
            path: None,
            detail: None,
            source: Some(source),
        }
    }

    /// Attaches the path the operation was about.
    #[must_use]
    pub fn with_path(mut self, path: impl AsRef<Path>) -> Error {
        self.path = Some(path.as_ref().to_path_buf());
        self
    }

    /// Attaches a human-readable detail ("a directory is at this path").
    #[must_use]
    pub fn with_detail(mut self, detail: impl Into<String>) -> Error {
        self.detail = Some(detail.into());
        self
    }

    /// Overrides the kind derived from the OS error.
    #[must_use]
    pub fn with_kind(mut self, kind: ErrorKind) -> Error {
        self.kind = kind;
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The operation that failed, e.g. "open lock file".
    pub fn operation(&self) -> &'static str {
        self.op
    }

    /// The path the failed operation was about, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The OS error number, if the error came from the OS.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.source.as_ref().and_then(io::Error::raw_os_error)
    }
}

/// Maps an OS error to the kind a caller matches on.
fn kind_of_io(e: &io::Error) -> ErrorKind {
    match e.raw_os_error() {
        Some(libc::EAGAIN) => ErrorKind::WouldBlock,
        Some(libc::EDEADLK) => ErrorKind::Deadlock,
        Some(libc::ETIMEDOUT) => ErrorKind::TimedOut,
        Some(libc::ENOENT) | Some(libc::ENOTDIR) => ErrorKind::NotFound,
        Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => ErrorKind::PermissionDenied,
        Some(libc::ELOOP) | Some(libc::EISDIR) => ErrorKind::Corrupt,
        Some(libc::EINVAL) | Some(libc::ENAMETOOLONG) => ErrorKind::InvalidInput,
        Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => ErrorKind::Unsupported,
        _ => match e.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
            io::ErrorKind::InvalidInput => ErrorKind::InvalidInput,
            io::ErrorKind::Unsupported => ErrorKind::Unsupported,
            _ => ErrorKind::Io,
        },
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.op)?;
        if let Some(p) = &self.path {
            write!(f, " {}", p.display())?;
        }
        match (&self.detail, &self.source) {
            (Some(d), Some(s)) => write!(f, ": {d}: {s}"),
            (Some(d), None) => write!(f, ": {d}"),
            (None, Some(s)) => write!(f, ": {s}"),
            (None, None) => write!(f, ": {}", self.kind.describe()),
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("op", &self.op)
            .field("path", &self.path)
            .field("detail", &self.detail)
            .field("source", &self.source)
            .finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match e.kind {
            ErrorKind::WouldBlock => io::ErrorKind::WouldBlock,
            ErrorKind::TimedOut => io::ErrorKind::TimedOut,
            ErrorKind::NotFound => io::ErrorKind::NotFound,
            ErrorKind::PermissionDenied => io::ErrorKind::PermissionDenied,
            ErrorKind::InvalidInput => io::ErrorKind::InvalidInput,
            ErrorKind::Unsupported => io::ErrorKind::Unsupported,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

/// Why a non-blocking or bounded acquisition did not return a guard.
#[derive(Debug, thiserror::Error)]
pub enum TryLockError {
    /// `try_*`: the lock is held in a conflicting mode right now.
    #[error("lock is held")]
    WouldBlock,
    /// `try_*_for` / `try_*_until`: the deadline passed first.
    #[error("timed out waiting for the lock")]
    TimedOut,
    /// Anything else, including [`ErrorKind::Deadlock`] and [`ErrorKind::OwnerDied`].
    #[error(transparent)]
    Error(#[from] Error),
}

impl TryLockError {
    /// The kind, as [`Error::kind`] would report it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            TryLockError::WouldBlock => ErrorKind::WouldBlock,
            TryLockError::TimedOut => ErrorKind::TimedOut,
            TryLockError::Error(e) => e.kind(),
        }
    }
}

impl From<TryLockError> for Error {
    fn from(e: TryLockError) -> Error {
        match e {
            TryLockError::WouldBlock => Error::new(ErrorKind::WouldBlock, "acquire lock"),
            TryLockError::TimedOut => Error::new(ErrorKind::TimedOut, "acquire lock"),
            TryLockError::Error(e) => e,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_maps_to_kind_and_display_names_path() {
        let e = Error::io("open lock file", io::Error::from_raw_os_error(libc::ENOENT))
            .with_path("/nope/x.lock");
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let s = e.to_string();
        assert!(s.starts_with("open lock file /nope/x.lock: "), "{s}");
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }

    #[test]
    fn try_lock_error_converts_with_kind() {
        let e: Error = TryLockError::TimedOut.into();
        assert_eq!(e.kind(), ErrorKind::TimedOut);
        assert_eq!(TryLockError::WouldBlock.kind(), ErrorKind::WouldBlock);
    }
}
