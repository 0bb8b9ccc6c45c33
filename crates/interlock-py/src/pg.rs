//! `PgLock` and `PgMutex`: locks held in a PostgreSQL server, with fencing
//! tokens and loss detection.
//!
//! Why it is built this way: the lock logic is the crate's
//! (`interlock::PgLock`); this file converts arguments, hands out the
//! crate's owned guards (`acquire_arc`) as [`Guard`] objects, and waits
//! without the GIL. Two things differ from the other families' waits:
//!
//! - Every call is a network round trip, so even the try runs without the
//!   GIL (nothing is tried with it held).
//! - A wait in the main thread must hear Ctrl-C, but it cannot be cut into
//!   slices of `lock_timeout` (each slice would leave the server's queue and
//!   rejoin it at the back, losing the waiter's FIFO place). So the main
//!   thread drives the crate's async acquisition (`write_async`: a try,
//!   then a waiter thread waiting in the server) and looks for signals
//!   every [`SLICE`] while it is pending; on `KeyboardInterrupt` it drops
//!   the future, which ends the server wait with a cancel request and
//!   releases a lock granted in the meantime, so nothing stays held.
//!
//! A thread that asks again for a PostgreSQL lock it holds (through any
//! object with the same settings and key) gets `AlreadyHeld` at once: the
//! crate would give it a second session, which would wait for the first
//! forever.

use crate::errors;
use crate::hold::{self, Guard, Held, Holds, Key, KeyState, Request};
use crate::wait::{in_main_thread, wait_of, wait_of_threading, SLICE};
use interlock::{Mode, PgGuard, PgKey, PgLock, PgOptions, TryLockError, Wait};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, UNIX_EPOCH};

/// The key from `name_or_key`: a str (a name), an int (a bigint key) or a
/// pair of ints (two int4 keys).
fn key_arg(k: &Bound<'_, PyAny>) -> PyResult<(PgKey, Option<String>)> {
    if let Ok(s) = k.extract::<String>() {
        if s.is_empty() {
            return Err(PyValueError::new_err("the lock name is empty"));
        }
        return Ok((PgKey::name(&s), Some(s)));
    }
    if k.is_instance_of::<pyo3::types::PyBool>() {
        return Err(PyTypeError::new_err(
            "name_or_key must be a str, an int or a pair of ints, not bool",
        ));
    }
    if let Ok(i) = k.extract::<i64>() {
        return Ok((PgKey::Int(i), None));
    }
    if let Ok((a, b)) = k.extract::<(i32, i32)>() {
        return Ok((PgKey::Pair(a, b), None));
    }
    if k.extract::<i128>().is_ok() {
        return Err(PyValueError::new_err(format!(
            "key {k} is out of range: a bigint key is a signed 64-bit integer"
        )));
    }
    Err(PyTypeError::new_err(format!(
        "name_or_key must be a str, an int or a pair of int4 ints, not {}",
        k.get_type().name()?
    )))
}

/// The lock both classes wrap.
struct Inner {
    lock: Arc<PgLock>,
    /// `pg:NAME` or `pg:key K`, for messages and `Guard.path`.
    what: Arc<Path>,
    name: Option<String>,
    key: Arc<KeyState>,
    holds: Holds,
    lease: f64,
}

