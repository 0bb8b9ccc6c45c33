//! Measured figures for FileLock (not assertions): wake-up latency between
//! two processes, timed-wait overshoot, and how long a writer waits behind
//! four processes holding overlapping read locks.
//!
//! Run (release build, prints a table):
//! `cargo test --release -p interlock --test file_lock_figures -- --ignored --nocapture`
mod support;

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use interlock::{Fairness, FileLock, Flavor};
use support::Child;

const CHILD_TEST: &str = "figures_child";

fn parse_flavor(s: &str) -> Flavor {
    if s == "flock" {
        Flavor::Flock
    } else {
        Flavor::Fcntl
    }
}

fn parse_fairness(s: &str) -> Fairness {
    if s == "kernel" {
        Fairness::Kernel
    } else {
        Fairness::PreferWriters
    }
}

fn flavor_name(f: Flavor) -> &'static str {
    match f {
        Flavor::Fcntl => "fcntl",
        Flavor::Flock => "flock",
    }
}

fn fairness_name(f: Fairness) -> &'static str {
    match f {
        Fairness::PreferWriters => "prefer-writers",
        Fairness::Kernel => "kernel",
    }
}

/// Nanoseconds on the real-time clock, comparable between processes.
fn wall_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i128
}

/// The child roles; a no-op in a normal test run.
#[test]
fn figures_child() {
    let Some(role) = support::role() else { return };
    let arg = support::arg();
    let mut parts = arg.splitn(3, ' ');
    let flavor = parse_flavor(parts.next().unwrap());
    let fairness = parse_fairness(parts.next().unwrap());
    let path = Path::new(parts.next().unwrap()).to_path_buf();
    match role.as_str() {
        // Blocks in write() on "go", reports the wall time it got the lock.
        "waiter" => {
            let lock = FileLock::options()
                .flavor(flavor)
                .fairness(fairness)
                .on_block(|_| support::say("blocking"))
                .open(&path)
                .unwrap();
            support::say("ready");
            while let Some(cmd) = support::hear() {
                if cmd != "go" {
                    return;
                }
                let g = lock.write().unwrap();
                let t1 = wall_ns();
                drop(g);
                support::say(format!("{t1}"));
            }
        }
        // Reads in a loop, holding each read lock 2 ms, until `path.stop`.
        "reader" => {
            let lock = FileLock::options()
                .flavor(flavor)
                .fairness(fairness)
                .open(&path)
                .unwrap();
            let stop = path.with_extension("stop");
            let end = Instant::now() + Duration::from_secs(120);
            let mut said = false;
            while !stop.exists() && Instant::now() < end {
                let g = lock.read().unwrap();
                if !said {
                    support::say("reading");
                    said = true;
                }
                thread::sleep(Duration::from_millis(2));
                drop(g);
            }
        }
        r => panic!("unknown role {r}"),
    }
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = v[v.len() / 2];
    let p90 = v[(v.len() * 9 / 10).min(v.len() - 1)];
    (median, p90, *v.last().unwrap())
}

fn wake_latency(dir: &Path, flavor: Flavor) {
    let p = dir.join(format!("wake-{}.lock", flavor_name(flavor)));
    let lock = FileLock::options().flavor(flavor).open(&p).unwrap();
    let mut c = Child::spawn(
        CHILD_TEST,
        "waiter",
        &format!("{} prefer {}", flavor_name(flavor), p.display()),
    );
    c.expect("ready");
    let mut us = Vec::new();
    for _ in 0..200 {
        let g = lock.write().unwrap();
        c.send("go");
        c.expect("blocking");
        // Let the child enter the kernel wait (measurement only).
        thread::sleep(Duration::from_millis(2));
        let t0 = wall_ns();
        drop(g);
        let t1: i128 = c.recv().parse().unwrap();
        us.push((t1 - t0) as f64 / 1000.0);
    }
    c.send("quit");
    let (m, p90, max) = stats(us);
    println!(
        "wake latency, {:5} flavor, release -> other process holds: median {m:7.1} us  p90 {p90:7.1} us  max {max:8.1} us  (goal: median < 100 us)",
        flavor_name(flavor)
    );
}

