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
    PgGuard, Scope, SemaphoreGuard, ShmArcGuard, ShmHold, ShmMutexArcGuard,
};
use parking_lot::Mutex;
use pyo3::exceptions::PyStopIteration;
use pyo3::prelude::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
    /// A `PgLock` / `PgMutex` (crate::pg). Boxed: the guard is 160 bytes,
    /// and every hold of every family moves a `Held` a few times (the
    /// others are 32-64).
    Pg(Box<PgGuard<'static>>),
}

impl Held {
    pub(crate) fn mode(&self) -> Mode {
        match self {
            Held::FileRead(_) | Held::FileUpgradable(_) => Mode::Shared,
            Held::Shm(g) if g.hold() != Some(ShmHold::Write) => Mode::Shared,
            Held::Pg(g) => g.mode(),
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
            Held::Pg(g) if g.mode() == Mode::Shared => "read",
            Held::Pg(_) => "write",
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
            Held::Pg(g) => (*g).unlock(),
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
    /// A PostgreSQL lock: its connection settings and key, as written.
    Pg(String),
}

/// Who of this process holds one lock, by holder (thread or task): shared
/// by every lock object of the same lock (interned by [`intern`]), so the
/// check costs one uncontended mutex and a scan of a vector of (usually)
/// at most one entry. It is also the list of what each lock object holds
/// (`locked()`, `close()`): entries name the object they were taken
/// through.
pub(crate) struct KeyState {
    record: Mutex<Record>,
}

/// Holds of one lock by holder (thread or task number).
type Holders = Vec<(u64, Arc<Shared>)>;

/// How many released holds a record keeps for reuse.
const SPARES: usize = 4;

/// How many released guard objects a record keeps for reuse: two, because
/// `g = rw.read(); g.release()` in a loop still refers to the previous
/// guard while it asks for the next.
const GUARDS: usize = 2;

struct Record {
    /// The fork generation the holds are of.
    gen: u64,
    holders: Holders,
    /// Released holds, kept so that a later hold reuses the allocation of
    /// one that nothing refers to any more (its only `Arc` is this one),
    /// kept only while a lock object of this lock lives (a spare refers to
    /// the record: the last lock object's end lets them go).
    spare: Vec<Arc<Shared>>,
    /// Released guard objects of this lock (ShmRwLock / ShmMutex), parked
    /// by their `release()` or `with` exit for a later acquisition through
    /// any lock object of this lock to reuse, once nothing else refers to
    /// one (see [`take_parked`]); kept, like `spare`, only while a lock
    /// object of this lock lives.
    guards: Vec<Py<Guard>>,
    /// The lock objects ([`Holds`]) of this lock.
    objects: usize,
}

impl KeyState {
    /// Runs `f` on the record. `f` must not run Python code (a guard
    /// dropped by the garbage collector would re-enter the record).
    fn with<T>(&self, f: impl FnOnce(&mut Holders) -> T) -> T {
        self.with_record(|r| f(&mut r.holders))
    }

    fn with_record<T>(&self, f: impl FnOnce(&mut Record) -> T) -> T {
        let mut r = self.record.lock();
        let gen = generation();
        if r.gen != gen {
            // A forked child: the holds are the parent's. Forget them (dropping
            // them would release the parent's locks).
            std::mem::forget(std::mem::take(&mut r.holders));
            std::mem::forget(std::mem::take(&mut r.spare));
            std::mem::forget(std::mem::take(&mut r.guards));
            r.gen = gen;
        }
        f(&mut r)
    }

    /// Takes the hold `s` of `thread` off the record; `park`: the released
    /// guard object to keep for reuse.
    fn remove(&self, thread: u64, s: &Shared, park: Option<&Bound<'_, Guard>>) {
        self.with_record(|r| {
            if let Some(i) = r
                .holders
                .iter()
                .position(|(t, x)| *t == thread && std::ptr::eq(Arc::as_ptr(x), s))
            {
                let (_, x) = r.holders.swap_remove(i);
                // Not the last reference (the caller has `s`): no drop here.
                if r.objects > 0 && r.spare.len() < SPARES {
                    r.spare.push(x);
                }
                if let Some(g) = park {
                    if r.objects > 0 && r.guards.len() < GUARDS {
                        r.guards.push(g.clone().unbind());
                    }
                }
            }
        });
    }

    /// The holds of this lock taken through the lock object `owner`.
    fn of_owner(&self, owner: u64) -> Vec<Arc<Shared>> {
        self.with(|v| {
            v.iter()
                .filter(|(_, s)| s.owner == owner)
                .map(|(_, s)| Arc::clone(s))
                .collect()
        })
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
        record: Mutex::new(Record {
            gen: generation(),
            holders: Vec::new(),
            spare: Vec::new(),
            guards: Vec::new(),
            objects: 0,
        }),
    });
    m.insert(key, Arc::downgrade(&k));
    k
}

fn unrecord(s: &Shared, park: Option<&Bound<'_, Guard>>) {
    if let Some((k, t)) = &s.record {
        k.remove(*t, s, park);
    }
}

/// The hold behind one or more guards (more than one when reentrant).
pub(crate) struct Shared {
    held: Mutex<Option<Held>>,
    count: AtomicUsize,
    gen: u64,
    record: Option<(Arc<KeyState>, u64)>,
    /// The lock object it was taken through ([`Holds`]' number).
    owner: u64,
    /// A lease's fencing token.
    token: Option<u64>,
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

