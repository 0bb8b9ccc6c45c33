//! PgLock when a holder loses its lock: its session terminated, the server
//! restarted, the holder stopped past its lease, the network cut. In each
//! case the holder is told (on_lost, check, unlock), another holder gets in,
//! and fencing tokens go on increasing; a stale token is refused.
mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use interlock::{ErrorKind, PgKey, PgLock, PgOptions};
use support::Child;

fn opts(url: &str) -> PgOptions {
    PgOptions::new().url(url)
}

fn unique(tag: &str) -> String {
    format!("{tag}-{}", std::process::id())
}

fn bigint(name: &str) -> i64 {
    match PgKey::name(name) {
        PgKey::Int(k) => k,
        PgKey::Pair(..) => unreachable!(),
    }
}

/// Waits (bounded) until `lock` shows someone waiting.
fn until_queued(lock: &PgLock) {
    let end = Instant::now() + Duration::from_secs(10);
    while lock.holders().unwrap().iter().all(|h| h.granted) {
        assert!(Instant::now() < end, "waiter never queued");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A waiter thread that blocks in `write()` and reports when it got in.
fn waiter(lock: Arc<PgLock>) -> (mpsc::Receiver<(Instant, u64)>, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        let g = lock.write().unwrap();
        tx.send((Instant::now(), g.token())).unwrap();
    });
    (rx, h)
}

#[test]
fn terminated_holder_is_told_and_a_waiter_gets_in() {
    let Some(pg) = support::pg::shared() else {
        return;
    };
    let name = unique("terminated");
    let (tx, lost) = mpsc::channel();
    let lease = Duration::from_secs(2);
    let holder = PgLock::with_options(
        &name,
        opts(&pg.url()).lease(lease).on_lost(move |e| {
            let _ = tx.send((Instant::now(), e.kind()));
        }),
    )
    .unwrap();
    // A few pairs first, so that the hold below starts while the session's
    // heartbeat thread waits out an interval (a hold wakes it only when it
    // is parked): the hold must still be beaten, and the loss seen.
    for _ in 0..3 {
        holder.write().unwrap().unlock().unwrap();
    }
    let g = holder.write().unwrap();
    let w = Arc::new(PgLock::with_options(&name, opts(&pg.url())).unwrap());
    let (got, h) = waiter(Arc::clone(&w));
    until_queued(&w);
    let t0 = Instant::now();
    assert_eq!(
        pg.psql(&format!("SELECT pg_terminate_backend({})", g.backend_pid())),
        "t"
    );
    let (t_in, tok) = got
        .recv_timeout(Duration::from_secs(10))
        .expect("waiter in");
    let (t_told, kind) = lost
        .recv_timeout(lease)
        .expect("holder told within its lease");
    assert_eq!(kind, ErrorKind::LeaseLost);
    eprintln!(
        "[pg] terminate: waiter in after {:?}, holder told after {:?}",
        t_in - t0,
        t_told - t0
    );
    assert!(tok > g.token());
    assert_eq!(g.check().unwrap_err().kind(), ErrorKind::LeaseLost);
    let t = g.token();
    assert_eq!(g.unlock().unwrap_err().kind(), ErrorKind::LeaseLost);
    h.join().unwrap();
    // The holder's handle works again (a new session), with a newer token.
    let g2 = holder.try_write().unwrap();
    assert!(g2.token() > tok && tok > t);
}

