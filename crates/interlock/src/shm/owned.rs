//! Owned guards of the shared-memory locks: [`ShmArcGuard`] and
//! [`ShmMutexArcGuard`], which hold an `Arc` of their lock and may be
//! released from any thread.
//!
//! Why it is built this way: the borrowed guards of `rwlock.rs` are tied to
//! the thread that took them, because a reader's *own* slot is released
//! with a plain store that only its thread may make. An owned guard goes
//! through the process's *shared* slot instead, whose counter moves only by
//! atomic increments and decrements, so any thread may release it without
//! racing the slot's other users. (Token holds name a slot only as their
//! owner's identity, which is the process's either way.) The price is the
//! shared slot's cache line; exclusion is the same protocol. As with every
//! shm guard, a guard inherited by a forked child releases nothing there.

use super::layout::{UPGRADABLE, WRITER};
use super::local::{self, Ticket};
use super::protocol::Notify;
use super::{lost, LockResult, Poisoned, ShmMutex, ShmRwLock};
use crate::error::{Error, ErrorKind, Result};
use crate::wait::{Mode, Wait};
use crate::TryLockError;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// What an owned [`ShmRwLock`] guard holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShmHold {
    /// A shared hold.
    Read,
    /// The upgradable shared hold (one at a time, alongside readers).
    Upgradable,
    /// The exclusive hold.
    Write,
}

impl ShmHold {
    fn mode(self) -> Mode {
        match self {
            ShmHold::Write => Mode::Exclusive,
            _ => Mode::Shared,
        }
    }
}

impl ShmRwLock {
    /// Acquires `hold`, waiting as `wait` allows, with a guard that owns a
    /// reference to the lock: it is `Send` and `Sync`, and any thread may
    /// release it. `Err(Poisoned)` carries the (held) guard if a writer died
    /// holding the lock.
    pub fn acquire_arc(
        self: &Arc<Self>,
        hold: ShmHold,
        wait: Wait,
    ) -> Result<LockResult<ShmArcGuard>, TryLockError> {
        self.with_notify(hold.mode(), |n| {
            let inner = self.inner();
            let slot = local::shared_slot(inner, &wait, n)?;
            let core = inner.core();
            let poisoned = match hold {
                ShmHold::Read => core.read(slot, false, &wait, n)?,
                ShmHold::Upgradable => core.upgradable(slot, &wait, n)?,
                ShmHold::Write => core.write(slot, true, &wait, n)?,
            };
            let keep = poisoned && hold != ShmHold::Read;
            let g = ShmArcGuard {
                lock: Arc::clone(self),
                t: Some(Ticket::new(slot, false, keep)),
                hold,
            };
            Ok(if poisoned {
                Err(Poisoned::new(g))
            } else {
                Ok(g)
            })
        })
    }
}

/// A hold on a [`ShmRwLock`] that owns a reference to the lock; released on
/// drop or by [`ShmArcGuard::unlock`], from any thread. Upgrades and
/// downgrades change it in place.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct ShmArcGuard {
    lock: Arc<ShmRwLock>,
    /// `None` once released.
    t: Option<Ticket>,
    hold: ShmHold,
}

impl ShmArcGuard {
    /// What it holds (`None` once released).
    pub fn hold(&self) -> Option<ShmHold> {
        self.t.map(|_| self.hold)
    }

    /// The lock.
    pub fn lock(&self) -> &Arc<ShmRwLock> {
        &self.lock
    }

    /// The lock's path or name.
    pub fn path(&self) -> &Path {
        self.lock.path()
    }

    /// Whether this exclusive or upgradable hold carries a writer's death
    /// (the lock is poisoned and this guard has not cleared it).
    pub fn is_poisoned(&self) -> bool {
        self.t.is_some_and(Ticket::poison)
    }

    fn state(&self, op: &'static str, want: &[ShmHold]) -> Result<Ticket> {
        match self.t {
            Some(t) if want.contains(&self.hold) => Ok(t),
            Some(_) => Err(Error::new(ErrorKind::InvalidInput, op)
                .with_path(self.lock.path())
                .with_detail(format!("the guard holds {:?}", self.hold))),
            None => Err(Error::new(ErrorKind::InvalidInput, op)
                .with_path(self.lock.path())
                .with_detail("the guard was released")),
        }
    }

    /// Declares the protected data repaired (exclusive holds only).
    pub fn clear_poison(&mut self) -> Result<()> {
        let t = self.state("clear poison", &[ShmHold::Write])?;
        self.lock.inner().core().clear_poison();
        self.t = Some(t.with_poison(false));
        Ok(())
    }

