//! Model checks of the shared-memory lock protocol (reader slots, the token
//! word, poison, recovery of dead holders) under loom.
//!
//! Run with:
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
//!     cargo test -p interlock --release --test loom_shm
//! ```
//!
//! Each loom thread plays a process. A shared `Probe` (loom's `UnsafeCell`) stands for the
//! protected data: loom fails the run if two accesses to it are not ordered
//! by happens-before, so a lost exclusion *or* a missing memory ordering is
//! caught. Death: a thread given a death budget of `k` atomic operations
//! unwinds at the `k+1`-th and is then reported dead to the others; each
//! death test runs the model for every `k` up to past the victim's last
//! operation, i.e. kills it between every pair of its shared-memory stores.
#![cfg(loom)]

use interlock::shm::layout::{self, pack, unpack, Slot, Words, INDEX_MASK};
use interlock::shm::protocol::{Core, Env, Notify};
use interlock::sync::{die_after, Died, Probe};
use interlock::Wait;
use loom::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use loom::sync::Arc;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

const PROCS: usize = 4;

/// The lock memory and the world's process table.
struct World {
    words: Words,
    slots: Vec<Slot>,
    dead: Vec<AtomicBool>,
    data: Probe,
    /// The victim's progress: 1 = inside its critical section, 2 = released.
    phase: AtomicU32,
    /// The victim's progress when it died (0 if it did not).
    died_in: AtomicU32,
    /// 1 + the slot whose liveness word the victim linked (0: none).
    linked: AtomicU32,
}

impl World {
    fn new(slots: usize) -> Arc<World> {
        Arc::new(World {
            words: Words::new(),
            slots: (0..slots).map(|_| Slot::new()).collect(),
            dead: (0..PROCS).map(|_| AtomicBool::new(false)).collect(),
            data: Probe::new(),
            phase: AtomicU32::new(0),
            died_in: AtomicU32::new(0),
            linked: AtomicU32::new(0),
        })
    }
}

/// Process `pid`'s view: who it is, and who is dead.
struct Proc {
    world: Arc<World>,
    pid: u32,
    /// Registered for membarrier: its identity says MEMBARRIER, so its
    /// own-slot releases rely on a draining writer's barrier (modelled by
    /// SeqCst fences on both sides) instead of the drain's bounded sleep.
    fenced: bool,
}

impl Env for Proc {
    fn me(&self) -> u64 {
        pack(self.pid, 0) | if self.fenced { layout::MEMBARRIER } else { 0 }
    }
    fn is_dead(&self, owner: u64) -> bool {
        let (pid, _) = unpack(owner);
        self.world.dead[pid as usize - 1].load(Ordering::SeqCst)
    }
}

impl Proc {
    fn new(world: &Arc<World>, pid: u32) -> Proc {
        Proc {
            world: world.clone(),
            pid,
            fenced: false,
        }
    }

    /// A process registered for membarrier (see `fenced`).
    fn fenced(world: &Arc<World>, pid: u32) -> Proc {
        Proc {
            fenced: true,
            ..Proc::new(world, pid)
        }
    }

