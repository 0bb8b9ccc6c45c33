//! Uncontended LockSet lock+unlock, against the floor (the same raw OFD
//! `fcntl` calls on the same bytes) and file-guard (classic fcntl byte-range
//! locks) as the peer, all in one run so that ratios are side by side.
//!
//! Run: `cargo bench -p interlock --bench set`
use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use interlock::__bench_ofd::{ofd_try, ByteRange, RangeLock};
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
            g.bench_function(BenchmarkId::new("floor_ofd_fcntl", &id), |b| {
                let br = ByteRange { start, len };
                b.iter(|| {
                    assert!(ofd_try(raw.as_fd(), kind, br).unwrap());
                    assert!(ofd_try(raw.as_fd(), RangeLock::Unlock, br).unwrap());
                })
            });
            g.bench_function(BenchmarkId::new("interlock_LockSet", &id), |b| {
                b.iter(|| {
                    set.lock(range.clone(), mode).unwrap();
                    set.unlock(range.clone()).unwrap();
                })
            });
            g.bench_function(BenchmarkId::new("file_guard", &id), |b| {
                b.iter(|| {
                    let guard = file_guard::lock(&peer, fg, start as usize, len as usize).unwrap();
                    drop(guard);
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
