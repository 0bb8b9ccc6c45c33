//! `Semaphore` (shared memory; named and pickled by name, or anonymous and
//! inherited by fork) and `FileSemaphore` (a file; reopened in a forked
//! child): N permits shared by the threads and processes of a host.
//!
//! Why it is built this way: the lock logic is the crate's
//! (`interlock::Semaphore`, `interlock::FileSemaphore`); this file converts
//! arguments and hands out the crate's owned guards (`acquire_many_arc`) as
//! [`Guard`] objects, which any thread may release. A semaphore is not a
//! lock a thread owns, so nothing is recorded per thread: a thread asking
//! for another permit takes another permit (as `threading.Semaphore` does),
//! and one asking for more than are free waits like anyone else.

use crate::errors;
use crate::file::{path_arg, PerProcess};
use crate::hold::{self, Guard, Held, Holds, Request};
use crate::wait::{wait_of, Fast};
use interlock::{FileSemaphore, Mode, Semaphore, Wait};
use parking_lot::Mutex;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `permits=` as a count, or ValueError (the crate checks the upper bound).
fn permits_arg(permits: i64) -> PyResult<u32> {
    match u32::try_from(permits) {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(PyValueError::new_err(format!(
            "permits must be a positive number of permits, not {permits}"
        ))),
    }
}

/// What both families share: the holds handed out, and the guards of
/// `acquire()` kept for `release()`.
struct Common {
    path: Arc<Path>,
    permits: u32,
    holds: Holds,
    acquired: Mutex<Vec<Py<Guard>>>,
}

impl Common {
    fn new(path: PathBuf, permits: u32) -> Common {
        Common {
            path: path.into(),
            permits,
            holds: Holds::default(),
            acquired: Mutex::new(Vec::new()),
        }
    }

    /// `n` as a count of permits to take, or ValueError.
    fn count(&self, n: i64) -> PyResult<u32> {
        match u32::try_from(n) {
            Ok(k) if (1..=self.permits).contains(&k) => Ok(k),
            _ => Err(PyValueError::new_err(format!(
                "{n} permits requested of {}, which has {} (ask for 1..={})",
                self.path.display(),
                self.permits,
                self.permits
            ))),
        }
    }

    fn request(&self, k: u32) -> Request<'_> {
        Request {
            key: None,
            reentrant: false,
            mode: Mode::Exclusive,
            path: &self.path,
            what: if k == 1 { "a permit of" } else { "permits of" },
            fast: Fast::TryFirst,
        }
    }

    /// Keeps `g` for `release()` (forgetting guards released meanwhile).
    fn keep(&self, py: Python<'_>, g: &Py<Guard>) {
        let mut v = self.acquired.lock();
        v.retain(|x| {
            x.bind(py)
                .getattr("held")
                .is_ok_and(|h| h.is_truthy().unwrap_or(false))
        });
        v.push(g.clone_ref(py));
    }

    /// `release()`: gives back the latest `acquire()` that is still held.
    fn release_latest(&self, py: Python<'_>) -> PyResult<()> {
        loop {
            let g = self.acquired.lock().pop();
            let Some(g) = g else {
                return Err(PyRuntimeError::new_err(format!(
                    "release of {}: no permit taken through acquire() is held",
                    self.path.display()
                )));
            };
            if g.bind(py).getattr("held")?.is_truthy()? {
                return g.bind(py).call_method0("release").map(drop);
            }
        }
    }

    fn forget(&self) {
        self.holds.forget();
        std::mem::forget(std::mem::take(&mut *self.acquired.lock()));
    }
}

/// What each family's class gives the methods both have
/// ([`permit_methods`]).
trait Permits {
    fn common(&self) -> &Common;
    /// Takes `k` permits as `wait` allows.
    fn take_shared(
        &self,
        py: Python<'_>,
        k: u32,
        wait: Wait,
    ) -> PyResult<(Arc<hold::Shared>, bool)>;
}

