//! The only module of the harness with `unsafe`: the shared stats page (a
//! `MAP_SHARED` mapping every worker attaches to), futex waits, the
//! process-shared pthread and raw_sync peers that live inside that page, the
//! raw kernel-lock floors, and process control (stop, kill).
//!
//! Why it is built this way: the harness measures other people's locks, so
//! its own plumbing must be obviously right. Every raw call is wrapped once,
//! here, behind a safe function whose contract is stated next to it; the
//! rest of the harness works with `&AtomicU64` views into the page and never
//! sees a pointer. The page outlives every view because views borrow it, and
//! every object placed in it (a pthread lock, a futex word) holds an `Arc` of
//! the mapping.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

/// CLOCK_MONOTONIC in nanoseconds: the one clock every worker (Rust or
/// Python's `time.monotonic_ns`) reads, so timestamps compare across
/// processes.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A file-backed shared mapping (normally in /dev/shm) that the parent
/// creates and every worker maps at its own address.
pub struct SharedPage {
    ptr: *mut u8,
    len: usize,
    path: PathBuf,
    owner: bool,
}

// SAFETY: the mapping is plain shared memory; all access from safe code goes
// through atomics (see `u64_at`/`u32_at`) or through lock objects that are
// themselves designed for concurrent use.
unsafe impl Send for SharedPage {}
// SAFETY: as above.
unsafe impl Sync for SharedPage {}

impl SharedPage {
    /// Creates a zero-filled page of `len` bytes at `path` (which must not
    /// exist) and maps it. The file is removed when this value drops.
    pub fn create(path: &Path, len: usize) -> io::Result<SharedPage> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        f.set_len(len as u64)?;
        let mut p = Self::map(&f, len, path)?;
        p.owner = true;
        Ok(p)
    }

    /// Maps an existing page created by [`SharedPage::create`].
    pub fn attach(path: &Path) -> io::Result<SharedPage> {
        let f = OpenOptions::new().read(true).write(true).open(path)?;
        let len = f.metadata()?.len() as usize;
        Self::map(&f, len, path)
    }

    fn map(f: &File, len: usize, path: &Path) -> io::Result<SharedPage> {
        if len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: a fresh shared mapping of a descriptor we own; the kernel
        // picks the address; the result is checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedPage {
            ptr: ptr.cast(),
            len,
            path: path.to_path_buf(),
            owner: false,
        })
    }

    /// Keeps the backing file when this value drops (it is then removed
    /// with its directory).
    pub fn keep_file(&mut self) {
        self.owner = false;
    }

    /// The file that backs the mapping (passed to workers).
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check(&self, off: usize, size: usize) {
        assert!(
            off.is_multiple_of(size) && off + size <= self.len,
            "shared page offset {off} out of range or misaligned"
        );
    }

    /// The 64-bit word at byte offset `off` (8-aligned, inside the page).
    pub fn u64_at(&self, off: usize) -> &AtomicU64 {
        self.check(off, 8);
        // SAFETY: in bounds and aligned (checked); the mapping lives as long
        // as `&self`; every process touches the word only atomically (Python
        // workers with aligned 8-byte stores, which x86-64 performs atomically).
        unsafe { AtomicU64::from_ptr(self.ptr.add(off).cast()) }
    }

    /// The 32-bit word at byte offset `off` (4-aligned, inside the page).
    pub fn u32_at(&self, off: usize) -> &AtomicU32 {
        self.check(off, 4);
        // SAFETY: as for `u64_at`.
        unsafe { AtomicU32::from_ptr(self.ptr.add(off).cast()) }
    }

    fn raw_at(&self, off: usize, size: usize) -> *mut u8 {
        self.check(off, 8);
        assert!(off + size <= self.len, "object at {off} overruns the page");
        // SAFETY: in bounds (checked above).
        unsafe { self.ptr.add(off) }
    }
}

