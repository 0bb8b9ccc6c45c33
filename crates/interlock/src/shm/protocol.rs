//! The shared-memory reader-writer protocol: reader slots, a token word,
//! poison, and recovery from holders that died at any instruction.
//!
//! Why it is built this way. A process-shared pthread rwlock keeps one
//! counter of readers and no record of who holds it, so a holder killed by
//! SIGKILL leaks its hold forever (every later writer waits for a reader that
//! no longer exists), and every reader on every CPU writes the same cache
//! line. This protocol keeps both problems out by construction:
//!
//! * **Who holds it is always on record.** Every participating thread first
//!   claims an owner *slot* with one compare-and-swap of a packed identity
//!   (pid + process start time, 64 bits, so the record is never torn). A read
//!   hold is an increment of the slot's own `held` counter, and the exclusive
//!   *token* is the slot's index written into the state word with one CAS. A
//!   process dying between any two of its stores therefore leaves only state
//!   that names a slot, that names a dead process: recoverable.
//! * **Readers do not share a cache line.** A reader's fast path is an atomic
//!   increment of its *own* slot (a line no other thread writes) followed by
//!   a load of the state word (a line that only writers write). This is
//!   Dekker's pattern: the reader stores `held` then loads `state`, the
//!   writer stores `state` (sets `WRITER`) then loads every `held`. Both
//!   sides use SeqCst read-modify-writes and SeqCst loads, so in the single
//!   total order of SeqCst operations either the reader's increment comes
//!   first (and the writer's scan sees it and waits) or the writer's flag
//!   comes first (and the reader's load sees it and backs off). Without
//!   SeqCst on both sides, each could miss the other (store→load reordering
//!   through the store buffer) and both would enter.
//! * **Writers are preferred.** A writer takes the token and sets `WRITER`
//!   *before* waiting for readers to drain; from then on new readers back
//!   off, so a stream of overlapping readers cannot starve it: it waits at
//!   most for the readers already inside to leave.
//! * **Recovery is exactly-once.** A waiter whose bounded futex sleep times
//!   out (every [`CHECK`]) checks that the process named by the blocking
//!   slot is alive. If it is dead, the waiter *reclaims* the slot: it
//!   replaces the owner with its own identity flagged [`RECLAIMING`] by CAS
//!   (so among several waiters that saw the same death exactly one wins, and
//!   the slot cannot be reused while the token still names it), then clears
//!   the token if the slot held it (setting `POISON` if it was a writer),
//!   zeroes `held` (a dead reader's holds vanish silently), and frees the
//!   slot. A reclaimer that dies half-way leaves the slot owned by a dead
//!   identity flagged `RECLAIMING`, which the next waiter reclaims again;
//!   every step is idempotent.
//!
//! * **A release wakes one writer.** Readers sleep on the state word and a
//!   writer's release wakes them all (each may enter); token waiters sleep
//!   on a queue word of their own and a release wakes one, which passes the
//!   wake-up on (see [`Core::token`]).
//!
//! Fairness: writers are preferred over readers (see above), except that
//! readers who slept behind a writer get in before the next writer shuts
//! readers out ([`Core::readers_turn`]); among writers there is no strict
//! queue: the one woken is the kernel's longest sleeper, but a thread that
//! was not asleep may take the token first (barging, as with every futex
//! lock and glibc's), so one writer can in principle be overtaken many
//! times.
//!
//! The same code runs in production (std atomics on a shared mapping) and
//! under the loom model checker (see [`crate::sync`]); death is modelled by
//! a thread that stops after some prefix of its operations and an [`Env`]
//! that then reports it dead.

use super::layout::{
    Slot, Words, DRAIN_SLEEP, INDEX_MASK, LIVE_OWNER_DIED, LIVE_TID_MASK, LIVE_WAITERS, MEMBARRIER,
    POISON, RECLAIMING, TOKEN_SLEEP, TURN, TURN_COUNT, TURN_SLEEP, UPGRADABLE, WAITERS, WRITER,
};
use crate::sync::{dekker, futex, spin_hint, Ordering, Woke};
use crate::sys::membarrier;
use crate::wait::Wait;
use crate::TryLockError;
use std::time::Duration;

/// The longest a draining writer sleeps on a reader's counter before it
/// looks again, behind a reader whose process is not registered for
/// membarrier (an older version, a refused registration): see
/// [`Core::read_exit`] for why it must. Behind a registered one it sleeps
/// until woken (or [`BACKSTOP`]/[`CHECK`] for the liveness check).
pub const DRAIN_SLICE: Duration = Duration::from_millis(1);

/// How long a waiter sleeps before it checks that the holder is alive.
/// Short enough that a dead holder is noticed within a few periods (the goal
/// is 50 ms at p99), long enough that a waiter costs nothing measurable:
/// one read of /proc/PID/stat (~10 µs) per period.
pub const CHECK: Duration = Duration::from_millis(5);

/// The longest a waiter behind a *covered* token holder (one whose slot's
/// liveness word is linked into its thread's robust list) sleeps: the
/// kernel's death notice wakes it, so this only bounds the cases the notice
/// misses (a woken waiter killed before it passed the notice on).
pub const BACKSTOP: Duration = Duration::from_secs(1);

/// How long a waiter that got a death notice the /proc check cannot
/// confirm yet sleeps before it looks again.
pub const CONFIRM: Duration = Duration::from_micros(200);

