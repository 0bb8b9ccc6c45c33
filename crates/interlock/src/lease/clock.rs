//! The wall clock that lease expiry is measured on, injectable.
//!
//! Why it is built this way: a lease's expiry has to mean the same instant
//! to every host that reads it, so it is a wall-clock time (Unix epoch), not
//! a monotonic one; and a test that wants to see a lease expire should not
//! have to sleep through its time to live. So expiry is read through a
//! [`Clock`], which is the system clock in production and a [`ManualClock`]
//! that a test moves by hand.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of wall-clock time for lease expiry.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The system's real-time clock (`CLOCK_REALTIME`).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that stands still until moved: for tests of expiry.
#[derive(Debug)]
pub struct ManualClock {
    nanos: AtomicU64,
}

impl ManualClock {
    /// A clock reading `t`.
    pub fn new(t: SystemTime) -> ManualClock {
        ManualClock {
            nanos: AtomicU64::new(unix_nanos(t)),
        }
    }

    /// A clock reading the current system time (and then standing still).
    pub fn starting_now() -> ManualClock {
        ManualClock::new(SystemTime::now())
    }

    /// Sets the reading to `t`.
    pub fn set(&self, t: SystemTime) {
        self.nanos.store(unix_nanos(t), Ordering::SeqCst);
    }

    /// Moves the reading forward by `d`.
    pub fn advance(&self, d: Duration) {
        let d = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let _ = self
            .nanos
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(n.saturating_add(d))
            });
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        from_unix_nanos(self.nanos.load(Ordering::SeqCst))
    }
}

/// `t` as nanoseconds since the Unix epoch (0 before it, saturating far after).
pub(crate) fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The inverse of [`unix_nanos`].
pub(crate) fn from_unix_nanos(n: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(n)
}

/// `d` in nanoseconds, saturating.
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(UNIX_EPOCH + Duration::from_secs(100));
        assert_eq!(c.now(), UNIX_EPOCH + Duration::from_secs(100));
        c.advance(Duration::from_millis(1500));
        assert_eq!(unix_nanos(c.now()), 101_500_000_000);
        c.set(UNIX_EPOCH);
        assert_eq!(unix_nanos(c.now()), 0);
        assert_eq!(from_unix_nanos(unix_nanos(c.now())), UNIX_EPOCH);
        c.advance(Duration::MAX);
        assert_eq!(unix_nanos(c.now()), u64::MAX);
    }
}
