//! sqlx 0.8's `PgAdvisoryLock` beside PgLock and its floor: uncontended
//! acquire+release pairs on one connection each, interleaved in rounds in
//! one process against one throwaway cluster (the test support's), over
//! the unix socket and loopback TCP. Prints one line per transport (and
//! writes them to `target/criterion/pg-sqlx.notes.md` of the workspace, so
//! the harness's report includes them).
//!
//! What each pair sends:
//! - floor: interlock's try (grant + fencing token, one statement) and its
//!   release, raw, prepared (postgres crate);
//! - PgLock `try_write` + `unlock`: those same two statements;
//! - bare pair: `pg_try_advisory_lock` + `pg_advisory_unlock`, prepared (no
//!   token: what sqlx's lock does, with the sync client);
//! - sqlx `acquire` + `release_now`: `pg_advisory_lock($1)` then
//!   `pg_advisory_unlock($1)`, two round trips (sqlx caches the prepared
//!   statements), on a current-thread tokio runtime;
//! - sqlx `acquire` + drop: the guard's drop only queues the unlock as a
//!   simple query that goes out with the connection's next statement (one
//!   round trip per pair, the release is unconfirmed and happens later).
//!
//! Run: `cargo run --release --manifest-path crates/interlock-bench/peers/sqlx-pg/Cargo.toml`

#[path = "../../../../interlock/tests/support/pg.rs"]
mod pgsupport;

use std::time::Instant;

use interlock::pg::{RELEASE, SESSION_ID, TRY_ACQUIRE};
use interlock::{PgKey, PgLock, PgOptions};
use postgres::{Client, NoTls};
use sqlx::postgres::{PgAdvisoryLock, PgAdvisoryLockKey, PgConnectOptions, PgConnection};
use sqlx::ConnectOptions;

const ROUNDS: usize = 61;
const BATCH: u32 = 50;

fn main() {
    let Some(pg) = pgsupport::shared() else {
        eprintln!("no PostgreSQL server: sqlx's PgAdvisoryLock is not measured");
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let socket = PgConnectOptions::new()
        .socket(pg.socket_dir())
        .port(pg.port())
        .username("postgres")
        .database("postgres");
    let tcp = PgConnectOptions::new()
        .host("127.0.0.1")
        .port(pg.port())
        .username("postgres")
        .database("postgres");
    let lines = [
        run(&rt, &pg.socket_conninfo(), socket, "unix socket"),
        run(&rt, &pg.url(), tcp, "loopback TCP"),
    ];
    for l in &lines {
        println!("{l}");
    }
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../../target")
        })
        .join("criterion");
    let _ = std::fs::create_dir_all(&dir);
    let text: String = lines.iter().map(|l| format!("- {l}\n")).collect();
    let _ = std::fs::write(dir.join("pg-sqlx.notes.md"), text);
}

