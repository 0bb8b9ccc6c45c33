//! Uncontended lock+unlock pairs of the shared-memory locks, side by side
//! with their peers and the floor, in one run:
//!
//! * interlock `ShmRwLock` (read pair, write pair) and `ShmMutex`;
//! * a process-shared `pthread_rwlock_t` and `pthread_mutex_t`, and a
//!   robust process-shared mutex, in an anonymous shared mapping;
//! * raw_sync's `RwLock` (pthread in shared memory);
//! * parking_lot's `RwLock` and `Mutex` (threads only: not comparable in
//!   scope, shown as a reference point);
//! * a bare atomic compare-and-swap + store pair: the floor of any lock.
//!
//! Run: `cargo bench -p interlock --bench shm`
//!
//! The pthread helpers need raw pointers; `unsafe` is allowed in this bench
//! file only (it is a separate target, not the library), each block with
//! its SAFETY argument.
#![allow(unsafe_code)]

use criterion::{black_box, criterion_group, criterion_main, BenchmarkGroup, Criterion};
use interlock::{ShmMutex, ShmRwLock};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// A zeroed anonymous shared mapping of one page, never unmapped (the
/// bench process exits).
fn shared_page() -> *mut u8 {
    // SAFETY: an anonymous mapping at a kernel-chosen address overlaps no
    // Rust object; the result is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p.cast()
}

struct PthreadRwLock(*mut libc::pthread_rwlock_t);

// SAFETY: a process-shared pthread rwlock is made to be used from any
// thread (and process); the pointer is to a mapping never unmapped.
unsafe impl Sync for PthreadRwLock {}

impl PthreadRwLock {
    fn new() -> PthreadRwLock {
        let p = shared_page().cast::<libc::pthread_rwlock_t>();
        // SAFETY: `p` points to a fresh, page-aligned, writable mapping
        // larger than a pthread_rwlock_t; the attribute is initialised
        // before use and destroyed after.
        unsafe {
            let mut a: libc::pthread_rwlockattr_t = std::mem::zeroed();
            assert_eq!(libc::pthread_rwlockattr_init(&mut a), 0);
            assert_eq!(
                libc::pthread_rwlockattr_setpshared(&mut a, libc::PTHREAD_PROCESS_SHARED),
                0
            );
            assert_eq!(libc::pthread_rwlock_init(p, &a), 0);
            libc::pthread_rwlockattr_destroy(&mut a);
        }
        PthreadRwLock(p)
    }
    fn read_pair(&self) {
        // SAFETY: the lock was initialised in `new` and is never moved.
        unsafe {
            libc::pthread_rwlock_rdlock(self.0);
            libc::pthread_rwlock_unlock(self.0);
        }
    }
    fn write_pair(&self) {
        // SAFETY: as above.
        unsafe {
            libc::pthread_rwlock_wrlock(self.0);
            libc::pthread_rwlock_unlock(self.0);
        }
    }
}

struct PthreadMutex(*mut libc::pthread_mutex_t);

impl PthreadMutex {
    fn new(robust: bool) -> PthreadMutex {
        let p = shared_page().cast::<libc::pthread_mutex_t>();
        // SAFETY: as for PthreadRwLock::new.
        unsafe {
            let mut a: libc::pthread_mutexattr_t = std::mem::zeroed();
            assert_eq!(libc::pthread_mutexattr_init(&mut a), 0);
            assert_eq!(
                libc::pthread_mutexattr_setpshared(&mut a, libc::PTHREAD_PROCESS_SHARED),
                0
            );
            if robust {
                assert_eq!(
                    libc::pthread_mutexattr_setrobust(&mut a, libc::PTHREAD_MUTEX_ROBUST),
                    0
                );
            }
            assert_eq!(libc::pthread_mutex_init(p, &a), 0);
            libc::pthread_mutexattr_destroy(&mut a);
        }
        PthreadMutex(p)
    }
    fn pair(&self) {
        // SAFETY: initialised in `new`, never moved.
        unsafe {
            libc::pthread_mutex_lock(self.0);
            libc::pthread_mutex_unlock(self.0);
        }
    }
}

fn raw_sync_rwlock() -> Box<dyn raw_sync::locks::LockImpl> {
    use raw_sync::locks::{LockInit, RwLock};
    let mem = shared_page();
    // SAFETY: `mem` is a fresh writable page, larger than the lock; the
    // data pointer (past the lock) is within the same page and unused.
    let (lock, _) = unsafe { RwLock::new(mem, mem.add(2048)) }.expect("raw_sync RwLock");
    lock
}

fn configure(g: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    g.measurement_time(Duration::from_millis(1500))
        .warm_up_time(Duration::from_millis(300))
        .sample_size(30);
}

fn floor(a: &AtomicU32) {
    let _ = black_box(a).compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed);
    black_box(a).store(0, Ordering::Release);
}

