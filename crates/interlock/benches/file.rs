//! Uncontended cost of one lock+unlock pair: FileLock in each flavor and
//! policy, the raw kernel floor it builds on, and the peer crates, in one run
//! so that ratios are measured side by side.
//!
//! Run: `cargo bench -p interlock --bench file`
//! (add `-- --quick` or a filter such as `-- flock` to shorten it).
#![allow(clippy::incompatible_msrv)] // std's File::lock is 1.89+, bench only

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use interlock::__raw::{flock, ofd_try, ByteRange, FlockOp, RangeLock};
use interlock::{Fairness, FileLock, Flavor};

fn open_raw(p: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .unwrap()
}

const BYTE0: ByteRange = ByteRange { start: 0, len: 1 };

fn interlock_lock(
    p: &Path,
    flavor: Flavor,
    fairness: Fairness,
    verify: bool,
    hints: bool,
) -> FileLock {
    FileLock::options()
        .flavor(flavor)
        .fairness(fairness)
        .verify_path(verify)
        .hints(hints)
        .open(p)
        .unwrap()
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut g = c.benchmark_group("file_uncontended");
    g.measurement_time(Duration::from_millis(1500))
        .warm_up_time(Duration::from_millis(300))
        .sample_size(25);

    // ----- the floor: one raw lock and one raw unlock ---------------------
    let p = dir.path().join("floor.lock");
    let f = open_raw(&p);
    g.bench_function("fcntl/floor/raw OFD lock of byte 0/write", |b| {
        b.iter(|| {
            assert!(ofd_try(f.as_fd(), RangeLock::Write, BYTE0).unwrap());
            ofd_try(f.as_fd(), RangeLock::Unlock, BYTE0).unwrap();
        })
    });
    g.bench_function("fcntl/floor/raw OFD lock of byte 0/read", |b| {
        b.iter(|| {
            assert!(ofd_try(f.as_fd(), RangeLock::Read, BYTE0).unwrap());
            ofd_try(f.as_fd(), RangeLock::Unlock, BYTE0).unwrap();
        })
    });
    g.bench_function("flock/floor/raw flock/write", |b| {
        b.iter(|| {
            assert!(flock(f.as_fd(), FlockOp::Exclusive, false).unwrap());
            flock(f.as_fd(), FlockOp::Unlock, false).unwrap();
        })
    });
    g.bench_function("flock/floor/raw flock/read", |b| {
        b.iter(|| {
            assert!(flock(f.as_fd(), FlockOp::Shared, false).unwrap());
            flock(f.as_fd(), FlockOp::Unlock, false).unwrap();
        })
    });
    g.bench_function("path/part/lstat of the lock path/check", |b| {
        b.iter(|| std::fs::symlink_metadata(&p).unwrap())
    });
    g.bench_function("path/part/fstat of the descriptor/check", |b| {
        b.iter(|| f.metadata().unwrap())
    });
    drop(f);

    // ----- interlock ---------------------------------------------------------
    // (primitive, label, flavor, fairness, verify_path, hints); the
    // `hints(false)` rows are the defaults as they were before the hints.
    let configs = [
        (
            "fcntl",
            "FileLock",
            Flavor::Fcntl,
            Fairness::PreferWriters,
            true,
            true,
        ),
        (
            "fcntl",
            "FileLock verify_path(false)",
            Flavor::Fcntl,
            Fairness::PreferWriters,
            false,
            true,
        ),
        (
            "fcntl",
            "FileLock Kernel fairness, verify_path(false)",
            Flavor::Fcntl,
            Fairness::Kernel,
            false,
            true,
        ),
        (
            "flock",
            "FileLock flock",
            Flavor::Flock,
            Fairness::PreferWriters,
            true,
            true,
        ),
        (
            "flock",
            "FileLock flock, verify_path(false)",
            Flavor::Flock,
            Fairness::PreferWriters,
            false,
            true,
        ),
        (
            "flock",
            "FileLock flock, Kernel fairness, verify_path(false)",
            Flavor::Flock,
            Fairness::Kernel,
            false,
            true,
        ),
        (
            "fcntl",
            "FileLock hints(false)",
            Flavor::Fcntl,
            Fairness::PreferWriters,
            true,
            false,
        ),
        (
            "flock",
            "FileLock flock, hints(false)",
            Flavor::Flock,
            Fairness::PreferWriters,
            true,
            false,
        ),
    ];
    for (i, (primitive, name, flavor, fairness, verify, hints)) in configs.into_iter().enumerate() {
        let p = dir.path().join(format!("{i}.lock"));
        let lock = interlock_lock(&p, flavor, fairness, verify, hints);
        g.bench_function(
            BenchmarkId::new(format!("{primitive}/interlock/{name}"), "write"),
            |b| b.iter(|| drop(lock.try_write().unwrap())),
        );
        g.bench_function(
            BenchmarkId::new(format!("{primitive}/interlock/{name}"), "read"),
            |b| b.iter(|| drop(lock.try_read().unwrap())),
        );
    }

    // ----- peers ---------------------------------------------------------------
    let p = dir.path().join("peers.lock");
    let f = open_raw(&p);
    g.bench_function("flock/peer/fs4/write", |b| {
        b.iter(|| {
            fs4::fs_std::FileExt::lock_exclusive(&f).unwrap();
            fs4::fs_std::FileExt::unlock(&f).unwrap();
        })
    });
    g.bench_function("flock/peer/fs4/read", |b| {
        b.iter(|| {
            fs4::fs_std::FileExt::lock_shared(&f).unwrap();
            fs4::fs_std::FileExt::unlock(&f).unwrap();
        })
    });
    g.bench_function("flock/peer/std File::lock/write", |b| {
        b.iter(|| {
            f.lock().unwrap();
            f.unlock().unwrap();
        })
    });
    g.bench_function("flock/peer/std File::lock/read", |b| {
        b.iter(|| {
            f.lock_shared().unwrap();
            f.unlock().unwrap();
        })
    });
    let mut fd = fd_lock::RwLock::new(open_raw(&p));
    g.bench_function("flock/peer/fd-lock/read", |b| {
        b.iter(|| drop(fd.read().unwrap()))
    });
    g.bench_function("flock/peer/fd-lock/write", |b| {
        b.iter(|| drop(fd.write().unwrap()))
    });
    g.bench_function("fcntl/peer/file-guard (classic fcntl)/write", |b| {
        b.iter(|| drop(file_guard::lock(&f, file_guard::Lock::Exclusive, 0, 1).unwrap()))
    });
    g.bench_function("fcntl/peer/file-guard (classic fcntl)/read", |b| {
        b.iter(|| drop(file_guard::lock(&f, file_guard::Lock::Shared, 0, 1).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