impl Drop for SharedPage {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region mapped in `map`; no view
        // outlives `self` (views borrow it, objects hold an Arc).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
        if self.owner {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Waits while `word == expected`, at most `timeout`. Shared (not
/// FUTEX_PRIVATE) so waiters in different processes meet on the same page.
/// Spurious returns are allowed; callers re-check.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
    let ts = timeout.map(|d| libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    });
    let tsp = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a live, aligned 32-bit word; `tsp` is null or points
    // to a timespec that outlives the call.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            tsp,
        )
    };
}

/// Wakes up to `n` waiters on `word`.
pub fn futex_wake(word: &AtomicU32, n: i32) {
    // SAFETY: `word` is a live, aligned 32-bit word; FUTEX_WAKE reads nothing else.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, n) };
}

fn check_rc(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// Bytes a process-shared pthread mutex or rwlock needs in the page.
pub const PTHREAD_SLOT: usize = 64;

/// A process-shared `pthread_mutex_t` living in a [`SharedPage`].
pub struct PthreadMutex {
    ptr: *mut libc::pthread_mutex_t,
    _page: Arc<SharedPage>,
}

impl PthreadMutex {
    /// Initialises a process-shared (optionally robust) mutex at `off`.
    /// Call once, in the parent, before any worker attaches.
    pub fn init(page: &Arc<SharedPage>, off: usize, robust: bool) -> io::Result<()> {
        let ptr = page
            .raw_at(off, std::mem::size_of::<libc::pthread_mutex_t>())
            .cast::<libc::pthread_mutex_t>();
        let mut attr = std::mem::MaybeUninit::<libc::pthread_mutexattr_t>::uninit();
        // SAFETY: attr is initialised by pthread_mutexattr_init before use and
        // destroyed after; `ptr` is in bounds, aligned, and not yet in use by
        // any process (the caller's contract: init before attach).
        unsafe {
            check_rc(libc::pthread_mutexattr_init(attr.as_mut_ptr()))?;
            let r = (|| {
                check_rc(libc::pthread_mutexattr_setpshared(
                    attr.as_mut_ptr(),
                    libc::PTHREAD_PROCESS_SHARED,
                ))?;
                if robust {
                    check_rc(libc::pthread_mutexattr_setrobust(
                        attr.as_mut_ptr(),
                        libc::PTHREAD_MUTEX_ROBUST,
                    ))?;
                }
                check_rc(libc::pthread_mutex_init(ptr, attr.as_ptr()))
            })();
            libc::pthread_mutexattr_destroy(attr.as_mut_ptr());
            r
        }
    }

    /// Uses the mutex initialised at `off`.
    pub fn attach(page: &Arc<SharedPage>, off: usize) -> PthreadMutex {
        let ptr = page
            .raw_at(off, std::mem::size_of::<libc::pthread_mutex_t>())
            .cast();
        PthreadMutex {
            ptr,
            _page: page.clone(),
        }
    }

    /// pthread_mutex_lock. For a robust mutex whose owner died, marks it
    /// consistent and reports `Ok(true)` ("recovered").
    pub fn lock(&self) -> io::Result<bool> {
        // SAFETY: `ptr` points to a mutex initialised by `init`, kept mapped
        // by the Arc we hold.
        let rc = unsafe { libc::pthread_mutex_lock(self.ptr) };
        if rc == libc::EOWNERDEAD {
            // SAFETY: as above; we now own the mutex, as consistent requires.
            check_rc(unsafe { libc::pthread_mutex_consistent(self.ptr) })?;
            return Ok(true);
        }
        check_rc(rc).map(|()| false)
    }

    /// pthread_mutex_unlock.
    pub fn unlock(&self) -> io::Result<()> {
        // SAFETY: as in `lock`; called only by the holder.
        check_rc(unsafe { libc::pthread_mutex_unlock(self.ptr) })
    }
}

/// A process-shared `pthread_rwlock_t` living in a [`SharedPage`] (glibc's
/// default kind: readers preferred).
pub struct PthreadRwLock {
    ptr: *mut libc::pthread_rwlock_t,
    _page: Arc<SharedPage>,
}

impl PthreadRwLock {
    /// Initialises a process-shared rwlock at `off` (parent, before attach).
    pub fn init(page: &Arc<SharedPage>, off: usize) -> io::Result<()> {
        let ptr = page
            .raw_at(off, std::mem::size_of::<libc::pthread_rwlock_t>())
            .cast::<libc::pthread_rwlock_t>();
        let mut attr = std::mem::MaybeUninit::<libc::pthread_rwlockattr_t>::uninit();
        // SAFETY: as for PthreadMutex::init.
        unsafe {
            check_rc(libc::pthread_rwlockattr_init(attr.as_mut_ptr()))?;
            let r = check_rc(libc::pthread_rwlockattr_setpshared(
                attr.as_mut_ptr(),
                libc::PTHREAD_PROCESS_SHARED,
            ))
            .and_then(|()| check_rc(libc::pthread_rwlock_init(ptr, attr.as_ptr())));
            libc::pthread_rwlockattr_destroy(attr.as_mut_ptr());
            r
        }
    }

    /// Uses the rwlock initialised at `off`.
    pub fn attach(page: &Arc<SharedPage>, off: usize) -> PthreadRwLock {
        let ptr = page
            .raw_at(off, std::mem::size_of::<libc::pthread_rwlock_t>())
            .cast();
        PthreadRwLock {
            ptr,
            _page: page.clone(),
        }
    }

    /// pthread_rwlock_wrlock / rdlock.
    pub fn lock(&self, exclusive: bool) -> io::Result<()> {
        // SAFETY: `ptr` points to an rwlock initialised by `init`, kept mapped
        // by the Arc we hold.
        check_rc(unsafe {
            if exclusive {
                libc::pthread_rwlock_wrlock(self.ptr)
            } else {
                libc::pthread_rwlock_rdlock(self.ptr)
            }
        })
    }

    /// pthread_rwlock_unlock.
    pub fn unlock(&self) -> io::Result<()> {
        // SAFETY: as in `lock`; called only by a holder.
        check_rc(unsafe { libc::pthread_rwlock_unlock(self.ptr) })
    }
}

/// raw_sync's `RwLock` (a process-shared pthread rwlock behind raw_sync's
/// API) placed in a [`SharedPage`].
pub struct RawSyncRw {
    lock: Box<dyn raw_sync::locks::LockImpl>,
    _page: Arc<SharedPage>,
}

impl RawSyncRw {
    fn open(page: &Arc<SharedPage>, off: usize, create: bool) -> io::Result<RawSyncRw> {
        use raw_sync::locks::{LockInit, RwLock};
        let mem = page.raw_at(off, PTHREAD_SLOT);
        assert!(RwLock::size_of(Some(mem)) <= PTHREAD_SLOT);
        // SAFETY: `mem` is PTHREAD_SLOT bytes inside the page, which the Arc
        // keeps mapped for the lock's lifetime; the data pointer is never
        // dereferenced by us (null-equivalent use: we lock, not read data).
        let r = unsafe {
            if create {
                RwLock::new(mem, mem)
            } else {
                RwLock::from_existing(mem, mem)
            }
        };
        let (lock, _) = r.map_err(|e| io::Error::other(e.to_string()))?;
        Ok(RawSyncRw {
            lock,
            _page: page.clone(),
        })
    }

    /// Initialises the lock at `off` (parent, before attach).
    pub fn init(page: &Arc<SharedPage>, off: usize) -> io::Result<()> {
        Self::open(page, off, true).map(drop)
    }

    /// Uses the lock initialised at `off`.
    pub fn attach(page: &Arc<SharedPage>, off: usize) -> io::Result<RawSyncRw> {
        Self::open(page, off, false)
    }

    /// Runs `body` holding the lock (write when `exclusive`, else read).
    pub fn with(&self, exclusive: bool, body: &mut dyn FnMut()) -> io::Result<()> {
        if exclusive {
            let _g = self
                .lock
                .lock()
                .map_err(|e| io::Error::other(e.to_string()))?;
            body();
        } else {
            let _g = self
                .lock
                .rlock()
                .map_err(|e| io::Error::other(e.to_string()))?;
            body();
        }
        Ok(())
    }
}

/// Raw `F_OFD_SETLKW` on byte 0 (the OFD floor), made as the library makes
/// its calls (`interlock::__raw`: the `syscall` instruction inline, see the
/// library's `sys/raw.rs`). `kind` is `F_RDLCK`, `F_WRLCK` or `F_UNLCK`.
#[inline]
pub fn ofd_setlkw(fd: BorrowedFd<'_>, kind: libc::c_int) -> io::Result<()> {
    use interlock::__raw::{ofd_wait, ByteRange, RangeLock};
    let kind = match kind {
        libc::F_RDLCK => RangeLock::Read,
        libc::F_WRLCK => RangeLock::Write,
        _ => RangeLock::Unlock,
    };
    loop {
        match ofd_wait(fd, kind, ByteRange { start: 0, len: 1 }) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            r => return r,
        }
    }
}

