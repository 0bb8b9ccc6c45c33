//! Async acquisition for every family: a future that tries on the caller's
//! thread, and otherwise hands the blocking wait to a waiter thread.
//!
//! Why it is built this way: the waits interlock makes are kernel waits
//! (`F_OFD_SETLKW`, `flock`, `FUTEX_WAIT`, `poll` on inotify and pidfds, a
//! PostgreSQL statement), and none of them can be registered with an
//! executor's reactor: a lock release signals no descriptor. So a future
//! that must wait gives the blocking acquisition, as written once for the
//! blocking API, to a thread of its own, which sleeps in the kernel (no
//! polling, no CPU while blocked) and completes a one-shot that wakes the
//! task through its std `Waker`. The library needs no runtime, and the
//! uncontended path makes no thread hop: the first poll is a `try_*`.
//!
//! Cancellation: dropping the future sets the waiter's flag (every `Wait`
//! then reports its deadline as passed, see `sys::timer::cancelled`) and
//! interrupts its system call with a thread-directed signal repeated every
//! millisecond until the thread leaves the call; a family whose wait no
//! signal reaches (PostgreSQL) registers its own cancel (`on_cancel`).
//! Whatever the waiter gets after the drop, it releases at once, on its own
//! thread. See docs/design-async.md.

mod families;

use crate::sys::timer::{self, CancelTimer};
use crate::{Error, TryLockError, Wait};
use parking_lot::{Condvar, Mutex};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

/// The blocking acquisition a future runs: called once with
/// `Wait::NonBlocking` on the polling thread, then (if that would block)
/// once with the caller's wait on the waiter thread.
type Attempt<G> = Box<dyn FnMut(Wait) -> Result<G, TryLockError> + Send>;

/// The stack of a waiter thread: the blocking acquisitions are shallow,
/// except PostgreSQL's client, which runs its runtime on the thread.
const WAITER_STACK: usize = 256 * 1024;

/// A pending acquisition, resolved to the same owned guard the blocking
/// `*_arc` call returns. `Send` (when the guard is) and `Unpin`; it does
/// nothing until polled.
///
/// The first poll tries to acquire without blocking, on the polling thread.
/// If the lock is taken, one waiter thread makes the blocking call and
/// wakes the task when it returns. Dropping the future cancels the wait
/// and leaves nothing held: a lock the waiter obtains after the drop is
/// released at once.
///
/// `E` is [`Error`] for waits without deadline (`read_async`) and
/// [`TryLockError`] for timed ones (`read_async_for`).
#[must_use = "futures do nothing unless polled"]
pub struct Acquire<G: Send + 'static, E = Error> {
    stage: Stage<G>,
    map: fn(TryLockError) -> E,
}

enum Stage<G> {
    Start { attempt: Attempt<G>, wait: Wait },
    Waiting(Arc<Job<G>>),
    Done,
}

struct Job<G> {
    /// Read by the waiter thread's `Wait`s and `block_until`.
    cancel: Arc<AtomicBool>,
    st: Mutex<JobState<G>>,
    /// Told when the waiter returns (for a family's repeated cancel).
    done: Condvar,
}

/// What the waiter's attempt gave: its result, or its panic (say, an
/// on-block callback's), which the future re-raises.
type Outcome<G> = std::thread::Result<Result<G, TryLockError>>;

struct JobState<G> {
    result: Option<Outcome<G>>,
    waker: Option<Waker>,
    /// The future is gone: the waiter drops what it gets.
    dropped: bool,
    /// The waiter returned from its acquisition.
    finished: bool,
    /// Interrupts the waiter's system call (while it may be in one).
    timer: Option<CancelTimer>,
    /// A family's own cancel (a PostgreSQL cancel request), while the
    /// waiter is in the wait it cancels.
    hook: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl<G: Send + 'static, E> Acquire<G, E> {
    /// An acquisition that runs `attempt` as described on [`Acquire`].
    pub(crate) fn new(
        wait: Wait,
        map: fn(TryLockError) -> E,
        attempt: impl FnMut(Wait) -> Result<G, TryLockError> + Send + 'static,
    ) -> Self {
        Acquire {
            stage: Stage::Start {
                attempt: Box::new(attempt),
                wait,
            },
            map,
        }
    }
}

