//! Directory file descriptors: every operation relative to one directory
//! inode (`openat`, `mkdirat`, `renameat2`, `unlinkat`, `fstatat`, readdir).
//!
//! Why it is built this way: a lock that lives in a directory is subject to
//! ABA at its path. Between "I looked at `lock/` and judged it stale" and "I
//! removed `lock/`", the directory at that path may have been released and
//! replaced by a fresh one, and a path-based removal would destroy the fresh
//! lock. An operation through a descriptor of the directory *inode* cannot
//! be redirected that way: whatever now sits at the path, `renameat(fd, ...)`
//! touches only the directory that was opened. The lease family therefore
//! opens a lock directory once and does everything inside it through the
//! descriptor; only creating the lock and removing an *empty* one use names.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

/// An open directory; every method acts on *this* inode, wherever it has
/// been renamed to since it was opened.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
}

/// A name as a C string: on the stack when it fits, as every name within
/// one directory does (`NAME_MAX` is 255); a heap copy for longer paths.
/// A lease cycle passes about ten names to the kernel, and an allocation
/// for each was a measurable part of it.
#[allow(clippy::large_enum_variant)] // the point: the name on the stack
enum CName {
    Stack([u8; 256]),
    Heap(CString),
}

impl CName {
    fn as_ptr(&self) -> *const libc::c_char {
        match self {
            CName::Stack(b) => b.as_ptr().cast(),
            CName::Heap(c) => c.as_ptr(),
        }
    }
}

fn cstr(name: &[u8]) -> io::Result<CName> {
    if name.contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"));
    }
    if name.len() < 256 {
        let mut b = [0u8; 256];
        b[..name.len()].copy_from_slice(name);
        return Ok(CName::Stack(b));
    }
    CString::new(name.to_vec())
        .map(CName::Heap)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `fstat(fd)`.
fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: an all-zero `stat` is a valid value of a plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is a live descriptor of the caller's; `st` is writable.
    cvt(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

const DIR_FLAGS: libc::c_int =
    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;

/// How [`rename_noreplace`] managed to refuse replacing the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoReplace {
    /// `renameat2(RENAME_NOREPLACE)`: fails with `EEXIST` on any target.
    Kernel,
    /// The file system lacks `RENAME_NOREPLACE` (NFS, older kernels): plain
    /// `renameat`, which fails on a non-empty directory or a non-directory
    /// but silently replaces an *empty* directory.
    EmptyDirMayBeReplaced,
}

impl Dir {
    /// Opens the directory at `path` (not following a final symlink).
    pub fn open(path: &Path) -> io::Result<Dir> {
        Dir::open_flags(path, DIR_FLAGS)
    }

    /// Opens the directory at `path`, following symlinks all the way (for a
    /// parent directory named through a link, such as `/var/run`).
    pub fn open_following(path: &Path) -> io::Result<Dir> {
        Dir::open_flags(path, DIR_FLAGS & !libc::O_NOFOLLOW)
    }

    fn open_flags(path: &Path, flags: libc::c_int) -> io::Result<Dir> {
        let p = cstr(path.as_os_str().as_bytes())?;
        // SAFETY: `p` is a valid NUL-terminated string; open has no other
        // memory requirements and returns a new descriptor we own or -1.
        let fd = cvt(unsafe { libc::open(p.as_ptr(), flags) })?;
        // SAFETY: `fd` was just returned by open and is owned by no one else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Dir { fd })
    }

    /// Opens the subdirectory `name` of this directory (no symlinks).
    pub fn open_at(&self, name: impl AsRef<OsStr>) -> io::Result<Dir> {
        let n = cstr(name.as_ref().as_bytes())?;
        // SAFETY: valid fd and NUL-terminated name; returns a new fd or -1.
        let fd = cvt(unsafe { libc::openat(self.fd.as_raw_fd(), n.as_ptr(), DIR_FLAGS) })?;
        // SAFETY: `fd` is new and ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Dir { fd })
    }

