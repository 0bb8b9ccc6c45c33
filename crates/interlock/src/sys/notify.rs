//! Being woken instead of polling: inotify for "a name was removed from this
//! directory", pidfd for "this process exited", and `poll` over both with a
//! time-out.
//!
//! Why it is built this way: a lock made of files has no kernel wait queue,
//! so the ancestors slept a fixed period between attempts (lockbydir: one
//! second), making every waiter lag every release by half a period on
//! average. inotify reports the removal of the lock directory the moment it
//! happens on a local file system, and a pidfd becomes readable the moment a
//! holder dies, so a waiter sleeps in `poll` until one of them fires. Neither
//! sees what other machines do to a network file system, so callers keep a
//! bounded fallback poll (see the lease family's waiter).

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// An inotify instance watching directories for removed or moved-away names.
#[derive(Debug)]
pub struct Inotify {
    fd: OwnedFd,
}

impl Inotify {
    /// A new, non-blocking, close-on-exec inotify instance.
    pub fn new() -> io::Result<Inotify> {
        // SAFETY: no pointers; returns a new fd or -1.
        let fd = cvt(unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) })?;
        // SAFETY: `fd` is new and ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Inotify { fd })
    }

    /// Watches `dir` for names deleted from it or moved out of it (and for
    /// the directory itself going away).
    pub fn watch_removals(&self, dir: &Path) -> io::Result<()> {
        let p = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
        let mask = libc::IN_DELETE
            | libc::IN_MOVED_FROM
            | libc::IN_DELETE_SELF
            | libc::IN_MOVE_SELF
            | libc::IN_ONLYDIR;
        // SAFETY: valid inotify fd and NUL-terminated path.
        cvt(unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), p.as_ptr(), mask) })?;
        Ok(())
    }

    /// Reads every pending event without blocking. Returns whether any of
    /// them names `name`, concerns the watched directory itself, or reports
    /// a queue overflow (so that the caller must look again).
    pub fn drain(&self, name: &OsStr) -> io::Result<bool> {
        let mut relevant = false;
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: `buf` is writable for its length.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast::<libc::c_void>(),
                    buf.len(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(relevant),
                    Some(libc::EINTR) => continue,
                    _ => Err(e),
                };
            }
            let n = n as usize;
            if n == 0 {
                return Ok(relevant);
            }
            let header = std::mem::size_of::<libc::inotify_event>();
            let mut off = 0;
            while off + header <= n {
                // SAFETY: the kernel wrote whole events into `buf[..n]`; an
                // unaligned read copies the fixed-size header out of it.
                let ev: libc::inotify_event = unsafe {
                    std::ptr::read_unaligned(buf.as_ptr().add(off).cast::<libc::inotify_event>())
                };
                let len = ev.len as usize;
                let raw = &buf[off + header..(off + header + len).min(n)];
                let ev_name = raw.split(|&b| b == 0).next().unwrap_or(&[]);
                if ev.mask
                    & (libc::IN_Q_OVERFLOW
                        | libc::IN_DELETE_SELF
                        | libc::IN_MOVE_SELF
                        | libc::IN_IGNORED)
                    != 0
                    || ev_name == name.as_bytes()
                {
                    relevant = true;
                }
                off += header + len;
            }
            // A read that left room for another event of the longest name
            // emptied the queue: no second read just to see EAGAIN.
            if n + header + (libc::NAME_MAX as usize) < buf.len() {
                return Ok(relevant);
            }
        }
    }
}

impl AsFd for Inotify {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A pidfd: readable once the process exits.
#[derive(Debug)]
pub struct PidFd {
    fd: OwnedFd,
}

impl PidFd {
    /// `pidfd_open(pid, 0)`. The caller must check afterwards that `pid`
    /// still names the process it meant (pids are reused), e.g. by its start
    /// time, since the pidfd refers to whatever process had `pid` at the call.
    pub fn open(pid: u32) -> io::Result<PidFd> {
        let pid = libc::pid_t::try_from(pid)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
        // SAFETY: pidfd_open takes two integers and returns an fd or -1.
        let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `r` is a new fd returned by the kernel and owned by us.
        let fd = unsafe { OwnedFd::from_raw_fd(r as libc::c_int) };
        Ok(PidFd { fd })
    }
}

impl AsFd for PidFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// `d` as a timespec (saturating at the largest number of seconds).
fn timespec_of(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: d.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
        tv_nsec: d.subsec_nanos() as _,
    }
}

