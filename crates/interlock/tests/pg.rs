//! PgLock against a real PostgreSQL server (a throwaway cluster, shared by
//! this binary's tests): exclusion and shared locks across processes,
//! time-outs, deadlock, owners never sharing a session, keys shared with
//! other applications, a SIGKILLed holder, holders().
mod support;

use std::fs;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use interlock::{ErrorKind, Mode, PgKey, PgLock, PgMutex, PgOptions, PgSession, TryLockError};
use support::Child;

fn cluster() -> Option<&'static support::pg::Cluster> {
    support::pg::shared()
}

fn opts(url: &str) -> PgOptions {
    PgOptions::new().url(url)
}

/// A lock name of this test run (names are per database and the cluster is
/// shared by every test of the binary).
fn unique(tag: &str) -> String {
    format!("{tag}-{}", std::process::id())
}

const ITERS: usize = 25;
const CHILDREN: usize = 3;

/// Child: `ITERS` times, under the write lock (or none, for the control),
/// read the counter file, sleep a little, write counter + 1; and check that
/// each token is above the one the previous holder wrote.
fn counter_child(locked: bool) {
    let arg = support::arg();
    let mut parts = arg.splitn(3, '|');
    let (url, name, path) = (
        parts.next().unwrap().to_string(),
        parts.next().unwrap().to_string(),
        parts.next().unwrap().to_string(),
    );
    let lock = PgLock::with_options(&name, opts(&url)).unwrap();
    support::say("ready");
    assert_eq!(support::hear().as_deref(), Some("go"));
    let mut bad_tokens = 0;
    for _ in 0..ITERS {
        let g = if locked {
            Some(lock.write().unwrap())
        } else {
            None
        };
        let text = fs::read_to_string(&path).unwrap();
        let (n, last): (u64, u64) = {
            // Without the lock (the control) a read may see a half-written file.
            let mut it = text
                .split_whitespace()
                .map(|s| s.parse::<u64>().unwrap_or(0));
            (it.next().unwrap_or(0), it.next().unwrap_or(0))
        };
        std::thread::sleep(Duration::from_millis(2));
        let token = g.as_ref().map_or(last + 1, |g| g.token());
        if token <= last {
            bad_tokens += 1;
        }
        fs::write(&path, format!("{} {}", n + 1, token)).unwrap();
        if let Some(g) = g {
            g.unlock().unwrap();
        }
    }
    support::say(format!("done {bad_tokens}"));
}

fn run_counter(test: &str, role: &str, name: &str) -> (u64, usize) {
    let pg = cluster().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("counter");
    fs::write(&path, "0 0").unwrap();
    let arg = format!("{}|{name}|{}", pg.url(), path.display());
    let mut kids: Vec<Child> = (0..CHILDREN)
        .map(|_| Child::spawn(test, role, &arg))
        .collect();
    for k in &mut kids {
        k.expect("ready");
    }
    for k in &mut kids {
        k.send("go");
    }
    let mut bad = 0;
    for k in &mut kids {
        let line = k.recv_within(Duration::from_secs(60));
        bad += line
            .strip_prefix("done ")
            .unwrap()
            .parse::<usize>()
            .unwrap();
        k.join();
    }
    let text = fs::read_to_string(&path).unwrap();
    (
        text.split_whitespace().next().unwrap().parse().unwrap(),
        bad,
    )
}

#[test]
fn write_lock_excludes_processes_and_tokens_increase() {
    if let Some(role) = support::role() {
        counter_child(role == "locked");
        return;
    }
    if cluster().is_none() {
        return;
    }
    let name = unique("counter");
    let (n, bad) = run_counter(
        "write_lock_excludes_processes_and_tokens_increase",
        "locked",
        &name,
    );
    assert_eq!(n, (CHILDREN * ITERS) as u64, "lost updates under the lock");
    assert_eq!(bad, 0, "a token did not increase");
}

