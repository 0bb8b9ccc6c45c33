//! `FileLock` and `holders()`.

use crate::errors;
use crate::hold::{self, Guard, Held, Holds, Key, Request};
use crate::wait::{wait_of, wait_of_threading, Fast};
use interlock::{FileLock, Flavor, Mode, TryLockError, Wait};
use parking_lot::Mutex;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A path argument: `str` or `os.PathLike`.
pub(crate) fn path_arg(p: &Bound<'_, PyAny>) -> PyResult<PathBuf> {
    let p: PathBuf = p.extract()?;
    if p.as_os_str().is_empty() {
        return Err(PyValueError::new_err("the path is empty"));
    }
    if p.as_os_str().as_encoded_bytes().contains(&0) {
        return Err(PyValueError::new_err("the path contains a NUL byte"));
    }
    Ok(p)
}

/// A crate lock made in this process (fork generation), reopened in a
/// forked child on first use.
pub(crate) struct PerProcess<T> {
    cell: Mutex<(u64, Option<Arc<T>>)>,
}

impl<T> PerProcess<T> {
    pub(crate) fn new(v: T) -> Self {
        PerProcess {
            cell: Mutex::new((hold::generation(), Some(Arc::new(v)))),
        }
    }

    /// The lock, reopening it with `open` in a forked child (the inherited
    /// one is leaked, never closed: closing could release the parent's
    /// locks). `forked` runs once in the child first.
    pub(crate) fn get(
        &self,
        open: impl FnOnce() -> interlock::Result<T>,
        forked: impl FnOnce(),
    ) -> interlock::Result<Arc<T>> {
        let mut c = self.cell.lock();
        let gen = hold::generation();
        if c.0 != gen {
            if let Some(old) = c.1.take() {
                std::mem::forget(old);
            }
            forked();
            c.0 = gen;
        }
        if let Some(l) = &c.1 {
            return Ok(Arc::clone(l));
        }
        let l = Arc::new(open()?);
        c.1 = Some(Arc::clone(&l));
        Ok(l)
    }

    /// Drops the lock (this process's), to be reopened on next use.
    pub(crate) fn close(&self) {
        let mut c = self.cell.lock();
        if c.0 == hold::generation() {
            c.1 = None;
        }
    }
}

/// A reader-writer lock on a file, shared by threads and processes.
#[pyclass(module = "interlock._native", name = "FileLock", subclass, frozen)]
pub(crate) struct PyFileLock {
    path: Arc<std::path::Path>,
    flavor: Flavor,
    mode: u32,
    writer_patience: Duration,
    reentrant: bool,
    key: Arc<hold::KeyState>,
    lock: PerProcess<FileLock>,
    holds: Holds,
}

impl PyFileLock {
    fn open(
        path: &PathBuf,
        flavor: Flavor,
        mode: u32,
        patience: Duration,
    ) -> interlock::Result<FileLock> {
        FileLock::options()
            .flavor(flavor)
            .mode(mode)
            .writer_patience(patience)
            .open(path)
    }

    fn core(&self, py: Python<'_>) -> PyResult<Arc<FileLock>> {
        self.lock
            .get(
                || {
                    Self::open(
                        &self.path.to_path_buf(),
                        self.flavor,
                        self.mode,
                        self.writer_patience,
                    )
                },
                || self.holds.forget(),
            )
            .map_err(|e| errors::from_error(py, &e))
    }

