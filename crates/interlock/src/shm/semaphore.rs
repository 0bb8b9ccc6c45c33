//! [`Semaphore`]: N permits in shared memory, and the guard that holds some.
//!
//! Why it is built this way: the protocol (one cell per permit, naming its
//! holder) lives in `permits.rs`, where the model checker runs it; this file
//! turns it into the crate's vocabulary. Permits belong to the *process*
//! (a cell names a pid and start time, not a thread), so unlike the other
//! shm guards a [`SemaphoreGuard`] is `Send`: any thread of the process may
//! release it. A guard inherited by a forked child releases nothing there.
//!
//! The watch slot (see `permits.rs`, "Dead holders, without polling"): the
//! process's identity is cached per handle and fork generation in
//! [`Cover`], and the first acquisition of a generation (the slow branch
//! of that cache) also links the calling thread's robust list to a watch
//! slot, once. The thread keeps the entry in a thread-local list and, at
//! its exit (or when it drops the handle), unlinks it, gives the slot back
//! and clears the cache, so that the next acquisition by another thread of
//! the process links again. The fast path is the cache's one compare, as
//! before.

use super::permits::Permits;
use super::protocol::{Env, Notify};
use super::{Inner, ShmOptions};
use crate::error::{Error, ErrorKind, Result};
use crate::handle::Handle;
use crate::sys::fork::generation;
use crate::sys::robust::Linked;
use crate::wait::{Mode, OnBlock, Wait};
use crate::{Lock, TryLockError};
use std::cell::{Cell, RefCell};
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

thread_local! {
    /// Where this thread starts its search for a free cell: the cell it
    /// took last (it is likely free again, and in this CPU's cache).
    static HINT: Cell<u32> = Cell::new(seed());
}

fn seed() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
        .wrapping_add(std::process::id())
}

#[inline]
fn hint() -> usize {
    HINT.try_with(Cell::get).unwrap_or(0) as usize
}

#[inline]
fn set_hint(i: u32) {
    let _ = HINT.try_with(|h| h.set(i));
}

/// A counting semaphore in memory shared by threads and processes of one
/// host: N permits (fixed when it is created), a holder takes one or more
/// and gives them back when its guard is dropped.
///
/// Scope: every thread and process that maps the same file (by default in
/// /dev/shm) or inherits the same anonymous mapping; one PID namespace.
/// Permits are held by the *process*: a guard may be sent to, and dropped
/// on, another thread. Fork: the child shares the semaphore; a guard it
/// inherited stays the parent's (dropping it there releases nothing).
/// Close: guards borrow the handle. Crash: a dead holder's permits are
/// taken back by the next process that waits for one or fails a
/// `try_acquire`; nothing is poisoned (a semaphore protects no single
/// datum). A waiter learns of the death from the kernel (the robust-futex
/// notice on the holder process's watch slot, see docs/design-sem.md) and
/// otherwise sleeps; it looks every 5 ms only while some holder is
/// uncovered (the process's linking thread has exited while another of its
/// threads holds the permit, or an old file, a full watch table, no
/// `futex_waitv`). NFS: refused.
///
/// ```no_run
/// # fn main() -> interlock::Result<()> {
/// let sem = interlock::Semaphore::open("encoders", 2)?; // /dev/shm/interlock-encoders
/// let _permit = sem.acquire(); // at most 2 holders on this host
/// # Ok(()) }
/// ```
pub struct Semaphore {
    pub(super) inner: Arc<Inner>,
    on_block: Option<OnBlock>,
}

impl Drop for Semaphore {
    fn drop(&mut self) {
        leave_mine(&self.inner);
    }
}

/// This process's packed identity for one semaphore handle, cached per
/// fork generation (reading it costs a system call: glibc does not cache
/// the pid), and which of its threads links the process's watch slot.
pub(crate) struct Cover {
    /// The generation `id` was computed in and a watch link tried; 0 once
    /// the linking thread has left (the next acquisition links again).
    gen: AtomicU64,
    id: AtomicU64,
    /// Serialises linking: `(generation, tid)` of the linking thread.
    linker: parking_lot::Mutex<Option<(u64, u32)>>,
}

impl Cover {
    pub(crate) fn new() -> Cover {
        Cover {
            gen: AtomicU64::new(0),
            id: AtomicU64::new(0),
            linker: parking_lot::Mutex::new(None),
        }
    }
}

/// A watch slot linked by this thread.
struct Watched {
    inner: Arc<Inner>,
    gen: u64,
    me: u64,
    tid: u32,
    slot: u32,
    link: Option<Linked>,
}

