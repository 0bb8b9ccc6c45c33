//! Opening a lock file: the one place that decides how.
//!
//! Why it is built this way: a lock file is shared with strangers (other
//! users' processes, other languages' lock libraries), so opening it must
//! not be a way to attack or break them. `O_NOFOLLOW` refuses a symbolic
//! link planted at the path (which could otherwise make us create or lock a
//! file elsewhere); `O_NONBLOCK` keeps a FIFO planted at the path from
//! hanging the open (it is then refused as not a regular file; the flag has
//! no effect on locks of a regular file); `O_NOCTTY` keeps a device from
//! becoming our terminal; `O_CLOEXEC` keeps the descriptor, and with it an
//! OFD lock, from leaking into programs we exec. The file is never truncated
//! or written: other tools (fasteners, flock(1)) may keep data in it.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use crate::{Error, ErrorKind, Result};

/// An opened lock file.
pub(crate) struct Opened {
    pub file: File,
    /// Opened read-write; otherwise read-only, because this user may read
    /// but not write it (only shared fcntl locks are then possible).
    pub writable: bool,
    /// (st_dev, st_ino) of the opened file.
    pub id: (u64, u64),
}

/// Opens, creating with `mode` if missing, the lock file at `path`. `op`
/// names the operation in errors (e.g. "open lock file").
pub(crate) fn open_lock_file(path: &Path, mode: u32, op: &'static str) -> Result<Opened> {
    let flags = libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;
    let rw = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(mode)
        .custom_flags(flags)
        .open(path);
    let (file, writable) = match rw {
        Ok(f) => (f, true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EROFS)) => {
            match OpenOptions::new().read(true).custom_flags(flags).open(path) {
                Ok(f) => (f, false),
                Err(_) => {
                    return Err(Error::io(op, e)
                        .with_path(path)
                        .with_kind(ErrorKind::PermissionDenied))
                }
            }
        }
        Err(e) => {
            let detail = match e.raw_os_error() {
                Some(libc::ENOENT) => Some("the parent directory does not exist"),
                Some(libc::ENOTDIR) => Some("a parent of the path is not a directory"),
                Some(libc::EISDIR) => Some("a directory is at this path"),
                Some(libc::ELOOP) => Some("a symbolic link is at this path (not followed)"),
                _ => None,
            };
            let err = Error::io(op, e).with_path(path);
            return Err(match detail {
                Some(d) => err.with_detail(d),
                None => err,
            });
        }
    };
    let meta = file
        .metadata()
        .map_err(|e| Error::io(op, e).with_path(path))?;
    if !meta.file_type().is_file() {
        let what = if meta.file_type().is_fifo() {
            "a FIFO is at this path"
        } else {
            "not a regular file"
        };
        return Err(Error::new(ErrorKind::Corrupt, op)
            .with_path(path)
            .with_detail(what));
    }
    Ok(Opened {
        file,
        writable,
        id: (meta.dev(), meta.ino()),
    })
}