fn timed_overshoot(dir: &Path, flavor: Flavor) {
    let p = dir.join(format!("timed-{}.lock", flavor_name(flavor)));
    let holder = FileLock::options().flavor(flavor).open(&p).unwrap();
    let waiter = FileLock::options().flavor(flavor).open(&p).unwrap();
    let g = holder.write().unwrap();
    let want = Duration::from_millis(10);
    let mut ms = Vec::new();
    for i in 0..60 {
        let t = Instant::now();
        let r = if i % 2 == 0 {
            waiter.try_write_for(want).map(drop)
        } else {
            waiter.try_read_for(want).map(drop)
        };
        assert!(r.is_err());
        ms.push((t.elapsed() - want).as_secs_f64() * 1000.0);
    }
    drop(g);
    let (m, p90, max) = stats(ms);
    println!(
        "timed wait overshoot past deadline, {:5} flavor: median {m:6.3} ms  p90 {p90:6.3} ms  max {max:6.3} ms  (goal: < 5 ms)",
        flavor_name(flavor)
    );
}

fn writer_wait(dir: &Path, flavor: Flavor, fairness: Fairness, rounds: usize, bound: Duration) {
    let p = dir.join(format!(
        "starve-{}-{}.lock",
        flavor_name(flavor),
        fairness_name(fairness)
    ));
    let lock = FileLock::options()
        .flavor(flavor)
        .fairness(fairness)
        .open(&p)
        .unwrap();
    let arg = format!(
        "{} {} {}",
        flavor_name(flavor),
        if fairness == Fairness::Kernel {
            "kernel"
        } else {
            "prefer"
        },
        p.display()
    );
    let mut readers: Vec<Child> = (0..4)
        .map(|_| Child::spawn(CHILD_TEST, "reader", &arg))
        .collect();
    for r in &mut readers {
        r.expect("reading");
    }
    let mut ms = Vec::new();
    let mut starved = 0;
    for _ in 0..rounds {
        // Let the readers overlap again after the last write.
        thread::sleep(Duration::from_millis(20));
        let t = Instant::now();
        match lock.try_write_for(bound) {
            Ok(g) => {
                ms.push(t.elapsed().as_secs_f64() * 1000.0);
                drop(g);
            }
            Err(_) => {
                starved += 1;
                ms.push(bound.as_secs_f64() * 1000.0);
            }
        }
    }
    std::fs::write(p.with_extension("stop"), b"").unwrap();
    for r in &mut readers {
        r.join();
    }
    let (m, p90, max) = stats(ms);
    println!(
        "writer wait behind 4 overlapping reader processes, {:5} flavor, {:14}: median {m:8.2} ms  p90 {p90:8.2} ms  max {max:8.2} ms  starved (> {:?}) {starved}/{rounds}",
        flavor_name(flavor),
        fairness_name(fairness),
        bound
    );
}

