//! The atomics and the futex the shared-memory protocol is written against:
//! std's in a normal build, loom's under `--cfg loom`.
//!
//! Why it is built this way: the protocol of [`crate::shm`] (reader slots, a
//! writer word, poison, recovery of dead holders) is subtle enough that
//! testing it by running it is not evidence. Written against this module, the
//! very same code is model-checked by loom, which explores the interleavings
//! and weak-memory outcomes a test run would almost never hit (the idea of
//! tokio's `loom` module). Under loom a futex wait is modelled as "re-check the
//! word, then yield": a spurious wake-up, which the protocol must (and does)
//! tolerate anyway, so the model checks exclusion and recovery; the bounded
//! time-outs that make lost wake-ups impossible to wedge on are production
//! behaviour, measured by the multi-process tests.

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// How a futex wait ended, as far as the protocol cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Woke {
    /// Woken, or the word no longer held the expected value, or a signal:
    /// re-check the state.
    Maybe,
    /// The time-out passed with no wake-up: re-check, and check whether the
    /// holder is still alive.
    TimedOut,
}

/// Futex operations on a word that may live in memory shared between
/// processes.
#[cfg(not(loom))]
pub(crate) mod futex {
    use super::Woke;
    use crate::sys::futex as sys;
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;

    /// Sleeps while `word == expected`, at most `timeout`.
    pub(crate) fn wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> Woke {
        match sys::wait(word, expected, timeout) {
            sys::WaitOutcome::TimedOut => Woke::TimedOut,
            _ => Woke::Maybe,
        }
    }

    /// Wakes every sleeper on `word`.
    pub(crate) fn wake_all(word: &AtomicU32) {
        sys::wake(word, i32::MAX);
    }
}

/// Loom's model of a futex: re-check the word, then let other threads run.
#[cfg(loom)]
pub(crate) mod futex {
    use super::{AtomicU32, Ordering, Woke};
    use std::time::Duration;

    pub(crate) fn wait(word: &AtomicU32, expected: u32, _timeout: Option<Duration>) -> Woke {
        if word.load(Ordering::SeqCst) != expected {
            return Woke::Maybe;
        }
        loom::thread::yield_now();
        // Every wait "times out", so every waiter also runs the liveness
        // check: the model explores recovery racing with normal progress.
        Woke::TimedOut
    }

    pub(crate) fn wake_all(_word: &AtomicU32) {}
}

/// A busy-wait hint (a no-op under loom, where spinning is not modelled).
#[inline]
pub(crate) fn spin_hint() {
    #[cfg(not(loom))]
    std::hint::spin_loop();
}
