//! The atomics and the futex the shared-memory protocol is written against:
//! std's in a normal build, loom's under `--cfg loom`.
//!
//! Why it is built this way: the protocol of [`crate::shm`] (reader slots, a
//! writer word, poison, recovery of dead holders) is subtle enough that
//! testing it by running it is not evidence. Written against this module, the
//! very same code is model-checked by loom, which explores the interleavings
//! and weak-memory outcomes a test run would almost never hit (the idea of
//! tokio's `loom` module). Under loom a futex is a condition variable (see
//! [`futex`]), and every atomic operation can be made the point where a
//! "process" dies (see `model`).

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

#[cfg(loom)]
pub use crate::sys::probe::Probe;
#[cfg(loom)]
pub use model::{die_after, AtomicU32, AtomicU64, Died, Ordering};

/// Loom's atomics, each operation first charged to the calling thread's
/// *death budget*: a model test gives a thread a budget of `k` operations,
/// and on the `k+1`-th the thread "dies" (unwinds with [`Died`], which the
/// test catches and then reports the process dead). Running the model for
/// every `k` kills the thread between every pair of its shared-memory
/// operations, which is what SIGKILL can do to a real process.
#[cfg(loom)]
mod model {
    use loom::sync::atomic as la;
    pub use loom::sync::atomic::Ordering;
    use std::cell::Cell;

    loom::thread_local! {
        static BUDGET: Cell<Option<u32>> = Cell::new(None);
    }

    /// The panic payload of a thread whose death budget ran out.
    #[derive(Debug)]
    pub struct Died;

    /// Lets the calling (loom) thread perform `n` more atomic operations,
    /// then die; `None` = immortal.
    pub fn die_after(n: Option<u32>) {
        BUDGET.with(|b| b.set(n));
    }

    fn step() {
        BUDGET.with(|b| match b.get() {
            Some(0) => std::panic::panic_any(Died),
            Some(n) => b.set(Some(n - 1)),
            None => {}
        });
    }

    macro_rules! wrap {
        ($name:ident, $int:ty) => {
            /// A loom atomic with a death budget.
            #[derive(Debug)]
            pub struct $name(la::$name);

            #[allow(missing_docs)]
            impl $name {
                pub fn new(v: $int) -> Self {
                    $name(la::$name::new(v))
                }
                pub fn load(&self, o: Ordering) -> $int {
                    step();
                    self.0.load(o)
                }
                /// A load no death can interrupt: the kernel's read of a
                /// futex word (a process cannot die half-way through it).
                pub fn kernel_load(&self, o: Ordering) -> $int {
                    self.0.load(o)
                }
                /// A compare-and-swap no death can interrupt (the kernel's).
                pub fn kernel_compare_exchange(&self, c: $int, n: $int) -> Result<$int, $int> {
                    self.0
                        .compare_exchange(c, n, Ordering::SeqCst, Ordering::SeqCst)
                }
                pub fn store(&self, v: $int, o: Ordering) {
                    step();
                    self.0.store(v, o)
                }
                pub fn swap(&self, v: $int, o: Ordering) -> $int {
                    step();
                    self.0.swap(v, o)
                }
                pub fn fetch_add(&self, v: $int, o: Ordering) -> $int {
                    step();
                    self.0.fetch_add(v, o)
                }
                pub fn fetch_sub(&self, v: $int, o: Ordering) -> $int {
                    step();
                    self.0.fetch_sub(v, o)
                }
                pub fn fetch_or(&self, v: $int, o: Ordering) -> $int {
                    step();
                    self.0.fetch_or(v, o)
                }
                pub fn fetch_and(&self, v: $int, o: Ordering) -> $int {
                    step();
                    self.0.fetch_and(v, o)
                }
                pub fn fetch_max(&self, v: $int, o: Ordering) -> $int {
                    step();
                    self.0.fetch_max(v, o)
                }
                pub fn compare_exchange(
                    &self,
                    c: $int,
                    n: $int,
                    s: Ordering,
                    f: Ordering,
                ) -> Result<$int, $int> {
                    step();
                    self.0.compare_exchange(c, n, s, f)
                }
                pub fn compare_exchange_weak(
                    &self,
                    c: $int,
                    n: $int,
                    s: Ordering,
                    f: Ordering,
                ) -> Result<$int, $int> {
                    step();
                    self.0.compare_exchange_weak(c, n, s, f)
                }
            }
        };
    }

    wrap!(AtomicU32, u32);
    wrap!(AtomicU64, u64);
}

/// How a futex wait ended, as far as the protocol cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Woke {
    /// Woken, or the word no longer held the expected value, or a signal:
    /// re-check the state.
    Maybe,
    /// The time-out passed with no wake-up: re-check, and check whether the
    /// holder is still alive.
    TimedOut,
}

/// Futex operations on a word that may live in memory shared between
/// processes.
#[cfg(not(loom))]
pub(crate) mod futex {
    use super::Woke;
    use crate::sys::futex as sys;
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;

