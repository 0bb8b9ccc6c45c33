//! The shared-memory semaphore protocol: N permits, each a cell that names
//! its holder, and a futex word that waiters sleep on.
//!
//! Why it is built this way. A POSIX semaphore is one counter: a holder
//! killed between its decrement and its increment takes a permit with it
//! forever, and nothing in the counter says who had it. Journaling the
//! transfer between a counter and a per-holder record takes several stores,
//! and a death between any two of them must stay recoverable. Here there is
//! no counter to keep in step: **a permit is a cell**, and the cell's one
//! 64-bit word says who holds it (the packed pid + start time of
//! [`super::layout::pack`], 0 = free). So:
//!
//! * taking a permit is one compare-and-swap of a free cell (0 → me), and
//!   giving it back one compare-and-swap (me → 0): a death between any two
//!   operations leaves every cell either free or naming a process, never a
//!   permit that is neither held nor free. No permit can be lost or
//!   duplicated, and "never more than N inside" holds by construction (there
//!   are N cells);
//! * a dead holder's permit is reclaimed with one compare-and-swap (dead
//!   identity → 0): among several waiters that saw the same death exactly
//!   one wins, and a reclaimer that dies has changed nothing;
//! * cells are 128 bytes apart (the slot table of the other shm locks), so
//!   holders of different permits do not write a common cache line, and a
//!   thread starts its search at the cell it used last.
//!
//! Waiting: the state word ([`Words::state`]) is a futex word holding a
//! sequence number (bits 0..31) and [`SEM_WAITERS`] (bit 31). A waiter sets
//! `SEM_WAITERS` (SeqCst RMW), then searches the cells (SeqCst loads), then
//! sleeps on the exact word it set. A releaser frees its cell (SeqCst RMW),
//! then loads the state word (SeqCst); if `SEM_WAITERS` is set it bumps the
//! sequence number, clearing the flag, and wakes every sleeper. This is
//! Dekker's pattern again: in the SeqCst total order either the waiter's
//! search sees the freed cell, or the releaser's load sees the flag and the
//! changed word makes the waiter's futex call return at once. The sequence
//! number (not just the flag) changes on every such release, so a waiter
//! that read the word before a release can never sleep on a word that
//! merely looks the same again (ABA).
//!
//! Dead holders, without polling. A cell names a *process*, and its permit
//! may be given back by any of its threads, so no cell is ever linked into
//! a thread's robust list (an entry's `next` pointer lives in the entry:
//! a word shared by many processes over time must never be linked by two
//! threads). Instead each process links one private *watch slot* (the
//! watch table after the cells, [`Permits::watch`]): before its first
//! acquisition a thread of the process claims a watch slot (owner = the
//! process's identity), links the slot's liveness word into its own glibc
//! robust list and stores its tid there ([`crate::sys::robust`]), and only
//! then takes cells. When that thread dies (SIGKILL of the process kills
//! every thread) the kernel flags the word `FUTEX_OWNER_DIED` and wakes a
//! sleeper. A waiter that finds every cell held sleeps in `futex_waitv` on
//! the state word *and* the liveness words of the watch slots owned by the
//! holders' processes ([`Permits::plan`]; up to 127 words), with only its
//! deadline and [`BACKSTOP`]. On `OWNER_DIED` it passes the wake on, asks
//! whether the *process* is dead or every one of its threads is exiting
//! ([`Env::is_dying`]: permits are the process's, so one thread's death
//! proves nothing), frees the process's cells and its watch slot. A held
//! cell whose process has no linked watch word is *uncovered*: the waiter
//! then also wakes every [`CHECK`] to ask /proc, as before. That happens
//! when the linking thread has exited while its process still holds
//! permits (until another of its threads acquires and links), when the
//! watch table is full or absent (a version-1 file), when the thread's
//! robust list is full or missing, or without `futex_waitv`.
//!
//! Why a waiter may trust a watch word: the holder claims its watch slot
//! (owner, then `words.high`, SeqCst) and stores its tid in the word before
//! its cell CAS, so a waiter that reads the cell (SeqCst) sees both. It
//! sets `FUTEX_WAITERS` in the word by CAS from the value read and then
//! re-reads the slot's owner: from then on any change of the word (the
//! kernel's flag, a give-back's swap to 0, a reclaim) wakes it or fails its
//! futex check, so it never sleeps on a word that stopped covering the
//! holder without being told.
//!
//! Fairness: none. A release wakes every sleeper and they race (as glibc's
//! `sem_post` with many waiters effectively does); an `acquire_many(k)`
//! takes its permits one by one and gives them all back if it cannot get
//! `k`, so it never holds some while it waits (no deadlock between two
//! such callers), and it can be overtaken by single-permit takers.

