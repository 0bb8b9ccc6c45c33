//! `LockSet`: many reader-writer locks in one file. The Python layer turns
//! `int | range | slice | (a, b)` into the half-open `(start, end)` this
//! class takes.

use crate::errors;
use crate::file::{mode_arg, path_arg, PerProcess};
use crate::hold::{self, Guard, Held, Holds, Request};
use crate::setrecord;
use crate::wait::{wait_of, Fast};
use interlock::{LockSet, Mode, TryLockError, Wait};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

/// A lock set: one owner of its file's byte locks (its own, not its
/// thread's: any thread may lock and unlock through it).
#[pyclass(module = "interlock._native", name = "LockSet", subclass, frozen)]
pub(crate) struct PyLockSet {
    path: Arc<std::path::Path>,
    /// The file's (device, inode): whose sets [`crate::setrecord`] compares.
    file: (u64, u64),
    mode: u32,
    set: PerProcess<LockSet>,
    holds: Holds,
}

fn range_arg(start: u64, end: u64) -> PyResult<std::ops::Range<u64>> {
    if start >= end {
        return Err(PyValueError::new_err(format!(
            "empty index range {start}..{end}"
        )));
    }
    Ok(start..end)
}

fn mode_of(shared: bool) -> Mode {
    if shared {
        Mode::Shared
    } else {
        Mode::Exclusive
    }
}

impl PyLockSet {
    fn core(&self, py: Python<'_>) -> PyResult<Arc<LockSet>> {
        self.set
            .get(
                || LockSet::options().mode(self.mode).open(&self.path),
                || self.holds.forget(),
            )
            .map_err(|e| errors::from_error(py, &e))
    }

    /// `AlreadyHeld` if the request may wait and the calling thread (or
    /// task) locked some of `r` through another set of this file, which
    /// holds it in a mode that `mode` conflicts with: waiting would wait
    /// for itself. (A try is answered as usual: WouldBlock.) The holder's
    /// number.
    fn refuse_self_wait(
        &self,
        py: Python<'_>,
        set: &Arc<LockSet>,
        r: &std::ops::Range<u64>,
        mode: Mode,
        wait: Wait,
    ) -> PyResult<u64> {
        let holder = crate::wait::thread_ident();
        if !wait.may_block() {
            return Ok(holder);
        }
        let found = setrecord::conflict(self.file, set, holder, r, mode);
        match found {
            None => Ok(holder),
            Some((i, held)) => Err(errors::already_held(
                py,
                &self.path,
                &format!(
                    "index {i} {held}, locked by this thread through another LockSet of the \
                     same file"
                ),
            )),
        }
    }

    fn what(r: &std::ops::Range<u64>, shared: bool) -> String {
        format!(
            "the {} lock of indices {}..{} of",
            if shared { "shared" } else { "exclusive" },
            r.start,
            r.end
        )
    }
}

#[pymethods]
impl PyLockSet {
    #[new]
    #[pyo3(signature = (path, *, mode = 0o644))]
    fn py_new(py: Python<'_>, path: &Bound<'_, PyAny>, mode: i64) -> PyResult<Self> {
        let path = path_arg(path)?;
        let mode = mode_arg(mode)?;
        let set = py
            .detach(|| LockSet::options().mode(mode).open(&path))
            .map_err(|e| errors::from_error(py, &e))?;
        let meta = std::fs::metadata(set.path()).map_err(|e| {
            errors::from_error(
                py,
                &interlock::Error::io("open lock file", e).with_path(set.path()),
            )
        })?;
        Ok(PyLockSet {
            path: set.path().into(),
            file: (meta.dev(), meta.ino()),
            mode,
            set: PerProcess::new(set),
            holds: Holds::default(),
        })
    }

    /// Applies the mode to indices start..end in one atomic step (converting
    /// what this set holds there).
    #[pyo3(signature = (start, end, shared = false, blocking = true, timeout = None))]
    fn _lock(
        &self,
        py: Python<'_>,
        start: u64,
        end: u64,
        shared: bool,
        blocking: bool,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        let r = range_arg(start, end)?;
        let wait = wait_of(blocking, timeout)?;
        let set = self.core(py)?;
        let mode = mode_of(shared);
        let holder = self.refuse_self_wait(py, &set, &r, mode, wait)?;
        let rr = r.clone();
        let core = Arc::clone(&set);
        let got = crate::wait::run(py, wait, Fast::Detach, move |w| {
            core.lock_with(rr.clone(), mode, w)
        })?;
        got.map_err(|e| errors::from_try(py, &e, &self.path, &Self::what(&r, shared)))?;
        setrecord::locked(self.file, &set, holder, r);
        Ok(())
    }

