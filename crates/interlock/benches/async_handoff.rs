//! The release-to-waiter wake between two processes: how long after the
//! holder's release a waiting *async* acquisition completes in the other
//! process (future resolved and polled by its executor), beside the
//! blocking waiter's wake in the same run. `FileLock` (an OFD lock: the
//! kernel's queue) and `ShmMutex` (a futex).
//!
//! One round: the holder process (parent) takes the lock and tells the
//! waiter process (a fork()ed child); the child starts the acquisition (a
//! future polled once, which hands the wait to a waiter thread, or a
//! blocking call) and tells the parent (the async case once its waiter
//! thread sleeps); the parent gives the waiter 1 ms to be asleep in the
//! kernel, notes the time and releases; the child notes
//! the time its acquisition returns. Times are `Instant`s (CLOCK_MONOTONIC)
//! since a base taken before the fork, passed through a shared word.
//! Median and 90th percentile over the rounds.
//!
//! Run: `cargo bench -p interlock --bench async_handoff` (`ROUNDS=N`,
//! default 400 when benchmarking, 20 otherwise). Results go to
//! target/criterion under the group `async_wake_2_processes`, for the
//! report (`scripts/benchmarks.sh`).
//!
//! `unsafe` (fork, _exit, waitpid) is allowed in this bench file only; each
//! block states its SAFETY argument.
#![allow(unsafe_code)]

#[path = "support/record.rs"]
mod record;

use interlock::shm::testing::SharedWords;
use interlock::{FileLock, ShmMutex, Wait};
use std::future::Future;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

struct Unparker(std::thread::Thread, AtomicBool);

impl Wake for Unparker {
    fn wake(self: Arc<Self>) {
        self.1.store(true, Ordering::SeqCst);
        self.0.unpark();
    }
}

/// A minimal executor: poll, park until woken, poll again.
fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let u = Arc::new(Unparker(std::thread::current(), AtomicBool::new(false)));
    let waker = Waker::from(Arc::clone(&u));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        while !u.1.swap(false, Ordering::SeqCst) {
            std::thread::park();
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum How {
    Blocking,
    AsyncMinimal,
    AsyncTokio,
}

#[derive(Clone, Copy, PartialEq)]
enum Family {
    File,
    Shm,
}

fn byte(s: &mut UnixStream) {
    let mut b = [0u8];
    s.read_exact(&mut b).expect("peer gone");
}

fn send(s: &mut UnixStream) {
    s.write_all(&[1]).expect("peer gone");
}

/// Nanoseconds since `base`, into the shared word.
fn stamp(word: &AtomicU64, base: Instant) {
    word.store(base.elapsed().as_nanos() as u64, Ordering::SeqCst);
}

/// Wake latencies (ns) of `rounds` rounds; runs the waiter in a child.
fn measure(family: Family, how: How, rounds: usize, path: &Path) -> Vec<u64> {
    let words = SharedWords::anonymous(1).unwrap();
    let w = &words.words()[0];
    let (mut here, mut there) = UnixStream::pair().unwrap();
    // A fresh mutex for each child: the children's reader slots are only
    // reclaimed by a liveness check, and a full slot table would make the
    // waiter nap for a free slot instead of waiting for the lock.
    let mutex = Arc::new(ShmMutex::anonymous().unwrap());
    let base = Instant::now();
    // SAFETY: the bench is single-threaded here (no waiter thread or
    // runtime exists before the fork), so the child may run arbitrary code;
    // it leaves with _exit and never returns.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        drop(here);
        let file = Arc::new(FileLock::open(path).unwrap());
        let rt = (how == How::AsyncTokio).then(|| {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
        });
        let mut out = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            byte(&mut there); // the parent holds
            let took: Box<dyn Send> = match (family, how) {
                (Family::File, How::Blocking) => {
                    send(&mut there);
                    Box::new(file.write_arc(Wait::Forever).unwrap())
                }
                (Family::Shm, How::Blocking) => {
                    send(&mut there);
                    Box::new(mutex.lock_arc(Wait::Forever).unwrap().unwrap())
                }
                (Family::File, _) => {
                    let f = file.write_async();
                    run(&rt, &mut there, f)
                        .map(|g| Box::new(g) as Box<dyn Send>)
                        .unwrap()
                }
                (Family::Shm, _) => {
                    let f = mutex.lock_async();
                    run(&rt, &mut there, f)
                        .map(|g| Box::new(g.unwrap()) as Box<dyn Send>)
                        .unwrap()
                }
            };
            let now = base.elapsed().as_nanos() as u64;
            out.push(now.saturating_sub(w.load(Ordering::SeqCst)));
            drop(took);
            send(&mut there); // released
        }
        // Results back to the parent, 8 bytes each.
        for v in out {
            there.write_all(&v.to_le_bytes()).unwrap();
        }
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(0) };
    }
    drop(there);
    let file = FileLock::open(path).unwrap();
    let mut hand_over = |release: &mut dyn FnMut()| {
        send(&mut here);
        byte(&mut here); // the child is about to wait
        std::thread::sleep(Duration::from_millis(1));
        stamp(w, base);
        release();
        byte(&mut here); // the child got it and released
    };
    for _ in 0..rounds {
        match family {
            Family::File => {
                let mut g = Some(file.write().unwrap());
                hand_over(&mut || drop(g.take()));
            }
            Family::Shm => {
                let mut g = Some(mutex.lock().unwrap());
                hand_over(&mut || drop(g.take()));
            }
        }
    }
    let mut out = Vec::with_capacity(rounds);
    let mut b = [0u8; 8];
    for _ in 0..rounds {
        here.read_exact(&mut b).unwrap();
        out.push(u64::from_le_bytes(b));
    }
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid out-pointer.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    out
}