impl Inner {
    fn open(
        py: Python<'_>,
        name_or_key: &Bound<'_, PyAny>,
        url: Option<String>,
        lease: f64,
        on_lost: Option<Py<PyAny>>,
    ) -> PyResult<Inner> {
        let (key, name) = key_arg(name_or_key)?;
        let d = Duration::try_from_secs_f64(lease)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                PyValueError::new_err(format!(
                    "lease must be a positive number of seconds, not {lease}"
                ))
            })?;
        let mut opts = PgOptions::new().lease(d);
        if let Some(u) = &url {
            opts = opts.url(u.clone());
        }
        if let Some(cb) = on_lost {
            opts = opts.on_lost(move |e| {
                let (cb, err) = Python::attach(|py| (cb.clone_ref(py), errors::from_error(py, e)));
                // Called on a thread of its own: the call that found the
                // loss may be `guard.check()`, which holds the guard's
                // lock, and the callback may well release that guard.
                let _ = std::thread::Builder::new()
                    .name("interlock-pg-on-lost".into())
                    .spawn(move || {
                        Python::attach(|py| {
                            if let Err(raised) = cb.call1(py, (err.into_value(py),)) {
                                raised.write_unraisable(py, None);
                            }
                        })
                    });
            });
        }
        let lock = py
            .detach(|| match &name {
                Some(n) => PgLock::with_options(n, opts),
                None => PgLock::with_key(key, opts),
            })
            .map_err(|e| errors::from_error(py, &e))?;
        let what: Arc<Path> = Path::new(lock.description()).into();
        Ok(Inner {
            key: hold::intern(Key::Pg(format!("{}|{key:?}", url.unwrap_or_default()))),
            lock: Arc::new(lock),
            what,
            name,
            holds: Holds::default(),
            lease,
        })
    }

    fn take_shared(&self, py: Python<'_>, mode: Mode, wait: Wait) -> PyResult<Arc<hold::Shared>> {
        let req = Request {
            key: Some(&self.key),
            reentrant: false,
            mode,
            path: &self.what,
            what: if mode == Mode::Shared {
                "shared lock"
            } else {
                "lock"
            },
            fast: crate::wait::Fast::Detach,
        };
        hold::acquire_custom(py, &self.holds, req, &self.key, wait, |py, w| {
            Ok(self.run(py, mode, w)?.map(|g| Held::Pg(Box::new(g))))
        })
    }

    /// The acquisition as `wait` allows, without the GIL; in the main
    /// thread a wait hears Ctrl-C (see the module documentation).
    fn run(
        &self,
        py: Python<'_>,
        mode: Mode,
        wait: Wait,
    ) -> PyResult<Result<PgGuard<'static>, TryLockError>> {
        let lock = &self.lock;
        let arc = |w: Wait| match mode {
            Mode::Shared => lock.read_arc(w),
            Mode::Exclusive => lock.write_arc(w),
        };
        if !wait.may_block() || !in_main_thread(py) {
            return Ok(py.detach(|| arc(wait)));
        }
        // The crate's async acquisition: its first poll tries (one round
        // trip), then a waiter thread waits in the server; dropping it
        // sends a cancel request and releases a grant that raced it.
        let fut: Pending = match (mode, wait) {
            (Mode::Shared, Wait::Until(t)) => Box::pin(lock.read_async_until(t)),
            (Mode::Exclusive, Wait::Until(t)) => Box::pin(lock.write_async_until(t)),
            (Mode::Shared, _) => Box::pin(forever(lock.read_async())),
            (Mode::Exclusive, _) => Box::pin(forever(lock.write_async())),
        };
        block_on_hearing_signals(py, fut)
    }

    fn take(&self, py: Python<'_>, mode: Mode, wait: Wait) -> PyResult<Py<Guard>> {
        let s = self.take_shared(py, mode, wait)?;
        hold::into_guard(py, &self.what, (s, false))
    }

    fn acquire(&self, py: Python<'_>, mode: Mode, wait: Wait) -> PyResult<bool> {
        let r = self.take_shared(py, mode, wait).map(|s| (s, false));
        hold::acquire_bool(py, &self.holds, &self.what, r)
    }

    fn enter(&self, py: Python<'_>) -> PyResult<()> {
        let s = self.take_shared(py, Mode::Exclusive, Wait::Forever)?;
        hold::enter(py, &self.holds, &self.what, (s, false))
    }

    fn holders(&self, py: Python<'_>) -> PyResult<Vec<Py<PyDict>>> {
        let hs = py
            .detach(|| self.lock.holders())
            .map_err(|e| errors::from_error(py, &e))?;
        hs.into_iter()
            .map(|h| {
                let d = PyDict::new(py);
                d.set_item("pid", h.pid)?;
                d.set_item("client_addr", h.client_addr)?;
                d.set_item("application_name", h.application_name)?;
                d.set_item(
                    "mode",
                    match h.mode {
                        Mode::Shared => "shared",
                        Mode::Exclusive => "exclusive",
                    },
                )?;
                d.set_item("waiting", !h.granted)?;
                d.set_item(
                    "since",
                    h.since
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                        .map(|d| d.as_secs_f64()),
                )?;
                Ok(d.unbind())
            })
            .collect()
    }

    fn key_obj(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(match self.lock.key() {
            PgKey::Int(k) => k.into_pyobject(py)?.into_any().unbind(),
            PgKey::Pair(a, b) => (a, b).into_pyobject(py)?.into_any().unbind(),
        })
    }
}

