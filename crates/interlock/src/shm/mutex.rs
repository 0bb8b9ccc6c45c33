//! [`ShmMutex`]: the exclusive-only lock in shared memory, and its guard.
//!
//! Why it is built this way: a mutex is the reader-writer protocol without
//! readers, so it is the same memory layout and the same code with the
//! reader drain skipped; the holder is still named by its slot, so a dead
//! holder is detected and recovered exactly as for [`crate::ShmRwLock`], and
//! the file says which kind it holds so that one is never opened as the
//! other.

use super::local::{self, Ticket};
use super::rwlock::forever;
use super::{lost, Inner, LockResult, Poisoned, ShmOptions};
use crate::error::Result;
use crate::shm::layout::WRITER;
use crate::shm::protocol::Notify;
use crate::wait::{Mode, OnBlock, Wait};
use crate::{Lock, TryLockError};
use std::fmt;
use std::marker::PhantomData;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A mutual-exclusion lock in memory shared by threads and processes of one
/// host: a file (by default in /dev/shm) or an anonymous mapping inherited
/// across `fork()`.
///
/// Scope: every thread and process that maps the same lock. Fork: the child
/// shares the lock; a guard it inherited stays the parent's. Close:
/// dropping the handle returns its slots. Crash: a holder that dies leaves
/// the lock poisoned, and the next acquirer gets it with [`Poisoned`]
/// (within a few 5 ms periods if it was waiting). NFS: refused. See the
/// [module docs](crate::shm).
pub struct ShmMutex {
    inner: Arc<Inner>,
    on_block: Option<OnBlock>,
}

impl fmt::Debug for ShmMutex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShmMutex")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl ShmMutex {
    pub(crate) fn from_parts(inner: Inner, on_block: Option<OnBlock>) -> ShmMutex {
        ShmMutex {
            inner: Arc::new(inner),
            on_block,
        }
    }

    /// Opens, or creates, the mutex `name` (a bare name means
    /// `/dev/shm/interlock-NAME`; see [`ShmRwLock::open`](crate::ShmRwLock::open)
    /// for the errors).
    pub fn open(name: impl AsRef<Path>) -> Result<ShmMutex> {
        ShmOptions::new().open_mutex(name)
    }

    /// A mutex in a fresh anonymous shared mapping, shared with children
    /// forked afterwards.
    pub fn anonymous() -> Result<ShmMutex> {
        ShmOptions::new().anonymous_mutex()
    }

    /// Sets (or removes) the callback told once per acquisition just before
    /// it blocks.
    pub fn set_on_block(&mut self, f: Option<OnBlock>) {
        self.on_block = f;
    }

    /// The mutex's file (or a placeholder for an anonymous one).
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Whether a holder died holding the mutex and nobody cleared it since.
    pub fn is_poisoned(&self) -> bool {
        self.inner.core().is_poisoned()
    }

    /// The process holding the mutex, if any.
    pub fn holder(&self) -> Option<crate::ProcessId> {
        self.inner.holder()
    }

    #[cold]
    pub(super) fn with_notify<T>(&self, f: impl FnOnce(&mut Notify<'_>) -> T) -> T {
        match &self.on_block {
            None => f(&mut Notify::none()),
            Some(cb) => {
                let inner = &self.inner;
                let mut call = || cb(&inner.blocked(Mode::Exclusive));
                f(&mut Notify::new(&mut call))
            }
        }
    }

    fn acquire(&self, wait: Wait) -> Result<LockResult<ShmMutexGuard<'_>>, TryLockError> {
        let go = |n: &mut Notify<'_>| {
            let (slot, _) = local::slot(&self.inner, &wait, n)?;
            let poisoned = self.inner.core().write(slot, false, &wait, n)?;
            let g = ShmMutexGuard {
                lock: self,
                t: Ticket::new(slot, false, poisoned),
                _not_send: PhantomData,
            };
            Ok(if poisoned {
                Err(Poisoned::new(g))
            } else {
                Ok(g)
            })
        };
        match &self.on_block {
            None => go(&mut Notify::none()),
            Some(cb) => {
                let inner = &self.inner;
                let mut call = || cb(&inner.blocked(Mode::Exclusive));
                go(&mut Notify::new(&mut call))
            }
        }
    }

    /// Blocks until held. `Err` carries the guard if the mutex is poisoned.
    #[inline(always)]
    pub fn lock(&self) -> LockResult<ShmMutexGuard<'_>> {
        if let Some((slot, _)) = local::cached(&self.inner) {
            if self.inner.core().try_write_fast(slot, false) {
                return Ok(ShmMutexGuard {
                    lock: self,
                    t: Ticket::new(slot, false, false),
                    _not_send: PhantomData,
                });
            }
        }
        forever(self.acquire(Wait::Forever))
    }

    /// Takes the mutex if free, else `Err(TryLockError::WouldBlock)`.
    pub fn try_lock(&self) -> Result<LockResult<ShmMutexGuard<'_>>, TryLockError> {
        self.acquire(Wait::NonBlocking)
    }

    /// Waits at most `timeout`, else `TimedOut`.
    pub fn try_lock_for(
        &self,
        timeout: Duration,
    ) -> Result<LockResult<ShmMutexGuard<'_>>, TryLockError> {
        self.acquire(Wait::timeout(timeout))
    }

    /// Waits until `deadline` at most, else `TimedOut`.
    pub fn try_lock_until(
        &self,
        deadline: Instant,
    ) -> Result<LockResult<ShmMutexGuard<'_>>, TryLockError> {
        self.acquire(Wait::Until(deadline))
    }
}

