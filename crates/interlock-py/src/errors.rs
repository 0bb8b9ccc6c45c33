//! Errors of the Rust crate as the Python exceptions a Python user catches.
//!
//! The exception classes are defined in Python (`interlock/_errors.py`),
//! where multiple inheritance is plain (`WouldBlock` is both a `LockError`
//! and a `BlockingIOError`); this module looks them up once and raises
//! them with a message that names the path and a `.path` attribute. Bad
//! paths become the built-in `OSError` subclasses, chosen by errno.

use interlock::{Error, ErrorKind, TryLockError};
use pyo3::exceptions::{
    PyFileNotFoundError, PyIsADirectoryError, PyNotADirectoryError, PyOSError, PyPermissionError,
    PyRuntimeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;
use std::path::Path;

/// The exception classes of `interlock._errors`.
pub(crate) enum Class {
    LockError,
    WouldBlock,
    Timeout,
    Deadlock,
    OwnerDied,
    LeaseLost,
    AlreadyHeld,
}

fn class<'py>(py: Python<'py>, c: Class) -> PyResult<&'py Bound<'py, PyType>> {
    static CELLS: [PyOnceLock<Py<PyType>>; 7] = [
        PyOnceLock::new(),
        PyOnceLock::new(),
        PyOnceLock::new(),
        PyOnceLock::new(),
        PyOnceLock::new(),
        PyOnceLock::new(),
        PyOnceLock::new(),
    ];
    let (i, name) = match c {
        Class::LockError => (0, "LockError"),
        Class::WouldBlock => (1, "WouldBlock"),
        Class::Timeout => (2, "Timeout"),
        Class::Deadlock => (3, "Deadlock"),
        Class::OwnerDied => (4, "OwnerDied"),
        Class::LeaseLost => (5, "LeaseLost"),
        Class::AlreadyHeld => (6, "AlreadyHeld"),
    };
    CELLS[i].import(py, "interlock._errors", name)
}

/// An `interlock` exception of class `c` with `message`, its `.path` set.
pub(crate) fn lock_error(py: Python<'_>, c: Class, message: String, path: Option<&Path>) -> PyErr {
    let path = path.map(|p| p.to_string_lossy().into_owned());
    match class(py, c) {
        Ok(cls) => match cls.call1((message, path)) {
            Ok(e) => PyErr::from_value(e),
            Err(e) => e,
        },
        Err(e) => e,
    }
}

/// A Python exception for a crate error, which names the path itself.
pub(crate) fn from_error(py: Python<'_>, e: &Error) -> PyErr {
    let message = e.to_string();
    let path = e.path();
    let os = |ctor: fn(i32, String) -> PyErr, errno: i32| {
        let err = ctor(errno, message.clone());
        if let Some(p) = path {
            let p = p.to_string_lossy().into_owned();
            let _ = err.value(py).setattr("filename", p.clone());
            let _ = err.value(py).setattr("path", p);
        }
        err
    };
    if let Some(errno) = e.raw_os_error() {
        match errno {
            libc::ENOENT => return os(|n, m| PyFileNotFoundError::new_err((n, m)), errno),
            libc::ENOTDIR => return os(|n, m| PyNotADirectoryError::new_err((n, m)), errno),
            libc::EISDIR => return os(|n, m| PyIsADirectoryError::new_err((n, m)), errno),
            libc::EACCES | libc::EPERM | libc::EROFS => {
                return os(|n, m| PyPermissionError::new_err((n, m)), errno)
            }
            _ => {}
        }
    }
    match e.kind() {
        ErrorKind::WouldBlock => lock_error(py, Class::WouldBlock, message, path),
        ErrorKind::TimedOut => lock_error(py, Class::Timeout, message, path),
        ErrorKind::Deadlock => lock_error(py, Class::Deadlock, message, path),
        ErrorKind::OwnerDied => lock_error(py, Class::OwnerDied, message, path),
        ErrorKind::LeaseLost => lock_error(py, Class::LeaseLost, message, path),
        ErrorKind::NotFound => os(|n, m| PyFileNotFoundError::new_err((n, m)), libc::ENOENT),
        ErrorKind::PermissionDenied => os(|n, m| PyPermissionError::new_err((n, m)), libc::EACCES),
        ErrorKind::InvalidInput => PyValueError::new_err(message),
        ErrorKind::Corrupt if path.is_some_and(|p| p.is_dir()) => {
            os(|n, m| PyIsADirectoryError::new_err((n, m)), libc::EISDIR)
        }
        ErrorKind::Io => match e.raw_os_error() {
            Some(errno) => os(|n, m| PyOSError::new_err((n, m)), errno),
            None => lock_error(py, Class::LockError, message, path),
        },
        _ => lock_error(py, Class::LockError, message, path),
    }
}

/// A Python exception for a failed acquisition of the lock at `path`;
/// `what` names it ("lock", "shared lock", "lease").
pub(crate) fn from_try(py: Python<'_>, e: &TryLockError, path: &Path, what: &str) -> PyErr {
    match e {
        TryLockError::WouldBlock => lock_error(
            py,
            Class::WouldBlock,
            format!("{what} {} is held elsewhere (not waiting)", path.display()),
            Some(path),
        ),
        TryLockError::TimedOut => lock_error(
            py,
            Class::Timeout,
            format!("timed out waiting for {what} {}", path.display()),
            Some(path),
        ),
        TryLockError::Error(e) => {
            if e.path().is_none() {
                let e2 = Error::new(e.kind(), e.operation())
                    .with_path(path)
                    .with_detail(e.to_string());
                return from_error(py, &e2);
            }
            from_error(py, e)
        }
    }
}

/// `AlreadyHeld`: this thread holds the lock already.
pub(crate) fn already_held(py: Python<'_>, path: &Path, detail: &str) -> PyErr {
    lock_error(
        py,
        Class::AlreadyHeld,
        format!(
            "this thread already holds {} ({detail}); waiting would deadlock",
            path.display()
        ),
        Some(path),
    )
}

/// A second release of one guard.
pub(crate) fn released_twice(path: &Path) -> PyErr {
    PyRuntimeError::new_err(format!(
        "the guard of {} was already released",
        path.display()
    ))
}

/// Whether `e` is "not taken" (WouldBlock or Timeout), which
/// `acquire()` answers with False.
pub(crate) fn is_not_taken(py: Python<'_>, e: &PyErr) -> bool {
    let is = |c| class(py, c).is_ok_and(|cls| e.is_instance(py, cls));
    is(Class::WouldBlock) || is(Class::Timeout)
}