    fn core(&self) -> Core<'_, Proc> {
        Core {
            words: &self.world.words,
            slots: &self.world.slots,
            env: self,
            readers_turn: interlock::shm::DEFAULT_READERS_TURN,
        }
    }

    fn claim(&self) -> u32 {
        self.core().claim_slot().expect("a free slot")
    }

    fn write_cs(&self) {
        self.world.data.bump();
    }

    fn read_cs(&self) -> u32 {
        self.world.data.get()
    }

    /// Takes a read hold through slot `s` (`own`: as its only thread),
    /// reads the data, and lets go.
    fn read_once(&self, s: u32, own: bool) {
        let c = self.core();
        c.read(s, own, &FOREVER, &mut Notify::none()).unwrap();
        self.read_cs();
        assert!(c.read_exit(s, own));
    }

    /// Takes the lock exclusively through slot `s` (`drain`: as an rwlock
    /// writer, else as the mutex), writes the data, and lets go; returns
    /// whether it was poisoned.
    fn write_once(&self, s: u32, drain: bool) -> bool {
        let c = self.core();
        let poisoned = c.write(s, drain, &FOREVER, &mut Notify::none()).unwrap();
        self.write_cs();
        assert!(c.token_exit(s, layout::WRITER, false));
        poisoned
    }

    /// Runs `f` as this process in a new model thread.
    fn spawn(self, f: impl FnOnce(&Proc) + Send + 'static) -> loom::thread::JoinHandle<()> {
        loom::thread::spawn(move || f(&self))
    }

    /// The victim's thread id in the model (what its liveness word holds).
    fn tid(&self) -> u32 {
        100 + self.pid
    }

    /// Claims a slot and "links" its liveness word (stands for
    /// `sys::robust::Linked::link`: the tid, then the word; a death between
    /// the stores leaves the word 0, uncovered).
    fn claim_linked(&self) -> u32 {
        let s = self.claim();
        self.world.linked.store(s + 1, Ordering::SeqCst);
        let slot = &self.world.slots[s as usize];
        slot.tid
            .store(self.tid(), interlock::sync::Ordering::SeqCst);
        slot.live
            .store(self.tid(), interlock::sync::Ordering::SeqCst);
        s
    }

    /// Claims a slot and links its liveness word, as `claim_linked`, for a
    /// process that is not the victim (`linked` keeps naming the victim's).
    fn claim_linked_quiet(&self) -> u32 {
        let s = self.claim();
        let slot = &self.world.slots[s as usize];
        slot.tid
            .store(self.tid(), interlock::sync::Ordering::SeqCst);
        slot.live
            .store(self.tid(), interlock::sync::Ordering::SeqCst);
        s
    }

    /// Runs `f` as a process that may die. If it dies with a linked
    /// liveness word holding its tid, only the kernel's notice tells the
    /// others (no time-out: later waits still sleep, so a waiter that
    /// missed the notice would deadlock and loom would say so); otherwise
    /// as `run_mortal`.
    fn run_mortal_covered(self, budget: Option<u32>, f: impl FnOnce(&Proc)) {
        self.run_covered(budget, false, f);
    }

    /// As `run_mortal_covered`; with `backstop`, a death *before the
    /// victim's acquisition returned* (phase 0) whose notice woke nobody
    /// falls back to the modelled time-outs: that is the window between
    /// taking the token and waking a sleeper to watch the new holder, which
    /// production covers with `BACKSTOP`. A death in the critical section
    /// (phase 1) or later must be noticed through the notice alone.
    fn run_covered(self, budget: Option<u32>, backstop: bool, f: impl FnOnce(&Proc)) {
        self.run_dying(budget, f, |p| {
            let l = p.world.linked.load(Ordering::SeqCst);
            let live = (l != 0).then(|| &p.world.slots[l as usize - 1].live);
            match live {
                Some(w)
                    if w.kernel_load(interlock::sync::Ordering::SeqCst) & layout::LIVE_TID_MASK
                        == p.tid() =>
                {
                    let woke = interlock::sync::futex::kernel_notice(w, p.tid());
                    if !woke && backstop && p.world.phase.load(Ordering::SeqCst) == 0 {
                        interlock::sync::futex::wake_all_dead();
                    }
                }
                _ => interlock::sync::futex::wake_all_dead(),
            }
        });
    }

    /// Runs `f` as a process that may die; marks it dead if it does.
    /// Waiters notice at their next time-out, modelled as a wake-up.
    fn run_mortal(self, budget: Option<u32>, f: impl FnOnce(&Proc)) {
        self.run_dying(budget, f, |_| interlock::sync::futex::wake_all_dead());
    }

    /// Whether the token names a slot this process owns.
    fn holds_token(&self) -> bool {
        let idx = self
            .world
            .words
            .state
            .load(interlock::sync::Ordering::SeqCst)
            & INDEX_MASK;
        idx != 0
            && unpack(
                self.world.slots[idx as usize - 1]
                    .owner
                    .load(interlock::sync::Ordering::SeqCst),
            )
            .0 == self.pid
    }

    /// Runs `f` with a death budget; if the process dies, records where
    /// (`died_in`), marks it dead, then lets `tell` tell the others. Death
    /// is final: after this nothing more is stored.
    fn run_dying(self, budget: Option<u32>, f: impl FnOnce(&Proc), tell: impl FnOnce(&Proc)) {
        die_after(budget);
        let r = catch_unwind(AssertUnwindSafe(|| f(&self)));
        die_after(None);
        if let Err(e) = r {
            if e.downcast_ref::<Died>().is_none() {
                resume_unwind(e);
            }
            let mut phase = self.world.phase.load(Ordering::SeqCst);
            // A writer that died in its release after the CAS that freed
            // the token (waking a waiter) did release: count it as phase 2.
            if phase == 1 && !self.holds_token() {
                phase = 2;
            }
            self.world.died_in.store(10 + phase, Ordering::SeqCst);
            self.world.dead[self.pid as usize - 1].store(true, Ordering::SeqCst);
            tell(&self);
        }
    }
}