use super::layout::{Slot, Words, LIVE_OWNER_DIED, LIVE_TID_MASK, LIVE_WAITERS, RECLAIMING};
use super::protocol::{Env, Notify, BACKSTOP, CHECK, CONFIRM};
use crate::sync::{dekker, futex, AtomicU32, Ordering, Woke};
use crate::wait::Wait;
use crate::TryLockError;
use std::time::{Duration, Instant};

/// The most liveness words one sleep watches (`futex_waitv` takes 128
/// words, the state word is one).
const WATCH_WORDS: usize = 127;

/// Someone sleeps on the state word: a release must bump and wake.
pub const SEM_WAITERS: u32 = 1 << 31;
/// The sequence number's bits.
pub const SEQ_MASK: u32 = SEM_WAITERS - 1;

/// One semaphore: the state word, the permit cells, the watch table, the
/// identity oracle.
pub struct Permits<'a, E: Env> {
    /// The state word (`state`) is the futex; `high` is one past the
    /// highest watch slot ever claimed.
    pub words: &'a Words,
    /// The permit cells: `owner` names the holder (0 = free); nothing else
    /// of a cell is used.
    pub cells: &'a [Slot],
    /// The watch slots (empty in a version-1 file): `owner` names a
    /// process (0 = free), `live` is the liveness word one of its threads
    /// linked (0 = not linked), `tid` that thread.
    pub watch: &'a [Slot],
    /// The identity oracle.
    pub env: &'a E,
}

/// What a waiter about to sleep found ([`Permits::plan`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Something changed while looking: look again.
    Retry,
    /// Watch slot `j`'s word says its thread died.
    Notice(u32),
    /// Sleep on the words gathered; `all` if every held cell's process is
    /// covered by one of them.
    Sleep {
        /// Every holder is covered: no periodic check is needed.
        all: bool,
    },
}

fn slice(wait: &Wait) -> Option<Duration> {
    Some(match wait.remaining() {
        None => CHECK,
        Some(r) => r.min(CHECK),
    })
}

impl<'a, E: Env> Permits<'a, E> {
    /// The number of permits.
    pub fn permits(&self) -> usize {
        self.cells.len()
    }

    /// One search for a free cell, starting at `hint`: takes it for `me`.
    /// Acquire (SeqCst) on success: the previous holder's release of this
    /// cell happens-before what we do with the permit.
    #[inline]
    pub fn try_one(&self, me: u64, hint: usize) -> Option<u32> {
        let n = self.cells.len();
        for j in 0..n {
            let i = (hint + j) % n;
            let c = &self.cells[i].owner;
            // SeqCst load: a waiter's half of Dekker's pattern (after it
            // set SEM_WAITERS); a plain load on x86.
            if c.load(Ordering::SeqCst) == 0
                && c.compare_exchange(0, me, Ordering::SeqCst, Ordering::Relaxed)
                    .is_ok()
            {
                return Some(i as u32);
            }
        }
        None
    }

    /// Takes `k` permits for `me` into `out`, or none (giving back those it
    /// took, and waking waiters that may have seen them taken).
    pub fn try_many(&self, me: u64, hint: usize, k: usize, out: &mut Vec<u32>) -> bool {
        // Look before taking: a caller that would take some and give them
        // back (waking every waiter, itself included) on every round would
        // spin instead of sleeping while fewer than `k` are free.
        if k > 1 && self.available() < k {
            return false;
        }
        let start = out.len();
        while out.len() - start < k {
            let h = out.last().map_or(hint, |&i| i as usize + 1);
            match self.try_one(me, h) {
                Some(i) => out.push(i),
                None => {
                    for i in out.drain(start..) {
                        self.release(me, i);
                    }
                    return false;
                }
            }
        }
        true
    }

