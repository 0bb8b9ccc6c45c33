//! Python's `blocking=`/`timeout=` as a [`Wait`], and the one way every
//! binding call waits: without the GIL, hearing Ctrl-C in the main thread.

use interlock::{TryLockError, Wait};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use std::time::{Duration, Instant};

/// How often a main-thread wait that no signal reaches by itself (PgLock's
/// waiter thread) looks for signals.
pub(crate) const SLICE: Duration = Duration::from_millis(50);

/// How long a main-thread kernel wait runs at most before it looks for
/// signals although no system call was interrupted: the safety net for a
/// signal that lands between the look and the blocking call, or a handler
/// installed with `SA_RESTART` (Python's own SIGINT handler is not).
pub(crate) const SAFETY_SLICE: Duration = Duration::from_secs(1);

/// `blocking: bool = True, timeout: float | None = None`: `None` waits
/// forever, `0` tries once, `> 0` waits so many seconds. A timeout with
/// `blocking=False`, a negative or NaN timeout are `ValueError`s.
pub(crate) fn wait_of(blocking: bool, timeout: Option<f64>) -> PyResult<Wait> {
    if !blocking {
        if timeout.is_some() {
            return Err(PyValueError::new_err(
                "a timeout cannot be given with blocking=False",
            ));
        }
        return Ok(Wait::NonBlocking);
    }
    match timeout {
        None => Ok(Wait::Forever),
        Some(t) => seconds(t),
    }
}

/// `threading.Lock.acquire(blocking=True, timeout=-1)`: `-1` waits forever.
pub(crate) fn wait_of_threading(blocking: bool, timeout: f64) -> PyResult<Wait> {
    if !blocking {
        if timeout != -1.0 {
            return Err(PyValueError::new_err(
                "can't specify a timeout for a non-blocking call",
            ));
        }
        return Ok(Wait::NonBlocking);
    }
    if timeout == -1.0 {
        return Ok(Wait::Forever);
    }
    seconds(timeout)
}

fn seconds(t: f64) -> PyResult<Wait> {
    let d = non_negative_secs("timeout", t)?;
    if t == 0.0 {
        return Ok(Wait::NonBlocking);
    }
    Ok(d.map_or(Wait::Forever, Wait::timeout))
}

/// A non-negative number of seconds given as `what`: `ValueError` for a
/// negative one or NaN, `None` for one too large to represent (for ever).
pub(crate) fn non_negative_secs(what: &str, t: f64) -> PyResult<Option<Duration>> {
    if t.is_nan() || t < 0.0 {
        return Err(PyValueError::new_err(format!(
            "{what} must be a non-negative number of seconds, not {t}"
        )));
    }
    Ok(Duration::try_from_secs_f64(t).ok())
}

/// Whether the calling thread is Python's main thread (where Python runs
/// signal handlers), computed once per thread.
pub(crate) fn in_main_thread(py: Python<'_>) -> bool {
    thread_local! {
        static MAIN: std::cell::Cell<Option<(u64, bool)>> = const { std::cell::Cell::new(None) };
    }
    let gen = interlock::__fork::generation();
    if let Some((g, m)) = MAIN.with(|c| c.get()) {
        if g == gen {
            return m;
        }
    }
    let m = py
        .import("threading")
        .and_then(|t| {
            let cur = t.call_method0("current_thread")?;
            let main = t.call_method0("main_thread")?;
            Ok(cur.is(&main))
        })
        .unwrap_or(false);
    MAIN.with(|c| c.set(Some((gen, m))));
    m
}

thread_local! {
    /// Who holds what this thread acquires: (the asyncio task on whose
    /// behalf it acquires while set by `_hold_as`, else 0; the thread's
    /// own number, 0 until first needed).
    static WHO: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
}

/// The holder that acquisitions of this thread are recorded under: a
/// number never reused by another thread (unlike a pthread id), or the
/// token set by [`hold_as`].
pub(crate) fn thread_ident() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    WHO.with(|c| match c.get() {
        (0, 0) => {
            let me = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            c.set((0, me));
            me
        }
        (0, me) => me,
        (task, _) => task,
    })
}

/// `_native._hold_as(token)`: until reset (`_hold_as(0)`), this thread
/// acquires on behalf of `token` (an asyncio task's number, above 2**62),
/// so that a task, not the thread running it, is the holder. Returns the
/// previous token.
#[pyfunction]
pub(crate) fn _hold_as(token: u64) -> u64 {
    WHO.with(|c| {
        let (prev, me) = c.get();
        c.set((token, me));
        prev
    })
}

/// How an acquisition may proceed with the GIL held.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fast {
    /// Try once with the GIL held first: the try never waits for anything
    /// (a kernel try, atomics), so the uncontended path skips the GIL
    /// round trip.
    TryFirst,
    /// Always let go of the GIL: even the try may wait for a mutex that a
    /// waiting thread holds.
    Detach,
}

/// Runs `f` as `wait` allows: first (if `fast`) a try with the GIL, then
/// without the GIL. In the main thread a signal ends the wait: Python's
/// handlers are installed without `SA_RESTART`, so the blocked system call
/// returns EINTR, and the core then gives back what it took and reports a
/// time-out; the handlers run (`check_signals`, with the GIL) and their
/// exception (Ctrl-C: `KeyboardInterrupt`) ends the call with nothing held;
/// without one the wait goes on, its deadline kept. A wait also looks for
/// signals every [`SAFETY_SLICE`].
pub(crate) fn run<T: Send>(
    py: Python<'_>,
    wait: Wait,
    fast: Fast,
    f: impl Fn(Wait) -> Result<T, TryLockError> + Send + Sync,
) -> PyResult<Result<T, TryLockError>> {
    match (fast, wait) {
        (Fast::TryFirst, _) => match f(Wait::NonBlocking) {
            Err(TryLockError::WouldBlock) if wait.may_block() => {}
            r => return Ok(r),
        },
        (Fast::Detach, Wait::NonBlocking) => return Ok(py.detach(|| f(Wait::NonBlocking))),
        _ => {}
    }
    if !in_main_thread(py) {
        return Ok(py.detach(|| f(wait)));
    }
    let deadline = match wait {
        Wait::Until(t) => Some(t),
        _ => None,
    };
    loop {
        let slice_end = Instant::now() + SAFETY_SLICE;
        let (slice, last) = match deadline {
            Some(t) if t <= slice_end => (Wait::Until(t), true),
            _ => (Wait::Until(slice_end), false),
        };
        let (r, signalled) = py.detach(|| {
            interlock::__signals::set_signals_end_waits(true);
            let r = f(slice);
            let came = interlock::__signals::signal_came();
            interlock::__signals::set_signals_end_waits(false);
            (r, came)
        });
        match r {
            Err(TryLockError::TimedOut) if signalled || !last => {
                py.check_signals()?;
                if last && deadline.is_some_and(|t| Instant::now() >= t) {
                    return Ok(Err(TryLockError::TimedOut));
                }
            }
            r => return Ok(r),
        }
    }
}