impl Watched {
    /// Unlinks (in the generation that linked: a forked child leaves its
    /// parent's entries alone), gives the slot back, and if this thread
    /// was the handle's linker, clears the cover so that another thread
    /// links next.
    fn leave(mut self, gen: u64) {
        let Some(l) = self.link.take() else {
            return;
        };
        if self.gen != gen {
            return;
        }
        super::local::unlink_counted(l);
        let mut linker = self.inner.cover.linker.lock();
        self.inner.permits().release_watch(self.me, self.slot);
        if *linker == Some((self.gen, self.tid)) {
            *linker = None;
            self.inner.cover.gen.store(0, Ordering::Release);
        }
    }
}

struct Watches(Vec<Watched>);

impl Drop for Watches {
    fn drop(&mut self) {
        let gen = generation();
        for w in self.0.drain(..) {
            w.leave(gen);
        }
    }
}

thread_local! {
    /// The watch slots this thread linked.
    static WATCHES: RefCell<Watches> = const { RefCell::new(Watches(Vec::new())) };
}

/// Links this thread to a watch slot of `inner` for the process `me`;
/// returns the thread's id, or `None` (no table, none free, no robust
/// list, the thread's link cap reached, or its thread-locals gone): the
/// process's permits are then uncovered and their waiters poll.
fn link_watch(inner: &Arc<Inner>, me: u64, gen: u64) -> Option<u32> {
    // Forget entries of handles nobody else holds any more (unlinked
    // first; their mappings were kept for this).
    let stale: Vec<Watched> = WATCHES
        .try_with(|w| {
            w.try_borrow_mut()
                .map(|mut w| {
                    let (stale, keep) = std::mem::take(&mut w.0)
                        .into_iter()
                        .partition(|e| Arc::strong_count(&e.inner) == 1);
                    w.0 = keep;
                    stale
                })
                .unwrap_or_default()
        })
        .unwrap_or_default();
    for e in stale {
        e.leave(gen);
    }
    let p = inner.permits();
    let j = p.claim_watch(me)?;
    let slot = &p.watch[j as usize];
    let Some(l) = super::local::link_counted(inner.mapping(), slot) else {
        p.release_watch(me, j);
        return None;
    };
    let tid = slot.tid.load(Ordering::Relaxed);
    let entry = Watched {
        inner: Arc::clone(inner),
        gen,
        me,
        tid,
        slot: j,
        link: Some(l),
    };
    let mut entry = Some(entry);
    let _ = WATCHES.try_with(|w| {
        if let Ok(mut w) = w.try_borrow_mut() {
            w.0.extend(entry.take());
        }
    });
    match entry {
        None => Some(tid),
        // Not recorded, so it could not be unlinked later: undo now.
        Some(mut e) => {
            if let Some(l) = e.link.take() {
                super::local::unlink_counted(l);
            }
            p.release_watch(me, j);
            None
        }
    }
}

/// Unlinks this thread's watch slots of `inner` (its handle is being
/// dropped; other threads' stay linked until they leave).
fn leave_mine(inner: &Arc<Inner>) {
    let gen = generation();
    let mine: Vec<Watched> = WATCHES
        .try_with(|w| {
            w.try_borrow_mut()
                .map(|mut w| {
                    let (mine, keep) = std::mem::take(&mut w.0)
                        .into_iter()
                        .partition(|e| Arc::ptr_eq(&e.inner, inner));
                    w.0 = keep;
                    mine
                })
                .unwrap_or_default()
        })
        .unwrap_or_default();
    for e in mine {
        e.leave(gen);
    }
}

impl fmt::Debug for Semaphore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Semaphore")
            .field("path", &self.inner.path)
            .field("permits", &self.permits())
            .finish_non_exhaustive()
    }
}

impl Semaphore {
    pub(crate) fn from_parts(inner: Inner, on_block: Option<OnBlock>) -> Semaphore {
        Semaphore {
            inner: Arc::new(inner),
            on_block,
        }
    }

    /// This process's identity: one compare once this generation's first
    /// acquisition has linked the watch slot (or tried to).
    #[inline]
    fn me(&self) -> u64 {
        let c = &self.inner.cover;
        if c.gen.load(Ordering::Acquire) == generation() {
            return c.id.load(Ordering::Relaxed);
        }
        self.me_slow()
    }

    #[cold]
    fn me_slow(&self) -> u64 {
        let c = &self.inner.cover;
        let g = generation();
        let mut linker = c.linker.lock();
        if c.gen.load(Ordering::Acquire) == g {
            return c.id.load(Ordering::Relaxed);
        }
        let id = super::open::ProcEnv.me();
        c.id.store(id, Ordering::Relaxed);
        if !matches!(*linker, Some((lg, _)) if lg == g) {
            *linker = link_watch(&self.inner, id, g).map(|tid| (g, tid));
        }
        c.gen.store(g, Ordering::Release);
        id
    }