    /// Upgradable to exclusive, waiting as `wait` allows; on failure the
    /// upgradable hold is kept.
    pub fn upgrade(&mut self, wait: Wait) -> Result<(), TryLockError> {
        let t = self.state("upgrade", &[ShmHold::Upgradable])?;
        let lock = Arc::clone(&self.lock);
        lock.with_notify(Mode::Exclusive, |n: &mut Notify<'_>| {
            lock.inner().core().upgrade(t.slot(), &wait, n)
        })?;
        self.hold = ShmHold::Write;
        Ok(())
    }

    /// Exclusive or upgradable to a plain shared hold, without letting a
    /// writer in between.
    pub fn downgrade(&mut self) -> Result<()> {
        let t = self.state("downgrade", &[ShmHold::Write, ShmHold::Upgradable])?;
        let poison = t.poison() || (self.hold == ShmHold::Write && std::thread::panicking());
        if t.current() {
            self.lock.inner().core().downgrade_to_read(t.slot(), poison);
        }
        self.t = Some(t.with_poison(false));
        self.hold = ShmHold::Read;
        Ok(())
    }

    /// Releases; `Ok` if it was released already. Reports what drop would
    /// swallow: the hold had been reclaimed (this process was taken for
    /// dead).
    pub fn unlock(&mut self) -> Result<()> {
        if self.release_quiet() {
            Ok(())
        } else {
            Err(lost(self.lock.path()))
        }
    }

    fn release_quiet(&mut self) -> bool {
        let Some(t) = self.t.take() else {
            return true;
        };
        if !t.current() {
            // Inherited across fork: the hold is the parent's.
            return true;
        }
        let core = self.lock.inner().core();
        match self.hold {
            ShmHold::Read => core.read_exit(t.slot(), false),
            ShmHold::Upgradable => core.token_exit(t.slot(), UPGRADABLE, t.poison()),
            ShmHold::Write => {
                core.token_exit(t.slot(), WRITER, t.poison() || std::thread::panicking())
            }
        }
    }

    /// Whether this guard was taken in another process (inherited across
    /// fork): then it releases nothing.
    pub fn is_inherited(&self) -> bool {
        self.t.is_some_and(|t| !t.current())
    }
}

impl Drop for ShmArcGuard {
    fn drop(&mut self) {
        self.release_quiet();
    }
}

impl fmt::Debug for ShmArcGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShmArcGuard")
            .field("lock", &self.lock.path())
            .field("hold", &self.hold())
            .finish()
    }
}

impl ShmMutex {
    /// Locks, waiting as `wait` allows, with a guard that owns a reference
    /// to the mutex: `Send` and `Sync`, releasable from any thread.
    /// `Err(Poisoned)` carries the (held) guard if a holder died holding it.
    pub fn lock_arc(
        self: &Arc<Self>,
        wait: Wait,
    ) -> Result<LockResult<ShmMutexArcGuard>, TryLockError> {
        self.with_notify(|n| {
            let inner = self.inner();
            let slot = local::shared_slot(inner, &wait, n)?;
            let poisoned = inner.core().write(slot, false, &wait, n)?;
            let g = ShmMutexArcGuard {
                lock: Arc::clone(self),
                t: Some(Ticket::new(slot, false, poisoned)),
            };
            Ok(if poisoned {
                Err(Poisoned::new(g))
            } else {
                Ok(g)
            })
        })
    }
}

/// A hold on a [`ShmMutex`] that owns a reference to it; released on drop
/// or by [`ShmMutexArcGuard::unlock`], from any thread.
#[must_use = "the mutex is released as soon as the guard is dropped"]
pub struct ShmMutexArcGuard {
    lock: Arc<ShmMutex>,
    t: Option<Ticket>,
}

impl ShmMutexArcGuard {
    /// Whether it still holds the mutex.
    pub fn is_held(&self) -> bool {
        self.t.is_some()
    }

    /// The mutex.
    pub fn lock(&self) -> &Arc<ShmMutex> {
        &self.lock
    }

    /// Whether the mutex is poisoned and this guard has not cleared it.
    pub fn is_poisoned(&self) -> bool {
        self.t.is_some_and(Ticket::poison)
    }

    /// Declares the protected data repaired.
    pub fn clear_poison(&mut self) -> Result<()> {
        let Some(t) = self.t else {
            return Err(Error::new(ErrorKind::InvalidInput, "clear poison")
                .with_path(self.lock.path())
                .with_detail("the guard was released"));
        };
        self.lock.inner().core().clear_poison();
        self.t = Some(t.with_poison(false));
        Ok(())
    }

    /// Releases; `Ok` if it was released already.
    pub fn unlock(&mut self) -> Result<()> {
        if self.release_quiet() {
            Ok(())
        } else {
            Err(lost(self.lock.path()))
        }
    }

    fn release_quiet(&mut self) -> bool {
        let Some(t) = self.t.take() else {
            return true;
        };
        !t.current()
            || self.lock.inner().core().token_exit(
                t.slot(),
                WRITER,
                t.poison() || std::thread::panicking(),
            )
    }

    /// Whether this guard was inherited across fork (it releases nothing).
    pub fn is_inherited(&self) -> bool {
        self.t.is_some_and(|t| !t.current())
    }
}

impl Drop for ShmMutexArcGuard {
    fn drop(&mut self) {
        self.release_quiet();
    }
}

impl fmt::Debug for ShmMutexArcGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShmMutexArcGuard")
            .field("lock", &self.lock.path())
            .field("held", &self.is_held())
            .finish()
    }
}
