//! [`FileSemaphore`]: N permits as N bytes of a lock file, each permit an
//! OFD write lock on one byte.
//!
//! Why it is built this way: the shared-memory [`crate::Semaphore`] needs
//! processes to map the same memory, which containers with separate
//! /dev/shm (or separate IPC namespaces) do not; a file on a shared volume
//! is all they have in common. A kernel file lock is released by the kernel
//! when its holder dies, so a permit that is a lock needs no recovery at
//! all: permit *i* is a write lock on byte *i* of the file.
//!
//! The kernel has no "wait for any of these N locks", so a waiter cannot
//! sleep until *some* byte is free. It waits like this:
//!
//! 1. try every byte without blocking (N `F_OFD_SETLK` calls);
//! 2. if all are held, block in `F_OFD_SETLKW` on one byte (a different one
//!    each round, starting from a per-process offset, so that waiters
//!    spread over the bytes), cut after [`SLICE`] by the thread-directed
//!    timer signal of `sys::timer` (or earlier at the caller's deadline);
//! 3. repeat.
//!
//! The cost: a release of the byte a waiter blocks on wakes it at once (the
//! kernel's queue); a release of another byte is noticed at the waiter's
//! next slice, at most [`SLICE`] later, unless another waiter was blocked on
//! that byte. With at least N waiters spread over the bytes every release
//! wakes one of them at once. A waiter makes N + 1 lock calls and arms one
//! timer per slice (a few µs every 5 ms). Measured in docs/design-sem.md.
//!
//! Open file descriptions: the handle has one, so two threads of a handle
//! asking for the same byte would both "get" it (a lock owner re-locking its
//! own range succeeds). The handle therefore claims a byte locally (under a
//! mutex) before asking the kernel for it, and no thread of the handle asks
//! for a byte another thread of it claims.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::open::open_lock_file;
use crate::handle::Handle;
use crate::sys::fcntl::{ofd_get, ofd_try, ofd_wait, ByteRange, RangeLock};
use crate::sys::timer::block_until;
use crate::wait::{Blocked, Mode, OnBlock, Wait};
use crate::{Error, ErrorKind, Lock, Result, TryLockError};

/// How long a waiter blocks on one byte before it tries the others again.
pub const SLICE: Duration = Duration::from_millis(5);

/// The most permits a file semaphore can have.
pub const MAX_PERMITS: u32 = 4096;

/// Where the count declarations live: a handle on a semaphore of N permits
/// holds a read lock on byte `DECLARE + N`, so an opener with another count
/// is refused while any handle is open.
const DECLARE: u64 = 1 << 32;

fn byte(i: u32) -> ByteRange {
    ByteRange {
        start: u64::from(i),
        len: 1,
    }
}

/// A counting semaphore of N permits on a lock file: permit *i* is an OFD
/// write lock on byte *i*. Works wherever the processes share the file
/// (containers sharing a volume but not /dev/shm; NFS where the kernel's
/// fcntl locks work there).
///
/// Scope: threads (through one handle or several) and processes of a host
/// that see the same file. Fork: the child shares the handle's open file
/// description and with it the permits held through it (as for
/// [`crate::FileLock`]); open a new handle in the child. Close: guards
/// borrow the handle. Crash: the kernel releases a dead holder's permits at
/// once. NFS: as fcntl locks do there.
///
/// ```no_run
/// # fn main() -> interlock::Result<()> {
/// let sem = interlock::FileSemaphore::open("/shared/encoders.sem", 2)?;
/// let _permit = sem.acquire()?;
/// # Ok(()) }
/// ```
pub struct FileSemaphore {
    file: File,
    path: PathBuf,
    n: u32,
    /// Bytes a thread of this handle holds or is asking the kernel for.
    claimed: Mutex<Vec<bool>>,
    /// Signalled when a byte is unclaimed (threads of this handle waiting
    /// while every byte is claimed by their siblings sleep on it).
    freed: Condvar,
    on_block: Option<OnBlock>,
}

