//! What Python holds: the [`Guard`] object, the per-thread record of holds
//! that makes reentrancy defined, and fork safety of both.
//!
//! A guard owns an `Arc<Shared>`; a reentrant re-acquisition hands out
//! another guard on the same `Shared` and bumps its count; the last release
//! drops the crate's guard, which releases the lock. The record maps (lock,
//! thread) to the `Shared` the thread holds, so that a second request from
//! the same thread is answered at once (`AlreadyHeld`, or a count) instead
//! of waiting for itself.

use crate::errors;
use interlock::{
    FileReadGuard, FileSemaphoreGuard, FileUpgradableGuard, FileWriteGuard, LeaseGuard, Mode,
    Scope, SemaphoreGuard, ShmArcGuard, ShmHold, ShmMutexArcGuard,
};
use parking_lot::Mutex;
use pyo3::exceptions::PyStopIteration;
use pyo3::prelude::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The fork generation now (differs in a forked child).
pub(crate) fn generation() -> u64 {
    interlock::__fork::generation()
}

/// A crate guard of any family.
pub(crate) enum Held {
    FileRead(FileReadGuard<'static>),
    FileWrite(FileWriteGuard<'static>),
    FileUpgradable(FileUpgradableGuard<'static>),
    Shm(ShmArcGuard),
    Mutex(ShmMutexArcGuard),
    Lease(LeaseGuard<'static>),
    Scope(Scope<'static>),
    /// Permits of a `Semaphore` / `FileSemaphore` (crate::sem).
    Sem(SemaphoreGuard<'static>),
    FileSem(FileSemaphoreGuard<'static>),
}

impl Held {
    pub(crate) fn mode(&self) -> Mode {
        match self {
            Held::FileRead(_) | Held::FileUpgradable(_) => Mode::Shared,
            Held::Shm(g) if g.hold() != Some(ShmHold::Write) => Mode::Shared,
            _ => Mode::Exclusive,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Held::FileRead(_) => "read",
            Held::FileWrite(_) => "write",
            Held::FileUpgradable(_) => "upgradable_read",
            Held::Shm(g) => match g.hold() {
                Some(ShmHold::Read) => "read",
                Some(ShmHold::Upgradable) => "upgradable_read",
                _ => "write",
            },
            Held::Mutex(_) => "lock",
            Held::Lease(_) => "lease",
            Held::Scope(_) => "scope",
            Held::Sem(_) | Held::FileSem(_) => "permits",
        }
    }

    /// Releases, reporting what drop would swallow.
    fn release(self) -> interlock::Result<()> {
        match self {
            Held::FileRead(g) => g.unlock(),
            Held::FileWrite(g) => g.unlock(),
            Held::FileUpgradable(g) => g.unlock(),
            Held::Shm(mut g) => g.unlock(),
            Held::Mutex(mut g) => g.unlock(),
            Held::Lease(g) => g.release(),
            Held::Scope(s) => s.restore(),
            Held::Sem(g) => g.release(),
            Held::FileSem(g) => g.release(),
        }
    }
}

/// Which lock a hold is of, for the per-thread record.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Key {
    /// A file lock: device, inode, flavor.
    File(u64, u64, u8),
    /// A named shared-memory lock: its path.
    Shm(PathBuf),
    /// An anonymous shared-memory lock: the address of its handle.
    Anon(usize),
    /// A lease: the lock directory's path.
    Lease(PathBuf),
}

/// Who of this process holds one lock, by holder (thread or task): shared
/// by every lock object of the same lock (interned by [`intern`]), so the
/// check costs one uncontended mutex and a scan of a vector of (usually)
/// at most one entry.
pub(crate) struct KeyState {
    /// (fork generation, [(holder, hold)]).
    holders: Mutex<(u64, Holders)>,
}

/// Holds of one lock by holder (thread or task number).
type Holders = Vec<(u64, Arc<Shared>)>;

impl KeyState {
    fn with<T>(&self, f: impl FnOnce(&mut Holders) -> T) -> T {
        let mut h = self.holders.lock();
        let gen = generation();
        if h.0 != gen {
            // A forked child: the holds are the parent's. Forget them (dropping
            // them would release the parent's locks).
            std::mem::forget(std::mem::take(&mut h.1));
            h.0 = gen;
        }
        f(&mut h.1)
    }

    fn remove(&self, thread: u64, s: &Arc<Shared>) {
        self.with(|v| v.retain(|(t, x)| !(*t == thread && Arc::ptr_eq(x, s))));
    }
}

static INTERNED: Mutex<Option<HashMap<Key, std::sync::Weak<KeyState>>>> = Mutex::new(None);

/// The one [`KeyState`] of `key` in this process.
pub(crate) fn intern(key: Key) -> Arc<KeyState> {
    let mut m = INTERNED.lock();
    let m = m.get_or_insert_with(HashMap::new);
    if let Some(k) = m.get(&key).and_then(std::sync::Weak::upgrade) {
        return k;
    }
    m.retain(|_, w| w.strong_count() > 0);
    let k = Arc::new(KeyState {
        holders: Mutex::new((generation(), Vec::new())),
    });
    m.insert(key, Arc::downgrade(&k));
    k
}

fn unrecord(s: &Arc<Shared>) {
    if let Some((k, t)) = &s.record {
        k.remove(*t, s);
    }
}

/// The hold behind one or more guards (more than one when reentrant).
pub(crate) struct Shared {
    held: Mutex<Option<Held>>,
    count: AtomicUsize,
    gen: u64,
    record: Option<(Arc<KeyState>, u64)>,
    pub(crate) owner: usize,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if self.gen != generation() {
            // Inherited across fork: never release the parent's lock.
            if let Some(h) = self.held.get_mut().take() {
                std::mem::forget(h);
            }
        }
    }
}

impl Shared {
    /// The crate guard, taken out for an upgrade (put back with
    /// [`Shared::put_back`]).
    pub(crate) fn take_for_upgrade(&self) -> Result<Held, &'static str> {
        if self.count.load(Ordering::Acquire) != 1 {
            return Err("a reentrant hold counted more than once cannot be upgraded");
        }
        self.held.lock().take().ok_or("the guard was released")
    }

    pub(crate) fn put_back(&self, h: Option<Held>) {
        *self.held.lock() = h;
    }
}

/// What a thread already holds of `key`, if anything.
pub(crate) enum Prior {
    None,
    /// Held by this thread through the object `owner` in `mode`.
    Held {
        shared: Arc<Shared>,
        mode: Mode,
    },
}

/// Looks up what `thread` holds of `key`.
pub(crate) fn prior(key: &KeyState, thread: u64) -> Prior {
    key.with(|v| match v.iter().find(|(t, _)| *t == thread) {
        Some((_, s)) => {
            let mode = s.held.lock().as_ref().map_or(Mode::Shared, Held::mode);
            Prior::Held {
                shared: Arc::clone(s),
                mode,
            }
        }
        None => Prior::None,
    })
}

/// A new hold by `thread` (recorded under `key` if given).
pub(crate) fn new_shared(
    held: Held,
    key: Option<&Arc<KeyState>>,
    thread: u64,
    owner: usize,
) -> Arc<Shared> {
    let s = Arc::new(Shared {
        held: Mutex::new(Some(held)),
        count: AtomicUsize::new(1),
        gen: generation(),
        record: key.map(|k| (Arc::clone(k), thread)),
        owner,
    });
    if let Some(k) = key {
        k.with(|v| v.push((thread, Arc::clone(&s))));
    }
    s
}

/// One more guard on an existing (reentrant) hold.
pub(crate) fn count_again(s: &Arc<Shared>) -> Arc<Shared> {
    s.count.fetch_add(1, Ordering::AcqRel);
    Arc::clone(s)
}

/// Gives up one share of a hold; the last one releases the lock. In a
/// forked child an inherited hold is forgotten instead (nothing released).
pub(crate) fn release_shared(py: Python<'_>, s: Arc<Shared>) -> PyResult<()> {
    if s.gen != generation() {
        std::mem::forget(s);
        return Ok(());
    }
    if s.count.fetch_sub(1, Ordering::AcqRel) != 1 {
        return Ok(());
    }
    unrecord(&s);
    let held = s.held.lock().take();
    let r = match held {
        Some(h @ (Held::Lease(_) | Held::Scope(_))) => py.detach(|| h.release()),
        Some(h) => h.release(),
        None => Ok(()),
    };
    r.map_err(|e| errors::from_error(py, &e))
}

/// A held lock, as Python sees it: a context manager (also `async with`),
/// releasable once, from any thread.
#[pyclass(module = "interlock._native", name = "Guard", frozen)]
pub(crate) struct Guard {
    shared: Mutex<Option<Arc<Shared>>>,
    gen: u64,
    path: Arc<Path>,
    token: Option<u64>,
}

impl Guard {
    pub(crate) fn new(shared: Arc<Shared>, path: Arc<Path>) -> Guard {
        let token = match &*shared.held.lock() {
            Some(Held::Lease(g)) => Some(g.token()),
            _ => None,
        };
        Guard {
            shared: Mutex::new(Some(shared)),
            gen: generation(),
            path,
            token,
        }
    }

    /// Runs `f` on the crate guard, if still held by this guard.
    pub(crate) fn with_held<T>(&self, f: impl FnOnce(&mut Held) -> T) -> Option<T> {
        let s = self.shared.lock().clone()?;
        if s.gen != generation() {
            return None;
        }
        let mut h = s.held.lock();
        h.as_mut().map(f)
    }

    /// The hold, for an upgrade: the `Shared` (if still held and not
    /// inherited).
    pub(crate) fn shared(&self) -> Option<Arc<Shared>> {
        let s = self.shared.lock().clone()?;
        (s.gen == generation()).then_some(s)
    }

    pub(crate) fn lock_path(&self) -> &Path {
        &self.path
    }

    /// Releases this guard's share of the hold. `Ok(false)` if it was
    /// released already.
    fn release_inner(&self, py: Python<'_>) -> PyResult<bool> {
        let Some(s) = self.shared.lock().take() else {
            return Ok(false);
        };
        release_shared(py, s)?;
        Ok(true)
    }

    /// Updates the record after an upgrade or downgrade (nothing to do: the
    /// mode is read from the crate guard).
    pub(crate) fn is_inherited(&self) -> bool {
        self.gen != generation()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(s) = self.shared.get_mut().take() {
            if s.gen != generation() {
                std::mem::forget(s);
                return;
            }
            if s.count.fetch_sub(1, Ordering::AcqRel) == 1 {
                unrecord(&s);
                let held = s.held.lock().take();
                drop(held);
            }
        }
    }
}

#[pymethods]
impl Guard {
    /// Releases the lock (this guard's share of it, if reentrant). Any
    /// thread may call it. A second release raises RuntimeError. In a forked
    /// child, an inherited guard releases nothing of the parent's.
    fn release(&self, py: Python<'_>) -> PyResult<()> {
        if self.release_inner(py)? {
            Ok(())
        } else {
            Err(errors::released_twice(&self.path))
        }
    }

    /// Whether this guard still holds its lock (False once released, and
    /// in a forked child for an inherited guard).
    #[getter]
    fn held(&self) -> bool {
        if self.is_inherited() {
            return false;
        }
        self.shared.lock().is_some()
    }

    /// "read", "write", "upgradable_read", "lock", "lease", "scope" or "permits";
    /// None once released.
    #[getter]
    fn mode(&self) -> Option<&'static str> {
        self.with_held(|h| h.kind())
    }

    /// The lock's path or name.
    #[getter]
    fn path(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }

    /// The fencing token (a lease guard), else None.
    #[getter]
    fn token(&self) -> Option<u64> {
        self.token
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.release_inner(py)?;
        Ok(false)
    }

    fn __aenter__(slf: Py<Self>, py: Python<'_>) -> Ready {
        Ready {
            value: Mutex::new(Some(slf.into_any())),
        }
        .with_py(py)
    }

    #[pyo3(signature = (*_args))]
    fn __aexit__(
        &self,
        py: Python<'_>,
        _args: &Bound<'_, pyo3::types::PyTuple>,
    ) -> PyResult<Ready> {
        self.release_inner(py)?;
        Ok(Ready {
            value: Mutex::new(Some(
                false.into_pyobject(py)?.to_owned().into_any().unbind(),
            )),
        })
    }

    /// Upgradable to exclusive, waiting as allowed (WouldBlock / Timeout
    /// otherwise, the upgradable hold kept).
    #[pyo3(signature = (timeout = None, *, blocking = true))]
    fn upgrade(&self, py: Python<'_>, timeout: Option<f64>, blocking: bool) -> PyResult<()> {
        crate::file::upgrade(py, self, crate::wait::wait_of(blocking, timeout)?)
    }

    /// Upgrades if that needs no waiting: True if done, False if not (the
    /// upgradable hold kept).
    fn try_upgrade(&self, py: Python<'_>) -> PyResult<bool> {
        match crate::file::upgrade(py, self, interlock::Wait::NonBlocking) {
            Ok(()) => Ok(true),
            Err(e) if errors::is_not_taken(py, &e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Declares the data repaired after OwnerDied (exclusive shm guards).
    fn clear_poison(&self, py: Python<'_>) -> PyResult<()> {
        let r = self.with_held(|h| match h {
            Held::Shm(g) => g.clear_poison(),
            Held::Mutex(g) => g.clear_poison(),
            _ => Err(
                interlock::Error::new(interlock::ErrorKind::InvalidInput, "clear poison")
                    .with_detail("only shared-memory write and mutex guards carry poison"),
            ),
        });
        match r {
            None => Err(errors::released_twice(&self.path)),
            Some(r) => r.map_err(|e| errors::from_error(py, &e)),
        }
    }

    /// Whether this guard carries a dead writer's poison (shm).
    #[getter]
    fn poisoned(&self) -> bool {
        self.with_held(|h| match h {
            Held::Shm(g) => g.is_poisoned(),
            Held::Mutex(g) => g.is_poisoned(),
            _ => false,
        })
        .unwrap_or(false)
    }

    fn __repr__(&self) -> String {
        let mode = self.mode().unwrap_or("released");
        format!("<interlock.Guard {} {}>", mode, self.path.display())
    }
}

/// An awaitable that is already done: `await` gives its value at once.
#[pyclass(module = "interlock._native", name = "Ready", frozen)]
pub(crate) struct Ready {
    value: Mutex<Option<Py<PyAny>>>,
}

impl Ready {
    fn with_py(self, _py: Python<'_>) -> Ready {
        self
    }
}

#[pymethods]
impl Ready {
    fn __await__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyErr {
        let v = self.value.lock().take().unwrap_or_else(|| py.None());
        PyStopIteration::new_err((v,))
    }
}

/// What a lock object has handed out: every hold taken through it (for
/// `locked()` and `close()`), and the holds of `acquire()` and `with lock:`
/// waiting for their `release()` / exit.
#[derive(Default)]
pub(crate) struct Holds {
    all: Mutex<Vec<std::sync::Weak<Shared>>>,
    stack: Mutex<Vec<Arc<Shared>>>,
}

impl Holds {
    fn add(&self, s: &Arc<Shared>) {
        let mut all = self.all.lock();
        if all.len() >= 32 {
            all.retain(|w| w.strong_count() > 0);
        }
        all.push(Arc::downgrade(s));
    }

    /// Whether anything taken through this object is held (in this process).
    pub(crate) fn any(&self) -> bool {
        let gen = generation();
        self.all.lock().iter().any(|w| {
            w.upgrade()
                .is_some_and(|s| s.gen == gen && s.held.lock().is_some())
        })
    }

    /// Releases everything taken through this object (in this process);
    /// the first error is reported.
    pub(crate) fn release_all(&self, py: Python<'_>) -> PyResult<()> {
        let stack = std::mem::take(&mut *self.stack.lock());
        drop(stack);
        let gen = generation();
        let all = std::mem::take(&mut *self.all.lock());
        let mut first = None;
        for w in all {
            let Some(s) = w.upgrade() else { continue };
            if s.gen != gen {
                continue;
            }
            unrecord(&s);
            let held = s.held.lock().take();
            if let Some(h) = held {
                if let Err(e) = py.detach(|| h.release()) {
                    first.get_or_insert(e);
                }
            }
        }
        match first {
            Some(e) => Err(errors::from_error(py, &e)),
            None => Ok(()),
        }
    }

    /// Keeps a guard of `acquire()` / `with lock:` for `release()`.
    pub(crate) fn push(&self, s: Arc<Shared>) {
        self.stack.lock().push(s);
    }

    /// The latest hold of `acquire()` / `with lock:`.
    pub(crate) fn pop(&self) -> Option<Arc<Shared>> {
        self.stack.lock().pop()
    }

    /// Forgets everything (a forked child's copy of its parent's holds).
    pub(crate) fn forget(&self) {
        std::mem::forget(std::mem::take(&mut *self.stack.lock()));
        std::mem::forget(std::mem::take(&mut *self.all.lock()));
    }
}

/// An acquisition, common to every family.
pub(crate) struct Request<'a> {
    pub key: Option<&'a Arc<KeyState>>,
    pub reentrant: bool,
    /// The lock object's address (reentrancy counts only through one object).
    pub owner: usize,
    pub mode: Mode,
    pub path: &'a Arc<Path>,
    /// For messages: "lock", "shared lock", "lease", ...
    pub what: &'a str,
    pub fast: crate::wait::Fast,
}

/// Acquires as `wait` allows through `f`, which returns the crate guard
/// and whether the lock was poisoned (a dead writer: the guard is held and
/// comes with `OwnerDied`).
pub(crate) fn acquire(
    py: Python<'_>,
    holds: &Holds,
    req: Request<'_>,
    wait: interlock::Wait,
    f: impl Fn(interlock::Wait) -> Result<(Held, bool), interlock::TryLockError> + Send + Sync,
) -> PyResult<Py<Guard>> {
    let path = Arc::clone(req.path);
    into_guard(py, &path, acquire_shared(py, holds, req, wait, f)?)
}

/// The guard object of a hold (`OwnerDied` carrying it if poisoned).
pub(crate) fn into_guard(
    py: Python<'_>,
    path: &Arc<Path>,
    (s, poisoned): (Arc<Shared>, bool),
) -> PyResult<Py<Guard>> {
    let g = Py::new(py, Guard::new(s, Arc::clone(path)))?;
    if poisoned {
        return Err(owner_died(py, path, g));
    }
    Ok(g)
}

/// `with lock:`: keeps the hold for `__exit__` (or raises `OwnerDied`).
pub(crate) fn enter(
    py: Python<'_>,
    holds: &Holds,
    path: &Arc<Path>,
    r: (Arc<Shared>, bool),
) -> PyResult<()> {
    if r.1 {
        return into_guard(py, path, r).map(drop);
    }
    holds.push(r.0);
    Ok(())
}

fn owner_died(py: Python<'_>, path: &Path, g: Py<Guard>) -> PyErr {
    let e = errors::lock_error(
        py,
        errors::Class::OwnerDied,
        format!(
            "the previous holder of {} died holding it exclusively; the lock is held now \
             (the exception's .guard), and the data it protects may be inconsistent",
            path.display()
        ),
        Some(path),
    );
    if let Err(x) = e.value(py).setattr("guard", g) {
        return x;
    }
    e
}

/// [`acquire`] without the guard object: the hold and whether it came
/// poisoned.
pub(crate) fn acquire_shared(
    py: Python<'_>,
    holds: &Holds,
    req: Request<'_>,
    wait: interlock::Wait,
    f: impl Fn(interlock::Wait) -> Result<(Held, bool), interlock::TryLockError> + Send + Sync,
) -> PyResult<(Arc<Shared>, bool)> {
    let thread = crate::wait::thread_ident();
    if let Some(key) = req.key {
        if let Prior::Held { shared, mode } = prior(key, thread) {
            let covered = mode == Mode::Exclusive || req.mode == Mode::Shared;
            if req.reentrant && shared.owner == req.owner && covered {
                return Ok((count_again(&shared), false));
            }
            let detail = if req.reentrant && shared.owner == req.owner {
                format!("{mode}; a reentrant lock counts only requests its hold covers")
            } else if shared.owner == req.owner {
                format!("{mode}, through this object")
            } else {
                format!("{mode}, through another lock object")
            };
            return Err(errors::already_held(py, req.path, &detail));
        }
    }
    let got = crate::wait::run(py, wait, req.fast, f)?;
    let (held, poisoned) = got.map_err(|e| errors::from_try(py, &e, req.path, req.what))?;
    let s = new_shared(held, req.key, thread, req.owner);
    holds.add(&s);
    Ok((s, poisoned))
}

/// `threading.Lock.acquire` on top of [`acquire`]: True when taken, False
/// when not (WouldBlock, Timeout); the guard is kept for `release()`.
pub(crate) fn acquire_bool(
    py: Python<'_>,
    holds: &Holds,
    path: &Arc<Path>,
    r: PyResult<(Arc<Shared>, bool)>,
) -> PyResult<bool> {
    match r {
        Ok((s, false)) => {
            holds.push(s);
            Ok(true)
        }
        Ok((s, true)) => {
            let g = Py::new(py, Guard::new(s, Arc::clone(path)))?;
            Err(owner_died(py, path, g))
        }
        Err(e) if errors::is_not_taken(py, &e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `threading.Lock.release`: releases the latest `acquire()` hold.
pub(crate) fn release_latest(
    py: Python<'_>,
    holds: &Holds,
    path: &std::path::Path,
) -> PyResult<()> {
    match holds.pop() {
        Some(s) => release_shared(py, s),
        None => Err(pyo3::exceptions::PyRuntimeError::new_err(format!(
            "release of {}: not acquired through acquire() or `with`",
            path.display()
        ))),
    }
}