    fn request(&self, mode: Mode, what: &'static str) -> Request<'_> {
        Request {
            key: Some(&self.key),
            reentrant: self.reentrant,
            mode,
            path: &self.path,
            what,
            fast: Fast::TryFirst,
        }
    }

    fn take(&self, py: Python<'_>, kind: Kind, wait: Wait) -> PyResult<Py<Guard>> {
        let r = self.take_shared(py, kind, wait)?;
        hold::into_guard(py, &self.path, r)
    }

    fn take_shared(
        &self,
        py: Python<'_>,
        kind: Kind,
        wait: Wait,
    ) -> PyResult<(Arc<hold::Shared>, bool)> {
        let core = self.core(py)?;
        let (mode, what) = match kind {
            Kind::Read => (Mode::Shared, "the shared lock"),
            Kind::Upgradable => (Mode::Shared, "the upgradable lock"),
            Kind::Write => (Mode::Exclusive, "the exclusive lock"),
        };
        hold::acquire_shared(py, &self.holds, self.request(mode, what), wait, move |w| {
            let h = match kind {
                Kind::Read => Held::FileRead(core.read_arc(w)?),
                Kind::Upgradable => Held::FileUpgradable(core.upgradable_arc(w)?),
                Kind::Write => Held::FileWrite(core.write_arc(w)?),
            };
            Ok((h, false))
        })
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Read,
    Upgradable,
    Write,
}

pub(crate) fn flavor_arg(flavor: &str) -> PyResult<Flavor> {
    match flavor {
        "fcntl" => Ok(Flavor::Fcntl),
        "flock" => Ok(Flavor::Flock),
        other => Err(PyValueError::new_err(format!(
            "flavor must be \"fcntl\" or \"flock\", not {other:?}"
        ))),
    }
}

/// `writer_patience=` in seconds: `None` for the default (1 ms); a
/// non-negative number, too large to represent meaning never.
fn patience_arg(seconds: Option<f64>) -> PyResult<Duration> {
    let Some(t) = seconds else {
        return Ok(interlock::DEFAULT_WRITER_PATIENCE);
    };
    Ok(crate::wait::non_negative_secs("writer_patience", t)?.unwrap_or(Duration::MAX))
}

pub(crate) fn mode_arg(mode: i64) -> PyResult<u32> {
    if !(0..=0o7777).contains(&mode) {
        return Err(PyValueError::new_err(format!(
            "mode must be a permission mode such as 0o644, not {mode:#o}"
        )));
    }
    Ok(mode as u32)
}

#[pymethods]
impl PyFileLock {
    #[new]
    #[pyo3(signature = (path, *, flavor = "fcntl", mode = 0o644, reentrant = false, writer_patience = None))]
    fn py_new(
        py: Python<'_>,
        path: &Bound<'_, PyAny>,
        flavor: &str,
        mode: i64,
        reentrant: bool,
        writer_patience: Option<f64>,
    ) -> PyResult<Self> {
        let path = path_arg(path)?;
        let flavor = flavor_arg(flavor)?;
        let mode = mode_arg(mode)?;
        let patience = patience_arg(writer_patience)?;
        let lock = py
            .detach(|| Self::open(&path, flavor, mode, patience))
            .map_err(|e| errors::from_error(py, &e))?;
        let path = lock.path().to_path_buf();
        let meta = std::fs::metadata(&path).map_err(|e| {
            errors::from_error(
                py,
                &interlock::Error::io("open lock file", e).with_path(&path),
            )
        })?;
        let key = hold::intern(Key::File(meta.dev(), meta.ino(), flavor as u8));
        Ok(PyFileLock {
            path: path.into(),
            flavor,
            mode,
            writer_patience: patience,
            reentrant,
            key,
            lock: PerProcess::new(lock),
            holds: Holds::default(),
        })
    }

    /// The exclusive lock: a held Guard, or WouldBlock / Timeout.
    #[pyo3(signature = (blocking = true, timeout = None))]
    fn write(&self, py: Python<'_>, blocking: bool, timeout: Option<f64>) -> PyResult<Py<Guard>> {
        self.take(py, Kind::Write, wait_of(blocking, timeout)?)
    }

    /// A shared lock.
    #[pyo3(signature = (blocking = true, timeout = None))]
    fn read(&self, py: Python<'_>, blocking: bool, timeout: Option<f64>) -> PyResult<Py<Guard>> {
        self.take(py, Kind::Read, wait_of(blocking, timeout)?)
    }

    /// An upgradable shared lock (one at a time, alongside readers);
    /// `guard.upgrade()` makes it exclusive without letting a writer in.
    #[pyo3(signature = (blocking = true, timeout = None))]
    fn upgradable_read(
        &self,
        py: Python<'_>,
        blocking: bool,
        timeout: Option<f64>,
    ) -> PyResult<Py<Guard>> {
        self.take(py, Kind::Upgradable, wait_of(blocking, timeout)?)
    }

    /// threading.Lock style: True when taken, False when not.
    #[pyo3(signature = (blocking = true, timeout = -1.0, *, shared = false))]
    fn acquire(
        &self,
        py: Python<'_>,
        blocking: bool,
        timeout: f64,
        shared: bool,
    ) -> PyResult<bool> {
        let wait = wait_of_threading(blocking, timeout)?;
        let kind = if shared { Kind::Read } else { Kind::Write };
        let r = self.take_shared(py, kind, wait);
        hold::acquire_bool(py, &self.holds, &self.path, r)
    }

    /// Releases the latest hold taken by acquire() (any thread may call).
    fn release(&self, py: Python<'_>) -> PyResult<()> {
        hold::release_latest(py, &self.holds, &self.path)
    }

    /// Whether a lock taken through this object is held.
    fn locked(&self) -> bool {
        self.holds.any()
    }

    fn __enter__(slf: &Bound<'_, Self>) -> PyResult<Py<Self>> {
        let py = slf.py();
        let me = slf.get();
        let r = me.take_shared(py, Kind::Write, Wait::Forever)?;
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

    /// Releases everything held through this object and closes its file
    /// (it reopens on next use).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let r = self.holds.release_all(py);
        self.lock.close();
        r
    }

    #[getter]
    fn path(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }

    #[getter]
    fn flavor(&self) -> &'static str {
        match self.flavor {
            Flavor::Fcntl => "fcntl",
            Flavor::Flock => "flock",
        }
    }

    #[getter]
    fn reentrant(&self) -> bool {
        self.reentrant
    }

    /// Seconds a blocked writer lets readers come and go before it stops
    /// new ones.
    #[getter]
    fn writer_patience(&self) -> f64 {
        self.writer_patience.as_secs_f64()
    }

    fn __repr__(&self) -> String {
        format!(
            "<interlock.FileLock {} flavor={}>",
            self.path.display(),
            self.flavor()
        )
    }
}

/// Upgrades an upgradable guard to exclusive (files and shm).
pub(crate) fn upgrade(py: Python<'_>, g: &Guard, wait: Wait) -> PyResult<()> {
    let Some(s) = g.shared() else {
        return Err(errors::released_twice(g.lock_path()));
    };
    let taken = s.take_for_upgrade();
    let taken = match taken {
        Ok(h) => h,
        Err(msg) => {
            return Err(PyValueError::new_err(format!(
                "{msg}: {}",
                g.lock_path().display()
            )))
        }
    };
    match taken {
        Held::FileUpgradable(u) => {
            let cell = Mutex::new(Some(u));
            let r = crate::wait::run(py, wait, Fast::TryFirst, |w| {
                let Some(u) = cell.lock().take() else {
                    return Err(TryLockError::WouldBlock);
                };
                match u.upgrade_with(w) {
                    Ok(wg) => Ok(wg),
                    Err(failed) => {
                        let (back, e) = failed.into_parts();
                        *cell.lock() = back;
                        Err(e)
                    }
                }
            });
            let back = cell.into_inner().map(Held::FileUpgradable);
            match r {
                Ok(Ok(wg)) => {
                    s.put_back(Some(Held::FileWrite(wg)));
                    Ok(())
                }
                Ok(Err(e)) => {
                    s.put_back(back);
                    Err(errors::from_try(
                        py,
                        &e,
                        g.lock_path(),
                        "the exclusive lock (upgrade)",
                    ))
                }
                Err(e) => {
                    s.put_back(back);
                    Err(e)
                }
            }
        }
        Held::Shm(sg) => {
            let cell = Mutex::new(sg);
            let r = crate::wait::run(py, wait, Fast::TryFirst, |w| cell.lock().upgrade(w));
            s.put_back(Some(Held::Shm(cell.into_inner())));
            match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(errors::from_try(
                    py,
                    &e,
                    g.lock_path(),
                    "the exclusive lock (upgrade)",
                )),
                Err(e) => Err(e),
            }
        }
        other => {
            let kind = match &other {
                Held::FileRead(_) => "a read guard",
                Held::FileWrite(_) => "a write guard",
                _ => "this guard",
            };
            s.put_back(Some(other));
            Err(PyValueError::new_err(format!(
                "{kind} cannot be upgraded (take upgradable_read()): {}",
                g.lock_path().display()
            )))
        }
    }
}

