//! Host-local hints for [`FileLock`](super::FileLock): a small table in
//! shared memory that lets the uncontended path skip the system calls that
//! only matter under contention or after a removal.
//!
//! Why it is built this way: a reader that prefers writers must know whether
//! a writer waits, and every acquisition must know whether the lock file is
//! still the one at the path. Asking the kernel costs a system call each (a
//! gate request or `F_OFD_GETLK`, and an `lstat`), as much as the lock call
//! itself. Most of the time the answer is "nothing changed", and memory
//! that every user of the file maps can say so for the price of a load:
//!
//! - `gate`'s low 16 bits: how many holders of the gate byte (writers past
//!   the gate, an upgrade in progress) announced themselves. A reader that
//!   finds it zero *after* its data lock was granted (the kernel's lock on
//!   the inode orders the two, see [`after_grant`]) knows
//!   that any writer that shuts the gate later will find it holding the data
//!   and wait for it, which is what the `F_OFD_GETLK` look told it before.
//! - `gate`'s high 16 bits: a patient writer's *stamp*, the end of its
//!   patience on this host's monotonic clock (in units of 2^16 ns, modulo
//!   2^16). Such a writer holds the gate in the kernel already; readers that
//!   look at the hints still come in until the stamp passes, and then treat
//!   it as an announced gate holder, so they stop coming in the moment the
//!   patience ends instead of when the waiting writer is next scheduled
//!   (see [`Hint::place_stamp`]). The stamp only decides *when* readers stop
//!   entering; a writer still announces itself in the count when its own
//!   timer says the patience is over.
//! - `slot`: how many upgradable readers announced themselves (flock
//!   flavor; slow-path writers hold the slot byte but do not announce it).
//!   A flock-flavor writer that got `LOCK_EX` and finds it zero knows no
//!   upgrader is inside its non-atomic conversion, and keeps the lock even
//!   while writers wait at the gate.
//! - `slot`'s high 16 bits: how many readers announced that they wait
//!   (behind a writer, both flavors; see [`Hint::enter_queue`]). A writer
//!   that got the data at once and finds them nonzero gives it back to them
//!   if the kernel confirms they wait (their shared lock on the queue byte).
//!   This count only decides who goes first, never who may enter.
//! - `removed`: bumped by `remove_and_unlock` after the unlink, before the
//!   release; and one table-wide count of lock-file opens (a newcomer that
//!   opens the path after some other removal makes a new file there). An
//!   acquirer that sees both as they were at its last path check knows no
//!   removal was announced and no file was opened since, and skips the
//!   `lstat`.
//!
//! Hints can only be pessimistic in effect: a count that is too high (a
//! holder SIGKILLed before it took its announcement back, or two files that
//! hash to one bucket) sends acquirers down the old path, which asks the
//! kernel; a bumped `removed` costs one `lstat`. The kernel locks stay the
//! only thing that excludes.
//!
//! Trust: the table of files owned by uid U is `/dev/shm/interlock-hints-U`,
//! owned by U, mode 0600, exactly [`LEN`] bytes. Hints are used only for a
//! lock file that no one but its owner (and root) can write, opened by its
//! owner or by root, so every process that can write the lock file (and so
//! take its write lock, gate or slot) uses the same table. A table with
//! another owner, type, mode or size is not used (every lock on U's files
//! then asks the kernel, as before).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::sys::mmap::Mapping;
use crate::sys::proc::euid;

/// Buckets in a table; the last one is not a file's: its third word counts
/// the opens of lock files.
const BUCKETS: usize = 4096;
/// Bytes per bucket: gate (u32: gate holders in the low half, a patient
/// writer's stamp in the high half), slot (u32: upgraders in the low half,
/// queued readers in the high half), removed (u64).
const BUCKET_LEN: usize = 16;
/// The table's exact size.
pub const LEN: usize = BUCKETS * BUCKET_LEN;
/// The table's count of opens.
const OPENS_AT: usize = (BUCKETS - 1) * BUCKET_LEN + 8;
/// Where tables live.
const DIR: &str = "/dev/shm";

/// One user's table, mapped.
pub(crate) struct Table {
    map: Mapping,
}

/// A lock file's bucket in its owner's table.
#[derive(Clone)]
pub(crate) struct Hint {
    table: Arc<Table>,
    at: usize,
}