    /// Sleeps while `word == expected`, at most `timeout`.
    pub(crate) fn wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> Woke {
        match sys::wait(word, expected, timeout) {
            sys::WaitOutcome::TimedOut => Woke::TimedOut,
            _ => Woke::Maybe,
        }
    }

    /// Wakes every sleeper on `word`.
    pub(crate) fn wake_all(word: &AtomicU32) {
        sys::wake(word, i32::MAX);
    }

    /// Wakes at most one sleeper on `word` (the longest-sleeping of those
    /// of the highest priority: the kernel's queue order).
    pub(crate) fn wake_one(word: &AtomicU32) {
        sys::wake(word, 1);
    }

    /// Sleeps while `a == ea` and `b == eb` (`futex_waitv`), at most
    /// `timeout`; `None` if the kernel lacks the call (the caller polls).
    pub(crate) fn wait2(
        a: &AtomicU32,
        ea: u32,
        b: &AtomicU32,
        eb: u32,
        timeout: Option<Duration>,
    ) -> Option<Woke> {
        Some(match crate::sys::robust::wait2(a, ea, b, eb, timeout)? {
            sys::WaitOutcome::TimedOut => Woke::TimedOut,
            _ => Woke::Maybe,
        })
    }

    /// Sleeps while every `(word, expected)` of `words` holds (at most
    /// [`crate::sys::robust::WAITV_MAX`]), at most `timeout`; `None` if the
    /// kernel lacks `futex_waitv` (the caller polls).
    pub(crate) fn wait_any(words: &[(&AtomicU32, u32)], timeout: Option<Duration>) -> Option<Woke> {
        Some(match crate::sys::robust::waitv(words, timeout)? {
            sys::WaitOutcome::TimedOut => Woke::TimedOut,
            _ => Woke::Maybe,
        })
    }
}

/// Loom's model of a futex: a real sleep (a loom condition variable), so
/// the model has no spinning waiters and loom can tell a deadlock.
///
/// Each sleeper is queued with the words it sleeps on, in arrival order.
/// [`wake_one`] wakes exactly the first sleeper of its word, as the kernel
/// does, so a protocol that wakes one waiter and relies on it to pass the
/// wake-up on is checked for lost wake-ups. [`wake_all`] wakes every
/// sleeper of *any* word (a spurious wake-up is harmless, and it keeps the
/// state space small where exactness does not matter).
///
/// Two things end a production sleep that no other thread's action does:
/// its time-out, which lets a waiter notice that the holder died, and the
/// drain's short slice (see `Core::read_exit`). The model stands for them
/// with explicit wake-ups: a death wakes every sleeper (`wake_all_dead`,
/// and after a death no wait sleeps, as a waiter's next time-out would find
/// the corpse), and the protocol's own-slot reader release wakes under
/// loom. Every wake-up of [`wait`] is reported as a time-out, so woken
/// waiters also run the liveness check, exploring recovery racing with
/// normal progress.
#[cfg(loom)]
pub mod futex {
    use super::{AtomicU32, Ordering, Woke};
    use loom::sync::{Condvar, Mutex, MutexGuard};
    use std::time::Duration;

    /// The sleepers, in arrival order.
    #[derive(Default)]
    struct Queue {
        next: u64,
        /// (sleeper, the addresses of the words it sleeps on).
        sleeping: Vec<(u64, Vec<usize>)>,
    }

    struct Futex {
        queue: Mutex<Queue>,
        cv: Condvar,
        /// Someone died: waits no longer sleep.
        deaths: loom::sync::atomic::AtomicBool,
    }

    loom::lazy_static! {
        static ref FUTEX: Futex = Futex {
            queue: Mutex::new(Queue::default()),
            cv: Condvar::new(),
            deaths: loom::sync::atomic::AtomicBool::new(false),
        };
    }

    fn lock() -> MutexGuard<'static, Queue> {
        // (A model thread that "dies" while holding the lock poisons it; the
        // lock itself stays sound, so poison is ignored.)
        FUTEX.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn addr(word: &AtomicU32) -> usize {
        word as *const AtomicU32 as usize
    }

    /// Sleeps while every `(word, expected)` holds, until woken: `None` if a
    /// death ended sleeping (a time-out), `Some(false)` if a word had
    /// changed, `Some(true)` if woken.
    fn sleep(words: &[(&AtomicU32, u32)]) -> Option<bool> {
        let mut g = lock();
        // Checked under the lock, as `wake_all_dead` sets it under the lock.
        if FUTEX.deaths.load(Ordering::SeqCst) {
            drop(g);
            loom::thread::yield_now();
            return None;
        }
        if words
            .iter()
            .any(|(w, e)| w.kernel_load(Ordering::SeqCst) != *e)
        {
            return Some(false);
        }
        let id = g.next;
        g.next += 1;
        g.sleeping
            .push((id, words.iter().map(|(w, _)| addr(w)).collect()));
        loop {
            g = FUTEX.cv.wait(g).unwrap_or_else(|e| e.into_inner());
            if !g.sleeping.iter().any(|(s, _)| *s == id) {
                return Some(true);
            }
        }
    }