/// A reader-writer lock in a PostgreSQL server.
#[pyclass(module = "interlock._native", name = "PgLock", subclass, frozen)]
pub(crate) struct PyPgLock {
    inner: Inner,
}

#[pymethods]
impl PyPgLock {
    #[new]
    #[pyo3(signature = (name_or_key, url = None, *, lease = 10.0, on_lost = None))]
    fn py_new(
        py: Python<'_>,
        name_or_key: &Bound<'_, PyAny>,
        url: Option<String>,
        lease: f64,
        on_lost: Option<Py<PyAny>>,
    ) -> PyResult<Self> {
        Ok(PyPgLock {
            inner: Inner::open(py, name_or_key, url, lease, on_lost)?,
        })
    }

    /// Shared: a held Guard (`.token`), WouldBlock / Timeout otherwise.
    #[pyo3(signature = (blocking = true, timeout = None))]
    fn read(&self, py: Python<'_>, blocking: bool, timeout: Option<f64>) -> PyResult<Py<Guard>> {
        self.inner
            .take(py, Mode::Shared, wait_of(blocking, timeout)?)
    }

    /// Exclusive: a held Guard (`.token`), WouldBlock / Timeout otherwise.
    #[pyo3(signature = (blocking = true, timeout = None))]
    fn write(&self, py: Python<'_>, blocking: bool, timeout: Option<f64>) -> PyResult<Py<Guard>> {
        self.inner
            .take(py, Mode::Exclusive, wait_of(blocking, timeout)?)
    }

    #[pyo3(signature = (blocking = true, timeout = -1.0, *, shared = false))]
    fn acquire(
        &self,
        py: Python<'_>,
        blocking: bool,
        timeout: f64,
        shared: bool,
    ) -> PyResult<bool> {
        let mode = if shared {
            Mode::Shared
        } else {
            Mode::Exclusive
        };
        self.inner
            .acquire(py, mode, wait_of_threading(blocking, timeout)?)
    }

    fn release(&self, py: Python<'_>) -> PyResult<()> {
        hold::release_latest(py, &self.inner.holds, &self.inner.what)
    }

    fn locked(&self) -> bool {
        self.inner.holds.any()
    }

    fn __enter__(slf: &Bound<'_, Self>) -> PyResult<Py<Self>> {
        let me = slf.get();
        me.inner.enter(slf.py())?;
        Ok(slf.clone().unbind())
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, PyTuple>) -> PyResult<bool> {
        hold::release_latest(py, &self.inner.holds, &self.inner.what)?;
        Ok(false)
    }

    /// Releases everything taken through this object.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.inner.holds.release_all(py)
    }

    /// Who holds or awaits the lock now, holders first: dicts of pid (the
    /// server process), client_addr, application_name, mode, waiting, since
    /// (a Unix time, or None).
    fn holders(&self, py: Python<'_>) -> PyResult<Vec<Py<PyDict>>> {
        self.inner.holders(py)
    }

    /// The fencing token of this object's latest hold taken by
    /// `acquire()` or `with lock:` (None when it holds nothing that way).
    #[getter]
    fn token(&self) -> Option<u64> {
        self.inner.holds.token()
    }

    /// The newest fencing token issued for this lock, if any.
    fn last_token(&self, py: Python<'_>) -> PyResult<Option<u64>> {
        py.detach(|| self.inner.lock.last_token())
            .map_err(|e| errors::from_error(py, &e))
    }

    /// The advisory key: an int, or a pair of ints.
    #[getter]
    fn key(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.inner.key_obj(py)
    }

    /// The name as given (None for an explicit key).
    #[getter]
    fn name(&self) -> Option<String> {
        self.inner.name.clone()
    }

    #[getter]
    fn lease(&self) -> f64 {
        self.inner.lease
    }

    fn __repr__(&self) -> String {
        format!("<interlock.PgLock {}>", self.inner.what.display())
    }
}

