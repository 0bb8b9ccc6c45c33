//! LeaseLock: acquisition vocabulary, expiry with an injected clock,
//! renewal and loss, bad input, takeover of dead holders, racing breakers,
//! and many processes under random SIGKILLs (no overlap, tokens strictly
//! increasing).
mod support;

use std::fs::{self, OpenOptions};
use std::io::{ErrorKind as IoKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use interlock::{ErrorKind, LeaseLock, LeaseOptions, Lock, ManualClock, Mode, TryLockError, Wait};
use support::Child;

const TTL: Duration = Duration::from_secs(3600);

fn kind<T>(r: Result<T, TryLockError>) -> ErrorKind {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.kind(),
    }
}

/// Waits (bounded) until `cond` holds.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn handles_and_guards_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<LeaseLock>();
    send_sync::<interlock::LeaseGuard<'static>>();
    send_sync::<LeaseOptions>();
}

#[test]
fn vocabulary_tokens_and_release() {
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("lk");
    let a = LeaseLock::new(&path, TTL).unwrap();
    let b = LeaseLock::new(&path, TTL).unwrap();
    assert_eq!(a.holder().unwrap(), None);

    let g = a.lock().unwrap();
    assert_eq!(g.token(), 1);
    assert!(g.is_held());
    assert!(path.is_dir());
    let h = b.holder().unwrap().expect("held");
    assert_eq!(h.token, 1);
    assert_eq!(h.process.unwrap().pid, std::process::id());
    assert!(h.local);
    let shown = h.to_string();
    assert!(
        shown.starts_with(&format!("pid {} on host ", std::process::id())),
        "{shown}"
    );
    assert!(shown.contains("(token 1, lease expires in "), "{shown}");
    assert_eq!(kind(b.try_lock()), ErrorKind::WouldBlock);
    let start = Instant::now();
    assert_eq!(
        kind(b.try_lock_for(Duration::from_millis(30))),
        ErrorKind::TimedOut
    );
    assert!(start.elapsed() >= Duration::from_millis(30));
    assert_eq!(
        kind(b.try_lock_until(Instant::now() + Duration::from_millis(5))),
        ErrorKind::TimedOut
    );
    // Not reentrant: the same handle is excluded too.
    assert_eq!(kind(a.try_lock()), ErrorKind::WouldBlock);
    g.renew().unwrap();
    g.release().unwrap();
    assert!(!path.exists(), "release removes the lock directory");

    let g2 = b.try_lock().unwrap();
    assert_eq!(g2.token(), 2);
    drop(g2);
    let g3 = b.acquire(Mode::Exclusive, Wait::NonBlocking).unwrap();
    assert_eq!(g3.token(), 3);
    drop(g3);
    assert_eq!(b.last_token().unwrap(), Some(3));
    let e = kind(b.acquire(Mode::Shared, Wait::Forever));
    assert_eq!(e, ErrorKind::Unsupported);
    // Only the newest token claim is kept.
    let claims = fs::read_dir(t.path().join("lk.lease/tokens"))
        .unwrap()
        .count();
    assert_eq!(claims, 1);
}

#[test]
fn threads_exclude_each_other() {
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("lk");
    let inside = Arc::new(AtomicUsize::new(0));
    let tokens = Arc::new(Mutex::new(Vec::new()));
    std::thread::scope(|s| {
        for _ in 0..4 {
            let (path, inside, tokens) = (&path, &inside, &tokens);
            s.spawn(move || {
                let l = LeaseLock::new(path, TTL).unwrap();
                for _ in 0..50 {
                    let g = l.try_lock_for(Duration::from_secs(20)).unwrap();
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "overlap");
                    tokens.lock().unwrap().push(g.token());
                    inside.fetch_sub(1, Ordering::SeqCst);
                    g.release().unwrap();
                }
            });
        }
    });
    let tokens = tokens.lock().unwrap();
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
    assert_eq!(tokens.len(), 200);
}

#[test]
fn injected_clock_expires_leases_without_sleeping() {
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("lk");
    let clock = Arc::new(ManualClock::starting_now());
    let lost = Arc::new(AtomicUsize::new(0));
    let lost2 = Arc::clone(&lost);
    let ttl = Duration::from_secs(60);
    let opts = LeaseOptions::new(ttl)
        .clock(clock.clone())
        .max_clock_skew(Duration::from_secs(2))
        .on_lost(move |e| {
            assert_eq!(e.kind(), ErrorKind::LeaseLost);
            lost2.fetch_add(1, Ordering::SeqCst);
        });
    let a = LeaseLock::with_options(&path, opts.clone()).unwrap();
    let b = LeaseLock::with_options(&path, opts).unwrap();
    let g = a.try_lock().unwrap();

    // Within the lease, and within the skew allowance after it: held.
    clock.advance(Duration::from_secs(59));
    assert_eq!(kind(b.try_lock()), ErrorKind::WouldBlock);
    // An explicit renewal extends it by a full ttl from "now".
    g.renew().unwrap();
    clock.advance(Duration::from_secs(61));
    assert!(!g.is_held(), "expired by its own clock counts as not held");
    assert_eq!(
        kind(b.try_lock()),
        ErrorKind::WouldBlock,
        "inside skew allowance"
    );
    // A late renewal is still fine: nobody took it over meanwhile.
    g.renew().unwrap();
    assert!(g.is_held());
    clock.advance(Duration::from_secs(62) + Duration::from_millis(1));
    // Past expiry + skew: taken over although the holder (us) is alive.
    let g2 = b.try_lock().unwrap();
    assert!(g2.token() > g.token());
    assert!(!g.is_held());
    let e = g.renew().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LeaseLost);
    assert_eq!(e.path(), Some(path.as_path()));
    assert_eq!(g.check().unwrap_err().kind(), ErrorKind::LeaseLost);
    assert_eq!(g.release().unwrap_err().kind(), ErrorKind::LeaseLost);
    assert_eq!(
        lost.load(Ordering::SeqCst),
        1,
        "on-lost called exactly once"
    );
    // The old holder's late moves never touched the new holder's lease.
    assert!(g2.is_held());
    assert_eq!(b.holder().unwrap().unwrap().token, g2.token());
    g2.release().unwrap();
}