impl std::fmt::Debug for Hint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hint(bucket {})", self.at / BUCKET_LEN)
    }
}

impl Hint {
    fn gate_word(&self) -> &AtomicU32 {
        self.table.map.get(self.at)
    }

    fn slot_word(&self) -> &AtomicU32 {
        self.table.map.get(self.at + 4)
    }

    fn removed_word(&self) -> &AtomicU64 {
        self.table.map.get(self.at + 8)
    }

    /// Whether no gate holder announced itself. The caller has just been
    /// granted its data lock, which the kernel orders before this load (see
    /// [`after_grant`]).
    ///
    /// A patient writer's stamp decides while there is one: readers come
    /// in until it passes, whatever the count says. The count can then only
    /// be stale (a writer killed past the gate) or another file's: a writer
    /// or upgrader of this file past the gate holds the slot, so no writer
    /// of this file can be patient meanwhile.
    #[inline]
    pub fn gate_clear(&self) -> bool {
        let w = self.gate_word().load(Ordering::SeqCst);
        if w == 0 {
            return true;
        }
        match w >> STAMP_SHIFT {
            0 => false,
            stamp => !stamp_passed(stamp),
        }
    }

    /// The slot word: see [`upgraders`] and [`queued`]. The caller has
    /// just been granted `LOCK_EX` or the data, which the kernel orders
    /// before this load.
    #[inline]
    pub fn slot_announced(&self) -> u32 {
        self.slot_word().load(Ordering::SeqCst)
    }

    /// Announces a reader about to wait behind a writer; the caller holds a
    /// shared lock on the queue byte from before this until after
    /// [`Hint::leave_queue`], which is what a writer asks the kernel about.
    pub fn enter_queue(&self) {
        self.slot_word().fetch_add(QUEUED_ONE, Ordering::SeqCst);
    }

    /// Takes a queued reader's announcement back (never below zero, never
    /// touching the upgraders' half).
    pub fn leave_queue(&self) {
        let _ = self
            .slot_word()
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                v.checked_sub(QUEUED_ONE)
            });
    }

    /// Forgets queued readers that the kernel says are not there (each left
    /// by a reader killed while it waited), if the word is still `seen`. A
    /// live reader whose announcement this erases is only not given way to
    /// this once.
    pub fn forget_queue(&self, seen: u32) {
        let _ = self.slot_word().compare_exchange(
            seen,
            seen & UPGRADERS,
            Ordering::SeqCst,
            Ordering::Relaxed,
        );
    }

    /// Announces a gate holder (the caller holds the gate, or is about to
    /// convert under it). Undo with [`Hint::leave_gate`].
    ///
    /// The count saturates at 65,535 (stale announcements of killed
    /// writers), as the upgraders' count does, and never reaches the stamp.
    pub fn enter_gate(&self) {
        raise_low_half(self.gate_word());
    }

    /// Takes an announcement back (never below zero: a count that a
    /// hostile or buggy writer lowered must not wrap to "always busy";
    /// never from a full count; never touching the stamp).
    pub fn leave_gate(&self) {
        lower_low_half(self.gate_word());
    }

    /// A patient writer that holds the gate in the kernel (and the slot, so
    /// it is the only one of its file) says until when readers that look at
    /// the hints may still come in: `deadline_ns` on
    /// [`monotonic_ns`](crate::sys::timer::monotonic_ns). Returns the stamp
    /// to take back with [`Hint::clear_stamp`]. A stamp already in the
    /// bucket is replaced: holding its file's slot, the caller knows it is
    /// not its file's, so it was left by a writer killed while it waited
    /// (and left alone, it would shut this file's readers out early, since
    /// this writer holds the gate), or it belongs to a file sharing the
    /// bucket, whose writer's own timer then ends its patience as before
    /// stamps.
    pub fn place_stamp(&self, deadline_ns: u64) -> u32 {
        // Rounded up, so that no reader stops early; 0 means "no stamp".
        let stamp = ((deadline_ns.div_ceil(STAMP_UNIT_NS)) as u32 & STAMP_MASK).max(1);
        let _ = self
            .gate_word()
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                Some(v & GATE_COUNT | stamp << STAMP_SHIFT)
            });
        stamp
    }

    /// Takes a stamp back, if it is still the one placed.
    pub fn clear_stamp(&self, stamp: u32) {
        let _ = self
            .gate_word()
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                (v >> STAMP_SHIFT == stamp).then_some(v & GATE_COUNT)
            });
    }

    /// Clears a stamp that has passed, for a reader that holds the gate
    /// shared (so no writer of its file is past the gate): the stamp is
    /// another file's or a killed writer's, and it would otherwise send
    /// every reader of the bucket down the slow path. A live writer of
    /// another file whose stamp this erases still shuts its readers out
    /// when its own timer runs out.
    pub fn forget_passed_stamp(&self) {
        let w = self.gate_word().load(Ordering::SeqCst);
        let stamp = w >> STAMP_SHIFT;
        if stamp != 0 && stamp_passed(stamp) {
            self.clear_stamp(stamp);
        }
    }

    /// Announces an upgradable reader. The low half saturates: once 65,535
    /// announcements are left raised (upgraders killed before they took
    /// theirs back), it stays full, which costs writers a system call but
    /// never lets one miss an upgrader.
    pub fn enter_slot(&self) {
        raise_low_half(self.slot_word());
    }

    /// Takes an upgradable reader's announcement back (never below zero,
    /// never from a full low half).
    pub fn leave_slot(&self) {
        lower_low_half(self.slot_word());
    }

    fn opens_word(&self) -> &AtomicU64 {
        self.table.map.get(OPENS_AT)
    }

    /// The removal counter of the bucket and the table's count of opens,
    /// read after an acquisition: if neither moved since the last path
    /// check, no removal was announced and no lock file was opened (or
    /// made anew) since.
    #[inline]
    pub fn epoch(&self) -> (u64, u64) {
        (
            self.removed_word().load(Ordering::SeqCst),
            self.opens_word().load(Ordering::SeqCst),
        )
    }

    /// Tells every handle that a lock file was opened: perhaps a new file
    /// at a path whose old file others still have open.
    pub fn note_open(&self) {
        self.opens_word().fetch_add(1, Ordering::SeqCst);
    }

    /// Tells every user of the bucket that a file it may hold was removed.
    pub fn bump_removed(&self) {
        self.removed_word().fetch_add(1, Ordering::SeqCst);
    }
}

