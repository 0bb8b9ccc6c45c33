//! LockSet across processes: exclusion of intervals, conversion and partial
//! unlock seen from another process, release on drop, scoped restore,
//! deadlock detection (cycles of 2, 3 and 16 processes, two readers
//! upgrading), no false deadlock under an ordered random workload, and
//! `holders()`.
//!
//! Every child is this test binary re-executed (see tests/support), driven
//! line by line; every wait is bounded; nothing is coordinated by sleeping.
mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use interlock::{holders, ErrorKind, LockKind, LockSet, Mode, TryLockError};
use support::Child;

fn parse_mode(s: &str) -> Mode {
    match s {
        "S" => Mode::Shared,
        "X" => Mode::Exclusive,
        _ => panic!("bad mode {s}"),
    }
}

fn show_held(set: &LockSet) -> String {
    let parts: Vec<String> = set
        .held()
        .into_iter()
        .map(|(r, m)| {
            let c = if m == Mode::Shared { "S" } else { "X" };
            format!("{}..{}:{c}", r.start, r.end)
        })
        .collect();
    format!("held {}", parts.join(","))
}

fn open_announcing(path: &str) -> LockSet {
    LockSet::options()
        .on_block(|_| support::say("blocked"))
        .open(path)
        .expect("open lock set")
}

/// The generic child: opens the set named by the argument and obeys.
fn worker() {
    let set = open_announcing(&support::arg());
    let mut scope = None;
    support::say("ready");
    while let Some(line) = support::hear() {
        let w: Vec<&str> = line.split(' ').collect();
        let num = |i: usize| w[i].parse::<u64>().unwrap();
        match w[0] {
            "lock" => {
                let t = Instant::now();
                match set.lock(num(1)..num(2), parse_mode(w[3])) {
                    Ok(()) => support::say("ok"),
                    Err(e) if e.kind() == ErrorKind::Deadlock => {
                        support::say(format!("deadlock {}", t.elapsed().as_micros()))
                    }
                    Err(e) => support::say(format!("err {e}")),
                }
            }
            "try" => match set.try_lock(num(1)..num(2), parse_mode(w[3])) {
                Ok(()) => support::say("ok"),
                Err(TryLockError::WouldBlock) => support::say("wouldblock"),
                Err(e) => support::say(format!("err {e}")),
            },
            "unlock" => {
                set.unlock(num(1)..num(2)).unwrap();
                support::say("ok");
            }
            "unlock_all" => {
                set.unlock_all().unwrap();
                support::say("ok");
            }
            "scope" => {
                scope = Some(set.scoped(num(1)..num(2), parse_mode(w[3])).unwrap());
                support::say("ok");
            }
            "endscope" => {
                scope.take().unwrap().restore().unwrap();
                support::say("ok");
            }
            "held" => support::say(show_held(&set)),
            "holders" => match holders(support::arg()) {
                Ok(h) => support::say(format!("holders {}", h.len())),
                Err(e) => support::say(format!("err {e}")),
            },
            "detects" => support::say(format!("detects {}", set.detects_deadlocks())),
            // Request `next` exclusively; report; then release everything.
            "cycle" => {
                let t = Instant::now();
                match set.lock(num(1), Mode::Exclusive) {
                    Ok(()) => support::say("got"),
                    Err(e) if e.kind() == ErrorKind::Deadlock => {
                        support::say(format!("deadlock {}", t.elapsed().as_micros()))
                    }
                    Err(e) => support::say(format!("err {e}")),
                }
                set.unlock_all().unwrap();
                support::say("released");
            }
            "quit" => return,
            other => panic!("unknown command {other}"),
        }
    }
}

fn tmp() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("set.lock").to_str().unwrap().to_string();
    (dir, p)
}

fn spawn_worker(test: &str, path: &str) -> Child {
    let mut c = Child::spawn(test, "worker", path);
    c.expect("ready");
    c
}

fn ask(c: &mut Child, cmd: &str) -> String {
    c.send(cmd);
    c.recv()
}