fn model(bound: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(bound);
    b.check(f);
}

fn quiet_deaths() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<Died>().is_none() {
                prev(info);
            }
        }));
    });
}

const FOREVER: Wait = Wait::Forever;

#[test]
fn readers_and_a_writer_exclude() {
    model(3, || {
        let w = World::new(3);
        let r1 = Proc::new(&w, 1).spawn(|p| p.read_once(p.claim(), true));
        // A shared slot (atomic release) this time.
        let r2 = Proc::new(&w, 2).spawn(|p| p.read_once(p.claim(), false));
        let p = Proc::new(&w, 3);
        assert!(!p.write_once(p.claim(), true));
        r1.join().unwrap();
        r2.join().unwrap();
        // (TURN may be left for a next writer; nothing else.)
        assert_eq!(w.words.state.load(Ordering::SeqCst) & !layout::TURN, 0);
        assert_eq!(w.words.turn.load(Ordering::SeqCst), 0);
    });
}

#[test]
fn a_writer_sleeping_behind_registered_readers_is_woken_without_a_slice() {
    // Every process registered for membarrier: an own-slot release wakes a
    // draining writer only if it sees DRAIN_SLEEP (no modelled slice), so a
    // release whose plain store and load of the state word straddle the
    // writer's flag without being seen would leave the writer asleep for
    // good, and loom would report the deadlock. (Removing the reader's
    // `membarrier::light` fence, the model of the barrier's effect on it,
    // makes loom find exactly that.)
    model(3, || {
        let w = World::new(3);
        let readers: Vec<_> = (1..=2)
            .map(|pid| Proc::fenced(&w, pid).spawn(|p| p.read_once(p.claim(), true)))
            .collect();
        let p = Proc::fenced(&w, 3);
        assert!(!p.write_once(p.claim(), true));
        for r in readers {
            r.join().unwrap();
        }
        // (TURN may be left for a next writer; nothing else.)
        assert_eq!(w.words.state.load(Ordering::SeqCst) & !layout::TURN, 0);
        assert_eq!(w.words.turn.load(Ordering::SeqCst), 0);
    });
}

