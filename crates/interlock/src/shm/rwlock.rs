//! [`ShmRwLock`]: the reader-writer lock in shared memory, and its guards.
//!
//! Why it is built this way: the protocol lives in `protocol.rs` so the
//! model checker can run it; this file only turns it into the crate's
//! vocabulary (blocking, `try_`, `_for`, `_until`, upgradable reads, guards,
//! poison as a value that carries the guard) and keeps the guards honest:
//! they are not `Send` (a guard is tied to the thread's slot cache), and a
//! guard inherited by a forked child releases nothing there (the hold is the
//! parent's).

use super::layout::{UPGRADABLE, WRITER};
use super::local::{self, Ticket};
use super::protocol::Notify;
use super::{lost, Inner, LockResult, Poisoned, ShmOptions};
use crate::error::Result;
use crate::wait::{Mode, OnBlock, Wait};
use crate::{Lock, TryLockError};
use std::fmt;
use std::marker::PhantomData;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A reader-writer lock in memory shared by threads and processes of one
/// host: a file (by default in /dev/shm) or an anonymous mapping inherited
/// across `fork()`.
///
/// Scope: every thread and process that maps the same lock; writers
/// exclude everyone, readers exclude writers. Fork: the child shares the
/// lock; guards it inherited stay the parent's. Close: dropping the handle
/// returns its slots (no guard can outlive it). Crash: a dead reader's
/// hold is reclaimed silently, a dead writer's leaves the lock poisoned
/// (see [`Poisoned`]); either way waiters proceed within a few 5 ms
/// periods. NFS: refused. See the [module docs](crate::shm) for the design.
///
/// ```no_run
/// # fn main() -> interlock::Result<()> {
/// let lock = interlock::ShmRwLock::open("jobs")?; // /dev/shm/interlock-jobs
/// {
///     let _r = lock.read()?; // `?`: a poisoned lock is an OwnerDied error
/// }
/// match lock.write() {
///     Ok(_w) => { /* exclusive */ }
///     Err(poisoned) => {
///         let mut w = poisoned.into_inner();
///         // ... repair the data ...
///         w.clear_poison();
///     }
/// }
/// # Ok(()) }
/// ```
pub struct ShmRwLock {
    inner: Arc<Inner>,
    on_block: Option<OnBlock>,
}

impl fmt::Debug for ShmRwLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShmRwLock")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

/// A snapshot of who holds a [`ShmRwLock`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShmHolders {
    /// The process with the exclusive or upgradable token (holding it, or
    /// first in line for it while readers drain), and which token.
    pub token: Option<(crate::ProcessId, &'static str)>,
    /// Processes with read holds, and how many holds each.
    pub readers: Vec<(crate::ProcessId, u32)>,
    /// Whether a writer died holding the lock and nobody cleared it since.
    pub poisoned: bool,
}

impl ShmRwLock {
    pub(crate) fn from_parts(inner: Inner, on_block: Option<OnBlock>) -> ShmRwLock {
        ShmRwLock {
            inner: Arc::new(inner),
            on_block,
        }
    }

    /// Opens, or creates, the lock `name`: a bare name means
    /// `/dev/shm/interlock-NAME`, a name with a `/` is a path. See
    /// [`ShmOptions`] for the number of slots, the file mode and an
    /// on-block callback.
    ///
    /// Errors: [`crate::ErrorKind::Corrupt`] if the file is not a lock of
    /// this kind and layout version (or is a directory or symlink),
    /// `InvalidInput` for an unusable name, `PermissionDenied`, `NotFound`
    /// (missing directory), `Unsupported` on a network file system.
    pub fn open(name: impl AsRef<Path>) -> Result<ShmRwLock> {
        ShmOptions::new().open_rwlock(name)
    }

    /// A lock in a fresh anonymous shared mapping: private to this process
    /// and the children it forks afterwards.
    pub fn anonymous() -> Result<ShmRwLock> {
        ShmOptions::new().anonymous_rwlock()
    }