/// The longest a writer waits for the readers its predecessor woke to
/// come in (see [`Core::readers_turn`]). Long enough for woken threads to
/// be scheduled on a busy machine; it is spent in full only if a counted
/// reader died or cannot get a CPU, and a count left by a dead reader is
/// reset once it has been spent.
pub const DEFAULT_READERS_TURN: Duration = Duration::from_millis(1);

/// The longest readers' turn: a longer setting is taken as this, so that a
/// count left by a killed reader always runs out.
pub const MAX_READERS_TURN: Duration = Duration::from_secs(60);

/// Busy-wait rounds before sleeping: about a microsecond, enough to catch a
/// holder that is about to release without paying for a futex sleep.
#[cfg(not(loom))]
const SPIN: u32 = 64;
#[cfg(loom)]
const SPIN: u32 = 0;

/// Model checks only: leave out a part of the wake-one protocol, so that a
/// model test can show it catches the lost wake-up this would cause
/// ([`BREAK_RETARGET`]: a waiter that slept takes the token without waking
/// another). Per OS thread: loom runs a model's threads on the test's
/// thread, and tests run in parallel. Not in real builds.
#[cfg(loom)]
pub fn set_broken(parts: u32) {
    BREAK.with(|b| b.set(parts));
}
#[cfg(loom)]
std::thread_local! {
    static BREAK: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}
/// A part of the protocol that a model check may leave out (loom builds
/// only; see `set_broken` there).
#[doc(hidden)]
pub const BREAK_RETARGET: u32 = 1;
/// Another ([`BREAK_TURN`]): a writer that takes the token after a release
/// that woke readers shuts them out at once instead of letting them in.
#[doc(hidden)]
pub const BREAK_TURN: u32 = 2;

#[inline]
fn broken(_part: u32) -> bool {
    #[cfg(loom)]
    return BREAK.with(|b| b.get()) & _part != 0;
    #[cfg(not(loom))]
    false
}

/// Who we are and who is alive: the process-identity oracle.
pub trait Env {
    /// This process's packed identity (never 0, never flagged).
    fn me(&self) -> u64;
    /// Whether the process named by a packed owner word (flags ignored) is
    /// certainly dead. "Unknown" must answer false.
    fn is_dead(&self, owner: u64) -> bool;
    /// Whether thread `tid` of the process named by `owner` is certainly
    /// dead or exiting (asked after a death notice on its liveness word).
    fn thread_exited(&self, owner: u64, tid: u32) -> bool {
        let _ = tid;
        self.is_dead(owner)
    }
    /// Whether the process named by `owner` is certainly dead, or so far
    /// into dying that none of its threads runs user code again (asked
    /// after a death notice on one of its watch words).
    fn is_dying(&self, owner: u64) -> bool {
        self.is_dead(owner)
    }
}

/// Calls the on-block callback at most once.
pub struct Notify<'b> {
    f: Option<&'b mut dyn FnMut()>,
}

impl<'b> Notify<'b> {
    /// A notifier calling `f` the first time the acquisition blocks.
    pub fn new(f: &'b mut dyn FnMut()) -> Notify<'b> {
        Notify { f: Some(f) }
    }

    /// A notifier that does nothing.
    pub fn none() -> Notify<'static> {
        Notify { f: None }
    }

    /// Calls the callback if it was not called yet.
    pub fn fire(&mut self) {
        if let Some(f) = self.f.take() {
            f();
        }
    }
}

/// The time to sleep next: the rest of the wait, at most [`CHECK`].
fn slice(wait: &Wait) -> Option<Duration> {
    Some(match wait.remaining() {
        None => CHECK,
        Some(r) => r.min(CHECK),
    })
}

/// Who waits on the state word's account, and so where it sleeps.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sleeper {
    /// A reader, blocked by a writer: sleeps on the state word.
    Reader,
    /// A writer, an upgradable reader or the mutex, blocked by the token
    /// holder: sleeps on the queue word.
    Token,
}

/// One lock: its words, its slot table and the identity oracle.
pub struct Core<'a, E: Env> {
    /// The state and high-water words.
    pub words: &'a Words,
    /// The slot table.
    pub slots: &'a [Slot],
    /// The identity oracle.
    pub env: &'a E,
    /// The longest a writer gives readers their turn
    /// ([`Core::readers_turn`]; [`DEFAULT_READERS_TURN`] unless the
    /// handle's options say otherwise, zero for none).
    pub readers_turn: Duration,
}

