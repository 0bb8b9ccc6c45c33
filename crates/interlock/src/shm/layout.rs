//! The bytes of a shared-memory lock: a versioned header, the lock words and
//! a table of owner slots, one cache line each.
//!
//! Why it is built this way: the file outlives any one version of this
//! library and may be opened by a process that did not create it. A file
//! that is not ours, was cut short or was written by another layout version
//! must be refused with a typed error before a single atomic is touched,
//! never misread (reading past the end of a mapped file is SIGBUS, and a
//! foreign word read as a lock state is undefined behaviour of the protocol).
//! So the header carries a magic, a layout version, the geometry and a
//! checksum, and is checked against the file's real size first.
//!
//! ```text
//! offset  size        what
//! 0       128         header (immutable after creation; see `Header`)
//! 128     128         Words: state (u32 futex word), high (u32), token
//!                     queue (u32 futex word), readers' turn (u32 futex
//!                     word), padding
//! 256     128 * n     Slot[n]: owner (u64), held (u32), tid (u32), live (u32),
//!                     spare (u32), robust-list entry (24..72), padding
//! ...     128 * w     semaphore, version 2 only: Slot[w], the watch table
//!                     (w = WATCH_SLOTS; see shm/permits.rs)
//! ```
//!
//! Versions: 1 for every kind (a semaphore of version 1 has no watch
//! table: its waiters poll for dead holders, and this library still opens
//! it so); 2 for a semaphore with the watch table, which a version-1 reader
//! refuses by its version field.
//!
//! Header fields (little-endian):
//!
//! | offset | type | field |
//! |---|---|---|
//! | 0 | [u8; 8] | magic `ILCKSHM\0` |
//! | 8 | u32 | layout version ([`VERSION`]; [`SEM_VERSION`] for a semaphore with a watch table) |
//! | 12 | u32 | kind: 1 = rwlock, 2 = mutex, 3 = semaphore |
//! | 16 | u32 | number of slots |
//! | 20 | u32 | slot size (128) |
//! | 24 | u32 | offset of the words (128) |
//! | 28 | u32 | offset of the slots (256) |
//! | 32 | u64 | total length of the file |
//! | 40 | u64 | PID namespace of the creator (inode of /proc/self/ns/pid; 0 = unknown) |
//! | 48 | u32 | FNV-1a checksum of bytes 0..48 |
//!
//! Each slot fills its own 128-byte block (two cache lines, because x86
//! prefetches lines in pairs), so readers on different CPUs never write to
//! the same line.

use crate::sync::{AtomicU32, AtomicU64};

/// The magic at offset 0.
pub const MAGIC: [u8; 8] = *b"ILCKSHM\0";
/// The layout version this library writes for rwlocks and mutexes (and
/// reads for every kind).
pub const VERSION: u32 = 1;
/// The layout version of a semaphore with a watch table (what this library
/// creates for a semaphore).
pub const SEM_VERSION: u32 = 2;
/// The watch slots of a version-2 semaphore: one per process that holds
/// permits (more processes than this go uncovered, and their permits'
/// waiters poll).
pub const WATCH_SLOTS: u32 = 128;
/// Bytes of header before the words.
pub const HEADER_LEN: usize = 128;
/// Where [`Words`] live.
pub const WORDS_OFFSET: usize = 128;
/// Where the slot table starts.
pub const SLOTS_OFFSET: usize = 256;
/// The size of one slot.
pub const SLOT_SIZE: usize = 128;
/// The most slots a lock can have (the state word has 12 bits of index).
pub const MAX_SLOTS: u32 = (INDEX_MASK) - 1;
/// The fewest slots a lock can have.
pub const MIN_SLOTS: u32 = 1;

