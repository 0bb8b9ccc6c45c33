//! Async acquisition (`*_async`): the futures are `Send`, run on any
//! executor (a minimal one written here, and tokio), take the fast path
//! without a thread when the lock is free, and are cancel-safe: a future
//! dropped at a random moment while another process holds (or has just
//! released) the lock leaves nothing held, so a second process takes the
//! lock at once. A control shows the check catches a future that leaks.
//!
//! The random points are seeded (`INTERLOCK_TEST_SEED`, printed) and so
//! reproducible up to the scheduler.

mod support;

use interlock::{
    Acquire, FileLock, FileSemaphore, LeaseLock, LockSet, Mode, Semaphore, ShmMutex, ShmRwLock,
    TryLockError, Wait,
};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};
use support::Child;

// ----- a minimal executor ----------------------------------------------------

struct Unparker(std::thread::Thread, AtomicBool);

impl Wake for Unparker {
    fn wake(self: Arc<Self>) {
        self.1.store(true, Ordering::SeqCst);
        self.0.unpark();
    }
}

/// Runs `f` to completion on this thread, sleeping between wake-ups.
fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let u = Arc::new(Unparker(std::thread::current(), AtomicBool::new(false)));
    let waker = Waker::from(Arc::clone(&u));
    let mut cx = Context::from_waker(&waker);
    let give_up = Instant::now() + support::WAIT;
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        while !u.1.swap(false, Ordering::SeqCst) {
            assert!(Instant::now() < give_up, "a future was never woken");
            std::thread::park_timeout(give_up - Instant::now());
        }
    }
}

/// Polls once with a waker that counts its wake-ups.
fn poll_once<F: Future + Unpin>(f: &mut F, wakes: &Arc<Counter>) -> Poll<F::Output> {
    let waker = Waker::from(Arc::clone(wakes));
    Pin::new(f).poll(&mut Context::from_waker(&waker))
}

#[derive(Default)]
struct Counter(AtomicUsize);

