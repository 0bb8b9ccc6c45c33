//! Poison: how a lock tells its next holder that a writer died inside.
//!
//! Why it is built this way: a writer killed half-way through an update
//! leaves the protected data inconsistent, and a lock that silently hands
//! it to the next holder turns a crash into corruption. As with std's
//! `PoisonError` and a robust mutex's `EOWNERDEAD`, the next acquirer gets
//! the lock *and* the news, in a value it cannot unwrap by accident.

use crate::error::{Error, ErrorKind};
use crate::TryLockError;
use std::fmt;
use std::path::Path;

/// A lock acquired from a holder that died holding it exclusively: the data
/// it protects may be half-updated.
///
/// It carries the guard: the lock *is* held. To use the data anyway, take
/// the guard with [`Poisoned::into_inner`] (and, once the data is repaired,
/// clear the poison with the write guard's `clear_poison`); or convert it
/// with `?` into an [`Error`] of kind [`ErrorKind::OwnerDied`], which drops
/// the guard (the lock stays poisoned). There is no way to reach the guard
/// without naming this case, so poison cannot be ignored by accident.
#[must_use = "the lock is held and poisoned: handle it (into_inner) or propagate it (?)"]
pub struct Poisoned<G> {
    guard: G,
}

/// The result of a blocking acquisition: the guard, or the guard inside
/// [`Poisoned`].
pub type LockResult<G> = std::result::Result<G, Poisoned<G>>;

impl<G> Poisoned<G> {
    pub(crate) fn new(guard: G) -> Poisoned<G> {
        Poisoned { guard }
    }

    /// The guard: the caller takes responsibility for the data.
    pub fn into_inner(self) -> G {
        self.guard
    }

    /// The guard, borrowed.
    pub fn get_ref(&self) -> &G {
        &self.guard
    }

    /// The guard, borrowed mutably (e.g. to clear the poison in place).
    pub fn get_mut(&mut self) -> &mut G {
        &mut self.guard
    }
}

impl<G> fmt::Debug for Poisoned<G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Poisoned").finish_non_exhaustive()
    }
}

impl<G> fmt::Display for Poisoned<G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("lock is poisoned: a writer died holding it")
    }
}

impl<G> std::error::Error for Poisoned<G> {}

/// The error a poisoned acquisition converts to (the guard is dropped).
pub(crate) fn owner_died(path: &Path) -> Error {
    Error::new(ErrorKind::OwnerDied, "acquire shared-memory lock")
        .with_path(path)
        .with_detail("a writer died holding the lock; the data may be inconsistent")
}

/// `?` on a poisoned acquisition, for each guard type (each knows its
/// lock's path).
macro_rules! poison_converts {
    ($($guard:ident),*) => {$(
        impl From<Poisoned<super::$guard<'_>>> for Error {
            fn from(p: Poisoned<super::$guard<'_>>) -> Error {
                owner_died(p.guard.lock.path())
            }
        }

        impl From<Poisoned<super::$guard<'_>>> for TryLockError {
            fn from(p: Poisoned<super::$guard<'_>>) -> TryLockError {
                TryLockError::Error(p.into())
            }
        }

        impl Poisoned<super::$guard<'_>> {
            /// The lock's path.
            pub fn path(&self) -> &Path {
                self.guard.lock.path()
            }
        }
    )*};
}

poison_converts!(
    ShmReadGuard,
    ShmWriteGuard,
    ShmUpgradableGuard,
    ShmMutexGuard
);

/// The error an explicit unlock reports when the lock was taken from under
/// its holder (its process had been taken for dead).
pub(crate) fn lost(path: &Path) -> Error {
    Error::new(ErrorKind::Corrupt, "release shared-memory lock")
        .with_path(path)
        .with_detail("the hold had been reclaimed while held (this process was taken for dead)")
}