#[test]
fn background_renewal_keeps_the_lease_and_reports_loss() {
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("lk");
    let clock = Arc::new(ManualClock::starting_now());
    let lost = Arc::new(AtomicUsize::new(0));
    let lost2 = Arc::clone(&lost);
    let ttl = Duration::from_secs(10);
    let holder_opts = LeaseOptions::new(ttl)
        .clock(clock.clone())
        .max_clock_skew(Duration::ZERO)
        .keep_alive_every(Duration::from_millis(2))
        .on_lost(move |_| {
            lost2.fetch_add(1, Ordering::SeqCst);
        });
    let a = LeaseLock::with_options(&path, holder_opts).unwrap();
    let b = LeaseLock::with_options(
        &path,
        LeaseOptions::new(ttl)
            .clock(clock.clone())
            .max_clock_skew(Duration::ZERO),
    )
    .unwrap();
    let g = a.try_lock().unwrap();
    assert!(g.is_kept_alive());
    // 20 steps of 4 s = 80 s of lock-clock time, eight ttls: the renewer
    // keeps the lease alive after each step.
    for _ in 0..20 {
        clock.advance(Duration::from_secs(4));
        let now = clock_now(&clock);
        eventually("renewal after the clock moved", || {
            g.expires() >= now + Duration::from_secs(9)
        });
        assert_eq!(kind(b.try_lock()), ErrorKind::WouldBlock);
    }
    assert_eq!(lost.load(Ordering::SeqCst), 0);
    // A breaker with a clock far ahead takes it; the renewer finds out.
    let far = LeaseLock::with_options(
        &path,
        LeaseOptions::new(ttl).clock(Arc::new(ManualClock::new(
            SystemTime::now() + Duration::from_secs(365 * 86400),
        ))),
    )
    .unwrap();
    let g2 = far.try_lock().unwrap();
    eventually("the renewer reports the loss", || {
        lost.load(Ordering::SeqCst) == 1
    });
    assert!(!g.is_kept_alive());
    assert_eq!(g.release().unwrap_err().kind(), ErrorKind::LeaseLost);
    assert_eq!(lost.load(Ordering::SeqCst), 1);
    g2.release().unwrap();
}

/// The renewer thread is the handle's, reused by its successive guards
/// (and started again after it ended idle): each guard is renewed while it
/// holds, a released one no longer is, and two handles renew apart.
#[test]
fn successive_guards_of_one_handle_are_each_renewed() {
    let t = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::starting_now());
    let ttl = Duration::from_secs(10);
    let opts = || {
        LeaseOptions::new(ttl)
            .clock(clock.clone())
            .max_clock_skew(Duration::ZERO)
            .keep_alive_every(Duration::from_millis(2))
    };
    let a = LeaseLock::with_options(t.path().join("a"), opts()).unwrap();
    let b = LeaseLock::with_options(t.path().join("b"), opts()).unwrap();
    for round in 0..50 {
        let g = a.try_lock().unwrap();
        let h = b.try_lock().unwrap();
        assert!(g.is_kept_alive() && h.is_kept_alive(), "round {round}");
        clock.advance(Duration::from_secs(4));
        let now = clock_now(&clock);
        eventually("both renewed after the clock moved", || {
            g.expires() >= now + Duration::from_secs(9)
                && h.expires() >= now + Duration::from_secs(9)
        });
        g.release().unwrap();
        h.release().unwrap();
    }
    // Idle past the thread's end: the next guard starts it again.
    std::thread::sleep(Duration::from_millis(2300));
    let g = a.try_lock().unwrap();
    assert!(g.is_kept_alive());
    clock.advance(Duration::from_secs(4));
    let now = clock_now(&clock);
    eventually("renewed by a new thread", || {
        g.expires() >= now + Duration::from_secs(9)
    });
    g.release().unwrap();
}

fn clock_now(c: &ManualClock) -> SystemTime {
    use interlock::Clock;
    c.now()
}