/// Raw flock(2) (the flock floor), retried on EINTR, made as the library
/// makes it (`interlock::__raw`).
#[inline]
pub fn flock(fd: BorrowedFd<'_>, op: libc::c_int) -> io::Result<()> {
    use interlock::__raw::FlockOp;
    let (op, wait) = match op & !libc::LOCK_NB {
        libc::LOCK_SH => (FlockOp::Shared, op & libc::LOCK_NB == 0),
        libc::LOCK_EX => (FlockOp::Exclusive, op & libc::LOCK_NB == 0),
        _ => (FlockOp::Unlock, false),
    };
    loop {
        match interlock::__raw::flock(fd, op, wait) {
            Ok(true) => return Ok(()),
            Ok(false) => return Err(io::Error::from_raw_os_error(libc::EWOULDBLOCK)),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Sends `sig` to `pid`.
pub fn kill(pid: u32, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill takes two integers; a stale pid is reported as ESRCH.
    if unsafe { libc::kill(pid as libc::pid_t, sig) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// What `wait_stopped` saw.
#[derive(Debug, PartialEq, Eq)]
pub enum StopWait {
    /// The child is stopped (and still ours to kill and reap).
    Stopped,
    /// The child had already exited and is now reaped.
    Exited,
}

/// Waits until our child `pid` reports a stop (after SIGSTOP), without
/// reaping it. If it exited instead, it is reaped here.
pub fn wait_stopped(pid: u32) -> io::Result<StopWait> {
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: waitpid on our own child with a valid status pointer.
        let rc = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WUNTRACED) };
        if rc == -1 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        if libc::WIFSTOPPED(status) {
            return Ok(StopWait::Stopped);
        }
        return Ok(StopWait::Exited);
    }
}

/// Reaps our child `pid` (blocking).
pub fn reap(pid: u32) -> io::Result<()> {
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: waitpid on our own child with a valid status pointer.
        let rc = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
        if rc == -1 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        if libc::WIFSTOPPED(status) || libc::WIFCONTINUED(status) {
            continue;
        }
        return Ok(());
    }
}

/// Reaps our child `pid` if it has exited; `Ok(true)` if it was reaped.
pub fn try_reap(pid: u32) -> io::Result<bool> {
    let mut status: libc::c_int = 0;
    // SAFETY: waitpid on our own child with a valid status pointer.
    let rc = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
    match rc {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(false),
        _ => Ok(!(libc::WIFSTOPPED(status) || libc::WIFCONTINUED(status))),
    }
}

/// A named POSIX semaphore (`sem_open`), the peer of interlock's
/// `Semaphore`. glibc implements it as a futex word in a file in /dev/shm
/// (`sem.NAME`); a holder killed before `sem_post` leaks its permit.
pub struct PosixSem {
    sem: *mut libc::sem_t,
}

// SAFETY: a sem_t is designed for concurrent use from any thread and process.
unsafe impl Send for PosixSem {}

impl PosixSem {
    fn name(name: &str) -> io::Result<std::ffi::CString> {
        std::ffi::CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
    }

    /// Creates (replacing any stale one) the semaphore `name` (`/NAME`)
    /// with `value` permits. The name stays in /dev/shm (as `sem.NAME`)
    /// until [`PosixSem::unlink`] (the scenario's scratch directory calls
    /// it when removed).
    pub fn create(name: &str, value: u32) -> anyhow::Result<PosixSem> {
        let c = Self::name(name)?;
        // SAFETY: `c` is a valid NUL-terminated string.
        unsafe { libc::sem_unlink(c.as_ptr()) };
        // SAFETY: as above; the variadic arguments are the mode and the
        // initial value, as sem_open(3) requires with O_CREAT.
        let sem = unsafe {
            libc::sem_open(
                c.as_ptr(),
                libc::O_CREAT | libc::O_EXCL,
                0o600 as libc::c_uint,
                value as libc::c_uint,
            )
        };
        if sem == libc::SEM_FAILED {
            return Err(io::Error::last_os_error().into());
        }
        Ok(PosixSem { sem })
    }

    /// Removes the name `name` (a no-op if it does not exist); processes
    /// that have it open keep using it.
    pub fn unlink(name: &str) {
        if let Ok(c) = Self::name(name) {
            // SAFETY: `c` is a valid NUL-terminated string.
            unsafe { libc::sem_unlink(c.as_ptr()) };
        }
    }

    /// Opens the existing semaphore `name`.
    pub fn open(name: &str) -> anyhow::Result<PosixSem> {
        let c = Self::name(name)?;
        // SAFETY: `c` is a valid NUL-terminated string; no O_CREAT, so no
        // variadic arguments are read.
        let sem = unsafe { libc::sem_open(c.as_ptr(), 0) };
        if sem == libc::SEM_FAILED {
            return Err(io::Error::last_os_error().into());
        }
        Ok(PosixSem { sem })
    }

    /// `sem_wait`, restarted after signals.
    pub fn wait(&self) -> io::Result<()> {
        loop {
            // SAFETY: `self.sem` is a live semaphore from sem_open.
            if unsafe { libc::sem_wait(self.sem) } == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        }
    }

    /// `sem_post`.
    pub fn post(&self) -> io::Result<()> {
        // SAFETY: `self.sem` is a live semaphore from sem_open.
        if unsafe { libc::sem_post(self.sem) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Drop for PosixSem {
    fn drop(&mut self) {
        // SAFETY: `self.sem` came from sem_open and is closed once, here.
        unsafe { libc::sem_close(self.sem) };
    }
}

// ---------------------------------------------------------------------
// Robust futexes, for the `robust` probe (docs/design-shm.md, "Waiting
// without waking"): a word linked into the thread's robust list in glibc's
// own entry layout, so that the kernel flags it FUTEX_OWNER_DIED and wakes
// a waiter when the thread dies, next to glibc's robust pthread mutexes.

pub use interlock::__robust::{gettid, FUTEX_OWNER_DIED, FUTEX_WAITERS};

/// A robust futex word at byte `word_off` of a page, whose list entry (two
/// pointers, `prev` then `next`, glibc's `__pthread_list_t`) sits at
/// `word_off - futex_offset - 8`, inside the same page. Linked into and
/// unlinked from the calling thread's list exactly as glibc's
/// ENQUEUE_MUTEX/DEQUEUE_MUTEX do, so glibc's own robust mutexes of this
/// thread may be locked and unlocked around it in any order.
pub struct RobustWord {
    /// Keeps the entry mapped while it is linked.
    _page: Arc<SharedPage>,
    node: *mut usize,
}

impl RobustWord {
    /// Links the entry of the word at `word_off` into this thread's robust
    /// list (at its head). The word itself is not touched: store the tid in
    /// it after linking (a death before that leaves 0, which the kernel
    /// skips), clear it before unlinking.
    pub fn link(page: &Arc<SharedPage>, word_off: usize) -> io::Result<RobustWord> {
        let (head, futex_offset) = interlock::__robust::head().ok_or(io::ErrorKind::Unsupported)?;
        let node_off = word_off as isize - futex_offset;
        if futex_offset >= 0 || node_off < 8 || node_off % 8 != 0 {
            return Err(io::ErrorKind::Unsupported.into());
        }
        let node = page.raw_at(node_off as usize - 8, 16).cast::<usize>();
        // SAFETY: `head` is this thread's registered head; `node` is the
        // 8-aligned 16-byte entry inside the mapping (checked by raw_at),
        // in no list (a fresh word's entry, or one `unlink` zeroed), kept
        // mapped by the Arc held in the result and written only through
        // here; `unlink` dequeues it on this thread.
        unsafe { interlock::__robust::enqueue(head, node) };
        Ok(RobustWord {
            _page: page.clone(),
            node,
        })
    }

    /// Unlinks the entry (as glibc's DEQUEUE_MUTEX does). Must run on the
    /// thread that linked it.
    pub fn unlink(self) {
        // SAFETY: the entry was linked by `link` on this thread (the
        // caller's promise) and is still linked (`self` is consumed here).
        unsafe { interlock::__robust::dequeue(self.node) };
    }
}

/// How `futex_waitv` ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitvOutcome {
    /// Woken on the word at this index.
    Woken(usize),
    /// A word did not hold its expected value.
    Changed,
    /// The deadline passed.
    TimedOut,
    /// Interrupted by a signal, or another error.
    Other,
}

/// futex_waitv (Linux 5.16+): sleeps until any of `words` is woken or does
/// not hold its expected value, at most `timeout`. Shared futexes.
pub fn futex_waitv(words: &[(&AtomicU32, u32)], timeout: Duration) -> WaitvOutcome {
    #[repr(C)]
    struct FutexWaitv {
        val: u64,
        uaddr: u64,
        flags: u32,
        reserved: u32,
    }
    const FUTEX2_SIZE_U32: u32 = 2;
    let v: Vec<FutexWaitv> = words
        .iter()
        .map(|(w, e)| FutexWaitv {
            val: u64::from(*e),
            uaddr: w.as_ptr() as u64,
            flags: FUTEX2_SIZE_U32,
            reserved: 0,
        })
        .collect();
    let deadline = now_ns() + timeout.as_nanos() as u64;
    let ts = libc::timespec {
        tv_sec: (deadline / 1_000_000_000) as libc::time_t,
        tv_nsec: (deadline % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `v` is an array of `v.len()` futex_waitv records whose
    // addresses are live, aligned u32s borrowed for the call; `ts` is an
    // absolute CLOCK_MONOTONIC time on this stack frame.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex_waitv,
            v.as_ptr(),
            v.len() as libc::c_uint,
            0u32,
            &ts as *const libc::timespec,
            libc::CLOCK_MONOTONIC,
        )
    };
    if rc >= 0 {
        return WaitvOutcome::Woken(rc as usize);
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) => WaitvOutcome::Changed,
        Some(libc::ETIMEDOUT) => WaitvOutcome::TimedOut,
        _ => WaitvOutcome::Other,
    }
}

impl PthreadMutex {
    /// pthread_mutex_trylock: `Ok(Some(true))` if the previous owner had
    /// died (EOWNERDEAD; made consistent and unlocked again), `Ok(Some(false))`
    /// if it was free (unlocked again), `Ok(None)` if busy.
    pub fn probe_owner_died(&self) -> io::Result<Option<bool>> {
        // SAFETY: as in `lock`.
        let rc = unsafe { libc::pthread_mutex_trylock(self.ptr) };
        let died = match rc {
            0 => false,
            libc::EOWNERDEAD => {
                // SAFETY: we own it now, as consistent requires.
                check_rc(unsafe { libc::pthread_mutex_consistent(self.ptr) })?;
                true
            }
            libc::EBUSY => return Ok(None),
            e => return Err(io::Error::from_raw_os_error(e)),
        };
        self.unlock()?;
        Ok(Some(died))
    }
}

/// membarrier(2) commands (linux/membarrier.h).
pub const MEMBARRIER_CMD_GLOBAL_EXPEDITED: libc::c_int = 1 << 1;
pub const MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED: libc::c_int = 1 << 2;

/// membarrier(2) with `cmd` and no flags.
pub fn membarrier(cmd: libc::c_int) -> io::Result<()> {
    // SAFETY: membarrier takes integers only.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0u32, 0i32) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
