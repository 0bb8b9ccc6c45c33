//! Kernel file locks: open-file-description (OFD) byte-range locks and flock.
//!
//! Why it is built this way: classic POSIX `F_SETLK` locks belong to the
//! *process*, so two threads never exclude each other and closing any
//! descriptor of the file silently drops every lock the process holds on it
//! ("broken by design", as SQLite's os_unix.c puts it). OFD locks
//! (`F_OFD_SETLK`, Linux 3.15+) belong to the open file description instead:
//! threads with their own `open()` exclude each other, and only closing the
//! last descriptor of *that* description releases. They still conflict with
//! classic locks, so a Python `fcntl.lockf` user and an OFD user exclude each
//! other. `flock` locks are a separate, whole-file family, kept for
//! compatibility with `flock(1)`, filelock and portalocker.
//!
//! References: fcntl(2) "Open file description locks", flock(2).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::raw;

/// The lock a range request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeLock {
    /// Shared (`F_RDLCK`).
    Read,
    /// Exclusive (`F_WRLCK`).
    Write,
    /// Release (`F_UNLCK`).
    Unlock,
}

impl RangeLock {
    fn l_type(self) -> libc::c_short {
        (match self {
            RangeLock::Read => libc::F_RDLCK,
            RangeLock::Write => libc::F_WRLCK,
            RangeLock::Unlock => libc::F_UNLCK,
        }) as libc::c_short
    }
}

/// A byte range `start .. start+len`; `len == 0` means "to the end of all
/// possible offsets", as in fcntl(2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// Number of bytes; 0 means unbounded.
    pub len: u64,
}

/// The largest offset fcntl can address (`off_t` is signed 64-bit).
pub const MAX_OFFSET: u64 = i64::MAX as u64;

