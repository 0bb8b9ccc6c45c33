//! Which slot a thread uses: a thread-local cache, and each process's pool.
//!
//! Why it is built this way: the reader fast path must not search the slot
//! table (that would touch every line) nor take a process-wide lock, so each
//! thread remembers the slot it claimed, keyed by a process-unique handle id
//! (not an address: a freed handle's address can be reused) and by the fork
//! generation (a forked child must not use its parent's slots). A
//! one-entry cache answers the common case with two compares.
//!
//! Slots belong to the *process*, not the thread: identities are per
//! process. Each process first claims one *shared* slot, which any of its
//! threads may use (its counter moves only by atomic increments and
//! decrements); then each thread claims a slot of its *own* if one is free,
//! which spares it the shared cache line and lets it release a read hold
//! with a plain store (see `protocol::Core::read_exit`). An own slot is
//! never shared; a thread that finds no free slot uses the shared one, so
//! slots running out costs speed, never exclusion. A thread that exits
//! gives its own slot back to its process's pool; slots go back to the
//! shared table only when the handle is dropped, when no guard can exist.

use super::layout::Slot;
use super::protocol::{Notify, CHECK};
use super::Inner;
use crate::sync::Ordering;
use crate::sys::fork::generation;
use crate::sys::robust::{gettid, Linked};
use crate::wait::Wait;
use crate::TryLockError;
use std::cell::{Cell, RefCell};
use std::sync::{Arc, Weak};

/// One process's slots of one lock (per handle).
#[derive(Default)]
pub(crate) struct Pool {
    /// The fork generation these slots were claimed in.
    gen: u64,
    /// Every slot this process claimed through this handle.
    claimed: Vec<u32>,
    /// Own slots no thread holds now.
    free: Vec<u32>,
    /// The slot every thread without one of its own shares.
    shared: Option<u32>,
    /// Own slots whose liveness word is linked into some thread's robust
    /// list: only that thread may unlink it, so they are not returned to
    /// the table when the handle is dropped by another thread.
    linked: Vec<u32>,
}

impl Pool {
    /// Forgets slots claimed before a fork: they are the parent's.
    fn refresh(&mut self, gen: u64) {
        if self.gen != gen {
            *self = Pool {
                gen,
                ..Pool::default()
            };
        }
    }
}

struct Entry {
    id: u64,
    gen: u64,
    slot: u32,
    own: bool,
    inner: Weak<Inner>,
    /// The slot's liveness word, linked into this thread's robust list.
    link: Option<Linked>,
}

impl Entry {
    /// Unlinks the slot's liveness word (on this thread, in the generation
    /// that linked it; a forked child leaves its parent's entries alone).
    fn unlink(&mut self, gen: u64) {
        if let Some(l) = self.link.take() {
            if self.gen == gen {
                unlink_counted(l);
            }
        }
    }
}

struct Local(Vec<Entry>);

impl Drop for Local {
    fn drop(&mut self) {
        let gen = generation();
        for mut e in self.0.drain(..) {
            let was_linked = e.link.is_some();
            e.unlink(gen);
            if e.gen != gen || !e.own {
                continue;
            }
            if let Some(inner) = e.inner.upgrade() {
                let mut pool = inner.pool.lock();
                if pool.gen == gen {
                    if was_linked {
                        pool.linked.retain(|&x| x != e.slot);
                    }
                    pool.free.push(e.slot);
                }
            }
            // (A handle already dropped leaves a linked slot claimed until
            // the process exits: it could not be returned while linked.)
        }
    }
}

/// The most liveness words one thread links (the kernel walks at most 2048
/// entries per thread, glibc's robust mutexes included); slots beyond are
/// uncovered and their waiters poll.
const MAX_LINKS: u32 = 64;

/// Links the liveness word of own slot `s` into this thread's robust list.
fn link_own(inner: &Inner, s: u32) -> Option<Linked> {
    link_counted(inner.mapping(), &inner.core().slots[s as usize])
}

/// Links `slot`'s liveness word into this thread's robust list (its `tid`
/// first, then the word), counted against this thread's [`MAX_LINKS`]
/// (the semaphore's watch slots count too). Undo with [`unlink_counted`].
pub(crate) fn link_counted(map: &Arc<crate::sys::mmap::Mapping>, slot: &Slot) -> Option<Linked> {
    if LINKS.try_with(Cell::get).ok()? >= MAX_LINKS {
        return None;
    }
    let tid = gettid();
    slot.tid.store(tid, Ordering::SeqCst);
    let l = Linked::link(map, &slot.live, &slot.entry, tid)?;
    let _ = LINKS.try_with(|n| n.set(n.get() + 1));
    Some(l)
}