/// For waits without deadline: only an error can end them.
pub(crate) fn forever(e: TryLockError) -> Error {
    e.into()
}

/// For timed waits: the error as the `try_*_for` calls give it.
pub(crate) fn timed(e: TryLockError) -> TryLockError {
    e
}

impl<G: Send + 'static, E> Future for Acquire<G, E> {
    type Output = Result<G, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let map = this.map;
        match std::mem::replace(&mut this.stage, Stage::Done) {
            Stage::Start { mut attempt, wait } => match attempt(Wait::NonBlocking) {
                Err(TryLockError::WouldBlock) if wait.may_block() && !wait.expired() => {
                    match spawn(attempt, wait, cx.waker().clone()) {
                        Ok(job) => {
                            this.stage = Stage::Waiting(job);
                            Poll::Pending
                        }
                        Err(e) => {
                            Poll::Ready(Err(map(
                                Error::io("start an async waiter thread", e).into()
                            )))
                        }
                    }
                }
                Err(TryLockError::WouldBlock) => Poll::Ready(Err(map(wait.gave_up()))),
                r => Poll::Ready(r.map_err(map)),
            },
            Stage::Waiting(job) => {
                let mut st = job.st.lock();
                if let Some(r) = st.result.take() {
                    drop(st);
                    return match r {
                        Ok(r) => Poll::Ready(r.map_err(map)),
                        Err(panic) => std::panic::resume_unwind(panic),
                    };
                }
                match &st.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => st.waker = Some(cx.waker().clone()),
                }
                drop(st);
                this.stage = Stage::Waiting(job);
                Poll::Pending
            }
            Stage::Done => panic!("an interlock Acquire future was polled after it completed"),
        }
    }
}

impl<G: Send + 'static, E> Drop for Acquire<G, E> {
    fn drop(&mut self) {
        let Stage::Waiting(job) = &self.stage else {
            return;
        };
        let mut st = job.st.lock();
        // Delivered but not taken: release here, now.
        let got = st.result.take();
        if !st.finished {
            st.dropped = true;
            job.cancel.store(true, Ordering::Release);
            if let Some(t) = &st.timer {
                // Fails only if the kernel is out of timers; the waiter then
                // finishes its wait and releases what it got.
                let _ = t.fire();
            }
            if let Some(h) = st.hook.clone() {
                let job = Arc::clone(job);
                drop(st);
                cancel_with_hook(job, h);
                drop(got);
                return;
            }
        }
        drop(st);
        drop(got);
    }
}

impl<G: Send + 'static, E> fmt::Debug for Acquire<G, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stage = match &self.stage {
            Stage::Start { .. } => "not polled",
            Stage::Waiting(_) => "waiting",
            Stage::Done => "done",
        };
        f.debug_struct("Acquire").field("stage", &stage).finish()
    }
}

fn spawn<G: Send + 'static>(
    mut attempt: Attempt<G>,
    wait: Wait,
    waker: Waker,
) -> std::io::Result<Arc<Job<G>>> {
    let job = Arc::new(Job {
        cancel: Arc::new(AtomicBool::new(false)),
        st: Mutex::new(JobState {
            result: None,
            waker: Some(waker),
            dropped: false,
            finished: false,
            timer: None,
            hook: None,
        }),
        done: Condvar::new(),
    });
    let mine = Arc::clone(&job);
    std::thread::Builder::new()
        .name("interlock-wait".into())
        .stack_size(WAITER_STACK)
        .spawn(move || run(&mine, &mut attempt, wait))?;
    Ok(job)
}

