//! asyncio acquisitions: the crate's cancel-safe futures (`interlock::Acquire`,
//! `read_async` and friends), driven from an asyncio event loop.
//!
//! Why it is built this way: a lock release makes no descriptor readable, so
//! the crate's future waits on a waiter thread of its own pool, in the kernel,
//! and wakes the task through a std `Waker` (docs/design-async.md). Here that
//! waker writes one byte to a socket pair whose other end the event loop
//! watches (`loop.add_reader`), so the loop sleeps in its selector until the
//! wait is over: no polling, no Python thread, and the waiter thread never
//! takes the GIL (it may wake the loop while the interpreter is finalizing).
//! The Python side (`interlock._aio`) polls the future again when the loop
//! sees the byte. Cancelling the asyncio task drops the future
//! ([`AsyncWait::cancel`]), which the crate turns into a cancelled wait: the
//! waiter's call is interrupted and leaves through its time-out path, and a
//! grant that raced the cancel is released at once. So a cancelled
//! acquisition ends its wait (and its thread goes back to the pool) while the
//! lock stays held by someone else.
//!
//! A granted hold is recorded as a blocking acquisition's is (per holder, the
//! asyncio task): the family's finish step hands the obtained crate guard to
//! the same `hold::acquire_shared` (or `acquire_custom`) path, as if its try
//! had just taken it.

use crate::errors;
use crate::hold::{Guard, Held};
use interlock::{Acquire, TryLockError, Wait};
use parking_lot::Mutex;
use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use std::future::Future;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Instant;

/// An acquisition in flight: resolves to the crate guard (and whether it came
/// poisoned by a dead writer).
pub(crate) type Fut = Pin<Box<dyn Future<Output = Result<(Held, bool), TryLockError>> + Send>>;

/// What turns the future's result into the Python guard: records the hold
/// for the calling holder (task) and maps errors to exceptions.
pub(crate) type Finish =
    Box<dyn FnOnce(Python<'_>, Result<(Held, bool), TryLockError>) -> PyResult<Py<Guard>> + Send>;

/// The future of one family's async form, `forever` for a wait without
/// deadline, `until` otherwise (a zero wait is a deadline now).
pub(crate) fn future<G: Send + 'static>(
    wait: Wait,
    forever: impl FnOnce() -> Acquire<G>,
    until: impl FnOnce(Instant) -> Acquire<G, TryLockError>,
    held: fn(G) -> (Held, bool),
) -> Fut {
    match wait {
        Wait::Forever => {
            let f = forever();
            Box::pin(async move { f.await.map(held).map_err(TryLockError::Error) })
        }
        Wait::Until(t) => {
            let f = until(t);
            Box::pin(async move { f.await.map(held) })
        }
        Wait::NonBlocking => {
            let f = until(Instant::now());
            Box::pin(async move { f.await.map(held) })
        }
    }
}

/// An attempt that "takes" a hold obtained already (by the future): the
/// finish step passes it to the record's acquisition path, which then
/// records it exactly as a try's. Called more than once it would block.
pub(crate) fn given(
    h: (Held, bool),
) -> impl Fn(Wait) -> Result<(Held, bool), TryLockError> + Send + Sync + 'static {
    let cell = Mutex::new(Some(h));
    move |_| cell.lock().take().ok_or(TryLockError::WouldBlock)
}

/// The finish step of a family whose holds are shared records: the
/// future's outcome `r` (an error raised as the family's error, naming
/// `req.path`), else the hold it got recorded through `holds` as a try's
/// would be, and its guard.
pub(crate) fn record_shared(
    py: Python<'_>,
    holds: &crate::hold::Holds,
    req: crate::hold::Request<'_>,
    r: Result<(Held, bool), TryLockError>,
) -> PyResult<Py<Guard>> {
    let h = r.map_err(|e| raise(py, &e, req.path, req.what))?;
    let path = req.path;
    let s = crate::hold::acquire_shared(py, holds, req, Wait::NonBlocking, given(h))?;
    crate::hold::into_guard(py, path, s)
}

/// The waker: one byte to a socket the event loop watches. Both ends live
/// as long as any waker (the crate's waiter may wake after the Python
/// object is gone: the byte then goes nowhere, and no write fails).
struct Ring {
    tx: UnixStream,
    rx: UnixStream,
}

impl Wake for Ring {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Non-blocking: a full buffer means a byte is there already.
        let _ = (&self.tx).write(&[1]);
    }
}

struct State {
    fut: Option<Fut>,
    finish: Option<Finish>,
}

/// `_native.AsyncWait`: one pending acquisition for `interlock._aio`.
/// `poll()` gives the Guard once granted (None until then: wait for
/// `fileno()` to become readable, then poll again); `cancel()` gives up,
/// leaving nothing held.
#[pyclass(module = "interlock._native", name = "AsyncWait", frozen)]
pub(crate) struct AsyncWait {
    st: Mutex<State>,
    ring: Arc<Ring>,
    gen: u64,
}

impl AsyncWait {
    pub(crate) fn new(fut: Fut, finish: Finish) -> PyResult<AsyncWait> {
        let (tx, rx) = UnixStream::pair()
            .and_then(|(tx, rx)| {
                tx.set_nonblocking(true)?;
                rx.set_nonblocking(true)?;
                Ok((tx, rx))
            })
            .map_err(|e| PyRuntimeError::new_err(format!("async wait: socket pair: {e}")))?;
        Ok(AsyncWait {
            st: Mutex::new(State {
                fut: Some(fut),
                finish: Some(finish),
            }),
            ring: Arc::new(Ring { tx, rx }),
            gen: crate::hold::generation(),
        })
    }
}

