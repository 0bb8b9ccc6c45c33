//! Every lock the harness can drive, behind one small trait.
//!
//! Why it is built this way: the point of the harness is to put interlock's
//! families, their peers and the floors of each primitive side by side
//! under exactly the same loop. So each lock is reduced to "acquire in this
//! mode, run this body, release" ([`Handle::run`]), and a [`Target`] is a
//! row in a table: a name, which group it belongs to (interlock / peer /
//! floor), which primitive's floor it is measured against, whether it has a
//! shared mode, and how to set it up (once, in the parent) and open it (in
//! each worker). Adding a family is one entry in [`all`]. Python peers are
//! rows too; the Python driver implements them (see py/driver.py).

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use interlock::Mode;

use crate::page::LOCK_AREA;
use crate::sys::{self, SharedPage};

/// What a worker (or the parent's setup) knows about the lock to open.
pub struct Ctx {
    /// The scenario's private directory (lock files live here).
    pub dir: PathBuf,
    /// The shared stats page (shm locks live in its lock area).
    pub page: Arc<SharedPage>,
    /// The scenario's private directory in /dev/shm (shared-memory lock
    /// files, LockSet's deadlock registry).
    pub shm_dir: PathBuf,
}

impl Ctx {
    /// The lock file every file-lock target uses.
    pub fn lock_path(&self) -> PathBuf {
        self.dir.join("lock")
    }
    /// The lock directory (lease targets). It lives on tmpfs: on the
    /// shared machine's ext4, directory operations wait for the journal,
    /// and other work's I/O made one rmdir take milliseconds, drowning the
    /// locks' own costs (the floor is measured in the same place).
    pub fn lease_path(&self) -> PathBuf {
        self.shm_dir.join("lease")
    }
}

/// One opened lock in one worker.
pub trait Handle {
    /// Acquires in `mode` (waiting as long as it takes), runs `body` while
    /// holding, releases. Returns `Ok(true)` if the acquisition reported
    /// that the previous holder died (a recovered robust mutex, a poisoned
    /// shm lock, a taken-over lease).
    fn run(&mut self, mode: Mode, body: &mut dyn FnMut()) -> Result<bool>;
}

/// Who a row belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Group {
    /// interlock's own families.
    Interlock,
    /// Other libraries people use today.
    Peer,
    /// The bare primitive, the least any lock built on it can cost.
    Floor,
}

impl Group {
    /// Short name for tables and CSV.
    pub fn name(self) -> &'static str {
        match self {
            Group::Interlock => "interlock",
            Group::Peer => "peer",
            Group::Floor => "floor",
        }
    }
}

/// The primitive a lock is built on, which fixes the floor it is compared to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Floor {
    /// fcntl byte-range locks (OFD or classic).
    Ofd,
    /// flock(2).
    Flock,
    /// Atomics and futexes in shared memory.
    Futex,
    /// mkdir/rmdir of a lock directory.
    Mkdir,
    /// PostgreSQL advisory-lock statements over one prepared connection.
    Pg,
}

impl Floor {
    /// The floor target for this primitive; `shared_mix` picks the
    /// reader-writer floor for shared memory.
    pub fn target(self, shared_mix: bool) -> &'static str {
        match self {
            Floor::Ofd => "floor-ofd",
            Floor::Flock => "floor-flock",
            Floor::Futex if shared_mix => "floor-futex-rw",
            Floor::Futex => "floor-futex",
            Floor::Mkdir => "floor-mkdir",
            Floor::Pg => "floor-pg",
        }
    }

    /// Which peers a row is compared with: file-system locks with
    /// file-system locks, shared memory with shared memory.
    pub fn class(self) -> &'static str {
        match self {
            Floor::Futex => "shm",
            Floor::Pg => "pg",
            _ => "file",
        }
    }
}