    fn mode(&self) -> Mode {
        self.held.lock().as_ref().map_or(Mode::Shared, Held::mode)
    }
}

/// A new hold by `thread` through the object `owner` (the caller records
/// it under `key`).
fn new_shared(held: Held, key: Option<&Arc<KeyState>>, thread: u64, owner: u64) -> Arc<Shared> {
    let token = match &held {
        Held::Lease(g) => Some(g.token()),
        Held::Pg(g) => Some(g.token()),
        _ => None,
    };
    Arc::new(Shared {
        held: Mutex::new(Some(held)),
        count: AtomicUsize::new(1),
        gen: generation(),
        record: key.map(|k| (Arc::clone(k), thread)),
        owner,
        token,
    })
}

/// [`new_shared`] in the record of `key` (locked): reuses a spare hold
/// that nothing else refers to.
fn new_shared_in(
    r: &mut Record,
    held: Held,
    key: &Arc<KeyState>,
    thread: u64,
    owner: u64,
) -> Arc<Shared> {
    if let Some(i) = r.spare.iter().position(|s| Arc::strong_count(s) == 1) {
        let mut s = r.spare.swap_remove(i);
        if let Some(x) = Arc::get_mut(&mut s) {
            refill(x, held, key, thread, owner);
            return s;
        }
    }
    new_shared(held, Some(key), thread, owner)
}

/// A released hold that nothing else refers to, made the new hold.
fn refill(x: &mut Shared, held: Held, key: &Arc<KeyState>, thread: u64, owner: u64) {
    x.token = match &held {
        Held::Lease(g) => Some(g.token()),
        Held::Pg(g) => Some(g.token()),
        _ => None,
    };
    *x.held.get_mut() = Some(held);
    *x.count.get_mut() = 1;
    x.gen = generation();
    // A spare of this record names it already: only the thread changes (no
    // reference count moved).
    x.record = match x.record.take() {
        Some((k, _)) if Arc::ptr_eq(&k, key) => Some((k, thread)),
        _ => Some((Arc::clone(key), thread)),
    };
    x.owner = owner;
}

/// A parked guard object of the record that nothing else refers to (its
/// reference count is the record's alone, read with the GIL held, so nobody
/// can see it change), taken out of the record.
fn take_parked(py: Python<'_>, r: &mut Record) -> Option<Py<Guard>> {
    let i = r.guards.iter().position(|g| only_ref(py, g))?;
    Some(r.guards.swap_remove(i))
}

/// The new hold `held` in the parked guard object `g` (the record locked):
/// its previous hold is reused when nothing but `g` and the record's spares
/// refer to it, else a hold is made as [`new_shared_in`] makes one.
fn hold_in_parked(
    r: &mut Record,
    g: &Guard,
    held: Held,
    key: &Arc<KeyState>,
    thread: u64,
    owner: u64,
) -> Arc<Shared> {
    let mut gs = g.shared.lock();
    if let Some(i) = r.spare.iter().position(|x| Arc::ptr_eq(x, &gs)) {
        // Not the last reference (the guard has one): no drop of the hold.
        drop(r.spare.swap_remove(i));
    }
    let s = match Arc::get_mut(&mut gs) {
        Some(x) => {
            refill(x, held, key, thread, owner);
            Arc::clone(&gs)
        }
        None => {
            let s = new_shared_in(r, held, key, thread, owner);
            // Not the last reference of the old hold if another guard or
            // the record has it; if it is, the hold is released already
            // (nothing held): no Python code runs.
            drop(std::mem::replace(&mut *gs, Arc::clone(&s)));
            s
        }
    };
    g.released.store(false, Ordering::Release);
    s
}

/// One more guard on an existing (reentrant) hold.
fn count_again(s: &Arc<Shared>) -> Arc<Shared> {
    s.count.fetch_add(1, Ordering::AcqRel);
    Arc::clone(s)
}

/// Gives up one share of a hold: the crate guard to release if it was the
/// last one (and the record no longer lists it). In a forked child an
/// inherited hold is left alone (nothing to release). Runs no Python code.
fn give_up(s: &Shared, park: Option<&Bound<'_, Guard>>) -> Option<Held> {
    if s.gen != generation() {
        return None;
    }
    if s.count.fetch_sub(1, Ordering::AcqRel) != 1 {
        return None;
    }
    unrecord(s, park);
    s.held.lock().take()
}

/// Releases what [`give_up`] handed over (without the GIL for the families
/// whose release is a round trip or a system call that may wait).
fn release_held(py: Python<'_>, held: Option<Held>) -> PyResult<()> {
    let r = match held {
        Some(h @ (Held::Lease(_) | Held::Scope(_) | Held::Pg(_))) => py.detach(|| h.release()),
        Some(h) => h.release(),
        None => Ok(()),
    };
    r.map_err(|e| errors::from_error(py, &e))
}

/// Gives up one share of a hold; the last one releases the lock. In a
/// forked child an inherited hold is left alone (nothing released).
pub(crate) fn release_shared(py: Python<'_>, s: &Arc<Shared>) -> PyResult<()> {
    release_held(py, give_up(s, None))
}

/// A held lock, as Python sees it: a context manager (also `async with`),
/// releasable once, from any thread.
#[pyclass(module = "interlock._native", name = "Guard", frozen)]
pub(crate) struct Guard {
    /// The hold (replaced only when the object is reused: see
    /// [`Record`]'s `guards`).
    shared: Mutex<Arc<Shared>>,
    released: AtomicBool,
    path: Arc<Path>,
    /// Whether its release parks it in the lock's record for reuse.
    parks: bool,
}

impl Guard {
    pub(crate) fn new(shared: Arc<Shared>, path: Arc<Path>) -> Guard {
        Guard {
            shared: Mutex::new(shared),
            released: AtomicBool::new(false),
            path,
            parks: false,
        }
    }

