//! The one way every lock family says how long to wait.
//!
//! Why it is built this way: the ancestors each grew their own notion of a
//! time-out (fasteners' `timeout=`, lockbydir's PATIENCE, prwlock's float
//! seconds), and each converted it to a sleep-poll loop. Here a wait is a
//! [`Wait`] value computed once from the caller's `Duration` or `Instant`,
//! carried down to the primitive, which blocks in the kernel until the
//! deadline (a futex time-out, a signal-interrupted `F_OFD_SETLKW`), so no
//! family re-derives deadlines or polls on a fixed period.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Shared (read) or exclusive (write) access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Many holders at once; excludes [`Mode::Exclusive`].
    Shared,
    /// One holder; excludes everyone else.
    Exclusive,
}

impl Mode {
    /// Whether a holder in `self` and a holder in `other` exclude each other.
    pub fn conflicts_with(self, other: Mode) -> bool {
        self == Mode::Exclusive || other == Mode::Exclusive
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Shared => "shared",
            Mode::Exclusive => "exclusive",
        })
    }
}

/// How long an acquisition may wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Do not wait at all (`try_*`).
    NonBlocking,
    /// Wait as long as it takes (`read`, `write`, `lock`).
    Forever,
    /// Wait until this instant (`try_*_for`, `try_*_until`).
    Until(Instant),
}

impl Wait {
    /// A wait of at most `d` from now. A duration too large to represent
    /// waits forever.
    pub fn timeout(d: Duration) -> Wait {
        match Instant::now().checked_add(d) {
            Some(t) => Wait::Until(t),
            None => Wait::Forever,
        }
    }

    /// Whether the caller accepts blocking at all.
    pub fn may_block(&self) -> bool {
        !matches!(self, Wait::NonBlocking)
    }

    /// The time left before the deadline: `None` for [`Wait::Forever`],
    /// `Some(ZERO)` once the deadline passed or for [`Wait::NonBlocking`].
    /// In the waiter thread of a cancelled async acquisition (see
    /// docs/design-async.md) every wait counts as expired.
    pub fn remaining(&self) -> Option<Duration> {
        if crate::sys::timer::cancelled() {
            return Some(Duration::ZERO);
        }
        match self {
            Wait::NonBlocking => Some(Duration::ZERO),
            Wait::Forever => None,
            Wait::Until(t) => Some(t.saturating_duration_since(Instant::now())),
        }
    }

    /// Whether the deadline has passed (always true for [`Wait::NonBlocking`]).
    pub fn expired(&self) -> bool {
        self.remaining() == Some(Duration::ZERO)
    }

    /// The error for "did not get it in time" that fits this wait.
    pub(crate) fn gave_up(&self) -> crate::TryLockError {
        match self {
            Wait::NonBlocking => crate::TryLockError::WouldBlock,
            _ => crate::TryLockError::TimedOut,
        }
    }
}

/// What an acquisition that is about to block tells the on-block callback.
#[derive(Clone, Copy, Debug)]
pub struct Blocked<'a> {
    /// The lock's path or name.
    pub resource: &'a Path,
    /// The mode being requested.
    pub mode: Mode,
    /// For a [`crate::LockSet`], the index range `start..end` requested.
    pub range: Option<(u64, u64)>,
}

/// A callback told once per acquisition, just before it blocks (the `locks`
/// library's "would block" hook), e.g. to print who holds the lock.
pub type OnBlock = Arc<dyn Fn(&Blocked<'_>) + Send + Sync>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines() {
        assert!(Wait::NonBlocking.expired());
        assert!(!Wait::Forever.expired());
        assert_eq!(Wait::Forever.remaining(), None);
        assert!(!Wait::timeout(Duration::from_secs(60)).expired());
        assert!(Wait::Until(Instant::now()).expired());
        assert_eq!(Wait::timeout(Duration::MAX), Wait::Forever);
        assert!(Mode::Shared.conflicts_with(Mode::Exclusive));
        assert!(!Mode::Shared.conflicts_with(Mode::Shared));
    }
}