/// `n` processes each take the mutex once (preemption bound `bound`): they
/// exclude each other, and every one finishes (nobody is left asleep).
fn writers_take_turns(n: u32, bound: usize) {
    model(bound, move || {
        let w = World::new(n as usize);
        let hs: Vec<_> = (1..=n)
            .map(|pid| {
                Proc::new(&w, pid).spawn(|p| {
                    p.write_once(p.claim(), false);
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(w.data.get(), n);
        assert_eq!(w.words.state.load(Ordering::SeqCst) & INDEX_MASK, 0);
    });
}

#[test]
fn writers_exclude_as_a_mutex() {
    writers_take_turns(2, 3);
}

#[test]
fn upgrade_is_atomic_and_excludes_readers() {
    model(2, || {
        let w = World::new(2);
        let r = {
            let p = Proc::new(&w, 1);
            loom::thread::spawn(move || {
                let s = p.claim();
                let c = p.core();
                c.read(s, true, &FOREVER, &mut Notify::none()).unwrap();
                p.read_cs();
                assert!(c.read_exit(s, true));
            })
        };
        let p = Proc::new(&w, 2);
        let s = p.claim();
        let c = p.core();
        c.upgradable(s, &FOREVER, &mut Notify::none()).unwrap();
        p.read_cs();
        c.upgrade(s, &FOREVER, &mut Notify::none()).unwrap();
        p.write_cs();
        c.downgrade_to_read(s, false);
        p.read_cs();
        assert!(c.read_exit(s, false));
        r.join().unwrap();
    });
}

/// The most atomic operations any victim below performs (claim + acquire +
/// release); budgets run from 0 to past it, so the last run is a victim
/// that completes.
const MAX_STEPS: u32 = 26;

#[test]
fn a_writer_killed_at_any_step_is_recovered_and_poison_tells() {
    quiet_deaths();
    for k in 0..=MAX_STEPS {
        model(2, move || {
            let w = World::new(2);
            let v = {
                let p = Proc::new(&w, 1);
                loom::thread::spawn(move || {
                    p.run_mortal(Some(k), |p| {
                        let s = p.claim();
                        let c = p.core();
                        c.write(s, true, &FOREVER, &mut Notify::none()).unwrap();
                        p.world.phase.store(1, Ordering::SeqCst);
                        p.write_cs();
                        c.token_exit(s, interlock::shm::layout::WRITER, false);
                        p.world.phase.store(2, Ordering::SeqCst);
                    })
                })
            };
            let p = Proc::new(&w, 2);
            let s = p.claim();
            let c = p.core();
            let poisoned = c.write(s, true, &FOREVER, &mut Notify::none()).unwrap();
            // The victim died holding the lock iff it died inside (phase 1:
            // its release never completed); then we must learn it. If it
            // released (phase 2) and died later or not at all, we must not.
            match w.died_in.load(Ordering::SeqCst) {
                11 => assert!(poisoned, "k={k}: died inside, not poisoned"),
                12 => assert!(!poisoned, "k={k}: released cleanly, yet poisoned"),
                0 => assert!(
                    !poisoned || w.dead[0].load(Ordering::SeqCst),
                    "k={k}: poisoned by a live process"
                ),
                _ => {}
            }
            p.write_cs();
            assert!(c.token_exit(s, interlock::shm::layout::WRITER, poisoned));
            v.join().unwrap();
        });
    }
}

#[test]
fn a_reader_killed_at_any_step_is_reclaimed_silently() {
    quiet_deaths();
    for k in 0..=MAX_STEPS {
        for own in [true, false] {
            model(2, move || {
                let w = World::new(2);
                let v = {
                    let p = Proc::new(&w, 1);
                    loom::thread::spawn(move || {
                        p.run_mortal(Some(k), |p| {
                            let s = p.claim();
                            let c = p.core();
                            c.read(s, own, &FOREVER, &mut Notify::none()).unwrap();
                            p.read_cs();
                            c.read_exit(s, own);
                        })
                    })
                };
                let p = Proc::new(&w, 2);
                let s = p.claim();
                let c = p.core();
                let poisoned = c.write(s, true, &FOREVER, &mut Notify::none()).unwrap();
                assert!(!poisoned, "k={k}: a dead reader poisoned the lock");
                p.write_cs();
                assert!(c.token_exit(s, interlock::shm::layout::WRITER, false));
                v.join().unwrap();
            });
        }
    }
}

#[test]
fn a_reclaimer_killed_at_any_step_is_finished_by_another() {
    quiet_deaths();
    // Process 1 dies holding the write lock. Process 2 may die at any step
    // of its acquisition (which includes reclaiming 1's slot); process 3
    // must still get the lock, poisoned, and exactly one token holder is
    // ever recorded at a time (loom's data check on the probe).
    for k in 0..=24 {
        model(2, move || {
            let w = World::new(3);
            {
                let p = Proc::new(&w, 1);
                let s = p.claim();
                p.core()
                    .write(s, true, &FOREVER, &mut Notify::none())
                    .unwrap();
                p.write_cs();
                w.dead[0].store(true, Ordering::SeqCst);
                interlock::sync::futex::wake_all_dead();
            }
            let r = {
                let p = Proc::new(&w, 2);
                loom::thread::spawn(move || {
                    p.run_mortal(Some(k), |p| {
                        let s = p.claim();
                        let c = p.core();
                        let poisoned = c.write(s, true, &FOREVER, &mut Notify::none()).unwrap();
                        assert!(poisoned);
                        p.write_cs();
                        c.token_exit(s, interlock::shm::layout::WRITER, true);
                    })
                })
            };
            let p = Proc::new(&w, 3);
            let s = p.claim();
            let c = p.core();
            let poisoned = c.write(s, true, &FOREVER, &mut Notify::none()).unwrap();
            assert!(poisoned, "k={k}: the dead writer's poison was lost");
            p.write_cs();
            assert!(c.token_exit(s, interlock::shm::layout::WRITER, true));
            r.join().unwrap();
            // In the end the token is free, or names process 2's slot if it
            // died holding the lock (recovered by whoever needs it next).
            let ws = w.words.state.load(Ordering::SeqCst);
            if ws & INDEX_MASK != 0 {
                let owner = w.slots[(ws & INDEX_MASK) as usize - 1]
                    .owner
                    .load(Ordering::SeqCst);
                assert_eq!(
                    unpack(owner).0,
                    2,
                    "k={k}: state names a live or freed slot"
                );
                assert!(w.dead[1].load(Ordering::SeqCst));
            }
        });
    }
}

#[test]
fn two_waiters_see_one_death_and_exactly_one_repairs() {
    quiet_deaths();
    model(2, || {
        let w = World::new(3);
        // Process 1 takes the write lock and dies holding it.
        {
            let p = Proc::new(&w, 1);
            let s = p.claim();
            p.core()
                .write(s, true, &FOREVER, &mut Notify::none())
                .unwrap();
            p.write_cs();
        }
        let hs: Vec<_> = (2..=3)
            .map(|pid| {
                let p = Proc::new(&w, pid);
                loom::thread::spawn(move || {
                    let s = p.claim();
                    let c = p.core();
                    // Both learn the poison (it stays until cleared), and
                    // they exclude each other (the probe).
                    assert!(c.write(s, true, &FOREVER, &mut Notify::none()).unwrap());
                    p.write_cs();
                    assert!(c.token_exit(s, interlock::shm::layout::WRITER, true));
                })
            })
            .collect();
        w.dead[0].store(true, Ordering::SeqCst);
        interlock::sync::futex::wake_all_dead();
        for h in hs {
            h.join().unwrap();
        }
        // The dead holder's slot was reclaimed (it is free, or reused by a
        // survivor), and the state is just the poison.
        assert_eq!(w.words.state.load(Ordering::SeqCst), layout::POISON);
        assert_ne!(w.slots[0].owner.load(Ordering::SeqCst), pack(1, 0));
        assert_eq!(w.data.get(), 3);
    });
}

#[test]
fn a_covered_holder_killed_at_any_step_is_noticed_without_time_outs() {
    // The victim's slot is linked (its liveness word holds its tid): a
    // death is told only by the kernel's notice on that word (flag
    // OWNER_DIED, wake), never by a time-out. The waiter must still get the
    // lock, learn poison exactly when the victim died writing, and never
    // overlap it.
    quiet_deaths();
    for k in 0..=MAX_STEPS + 2 {
        for victim_writes in [true, false] {
            model(2, move || {
                let w = World::new(2);
                let v = {
                    let p = Proc::new(&w, 1);
                    loom::thread::spawn(move || {
                        p.run_mortal_covered(Some(k), |p| {
                            let s = p.claim_linked();
                            let c = p.core();
                            if victim_writes {
                                c.write(s, true, &FOREVER, &mut Notify::none()).unwrap();
                                p.world.phase.store(1, Ordering::SeqCst);
                                p.write_cs();
                                c.token_exit(s, interlock::shm::layout::WRITER, false);
                            } else {
                                c.read(s, true, &FOREVER, &mut Notify::none()).unwrap();
                                p.world.phase.store(1, Ordering::SeqCst);
                                p.read_cs();
                                c.read_exit(s, true);
                            }
                            p.world.phase.store(2, Ordering::SeqCst);
                        })
                    })
                };
                let p = Proc::new(&w, 2);
                let s = p.claim();
                let c = p.core();
                let poisoned = c.write(s, true, &FOREVER, &mut Notify::none()).unwrap();
                if !victim_writes {
                    assert!(!poisoned, "k={k}: a dead reader poisoned the lock");
                } else if w.died_in.load(Ordering::SeqCst) == 11 {
                    assert!(poisoned, "k={k}: died writing, not poisoned");
                }
                p.write_cs();
                assert!(c.token_exit(s, interlock::shm::layout::WRITER, poisoned));
                v.join().unwrap();
            });
        }
    }
}

/// Three processes take a mutex in turn: each release wakes one token
/// waiter (not all), so the others must be woken later by whoever takes
/// the token next. With `broken`, the woken waiter takes the token without
/// waking another: the last waiter sleeps on with TOKEN_SLEEP clear, nobody
/// wakes it, and loom reports the deadlock.
fn three_writers_take_turns(broken: u32) {
    interlock::shm::protocol::set_broken(broken);
    let r = catch_unwind(|| writers_take_turns(3, 2));
    interlock::shm::protocol::set_broken(0);
    if let Err(e) = r {
        resume_unwind(e);
    }
}

#[test]
fn a_release_wakes_one_writer_and_each_passes_the_turn_on() {
    three_writers_take_turns(0);
}

/// Runs the test `name` of this binary again in a child process with
/// `INTERLOCK_LOOM_BROKEN` naming it, and asserts that loom reported a
/// deadlock there. (A deadlocked loom model aborts the process while
/// unwinding, so `should_panic` cannot catch it.)
fn expect_deadlock(name: &str) {
    expect_failure(name, "deadlock");
}

/// Runs the test `name` of this binary again in a child process with
/// `INTERLOCK_LOOM_BROKEN` naming it, and asserts that it failed with
/// `needle` in its output.
fn expect_failure(name: &str, needle: &str) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env("INTERLOCK_LOOM_BROKEN", name)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let all = format!("{err}{}", String::from_utf8_lossy(&out.stdout));
    assert!(!out.status.success(), "{name}: the broken protocol passed");
    assert!(
        all.contains(needle),
        "{name}: failed, but not with {needle:?}:\n{all}"
    );
}

/// Whether this process is the child of [`expect_deadlock`] for `name`.
fn broken_run(name: &str) -> bool {
    std::env::var("INTERLOCK_LOOM_BROKEN").is_ok_and(|v| v == name)
}

#[test]
fn the_model_catches_a_woken_writer_that_forgets_the_others() {
    expect_deadlock("broken_three_writers");
}

#[test]
fn broken_three_writers() {
    if broken_run("broken_three_writers") {
        three_writers_take_turns(interlock::shm::protocol::BREAK_RETARGET);
    }
}

/// A holder H releases to a covered victim V that then dies at any step,
/// while a third waiter W slept behind H (so it watched H's liveness
/// word, not V's). V, having slept, wakes one more waiter to watch it, so
/// V's death is told to W by the kernel's notice on V's word alone. Only a
/// death inside V's acquisition (before that wake-up) may fall back to
/// the time-out, as production's BACKSTOP. With `broken`, V does not wake
/// a watcher: W then misses V's death in the critical section, and loom
/// reports the deadlock.
fn a_stale_watcher_learns_of_the_new_holders_death(broken: u32, ks: std::ops::RangeInclusive<u32>) {
    quiet_deaths();
    interlock::shm::protocol::set_broken(broken);
    let r = catch_unwind(move || {
        for k in ks.clone() {
            model(2, move || {
                let w = World::new(3);
                // H takes the lock before the others start.
                let h = Proc::new(&w, 3);
                let hs = h.claim_linked_quiet();
                h.core()
                    .write(hs, false, &FOREVER, &mut Notify::none())
                    .unwrap();
                let v = {
                    let p = Proc::new(&w, 1);
                    loom::thread::spawn(move || {
                        p.run_covered(Some(k), true, |p| {
                            let s = p.claim_linked();
                            let c = p.core();
                            c.write(s, false, &FOREVER, &mut Notify::none()).unwrap();
                            p.world.phase.store(1, Ordering::SeqCst);
                            p.write_cs();
                            c.token_exit(s, layout::WRITER, false);
                            p.world.phase.store(2, Ordering::SeqCst);
                        })
                    })
                };
                let waiter = {
                    let p = Proc::new(&w, 2);
                    loom::thread::spawn(move || {
                        let s = p.claim();
                        let c = p.core();
                        let poisoned = c.write(s, false, &FOREVER, &mut Notify::none()).unwrap();
                        p.write_cs();
                        assert!(c.token_exit(s, layout::WRITER, poisoned));
                    })
                };
                h.write_cs();
                assert!(h.core().token_exit(hs, layout::WRITER, false));
                v.join().unwrap();
                waiter.join().unwrap();
            });
        }
    });
    interlock::shm::protocol::set_broken(0);
    if let Err(e) = r {
        resume_unwind(e);
    }
}

#[test]
fn a_stale_watcher_learns_of_the_new_holders_death_by_the_notice() {
    a_stale_watcher_learns_of_the_new_holders_death(0, 0..=32);
}

#[test]
fn the_model_catches_a_new_holder_that_nobody_watches() {
    expect_deadlock("broken_stale_watcher");
}

#[test]
fn broken_stale_watcher() {
    if broken_run("broken_stale_watcher") {
        a_stale_watcher_learns_of_the_new_holders_death(
            interlock::shm::protocol::BREAK_RETARGET,
            0..=32,
        );
    }
}

/// A writer, an upgradable reader that upgrades, and a reader contend:
/// token waiters are woken one at a time, readers all at once, and an
/// upgrade or a release in any order leaves nobody asleep.
#[test]
fn a_writer_an_upgrader_and_a_reader_all_finish() {
    model(2, || {
        let w = World::new(3);
        let writer = Proc::new(&w, 1).spawn(|p| {
            p.write_once(p.claim(), true);
        });
        let upgrader = Proc::new(&w, 2).spawn(|p| {
            let s = p.claim();
            let c = p.core();
            c.upgradable(s, &FOREVER, &mut Notify::none()).unwrap();
            p.read_cs();
            c.upgrade(s, &FOREVER, &mut Notify::none()).unwrap();
            p.write_cs();
            assert!(c.token_exit(s, layout::WRITER, false));
        });
        let p = Proc::new(&w, 3);
        p.read_once(p.claim(), true);
        writer.join().unwrap();
        upgrader.join().unwrap();
        assert_eq!(w.data.get(), 2);
        assert_eq!(w.words.state.load(Ordering::SeqCst) & INDEX_MASK, 0);
    });
}

/// Waits (as a model spin) until the turn word counts a reader, or
/// process `pid` is dead.
fn until_counted_or_dead(w: &World, pid: u32) {
    while w.words.turn.load(interlock::sync::Ordering::SeqCst) & layout::TURN_COUNT == 0
        && !w.dead[pid as usize - 1].load(Ordering::SeqCst)
    {
        loom::thread::yield_now();
    }
}

/// A writer holds the lock, a reader sleeps behind it, and the writer lets
/// go and asks again at once: the reader gets in before the writer's second
/// acquisition returns (the readers' turn). With `broken` (BREAK_TURN) the
/// writer shuts the reader out again, and the assertion fails.
fn a_writer_that_asks_again_lets_the_woken_reader_in(broken: u32) {
    interlock::shm::protocol::set_broken(broken);
    let r = catch_unwind(|| {
        model(2, || {
            let w = World::new(2);
            let p = Proc::new(&w, 2);
            let s = p.claim();
            let c = p.core();
            c.write(s, true, &FOREVER, &mut Notify::none()).unwrap();
            let reader = Proc::new(&w, 1).spawn(|p| {
                let s = p.claim();
                let c = p.core();
                c.read(s, true, &FOREVER, &mut Notify::none()).unwrap();
                p.world.phase.store(1, Ordering::SeqCst);
                p.read_cs();
                assert!(c.read_exit(s, true));
            });
            until_counted_or_dead(&w, 1);
            p.write_cs();
            assert!(c.token_exit(s, layout::WRITER, false));
            c.write(s, true, &FOREVER, &mut Notify::none()).unwrap();
            assert_eq!(
                w.phase.load(Ordering::SeqCst),
                1,
                "the reader was shut out by a writer that asked again"
            );
            p.write_cs();
            assert!(c.token_exit(s, layout::WRITER, false));
            reader.join().unwrap();
            assert_eq!(w.words.turn.load(interlock::sync::Ordering::SeqCst), 0);
        });
    });
    interlock::shm::protocol::set_broken(0);
    if let Err(e) = r {
        resume_unwind(e);
    }
}

#[test]
fn a_writer_that_asks_again_lets_the_reader_it_woke_in_first() {
    a_writer_that_asks_again_lets_the_woken_reader_in(0);
}

#[test]
fn the_model_catches_a_writer_that_shuts_woken_readers_out() {
    expect_failure("broken_readers_turn", "the reader was shut out");
}

#[test]
fn broken_readers_turn() {
    if broken_run("broken_readers_turn") {
        a_writer_that_asks_again_lets_the_woken_reader_in(interlock::shm::protocol::BREAK_TURN);
    }
}

/// A reader killed at any step of a wait behind a writer (so possibly
/// while counted in the turn word) does not hold the writer's next
/// acquisition: its turn runs out (in the model: once a death is known)
/// and the count is reset.
#[test]
fn a_reader_killed_while_counted_does_not_hold_a_writer() {
    quiet_deaths();
    for k in 0..=MAX_STEPS {
        model(2, move || {
            let w = World::new(2);
            let p = Proc::new(&w, 2);
            let s = p.claim();
            let c = p.core();
            c.write(s, true, &FOREVER, &mut Notify::none()).unwrap();
            let v = {
                let q = Proc::new(&w, 1);
                loom::thread::spawn(move || {
                    q.run_mortal(Some(k), |q| {
                        let s = q.claim();
                        let c = q.core();
                        c.read(s, true, &FOREVER, &mut Notify::none()).unwrap();
                        q.read_cs();
                        c.read_exit(s, true);
                    })
                })
            };
            until_counted_or_dead(&w, 1);
            p.write_cs();
            assert!(c.token_exit(s, layout::WRITER, false));
            let poisoned = c.write(s, true, &FOREVER, &mut Notify::none()).unwrap();
            assert!(!poisoned, "k={k}: a dead reader poisoned the lock");
            p.write_cs();
            assert!(c.token_exit(s, layout::WRITER, false));
            v.join().unwrap();
        });
    }
}
