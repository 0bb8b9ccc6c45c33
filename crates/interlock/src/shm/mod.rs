//! Shared-memory locks: [`ShmRwLock`], [`ShmMutex`] and the counting
//! [`Semaphore`], built on atomics and futexes in a mapping several
//! processes share.
//!
//! Why they are built this way: a kernel file lock costs a system call
//! (1–2 µs) per acquisition; a process-shared pthread lock costs ~10 ns but
//! wedges every other process forever when a holder is killed, and glibc has
//! no robust rwlock at all. These locks keep the pthread cost and add what it
//! lacks:
//!
//! * the uncontended path is a few atomic instructions and no system call,
//!   and an unlock with nobody waiting makes none either;
//! * waiters sleep on a futex (after a short spin) and burn no CPU; timed
//!   waits use futex time-outs, not a sleep-poll loop;
//! * every hold is recorded under the holder's identity (pid *and* process
//!   start time, so a reused pid cannot pass for the dead holder), and a
//!   waiter that sleeps longer than 5 ms checks that
//!   the holder lives; a dead reader's hold is dropped silently, a dead
//!   writer leaves the lock *poisoned* (see [`Poisoned`]);
//! * writers are preferred: once a writer waits, new readers wait behind it;
//! * readers on different CPUs do not write a common cache line: each thread
//!   reads through its own *slot* (see below).
//!
//! # Naming
//!
//! `ShmRwLock::open("jobs")`: a bare name (no `/`) means the file
//! `/dev/shm/interlock-jobs` (tmpfs: memory only, gone at reboot). Anything
//! with a `/` is used as a path as is (`./jobs.shm`, `/run/app/lock`). The
//! file is created if missing, with mode 0o600 unless
//! [`ShmOptions::mode`] says otherwise (minus the umask), and written
//! complete before it appears at its name (it is prepared under a temporary
//! name and hard-linked into place), so two processes creating it at once
//! both end up with the same, fully initialised lock. An existing file is
//! opened without following symbolic links and must carry this library's
//! header (magic, layout version, geometry, checksum, size); anything else
//! is an [`crate::ErrorKind::Corrupt`] error naming the path, never undefined
//! behaviour. [`ShmRwLock::anonymous`] makes a lock in an anonymous shared
//! mapping instead, shared with children created by `fork()`.
//!
//! # Slots
//!
//! Each lock has a table of slots (128 by default, [`ShmOptions::slots`]),
//! each on its own 128-byte block, each naming its owner process. A process
//! first claims one *shared* slot, which any of its threads may use; then
//! each thread that uses the lock claims a slot of its *own*, cached in a
//! thread-local, given back to the process's pool when the thread exits. A
//! reader increments only its own slot's counter and then reads the state
//! word, which changes only when a writer comes or goes, so uncontended
//! readers on different CPUs never write a common cache line; it releases
//! with a plain store to its own slot. A writer sets its flag and then
//! waits until every slot in use drains. A process returns its slots when
//! its handle is dropped; slots of dead processes are reclaimed by whoever
//! needs them (a waiting writer, or a claim that would otherwise grow the
//! table in use).
//!
//! When the slots run out (more threads than slots), a thread uses its
//! process's shared slot, with atomic increments and decrements: exact, but
//! those threads then write a common line. A process that has no slot at
//! all waits for one to be freed, within its acquisition's deadline.
//! Exclusion never depends on having a slot of one's own.
//!
//! # Semantics
//!
//! | question | answer |
//! |---|---|
//! | scope | threads and processes of one host that map the same file (or inherit the same anonymous mapping); all must see the same /proc (one PID namespace), which opening checks |
//! | fork | the child shares the lock memory; guards the parent held stay the parent's (dropping an inherited guard in the child does nothing); the child's threads take new slots |
//! | close | dropping a handle returns its slots; guards borrow the handle, so none outlives it |
//! | crash | a dead holder is detected by waiters within a few 5 ms periods; a dead reader's hold vanishes, a dead writer poisons the lock |
//! | NFS | refused ([`crate::ErrorKind::Unsupported`]): memory mapped over a network file system is not shared between hosts, and not coherent |
//! | file removed while in use | processes that mapped it keep using the old lock, new openers create a new one: do not remove a lock file that may be in use |
//!
//! Re-entrancy: as with std's `RwLock`, a thread that holds a read lock and
//! asks for another may deadlock if a writer is waiting; a thread that holds
//! the write lock and asks for the lock again deadlocks (until its
//! deadline, for the timed forms).

#[cfg(not(loom))]
mod local;
#[cfg(not(loom))]
mod mutex;
#[cfg(not(loom))]
mod open;
#[cfg(not(loom))]
mod owned;
#[cfg(not(loom))]
mod poison;
#[cfg(not(loom))]
mod rwlock;
#[cfg(not(loom))]
mod semaphore;

