//! Uncontended acquire + release of one semaphore permit, against the
//! floor of its primitive and a POSIX semaphore.
//!
//! * interlock `Semaphore` (shared memory): one CAS to take a cell, one CAS
//!   to give it back and a load of the waiters word; its floor is the two
//!   CASes on one word;
//! * interlock `FileSemaphore` (file): a non-blocking OFD write lock on the
//!   first free byte and its unlock; its floor is that raw lock + unlock;
//! * a named POSIX semaphore (`sem_open`, glibc: a futex word in
//!   /dev/shm), `sem_wait` + `sem_post`: no record of who holds a permit,
//!   so a killed holder leaks it (the peer interlock must not be slower
//!   than by much).
//!
//! The POSIX calls need raw pointers; `unsafe` is allowed in this bench
//! only, each block with its SAFETY comment.
#![allow(unsafe_code)]

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use interlock::__raw::{ofd_try, ByteRange, RangeLock};
use interlock::{FileSemaphore, Semaphore};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

struct PosixSem(*mut libc::sem_t);

impl PosixSem {
    fn new(value: u32) -> PosixSem {
        let name =
            std::ffi::CString::new(format!("/interlock-bench-sem-{}", std::process::id())).unwrap();
        // SAFETY: `name` is NUL-terminated; with O_CREAT the variadic
        // arguments are the mode and the initial value. The name is
        // unlinked at once: the open semaphore stays usable.
        let s = unsafe {
            let s = libc::sem_open(
                name.as_ptr(),
                libc::O_CREAT | libc::O_EXCL,
                0o600 as libc::c_uint,
                value as libc::c_uint,
            );
            libc::sem_unlink(name.as_ptr());
            s
        };
        assert_ne!(s, libc::SEM_FAILED, "sem_open");
        PosixSem(s)
    }

    fn pair(&self) {
        // SAFETY: `self.0` is a live semaphore from sem_open.
        unsafe {
            libc::sem_wait(self.0);
            libc::sem_post(self.0);
        }
    }
}

fn floor(a: &AtomicU64) {
    let _ = black_box(a).compare_exchange(0, 7, Ordering::SeqCst, Ordering::Relaxed);
    let _ = black_box(a).compare_exchange(7, 0, Ordering::SeqCst, Ordering::Relaxed);
}

fn uncontended(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let sem = Semaphore::open(dir.path().join("sem"), 2).unwrap();
    let posix = PosixSem::new(2);
    let atom = AtomicU64::new(0);
    let mut g = c.benchmark_group("sem_pair");
    g.measurement_time(Duration::from_millis(1500))
        .warm_up_time(Duration::from_millis(300))
        .sample_size(30);
    g.bench_function("shm/interlock/Semaphore (shm)/acquire", |b| {
        b.iter(|| drop(black_box(sem.acquire())))
    });
    g.bench_function("shm/peer/POSIX sem_open semaphore/acquire", |b| {
        b.iter(|| posix.pair())
    });
    g.bench_function("shm/floor/CAS + CAS/acquire", |b| b.iter(|| floor(&atom)));

    let fsem = FileSemaphore::open(dir.path().join("file-sem"), 2).unwrap();
    g.bench_function("fcntl/interlock/FileSemaphore/acquire", |b| {
        b.iter(|| drop(black_box(fsem.acquire().unwrap())))
    });
    let raw = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.path().join("raw"))
        .unwrap();
    const BYTE0: ByteRange = ByteRange { start: 0, len: 1 };
    g.bench_function("fcntl/floor/raw OFD lock of byte 0/acquire", |b| {
        b.iter(|| {
            assert!(ofd_try(raw.as_fd(), RangeLock::Write, BYTE0).unwrap());
            ofd_try(raw.as_fd(), RangeLock::Unlock, BYTE0).unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, uncontended);
criterion_main!(benches);
