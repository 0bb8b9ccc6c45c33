//! futex(2) wait and wake on a 32-bit word, shared between processes.
//!
//! Why it is built this way: a lock in shared memory must let its waiters
//! sleep without burning CPU, and be woken by a process that is not their
//! parent, child or thread. The futex is the kernel's primitive for exactly
//! that, keyed by the word's *physical* page, so it works across processes
//! mapping the same file or inheriting the same anonymous shared mapping.
//! That is why these calls never pass `FUTEX_PRIVATE_FLAG` (which keys on the
//! address space and would silently never wake another process).
//!
//! The time-out of `FUTEX_WAIT` is relative and measured on CLOCK_MONOTONIC;
//! callers recompute it from their deadline after every wake-up, so the wait
//! is exact rather than a sleep-poll.
//!
//! References: futex(2), futex(7).

use std::ptr;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// How [`wait`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitOutcome {
    /// Woken by [`wake`] (or spuriously).
    Woken,
    /// The word did not hold the expected value (`EAGAIN`).
    Changed,
    /// The time-out passed (`ETIMEDOUT`).
    TimedOut,
    /// A signal arrived (`EINTR`).
    Interrupted,
}

fn timespec(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    }
}

/// `FUTEX_WAIT`: sleeps while `*word == expected`, for at most `timeout`
/// (forever if `None`).
pub fn wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> WaitOutcome {
    let ts = timeout.map(timespec);
    let ts_ptr = ts
        .as_ref()
        .map_or(ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a live, 4-byte-aligned u32 for the whole call (the
    // borrow outlives it), which FUTEX_WAIT only reads, atomically. `ts_ptr`
    // is null or points to a timespec on this stack frame. The remaining
    // arguments are ignored by FUTEX_WAIT.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            ts_ptr,
            ptr::null::<u32>(),
            0u32,
        )
    };
    if rc == 0 {
        return WaitOutcome::Woken;
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) => WaitOutcome::Changed,
        Some(libc::ETIMEDOUT) => WaitOutcome::TimedOut,
        Some(libc::EINTR) => {
            super::timer::note_signal();
            WaitOutcome::Interrupted
        }
        // EFAULT/EINVAL cannot happen with a valid reference; treat anything
        // else as a spurious wake-up, which every caller tolerates.
        _ => WaitOutcome::Woken,
    }
}

/// `FUTEX_WAKE`: wakes at most `n` sleepers on `word`; returns how many.
pub fn wake(word: &AtomicU32, n: i32) -> usize {
    // SAFETY: `word` is a live, aligned u32; FUTEX_WAKE does not access its
    // value, only uses its address as the key. Unused arguments are ignored.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            n,
            ptr::null::<libc::timespec>(),
            ptr::null::<u32>(),
            0u32,
        )
    };
    if rc < 0 {
        0
    } else {
        rc as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn wait_returns_on_mismatch_and_times_out() {
        let w = AtomicU32::new(1);
        assert_eq!(wait(&w, 2, None), WaitOutcome::Changed);
        let t = Instant::now();
        assert_eq!(
            wait(&w, 1, Some(Duration::from_millis(20))),
            WaitOutcome::TimedOut
        );
        assert!(t.elapsed() >= Duration::from_millis(20));
    }

    #[test]
    fn wake_wakes_a_sleeper() {
        let w = Arc::new(AtomicU32::new(0));
        let w2 = Arc::clone(&w);
        let h = std::thread::spawn(move || {
            while w2.load(Ordering::SeqCst) == 0 {
                wait(&w2, 0, Some(Duration::from_secs(5)));
            }
        });
        w.store(1, Ordering::SeqCst);
        wake(&w, i32::MAX);
        h.join().unwrap();
    }
}
