//! Uncontended cost of one acquire+release of a PgLock, against its floor:
//! the same two statements (interlock's acquisition function and release
//! function) sent raw over one connection with prepared statements, and,
//! for scale, the bare `pg_try_advisory_lock` + `pg_advisory_unlock` pair
//! (no fencing token). Against a throwaway cluster over its unix socket,
//! side by side in one run.
//!
//! sqlx's `PgAdvisoryLock` is not measured: sqlx 0.9 needs Rust 1.94, above
//! the workspace's MSRV (1.85).
//!
//! Run: `cargo bench -p interlock --features postgres --bench pg`

#[path = "../tests/support/pg.rs"]
mod pgsupport;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use interlock::{PgKey, PgLock, PgOptions};
use postgres::{Client, NoTls};

fn bench(c: &mut Criterion) {
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
    let mut raw = Client::connect(&url, NoTls).unwrap();
    let acq = raw
        .prepare("SELECT token, backend FROM interlock_acquire_v1($1, $2, $3, $4, $5, $6, $7)")
        .unwrap();
    let rel = raw
        .prepare("SELECT interlock_release_v1($1, $2, $3, $4, $5, $6)")
        .unwrap();
    let (k1, k2) = ((k >> 32) as i32, k as i32);
    g.bench_function(
        "pg/floor/same two statements, raw prepared/acquire+release",
        |b| {
            b.iter(|| {
                let r = raw
                    .query_one(&acq, &[&1i16, &k, &k1, &k2, &false, &-1i32, &10_000i32])
                    .unwrap();
                assert!(r.get::<_, Option<i64>>(0).is_some());
                let r = raw
                    .query_one(&rel, &[&1i16, &k, &k1, &k2, &false, &true])
                    .unwrap();
                assert!(r.get::<_, bool>(0));
            })
        },
    );
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
    drop(raw);

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
}

criterion_group!(benches, bench);
criterion_main!(benches);