#[test]
fn control_without_the_lock_loses_updates() {
    // Shows that the exclusion check above catches a broken lock.
    if let Some(role) = support::role() {
        counter_child(role == "locked");
        return;
    }
    if cluster().is_none() {
        return;
    }
    let name = unique("control");
    let (n, _) = run_counter("control_without_the_lock_loses_updates", "unlocked", &name);
    assert!(
        n < (CHILDREN * ITERS) as u64,
        "no update lost without the lock: the check cannot see a broken lock"
    );
}

#[test]
fn shared_locks_coexist_across_processes_and_exclude_writers() {
    if let Some(role) = support::role() {
        let (url, name) = support::arg()
            .split_once('|')
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .unwrap();
        let lock = PgLock::with_options(&name, opts(&url)).unwrap();
        let g = match role.as_str() {
            "reader" => lock.read().unwrap(),
            _ => lock.write().unwrap(),
        };
        support::say(format!("held {}", g.token()));
        let _ = support::hear();
        g.unlock().unwrap();
        support::say("released");
        return;
    }
    let Some(pg) = cluster() else { return };
    let name = unique("shared");
    let arg = format!("{}|{name}", pg.url());
    let test = "shared_locks_coexist_across_processes_and_exclude_writers";
    let mut r = Child::spawn(test, "reader", &arg);
    assert!(r.recv().starts_with("held "));
    let lock = PgLock::with_options(&name, opts(&pg.url())).unwrap();
    {
        let g = lock.try_read().expect("a second reader in another process");
        assert_eq!(g.mode(), Mode::Shared);
        assert!(matches!(lock.try_write(), Err(TryLockError::WouldBlock)));
    }
    r.send("release");
    r.expect("released");
    r.join();
    let w = lock.try_write().expect("free once the reader left");
    let mut w2 = Child::spawn(test, "writer", &arg);
    // The child writer cannot get in while we hold it.
    assert!(w2.try_recv_within(Duration::from_millis(300)).is_none());
    w.unlock().unwrap();
    assert!(w2.recv().starts_with("held "));
    assert!(matches!(lock.try_read(), Err(TryLockError::WouldBlock)));
    w2.send("release");
    w2.expect("released");
    w2.join();
}

#[test]
fn threads_of_one_lock_never_share_a_session() {
    let Some(pg) = cluster() else { return };
    let lock = Arc::new(PgLock::with_options(&unique("threads"), opts(&pg.url())).unwrap());
    let g = lock.write().unwrap();
    let l2 = Arc::clone(&lock);
    let other = std::thread::spawn(move || match l2.try_write() {
        Err(TryLockError::WouldBlock) => "blocked",
        Ok(_) => "both hold it",
        Err(_) => "error",
    })
    .join()
    .unwrap();
    assert_eq!(other, "blocked");
    // Same thread, second acquisition: a second session, so it waits too.
    assert!(matches!(lock.try_read(), Err(TryLockError::WouldBlock)));
    drop(g);
    // Two readers of one lock in two threads: two sessions, both in.
    let r1 = lock.read().unwrap();
    let l3 = Arc::clone(&lock);
    let ok = std::thread::spawn(move || l3.try_read().map(|g| g.token()).is_ok())
        .join()
        .unwrap();
    assert!(ok);
    assert_ne!(r1.backend_pid(), 0);
}

