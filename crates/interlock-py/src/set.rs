//! `LockSet`: many reader-writer locks in one file. The Python layer turns
//! `int | range | slice | (a, b)` into the half-open `(start, end)` this
//! class takes.

use crate::errors;
use crate::file::{mode_arg, path_arg, PerProcess};
use crate::hold::{self, Guard, Held, Holds, Request};
use crate::wait::{wait_of, Fast};
use interlock::{LockSet, Mode, TryLockError};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use std::sync::Arc;

/// A lock set: one owner of its file's byte locks (its own, not its
/// thread's: any thread may lock and unlock through it).
#[pyclass(module = "interlock._native", name = "LockSet", subclass, frozen)]
pub(crate) struct PyLockSet {
    path: Arc<std::path::Path>,
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
        Ok(PyLockSet {
            path: set.path().into(),
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
        let rr = r.clone();
        let got = crate::wait::run(py, wait, Fast::Detach, move |w| {
            set.lock_with(rr.clone(), mode, w)
        })?;
        got.map_err(|e| errors::from_try(py, &e, &self.path, &Self::what(&r, shared)))
    }

    /// Releases indices start..end (what of them is held).
    fn _unlock(&self, py: Python<'_>, start: u64, end: u64) -> PyResult<()> {
        let r = range_arg(start, end)?;
        let set = self.core(py)?;
        py.detach(|| set.unlock(r))
            .map_err(|e| errors::from_error(py, &e))
    }

    /// Releases everything this set holds.
    fn unlock_all(&self, py: Python<'_>) -> PyResult<()> {
        let set = self.core(py)?;
        py.detach(|| set.unlock_all())
            .map_err(|e| errors::from_error(py, &e))
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
        let what = Self::what(&r, shared);
        let req = Request {
            key: None,
            reentrant: false,
            mode,
            path: &self.path,
            what: &what,
            fast: Fast::Detach,
        };
        hold::acquire(py, &self.holds, req, wait, move |w| {
            let s = set.scope_arc(r.clone(), mode, w)?;
            Ok::<_, TryLockError>((Held::Scope(s), false))
        })
    }

    /// Releases everything and closes the file (reopened on next use).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let r = self.holds.release_all(py);
        if let Ok(set) = self.core(py) {
            py.detach(|| set.unlock_all())
                .map_err(|e| errors::from_error(py, &e))?;
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
