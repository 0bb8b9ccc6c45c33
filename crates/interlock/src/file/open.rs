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
//!
//! Before any open that could have a side effect, the path is looked at
//! without following it (`lstat`) and the file system it lies on is checked:
//! a socket, device, FIFO, directory or symbolic link at the path is named
//! and refused, and so are files of kernel pseudo file systems (/proc, /sys
//! and their kin), where opening a file read-write can itself act. The
//! check after the open (`fstat`) stays: it closes the race with a file
//! swapped in between.

use std::fs::{File, FileType, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use crate::sys::dir::Dir;
use crate::{Error, ErrorKind, Result};

/// The permission bits a created lock file may have: no setuid, setgid or
/// sticky bit, whatever the caller asked for.
pub(crate) const PERMISSION_BITS: u32 = 0o777;

/// What a non-regular file at a lock path is, for the error message.
pub(crate) fn describe_type(t: FileType) -> &'static str {
    if t.is_dir() {
        "a directory is at this path"
    } else if t.is_symlink() {
        "a symbolic link is at this path (not followed)"
    } else if t.is_fifo() {
        "a FIFO is at this path"
    } else if t.is_socket() {
        "a socket is at this path"
    } else if t.is_char_device() || t.is_block_device() {
        "a device is at this path"
    } else {
        "not a regular file"
    }
}

/// Kernel pseudo file systems (statfs magic numbers) whose files are not
/// files: reading or opening them for writing can act on the kernel.
fn pseudo_fs(magic: i64) -> Option<&'static str> {
    Some(match magic {
        0x9fa0 => "proc",
        0x6265_6572 => "sysfs",
        0x6462_6720 => "debugfs",
        0x7472_6163 => "tracefs",
        0x7363_6673 => "securityfs",
        0x0027_e0eb => "cgroup",
        0x6367_7270 => "cgroup2",
        0x6265_6570 => "configfs",
        0xcafe_4a11 => "bpf",
        0x6165_676c => "pstore",
        0xde5e_81e4 => "efivarfs",
        0x6573_5543 => "fusectl",
        0xf97c_ff8c => "selinuxfs",
        0x4249_4e4d => "binfmt_misc",
        0x1cd1 => "devpts",
        _ => return None,
    })
}

/// Refuses, before anything is opened, a path that is not (or cannot
/// become) a regular lock file: a non-regular file at it, or a file system
/// of the kernel's. `op` names the operation in errors.
pub(crate) fn check_before_open(path: &Path, op: &'static str) -> Result<()> {
    check_type_before_open(path, op)?;
    let refuse = |kind: ErrorKind, detail: String| {
        Err(Error::new(kind, op).with_path(path).with_detail(detail))
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // The directory's file system is the file's (a mount point is a
    // directory, never a regular file).
    if let Ok(magic) = Dir::open_following(dir).and_then(|d| d.fs_type()) {
        if let Some(fs) = pseudo_fs(magic) {
            return refuse(
                ErrorKind::Unsupported,
                format!("the path is on the kernel's {fs} file system, not a lock file"),
            );
        }
    }
    Ok(())
}

/// The first half of [`check_before_open`]: refuses a non-regular file at
/// the path (a FIFO, a device, a directory), and a path ending in a slash,
/// before anything is opened.
fn check_type_before_open(path: &Path, op: &'static str) -> Result<()> {
    let refuse = |kind: ErrorKind, detail: String| {
        Err(Error::new(kind, op).with_path(path).with_detail(detail))
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => Ok(()),
        Ok(m) => refuse(ErrorKind::Corrupt, describe_type(m.file_type()).into()),
        Err(_) if path.as_os_str().as_bytes().ends_with(b"/") => refuse(
            ErrorKind::InvalidInput,
            "the path ends with a slash: a lock file needs a file name".into(),
        ),
        Err(_) => Ok(()),
    }
}

/// An opened lock file.
pub(crate) struct Opened {
    pub file: File,
    /// Opened read-write; otherwise read-only, because this user may read
    /// but not write it (only shared fcntl locks are then possible).
    pub writable: bool,
    /// (st_dev, st_ino) of the opened file.
    pub id: (u64, u64),
    /// The file's owner (st_uid).
    pub owner: u32,
    /// The file's mode bits (st_mode).
    pub mode: u32,
}

/// Opens, creating with `mode` if missing, the lock file at `path`. `op`
/// names the operation in errors (e.g. "open lock file").
///
/// Only the permission bits of `mode` are used (see [`PERMISSION_BITS`]).
pub(crate) fn open_lock_file(path: &Path, mode: u32, op: &'static str) -> Result<Opened> {
    check_before_open(path, op)?;
    open_checked(path, mode, op)
}

/// [`open_lock_file`] for a handle that opened this path before and then
/// removed the file itself: what is at the path is checked again before the
/// open, the directory's file system is not (the handle's first open found
/// it a real one, and its own file was there until it removed it; saves an
/// `openat`, an `fstatfs` and a `close` per deleting acquisition).
pub(crate) fn open_lock_file_again(path: &Path, mode: u32, op: &'static str) -> Result<Opened> {
    check_type_before_open(path, op)?;
    open_checked(path, mode, op)
}

fn open_checked(path: &Path, mode: u32, op: &'static str) -> Result<Opened> {
    let mode = mode & PERMISSION_BITS;
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
        return Err(Error::new(ErrorKind::Corrupt, op)
            .with_path(path)
            .with_detail(describe_type(meta.file_type())));
    }
    Ok(Opened {
        file,
        writable,
        id: (meta.dev(), meta.ino()),
        owner: meta.uid(),
        mode: meta.mode(),
    })
}
