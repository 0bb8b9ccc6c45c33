//! Unit tests of the shared-memory locks within one process (and its forked
//! children): typed errors, try/timed semantics, poison, reclamation of
//! dead holders (faked with a wrong start time, which is exactly what a
//! reused pid looks like), upgrades, fork inheritance.

use super::layout::{self, INDEX_MASK, WRITER};
use super::local;
use super::*;
use crate::sync::Ordering;
use crate::sys::fork::{fork_run, wait_child};
use crate::{ErrorKind, TryLockError};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// An identity with our pid but another start time: what a dead holder
/// whose pid was reused by us looks like.
fn impostor() -> u64 {
    let me = crate::sys::proc::current();
    layout::pack(me.pid, me.start_time + 1)
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// Plants a dead holder of the exclusive token in the last slot.
fn plant_dead_writer(inner: &Inner) -> u32 {
    let core = inner.core();
    let i = core.slots.len() as u32 - 1;
    core.slots[i as usize]
        .owner
        .store(impostor(), Ordering::SeqCst);
    core.words.high.fetch_max(i + 1, Ordering::SeqCst);
    core.words.state.store((i + 1) | WRITER, Ordering::SeqCst);
    i
}

/// Plants a dead reader holding `n` reads in the last slot.
fn plant_dead_reader(inner: &Inner, n: u32) -> u32 {
    let core = inner.core();
    let i = core.slots.len() as u32 - 1;
    core.slots[i as usize]
        .owner
        .store(impostor(), Ordering::SeqCst);
    core.slots[i as usize].held.store(n, Ordering::SeqCst);
    core.words.high.fetch_max(i + 1, Ordering::SeqCst);
    i
}

#[test]
fn bare_names_live_in_dev_shm_and_paths_are_kept() {
    assert_eq!(
        resolve("jobs").unwrap(),
        std::path::Path::new("/dev/shm/interlock-jobs")
    );
    assert_eq!(resolve("./jobs").unwrap(), std::path::Path::new("./jobs"));
    for bad in ["", ".", "..", "a\0b", "dir/"] {
        assert_eq!(
            resolve(bad).unwrap_err().kind(),
            ErrorKind::InvalidInput,
            "{bad:?}"
        );
    }
    let name = format!("unit-{}-{}", std::process::id(), line!());
    let l = ShmRwLock::open(&name).unwrap();
    assert_eq!(l.path(), resolve(&name).unwrap());
    assert!(l.path().exists());
    std::fs::remove_file(l.path()).unwrap();
    // Every name whose file name fits (NAME_PREFIX + 245 bytes = 255) can
    // be created, including its temporary name.
    for len in [235, 240, 245] {
        let mut name = format!("long-{}-", std::process::id());
        name.push_str(&"n".repeat(len - name.len()));
        let l = ShmMutex::open(&name).unwrap_or_else(|e| panic!("{len}: {e}"));
        std::fs::remove_file(l.path()).unwrap();
    }
    let too_long = "n".repeat(246);
    assert!(ShmMutex::open(&too_long).is_err());
}

#[test]
fn bad_files_are_typed_errors_naming_the_path() {
    let d = tmp();
    let p = d.path().join("garbage");
    std::fs::write(&p, vec![0x5a; 4096]).unwrap();
    let e = ShmRwLock::open(&p).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.to_string().contains("garbage"), "{e}");
    assert!(e.to_string().contains("magic"), "{e}");

    let p = d.path().join("empty");
    std::fs::write(&p, b"").unwrap();
    assert_eq!(ShmRwLock::open(&p).unwrap_err().kind(), ErrorKind::Corrupt);

    // A good lock file, truncated: refused before mapping (no SIGBUS).
    let p = d.path().join("short");
    drop(ShmRwLock::open(&p).unwrap());
    let len = std::fs::metadata(&p).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(len - 128).unwrap();
    let e = ShmRwLock::open(&p).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.to_string().contains("truncated"), "{e}");

    // Another layout version.
    let p = d.path().join("future");
    drop(ShmRwLock::open(&p).unwrap());
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[8] = 2;
    std::fs::write(&p, &bytes).unwrap();
    let e = ShmRwLock::open(&p).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.to_string().contains("layout version 2"), "{e}");

    // A mutex is not a rwlock.
    let p = d.path().join("mutex");
    drop(ShmMutex::open(&p).unwrap());
    let e = ShmRwLock::open(&p).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.to_string().contains("ShmMutex"), "{e}");
    ShmMutex::open(&p).unwrap();

    // A directory, a symbolic link, a missing directory, a bad slot count.
    assert_eq!(
        ShmRwLock::open(d.path().join(".").join(""))
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidInput
    );
    let sub = d.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    assert_eq!(
        ShmRwLock::open(&sub).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    let link = d.path().join("link");
    std::os::unix::fs::symlink(d.path().join("mutex"), &link).unwrap();
    assert_eq!(
        ShmMutex::open(&link).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    let e = ShmRwLock::open(d.path().join("nope/x")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.to_string().contains("nope/x"), "{e}");
    let e = ShmOptions::new()
        .slots(0)
        .open_rwlock(d.path().join("zero"))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    // No temporary files are left behind.
    let left: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn racing_creators_share_one_initialised_lock() {
    let d = tmp();
    let p = Arc::new(d.path().join("race"));
    let n = 8;
    let start = Arc::new(Barrier::new(n));
    let inside = Arc::new(AtomicUsize::new(0));
    let hs: Vec<_> = (0..n)
        .map(|_| {
            let (p, start, inside) = (p.clone(), start.clone(), inside.clone());
            std::thread::spawn(move || {
                start.wait();
                let l = ShmRwLock::open(&*p).unwrap();
                for _ in 0..200 {
                    let _g = l.write().unwrap();
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                    inside.fetch_sub(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
}

#[test]
fn try_and_timed_semantics() {
    let l = ShmRwLock::anonymous().unwrap();
    let r = l.read().unwrap();
    let r2 = l.try_read().unwrap().unwrap();
    assert!(matches!(l.try_write(), Err(TryLockError::WouldBlock)));
    let t = Instant::now();
    assert!(matches!(
        l.try_write_for(Duration::from_millis(30)),
        Err(TryLockError::TimedOut)
    ));
    assert!(t.elapsed() >= Duration::from_millis(30));
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(matches!(
        l.try_write_until(Instant::now() + Duration::from_millis(10)),
        Err(TryLockError::TimedOut)
    ));
    // A failed writer leaves no trace: readers still enter.
    drop(l.try_read().unwrap().unwrap());
    drop((r, r2));
    let w = l.try_write().unwrap().unwrap();
    assert!(matches!(l.try_read(), Err(TryLockError::WouldBlock)));
    assert!(matches!(
        l.try_read_for(Duration::from_millis(10)),
        Err(TryLockError::TimedOut)
    ));
    assert!(matches!(
        l.try_upgradable_read(),
        Err(TryLockError::WouldBlock)
    ));
    assert!(l.holder().is_some_and(|h| h.pid == std::process::id()));
    w.unlock().unwrap();
    assert!(l.holder().is_none());
    drop(l.try_read_until(Instant::now()).unwrap().unwrap());

    let m = ShmMutex::anonymous().unwrap();
    let g = m.lock().unwrap();
    assert!(matches!(m.try_lock(), Err(TryLockError::WouldBlock)));
    assert!(matches!(
        m.try_lock_for(Duration::from_millis(10)),
        Err(TryLockError::TimedOut)
    ));
    g.unlock().unwrap();
    drop(m.try_lock_until(Instant::now()).unwrap().unwrap());
}

#[test]
fn a_blocked_writer_is_woken_by_the_release() {
    let l = Arc::new(ShmRwLock::anonymous().unwrap());
    let r = l.read().unwrap();
    let got = Arc::new(AtomicBool::new(false));
    let (l2, got2) = (l.clone(), got.clone());
    let h = std::thread::spawn(move || {
        let _w = l2.try_write_for(Duration::from_secs(10)).unwrap().unwrap();
        got2.store(true, Ordering::SeqCst);
    });
    // The writer is pending: new readers are turned away (writer preference).
    let t = Instant::now();
    while l.try_read().is_ok() {
        assert!(t.elapsed() < Duration::from_secs(10), "writer never queued");
        std::thread::yield_now();
    }
    assert!(!got.load(Ordering::SeqCst));
    drop(r);
    h.join().unwrap();
    assert!(got.load(Ordering::SeqCst));
}

#[test]
fn on_block_is_called_once_before_blocking() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    let m = Arc::new(
        ShmOptions::new()
            .on_block(move |b: &crate::Blocked<'_>| {
                assert_eq!(b.mode, crate::Mode::Exclusive);
                c2.fetch_add(1, Ordering::SeqCst);
            })
            .anonymous_mutex()
            .unwrap(),
    );
    drop(m.lock().unwrap());
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let g = m.lock().unwrap();
    let m2 = m.clone();
    let h = std::thread::spawn(move || drop(m2.lock().unwrap()));
    let t = Instant::now();
    while calls.load(Ordering::SeqCst) == 0 {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(1));
    }
    // Let it sleep through a few liveness checks: still one call.
    std::thread::sleep(Duration::from_millis(30));
    drop(g);
    h.join().unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn upgradable_reads_upgrade_and_downgrade() {
    let l = ShmRwLock::anonymous().unwrap();
    let u = l.upgradable_read().unwrap();
    // Readers may join; a second upgradable reader and writers may not.
    let r = l.try_read().unwrap().unwrap();
    assert!(matches!(
        l.try_upgradable_read(),
        Err(TryLockError::WouldBlock)
    ));
    assert!(matches!(l.try_write(), Err(TryLockError::WouldBlock)));
    // A failed upgrade keeps the upgradable hold.
    let u = l.try_upgrade_for_test(u);
    assert!(matches!(
        l.try_upgradable_read(),
        Err(TryLockError::WouldBlock)
    ));
    drop(r);
    let w = u.try_upgrade().unwrap();
    assert!(matches!(l.try_read(), Err(TryLockError::WouldBlock)));
    let u = w.downgrade_to_upgradable();
    drop(l.try_read().unwrap().unwrap());
    let r = u.downgrade();
    // Now a plain reader: another upgradable reader may come, writers not.
    drop(l.try_upgradable_read().unwrap().unwrap());
    assert!(matches!(l.try_write(), Err(TryLockError::WouldBlock)));
    drop(r);
    let w = l.write().unwrap();
    let r = w.downgrade();
    assert!(matches!(l.try_write(), Err(TryLockError::WouldBlock)));
    drop(l.try_read().unwrap().unwrap());
    r.unlock().unwrap();
    let u = l.upgradable_read().unwrap();
    let w = u.upgrade();
    w.unlock().unwrap();
}

impl ShmRwLock {
    /// try_upgrade must fail while a reader is inside and give the guard back.
    fn try_upgrade_for_test<'a>(&'a self, u: ShmUpgradableGuard<'a>) -> ShmUpgradableGuard<'a> {
        let u = match u.try_upgrade() {
            Ok(_) => panic!("upgraded past a reader"),
            Err(u) => u,
        };
        match u.try_upgrade_for(Duration::from_millis(20)) {
            Ok(_) => panic!("upgraded past a reader"),
            Err(u) => u,
        }
    }
}

#[test]
fn a_dead_writer_poisons_and_poison_is_learned_and_cleared() {
    let l = ShmRwLock::anonymous().unwrap();
    plant_dead_writer(l.inner());
    assert!(!l.is_poisoned());
    // A blocking writer detects the death within a few check periods.
    let t = Instant::now();
    let p = match l.try_write_for(Duration::from_secs(5)) {
        Ok(Err(p)) => p,
        other => panic!("expected poison, got {other:?}"),
    };
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(l.is_poisoned());
    // `?` makes it an OwnerDied error naming the lock.
    assert_eq!(p.path(), l.path());
    let e: crate::Error = p.into();
    assert_eq!(e.kind(), ErrorKind::OwnerDied);
    // Still poisoned for the next holders, readers included.
    assert!(l.read().is_err());
    let mut w = match l.write() {
        Err(p) => p.into_inner(),
        Ok(_) => panic!("poison forgotten"),
    };
    assert!(w.is_poisoned());
    w.clear_poison();
    drop(w);
    assert!(!l.is_poisoned());
    drop(l.read().unwrap());
    drop(l.write().unwrap());
}

#[test]
fn try_lock_recovers_a_dead_holder_without_waiting() {
    let m = ShmMutex::anonymous().unwrap();
    plant_dead_writer(m.inner());
    match m.try_lock() {
        Ok(Err(p)) => drop(p.into_inner()),
        other => panic!("expected poison, got {other:?}"),
    }
    assert!(m.is_poisoned());
    // Through the Lock trait, poison is an OwnerDied error.
    let e = crate::Lock::acquire(&m, crate::Mode::Exclusive, crate::Wait::Forever).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OwnerDied);
    let mut g = m.lock().unwrap_err().into_inner();
    g.clear_poison();
    g.unlock().unwrap();
    drop(m.lock().unwrap());
}

#[test]
fn a_dead_reader_is_reclaimed_silently() {
    let l = ShmRwLock::anonymous().unwrap();
    let i = plant_dead_reader(l.inner(), 3);
    let w = l.try_write_for(Duration::from_secs(5)).unwrap().unwrap();
    assert!(!l.is_poisoned());
    let core = l.inner().core();
    assert_eq!(core.slots[i as usize].held.load(Ordering::SeqCst), 0);
    assert_eq!(core.slots[i as usize].owner.load(Ordering::SeqCst), 0);
    drop(w);
    // The non-blocking writer also reclaims.
    plant_dead_reader(l.inner(), 1);
    drop(l.try_write().unwrap().unwrap());
}

#[test]
fn a_live_holder_is_never_reclaimed() {
    // Our own identity (same pid, same start time) is alive: a writer must
    // time out, not steal.
    let l = ShmRwLock::anonymous().unwrap();
    let core = l.inner().core();
    let me = super::protocol::Env::me(&super::open::ProcEnv);
    core.slots[3].owner.store(me, Ordering::SeqCst);
    core.slots[3].held.store(1, Ordering::SeqCst);
    core.words.high.fetch_max(4, Ordering::SeqCst);
    assert!(matches!(
        l.try_write_for(Duration::from_millis(30)),
        Err(TryLockError::TimedOut)
    ));
    assert_eq!(core.slots[3].held.load(Ordering::SeqCst), 1);
}

#[test]
fn a_reclaimer_that_died_half_way_is_finished_by_the_next() {
    let l = ShmRwLock::anonymous().unwrap();
    let core = l.inner().core();
    let i = plant_dead_writer(l.inner());
    // The dead reclaimer froze the slot and died before clearing anything.
    core.slots[i as usize]
        .owner
        .store(impostor() | layout::RECLAIMING, Ordering::SeqCst);
    core.slots[i as usize].held.store(2, Ordering::SeqCst);
    match l.try_write_for(Duration::from_secs(5)) {
        Ok(Err(p)) => drop(p),
        other => panic!("expected poison, got {other:?}"),
    }
    assert_eq!(core.words.state.load(Ordering::SeqCst) & INDEX_MASK, 0);
    assert_eq!(core.slots[i as usize].owner.load(Ordering::SeqCst), 0);
}

#[test]
fn a_panicking_writer_poisons() {
    let m = Arc::new(ShmMutex::anonymous().unwrap());
    let m2 = m.clone();
    let r = std::thread::spawn(move || {
        let _g = m2.lock().unwrap();
        panic!("boom");
    })
    .join();
    assert!(r.is_err());
    assert!(m.is_poisoned());
    assert!(m.lock().is_err());
}

#[test]
fn threads_exclude_each_other_even_when_slots_run_out() {
    for slots in [1, 2, 128] {
        let l = Arc::new(ShmOptions::new().slots(slots).anonymous_rwlock().unwrap());
        let writers = Arc::new(AtomicUsize::new(0));
        let readers = Arc::new(AtomicUsize::new(0));
        let hs: Vec<_> = (0..6)
            .map(|t| {
                let (l, writers, readers) = (l.clone(), writers.clone(), readers.clone());
                std::thread::spawn(move || {
                    for i in 0..300 {
                        if (i + t) % 3 == 0 {
                            let _g = l.write().unwrap();
                            assert_eq!(writers.fetch_add(1, Ordering::SeqCst), 0);
                            assert_eq!(readers.load(Ordering::SeqCst), 0);
                            writers.fetch_sub(1, Ordering::SeqCst);
                        } else {
                            let _g = l.read().unwrap();
                            readers.fetch_add(1, Ordering::SeqCst);
                            assert_eq!(writers.load(Ordering::SeqCst), 0);
                            readers.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert!(local::claimed(l.inner()) <= slots as usize);
    }
}

#[test]
fn a_writer_gets_in_while_readers_overlap_continuously() {
    let l = Arc::new(ShmRwLock::anonymous().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (l, stop) = (l.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let _r = l.read().unwrap();
                    std::thread::sleep(Duration::from_micros(200));
                    n += 1;
                }
                n
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(20));
    for _ in 0..20 {
        let t = Instant::now();
        let w = l.try_write_for(Duration::from_secs(5));
        assert!(
            matches!(w, Ok(Ok(_))),
            "writer starved for {:?}",
            t.elapsed()
        );
    }
    stop.store(true, Ordering::Relaxed);
    for h in readers {
        assert!(h.join().unwrap() > 0);
    }
}

#[test]
fn slots_return_to_the_table_when_the_handle_drops() {
    let d = tmp();
    let p = d.path().join("slots");
    let l = ShmRwLock::open(&p).unwrap();
    drop(l.read().unwrap());
    let hs: Vec<_> = (0..3)
        .map(|_| {
            let p = p.clone();
            std::thread::spawn(move || {
                let l = ShmRwLock::open(&p).unwrap();
                drop(l.write().unwrap());
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    let core = l.inner().core();
    let used = core
        .slots
        .iter()
        .filter(|s| s.owner.load(Ordering::SeqCst) != 0)
        .count();
    assert_eq!(
        used, 2,
        "only this handle's slots (shared + own) stay claimed"
    );
    drop(l);
    let l = ShmRwLock::open(&p).unwrap();
    let core = l.inner().core();
    assert!(core
        .slots
        .iter()
        .all(|s| s.owner.load(Ordering::SeqCst) == 0));
}

#[test]
fn a_forked_child_shares_an_anonymous_lock() {
    let l = ShmRwLock::anonymous().unwrap();
    let r = l.read().unwrap();
    // The child sees the parent's read hold and can read alongside it.
    let pid = fork_run(|| {
        let l = &l;
        if !matches!(l.try_write(), Err(TryLockError::WouldBlock)) {
            return 1;
        }
        match l.try_read() {
            Ok(Ok(g)) => drop(g),
            _ => return 3,
        }
        0
    })
    .unwrap();
    assert_eq!(wait_child(pid).unwrap(), 0);
    drop(r);

    // A child that dies holding the write lock poisons it; the parent
    // recovers within the bound.
    let pid = fork_run(|| {
        let w = l.write().unwrap();
        std::mem::forget(w);
        0
    })
    .unwrap();
    assert_eq!(wait_child(pid).unwrap(), 0);
    let t = Instant::now();
    match l.try_write_for(Duration::from_secs(5)) {
        Ok(Err(p)) => {
            let mut w = p.into_inner();
            w.clear_poison();
        }
        other => panic!("expected poison, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(2));
    drop(l.write().unwrap());
}

#[test]
fn an_inherited_guard_dropped_in_the_child_releases_nothing() {
    let m = ShmMutex::anonymous().unwrap();
    let mut held = Some(m.lock().unwrap());
    let pid = fork_run(|| {
        drop(held.take());
        match m.try_lock() {
            Err(TryLockError::WouldBlock) => 0,
            _ => 1,
        }
    })
    .unwrap();
    assert_eq!(wait_child(pid).unwrap(), 0);
    assert!(matches!(m.try_lock(), Err(TryLockError::WouldBlock)));
    drop(held);
    drop(m.try_lock().unwrap().unwrap());
}

#[test]
fn slots_of_dead_processes_are_reused_before_the_table_grows() {
    let l = ShmRwLock::anonymous().unwrap();
    let core = l.inner().core();
    for i in 0..4 {
        core.slots[i].owner.store(impostor(), Ordering::SeqCst);
    }
    core.words.high.store(4, Ordering::SeqCst);
    drop(l.read().unwrap());
    // Our shared and own slots came from the dead ones; writers still scan
    // only four.
    assert_eq!(core.words.high.load(Ordering::SeqCst), 4);
    let me = super::protocol::Env::me(&super::open::ProcEnv);
    assert_eq!(core.slots[0].owner.load(Ordering::SeqCst), me);
    assert_eq!(core.slots[1].owner.load(Ordering::SeqCst), me);
}

/// A lock file another user made (here: copied into place by uid 65534)
/// is refused unless the caller opts in; opted in, it works.
#[test]
fn a_lock_file_of_another_user_is_refused_unless_allowed() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::process::CommandExt;
    if std::fs::metadata("/proc/self").unwrap().uid() != 0 {
        eprintln!("skipped: acting as another user needs root");
        return;
    }
    let d = tmp();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let ours = d.path().join("ours");
    drop(ShmRwLock::open(&ours).unwrap());
    std::fs::set_permissions(&ours, std::fs::Permissions::from_mode(0o644)).unwrap();
    let theirs = d.path().join("theirs");
    let st = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cp {} {} && chmod 666 {}",
            ours.display(),
            theirs.display(),
            theirs.display()
        ))
        .uid(65534)
        .gid(65534)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(std::fs::metadata(&theirs).unwrap().uid(), 65534);
    let e = ShmRwLock::open(&theirs).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(e.to_string().contains("allow_foreign_owner"), "{e}");
    let l = ShmOptions::new()
        .allow_foreign_owner(true)
        .open_rwlock(&theirs)
        .unwrap();
    drop(l.write());
    // Inspection creates nothing.
    let missing = d.path().join("missing");
    let e = ShmOptions::new()
        .create(false)
        .open_rwlock(&missing)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(!missing.exists());
}