    /// The hold.
    fn shared_now(&self) -> Arc<Shared> {
        Arc::clone(&self.shared.lock())
    }

    /// Whether this guard still counts (not released, not inherited).
    fn live(&self) -> bool {
        !self.released.load(Ordering::Acquire) && !self.is_inherited()
    }

    /// Runs `f` on the crate guard, if still held by this guard.
    pub(crate) fn with_held<T>(&self, f: impl FnOnce(&mut Held) -> T) -> Option<T> {
        if !self.live() {
            return None;
        }
        let s = self.shared_now();
        let mut h = s.held.lock();
        h.as_mut().map(f)
    }

    /// The hold, for an upgrade: the `Shared` (if still held and not
    /// inherited).
    pub(crate) fn shared(&self) -> Option<Arc<Shared>> {
        self.live().then(|| self.shared_now())
    }

    pub(crate) fn lock_path(&self) -> &Path {
        &self.path
    }

    /// Releases this guard's share of the hold. `Ok(false)` if it was
    /// released already. `park`: this object, to be parked in the lock's
    /// record for reuse (if it parks: a ShmRwLock / ShmMutex guard) when
    /// the hold's last share goes.
    fn release_inner(&self, py: Python<'_>, park: Option<&Bound<'_, Self>>) -> PyResult<bool> {
        if self.released.swap(true, Ordering::AcqRel) {
            return Ok(false);
        }
        // The share is given up with the guard's lock held (no `Arc` clone:
        // `give_up` runs no Python code), the crate guard released after.
        // The record is locked inside (to take the hold off it and park this
        // object); an acquisition locks a parked guard's lock inside the
        // record's, but only of one nothing else refers to, never this one
        // (its caller refers to it).
        let park = park.filter(|_| self.parks);
        let held = give_up(&self.shared.lock(), park);
        release_held(py, held)?;
        Ok(true)
    }

