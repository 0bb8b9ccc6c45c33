//! Locks named by a path, built on the kernel's file locks.
//!
//! Why it is built this way: the kernel's file locks are the only locks that
//! every process on a host (and every language) can take and that the kernel
//! releases at once when the holder dies. Each file here fixes one thing the
//! kernel gets wrong on its own; see each module's opening comment.

mod lock;

pub use lock::*;