/// The gate word's half that counts announced gate holders.
const GATE_COUNT: u32 = 0xFFFF;
/// Where the gate word's stamp starts, and its width.
const STAMP_SHIFT: u32 = 16;
const STAMP_MASK: u32 = 0xFFFF;
/// One tick of a stamp: 2^16 ns, so stamps wrap every 4.3 s and one is
/// "passed" for 2.1 s after its time, then "not yet" for 2.1 s.
const STAMP_UNIT_NS: u64 = 1 << 16;
/// The longest patience a stamp stands for (well inside half the wrap);
/// a longer one is left to the writer's timer alone.
pub const STAMPED_PATIENCE_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether the stamp's time has come (a clock read; only when a patient
/// writer waits). Modular: within 2.1 s after it, yes; within 2.1 s
/// before it, no.
#[cold]
fn stamp_passed(stamp: u32) -> bool {
    let now = (crate::sys::timer::monotonic_ns() / STAMP_UNIT_NS) as u32 & STAMP_MASK;
    now.wrapping_sub(stamp) & STAMP_MASK < 0x8000
}

/// Raises the count in the low half of `w`, saturating at 65,535 (stale
/// announcements of killed holders then keep it full: it costs a system
/// call, never hides a holder) and never touching the high half.
fn raise_low_half(w: &AtomicU32) {
    let _ = w.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
        (v & UPGRADERS != UPGRADERS).then_some(v + 1)
    });
}

/// Lowers the count in the low half of `w`: never below zero (a count that
/// a hostile or buggy holder lowered must not wrap to "always busy"), never
/// from a full count, never touching the high half.
fn lower_low_half(w: &AtomicU32) {
    let _ = w.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
        let n = v & UPGRADERS;
        (n != 0 && n != UPGRADERS).then(|| v - 1)
    });
}

/// The slot word's half that counts upgradable readers.
pub const UPGRADERS: u32 = 0xFFFF;
/// One queued reader in the slot word's high half.
const QUEUED_ONE: u32 = 1 << 16;

