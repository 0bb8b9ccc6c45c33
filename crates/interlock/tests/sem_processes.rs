//! The shared-memory semaphore across processes: the test binary
//! re-executes itself as the children (see `support`).
//!
//! * holders in other processes count against N, and a holder killed by
//!   SIGKILL gives its permits back to a blocked waiter;
//! * torture: children take 1 or 2 permits in a loop and, inside, sum the
//!   permits marked by *live* children in a shared mapping (never more than
//!   N); the parent SIGKILLs random children (preferring holders) and
//!   respawns them, requires progress within a bound after every kill, and
//!   at the end, with every child dead, gets all N permits back (none lost);
//! * the control: the same check with children that use a semaphore of
//!   N + 1 permits must report violations.

mod support;

use interlock::shm::testing::SharedWords;
use interlock::{FileSemaphore, Semaphore, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use support::Child;

const N: u32 = 3;
const MAX_CHILDREN: usize = 8;
const W_VIOLATIONS: usize = 0;
const W_OPS: usize = 1;
const W_MARKS: usize = 2;
const RECOVERY_BOUND: Duration = Duration::from_secs(2);

/// Whether process `pid` is gone, a zombie, or so far into its exit that
/// every one of its threads is exiting (`PF_EXITING`, 0x4, in the flags
/// field of /proc/PID/task/TID/stat): such a process runs no more user
/// code, and a waiter may take its permits back from that moment (the
/// kernel's robust-futex notice comes at that point, before the process is
/// a zombie; see docs/design-sem.md).
fn is_dead(pid: u32) -> bool {
    let gone_or_exiting = |path: String| match std::fs::read_to_string(path) {
        Err(_) => true,
        Ok(s) => {
            let rest = &s[s.rfind(')').unwrap() + 1..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            matches!(f.first(), Some(&("Z" | "X")))
                || f.get(6).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) & 0x4 != 0
        }
    };
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.filter_map(|e| e.ok()).all(|e| {
        gone_or_exiting(format!(
            "/proc/{pid}/task/{}/stat",
            e.file_name().to_string_lossy()
        ))
    })
}

struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        Rng(t ^ (u64::from(std::process::id()) << 32) | 1)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn spin_for(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

/// A child that takes `k` permits (the argument is `path|k`), says `held`,
/// and holds them until killed or told `release`.
fn holder_role() {
    let arg = support::arg();
    let (path, k) = arg.split_once('|').unwrap();
    let sem = Semaphore::open(path, N).unwrap();
    let g = sem.acquire_many(k.parse().unwrap()).unwrap();
    support::say("held");
    if support::hear().as_deref() == Some("release") {
        g.release().unwrap();
        support::say("released");
    }
}

#[test]
fn permits_held_in_other_processes_count_and_a_killed_holder_returns_them() {
    if support::role().is_some() {
        holder_role();
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("sem");
    let sem = Semaphore::open(&path, N).unwrap();
    let name = "permits_held_in_other_processes_count_and_a_killed_holder_returns_them";
    let mut a = Child::spawn(name, "holder", &format!("{}|2", path.display()));
    a.expect("held");
    let mut b = Child::spawn(name, "holder", &format!("{}|1", path.display()));
    b.expect("held");
    assert_eq!(sem.available(), 0);
    assert!(matches!(sem.try_acquire(), Err(TryLockError::WouldBlock)));
    let pids: Vec<u32> = sem.holders().iter().map(|p| p.pid).collect();
    assert_eq!(pids.iter().filter(|&&p| p == a.pid()).count(), 2);
    assert_eq!(pids.iter().filter(|&&p| p == b.pid()).count(), 1);
    // A clean release in another process wakes us.
    b.send("release");
    b.expect("released");
    drop(sem.try_acquire_for(support::WAIT).unwrap());
    // A blocked waiter for 3 gets them once the killed holder's 2 return.
    let waiter = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let t = Instant::now();
            let g = sem.try_acquire_many(3, interlock::Wait::timeout(support::WAIT));
            (g.map(|g| g.count()), t.elapsed())
        });
        std::thread::sleep(Duration::from_millis(30));
        a.kill();
        h.join().unwrap()
    });
    assert_eq!(waiter.0.unwrap(), 3);
    assert!(waiter.1 < support::WAIT, "{:?}", waiter.1);
    assert_eq!(sem.available(), N);
}