// ---- The state word (`Words::state`), a futex word. ----
//
// | bits   | name        | meaning |
// |--------|-------------|---------|
// | 0..12  | index       | 1 + slot of the token holder (writer or upgradable reader); 0 = none |
// | 12     | WRITER      | the token holder wants or has exclusive access: readers stay out |
// | 13     | UPGRADABLE  | the token holder is an upgradable reader (readers may enter) |
// | 14     | POISON      | a writer died holding the lock; kept until cleared by a writer |
// | 15     | WAITERS     | someone sleeps on the state word: wake on release |
// | 16     | DRAIN_SLEEP | the writer sleeps on a slot's `held`: readers leaving must wake it |
// | 17     | TOKEN_SLEEP | a token waiter (writer, upgradable reader) sleeps on `Words::queue` |
// | 18     | TURN        | the token was last released by a writer that woke sleeping readers: the next writer lets them in first |
//
// Combinations: index == 0 implies neither WRITER nor UPGRADABLE (the token
// is free). WRITER and UPGRADABLE are never both set. POISON may be set with
// anything.

/// Mask of the token holder's slot index + 1.
pub const INDEX_MASK: u32 = 0x0fff;
/// The token holder wants or has exclusive access.
pub const WRITER: u32 = 1 << 12;
/// The token holder is an upgradable reader.
pub const UPGRADABLE: u32 = 1 << 13;
/// A writer died holding the lock.
pub const POISON: u32 = 1 << 14;
/// Someone sleeps on the state word.
pub const WAITERS: u32 = 1 << 15;
/// A writer sleeps on some slot's `held` word.
pub const DRAIN_SLEEP: u32 = 1 << 16;
/// A token waiter (writer or upgradable reader) sleeps on [`Words::queue`]:
/// a release must wake one.
pub const TOKEN_SLEEP: u32 = 1 << 17;
/// A writer's release woke readers that slept behind it: the next writer
/// to take the token lets them in before it shuts readers out (see
/// `Core::readers_turn`). Cleared by whoever takes the token next.
pub const TURN: u32 = 1 << 18;

// ---- The readers' turn word (`Words::turn`), a futex word: the number of
// readers that are waiting behind a writer (bits 0..31), and `TURN_SLEEP`,
// set by a writer that sleeps until that number falls to 0. A hint: a
// reader killed while counted leaves it too high, which costs the next
// writer at most its readers' turn (`ShmOptions::readers_turn`, 1 ms by
// default) once (it then resets the word).

/// The readers counted in [`Words::turn`].
pub const TURN_COUNT: u32 = 0x7fff_ffff;
/// A writer sleeps on [`Words::turn`]: the reader that brings the count to
/// 0 must wake it.
pub const TURN_SLEEP: u32 = 1 << 31;

// ---- The liveness word (`Slot::live`), a robust futex word: the linking
// thread's tid, `LIVE_WAITERS` set by a sleeper, `LIVE_OWNER_DIED` set by
// the kernel when that thread dies (see `sys::robust`).

/// The kernel's `FUTEX_OWNER_DIED`.
pub const LIVE_OWNER_DIED: u32 = crate::sys::robust::FUTEX_OWNER_DIED;
/// The kernel's `FUTEX_WAITERS`.
pub const LIVE_WAITERS: u32 = crate::sys::robust::FUTEX_WAITERS;
/// The kernel's `FUTEX_TID_MASK`.
pub const LIVE_TID_MASK: u32 = crate::sys::robust::FUTEX_TID_MASK;

/// The lock words, on their own cache lines.
#[repr(C, align(128))]
pub struct Words {
    /// The state word (see the table above); also the futex that readers
    /// and token waiters sleep on.
    pub state: AtomicU32,
    /// One past the highest slot ever claimed: writers scan slots below it.
    pub high: AtomicU32,
    /// The token queue (offset 8): a sequence number that token waiters
    /// sleep on and that a release bumps before it wakes one of them (0 in
    /// files of versions that did not have it, which never used it).
    pub queue: AtomicU32,
    /// The readers' turn (offset 12): how many readers wait behind a
    /// writer, and [`TURN_SLEEP`] (0 in files of versions that did not
    /// have it, whose readers are not counted: a writer then gives them no
    /// turn).
    pub turn: AtomicU32,
}

