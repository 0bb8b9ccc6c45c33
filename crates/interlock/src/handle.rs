//! How a guard reaches its lock: by a borrow or by a reference count.
//!
//! Why it is built this way: a guard that borrows its lock (`lock.write()`)
//! costs nothing and cannot outlive it, which suits Rust callers. A binding
//! to a garbage-collected language cannot express the borrow: its guard
//! objects live as long as the program keeps them and may be released by
//! any thread. So every family also offers `*_arc` acquisitions on an
//! `Arc` of the lock, whose guards hold a clone of the `Arc` (the manner of
//! parking_lot's `arc_lock`) and are `'static`. One guard type serves both,
//! and the lock logic is written once.

use std::ops::Deref;
use std::sync::Arc;

/// A borrowed or reference-counted lock.
pub(crate) enum Handle<'a, T> {
    Borrowed(&'a T),
    Owned(Arc<T>),
}

impl<T> Clone for Handle<'_, T> {
    fn clone(&self) -> Self {
        match self {
            Handle::Borrowed(l) => Handle::Borrowed(l),
            Handle::Owned(l) => Handle::Owned(Arc::clone(l)),
        }
    }
}

impl<T> Deref for Handle<'_, T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        match self {
            Handle::Borrowed(l) => l,
            Handle::Owned(l) => l,
        }
    }
}