#[test]
fn bounded_waits_time_out_and_report_blocking() {
    let Some(pg) = cluster() else { return };
    let name = unique("timeout");
    let holder = PgLock::with_options(&name, opts(&pg.url())).unwrap();
    let blocked = Arc::new(AtomicUsize::new(0));
    let b = Arc::clone(&blocked);
    let waiter = PgLock::with_options(
        &name,
        opts(&pg.url()).on_block(move |_| {
            b.fetch_add(1, Ordering::SeqCst);
        }),
    )
    .unwrap();
    let _g = holder.write().unwrap();
    assert!(matches!(waiter.try_write(), Err(TryLockError::WouldBlock)));
    assert_eq!(blocked.load(Ordering::SeqCst), 0, "try_* never blocks");
    let t = Instant::now();
    match waiter.try_read_for(Duration::from_millis(200)) {
        Err(TryLockError::TimedOut) => {}
        other => panic!("expected TimedOut, got {other:?}"),
    }
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(200),
        "gave up early: {took:?}"
    );
    assert!(took < Duration::from_secs(5), "gave up late: {took:?}");
    assert_eq!(blocked.load(Ordering::SeqCst), 1);
    match waiter.try_write_until(Instant::now()) {
        Err(TryLockError::TimedOut) => {}
        other => panic!("expected TimedOut, got {other:?}"),
    }
    // The session that timed out is healthy: it gets the lock once free.
    drop(_g);
    let g = waiter.try_write_for(Duration::from_secs(5)).unwrap();
    assert!(g.token() > 0);
}

/// A timed wait granted while a resource's transaction keeps the token row
/// share-locked (`interlock_fence_check` with the previous holder's token)
/// waits for that transaction, past its own deadline, and is a grant, not a
/// time-out: the wait's `lock_timeout` ends with the wait. (If it still
/// applied to the token's update, the statement would fail with 55P03
/// after the grant, and the caller would be told TimedOut while its
/// session held the lock.)
#[test]
fn a_wait_granted_behind_a_fence_check_is_not_a_timeout() {
    let Some(pg) = cluster() else { return };
    let name = unique("fenced");
    let PgKey::Int(key) = PgKey::name(&name) else {
        unreachable!()
    };
    let holder = PgLock::with_options(&name, opts(&pg.url())).unwrap();
    let waiter = PgLock::with_options(&name, opts(&pg.url())).unwrap();
    let g = holder.write().unwrap();
    let t1 = g.token();
    let mut c = postgres::Client::connect(&pg.url(), postgres::NoTls).unwrap();
    let mut tx = c.transaction().unwrap();
    tx.execute(
        "SELECT interlock_fence_check($1, $2)",
        &[&key, &(t1 as i64)],
    )
    .unwrap();
    let (budget, open) = (Duration::from_secs(2), Duration::from_secs(3));
    let start = Instant::now();
    std::thread::scope(|s| {
        let w = s.spawn(|| {
            let r = waiter.try_write_for(budget).map(|g| g.token());
            (r, Instant::now())
        });
        assert!(
            holders_until(&holder, |h| h.iter().any(|h| !h.granted)),
            "the waiter never queued"
        );
        assert!(start.elapsed() < budget, "queued too late to test");
        // The waiter is granted now; its token update waits for `tx`, which
        // stays open past the waiter's deadline.
        drop(g);
        std::thread::sleep(open.saturating_sub(start.elapsed()));
        let committing = Instant::now();
        tx.commit().unwrap();
        let (r, returned) = w.join().unwrap();
        let t2 = r.expect("granted behind the checked transaction, not timed out");
        assert!(t2 > t1);
        assert!(
            returned >= committing,
            "the grant did not wait for the checked transaction"
        );
    });
}

#[test]
fn deadlock_between_two_sessions_is_reported() {
    let Some(pg) = cluster() else { return };
    let (a, b) = (unique("dl-a"), unique("dl-b"));
    let s1 = PgSession::connect(opts(&pg.url())).unwrap();
    let s2 = PgSession::connect(opts(&pg.url())).unwrap();
    let (a1, b1) = (s1.lock(&a).unwrap(), s1.lock(&b).unwrap());
    let (a2, b2) = (s2.lock(&a).unwrap(), s2.lock(&b).unwrap());
    // One owner asking again for what it holds is refused, not granted twice.
    {
        let _g = a1.write().unwrap();
        assert_eq!(a1.try_read().unwrap_err().kind(), ErrorKind::Deadlock);
    }
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        let tx1 = tx.clone();
        let (a1, b1, a2, b2) = (&a1, &b1, &a2, &b2);
        let (go1, wait1) = mpsc::channel::<()>();
        let (go2, wait2) = mpsc::channel::<()>();
        s.spawn(move || {
            let _ga = a1.write().unwrap();
            go2.send(()).unwrap();
            wait1.recv().unwrap();
            let r = b1.try_write_for(Duration::from_secs(20));
            tx1.send(r.map(|_| ()).map_err(|e| e.kind())).unwrap();
        });
        s.spawn(move || {
            let _gb = b2.write().unwrap();
            go1.send(()).unwrap();
            wait2.recv().unwrap();
            let r = a2.try_write_for(Duration::from_secs(20));
            tx.send(r.map(|_| ()).map_err(|e| e.kind())).unwrap();
        });
    });
    let r: Vec<_> = rx.iter().take(2).collect();
    assert!(
        r.contains(&Err(ErrorKind::Deadlock)),
        "one side must be told Deadlock: {r:?}"
    );
    assert!(r.contains(&Ok(())), "the other side gets the lock: {r:?}");
}