    /// Whether this guard was inherited across fork.
    pub(crate) fn is_inherited(&self) -> bool {
        self.shared.lock().gen != generation()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let s = self.shared.get_mut();
        if *self.released.get_mut() || s.gen != generation() {
            return;
        }
        if s.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            unrecord(s, None);
            let held = s.held.lock().take();
            drop(held);
        }
    }
}

#[pymethods]
impl Guard {
    /// Releases the lock (this guard's share of it, if reentrant). Any
    /// thread may call it. A second release raises RuntimeError. In a forked
    /// child, an inherited guard releases nothing of the parent's.
    fn release(slf: &Bound<'_, Self>) -> PyResult<()> {
        let me = slf.get();
        if me.release_inner(slf.py(), Some(slf))? {
            Ok(())
        } else {
            Err(errors::released_twice(&me.path))
        }
    }

    /// Deletes the lock file, then releases (a `FileLock` write guard, not
    /// counted twice): the one safe way for a holder to remove its lock
    /// file (the core's `remove_and_unlock`). Then as `release()`.
    fn remove_and_release(&self, py: Python<'_>) -> PyResult<()> {
        let s = &self.shared_now();
        if self.is_inherited() {
            self.released.store(true, Ordering::Release);
            return Ok(());
        }
        if !matches!(&*s.held.lock(), Some(Held::FileWrite(_))) && self.live() {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "only a FileLock write guard removes its lock file: {}",
                self.path.display()
            )));
        }
        if self.released.swap(true, Ordering::AcqRel) {
            return Err(errors::released_twice(&self.path));
        }
        if s.count
            .compare_exchange(1, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            self.released.store(false, Ordering::Release);
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "a reentrant hold counted more than once cannot remove its lock file: {}",
                self.path.display()
            )));
        }
        unrecord(s, None);
        let held = s.held.lock().take();
        let r = match held {
            Some(Held::FileWrite(g)) => g.remove_and_unlock(),
            Some(h) => h.release(),
            None => Ok(()),
        };
        r.map_err(|e| errors::from_error(py, &e))
    }

    /// Whether this guard still holds its lock (False once released, and
    /// in a forked child for an inherited guard).
    #[getter]
    fn held(&self) -> bool {
        self.live()
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

    /// Raises LeaseLost if the lock was lost (a lease ran out or was taken
    /// over, a PostgreSQL session ended or went silent); a no-op for the
    /// other families. Costs no round trip.
    fn check(&self, py: Python<'_>) -> PyResult<()> {
        let r = self.with_held(|h| match h {
            Held::Pg(g) => g.check(),
            Held::Lease(g) => g.check(),
            _ => Ok(()),
        });
        match r {
            None => Err(errors::released_twice(&self.path)),
            Some(r) => r.map_err(|e| errors::from_error(py, &e)),
        }
    }

    /// The fencing token (a lease or PostgreSQL guard), else None.
    #[getter]
    fn token(&self) -> Option<u64> {
        self.shared.lock().token
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (_t = None, _v = None, _tb = None))]
    fn __exit__(
        slf: &Bound<'_, Self>,
        _t: Option<&Bound<'_, PyAny>>,
        _v: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        slf.get().release_inner(slf.py(), Some(slf))?;
        Ok(false)
    }

    fn __aenter__(slf: Py<Self>) -> Ready {
        Ready {
            value: Mutex::new(Some(slf.into_any())),
        }
    }

    #[pyo3(signature = (*_args))]
    fn __aexit__(
        &self,
        py: Python<'_>,
        _args: &Bound<'_, pyo3::types::PyTuple>,
    ) -> PyResult<Ready> {
        self.release_inner(py, None)?;
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

/// What a lock object has handed out: its number (holds name the object
/// they were taken through), the lock's record (found on the first
/// acquisition: it lists this object's holds), the holds that have no
/// record (lock set scopes), and the holds of `acquire()` and `with lock:`
/// waiting for their `release()` / exit.
pub(crate) struct Holds {
    id: u64,
    key: std::sync::OnceLock<Arc<KeyState>>,
    unkeyed: Mutex<Vec<std::sync::Weak<Shared>>>,
    stack: Mutex<Vec<Arc<Shared>>>,
}

impl Default for Holds {
    fn default() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Holds {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            key: std::sync::OnceLock::new(),
            unkeyed: Mutex::new(Vec::new()),
            stack: Mutex::new(Vec::new()),
        }
    }
}