/// One owner slot: claimed by a thread (or shared by a process's threads
/// once slots run out), it names the owning process and counts the read
/// holds taken through it. The token holder is named by its slot index.
#[repr(C, align(128))]
pub struct Slot {
    /// The owner's packed identity ([`pack`]), 0 when free, or a
    /// reclaimer's identity with [`RECLAIMING`] while it is being freed.
    pub owner: AtomicU64,
    /// Read holds taken through this slot; also the futex a draining writer
    /// sleeps on.
    pub held: AtomicU32,
    /// The id of the thread whose robust list this slot's `live` word is
    /// linked into (set before `live`; read to confirm a death notice).
    pub tid: AtomicU32,
    /// The liveness word (offset 16): the linking thread's tid while the
    /// slot is linked into that thread's robust list, 0 when not (an
    /// uncovered slot: its waiters poll). The kernel sets
    /// `FUTEX_OWNER_DIED` here when that thread dies and wakes a sleeper.
    pub live: AtomicU32,
    /// Spare (offset 20).
    pub spare: AtomicU32,
    /// The robust-list entry of `live` (`{prev, next}` at offsets 40..56
    /// with glibc's x86-64 `futex_offset` of -32), with room around it for
    /// other offsets; written only through `sys::robust`.
    pub entry: [AtomicU64; 6],
}

#[cfg(not(loom))]
const _: () = {
    assert!(std::mem::size_of::<Words>() == SLOTS_OFFSET - WORDS_OFFSET);
    assert!(std::mem::size_of::<Slot>() == SLOT_SIZE);
    assert!(std::mem::offset_of!(Words, queue) == 8);
    assert!(std::mem::offset_of!(Words, turn) == 12);
    assert!(std::mem::offset_of!(Slot, live) == 16);
    assert!(std::mem::offset_of!(Slot, entry) == 24);
};

impl Words {
    /// Fresh words (for the model checker and tests; a mapping starts zeroed).
    pub fn new() -> Words {
        Words {
            state: AtomicU32::new(0),
            high: AtomicU32::new(0),
            queue: AtomicU32::new(0),
            turn: AtomicU32::new(0),
        }
    }
}

impl Default for Words {
    fn default() -> Self {
        Words::new()
    }
}

impl Slot {
    /// A free slot (for the model checker and tests).
    pub fn new() -> Slot {
        Slot {
            owner: AtomicU64::new(0),
            held: AtomicU32::new(0),
            tid: AtomicU32::new(0),
            live: AtomicU32::new(0),
            spare: AtomicU32::new(0),
            entry: [
                AtomicU64::new(0),
                AtomicU64::new(0),
                AtomicU64::new(0),
                AtomicU64::new(0),
                AtomicU64::new(0),
                AtomicU64::new(0),
            ],
        }
    }
}

impl Default for Slot {
    fn default() -> Self {
        Slot::new()
    }
}

// ---- Owner identities, packed into one u64 so they are stored atomically.
//
// | bits   | field |
// |--------|-------|
// | 0      | RECLAIMING: the named process is freeing this slot |
// | 1      | MEMBARRIER: the process is registered for membarrier's |
// |        | GLOBAL_EXPEDITED barriers (0 in files of older versions, |
// |        | and when registration was refused: "unknown, poll") |
// | 2..24  | pid (22 bits; Linux's PID_MAX_LIMIT is 2^22) |
// | 24..64 | start time in clock ticks (40 bits: 348 years at 100 Hz) |
//
// A pid is never 0, so a packed identity is never 0 (0 = free slot).

