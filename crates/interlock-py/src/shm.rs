//! `ShmRwLock` and `ShmMutex`: named (pickled by name) or anonymous
//! (inherited by fork, refused by pickle).

use crate::errors;
use crate::file::path_arg;
use crate::hold::{self, Guard, Held, Holds, Key, Request};
use crate::wait::{wait_of, wait_of_threading, Fast};
use interlock::{Mode, ShmHold, ShmMutex, ShmOptions, ShmRwLock, Wait};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Opens a named lock, or makes an anonymous one.
fn open_named(py: Python<'_>, name: Option<&Bound<'_, PyAny>>) -> PyResult<Option<PathBuf>> {
    let _ = py;
    name.map(path_arg).transpose()
}

/// A reader-writer lock in shared memory.
#[pyclass(module = "interlock._native", name = "ShmRwLock", subclass, frozen)]
pub(crate) struct PyShmRwLock {
    /// The name as given (None: anonymous).
    name: Option<PathBuf>,
    path: Arc<std::path::Path>,
    lock: Arc<ShmRwLock>,
    key: Arc<hold::KeyState>,
    reentrant: bool,
    holds: Holds,
}

impl PyShmRwLock {
    fn take(&self, py: Python<'_>, hold: ShmHold, wait: Wait) -> PyResult<Py<Guard>> {
        let (req, f) = self.request(hold);
        hold::acquire_guard(py, &self.holds, req, wait, f)
    }

    fn take_shared(
        &self,
        py: Python<'_>,
        hold: ShmHold,
        wait: Wait,
    ) -> PyResult<(Arc<hold::Shared>, bool)> {
        let (req, f) = self.request(hold);
        hold::acquire_shared(py, &self.holds, req, wait, f)
    }

    /// The acquisition of `hold` (for [`hold::acquire_guard`] and
    /// [`hold::acquire_shared`]).
    #[allow(clippy::type_complexity)]
    fn request(
        &self,
        hold: ShmHold,
    ) -> (
        Request<'_>,
        impl Fn(Wait) -> Result<(Held, bool), interlock::TryLockError> + Send + Sync + '_,
    ) {
        let (mode, what) = match hold {
            ShmHold::Read => (Mode::Shared, "the shared lock"),
            ShmHold::Upgradable => (Mode::Shared, "the upgradable lock"),
            ShmHold::Write => (Mode::Exclusive, "the exclusive lock"),
        };
        let req = Request {
            key: Some(&self.key),
            reentrant: self.reentrant,
            mode,
            path: &self.path,
            what,
            fast: Fast::TryFirst,
        };
        let lock = &self.lock;
        (req, move |w| {
            Ok(match lock.acquire_arc(hold, w)? {
                Ok(g) => (Held::Shm(g), false),
                Err(p) => (Held::Shm(p.into_inner()), true),
            })
        })
    }
}

#[pymethods]
impl PyShmRwLock {
    #[new]
    #[pyo3(signature = (name_or_path = None, *, reentrant = false, readers_turn = None))]
    fn py_new(
        py: Python<'_>,
        name_or_path: Option<&Bound<'_, PyAny>>,
        reentrant: bool,
        readers_turn: Option<f64>,
    ) -> PyResult<Self> {
        let readers_turn = match readers_turn {
            None => interlock::shm::DEFAULT_READERS_TURN,
            Some(t) => crate::wait::non_negative_secs("readers_turn", t)?.unwrap_or(Duration::MAX),
        };
        let name = open_named(py, name_or_path)?;
        let opts = ShmOptions::new().readers_turn(readers_turn);
        let lock = match &name {
            Some(n) => py.detach(|| opts.open_rwlock(n)),
            None => opts.anonymous_rwlock(),
        }
        .map_err(|e| errors::from_error(py, &e))?;
        let lock = Arc::new(lock);
        let path = lock.path().to_path_buf();
        let key = hold::intern(match &name {
            Some(_) => Key::Shm(path.clone()),
            None => Key::Anon(Arc::as_ptr(&lock) as usize),
        });
        Ok(PyShmRwLock {
            name,
            path: path.into(),
            lock,
            key,
            reentrant,
            holds: Holds::default(),
        })
    }

    /// The longest this object's writers let readers that slept behind
    /// the previous writer in first, in seconds (see `readers_turn=`).
    #[getter]
    fn readers_turn(&self) -> f64 {
        self.lock.readers_turn().as_secs_f64()
    }

    #[pyo3(signature = (blocking = true, timeout = None))]
    fn read(&self, py: Python<'_>, blocking: bool, timeout: Option<f64>) -> PyResult<Py<Guard>> {
        self.take(py, ShmHold::Read, wait_of(blocking, timeout)?)
    }