impl<'a, E: Env> Core<'a, E> {
    fn state(&self) -> &'a crate::sync::AtomicU32 {
        &self.words.state
    }

    fn token_of(slot: u32) -> u32 {
        slot + 1
    }

    // ---------------------------------------------------------------
    // Slots.

    /// Claims a free slot for this process. Slots below `high` come first;
    /// before `high` would grow, slots of dead processes below it are
    /// reclaimed (a crash must not leave writers scanning ever more slots).
    /// `None` if every slot belongs to a live process.
    pub fn claim_slot(&self) -> Option<u32> {
        let me = self.env.me();
        let high = (self.words.high.load(Ordering::SeqCst) as usize).min(self.slots.len());
        if let Some(i) = self.claim_in(0..high, me) {
            return Some(i);
        }
        for i in 0..high {
            let o = self.slots[i].owner.load(Ordering::Acquire);
            if o != 0 && self.env.is_dead(o) {
                self.reclaim(i as u32, o);
            }
        }
        self.claim_in(0..self.slots.len(), me)
    }

    fn claim_in(&self, range: std::ops::Range<usize>, me: u64) -> Option<u32> {
        for i in range {
            let s = &self.slots[i];
            // Acquire (on success): see the `held = 0` of whoever freed it.
            if s.owner.load(Ordering::Relaxed) == 0
                && s.owner
                    .compare_exchange(0, me, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                // SeqCst: a writer that loads `high` after setting WRITER
                // (SeqCst) must see this slot if our first read increment
                // (after this, in program order) precedes its flag in the
                // SeqCst order. See `drain`.
                self.words.high.fetch_max(i as u32 + 1, Ordering::SeqCst);
                return Some(i as u32);
            }
        }
        None
    }

    /// Frees slot `s`, which this process owns and through which it holds
    /// nothing. Returns false (and keeps the slot) if it still holds the
    /// token or a read count (a guard was leaked).
    pub fn release_slot(&self, s: u32) -> bool {
        let slot = &self.slots[s as usize];
        if self.state().load(Ordering::SeqCst) & INDEX_MASK == Self::token_of(s)
            || slot.held.load(Ordering::SeqCst) != 0
        {
            return false;
        }
        slot.owner
            .compare_exchange(self.env.me(), 0, Ordering::Release, Ordering::Relaxed)
            .is_ok()
    }

    /// Reclaims slot `i`, seen owned by the dead `seen` (possibly a dead
    /// reclaimer). Returns whether this call did the work; false if someone
    /// else got there first or the owner changed.
    pub fn reclaim(&self, i: u32, seen: u64) -> bool {
        let slot = &self.slots[i as usize];
        let claim = self.env.me() | RECLAIMING;
        // Step 1: freeze the slot. Exactly one of several reclaimers wins;
        // nobody can claim it for reuse while it names us.
        if slot
            .owner
            .compare_exchange(seen, claim, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        // Step 2: if the slot holds the token, drop it. Only the slot's
        // owner ever writes its index into the state word, and the owner is
        // now us (frozen), so once cleared it cannot reappear.
        let mut ws = self.state().load(Ordering::SeqCst);
        while ws & INDEX_MASK == Self::token_of(i) {
            // Keep POISON; add it if the dead holder was (or was becoming)
            // a writer: the data may be inconsistent. Clear WAITERS and
            // TOKEN_SLEEP: we wake everyone, and those still blocked set
            // them again.
            let mut new = ws & POISON;
            if ws & WRITER != 0 {
                new |= POISON;
            }
            match self
                .state()
                .compare_exchange(ws, new, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => {
                    if ws & WAITERS != 0 {
                        futex::wake_all(self.state());
                    }
                    // Every token waiter looks again (a recovery is rare;
                    // the ones still blocked watch the next holder).
                    if ws & TOKEN_SLEEP != 0 {
                        self.wake_tokens(true);
                    }
                    break;
                }
                Err(actual) => ws = actual,
            }
        }
        // Step 3: drop its read holds, and wake a writer draining on them.
        // Its liveness word goes back to "uncovered" before the slot is
        // free (a stale OWNER_DIED must never be seen with a new owner).
        slot.live.store(0, Ordering::SeqCst);
        slot.held.store(0, Ordering::SeqCst);
        if self.state().load(Ordering::SeqCst) & DRAIN_SLEEP != 0 {
            futex::wake_all(&slot.held);
        }
        // Step 4: free the slot. Release: a claimer (Acquire) sees held = 0.
        slot.owner.store(0, Ordering::Release);
        true
    }

    /// If slot `i`'s owner (or reclaimer) is dead, reclaims it.
    fn check_slot(&self, i: u32) {
        let o = self.slots[i as usize].owner.load(Ordering::Acquire);
        if o != 0 && self.env.is_dead(o) {
            self.reclaim(i, o);
        }
    }

    /// If the token holder named in `ws` is dead, reclaims its slot.
    fn check_token_holder(&self, ws: u32) {
        let idx = ws & INDEX_MASK;
        if idx != 0 {
            self.check_slot(idx - 1);
        }
    }

    // ---------------------------------------------------------------
    // Waiting on the state word.

    /// Waits until `who` is no longer blocked: a reader until no writer, a
    /// token waiter (writers, upgradable readers, the mutex) until the
    /// token looks free; returns the last state seen. Readers sleep on the
    /// state word itself, and a writer's release wakes them all (each may
    /// enter then). Token waiters sleep on the queue word, and a release
    /// wakes one of them (see [`Core::token`] for how the wake-up is passed
    /// on). `slept` is set once this waiter has slept: a token waiter may
    /// from then on be the one a release woke, so if it gives up it wakes
    /// another in its place; a reader is counted in the turn word before
    /// its first sleep, and the caller takes it off again.
    fn wait_for(
        &self,
        who: Sleeper,
        wait: &Wait,
        notify: &mut Notify<'_>,
        slept: &mut bool,
    ) -> Result<u32, TryLockError> {
        let (blocking, announce) = match who {
            Sleeper::Reader => (WRITER, WAITERS),
            Sleeper::Token => (INDEX_MASK, TOKEN_SLEEP),
        };
        let mut ws = self.state().load(Ordering::SeqCst);
        let mut spins = SPIN;
        let mut checked = false;
        loop {
            if ws & blocking == 0 {
                return Ok(ws);
            }
            if !wait.may_block() || wait.expired() {
                // Before giving up, make sure we are not waiting for the
                // dead: a try-lock loop must not be wedged either.
                if !checked {
                    checked = true;
                    self.check_token_holder(ws);
                    ws = self.state().load(Ordering::SeqCst);
                    continue;
                }
                if *slept && who == Sleeper::Token {
                    self.wake_tokens(false);
                }
                return Err(wait.gave_up());
            }
            // Announce ourselves first, then spin: a releaser that sees the
            // bit takes its slow path (a wake-up), which also gives a
            // spinning waiter the chance to take the lock before the
            // releaser takes it straight back (barging), as glibc's mutex
            // does.
            if ws & announce == 0 {
                if let Err(actual) = self.state().compare_exchange(
                    ws,
                    ws | announce,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                ) {
                    ws = actual;
                    continue;
                }
                ws |= announce;
            }
            if spins > 0 {
                spins -= 1;
                spin_hint();
                ws = self.state().load(Ordering::Relaxed);
                continue;
            }
            notify.fire();
            match who {
                Sleeper::Reader => {
                    // Counted once, before the first sleep (SeqCst: a
                    // writer's release that sees our WAITERS, and the next
                    // writer that takes the token after it, come later in
                    // the total order, so that writer sees the count).
                    if !*slept {
                        self.words.turn.fetch_add(1, Ordering::SeqCst);
                    }
                    self.sleep_on(self.state(), ws, ws, wait)
                }
                Sleeper::Token => {
                    // The queue's number first, then the state word again: a
                    // releaser frees the state word and then bumps the
                    // number (SeqCst RMW), so if this load of the state word
                    // still shows the holder, the release has not bumped the
                    // number we read, and the kernel either sees it changed
                    // or queues us before the release's wake-up.
                    let q = &self.words.queue;
                    let seq = q.load(Ordering::SeqCst);
                    let now = self.state().load(Ordering::SeqCst);
                    if now != ws {
                        ws = now;
                        continue;
                    }
                    self.sleep_on(q, seq, ws, wait);
                }
            }
            *slept = true;
            ws = self.state().load(Ordering::SeqCst);
        }
    }

    /// Wakes token waiters: bumps the queue's number (a waiter about to
    /// sleep then sees it changed) and wakes the longest sleeper (with
    /// `all`, every sleeper).
    fn wake_tokens(&self, all: bool) {
        let q = &self.words.queue;
        q.fetch_add(1, Ordering::SeqCst);
        if all {
            futex::wake_all(q);
        } else {
            futex::wake_one(q);
        }
    }

    /// One sleep on `word` while it holds `expected`, blocked by the holder
    /// named in `ws`. Behind a covered token holder (its slot's liveness
    /// word holds a tid) the sleep is also on that word, whose death notice
    /// the kernel delivers, so no periodic check is needed (only
    /// [`BACKSTOP`]); behind an uncovered one (0: the shared slot, an old
    /// file, no robust list) or without `futex_waitv`, it polls every
    /// [`CHECK`] as before.
    fn sleep_on(&self, word: &crate::sync::AtomicU32, expected: u32, ws: u32, wait: &Wait) {
        let idx = ws & INDEX_MASK;
        if idx != 0 && (idx as usize) <= self.slots.len() {
            let i = idx - 1;
            let live = &self.slots[i as usize].live;
            let mut lw = live.load(Ordering::SeqCst);
            if lw & LIVE_OWNER_DIED != 0 {
                self.death_notice(i, Some((word, expected)), wait);
                return;
            }
            if lw & LIVE_TID_MASK != 0 {
                if lw & LIVE_WAITERS == 0 {
                    // Ask the kernel to wake us at the death. A failed CAS
                    // (the word changed: a death, a give-back) re-checks.
                    if live
                        .compare_exchange(lw, lw | LIVE_WAITERS, Ordering::SeqCst, Ordering::SeqCst)
                        .is_err()
                    {
                        return;
                    }
                    lw |= LIVE_WAITERS;
                }
                let nap = Some(wait.remaining().map_or(BACKSTOP, |r| r.min(BACKSTOP)));
                if let Some(woke) = futex::wait2(word, expected, live, lw, nap) {
                    if live.load(Ordering::SeqCst) & LIVE_OWNER_DIED != 0 {
                        self.death_notice(i, Some((word, expected)), wait);
                    } else if woke == Woke::TimedOut {
                        self.check_token_holder(self.state().load(Ordering::SeqCst));
                    }
                    return;
                }
            }
        }
        if futex::wait(word, expected, slice(wait)) == Woke::TimedOut {
            self.check_token_holder(self.state().load(Ordering::SeqCst));
        }
    }

    /// Slot `i`'s liveness word says its thread died: pass the notice on
    /// (the kernel wakes one sleeper), confirm the death (a notice is a
    /// reason to look, not proof) and reclaim the slot. If /proc cannot
    /// confirm it yet, sleeps briefly on `nap_on` (the word the caller
    /// sleeps on and the value it saw; `None`: a draining writer, which
    /// naps on the slot's `held`) before the caller looks again.
    fn death_notice(&self, i: u32, nap_on: Option<(&crate::sync::AtomicU32, u32)>, wait: &Wait) {
        let slot = &self.slots[i as usize];
        futex::wake_all(&slot.live);
        let o = slot.owner.load(Ordering::Acquire);
        let tid = slot.tid.load(Ordering::SeqCst);
        if o == 0 || slot.live.load(Ordering::SeqCst) & LIVE_OWNER_DIED == 0 {
            return;
        }
        // (A slot being reclaimed names the live reclaimer: only its own
        // death counts then.)
        if self.env.is_dead(o) || (o & RECLAIMING == 0 && self.env.thread_exited(o, tid)) {
            self.reclaim(i, o);
            return;
        }
        let nap = Some(wait.remaining().map_or(CONFIRM, |r| r.min(CONFIRM)));
        match nap_on {
            Some((word, v)) => {
                futex::wait(word, v, nap);
            }
            None => {
                let h = slot.held.load(Ordering::SeqCst);
                if h != 0 {
                    futex::wait(&slot.held, h, nap);
                }
            }
        }
    }

    // ---------------------------------------------------------------
    // Readers.

    /// One attempt to enter as a reader through slot `s` (`own`: only this
    /// thread uses it): `Ok(poisoned)`, or `Err(state)` (a writer is
    /// present; nothing is held).
    #[inline]
    pub fn read_enter(&self, s: u32, own: bool) -> Result<bool, u32> {
        let slot = &self.slots[s as usize];
        // SeqCst increment, then SeqCst load: the reader's half of Dekker's
        // pattern (module docs). The load also acquires the last writer's
        // release of the token.
        slot.held.fetch_add(1, Ordering::SeqCst);
        dekker();
        let ws = self.state().load(Ordering::SeqCst);
        if ws & WRITER == 0 {
            return Ok(ws & POISON != 0);
        }
        self.read_exit(s, own);
        Err(ws)
    }

    /// Drops one read hold of slot `s`. Returns false if the slot held none
    /// (it was reclaimed from under us: we had been taken for dead).
    ///
    /// A slot used by one thread only (`own`) is released with a plain
    /// Release store, which costs no locked instruction: nobody else writes
    /// the counter (a reclaimer only touches slots of dead processes). The
    /// store publishes the critical section to the writer that then loads
    /// the counter (Release/SeqCst-load). The store and the following load
    /// of `state` are not ordered by the CPU (store→load), so a writer that
    /// announces DRAIN_SLEEP at that very instant could miss our zero while
    /// we miss its flag. The writer closes that window from its side: if
    /// our process is registered for membarrier (our slot's owner says
    /// `MEMBARRIER`), it runs `membarrier(GLOBAL_EXPEDITED)` between its flag
    /// and its sleep, which puts a full barrier into this thread somewhere
    /// in that interval: our store is then seen by its futex check, or our
    /// load comes after the barrier and sees its flag. Here only the
    /// compiler must keep the two in order ([`membarrier::light`], no
    /// instruction). Behind a process that is not registered the writer
    /// keeps its bounded sleep, so the race costs at most [`DRAIN_SLICE`]
    /// of latency, never exclusion or a hang. A shared slot uses a SeqCst
    /// decrement, which closes the window by itself.
    #[inline]
    pub fn read_exit(&self, s: u32, own: bool) -> bool {
        let slot = &self.slots[s as usize];
        let prev = if own {
            let h = slot.held.load(Ordering::Relaxed);
            if h != 0 {
                slot.held.store(h - 1, Ordering::Release);
                membarrier::light();
            }
            h
        } else {
            // SeqCst decrement then SeqCst load of state: pairs with the
            // writer's "set DRAIN_SLEEP (SeqCst), then sleep while
            // held == v": either we see DRAIN_SLEEP and wake it, or its
            // futex check (after its SeqCst RMW) sees our decrement.
            let prev = slot.held.fetch_sub(1, Ordering::SeqCst);
            if prev == 0 {
                slot.held.fetch_add(1, Ordering::SeqCst);
            }
            dekker();
            prev
        };
        if prev == 0 {
            return false;
        }
        // (Under loom an own-slot release of an unregistered process always
        // wakes: that stands for the drain's bounded sleep, see
        // `sync::futex`. A registered one relies on the barrier alone, so a
        // lost wake-up would be a deadlock the model reports.)
        if prev == 1
            && ((cfg!(loom) && own && self.env.me() & MEMBARRIER == 0)
                || self.state().load(Ordering::SeqCst) & DRAIN_SLEEP != 0)
        {
            futex::wake_all(&slot.held);
        }
        true
    }

    /// Acquires a read hold through slot `s`, waiting as `wait` allows.
    /// `Ok(poisoned)`.
    pub fn read(
        &self,
        s: u32,
        own: bool,
        wait: &Wait,
        notify: &mut Notify<'_>,
    ) -> Result<bool, TryLockError> {
        // A reader that sleeps behind a writer is counted in the turn word
        // (by `wait_for`, before its first sleep) until it is in or gives
        // up: the writer after the one it waits for lets it in first (see
        // `readers_turn`).
        let mut slept = false;
        let got = loop {
            match self.read_enter(s, own) {
                Ok(p) => break Ok(p),
                Err(_) => {
                    if let Err(e) = self.wait_for(Sleeper::Reader, wait, notify, &mut slept) {
                        break Err(e);
                    }
                }
            }
        };
        if slept {
            self.turn_done();
        }
        got
    }

    /// Takes one reader off the turn word's count (never below 0: a writer
    /// may have reset it), waking the writer that waits for it to reach 0.
    fn turn_done(&self) {
        let t = &self.words.turn;
        let mut v = t.load(Ordering::SeqCst);
        loop {
            if v & TURN_COUNT == 0 {
                return;
            }
            let new = if v & TURN_COUNT == 1 { 0 } else { v - 1 };
            match t.compare_exchange(v, new, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => {
                    if new == 0 && v & TURN_SLEEP != 0 {
                        futex::wake_all(t);
                    }
                    return;
                }
                Err(actual) => v = actual,
            }
        }
    }

    /// The readers' turn. A writer that took the token right after a
    /// writer's release that woke sleeping readers ([`TURN`]) holds it as
    /// upgradable (readers may enter, writers may not) until the readers
    /// counted in the turn word are in, for at most the handle's
    /// `readers_turn` (and the caller's deadline); the caller then shuts readers out and drains
    /// them as usual. Without this, a writer that asks again the moment it
    /// lets go takes the lock back before the readers it woke have run,
    /// and can keep them out indefinitely.
    ///
    /// The count is a hint that exclusion never depends on: a reader killed
    /// while counted leaves it too high, so a turn that runs out resets it
    /// (a live reader's later decrement stops at 0), and a count too low
    /// only shortens a turn.
    fn readers_turn(&self, wait: &Wait) {
        let most = self.readers_turn;
        if broken(BREAK_TURN) || !wait.may_block() || most.is_zero() {
            return;
        }
        let t = &self.words.turn;
        let patience = Wait::timeout(wait.remaining().map_or(most, |r| r.min(most)));
        let mut spins = SPIN;
        loop {
            let v = t.load(Ordering::SeqCst);
            if v & TURN_COUNT == 0 {
                return;
            }
            #[cfg(not(loom))]
            let over = patience.expired();
            // (The model has no clock: a turn runs out when a counted
            // reader may have died, which is when a real one would.)
            #[cfg(loom)]
            let over = futex::someone_died();
            if over {
                // A CAS, not a store: a count that changed meanwhile is
                // looked at again.
                if t.compare_exchange(v, 0, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    return;
                }
                continue;
            }
            if spins > 0 {
                spins -= 1;
                spin_hint();
                continue;
            }
            if v & TURN_SLEEP == 0
                && t.compare_exchange(v, v | TURN_SLEEP, Ordering::SeqCst, Ordering::SeqCst)
                    .is_err()
            {
                continue;
            }
            futex::wait(t, v | TURN_SLEEP, patience.remaining());
        }
    }

    // ---------------------------------------------------------------
    // The token: writers and upgradable readers.

    /// Takes the token for slot `s` with `bit` (WRITER or UPGRADABLE).
    /// `Ok(poisoned)`.
    ///
    /// With `turn` (a writer of a reader-writer lock), a token found with
    /// [`TURN`] is taken as UPGRADABLE instead, for the readers' turn (see
    /// [`Core::readers_turn`]); the second value says so.
    fn token(
        &self,
        s: u32,
        bit: u32,
        turn: bool,
        wait: &Wait,
        notify: &mut Notify<'_>,
    ) -> Result<(bool, bool), TryLockError> {
        // Look before trying: on a contended word a failed CAS still takes
        // the cache line away from the holder, slowing its release. The CAS
        // (SeqCst: acquires the last release, and WRITER's role in Dekker's
        // pattern) is tried only when the token looks free.
        //
        // Wake-one. A release clears TOKEN_SLEEP and wakes one sleeper on
        // the queue; the others sleep on, and the one woken answers for
        // them. If it takes the token, it wakes one more, which sleeps
        // again behind the new holder: it sets TOKEN_SLEEP again (so the
        // new holder's release wakes the next) and watches the new
        // holder's liveness word (the others still watch the word of the
        // holder they slept behind, so without it the new holder's death
        // would wake nobody). If it finds the token taken, it sets
        // TOKEN_SLEEP and sleeps behind the new holder itself; if it gives
        // up, it wakes one in its place (`wait_for`).
        let mut slept = false;
        let mut ws = self.state().load(Ordering::Relaxed);
        loop {
            if ws & INDEX_MASK == 0 {
                let pending = turn && ws & TURN != 0;
                let mode = if pending { UPGRADABLE } else { bit };
                // (TURN is cleared: it is for the next taker only.)
                let new = (ws & (POISON | WAITERS | TOKEN_SLEEP)) | Self::token_of(s) | mode;
                match self
                    .state()
                    .compare_exchange(ws, new, Ordering::SeqCst, Ordering::SeqCst)
                {
                    Ok(_) => {
                        if slept && !broken(BREAK_RETARGET) {
                            self.wake_tokens(false);
                        }
                        return Ok((ws & POISON != 0, pending));
                    }
                    Err(actual) => {
                        ws = actual;
                        continue;
                    }
                }
            }
            ws = self.wait_for(Sleeper::Token, wait, notify, &mut slept)?;
        }
    }

    /// With WRITER set by us, waits until no slot holds a read. On failure
    /// the caller must undo WRITER.
    fn drain(&self, wait: &Wait, notify: &mut Notify<'_>) -> Result<(), TryLockError> {
        // SeqCst: see `claim_slot`. A slot claimed after this load had its
        // first increment after our WRITER flag in the SeqCst order, so that
        // reader sees WRITER and backs off. (Our WRITER flag was set by a
        // SeqCst RMW before this call.)
        dekker();
        let high = self.words.high.load(Ordering::SeqCst) as usize;
        for i in 0..high.min(self.slots.len()) {
            let slot = &self.slots[i];
            let mut spins = SPIN;
            let mut checked = false;
            let mut slept = 0u32;
            loop {
                // SeqCst: the writer's half of Dekker's pattern.
                let h = slot.held.load(Ordering::SeqCst);
                if h == 0 {
                    break;
                }
                if !wait.may_block() || wait.expired() {
                    if !checked {
                        checked = true;
                        self.check_slot(i as u32);
                        continue;
                    }
                    return Err(wait.gave_up());
                }
                if spins > 0 {
                    spins -= 1;
                    spin_hint();
                    continue;
                }
                // Announce the sleep before re-checking `held` in the futex
                // call (SeqCst RMW; pairs with `read_exit`).
                self.state().fetch_or(DRAIN_SLEEP, Ordering::SeqCst);
                dekker();
                notify.fire();
                // Can a release of this slot still go unseen? A shared-slot
                // release cannot (a SeqCst RMW, then the load of state). An
                // own-slot release (a plain store, then the load) can, unless
                // every thread that may release here runs a full barrier
                // between our RMW above and the futex's check below: that is
                // membarrier's promise for registered processes. The owner,
                // read after our RMW, is at least as new as any reader whose
                // release could miss DRAIN_SLEEP (that reader's increment
                // preceded our RMW, and its claim preceded its increment);
                // a later owner's releases are covered if it is registered
                // too. So: if the owner says MEMBARRIER, we are registered
                // (a refused registration keeps the old behaviour for our
                // writers) and the barrier ran, the sleep needs no slice:
                // it ends when woken, at the deadline, or for a liveness
                // check (BACKSTOP behind a covered slot, CHECK otherwise).
                // Otherwise (an older version's reader, a refused
                // registration) the slice bounds the race as before.
                let fenced = self.slots[i].owner.load(Ordering::SeqCst) & MEMBARRIER != 0
                    && self.env.me() & MEMBARRIER != 0
                    && membarrier::heavy();
                let nap = |covered: bool| {
                    if fenced {
                        let every = if covered { BACKSTOP } else { CHECK };
                        Some(wait.remaining().map_or(every, |r| r.min(every)))
                    } else {
                        slice(wait).map(|d| d.min(DRAIN_SLICE))
                    }
                };
                // A covered reader slot (its liveness word linked): sleep on
                // that word too, so its death wakes us at once, and the
                // periodic /proc check is only a backstop. An uncovered one:
                // check about once per CHECK.
                let mut lw = slot.live.load(Ordering::SeqCst);
                if lw & LIVE_OWNER_DIED != 0 {
                    self.death_notice(i as u32, None, wait);
                    continue;
                }
                let covered = lw & LIVE_TID_MASK != 0;
                if covered && lw & LIVE_WAITERS == 0 {
                    // A failed CAS (the word changed: a death notice, a
                    // give-back) looks again.
                    if slot
                        .live
                        .compare_exchange(lw, lw | LIVE_WAITERS, Ordering::SeqCst, Ordering::SeqCst)
                        .is_err()
                    {
                        continue;
                    }
                    lw |= LIVE_WAITERS;
                }
                let woke = if covered {
                    futex::wait2(&slot.held, h, &slot.live, lw, nap(true))
                } else {
                    None
                };
                let (woke, covered) = match woke {
                    Some(w) => (w, true),
                    None => (futex::wait(&slot.held, h, nap(false)), false),
                };
                if covered && slot.live.load(Ordering::SeqCst) & LIVE_OWNER_DIED != 0 {
                    self.death_notice(i as u32, None, wait);
                    continue;
                }
                if woke == Woke::TimedOut {
                    if fenced {
                        // The nap was the liveness period itself.
                        self.check_slot(i as u32);
                    } else {
                        slept += 1;
                        // Check liveness about once per CHECK, not per
                        // slice (a covered slot: once per BACKSTOP).
                        let every = if covered { BACKSTOP } else { CHECK };
                        let n = (every.as_millis() / DRAIN_SLICE.as_millis()).max(1) as u32;
                        if slept % n == 0 {
                            self.check_slot(i as u32);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Acquires the exclusive lock through slot `s`. `drain` is false for a
    /// mutex (which has no readers). `Ok(poisoned)`.
    #[inline]
    pub fn write(
        &self,
        s: u32,
        drain: bool,
        wait: &Wait,
        notify: &mut Notify<'_>,
    ) -> Result<bool, TryLockError> {
        // (The uncontended case is `try_write_fast`, inlined into the
        // caller; here the token is taken by looking first.)
        self.write_slow(s, false, drain, wait, notify)
    }

    /// The whole uncontended write acquisition, or nothing: takes a clean,
    /// free token and finds no reader; otherwise undoes and returns false
    /// (the caller then takes the slow path).
    #[inline]
    pub fn try_write_fast(&self, s: u32, drain: bool) -> bool {
        if self
            .state()
            .compare_exchange(
                0,
                Self::token_of(s) | WRITER,
                Ordering::SeqCst,
                Ordering::Relaxed,
            )
            .is_err()
        {
            return false;
        }
        dekker();
        if !drain || self.no_readers() {
            return true;
        }
        self.token_exit(s, WRITER, false);
        false
    }

    /// Whether every slot in use is at zero right now (SeqCst loads: the
    /// writer's half of Dekker's pattern).
    #[inline]
    fn no_readers(&self) -> bool {
        let high = self.words.high.load(Ordering::SeqCst) as usize;
        self.slots[..high.min(self.slots.len())]
            .iter()
            .all(|x| x.held.load(Ordering::SeqCst) == 0)
    }

    #[cold]
    fn write_slow(
        &self,
        s: u32,
        took: bool,
        drain: bool,
        wait: &Wait,
        notify: &mut Notify<'_>,
    ) -> Result<bool, TryLockError> {
        // The fast path may already have taken the (clean) token and found
        // readers; otherwise take it now.
        let poisoned = if took {
            false
        } else {
            let (poisoned, pending) = self.token(s, WRITER, drain, wait, notify)?;
            if pending {
                self.readers_turn(wait);
                self.swap_mode(s, UPGRADABLE, WRITER);
            }
            poisoned
        };
        if drain {
            if let Err(e) = self.drain(wait, notify) {
                self.token_exit(s, WRITER, poisoned);
                return Err(e);
            }
        }
        Ok(poisoned)
    }

    /// Takes the upgradable token through slot `s`. `Ok(poisoned)`.
    pub fn upgradable(
        &self,
        s: u32,
        wait: &Wait,
        notify: &mut Notify<'_>,
    ) -> Result<bool, TryLockError> {
        Ok(self.token(s, UPGRADABLE, false, wait, notify)?.0)
    }

    /// Releases the token held by slot `s` in mode `bit` (WRITER or
    /// UPGRADABLE), leaving `POISON` set iff `poison`. Returns false,
    /// changing nothing, if the token was not ours (it was reclaimed: we had
    /// been taken for dead).
    #[inline]
    pub fn token_exit(&self, s: u32, bit: u32, poison: bool) -> bool {
        let keep = if poison { POISON } else { 0 };
        // Release: our critical section happens-before the next acquirer's
        // Acquire (SeqCst) of this word. Fast path: nobody waits.
        let guess = Self::token_of(s) | bit | keep;
        match self
            .state()
            .compare_exchange(guess, keep, Ordering::Release, Ordering::Relaxed)
        {
            Ok(_) => true,
            Err(ws) => self.token_exit_slow(s, keep, ws),
        }
    }

    #[cold]
    fn token_exit_slow(&self, s: u32, keep: u32, mut ws: u32) -> bool {
        let st = self.state();
        loop {
            if ws & INDEX_MASK != Self::token_of(s) {
                return false;
            }
            // A writer that leaves readers asleep behind it gives them the
            // next turn (see `readers_turn`).
            let turn = if ws & (WRITER | WAITERS) == WRITER | WAITERS {
                TURN
            } else {
                0
            };
            match st.compare_exchange(ws, keep | turn, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => {
                    // Readers all (a writer left: each may enter), token
                    // waiters one (only one can take it; see `token`).
                    if ws & WAITERS != 0 {
                        futex::wake_all(st);
                    }
                    if ws & TOKEN_SLEEP != 0 {
                        self.wake_tokens(false);
                    }
                    return true;
                }
                Err(actual) => ws = actual,
            }
        }
    }

    /// Upgradable → writer for slot `s`: sets WRITER, drains the readers.
    /// On failure the upgradable token is kept.
    pub fn upgrade(
        &self,
        s: u32,
        wait: &Wait,
        notify: &mut Notify<'_>,
    ) -> Result<(), TryLockError> {
        self.swap_mode(s, UPGRADABLE, WRITER);
        if let Err(e) = self.drain(wait, notify) {
            self.swap_mode(s, WRITER, UPGRADABLE);
            return Err(e);
        }
        Ok(())
    }

    /// Writer → upgradable for slot `s` (readers may enter again).
    pub fn downgrade_to_upgradable(&self, s: u32) {
        self.swap_mode(s, WRITER, UPGRADABLE);
    }

    /// Token holder (writer or upgradable) → plain reader through slot `s`:
    /// the read hold is taken before the token is released, so no writer
    /// can slip in between.
    pub fn downgrade_to_read(&self, s: u32, poison: bool) {
        self.slots[s as usize].held.fetch_add(1, Ordering::SeqCst);
        let ws = self.state().load(Ordering::Relaxed);
        self.token_exit(s, ws & (WRITER | UPGRADABLE), poison);
    }

    /// Replaces mode bit `from` by `to` in our token, waking sleepers (a
    /// change may unblock readers, or a failed upgrade releases them).
    fn swap_mode(&self, s: u32, from: u32, to: u32) {
        let st = self.state();
        let mut ws = st.load(Ordering::SeqCst);
        loop {
            debug_assert_eq!(ws & INDEX_MASK, Self::token_of(s));
            let new = (ws & !(from | WAITERS | DRAIN_SLEEP)) | to;
            match st.compare_exchange(ws, new, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => {
                    if ws & WAITERS != 0 {
                        futex::wake_all(st);
                    }
                    return;
                }
                Err(actual) => ws = actual,
            }
        }
    }

    /// Clears POISON (the caller holds the token as writer).
    pub fn clear_poison(&self) {
        self.state().fetch_and(!POISON, Ordering::SeqCst);
    }

    /// Whether POISON is set.
    pub fn is_poisoned(&self) -> bool {
        self.state().load(Ordering::SeqCst) & POISON != 0
    }

    /// The packed identity of the token holder, if any.
    pub fn token_owner(&self) -> Option<u64> {
        let idx = self.state().load(Ordering::SeqCst) & INDEX_MASK;
        if idx == 0 {
            return None;
        }
        match self
            .slots
            .get(idx as usize - 1)?
            .owner
            .load(Ordering::Acquire)
        {
            0 => None,
            o => Some(o & !RECLAIMING),
        }
    }
}
