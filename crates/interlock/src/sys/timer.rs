//! Cutting a blocking lock call short at a deadline, without polling.
//!
//! Why it is built this way: `F_OFD_SETLKW` and `flock` have no time-out
//! argument; the only way out of a blocked call is a signal (EINTR). The
//! ancestors therefore polled a non-blocking call every 10–100 ms, which
//! makes a waiter both late (up to a whole period after the release) and
//! busy. Here a timed wait makes the blocking call and arms a POSIX timer
//! that sends a signal *to this thread only* (`SIGEV_THREAD_ID`) at the
//! deadline, so a release wakes the waiter at once (the kernel's own queue)
//! and the deadline interrupts it within the timer's precision.
//!
//! Details that matter:
//! - The signal is the highest real-time signal whose disposition is still
//!   the default when first needed; its handler does nothing. It is
//!   installed without `SA_RESTART` (the lock calls are restartable and
//!   would otherwise resume after the handler).
//! - The timer repeats every millisecond after the deadline, so a signal
//!   that lands just *before* the thread enters the blocking call (the
//!   classic lost-wake-up race) is followed by another one.
//! - The signal is unblocked in this thread while the timer is armed (a
//!   blocked signal would stay pending and never interrupt the call), and
//!   the mask is restored afterwards.
//! - Deleting the timer is a system call; a signal generated up to then is
//!   delivered when that call returns, into our empty handler, so no stray
//!   EINTR reaches the caller's later system calls.

use std::cell::{Cell, RefCell};
use std::io;
use std::mem::MaybeUninit;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

extern "C" fn ignore_signal(_: libc::c_int) {}

/// The signal used to interrupt timed waits, chosen and installed once.
fn interrupt_signal() -> io::Result<libc::c_int> {
    static SIGNAL: OnceLock<Result<libc::c_int, i32>> = OnceLock::new();
    let chosen = SIGNAL.get_or_init(|| {
        for sig in (libc::SIGRTMIN()..=libc::SIGRTMAX()).rev() {
            let mut old = MaybeUninit::<libc::sigaction>::uninit();
            // SAFETY: querying (act == NULL) only writes the current
            // disposition into `old`, which is valid for writes.
            if unsafe { libc::sigaction(sig, ptr::null(), old.as_mut_ptr()) } != 0 {
                continue;
            }
            // SAFETY: sigaction succeeded, so it initialised `old`.
            let old = unsafe { old.assume_init() };
            if old.sa_sigaction != libc::SIG_DFL {
                continue;
            }
            // SAFETY: an all-zero sigaction is a valid value (empty mask,
            // no flags); we then set the handler.
            let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
            act.sa_sigaction = ignore_signal as *const () as libc::sighandler_t;
            // SAFETY: `act.sa_mask` is a valid sigset_t to initialise.
            unsafe { libc::sigemptyset(&mut act.sa_mask) };
            // SAFETY: installs a handler that only returns; it touches no
            // state, so it is async-signal-safe.
            if unsafe { libc::sigaction(sig, &act, ptr::null_mut()) } == 0 {
                return Ok(sig);
            }
        }
        Err(libc::EAGAIN)
    });
    chosen.map_err(io::Error::from_raw_os_error)
}

/// A POSIX timer that signals the calling thread (`SIGEV_THREAD_ID`) with
/// the interrupt signal, created disarmed.
fn thread_timer(sig: libc::c_int) -> io::Result<libc::timer_t> {
    // SAFETY: sigevent has private padding, so it is built from zeroes
    // (a valid bit pattern for this C struct) and the fields set below.
    let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
    sev.sigev_notify = libc::SIGEV_THREAD_ID;
    sev.sigev_signo = sig;
    // SAFETY: gettid has no preconditions.
    sev.sigev_notify_thread_id = unsafe { libc::gettid() };
    let mut timer: libc::timer_t = ptr::null_mut();
    // SAFETY: `sev` and `timer` are valid for reads and writes.
    if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut timer) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(timer)
}

