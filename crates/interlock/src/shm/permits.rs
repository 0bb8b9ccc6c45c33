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
//! merely looks the same again (ABA). Waiters sleep at most [`CHECK`] at a
//! time and then look for dead holders, as the other shm locks do.
//!
//! Fairness: none. A release wakes every sleeper and they race (as glibc's
//! `sem_post` with many waiters effectively does); an `acquire_many(k)`
//! takes its permits one by one and gives them all back if it cannot get
//! `k`, so it never holds some while it waits (no deadlock between two
//! such callers), and it can be overtaken by single-permit takers.

use super::layout::{Slot, Words};
use super::protocol::{Env, Notify, CHECK};
use crate::sync::{dekker, futex, Ordering, Woke};
use crate::wait::Wait;
use crate::TryLockError;
use std::time::Duration;

/// Someone sleeps on the state word: a release must bump and wake.
pub const SEM_WAITERS: u32 = 1 << 31;
/// The sequence number's bits.
pub const SEQ_MASK: u32 = SEM_WAITERS - 1;

/// One semaphore: the state word, the permit cells, the identity oracle.
pub struct Permits<'a, E: Env> {
    /// The state word (`state`) is the futex; `high` is unused.
    pub words: &'a Words,
    /// The permit cells: `owner` names the holder (0 = free), `tid` the
    /// holding thread (diagnostics only).
    pub cells: &'a [Slot],
    /// The identity oracle.
    pub env: &'a E,
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
        if freed > 0 {
            dekker();
            let ws = self.words.state.load(Ordering::SeqCst);
            if ws & SEM_WAITERS != 0 {
                self.wake(ws);
            }
        }
        freed
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
        let mut last_check = std::time::Instant::now();
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
            // Look for dead holders after a sleep that timed out, and at
            // least every CHECK even if wake-ups keep coming (other
            // releases and give-backs must not postpone recovery forever).
            let woke = futex::wait(&self.words.state, mine, slice(wait));
            if woke == Woke::TimedOut || last_check.elapsed() >= CHECK {
                last_check = std::time::Instant::now();
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
