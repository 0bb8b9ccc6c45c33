//! Uncontended LockSet lock+unlock, against the floor (the same raw OFD
//! `fcntl` calls on the same bytes) and file-guard (classic fcntl byte-range
//! locks) as the peer, all in one run so that ratios are side by side.
//!
//! Run: `cargo bench -p interlock --bench set`
use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion};
use interlock::__raw::{ofd_try, ByteRange, RangeLock};
use interlock::{LockSet, Mode};

fn open(path: &std::path::Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap()
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.lock");
    let set = LockSet::open(&path).unwrap();
    let raw = open(&path);
    let peer = open(&path);
    let mut g = c.benchmark_group("set_uncontended");
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(30);
    for (name, start, len) in [("1 index", 5u64, 1u64), ("1000 indices", 1000, 1000)] {
        let range = start..start + len;
        for (mode, kind, fg) in [
            (
                Mode::Exclusive,
                RangeLock::Write,
                file_guard::Lock::Exclusive,
            ),
            (Mode::Shared, RangeLock::Read, file_guard::Lock::Shared),
        ] {
            let id = format!("{name} {mode}");
            g.bench_function(
                BenchmarkId::new("fcntl/floor/raw OFD lock of the range", &id),
                |b| {
                    let br = ByteRange { start, len };
                    b.iter(|| {
                        assert!(ofd_try(raw.as_fd(), kind, br).unwrap());
                        assert!(ofd_try(raw.as_fd(), RangeLock::Unlock, br).unwrap());
                    })
                },
            );
            g.bench_function(BenchmarkId::new("fcntl/interlock/LockSet", &id), |b| {
                b.iter(|| {
                    set.lock(range.clone(), mode).unwrap();
                    set.unlock(range.clone()).unwrap();
                })
            });
            g.bench_function(
                BenchmarkId::new("fcntl/peer/file-guard (classic fcntl)", &id),
                |b| {
                    b.iter(|| {
                        let guard =
                            file_guard::lock(&peer, fg, start as usize, len as usize).unwrap();
                        drop(guard);
                    })
                },
            );
        }
    }
    g.finish();
}

/// Side-by-side ratios that survive a noisy, shared machine: many short
/// rounds, each timing the floor and LockSet back to back (alternating which
/// goes first); the median of the per-round ratios is printed.
fn paired() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("paired.lock");
    let set = LockSet::open(&path).unwrap();
    let raw = open(&path);
    const N: u32 = 2_000;
    const ROUNDS: usize = 101;
    for (name, start, len) in [("1 index", 5u64, 1u64), ("1000 indices", 1000, 1000)] {
        for (mode, kind) in [
            (Mode::Exclusive, RangeLock::Write),
            (Mode::Shared, RangeLock::Read),
        ] {
            let br = ByteRange { start, len };
            let range = start..start + len;
            let floor = || {
                let t = Instant::now();
                for _ in 0..N {
                    assert!(ofd_try(raw.as_fd(), kind, br).unwrap());
                    assert!(ofd_try(raw.as_fd(), RangeLock::Unlock, br).unwrap());
                }
                t.elapsed()
            };
            let ours = || {
                let t = Instant::now();
                for _ in 0..N {
                    set.lock(range.clone(), mode).unwrap();
                    set.unlock(range.clone()).unwrap();
                }
                t.elapsed()
            };
            let mut ratios = Vec::with_capacity(ROUNDS);
            let mut floors = Vec::with_capacity(ROUNDS);
            for round in 0..ROUNDS {
                let (f, o) = if round % 2 == 0 {
                    let f = floor();
                    (f, ours())
                } else {
                    let o = ours();
                    (floor(), o)
                };
                ratios.push(o.as_secs_f64() / f.as_secs_f64());
                floors.push(f.as_secs_f64() * 1e9 / f64::from(N));
            }
            ratios.sort_by(f64::total_cmp);
            floors.sort_by(f64::total_cmp);
            println!(
                "paired {name} {mode}: LockSet / OFD floor = {:.3} (median of {ROUNDS} rounds; quartiles {:.3}..{:.3}); floor median {:.0} ns per lock+unlock",
                ratios[ROUNDS / 2],
                ratios[ROUNDS / 4],
                ratios[3 * ROUNDS / 4],
                floors[ROUNDS / 2]
            );
        }
    }
}

criterion_group!(benches, bench);

fn main() {
    benches();
    // Skipped when the bench runs as a test (`cargo test --benches`).
    if !std::env::args().any(|a| a == "--test") {
        paired();
    }
    Criterion::default().configure_from_args().final_summary();
}