    /// Opens, or creates with `permits` permits (1..=4094), the semaphore
    /// `name`: a bare name means `/dev/shm/interlock-NAME`, a name with a
    /// `/` is a path. See [`ShmOptions`] for the file mode and an on-block
    /// callback.
    ///
    /// Errors: `InvalidInput` for an unusable name, a permit count out of
    /// range or an existing semaphore with another count; `Corrupt` if the
    /// file is not a semaphore of this layout version; `PermissionDenied`,
    /// `NotFound` (missing directory), `Unsupported` (NFS, another PID
    /// namespace).
    pub fn open(name: impl AsRef<Path>, permits: u32) -> Result<Semaphore> {
        ShmOptions::new().open_semaphore(name, permits)
    }

    /// A semaphore in a fresh anonymous shared mapping, shared with
    /// children forked afterwards.
    pub fn anonymous(permits: u32) -> Result<Semaphore> {
        ShmOptions::new().anonymous_semaphore(permits)
    }

    /// Sets (or removes) the callback told once per acquisition just before
    /// it blocks.
    pub fn set_on_block(&mut self, f: Option<OnBlock>) {
        self.on_block = f;
    }

    /// The semaphore's file (or a placeholder for an anonymous one).
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The number of permits, N.
    pub fn permits(&self) -> u32 {
        self.core().permits() as u32
    }

    /// How many permits are free right now (a snapshot; permits of dead
    /// holders count as held until someone reclaims them).
    pub fn available(&self) -> u32 {
        self.core().available() as u32
    }

    /// The processes holding permits right now, one entry per permit (a
    /// snapshot).
    pub fn holders(&self) -> Vec<crate::ProcessId> {
        self.core()
            .holders()
            .into_iter()
            .map(|o| {
                let (pid, start_time) = super::layout::unpack(o);
                crate::ProcessId { pid, start_time }
            })
            .collect()
    }

    /// Takes back the permits of dead holders now; returns how many. (Any
    /// waiter does this on its own; this is for tools.)
    pub fn reclaim_dead(&self) -> u32 {
        self.core().reclaim_dead() as u32
    }

    #[inline]
    fn core(&self) -> Permits<'_, super::open::ProcEnv> {
        self.inner.permits()
    }

    fn check_k(&self, k: u32) -> Result<(), TryLockError> {
        let n = self.permits();
        if k == 0 || k > n {
            return Err(
                Error::new(ErrorKind::InvalidInput, "acquire semaphore permits")
                    .with_path(&self.inner.path)
                    .with_detail(format!(
                        "{k} permits requested; the semaphore has {n} (ask for 1..={n})"
                    ))
                    .into(),
            );
        }
        Ok(())
    }

    #[cold]
    fn acquire_slow(&self, k: u32, wait: Wait) -> Result<SemaphoreGuard<'_>, TryLockError> {
        self.check_k(k)?;
        let me = self.me();
        let mut cells = Vec::with_capacity(k as usize);
        let go = |n: &mut Notify<'_>, cells: &mut Vec<u32>| {
            self.core().acquire(me, hint(), k as usize, cells, &wait, n)
        };
        match &self.on_block {
            None => go(&mut Notify::none(), &mut cells)?,
            Some(cb) => {
                let inner = &self.inner;
                let mut call = || cb(&inner.blocked(Mode::Exclusive));
                go(&mut Notify::new(&mut call), &mut cells)?
            }
        }
        if let Some(&last) = cells.last() {
            set_hint(last);
        }
        Ok(SemaphoreGuard::new(self, me, cells))
    }

    /// Blocks until it holds one permit.
    #[inline]
    pub fn acquire(&self) -> SemaphoreGuard<'_> {
        let me = self.me();
        if let Some(i) = self.core().try_one(me, hint()) {
            set_hint(i);
            return SemaphoreGuard::one(self, me, i);
        }
        match self.acquire_slow(1, Wait::Forever) {
            Ok(g) => g,
            Err(e) => unreachable!("a wait without deadline gave up: {e}"),
        }
    }

    /// Takes one permit if one is free, else `Err(TryLockError::WouldBlock)`
    /// (after taking back the permits of dead holders, if any).
    pub fn try_acquire(&self) -> Result<SemaphoreGuard<'_>, TryLockError> {
        self.acquire_slow(1, Wait::NonBlocking)
    }

    /// Waits at most `timeout` for one permit, else `TimedOut`.
    pub fn try_acquire_for(&self, timeout: Duration) -> Result<SemaphoreGuard<'_>, TryLockError> {
        self.acquire_slow(1, Wait::timeout(timeout))
    }

    /// Waits until `deadline` at most for one permit, else `TimedOut`.
    pub fn try_acquire_until(&self, deadline: Instant) -> Result<SemaphoreGuard<'_>, TryLockError> {
        self.acquire_slow(1, Wait::Until(deadline))
    }

    /// Blocks until it holds `k` permits at once (1..=N, else
    /// `InvalidInput`). It never holds some of them while it waits (so two
    /// such callers cannot deadlock), which also means callers asking for
    /// fewer permits may overtake it.
    pub fn acquire_many(&self, k: u32) -> Result<SemaphoreGuard<'_>> {
        self.acquire_slow(k, Wait::Forever).map_err(|e| match e {
            TryLockError::Error(e) => e,
            e => unreachable!("a wait without deadline gave up: {e}"),
        })
    }

    /// `k` permits at once, waiting as `wait` allows.
    pub fn try_acquire_many(&self, k: u32, wait: Wait) -> Result<SemaphoreGuard<'_>, TryLockError> {
        self.acquire_slow(k, wait)
    }

    /// As [`Semaphore::try_acquire_many`], with a guard that owns a
    /// reference to the semaphore (`'static`; any thread may give the
    /// permits back).
    pub fn acquire_many_arc(
        self: &Arc<Self>,
        k: u32,
        wait: Wait,
    ) -> Result<SemaphoreGuard<'static>, TryLockError> {
        let g = self.acquire_slow(k, wait)?;
        let mut g = std::mem::ManuallyDrop::new(g);
        Ok(SemaphoreGuard {
            sem: Handle::Owned(Arc::clone(self)),
            me: g.me,
            gen: g.gen,
            first: g.first,
            rest: std::mem::take(&mut g.rest),
        })
    }
}