/// Uncontended lock+unlock pairs, measured interleaved (round-robin over
/// the variants, 40 rounds of 5,000 pairs each; the median round per
/// variant) so that the load from other work on this shared machine falls
/// on every variant alike. Criterion's bench (benches/file.rs) measures the
/// same things one after the other, with the peers.
#[allow(clippy::incompatible_msrv)] // std's File::lock is 1.89+; measurement only
fn uncontended_ratios(dir: &Path) {
    use interlock::__raw::{flock, ofd_try, ByteRange, FlockOp, RangeLock};
    use std::os::fd::AsFd;
    const BYTE0: ByteRange = ByteRange { start: 0, len: 1 };
    let raw = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join("raw.lock"))
        .unwrap();
    let open_hinted = |name: &str, flavor, fairness, verify, hints| {
        FileLock::options()
            .flavor(flavor)
            .fairness(fairness)
            .verify_path(verify)
            .hints(hints)
            .open(dir.join(name))
            .unwrap()
    };
    let open =
        |name: &str, flavor, fairness, verify| open_hinted(name, flavor, fairness, verify, true);
    let fc_nh = open_hinted("g", Flavor::Fcntl, Fairness::PreferWriters, true, false);
    let fl_nh = open_hinted("h", Flavor::Flock, Fairness::PreferWriters, true, false);
    let fc = open("a", Flavor::Fcntl, Fairness::PreferWriters, true);
    let a_path = dir.join("a");
    let fc_nv = open("b", Flavor::Fcntl, Fairness::PreferWriters, false);
    let fc_k = open("c", Flavor::Fcntl, Fairness::Kernel, false);
    let fl = open("d", Flavor::Flock, Fairness::PreferWriters, true);
    let fl_nv = open("e", Flavor::Flock, Fairness::PreferWriters, false);
    let fl_k = open("f", Flavor::Flock, Fairness::Kernel, false);
    let fd = raw.as_fd();
    let open_peer = || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("peer.lock"))
            .unwrap()
    };
    let peer = open_peer();
    let fdl = std::cell::RefCell::new(fd_lock::RwLock::new(open_peer()));
    type Pair<'a> = (&'static str, Box<dyn Fn() + 'a>);
    let variants: Vec<Pair<'_>> = vec![
        (
            "floor ofd write",
            Box::new(|| {
                ofd_try(fd, RangeLock::Write, BYTE0).unwrap();
                ofd_try(fd, RangeLock::Unlock, BYTE0).unwrap();
            }),
        ),
        (
            "floor ofd read",
            Box::new(|| {
                ofd_try(fd, RangeLock::Read, BYTE0).unwrap();
                ofd_try(fd, RangeLock::Unlock, BYTE0).unwrap();
            }),
        ),
        (
            "floor flock write",
            Box::new(|| {
                flock(fd, FlockOp::Exclusive, false).unwrap();
                flock(fd, FlockOp::Unlock, false).unwrap();
            }),
        ),
        (
            "floor flock read",
            Box::new(|| {
                flock(fd, FlockOp::Shared, false).unwrap();
                flock(fd, FlockOp::Unlock, false).unwrap();
            }),
        ),
        (
            "fcntl hints(false) write",
            Box::new(|| drop(fc_nh.try_write().unwrap())),
        ),
        (
            "fcntl hints(false) read",
            Box::new(|| drop(fc_nh.try_read().unwrap())),
        ),
        (
            "flock hints(false) write",
            Box::new(|| drop(fl_nh.try_write().unwrap())),
        ),
        (
            "flock hints(false) read",
            Box::new(|| drop(fl_nh.try_read().unwrap())),
        ),
        (
            "lstat of the path (the path check alone) write",
            Box::new(|| {
                std::fs::symlink_metadata(&a_path).unwrap();
            }),
        ),
        ("fcntl write", Box::new(|| drop(fc.try_write().unwrap()))),
        ("fcntl read", Box::new(|| drop(fc.try_read().unwrap()))),
        (
            "fcntl noverify write",
            Box::new(|| drop(fc_nv.try_write().unwrap())),
        ),
        (
            "fcntl noverify read",
            Box::new(|| drop(fc_nv.try_read().unwrap())),
        ),
        (
            "fcntl kernel-fair noverify read",
            Box::new(|| drop(fc_k.try_read().unwrap())),
        ),
        ("flock write", Box::new(|| drop(fl.try_write().unwrap()))),
        ("flock read", Box::new(|| drop(fl.try_read().unwrap()))),
        (
            "flock noverify write",
            Box::new(|| drop(fl_nv.try_write().unwrap())),
        ),
        (
            "flock noverify read",
            Box::new(|| drop(fl_nv.try_read().unwrap())),
        ),
        (
            "flock kernel-fair noverify read",
            Box::new(|| drop(fl_k.try_read().unwrap())),
        ),
        (
            "peer fs4 (flock) write",
            Box::new(|| {
                fs4::fs_std::FileExt::lock_exclusive(&peer).unwrap();
                fs4::fs_std::FileExt::unlock(&peer).unwrap();
            }),
        ),
        (
            "peer fs4 (flock) read",
            Box::new(|| {
                fs4::fs_std::FileExt::lock_shared(&peer).unwrap();
                fs4::fs_std::FileExt::unlock(&peer).unwrap();
            }),
        ),
        (
            "peer std File::lock (flock) write",
            Box::new(|| {
                peer.lock().unwrap();
                peer.unlock().unwrap();
            }),
        ),
        (
            "peer std File::lock (flock) read",
            Box::new(|| {
                peer.lock_shared().unwrap();
                peer.unlock().unwrap();
            }),
        ),
        (
            "peer fd-lock (flock) write",
            Box::new(|| {
                drop(fdl.borrow_mut().write().unwrap());
            }),
        ),
        (
            "peer fd-lock (flock) read",
            Box::new(|| {
                drop(fdl.borrow().read().unwrap());
            }),
        ),
        (
            "peer file-guard (classic fcntl) write",
            Box::new(|| {
                drop(file_guard::lock(&peer, file_guard::Lock::Exclusive, 0, 1).unwrap());
            }),
        ),
        (
            "peer file-guard (classic fcntl) read",
            Box::new(|| {
                drop(file_guard::lock(&peer, file_guard::Lock::Shared, 0, 1).unwrap());
            }),
        ),
    ];
    let mut rounds: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for _ in 0..40 {
        for (i, (_, f)) in variants.iter().enumerate() {
            let t = Instant::now();
            for _ in 0..5_000 {
                f();
            }
            rounds[i].push(t.elapsed().as_nanos() as f64 / 5_000.0);
        }
    }
    // The best round is the least disturbed by the other work on the
    // machine; the median shows the typical round.
    let best: Vec<f64> = rounds
        .iter()
        .map(|r| r.iter().cloned().fold(f64::INFINITY, f64::min))
        .collect();
    let med: Vec<f64> = rounds.into_iter().map(|r| stats(r).0).collect();
    let at = |name: &str| variants.iter().position(|(n, _)| *n == name).unwrap();
    for (i, (name, _)) in variants.iter().enumerate() {
        // Each against the floor of the kernel call it uses (classic fcntl
        // against the OFD floor: the two cost the same, FACTS.md).
        let fam = if name.contains("fcntl") || name.contains("ofd") {
            "ofd"
        } else {
            "flock"
        };
        let mode = if name.ends_with("write") {
            "write"
        } else {
            "read"
        };
        let f = at(&format!("floor {fam} {mode}"));
        println!(
            "uncontended pair {name:38} best {:5.0} ns {:4.2}x floor | median {:5.0} ns {:4.2}x floor",
            best[i],
            best[i] / best[f],
            med[i],
            med[i] / med[f]
        );
    }
}

/// Only the uncontended pairs:
/// `cargo test --release -p interlock --test file_lock_figures -- --ignored --nocapture uncontended`
#[test]
#[ignore = "measurement; run with --ignored --nocapture"]
fn uncontended_pairs() {
    let dir = tempfile::tempdir().unwrap();
    uncontended_ratios(dir.path());
}

#[test]
#[ignore = "measurement; run with --ignored --nocapture"]
fn file_lock_figures() {
    let dir = tempfile::tempdir().unwrap();
    uncontended_ratios(dir.path());
    for flavor in [Flavor::Fcntl, Flavor::Flock] {
        wake_latency(dir.path(), flavor);
    }
    for flavor in [Flavor::Fcntl, Flavor::Flock] {
        timed_overshoot(dir.path(), flavor);
    }
    for flavor in [Flavor::Fcntl, Flavor::Flock] {
        writer_wait(
            dir.path(),
            flavor,
            Fairness::PreferWriters,
            30,
            Duration::from_secs(5),
        );
        writer_wait(
            dir.path(),
            flavor,
            Fairness::Kernel,
            5,
            Duration::from_secs(3),
        );
    }
}