    /// The longest this handle's writers let readers that slept behind the
    /// writer before them in first (see [`ShmOptions::readers_turn`]).
    pub fn readers_turn(&self) -> std::time::Duration {
        self.inner.readers_turn
    }

    /// Sets (or removes) the callback told once per acquisition just before
    /// it blocks.
    pub fn set_on_block(&mut self, f: Option<OnBlock>) {
        self.on_block = f;
    }

    /// The lock's file (or a placeholder for an anonymous lock).
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Whether a writer died holding the lock and nobody cleared it since.
    pub fn is_poisoned(&self) -> bool {
        self.inner.core().is_poisoned()
    }

    /// The process that holds (or waits as the first writer for) the
    /// exclusive or upgradable token, if any: for messages such as "waiting
    /// for the lock held by pid 4242". Readers are not reported.
    pub fn holder(&self) -> Option<crate::ProcessId> {
        self.inner.holder()
    }

    /// Who holds the lock now, as far as its memory shows (a snapshot, for
    /// diagnostics such as `interlock status`).
    pub fn holders(&self) -> ShmHolders {
        let token = self.inner.holder().map(|p| {
            let mode = if self.inner.token_is_exclusive() {
                "exclusive"
            } else {
                "upgradable"
            };
            (p, mode)
        });
        ShmHolders {
            token,
            readers: self.inner.readers(),
            poisoned: self.is_poisoned(),
        }
    }

    pub(super) fn with_notify<T>(&self, mode: Mode, f: impl FnOnce(&mut Notify<'_>) -> T) -> T {
        match &self.on_block {
            None => f(&mut Notify::none()),
            Some(cb) => {
                let inner = &self.inner;
                let mut call = || cb(&inner.blocked(mode));
                f(&mut Notify::new(&mut call))
            }
        }
    }

    #[inline]
    fn read_guard(&self, slot: u32, own: bool) -> ShmReadGuard<'_> {
        ShmReadGuard {
            lock: self,
            t: Ticket::new(slot, own, false),
            _not_send: PhantomData,
        }
    }