impl Drop for Holds {
    fn drop(&mut self) {
        if let Some(k) = self.key.get() {
            // Let the spares go outside the record's lock (a parked guard's
            // end drops its hold, which refers to the record).
            let spare = k.with_record(|r| {
                r.objects -= 1;
                if r.objects == 0 {
                    (std::mem::take(&mut r.spare), std::mem::take(&mut r.guards))
                } else {
                    (Vec::new(), Vec::new())
                }
            });
            drop(spare);
        }
    }
}

impl Holds {
    /// Sets the lock's record (on the first acquisition).
    fn set_key(&self, key: &Arc<KeyState>) {
        if self.key.get().is_none() && self.key.set(Arc::clone(key)).is_ok() {
            key.with_record(|r| r.objects += 1);
        }
    }

    fn add_unkeyed(&self, s: &Arc<Shared>) {
        let mut all = self.unkeyed.lock();
        if all.len() >= 32 {
            all.retain(|w| w.strong_count() > 0);
        }
        all.push(Arc::downgrade(s));
    }

    /// Everything taken through this object and not released (in this
    /// process).
    fn taken(&self) -> Vec<Arc<Shared>> {
        let gen = generation();
        let mut v: Vec<Arc<Shared>> = self
            .unkeyed
            .lock()
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect();
        if let Some(k) = self.key.get() {
            v.extend(k.of_owner(self.id));
        }
        v.retain(|s| s.gen == gen);
        v
    }

    /// Whether anything taken through this object is held (in this process).
    pub(crate) fn any(&self) -> bool {
        self.taken().iter().any(|s| s.held.lock().is_some())
    }