#[test]
fn explicit_keys_share_locks_with_other_applications() {
    let Some(pg) = cluster() else { return };
    let k: i64 = 0x1234_5678_9abc_def0u64 as i64 ^ i64::from(std::process::id());
    let lock = PgMutex::with_key(k, opts(&pg.url())).unwrap();
    let g = lock.lock().unwrap();
    // Another application's pg_try_advisory_lock on the same bigint key fails,
    // and the pair space is separate.
    assert_eq!(pg.psql(&format!("SELECT pg_try_advisory_lock({k})")), "f");
    let (hi, lo) = ((k >> 32) as i32, k as i32);
    assert_eq!(
        pg.psql(&format!("SELECT pg_try_advisory_lock({hi}, {lo})")),
        "t"
    );
    // pg_locks shows it with classid = high half, objid = low half, objsubid 1.
    let shown = pg.psql(&format!(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
         AND classid = {} AND objid = {} AND objsubid = 1 AND pid = {}",
        (k >> 32) as u32,
        k as u32,
        g.backend_pid()
    ));
    assert_eq!(shown, "1");
    drop(g);
    assert_eq!(pg.psql(&format!("SELECT pg_try_advisory_lock({k})")), "t");
    let pair = PgLock::with_key((7, -3), opts(&pg.url())).unwrap();
    let pg_ = pair.write().unwrap();
    assert_eq!(pg.psql("SELECT pg_try_advisory_lock(7, -3)"), "f");
    assert_eq!(pair.key(), PgKey::Pair(7, -3));
    let t = pg_.token();
    pg_.unlock().unwrap();
    // Shared holders of a pair key: each its own, newer token; other
    // applications' shared locks on the pair get in, exclusive ones not.
    let pair2 = PgLock::with_key((7, -3), opts(&pg.url())).unwrap();
    let r1 = pair.read().unwrap();
    let r2 = pair2.try_read().unwrap();
    assert!(r2.token() > r1.token() && r1.token() > t);
    assert_eq!(pg.psql("SELECT pg_try_advisory_lock(7, -3)"), "f");
    assert_eq!(pg.psql("SELECT pg_try_advisory_lock_shared(7, -3)"), "t");
    r1.unlock().unwrap();
    assert_eq!(pg.psql("SELECT pg_try_advisory_lock(7, -3)"), "f");
    r2.unlock().unwrap();
    assert_eq!(pg.psql("SELECT pg_try_advisory_lock(7, -3)"), "t");
}