/// How a target runs.
#[derive(Clone, Copy)]
pub enum Impl {
    /// In the harness binary.
    Rust {
        /// Once per scenario, in the parent, before workers start.
        setup: fn(&Ctx) -> Result<()>,
        /// In each worker.
        open: fn(&Ctx) -> Result<Box<dyn Handle>>,
    },
    /// In the Python driver, with this library.
    Python(&'static str),
}

/// One row of the comparison.
#[derive(Clone)]
pub struct Target {
    /// Stable identifier (CLI, CSV).
    pub name: &'static str,
    /// What the report prints.
    pub label: &'static str,
    /// Interlock, peer or floor.
    pub group: Group,
    /// The primitive underneath.
    pub floor: Floor,
    /// Whether it has a shared (read) mode.
    pub shared: bool,
    /// Whether a holder's death releases or recovers it (so the torture is
    /// expected to pass). Peers that wedge can still be tortured by name, to
    /// show it.
    pub recovers: bool,
    /// How many may hold it exclusively at once: 1 for a lock, N for a
    /// semaphore of N permits (the torture's occupancy bound).
    pub capacity: usize,
    /// How to run it.
    pub imp: Impl,
}

impl Target {
    /// Whether it runs in the Python driver.
    pub fn is_python(&self) -> bool {
        matches!(self.imp, Impl::Python(_))
    }
}

/// Every target this build knows, in report order.
pub fn all() -> Vec<Target> {
    let mut v = Vec::new();
    v.extend(crate::families::targets());
    v.extend(peers());
    v.extend(python_peers());
    v.extend(floors());
    v
}

/// Looks a target up by name (including the hidden self-test targets).
pub fn by_name(name: &str) -> Option<Target> {
    all().into_iter().chain(hidden()).find(|t| t.name == name)
}

/// Targets that exist only to test the harness: `none` takes no lock at
/// all, so the torture must report violations for it.
pub fn hidden() -> Vec<Target> {
    vec![
        rust(
            "none",
            "no lock (harness self-test)",
            Group::Floor,
            Floor::Ofd,
            true,
            true,
            setup_none,
            |_| Ok(Box::new(NoLock)),
        ),
        crate::families::broken_semaphore(),
    ]
}

/// The POSIX semaphore's name: one per scenario directory (the scratch
/// directory unlinks it when it is removed).
fn posix_sem_name(c: &Ctx) -> String {
    posix_sem_name_for(&c.shm_dir)
}

/// The POSIX semaphore's name for the scenario whose /dev/shm directory is
/// `shm_dir`.
pub fn posix_sem_name_for(shm_dir: &Path) -> String {
    let tag = shm_dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("/interlock-bench-{tag}")
}

struct PosixSemHandle(crate::sys::PosixSem);
impl Handle for PosixSemHandle {
    fn run(&mut self, _mode: Mode, body: &mut dyn FnMut()) -> Result<bool> {
        self.0.wait()?;
        body();
        self.0.post()?;
        Ok(false)
    }
}

struct NoLock;
impl Handle for NoLock {
    fn run(&mut self, _mode: Mode, body: &mut dyn FnMut()) -> Result<bool> {
        body();
        Ok(false)
    }
}

#[allow(clippy::too_many_arguments)]
fn rust(
    name: &'static str,
    label: &'static str,
    group: Group,
    floor: Floor,
    shared: bool,
    recovers: bool,
    setup: fn(&Ctx) -> Result<()>,
    open: fn(&Ctx) -> Result<Box<dyn Handle>>,
) -> Target {
    Target {
        name,
        label,
        group,
        floor,
        shared,
        recovers,
        capacity: 1,
        imp: Impl::Rust { setup, open },
    }
}

/// A setup that only creates the lock file.
pub fn setup_file(ctx: &Ctx) -> Result<()> {
    open_rw(&ctx.lock_path()).map(drop)
}

/// A setup that does nothing.
pub fn setup_none(_: &Ctx) -> Result<()> {
    Ok(())
}

/// Opens (creating) a lock file read-write, close-on-exec.
pub fn open_rw(p: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .with_context(|| format!("open {}", p.display()))
}

fn is_ex(m: Mode) -> bool {
    m == Mode::Exclusive
}

// ---------------------------------------------------------------- peers

fn peers() -> Vec<Target> {
    use Floor::*;
    use Group::Peer;
    vec![
        Target {
            capacity: crate::families::SEM_PERMITS as usize,
            recovers: false,
            ..rust(
                "posix-sem",
                "POSIX semaphore (sem_open, N=2; a killed holder leaks its permit)",
                Peer,
                Futex,
                false,
                false,
                |c| {
                    crate::sys::PosixSem::create(&posix_sem_name(c), crate::families::SEM_PERMITS)
                        .map(drop)
                },
                |c| {
                    Ok(Box::new(PosixSemHandle(crate::sys::PosixSem::open(
                        &posix_sem_name(c),
                    )?)))
                },
            )
        },
        rust(
            "fs4",
            "fs4 0.13 (flock)",
            Peer,
            Flock,
            true,
            true,
            setup_file,
            |c| Ok(Box::new(Fs4(open_rw(&c.lock_path())?))),
        ),
        rust(
            "fd-lock",
            "fd-lock 4 (flock)",
            Peer,
            Flock,
            true,
            true,
            setup_file,
            |c| {
                Ok(Box::new(FdLock(fd_lock::RwLock::new(open_rw(
                    &c.lock_path(),
                )?))))
            },
        ),
        rust(
            "std-file-lock",
            "std File::lock (flock)",
            Peer,
            Flock,
            true,
            true,
            setup_file,
            |c| Ok(Box::new(StdLock(open_rw(&c.lock_path())?))),
        ),
        rust(
            "file-guard",
            "file-guard 0.2 (classic fcntl)",
            Peer,
            Ofd,
            true,
            true,
            setup_file,
            |c| Ok(Box::new(FileGuard(open_rw(&c.lock_path())?))),
        ),
        rust(
            "pthread-rwlock",
            "pthread_rwlock (process-shared)",
            Peer,
            Futex,
            true,
            false,
            |c| Ok(sys::PthreadRwLock::init(&c.page, LOCK_AREA)?),
            |c| {
                Ok(Box::new(PRw(sys::PthreadRwLock::attach(
                    &c.page, LOCK_AREA,
                ))))
            },
        ),
        rust(
            "pthread-mutex",
            "pthread_mutex (process-shared)",
            Peer,
            Futex,
            false,
            false,
            |c| Ok(sys::PthreadMutex::init(&c.page, LOCK_AREA, false)?),
            |c| {
                Ok(Box::new(PMutex(sys::PthreadMutex::attach(
                    &c.page, LOCK_AREA,
                ))))
            },
        ),
        rust(
            "pthread-mutex-robust",
            "pthread_mutex (robust, process-shared)",
            Peer,
            Futex,
            false,
            true,
            |c| Ok(sys::PthreadMutex::init(&c.page, LOCK_AREA, true)?),
            |c| {
                Ok(Box::new(PMutex(sys::PthreadMutex::attach(
                    &c.page, LOCK_AREA,
                ))))
            },
        ),
        rust(
            "raw_sync",
            "raw_sync 0.1 RwLock (pthread)",
            Peer,
            Futex,
            true,
            false,
            |c| Ok(sys::RawSyncRw::init(&c.page, LOCK_AREA)?),
            |c| {
                Ok(Box::new(RawSync(sys::RawSyncRw::attach(
                    &c.page, LOCK_AREA,
                )?)))
            },
        ),
    ]
}

fn python_peers() -> Vec<Target> {
    let py = |name, label, floor, shared, lib| Target {
        name,
        label,
        group: Group::Peer,
        floor,
        shared,
        recovers: floor != Floor::Futex,
        capacity: 1,
        imp: Impl::Python(lib),
    };
    // interlock's own Python package (python/interlock), installed into the
    // harness's venv from this checkout: rows of interlock, compared with
    // the Python peers of their class.
    let ours = |name, label, floor, lib| Target {
        name,
        label,
        group: Group::Interlock,
        floor,
        shared: true,
        recovers: true,
        capacity: 1,
        imp: Impl::Python(lib),
    };
    vec![
        ours(
            "py-interlock-file",
            "Python interlock.FileLock (fcntl)",
            Floor::Ofd,
            "interlock-file",
        ),
        ours(
            "py-interlock-flock",
            "Python interlock.FileLock (flock)",
            Floor::Flock,
            "interlock-flock",
        ),
        ours(
            "py-interlock-shm",
            "Python interlock.ShmRwLock",
            Floor::Futex,
            "interlock-shm",
        ),
        py(
            "py-fasteners",
            "Python fasteners (RW lock, lockf + polling)",
            Floor::Ofd,
            true,
            "fasteners",
        ),
        py(
            "py-compat-fasteners",
            "Python interlock.compat.fasteners (the same calls)",
            Floor::Ofd,
            true,
            "compat-fasteners",
        ),
        py(
            "py-locks",
            "Python locks (flock; Mutex)",
            Floor::Flock,
            false,
            "locks",
        ),
        py(
            "py-compat-locks",
            "Python interlock.compat.locks (the same calls)",
            Floor::Flock,
            false,
            "compat-locks",
        ),
        py(
            "py-filelock",
            "Python filelock (flock + polling)",
            Floor::Flock,
            false,
            "filelock",
        ),
        py(
            "py-portalocker",
            "Python portalocker (flock)",
            Floor::Flock,
            true,
            "portalocker",
        ),
        py(
            "py-prwlock",
            "Python prwlock (pthread rwlock)",
            Floor::Futex,
            true,
            "prwlock",
        ),
        py(
            "py-pylocksfile",
            "Python pylocksfile (classic fcntl byte locks)",
            Floor::Ofd,
            true,
            "pylocksfile",
        ),
        // The compat modules, each beside the original it replaces. They are
        // Python rows like the peers (the "behind" table is for the Rust
        // families); prwlock's replacement recovers from a dead holder.
        Target {
            recovers: true,
            ..py(
                "py-compat-prwlock",
                "Python interlock.compat.prwlock (ShmRwLock)",
                Floor::Futex,
                true,
                "compat-prwlock",
            )
        },
        py(
            "py-compat-pylocksfile",
            "Python interlock.compat.pylocksfile (LockSet)",
            Floor::Ofd,
            true,
            "compat-pylocksfile",
        ),
        py(
            "py-compat-lockbydir",
            "Python interlock.compat.lockbydir (LeaseLock)",
            Floor::Mkdir,
            false,
            "compat-lockbydir",
        ),
        py(
            "py-lockbydir-protocol",
            "Python lockbydir's protocol (mkdir + 30 ms poll; rewritten, the original is Python 2)",
            Floor::Mkdir,
            false,
            "lockbydir-protocol",
        ),
    ]
}

struct Fs4(File);
impl Handle for Fs4 {
    fn run(&mut self, mode: Mode, body: &mut dyn FnMut()) -> Result<bool> {
        use fs4::fs_std::FileExt;
        if is_ex(mode) {
            FileExt::lock_exclusive(&self.0)?;
        } else {
            FileExt::lock_shared(&self.0)?;
        }
        body();
        FileExt::unlock(&self.0)?;
        Ok(false)
    }
}

struct FdLock(fd_lock::RwLock<File>);
impl Handle for FdLock {
    fn run(&mut self, mode: Mode, body: &mut dyn FnMut()) -> Result<bool> {
        if is_ex(mode) {
            let _g = self.0.write()?;
            body();
        } else {
            let _g = self.0.read()?;
            body();
        }
        Ok(false)
    }
}

struct StdLock(File);
impl Handle for StdLock {
    fn run(&mut self, mode: Mode, body: &mut dyn FnMut()) -> Result<bool> {
        if is_ex(mode) {
            self.0.lock()?;
        } else {
            self.0.lock_shared()?;
        }
        body();
        self.0.unlock()?;
        Ok(false)
    }
}

struct FileGuard(File);
impl Handle for FileGuard {
    fn run(&mut self, mode: Mode, body: &mut dyn FnMut()) -> Result<bool> {
        let kind = if is_ex(mode) {
            file_guard::Lock::Exclusive
        } else {
            file_guard::Lock::Shared
        };
        let g = file_guard::lock(&self.0, kind, 0, 1)?;
        body();
        drop(g);
        Ok(false)
    }
}

struct PRw(sys::PthreadRwLock);
impl Handle for PRw {
    fn run(&mut self, mode: Mode, body: &mut dyn FnMut()) -> Result<bool> {
        self.0.lock(is_ex(mode))?;
        body();
        self.0.unlock()?;
        Ok(false)
    }
}

struct PMutex(sys::PthreadMutex);
impl Handle for PMutex {
    fn run(&mut self, _mode: Mode, body: &mut dyn FnMut()) -> Result<bool> {
        let died = self.0.lock()?;
        body();
        self.0.unlock()?;
        Ok(died)
    }
}

struct RawSync(sys::RawSyncRw);
impl Handle for RawSync {
    fn run(&mut self, mode: Mode, body: &mut dyn FnMut()) -> Result<bool> {
        self.0.with(is_ex(mode), body)?;
        Ok(false)
    }
}

// ---------------------------------------------------------------- floors

fn floors() -> Vec<Target> {
    use Floor::*;
    use Group::Floor as F;
    vec![
        rust(
            "floor-ofd",
            "floor: raw OFD fcntl",
            F,
            Ofd,
            true,
            true,
            setup_file,
            |c| Ok(Box::new(OfdFloor(open_rw(&c.lock_path())?))),
        ),
        rust(
            "floor-flock",
            "floor: raw flock",
            F,
            Flock,
            true,
            true,
            setup_file,
            |c| Ok(Box::new(FlockFloor(open_rw(&c.lock_path())?))),
        ),
        rust(
            "floor-futex",
            "floor: spin-then-futex mutex",
            F,
            Futex,
            false,
            false,
            setup_none,
            |c| Ok(Box::new(FutexMutex(c.page.clone()))),
        ),
        rust(
            "floor-futex-rw",
            "floor: spin-then-futex rwlock",
            F,
            Futex,
            true,
            false,
            setup_none,
            |c| Ok(Box::new(FutexRw(c.page.clone()))),
        ),
        rust(
            "floor-mkdir",
            "floor: raw mkdir/rmdir",
            F,
            Mkdir,
            false,
            false,
            setup_none,
            |c| Ok(Box::new(MkdirFloor(c.lease_path()))),
        ),
    ]
}

struct OfdFloor(File);
impl Handle for OfdFloor {
    fn run(&mut self, mode: Mode, body: &mut dyn FnMut()) -> Result<bool> {
        let k = if is_ex(mode) {
            libc::F_WRLCK
        } else {
            libc::F_RDLCK
        };
        sys::ofd_setlkw(self.0.as_fd(), k)?;
        body();
        sys::ofd_setlkw(self.0.as_fd(), libc::F_UNLCK)?;
        Ok(false)
    }
}

struct FlockFloor(File);
impl Handle for FlockFloor {
    fn run(&mut self, mode: Mode, body: &mut dyn FnMut()) -> Result<bool> {
        let op = if is_ex(mode) {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        sys::flock(self.0.as_fd(), op)?;
        body();
        sys::flock(self.0.as_fd(), libc::LOCK_UN)?;
        Ok(false)
    }
}

/// Spins before sleeping in the futex floors.
const SPINS: u32 = 100;

/// The classic three-state futex mutex (0 free, 1 held, 2 held with
/// waiters), spinning briefly before it sleeps: what any shared-memory
/// mutex must at least do.
struct FutexMutex(Arc<SharedPage>);
impl FutexMutex {
    fn word(&self) -> &AtomicU32 {
        self.0.u32_at(LOCK_AREA)
    }
}
impl Handle for FutexMutex {
    fn run(&mut self, _mode: Mode, body: &mut dyn FnMut()) -> Result<bool> {
        let w = self.word();
        if w.compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            let mut got = false;
            for _ in 0..SPINS {
                std::hint::spin_loop();
                if w.load(Ordering::Relaxed) == 0
                    && w.compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
                {
                    got = true;
                    break;
                }
            }
            if !got {
                while w.swap(2, Ordering::Acquire) != 0 {
                    sys::futex_wait(w, 2, None);
                }
            }
        }
        body();
        if w.fetch_sub(1, Ordering::Release) != 1 {
            w.store(0, Ordering::Release);
            sys::futex_wake(w, 1);
        }
        Ok(false)
    }
}

/// A minimal reader-preferring rwlock: a state word (writer bit, reader
/// count), a waiter count, and a sequence word to sleep on.
struct FutexRw(Arc<SharedPage>);
const WRITER: u32 = 1 << 31;
impl FutexRw {
    fn state(&self) -> &AtomicU32 {
        self.0.u32_at(LOCK_AREA)
    }
    fn waiters(&self) -> &AtomicU32 {
        self.0.u32_at(LOCK_AREA + 64)
    }
    fn seq(&self) -> &AtomicU32 {
        self.0.u32_at(LOCK_AREA + 128)
    }
    fn try_take(&self, ex: bool) -> bool {
        let s = self.state();
        let cur = s.load(Ordering::Relaxed);
        if ex {
            cur == 0
                && s.compare_exchange(0, WRITER, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
        } else {
            cur & WRITER == 0
                && s.compare_exchange(cur, cur + 1, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
        }
    }
    fn take(&self, ex: bool) {
        for _ in 0..SPINS {
            if self.try_take(ex) {
                return;
            }
            std::hint::spin_loop();
        }
        loop {
            self.waiters().fetch_add(1, Ordering::SeqCst);
            let seq = self.seq().load(Ordering::SeqCst);
            if self.try_take(ex) {
                self.waiters().fetch_sub(1, Ordering::SeqCst);
                return;
            }
            sys::futex_wait(self.seq(), seq, None);
            self.waiters().fetch_sub(1, Ordering::SeqCst);
            if self.try_take(ex) {
                return;
            }
        }
    }
    fn give(&self, ex: bool) {
        if ex {
            self.state().store(0, Ordering::SeqCst);
        } else {
            self.state().fetch_sub(1, Ordering::SeqCst);
        }
        if self.waiters().load(Ordering::SeqCst) > 0 {
            self.seq().fetch_add(1, Ordering::SeqCst);
            sys::futex_wake(self.seq(), i32::MAX);
        }
    }
}
impl Handle for FutexRw {
    fn run(&mut self, mode: Mode, body: &mut dyn FnMut()) -> Result<bool> {
        self.take(is_ex(mode));
        body();
        self.give(is_ex(mode));
        Ok(false)
    }
}

/// mkdir until it succeeds (yielding the CPU between tries), rmdir to
/// release: the least a lock directory can cost.
struct MkdirFloor(PathBuf);
impl Handle for MkdirFloor {
    fn run(&mut self, _mode: Mode, body: &mut dyn FnMut()) -> Result<bool> {
        loop {
            match std::fs::create_dir(&self.0) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => std::thread::yield_now(),
                Err(e) => return Err(e).context("mkdir lock directory"),
            }
        }
        body();
        std::fs::remove_dir(&self.0).context("rmdir lock directory")?;
        Ok(false)
    }
}
