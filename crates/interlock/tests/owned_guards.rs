//! Owned (`Arc`) guards: released from another thread, they release the
//! lock for everyone; they are `Send + Sync + 'static`.

use interlock::{FileLock, LeaseLock, LockSet, Mode, ShmHold, ShmMutex, ShmRwLock, Wait};
use std::sync::Arc;
use std::time::Duration;

fn assert_owned<T: Send + Sync + 'static>(_: &T) {}

#[test]
fn file_guards_are_owned_and_released_by_another_thread() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("l");
    let a = Arc::new(FileLock::open(&p).unwrap());
    let other = FileLock::open(&p).unwrap();
    let g = a.write_arc(Wait::Forever).unwrap();
    assert_owned(&g);
    assert!(other.try_read().is_err());
    std::thread::spawn(move || drop(g)).join().unwrap();
    let r = a.read_arc(Wait::NonBlocking).unwrap();
    assert!(other.try_write().is_err());
    std::thread::spawn(move || r.unlock().unwrap())
        .join()
        .unwrap();
    let u = a.upgradable_arc(Wait::NonBlocking).unwrap();
    let w = u.try_upgrade().unwrap();
    assert!(other.try_read().is_err());
    let r = w.downgrade().unwrap();
    assert!(other.try_write().is_err());
    drop(r);
    drop(a);
    other.try_write().unwrap().unlock().unwrap();
}

#[test]
fn lock_set_scope_is_owned() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s");
    let a = Arc::new(LockSet::open(&p).unwrap());
    let other = LockSet::open(&p).unwrap();
    let s = a.scope_arc(3..7, Mode::Exclusive, Wait::Forever).unwrap();
    assert_owned(&s);
    assert!(other.try_lock(5, Mode::Shared).is_err());
    std::thread::spawn(move || s.restore().unwrap())
        .join()
        .unwrap();
    other.try_lock(3..7, Mode::Exclusive).unwrap();
    assert!(a.held().is_empty());
}

#[test]
fn shm_guards_are_owned_and_released_by_another_thread() {
    let rw = Arc::new(ShmRwLock::anonymous().unwrap());
    let g = rw
        .acquire_arc(ShmHold::Write, Wait::Forever)
        .unwrap()
        .unwrap();
    assert_owned(&g);
    assert!(rw.try_read().is_err());
    std::thread::spawn(move || drop(g)).join().unwrap();
    let mut readers: Vec<_> = (0..3)
        .map(|_| {
            rw.acquire_arc(ShmHold::Read, Wait::NonBlocking)
                .unwrap()
                .unwrap()
        })
        .collect();
    assert!(rw.try_write().is_err());
    let last = readers.pop().unwrap();
    std::thread::spawn(move || drop(readers)).join().unwrap();
    assert!(rw.try_write().is_err());
    std::thread::spawn(move || drop(last)).join().unwrap();
    let mut u = rw
        .acquire_arc(ShmHold::Upgradable, Wait::NonBlocking)
        .unwrap()
        .unwrap();
    let r = rw.try_read().unwrap().unwrap();
    assert!(u.upgrade(Wait::timeout(Duration::from_millis(20))).is_err());
    assert_eq!(u.hold(), Some(ShmHold::Upgradable));
    drop(r);
    u.upgrade(Wait::NonBlocking).unwrap();
    assert!(rw.try_read().is_err());
    u.downgrade().unwrap();
    drop(rw.try_read().unwrap().unwrap());
    u.unlock().unwrap();
    assert_eq!(u.hold(), None);
    drop(rw.try_write().unwrap().unwrap());

    let m = Arc::new(ShmMutex::anonymous().unwrap());
    let g = m.lock_arc(Wait::Forever).unwrap().unwrap();
    assert!(m.try_lock().is_err());
    std::thread::spawn(move || drop(g)).join().unwrap();
    drop(m.try_lock().unwrap().unwrap());
}

#[test]
fn lease_guard_is_owned() {
    let dir = tempfile::tempdir().unwrap();
    let lock = LeaseLock::new(dir.path().join("lease"), Duration::from_secs(30)).unwrap();
    let g = lock.lock_arc(Wait::NonBlocking).unwrap();
    assert_owned(&g);
    let t = g.token();
    let other = lock.clone();
    assert!(other.try_lock().is_err());
    drop(lock);
    std::thread::spawn(move || g.release().unwrap())
        .join()
        .unwrap();
    assert!(other.try_lock().unwrap().token() > t);
}
