//! `LeaseLock`: an exclusive lease on a lock directory, with its fencing
//! token.

use crate::errors;
use crate::file::path_arg;
use crate::hold::{self, Guard, Held, Holds, Key, Request};
use crate::wait::{wait_of, wait_of_threading, Fast};
use interlock::{LeaseLock, LeaseOptions, Mode, Wait};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

/// A lease lock.
#[pyclass(module = "interlock._native", name = "LeaseLock", subclass, frozen)]
pub(crate) struct PyLeaseLock {
    path: Arc<std::path::Path>,
    ttl: f64,
    lock: LeaseLock,
    key: Arc<hold::KeyState>,
    holds: Holds,
}

impl PyLeaseLock {
    fn take(&self, py: Python<'_>, wait: Wait) -> PyResult<Py<Guard>> {
        let r = self.take_shared(py, wait)?;
        hold::into_guard(py, &self.path, r)
    }

    fn take_shared(&self, py: Python<'_>, wait: Wait) -> PyResult<(Arc<hold::Shared>, bool)> {
        let req = Request {
            key: Some(&self.key),
            reentrant: false,
            mode: Mode::Exclusive,
            path: &self.path,
            what: "the lease",
            fast: Fast::Detach,
        };
        let lock = &self.lock;
        hold::acquire_shared(py, &self.holds, req, wait, |w| {
            Ok((Held::Lease(lock.lock_arc(w)?), false))
        })
    }
}

#[pymethods]
impl PyLeaseLock {
    #[new]
    #[pyo3(signature = (path, ttl = 60.0, *, keep_alive = true, on_lost = None))]
    fn py_new(
        py: Python<'_>,
        path: &Bound<'_, PyAny>,
        ttl: f64,
        keep_alive: bool,
        on_lost: Option<Py<PyAny>>,
    ) -> PyResult<Self> {
        let path = path_arg(path)?;
        let d = Duration::try_from_secs_f64(ttl)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                PyValueError::new_err(format!(
                    "ttl must be a positive number of seconds, not {ttl}"
                ))
            })?;
        let mut opts = LeaseOptions::new(d).keep_alive(keep_alive);
        if let Some(cb) = on_lost {
            opts = opts.on_lost(move |e| {
                Python::attach(|py| {
                    let err = errors::from_error(py, e);
                    if let Err(raised) = cb.call1(py, (err.into_value(py),)) {
                        raised.write_unraisable(py, None);
                    }
                })
            });
        }
        let lock = py
            .detach(|| LeaseLock::with_options(&path, opts))
            .map_err(|e| errors::from_error(py, &e))?;
        let path = lock.path().to_path_buf();
        Ok(PyLeaseLock {
            key: hold::intern(Key::Lease(path.clone())),
            path: path.into(),
            ttl,
            lock,
            holds: Holds::default(),
        })
    }

    /// Acquires the lease: a held Guard with `.token`.
    #[pyo3(signature = (blocking = true, timeout = None))]
    fn lock(&self, py: Python<'_>, blocking: bool, timeout: Option<f64>) -> PyResult<Py<Guard>> {
        self.take(py, wait_of(blocking, timeout)?)
    }

    #[pyo3(signature = (blocking = true, timeout = -1.0))]
    fn acquire(&self, py: Python<'_>, blocking: bool, timeout: f64) -> PyResult<bool> {
        let wait = wait_of_threading(blocking, timeout)?;
        let r = self.take_shared(py, wait);
        hold::acquire_bool(py, &self.holds, &self.path, r)
    }

    fn release(&self, py: Python<'_>) -> PyResult<()> {
        hold::release_latest(py, &self.holds, &self.path)
    }

    fn locked(&self) -> bool {
        self.holds.any()
    }

    fn __enter__(slf: &Bound<'_, Self>) -> PyResult<Py<Self>> {
        let me = slf.get();
        let r = me.take_shared(slf.py(), Wait::Forever)?;
        hold::enter(slf.py(), &me.holds, &me.path, r)?;
        Ok(slf.clone().unbind())
    }

    #[pyo3(signature = (_t = None, _v = None, _tb = None))]
    fn __exit__(
        &self,
        py: Python<'_>,
        _t: Option<&Bound<'_, PyAny>>,
        _v: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        hold::release_latest(py, &self.holds, &self.path)?;
        Ok(false)
    }

    fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.holds.release_all(py)
    }

    /// Who holds the lease now: a dict (pid, host, local, token, expires as
    /// a Unix time), or None.
    fn holder(&self, py: Python<'_>) -> PyResult<Option<Py<PyDict>>> {
        let h = py
            .detach(|| self.lock.holder())
            .map_err(|e| errors::from_error(py, &e))?;
        let Some(h) = h else { return Ok(None) };
        let d = PyDict::new(py);
        d.set_item("pid", h.process.map(|p| p.pid))?;
        d.set_item("host", h.host)?;
        d.set_item("local", h.local)?;
        d.set_item("token", h.token)?;
        d.set_item(
            "expires",
            h.expires
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        )?;
        Ok(Some(d.unbind()))
    }

    /// The fencing token of this object's latest hold taken by
    /// `acquire()` or `with lock:` (None when it holds nothing that way;
    /// a guard from `lock()` has its own `.token`).
    #[getter]
    fn token(&self) -> Option<u64> {
        self.holds.token()
    }

    /// The largest fencing token issued so far, if any.
    fn last_token(&self, py: Python<'_>) -> PyResult<Option<u64>> {
        py.detach(|| self.lock.last_token())
            .map_err(|e| errors::from_error(py, &e))
    }

    #[getter]
    fn path(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }

    #[getter]
    fn ttl(&self) -> f64 {
        self.ttl
    }

    fn __repr__(&self) -> String {
        format!(
            "<interlock.LeaseLock {} ttl={}>",
            self.path.display(),
            self.ttl
        )
    }
}

impl PyLeaseLock {
    /// The pending async `lock` (crate::aio); on its grant the hold is
    /// recorded as `take_shared` records it.
    pub(crate) fn async_wait(slf: &Bound<'_, Self>, wait: Wait) -> PyResult<crate::aio::AsyncWait> {
        use crate::aio;
        let lock = &slf.get().lock;
        let fut = aio::future(
            wait,
            || lock.lock_async(),
            |t| lock.lock_async_until(t),
            |g| (Held::Lease(g), false),
        );
        let obj = slf.clone().unbind();
        aio::AsyncWait::new(
            fut,
            Box::new(move |py, r| {
                let me = obj.get();
                let what = "the lease";
                let req = Request {
                    key: Some(&me.key),
                    reentrant: false,
                    mode: Mode::Exclusive,
                    path: &me.path,
                    what,
                    fast: Fast::Detach,
                };
                aio::record_shared(py, &me.holds, req, r)
            }),
        )
    }
}