impl std::fmt::Debug for FileSemaphore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSemaphore")
            .field("path", &self.path)
            .field("permits", &self.n)
            .finish_non_exhaustive()
    }
}

impl FileSemaphore {
    /// Opens (creating with mode 0o644 if missing) the semaphore file
    /// `path` with `permits` permits (1..=4096). Every user of the file
    /// must give the same count: while any handle is open, an opener with
    /// another count is refused with `InvalidInput`.
    pub fn open(path: impl AsRef<Path>, permits: u32) -> Result<FileSemaphore> {
        Self::open_with(path, permits, 0o644, None)
    }

    /// As [`FileSemaphore::open`], with the file's creation mode and an
    /// on-block callback.
    pub fn open_with(
        path: impl AsRef<Path>,
        permits: u32,
        mode: u32,
        on_block: Option<OnBlock>,
    ) -> Result<FileSemaphore> {
        let path = path.as_ref();
        const OP: &str = "open semaphore file";
        if !(1..=MAX_PERMITS).contains(&permits) {
            return Err(Error::new(ErrorKind::InvalidInput, OP)
                .with_path(path)
                .with_detail(format!(
                    "{permits} permits requested; a file semaphore has 1..={MAX_PERMITS}"
                )));
        }
        let opened = open_lock_file(path, mode, OP)?;
        if !opened.writable {
            return Err(Error::new(ErrorKind::PermissionDenied, OP)
                .with_path(path)
                .with_detail("a permit is a write lock: the file must be writable"));
        }
        let file = opened.file;
        let io = |e| Error::io(OP, e).with_path(path);
        // Declare our count (a read lock on DECLARE + N), then look for a
        // declaration of any other count.
        let mine = ByteRange {
            start: DECLARE + u64::from(permits),
            len: 1,
        };
        ofd_try(file.as_fd(), RangeLock::Read, mine).map_err(io)?;
        let below = ByteRange {
            start: DECLARE,
            len: u64::from(permits),
        };
        let above = ByteRange {
            start: mine.start + 1,
            len: u64::from(MAX_PERMITS - permits) + 1,
        };
        for r in [below, above] {
            if let Some(c) = ofd_get(file.as_fd(), RangeLock::Write, r).map_err(io)? {
                return Err(Error::new(ErrorKind::InvalidInput, OP)
                    .with_path(path)
                    .with_detail(format!(
                        "the semaphore is in use with {} permits, not {permits}",
                        c.range.start - DECLARE
                    )));
            }
        }
        Ok(FileSemaphore {
            file,
            path: path.to_path_buf(),
            n: permits,
            claimed: Mutex::new(vec![false; permits as usize]),
            freed: Condvar::new(),
            on_block,
        })
    }

    /// A new descriptor of the handle's open file description: whoever
    /// holds it holds the permits taken through this handle (the kernel
    /// releases them when the last such descriptor closes), e.g. a child
    /// process that must keep the permit if its parent dies.
    pub fn try_clone_file(&self) -> Result<File> {
        self.file
            .try_clone()
            .map_err(|e| Error::io("duplicate semaphore file descriptor", e).with_path(&self.path))
    }

    /// The semaphore's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The number of permits, N.
    pub fn permits(&self) -> u32 {
        self.n
    }

    /// How many permits are free right now, as the kernel shows (a
    /// snapshot; N `F_OFD_GETLK` calls). Permits this handle holds count as
    /// held.
    pub fn available(&self) -> Result<u32> {
        let claimed = self.claimed.lock().clone();
        let mut free = 0;
        for i in 0..self.n {
            if claimed[i as usize] {
                continue;
            }
            let c = ofd_get(self.file.as_fd(), RangeLock::Write, byte(i))
                .map_err(|e| Error::io("inspect semaphore file", e).with_path(&self.path))?;
            free += u32::from(c.is_none());
        }
        Ok(free)
    }

    fn claim(&self, i: u32) -> bool {
        let mut c = self.claimed.lock();
        !std::mem::replace(&mut c[i as usize], true)
    }