    #[pyo3(signature = (blocking = true, timeout = None))]
    fn write(&self, py: Python<'_>, blocking: bool, timeout: Option<f64>) -> PyResult<Py<Guard>> {
        self.take(py, ShmHold::Write, wait_of(blocking, timeout)?)
    }

    #[pyo3(signature = (blocking = true, timeout = None))]
    fn upgradable_read(
        &self,
        py: Python<'_>,
        blocking: bool,
        timeout: Option<f64>,
    ) -> PyResult<Py<Guard>> {
        self.take(py, ShmHold::Upgradable, wait_of(blocking, timeout)?)
    }

    #[pyo3(signature = (blocking = true, timeout = -1.0, *, shared = false))]
    fn acquire(
        &self,
        py: Python<'_>,
        blocking: bool,
        timeout: f64,
        shared: bool,
    ) -> PyResult<bool> {
        let wait = wait_of_threading(blocking, timeout)?;
        let hold = if shared {
            ShmHold::Read
        } else {
            ShmHold::Write
        };
        let r = self.take_shared(py, hold, wait);
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
        let r = me.take_shared(slf.py(), ShmHold::Write, Wait::Forever)?;
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

    /// Releases everything held through this object.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.holds.release_all(py)
    }

    /// Whether a writer died holding the lock and nobody cleared it since.
    #[getter]
    fn poisoned(&self) -> bool {
        self.lock.is_poisoned()
    }

    /// The pid holding (or first waiting for) the exclusive or upgradable
    /// hold, if any.
    fn holder(&self) -> Option<u32> {
        self.lock.holder().map(|p| p.pid)
    }

    #[getter]
    fn path(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }

    /// The name or path given, or None for an anonymous lock.
    #[getter]
    fn name(&self) -> Option<String> {
        self.name.as_ref().map(|n| n.to_string_lossy().into_owned())
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyAny>, (String,))> {
        let me = slf.get();
        match &me.name {
            Some(n) => Ok((
                slf.get_type().into_any(),
                (n.to_string_lossy().into_owned(),),
            )),
            None => Err(PyTypeError::new_err(
                "an anonymous ShmRwLock cannot be pickled: it is shared only with \
                 children made by fork (give it a name to share it by pickling)",
            )),
        }
    }

    fn __repr__(&self) -> String {
        format!("<interlock.ShmRwLock {}>", self.path.display())
    }
}

/// A mutex in shared memory.
#[pyclass(module = "interlock._native", name = "ShmMutex", subclass, frozen)]
pub(crate) struct PyShmMutex {
    name: Option<PathBuf>,
    path: Arc<std::path::Path>,
    lock: Arc<ShmMutex>,
    key: Arc<hold::KeyState>,
    reentrant: bool,
    holds: Holds,
}

impl PyShmMutex {
    fn take(&self, py: Python<'_>, wait: Wait) -> PyResult<Py<Guard>> {
        let (req, f) = self.request();
        hold::acquire_guard(py, &self.holds, req, wait, f)
    }

    fn take_shared(&self, py: Python<'_>, wait: Wait) -> PyResult<(Arc<hold::Shared>, bool)> {
        let (req, f) = self.request();
        hold::acquire_shared(py, &self.holds, req, wait, f)
    }

    /// The acquisition (for [`hold::acquire_guard`] and
    /// [`hold::acquire_shared`]).
    #[allow(clippy::type_complexity)]
    fn request(
        &self,
    ) -> (
        Request<'_>,
        impl Fn(Wait) -> Result<(Held, bool), interlock::TryLockError> + Send + Sync + '_,
    ) {
        let req = Request {
            key: Some(&self.key),
            reentrant: self.reentrant,
            mode: Mode::Exclusive,
            path: &self.path,
            what: "the mutex",
            fast: Fast::TryFirst,
        };
        let lock = &self.lock;
        (req, move |w| {
            Ok(match lock.lock_arc(w)? {
                Ok(g) => (Held::Mutex(g), false),
                Err(p) => (Held::Mutex(p.into_inner()), true),
            })
        })
    }
}

#[pymethods]
impl PyShmMutex {
    #[new]
    #[pyo3(signature = (name_or_path = None, *, reentrant = false))]
    fn py_new(
        py: Python<'_>,
        name_or_path: Option<&Bound<'_, PyAny>>,
        reentrant: bool,
    ) -> PyResult<Self> {
        let name = open_named(py, name_or_path)?;
        let lock = match &name {
            Some(n) => py.detach(|| ShmMutex::open(n)),
            None => ShmMutex::anonymous(),
        }
        .map_err(|e| errors::from_error(py, &e))?;
        let lock = Arc::new(lock);
        let path = lock.path().to_path_buf();
        let key = hold::intern(match &name {
            Some(_) => Key::Shm(path.clone()),
            None => Key::Anon(Arc::as_ptr(&lock) as usize),
        });
        Ok(PyShmMutex {
            name,
            path: path.into(),
            lock,
            key,
            reentrant,
            holds: Holds::default(),
        })
    }

