//! Model checks of the shared-memory semaphore protocol (one cell per
//! permit, a futex word with a sequence number) under loom.
//!
//! Run with:
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
//!     cargo test -p interlock --release --test loom_sem
//! ```
//!
//! As in `loom_shm.rs`, each loom thread plays a process, and a thread
//! given a death budget of `k` atomic operations dies at the `k+1`-th and
//! is then reported dead. Checked: with one permit the holders' accesses to
//! a probe are ordered by happens-before (exclusion and publication); with
//! two permits and three takers never more than two are inside; a holder
//! killed at any step leaves no permit lost (a survivor then takes all N)
//! and none duplicated; two waiters that see one death both proceed; a
//! holder whose process linked a watch slot, killed at any step, is
//! noticed through the kernel's notice alone (no time-outs), and one whose
//! linking thread left before it died falls back to the time-outs.
#![cfg(loom)]

use interlock::shm::layout::{pack, unpack, Slot, Words, LIVE_TID_MASK, LIVE_WAITERS};
use interlock::shm::permits::Permits;
use interlock::shm::protocol::{Env, Notify};
use interlock::sync::{die_after, Died, Probe};
use interlock::Wait;
use loom::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use loom::sync::Arc;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

const PROCS: usize = 4;

struct World {
    words: Words,
    cells: Vec<Slot>,
    /// The watch table.
    watch: Vec<Slot>,
    dead: Vec<AtomicBool>,
    data: Probe,
    inside: AtomicU32,
    /// 1 + the watch slot the victim linked (0: none).
    linked: AtomicU32,
}

impl World {
    fn new(n: usize) -> Arc<World> {
        Arc::new(World {
            words: Words::new(),
            cells: (0..n).map(|_| Slot::new()).collect(),
            watch: (0..2).map(|_| Slot::new()).collect(),
            dead: (0..PROCS).map(|_| AtomicBool::new(false)).collect(),
            data: Probe::new(),
            inside: AtomicU32::new(0),
            linked: AtomicU32::new(0),
        })
    }
}

struct Proc {
    world: Arc<World>,
    pid: u32,
}