    /// Gives back permit `i` held by `me`. Returns false, changing nothing,
    /// if the cell was not ours (it was reclaimed: we had been taken for
    /// dead).
    #[inline]
    pub fn release(&self, me: u64, i: u32) -> bool {
        // SeqCst (includes Release: our use of the permit happens-before
        // the next holder's acquiring CAS), then the SeqCst load of the
        // state word: the releaser's half of Dekker's pattern.
        if self.cells[i as usize]
            .owner
            .compare_exchange(me, 0, Ordering::SeqCst, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        dekker();
        let ws = self.words.state.load(Ordering::SeqCst);
        if ws & SEM_WAITERS != 0 {
            self.wake(ws);
        }
        true
    }

    /// Bumps the sequence number (clearing SEM_WAITERS) and wakes every
    /// sleeper, unless somebody else already changed the word (then that
    /// change woke them, or made their futex call fail).
    #[cold]
    fn wake(&self, ws: u32) {
        let new = (ws.wrapping_add(1)) & SEQ_MASK;
        if self
            .words
            .state
            .compare_exchange(ws, new, Ordering::SeqCst, Ordering::Relaxed)
            .is_ok()
        {
            futex::wake_all(&self.words.state);
        }
    }

    /// Frees every cell held by a dead process; returns how many. One CAS
    /// per cell (dead identity → 0), so a reclaimer that dies half-way has
    /// freed some cells and left the others as they were, and of two
    /// reclaimers exactly one frees each cell.
    pub fn reclaim_dead(&self) -> usize {
        let mut seen_alive: [u64; 8] = [0; 8];
        let mut n_alive = 0;
        let mut freed = 0;
        for c in self.cells {
            let o = c.owner.load(Ordering::SeqCst);
            if o == 0 || seen_alive[..n_alive].contains(&o) {
                continue;
            }
            if self.env.is_dead(o) {
                if c.owner
                    .compare_exchange(o, 0, Ordering::SeqCst, Ordering::Relaxed)
                    .is_ok()
                {
                    freed += 1;
                }
            } else if n_alive < seen_alive.len() {
                seen_alive[n_alive] = o;
                n_alive += 1;
            }
        }
        self.woke_for(freed);
        freed
    }

    /// Frees every cell held by `owner` (judged dead by the caller);
    /// returns how many, waking waiters if any.
    fn free_cells_of(&self, owner: u64) -> usize {
        let mut freed = 0;
        for c in self.cells {
            if c.owner.load(Ordering::SeqCst) == owner
                && c.owner
                    .compare_exchange(owner, 0, Ordering::SeqCst, Ordering::Relaxed)
                    .is_ok()
            {
                freed += 1;
            }
        }
        self.woke_for(freed);
        freed
    }

    /// After freeing `freed` cells: wake the waiters, as a release does.
    fn woke_for(&self, freed: usize) {
        if freed > 0 {
            dekker();
            let ws = self.words.state.load(Ordering::SeqCst);
            if ws & SEM_WAITERS != 0 {
                self.wake(ws);
            }
        }
    }

    // ---------------------------------------------------------------
    // The watch table.

    /// Claims a free watch slot for `me` (a process about to link one of
    /// its threads to it); if none is free, first reclaims the slots of
    /// dead processes. `None` if every slot names a live process (or there
    /// is no table). The caller then stores the thread's tid in `tid` and
    /// links `live` (which stores the tid there), before taking cells.
    pub fn claim_watch(&self, me: u64) -> Option<u32> {
        let high = (self.words.high.load(Ordering::SeqCst) as usize).min(self.watch.len());
        if let Some(j) = self.claim_watch_in(0..high, me) {
            return Some(j);
        }
        for j in 0..high {
            let o = self.watch[j].owner.load(Ordering::Acquire);
            if o != 0 && self.env.is_dead(o) {
                self.reclaim_watch(j as u32, o);
            }
        }
        self.claim_watch_in(0..self.watch.len(), me)
    }

    fn claim_watch_in(&self, range: std::ops::Range<usize>, me: u64) -> Option<u32> {
        for j in range {
            let w = &self.watch[j].owner;
            // Acquire (on success): see the `live = 0` of whoever freed it.
            if w.load(Ordering::Relaxed) == 0
                && w.compare_exchange(0, me, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                // SeqCst, before the cells this process takes: a waiter
                // that sees one of them sees this slot below `high`.
                self.words.high.fetch_max(j as u32 + 1, Ordering::SeqCst);
                return Some(j as u32);
            }
        }
        None
    }

    /// Gives back watch slot `j` of `me`, whose word the caller has
    /// unlinked (swapped to 0, waking its sleepers).
    pub fn release_watch(&self, me: u64, j: u32) {
        let _ = self.watch[j as usize].owner.compare_exchange(
            me,
            0,
            Ordering::Release,
            Ordering::Relaxed,
        );
    }

    /// Frees watch slot `j`, seen owned by the dead (or dying) `seen`:
    /// freeze it (CAS to our identity flagged RECLAIMING; exactly one
    /// reclaimer wins), clear its word (waking its sleepers), free it. A
    /// reclaimer that dies half-way leaves a slot named by a dead identity,
    /// which the next claimer reclaims again.
    fn reclaim_watch(&self, j: u32, seen: u64) -> bool {
        let w = &self.watch[j as usize];
        if w.owner
            .compare_exchange(
                seen,
                self.env.me() | RECLAIMING,
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_err()
        {
            return false;
        }
        if w.live.swap(0, Ordering::SeqCst) & LIVE_WAITERS != 0 {
            futex::wake_all(&w.live);
        }
        w.owner.store(0, Ordering::Release);
        true
    }

    /// Before a sleep: gathers into `words` (as `(watch slot, expected
    /// value)`) the linked liveness words of the watch slots owned by the
    /// processes holding cells, setting `FUTEX_WAITERS` in each so that
    /// the kernel wakes us at its thread's death. `owners` and `found` are
    /// scratch space.
    pub fn plan(
        &self,
        words: &mut Vec<(u32, u32)>,
        owners: &mut Vec<u64>,
        found: &mut Vec<(u64, u32)>,
    ) -> Plan {
        words.clear();
        owners.clear();
        found.clear();
        for c in self.cells {
            let o = c.owner.load(Ordering::SeqCst);
            if o != 0 && !owners.contains(&o) {
                owners.push(o);
            }
        }
        // SeqCst, after the loads of the cells: a holder claimed its watch
        // slot (raising `high`) before it took its cell (`claim_watch_in`).
        let high = (self.words.high.load(Ordering::SeqCst) as usize).min(self.watch.len());
        for (j, w) in self.watch[..high].iter().enumerate() {
            let o = w.owner.load(Ordering::SeqCst);
            if o != 0 && owners.contains(&o) {
                found.push((o, j as u32));
            }
        }
        let mut all = true;
        for &o in owners.iter() {
            let mut covered = false;
            for &(_, j) in found.iter().filter(|(fo, _)| *fo == o) {
                let w = &self.watch[j as usize];
                let mut lw = w.live.load(Ordering::SeqCst);
                if lw & LIVE_OWNER_DIED != 0 {
                    return Plan::Notice(j);
                }
                if lw & LIVE_TID_MASK == 0 || words.len() >= WATCH_WORDS {
                    continue;
                }
                if lw & LIVE_WAITERS == 0 {
                    // A failed CAS: the word changed (a death, a give-back).
                    if w.live
                        .compare_exchange(lw, lw | LIVE_WAITERS, Ordering::SeqCst, Ordering::SeqCst)
                        .is_err()
                    {
                        return Plan::Retry;
                    }
                    lw |= LIVE_WAITERS;
                }
                // Still that process's slot (else the word we flagged may
                // belong to another owner: look again).
                if w.owner.load(Ordering::SeqCst) != o {
                    return Plan::Retry;
                }
                words.push((j, lw));
                covered = true;
            }
            all &= covered;
        }
        Plan::Sleep { all }
    }

    /// Watch slot `j`'s word says its thread died: passes the wake on (the
    /// kernel wakes one sleeper), and if the slot's process is dead or
    /// dying, frees its cells and the slot. Otherwise (the process is still
    /// on its way out, or that one thread died alone) naps on the state
    /// word (`mine`): [`CONFIRM`] for the first [`CHECK`] after the notice
    /// (`since`), then [`CHECK`].
    fn notice(&self, j: u32, mine: u32, since: &mut Option<Instant>, wait: &Wait) {
        let w = &self.watch[j as usize];
        futex::wake_all(&w.live);
        let o = w.owner.load(Ordering::Acquire);
        if o == 0 || w.live.load(Ordering::SeqCst) & LIVE_OWNER_DIED == 0 {
            return;
        }
        if o & RECLAIMING == 0 && self.env.is_dying(o) {
            self.free_cells_of(o);
            self.reclaim_watch(j, o);
            return;
        }
        if o & RECLAIMING != 0 && self.env.is_dead(o) {
            // A reclaimer died half-way: finish its work.
            self.reclaim_watch(j, o);
            return;
        }
        let first = *since.get_or_insert_with(Instant::now);
        let pause = if first.elapsed() < CHECK {
            CONFIRM
        } else {
            CHECK
        };
        let nap = Some(wait.remaining().map_or(pause, |r| r.min(pause)));
        futex::wait(&self.words.state, mine, nap);
        if pause == CHECK {
            // Polling now: the other holders too.
            self.reclaim_dead();
        }
    }

    /// Takes `k` permits (1..=N) for `me` into `out`, waiting as `wait`
    /// allows. On error nothing is held.
    pub fn acquire(
        &self,
        me: u64,
        hint: usize,
        k: usize,
        out: &mut Vec<u32>,
        wait: &Wait,
        notify: &mut Notify<'_>,
    ) -> Result<(), TryLockError> {
        let mut checked = false;
        let mut last_check = Instant::now();
        let mut since: Option<Instant> = None;
        let (mut words, mut owners, mut found) = (Vec::new(), Vec::new(), Vec::new());
        loop {
            let ws = self.words.state.load(Ordering::SeqCst);
            if self.try_many(me, hint, k, out) {
                return Ok(());
            }
            if !wait.may_block() || wait.expired() {
                // Not waiting for the dead: a try-acquire loop must not be
                // wedged by a killed holder either.
                if !checked {
                    checked = true;
                    if self.reclaim_dead() > 0 {
                        continue;
                    }
                }
                return Err(wait.gave_up());
            }
            // Announce, then search again, then sleep on the word we set.
            let mine = ws | SEM_WAITERS;
            if ws & SEM_WAITERS == 0
                && self
                    .words
                    .state
                    .compare_exchange(ws, mine, Ordering::SeqCst, Ordering::SeqCst)
                    .is_err()
            {
                continue;
            }
            dekker();
            if self.try_many(me, hint, k, out) {
                return Ok(());
            }
            notify.fire();
            let all = match self.plan(&mut words, &mut owners, &mut found) {
                Plan::Retry => continue,
                Plan::Notice(j) => {
                    self.notice(j, mine, &mut since, wait);
                    continue;
                }
                Plan::Sleep { all } => all,
            };
            since = None;
            // Covered holders: sleep on their liveness words too, with
            // only the deadline and the backstop. Otherwise (or without
            // futex_waitv) look for dead holders after a sleep that timed
            // out, and at least every CHECK even if wake-ups keep coming
            // (other releases and give-backs must not postpone recovery
            // forever).
            let slept = if words.is_empty() {
                None
            } else {
                let nap = if all { BACKSTOP } else { CHECK };
                let nap = Some(wait.remaining().map_or(nap, |r| r.min(nap)));
                let mut v: Vec<(&AtomicU32, u32)> = Vec::with_capacity(words.len() + 1);
                v.push((&self.words.state, mine));
                v.extend(
                    words
                        .iter()
                        .map(|&(j, lw)| (&self.watch[j as usize].live, lw)),
                );
                futex::wait_any(&v, nap).map(|w| (w, !all))
            };
            let (woke, polling) =
                slept.unwrap_or_else(|| (futex::wait(&self.words.state, mine, slice(wait)), true));
            if woke == Woke::TimedOut || (polling && last_check.elapsed() >= CHECK) {
                last_check = Instant::now();
                self.reclaim_dead();
            }
        }
    }

    /// How many cells are free right now (a snapshot).
    pub fn available(&self) -> usize {
        self.cells
            .iter()
            .filter(|c| c.owner.load(Ordering::SeqCst) == 0)
            .count()
    }

    /// The packed identities holding permits right now (a snapshot; one
    /// entry per permit).
    pub fn holders(&self) -> Vec<u64> {
        self.cells
            .iter()
            .map(|c| c.owner.load(Ordering::SeqCst))
            .filter(|&o| o != 0)
            .collect()
    }
}
