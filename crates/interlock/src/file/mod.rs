//! Locks named by a path, built on the kernel's file locks.
//!
//! Why it is built this way: the kernel's file locks are the only locks that
//! every process on a host (and every language) can take and that the kernel
//! releases at once when the holder dies. Each file here fixes one thing the
//! kernel gets wrong on its own; see each module's opening comment. This file
//! only names them.

mod deadlock;
mod hint;
mod inspect;
mod lock;
mod open;
mod ranges;
mod sem;
mod set;

pub use deadlock::REGISTRY_DIR_ENV;
pub use inspect::{holders, Holder, LockKind};
pub use lock::*;
#[cfg(not(loom))] // only shm/open.rs, which loom builds leave out, uses it
pub(crate) use open::PERMISSION_BITS;
pub use ranges::{IndexRange, INDEX_END};
pub use sem::{FileSemaphore, FileSemaphoreGuard};
pub use set::{LockSet, LockSetOptions, Scope};
