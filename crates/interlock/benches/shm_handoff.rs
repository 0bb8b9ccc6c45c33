//! Two processes alternating strictly through one lock: handoffs per
//! second, interlock's `ShmMutex` and `ShmRwLock` (write) against a
//! process-shared pthread mutex, in the same run.
//!
//! Each process loops: lock; if the shared turn counter is its parity,
//! increment it; unlock. So every increment is a handoff of the lock from
//! one process to the other (the loser of each race retries). The counter
//! lives in a separate anonymous shared mapping; the child is created with
//! fork() and shares both.
//!
//! Run: `cargo bench -p interlock --bench shm_handoff` (prints a table;
//! `HANDOFFS=N` sets the number of handoffs per measurement, default 1M).
//!
//! `unsafe` (fork, pthread calls) is allowed in this bench file only; each
//! block states its SAFETY argument.
#![allow(unsafe_code)]

#[path = "support/record.rs"]
mod record;

use interlock::shm::testing::SharedWords;
use interlock::{ShmMutex, ShmRwLock};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Runs `body(parity)` in a forked child (parity 1) and here (parity 0);
/// returns the wall time until both finish.
fn two_processes(body: &dyn Fn(u64)) -> Duration {
    let t = Instant::now();
    // SAFETY: this bench is single-threaded at this point, so the child
    // may run arbitrary code; it leaves with _exit and never returns.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        body(1);
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(0) };
    }
    body(0);
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid out-pointer.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    t.elapsed()
}

fn alternate(turn: &AtomicU64, n: u64, parity: u64, pair: &dyn Fn(&dyn Fn())) {
    loop {
        let mut done = false;
        pair(&|| {
            let t = turn.load(Ordering::Relaxed);
            if t >= n {
                return;
            }
            if t % 2 == parity {
                turn.store(t + 1, Ordering::Relaxed);
            }
        });
        if turn.load(Ordering::Relaxed) >= n {
            done = true;
        }
        if done {
            return;
        }
    }
}

struct PthreadMutex(*mut libc::pthread_mutex_t);

impl PthreadMutex {
    fn new() -> PthreadMutex {
        // SAFETY: a fresh anonymous shared mapping (checked), larger than
        // the mutex; the attribute is initialised before use.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            let p = p.cast::<libc::pthread_mutex_t>();
            let mut a: libc::pthread_mutexattr_t = std::mem::zeroed();
            libc::pthread_mutexattr_init(&mut a);
            libc::pthread_mutexattr_setpshared(&mut a, libc::PTHREAD_PROCESS_SHARED);
            assert_eq!(libc::pthread_mutex_init(p, &a), 0);
            PthreadMutex(p)
        }
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing
    // useful either: run a tiny smoke size unless benchmarking.
    let benching = std::env::args().any(|a| a == "--bench");
    let n: u64 = std::env::var("HANDOFFS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if benching { 1_000_000 } else { 10_000 });
    let words = SharedWords::anonymous(1).unwrap();
    let turn = &words.words()[0];

    let mutex = ShmMutex::anonymous().unwrap();
    let rw = ShmRwLock::anonymous().unwrap();
    let pm = PthreadMutex::new();

    type Pair<'a> = Box<dyn Fn(&dyn Fn()) + 'a>;
    let cases: Vec<(&str, Pair<'_>)> = vec![
        (
            "shm/interlock/ShmMutex",
            Box::new(|f: &dyn Fn()| {
                let _g = mutex.lock().unwrap();
                f();
            }),
        ),
        (
            "shm/interlock/ShmRwLock (write)",
            Box::new(|f: &dyn Fn()| {
                let _g = rw.write().unwrap();
                f();
            }),
        ),
        (
            "shm/peer/pthread_mutex pshared",
            Box::new(|f: &dyn Fn()| {
                // SAFETY: initialised in `new`, never moved; lock and
                // unlock are paired on this thread.
                unsafe { libc::pthread_mutex_lock(pm.0) };
                f();
                // SAFETY: as above.
                unsafe { libc::pthread_mutex_unlock(pm.0) };
            }),
        ),
    ];
    println!("{n} strict handoffs between two processes (best of 3)");
    for (name, pair) in &cases {
        let mut best = Duration::MAX;
        for _ in 0..3 {
            turn.store(0, Ordering::SeqCst);
            let d = two_processes(&|parity| alternate(turn, n, parity, &**pair));
            best = best.min(d);
        }
        let ns = best.as_nanos() as f64 / n as f64;
        println!(
            "{:32} {:>10.0} handoffs/s  ({ns:.0} ns per handoff)",
            name.rsplit('/').next().unwrap_or(name),
            n as f64 / best.as_secs_f64(),
        );
        if benching {
            record(&format!("{name}/strict handoff, 2 processes"), ns);
        }
    }
}

/// Records the result for the report, under the group `handoff_2_processes`.
fn record(id: &str, ns_per_handoff: f64) {
    record::record_in("handoff_2_processes", id, ns_per_handoff)
}
