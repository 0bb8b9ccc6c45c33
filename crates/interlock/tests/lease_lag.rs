//! How long a blocked LeaseLock waiter lags a release, or a holder's death,
//! in another process. A measurement, not a test of speed: run it with
//!
//! ```text
//! cargo test -p interlock --release --test lease_lag -- --ignored --nocapture --test-threads=1
//! ```
//!
//! Times are wall-clock (`SystemTime`, one clock for every process of the
//! host). The holder waits 2 to 10 ms (varied) after hearing that the waiter is
//! about to block, so that the waiter is asleep when the release comes (that pause is
//! part of the measurement's set-up, not a coordination the result relies on).
mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use interlock::{LeaseLock, LeaseOptions};
use support::Child;

const TTL: Duration = Duration::from_secs(3600);
const CHILD_TEST: &str = "lag_child";

/// `INTERLOCK_LAG_DURABLE=0` measures with token claims not fsynced.
fn durable() -> bool {
    std::env::var("INTERLOCK_LAG_DURABLE").map_or(true, |v| v != "0")
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// The child side of both measurements (does nothing when run as a test).
#[test]
fn lag_child() {
    let Some(role) = support::role() else { return };
    let (path, notify) = support::arg()
        .rsplit_once('|')
        .map(|(p, n)| (p.to_string(), n == "1"))
        .unwrap();
    let l = LeaseLock::with_options(
        &path,
        LeaseOptions::new(TTL).notify(notify).durable(durable()),
    )
    .unwrap();
    match role.as_str() {
        "releaser" => loop {
            let g = l.lock().unwrap();
            support::say("held");
            let pause_us: u64 = match support::hear() {
                Some(go) => go
                    .strip_prefix("go ")
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(3000),
                None => return,
            };
            std::thread::sleep(Duration::from_micros(pause_us));
            let t = now_ns();
            g.release().unwrap();
            support::say(format!("rel {t}"));
            // Wait until the parent has taken and released the lock.
            if support::hear().as_deref() != Some("again") {
                return;
            }
        },
        "holder" => {
            let _g = l.lock().unwrap();
            support::say("held");
            while support::hear().is_some() {}
        }
        r => panic!("unknown role {r}"),
    }
}

fn summary(what: &str, mut lags: Vec<u128>) {
    lags.sort_unstable();
    let q = |f: f64| lags[((lags.len() - 1) as f64 * f) as usize] as f64 / 1e6;
    eprintln!(
        "{what}: n={} median {:.3} ms, p10 {:.3} ms, p90 {:.3} ms, max {:.3} ms",
        lags.len(),
        q(0.5),
        q(0.1),
        q(0.9),
        q(1.0)
    );
}

fn release_lag(notify: bool, rounds: usize) -> Vec<u128> {
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("lk");
    let arg = format!("{}|{}", path.display(), if notify { 1 } else { 0 });
    let child = Arc::new(Mutex::new(Child::spawn(CHILD_TEST, "releaser", &arg)));
    let c2 = Arc::clone(&child);
    // The holder releases 2 to 10 ms after the waiter blocks, varied so
    // that a polling waiter's schedule cannot line up with it.
    let round = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let r2 = Arc::clone(&round);
    let l = LeaseLock::with_options(
        &path,
        LeaseOptions::new(TTL)
            .notify(notify)
            .durable(durable())
            .on_block(move |_| {
                let r = r2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let pause_us = 2000 + (r * 7919) % 8000;
                c2.lock().unwrap().send(&format!("go {pause_us}"));
            }),
    )
    .unwrap();
    let mut lags = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        child.lock().unwrap().expect("held");
        let g = l.lock().unwrap();
        let t_acq = now_ns();
        let rel = child.lock().unwrap().recv();
        let t_rel: u128 = rel.strip_prefix("rel ").unwrap().parse().unwrap();
        lags.push(t_acq.saturating_sub(t_rel));
        drop(g);
        child.lock().unwrap().send("again");
    }
    lags
}

#[test]
#[ignore]
fn measure_release_lag() {
    summary("release -> waiter holds (inotify)", release_lag(true, 300));
    summary(
        "release -> waiter holds (notify off: back-off poll 1 ms .. 100 ms)",
        release_lag(false, 100),
    );
}

#[test]
#[ignore]
fn measure_dead_holder_lag() {
    let mut lags = Vec::new();
    for _ in 0..50 {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("lk");
        let mut child = Child::spawn(CHILD_TEST, "holder", &format!("{}|1", path.display()));
        child.expect("held");
        let (tx, rx) = std::sync::mpsc::channel();
        let l = LeaseLock::with_options(
            &path,
            LeaseOptions::new(TTL)
                .durable(durable())
                .on_block(move |_| {
                    let _ = tx.send(());
                }),
        )
        .unwrap();
        std::thread::scope(|s| {
            let w = s.spawn(|| {
                let g = l.lock().unwrap();
                let t = now_ns();
                drop(g);
                t
            });
            rx.recv_timeout(Duration::from_secs(10)).unwrap();
            std::thread::sleep(Duration::from_millis(3));
            let t_kill = now_ns();
            child.kill();
            let t_acq = w.join().unwrap();
            lags.push(t_acq.saturating_sub(t_kill));
        });
    }
    summary("SIGKILL of holder -> waiter holds (pidfd)", lags);
}

/// How late `try_lock_for` returns after its deadline while another handle
/// holds the lease (the issue's bound: 5 ms). A measurement:
/// `cargo test -p interlock --release --test lease_lag -- --ignored --nocapture timed_wait_lateness`
#[test]
#[ignore]
fn timed_wait_lateness() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lk");
    for notify in [true, false] {
        let holder = LeaseLock::with_options(&path, LeaseOptions::new(TTL)).unwrap();
        let _g = holder.lock().unwrap();
        let waiter = LeaseLock::with_options(&path, LeaseOptions::new(TTL).notify(notify)).unwrap();
        let mut late: Vec<Duration> = (0..80)
            .map(|i| {
                let d = Duration::from_millis(5 + (i % 7) * 3);
                let t = std::time::Instant::now();
                assert!(waiter.try_lock_for(d).is_err());
                t.elapsed().saturating_sub(d)
            })
            .collect();
        late.sort();
        let over = late
            .iter()
            .filter(|l| **l > Duration::from_millis(5))
            .count();
        println!(
            "lease try_lock_for (notify {notify}): lateness p50 {:?} p99 {:?} max {:?}; {over} of 80 over 5 ms",
            late[40], late[79 * 99 / 100], late[79]
        );
    }
    // The floor in the same run: a plain sleep of the same lengths.
    let mut late: Vec<Duration> = (0..80)
        .map(|i| {
            let d = Duration::from_millis(5 + (i % 7) * 3);
            let t = std::time::Instant::now();
            std::thread::sleep(d);
            t.elapsed().saturating_sub(d)
        })
        .collect();
    late.sort();
    println!(
        "floor: thread::sleep lateness p50 {:?} p99 {:?} max {:?}",
        late[40], late[78], late[79]
    );
}