#[test]
fn bad_input_is_a_typed_error_or_a_safe_takeover() {
    let t = tempfile::tempdir().unwrap();
    // Missing parent.
    let e = LeaseLock::new(t.path().join("no/such/lk"), TTL).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(e.path(), Some(t.path().join("no/such/lk").as_path()));
    // A parent named through a symlink is followed (only the lock's own
    // name must not be a link).
    fs::create_dir(t.path().join("real")).unwrap();
    std::os::unix::fs::symlink(t.path().join("real"), t.path().join("via")).unwrap();
    let l = LeaseLock::new(t.path().join("via/lk"), TTL).unwrap();
    drop(l.try_lock().unwrap());
    // No final name; zero ttl.
    assert_eq!(
        LeaseLock::new("/", TTL).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        LeaseLock::new(t.path().join("x"), Duration::ZERO)
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidInput
    );
    // A regular file, a symlink, a foreign directory at the lock path.
    // Refused at once, and nothing is made beside them.
    let file = t.path().join("file");
    fs::write(&file, b"not a lock").unwrap();
    let e = LeaseLock::new(&file, TTL).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(!t.path().join("file.lease").exists());
    let link = t.path().join("link");
    fs::create_dir(t.path().join("target")).unwrap();
    std::os::unix::fs::symlink(t.path().join("target"), &link).unwrap();
    let e = LeaseLock::new(&link, TTL).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(!t.path().join("link.lease").exists());
    // A directory interlock did not make (no NAME.lease/ beside it), empty
    // or not, is refused and left alone.
    let mine = t.path().join("mine");
    fs::create_dir(&mine).unwrap();
    let e = LeaseLock::new(&mine, TTL).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(mine.is_dir() && !t.path().join("mine.lease").exists());
    // With the state directory there, a symlink appearing later is refused
    // when the lock is taken.
    let l = LeaseLock::new(t.path().join("link2"), TTL).unwrap();
    std::os::unix::fs::symlink(t.path().join("target"), t.path().join("link2")).unwrap();
    assert_eq!(kind(l.try_lock()), ErrorKind::Corrupt);
    let foreign = t.path().join("foreign");
    let l = LeaseLock::new(&foreign, TTL).unwrap();
    fs::create_dir(&foreign).unwrap();
    fs::write(foreign.join("pid"), b"4242").unwrap();
    let err = l.try_lock().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(err.to_string().contains("foreign"), "{err}");
    assert!(
        foreign.join("pid").exists(),
        "foreign content is left alone"
    );
    // The side directory replaced by a file.
    fs::write(t.path().join("side.lease"), b"").unwrap();
    let e = LeaseLock::new(t.path().join("side"), TTL).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);

    // An empty directory beside its state directory (a crashed cleanup):
    // dead.
    let empty = t.path().join("empty");
    let l = LeaseLock::new(&empty, TTL).unwrap();
    fs::create_dir(&empty).unwrap();
    drop(l.try_lock().expect("an empty lock directory is taken over"));
    // A leftover tombstone: finished and taken over.
    fs::create_dir(&empty).unwrap();
    fs::write(empty.join("dead.3.7.100"), b"x").unwrap();
    drop(l.try_lock().expect("a dead lock directory is taken over"));

    // Damaged record content: only the expiry in the name can be trusted.
    let dmg = t.path().join("damaged");
    let l = LeaseLock::new(&dmg, TTL).unwrap();
    fs::create_dir(&dmg).unwrap();
    let far = SystemTime::now() + Duration::from_secs(86400);
    let far_ns = far
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    fs::write(dmg.join(format!("lease.1.5.{far_ns}")), b"\xff garbage").unwrap();
    assert_eq!(
        kind(l.try_lock()),
        ErrorKind::WouldBlock,
        "fresh: respected"
    );
    fs::remove_file(dmg.join(format!("lease.1.5.{far_ns}"))).unwrap();
    fs::write(dmg.join("lease.1.5.1000"), b"\xff garbage").unwrap();
    let g = l
        .try_lock()
        .expect("expired with garbage content: taken over");
    assert!(g.token() >= 1);
    drop(g);
    // Two live lease files: refused, not guessed at.
    fs::create_dir(&dmg).unwrap();
    fs::write(dmg.join(format!("lease.1.5.{far_ns}")), b"").unwrap();
    fs::write(dmg.join(format!("lease.2.6.{far_ns}")), b"").unwrap();
    assert_eq!(kind(l.try_lock()), ErrorKind::Corrupt);
}

/// A read-only directory. Tests run as root, for whom permission bits do
/// not bite, so as root the directory is a read-only bind mount (EROFS);
/// otherwise a mode-0555 directory (EACCES).
#[test]
fn read_only_directory_is_permission_denied() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    let ro = t.path().join("ro");
    fs::create_dir(&src).unwrap();
    fs::create_dir(&ro).unwrap();
    // A side directory made while writable, so that acquisition (not only
    // opening) meets the read-only file system too.
    LeaseLock::new(src.join("pre"), TTL).unwrap();
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    // SAFETY-free euid check through /proc.
    let root = fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .is_some_and(|l| l.split_whitespace().nth(2) == Some("0"));
    let _guard;
    let dir = if root {
        let ok = |args: &[&str]| {
            std::process::Command::new("mount")
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        let (s, r) = (src.to_str().unwrap(), ro.to_str().unwrap());
        if !ok(&["--bind", s, r]) {
            eprintln!("SKIP read_only_directory_is_permission_denied: running as root and cannot bind-mount");
            return;
        }
        _guard = Unmount(ro.clone());
        if !ok(&["-o", "remount,bind,ro", r]) {
            eprintln!("SKIP read_only_directory_is_permission_denied: cannot remount read-only");
            return;
        }
        ro.clone()
    } else {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&src, fs::Permissions::from_mode(0o555)).unwrap();
        src.clone()
    };
    let e = LeaseLock::new(dir.join("fresh"), TTL).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    let l = LeaseLock::new(dir.join("pre"), TTL).unwrap();
    assert_eq!(kind(l.try_lock()), ErrorKind::PermissionDenied);
    if !root {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&src, fs::Permissions::from_mode(0o755)).unwrap();
    }
}