/// A hold on a [`ShmMutex`]; released on drop. Dropped while the thread
/// panics, it poisons the mutex (as std's guards do).
#[must_use = "the mutex is released as soon as the guard is dropped"]
pub struct ShmMutexGuard<'a> {
    pub(super) lock: &'a ShmMutex,
    t: Ticket,
    _not_send: PhantomData<*const ()>,
}

impl ShmMutexGuard<'_> {
    /// Whether the mutex is poisoned (a holder died before us).
    pub fn is_poisoned(&self) -> bool {
        self.t.poison()
    }

    /// Declares the protected data repaired: the mutex is no longer
    /// poisoned.
    pub fn clear_poison(&mut self) {
        self.lock.inner.core().clear_poison();
        self.t = self.t.with_poison(false);
    }

    /// Releases, reporting what drop would have to swallow: the hold had
    /// been reclaimed (this process was taken for dead).
    pub fn unlock(self) -> Result<()> {
        let me = std::mem::ManuallyDrop::new(self);
        me.release()
    }

    #[inline]
    fn release_quiet(&self) -> bool {
        let poison = self.t.poison() || std::thread::panicking();
        !self.t.current()
            || self
                .lock
                .inner
                .core()
                .token_exit(self.t.slot(), WRITER, poison)
    }

    fn release(&self) -> Result<()> {
        if self.release_quiet() {
            Ok(())
        } else {
            Err(lost(&self.lock.inner.path))
        }
    }
}

impl Drop for ShmMutexGuard<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        self.release_quiet();
    }
}

impl fmt::Debug for ShmMutexGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShmMutexGuard")
            .field("lock", &self.lock.inner.path)
            .field("poisoned", &self.t.poison())
            .finish()
    }
}

/// Both modes lock the mutex exclusively. Through the trait, a poisoned
/// mutex is an error of kind [`crate::ErrorKind::OwnerDied`] (the guard is
/// released, the poison stays); use the inherent methods to recover it.
impl Lock for ShmMutex {
    type Guard<'a> = ShmMutexGuard<'a>;

    fn acquire(&self, _mode: Mode, wait: Wait) -> Result<ShmMutexGuard<'_>, TryLockError> {
        Ok(ShmMutex::acquire(self, wait)??)
    }
}

impl ShmMutex {
    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }
}