    /// `mkdirat(fd, name, mode)`: atomic create-or-fail (`EEXIST`).
    pub fn mkdir(&self, name: impl AsRef<OsStr>, mode: u32) -> io::Result<()> {
        let n = cstr(name.as_ref().as_bytes())?;
        // SAFETY: valid fd and NUL-terminated name.
        cvt(unsafe { libc::mkdirat(self.fd.as_raw_fd(), n.as_ptr(), mode as libc::mode_t) })?;
        Ok(())
    }

    /// `unlinkat(fd, name, AT_REMOVEDIR)`: removes an *empty* directory.
    pub fn rmdir(&self, name: impl AsRef<OsStr>) -> io::Result<()> {
        self.unlink_flags(name, libc::AT_REMOVEDIR)
    }

    /// `unlinkat(fd, name, 0)`: removes a non-directory.
    pub fn unlink(&self, name: impl AsRef<OsStr>) -> io::Result<()> {
        self.unlink_flags(name, 0)
    }

    fn unlink_flags(&self, name: impl AsRef<OsStr>, flags: libc::c_int) -> io::Result<()> {
        let n = cstr(name.as_ref().as_bytes())?;
        // SAFETY: valid fd and NUL-terminated name.
        cvt(unsafe { libc::unlinkat(self.fd.as_raw_fd(), n.as_ptr(), flags) })?;
        Ok(())
    }

    /// `renameat(fd, from, fd, to)` within this directory: atomic; fails
    /// with `ENOENT` if `from` is not there (the compare half of a
    /// compare-and-swap on a name).
    pub fn rename(&self, from: impl AsRef<OsStr>, to: impl AsRef<OsStr>) -> io::Result<()> {
        let f = cstr(from.as_ref().as_bytes())?;
        let t = cstr(to.as_ref().as_bytes())?;
        let fd = self.fd.as_raw_fd();
        // SAFETY: valid fds and NUL-terminated names.
        cvt(unsafe { libc::renameat(fd, f.as_ptr(), fd, t.as_ptr()) })?;
        Ok(())
    }

    /// Creates the file `name` (`O_CREAT|O_EXCL|O_NOFOLLOW`) with `contents`.
    /// With `sync`, the data is flushed before returning.
    pub fn create_file(
        &self,
        name: impl AsRef<OsStr>,
        contents: &[u8],
        mode: u32,
        sync: bool,
    ) -> io::Result<()> {
        let n = cstr(name.as_ref().as_bytes())?;
        let flags =
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: valid fd and NUL-terminated name; the mode is passed as the
        // variadic third argument open(2) expects with O_CREAT.
        let fd = cvt(unsafe {
            libc::openat(self.fd.as_raw_fd(), n.as_ptr(), flags, mode as libc::c_uint)
        })?;
        // SAFETY: `fd` is new and ours.
        let mut f = unsafe { File::from_raw_fd(fd) };
        f.write_all(contents)?;
        if sync {
            f.sync_data()?;
        }
        Ok(())
    }