fn parse_kv(line: &str, key: &str) -> u64 {
    line.strip_prefix(key)
        .and_then(|r| r.trim().parse().ok())
        .unwrap_or_else(|| panic!("expected {key:?}, got {line:?}"))
}

#[test]
fn dead_holder_is_taken_over_at_once() {
    if let Some(role) = support::role() {
        assert_eq!(role, "holder");
        let l = LeaseLock::new(support::arg(), TTL).unwrap();
        let g = l.lock().unwrap();
        support::say(format!("held {}", g.token()));
        while support::hear().is_some() {}
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("lk");
    let mut c = Child::spawn(
        "dead_holder_is_taken_over_at_once",
        "holder",
        path.to_str().unwrap(),
    );
    let tok = parse_kv(&c.recv(), "held ");
    let l = LeaseLock::new(&path, TTL).unwrap();
    assert_eq!(kind(l.try_lock()), ErrorKind::WouldBlock);
    let blocked = Arc::new(AtomicUsize::new(0));
    let b2 = Arc::clone(&blocked);
    let l = LeaseLock::with_options(
        &path,
        LeaseOptions::new(TTL).on_block(move |b| {
            assert_eq!(b.mode, Mode::Exclusive);
            b2.fetch_add(1, Ordering::SeqCst);
        }),
    )
    .unwrap();
    std::thread::scope(|s| {
        let waiter = s.spawn(|| l.try_lock_for(Duration::from_secs(20)).map(|g| g.token()));
        eventually("the waiter blocks", || blocked.load(Ordering::SeqCst) == 1);
        c.kill();
        let got = waiter
            .join()
            .unwrap()
            .expect("taken over well before the hour-long lease");
        assert!(got > tok);
    });
    assert_eq!(blocked.load(Ordering::SeqCst), 1, "on-block called once");
}

#[test]
fn waiter_in_another_process_wakes_on_release() {
    if let Some(role) = support::role() {
        assert_eq!(role, "holder");
        let l = LeaseLock::new(support::arg(), TTL).unwrap();
        let g = l.lock().unwrap();
        support::say("held");
        assert_eq!(support::hear().as_deref(), Some("release"));
        g.release().unwrap();
        support::say("released");
        while support::hear().is_some() {}
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("lk");
    let c = Arc::new(Mutex::new(Child::spawn(
        "waiter_in_another_process_wakes_on_release",
        "holder",
        path.to_str().unwrap(),
    )));
    c.lock().unwrap().expect("held");
    let c2 = Arc::clone(&c);
    let l = LeaseLock::with_options(
        &path,
        LeaseOptions::new(TTL).on_block(move |_| c2.lock().unwrap().send("release")),
    )
    .unwrap();
    let start = Instant::now();
    let g = l
        .try_lock_for(Duration::from_secs(20))
        .expect("woken by the release");
    assert!(start.elapsed() < Duration::from_secs(10));
    assert_eq!(g.token(), 2);
    c.lock().unwrap().expect("released");
}

/// Two processes break the same stale lease at the same moment, many
/// rounds, while (in half the rounds) its holder renews it. In every round:
/// at most one breaker wins; if the renewal succeeded, none did (a fresh
/// lease is never broken); if it failed, exactly one did; and the winner's
/// token is above the broken lease's.
#[test]
fn racing_breakers_never_both_win_nor_break_a_renewed_lease() {
    let rounds: usize = std::env::var("INTERLOCK_BREAKER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    if let Some(role) = support::role() {
        assert_eq!(role, "breaker");
        let l = LeaseLock::new(support::arg(), TTL).unwrap();
        support::say("ready");
        while let Some(cmd) = support::hear() {
            if cmd != "go" {
                break;
            }
            match l.try_lock() {
                Ok(g) => {
                    support::say(format!("won {}", g.token()));
                    assert_eq!(support::hear().as_deref(), Some("release"));
                    g.release().unwrap();
                    support::say("released");
                }
                Err(TryLockError::WouldBlock) => support::say("lost"),
                Err(e) => panic!("breaker: {e}"),
            }
        }
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("lk");
    let arg = path.to_str().unwrap();
    let name = "racing_breakers_never_both_win_nor_break_a_renewed_lease";
    let mut kids = [
        Child::spawn(name, "breaker", arg),
        Child::spawn(name, "breaker", arg),
    ];
    for k in &mut kids {
        k.expect("ready");
    }
    // The holder's clock is an hour behind: to the breakers its lease is
    // long expired, but it is alive and may renew (then with a real clock).
    let clock = Arc::new(ManualClock::new(
        SystemTime::now() - Duration::from_secs(3600),
    ));
    let holder = LeaseLock::with_options(
        &path,
        LeaseOptions::new(Duration::from_secs(60)).clock(clock.clone()),
    )
    .unwrap();
    let (mut renewed_rounds, mut broken_rounds) = (0, 0);
    for round in 0..rounds {
        clock.set(SystemTime::now() - Duration::from_secs(3600));
        let g = holder.try_lock().expect("free at the start of a round");
        let stale_token = g.token();
        for k in &mut kids {
            k.send("go");
        }
        let renewal = if round % 2 == 0 {
            clock.set(SystemTime::now());
            Some(g.renew())
        } else {
            None
        };
        let mut winners = Vec::new();
        for (i, k) in kids.iter_mut().enumerate() {
            let r = k.recv();
            if let Some(tok) = r.strip_prefix("won ") {
                winners.push((i, tok.parse::<u64>().unwrap()));
            } else {
                assert_eq!(r, "lost");
            }
        }
        assert!(
            winners.len() <= 1,
            "round {round}: two breakers won: {winners:?}"
        );
        match &renewal {
            Some(Ok(())) => {
                assert!(
                    winners.is_empty(),
                    "round {round}: a renewed lease was broken"
                );
                renewed_rounds += 1;
                assert!(g.is_held());
            }
            Some(Err(e)) => {
                assert_eq!(e.kind(), ErrorKind::LeaseLost);
                assert_eq!(winners.len(), 1, "round {round}: broken but nobody won");
            }
            None => assert_eq!(winners.len(), 1, "round {round}: stale but nobody won"),
        }
        if let Some(&(i, tok)) = winners.first() {
            broken_rounds += 1;
            assert!(tok > stale_token);
            assert!(!g.is_held());
            assert_eq!(g.release().unwrap_err().kind(), ErrorKind::LeaseLost);
            kids[i].send("release");
            kids[i].expect("released");
        } else {
            g.release().unwrap();
        }
    }
    eprintln!(
        "breaker race: {rounds} rounds, {renewed_rounds} kept by a renewal, {broken_rounds} broken by exactly one breaker"
    );
    for k in &mut kids {
        k.close_stdin();
        k.join();
    }
}

// ---------------------------------------------------------------------------
// Many processes, random SIGKILLs.

/// Whether `pid` runs (and is not a zombie).
fn pid_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s[s.rfind(')').unwrap() + 1..].split_whitespace().next();
            !matches!(state, Some("Z") | Some("X"))
        }
        Err(_) => false,
    }
}

