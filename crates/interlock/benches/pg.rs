//! Uncontended cost of one acquire+release of a PgLock, against its floor:
//! the same two statements (interlock's acquisition function and release
//! function) sent raw over one connection with prepared statements, and,
//! for scale, the bare `pg_try_advisory_lock` + `pg_advisory_unlock` pair
//! (no fencing token). Against a throwaway cluster over its unix socket,
//! side by side in one run. Then, beyond criterion: the same ratio
//! measured interleaved (over the unix socket and loopback TCP), and how
//! soon a queued waiter gets the lock after its holder process is
//! SIGKILLed (p50/p90/p99/max over 100 kills); those two are printed and
//! written to target/criterion/pg.notes.md for BENCHMARKS.md.
//!
//! sqlx 0.8's `PgAdvisoryLock` is measured beside PgLock and this floor
//! by a crate outside the workspace (crates/interlock-bench/peers/sqlx-pg,
//! run by scripts/benchmarks.sh), so sqlx stays out of this build.
//!
//! Run: `cargo bench -p interlock --features postgres --bench pg`

#[path = "../tests/support/pg.rs"]
mod pgsupport;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion};
use interlock::pg::{RELEASE, SESSION_ID, TRY_ACQUIRE};
use interlock::{PgKey, PgLock, PgOptions};
use postgres::{Client, NoTls};

fn bench(c: &mut Criterion) {
    // No figures of an earlier run stand in for this one's.
    write_notes(&[]);
    let Some(pg) = pgsupport::shared() else {
        return;
    };
    let url = pg.socket_conninfo();
    let mut g = c.benchmark_group("pg_uncontended/unix");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(30);

    let lock = PgLock::with_options("bench", PgOptions::new().url(&url)).unwrap();
    let PgKey::Int(k) = lock.key() else {
        unreachable!()
    };

    // ----- the floor: the same statements, raw ----------------------------
    let mut floor = Floor::connect(&url, k);
    g.bench_function(
        "pg/floor/same two statements, raw prepared/acquire+release",
        |b| b.iter(|| floor.pair()),
    );
    let raw = &mut floor.raw;
    let try_ = raw.prepare("SELECT pg_try_advisory_lock($1)").unwrap();
    let unl = raw.prepare("SELECT pg_advisory_unlock($1)").unwrap();
    g.bench_function(
        "pg/part/bare advisory pair, no token (prepared)/acquire+release",
        |b| {
            b.iter(|| {
                assert!(raw.query_one(&try_, &[&k]).unwrap().get::<_, bool>(0));
                assert!(raw.query_one(&unl, &[&k]).unwrap().get::<_, bool>(0));
            })
        },
    );
    drop(floor);

    // ----- interlock ---------------------------------------------------------
    g.bench_function("pg/interlock/PgLock try_write/acquire+release", |b| {
        b.iter(|| lock.try_write().unwrap().unlock().unwrap())
    });
    g.bench_function("pg/interlock/PgLock write/acquire+release", |b| {
        b.iter(|| lock.write().unwrap().unlock().unwrap())
    });
    g.bench_function("pg/interlock/PgLock read/acquire+release", |b| {
        b.iter(|| lock.read().unwrap().unlock().unwrap())
    });
    g.finish();
    let mut notes = vec![interleaved(&url, &lock, k, "unix socket")];
    // Over loopback TCP (what the harness's contention rows use).
    let tcp = PgLock::with_options("bench", PgOptions::new().url(pg.url())).unwrap();
    notes.push(interleaved(&pg.url(), &tcp, k, "loopback TCP"));
    notes.push(killed_holders(&url));
    write_notes(&notes);
}

/// The floor: PgLock's own two statements (the try's grant with token,
/// the release) sent raw over one connection, prepared once: the
/// library's own `TRY_ACQUIRE` and `RELEASE` (src/pg/sql.rs), with a
/// session id drawn as the library draws it and the last token passed
/// back, so that the floor takes its tokens from batches as PgLock does.
struct Floor {
    raw: Client,
    acq: postgres::Statement,
    rel: postgres::Statement,
    k: i64,
    sid: String,
    last: Option<i64>,
}

