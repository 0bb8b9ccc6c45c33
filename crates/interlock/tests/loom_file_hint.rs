//! Model checks, under loom, of the orderings FileLock's shared-memory
//! hints rely on (crates/interlock/src/file/hint.rs, docs/design-file.md
//! "Hints in shared memory").
//!
//! Run with:
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
//!     cargo test -p interlock --release --test loom_file_hint
//! ```
//!
//! Each loom thread plays a process. The kernel's lock table is a loom
//! `Mutex` (the kernel serialises lock requests on an inode under a
//! spinlock, which orders them like a mutex); the hint words are loom
//! atomics with the orderings the code uses, and no fence between a grant
//! and the hint loads after it (the code has none: the kernel's lock orders
//! them, see `hint::after_grant`). Blocking kernel waits are
//! modelled as non-blocking tries that give up, which keeps the state space
//! finite and loses no interleaving of the steps that matter. Each check was
//! seen to fail with its ordering broken (announcing after the step it must
//! precede, or bumping after the release).
#![cfg(loom)]

use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
use loom::sync::{Arc, Mutex};
use loom::thread;

/// The kernel's view of one lock file: the data lock (shared count or
/// exclusive), the gate and the slot.
#[derive(Default)]
struct Kernel {
    shared: u32,
    exclusive: bool,
    gate: bool,
    slot: bool,
    /// Model-only: a writer's data request has been made.
    data_requested: bool,
}

#[derive(Default)]
struct World {
    kernel: Mutex<Kernel>,
    /// Hint words.
    gate_count: AtomicU32,
    slot_count: AtomicU32,
    removed: AtomicU64,
    /// Model-only observers.
    announced: AtomicBool,
    version: AtomicU64,
    /// Which file the path names: 0 = the old one, 1 = a new one.
    path: AtomicU64,
}

fn try_shared(w: &World) -> bool {
    let mut k = w.kernel.lock().unwrap();
    if k.exclusive {
        return false;
    }
    k.shared += 1;
    true
}

fn unlock_shared(w: &World) {
    w.kernel.lock().unwrap().shared -= 1;
}

fn try_exclusive(w: &World) -> bool {
    let mut k = w.kernel.lock().unwrap();
    if k.exclusive || k.shared > 0 {
        return false;
    }
    k.exclusive = true;
    true
}

fn unlock_exclusive(w: &World) {
    w.kernel.lock().unwrap().exclusive = false;
}

/// A reader that starts after a writer announced itself at the gate never
/// takes the fast path (writer preference survives the hint).
#[test]
fn a_reader_after_the_announcement_takes_the_gated_path() {
    loom::model(|| {
        let w = Arc::new(World::default());
        let writer = {
            let w = w.clone();
            thread::spawn(move || {
                // Slow-path writer: the gate, then the announcement, then
                // the data (a try here; it may find the reader).
                {
                    let mut k = w.kernel.lock().unwrap();
                    k.gate = true;
                }
                w.gate_count.fetch_add(1, SeqCst);
                w.announced.store(true, SeqCst);
                // It stays at the gate for the rest of the model (it is
                // still waiting when the reader looks), so a reader that
                // saw the announcement must see the count.
                if try_exclusive(&w) {
                    unlock_exclusive(&w);
                }
            })
        };
        let seen_before = w.announced.load(SeqCst);
        if try_shared(&w) {
            // No fence: the kernel's lock orders the grant before the load
            // (see `hint::after_grant`).
            let fast = w.gate_count.load(SeqCst) == 0;
            assert!(
                !(seen_before && fast),
                "a reader that saw the writer's announcement skipped the gate"
            );
            unlock_shared(&w);
        }
        writer.join().unwrap();
    });
}