/// The worker: `iters` acquisitions; inside each, enter an O_EXCL marker
/// (a marker left by a live process means two holders at once), append
/// "TOKEN PID" to the log with O_APPEND, sometimes linger, leave.
fn stress_worker(dir: &Path, iters: u64) {
    let l = LeaseLock::new(dir.join("lk"), TTL).unwrap();
    let marker = dir.join("inside");
    let me = std::process::id();
    let mut log = OpenOptions::new()
        .append(true)
        .open(dir.join("log"))
        .unwrap();
    let mut rng = u64::from(me).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    support::say("ready");
    for _ in 0..iters {
        let g = l.lock().unwrap();
        loop {
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&marker)
            {
                Ok(mut f) => {
                    f.write_all(me.to_string().as_bytes()).unwrap();
                    break;
                }
                Err(e) if e.kind() == IoKind::AlreadyExists => {
                    let other: u32 = fs::read_to_string(&marker)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    if other != 0 && pid_alive(other) {
                        fs::write(
                            dir.join("OVERLAP"),
                            format!("{me} entered while {other} was inside\n"),
                        )
                        .unwrap();
                        panic!("overlap: {other} is inside");
                    }
                    // Left by a holder that was killed inside: clear it,
                    // and count it.
                    let _ = fs::remove_file(&marker);
                    let mut f = OpenOptions::new()
                        .append(true)
                        .create(true)
                        .open(dir.join("cleared"))
                        .unwrap();
                    f.write_all(format!("{other}\n").as_bytes()).unwrap();
                }
                Err(e) => panic!("marker: {e}"),
            }
        }
        log.write_all(format!("{} {me}\n", g.token()).as_bytes())
            .unwrap();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        if rng % 4 == 0 {
            // Linger now and then, so that some SIGKILLs land inside.
            std::thread::sleep(Duration::from_millis(1));
        }
        fs::remove_file(&marker).unwrap();
        g.release().unwrap();
    }
    support::say("done");
    while support::hear().is_some() {}
}

fn log_lines(dir: &Path) -> Vec<(u64, u32)> {
    let text = fs::read_to_string(dir.join("log")).unwrap();
    // A line still being appended is ignored until complete.
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .map(|l| {
            let (t, p) = l.split_once(' ').unwrap();
            (t.parse().unwrap(), p.parse().unwrap())
        })
        .collect()
}

/// The workers are always spawned through the default-run test's name (a
/// re-executed child runs only non-ignored tests).
const STRESS_TEST: &str = "many_processes_with_sigkills_never_overlap_and_tokens_increase";