/// The waiter thread.
fn run<G: Send + 'static>(job: &Arc<Job<G>>, attempt: &mut Attempt<G>, wait: Wait) {
    // Without a timer (the kernel's limit reached) cancellation still sets
    // the flag; the wait then ends when the lock comes free or at its
    // deadline, and what it got is released at once.
    let t = CancelTimer::for_this_thread().ok();
    {
        let mut st = job.st.lock();
        if st.dropped {
            st.finished = true;
            return;
        }
        st.timer = t;
    }
    timer::set_cancel_flag(Some(Arc::clone(&job.cancel)));
    CURRENT.with(|c| *c.borrow_mut() = Some(Arc::clone(job) as Arc<dyn Hooks>));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| attempt(wait)));
    CURRENT.with(|c| *c.borrow_mut() = None);
    timer::set_cancel_flag(None);
    let mut st = job.st.lock();
    st.finished = true;
    st.hook = None;
    job.done.notify_all();
    // Once `finished` is set the drop fires the timer no more.
    let timer = st.timer.take();
    if st.dropped {
        drop(st);
        // Disarmed before anything is released, so that no call of the
        // release is interrupted.
        drop(timer);
        drop(r);
        return;
    }
    st.result = Some(r);
    let w = st.waker.take();
    drop(st);
    if let Some(w) = w {
        w.wake();
    }
    // Deleted after the wake: it is off the wake's path.
    drop(timer);
}

// ----- a family's own cancel ---------------------------------------------

/// What a family's wait sees of the job it runs in.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
trait Hooks: Send + Sync {
    fn set_hook(&self, hook: Option<Arc<dyn Fn() + Send + Sync>>);
}

impl<G: Send> Hooks for Job<G> {
    fn set_hook(&self, hook: Option<Arc<dyn Fn() + Send + Sync>>) {
        self.st.lock().hook = hook;
    }
}

thread_local! {
    static CURRENT: std::cell::RefCell<Option<Arc<dyn Hooks>>> =
        const { std::cell::RefCell::new(None) };
}

/// While the returned value lives, a cancellation of this thread's async
/// acquisition also calls the hook `make` builds (on a thread of its own:
/// it may block), again at growing intervals until the acquisition has
/// returned, since a cancel that lands before the wait begins cancels
/// nothing. Outside a waiter thread `make` is not called. Check
/// `Wait::expired` after installing it: a cancellation before it is seen
/// there.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) fn on_cancel(make: impl FnOnce() -> Arc<dyn Fn() + Send + Sync>) -> OnCancel {
    let job = CURRENT.with(|c| c.borrow().clone());
    if let Some(j) = &job {
        j.set_hook(Some(make()));
    }
    OnCancel(job)
}

/// No hook (for symmetry at call sites).
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) fn on_cancel_none() -> OnCancel {
    OnCancel(None)
}

/// Removes the hook of [`on_cancel`] when dropped.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) struct OnCancel(Option<Arc<dyn Hooks>>);

impl Drop for OnCancel {
    fn drop(&mut self) {
        if let Some(j) = &self.0 {
            j.set_hook(None);
        }
    }
}

fn cancel_with_hook<G: Send + 'static>(job: Arc<Job<G>>, hook: Arc<dyn Fn() + Send + Sync>) {
    let go = move || {
        let mut pause = std::time::Duration::from_millis(2);
        for _ in 0..16 {
            hook();
            let mut st = job.st.lock();
            if !st.finished {
                job.done.wait_for(&mut st, pause);
            }
            if st.finished {
                return;
            }
            pause = (pause * 2).min(std::time::Duration::from_secs(1));
        }
    };
    // If no thread can be made, the waiter finishes its wait and releases
    // what it got.
    let _ = std::thread::Builder::new()
        .name("interlock-cancel".into())
        .stack_size(WAITER_STACK)
        .spawn(go);
}