/// An exclusive lock in a PostgreSQL server.
#[pyclass(module = "interlock._native", name = "PgMutex", subclass, frozen)]
pub(crate) struct PyPgMutex {
    inner: Inner,
}

#[pymethods]
impl PyPgMutex {
    #[new]
    #[pyo3(signature = (name_or_key, url = None, *, lease = 10.0, on_lost = None))]
    fn py_new(
        py: Python<'_>,
        name_or_key: &Bound<'_, PyAny>,
        url: Option<String>,
        lease: f64,
        on_lost: Option<Py<PyAny>>,
    ) -> PyResult<Self> {
        Ok(PyPgMutex {
            inner: Inner::open(py, name_or_key, url, lease, on_lost)?,
        })
    }

    /// A held Guard (`.token`), WouldBlock / Timeout otherwise.
    #[pyo3(signature = (blocking = true, timeout = None))]
    fn lock(&self, py: Python<'_>, blocking: bool, timeout: Option<f64>) -> PyResult<Py<Guard>> {
        self.inner
            .take(py, Mode::Exclusive, wait_of(blocking, timeout)?)
    }

    #[pyo3(signature = (blocking = true, timeout = -1.0))]
    fn acquire(&self, py: Python<'_>, blocking: bool, timeout: f64) -> PyResult<bool> {
        self.inner
            .acquire(py, Mode::Exclusive, wait_of_threading(blocking, timeout)?)
    }

    fn release(&self, py: Python<'_>) -> PyResult<()> {
        hold::release_latest(py, &self.inner.holds, &self.inner.what)
    }

    fn locked(&self) -> bool {
        self.inner.holds.any()
    }

    fn __enter__(slf: &Bound<'_, Self>) -> PyResult<Py<Self>> {
        let me = slf.get();
        me.inner.enter(slf.py())?;
        Ok(slf.clone().unbind())
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, PyTuple>) -> PyResult<bool> {
        hold::release_latest(py, &self.inner.holds, &self.inner.what)?;
        Ok(false)
    }

    fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.inner.holds.release_all(py)
    }

    fn holders(&self, py: Python<'_>) -> PyResult<Vec<Py<PyDict>>> {
        self.inner.holders(py)
    }

    #[getter]
    fn token(&self) -> Option<u64> {
        self.inner.holds.token()
    }

    fn last_token(&self, py: Python<'_>) -> PyResult<Option<u64>> {
        py.detach(|| self.inner.lock.last_token())
            .map_err(|e| errors::from_error(py, &e))
    }

    #[getter]
    fn key(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.inner.key_obj(py)
    }

    #[getter]
    fn name(&self) -> Option<String> {
        self.inner.name.clone()
    }

    #[getter]
    fn lease(&self) -> f64 {
        self.inner.lease
    }

    fn __repr__(&self) -> String {
        format!("<interlock.PgMutex {}>", self.inner.what.display())
    }
}

/// The main thread's pending acquisition.
type Pending = Pin<Box<dyn Future<Output = Result<PgGuard<'static>, TryLockError>> + Send>>;

/// A wait without deadline, as the timed forms' result type.
async fn forever(
    f: impl Future<Output = interlock::Result<PgGuard<'static>>>,
) -> Result<PgGuard<'static>, TryLockError> {
    f.await.map_err(TryLockError::Error)
}

/// Wakes the thread blocked in [`block_on_hearing_signals`].
struct Signal {
    woken: parking_lot::Mutex<bool>,
    cv: parking_lot::Condvar,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        *self.woken.lock() = true;
        self.cv.notify_one();
    }
}