fn stress(procs: usize, iters: u64, kills: usize) {
    let test = STRESS_TEST;
    if let Some(role) = support::role() {
        assert_eq!(role, "worker");
        let (dir, n) = support::arg()
            .rsplit_once('|')
            .map(|(d, n)| (PathBuf::from(d), n.parse().unwrap()))
            .unwrap();
        stress_worker(&dir, n);
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    fs::write(dir.join("log"), b"").unwrap();
    let spawn = |n: u64| {
        let mut c = Child::spawn(test, "worker", &format!("{}|{n}", dir.display()));
        c.expect("ready");
        c
    };
    // slot -> (child, its quota, pids that worked for this slot)
    let mut slots: Vec<(Child, u64, Vec<u32>, bool)> = (0..procs)
        .map(|_| {
            let c = spawn(iters);
            let pid = c.pid();
            (c, iters, vec![pid], false)
        })
        .collect();
    let observer = LeaseLock::new(dir.join("lk"), TTL).unwrap();
    let start = Instant::now();
    let limit = Duration::from_secs(if iters >= 1000 { 900 } else { 240 });
    let mut rng: u64 = 0x2545_F491_4F6C_DD1D ^ u64::from(std::process::id());
    let (mut killed, mut killed_holding) = (0usize, 0usize);
    let total = procs as u64 * iters;
    loop {
        assert!(start.elapsed() < limit, "stress run exceeded {limit:?}");
        let mut all_done = true;
        for slot in slots.iter_mut() {
            if !slot.3 {
                match slot.0.try_recv_within(Duration::from_millis(1)) {
                    Some(m) if m == "done" => slot.3 = true,
                    Some(m) => panic!("worker said {m:?}"),
                    None => all_done = false,
                }
            }
        }
        if all_done {
            break;
        }
        // Kill the current holder now and then, spreading the kills over
        // the run by progress.
        let done = log_lines(dir).len() as u64;
        let due = (done * kills as u64 / total.max(1)) as usize;
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        if killed < kills && killed <= due && rng % 3 == 0 {
            let Ok(Some(h)) = observer.holder() else {
                continue;
            };
            let Some(p) = h.process else { continue };
            let Some(i) = slots.iter().position(|s| !s.3 && s.0.pid() == p.pid) else {
                continue;
            };
            slots[i].0.kill();
            killed += 1;
            if observer.holder().ok().flatten().and_then(|h| h.process) == Some(p) {
                killed_holding += 1;
            }
            let lines = log_lines(dir);
            let done_by_slot = lines
                .iter()
                .filter(|(_, pid)| slots[i].2.contains(pid))
                .count() as u64;
            let left = slots[i].1.saturating_sub(done_by_slot);
            let c = spawn(left);
            let pid = c.pid();
            slots[i].0 = c;
            slots[i].2.push(pid);
        }
    }
    let elapsed = start.elapsed();
    let inside = fs::read_to_string(dir.join("cleared"))
        .map(|s| s.lines().count())
        .unwrap_or(0);
    assert!(
        !dir.join("OVERLAP").exists(),
        "{}",
        fs::read_to_string(dir.join("OVERLAP")).unwrap()
    );
    let lines = log_lines(dir);
    assert_eq!(lines.len() as u64, total, "every acquisition logged once");
    for w in lines.windows(2) {
        assert!(w[0].0 < w[1].0, "tokens not strictly increasing: {w:?}");
    }
    let max = lines.last().unwrap().0;
    assert!(observer.last_token().unwrap().unwrap() >= max);
    assert!(
        !dir.join("lk").exists(),
        "the lock directory is gone at the end"
    );
    eprintln!(
        "stress: {procs} processes x {iters} acquisitions = {total} in {elapsed:.2?} \
         ({:.0} acquisitions/s); {killed} SIGKILLs ({killed_holding} seen still holding after \
         the kill, {inside} inside the critical section; ttl 1 h, so every takeover was \
         by death detection); max token {max}; no overlap; tokens strictly increasing",
        total as f64 / elapsed.as_secs_f64()
    );
    for s in &mut slots {
        s.0.close_stdin();
        s.0.join();
    }
}

#[test]
fn many_processes_with_sigkills_never_overlap_and_tokens_increase() {
    stress(8, 150, 12);
}

/// The full size: `cargo test -p interlock --release --test lease -- --ignored full_size --nocapture`
#[test]
#[ignore]
fn full_size_8x1000_with_sigkills() {
    stress(8, 1000, 80);
}

/// Batches of fencing tokens across SIGKILLs: one worker process at a time
/// takes the lease over and over with one handle (so it issues from batches
/// of 1, 2, 4, ... tokens without listing), and is SIGKILLed after a random
/// number of acquisitions, often in the middle of a batch; the next worker
/// lists, claims above the dead one's batch and continues. The tokens
/// logged (while holding) strictly increase across every kill, within a
/// worker's run they are consecutive (issued from its batches), and the
/// kills burn only the rest of a batch.
#[test]
fn token_batches_across_sigkills_stay_strictly_increasing() {
    const TEST: &str = "token_batches_across_sigkills_stay_strictly_increasing";
    if let Some(role) = support::role() {
        assert_eq!(role, "worker");
        stress_worker(Path::new(&support::arg()), 1_000_000);
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    fs::write(dir.join("log"), b"").unwrap();
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id());
    let mut runs = Vec::new();
    for _ in 0..12 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let want = 3 + (rng % 60) as usize;
        let before = log_lines(dir).len();
        let mut c = Child::spawn(TEST, "worker", dir.to_str().unwrap());
        c.expect("ready");
        let start = Instant::now();
        while log_lines(dir).len() < before + want {
            assert!(start.elapsed() < Duration::from_secs(60), "worker stalled");
            std::thread::sleep(Duration::from_millis(1));
        }
        let pid = c.pid();
        c.kill(); // and reaped
        let lines = log_lines(dir);
        runs.push(
            lines
                .iter()
                .filter(|(_, p)| *p == pid)
                .map(|(t, _)| *t)
                .collect::<Vec<_>>(),
        );
    }
    let lines = log_lines(dir);
    for w in lines.windows(2) {
        assert!(w[0].0 < w[1].0, "tokens not strictly increasing: {w:?}");
    }
    for run in &runs {
        assert!(run.len() >= 3, "{run:?}");
        for w in run.windows(2) {
            assert_eq!(w[0] + 1, w[1], "a worker's run is consecutive: {run:?}");
        }
    }
    // A kill burns at most the rest of the dead worker's last batch (as
    // big as its run before it, and a batch may be claimed but unissued).
    for (a, b) in runs.iter().zip(&runs[1..]) {
        let gap = b[0] - a[a.len() - 1] - 1;
        assert!(
            gap as usize <= 2 * a.len(),
            "{gap} burned after a run of {}",
            a.len()
        );
    }
    let claims = fs::read_dir(dir.join("lk.lease/tokens")).unwrap().count();
    assert!(claims <= 2, "{claims} claims left");
    eprintln!(
        "batches: {} tokens in {} runs, max token {}, {} claims left",
        lines.len(),
        runs.len(),
        lines.last().unwrap().0,
        claims
    );
}