/// The `#[pymethods]` of a semaphore class: the family's own (`$own`) and
/// those both families have, written once over [`Permits`].
macro_rules! permit_methods {
    ($ty:ident, $label:literal, { $($own:tt)* }) => {
        #[pymethods]
        impl $ty {
            $($own)*

            /// Takes `n` permits (all or none), waiting as allowed: a held
            /// Guard, or WouldBlock / Timeout. `release()` gives back the
            /// latest.
            #[pyo3(signature = (n = 1, blocking = true, timeout = None))]
            fn acquire(
                &self,
                py: Python<'_>,
                n: i64,
                blocking: bool,
                timeout: Option<f64>,
            ) -> PyResult<Py<Guard>> {
                let g = self._take(py, n, blocking, timeout)?;
                self.common().keep(py, &g);
                Ok(g)
            }

            /// As `acquire(k, ...)`.
            #[pyo3(signature = (k, blocking = true, timeout = None))]
            fn acquire_many(
                &self,
                py: Python<'_>,
                k: i64,
                blocking: bool,
                timeout: Option<f64>,
            ) -> PyResult<Py<Guard>> {
                self.acquire(py, k, blocking, timeout)
            }

            /// As `acquire`, without keeping the guard for `release()` (the
            /// async forms' call).
            #[pyo3(signature = (n = 1, blocking = true, timeout = None))]
            fn _take(
                &self,
                py: Python<'_>,
                n: i64,
                blocking: bool,
                timeout: Option<f64>,
            ) -> PyResult<Py<Guard>> {
                let k = self.common().count(n)?;
                let r = self.take_shared(py, k, wait_of(blocking, timeout)?)?;
                hold::into_guard(py, &self.common().path, r)
            }

            /// Gives back the permits of the latest `acquire()` still held.
            fn release(&self, py: Python<'_>) -> PyResult<()> {
                self.common().release_latest(py)
            }

            fn __enter__(slf: &Bound<'_, Self>) -> PyResult<Py<Self>> {
                let me = slf.get();
                let r = me.take_shared(slf.py(), 1, Wait::Forever)?;
                hold::enter(slf.py(), &me.common().holds, &me.common().path, r)?;
                Ok(slf.clone().unbind())
            }

            #[pyo3(signature = (*_args))]
            fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, PyTuple>) -> PyResult<bool> {
                let c = self.common();
                hold::release_latest(py, &c.holds, &c.path)?;
                Ok(false)
            }

            /// Gives back every permit taken through this object (in this
            /// process).
            fn close(&self, py: Python<'_>) -> PyResult<()> {
                self.common().acquired.lock().clear();
                self.common().holds.release_all(py)
            }

            /// The number of permits (N).
            #[getter]
            fn permits(&self) -> u32 {
                self.common().permits
            }

            #[getter]
            fn path(&self) -> String {
                self.common().path.to_string_lossy().into_owned()
            }

            fn __reduce__<'py>(
                slf: &Bound<'py, Self>,
            ) -> PyResult<(Bound<'py, PyAny>, (String, u32))> {
                let me = slf.get();
                Ok((slf.get_type().into_any(), (me.reduce_name()?, me.common().permits)))
            }

            fn __repr__(&self) -> String {
                let c = self.common();
                format!("<interlock.{} {} permits={}>", $label, c.path.display(), c.permits)
            }
        }
    };
}

/// A counting semaphore in shared memory.
#[pyclass(module = "interlock._native", name = "Semaphore", subclass, frozen)]
pub(crate) struct PySemaphore {
    /// The name as given (None: anonymous).
    name: Option<PathBuf>,
    sem: Arc<Semaphore>,
    c: Common,
}

impl Permits for PySemaphore {
    fn common(&self) -> &Common {
        &self.c
    }

    fn take_shared(
        &self,
        py: Python<'_>,
        k: u32,
        wait: Wait,
    ) -> PyResult<(Arc<hold::Shared>, bool)> {
        let sem = &self.sem;
        let req = self.c.request(k);
        hold::acquire_shared(py, &self.c.holds, req, wait, |w| {
            Ok((Held::Sem(sem.acquire_many_arc(k, w)?), false))
        })
    }
}

impl PySemaphore {
    fn reduce_name(&self) -> PyResult<String> {
        match &self.name {
            Some(n) => Ok(n.to_string_lossy().into_owned()),
            None => Err(PyTypeError::new_err(
                "an anonymous Semaphore cannot be pickled: it is shared only with \
                 children made by fork (give it a name to share it by pickling)",
            )),
        }
    }
}

permit_methods!(PySemaphore, "Semaphore", {
    #[new]
    #[pyo3(signature = (name_or_path, permits))]
    fn py_new(
        py: Python<'_>,
        name_or_path: Option<&Bound<'_, PyAny>>,
        permits: i64,
    ) -> PyResult<Self> {
        let permits = permits_arg(permits)?;
        let name = name_or_path.map(path_arg).transpose()?;
        let sem = match &name {
            Some(n) => py.detach(|| Semaphore::open(n, permits)),
            None => Semaphore::anonymous(permits),
        }
        .map_err(|e| errors::from_error(py, &e))?;
        let path = sem.path().to_path_buf();
        Ok(PySemaphore {
            name,
            sem: Arc::new(sem),
            c: Common::new(path, permits),
        })
    }

    /// How many permits are free now (a dead holder's count as held until
    /// reclaimed).
    #[getter]
    fn available(&self) -> u32 {
        self.sem.available()
    }

    /// The pid of the holder of each held permit (a pid twice if it holds
    /// two), dead holders not yet reclaimed included.
    fn holders(&self) -> Vec<u32> {
        self.sem.holders().into_iter().map(|p| p.pid).collect()
    }

    /// Frees the permits of holders that died; returns how many. (Every
    /// acquisition that would wait does this itself.)
    fn reclaim_dead(&self, py: Python<'_>) -> u32 {
        let sem = &self.sem;
        py.detach(|| sem.reclaim_dead())
    }

    /// The name or path given, or None for an anonymous semaphore.
    #[getter]
    fn name(&self) -> Option<String> {
        self.name.as_ref().map(|n| n.to_string_lossy().into_owned())
    }
});