/// Polls `f` once (the wait goes to a waiter thread), tells the parent,
/// then runs it to completion on the chosen executor.
fn run<F: Future + Unpin>(
    rt: &Option<tokio::runtime::Runtime>,
    there: &mut UnixStream,
    mut f: F,
) -> F::Output {
    let first = std::pin::Pin::new(&mut f).poll(&mut Context::from_waker(Waker::noop()));
    assert!(
        first.is_pending(),
        "the lock was free: the round measured nothing"
    );
    // Measure the wake, not the waiter thread's start: tell the holder only
    // once the waiter sleeps.
    let give_up = Instant::now() + Duration::from_secs(10);
    while interlock::__async::busy_waiters() == 0 || !waiter_asleep() {
        assert!(Instant::now() < give_up, "no waiter thread went to sleep");
        std::thread::sleep(Duration::from_micros(50));
    }
    send(there);
    match rt {
        Some(rt) => rt.block_on(f),
        None => block_on(f),
    }
}

/// Whether this process has a waiter thread (`interlock-wait`) asleep
/// (state S in /proc/self/task/TID/stat).
fn waiter_asleep() -> bool {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return false;
    };
    tasks.filter_map(Result::ok).any(|t| {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // pid (comm) state ...
        match (stat.find('('), stat.rfind(')')) {
            (Some(a), Some(b)) => {
                &stat[a + 1..b] == "interlock-wait" && stat[b + 1..].trim_start().starts_with('S')
            }
            _ => false,
        }
    })
}

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if benching { 400 } else { 20 });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wake.lock");
    let cases = [
        (
            "file/interlock/FileLock write (blocking)",
            Family::File,
            How::Blocking,
        ),
        (
            "file/interlock/FileLock write_async (minimal executor)",
            Family::File,
            How::AsyncMinimal,
        ),
        (
            "file/interlock/FileLock write_async (tokio current_thread)",
            Family::File,
            How::AsyncTokio,
        ),
        (
            "shm/interlock/ShmMutex lock (blocking)",
            Family::Shm,
            How::Blocking,
        ),
        (
            "shm/interlock/ShmMutex lock_async (minimal executor)",
            Family::Shm,
            How::AsyncMinimal,
        ),
        (
            "shm/interlock/ShmMutex lock_async (tokio current_thread)",
            Family::Shm,
            How::AsyncTokio,
        ),
    ];
    uncontended(&path, benching);
    println!("release-to-waiter wake between two processes, {rounds} rounds each");
    for (name, family, how) in cases {
        let mut v = measure(family, how, rounds, &path);
        v.sort_unstable();
        let median = v[v.len() / 2];
        let p90 = v[v.len() * 9 / 10];
        println!(
            "{:60} median {:>7.1} µs   p90 {:>7.1} µs",
            name.split_once('/').map_or(name, |(_, r)| r),
            median as f64 / 1e3,
            p90 as f64 / 1e3
        );
        if benching {
            record(
                &format!("{name}/release-to-waiter wake, 2 processes"),
                median as f64,
            );
        }
    }
}

/// The uncontended acquire+release of the async form (a future taken on
/// its first poll) beside the blocking `*_arc` call it wraps.
fn once<T>(p: Poll<T>) -> T {
    match p {
        Poll::Ready(r) => r,
        Poll::Pending => panic!("uncontended, yet pending"),
    }
}

fn uncontended(path: &Path, benching: bool) {
    let n: u32 = if benching { 200_000 } else { 2_000 };
    let file = Arc::new(FileLock::open(path).unwrap());
    let mutex = Arc::new(ShmMutex::anonymous().unwrap());
    let time = |f: &mut dyn FnMut()| {
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            for _ in 0..n {
                f();
            }
            best = best.min(t.elapsed().as_nanos() as f64 / n as f64);
        }
        best
    };
    let cx = &mut Context::from_waker(Waker::noop());
    let cases: [(&str, f64); 4] = [
        (
            "file/interlock/FileLock write_arc",
            time(&mut || drop(file.write_arc(Wait::Forever).unwrap())),
        ),
        (
            "file/interlock/FileLock write_async (first poll)",
            time(&mut || drop(once(std::pin::pin!(file.write_async()).poll(cx)).unwrap())),
        ),
        (
            "shm/interlock/ShmMutex lock_arc",
            time(&mut || drop(mutex.lock_arc(Wait::Forever).unwrap())),
        ),
        (
            "shm/interlock/ShmMutex lock_async (first poll)",
            time(&mut || drop(once(std::pin::pin!(mutex.lock_async()).poll(cx)).unwrap())),
        ),
    ];
    // What the waiter pool saves a contended async acquisition: a waiter
    // thread (the library's stack size) started and ended.
    let spawns = (n / 100).max(20);
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..spawns {
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(|| {})
                .unwrap()
                .join()
                .unwrap();
        }
        best = best.min(t.elapsed().as_nanos() as f64 / spawns as f64);
    }
    println!(
        "a waiter thread's start and end (256 KiB stack): {:.1} µs",
        best / 1e3
    );
    println!("uncontended acquire+release (best of 3 x {n})");
    for (name, ns) in cases {
        println!(
            "{:60} {ns:>8.0} ns",
            name.split_once('/').map_or(name, |(_, r)| r)
        );
        if benching {
            record::record_in("async_uncontended", &format!("{name}/acquire+release"), ns);
        }
    }
}

/// Leaves the result where criterion leaves its own (the two JSON files
/// BENCHMARKS.md is generated from), under the group
/// `async_wake_2_processes`.
fn record(id: &str, median_ns: f64) {
    record::record_in("async_wake_2_processes", id, median_ns)
}