    fn unclaim(&self, i: u32) {
        self.claimed.lock()[i as usize] = false;
        self.freed.notify_all();
    }

    fn io(&self, op: &'static str) -> impl Fn(std::io::Error) -> Error + '_ {
        move |e| Error::io(op, e).with_path(&self.path)
    }

    /// One round of non-blocking tries from `start`; a permit or `None`.
    fn try_one(&self, start: u32) -> Result<Option<u32>> {
        for j in 0..self.n {
            let i = (start + j) % self.n;
            if !self.claim(i) {
                continue;
            }
            match ofd_try(self.file.as_fd(), RangeLock::Write, byte(i)) {
                Ok(true) => return Ok(Some(i)),
                Ok(false) => self.unclaim(i),
                Err(e) => {
                    self.unclaim(i);
                    return Err(self.io("acquire semaphore permit")(e));
                }
            }
        }
        Ok(None)
    }

    fn give_back(&self, i: u32) -> Result<()> {
        let r = ofd_try(self.file.as_fd(), RangeLock::Unlock, byte(i));
        self.unclaim(i);
        r.map(drop).map_err(self.io("release semaphore permit"))
    }

    /// Blocks on the first byte from `pref` that no thread of this handle
    /// claims, until it is ours or `until` passes; if the handle's threads
    /// claim every byte, sleeps until one of them gives one up (or
    /// `until`).
    fn block_on(&self, pref: u32, until: Instant) -> Result<Option<u32>> {
        let i = {
            let mut c = self.claimed.lock();
            match (0..self.n)
                .map(|j| (pref + j) % self.n)
                .find(|&j| !c[j as usize])
            {
                Some(j) => {
                    c[j as usize] = true;
                    j
                }
                None => {
                    let _ = self.freed.wait_until(&mut c, until);
                    return Ok(None);
                }
            }
        };
        let got = block_until(Some(until), || {
            ofd_wait(self.file.as_fd(), RangeLock::Write, byte(i))
        });
        match got {
            Ok(Some(())) => Ok(Some(i)),
            Ok(None) => {
                self.unclaim(i);
                Ok(None)
            }
            Err(e) => {
                self.unclaim(i);
                Err(self.io("wait for semaphore permit")(e))
            }
        }
    }

    fn acquire_k(
        &self,
        k: u32,
        wait: Wait,
    ) -> std::result::Result<FileSemaphoreGuard<'_>, TryLockError> {
        if k == 0 || k > self.n {
            return Err(
                Error::new(ErrorKind::InvalidInput, "acquire semaphore permits")
                    .with_path(&self.path)
                    .with_detail(format!(
                        "{k} permits requested; the semaphore has {} (ask for 1..={})",
                        self.n, self.n
                    ))
                    .into(),
            );
        }
        let start = std::process::id() % self.n;
        let mut held: Vec<u32> = Vec::with_capacity(k as usize);
        let mut round = 0u32;
        let mut told = false;
        let fail = |held: &mut Vec<u32>, e: TryLockError| {
            for i in held.drain(..) {
                let _ = self.give_back(i);
            }
            Err(e)
        };
        loop {
            while (held.len() as u32) < k {
                match self.try_one(start + round + held.len() as u32) {
                    Ok(Some(i)) => held.push(i),
                    Ok(None) => break,
                    Err(e) => return fail(&mut held, e.into()),
                }
            }
            if held.len() as u32 == k {
                return Ok(FileSemaphoreGuard {
                    sem: Handle::Borrowed(self),
                    cells: held,
                });
            }
            // Never hold some while waiting for more (two such callers
            // would deadlock).
            for i in held.drain(..) {
                if let Err(e) = self.give_back(i) {
                    return Err(e.into());
                }
            }
            if !wait.may_block() || wait.expired() {
                return Err(wait.gave_up());
            }
            if !told {
                told = true;
                if let Some(cb) = &self.on_block {
                    cb(&Blocked {
                        resource: &self.path,
                        mode: Mode::Exclusive,
                        range: None,
                    });
                }
            }
            let slice_end = Instant::now() + SLICE;
            let until = match wait {
                Wait::Until(t) => t.min(slice_end),
                _ => slice_end,
            };
            let b = (start + round) % self.n;
            round = round.wrapping_add(1);
            match self.block_on(b, until) {
                Ok(Some(i)) => held.push(i),
                Ok(None) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Blocks until it holds one permit. Errors are I/O errors only.
    pub fn acquire(&self) -> Result<FileSemaphoreGuard<'_>> {
        self.acquire_many(1)
    }

    /// Takes one permit if one is free, else `Err(WouldBlock)`.
    pub fn try_acquire(&self) -> std::result::Result<FileSemaphoreGuard<'_>, TryLockError> {
        self.acquire_k(1, Wait::NonBlocking)
    }

    /// Waits at most `timeout` for one permit, else `TimedOut`.
    pub fn try_acquire_for(
        &self,
        timeout: Duration,
    ) -> std::result::Result<FileSemaphoreGuard<'_>, TryLockError> {
        self.acquire_k(1, Wait::timeout(timeout))
    }