#[test]
fn server_restart_tells_every_holder_and_tokens_still_increase() {
    // A cluster of its own: the restart would disturb the other tests.
    let Some(pg) = support::pg::start() else {
        return;
    };
    let lease = Duration::from_secs(2);
    let told = Arc::new(AtomicUsize::new(0));
    let mk = |name: &str| {
        let t = Arc::clone(&told);
        PgLock::with_options(
            name,
            opts(&pg.url()).lease(lease).on_lost(move |e| {
                assert_eq!(e.kind(), ErrorKind::LeaseLost);
                t.fetch_add(1, Ordering::SeqCst);
            }),
        )
        .unwrap()
    };
    let (a, b1, b2) = (mk("a"), mk("b"), mk("b"));
    let ga = a.write().unwrap();
    let gb1 = b1.read().unwrap();
    let gb2 = b2.read().unwrap();
    let before = [ga.token(), gb1.token(), gb2.token()];
    pg.restart();
    let end = Instant::now() + 2 * lease;
    while told.load(Ordering::SeqCst) < 3 {
        assert!(
            Instant::now() < end,
            "only {} of 3 holders told within {:?}",
            told.load(Ordering::SeqCst),
            2 * lease
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    for g in [ga, gb1, gb2] {
        assert_eq!(g.unlock().unwrap_err().kind(), ErrorKind::LeaseLost);
    }
    // After the restart: the same handles reconnect, tokens go on from the
    // table (which survived the restart).
    let ga = a.write().unwrap();
    assert!(ga.token() > before[0], "{} after {:?}", ga.token(), before);
    let gb = b1.write().unwrap();
    assert!(gb.token() > before[1].max(before[2]));
    // Now as in a crash (immediate shutdown, recovery from the WAL): the
    // holders are told, and the tokens still go on from the table.
    let before = [ga.token(), gb.token()];
    pg.crash_restart();
    let end = Instant::now() + 2 * lease;
    while told.load(Ordering::SeqCst) < 5 {
        assert!(
            Instant::now() < end,
            "only {} of 2 holders told of the crash within {:?}",
            told.load(Ordering::SeqCst) - 3,
            2 * lease
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    for g in [ga, gb] {
        assert_eq!(g.unlock().unwrap_err().kind(), ErrorKind::LeaseLost);
    }
    let ga = a.try_write().unwrap();
    assert!(ga.token() > before[0], "{} after {:?}", ga.token(), before);
    let gb = b2.try_read().unwrap();
    assert!(gb.token() > before[1], "{} after {:?}", gb.token(), before);
}

#[test]
fn stopped_holder_past_its_lease_loses_to_a_waiter_and_its_token_is_refused() {
    if support::role().is_some() {
        let (url, name) = support::arg()
            .split_once('|')
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .unwrap();
        let told = Arc::new(AtomicBool::new(false));
        let t = Arc::clone(&told);
        let lock = PgLock::with_options(
            &name,
            opts(&url)
                .lease(Duration::from_secs(1))
                .on_lost(move |_| t.store(true, Ordering::SeqCst)),
        )
        .unwrap();
        let g = lock.write().unwrap();
        support::say(format!("held {}", g.token()));
        assert_eq!(support::hear().as_deref(), Some("check"));
        // Resumed: the guard knows at once, without a round trip.
        support::say(format!("check {:?}", g.check().map_err(|e| e.kind())));
        // The resource refuses this holder's token.
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let r = c.execute(
            "SELECT interlock_fence_check($1, $2)",
            &[&bigint(&name), &(g.token() as i64)],
        );
        let code = r
            .err()
            .and_then(|e| e.code().map(|c| c.code().to_string()))
            .unwrap_or_else(|| "accepted".into());
        support::say(format!("fence {code}"));
        let t = g.token();
        support::say(format!(
            "unlock {:?} told {}",
            g.unlock().map_err(|e| e.kind()),
            told.load(Ordering::SeqCst)
        ));
        let _ = t;
        return;
    }
    let Some(pg) = support::pg::shared() else {
        return;
    };
    let name = unique("stopped");
    let mut c = Child::spawn(
        "stopped_holder_past_its_lease_loses_to_a_waiter_and_its_token_is_refused",
        "holder",
        &format!("{}|{name}", pg.url()),
    );
    let t1: u64 = c.recv().strip_prefix("held ").unwrap().parse().unwrap();
    let pid = c.pid().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let w = PgLock::with_options(&name, opts(&pg.url())).unwrap();
    let t0 = Instant::now();
    let g = w
        .try_write_for(Duration::from_secs(20))
        .expect("taken over");
    eprintln!(
        "[pg] SIGSTOPped holder (lease 1 s): taken over after {:?}",
        t0.elapsed()
    );
    assert!(g.token() > t1);
    // The new holder's token passes the check.
    pg.psql(&format!(
        "SELECT interlock_fence_check({}, {})",
        bigint(&name),
        g.token()
    ));
    assert!(Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    c.send("check");
    assert_eq!(c.recv(), "check Err(LeaseLost)");
    assert_eq!(c.recv(), "fence IL001");
    assert_eq!(c.recv(), "unlock Err(LeaseLost) told true");
    c.join();
    // The stale holder's release did not free the new holder's lock.
    assert!(g.is_held());
    let probe = PgLock::with_options(&name, opts(&pg.url())).unwrap();
    assert!(probe.try_read().is_err());
}

/// A TCP proxy that can stop forwarding without closing anything (a
/// network cut as the endpoints see it: the proxy's kernel still
/// acknowledges every segment and keepalive).
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
}

fn pump(mut from: TcpStream, mut to: TcpStream, cut: Arc<AtomicBool>) {
    let mut buf = [0u8; 16384];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                if cut.load(Ordering::SeqCst) {
                    // Keep both sockets open: nobody learns of the close.
                    loop {
                        std::thread::sleep(Duration::from_secs(3600));
                    }
                }
                let _ = to.shutdown(std::net::Shutdown::Both);
                return;
            }
            Ok(n) => {
                if cut.load(Ordering::SeqCst) {
                    continue;
                }
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn proxy(target: u16) -> Proxy {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let cut = Arc::new(AtomicBool::new(false));
    let c = Arc::clone(&cut);
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(down) = conn else { return };
            let up = TcpStream::connect(("127.0.0.1", target)).unwrap();
            let (d2, u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
            let (c1, c2) = (Arc::clone(&c), Arc::clone(&c));
            std::thread::spawn(move || pump(down, up, c1));
            std::thread::spawn(move || pump(u2, d2, c2));
        }
    });
    Proxy { port, cut }
}

#[test]
fn network_cut_holder_learns_within_its_bound_and_the_server_frees_the_lock() {
    let Some(pg) = support::pg::shared() else {
        return;
    };
    let name = unique("cut");
    let p = proxy(pg.port());
    let lease = Duration::from_secs(1);
    let (tx, lost) = mpsc::channel();
    // Leaked, so that its guard can be released on a thread that may not
    // come back.
    let holder: &'static PgLock = Box::leak(Box::new(
        PgLock::with_options(
            &name,
            opts(&pg.url_via(p.port)).lease(lease).on_lost(move |e| {
                let _ = tx.send((Instant::now(), e.kind()));
            }),
        )
        .unwrap(),
    ));
    let g = holder.write().unwrap();
    let w = Arc::new(PgLock::with_options(&name, opts(&pg.url())).unwrap());
    let (got, h) = waiter(Arc::clone(&w));
    until_queued(&w);
    let t0 = Instant::now();
    p.cut.store(true, Ordering::SeqCst);
    let (t_told, kind) = lost
        .recv_timeout(lease * 3)
        .expect("holder told within its bound");
    assert_eq!(kind, ErrorKind::LeaseLost);
    let (t_in, tok) = got
        .recv_timeout(Duration::from_secs(10))
        .expect("the server freed the lock");
    eprintln!(
        "[pg] network cut (lease {lease:?}): holder told after {:?}, waiter in after {:?}",
        t_told - t0,
        t_in - t0
    );
    // The holder stops believing before the server gives the lock away.
    assert!(t_told < t_in, "holder told after the waiter got in");
    assert!(tok > g.token());
    // Releasing a guard cut off from its server neither hangs nor succeeds.
    let (rtx, rrx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = g.unlock().map_err(|e| e.kind());
        let _ = rtx.send(r);
    });
    assert_eq!(
        rrx.recv_timeout(Duration::from_secs(10))
            .expect("unlock returned"),
        Err(ErrorKind::LeaseLost)
    );
    h.join().unwrap();
}
