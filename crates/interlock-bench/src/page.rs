//! Layout of the shared stats page: fixed byte offsets, shared with the
//! Python driver (py/driver.py repeats the few it needs; `MAGIC` guards a
//! mismatch).
//!
//! Why it is built this way: workers are separate programs (the harness
//! re-executed, or a Python interpreter), so the page is described by
//! offsets rather than a Rust struct, and every field that workers write
//! concurrently is either private to one worker (its slot) or written only
//! under the lock being measured (the "hot" line). The only fields written
//! by several processes at once are torture counters, updated with atomic
//! read-modify-write by Rust workers only.

use std::sync::atomic::{AtomicU32, AtomicU64};

use crate::sys::SharedPage;

/// Written by the parent at offset 0; checked by every worker.
pub const MAGIC: u64 = 0x494c_4245_4e43_4801;

/// Phase word (u32, futex): see [`Phase`].
pub const PHASE: usize = 64;
/// Last exclusive owner (worker index + 1); written only under the lock.
pub const LAST_OWNER: usize = 128;
/// CLOCK_MONOTONIC ns of the last release (bench: written under the lock by
/// exclusive holders; torture: `fetch_max` by every releaser and the killer).
pub const LAST_RELEASE: usize = 136;

// Torture globals (Rust workers and the parent only).
/// Exclusion violations seen by checkers.
pub const T_VIOLATIONS: usize = 192;
/// Stale occupancy marks of killed workers that checkers ignored.
pub const T_STALE_IGNORED: usize = 200;
/// SIGKILL time of a holder whose recovery is not yet measured (0: none).
pub const T_PENDING_KILL: usize = 208;
/// Mode the killed holder held (1 shared, 2 exclusive).
pub const T_PENDING_MODE: usize = 216;
/// Longest recovery so far (ns).
pub const T_RECOVERY_MAX: usize = 224;
/// Number of recoveries measured.
pub const T_RECOVERY_COUNT: usize = 232;
/// Sum of recovery times (ns).
pub const T_RECOVERY_SUM: usize = 240;
/// Longest stall seen by an acquirer (ns).
pub const T_STALL_MAX: usize = 248;
/// First violation: (checker slot + 1) << 16 | (other slot + 1).
pub const T_FIRST_VIOLATION: usize = 256;
/// Acquisition errors reported by workers (e.g. an unexpected error kind).
pub const T_ERRORS: usize = 264;
/// Acquisitions that reported a dead previous owner (poisoned / EOWNERDEAD).
pub const T_OWNER_DIED: usize = 272;

/// Next write index of the recovery ring.
pub const T_REC_IDX: usize = 280;
/// Ring of the latest recovery times (ns).
pub const T_REC_RING: usize = 1024;
/// Entries in the recovery ring.
pub const T_REC_RING_LEN: usize = 384;

/// Lock objects that live in the page (pthread, raw_sync, futex floors).
pub const LOCK_AREA: usize = 4096;

/// First worker slot.
pub const SLOTS: usize = 8192;
/// Bytes per slot (one cache line).
pub const SLOT_LEN: usize = 64;
/// Most workers a run may have.
pub const MAX_SLOTS: usize = 64;
/// Total page size.
pub const PAGE_LEN: usize = SLOTS + SLOT_LEN * MAX_SLOTS;

// Slot fields (offsets inside a slot).
/// Occupancy state: see [`state`].
pub const S_STATE: usize = 0;
/// Non-zero while the parent is killing this slot's worker: the
/// CLOCK_MONOTONIC ns just before SIGKILL was sent.
pub const S_KILL_NS: usize = 8;
/// When the current wait began (ns).
pub const S_WAIT_START: usize = 16;
/// Acquisitions completed by this slot (all incarnations).
pub const S_ACQ: usize = 24;
/// Barrier acknowledgement (bench): 1 ready, 2 throughput phase done, 3 finished.
pub const S_ACK: usize = 32;
/// Pid of the worker in this slot.
pub const S_PID: usize = 40;
/// How many times the parent began killing this slot's worker (bumped
/// before `S_KILL_NS` is set, never reset).
pub const S_KILLS: usize = 48;
/// Hold parity: odd while the worker holds (bumped right after it marks
/// itself HOLDING and right before it marks itself IDLE; made even by the
/// parent after a kill). Lets a semaphore's checker count only holders
/// that held at one common instant.
pub const S_HOLD_SEQ: usize = 56;

/// Occupancy states of a slot.
pub mod state {
    /// Not waiting, not holding.
    pub const IDLE: u64 = 0;
    /// Waiting for a shared hold.
    pub const WAIT_SH: u64 = 1;
    /// Waiting for an exclusive hold.
    pub const WAIT_EX: u64 = 2;
    /// Holding shared.
    pub const HOLD_SH: u64 = 3;
    /// Holding exclusive.
    pub const HOLD_EX: u64 = 4;
}

/// Values of the phase word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Phase {
    /// Workers set up and wait.
    Setup = 0,
    /// Throughput phase: untimed loop.
    Throughput = 1,
    /// Between phases: workers acknowledge and wait.
    Pause = 2,
    /// Latency phase: timed loop.
    Latency = 3,
    /// Stop.
    Stop = 4,
}

/// Typed accessors over a [`SharedPage`] laid out as above.
pub struct Page<'a>(pub &'a SharedPage);

impl<'a> Page<'a> {
    /// A global u64 field.
    pub fn g(&self, off: usize) -> &'a AtomicU64 {
        self.0.u64_at(off)
    }
    /// The phase word.
    pub fn phase(&self) -> &'a AtomicU32 {
        self.0.u32_at(PHASE)
    }
    /// A field of slot `i`.
    pub fn slot(&self, i: usize, field: usize) -> &'a AtomicU64 {
        assert!(i < MAX_SLOTS);
        self.0.u64_at(SLOTS + i * SLOT_LEN + field)
    }
}