    #[cold]
    fn acquire_read(&self, wait: Wait) -> Result<LockResult<ShmReadGuard<'_>>, TryLockError> {
        self.with_notify(Mode::Shared, |n| {
            let (slot, own) = local::slot(&self.inner, &wait, n)?;
            let poisoned = self.inner.core().read(slot, own, &wait, n)?;
            Ok(self.wrap(self.read_guard(slot, own), poisoned))
        })
    }

    #[cold]
    fn acquire_write(&self, wait: Wait) -> Result<LockResult<ShmWriteGuard<'_>>, TryLockError> {
        self.with_notify(Mode::Exclusive, |n| {
            let (slot, _) = local::slot(&self.inner, &wait, n)?;
            let poisoned = self.inner.core().write(slot, true, &wait, n)?;
            let g = ShmWriteGuard {
                lock: self,
                t: Ticket::new(slot, false, poisoned),
                _not_send: PhantomData,
            };
            Ok(self.wrap(g, poisoned))
        })
    }

    fn acquire_upgradable(
        &self,
        wait: Wait,
    ) -> Result<LockResult<ShmUpgradableGuard<'_>>, TryLockError> {
        self.with_notify(Mode::Shared, |n| {
            let (slot, _) = local::slot(&self.inner, &wait, n)?;
            let poisoned = self.inner.core().upgradable(slot, &wait, n)?;
            let g = ShmUpgradableGuard {
                lock: self,
                t: Ticket::new(slot, false, poisoned),
                _not_send: PhantomData,
            };
            Ok(self.wrap(g, poisoned))
        })
    }

    #[inline]
    fn wrap<G>(&self, g: G, poisoned: bool) -> LockResult<G> {
        if poisoned {
            Err(Poisoned::new(g))
        } else {
            Ok(g)
        }
    }

    /// Blocks until held shared. `Err` carries the guard if the lock is
    /// poisoned.
    #[inline(always)]
    pub fn read(&self) -> LockResult<ShmReadGuard<'_>> {
        if let Some((slot, own)) = local::cached(&self.inner) {
            if let Ok(poisoned) = self.inner.core().read_enter(slot, own) {
                return self.wrap(self.read_guard(slot, own), poisoned);
            }
        }
        forever(self.acquire_read(Wait::Forever))
    }

    /// Takes the lock shared if that needs no waiting, else
    /// `Err(TryLockError::WouldBlock)`.
    pub fn try_read(&self) -> Result<LockResult<ShmReadGuard<'_>>, TryLockError> {
        self.acquire_read(Wait::NonBlocking)
    }

    /// Waits at most `timeout` for the lock shared, else `TimedOut`.
    pub fn try_read_for(
        &self,
        timeout: Duration,
    ) -> Result<LockResult<ShmReadGuard<'_>>, TryLockError> {
        self.acquire_read(Wait::timeout(timeout))
    }

    /// Waits until `deadline` at most for the lock shared, else `TimedOut`.
    pub fn try_read_until(
        &self,
        deadline: Instant,
    ) -> Result<LockResult<ShmReadGuard<'_>>, TryLockError> {
        self.acquire_read(Wait::Until(deadline))
    }

    /// Blocks until held exclusively. `Err` carries the guard if the lock is
    /// poisoned.
    #[inline(always)]
    pub fn write(&self) -> LockResult<ShmWriteGuard<'_>> {
        if let Some((slot, _)) = local::cached(&self.inner) {
            let core = self.inner.core();
            if core.try_write_fast(slot, true) {
                return Ok(ShmWriteGuard {
                    lock: self,
                    t: Ticket::new(slot, false, false),
                    _not_send: PhantomData,
                });
            }
        }
        forever(self.acquire_write(Wait::Forever))
    }

    /// Takes the lock exclusively if that needs no waiting, else
    /// `Err(TryLockError::WouldBlock)`.
    pub fn try_write(&self) -> Result<LockResult<ShmWriteGuard<'_>>, TryLockError> {
        self.acquire_write(Wait::NonBlocking)
    }

    /// Waits at most `timeout` for the lock exclusively, else `TimedOut`.
    pub fn try_write_for(
        &self,
        timeout: Duration,
    ) -> Result<LockResult<ShmWriteGuard<'_>>, TryLockError> {
        self.acquire_write(Wait::timeout(timeout))
    }

    /// Waits until `deadline` at most for the lock exclusively.
    pub fn try_write_until(
        &self,
        deadline: Instant,
    ) -> Result<LockResult<ShmWriteGuard<'_>>, TryLockError> {
        self.acquire_write(Wait::Until(deadline))
    }

    /// Blocks until held as the one upgradable reader: readers may still
    /// enter, writers and other upgradable readers may not, and the guard
    /// can become a write guard atomically ([`ShmUpgradableGuard::upgrade`]).
    pub fn upgradable_read(&self) -> LockResult<ShmUpgradableGuard<'_>> {
        forever(self.acquire_upgradable(Wait::Forever))
    }

    /// [`ShmRwLock::upgradable_read`] without waiting.
    pub fn try_upgradable_read(&self) -> Result<LockResult<ShmUpgradableGuard<'_>>, TryLockError> {
        self.acquire_upgradable(Wait::NonBlocking)
    }

    /// [`ShmRwLock::upgradable_read`], waiting at most `timeout`.
    pub fn try_upgradable_read_for(
        &self,
        timeout: Duration,
    ) -> Result<LockResult<ShmUpgradableGuard<'_>>, TryLockError> {
        self.acquire_upgradable(Wait::timeout(timeout))
    }

    /// [`ShmRwLock::upgradable_read`], waiting until `deadline` at most.
    pub fn try_upgradable_read_until(
        &self,
        deadline: Instant,
    ) -> Result<LockResult<ShmUpgradableGuard<'_>>, TryLockError> {
        self.acquire_upgradable(Wait::Until(deadline))
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }
}

