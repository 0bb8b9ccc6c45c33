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
    timer: Option<Arc<CancelTimer>>,
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
    pool::run(Box::new(move |t: &Option<Arc<CancelTimer>>| {
        run(&mine, &mut attempt, wait, t)
    }))?;
    Ok(job)
}

/// One acquisition on a waiter thread, with that thread's cancel timer.
fn run<G: Send + 'static>(
    job: &Arc<Job<G>>,
    attempt: &mut Attempt<G>,
    wait: Wait,
    t: &Option<Arc<CancelTimer>>,
) {
    {
        let mut st = job.st.lock();
        if st.dropped {
            st.finished = true;
            return;
        }
        st.timer = t.clone();
    }
    BUSY.fetch_add(1, Ordering::SeqCst);
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
    st.timer = None;
    if st.dropped {
        drop(st);
        // Disarmed before anything is released, so that no call of the
        // release (nor the thread's next wait) is interrupted.
        if let Some(t) = t {
            let _ = t.disarm();
        }
        drop(r);
        BUSY.fetch_sub(1, Ordering::SeqCst);
        return;
    }
    st.result = Some(r);
    let w = st.waker.take();
    drop(st);
    BUSY.fetch_sub(1, Ordering::SeqCst);
    if let Some(w) = w {
        w.wake();
    }
}

/// How many waiter threads are inside an acquisition now (for tests).
static BUSY: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The number of async acquisitions whose waiter is inside the family's
/// blocking call (or releasing what it got after a cancellation). Not a
/// stable API.
#[doc(hidden)]
pub fn busy_waiters() -> usize {
    BUSY.load(Ordering::SeqCst)
}

/// The waiter threads: started on demand, each with its own cancel timer,
/// kept idle for a while after a wait (a thread's start costs about as much
/// as a wake under load, so a contended acquisition reuses one).
mod pool {
    use super::{CancelTimer, Condvar, Mutex, WAITER_STACK};
    use crate::sys::fork::{generation, watch};
    use std::sync::Arc;
    use std::time::Duration;

    pub(super) type Task = Box<dyn FnOnce(&Option<Arc<CancelTimer>>) + Send>;

    /// Idle threads kept at most; more end after their wait.
    const KEEP: usize = 8;
    /// An idle thread ends after this long without work (one timed wait,
    /// not a period).
    const IDLE: Duration = Duration::from_secs(10);

    struct Worker {
        task: Mutex<Option<Task>>,
        cv: Condvar,
    }

    /// The idle workers, and the fork generation they belong to: a forked
    /// child has none of its parent's threads, so it forgets the list.
    static IDLE_WORKERS: Mutex<(u64, Vec<Arc<Worker>>)> = Mutex::new((0, Vec::new()));

    fn idle(l: &mut (u64, Vec<Arc<Worker>>)) -> &mut Vec<Arc<Worker>> {
        let now = generation();
        if l.0 != now {
            l.0 = now;
            l.1.clear();
        }
        &mut l.1
    }

    /// How many waiter threads idle now.
    #[cfg(test)]
    pub(super) fn idle_count() -> usize {
        idle(&mut IDLE_WORKERS.lock()).len()
    }

    /// Runs `task` on an idle waiter thread, or a new one.
    pub(super) fn run(task: Task) -> std::io::Result<()> {
        watch();
        // Popped in a statement of its own: the list's lock is not held
        // while taking the worker's (the worker takes them the other way).
        let ready = idle(&mut IDLE_WORKERS.lock()).pop();
        if let Some(w) = ready {
            *w.task.lock() = Some(task);
            w.cv.notify_one();
            return Ok(());
        }
        let w = Arc::new(Worker {
            task: Mutex::new(Some(task)),
            cv: Condvar::new(),
        });
        std::thread::Builder::new()
            .name("interlock-wait".into())
            .stack_size(WAITER_STACK)
            .spawn(move || work(&w))
            .map(drop)
    }

    fn work(me: &Arc<Worker>) {
        // Without a timer (the kernel's limit reached) cancellation still
        // sets the flag; the wait then ends when the lock comes free or at
        // its deadline, and what it got is released at once.
        let timer = CancelTimer::for_this_thread().ok().map(Arc::new);
        loop {
            let task = me.task.lock().take();
            if let Some(task) = task {
                task(&timer);
            }
            {
                let mut list = IDLE_WORKERS.lock();
                let list = idle(&mut list);
                if list.len() >= KEEP {
                    return;
                }
                list.push(Arc::clone(me));
            }
            let mut slot = me.task.lock();
            while slot.is_none() {
                if me.cv.wait_for(&mut slot, IDLE).timed_out() && slot.is_none() {
                    // Still listed as idle: leave. Taken off the list
                    // meanwhile: a task is on its way; wait for it.
                    let mut list = IDLE_WORKERS.lock();
                    let list = idle(&mut list);
                    if let Some(i) = list.iter().position(|w| Arc::ptr_eq(w, me)) {
                        list.swap_remove(i);
                        return;
                    }
                }
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use crate::sys::fork::{fork_run, wait_child};
    use crate::FileLock;
    use std::future::Future;
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake, Waker};
    use std::time::{Duration, Instant};

    struct Unpark(std::thread::Thread);

    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }

    /// Polls to completion, or `None` after `limit`.
    fn block_on_within<F: Future>(f: F, limit: Duration) -> Option<F::Output> {
        let mut f = std::pin::pin!(f);
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let end = Instant::now() + limit;
        loop {
            if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return Some(v);
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            std::thread::park_timeout(left);
        }
    }

    /// One contended async acquisition: `a` holds, `b` waits, a thread
    /// releases `a` soon after.
    fn contended(dir: &std::path::Path) -> bool {
        let p = dir.join("l");
        let a = FileLock::open(&p).unwrap();
        let b = Arc::new(FileLock::open(&p).unwrap());
        let g = a.write_arc_for_test();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            drop(g);
        });
        let got = block_on_within(b.write_async(), Duration::from_secs(10));
        release.join().unwrap();
        matches!(got, Some(Ok(_)))
    }

    impl FileLock {
        fn write_arc_for_test(self) -> crate::FileWriteGuard<'static> {
            Arc::new(self).write_arc(crate::Wait::Forever).unwrap()
        }
    }

    /// A forked child has none of its parent's idle waiter threads: it
    /// starts its own rather than handing its wait to a ghost.
    #[test]
    fn a_forked_child_starts_its_own_waiters() {
        let dir = tempfile::tempdir().unwrap();
        // The parent's waiter goes idle in the pool.
        assert!(contended(dir.path()));
        let end = Instant::now() + Duration::from_secs(10);
        while super::pool::idle_count() == 0 {
            assert!(Instant::now() < end, "the waiter never went idle");
            std::thread::sleep(Duration::from_millis(1));
        }
        let d = dir.path().to_path_buf();
        let pid = fork_run(move || if contended(&d) { 0 } else { 1 }).unwrap();
        assert_eq!(wait_child(pid).unwrap(), 0);
    }
}