/// Waits until one of `fds` is readable or `timeout` passes (`None`:
/// forever). Returns whether any descriptor became readable. `EINTR` counts
/// as an early return with nothing ready.
pub fn poll_readable(fds: &[BorrowedFd<'_>], timeout: Option<Duration>) -> io::Result<bool> {
    poll_ready(fds, timeout).map(|m| m != 0)
}

/// As [`poll_readable`], telling which: bit `i` is set if `fds[i]` is
/// readable (or in error or hung up). At most 64 descriptors.
pub fn poll_ready(fds: &[BorrowedFd<'_>], timeout: Option<Duration>) -> io::Result<u64> {
    assert!(fds.len() <= 64, "poll_ready takes at most 64 descriptors");
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // ppoll, not poll: its timeout is exact to the nanosecond, where poll's
    // milliseconds would round every wait up by up to 1 ms.
    let ts = timeout.map(timespec_of);
    let tsp = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `pfds` is a valid, writable array of `pfds.len()` entries;
    // `tsp` is null or points to a timespec that outlives the call; a null
    // signal mask leaves the mask unchanged.
    let r = unsafe {
        libc::ppoll(
            pfds.as_mut_ptr(),
            pfds.len() as libc::nfds_t,
            tsp,
            std::ptr::null(),
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) {
            super::timer::note_signal();
            return Ok(0);
        }
        return Err(e);
    }
    Ok(pfds
        .iter()
        .enumerate()
        .filter(|(_, p)| p.revents != 0)
        .fold(0, |m, (i, _)| m | 1 << i))
}

/// Whether the file system with magic number `f_type` is one where inotify
/// sees every change (a local one). Network and user-space file systems,
/// and any we do not know, answer `false`.
pub fn fs_is_local(f_type: i64) -> bool {
    const LOCAL: &[i64] = &[
        0xEF53,      // ext2/3/4
        0x0102_1994, // tmpfs
        0x5846_5342, // xfs
        0x9123_683E, // btrfs
        0x794C_7630, // overlayfs
        0xF2F5_2010, // f2fs
        0x2FC1_2FC1, // zfs
        0x8584_58F6, // ramfs
        0x3153_464A, // jfs
        0x5265_4973, // reiserfs
    ];
    LOCAL.contains(&f_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_timeouts_are_exact_not_rounded_to_milliseconds() {
        let t = timespec_of(Duration::from_micros(2_500_123));
        assert_eq!((t.tv_sec, t.tv_nsec), (2, 500_123_000));
        let t = timespec_of(Duration::from_nanos(1));
        assert_eq!((t.tv_sec, t.tv_nsec), (0, 1));
        assert_eq!(timespec_of(Duration::MAX).tv_sec, libc::time_t::MAX);
    }

    #[test]
    fn inotify_reports_removal_and_pidfd_reports_exit() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("x")).unwrap();
        let n = Inotify::new().unwrap();
        n.watch_removals(t.path()).unwrap();
        assert!(!poll_readable(&[n.as_fd()], Some(Duration::ZERO)).unwrap());
        std::fs::remove_dir(t.path().join("x")).unwrap();
        assert!(poll_readable(&[n.as_fd()], Some(Duration::from_secs(5))).unwrap());
        assert!(n.drain(OsStr::new("x")).unwrap());
        assert!(!n.drain(OsStr::new("x")).unwrap());

        let mut child = std::process::Command::new("true").spawn().unwrap();
        let p = PidFd::open(child.id()).unwrap();
        assert!(poll_readable(&[p.as_fd()], Some(Duration::from_secs(5))).unwrap());
        child.wait().unwrap();
        assert!(fs_is_local(0xEF53));
        assert!(!fs_is_local(0x6969)); // NFS
    }
}