/// A blocking acquisition cannot time out, and slot exhaustion waits too.
#[inline]
pub(super) fn forever<G>(r: Result<LockResult<G>, TryLockError>) -> LockResult<G> {
    match r {
        Ok(r) => r,
        Err(e) => unreachable!("a wait without deadline gave up: {e}"),
    }
}

/// A shared hold on a [`ShmRwLock`]; released on drop.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct ShmReadGuard<'a> {
    pub(super) lock: &'a ShmRwLock,
    t: Ticket,
    _not_send: PhantomData<*const ()>,
}

impl ShmReadGuard<'_> {
    /// Releases, reporting what drop would have to swallow: the hold had
    /// been reclaimed (this process was taken for dead).
    pub fn unlock(self) -> Result<()> {
        let me = std::mem::ManuallyDrop::new(self);
        me.release()
    }

    #[inline]
    fn release_quiet(&self) -> bool {
        !self.t.current()
            || self
                .lock
                .inner
                .core()
                .read_exit(self.t.slot(), self.t.own())
    }

    fn release(&self) -> Result<()> {
        if self.release_quiet() {
            Ok(())
        } else {
            Err(lost(&self.lock.inner.path))
        }
    }
}

impl Drop for ShmReadGuard<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        self.release_quiet();
    }
}

impl fmt::Debug for ShmReadGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShmReadGuard")
            .field("lock", &self.lock.inner.path)
            .finish()
    }
}

/// An exclusive hold on a [`ShmRwLock`]; released on drop. Dropped while
/// the thread panics, it poisons the lock (as std's guards do).
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct ShmWriteGuard<'a> {
    pub(super) lock: &'a ShmRwLock,
    t: Ticket,
    _not_send: PhantomData<*const ()>,
}

impl<'a> ShmWriteGuard<'a> {
    /// Whether the lock is poisoned (a writer died holding it before us).
    pub fn is_poisoned(&self) -> bool {
        self.t.poison()
    }

    /// Declares the protected data repaired: the lock is no longer poisoned.
    pub fn clear_poison(&mut self) {
        self.lock.inner.core().clear_poison();
        self.t = self.t.with_poison(false);
    }

    /// Becomes a read guard without letting a writer in between.
    pub fn downgrade(self) -> ShmReadGuard<'a> {
        let me = std::mem::ManuallyDrop::new(self);
        me.lock
            .inner
            .core()
            .downgrade_to_read(me.t.slot(), me.t.poison() || std::thread::panicking());
        ShmReadGuard {
            lock: me.lock,
            // The token holder's slot may be the process's shared one:
            // release with an atomic decrement, right for either kind.
            t: me.t.with_own(false),
            _not_send: PhantomData,
        }
    }

    /// Becomes an upgradable read guard (readers may enter again).
    pub fn downgrade_to_upgradable(self) -> ShmUpgradableGuard<'a> {
        let me = std::mem::ManuallyDrop::new(self);
        me.lock.inner.core().downgrade_to_upgradable(me.t.slot());
        ShmUpgradableGuard {
            lock: me.lock,
            t: me.t,
            _not_send: PhantomData,
        }
    }

    /// Releases, reporting what drop would have to swallow.
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

impl Drop for ShmWriteGuard<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        self.release_quiet();
    }
}

impl fmt::Debug for ShmWriteGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShmWriteGuard")
            .field("lock", &self.lock.inner.path)
            .field("poisoned", &self.t.poison())
            .finish()
    }
}

/// An upgradable shared hold on a [`ShmRwLock`]: at most one at a time,
/// alongside plain readers; released on drop.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct ShmUpgradableGuard<'a> {
    pub(super) lock: &'a ShmRwLock,
    t: Ticket,
    _not_send: PhantomData<*const ()>,
}