/// The atomics of a read pair alone, as `ShmRwLock` does them on a thread's
/// own slot: a SeqCst increment of the slot's counter and a load of the
/// state word (the writer check), then a load and a Release store of the
/// counter and a load of the state word (the drain check). What the lock
/// adds beyond this part is bookkeeping (the thread's slot, the fork
/// generation, the guard).
fn reader_atomics(held: &AtomicU32, state: &AtomicU32) {
    black_box(held).fetch_add(1, Ordering::SeqCst);
    let _ = black_box(black_box(state).load(Ordering::SeqCst));
    let h = black_box(held).load(Ordering::Relaxed);
    black_box(held).store(h.wrapping_sub(1), Ordering::Release);
    let _ = black_box(black_box(state).load(Ordering::SeqCst));
}

fn uncontended(c: &mut Criterion) {
    let shm = ShmRwLock::anonymous().unwrap();
    let shm_mutex = ShmMutex::anonymous().unwrap();
    let prw = PthreadRwLock::new();
    let pmx = PthreadMutex::new(false);
    let probust = PthreadMutex::new(true);
    let rs = raw_sync_rwlock();
    let pl = parking_lot::RwLock::new(());
    let plm = parking_lot::Mutex::new(());
    let atom = AtomicU32::new(0);

    let mut g = c.benchmark_group("read_pair");
    configure(&mut g);
    g.bench_function("shm/interlock/ShmRwLock/read", |b| {
        b.iter(|| drop(black_box(shm.read().unwrap())))
    });
    g.bench_function("shm/peer/pthread_rwlock pshared/read", |b| {
        b.iter(|| prw.read_pair())
    });
    g.bench_function("shm/peer/raw_sync RwLock/read", |b| {
        b.iter(|| drop(black_box(rs.rlock().unwrap())))
    });
    g.bench_function("shm/reference/parking_lot RwLock (threads)/read", |b| {
        b.iter(|| drop(black_box(pl.read())))
    });
    g.bench_function("shm/floor/CAS + store/read", |b| b.iter(|| floor(&atom)));
    let (held, state) = (AtomicU32::new(0), AtomicU32::new(0));
    g.bench_function("shm/part/the read pair's atomics alone/read", |b| {
        b.iter(|| reader_atomics(&held, &state))
    });
    g.finish();

    let mut g = c.benchmark_group("write_pair");
    configure(&mut g);
    g.bench_function("shm/interlock/ShmRwLock/write", |b| {
        b.iter(|| drop(black_box(shm.write().unwrap())))
    });
    g.bench_function("shm/peer/pthread_rwlock pshared/write", |b| {
        b.iter(|| prw.write_pair())
    });
    g.bench_function("shm/peer/raw_sync RwLock/write", |b| {
        b.iter(|| drop(black_box(rs.lock().unwrap())))
    });
    g.bench_function("shm/reference/parking_lot RwLock (threads)/write", |b| {
        b.iter(|| drop(black_box(pl.write())))
    });
    g.bench_function("shm/floor/CAS + store/write", |b| b.iter(|| floor(&atom)));
    g.finish();

    let mut g = c.benchmark_group("mutex_pair");
    configure(&mut g);
    g.bench_function("shm/interlock/ShmMutex/lock", |b| {
        b.iter(|| drop(black_box(shm_mutex.lock().unwrap())))
    });
    g.bench_function("shm/peer/pthread_mutex pshared/lock", |b| {
        b.iter(|| pmx.pair())
    });
    g.bench_function("shm/peer/pthread_mutex pshared robust/lock", |b| {
        b.iter(|| probust.pair())
    });
    g.bench_function("shm/reference/parking_lot Mutex (threads)/lock", |b| {
        b.iter(|| drop(black_box(plm.lock())))
    });
    g.bench_function("shm/floor/CAS + store/lock", |b| b.iter(|| floor(&atom)));
    g.finish();
}

/// Runs `f` `iters` times on each of two threads at once; the time per
/// pair as seen by one thread (both run in parallel).
fn two_threads(iters: u64, f: &(dyn Fn() + Sync)) -> Duration {
    let start = std::sync::Barrier::new(2);
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            start.wait();
            let t = std::time::Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed()
        });
        start.wait();
        let t = std::time::Instant::now();
        for _ in 0..iters {
            f();
        }
        let mine = t.elapsed();
        mine.max(h.join().unwrap())
    })
}

/// Shared-mode scaling: two threads reading at once. A lock whose readers
/// all write one counter bounces that cache line between the CPUs; per-slot
/// readers do not.
fn parallel_readers(c: &mut Criterion) {
    let shm = ShmRwLock::anonymous().unwrap();
    let prw = PthreadRwLock::new();
    let pl = parking_lot::RwLock::new(());
    let mut g = c.benchmark_group("read_pair_2_threads");
    configure(&mut g);
    g.bench_function("shm/interlock/ShmRwLock/read, two threads at once", |b| {
        b.iter_custom(|n| two_threads(n, &|| drop(black_box(shm.read().unwrap()))))
    });
    g.bench_function(
        "shm/peer/pthread_rwlock pshared/read, two threads at once",
        |b| b.iter_custom(|n| two_threads(n, &|| prw.read_pair())),
    );
    g.bench_function(
        "shm/reference/parking_lot RwLock (threads)/read, two threads at once",
        |b| b.iter_custom(|n| two_threads(n, &|| drop(black_box(pl.read())))),
    );
    g.finish();
}

criterion_group!(benches, uncontended, parallel_readers);
criterion_main!(benches);