/// A counting semaphore on a file: permit i is an OFD write lock on byte i.
#[pyclass(module = "interlock._native", name = "FileSemaphore", subclass, frozen)]
pub(crate) struct PyFileSemaphore {
    mode: u32,
    sem: PerProcess<FileSemaphore>,
    c: Common,
}

impl PyFileSemaphore {
    fn core(&self, py: Python<'_>) -> PyResult<Arc<FileSemaphore>> {
        self.sem
            .get(
                || FileSemaphore::open_with(&self.c.path, self.c.permits, self.mode, None),
                || self.c.forget(),
            )
            .map_err(|e| errors::from_error(py, &e))
    }

    fn reduce_name(&self) -> PyResult<String> {
        Ok(self.c.path.to_string_lossy().into_owned())
    }
}

impl Permits for PyFileSemaphore {
    fn common(&self) -> &Common {
        &self.c
    }

    fn take_shared(
        &self,
        py: Python<'_>,
        k: u32,
        wait: Wait,
    ) -> PyResult<(Arc<hold::Shared>, bool)> {
        let sem = self.core(py)?;
        let req = self.c.request(k);
        hold::acquire_shared(py, &self.c.holds, req, wait, |w| {
            Ok((Held::FileSem(sem.acquire_many_arc(k, w)?), false))
        })
    }
}

permit_methods!(PyFileSemaphore, "FileSemaphore", {
    #[new]
    #[pyo3(signature = (path, permits, *, mode = 0o644))]
    fn py_new(py: Python<'_>, path: &Bound<'_, PyAny>, permits: i64, mode: u32) -> PyResult<Self> {
        let permits = permits_arg(permits)?;
        let path = path_arg(path)?;
        let sem = py
            .detach(|| FileSemaphore::open_with(&path, permits, mode, None))
            .map_err(|e| errors::from_error(py, &e))?;
        Ok(PyFileSemaphore {
            mode,
            sem: PerProcess::new(sem),
            c: Common::new(path, permits),
        })
    }

    /// How many permits are free now (asks the kernel).
    #[getter]
    fn available(&self, py: Python<'_>) -> PyResult<u32> {
        let sem = self.core(py)?;
        py.detach(|| sem.available())
            .map_err(|e| errors::from_error(py, &e))
    }
});

// ----- asyncio (crate::aio) -----------------------------------------------

/// The finish step of a semaphore's async acquisition: records the permits
/// as `take_shared` does (no per-holder record: a semaphore has none).
fn sem_finish<T>(obj: Py<T>, k: u32) -> crate::aio::Finish
where
    T: Permits + pyo3::PyClass<Frozen = pyo3::pyclass::boolean_struct::True> + Sync,
{
    use crate::aio;
    Box::new(move |py, r| {
        let c = obj.get().common();
        aio::record_shared(py, &c.holds, c.request(k), r)
    })
}

impl PySemaphore {
    /// The pending async acquisition of `n` permits (crate::aio).
    pub(crate) fn async_wait(
        slf: &Bound<'_, Self>,
        n: i64,
        wait: Wait,
    ) -> PyResult<crate::aio::AsyncWait> {
        let me = slf.get();
        let k = me.c.count(n)?;
        let sem = &me.sem;
        let fut = crate::aio::future(
            wait,
            || sem.acquire_many_async(k),
            |t| sem.acquire_many_async_until(k, t),
            |g| (Held::Sem(g), false),
        );
        crate::aio::AsyncWait::new(fut, sem_finish(slf.clone().unbind(), k))
    }
}

impl PyFileSemaphore {
    /// The pending async acquisition of `n` permits (crate::aio).
    pub(crate) fn async_wait(
        slf: &Bound<'_, Self>,
        n: i64,
        wait: Wait,
    ) -> PyResult<crate::aio::AsyncWait> {
        let me = slf.get();
        let k = me.c.count(n)?;
        let sem = me.core(slf.py())?;
        let fut = crate::aio::future(
            wait,
            || sem.acquire_many_async(k),
            |t| sem.acquire_many_async_until(k, t),
            |g| (Held::FileSem(g), false),
        );
        crate::aio::AsyncWait::new(fut, sem_finish(slf.clone().unbind(), k))
    }
}