impl<'a> ShmUpgradableGuard<'a> {
    fn into_write(self) -> ShmWriteGuard<'a> {
        let me = std::mem::ManuallyDrop::new(self);
        ShmWriteGuard {
            lock: me.lock,
            t: me.t,
            _not_send: PhantomData,
        }
    }

    fn upgrade_with(self, wait: Wait) -> std::result::Result<ShmWriteGuard<'a>, Self> {
        let r = self.lock.with_notify(Mode::Exclusive, |n| {
            self.lock.inner.core().upgrade(self.t.slot(), &wait, n)
        });
        match r {
            Ok(()) => Ok(self.into_write()),
            Err(_) => Err(self),
        }
    }

    /// Becomes a write guard, waiting for the readers inside to leave (new
    /// readers wait from now on). Atomic: no other writer can get in
    /// between.
    pub fn upgrade(self) -> ShmWriteGuard<'a> {
        match self.upgrade_with(Wait::Forever) {
            Ok(w) => w,
            Err(_) => unreachable!("an upgrade without deadline gave up"),
        }
    }

    /// Upgrades if no reader is inside; otherwise gives the guard back,
    /// still held (a failed upgrade never loses the lock).
    pub fn try_upgrade(self) -> std::result::Result<ShmWriteGuard<'a>, Self> {
        self.upgrade_with(Wait::NonBlocking)
    }

    /// Upgrades, waiting at most `timeout`; on time-out gives the guard
    /// back, still held.
    pub fn try_upgrade_for(
        self,
        timeout: Duration,
    ) -> std::result::Result<ShmWriteGuard<'a>, Self> {
        self.upgrade_with(Wait::timeout(timeout))
    }

    /// Upgrades, waiting until `deadline` at most; gives the guard back
    /// still held on time-out.
    pub fn try_upgrade_until(
        self,
        deadline: Instant,
    ) -> std::result::Result<ShmWriteGuard<'a>, Self> {
        self.upgrade_with(Wait::Until(deadline))
    }

    /// Becomes a plain read guard (another upgradable reader may come).
    pub fn downgrade(self) -> ShmReadGuard<'a> {
        let me = std::mem::ManuallyDrop::new(self);
        me.lock
            .inner
            .core()
            .downgrade_to_read(me.t.slot(), me.t.poison());
        ShmReadGuard {
            lock: me.lock,
            // The token holder's slot may be the process's shared one:
            // release with an atomic decrement, right for either kind.
            t: me.t.with_own(false),
            _not_send: PhantomData,
        }
    }

    /// Releases, reporting what drop would have to swallow.
    pub fn unlock(self) -> Result<()> {
        let me = std::mem::ManuallyDrop::new(self);
        me.release()
    }

    #[inline]
    fn release_quiet(&self) -> bool {
        !self.t.current()
            || self
                .lock
                .inner
                .core()
                .token_exit(self.t.slot(), UPGRADABLE, self.t.poison())
    }

    fn release(&self) -> Result<()> {
        if self.release_quiet() {
            Ok(())
        } else {
            Err(lost(&self.lock.inner.path))
        }
    }
}

impl Drop for ShmUpgradableGuard<'_> {
    fn drop(&mut self) {
        self.release_quiet();
    }
}

impl fmt::Debug for ShmUpgradableGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShmUpgradableGuard")
            .field("lock", &self.lock.inner.path)
            .finish()
    }
}

/// A guard of either mode, for generic code driving the [`Lock`] trait.
#[derive(Debug)]
pub enum ShmGuard<'a> {
    /// Held shared.
    Read(ShmReadGuard<'a>),
    /// Held exclusively.
    Write(ShmWriteGuard<'a>),
}

/// Through the trait, a poisoned lock is an error of kind
/// [`crate::ErrorKind::OwnerDied`] (the guard is released, the poison
/// stays); use the inherent methods to recover it.
impl Lock for ShmRwLock {
    type Guard<'a> = ShmGuard<'a>;

    fn acquire(&self, mode: Mode, wait: Wait) -> Result<ShmGuard<'_>, TryLockError> {
        Ok(match mode {
            Mode::Shared => ShmGuard::Read(self.acquire_read(wait)??),
            Mode::Exclusive => ShmGuard::Write(self.acquire_write(wait)??),
        })
    }
}