// The protocol and its layout are what the model checker runs; under
// `--cfg loom` they are public (hidden) so that tests/loom_shm.rs can drive
// them.
#[cfg(not(loom))]
pub(crate) mod layout;
#[cfg(loom)]
#[doc(hidden)]
pub mod layout;
#[cfg(not(loom))]
pub(crate) mod permits;
#[cfg(loom)]
#[doc(hidden)]
pub mod permits;
#[cfg(not(loom))]
pub(crate) mod protocol;
#[cfg(loom)]
#[doc(hidden)]
pub mod protocol;

#[cfg(not(loom))]
pub use mutex::{ShmMutex, ShmMutexGuard};
#[cfg(not(loom))]
pub(crate) use open::Inner;
#[cfg(not(loom))]
pub use open::{resolve, ShmOptions, DEFAULT_SLOTS, NAME_PREFIX, SHM_DIR};
#[cfg(not(loom))]
pub use owned::{ShmArcGuard, ShmHold, ShmMutexArcGuard};
#[cfg(not(loom))]
pub(crate) use poison::lost;
#[cfg(not(loom))]
pub use poison::{LockResult, Poisoned};
pub use protocol::DEFAULT_READERS_TURN;
#[cfg(not(loom))]
pub use rwlock::{
    ShmGuard, ShmHolders, ShmReadGuard, ShmRwLock, ShmUpgradableGuard, ShmWriteGuard,
};
#[cfg(not(loom))]
pub use semaphore::{Semaphore, SemaphoreGuard};

#[cfg(all(test, not(loom)))]
mod sem_tests;
#[cfg(all(test, not(loom)))]
mod tests;

/// Shared counters for the multi-process tests and benchmarks (which may
/// not contain `unsafe` themselves): `n` atomic words in a file that every
/// process maps. Not part of the API.
#[cfg(not(loom))]
#[doc(hidden)]
pub mod testing {
    use crate::sys::mmap::Mapping;
    use std::fs::OpenOptions;
    use std::io;
    use std::path::Path;
    use std::sync::atomic::AtomicU64;

    /// `n` shared `AtomicU64`s backed by a file.
    pub struct SharedWords {
        map: Mapping,
        n: usize,
    }

    impl SharedWords {
        /// Maps (creating and sizing if needed) `n` words in `path`.
        pub fn open(path: &Path, n: usize) -> io::Result<SharedWords> {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)?;
            let len = (n * 8).max(8);
            if f.metadata()?.len() < len as u64 {
                f.set_len(len as u64)?;
            }
            Ok(SharedWords {
                map: Mapping::shared_file(&f, len)?,
                n,
            })
        }

        /// `n` words in an anonymous mapping shared with forked children.
        pub fn anonymous(n: usize) -> io::Result<SharedWords> {
            Ok(SharedWords {
                map: Mapping::shared_anonymous((n * 8).max(8))?,
                n,
            })
        }

        /// The words.
        pub fn words(&self) -> &[AtomicU64] {
            self.map.slice(0, self.n)
        }
    }

    /// Wakes every thread asleep on the token queue of the rwlock or mutex
    /// file at `path` without changing anything, as a release that woke
    /// every waiter would: the control of the test that a release wakes
    /// one. Returns how many it woke.
    pub fn wake_every_token_waiter(path: &Path) -> io::Result<usize> {
        use super::layout::{Words, WORDS_OFFSET};
        let f = OpenOptions::new().read(true).write(true).open(path)?;
        let map = Mapping::shared_file(&f, WORDS_OFFSET + std::mem::size_of::<Words>())?;
        let words: &Words = map.get(WORDS_OFFSET);
        Ok(crate::sys::futex::wake(&words.queue, i32::MAX))
    }

    /// Makes this process behave as one whose membarrier registration was
    /// refused (a seccomp profile, an old kernel) or as an older interlock:
    /// the slots it claims from now on do not say `MEMBARRIER`, so writers
    /// draining behind its readers keep the short slice. Call before
    /// opening any lock.
    pub fn refuse_membarrier() {
        crate::sys::membarrier::refuse();
    }

    /// Writes a layout-version-1 semaphore of `permits` permits at `path`
    /// (which must not exist): what an older interlock created, with no
    /// watch table, so that its waiters poll for dead holders.
    pub fn create_v1_semaphore(path: &Path, permits: u32) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let h = super::layout::Header {
            kind: super::layout::Kind::Semaphore,
            slots: permits,
            pid_ns: super::open::pid_namespace(),
            watch: 0,
        };
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        f.set_len(h.total_len() as u64)?;
        f.write_all_at(&h.encode(), 0)
    }
}