    /// Waits until `deadline` at most for one permit, else `TimedOut`.
    pub fn try_acquire_until(
        &self,
        deadline: Instant,
    ) -> std::result::Result<FileSemaphoreGuard<'_>, TryLockError> {
        self.acquire_k(1, Wait::Until(deadline))
    }

    /// Blocks until it holds `k` permits at once (1..=N, else
    /// `InvalidInput`); holds none while it waits.
    pub fn acquire_many(&self, k: u32) -> Result<FileSemaphoreGuard<'_>> {
        self.acquire_k(k, Wait::Forever).map_err(|e| match e {
            TryLockError::Error(e) => e,
            e => unreachable!("a wait without deadline gave up: {e}"),
        })
    }

    /// `k` permits at once, waiting as `wait` allows.
    pub fn try_acquire_many(
        &self,
        k: u32,
        wait: Wait,
    ) -> std::result::Result<FileSemaphoreGuard<'_>, TryLockError> {
        self.acquire_k(k, wait)
    }

    /// As [`FileSemaphore::try_acquire_many`], with a guard that owns a
    /// reference to the semaphore (`'static`; any thread may give the
    /// permits back).
    pub fn acquire_many_arc(
        self: &std::sync::Arc<Self>,
        k: u32,
        wait: Wait,
    ) -> std::result::Result<FileSemaphoreGuard<'static>, TryLockError> {
        let mut g = self.acquire_k(k, wait)?;
        let cells = std::mem::take(&mut g.cells);
        drop(g);
        Ok(FileSemaphoreGuard {
            sem: Handle::Owned(std::sync::Arc::clone(self)),
            cells,
        })
    }
}

/// Permits held on a [`FileSemaphore`]; given back on drop. `Send`: the
/// kernel locks belong to the handle's open file description.
#[must_use = "the permits are given back as soon as the guard is dropped"]
pub struct FileSemaphoreGuard<'a> {
    sem: Handle<'a, FileSemaphore>,
    cells: Vec<u32>,
}

impl FileSemaphoreGuard<'_> {
    /// How many permits this guard holds.
    pub fn count(&self) -> u32 {
        self.cells.len() as u32
    }

    /// The permit numbers (bytes of the file) held.
    pub fn cells(&self) -> &[u32] {
        &self.cells
    }

    /// Gives the permits back, reporting what drop must swallow.
    pub fn release(mut self) -> Result<()> {
        let mut r = Ok(());
        for i in std::mem::take(&mut self.cells) {
            if let Err(e) = self.sem.give_back(i) {
                r = Err(e);
            }
        }
        r
    }
}

impl Drop for FileSemaphoreGuard<'_> {
    fn drop(&mut self) {
        for i in std::mem::take(&mut self.cells) {
            let _ = self.sem.give_back(i);
        }
    }
}

impl std::fmt::Debug for FileSemaphoreGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSemaphoreGuard")
            .field("semaphore", &self.sem.path)
            .field("cells", &self.cells)
            .finish()
    }
}