/// Who holds or waits for locks on `path`, as far as the kernel shows.
#[pyfunction]
pub(crate) fn holders(py: Python<'_>, path: &Bound<'_, PyAny>) -> PyResult<Vec<Py<PyDict>>> {
    let path = path_arg(path)?;
    let hs = py
        .detach(|| interlock::holders(&path))
        .map_err(|e| errors::from_error(py, &e))?;
    hs.into_iter()
        .map(|h| {
            let d = PyDict::new(py);
            d.set_item("pid", h.pid)?;
            d.set_item("command", h.command)?;
            d.set_item(
                "mode",
                match h.mode {
                    Mode::Shared => "shared",
                    Mode::Exclusive => "exclusive",
                },
            )?;
            d.set_item("start", h.range.0)?;
            d.set_item("end", h.range.1)?;
            d.set_item("mechanism", h.kind.to_string())?;
            d.set_item("waiting", h.waiting)?;
            Ok(d.unbind())
        })
        .collect()
}

impl PyFileLock {
    /// The pending async acquisition of `kind` (crate::aio): the crate's
    /// future, and on its grant the hold recorded as `take_shared` records
    /// it.
    pub(crate) fn async_wait(
        slf: &Bound<'_, Self>,
        kind: &str,
        wait: Wait,
    ) -> PyResult<crate::aio::AsyncWait> {
        use crate::aio;
        let (kind, mode, what) = match kind {
            "read" => (Kind::Read, Mode::Shared, "the shared lock"),
            "upgradable_read" => (Kind::Upgradable, Mode::Shared, "the upgradable lock"),
            "write" => (Kind::Write, Mode::Exclusive, "the exclusive lock"),
            k => return Err(aio::bad_kind(k)),
        };
        let core = slf.get().core(slf.py())?;
        let fut = match kind {
            Kind::Read => aio::future(
                wait,
                || core.read_async(),
                |t| core.read_async_until(t),
                |g| (Held::FileRead(g), false),
            ),
            Kind::Upgradable => aio::future(
                wait,
                || core.upgradable_read_async(),
                |t| core.upgradable_read_async_until(t),
                |g| (Held::FileUpgradable(g), false),
            ),
            Kind::Write => aio::future(
                wait,
                || core.write_async(),
                |t| core.write_async_until(t),
                |g| (Held::FileWrite(g), false),
            ),
        };
        let obj = slf.clone().unbind();
        aio::AsyncWait::new(
            fut,
            Box::new(move |py, r| {
                let me = obj.get();
                aio::record_shared(py, &me.holds, me.request(mode, what), r)
            }),
        )
    }
}