/// Whether a slot word says an upgradable reader may be converting.
#[inline]
pub fn upgraders(slot: u32) -> bool {
    slot & UPGRADERS != 0
}

/// Whether a slot word says readers wait behind a writer.
#[inline]
pub fn queued(slot: u32) -> bool {
    slot >= QUEUED_ONE
}

/// What orders a kernel grant before the hint loads that follow it: the
/// kernel itself. Every lock request on an inode (a try, a blocking request
/// when it is granted or queued, a test with `F_OFD_GETLK`, an unlock, for
/// flock and fcntl locks alike) runs under that inode's lock-context
/// spinlock, so the kernel's critical sections on one file are totally
/// ordered, each acquiring what the previous released. A writer announces
/// (a SeqCst RMW on the hint) *before* its own request on the file; a reader
/// loads the hint *after* its grant. If the reader's grant came after the
/// writer's request, the writer's release of the kernel's lock made the
/// announcement visible to the reader's acquisition of it, so the load sees
/// it; if it came before, the writer's request sees the reader's lock and
/// waits for it. Either way, no store-load fence is needed in user space
/// (loom checks the three hint protocols with the kernel as a mutex and no
/// fence: `tests/loom_file_hint.rs`). The system call is opaque to the
/// compiler; the compiler fence only says so.
#[inline]
pub fn after_grant() {
    std::sync::atomic::compiler_fence(Ordering::SeqCst);
}

/// The hint for a lock file with this (dev, ino), owner and mode, or `None`
/// when hints cannot be used for it. An unexpected I/O error (other than
/// "no such directory" or a table that is not ours) is returned: the other
/// users of the file may be using the table, and a writer that silently
/// did not would make their hints lie.
pub(crate) fn for_file(id: (u64, u64), owner: u32, mode: u32) -> io::Result<Option<Hint>> {
    if mode & 0o022 != 0 {
        return Ok(None);
    }
    let me = euid();
    if me != owner && me != 0 {
        return Ok(None);
    }
    let Some(table) = table(owner)? else {
        return Ok(None);
    };
    let h = id.1 ^ id.0.rotate_left(32);
    let b = (h.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 52) as usize % (BUCKETS - 1);
    Ok(Some(Hint {
        table,
        at: b * BUCKET_LEN,
    }))
}

/// The tables this process has mapped, by owner.
type Tables = Mutex<Vec<(u32, Arc<Table>)>>;

fn table(owner: u32) -> io::Result<Option<Arc<Table>>> {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    let tables = TABLES.get_or_init(|| Mutex::new(Vec::new()));
    let mut tables = tables.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, t)) = tables.iter().find(|(u, _)| *u == owner) {
        return Ok(Some(t.clone()));
    }
    let Some(t) = open_table(owner)? else {
        return Ok(None);
    };
    let t = Arc::new(t);
    tables.push((owner, t.clone()));
    Ok(Some(t))
}

fn table_path(owner: u32) -> PathBuf {
    PathBuf::from(format!("{DIR}/interlock-hints-{owner}"))
}

fn open_existing(path: &PathBuf) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
}

fn open_table(owner: u32) -> io::Result<Option<Table>> {
    let path = table_path(owner);
    let file = match open_existing(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => match create_table(owner, &path)? {
            Some(f) => f,
            None => return Ok(None),
        },
        // A symbolic link, a FIFO without a reader... planted by someone:
        // not our table.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENXIO)) => {
            return Ok(None)
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Ok(None),
        Err(e) => return Err(e),
    };
    let m = file.metadata()?;
    if !m.file_type().is_file() || m.uid() != owner || m.mode() & 0o077 != 0 {
        return Ok(None);
    }
    if m.len() != LEN as u64 {
        return Ok(None);
    }
    Ok(Some(Table {
        map: Mapping::shared_file(&file, LEN)?,
    }))
}