/// The ordering that replaces a fence: a reader whose data lock is granted
/// after a writer's data request (in the kernel's order of requests on the
/// inode, here the mutex's) sees the announcement the writer made before
/// that request, with no fence between the grant and its load. With
/// `announce_late`, the writer announces after its request instead, and the
/// check fails: the model can tell.
fn granted_after_the_request_sees_the_announcement(announce_late: bool) {
    loom::model(move || {
        let w = Arc::new(World::default());
        let writer = {
            let w = w.clone();
            thread::spawn(move || {
                w.kernel.lock().unwrap().gate = true;
                if !announce_late {
                    w.gate_count.fetch_add(1, SeqCst);
                }
                {
                    let mut k = w.kernel.lock().unwrap();
                    k.data_requested = true;
                }
                if announce_late {
                    w.gate_count.fetch_add(1, SeqCst);
                }
            })
        };
        let after = {
            let mut k = w.kernel.lock().unwrap();
            k.shared += 1;
            k.data_requested
        };
        let fast = w.gate_count.load(SeqCst) == 0;
        assert!(
            !(after && fast),
            "a reader granted after the writer's request missed its announcement"
        );
        unlock_shared(&w);
        writer.join().unwrap();
    });
}

#[test]
fn a_reader_granted_after_the_writers_request_sees_its_announcement() {
    granted_after_the_request_sees_the_announcement(false);
}

#[test]
#[should_panic(expected = "missed its announcement")]
fn the_model_catches_an_announcement_after_the_request() {
    granted_after_the_request_sees_the_announcement(true);
}

/// flock flavor: a writer whose `LOCK_EX` was granted inside an upgrader's
/// conversion window (the kernel dropped the upgrader's shared lock) sees
/// the upgrader's slot announcement and gives way, so nothing is written
/// between the upgrader's read and its write.
#[test]
fn a_fast_flock_writer_never_writes_inside_an_upgrade() {
    loom::model(|| {
        let w = Arc::new(World::default());
        let upgrader = {
            let w = w.clone();
            thread::spawn(move || {
                // Upgradable read: the slot, its announcement, then the
                // shared data lock.
                w.kernel.lock().unwrap().slot = true;
                w.slot_count.fetch_add(1, SeqCst);
                while !try_shared(&w) {
                    thread::yield_now();
                }
                let read = w.version.load(SeqCst);
                // Upgrade: the gate and its announcement, then the flock
                // conversion, which drops the shared lock before it waits.
                w.kernel.lock().unwrap().gate = true;
                w.gate_count.fetch_add(1, SeqCst);
                unlock_shared(&w);
                while !try_exclusive(&w) {
                    thread::yield_now();
                }
                assert_eq!(
                    w.version.load(SeqCst),
                    read,
                    "a write slipped into the upgrade"
                );
                unlock_exclusive(&w);
                let _ = w
                    .gate_count
                    .fetch_update(SeqCst, SeqCst, |v| v.checked_sub(1));
                let _ = w
                    .slot_count
                    .fetch_update(SeqCst, SeqCst, |v| v.checked_sub(1));
                let mut k = w.kernel.lock().unwrap();
                k.gate = false;
                k.slot = false;
            })
        };
        // The fast-path writer: LOCK_EX|LOCK_NB, then the slot count alone
        // (it passes writers queued at the gate; no fence: the kernel's
        // lock orders the load, see `hint::after_grant`).
        if try_exclusive(&w) {
            if w.slot_count.load(SeqCst) == 0 {
                w.version.fetch_add(1, SeqCst);
            }
            unlock_exclusive(&w);
        }
        upgrader.join().unwrap();
    });
}

/// A handle that checked the path before `remove_and_unlock` removed the
/// file and then acquires the old file sees the bump, so it never holds the
/// old file believing it is still at the path.
#[test]
fn an_acquirer_after_remove_and_unlock_sees_the_removal() {
    loom::model(|| {
        let w = Arc::new(World::default());
        let remover = {
            let w = w.clone();
            thread::spawn(move || {
                if try_exclusive(&w) {
                    // The unlink (a new file appears at the path later),
                    // the bump, then the release.
                    w.path.store(1, SeqCst);
                    w.removed.fetch_add(1, SeqCst);
                    unlock_exclusive(&w);
                }
            })
        };
        // The stale handle verified the old file with removed == 0.
        let cached = 0;
        if try_exclusive(&w) {
            let skip = w.removed.load(SeqCst) == cached;
            if skip {
                assert_eq!(
                    w.path.load(SeqCst),
                    0,
                    "skipped the path check on a removed file"
                );
            }
            unlock_exclusive(&w);
        }
        remover.join().unwrap();
    });
}