    /// Releases indices start..end (what of them is held).
    fn _unlock(&self, py: Python<'_>, start: u64, end: u64) -> PyResult<()> {
        let r = range_arg(start, end)?;
        let set = self.core(py)?;
        py.detach(|| set.unlock(r.clone()))
            .map_err(|e| errors::from_error(py, &e))?;
        setrecord::unlocked(self.file, &set, r);
        Ok(())
    }

    /// Releases everything this set holds.
    fn unlock_all(&self, py: Python<'_>) -> PyResult<()> {
        let set = self.core(py)?;
        py.detach(|| set.unlock_all())
            .map_err(|e| errors::from_error(py, &e))?;
        setrecord::unlocked(self.file, &set, 0..interlock::INDEX_END);
        Ok(())
    }

    /// What this set holds: (start, end, "shared" | "exclusive") runs.
    fn _held(&self, py: Python<'_>) -> PyResult<Vec<(u64, u64, &'static str)>> {
        let set = self.core(py)?;
        Ok(py
            .detach(|| set.held())
            .into_iter()
            .map(|(r, m)| (r.start, r.end, mode_name(m)))
            .collect())
    }

    /// The mode index i is held in, or None.
    fn mode_of(&self, py: Python<'_>, i: u64) -> PyResult<Option<&'static str>> {
        let set = self.core(py)?;
        Ok(py.detach(|| set.mode_of(i)).map(mode_name))
    }

    /// A scope: applies the mode to start..end until the returned guard is
    /// released, then restores what this set held there before.
    #[pyo3(signature = (start, end, shared = false, blocking = true, timeout = None))]
    fn _scope(
        &self,
        py: Python<'_>,
        start: u64,
        end: u64,
        shared: bool,
        blocking: bool,
        timeout: Option<f64>,
    ) -> PyResult<Py<Guard>> {
        let r = range_arg(start, end)?;
        let wait = wait_of(blocking, timeout)?;
        let set = self.core(py)?;
        let mode = mode_of(shared);
        let holder = self.refuse_self_wait(py, &set, &r, mode, wait)?;
        let what = Self::what(&r, shared);
        let req = Request {
            key: None,
            reentrant: false,
            mode,
            path: &self.path,
            what: &what,
            fast: Fast::Detach,
        };
        let core = Arc::clone(&set);
        let rr = r.clone();
        let g = hold::acquire(py, &self.holds, req, wait, move |w| {
            let s = core.scope_arc(rr.clone(), mode, w)?;
            Ok::<_, TryLockError>((Held::Scope(s), false))
        })?;
        setrecord::locked(self.file, &set, holder, r);
        Ok(g)
    }

    /// Releases everything and closes the file (reopened on next use).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let r = self.holds.release_all(py);
        if let Ok(set) = self.core(py) {
            py.detach(|| set.unlock_all())
                .map_err(|e| errors::from_error(py, &e))?;
            setrecord::unlocked(self.file, &set, 0..interlock::INDEX_END);
        }
        self.set.close();
        r
    }

    #[getter]
    fn path(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }

    fn __repr__(&self) -> String {
        format!("<interlock.LockSet {}>", self.path.display())
    }
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Shared => "shared",
        Mode::Exclusive => "exclusive",
    }
}

impl PyLockSet {
    /// The pending async scope of `start..end` (crate::aio), checked and,
    /// on its grant, recorded as `_scope` does.
    pub(crate) fn async_wait(
        slf: &Bound<'_, Self>,
        start: u64,
        end: u64,
        shared: bool,
        wait: Wait,
    ) -> PyResult<crate::aio::AsyncWait> {
        use crate::aio;
        let py = slf.py();
        let me = slf.get();
        let r = range_arg(start, end)?;
        let set = me.core(py)?;
        let mode = mode_of(shared);
        let holder = me.refuse_self_wait(py, &set, &r, mode, wait)?;
        let fut = aio::future(
            wait,
            || set.scope_async(r.clone(), mode),
            |t| set.scope_async_until(r.clone(), mode, t),
            |s| (Held::Scope(s), false),
        );
        let obj = slf.clone().unbind();
        aio::AsyncWait::new(
            fut,
            Box::new(move |py, got| {
                let me = obj.get();
                let what = Self::what(&r, shared);
                let h = got.map_err(|e| aio::raise(py, &e, &me.path, &what))?;
                let req = Request {
                    key: None,
                    reentrant: false,
                    mode,
                    path: &me.path,
                    what: &what,
                    fast: Fast::Detach,
                };
                let g = hold::acquire(py, &me.holds, req, Wait::NonBlocking, aio::given(h))?;
                setrecord::locked(me.file, &set, holder, r);
                Ok(g)
            }),
        )
    }
}