/// A child that takes `k` permits of a file semaphore (`path|k`), says
/// `held`, and holds them until killed.
fn file_holder_role() {
    let arg = support::arg();
    let (path, k) = arg.split_once('|').unwrap();
    let sem = FileSemaphore::open(path, N).unwrap();
    let _g = sem.acquire_many(k.parse().unwrap()).unwrap();
    support::say("held");
    let _ = support::hear();
}

#[test]
fn file_semaphore_permits_count_across_processes_and_return_with_a_killed_holder() {
    if support::role().is_some() {
        file_holder_role();
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("sem");
    let sem = FileSemaphore::open(&path, N).unwrap();
    let name = "file_semaphore_permits_count_across_processes_and_return_with_a_killed_holder";
    let mut a = Child::spawn(name, "holder", &format!("{}|2", path.display()));
    a.expect("held");
    let g = sem.try_acquire().unwrap();
    assert!(matches!(sem.try_acquire(), Err(TryLockError::WouldBlock)));
    assert_eq!(sem.available().unwrap(), 0);
    drop(g);
    // A waiter for all 3 gets them once the killed holder's 2 return.
    let got = std::thread::scope(|s| {
        let h = s.spawn(|| {
            sem.try_acquire_many(3, interlock::Wait::timeout(support::WAIT))
                .map(|g| g.count())
        });
        std::thread::sleep(Duration::from_millis(30));
        a.kill();
        h.join().unwrap()
    });
    assert_eq!(got.unwrap(), 3);
}

/// The torture child: argument `sem path|marks path|slot|permits`.
fn torture_child() {
    let arg = support::arg();
    let p: Vec<&str> = arg.split('|').collect();
    let (sem_path, marks_path) = (p[0], p[1]);
    let slot: usize = p[2].parse().unwrap();
    let permits: u32 = p[3].parse().unwrap();
    let marks = SharedWords::open(Path::new(marks_path), W_MARKS + MAX_CHILDREN).unwrap();
    let words = marks.words();
    let sem = Semaphore::open(sem_path, permits).unwrap();
    let me = u64::from(std::process::id()) << 8;
    let mut rng = Rng::new();
    let mark = &words[W_MARKS + slot];
    support::say("ready");
    loop {
        let k = if rng.below(4) == 0 { 2 } else { 1 };
        let g = sem.acquire_many(k).unwrap();
        mark.store(me | u64::from(k), Ordering::SeqCst);
        check(words);
        spin_for(Duration::from_micros(rng.below(200)));
        check(words);
        mark.store(0, Ordering::SeqCst);
        drop(g);
        words[W_OPS].fetch_add(1, Ordering::SeqCst);
        if rng.below(3) == 0 {
            spin_for(Duration::from_micros(rng.below(100)));
        }
    }
}

/// Inside: the permits marked by live children must not exceed N. A mark
/// of a dead child is a holder that died inside (its permits were taken
/// back); a mark that changed while we looked is a child that just left.
fn check(words: &[std::sync::atomic::AtomicU64]) {
    let marks = &words[W_MARKS..W_MARKS + MAX_CHILDREN];
    let snap: Vec<u64> = marks.iter().map(|m| m.load(Ordering::SeqCst)).collect();
    let live: u64 = snap
        .iter()
        .filter(|&&v| v != 0 && !is_dead((v >> 8) as u32))
        .map(|v| v & 0xff)
        .sum();
    if live > u64::from(N) {
        let still = marks
            .iter()
            .zip(&snap)
            .all(|(m, &v)| v == 0 || m.load(Ordering::SeqCst) == v);
        if still {
            words[W_VIOLATIONS].fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn paths(d: &tempfile::TempDir) -> (PathBuf, PathBuf) {
    (d.path().join("sem"), d.path().join("marks"))
}

/// Runs `children` torture children for `secs` with `permits` permits
/// (N for the real test, N + 1 for the control), killing if `kill`.
/// Returns (violations, kills, kills while holding).
fn torture(test: &str, children: usize, secs: f64, permits: u32, kill: bool) -> (u64, u32, u32) {
    let d = tempfile::tempdir().unwrap();
    let (sem_path, marks_path) = paths(&d);
    let marks = SharedWords::open(&marks_path, W_MARKS + MAX_CHILDREN).unwrap();
    let words = marks.words();
    let spawn = |i: usize| {
        let arg = format!(
            "{}|{}|{i}|{permits}",
            sem_path.display(),
            marks_path.display()
        );
        let mut c = Child::spawn(test, "torture", &arg);
        c.expect("ready");
        c
    };
    let mut kids: Vec<Child> = (0..children).map(spawn).collect();
    let mut rng = Rng::new();
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let (mut kills, mut kills_holding, mut worst) = (0u32, 0u32, Duration::ZERO);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20 + rng.below(60)));
        if !kill {
            continue;
        }
        let holding: Vec<usize> = (0..children)
            .filter(|&i| words[W_MARKS + i].load(Ordering::SeqCst) != 0)
            .collect();
        let victim = if !holding.is_empty() && rng.below(4) != 0 {
            holding[rng.below(holding.len() as u64) as usize]
        } else {
            rng.below(children as u64) as usize
        };
        let was_holding = words[W_MARKS + victim].load(Ordering::SeqCst) != 0;
        kids[victim].kill();
        kills += 1;
        kills_holding += u32::from(was_holding);
        let killed = Instant::now();
        let ops = words[W_OPS].load(Ordering::SeqCst);
        // Progress resumes: a few acquisitions complete after the kill.
        while words[W_OPS].load(Ordering::SeqCst) < ops + 3 {
            let waited = killed.elapsed();
            assert!(
                waited < RECOVERY_BOUND,
                "no progress {waited:?} after killing child {victim} (holding: {was_holding})"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        worst = worst.max(killed.elapsed());
        words[W_MARKS + victim].store(0, Ordering::SeqCst);
        kids[victim] = spawn(victim);
    }
    for k in &mut kids {
        k.kill();
    }
    // Nothing lost: with every child dead, all permits come back.
    let sem = Semaphore::open(&sem_path, permits).unwrap();
    let all = sem
        .try_acquire_many(permits, interlock::Wait::timeout(RECOVERY_BOUND))
        .expect("every permit returns once its holders are dead");
    assert_eq!(all.count(), permits);
    let violations = words[W_VIOLATIONS].load(Ordering::SeqCst);
    eprintln!(
        "semaphore torture: N={permits}, {secs} s, {children} children, {kills} kills \
         ({kills_holding} while holding), {} acquisitions, worst progress gap after a kill \
         {worst:?}, {violations} violations",
        words[W_OPS].load(Ordering::SeqCst)
    );
    (violations, kills, kills_holding)
}

#[test]
fn torture_semaphore_with_random_sigkills() {
    if support::role().is_some() {
        torture_child();
        return;
    }
    let secs = std::env::var("INTERLOCK_TORTURE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let (violations, kills, holding) =
        torture("torture_semaphore_with_random_sigkills", 5, secs, N, true);
    assert_eq!(violations, 0);
    assert!(kills > 0 && holding > 0, "the run never killed a holder");
}

#[test]
fn control_the_torture_check_catches_a_semaphore_with_one_permit_too_many() {
    if support::role().is_some() {
        torture_child();
        return;
    }
    // Children that use N + 1 permits while the check allows N: it must see
    // the excess, or the torture above proves nothing.
    let (violations, _, _) = torture(
        "control_the_torture_check_catches_a_semaphore_with_one_permit_too_many",
        6,
        1.0,
        N + 1,
        false,
    );
    assert!(violations > 0, "the check never saw N + 1 inside");
}