/// Unlinks an entry of [`link_counted`] (on the thread that linked it).
pub(crate) fn unlink_counted(l: Linked) {
    l.unlink();
    let _ = LINKS.try_with(|n| n.set(n.get().saturating_sub(1)));
}

/// Unlinks this thread's entries for the handle `id` (being dropped) and
/// forgets them.
pub(crate) fn unlink_mine(inner: &Inner) {
    let gen = generation();
    let mine: Vec<u32> = ALL
        .try_with(|a| {
            let Ok(mut a) = a.try_borrow_mut() else {
                return Vec::new();
            };
            let mut out = Vec::new();
            for e in a.0.iter_mut().filter(|e| e.id == inner.id) {
                if e.link.is_some() {
                    e.unlink(gen);
                    out.push(e.slot);
                }
            }
            out
        })
        .unwrap_or_default();
    if !mine.is_empty() {
        let mut pool = inner.pool.lock();
        pool.linked.retain(|x| !mine.contains(x));
    }
}

thread_local! {
    /// The last (handle id, fork generation, slot, own) this thread used.
    static LAST: Cell<(u64, u64, u32, bool)> = const { Cell::new((0, 0, 0, false)) };
    /// Every slot this thread uses.
    static ALL: RefCell<Local> = const { RefCell::new(Local(Vec::new())) };
    /// How many liveness words this thread has linked.
    static LINKS: Cell<u32> = const { Cell::new(0) };
}

/// The slot this thread last used for `inner` and whether it is its own,
/// if that is still valid: the fast path, two compares.
#[inline]
pub(crate) fn cached(inner: &Inner) -> Option<(u32, bool)> {
    let (id, g, s, own) = LAST.try_with(Cell::get).ok()?;
    (id == inner.id && g == generation()).then_some((s, own))
}

/// The slot this thread uses for `inner` and whether it is its own,
/// claiming one if needed; waits (as `wait` allows) only if the process has
/// no slot at all and none is free.
#[inline]
pub(crate) fn slot(
    inner: &Arc<Inner>,
    wait: &Wait,
    notify: &mut Notify<'_>,
) -> Result<(u32, bool), TryLockError> {
    match cached(inner) {
        Some(x) => Ok(x),
        None => slot_slow(inner, generation(), wait, notify),
    }
}

#[cold]
fn slot_slow(
    inner: &Arc<Inner>,
    gen: u64,
    wait: &Wait,
    notify: &mut Notify<'_>,
) -> Result<(u32, bool), TryLockError> {
    let known = ALL
        .try_with(|a| {
            a.try_borrow().ok().and_then(|a| {
                a.0.iter()
                    .find(|e| e.id == inner.id && e.gen == gen)
                    .map(|e| (e.slot, e.own))
            })
        })
        .ok()
        .flatten();
    if let Some((s, own)) = known {
        let _ = LAST.try_with(|c| c.set((inner.id, gen, s, own)));
        return Ok((s, own));
    }
    loop {
        if let Some((s, own)) = take(inner, gen) {
            let _ = ALL.try_with(|a| {
                if let Ok(mut a) = a.try_borrow_mut() {
                    // Entries of dropped handles: unlink (their mappings
                    // were kept for this), then forget.
                    for e in a.0.iter_mut().filter(|e| e.inner.strong_count() == 0) {
                        e.unlink(gen);
                    }
                    a.0.retain(|e| e.inner.strong_count() > 0);
                    // Only a recorded entry can be unlinked later, so link
                    // only here.
                    let link = if own { link_own(inner, s) } else { None };
                    if link.is_some() {
                        inner.pool.lock().linked.push(s);
                    }
                    a.0.push(Entry {
                        id: inner.id,
                        gen,
                        slot: s,
                        own,
                        inner: Arc::downgrade(inner),
                        link,
                    });
                }
            });
            // If the thread-local is gone (the thread is exiting), an own
            // slot simply stays claimed until the handle is dropped.
            let _ = LAST.try_with(|c| c.set((inner.id, gen, s, own)));
            return Ok((s, own));
        }
        // Every slot belongs to a live process and this one has none: wait
        // for one to be freed (a process exiting or dropping its handle).
        if !wait.may_block() || wait.expired() {
            return Err(wait.gave_up());
        }
        notify.fire();
        std::thread::sleep(wait.remaining().map_or(CHECK, |r| r.min(CHECK)));
    }
}

