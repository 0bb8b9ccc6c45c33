//! Uncontended cost of one acquire+release of a LeaseLock, against the floor
//! it builds on (one `mkdir` + one `rmdir`) and the classic lock-file peer
//! (`open(O_CREAT|O_EXCL)` + `unlink`, as Python's filelock/lockfile do), in
//! one run so that ratios are measured side by side. On ext4 (the temporary
//! directory) and on tmpfs (/dev/shm) where it exists.
//!
//! Run: `cargo bench -p interlock --bench lease`
//! (add a filter such as `-- ext4` to shorten it).

use std::fs::{self, OpenOptions};
use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use interlock::{LeaseLock, LeaseOptions};

const TTL: Duration = Duration::from_secs(60);

fn group(c: &mut Criterion, fs_name: &str, dir: &Path) {
    let mut g = c.benchmark_group(format!("lease_uncontended/{fs_name}"));
    g.measurement_time(Duration::from_millis(1500))
        .warm_up_time(Duration::from_millis(300))
        .sample_size(25);

    // ----- the floor: what a lock directory costs at the least -----------
    let p = dir.join("floor");
    g.bench_function("dir/floor/mkdir + rmdir/acquire+release", |b| {
        b.iter(|| {
            fs::create_dir(&p).unwrap();
            fs::remove_dir(&p).unwrap();
        })
    });

    // ----- the peer: an O_EXCL lock file ---------------------------------
    let p = dir.join("peer.lock");
    g.bench_function(
        "dir/peer/O_EXCL lock file (create + unlink)/acquire+release",
        |b| {
            b.iter(|| {
                drop(
                    OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&p)
                        .unwrap(),
                );
                fs::remove_file(&p).unwrap();
            })
        },
    );

    // ----- interlock ------------------------------------------------------
    for (name, durable) in [("nondurable", false), ("durable", true)] {
        let l = LeaseLock::with_options(
            dir.join(format!("lease-{name}")),
            LeaseOptions::new(TTL).durable(durable),
        )
        .unwrap();
        g.bench_function(
            format!("dir/interlock/LeaseLock {name}/acquire+release"),
            |b| b.iter(|| l.try_lock().unwrap().release().unwrap()),
        );
    }
    let l = LeaseLock::with_options(dir.join("lease-renew"), LeaseOptions::new(TTL)).unwrap();
    let guard = l.try_lock().unwrap();
    g.bench_function("dir/part/LeaseLock renew/renew", |b| {
        b.iter(|| guard.renew().unwrap())
    });
    g.bench_function("dir/part/LeaseLock check/check", |b| {
        b.iter(|| guard.check().unwrap())
    });
    drop(guard);
    g.finish();
}

fn bench(c: &mut Criterion) {
    let t = tempfile::tempdir().unwrap();
    group(c, "ext4", t.path());
    if Path::new("/dev/shm").is_dir() {
        let s = tempfile::tempdir_in("/dev/shm").unwrap();
        group(c, "tmpfs", s.path());
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