#[inline(always)]
fn flock_struct(kind: RangeLock, r: ByteRange) -> io::Result<libc::flock> {
    if r.start > MAX_OFFSET
        || r.len > MAX_OFFSET
        || r.start.checked_add(r.len).is_none_or(|e| e > MAX_OFFSET)
    {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(libc::flock {
        l_type: kind.l_type(),
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: r.start as libc::off_t,
        l_len: r.len as libc::off_t,
        // OFD requests require l_pid == 0.
        l_pid: 0,
    })
}

#[inline(always)]
fn fcntl_lock(fd: BorrowedFd<'_>, cmd: libc::c_int, fl: &mut libc::flock) -> io::Result<()> {
    // SAFETY: `fd` is a live descriptor for the duration of the borrow, and
    // `fl` points to a valid, initialised `struct flock` that the kernel may
    // read and (for F_OFD_GETLK) write. The OFD commands take a `struct
    // flock` with a 64-bit `off_t` on the targets where `raw` makes the call
    // inline (elsewhere it is libc's `syscall`, as `fcntl` would be).
    unsafe {
        raw::syscall3(
            libc::SYS_fcntl,
            fd.as_raw_fd() as usize,
            cmd as usize,
            fl as *mut libc::flock as usize,
        )
    }
    .map(drop)
}

/// `F_OFD_SETLK`: applies `kind` to `range` without waiting.
///
/// Returns `Ok(false)` if a conflicting lock is held (EAGAIN/EACCES). A
/// conversion that fails leaves the previous lock on the range in place.
#[inline]
pub fn ofd_try(fd: BorrowedFd<'_>, kind: RangeLock, range: ByteRange) -> io::Result<bool> {
    let mut fl = flock_struct(kind, range)?;
    match fcntl_lock(fd, libc::F_OFD_SETLK, &mut fl) {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `F_OFD_SETLKW`: applies `kind` to `range`, waiting for conflicting
/// holders. Returns `Err(EINTR)` when a signal interrupts the wait (see
/// [`super::timer::Interrupter`]); the previous lock on the range is then
/// still in place. The kernel does no deadlock detection for OFD locks.
#[inline]
pub fn ofd_wait(fd: BorrowedFd<'_>, kind: RangeLock, range: ByteRange) -> io::Result<()> {
    let mut fl = flock_struct(kind, range)?;
    fcntl_lock(fd, libc::F_OFD_SETLKW, &mut fl)
}

/// A conflicting lock reported by [`ofd_get`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// Read or Write.
    pub kind: RangeLock,
    /// The conflicting lock's range.
    pub range: ByteRange,
    /// The holder's pid for classic locks; `None` for OFD locks (the kernel
    /// reports -1: an open file description has no single owning process).
    pub pid: Option<u32>,
}

/// `F_OFD_GETLK`: the first lock that would conflict with `kind` on `range`,
/// or `None` if the request would be granted now.
#[inline]
pub fn ofd_get(
    fd: BorrowedFd<'_>,
    kind: RangeLock,
    range: ByteRange,
) -> io::Result<Option<Conflict>> {
    let mut fl = flock_struct(kind, range)?;
    fcntl_lock(fd, libc::F_OFD_GETLK, &mut fl)?;
    if fl.l_type == libc::F_UNLCK as libc::c_short {
        return Ok(None);
    }
    let kind = if fl.l_type == libc::F_WRLCK as libc::c_short {
        RangeLock::Write
    } else {
        RangeLock::Read
    };
    Ok(Some(Conflict {
        kind,
        range: ByteRange {
            start: fl.l_start as u64,
            len: fl.l_len as u64,
        },
        pid: u32::try_from(fl.l_pid).ok().filter(|&p| p > 0),
    }))
}

/// flock(2) operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlockOp {
    /// `LOCK_SH`
    Shared,
    /// `LOCK_EX`
    Exclusive,
    /// `LOCK_UN`
    Unlock,
}

/// flock(2). With `wait == false` adds `LOCK_NB` and returns `Ok(false)` on
/// EWOULDBLOCK. A blocking call returns `Err(EINTR)` when interrupted.
///
/// Beware: converting shared → exclusive with flock is not atomic (the
/// kernel drops the shared lock first), and a failed non-blocking
/// conversion drops it too (measured, see FACTS.md). Callers must not rely
/// on flock conversion.
#[inline]
pub fn flock(fd: BorrowedFd<'_>, op: FlockOp, wait: bool) -> io::Result<bool> {
    let mut how = match op {
        FlockOp::Shared => libc::LOCK_SH,
        FlockOp::Exclusive => libc::LOCK_EX,
        FlockOp::Unlock => libc::LOCK_UN,
    };
    if !wait {
        how |= libc::LOCK_NB;
    }
    // SAFETY: flock takes a descriptor and an integer; `fd` is live for the
    // duration of the borrow.
    match unsafe { raw::syscall3(libc::SYS_flock, fd.as_raw_fd() as usize, how as usize, 0) } {
        Ok(_) => Ok(true),
        Err(e) if !wait && e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
        Err(e) => Err(e),
    }
}

/// fstatfs(2): whether the file lives on NFS. The Linux NFS client emulates
/// flock with whole-file fcntl locks, so the two families conflict there.
pub fn on_nfs(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut buf = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `fd` is live for the borrow and `buf` is valid for writes of
    // one `struct statfs`.
    let rc = unsafe { libc::fstatfs(fd.as_raw_fd(), buf.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatfs returned 0, so it filled the buffer.
    let buf = unsafe { buf.assume_init() };
    // The field's and the constant's integer types differ between targets.
    #[allow(clippy::unnecessary_cast)]
    let nfs = buf.f_type as i64 == libc::NFS_SUPER_MAGIC as i64;
    Ok(nfs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::os::fd::AsFd;

    fn range(start: u64, len: u64) -> ByteRange {
        ByteRange { start, len }
    }

    #[test]
    fn ofd_locks_exclude_between_descriptions_of_one_process() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l");
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&p)
                .unwrap()
        };
        let (a, b) = (open(), open());
        assert!(ofd_try(a.as_fd(), RangeLock::Write, range(3, 4)).unwrap());
        assert!(!ofd_try(b.as_fd(), RangeLock::Read, range(6, 1)).unwrap());
        assert!(ofd_try(b.as_fd(), RangeLock::Write, range(7, 1)).unwrap());
        let c = ofd_get(b.as_fd(), RangeLock::Read, range(0, 0))
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.kind, c.range, c.pid),
            (RangeLock::Write, range(3, 4), None)
        );
        // Closing another descriptor of the same file drops nothing.
        drop(open());
        assert!(!ofd_try(b.as_fd(), RangeLock::Read, range(3, 1)).unwrap());
        assert!(ofd_try(a.as_fd(), RangeLock::Unlock, range(3, 4)).unwrap());
        assert!(ofd_try(b.as_fd(), RangeLock::Read, range(3, 1)).unwrap());
    }

    #[test]
    fn a_temp_file_is_not_on_nfs() {
        let f = tempfile::tempfile().unwrap();
        assert!(!on_nfs(f.as_fd()).unwrap());
    }

    #[test]
    fn out_of_range_offsets_are_einval() {
        let f = tempfile::tempfile().unwrap();
        let e = ofd_try(f.as_fd(), RangeLock::Read, range(MAX_OFFSET, 2)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    }

    #[test]
    fn flock_nonblocking_reports_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l");
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&p)
                .unwrap()
        };
        let (a, b) = (open(), open());
        assert!(flock(a.as_fd(), FlockOp::Exclusive, false).unwrap());
        assert!(!flock(b.as_fd(), FlockOp::Shared, false).unwrap());
        assert!(flock(a.as_fd(), FlockOp::Unlock, false).unwrap());
        assert!(flock(b.as_fd(), FlockOp::Shared, false).unwrap());
    }
}
