//! interlock: locks across threads, processes and machines.
//!
//! See the README for the families and the semantics table; each family's
//! module documents its scope and what happens on fork, close, crash and NFS.
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod aio;
mod error;
mod file;
mod handle;
mod lease;
// Public only for the statements the benchmark floors send
// (`interlock::pg::{TRY_ACQUIRE, ACQUIRE, RELEASE}`); the types are
// re-exported below.
#[cfg(feature = "postgres")]
#[doc(hidden)]
pub mod pg;
pub mod shm;
#[cfg(not(loom))]
mod sync;
#[cfg(loom)]
#[doc(hidden)]
pub mod sync;
#[allow(unsafe_code)]
mod sys;
mod wait;

pub use aio::Acquire;
pub use error::{Error, ErrorKind, Result, TryLockError};
pub use file::{
    holders, Fairness, FileLock, FileLockGuard, FileLockOptions, FileReadGuard, FileSemaphore,
    FileSemaphoreGuard, FileUpgradableGuard, FileWriteGuard, Flavor, Holder, IndexRange, LockKind,
    LockSet, LockSetOptions, Scope, UpgradeFailed, DEFAULT_WRITER_PATIENCE, INDEX_END,
    REGISTRY_DIR_ENV,
};
pub use lease::{
    Clock, LeaseGuard, LeaseHolder, LeaseLock, LeaseOptions, ManualClock, OnLost, SystemClock,
};
#[cfg(feature = "postgres")]
pub use pg::{PgGuard, PgHolder, PgKey, PgLock, PgMutex, PgOptions, PgSession};
#[cfg(not(loom))]
pub use shm::{
    LockResult, Poisoned, Semaphore, SemaphoreGuard, ShmArcGuard, ShmHold, ShmMutex,
    ShmMutexArcGuard, ShmMutexGuard, ShmOptions, ShmReadGuard, ShmRwLock, ShmUpgradableGuard,
    ShmWriteGuard,
};
pub use sys::proc::ProcessId;
pub use wait::{Blocked, Mode, OnBlock, Wait};

/// The fork generation, for bindings that must tell a forked child from
/// its parent without a system call (see `sys/fork.rs`). Not a stable API.
#[doc(hidden)]
pub mod __fork {
    pub use crate::sys::fork::{generation, watch};
}

/// Waits that a signal ends (the Python binding's Ctrl-C). Not a stable
/// API.
#[doc(hidden)]
pub mod __signals {
    pub use crate::sys::timer::{set_signals_end_waits, signal_came};
}

/// Async internals for tests. Not a stable API.
#[doc(hidden)]
pub mod __async {
    pub use crate::aio::busy_waiters;
}

/// The raw kernel lock calls, so that benchmarks can measure the floor a
/// lock family builds on. Not a stable API.
#[doc(hidden)]
pub mod __raw {
    pub use crate::sys::fcntl::{flock, ofd_try, ofd_wait, ByteRange, FlockOp, RangeLock};
}

/// The robust-list edits of `sys/robust.rs`, so that the `interlock-bench
/// robust` probe links its word with the library's code. Not a stable API.
#[doc(hidden)]
pub mod __robust {
    pub use crate::sys::robust::{dequeue, enqueue, gettid, head, FUTEX_OWNER_DIED, FUTEX_WAITERS};
}

/// The operation every lock family offers, so that generic code (the CLI,
/// the benchmarks, user code) can drive any of them the same way.
///
/// Families that have no shared mode (a mutex, a lease) document what they
/// do with [`Mode::Shared`].
pub trait Lock {
    /// What holds the lock; dropping it releases.
    type Guard<'a>
    where
        Self: 'a;

    /// Acquires in `mode`, waiting as `wait` allows.
    fn acquire(&self, mode: Mode, wait: Wait) -> Result<Self::Guard<'_>, TryLockError>;
}