fn run(rt: &tokio::runtime::Runtime, url: &str, opts: PgConnectOptions, over: &str) -> String {
    let lock = PgLock::with_options("bench-sqlx", PgOptions::new().url(url)).unwrap();
    let PgKey::Int(k) = lock.key() else {
        unreachable!()
    };
    let (k1, k2) = ((k >> 32) as i32, k as i32);
    let mut raw = Client::connect(url, NoTls).unwrap();
    let acq = raw.prepare(TRY_ACQUIRE).unwrap();
    let rel = raw.prepare(RELEASE).unwrap();
    let try_ = raw.prepare("SELECT pg_try_advisory_lock($1)").unwrap();
    let unl = raw.prepare("SELECT pg_advisory_unlock($1)").unwrap();
    // The floor draws a session id as the library does and passes its last
    // token back, so that it takes tokens from batches as PgLock does.
    let sid: String = raw.query_one(SESSION_ID, &[]).unwrap().get(0);
    let mut last: Option<i64> = None;
    // Other keys than PgLock's: sqlx's dropped guard releases late.
    let (kb, ks, kd) = (k ^ 1, k ^ 2, k ^ 3);
    let mut conn: Option<PgConnection> = Some(
        rt.block_on(opts.disable_statement_logging().connect())
            .unwrap(),
    );
    // Every side's server backend and this process on one CPU, so that no
    // side is measured on the slower CPU (see pgsupport::Pinned).
    let backends = [
        raw.query_one("SELECT pg_backend_pid()", &[])
            .unwrap()
            .get::<_, i32>(0),
        lock.try_write().unwrap().backend_pid(),
        rt.block_on(
            sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()")
                .fetch_one(conn.as_mut().unwrap()),
        )
        .unwrap(),
    ];
    let pinned = pgsupport::pin_together(&backends);
    let placement = match &pinned {
        Some(p) => format!("client and every backend pinned to CPU {}", p.cpu),
        None => "not pinned (no taskset)".to_string(),
    };
    let sq_now = PgAdvisoryLock::with_key(PgAdvisoryLockKey::BigInt(ks));
    let sq_drop = PgAdvisoryLock::with_key(PgAdvisoryLockKey::BigInt(kd));

    let names = [
        "floor (same two statements, raw prepared)",
        "PgLock try_write+unlock",
        "bare pg_try_advisory_lock+pg_advisory_unlock (prepared, no token)",
        "sqlx PgAdvisoryLock acquire+release_now",
        "sqlx PgAdvisoryLock acquire+drop (unlock queued, sent with the next statement)",
    ];
    let mut side = |i: usize| match i {
        0 => {
            let r = raw
                .query_one(
                    &acq,
                    &[&1i16, &k, &k1, &k2, &false, &10_000i32, &sid, &last],
                )
                .unwrap();
            last = r.get::<_, Option<i64>>(0);
            assert!(last.is_some());
            let r = raw
                .query_one(&rel, &[&1i16, &k, &k1, &k2, &false, &true])
                .unwrap();
            assert!(r.get::<_, bool>(0));
        }
        1 => lock.try_write().unwrap().unlock().unwrap(),
        2 => {
            assert!(raw.query_one(&try_, &[&kb]).unwrap().get::<_, bool>(0));
            assert!(raw.query_one(&unl, &[&kb]).unwrap().get::<_, bool>(0));
        }
        3 => {
            let c = conn.take().unwrap();
            conn = Some(rt.block_on(async {
                let g = sq_now.acquire(c).await.unwrap();
                g.release_now().await.unwrap()
            }));
        }
        _ => {
            let c = conn.as_mut().unwrap();
            rt.block_on(async {
                drop(sq_drop.acquire(&mut *c).await.unwrap());
            });
        }
    };
    let mut batch = |i: usize| {
        let t = Instant::now();
        for _ in 0..BATCH {
            side(i);
        }
        t.elapsed().as_secs_f64() * 1e6 / f64::from(BATCH)
    };
    let n = names.len();
    for _ in 0..3 {
        for i in 0..n {
            batch(i);
        }
    }
    let mut per: Vec<Vec<f64>> = vec![Vec::new(); n];
    let (mut ratio, mut ratio_floor) = (Vec::new(), Vec::new());
    for r in 0..ROUNDS {
        // Rotate which side goes first.
        let mut this = vec![0.0; n];
        for j in 0..n {
            let i = (r + j) % n;
            this[i] = batch(i);
        }
        ratio.push(this[1] / this[3]);
        ratio_floor.push(this[1] / this[0]);
        for i in 0..n {
            per[i].push(this[i]);
        }
    }
    drop(pinned);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    let sides: Vec<String> = names
        .iter()
        .zip(per.iter_mut())
        .map(|(name, v)| format!("{name} {:.1} us", median(v)))
        .collect();
    format!(
        "sqlx 0.8 PgAdvisoryLock beside PgLock, over {over}, {ROUNDS} interleaved rounds x \
         {BATCH} pairs each side (median wall per pair): {}; median per-round ratio PgLock \
         try_write+unlock / sqlx acquire+release_now {:.3}x, PgLock / floor {:.3}x; \
         {placement}; load average {load}",
        sides.join(", "),
        median(&mut ratio),
        median(&mut ratio_floor),
    )
}