/// Flag: the owner field names a reclaimer, not an owner.
pub const RECLAIMING: u64 = 1;
/// Flag: the owning process is registered for
/// `MEMBARRIER_CMD_GLOBAL_EXPEDITED` barriers (`sys::membarrier`), so a
/// draining writer's barrier orders its threads' own-slot releases and the
/// writer may sleep behind them until woken. Older versions never set it
/// (the bit was reserved, always 0) and ignore it (`unpack`): 0 means
/// "unknown: keep the drain's short slice".
pub const MEMBARRIER: u64 = 2;
const PID_BITS: u32 = 22;
const START_BITS: u32 = 40;

/// Packs a process identity into a slot owner word.
pub fn pack(pid: u32, start_time: u64) -> u64 {
    let pid = u64::from(pid) & ((1 << PID_BITS) - 1);
    let start = start_time & ((1 << START_BITS) - 1);
    (start << 24) | (pid << 2)
}

/// The pid and start time of a packed owner word (the flags are ignored).
pub fn unpack(owner: u64) -> (u32, u64) {
    let pid = ((owner >> 2) & ((1 << PID_BITS) - 1)) as u32;
    let start = owner >> 24;
    (pid, start)
}

/// What kind of lock a file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A [`crate::ShmRwLock`].
    RwLock = 1,
    /// A [`crate::ShmMutex`].
    Mutex = 2,
    /// A [`crate::Semaphore`] (its slots are the permits).
    Semaphore = 3,
}

impl Kind {
    fn from_u32(v: u32) -> Option<Kind> {
        match v {
            1 => Some(Kind::RwLock),
            2 => Some(Kind::Mutex),
            3 => Some(Kind::Semaphore),
            _ => None,
        }
    }

    /// A name for error messages.
    pub fn name(self) -> &'static str {
        match self {
            Kind::RwLock => "ShmRwLock",
            Kind::Mutex => "ShmMutex",
            Kind::Semaphore => "Semaphore",
        }
    }
}

/// The immutable header of a lock file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The lock kind.
    pub kind: Kind,
    /// Number of slots.
    pub slots: u32,
    /// The creator's PID namespace (0 = unknown): pids in the slots are
    /// only meaningful there.
    pub pid_ns: u64,
    /// Watch slots after the slots: [`WATCH_SLOTS`] in a version-2
    /// semaphore, else 0.
    pub watch: u32,
}

fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in bytes {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

impl Header {
    /// The total length of a lock with this header.
    pub fn total_len(&self) -> usize {
        SLOTS_OFFSET + (self.slots as usize + self.watch as usize) * SLOT_SIZE
    }

    /// The version this header is written with.
    pub fn version(&self) -> u32 {
        if self.watch != 0 {
            SEM_VERSION
        } else {
            VERSION
        }
    }

    /// The header's bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version().to_le_bytes());
        b[12..16].copy_from_slice(&(self.kind as u32).to_le_bytes());
        b[16..20].copy_from_slice(&self.slots.to_le_bytes());
        b[20..24].copy_from_slice(&(SLOT_SIZE as u32).to_le_bytes());
        b[24..28].copy_from_slice(&(WORDS_OFFSET as u32).to_le_bytes());
        b[28..32].copy_from_slice(&(SLOTS_OFFSET as u32).to_le_bytes());
        b[32..40].copy_from_slice(&(self.total_len() as u64).to_le_bytes());
        b[40..48].copy_from_slice(&self.pid_ns.to_le_bytes());
        let sum = fnv1a(&b[0..48]);
        b[48..52].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Parses and checks a header read from a file of `file_len` bytes; the
    /// error is a detail for an [`crate::ErrorKind::Corrupt`] error.
    pub fn decode(b: &[u8], file_len: u64) -> Result<Header, String> {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        if b.len() < 52 {
            return Err(format!(
                "file is {file_len} bytes, too short for a lock header"
            ));
        }
        if b[0..8] != MAGIC {
            return Err("not an interlock shared-memory lock (bad magic)".into());
        }
        let version = u32_at(8);
        if version != VERSION && !(version == SEM_VERSION && u32_at(12) == Kind::Semaphore as u32) {
            return Err(format!(
                "layout version {version}, this library reads version {VERSION} \
                 (and {SEM_VERSION} for a semaphore)"
            ));
        }
        if u32_at(48) != fnv1a(&b[0..48]) {
            return Err("header checksum mismatch".into());
        }
        let kind = Kind::from_u32(u32_at(12))
            .ok_or_else(|| format!("unknown lock kind {}", u32_at(12)))?;
        let slots = u32_at(16);
        if !(MIN_SLOTS..=MAX_SLOTS).contains(&slots)
            || u32_at(20) != SLOT_SIZE as u32
            || u32_at(24) != WORDS_OFFSET as u32
            || u32_at(28) != SLOTS_OFFSET as u32
        {
            return Err("header geometry is not this layout's".into());
        }
        let pid_ns = u64::from_le_bytes(b[40..48].try_into().unwrap());
        let h = Header {
            kind,
            slots,
            pid_ns,
            watch: if version == SEM_VERSION {
                WATCH_SLOTS
            } else {
                0
            },
        };
        let total = u64::from_le_bytes(b[32..40].try_into().unwrap());
        if total != h.total_len() as u64 {
            return Err("header length field disagrees with its geometry".into());
        }
        if file_len != total {
            return Err(format!(
                "file is {file_len} bytes, its header says {total} (truncated or extended?)"
            ));
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_round_trips_and_rejects_damage() {
        let h = Header {
            kind: Kind::RwLock,
            slots: 64,
            pid_ns: 4026531836,
            watch: 0,
        };
        let b = h.encode();
        let len = h.total_len() as u64;
        assert_eq!(Header::decode(&b, len), Ok(h));
        assert!(Header::decode(&b, len - 1)
            .unwrap_err()
            .contains("truncated"));
        assert!(Header::decode(&b[..10], 10)
            .unwrap_err()
            .contains("too short"));
        let mut bad = b;
        bad[0] = b'X';
        assert!(Header::decode(&bad, len).unwrap_err().contains("magic"));
        let mut bad = b;
        bad[8] = 9;
        assert!(Header::decode(&bad, len).unwrap_err().contains("version 9"));
        // Version 2 is a semaphore's only, and has the watch table.
        let mut bad = b;
        bad[8] = 2;
        assert!(Header::decode(&bad, len).unwrap_err().contains("version 2"));
        let sem = Header {
            kind: Kind::Semaphore,
            slots: 3,
            pid_ns: 7,
            watch: WATCH_SLOTS,
        };
        let sb = sem.encode();
        assert_eq!(sb[8], 2);
        let sl = sem.total_len() as u64;
        assert_eq!(
            sl,
            (SLOTS_OFFSET + (3 + WATCH_SLOTS as usize) * SLOT_SIZE) as u64
        );
        assert_eq!(Header::decode(&sb, sl), Ok(sem));
        // A version-1 semaphore (no watch table) still opens.
        let old = Header { watch: 0, ..sem };
        assert_eq!(
            Header::decode(&old.encode(), old.total_len() as u64),
            Ok(old)
        );
        let mut bad = b;
        bad[17] ^= 1;
        assert!(Header::decode(&bad, len).unwrap_err().contains("checksum"));
    }

    proptest! {
        #[test]
        fn identity_packs_losslessly(pid in 1u32..(1 << 22), start in 0u64..(1 << 40)) {
            let w = pack(pid, start);
            prop_assert!(w != 0);
            prop_assert_eq!(w & RECLAIMING, 0);
            prop_assert_eq!(unpack(w), (pid, start));
            prop_assert_eq!(unpack(w | RECLAIMING), (pid, start));
        }

        #[test]
        fn any_byte_damage_is_detected(i in 0usize..52, x in 1u8..=255) {
            let h = Header { kind: Kind::Mutex, slots: 8, pid_ns: 7, watch: 0 };
            let mut b = h.encode();
            b[i] ^= x;
            prop_assert!(Header::decode(&b, h.total_len() as u64).is_err());
        }
    }
}