/// Permits held on a [`Semaphore`]; given back on drop. `Send`: permits
/// belong to the process, so any of its threads may give them back.
#[must_use = "the permits are given back as soon as the guard is dropped"]
pub struct SemaphoreGuard<'a> {
    sem: Handle<'a, Semaphore>,
    me: u64,
    gen: u64,
    first: u32,
    rest: Vec<u32>,
}

impl<'a> SemaphoreGuard<'a> {
    #[inline]
    fn one(sem: &'a Semaphore, me: u64, i: u32) -> SemaphoreGuard<'a> {
        SemaphoreGuard {
            sem: Handle::Borrowed(sem),
            me,
            gen: generation(),
            first: i,
            rest: Vec::new(),
        }
    }

    fn new(sem: &'a Semaphore, me: u64, mut cells: Vec<u32>) -> SemaphoreGuard<'a> {
        let first = cells.remove(0);
        SemaphoreGuard {
            sem: Handle::Borrowed(sem),
            me,
            gen: generation(),
            first,
            rest: cells,
        }
    }

    /// How many permits this guard holds.
    pub fn count(&self) -> u32 {
        1 + self.rest.len() as u32
    }

    /// The permit numbers held (0..N), for diagnostics.
    pub fn cells(&self) -> Vec<u32> {
        std::iter::once(self.first)
            .chain(self.rest.iter().copied())
            .collect()
    }

    /// Gives the permits back, reporting what drop must swallow: some had
    /// been taken back while held (this process had been judged dead).
    pub fn release(self) -> Result<()> {
        let mut me = std::mem::ManuallyDrop::new(self);
        let ok = me.release_quiet();
        // The Vec is not dropped by ManuallyDrop: take it.
        drop(std::mem::take(&mut me.rest));
        if ok {
            Ok(())
        } else {
            Err(Error::new(ErrorKind::Corrupt, "release semaphore permits")
                .with_path(&me.sem.inner.path)
                .with_detail(
                    "a permit had been taken back while held (this process was taken for dead)",
                ))
        }
    }

    #[inline]
    fn release_quiet(&mut self) -> bool {
        if self.gen != generation() {
            // Inherited across fork: the permits are the parent's.
            return true;
        }
        let core = self.sem.core();
        let mut ok = core.release(self.me, self.first);
        for &i in &self.rest {
            ok &= core.release(self.me, i);
        }
        ok
    }
}

impl Drop for SemaphoreGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        self.release_quiet();
    }
}

impl fmt::Debug for SemaphoreGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SemaphoreGuard")
            .field("semaphore", &self.sem.inner.path)
            .field("cells", &self.cells())
            .finish()
    }
}

/// Both modes take one permit.
impl Lock for Semaphore {
    type Guard<'a> = SemaphoreGuard<'a>;

    fn acquire(&self, _mode: Mode, wait: Wait) -> Result<SemaphoreGuard<'_>, TryLockError> {
        self.acquire_slow(1, wait)
    }
}