/// Both modes take one permit.
impl Lock for FileSemaphore {
    type Guard<'a> = FileSemaphoreGuard<'a>;

    fn acquire(
        &self,
        _mode: Mode,
        wait: Wait,
    ) -> std::result::Result<FileSemaphoreGuard<'_>, TryLockError> {
        self.acquire_k(1, wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn permits_try_timed_many_and_typed_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        let a = FileSemaphore::open(&p, 2).unwrap();
        let b = FileSemaphore::open(&p, 2).unwrap();
        let g1 = a.acquire().unwrap();
        let g2 = b.try_acquire().unwrap();
        assert_ne!(g1.cells(), g2.cells());
        assert!(matches!(a.try_acquire(), Err(TryLockError::WouldBlock)));
        assert!(matches!(b.try_acquire(), Err(TryLockError::WouldBlock)));
        let t = Instant::now();
        assert!(matches!(
            b.try_acquire_for(Duration::from_millis(30)),
            Err(TryLockError::TimedOut)
        ));
        assert!(t.elapsed() >= Duration::from_millis(30));
        assert_eq!(a.available().unwrap(), 0);
        drop(g1);
        assert_eq!(b.available().unwrap(), 1);
        assert!(matches!(
            b.try_acquire_many(2, Wait::NonBlocking),
            Err(TryLockError::WouldBlock)
        ));
        g2.release().unwrap();
        let all = a.acquire_many(2).unwrap();
        assert_eq!(all.count(), 2);
        drop(all);
        for k in [0, 3] {
            assert_eq!(
                a.acquire_many(k).unwrap_err().kind(),
                ErrorKind::InvalidInput
            );
        }
        // Another count is refused while a handle is open.
        let e = FileSemaphore::open(&p, 3).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains("2 permits"), "{e}");
        drop((a, b));
        drop(FileSemaphore::open(&p, 3).unwrap());
        for n in [0, MAX_PERMITS + 1] {
            assert_eq!(
                FileSemaphore::open(&p, n).unwrap_err().kind(),
                ErrorKind::InvalidInput
            );
        }
        assert_eq!(
            FileSemaphore::open(d.path(), 1).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
    }

    /// Threads of one handle and of two handles: never more than N
    /// inside. With `broken` the claimed N is one less than the file's.
    fn threads_inside(broken: bool) -> usize {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        let n = 2u32;
        let real = if broken { n + 1 } else { n };
        let handles = [
            Arc::new(FileSemaphore::open(&p, real).unwrap()),
            Arc::new(FileSemaphore::open(&p, real).unwrap()),
        ];
        let inside = Arc::new(AtomicUsize::new(0));
        let worst = Arc::new(AtomicUsize::new(0));
        let hs: Vec<_> = (0..6)
            .map(|t| {
                let s = handles[t % 2].clone();
                let (inside, worst) = (inside.clone(), worst.clone());
                std::thread::spawn(move || {
                    for _ in 0..300 {
                        let g = s.acquire().unwrap();
                        let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        worst.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_micros(50));
                        inside.fetch_sub(1, Ordering::SeqCst);
                        drop(g);
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        worst.load(Ordering::SeqCst)
    }

    #[test]
    fn never_more_than_n_threads_inside_and_the_control_catches_too_many() {
        assert!(threads_inside(false) <= 2);
        assert!(threads_inside(true) > 2, "the check never saw 3 inside");
    }

    #[test]
    fn a_thread_waiting_behind_its_siblings_sleeps_and_gets_in() {
        let d = tempfile::tempdir().unwrap();
        let s = FileSemaphore::open(d.path().join("s"), 1).unwrap();
        let g = s.acquire().unwrap();
        std::thread::scope(|sc| {
            let h = sc.spawn(|| s.try_acquire_for(Duration::from_secs(10)).map(drop));
            std::thread::sleep(Duration::from_millis(30));
            drop(g);
            h.join().unwrap().unwrap();
        });
    }
}