/// The process's shared slot for `inner` (claiming it if needed), which
/// any thread may use: its counter moves only by atomic read-modify-writes.
/// Owned guards, which any thread may release, go through it. Waits (as
/// `wait` allows) only if the process has no slot and none is free.
pub(crate) fn shared_slot(
    inner: &Arc<Inner>,
    wait: &Wait,
    notify: &mut Notify<'_>,
) -> Result<u32, TryLockError> {
    use std::sync::atomic::Ordering as O;
    let gen = generation();
    // The uncontended path: the slot published for this generation, with
    // no lock. Within one generation the pool's shared slot is set once and
    // never changes; it is published (under the pool's lock) slot first,
    // then its generation with Release, so a reader that sees its own
    // generation sees that slot. A forked child sees its parent's
    // generation (never its own: `generation` differs in a child) and
    // takes the pool's lock, which forgets the parent's slots.
    if inner.shared_gen.load(O::Acquire) == gen {
        return Ok(inner.shared_slot.load(O::Relaxed));
    }
    let publish = |s: u32| {
        inner.shared_slot.store(s, O::Relaxed);
        inner.shared_gen.store(gen, O::Release);
    };
    loop {
        {
            let mut pool = inner.pool.lock();
            pool.refresh(gen);
            if let Some(s) = pool.shared {
                publish(s);
                return Ok(s);
            }
            if let Some(s) = inner.core().claim_slot() {
                pool.claimed.push(s);
                pool.shared = Some(s);
                publish(s);
                return Ok(s);
            }
        }
        if !wait.may_block() || wait.expired() {
            return Err(wait.gave_up());
        }
        notify.fire();
        std::thread::sleep(wait.remaining().map_or(CHECK, |r| r.min(CHECK)));
    }
}

/// A slot for a thread of this process: a pooled own slot, a newly
/// claimed own slot, or (when the table is full) the process's shared slot.
/// `None` if the process has no slot at all and none is free.
fn take(inner: &Inner, gen: u64) -> Option<(u32, bool)> {
    let mut pool = inner.pool.lock();
    pool.refresh(gen);
    let core = inner.core();
    let shared = match pool.shared {
        Some(s) => s,
        None => {
            let s = core.claim_slot()?;
            pool.claimed.push(s);
            pool.shared = Some(s);
            s
        }
    };
    if let Some(s) = pool.free.pop() {
        return Some((s, true));
    }
    if let Some(s) = core.claim_slot() {
        pool.claimed.push(s);
        return Some((s, true));
    }
    Some((shared, false))
}

/// Returns every slot this process claimed through `inner` to the shared
/// table (the handle is being dropped: no guard exists).
pub(crate) fn release_all(inner: &Inner) {
    let gen = generation();
    let pool = inner.pool.lock();
    if pool.gen != gen {
        return;
    }
    let core = inner.core();
    for &s in &pool.claimed {
        // A slot still linked by another thread stays claimed (see `Pool`).
        if !pool.linked.contains(&s) {
            core.release_slot(s);
        }
    }
}

/// How many slots this process has claimed through `inner` (for tests).
#[cfg(test)]
pub(crate) fn claimed(inner: &Inner) -> usize {
    let pool = inner.pool.lock();
    if pool.gen == generation() {
        pool.claimed.len()
    } else {
        0
    }
}

/// What a guard needs in order to release: its slot, whether the slot is
/// the thread's own, the poison it saw, and the fork generation it was
/// taken in, packed in one word so that a guard is two words and moves of
/// it stay cheap (field-by-field stores read back as one wider load defeat
/// store forwarding, which cost more than the lock itself on the fast path).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ticket(u64);

/// The fork generation kept in a ticket (30 bits: a ticket from a process
/// 2^30 forks away could match; no process tree forks that deep).
const GEN_BITS: u32 = 30;
const GEN_MASK: u64 = (1 << GEN_BITS) - 1;
const OWN: u64 = 1 << 32;
const POISONED: u64 = 1 << 33;

impl Ticket {
    /// A ticket for slot `slot` taken now.
    #[inline]
    pub(crate) fn new(slot: u32, own: bool, poison: bool) -> Ticket {
        Ticket(
            u64::from(slot)
                | if own { OWN } else { 0 }
                | if poison { POISONED } else { 0 }
                | (generation() & GEN_MASK) << 34,
        )
    }

    #[inline]
    pub(crate) fn slot(self) -> u32 {
        self.0 as u32
    }

    #[inline]
    pub(crate) fn own(self) -> bool {
        self.0 & OWN != 0
    }

    #[inline]
    pub(crate) fn poison(self) -> bool {
        self.0 & POISONED != 0
    }

    #[inline]
    pub(crate) fn with_own(self, own: bool) -> Ticket {
        Ticket(if own { self.0 | OWN } else { self.0 & !OWN })
    }

    #[inline]
    pub(crate) fn with_poison(self, poison: bool) -> Ticket {
        Ticket(if poison {
            self.0 | POISONED
        } else {
            self.0 & !POISONED
        })
    }

    /// Whether the ticket was taken in this process (not inherited across
    /// fork).
    #[inline]
    pub(crate) fn current(self) -> bool {
        self.0 >> 34 == generation() & GEN_MASK
    }
}