impl Wake for Counter {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn assert_send<T: Send + 'static>(_: &T) {}

// ----- seeded randomness -----------------------------------------------------

struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let seed = std::env::var("INTERLOCK_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed_a5c0);
        eprintln!("async cancellation seed: {seed} (INTERLOCK_TEST_SEED)");
        Rng(seed | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

// ----- the families, behind one face -----------------------------------------

const PERMITS: u32 = 2;

/// A lock of one family, opened on `path`.
enum Any {
    File(Arc<FileLock>),
    Set(Arc<LockSet>),
    Shm(Arc<ShmRwLock>),
    Mutex(Arc<ShmMutex>),
    Lease(LeaseLock),
    Sem(Arc<Semaphore>),
    FileSem(Arc<FileSemaphore>),
}

type Boxed = Pin<Box<dyn Future<Output = Result<Held, TryLockError>> + Send>>;

/// Something held, of any family.
struct Held(#[allow(dead_code)] Box<dyn Send>);

fn held<G: Send + 'static>(g: G) -> Held {
    Held(Box::new(g))
}

impl Any {
    fn open(kind: &str, path: &Path) -> Any {
        match kind {
            "file" => Any::File(Arc::new(FileLock::open(path).unwrap())),
            "set" => Any::Set(Arc::new(LockSet::open(path).unwrap())),
            "shm" => Any::Shm(Arc::new(ShmRwLock::open(path).unwrap())),
            "mutex" => Any::Mutex(Arc::new(ShmMutex::open(path).unwrap())),
            "lease" => Any::Lease(LeaseLock::new(path, Duration::from_secs(30)).unwrap()),
            "sem" => Any::Sem(Arc::new(Semaphore::open(path, PERMITS).unwrap())),
            "filesem" => Any::FileSem(Arc::new(FileSemaphore::open(path, PERMITS).unwrap())),
            k => panic!("unknown kind {k}"),
        }
    }

    /// Everything the lock can give, waiting as `wait` allows (blocking).
    fn take_all(&self, wait: Wait) -> Result<Held, TryLockError> {
        Ok(match self {
            Any::File(l) => held(l.write_arc(wait)?),
            Any::Set(s) => held(s.scope_arc(0..8, Mode::Exclusive, wait)?),
            Any::Shm(l) => held(l.acquire_arc(interlock::ShmHold::Write, wait)?),
            Any::Mutex(m) => held(m.lock_arc(wait)?),
            Any::Lease(l) => held(l.lock_arc(wait)?),
            Any::Sem(s) => held(s.acquire_many_arc(PERMITS, wait)?),
            Any::FileSem(s) => held(s.acquire_many_arc(PERMITS, wait)?),
        })
    }

    /// An async acquisition of part of the lock (one permit, a shared hold,
    /// a range inside the held one) or all of it, without deadline.
    fn acquire_async(&self, shared: bool) -> Boxed {
        fn boxed<G: Send + 'static>(f: Acquire<G>) -> Boxed {
            Box::pin(async move { f.await.map(held).map_err(TryLockError::Error) })
        }
        match self {
            Any::File(l) if shared => boxed(l.read_async()),
            Any::File(l) => boxed(l.write_async()),
            Any::Set(s) => boxed(s.scope_async(
                2..5,
                if shared {
                    Mode::Shared
                } else {
                    Mode::Exclusive
                },
            )),
            Any::Shm(l) if shared => boxed(l.read_async()),
            Any::Shm(l) => boxed(l.write_async()),
            Any::Mutex(m) => boxed(m.lock_async()),
            Any::Lease(l) => boxed(l.lock_async()),
            Any::Sem(s) if shared => boxed(s.acquire_async()),
            Any::Sem(s) => boxed(s.acquire_many_async(PERMITS)),
            Any::FileSem(s) if shared => boxed(s.acquire_async()),
            Any::FileSem(s) => boxed(s.acquire_many_async(PERMITS)),
        }
    }
}

// ----- the child: holds the lock, or checks it is free -----------------------

/// The child's loop: `hold MS` takes everything within MS milliseconds
/// (answer `held` or `busy`), `release` gives it back (`released`), `try MS`
/// takes everything within the bound and gives it back (`free` or `busy`).
fn child_loop(kind: &str, path: &Path) {
    let lock = Any::open(kind, path);
    let mut holding = None;
    support::say("ready");
    while let Some(cmd) = support::hear() {
        match cmd.as_str() {
            c if c.starts_with("hold ") => {
                let ms: u64 = c[5..].parse().unwrap();
                match lock.take_all(Wait::timeout(Duration::from_millis(ms))) {
                    Ok(h) => {
                        holding = Some(h);
                        support::say("held");
                    }
                    Err(_) => support::say("busy"),
                }
            }
            "release" => {
                holding = None;
                support::say("released");
            }
            c if c.starts_with("try ") => {
                let ms: u64 = c[4..].parse().unwrap();
                let got = lock.take_all(Wait::timeout(Duration::from_millis(ms)));
                support::say(if got.is_ok() { "free" } else { "busy" });
            }
            _ => break,
        }
    }
    drop(holding);
}

fn lock_path(dir: &Path, kind: &str) -> PathBuf {
    match kind {
        "shm" | "mutex" | "sem" => {
            // Named shm locks live under /dev/shm; a unique name per run.
            PathBuf::from(format!(
                "interlock-test-async-{}-{}-{}",
                kind,
                std::process::id(),
                dir.file_name().unwrap().to_string_lossy()
            ))
        }
        _ => dir.join(format!("{kind}.lock")),
    }
}

fn remove_shm(kind: &str, path: &Path) {
    if matches!(kind, "shm" | "mutex" | "sem") {
        if let Ok(p) = interlock::shm::resolve(path) {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// One round of the cancellation test for `kind`; `make` builds the future
/// under test (the real one, or the control's leaky one).
fn cancel_at_random_points(
    test: &str,
    kind: &str,
    rounds: u32,
    check_ms: u64,
    make: &dyn Fn(&Any, bool) -> Boxed,
) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let path = lock_path(dir.path(), kind);
    let arg = format!("{kind} {}", path.display());
    let mut holder = Child::spawn(test, "holder", &arg);
    let mut checker = Child::spawn(test, "holder", &arg);
    holder.expect("ready");
    checker.expect("ready");
    let lock = Any::open(kind, &path);
    let mut rng = Rng::seeded();
    let result = (|| {
        for round in 0..rounds {
            holder.send(&format!("hold {check_ms}"));
            let got = holder.recv();
            if got != "held" {
                return Err(format!("round {round}: the holder finds the lock {got}"));
            }
            let mut f = make(&lock, rng.below(2) == 0);
            let wakes = Arc::new(Counter::default());
            let how = rng.below(4);
            let mut released = false;
            if how > 0 {
                // The lock is held elsewhere: the first poll hands the wait
                // to a waiter.
                assert!(poll_once(&mut f, &wakes).is_pending(), "round {round}");
            }
            match how {
                // Dropped before its first poll, or while the holder holds.
                0 | 1 => std::thread::sleep(Duration::from_micros(rng.below(2000))),
                // The holder releases; dropped at a random moment around the
                // waiter's grant (before it, during it, after it).
                _ => {
                    holder.send("release");
                    holder.expect("released");
                    released = true;
                    let pause = Duration::from_micros(rng.below(400));
                    let until = Instant::now() + pause;
                    while Instant::now() < until {
                        std::hint::spin_loop();
                    }
                    // Sometimes polled once more: a grant already delivered
                    // is then taken (and dropped with the guard) or not.
                    if how == 3 {
                        if let Poll::Ready(r) = poll_once(&mut f, &wakes) {
                            r.map_err(|e| format!("round {round}: {e}"))?;
                        }
                    }
                }
            }
            drop(f);
            if !released {
                holder.send("release");
                holder.expect("released");
            }
            // Nothing of ours is held: another process takes everything.
            checker.send(&format!("try {check_ms}"));
            let got = checker.recv();
            if got != "free" {
                return Err(format!(
                    "round {round} (case {how}): after the drop the lock is {got}"
                ));
            }
        }
        Ok(())
    })();
    drop(lock);
    drop((holder, checker));
    remove_shm(kind, &path);
    result
}

fn holder_role() -> bool {
    if let Some(role) = support::role() {
        assert_eq!(role, "holder");
        let arg = support::arg();
        let (kind, path) = arg.split_once(' ').unwrap();
        child_loop(kind, Path::new(path));
        return true;
    }
    false
}

macro_rules! cancellation_test {
    ($name:ident, $kind:literal) => {
        #[test]
        fn $name() {
            if holder_role() {
                return;
            }
            cancel_at_random_points(stringify!($name), $kind, 24, 5_000, &|l, s| {
                l.acquire_async(s)
            })
            .unwrap();
        }
    };
}

cancellation_test!(cancel_file_lock_across_processes, "file");
cancellation_test!(cancel_lock_set_across_processes, "set");
cancellation_test!(cancel_shm_rwlock_across_processes, "shm");
cancellation_test!(cancel_shm_mutex_across_processes, "mutex");
cancellation_test!(cancel_lease_across_processes, "lease");
cancellation_test!(cancel_semaphore_across_processes, "sem");
cancellation_test!(cancel_file_semaphore_across_processes, "filesem");

/// The control: a naive async wrapper whose waiter thread keeps what it
/// got once the future is gone is caught by the same check.
#[test]
fn control_a_leaking_future_is_caught() {
    if holder_role() {
        return;
    }
    static KEPT: parking_lot::Mutex<Vec<Held>> = parking_lot::Mutex::new(Vec::new());
    let leaky = |l: &Any, _shared: bool| -> Boxed {
        let Any::File(l) = l else { unreachable!() };
        let l = Arc::clone(l);
        let (tx, rx) = std::sync::mpsc::channel::<Held>();
        std::thread::spawn(move || {
            let g = held(l.write_arc(Wait::Forever).unwrap());
            if let Err(back) = tx.send(g) {
                KEPT.lock().push(back.0); // the bug: kept after the drop
            }
        });
        Box::pin(std::future::poll_fn(move |_| match rx.try_recv() {
            Ok(g) => Poll::Ready(Ok(g)),
            Err(_) => Poll::Pending,
        }))
    };
    let caught = cancel_at_random_points(
        "control_a_leaking_future_is_caught",
        "file",
        24,
        200,
        &leaky,
    );
    let e = caught.expect_err("the check must catch a future that leaks the lock");
    assert!(e.contains("busy"), "{e}");
    KEPT.lock().clear();
}

// ----- Send, executors, the fast path ----------------------------------------

#[test]
fn futures_are_send_and_unpin() {
    fn unpin<T: Unpin>(_: &T) {}
    let dir = tempfile::tempdir().unwrap();
    let f = Arc::new(FileLock::open(dir.path().join("f")).unwrap());
    let s = Arc::new(LockSet::open(dir.path().join("s")).unwrap());
    let rw = Arc::new(ShmRwLock::anonymous().unwrap());
    let m = Arc::new(ShmMutex::anonymous().unwrap());
    let l = LeaseLock::new(dir.path().join("l"), Duration::from_secs(30)).unwrap();
    let sem = Arc::new(Semaphore::anonymous(2).unwrap());
    let fsem = Arc::new(FileSemaphore::open(dir.path().join("fs"), 2).unwrap());
    let d = Duration::from_secs(1);
    let t = Instant::now() + d;
    assert_send(&f.read_async());
    assert_send(&f.write_async_for(d));
    assert_send(&f.upgradable_read_async_until(t));
    assert_send(&s.scope_async(1..3, Mode::Shared));
    assert_send(&s.scope_async_for(1, Mode::Exclusive, d));
    assert_send(&rw.read_async());
    assert_send(&rw.write_async_for(d));
    assert_send(&rw.upgradable_read_async());
    assert_send(&m.lock_async_until(t));
    assert_send(&l.lock_async());
    assert_send(&sem.acquire_async());
    assert_send(&sem.acquire_many_async_for(2, d));
    assert_send(&fsem.acquire_many_async(2));
    unpin(&fsem.acquire_async_until(t));
    // An async block holding a guard across an await is Send too.
    let task = async move {
        let g = f.write_async().await.unwrap();
        let r = rw.read_async().await.unwrap().unwrap();
        drop((g, r));
    };
    assert_send(&task);
    block_on(task);
}

#[test]
fn free_locks_are_taken_on_the_first_poll() {
    let dir = tempfile::tempdir().unwrap();
    let f = Arc::new(FileLock::open(dir.path().join("f")).unwrap());
    let wakes = Arc::new(Counter::default());
    let mut a = f.write_async();
    let Poll::Ready(g) = poll_once(&mut a, &wakes) else {
        panic!("a free lock must be taken on the first poll, without a waiter");
    };
    let g = g.unwrap();
    // Held: a timed async acquisition runs out.
    let other = Arc::new(FileLock::open(dir.path().join("f")).unwrap());
    let e = block_on(other.read_async_for(Duration::from_millis(20))).unwrap_err();
    assert!(matches!(e, TryLockError::TimedOut), "{e:?}");
    // A zero timeout is a try.
    let e = block_on(other.read_async_for(Duration::ZERO)).unwrap_err();
    assert!(matches!(e, TryLockError::TimedOut), "{e:?}");
    drop(g);
    let sem = Arc::new(Semaphore::anonymous(2).unwrap());
    let two = block_on(sem.acquire_many_async(2)).unwrap();
    assert_eq!(two.count(), 2);
    let e = block_on(sem.acquire_many_async(3)).unwrap_err();
    assert_eq!(e.kind(), interlock::ErrorKind::InvalidInput);
    assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
}

#[test]
fn a_waiter_is_woken_by_the_release_under_a_minimal_executor() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    let a = Arc::new(FileLock::open(&p).unwrap());
    let b = Arc::new(FileLock::open(&p).unwrap());
    let g = a.write_arc(Wait::Forever).unwrap();
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        drop(g);
    });
    let g = block_on(b.write_async()).unwrap();
    releaser.join().unwrap();
    assert!(a.try_read().is_err());
    drop(g);
    assert!(a.try_write().is_ok());
}

#[test]
fn runs_under_tokio() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    let a = Arc::new(FileLock::open(&p).unwrap());
    let b = Arc::new(FileLock::open(&p).unwrap());
    let rw = Arc::new(ShmRwLock::anonymous().unwrap());
    let sem = Arc::new(Semaphore::anonymous(1).unwrap());
    rt.block_on(async {
        let g = a.write_async().await.unwrap();
        // The other task waits without blocking the (single) executor
        // thread: the timer task below still runs.
        let waiter = tokio::spawn({
            let b = Arc::clone(&b);
            async move { b.write_async().await.map(drop) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(g);
        waiter.await.unwrap().unwrap();

        let w = rw.write_async().await.unwrap().unwrap();
        let r = tokio::spawn({
            let rw = Arc::clone(&rw);
            async move { rw.read_async().await.map(|g| drop(g.unwrap())) }
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        drop(w);
        r.await.unwrap().unwrap();

        let p = sem.acquire_async().await.unwrap();
        // Cancelled by a tokio timeout: the permit stays free afterwards.
        let late = tokio::time::timeout(Duration::from_millis(10), sem.acquire_async()).await;
        assert!(late.is_err());
        drop(p);
        drop(sem.acquire_async().await.unwrap());
    });
}

/// Cancelling interrupts the kernel wait itself (fcntl, futex, poll): the
/// waiter thread leaves its wait although the lock stays held. Run in a
/// child process of its own, so that other tests' waiters are not counted.
#[test]
fn a_cancelled_wait_ends_while_the_lock_stays_held() {
    if support::role().is_some() {
        let dir = tempfile::tempdir().unwrap();
        for kind in ["file", "set", "shm", "mutex", "lease", "sem", "filesem"] {
            let path = lock_path(dir.path(), kind);
            let (a, b) = (Any::open(kind, &path), Any::open(kind, &path));
            let kept = a.take_all(Wait::NonBlocking).unwrap();
            for shared in [false, true] {
                let mut f = b.acquire_async(shared);
                let wakes = Arc::new(Counter::default());
                assert!(poll_once(&mut f, &wakes).is_pending());
                // Let the waiter enter its wait (this is not what the
                // assertion depends on: a cancel before the wait counts too).
                std::thread::sleep(Duration::from_millis(2));
                // The waiter starts (under load it may take a while).
                let give_up = Instant::now() + Duration::from_secs(5);
                while interlock::__async::busy_waiters() == 0 {
                    assert!(Instant::now() < give_up, "{kind}: no waiter thread");
                    std::thread::sleep(Duration::from_millis(1));
                }
                drop(f);
                let give_up = Instant::now() + Duration::from_secs(5);
                while interlock::__async::busy_waiters() > 0 {
                    assert!(Instant::now() < give_up, "{kind}: the waiter kept waiting");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            drop(kept);
            drop((a, b));
            remove_shm(kind, &path);
        }
        support::say("ok");
        return;
    }
    let mut c = Child::spawn(
        "a_cancelled_wait_ends_while_the_lock_stays_held",
        "threads",
        "",
    );
    c.expect("ok");
}

/// `LockSet::lock_async` keeps its change only when it returns it: dropped
/// while waiting, the set is as it was (a shared hold it was converting
/// stays shared); completed, the set holds the range until `unlock`.
#[test]
fn lock_set_lock_async_keeps_only_what_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s");
    let a = Arc::new(LockSet::open(&p).unwrap());
    let b = LockSet::open(&p).unwrap();
    a.lock(0..1, Mode::Shared).unwrap();
    b.lock(0..4, Mode::Shared).unwrap();
    let wakes = Arc::new(Counter::default());
    let mut f = Box::pin(a.lock_async(0..3, Mode::Exclusive));
    assert!(poll_once(&mut f, &wakes).is_pending());
    drop(f);
    assert_eq!(a.held(), vec![(0..1, Mode::Shared)]);
    b.unlock_all().unwrap();
    block_on(a.lock_async(0..3, Mode::Exclusive)).unwrap();
    assert_eq!(a.held(), vec![(0..3, Mode::Exclusive)]);
    assert!(b.try_lock(2, Mode::Shared).is_err());
    let e = block_on(a.lock_async_until(5, Mode::Exclusive, Instant::now()));
    assert!(e.is_ok(), "{e:?}");
    a.unlock_all().unwrap();
    b.try_lock(0..8, Mode::Exclusive).unwrap();
}
