//! File-backed locks: kernel locks on a path. Each submodule says why it is
//! built as it is; this file only names them (kept to `mod` and `pub use`
//! lines so that families written in parallel merge without conflict).

mod deadlock;
mod inspect;
mod ranges;
mod set;

pub use deadlock::REGISTRY_DIR_ENV;
pub use inspect::{holders, Holder, LockKind};
pub use ranges::{IndexRange, INDEX_END};
pub use set::{LockSet, LockSetOptions, Scope};