fn can(set: &LockSet, r: std::ops::Range<u64>, m: Mode) -> bool {
    match set.try_lock(r.clone(), m) {
        Ok(()) => {
            set.unlock(r).unwrap();
            true
        }
        Err(TryLockError::WouldBlock) => false,
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn intervals_exclude_and_convert_across_processes() {
    if support::role().is_some() {
        return worker();
    }
    let (_d, p) = tmp();
    let mut c = spawn_worker("intervals_exclude_and_convert_across_processes", &p);
    let me = LockSet::open(&p).unwrap();
    assert_eq!(ask(&mut c, "lock 3 7 X"), "ok");
    assert!(!can(&me, 6..7, Mode::Shared));
    assert!(!can(&me, 0..4, Mode::Shared));
    assert!(can(&me, 7..8, Mode::Exclusive));
    assert!(can(&me, 0..3, Mode::Exclusive));
    // Convert the middle to shared: the rest stays exclusive.
    assert_eq!(ask(&mut c, "lock 4 6 S"), "ok");
    assert!(can(&me, 4..6, Mode::Shared));
    assert!(!can(&me, 4..5, Mode::Exclusive));
    assert!(!can(&me, 3..4, Mode::Shared));
    assert!(!can(&me, 6..7, Mode::Shared));
    // Partial unlock splits.
    assert_eq!(ask(&mut c, "unlock 3 4"), "ok");
    assert!(can(&me, 3..4, Mode::Exclusive));
    assert_eq!(ask(&mut c, "held"), "held 4..6:S,6..7:X");
    // Our shared lock on 5 stops the child converting 4..6 back.
    me.lock(5, Mode::Shared).unwrap();
    assert_eq!(ask(&mut c, "try 4 6 X"), "wouldblock");
    assert_eq!(ask(&mut c, "held"), "held 4..6:S,6..7:X");
    me.unlock_all().unwrap();
    assert_eq!(ask(&mut c, "try 4 6 X"), "ok");
    assert_eq!(ask(&mut c, "held"), "held 4..7:X");
    // A large interval at the top of the index space.
    let big = 1u64 << 62;
    assert_eq!(ask(&mut c, &format!("lock {big} {} X", big + 1000)), "ok");
    assert!(!can(&me, big + 999..big + 1000, Mode::Shared));
    assert!(can(&me, big + 1000..big + 1001, Mode::Exclusive));
    assert_eq!(
        ask(&mut c, &format!("unlock {} {}", big + 1, big + 999)),
        "ok"
    );
    assert!(can(&me, big + 1..big + 999, Mode::Exclusive));
    assert!(!can(&me, big..big + 1, Mode::Shared));
    c.send("quit");
    c.join();
    // Exit released everything.
    assert!(can(&me, 0..interlock::INDEX_END, Mode::Exclusive));
}

#[test]
fn dropping_the_set_releases_everything() {
    if support::role().is_some() {
        let set = LockSet::open(support::arg()).unwrap();
        set.lock(0..10, Mode::Exclusive).unwrap();
        set.lock(20..30, Mode::Shared).unwrap();
        support::say("locked");
        assert_eq!(support::hear().as_deref(), Some("drop"));
        drop(set);
        support::say("dropped");
        let _ = support::hear();
        return;
    }
    let (_d, p) = tmp();
    let mut c = Child::spawn("dropping_the_set_releases_everything", "dropper", &p);
    c.expect("locked");
    let me = LockSet::open(&p).unwrap();
    assert!(!can(&me, 9..10, Mode::Shared));
    assert!(!can(&me, 25..26, Mode::Exclusive));
    assert!(can(&me, 25..26, Mode::Shared));
    c.send("drop");
    c.expect("dropped");
    // The child is still alive; its locks are gone.
    assert!(can(&me, 0..100, Mode::Exclusive));
    c.send("quit");
    c.join();
}

#[test]
fn scope_restores_previous_state_seen_from_another_process() {
    if support::role().is_some() {
        return worker();
    }
    let (_d, p) = tmp();
    let mut c = spawn_worker(
        "scope_restores_previous_state_seen_from_another_process",
        &p,
    );
    let me = LockSet::open(&p).unwrap();
    assert_eq!(ask(&mut c, "lock 0 10 S"), "ok");
    assert_eq!(ask(&mut c, "lock 10 20 X"), "ok");
    assert_eq!(ask(&mut c, "scope 5 25 X"), "ok");
    assert!(can(&me, 0..5, Mode::Shared));
    assert!(!can(&me, 5..6, Mode::Shared));
    assert!(!can(&me, 24..25, Mode::Shared));
    assert_eq!(ask(&mut c, "held"), "held 0..5:S,5..25:X");
    assert_eq!(ask(&mut c, "endscope"), "ok");
    assert!(can(&me, 5..10, Mode::Shared));
    assert!(!can(&me, 5..6, Mode::Exclusive));
    assert!(!can(&me, 10..11, Mode::Shared));
    assert!(can(&me, 20..25, Mode::Exclusive));
    assert_eq!(ask(&mut c, "held"), "held 0..10:S,10..20:X");
    // A shared scope over an exclusive part, then back to exclusive.
    assert_eq!(ask(&mut c, "scope 15 30 S"), "ok");
    assert!(can(&me, 15..30, Mode::Shared));
    assert!(!can(&me, 14..15, Mode::Shared));
    assert_eq!(ask(&mut c, "endscope"), "ok");
    assert!(!can(&me, 15..16, Mode::Shared));
    assert!(can(&me, 20..30, Mode::Exclusive));
    assert_eq!(ask(&mut c, "held"), "held 0..10:S,10..20:X");
    c.send("quit");
    c.join();
}

/// n children in a ring: child i holds index i, then all request
/// (i + 1) mod n at once. At least one must get Deadlock; once it releases,
/// the others complete.
fn ring(test: &str, n: usize) {
    if support::role().is_some() {
        return worker();
    }
    let (_d, p) = tmp();
    if !LockSet::open(&p).unwrap().detects_deadlocks() {
        eprintln!("deadlock detection unavailable; skipping");
        return;
    }
    let mut kids: Vec<Child> = (0..n).map(|_| spawn_worker(test, &p)).collect();
    for (i, c) in kids.iter_mut().enumerate() {
        assert_eq!(ask(c, &format!("lock {i} {} X", i + 1)), "ok");
    }
    let start = Instant::now();
    for (i, c) in kids.iter_mut().enumerate() {
        c.send(&format!("cycle {}", (i + 1) % n));
    }
    // Each child either blocks (then gets it and releases) or is told
    // Deadlock (then releases). Collect until every child released.
    let mut deadlocks = Vec::new();
    let mut got = 0;
    for (i, c) in kids.iter_mut().enumerate() {
        loop {
            let m = c.recv_within(Duration::from_secs(30));
            if m == "blocked" {
                continue;
            } else if m == "got" {
                got += 1;
            } else if let Some(us) = m.strip_prefix("deadlock ") {
                deadlocks.push((i, us.parse::<u64>().unwrap(), start.elapsed()));
            } else if m == "released" {
                break;
            } else {
                panic!("child {i}: {m}");
            }
        }
    }
    assert!(!deadlocks.is_empty(), "no child was told Deadlock");
    assert_eq!(got + deadlocks.len(), n);
    eprintln!(
        "ring of {n}: {} deadlock(s) {:?} (child µs in lock(), parent time since requests); all done in {:?}",
        deadlocks.len(),
        deadlocks,
        start.elapsed()
    );
    for c in &mut kids {
        c.send("quit");
    }
    for c in &mut kids {
        c.join();
    }
}

#[test]
fn deadlock_ring_of_2() {
    ring("deadlock_ring_of_2", 2);
}

#[test]
fn deadlock_ring_of_3() {
    ring("deadlock_ring_of_3", 3);
}

#[test]
fn deadlock_ring_of_16() {
    ring("deadlock_ring_of_16", 16);
}

#[test]
fn two_readers_upgrading_the_same_index() {
    if support::role().is_some() {
        return worker();
    }
    let (_d, p) = tmp();
    if !LockSet::open(&p).unwrap().detects_deadlocks() {
        eprintln!("deadlock detection unavailable; skipping");
        return;
    }
    let test = "two_readers_upgrading_the_same_index";
    let (mut a, mut b) = (spawn_worker(test, &p), spawn_worker(test, &p));
    assert_eq!(ask(&mut a, "lock 7 8 S"), "ok");
    assert_eq!(ask(&mut b, "lock 7 8 S"), "ok");
    assert_eq!(ask(&mut a, "lock 7 8 X"), "blocked");
    let t = Instant::now();
    let m = ask(&mut b, "lock 7 8 X");
    assert!(m.starts_with("deadlock "), "{m}");
    eprintln!(
        "upgrade deadlock reported after {:?} ({m} µs in child)",
        t.elapsed()
    );
    // b kept its shared lock; a is still waiting.
    assert_eq!(ask(&mut b, "held"), "held 7..8:S");
    assert_eq!(a.try_recv_within(Duration::from_millis(0)), None);
    assert_eq!(ask(&mut b, "unlock 7 8"), "ok");
    assert_eq!(a.recv(), "ok");
    assert_eq!(ask(&mut a, "held"), "held 7..8:X");
    for c in [&mut a, &mut b] {
        c.send("quit");
        c.join();
    }
}

#[test]
fn registry_location_follows_the_environment() {
    if support::role().is_some() {
        return worker();
    }
    let (d, p) = tmp();
    let test = "registry_location_follows_the_environment";
    let reg = d.path().join("registry");
    std::fs::create_dir(&reg).unwrap();
    let env = [(interlock::REGISTRY_DIR_ENV, reg.to_str().unwrap())];
    let mut a = Child::spawn_with(test, "worker", &p, &env);
    let mut b = Child::spawn_with(test, "worker", &p, &env);
    a.expect("ready");
    b.expect("ready");
    assert_eq!(ask(&mut a, "detects"), "detects true");
    assert_eq!(ask(&mut a, "lock 0 1 S"), "ok");
    assert_eq!(ask(&mut b, "lock 0 1 S"), "ok");
    assert_eq!(ask(&mut a, "lock 0 1 X"), "blocked");
    assert!(ask(&mut b, "lock 0 1 X").starts_with("deadlock "));
    let dirs: Vec<_> = std::fs::read_dir(&reg).unwrap().flatten().collect();
    assert_eq!(dirs.len(), 1);
    assert!(dirs[0]
        .file_name()
        .to_str()
        .unwrap()
        .starts_with("interlock-wait-"));
    assert_eq!(ask(&mut b, "unlock_all"), "ok");
    assert_eq!(a.recv(), "ok");
    // The last waiter to leave removed the registry directory.
    let left: Vec<_> = std::fs::read_dir(&reg).unwrap().flatten().collect();
    assert!(left.is_empty(), "registry left behind: {left:?}");
    // Disabled: locks work, waits are not checked.
    let mut c = Child::spawn_with(test, "worker", &p, &[(interlock::REGISTRY_DIR_ENV, "")]);
    c.expect("ready");
    assert_eq!(ask(&mut c, "detects"), "detects false");
    assert_eq!(ask(&mut c, "try 0 1 S"), "wouldblock");
    assert_eq!(ask(&mut c, "try 1 2 X"), "ok");
    for k in [&mut a, &mut b, &mut c] {
        k.send("quit");
        k.join();
    }
}

#[test]
fn record_of_a_dead_waiter_is_ignored() {
    if support::role().is_some() {
        return worker();
    }
    let (_d, p) = tmp();
    if !LockSet::open(&p).unwrap().detects_deadlocks() {
        eprintln!("deadlock detection unavailable; skipping");
        return;
    }
    let test = "record_of_a_dead_waiter_is_ignored";
    let (mut a, mut b) = (spawn_worker(test, &p), spawn_worker(test, &p));
    assert_eq!(ask(&mut a, "lock 0 1 X"), "ok");
    assert_eq!(ask(&mut b, "lock 1 2 X"), "ok");
    // b waits for 0 (held by a), then dies with its record published.
    assert_eq!(ask(&mut b, "lock 0 1 X"), "blocked");
    let dead = b.pid();
    b.kill();
    assert!(!holders(&p).unwrap().iter().any(|h| h.pid == Some(dead)));
    // Now a waits for 1, held by us: b's record ("holds 1, wants 0")
    // would close a cycle if it were believed.
    let me = LockSet::open(&p).unwrap();
    me.lock(1, Mode::Exclusive).unwrap();
    assert_eq!(ask(&mut a, "lock 1 2 X"), "blocked");
    me.unlock_all().unwrap();
    assert_eq!(a.recv(), "ok");
    a.send("quit");
    a.join();
}

/// Two processes, 10,000 lock operations in all, on random sub-ranges of a
/// small index space acquired in increasing index order with random modes:
/// a discipline under which no deadlock is possible, so any Deadlock is
/// false.
#[test]
fn no_false_deadlock_under_ordered_random_workload() {
    const OPS_PER_CHILD: u64 = 5_000;
    // The children start each phase together (a rendezvous through the
    // parent), so that their operations overlap and waits really happen.
    const PHASE: u64 = 250;
    if support::role().is_some() {
        let mut words = support::arg();
        let seed: u64 = words
            .split_off(words.find(' ').unwrap() + 1)
            .parse()
            .unwrap();
        static BLOCKED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let set = LockSet::options()
            .on_block(|_| {
                BLOCKED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            })
            .open(words.trim_end())
            .unwrap();
        let mut x = seed | 1;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let (mut ops, mut waits) = (0u64, 0u64);
        while ops < OPS_PER_CHILD {
            if ops % PHASE == 0 {
                support::say("phase");
                assert_eq!(support::hear().as_deref(), Some("go"));
            }
            // A batch: ascending disjoint ranges in 0..12, each locked in a
            // random mode; then release all (or part, then all).
            let mut at = rnd(4);
            let first = ops;
            while at < 12 && ops < OPS_PER_CHILD && (ops == first || ops % PHASE != 0) {
                let len = 1 + rnd(3);
                let end = (at + len).min(12);
                let mode = if rnd(2) == 0 {
                    Mode::Shared
                } else {
                    Mode::Exclusive
                };
                match set.try_lock(at..end, mode) {
                    Ok(()) => {}
                    Err(TryLockError::WouldBlock) => {
                        waits += 1;
                        if let Err(e) = set.lock(at..end, mode) {
                            support::say(format!("error {e}"));
                            return;
                        }
                    }
                    Err(e) => panic!("{e}"),
                }
                ops += 1;
                at = end + rnd(3);
            }
            if rnd(2) == 0 {
                let _ = set.unlock(0..rnd(12) + 1);
            }
            set.unlock_all().unwrap();
        }
        let blocked = BLOCKED.load(std::sync::atomic::Ordering::Relaxed);
        support::say(format!("done {ops} {waits} {blocked}"));
        return;
    }
    let (_d, p) = tmp();
    let test = "no_false_deadlock_under_ordered_random_workload";
    let mut kids: Vec<Child> = [0x9e37_79b9_7f4a_7c15u64, 0xd1b5_4a32_d192_ed03]
        .iter()
        .map(|seed| Child::spawn(test, "random", &format!("{p} {seed}")))
        .collect();
    let start = Instant::now();
    for _ in 0..OPS_PER_CHILD / PHASE {
        for c in &mut kids {
            c.expect("phase");
        }
        for c in &mut kids {
            c.send("go");
        }
    }
    let (mut total_waits, mut total_blocked) = (0, 0);
    for c in &mut kids {
        let m = c.recv_within(Duration::from_secs(120));
        let rest = m
            .strip_prefix("done ")
            .unwrap_or_else(|| panic!("child: {m}"));
        let mut it = rest.split(' ');
        assert_eq!(it.next().unwrap().parse::<u64>().unwrap(), OPS_PER_CHILD);
        total_waits += it.next().unwrap().parse::<u64>().unwrap();
        total_blocked += it.next().unwrap().parse::<u64>().unwrap();
    }
    eprintln!(
        "{} lock operations, {total_waits} found the range busy, {total_blocked} published a wait and blocked; no Deadlock; {:?}",
        2 * OPS_PER_CHILD,
        start.elapsed()
    );
    for c in &mut kids {
        c.join();
    }
}

/// A python3 child that takes a classic `lockf` lock and says "ready".
struct Python {
    child: std::process::Child,
}

impl Python {
    fn lockf(path: &str) -> Option<Python> {
        let script = "import fcntl, os, sys\n\
                      fd = os.open(sys.argv[1], os.O_RDWR)\n\
                      fcntl.lockf(fd, fcntl.LOCK_EX, 0, 20)\n\
                      print('ready', flush=True)\n\
                      sys.stdin.readline()\n";
        let mut child = Command::new("python3")
            .args(["-c", script, path])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .ok()?;
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        assert_eq!(line.trim(), "ready", "python child did not lock");
        Some(Python { child })
    }
}

impl Drop for Python {
    fn drop(&mut self) {
        if let Some(mut i) = self.child.stdin.take() {
            let _ = i.write_all(b"\n");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn holders_names_processes_modes_and_waiters() {
    if support::role().is_some() {
        return worker();
    }
    let (_d, p) = tmp();
    let test = "holders_names_processes_modes_and_waiters";
    let mut a = spawn_worker(test, &p);
    assert_eq!(ask(&mut a, "lock 3 7 X"), "ok");
    assert_eq!(ask(&mut a, "lock 8 9 S"), "ok");
    let hs = holders(&p).unwrap();
    for h in &hs {
        eprintln!("{h}");
    }
    let ofd_x = hs
        .iter()
        .find(|h| h.range == (3, Some(7)))
        .expect("child's lock listed");
    assert_eq!(ofd_x.pid, Some(a.pid()));
    // The same through an open set (by inode, not path).
    let via_set = LockSet::open(&p).unwrap().holders().unwrap();
    assert!(via_set.contains(ofd_x), "{via_set:?}");
    assert_eq!(ofd_x.mode, Mode::Exclusive);
    assert_eq!(ofd_x.kind, LockKind::Ofd);
    assert!(!ofd_x.waiting);
    assert!(hs
        .iter()
        .any(|h| h.range == (8, Some(9)) && h.mode == Mode::Shared && h.pid == Some(a.pid())));

    // A waiting LockSet child is named through the registry.
    let detects = LockSet::open(&p).unwrap().detects_deadlocks();
    let mut b = spawn_worker(test, &p);
    assert_eq!(ask(&mut b, "lock 4 5 X"), "blocked");
    let hs = holders(&p).unwrap();
    for h in &hs {
        eprintln!("{h}");
    }
    let waiter = hs.iter().find(|h| h.waiting).expect("waiter listed");
    if detects {
        assert_eq!(waiter.pid, Some(b.pid()));
    }
    assert_eq!((waiter.mode, waiter.range), (Mode::Exclusive, (4, Some(5))));
    assert_eq!(ask(&mut a, "unlock_all"), "ok");
    assert_eq!(b.recv(), "ok");

    // A classic lock taken by Python's fcntl.lockf.
    match Python::lockf(&p) {
        None => eprintln!("python3 not available; skipping the lockf part"),
        Some(py) => {
            let hs = holders(&p).unwrap();
            for h in &hs {
                eprintln!("{h}");
            }
            let h = hs
                .iter()
                .find(|h| h.kind == LockKind::Posix)
                .expect("lockf listed");
            assert_eq!(h.pid, Some(py.child.id()));
            assert_eq!(
                (h.mode, h.range, h.waiting),
                (Mode::Exclusive, (20, None), false)
            );
            assert!(
                h.to_string().ends_with("exclusive 20..EOF fcntl held"),
                "{h}"
            );
            // Classic and OFD locks exclude each other.
            assert_eq!(ask(&mut b, "try 25 26 S"), "wouldblock");
            drop(py);
        }
    }
    for c in [&mut a, &mut b] {
        c.send("quit");
        c.join();
    }
}

/// The start time of process `pid` (field 22 of /proc/PID/stat).
fn start_time(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 1..];
    rest.split_ascii_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap()
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").unwrap().uid() == 0
}

/// Another user (uid 65534) plants, in the registry of our lock file, a
/// FIFO, a symbolic link to /dev/zero and a forged record that would close
/// a cycle. `holders` still answers, and the LockSet wait is not taken for
/// a deadlock. Control: the same forged record written by this user is
/// believed, and does give `Deadlock`, so the scenario can fail.
#[test]
fn a_hostile_registry_cannot_hang_grow_or_fake_a_deadlock() {
    if support::role().is_some() {
        return worker();
    }
    if !is_root() {
        eprintln!("skipped: acting as another user needs root");
        return;
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::process::CommandExt;
    let test = "a_hostile_registry_cannot_hang_grow_or_fake_a_deadlock";
    let (d, p) = tmp();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let base = d.path().join("registry");
    std::fs::create_dir(&base).unwrap();
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::fs::write(&p, b"").unwrap();
    let m = std::fs::metadata(&p).unwrap();
    let reg = base.join(format!("interlock-wait-{}-{}", m.dev(), m.ino()));
    let env = [(interlock::REGISTRY_DIR_ENV, base.to_str().unwrap())];
    let mut a = Child::spawn_with(test, "worker", &p, &env);
    let mut b = Child::spawn_with(test, "worker", &p, &env);
    a.expect("ready");
    b.expect("ready");
    // Records that name b's process (alive, so not collected as dead).
    let (pid, st) = (b.pid(), start_time(b.pid()));
    let forged = |serial: u32| {
        format!(
            "interlock-wait 1\nfile {} {}\nowner {pid} {st} {serial}\nwant 1 2 X\nheld 0 1 X\nend\n",
            m.dev(),
            m.ino()
        )
    };
    let r = reg.display();
    let plant = format!(
        "mkdir -m 1777 {r} && mkfifo {r}/w-{pid}-{st}-900 && ln -s /dev/zero {r}/w-{pid}-{st}-901 \
         && printf '{}' > {r}/w-{pid}-{st}-902",
        forged(902).replace('\n', "\\n")
    );
    let out = Command::new("sh")
        .args(["-c", &plant])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::metadata(reg.join(format!("w-{pid}-{st}-902")))
            .unwrap()
            .uid(),
        65534
    );

    // Nothing hangs or grows: holders() answers (within support::WAIT).
    assert_eq!(ask(&mut a, "lock 0 1 X"), "ok");
    assert!(ask(&mut b, "holders").starts_with("holders "));
    // b holds 1 and waits for 0 (held by a): with the forged record ("holds
    // 0, wants 1") believed, that would close a cycle.
    assert_eq!(ask(&mut b, "lock 1 2 X"), "ok");
    assert_eq!(ask(&mut b, "lock 0 1 X"), "blocked");
    assert!(ask(&mut a, "holders").starts_with("holders "));
    assert_eq!(ask(&mut a, "unlock_all"), "ok");
    assert_eq!(b.recv(), "ok");

    // Control: the same claim written by this user is believed.
    std::fs::write(reg.join(format!("w-{pid}-{st}-903")), forged(903)).unwrap();
    assert_eq!(ask(&mut b, "unlock 0 1"), "ok");
    assert_eq!(ask(&mut a, "lock 0 1 X"), "ok");
    assert!(ask(&mut b, "lock 0 1 X").starts_with("deadlock "));
    std::fs::remove_file(reg.join(format!("w-{pid}-{st}-903"))).unwrap();
    for c in [&mut a, &mut b] {
        c.send("quit");
        c.join();
    }
}
