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
//! and none duplicated; two waiters that see one death both proceed.
#![cfg(loom)]

use interlock::shm::layout::{pack, unpack, Slot, Words};
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
    dead: Vec<AtomicBool>,
    data: Probe,
    inside: AtomicU32,
}

impl World {
    fn new(n: usize) -> Arc<World> {
        Arc::new(World {
            words: Words::new(),
            cells: (0..n).map(|_| Slot::new()).collect(),
            dead: (0..PROCS).map(|_| AtomicBool::new(false)).collect(),
            data: Probe::new(),
            inside: AtomicU32::new(0),
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

    fn run_mortal(self, budget: Option<u32>, f: impl FnOnce(&Proc)) {
        die_after(budget);
        let r = catch_unwind(AssertUnwindSafe(|| f(&self)));
        die_after(None);
        if let Err(e) = r {
            if e.downcast_ref::<Died>().is_none() {
                resume_unwind(e);
            }
            self.world.dead[self.pid as usize - 1].store(true, Ordering::SeqCst);
            interlock::sync::futex::wake_all_dead();
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