/// Makes the table complete under a private name and links it into place,
/// so nobody sees it half made. `Ok(None)` if /dev/shm is not there or not
/// writable.
fn create_table(owner: u32, path: &PathBuf) -> io::Result<Option<File>> {
    static SERIAL: AtomicU32 = AtomicU32::new(0);
    let tmp = PathBuf::from(format!(
        "{DIR}/.interlock-hints-{owner}.{}.{}",
        std::process::id(),
        SERIAL.fetch_add(1, Ordering::Relaxed)
    ));
    let f = match OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
    {
        Ok(f) => f,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied
            ) || e.raw_os_error() == Some(libc::EROFS) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    let made = (|| {
        f.set_len(LEN as u64)?;
        if euid() != owner {
            std::os::unix::fs::fchown(&f, Some(owner), None)?;
        }
        match std::fs::hard_link(&tmp, path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    match made? {
        true => Ok(Some(f)),
        // Another process linked its table first: use that one.
        false => match open_existing(path) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket() -> Hint {
        let map = Mapping::shared_anonymous(LEN).unwrap();
        Hint {
            table: Arc::new(Table { map }),
            at: 0,
        }
    }

    fn now() -> u64 {
        crate::sys::timer::monotonic_ns()
    }

    #[test]
    fn a_stamp_lets_readers_in_until_it_passes_then_counts_as_a_gate_holder() {
        let h = bucket();
        assert!(h.gate_clear());
        let s = h.place_stamp(now() + 500_000_000);
        assert!(h.gate_clear(), "before its time a stamp lets readers in");
        // One stamp per bucket: a second writer (another file, or a stale
        // stamp's) replaces it, and the first one's clear then does nothing.
        let t = h.place_stamp(now() + 900_000_000);
        assert_ne!(s, t);
        h.clear_stamp(s);
        assert_eq!(h.gate_word().load(Ordering::SeqCst) >> STAMP_SHIFT, t);
        h.clear_stamp(t);
        let s = h.place_stamp(now().saturating_sub(1_000_000));
        assert!(!h.gate_clear(), "a stamp that has passed shuts readers out");
        // Clearing someone else's stamp does nothing; the placer's does.
        h.clear_stamp(s ^ 1);
        assert!(!h.gate_clear());
        h.clear_stamp(s);
        assert!(h.gate_clear());
    }

    #[test]
    fn the_gate_count_and_the_stamp_never_touch_each_other() {
        let h = bucket();
        let s = h.place_stamp(now() + 500_000_000);
        h.enter_gate();
        assert!(
            h.gate_clear(),
            "a stamp not yet passed decides, not the count"
        );
        h.clear_stamp(s);
        assert!(
            !h.gate_clear(),
            "an announced gate holder shuts readers out"
        );
        let s = h.place_stamp(now() + 500_000_000);
        h.leave_gate();
        h.leave_gate(); // never below zero, never borrowing from the stamp
        assert!(h.gate_clear());
        assert_eq!(h.gate_word().load(Ordering::SeqCst) >> STAMP_SHIFT, s);
        // A full count stays full (stale announcements), below the stamp.
        h.gate_word()
            .store(s << STAMP_SHIFT | (GATE_COUNT - 1), Ordering::SeqCst);
        h.enter_gate();
        h.enter_gate();
        h.leave_gate();
        assert_eq!(
            h.gate_word().load(Ordering::SeqCst),
            s << STAMP_SHIFT | GATE_COUNT
        );
    }

    #[test]
    fn only_a_passed_stamp_is_forgotten() {
        let h = bucket();
        let s = h.place_stamp(now() + 500_000_000);
        h.forget_passed_stamp();
        assert_eq!(h.gate_word().load(Ordering::SeqCst) >> STAMP_SHIFT, s);
        h.clear_stamp(s);
        h.place_stamp(now().saturating_sub(1_000_000));
        h.enter_gate();
        h.forget_passed_stamp();
        assert_eq!(h.gate_word().load(Ordering::SeqCst), 1, "the count stays");
    }

    #[test]
    fn stamps_compare_modulo_their_wrap() {
        let tick = |ns: u64| ((ns / STAMP_UNIT_NS) as u32) & STAMP_MASK;
        let t = tick(now());
        // Just behind now: passed. Just ahead: not yet. Half a wrap
        // behind still counts as passed.
        assert!(stamp_passed(t.wrapping_sub(1) & STAMP_MASK));
        assert!(!stamp_passed((t + 100) & STAMP_MASK));
        assert!(stamp_passed(t.wrapping_sub(0x7000) & STAMP_MASK));
    }
}