/// Starts `timer`: first expiry after `after` (at least 1 ns), then every
/// millisecond.
fn start(timer: libc::timer_t, after: Duration) -> io::Result<()> {
    let spec = libc::itimerspec {
        it_value: timespec(after.max(Duration::from_nanos(1))),
        it_interval: timespec(Duration::from_millis(1)),
    };
    // SAFETY: callers pass a timer created by `thread_timer` and not yet
    // deleted; `spec` is valid for reads.
    if unsafe { libc::timer_settime(timer, 0, &spec, ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A per-thread timer that interrupts this thread's blocking system calls
/// from its deadline on, until dropped.
pub struct Interrupter {
    timer: libc::timer_t,
    old_mask: libc::sigset_t,
}

fn timespec(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: d.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    }
}

impl Interrupter {
    /// Arms a timer that signals this thread after `after` (at least 1 ns)
    /// and then every millisecond.
    pub fn arm(after: Duration) -> io::Result<Interrupter> {
        let sig = interrupt_signal()?;
        let timer = thread_timer(sig)?;
        // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut old_mask: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t; `sig` is a valid signal number.
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
        }
        // SAFETY: both pointers are valid; this only changes this thread's mask.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, &mut old_mask) };
        let me = Interrupter { timer, old_mask };
        start(me.timer, after)?;
        Ok(me)
    }
}

impl Drop for Interrupter {
    fn drop(&mut self) {
        // SAFETY: the timer is live (created in `arm`) and deleted once here;
        // the saved mask is a valid sigset_t produced by pthread_sigmask.
        unsafe {
            libc::timer_delete(self.timer);
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.old_mask, ptr::null_mut());
        }
    }
}

// ----- cancellation of a waiter thread's wait -------------------------------
//
// An async acquisition (`crate::aio`) that cannot be granted at once runs the
// blocking acquisition on a waiter thread. Dropping its future cancels the
// wait: the flag below (installed in the waiter thread) makes every `Wait`
// report its deadline as passed and `block_until` give up, and a
// [`CancelTimer`] interrupts the blocked system call (fcntl/flock, futex,
// poll) with the same do-nothing signal as a deadline, repeating every
// millisecond until the thread has left the call.

thread_local! {
    static CANCEL: RefCell<Option<Arc<AtomicBool>>> = const { RefCell::new(None) };
}

/// Installs (or, with `None`, removes) this thread's cancellation flag.
pub fn set_cancel_flag(flag: Option<Arc<AtomicBool>>) {
    let _ = CANCEL.try_with(|c| *c.borrow_mut() = flag);
}

/// Whether this thread's wait was cancelled (always false outside a waiter
/// thread), or ended by a signal (see [`set_signals_end_waits`]).
pub fn cancelled() -> bool {
    if SIGNALS.try_with(Cell::get) == Ok(SIGNAL_CAME) {
        return true;
    }
    CANCEL
        .try_with(|c| {
            c.borrow()
                .as_ref()
                .is_some_and(|f| f.load(Ordering::Acquire))
        })
        .unwrap_or(false)
}

// ----- waits that a signal ends ---------------------------------------------
//
// A program whose signal handlers are installed without SA_RESTART (Python's
// SIGINT handler, for one) sees a blocking system call return EINTR when a
// signal arrives. Normally the waits here restart after it. A thread that
// asks for it instead has its wait end there: from the first EINTR on, every
// `Wait` counts as expired (as in a cancelled waiter), so each family gives
// back what it took and reports a time-out; the caller then runs its signal
// handlers and, if it wants, waits again with its deadline.

const SIGNALS_OFF: u8 = 0;
const SIGNALS_ARMED: u8 = 1;
const SIGNAL_CAME: u8 = 2;

thread_local! {
    static SIGNALS: Cell<u8> = const { Cell::new(SIGNALS_OFF) };
}

/// While `on`, a signal that interrupts one of this thread's blocking calls
/// ends the thread's wait (see above); turning it on or off forgets an
/// earlier signal.
pub fn set_signals_end_waits(on: bool) {
    let _ = SIGNALS.try_with(|c| c.set(if on { SIGNALS_ARMED } else { SIGNALS_OFF }));
}

/// Whether a signal ended this thread's wait since
/// [`set_signals_end_waits`] turned the rule on.
pub fn signal_came() -> bool {
    SIGNALS.try_with(Cell::get) == Ok(SIGNAL_CAME)
}

/// A blocking call of this thread returned EINTR.
pub fn note_signal() {
    let _ = SIGNALS.try_with(|c| {
        if c.get() == SIGNALS_ARMED {
            c.set(SIGNAL_CAME);
        }
    });
}

/// A timer that interrupts the blocking calls of the thread that made it,
/// from [`CancelTimer::fire`] (called from any thread) on, every millisecond,
/// until dropped. Making it also unblocks the interrupt signal in the calling
/// thread for good, so it is for threads the library owns.
pub struct CancelTimer {
    timer: libc::timer_t,
}