    /// Creates the empty file `name` (`O_CREAT|O_EXCL|O_NOFOLLOW`) and
    /// returns it open (write-only), e.g. to learn later, from its link
    /// count, whether it was removed.
    pub fn create_empty(&self, name: impl AsRef<OsStr>, mode: u32) -> io::Result<File> {
        let n = cstr(name.as_ref().as_bytes())?;
        let flags =
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: valid fd and NUL-terminated name; the mode is passed as the
        // variadic third argument open(2) expects with O_CREAT.
        let fd = cvt(unsafe {
            libc::openat(self.fd.as_raw_fd(), n.as_ptr(), flags, mode as libc::c_uint)
        })?;
        // SAFETY: `fd` is new and ours.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Reads at most `limit` bytes of the regular file `name` (no symlinks).
    pub fn read_file(&self, name: impl AsRef<OsStr>, limit: u64) -> io::Result<Vec<u8>> {
        let n = cstr(name.as_ref().as_bytes())?;
        let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: valid fd and NUL-terminated name.
        let fd = cvt(unsafe { libc::openat(self.fd.as_raw_fd(), n.as_ptr(), flags) })?;
        // SAFETY: `fd` is new and ours.
        let f = unsafe { File::from_raw_fd(fd) };
        // Room for the whole file up front: two reads (data, then end of
        // file) rather than a 32-byte probe and doubling reads.
        let mut buf = Vec::with_capacity(limit.min(64 * 1024) as usize + 1);
        f.take(limit).read_to_end(&mut buf)?;
        Ok(buf)
    }

    /// Whether `name` exists in this directory (`fstatat`, no symlinks
    /// followed).
    pub fn contains(&self, name: impl AsRef<OsStr>) -> io::Result<bool> {
        let n = cstr(name.as_ref().as_bytes())?;
        // SAFETY: an all-zero `stat` is a valid value of a plain C struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd, NUL-terminated name, `st` is writable.
        let r = unsafe {
            libc::fstatat(
                self.fd.as_raw_fd(),
                n.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if r == 0 {
            Ok(true)
        } else {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOENT) {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }

    /// The names in this directory, without `.` and `..`. Read through a
    /// fresh descriptor, so concurrent listings do not share a position.
    /// On Linux local file systems a directory that fits in one `getdents`
    /// buffer is listed under the directory's lock, so the listing is a
    /// snapshot with respect to renames in it.
    pub fn names(&self) -> io::Result<Vec<OsString>> {
        self.names_limited(usize::MAX)
    }

    /// As [`Dir::names`], but stops after `limit` names (a directory that
    /// others can write may hold any number).
    pub fn names_limited(&self, limit: usize) -> io::Result<Vec<OsString>> {
        let dot = c".";
        // SAFETY: valid fd and NUL-terminated name; a new fd or -1.
        let fd = cvt(unsafe { libc::openat(self.fd.as_raw_fd(), dot.as_ptr(), DIR_FLAGS) })?;
        // SAFETY: `fd` is a directory descriptor we own; on success fdopendir
        // takes it over (closedir closes it), on failure we close it.
        let dirp = unsafe { libc::fdopendir(fd) };
        if dirp.is_null() {
            let e = io::Error::last_os_error();
            // SAFETY: fdopendir failed, so `fd` is still ours to close.
            unsafe { libc::close(fd) };
            return Err(e);
        }
        let mut out = Vec::new();
        let result = loop {
            if out.len() >= limit {
                break Ok(());
            }
            // SAFETY: errno is thread-local; resetting it distinguishes the
            // end of the directory from an error, as readdir(3) requires.
            unsafe { *libc::__errno_location() = 0 };
            // SAFETY: `dirp` is a valid open DIR*, used by this thread only.
            let ent = unsafe { libc::readdir64(dirp) };
            if ent.is_null() {
                let e = io::Error::last_os_error();
                break if e.raw_os_error().unwrap_or(0) == 0 {
                    Ok(())
                } else {
                    Err(e)
                };
            }
            // SAFETY: readdir returned a valid entry whose d_name is a
            // NUL-terminated string, valid until the next readdir call; we
            // copy it out before that.
            let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) }.to_bytes();
            if name != b"." && name != b".." {
                out.push(OsString::from_vec(name.to_vec()));
            }
        };
        // SAFETY: `dirp` is valid and closed exactly once.
        unsafe { libc::closedir(dirp) };
        result.map(|()| out)
    }

    /// As [`Dir::names_limited`], read through this descriptor itself
    /// (`lseek` to the start, then `getdents64` until it returns 0): three
    /// system calls for a small directory instead of seven (opening a
    /// second descriptor for `fdopendir`, whose set-up costs a `fstat` and
    /// two `fcntl`, and closing it). It moves this descriptor's position,
    /// which nothing else here uses.
    pub fn names_direct(&self, limit: usize) -> io::Result<Vec<OsString>> {
        let fd = self.fd.as_raw_fd();
        // SAFETY: valid fd; lseek has no memory effects.
        if unsafe { libc::lseek(fd, 0, libc::SEEK_SET) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // 8-byte aligned, as linux_dirent64 records are.
        let mut buf = [0u64; 512];
        let mut out = Vec::new();
        loop {
            // SAFETY: valid fd; the kernel writes at most `size_of_val(&buf)`
            // bytes into `buf`, which we own.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_getdents64,
                    fd,
                    buf.as_mut_ptr().cast::<u8>(),
                    std::mem::size_of_val(&buf),
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 {
                return Ok(out);
            }
            // SAFETY: the kernel filled the first `n` bytes of `buf`; we
            // read them as bytes only.
            let bytes =
                unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n as usize) };
            let mut at = 0;
            // Each record: d_ino (8), d_off (8), d_reclen (2), d_type (1),
            // then the NUL-terminated name, padded to d_reclen.
            while at + 19 <= bytes.len() {
                let reclen = usize::from(u16::from_ne_bytes([bytes[at + 16], bytes[at + 17]]));
                if reclen < 19 || at + reclen > bytes.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "malformed getdents64 record",
                    ));
                }
                let name = &bytes[at + 19..at + reclen];
                let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
                if name != b"." && name != b".." {
                    if out.len() >= limit {
                        return Ok(out);
                    }
                    out.push(OsString::from_vec(name.to_vec()));
                }
                at += reclen;
            }
        }
    }

    /// `fsync` of the directory: makes the entries created in it durable.
    pub fn sync(&self) -> io::Result<()> {
        // SAFETY: valid fd.
        cvt(unsafe { libc::fsync(self.fd.as_raw_fd()) })?;
        Ok(())
    }

    /// Device and inode number of this directory.
    pub fn identity(&self) -> io::Result<(u64, u64)> {
        let st = fstat(self.fd.as_raw_fd())?;
        Ok((st.st_dev, st.st_ino))
    }

    /// The owner's uid of this directory.
    pub fn owner(&self) -> io::Result<u32> {
        Ok(fstat(self.fd.as_raw_fd())?.st_uid)
    }

    /// The file type (`S_IFDIR`, `S_IFREG`, ...) of `name` in this
    /// directory, not following a symbolic link; `None` if there is none.
    pub fn kind_of(&self, name: impl AsRef<OsStr>) -> io::Result<Option<libc::mode_t>> {
        let n = cstr(name.as_ref().as_bytes())?;
        // SAFETY: an all-zero `stat` is a valid value of a plain C struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd, NUL-terminated name, `st` is writable.
        let r = unsafe {
            libc::fstatat(
                self.fd.as_raw_fd(),
                n.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if r == 0 {
            return Ok(Some(st.st_mode & libc::S_IFMT));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOENT) {
            Ok(None)
        } else {
            Err(e)
        }
    }

    /// Reads the regular file `name` if it is at most `limit` bytes long,
    /// with its owner's uid. Opened without following a symbolic link and
    /// without blocking (a FIFO or device planted at the name can neither
    /// hang nor feed the read); anything but a regular file is refused
    /// (`EINVAL`), and so is a file larger than `limit` (`EFBIG`).
    pub fn read_regular(&self, name: impl AsRef<OsStr>, limit: u64) -> io::Result<(Vec<u8>, u32)> {
        let n = cstr(name.as_ref().as_bytes())?;
        let flags =
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY;
        // SAFETY: valid fd and NUL-terminated name.
        let fd = cvt(unsafe { libc::openat(self.fd.as_raw_fd(), n.as_ptr(), flags) })?;
        // SAFETY: `fd` is new and ours.
        let f = unsafe { File::from_raw_fd(fd) };
        let st = fstat(f.as_raw_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if st.st_size as u64 > limit {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        let mut buf = Vec::new();
        // It may grow after the fstat: still read no more than `limit`.
        f.take(limit).read_to_end(&mut buf)?;
        Ok((buf, st.st_uid))
    }

    /// The file system's magic number (`fstatfs` `f_type`).
    pub fn fs_type(&self) -> io::Result<i64> {
        // SAFETY: an all-zero `statfs` is a valid value of a plain C struct.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd, `st` writable.
        cvt(unsafe { libc::fstatfs(self.fd.as_raw_fd(), &mut st) })?;
        Ok(st.f_type)
    }
}

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Dir {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
thread_local! {
    /// Tests set this to run [`rename_noreplace`]'s fallback (plain
    /// `renameat`, as on NFS) on the current thread.
    pub static FORCE_PLAIN_RENAME: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Moves `from_dir/from` to `to_dir/to`, refusing to replace an existing
/// `to` as far as the file system allows (see [`NoReplace`]).
/// `renameat2(RENAME_NOREPLACE)` first; on `EINVAL`/`ENOSYS` (no support)
/// plain `renameat`.
pub fn rename_noreplace(
    from_dir: &Dir,
    from: impl AsRef<OsStr>,
    to_dir: &Dir,
    to: impl AsRef<OsStr>,
) -> io::Result<NoReplace> {
    let f = cstr(from.as_ref().as_bytes())?;
    let t = cstr(to.as_ref().as_bytes())?;
    #[cfg(test)]
    if FORCE_PLAIN_RENAME.with(|c| c.get()) {
        // SAFETY: valid fds and NUL-terminated names.
        cvt(unsafe {
            libc::renameat(
                from_dir.as_raw_fd(),
                f.as_ptr(),
                to_dir.as_raw_fd(),
                t.as_ptr(),
            )
        })?;
        return Ok(NoReplace::EmptyDirMayBeReplaced);
    }
    // SAFETY: valid fds and NUL-terminated names.
    let r = unsafe {
        libc::renameat2(
            from_dir.as_raw_fd(),
            f.as_ptr(),
            to_dir.as_raw_fd(),
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(NoReplace::Kernel);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            // SAFETY: valid fds and NUL-terminated names.
            cvt(unsafe {
                libc::renameat(
                    from_dir.as_raw_fd(),
                    f.as_ptr(),
                    to_dir.as_raw_fd(),
                    t.as_ptr(),
                )
            })?;
            Ok(NoReplace::EmptyDirMayBeReplaced)
        }
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_listing_matches_readdir() {
        let t = tempfile::tempdir().unwrap();
        let root = Dir::open(t.path()).unwrap();
        assert!(root.names_direct(usize::MAX).unwrap().is_empty());
        // Enough entries, with long names, to need several getdents64 reads.
        for i in 0..300 {
            root.create_file(format!("{i:0>200}"), b"", 0o644, false)
                .unwrap();
        }
        let mut a = root.names().unwrap();
        let mut b = root.names_direct(usize::MAX).unwrap();
        let again = root.names_direct(usize::MAX).unwrap();
        a.sort();
        b.sort();
        assert_eq!(a.len(), 300);
        assert_eq!(a, b);
        assert_eq!(again.len(), 300, "each call lists from the start");
        assert_eq!(root.names_direct(5).unwrap().len(), 5);
    }

    #[test]
    fn fd_operations_follow_the_inode_not_the_path() {
        let t = tempfile::tempdir().unwrap();
        let root = Dir::open(t.path()).unwrap();
        root.mkdir("a", 0o755).unwrap();
        assert_eq!(
            root.mkdir("a", 0o755).unwrap_err().raw_os_error(),
            Some(libc::EEXIST)
        );
        let a = root.open_at("a").unwrap();
        a.create_file("f", b"hello", 0o644, true).unwrap();
        assert_eq!(a.read_file("f", 100).unwrap(), b"hello");
        // Move `a` away and put a fresh `a` in its place: the descriptor
        // still acts on the original.
        root.rename("a", "b").unwrap();
        root.mkdir("a", 0o755).unwrap();
        a.rename("f", "g").unwrap();
        assert!(t.path().join("b/g").exists());
        assert!(!t.path().join("a/g").exists());
        assert_eq!(a.names().unwrap(), vec![OsString::from("g")]);
        assert_eq!(a.names().unwrap().len(), 1, "listing twice starts over");
        assert!(a.contains("g").unwrap());
        assert!(!a.contains("f").unwrap());
        assert_eq!(
            a.rename("f", "h").unwrap_err().raw_os_error(),
            Some(libc::ENOENT)
        );
        // Non-empty directories are refused by both rename flavours.
        let e = rename_noreplace(&root, "b", &root, "a").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        assert_eq!(
            root.rmdir("b").unwrap_err().raw_os_error(),
            Some(libc::ENOTEMPTY)
        );
        a.unlink("g").unwrap();
        root.rmdir("b").unwrap();
        root.rmdir("a").unwrap();
        assert!(root.fs_type().is_ok());
        assert!(root.identity().unwrap().1 > 0);
        root.sync().unwrap();
    }
}