impl Floor {
    fn connect(url: &str, k: i64) -> Floor {
        let mut raw = Client::connect(url, NoTls).unwrap();
        let acq = raw.prepare(TRY_ACQUIRE).unwrap();
        let rel = raw.prepare(RELEASE).unwrap();
        let sid = raw.query_one(SESSION_ID, &[]).unwrap().get(0);
        Floor {
            raw,
            acq,
            rel,
            k,
            sid,
            last: None,
        }
    }

    fn pair(&mut self) {
        let (k, k1, k2) = (self.k, (self.k >> 32) as i32, self.k as i32);
        let r = self
            .raw
            .query_one(
                &self.acq,
                &[
                    &1i16, &k, &k1, &k2, &false, &10_000i32, &self.sid, &self.last,
                ],
            )
            .unwrap();
        self.last = r.get::<_, Option<i64>>(0);
        assert!(self.last.is_some());
        let r = self
            .raw
            .query_one(&self.rel, &[&1i16, &k, &k1, &k2, &false, &true])
            .unwrap();
        assert!(r.get::<_, bool>(0));
    }
}

/// The ratio that the goal is about, measured so that load cannot tilt it:
/// rounds of a batch of floor pairs then a batch of `PgLock::try_write` +
/// `unlock` pairs (the same two statements), back to back, so both see
/// the same machine; the median of the per-round ratios. Criterion's rows
/// above are measured seconds apart, which on a shared machine can move
/// either side by more than the 10% in question.
fn interleaved(url: &str, lock: &PgLock, k: i64, over: &str) -> String {
    const ROUNDS: usize = 41;
    const BATCH: u32 = 50;
    let mut floor = Floor::connect(url, k);
    let backends = [
        floor
            .raw
            .query_one("SELECT pg_backend_pid()", &[])
            .unwrap()
            .get::<_, i32>(0),
        lock.try_write().unwrap().backend_pid(),
    ];
    // Both sides' server backends and this process on one CPU, so that
    // neither connection is measured on the slower CPU (see Pinned).
    let pinned = pgsupport::pin_together(&backends);
    let placement = match &pinned {
        Some(p) => format!("client and both backends pinned to CPU {}", p.cpu),
        None => "not pinned (no taskset)".to_string(),
    };
    let mut floor_pair = || floor.pair();
    let mut lock_pair = || lock.try_write().unwrap().unlock().unwrap();
    // Per pair: wall time (us), this process's CPU time over all its
    // threads (us; the client's own work, which load hardly changes), and
    // its context switches (thread wake-ups and sleeps).
    let per_pair = |f: &mut dyn FnMut()| {
        let (c0, x0) = process_cpu_and_switches();
        let t = Instant::now();
        for _ in 0..BATCH {
            f();
        }
        let wall = t.elapsed().as_secs_f64() * 1e6;
        let (c1, x1) = process_cpu_and_switches();
        let n = f64::from(BATCH);
        [wall / n, (c1 - c0) as f64 / 1e3 / n, (x1 - x0) as f64 / n]
    };
    let (mut fl, mut il, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        per_pair(&mut floor_pair);
        per_pair(&mut lock_pair);
    }
    for i in 0..ROUNDS {
        // Alternate which side goes first.
        let (f, l) = if i % 2 == 0 {
            let f = per_pair(&mut floor_pair);
            (f, per_pair(&mut lock_pair))
        } else {
            let l = per_pair(&mut lock_pair);
            (per_pair(&mut floor_pair), l)
        };
        ratio.push(l[0] / f[0]);
        fl.push(f);
        il.push(l);
    }
    let median = |v: &[[f64; 3]], i: usize| {
        let mut c: Vec<f64> = v.iter().map(|x| x[i]).collect();
        c.sort_by(f64::total_cmp);
        c[c.len() / 2]
    };
    ratio.sort_by(f64::total_cmp);
    drop(pinned);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    let line = format!(
        "interleaved over {over}, {ROUNDS} rounds x {BATCH} pairs each side (medians per pair): \
         floor {:.1} us wall, {:.1} us client CPU, {:.2} context switches; \
         PgLock try_write+unlock {:.1} us wall, {:.1} us client CPU, {:.2} context switches; \
         median per-round wall ratio {:.3}x; {placement}; load average {load}",
        median(&fl, 0),
        median(&fl, 1),
        median(&fl, 2),
        median(&il, 0),
        median(&il, 1),
        median(&il, 2),
        ratio[ratio.len() / 2],
    );
    println!("pg_uncontended/{line}");
    format!("PgLock uncontended pair against its floor, {line}")
}