    /// Sleeps while `word == expected`, until a wake-up.
    pub fn wait(word: &AtomicU32, expected: u32, _timeout: Option<Duration>) -> Woke {
        match sleep(&[(word, expected)]) {
            Some(false) => Woke::Maybe,
            _ => Woke::TimedOut,
        }
    }

    /// Sleeps while `a == ea` and `b == eb`, until a wake-up (the model of
    /// `futex_waitv`; always available).
    pub fn wait2(
        a: &AtomicU32,
        ea: u32,
        b: &AtomicU32,
        eb: u32,
        _timeout: Option<Duration>,
    ) -> Option<Woke> {
        Some(match sleep(&[(a, ea), (b, eb)]) {
            None => Woke::TimedOut,
            Some(_) => Woke::Maybe,
        })
    }

    /// Sleeps while every `(word, expected)` holds, until a wake-up (the
    /// model of `futex_waitv` on many words; always available).
    pub fn wait_any(words: &[(&AtomicU32, u32)], _timeout: Option<Duration>) -> Option<Woke> {
        Some(match sleep(words) {
            None => Woke::TimedOut,
            Some(_) => Woke::Maybe,
        })
    }

    /// Wakes the first sleeper of `word`, if any (under the lock).
    fn wake_first(g: &mut Queue, word: usize) -> bool {
        match g.sleeping.iter().position(|(_, a)| a.contains(&word)) {
            Some(k) => {
                g.sleeping.remove(k);
                FUTEX.cv.notify_all();
                true
            }
            None => false,
        }
    }

    /// The kernel's robust-list walk at the death of thread `tid`, for one
    /// linked liveness word: if it holds `tid`, flag it `OWNER_DIED`
    /// (keeping `FUTEX_WAITERS`) and, if `FUTEX_WAITERS` was set, wake one
    /// sleeper of the word. Unlike [`wake_all_dead`], later waits still
    /// sleep: a covered death must be noticed through the word alone, with
    /// no time-out.
    /// Returns whether it woke a sleeper.
    pub fn kernel_notice(word: &AtomicU32, tid: u32) -> bool {
        const OWNER_DIED: u32 = 0x4000_0000;
        const WAITERS: u32 = 0x8000_0000;
        let mut g = lock();
        // An atomic read-modify-write, as the kernel's cmpxchg loop: it
        // reads the latest value (a waiter's FUTEX_WAITERS included).
        let mut w = word.kernel_load(Ordering::SeqCst);
        loop {
            if w & 0x3fff_ffff != tid {
                return false;
            }
            match word.kernel_compare_exchange(w, (w & WAITERS) | OWNER_DIED) {
                Ok(_) => break,
                Err(actual) => w = actual,
            }
        }
        w & WAITERS != 0 && wake_first(&mut g, addr(word))
    }

    /// Wakes every sleeper (of any word: a spurious wake-up is harmless).
    pub fn wake_all(_word: &AtomicU32) {
        let mut g = lock();
        g.sleeping.clear();
        FUTEX.cv.notify_all();
    }

    /// Wakes exactly the first sleeper of `word`, as `FUTEX_WAKE` with 1.
    pub fn wake_one(word: &AtomicU32) {
        let mut g = lock();
        wake_first(&mut g, addr(word));
    }

    /// Whether a process died in this execution: the model's stand-in for
    /// a bounded wait that ran out (after a death, every wait would).
    pub fn someone_died() -> bool {
        FUTEX.deaths.load(Ordering::SeqCst)
    }

    /// A process died: wake every sleeper, and sleep no more.
    pub fn wake_all_dead() {
        let mut g = lock();
        FUTEX.deaths.store(true, Ordering::SeqCst);
        g.sleeping.clear();
        FUTEX.cv.notify_all();
    }
}

/// Marks the middle of a store→load pair of Dekker's pattern (a SeqCst
/// read-modify-write followed by a SeqCst load of another location).
///
/// In the C++/Rust memory model, SeqCst operations alone already forbid the
/// outcome where both sides miss each other (they lie in one total order),
/// and on x86 the locked RMW is a full barrier, so in production this is a
/// no-op. loom, however, models SeqCst *accesses* only as AcqRel (its
/// documented limitation) while it models SeqCst *fences* fully, so under
/// loom this is a SeqCst fence: the model then checks the protocol with the
/// ordering it really has.
#[inline(always)]
pub fn dekker() {
    #[cfg(loom)]
    loom::sync::atomic::fence(Ordering::SeqCst);
}

/// A busy-wait hint (a no-op under loom, where spinning is not modelled).
#[inline]
pub fn spin_hint() {
    #[cfg(not(loom))]
    std::hint::spin_loop();
}