    /// Locks: a held Guard, or WouldBlock / Timeout / OwnerDied.
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

    #[getter]
    fn poisoned(&self) -> bool {
        self.lock.is_poisoned()
    }

    fn holder(&self) -> Option<u32> {
        self.lock.holder().map(|p| p.pid)
    }

    #[getter]
    fn path(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }

    #[getter]
    fn name(&self) -> Option<String> {
        self.name.as_ref().map(|n| n.to_string_lossy().into_owned())
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyAny>, (String,))> {
        let me = slf.get();
        match &me.name {
            Some(n) => Ok((
                slf.get_type().into_any(),
                (n.to_string_lossy().into_owned(),),
            )),
            None => Err(PyTypeError::new_err(
                "an anonymous ShmMutex cannot be pickled: it is shared only with \
                 children made by fork (give it a name to share it by pickling)",
            )),
        }
    }

    fn __repr__(&self) -> String {
        format!("<interlock.ShmMutex {}>", self.path.display())
    }
}

// ----- asyncio (crate::aio) -----------------------------------------------

fn shm_held(r: interlock::LockResult<interlock::ShmArcGuard>) -> (Held, bool) {
    match r {
        Ok(g) => (Held::Shm(g), false),
        Err(p) => (Held::Shm(p.into_inner()), true),
    }
}

fn mutex_held(r: interlock::LockResult<interlock::ShmMutexArcGuard>) -> (Held, bool) {
    match r {
        Ok(g) => (Held::Mutex(g), false),
        Err(p) => (Held::Mutex(p.into_inner()), true),
    }
}

impl PyShmRwLock {
    /// The pending async acquisition of `kind`; on its grant the hold is
    /// recorded as `take_shared` records it.
    pub(crate) fn async_wait(
        slf: &Bound<'_, Self>,
        kind: &str,
        wait: Wait,
    ) -> PyResult<crate::aio::AsyncWait> {
        use crate::aio;
        let (hold, mode, what) = match kind {
            "read" => (ShmHold::Read, Mode::Shared, "the shared lock"),
            "upgradable_read" => (ShmHold::Upgradable, Mode::Shared, "the upgradable lock"),
            "write" => (ShmHold::Write, Mode::Exclusive, "the exclusive lock"),
            k => return Err(aio::bad_kind(k)),
        };
        let lock = &slf.get().lock;
        let fut = match hold {
            ShmHold::Read => aio::future(
                wait,
                || lock.read_async(),
                |t| lock.read_async_until(t),
                shm_held,
            ),
            ShmHold::Upgradable => aio::future(
                wait,
                || lock.upgradable_read_async(),
                |t| lock.upgradable_read_async_until(t),
                shm_held,
            ),
            _ => aio::future(
                wait,
                || lock.write_async(),
                |t| lock.write_async_until(t),
                shm_held,
            ),
        };
        let obj = slf.clone().unbind();
        aio::AsyncWait::new(
            fut,
            Box::new(move |py, r| {
                let me = obj.get();
                let req = Request {
                    key: Some(&me.key),
                    reentrant: me.reentrant,
                    mode,
                    path: &me.path,
                    what,
                    fast: Fast::TryFirst,
                };
                aio::record_shared(py, &me.holds, req, r)
            }),
        )
    }
}

impl PyShmMutex {
    /// The pending async `lock`; on its grant the hold is recorded as
    /// `take_shared` records it.
    pub(crate) fn async_wait(slf: &Bound<'_, Self>, wait: Wait) -> PyResult<crate::aio::AsyncWait> {
        use crate::aio;
        let lock = &slf.get().lock;
        let fut = aio::future(
            wait,
            || lock.lock_async(),
            |t| lock.lock_async_until(t),
            mutex_held,
        );
        let obj = slf.clone().unbind();
        aio::AsyncWait::new(
            fut,
            Box::new(move |py, r| {
                let me = obj.get();
                let what = "the mutex";
                let req = Request {
                    key: Some(&me.key),
                    reentrant: me.reentrant,
                    mode: Mode::Exclusive,
                    path: &me.path,
                    what,
                    fast: Fast::TryFirst,
                };
                aio::record_shared(py, &me.holds, req, r)
            }),
        )
    }
}