// SAFETY: a timer_t names a process-wide timer (an id in the kernel); any
// thread may arm or delete it. The one deletion is in Drop (`&mut self`).
unsafe impl Send for CancelTimer {}
// SAFETY: as above; `fire` only arms the timer, which the kernel serialises.
unsafe impl Sync for CancelTimer {}

impl CancelTimer {
    /// A disarmed timer aimed at the calling thread.
    pub fn for_this_thread() -> io::Result<CancelTimer> {
        let sig = interrupt_signal()?;
        // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t; `sig` is a valid signal number.
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
        }
        // SAFETY: `set` is valid; this only changes this thread's mask.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, ptr::null_mut()) };
        Ok(CancelTimer {
            timer: thread_timer(sig)?,
        })
    }

    /// Interrupts the thread's blocking calls now and every millisecond after.
    pub fn fire(&self) -> io::Result<()> {
        start(self.timer, Duration::from_nanos(1))
    }

    /// Stops the interrupts (a signal already generated is delivered into
    /// the empty handler).
    pub fn disarm(&self) -> io::Result<()> {
        let zero = libc::itimerspec {
            it_value: timespec(Duration::ZERO),
            it_interval: timespec(Duration::ZERO),
        };
        // SAFETY: the timer is live until drop; `zero` is valid for reads.
        if unsafe { libc::timer_settime(self.timer, 0, &zero, ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for CancelTimer {
    fn drop(&mut self) {
        // SAFETY: the timer is live (created in `for_this_thread`) and
        // deleted once here. A signal it generated before is delivered into
        // the empty handler.
        unsafe { libc::timer_delete(self.timer) };
    }
}

/// This host's CLOCK_MONOTONIC in nanoseconds: the same clock in every
/// process of the host (in one time namespace), unlike an `Instant`'s
/// private representation, so it can be compared through shared memory.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer on this frame; CLOCK_MONOTONIC
    // always exists on Linux, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Runs the blocking call `f` until it succeeds, fails with something other
/// than EINTR, `deadline` passes or this thread's wait is cancelled (then
/// `Ok(None)`). With no deadline it restarts `f` after stray signals.
pub fn block_until<T>(
    deadline: Option<Instant>,
    mut f: impl FnMut() -> io::Result<T>,
) -> io::Result<Option<T>> {
    let _timer = match deadline {
        None => None,
        Some(t) => {
            let left = t.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            Some(Interrupter::arm(left)?)
        }
    };
    loop {
        match f() {
            Ok(v) => return Ok(Some(v)),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {
                note_signal();
                if cancelled() || deadline.is_some_and(|t| Instant::now() >= t) {
                    return Ok(None);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Runs the blocking call `f`, restarting it after any signal, until it
/// succeeds or fails otherwise: for a wait that must not be given up (say,
/// taking back a lock the kernel dropped), even in a cancelled waiter.
pub fn block_restarting<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fcntl::{ofd_try, ofd_wait, ByteRange, RangeLock};
    use std::fs::OpenOptions;
    use std::os::fd::AsFd;

    #[test]
    fn timed_blocking_call_returns_at_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l");
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&p)
                .unwrap()
        };
        let (a, b) = (open(), open());
        let r = ByteRange { start: 0, len: 1 };
        assert!(ofd_try(a.as_fd(), RangeLock::Write, r).unwrap());
        let start = Instant::now();
        let deadline = start + Duration::from_millis(30);
        let got = block_until(Some(deadline), || ofd_wait(b.as_fd(), RangeLock::Write, r)).unwrap();
        assert!(got.is_none());
        let now = Instant::now();
        assert!(now >= deadline);
        // A generous bound that only catches a hang, not a performance goal.
        assert!(now - start < Duration::from_secs(5), "{:?}", now - start);
        // Many back-to-back timed waits: the timer is torn down each time
        // and no stray signal escapes into later calls.
        for _ in 0..50 {
            let d = Instant::now() + Duration::from_micros(200);
            assert!(
                block_until(Some(d), || ofd_wait(b.as_fd(), RangeLock::Write, r))
                    .unwrap()
                    .is_none()
            );
        }
        assert!(ofd_try(a.as_fd(), RangeLock::Unlock, r).unwrap());
        let got = block_until(Some(Instant::now() + Duration::from_secs(5)), || {
            ofd_wait(b.as_fd(), RangeLock::Write, r)
        })
        .unwrap();
        assert!(got.is_some());
    }

    #[test]
    fn past_deadline_does_not_call() {
        let mut called = false;
        let r: Option<()> = block_until(Some(Instant::now()), || {
            called = true;
            Ok(())
        })
        .unwrap();
        assert!(r.is_none() && !called);
    }
}
