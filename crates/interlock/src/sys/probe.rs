//! A data-race detector for model tests: loom's `UnsafeCell` behind a safe
//! read/write interface.
//!
//! Why it is built this way: the model tests of the shared-memory protocol
//! need "the protected data" to check that critical sections never overlap
//! and that the protocol's orderings publish one holder's writes to the
//! next. loom's `UnsafeCell` checks exactly that (an access not ordered by
//! happens-before with a conflicting one fails the run), but its accessors
//! hand out raw pointers; this wrapper keeps the `unsafe` here. It exists
//! only under `--cfg loom`, where every loom "thread" runs on one OS
//! thread, one at a time, so no access ever really races.

/// A `u32` whose every access loom checks for races.
#[derive(Debug)]
pub struct Probe(loom::cell::UnsafeCell<u32>);

impl Default for Probe {
    fn default() -> Self {
        Probe::new()
    }
}

impl Probe {
    /// A probe holding 0.
    pub fn new() -> Probe {
        Probe(loom::cell::UnsafeCell::new(0))
    }

    /// Reads (a shared access, checked).
    pub fn get(&self) -> u32 {
        // SAFETY: loom executes model threads one at a time on one OS
        // thread, and `with` records and checks this access against
        // conflicting ones before the closure runs: the read is never
        // concurrent with a write.
        self.0.with(|p| unsafe { *p })
    }

    /// Adds one (an exclusive access, checked).
    pub fn bump(&self) {
        // SAFETY: as in `get`; `with_mut` checks that no other access is
        // concurrent with this one.
        self.0.with_mut(|p| unsafe { *p += 1 })
    }
}