impl Drop for AsyncWait {
    fn drop(&mut self) {
        let fut = self.st.get_mut().fut.take();
        if self.gen != crate::hold::generation() {
            // A forked child's copy: what the parent's waiter got is the
            // parent's to release.
            std::mem::forget(fut);
        }
        // Otherwise dropping it cancels the wait (the crate's drop).
    }
}

#[pymethods]
impl AsyncWait {
    /// The descriptor that becomes readable when the wait may be over.
    fn fileno(&self) -> i32 {
        self.ring.rx.as_raw_fd()
    }

    /// Drives the acquisition: the Guard once granted, None while it waits
    /// (the first call starts the wait). Errors (Timeout, ...) are raised.
    fn poll(&self, py: Python<'_>) -> PyResult<Option<Py<Guard>>> {
        let mut buf = [0u8; 64];
        while matches!((&self.ring.rx).read(&mut buf), Ok(n) if n > 0) {}
        let Some(mut fut) = self.st.lock().fut.take() else {
            return Err(PyRuntimeError::new_err(
                "an interlock async wait was polled after it ended",
            ));
        };
        let waker = Waker::from(Arc::clone(&self.ring));
        let (fut, polled) = py.detach(move || {
            let mut cx = Context::from_waker(&waker);
            let p = fut.as_mut().poll(&mut cx);
            (fut, p)
        });
        match polled {
            Poll::Pending => {
                self.st.lock().fut = Some(fut);
                Ok(None)
            }
            Poll::Ready(r) => {
                drop(fut);
                let finish = self.st.lock().finish.take();
                match finish {
                    Some(f) => f(py, r).map(Some),
                    None => Err(PyRuntimeError::new_err(
                        "an interlock async wait was finished twice",
                    )),
                }
            }
        }
    }

    /// Gives up: drops the crate's future, which ends the waiter's wait and
    /// releases whatever it obtained and did not hand over. Idempotent.
    fn cancel(&self, py: Python<'_>) {
        let (fut, finish) = {
            let mut st = self.st.lock();
            (st.fut.take(), st.finish.take())
        };
        if let Some(f) = fut {
            py.detach(move || drop(f));
        }
        drop(finish);
    }
}

/// `_native._async_wait(lock, kind, timeout, *args)`: the pending async
/// acquisition `kind` of `lock` (after its try failed), for
/// `interlock._aio`. `kind`: "read", "write", "upgradable_read" (FileLock,
/// ShmRwLock, PgLock), "lock" (ShmMutex, LeaseLock, PgMutex), "scope"
/// (LockSet: start, end, shared), "permits" (semaphores: n).
#[pyfunction]
#[pyo3(signature = (lock, kind, timeout, *args))]
pub(crate) fn _async_wait(
    lock: &Bound<'_, PyAny>,
    kind: &str,
    timeout: Option<f64>,
    args: &Bound<'_, PyTuple>,
) -> PyResult<AsyncWait> {
    let wait = crate::wait::wait_of(true, timeout)?;
    if let Ok(l) = lock.cast::<crate::file::PyFileLock>() {
        return crate::file::PyFileLock::async_wait(l, kind, wait);
    }
    if let Ok(l) = lock.cast::<crate::shm::PyShmRwLock>() {
        return crate::shm::PyShmRwLock::async_wait(l, kind, wait);
    }
    if let Ok(l) = lock.cast::<crate::shm::PyShmMutex>() {
        return crate::shm::PyShmMutex::async_wait(l, wait);
    }
    if let Ok(l) = lock.cast::<crate::lease::PyLeaseLock>() {
        return crate::lease::PyLeaseLock::async_wait(l, wait);
    }
    if let Ok(l) = lock.cast::<crate::set::PyLockSet>() {
        let (start, end, shared): (u64, u64, bool) = args.extract()?;
        return crate::set::PyLockSet::async_wait(l, start, end, shared, wait);
    }
    if let Ok(l) = lock.cast::<crate::sem::PySemaphore>() {
        let (n,): (i64,) = args.extract()?;
        return crate::sem::PySemaphore::async_wait(l, n, wait);
    }
    if let Ok(l) = lock.cast::<crate::sem::PyFileSemaphore>() {
        let (n,): (i64,) = args.extract()?;
        return crate::sem::PyFileSemaphore::async_wait(l, n, wait);
    }
    if let Ok(l) = lock.cast::<crate::pg::PyPgLock>() {
        return crate::pg::PyPgLock::async_wait(l, kind, wait);
    }
    if let Ok(l) = lock.cast::<crate::pg::PyPgMutex>() {
        return crate::pg::PyPgMutex::async_wait(l, wait);
    }
    Err(PyTypeError::new_err(format!(
        "no async acquisition for {}",
        lock.get_type().name()?
    )))
}

/// `_native._busy_waiters()`: how many of the core's waiter threads are
/// inside an acquisition now, or releasing what a cancelled one got (for
/// tests: once 0 after a cancel, the cancelled acquisition's release is
/// done). Not a stable API.
#[pyfunction]
pub(crate) fn _busy_waiters() -> usize {
    interlock::__async::busy_waiters()
}

/// The error of an unknown `kind`.
pub(crate) fn bad_kind(kind: &str) -> PyErr {
    pyo3::exceptions::PyValueError::new_err(format!("no async acquisition {kind:?}"))
}

/// A failed acquisition as the blocking call raises it.
pub(crate) fn raise(py: Python<'_>, e: &TryLockError, path: &std::path::Path, what: &str) -> PyErr {
    errors::from_try(py, e, path, what)
}