/// With inotify off (as on a network file system), a waiter still gets the
/// lease after a release, by its back-off poll.
#[test]
fn polling_waiter_without_notify_gets_the_lease() {
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("lk");
    let holder = LeaseLock::new(&path, TTL).unwrap();
    let g = holder.try_lock().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let tx = Mutex::new(tx);
    let waiter = LeaseLock::with_options(
        &path,
        LeaseOptions::new(TTL)
            .notify(false)
            .max_poll(Duration::from_millis(20))
            .on_block(move |_| tx.lock().unwrap().send(()).unwrap()),
    )
    .unwrap();
    std::thread::scope(|s| {
        let w = s.spawn(|| {
            waiter
                .try_lock_for(Duration::from_secs(20))
                .map(|g| g.token())
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the waiter blocks");
        g.release().unwrap();
        assert_eq!(w.join().unwrap().expect("got it by polling"), 2);
    });
}

/// Kleppmann's scenario end to end: a holder is paused (SIGSTOP) past its
/// lease, a waiter takes the lease over when it expires, the holder is
/// continued and learns it lost the lease; a resource that remembers the
/// largest token it has seen refuses the old holder's late write.
#[test]
fn paused_holder_loses_its_lease_and_is_fenced_off() {
    if let Some(role) = support::role() {
        assert_eq!(role, "holder");
        let lost = Arc::new(AtomicUsize::new(0));
        let l2 = Arc::clone(&lost);
        let l = LeaseLock::with_options(
            support::arg(),
            LeaseOptions::new(Duration::from_millis(300))
                .max_clock_skew(Duration::ZERO)
                .on_lost(move |_| {
                    l2.fetch_add(1, Ordering::SeqCst);
                }),
        )
        .unwrap();
        let g = l.lock().unwrap();
        support::say(format!("held {}", g.token()));
        assert_eq!(support::hear().as_deref(), Some("renew"));
        let r = g.renew();
        support::say(match r {
            Err(e) if e.kind() == ErrorKind::LeaseLost => {
                format!("lost {}", lost.load(Ordering::SeqCst))
            }
            other => format!("unexpected {other:?}"),
        });
        while support::hear().is_some() {}
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("lk");
    let mut c = Child::spawn(
        "paused_holder_loses_its_lease_and_is_fenced_off",
        "holder",
        path.to_str().unwrap(),
    );
    let old = parse_kv(&c.recv(), "held ");
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &c.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    };
    signal("-STOP");
    // The resource: accepts a write only with a token at least as large as
    // every token it has seen.
    let mut highest = 0u64;
    let mut write = |token: u64| {
        if token >= highest {
            highest = token;
            true
        } else {
            false
        }
    };
    assert!(write(old), "the holder wrote before it was paused");
    let l = LeaseLock::with_options(&path, LeaseOptions::new(TTL).max_clock_skew(Duration::ZERO))
        .unwrap();
    let g = l
        .try_lock_for(Duration::from_secs(20))
        .expect("taken over once the paused holder's 300 ms lease ran out");
    assert!(g.token() > old);
    assert!(write(g.token()));
    signal("-CONT");
    c.send("renew");
    assert_eq!(
        c.recv(),
        "lost 1",
        "the holder learns it lost the lease, once"
    );
    assert!(!write(old), "the old holder's late write is refused");
    assert!(g.is_held());
}

/// A lock directory removed by hand while held: the holder finds out (and
/// is told once), and the lock is free for the next acquirer.
#[test]
fn lock_directory_removed_by_hand() {
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("lk");
    let lost = Arc::new(AtomicUsize::new(0));
    let l2 = Arc::clone(&lost);
    let l = LeaseLock::with_options(
        &path,
        LeaseOptions::new(TTL).on_lost(move |_| {
            l2.fetch_add(1, Ordering::SeqCst);
        }),
    )
    .unwrap();
    let g = l.try_lock().unwrap();
    fs::remove_dir_all(&path).unwrap();
    assert!(!g.is_held());
    assert_eq!(g.check().unwrap_err().kind(), ErrorKind::LeaseLost);
    assert_eq!(g.renew().unwrap_err().kind(), ErrorKind::LeaseLost);
    let other = LeaseLock::new(&path, TTL).unwrap();
    let g2 = other.try_lock().unwrap();
    assert!(g2.token() > g.token());
    assert_eq!(g.release().unwrap_err().kind(), ErrorKind::LeaseLost);
    assert_eq!(lost.load(Ordering::SeqCst), 1);
    assert!(
        g2.is_held(),
        "the old guard's release did not touch the new lock"
    );
}

fn am_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self").unwrap().uid() == 0
}

/// Runs `script` with sh as the unprivileged user 65534.
fn as_nobody(script: &str) {
    use std::os::unix::process::CommandExt;
    let out = std::process::Command::new("sh")
        .args(["-c", script])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `NAME.lease/` made by another user, who could reset or exhaust the
/// fencing tokens, is refused unless opted in; opted in, a handle's tokens
/// still never go backwards when that user removes the claims.
#[test]
fn a_state_directory_of_another_user_is_refused() {
    if !am_root() {
        eprintln!("skipped: acting as another user needs root");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o1777)).unwrap();
    let d = dir.path().display();
    as_nobody(&format!(
        "mkdir -m 777 {d}/job.lease {d}/job.lease/tokens {d}/job.lease/stage"
    ));
    let path = dir.path().join("job");
    let e = LeaseLock::new(&path, TTL).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(e.to_string().contains("allow_foreign_state"), "{e}");

    let lock =
        LeaseLock::with_options(&path, LeaseOptions::new(TTL).allow_foreign_state(true)).unwrap();
    let t1 = lock.lock().unwrap().token();
    let t2 = lock.lock().unwrap().token();
    assert!(t2 > t1);
    // The owner of the state resets the tokens: this handle goes on upwards.
    as_nobody(&format!("rm -f {d}/job.lease/tokens/*"));
    let t3 = lock.lock().unwrap().token();
    assert!(t3 > t2, "{t2} then {t3}");
    // Control: a fresh handle does not know, and is issued a smaller token,
    // which is what refusing a foreign state directory prevents.
    as_nobody(&format!("rm -f {d}/job.lease/tokens/*"));
    let fresh =
        LeaseLock::with_options(&path, LeaseOptions::new(TTL).allow_foreign_state(true)).unwrap();
    assert!(fresh.lock().unwrap().token() < t3);
}

/// The mechanism that keeps timed waits on time (the timing itself is
/// measured by `lease_lag.rs` `timed_wait_lateness`): giving up at the
/// deadline makes no directory operations. The staging directory of a
/// timed-out attempt is kept for the next attempt (the same one is reused,
/// none pile up) and removed with the handle.
#[test]
fn a_timed_out_wait_keeps_its_staging_directory_for_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job");
    let stage = dir.path().join("job.lease/stage");
    let holder = LeaseLock::new(&path, TTL).unwrap();
    let g = holder.lock().unwrap();
    let waiter = LeaseLock::new(&path, TTL).unwrap();
    // The staging directories (stage/ also keeps released leases' records,
    // files, for the next acquisitions).
    let names = || -> Vec<String> {
        fs::read_dir(&stage)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().unwrap().is_dir())
            .map(|e| e.file_name().into_string().unwrap())
            .collect()
    };
    assert_eq!(
        kind(waiter.try_lock_for(Duration::from_millis(1))),
        ErrorKind::TimedOut
    );
    // The waiter's staged lease, the empty directory its release would
    // move it into, and the holder's empty one.
    let kept = names();
    assert_eq!(kept.len(), 3, "{kept:?}");
    for _ in 0..5 {
        assert_eq!(kind(waiter.try_lock()), ErrorKind::WouldBlock);
        assert_eq!(
            kind(waiter.try_lock_for(Duration::from_millis(1))),
            ErrorKind::TimedOut
        );
        assert_eq!(names(), kept, "the kept staging directory is reused");
    }
    drop(g);
    // Acquiring installs it as the lock directory; the holder's release
    // moved its lease into its empty directory, staged for its next
    // acquisition.
    let t = waiter.try_lock().unwrap();
    let now = names();
    assert_eq!(now.len(), 2, "{now:?}");
    assert!(now.iter().all(|n| kept.contains(n)), "{now:?} {kept:?}");
    drop(t);
    // Busy once more (the waiter's staged lease is reused, and it makes an
    // empty directory for its release), then the handles go, with every
    // directory they kept.
    let g = holder.lock().unwrap();
    assert_eq!(kind(waiter.try_lock()), ErrorKind::WouldBlock);
    assert_eq!(names().len(), 3, "{:?}", names());
    drop(g);
    drop(waiter);
    drop(holder);
    assert!(names().is_empty(), "removed with the handle: {:?}", names());
    let left: Vec<_> = fs::read_dir(&stage).unwrap().collect();
    assert!(
        left.is_empty(),
        "kept records go with their handle: {left:?}"
    );
}
