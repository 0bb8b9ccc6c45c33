//! The async acquisitions of each family, on the owned (`*_arc`) paths.
//!
//! Each method returns an [`Acquire`] future resolving to the guard the
//! family's `*_arc` call returns; `*_async` waits without deadline (errors
//! are [`crate::Error`]), `*_async_for` and `*_async_until` give up with
//! [`TryLockError::TimedOut`]. The deadline counts from the call, not from
//! the first poll.

use super::{forever, timed, Acquire};
use crate::file::{FileLock, FileReadGuard, FileUpgradableGuard, FileWriteGuard};
use crate::file::{FileSemaphore, FileSemaphoreGuard, IndexRange, LockSet, Scope};
use crate::lease::{LeaseGuard, LeaseLock};
#[cfg(not(loom))]
use crate::shm::{
    LockResult, Semaphore, SemaphoreGuard, ShmArcGuard, ShmHold, ShmMutex, ShmMutexArcGuard,
    ShmRwLock,
};
use crate::{Mode, TryLockError, Wait};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// The three forms (forever, for, until) of one async acquisition, built on
/// a method `$arc(self: &Arc<Self>, [args,] Wait)`.
macro_rules! trio {
    ($what:literal, $guard:ty, $forever:ident, $for:ident, $until:ident,
     |$me:ident, $w:ident| $call:expr) => {
        #[doc = concat!("Acquires ", $what, " without blocking the executor; resolves to the owned guard. See [`Acquire`].")]
        pub fn $forever(self: &Arc<Self>) -> Acquire<$guard> {
            let $me = Arc::clone(self);
            Acquire::new(Wait::Forever, forever, move |$w| $call)
        }

        #[doc = concat!("As the `_async` form, giving up after `timeout` with [`TryLockError::TimedOut`].")]
        pub fn $for(self: &Arc<Self>, timeout: Duration) -> Acquire<$guard, TryLockError> {
            let $me = Arc::clone(self);
            Acquire::new(Wait::timeout(timeout), timed, move |$w| $call)
        }

        #[doc = concat!("As the `_async` form, giving up at `deadline` with [`TryLockError::TimedOut`].")]
        pub fn $until(self: &Arc<Self>, deadline: Instant) -> Acquire<$guard, TryLockError> {
            let $me = Arc::clone(self);
            Acquire::new(Wait::Until(deadline), timed, move |$w| $call)
        }
    };
}

impl FileLock {
    trio!(
        "a shared lock",
        FileReadGuard<'static>,
        read_async,
        read_async_for,
        read_async_until,
        |me, w| me.read_arc(w)
    );
    trio!(
        "the exclusive lock",
        FileWriteGuard<'static>,
        write_async,
        write_async_for,
        write_async_until,
        |me, w| me.write_arc(w)
    );
    trio!(
        "an upgradable shared lock",
        FileUpgradableGuard<'static>,
        upgradable_read_async,
        upgradable_read_async_for,
        upgradable_read_async_until,
        |me, w| me.upgradable_arc(w)
    );
}

impl LockSet {
    /// Locks `range` in `mode` for the returned scope (as
    /// [`LockSet::scope_arc`]) without blocking the executor. While the wait
    /// runs, the set's other acquisitions wait for it (a set serves one
    /// owner, as its blocking calls do).
    pub fn scope_async(
        self: &Arc<Self>,
        range: impl IndexRange + Send + 'static,
        mode: Mode,
    ) -> Acquire<Scope<'static>> {
        self.scope_async_with(range, mode, Wait::Forever, forever)
    }

    /// As [`LockSet::scope_async`], giving up after `timeout`.
    pub fn scope_async_for(
        self: &Arc<Self>,
        range: impl IndexRange + Send + 'static,
        mode: Mode,
        timeout: Duration,
    ) -> Acquire<Scope<'static>, TryLockError> {
        self.scope_async_with(range, mode, Wait::timeout(timeout), timed)
    }

    /// As [`LockSet::scope_async`], giving up at `deadline`.
    pub fn scope_async_until(
        self: &Arc<Self>,
        range: impl IndexRange + Send + 'static,
        mode: Mode,
        deadline: Instant,
    ) -> Acquire<Scope<'static>, TryLockError> {
        self.scope_async_with(range, mode, Wait::Until(deadline), timed)
    }

    /// As [`LockSet::lock`] (the set then holds `range` in `mode`, until
    /// [`LockSet::unlock`]) without blocking the executor. Cancel-safe: the
    /// change is kept only when the future returns it; dropped before, the
    /// set's state is as it was.
    pub fn lock_async(
        self: &Arc<Self>,
        range: impl IndexRange + Send + 'static,
        mode: Mode,
    ) -> impl Future<Output = crate::Result<()>> + Send + 'static {
        Keep(self.scope_async(range, mode))
    }

    /// As [`LockSet::lock_async`], giving up after `timeout`.
    pub fn lock_async_for(
        self: &Arc<Self>,
        range: impl IndexRange + Send + 'static,
        mode: Mode,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), TryLockError>> + Send + 'static {
        Keep(self.scope_async_for(range, mode, timeout))
    }

    /// As [`LockSet::lock_async`], giving up at `deadline`.
    pub fn lock_async_until(
        self: &Arc<Self>,
        range: impl IndexRange + Send + 'static,
        mode: Mode,
        deadline: Instant,
    ) -> impl Future<Output = Result<(), TryLockError>> + Send + 'static {
        Keep(self.scope_async_until(range, mode, deadline))
    }

    fn scope_async_with<E>(
        self: &Arc<Self>,
        range: impl IndexRange + Send + 'static,
        mode: Mode,
        wait: Wait,
        map: fn(TryLockError) -> E,
    ) -> Acquire<Scope<'static>, E> {
        let me = Arc::clone(self);
        Acquire::new(wait, map, move |w| me.scope_arc(&range, mode, w))
    }
}