impl Env for Proc {
    fn me(&self) -> u64 {
        pack(self.pid, 0)
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
        }
    }

    fn sem(&self) -> Permits<'_, Proc> {
        Permits {
            words: &self.world.words,
            cells: &self.world.cells,
            watch: &self.world.watch,
            env: self,
        }
    }

    /// Takes `k` permits (waiting), returns the cells.
    fn take(&self, k: usize) -> Vec<u32> {
        let mut out = Vec::new();
        self.sem()
            .acquire(
                self.me(),
                self.pid as usize,
                k,
                &mut out,
                &Wait::Forever,
                &mut Notify::none(),
            )
            .unwrap();
        assert_eq!(out.len(), k);
        out
    }

    fn give(&self, cells: &[u32]) {
        for &i in cells {
            assert!(self.sem().release(self.me(), i));
        }
    }

    /// The process's thread id in the model (what its watch word holds).
    fn tid(&self) -> u32 {
        100 + self.pid
    }

    /// Claims a watch slot and "links" its liveness word (stands for
    /// `sys::robust::Linked::link`: the tid, then the word; a death between
    /// the stores leaves the word 0, uncovered), as the first acquisition
    /// of a process does.
    fn watch(&self) -> u32 {
        let j = self
            .sem()
            .claim_watch(self.me())
            .expect("a free watch slot");
        self.world.linked.store(j + 1, Ordering::SeqCst);
        let w = &self.world.watch[j as usize];
        w.tid.store(self.tid(), interlock::sync::Ordering::SeqCst);
        w.live.store(self.tid(), interlock::sync::Ordering::SeqCst);
        j
    }

    /// The linking thread leaves (stands for `Linked::unlink`, then the
    /// give-back of the slot): the word to 0, waking its sleepers.
    fn unwatch(&self, j: u32) {
        let w = &self.world.watch[j as usize];
        if w.live.swap(0, interlock::sync::Ordering::SeqCst) & LIVE_WAITERS != 0 {
            interlock::sync::futex::wake_all(&w.live);
        }
        self.sem().release_watch(self.me(), j);
    }

    /// Runs `f` as a process that may die; marks it dead if it does.
    /// Waiters notice at their next time-out, modelled as a wake-up.
    fn run_mortal(self, budget: Option<u32>, f: impl FnOnce(&Proc)) {
        self.run_dying(budget, f, |_| interlock::sync::futex::wake_all_dead());
    }

    /// As `run_mortal`, but if it dies with its watch word holding its tid,
    /// only the kernel's notice on that word tells the others (no time-out:
    /// later waits still sleep, so a waiter that missed the notice would
    /// deadlock and loom would say so).
    fn run_mortal_covered(self, budget: Option<u32>, f: impl FnOnce(&Proc)) {
        self.run_dying(budget, f, |p| {
            let l = p.world.linked.load(Ordering::SeqCst);
            let live = (l != 0).then(|| &p.world.watch[l as usize - 1].live);
            match live {
                Some(w)
                    if w.kernel_load(interlock::sync::Ordering::SeqCst) & LIVE_TID_MASK
                        == p.tid() =>
                {
                    interlock::sync::futex::kernel_notice(w, p.tid());
                }
                _ => interlock::sync::futex::wake_all_dead(),
            }
        });
    }

    /// Runs `f` with a death budget; if the process dies, marks it dead,
    /// then lets `tell` tell the others. Death is final: after this
    /// nothing more is stored.
    fn run_dying(self, budget: Option<u32>, f: impl FnOnce(&Proc), tell: impl FnOnce(&Proc)) {
        die_after(budget);
        let r = catch_unwind(AssertUnwindSafe(|| f(&self)));
        die_after(None);
        if let Err(e) = r {
            if e.downcast_ref::<Died>().is_none() {
                resume_unwind(e);
            }
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

#[test]
fn one_permit_excludes_and_publishes() {
    model(3, || {
        let w = World::new(1);
        let hs: Vec<_> = (1..=2)
            .map(|pid| {
                let p = Proc::new(&w, pid);
                loom::thread::spawn(move || {
                    let c = p.take(1);
                    p.world.data.bump();
                    p.give(&c);
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(w.data.get(), 2);
        assert_eq!(
            w.words.state.load(Ordering::SeqCst) & interlock::shm::permits::SEM_WAITERS,
            0
        );
    });
}

#[test]
fn never_more_than_n_inside() {
    model(2, || {
        let w = World::new(2);
        let hs: Vec<_> = (1..=3)
            .map(|pid| {
                let p = Proc::new(&w, pid);
                loom::thread::spawn(move || {
                    // Process 3 asks for both permits at once.
                    let k = if pid == 3 { 2 } else { 1 };
                    let c = p.take(k);
                    let now = p.world.inside.fetch_add(k as u32, Ordering::SeqCst) + k as u32;
                    assert!(now <= 2, "{now} permits inside");
                    p.world.inside.fetch_sub(k as u32, Ordering::SeqCst);
                    p.give(&c);
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert!(w.cells.iter().all(|c| c.owner.load(Ordering::SeqCst) == 0));
    });
}

/// The most atomic operations a victim below performs (take + give back).
const MAX_STEPS: u32 = 14;

#[test]
fn a_holder_killed_at_any_step_loses_and_duplicates_nothing() {
    quiet_deaths();
    for k in 0..=MAX_STEPS {
        for many in [1usize, 2] {
            model(2, move || {
                let w = World::new(2);
                let v = {
                    let p = Proc::new(&w, 1);
                    loom::thread::spawn(move || {
                        p.run_mortal(Some(k), |p| {
                            let c = p.take(many);
                            p.world.inside.fetch_add(many as u32, Ordering::SeqCst);
                            p.world.inside.fetch_sub(many as u32, Ordering::SeqCst);
                            p.give(&c);
                        })
                    })
                };
                // The survivor wants every permit: it gets them only if the
                // victim's are given back or reclaimed (none lost), and the
                // victim never held one at the same time (none duplicated:
                // the data probe).
                let p = Proc::new(&w, 2);
                let c = p.take(2);
                p.world.data.bump();
                p.give(&c);
                v.join().unwrap();
            });
        }
    }
}

#[test]
fn two_waiters_see_one_death_and_both_proceed() {
    quiet_deaths();
    model(2, || {
        let w = World::new(1);
        {
            // Process 1 takes the permit and dies holding it.
            let p = Proc::new(&w, 1);
            p.take(1);
        }
        let hs: Vec<_> = (2..=3)
            .map(|pid| {
                let p = Proc::new(&w, pid);
                loom::thread::spawn(move || {
                    let c = p.take(1);
                    p.world.data.bump();
                    p.give(&c);
                })
            })
            .collect();
        w.dead[0].store(true, Ordering::SeqCst);
        interlock::sync::futex::wake_all_dead();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(w.data.get(), 2);
        assert_eq!(w.cells[0].owner.load(Ordering::SeqCst), 0);
    });
}

/// The most atomic operations a covered victim below performs (watch slot,
/// take, give back, unlink).
const MAX_COVERED_STEPS: u32 = 26;

#[test]
fn a_covered_holder_killed_at_any_step_is_noticed_without_time_outs() {
    // The victim's process links a watch slot before it takes permits, as
    // a Semaphore's first acquisition does. A death while the word holds
    // its tid is told only by the kernel's notice on that word, never by
    // a time-out; the survivor, wanting every permit, must still get them
    // all (none lost), never overlapping the victim (the probe: none
    // duplicated). With `leave_first` the linking thread leaves (unlinks)
    // before the permits are given back, as when a guard outlives the
    // thread that linked: a death then is told by the time-outs (the
    // uncovered fallback).
    quiet_deaths();
    for k in 0..=MAX_COVERED_STEPS {
        for (many, leave_first) in [(1usize, false), (2, false), (1, true)] {
            model(2, move || {
                let w = World::new(2);
                let v = {
                    let p = Proc::new(&w, 1);
                    loom::thread::spawn(move || {
                        p.run_mortal_covered(Some(k), |p| {
                            let j = p.watch();
                            let c = p.take(many);
                            p.world.data.bump();
                            if leave_first {
                                p.unwatch(j);
                                p.give(&c);
                            } else {
                                p.give(&c);
                                p.unwatch(j);
                            }
                        })
                    })
                };
                let p = Proc::new(&w, 2);
                let c = p.take(2);
                p.world.data.bump();
                p.give(&c);
                v.join().unwrap();
            });
        }
    }
}
