//! The only place with `unsafe`: thin, safe wrappers over the system calls
//! the lock families use, and readers of /proc.
//!
//! Why it is built this way: every raw call is wrapped once, here, with its
//! contract stated next to it, so the lock logic above can be read and
//! reviewed without reasoning about pointers, and so tests can see exactly
//! which calls a family makes.

// Under loom only the shm protocol is exercised; the wrappers it replaces
// with models would otherwise be reported as unused.
#![cfg_attr(loom, allow(dead_code))]

pub mod dir;
pub mod fcntl;
pub mod fork;
pub mod futex;
pub mod membarrier;
pub mod mmap;
pub mod notify;
#[cfg(loom)]
pub mod probe;
pub mod proc;
pub mod raw;
pub mod robust;
pub mod timer;