/// Resolves a scope's acquisition to `()`, keeping the scope's changes
/// only then (a scope dropped with the future restores the set).
struct Keep<E>(Acquire<Scope<'static>, E>);

impl<E> Future for Keep<E> {
    type Output = Result<(), E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|r| r.map(Scope::keep))
    }
}

impl LeaseLock {
    /// Acquires the lease without blocking the executor; resolves to the
    /// owned guard of [`LeaseLock::lock_arc`]. See [`Acquire`].
    pub fn lock_async(&self) -> Acquire<LeaseGuard<'static>> {
        let me = self.clone();
        Acquire::new(Wait::Forever, forever, move |w| me.lock_arc(w))
    }

    /// As [`LeaseLock::lock_async`], giving up after `patience`.
    pub fn lock_async_for(&self, patience: Duration) -> Acquire<LeaseGuard<'static>, TryLockError> {
        let me = self.clone();
        Acquire::new(Wait::timeout(patience), timed, move |w| me.lock_arc(w))
    }

    /// As [`LeaseLock::lock_async`], giving up at `deadline`.
    pub fn lock_async_until(
        &self,
        deadline: Instant,
    ) -> Acquire<LeaseGuard<'static>, TryLockError> {
        let me = self.clone();
        Acquire::new(Wait::Until(deadline), timed, move |w| me.lock_arc(w))
    }
}

#[cfg(not(loom))]
impl ShmRwLock {
    trio!(
        "a shared hold",
        LockResult<ShmArcGuard>,
        read_async,
        read_async_for,
        read_async_until,
        |me, w| me.acquire_arc(ShmHold::Read, w)
    );
    trio!(
        "the exclusive hold",
        LockResult<ShmArcGuard>,
        write_async,
        write_async_for,
        write_async_until,
        |me, w| me.acquire_arc(ShmHold::Write, w)
    );
    trio!(
        "the upgradable hold",
        LockResult<ShmArcGuard>,
        upgradable_read_async,
        upgradable_read_async_for,
        upgradable_read_async_until,
        |me, w| me.acquire_arc(ShmHold::Upgradable, w)
    );
}

#[cfg(not(loom))]
impl ShmMutex {
    trio!(
        "the mutex",
        LockResult<ShmMutexArcGuard>,
        lock_async,
        lock_async_for,
        lock_async_until,
        |me, w| me.lock_arc(w)
    );
}

/// The async acquisitions of a semaphore type, on its `acquire_many_arc`.
macro_rules! semaphore_async {
    ($sem:ty, $guard:ty) => {
        impl $sem {
            /// Takes one permit without blocking the executor; resolves to
            /// the owned guard of `acquire_many_arc`. See [`Acquire`].
            pub fn acquire_async(self: &Arc<Self>) -> Acquire<$guard> {
                self.permits_async(1, Wait::Forever, forever)
            }

            /// As `acquire_async`, giving up after `timeout`.
            pub fn acquire_async_for(
                self: &Arc<Self>,
                timeout: Duration,
            ) -> Acquire<$guard, TryLockError> {
                self.permits_async(1, Wait::timeout(timeout), timed)
            }

            /// As `acquire_async`, giving up at `deadline`.
            pub fn acquire_async_until(
                self: &Arc<Self>,
                deadline: Instant,
            ) -> Acquire<$guard, TryLockError> {
                self.permits_async(1, Wait::Until(deadline), timed)
            }

            /// `k` permits at once (as `acquire_many`: none held while it
            /// waits) without blocking the executor.
            pub fn acquire_many_async(self: &Arc<Self>, k: u32) -> Acquire<$guard> {
                self.permits_async(k, Wait::Forever, forever)
            }

            /// As `acquire_many_async`, giving up after `timeout`.
            pub fn acquire_many_async_for(
                self: &Arc<Self>,
                k: u32,
                timeout: Duration,
            ) -> Acquire<$guard, TryLockError> {
                self.permits_async(k, Wait::timeout(timeout), timed)
            }

            /// As `acquire_many_async`, giving up at `deadline`.
            pub fn acquire_many_async_until(
                self: &Arc<Self>,
                k: u32,
                deadline: Instant,
            ) -> Acquire<$guard, TryLockError> {
                self.permits_async(k, Wait::Until(deadline), timed)
            }

            fn permits_async<E>(
                self: &Arc<Self>,
                k: u32,
                wait: Wait,
                map: fn(TryLockError) -> E,
            ) -> Acquire<$guard, E> {
                let me = Arc::clone(self);
                Acquire::new(wait, map, move |w| me.acquire_many_arc(k, w))
            }
        }
    };
}

#[cfg(not(loom))]
semaphore_async!(Semaphore, SemaphoreGuard<'static>);
semaphore_async!(FileSemaphore, FileSemaphoreGuard<'static>);

#[cfg(feature = "postgres")]
impl crate::pg::PgLock {
    trio!(
        "the lock shared",
        crate::pg::PgGuard<'static>,
        read_async,
        read_async_for,
        read_async_until,
        |me, w| me.read_arc(w)
    );
    trio!(
        "the lock exclusively",
        crate::pg::PgGuard<'static>,
        write_async,
        write_async_for,
        write_async_until,
        |me, w| me.write_arc(w)
    );
}

#[cfg(feature = "postgres")]
impl crate::pg::PgMutex {
    trio!(
        "the mutex",
        crate::pg::PgGuard<'static>,
        lock_async,
        lock_async_for,
        lock_async_until,
        |me, w| me.lock_arc(w)
    );
}