#[test]
fn holders_show_who_holds_and_who_waits() {
    let Some(pg) = cluster() else { return };
    let name = unique("holders");
    let a = PgLock::with_options(&name, opts(&pg.url())).unwrap();
    let b = Arc::new(PgLock::with_options(&name, opts(&pg.url())).unwrap());
    let g = a.read().unwrap();
    let b2 = Arc::clone(&b);
    let waiter = std::thread::spawn(move || b2.write().map(|g| g.token()));
    // Wait (bounded) until the waiter is queued.
    let end = Instant::now() + Duration::from_secs(10);
    let hs = loop {
        let hs = a.holders().unwrap();
        if hs.len() == 2 || Instant::now() > end {
            break hs;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(hs.len(), 2, "{hs:?}");
    assert!(hs[0].granted && hs[0].mode == Mode::Shared && hs[0].pid == g.backend_pid());
    assert_eq!(hs[0].application_name.as_deref(), Some("interlock"));
    assert_eq!(hs[0].client_addr.as_deref(), Some("127.0.0.1"));
    assert!(hs[0].since.is_some());
    assert!(!hs[1].granted && hs[1].mode == Mode::Exclusive && hs[1].since.is_some());
    let t = g.token();
    drop(g);
    let w = waiter.join().unwrap().unwrap();
    assert!(w > t);
    // The waiter's session wrote the newest batch, which starts at its token.
    assert_eq!(a.last_token().unwrap(), Some(w));
}

#[test]
fn sigkilled_holder_releases_at_once() {
    if support::role().is_some() {
        let (url, name) = support::arg()
            .split_once('|')
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .unwrap();
        let lock = PgLock::with_options(&name, opts(&url)).unwrap();
        let g = lock.write().unwrap();
        support::say(format!("held {}", g.token()));
        let _ = support::hear();
        return;
    }
    let Some(pg) = cluster() else { return };
    let name = unique("killed");
    let mut c = Child::spawn(
        "sigkilled_holder_releases_at_once",
        "holder",
        &format!("{}|{name}", pg.url()),
    );
    let t0: u64 = c.recv().strip_prefix("held ").unwrap().parse().unwrap();
    let lock = Arc::new(PgLock::with_options(&name, opts(&pg.url())).unwrap());
    let l = Arc::clone(&lock);
    let (tx, rx) = mpsc::channel();
    let w = std::thread::spawn(move || {
        let g = l.write().unwrap();
        tx.send(Instant::now()).unwrap();
        g.token()
    });
    // Wait (bounded) until the waiter is queued behind the child.
    let end = Instant::now() + Duration::from_secs(10);
    while lock.holders().unwrap().iter().all(|h| h.granted) {
        assert!(Instant::now() < end, "waiter never queued");
        std::thread::sleep(Duration::from_millis(2));
    }
    let killed = Instant::now();
    c.kill();
    let got = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("waiter got in");
    let lat = got.saturating_duration_since(killed);
    eprintln!("[pg] SIGKILLed holder -> waiter in after {lat:?} (kill + reap included)");
    // Released by the closed socket, not by any lease or keepalive (those
    // are seconds): a generous bound for a loaded machine.
    assert!(lat < Duration::from_secs(2), "{lat:?}");
    assert!(w.join().unwrap() > t0);
}

#[test]
fn bad_settings_are_typed_errors() {
    let Some(pg) = cluster() else { return };
    let e = PgLock::with_options("x", opts("postgres://u@h:notaport/db")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    let e = PgLock::with_options("", opts(&pg.url())).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    let e = PgLock::with_options("x", opts(&pg.url()).lease(Duration::from_millis(1))).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    let e = PgLock::with_options("x", opts(&format!("{}x_no_such_db", pg.url()))).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    // Over the unix socket, in key=value form.
    let l = PgLock::with_options(&unique("socket"), opts(&pg.socket_conninfo())).unwrap();
    let g = l.try_write().unwrap();
    assert!(g.is_held());
}

/// Polls once with a waker that does nothing.
fn poll_once<F: std::future::Future + Unpin>(f: &mut F) -> std::task::Poll<F::Output> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    std::pin::Pin::new(f).poll(&mut cx)
}

/// Waits (bounded) until `lock.holders()` satisfies `ok`.
fn holders_until(lock: &PgLock, ok: impl Fn(&[interlock::PgHolder]) -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if ok(&lock.holders().unwrap()) {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// An async wait is cancelled on the server (a cancel request) when its
/// future is dropped, and a future dropped at random moments around a
/// release leaves nothing held: another session takes the lock at once.
#[test]
fn async_waits_are_cancelled_and_leave_nothing_held() {
    let Some(pg) = cluster() else { return };
    let name = unique("async");
    let holder = PgLock::with_options(&name, opts(&pg.url())).unwrap();
    let other = PgLock::with_options(&name, opts(&pg.url())).unwrap();
    let lock = Arc::new(PgLock::with_options(&name, opts(&pg.url())).unwrap());
    // Cancelled while queued: the server's wait ends.
    let g = holder.write().unwrap();
    let mut f = lock.write_async();
    assert!(poll_once(&mut f).is_pending());
    assert!(
        holders_until(&holder, |h| h.len() == 2),
        "the waiter never queued"
    );
    drop(f);
    assert!(
        holders_until(&holder, |h| h.len() == 1),
        "the cancelled wait stayed queued on the server"
    );
    drop(g);
    // Dropped at seeded random moments, before or after the release.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for round in 0..12 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let g = holder.write().unwrap();
        let mut f = if x % 2 == 0 {
            Box::pin(lock.write_async())
                as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>
        } else {
            Box::pin(lock.read_async())
        };
        assert!(poll_once(&mut f).is_pending());
        let pause = Duration::from_micros(x % 3000);
        if x % 3 == 0 {
            std::thread::sleep(pause);
            drop(f);
            drop(g);
        } else {
            drop(g);
            std::thread::sleep(pause);
            if x % 3 == 1 {
                let _ = poll_once(&mut f);
            }
            drop(f);
        }
        let got = other.try_write_for(Duration::from_secs(10));
        assert!(got.is_ok(), "round {round}: {got:?}");
    }
    assert!(holders_until(&holder, |h| h.is_empty()), "something stayed");
    // A timed async wait times out as the blocking one does.
    let g = holder.write().unwrap();
    let e = block_on(lock.write_async_for(Duration::from_millis(50))).unwrap_err();
    assert!(matches!(e, TryLockError::TimedOut), "{e:?}");
    drop(g);
    let g = block_on(lock.read_async()).unwrap();
    assert!(g.token() > 0);
}

/// A minimal executor (park until woken).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let mut f = std::pin::pin!(f);
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        assert!(Instant::now() < end, "never woken");
        std::thread::park_timeout(Duration::from_millis(100));
    }
}

/// The number of advisory-lock requests on bigint key `k` still waiting.
fn waiters(c: &mut postgres::Client, k: i64) -> i64 {
    c.query_one(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
         AND classid = $1::bigint::oid AND objid = $2::bigint::oid AND objsubid = 1",
        &[&((k >> 32) as u32 as i64), &(k as u32 as i64)],
    )
    .unwrap()
    .get(0)
}

fn waiters_until(c: &mut postgres::Client, k: i64, n: i64) -> bool {
    let end = Instant::now() + Duration::from_secs(10);
    while waiters(c, k) < n {
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// A session's second try takes the next token of its batch without a
/// write; another session's grant moves the batch past it.
#[test]
fn a_session_takes_tokens_from_its_batch_until_another_session_is_granted() {
    let Some(pg) = cluster() else { return };
    let name = unique("batch");
    let a = PgLock::with_options(&name, opts(&pg.url())).unwrap();
    let b = PgLock::with_options(&name, opts(&pg.url())).unwrap();
    let t1 = a.try_write().unwrap().token();
    let t2 = a.try_write().unwrap().token();
    let t3 = a.try_read().unwrap().token();
    assert_eq!((t2, t3), (t1 + 1, t1 + 2), "from the batch");
    assert_eq!(
        a.last_token().unwrap(),
        Some(t1),
        "no write since the first"
    );
    let tb = b.try_write().unwrap().token();
    assert_eq!(tb, t1 + interlock::pg::BATCH as u64, "the batch's end");
    let t4 = a.try_write().unwrap().token();
    assert_eq!(
        t4,
        tb + interlock::pg::BATCH as u64,
        "a new batch after b's"
    );
}

/// The try reads the token row under a snapshot taken before its grant. A
/// wait makes that window wide and deterministic: the try's statement with
/// `pg_try_advisory_lock` replaced by `pg_advisory_lock` (a test-only
/// variant of the library's own statement) queues behind another session
/// that is granted, writes a new batch, commits and releases while the
/// first waits. The token must still be above the other session's. The
/// control, the same statement without the `xmax = 0` test, reads the
/// stale row and issues a lower token: the check catches a stale read.
#[test]
fn a_try_granted_after_another_sessions_batch_never_reads_the_stale_row() {
    let Some(pg) = cluster() else { return };
    let widened = interlock::pg::TRY_ACQUIRE.replace(
        "ELSE pg_try_advisory_lock($2) END",
        "ELSE pg_advisory_lock($2)::text = '' END",
    );
    assert_ne!(widened, interlock::pg::TRY_ACQUIRE);
    let stale = widened.replace("AND f.xmax = '0'::xid ", "");
    assert_ne!(stale, widened);
    for (sql, control) in [(&widened, false), (&stale, true)] {
        let name = unique(if control { "stale-control" } else { "stale" });
        let PgKey::Int(k) = PgKey::name(&name) else {
            unreachable!()
        };
        let (k1, k2) = ((k >> 32) as i32, k as i32);
        // Connected first: it installs the schema if no test did yet.
        let t = PgLock::with_options(&name, opts(&pg.url())).unwrap();
        let mut s = postgres::Client::connect(&pg.url(), postgres::NoTls).unwrap();
        let sid: String = s.query_one(interlock::pg::SESSION_ID, &[]).unwrap().get(0);
        let try_ = s.prepare(interlock::pg::TRY_ACQUIRE).unwrap();
        let wide = s.prepare(sql).unwrap();
        let rel = s.prepare(interlock::pg::RELEASE).unwrap();
        let grant = |s: &mut postgres::Client, st: &postgres::Statement, last: Option<i64>| {
            let t: Option<i64> = s
                .query_one(st, &[&1i16, &k, &k1, &k2, &false, &10_000i32, &sid, &last])
                .unwrap()
                .get(0);
            assert!(s
                .query_one(&rel, &[&1i16, &k, &k1, &k2, &false, &true])
                .unwrap()
                .get::<_, bool>(0));
            t.unwrap()
        };
        // The session owns a batch and takes its next token from it.
        let first = grant(&mut s, &try_, None);
        let prev = grant(&mut s, &try_, Some(first));
        assert_eq!(prev, first + 1);
        // Another application holds the key; a PgLock queues behind it,
        // then the session's statement behind the PgLock.
        let mut other = postgres::Client::connect(&pg.url(), postgres::NoTls).unwrap();
        other.execute("SELECT pg_advisory_lock($1)", &[&k]).unwrap();
        let mut watch = postgres::Client::connect(&pg.url(), postgres::NoTls).unwrap();
        let (theirs, ours) = std::thread::scope(|sc| {
            let tw = sc.spawn(|| t.write().unwrap().token());
            assert!(waiters_until(&mut watch, k, 1), "the PgLock never queued");
            let sw = sc.spawn(move || grant(&mut s, &wide, Some(prev)));
            assert!(waiters_until(&mut watch, k, 2), "the session never queued");
            other
                .execute("SELECT pg_advisory_unlock($1)", &[&k])
                .unwrap();
            (tw.join().unwrap() as i64, sw.join().unwrap())
        });
        assert!(theirs > prev);
        if control {
            assert!(
                ours < theirs,
                "the control was meant to read the stale row: {ours} after {theirs}"
            );
        } else {
            assert!(ours > theirs, "stale token {ours} after {theirs}");
        }
    }
}

/// An older interlock (schema version 1: its try bumps `token` by one) on
/// the same database gets a token above every token of the current batch,
/// and ends that batch; and the fence check then refuses the batch's
/// tokens. In a database of its own, which interlock installs itself on.
/// The control: with `token` holding the batch's first token instead of
/// its top, the older interlock repeats a token the batch's owner had.
#[test]
fn an_older_interlock_on_the_same_database_gets_tokens_above_the_batch() {
    let Some(pg) = cluster() else { return };
    // Version 1's try, as older interlocks send it.
    const V1_TRY: &str = "WITH g AS MATERIALIZED (SELECT CASE WHEN $1::smallint = 1 THEN \
       CASE WHEN $5::boolean THEN pg_try_advisory_lock_shared($2::bigint) ELSE pg_try_advisory_lock($2) END \
     ELSE \
       CASE WHEN $5 THEN pg_try_advisory_lock_shared($3::integer, $4::integer) ELSE pg_try_advisory_lock($3, $4) END \
     END AS got), \
   u AS (INSERT INTO interlock_fence AS f (space, key, token, granted_at, holder_pid) \
     SELECT $1, $2, 1, clock_timestamp(), pg_backend_pid() FROM g WHERE g.got \
     ON CONFLICT (space, key) DO UPDATE \
     SET token = f.token + 1, granted_at = clock_timestamp(), holder_pid = pg_backend_pid() \
     RETURNING f.token) \
   SELECT (SELECT token FROM u), pg_backend_pid(), \
     CASE WHEN (SELECT got FROM g) THEN set_config('idle_session_timeout', $6::integer::text, false) END";
    let db = format!("compat_{}", std::process::id());
    pg.psql(&format!("CREATE DATABASE {db}"));
    let url = format!("{}/{db}", pg.url().rsplit_once('/').unwrap().0);
    for control in [false, true] {
        let name = unique(if control { "v1-control" } else { "v1" });
        let PgKey::Int(k) = PgKey::name(&name) else {
            unreachable!()
        };
        let (k1, k2) = ((k >> 32) as i32, k as i32);
        let lock = PgLock::with_options(&name, opts(&url)).unwrap();
        let t1 = lock.try_write().unwrap().token();
        let t2 = lock.try_write().unwrap().token();
        assert_eq!(t2, t1 + 1);
        let mut old = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        if control {
            old.execute(
                "UPDATE interlock_fence SET token = lo WHERE space = 1 AND key = $1",
                &[&k],
            )
            .unwrap();
        }
        let v1: i64 = old
            .query_one(V1_TRY, &[&1i16, &k, &k1, &k2, &false, &10_000i32])
            .unwrap()
            .get(0);
        old.execute("SELECT pg_advisory_unlock($1)", &[&k]).unwrap();
        if control {
            assert!(
                v1 as u64 <= t2,
                "the control was meant to repeat a token: {v1} after {t2}"
            );
            continue;
        }
        assert_eq!(
            v1 as u64,
            t1 + interlock::pg::BATCH as u64,
            "the batch's end"
        );
        // The installed version 1 function too.
        let f1: i64 = old
            .query_one(
                "SELECT token FROM interlock_acquire_v1($1, $2, $3, $4, false, -1, 10000)",
                &[&1i16, &k, &k1, &k2],
            )
            .unwrap()
            .get(0);
        old.execute("SELECT pg_advisory_unlock($1)", &[&k]).unwrap();
        assert_eq!(f1, v1 + 1);
        assert_eq!(lock.last_token().unwrap(), Some(f1 as u64));
        let err = old
            .execute("SELECT interlock_fence_check($1, $2)", &[&k, &(t2 as i64)])
            .unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("IL001"));
        old.execute("SELECT interlock_fence_check($1, $2)", &[&k, &f1])
            .unwrap();
        // The newer interlock writes a new batch above them, and takes the
        // next token from it without a write (the checks' row locks left
        // nothing in the new version).
        let t3 = lock.try_write().unwrap().token();
        assert_eq!(t3 as i64, f1 + 1);
        let t4 = lock.try_write().unwrap().token();
        assert_eq!(t4, t3 + 1);
    }
}