/// Set in a child of this bench: it holds the lock `URL|NAME` until killed.
const HOLDER_ENV: &str = "INTERLOCK_PG_BENCH_HOLDER";

fn holder(arg: &str) {
    let (url, name) = arg.split_once('|').expect("URL|NAME");
    let lock = PgLock::with_options(name, PgOptions::new().url(url)).unwrap();
    let g = lock.write().unwrap();
    println!("held {}", g.token());
    std::io::stdout().flush().unwrap();
    // Until killed (or the bench is gone: EOF).
    let _ = std::io::stdin().read(&mut [0u8; 1]);
}

/// How soon a queued waiter gets the lock after its holder process is
/// SIGKILLed (the server releases when the dead client's socket closes):
/// the distribution over many kills, the kill itself included.
fn killed_holders(url: &str) -> String {
    const KILLS: usize = 100;
    let name = format!("bench-kill-{}", std::process::id());
    let waiter = Arc::new(PgLock::with_options(&name, PgOptions::new().url(url)).unwrap());
    let exe = std::env::current_exe().unwrap();
    let mut lat: Vec<Duration> = Vec::with_capacity(KILLS);
    for _ in 0..KILLS {
        let mut child = Command::new(&exe)
            .env(HOLDER_ENV, format!("{url}|{name}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("held "), "holder said {line:?}");
        let (tx, rx) = mpsc::channel();
        let w = Arc::clone(&waiter);
        let t = std::thread::spawn(move || {
            let g = w.write().unwrap();
            tx.send(Instant::now()).unwrap();
            g.unlock().unwrap();
        });
        // Bounded: until the waiter is queued behind the child.
        let end = Instant::now() + Duration::from_secs(10);
        while waiter.holders().unwrap().iter().all(|h| h.granted) {
            assert!(Instant::now() < end, "waiter never queued");
            std::thread::sleep(Duration::from_millis(1));
        }
        let killed = Instant::now();
        child.kill().unwrap();
        let got = rx.recv_timeout(Duration::from_secs(10)).expect("waiter in");
        lat.push(got.saturating_duration_since(killed));
        t.join().unwrap();
        let _ = child.wait();
    }
    lat.sort();
    let q = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    let line = format!(
        "SIGKILLed holder process -> queued waiter in (kill included), {KILLS} kills: \
         p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms; load average {load}",
        q(0.5).as_secs_f64() * 1e3,
        q(0.9).as_secs_f64() * 1e3,
        q(0.99).as_secs_f64() * 1e3,
        lat[lat.len() - 1].as_secs_f64() * 1e3,
    );
    println!("pg_kill/{line}");
    format!("PgLock {line}")
}

/// The figures criterion does not keep, for BENCHMARKS.md: one line each
/// in `target/criterion/pg.notes.md` (the harness's report includes every
/// `*.notes.md` there under the criterion tables).
fn write_notes(notes: &[String]) {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let dir = target.join("criterion");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("pg.notes.md");
    if notes.is_empty() {
        let _ = std::fs::remove_file(path);
        return;
    }
    let text: String = notes.iter().map(|n| format!("- {n}\n")).collect();
    let _ = std::fs::write(path, text);
}

/// CPU time (ns) and context switches of this process, summed over its
/// threads, from /proc/self/task/*/{schedstat,status}.
fn process_cpu_and_switches() -> (u64, u64) {
    let (mut cpu, mut sw) = (0u64, 0u64);
    for t in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let p = t.path();
        if let Ok(s) = std::fs::read_to_string(p.join("schedstat")) {
            cpu += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
        if let Ok(s) = std::fs::read_to_string(p.join("status")) {
            for l in s.lines() {
                if let Some(v) = l
                    .strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
                {
                    sw += v.trim().parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    (cpu, sw)
}

criterion_group!(benches, bench);

fn main() {
    if let Ok(arg) = std::env::var(HOLDER_ENV) {
        return holder(&arg);
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