/// Polls `fut` to the end without the GIL, looking for signals every
/// [`SLICE`] in between; a signal handler's exception (Ctrl-C) drops the
/// future, which cancels the acquisition.
fn block_on_hearing_signals(
    py: Python<'_>,
    mut fut: Pending,
) -> PyResult<Result<PgGuard<'static>, TryLockError>> {
    let signal = Arc::new(Signal {
        woken: parking_lot::Mutex::new(false),
        cv: parking_lot::Condvar::new(),
    });
    let waker = Waker::from(Arc::clone(&signal));
    loop {
        let polled = py.detach(|| {
            let mut cx = Context::from_waker(&waker);
            match fut.as_mut().poll(&mut cx) {
                Poll::Ready(r) => Some(r),
                Poll::Pending => {
                    let mut w = signal.woken.lock();
                    if !*w {
                        signal.cv.wait_for(&mut w, SLICE);
                    }
                    *w = false;
                    None
                }
            }
        });
        match polled {
            Some(r) => return Ok(r),
            None => {
                if let Err(interrupt) = py.check_signals() {
                    py.detach(|| drop(fut));
                    return Err(interrupt);
                }
            }
        }
    }
}

// ----- asyncio (crate::aio) -----------------------------------------------

impl Inner {
    /// The pending async acquisition in `mode` of the lock `obj` wraps
    /// (`inner` finds it): the crate's future, whose drop cancels the
    /// server-side wait (a cancel request) and releases a grant that raced
    /// it; on its grant the hold is recorded as `take_shared` records it.
    fn async_wait<T>(
        obj: Py<T>,
        inner: fn(&T) -> &Inner,
        mode: Mode,
        wait: Wait,
    ) -> PyResult<crate::aio::AsyncWait>
    where
        T: pyo3::PyClass<Frozen = pyo3::pyclass::boolean_struct::True> + Sync,
    {
        use crate::aio;
        let lock = &inner(obj.get()).lock;
        let fut = match mode {
            Mode::Shared => aio::future(
                wait,
                || lock.read_async(),
                |t| lock.read_async_until(t),
                |g| (Held::Pg(Box::new(g)), false),
            ),
            Mode::Exclusive => aio::future(
                wait,
                || lock.write_async(),
                |t| lock.write_async_until(t),
                |g| (Held::Pg(Box::new(g)), false),
            ),
        };
        aio::AsyncWait::new(
            fut,
            Box::new(move |py, r| {
                let me = inner(obj.get());
                let what = if mode == Mode::Shared {
                    "shared lock"
                } else {
                    "lock"
                };
                let (h, _) = r.map_err(|e| aio::raise(py, &e, &me.what, what))?;
                let req = Request {
                    key: Some(&me.key),
                    reentrant: false,
                    mode,
                    path: &me.what,
                    what,
                    fast: crate::wait::Fast::Detach,
                };
                let s = hold::acquire_custom(
                    py,
                    &me.holds,
                    req,
                    &me.key,
                    Wait::NonBlocking,
                    |_, _| Ok(Ok(h)),
                )?;
                hold::into_guard(py, &me.what, (s, false))
            }),
        )
    }
}

impl PyPgLock {
    /// The pending async `read` or `write` (crate::aio).
    pub(crate) fn async_wait(
        slf: &Bound<'_, Self>,
        kind: &str,
        wait: Wait,
    ) -> PyResult<crate::aio::AsyncWait> {
        let mode = match kind {
            "read" => Mode::Shared,
            "write" => Mode::Exclusive,
            k => return Err(crate::aio::bad_kind(k)),
        };
        Inner::async_wait(slf.clone().unbind(), |l: &Self| &l.inner, mode, wait)
    }
}

impl PyPgMutex {
    /// The pending async `lock` (crate::aio).
    pub(crate) fn async_wait(slf: &Bound<'_, Self>, wait: Wait) -> PyResult<crate::aio::AsyncWait> {
        Inner::async_wait(
            slf.clone().unbind(),
            |l: &Self| &l.inner,
            Mode::Exclusive,
            wait,
        )
    }
}