    /// Releases everything taken through this object (in this process);
    /// the first error is reported.
    pub(crate) fn release_all(&self, py: Python<'_>) -> PyResult<()> {
        let stack = std::mem::take(&mut *self.stack.lock());
        drop(stack);
        let all = self.taken();
        self.unkeyed.lock().clear();
        let mut first = None;
        for s in all {
            unrecord(&s, None);
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

    /// The fencing token of the latest hold of `acquire()` / `with lock:`
    /// that is still held in this process (a lease's or a PostgreSQL
    /// lock's; None for the others, or when nothing is held that way).
    pub(crate) fn token(&self) -> Option<u64> {
        let gen = generation();
        let stack = self.stack.lock();
        stack
            .iter()
            .rev()
            .find(|s| s.gen == gen && s.held.lock().is_some())
            .and_then(|s| s.token)
    }

    /// Forgets everything (a forked child's copy of its parent's holds).
    pub(crate) fn forget(&self) {
        std::mem::forget(std::mem::take(&mut *self.stack.lock()));
        std::mem::forget(std::mem::take(&mut *self.unkeyed.lock()));
    }
}

/// An acquisition, common to every family.
pub(crate) struct Request<'a> {
    /// The lock's record (None: no record, e.g. lock set scopes).
    pub key: Option<&'a Arc<KeyState>>,
    /// Whether a request through the same object that its hold covers
    /// counts instead of raising `AlreadyHeld`.
    pub reentrant: bool,
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

/// Whether `g` is the only reference to its object. PyO3 deprecates the
/// count because a free-threaded interpreter's is not exact; the abi3 build
/// never runs on one (PyO3 refuses abi3 there), and it is read with the GIL.
#[allow(deprecated)]
fn only_ref(py: Python<'_>, g: &Py<Guard>) -> bool {
    g.get_refcnt(py) == 1
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

/// What the record says of a request, decided with the record locked
/// (and so without running Python code: errors are made afterwards).
enum Decided {
    /// Counted on the hold this thread has (reentrant).
    Counted(Arc<Shared>),
    /// Taken by the try with the GIL held, and recorded.
    Taken(Arc<Shared>, bool),
    /// The same, the hold put in a parked guard object taken for reuse.
    Reused(Py<Guard>, bool),
    /// Refused at once: the thread holds it already (the detail).
    AlreadyHeld(String),
    /// The try failed without waiting.
    Failed(interlock::TryLockError),
    /// Not held by this thread, not taken yet: wait for it.
    Wait,
}

/// The answer of the record to `thread` asking again for a lock it holds
/// through `shared`.
fn again(req: &Request<'_>, owner: u64, shared: &Arc<Shared>) -> Decided {
    let mode = shared.mode();
    let covered = mode == Mode::Exclusive || req.mode == Mode::Shared;
    let same = shared.owner == owner;
    if req.reentrant && same && covered {
        return Decided::Counted(count_again(shared));
    }
    Decided::AlreadyHeld(if req.reentrant && same {
        format!("{mode}; a reentrant lock counts only requests its hold covers")
    } else if same {
        format!("{mode}, through this object")
    } else {
        format!("{mode}, through another lock object")
    })
}

/// [`acquire`] without the guard object: the hold and whether it came
/// poisoned.
///
/// The uncontended path (a family whose try never waits) costs one lock
/// of the record: with it held, the thread's prior hold is looked up, the
/// try made (with the GIL) and the new hold recorded.
pub(crate) fn acquire_shared(
    py: Python<'_>,
    holds: &Holds,
    req: Request<'_>,
    wait: interlock::Wait,
    f: impl Fn(interlock::Wait) -> Result<(Held, bool), interlock::TryLockError> + Send + Sync,
) -> PyResult<(Arc<Shared>, bool)> {
    match acquire_got::<false>(py, holds, req, wait, f)? {
        (Got::Hold(s), poisoned) => Ok((s, poisoned)),
        // Not asked for: only when `GUARD`.
        (Got::Guard(g), poisoned) => Ok((g.get().shared_now(), poisoned)),
    }
}

/// [`acquire`] for a lock whose guard objects park in its record
/// (ShmRwLock, ShmMutex): on the uncontended path a parked guard object
/// that nothing refers to any more is reused (with its hold, when nothing
/// else refers to that either), taken in the same lock of the record as
/// the try; otherwise a new one that parks on release. `OwnerDied`
/// carries the guard if the lock came poisoned.
pub(crate) fn acquire_guard(
    py: Python<'_>,
    holds: &Holds,
    req: Request<'_>,
    wait: interlock::Wait,
    f: impl Fn(interlock::Wait) -> Result<(Held, bool), interlock::TryLockError> + Send + Sync,
) -> PyResult<Py<Guard>> {
    let path = Arc::clone(req.path);
    let (g, poisoned) = match acquire_got::<true>(py, holds, req, wait, f)? {
        (Got::Guard(g), poisoned) => (g, poisoned),
        (Got::Hold(s), poisoned) => (
            Py::new(
                py,
                Guard {
                    shared: Mutex::new(s),
                    released: AtomicBool::new(false),
                    path: Arc::clone(&path),
                    parks: true,
                },
            )?,
            poisoned,
        ),
    };
    if poisoned {
        return Err(owner_died(py, &path, g));
    }
    Ok(g)
}

/// What [`acquire_got`] hands out.
enum Got {
    Hold(Arc<Shared>),
    /// A parked guard object, reused, holding the new hold.
    Guard(Py<Guard>),
}

/// The acquisition of [`acquire_shared`] (`GUARD` false) and
/// [`acquire_guard`] (true: a parked guard object may be reused).
fn acquire_got<const GUARD: bool>(
    py: Python<'_>,
    holds: &Holds,
    req: Request<'_>,
    wait: interlock::Wait,
    f: impl Fn(interlock::Wait) -> Result<(Held, bool), interlock::TryLockError> + Send + Sync,
) -> PyResult<(Got, bool)> {
    use crate::wait::Fast;
    use interlock::{TryLockError, Wait};
    let thread = crate::wait::thread_ident();
    let owner = holds.id;
    let mut fast = req.fast;
    if let Some(key) = req.key {
        holds.set_key(key);
        let decided = key.with_record(|r| {
            if let Some((_, s)) = r.holders.iter().find(|(t, _)| *t == thread) {
                return again(&req, owner, s);
            }
            if fast != Fast::TryFirst {
                return Decided::Wait;
            }
            match f(Wait::NonBlocking) {
                Err(TryLockError::WouldBlock) if wait.may_block() => Decided::Wait,
                Err(e) => Decided::Failed(e),
                Ok((held, poisoned)) => {
                    if let Some(g) = GUARD.then(|| take_parked(py, r)).flatten() {
                        let s = hold_in_parked(r, g.get(), held, key, thread, owner);
                        r.holders.push((thread, s));
                        return Decided::Reused(g, poisoned);
                    }
                    let s = new_shared_in(r, held, key, thread, owner);
                    r.holders.push((thread, Arc::clone(&s)));
                    Decided::Taken(s, poisoned)
                }
            }
        });
        match decided {
            Decided::Counted(s) => return Ok((Got::Hold(s), false)),
            Decided::Taken(s, poisoned) => return Ok((Got::Hold(s), poisoned)),
            Decided::Reused(g, poisoned) => return Ok((Got::Guard(g), poisoned)),
            Decided::AlreadyHeld(detail) => {
                return Err(errors::already_held(py, req.path, &detail))
            }
            Decided::Failed(e) => return Err(errors::from_try(py, &e, req.path, req.what)),
            Decided::Wait => {}
        }
        // Tried already: the wait goes straight to the kernel.
        fast = Fast::Detach;
    }
    let got = crate::wait::run(py, wait, fast, f)?;
    let (held, poisoned) = got.map_err(|e| errors::from_try(py, &e, req.path, req.what))?;
    let s = new_shared(held, req.key, thread, owner);
    match req.key {
        Some(k) => k.with(|v| v.push((thread, Arc::clone(&s)))),
        None => holds.add_unkeyed(&s),
    }
    Ok((Got::Hold(s), poisoned))
}

/// [`acquire_shared`] for a family that waits its own way (PostgreSQL:
/// every call is a round trip, and a main-thread wait is cancelled rather
/// than sliced): `take(py, wait)` makes the whole acquisition, GIL handling
/// included; the record is checked and updated as for the others.
pub(crate) fn acquire_custom(
    py: Python<'_>,
    holds: &Holds,
    req: Request<'_>,
    key: &Arc<KeyState>,
    wait: interlock::Wait,
    take: impl FnOnce(Python<'_>, interlock::Wait) -> PyResult<Result<Held, interlock::TryLockError>>,
) -> PyResult<Arc<Shared>> {
    let thread = crate::wait::thread_ident();
    let owner = holds.id;
    holds.set_key(key);
    let prior = key.with(|v| {
        v.iter()
            .find(|(t, _)| *t == thread)
            .map(|(_, s)| again(&req, owner, s))
    });
    match prior {
        Some(Decided::Counted(s)) => return Ok(s),
        Some(Decided::AlreadyHeld(detail)) => {
            return Err(errors::already_held(py, req.path, &detail))
        }
        _ => {}
    }
    let held = take(py, wait)?.map_err(|e| errors::from_try(py, &e, req.path, req.what))?;
    let s = new_shared(held, Some(key), thread, owner);
    key.with(|v| v.push((thread, Arc::clone(&s))));
    Ok(s)
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
        Some(s) => release_shared(py, &s),
        None => Err(pyo3::exceptions::PyRuntimeError::new_err(format!(
            "release of {}: not acquired through acquire() or `with`",
            path.display()
        ))),
    }
}
