//! [`FileLock`]: a reader-writer lock named by a path, shared by threads and
//! processes, that does not starve writers.
//!
//! Why it is built this way:
//!
//! - **Kernel locks starve writers.** flock, classic fcntl and OFD fcntl all
//!   grant a new shared lock while a writer waits, so a writer behind readers
//!   that overlap never gets in (measured: seconds; see FACTS.md). We add a
//!   *gate*: a second byte of the same file that a waiting writer holds
//!   exclusively. A reader asks for the gate together with the data and lets
//!   the gate go at once (flock flavor: takes the data, then looks at the
//!   gate with `F_OFD_GETLK` and backs off if it is shut), so a reader
//!   arriving while a writer waits queues behind the writer instead of
//!   overtaking it. A writer shuts the gate only after it has waited its
//!   *patience* (1 ms) for the readers to leave by themselves, so readers
//!   that overlap are not drained for every write. A thread joining
//!   readers of its own process looks at the gate too, or one process's
//!   overlapping threads would starve another's writer.
//! - **Kernel locks let a releaser take the lock straight back**, before
//!   the waiters it woke have run, so a writer that asks again at once
//!   keeps readers out for as long as it likes. A reader that must sleep
//!   behind a writer therefore *queues* (a shared lock on a queue byte and
//!   a count in the hints), and a writer that finds readers queued gives
//!   the data back and waits until they are in.
//! - **flock conversion is not atomic**: the kernel drops the shared lock
//!   before it waits for the exclusive one. So a flock-flavor writer that got
//!   the data without waiting still checks that no upgrader holds the slot
//!   (and no writer the gate), and makes way if one does; otherwise it could
//!   slip into an upgrader's conversion window.
//! - **Two readers both upgrading hang forever** with OFD locks (the kernel has
//!   no deadlock detection for them). An upgradable reader therefore first
//!   takes an exclusive *slot* byte, so at most one holder per file can be
//!   upgrading, and every interlock user takes the bytes in one order
//!   (slot, gate, data) while a reader holds nothing while it waits: interlock
//!   users cannot deadlock among themselves on one file.
//! - **Threads sharing one handle share one open file description**, and the
//!   kernel cannot tell them apart (their locks merge). So a `FileLock` puts an
//!   in-process `parking_lot` reader-writer lock (task-fair, with upgradable
//!   reads and timed waits) in front, and counts its readers: the first takes
//!   the kernel's shared lock, the last releases it. Threads that each open
//!   their own `FileLock` have their own descriptions, and the kernel excludes
//!   them as it excludes processes.
//! - **A lock file may be deleted by its holder.** A process that opened the
//!   path before the deletion would then lock an inode no longer at the path,
//!   while a later process locks a new file there: two holders. After each
//!   kernel acquisition we compare the path's (device, inode) with the
//!   descriptor's and, on a mismatch, release, reopen and retry.
//! - **Waits are exact.** The kernel's own wait queue wakes a waiter when the
//!   lock is released; a timed wait is cut at its deadline by a per-thread
//!   timer signal (`sys::timer`), never a sleep-poll loop.
//!
//! # Byte layout (the fcntl flavor; all OFD locks)
//!
//! | byte | name | held by |
//! |---|---|---|
//! | 0 | data | readers (shared), writers (exclusive) |
//! | 1 | gate | a writer, exclusively, from before it waits for the data until it releases; readers only momentarily, with the data |
//! | 2 | slot | an upgradable reader or a writer, exclusively |
//!
//! The flock flavor keeps the data in flock(2) (whole file) and uses bytes
//! 2^62+1 and 2^62+2 of the same file, as OFD locks, for the gate and the
//! slot: the two kernel families ignore each other, so they can share one
//! file, and the offsets keep clear of the fcntl flavor's bytes.

use super::hint::{self, Hint};
use super::open::{open_lock_file, open_lock_file_again};
use std::fmt;
use std::fs::File;
use std::io;
use std::ops::{Deref, DerefMut};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{
    ArcRwLockReadGuard, ArcRwLockUpgradableReadGuard, ArcRwLockWriteGuard, Mutex, MutexGuard,
    RawRwLock, RwLock, RwLockReadGuard, RwLockUpgradableReadGuard, RwLockWriteGuard,
};

use crate::sys::fcntl::{self, ByteRange, FlockOp, RangeLock};
use crate::sys::timer;
use crate::{Blocked, Error, ErrorKind, Lock, Mode, OnBlock, Result, TryLockError, Wait};

const DATA: ByteRange = ByteRange { start: 0, len: 1 };
const GATE: ByteRange = ByteRange { start: 1, len: 1 };
const SLOT: ByteRange = ByteRange { start: 2, len: 1 };
/// Held shared by readers while they wait behind a writer (with hints), so
/// that a writer coming back can tell that they really wait.
const QUEUE: ByteRange = ByteRange { start: 3, len: 1 };
const DATA_GATE: ByteRange = ByteRange { start: 0, len: 2 };
const GATE_SLOT: ByteRange = ByteRange { start: 1, len: 2 };
const GATE_SLOT_QUEUE: ByteRange = ByteRange { start: 1, len: 3 };
const ALL: ByteRange = ByteRange { start: 0, len: 3 };
const ALL_QUEUE: ByteRange = ByteRange { start: 0, len: 4 };
/// The flock flavor's gate and slot: far from the fcntl flavor's bytes, so
/// that a file used by both flavors (or by byte-range users of its first
/// bytes) sees no interference between them.
const FLOCK_BASE: u64 = 1 << 62;

/// With hints, a handle checks the path at least once every this many
/// acquisitions even when no removal was announced.
const RECHECK_EVERY: u32 = 64;

/// The creation mode of a new lock file unless [`FileLockOptions::mode`]
/// says otherwise (the process umask applies, as with open(2)).
pub const DEFAULT_MODE: u32 = 0o644;

/// How long a writer on its slow path waits for the readers to leave by
/// themselves before it shuts the gate, unless
/// [`FileLockOptions::writer_patience`] says otherwise.
pub const DEFAULT_WRITER_PATIENCE: Duration = Duration::from_millis(1);

/// Which kernel lock family holds the data lock.
///
/// The two families ignore each other on local file systems, so pick the one
/// the other programs using the same lock file use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Flavor {
    /// OFD fcntl byte-range locks (the default). Byte 0 is the data lock, so
    /// classic POSIX lock users of the whole file or of byte 0 exclude us and
    /// are excluded: Python's `fcntl.lockf` (fasteners, oslo.concurrency,
    /// pylocksfile), `lockf(3)`, `F_SETLK` users.
    #[default]
    Fcntl,
    /// flock(2) whole-file locks: excludes `flock(1)`, Python's
    /// `fcntl.flock` (filelock, portalocker, locks) and other flock users.
    ///
    /// The gate and slot are OFD locks on two bytes at offset 2^62, which no
    /// fcntl-flavor user touches; a program holding a *whole-file* fcntl lock
    /// on the same file delays flock-flavor writers while it holds it (it
    /// never breaks exclusion).
    Flock,
}

/// Whether readers make way for a waiting writer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Fairness {
    /// A reader does not overtake a writer that has waited
    /// [`FileLockOptions::writer_patience`] (default 1 ms; the default
    /// policy): a stream of overlapping readers holds a writer up for about
    /// that long, never for ever. An uncontended read costs the kernel
    /// floor's calls when hints are in use ([`FileLockOptions::hints`]), one
    /// more without them.
    #[default]
    PreferWriters,
    /// Readers take the kernel lock directly, at the kernel's floor cost;
    /// a stream of overlapping readers can starve a writer for seconds, as
    /// with every kernel lock. Writers behave the same in both policies, so
    /// processes with different policies still exclude each other correctly.
    Kernel,
}

/// How to open a [`FileLock`]: `FileLock::options().mode(0o600).open(path)`.
#[derive(Clone)]
pub struct FileLockOptions {
    mode: u32,
    flavor: Flavor,
    fairness: Fairness,
    writer_patience: Duration,
    verify_path: bool,
    hints: bool,
    on_block: Option<OnBlock>,
}

impl Default for FileLockOptions {
    fn default() -> Self {
        FileLockOptions {
            mode: DEFAULT_MODE,
            flavor: Flavor::default(),
            fairness: Fairness::default(),
            writer_patience: DEFAULT_WRITER_PATIENCE,
            verify_path: true,
            hints: true,
            on_block: None,
        }
    }
}

impl fmt::Debug for FileLockOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileLockOptions")
            .field("mode", &format_args!("{:#o}", self.mode))
            .field("flavor", &self.flavor)
            .field("fairness", &self.fairness)
            .field("writer_patience", &self.writer_patience)
            .field("verify_path", &self.verify_path)
            .field("hints", &self.hints)
            .field("on_block", &self.on_block.is_some())
            .finish()
    }
}

impl FileLockOptions {
    /// The permission bits of a lock file this open creates (default
    /// [`DEFAULT_MODE`], 0o644; the umask applies). Only the permission
    /// bits (0o777) are used: a lock file is never setuid, setgid or
    /// sticky. An existing file is never changed.
    pub fn mode(&mut self, mode: u32) -> &mut Self {
        self.mode = mode;
        self
    }

    /// The kernel lock family (default [`Flavor::Fcntl`]).
    pub fn flavor(&mut self, flavor: Flavor) -> &mut Self {
        self.flavor = flavor;
        self
    }

    /// The reader policy (default [`Fairness::PreferWriters`]).
    pub fn fairness(&mut self, fairness: Fairness) -> &mut Self {
        self.fairness = fairness;
        self
    }

    /// How long a blocked writer lets readers come and go before it stops
    /// new ones (default [`DEFAULT_WRITER_PATIENCE`], 1 ms).
    ///
    /// A writer that finds the lock busy first waits for the data alone,
    /// as a kernel lock waits: readers still enter, and if they all happen
    /// to leave, the writer gets in without having stopped anyone. Once it
    /// has waited this long (counted from its first blocking step), it
    /// shuts the gate: new readers queue behind it and it waits for the
    /// readers inside to leave. A shorter patience serves writers sooner; a
    /// longer one keeps more readers going in a read-heavy load (each time
    /// the gate shuts, the readers drain and wait out the writer's hold).
    /// `Duration::ZERO` shuts the gate at once. Upgrades always shut it at
    /// once. This applies to the writers of this handle, whatever the
    /// reader policy ([`Fairness`]).
    ///
    /// With hints (the default, see [`FileLockOptions::hints`]) and a
    /// patience of at most 1 s, the writer shuts the gate in the kernel at
    /// the start and says in the hints when its patience ends; readers that
    /// use hints keep coming in until then and stop by themselves at that
    /// moment, even if the waiting writer is not running (on a busy machine
    /// a sleeping writer may wait several milliseconds for a processor
    /// after its timer fires). Readers whose handle does not use hints see
    /// only the shut gate and queue at once. A longer patience is kept by
    /// the writer's timer alone.
    pub fn writer_patience(&mut self, patience: Duration) -> &mut Self {
        self.writer_patience = patience;
        self
    }

    /// Whether each kernel acquisition checks that the locked file is still
    /// the one at the path (default `true`). Turn it off only if no program
    /// ever removes or replaces the lock file: it saves one `lstat` per
    /// acquisition, and without it a holder that deletes the file can let two
    /// holders in.
    pub fn verify_path(&mut self, verify: bool) -> &mut Self {
        self.verify_path = verify;
        self
    }

    /// Whether to use the host-local hints in shared memory (default
    /// `true`): `/dev/shm/interlock-hints-UID`, which let an uncontended
    /// acquisition skip the gate check and the path check (see the design
    /// notes, docs/design-file.md). They are used only for lock files that
    /// only their owner may write. With hints, the path is checked when
    /// [`FileWriteGuard::remove_and_unlock`] announced a removal, and
    /// otherwise once every 64 acquisitions of a handle; turn them off if
    /// other programs (`rm`, a cleanup job) may remove lock files that
    /// interlock processes have open, so that every acquisition checks the
    /// path.
    pub fn hints(&mut self, hints: bool) -> &mut Self {
        self.hints = hints;
        self
    }

    /// A callback told once per acquisition, just before it blocks.
    ///
    /// It runs in the acquiring thread, possibly while internal locks of this
    /// `FileLock` are held: it may call its `try_*` methods (they answer
    /// WouldBlock) but must not block on the same `FileLock`. If it panics,
    /// the acquisition gives back whatever it had taken and the panic goes
    /// on in the caller.
    pub fn on_block(&mut self, f: impl Fn(&Blocked<'_>) + Send + Sync + 'static) -> &mut Self {
        self.on_block = Some(Arc::new(f));
        self
    }

    /// Opens or creates the lock file at `path`.
    ///
    /// The file is opened read-write (fcntl write locks need it) with
    /// `O_CLOEXEC` and `O_NOFOLLOW`, created if missing, and never truncated
    /// or written. A file this user may only read is opened read-only: then
    /// shared locks can be taken with either flavor, the exclusive lock with
    /// the flock flavor only (flock(2) allows it on a read-only descriptor;
    /// such a writer gets no preference over readers, since it cannot shut
    /// the gate), and the fcntl flavor's exclusive lock and the upgradable
    /// lock fail with [`ErrorKind::PermissionDenied`] (they need fcntl write
    /// locks). Errors name the path: [`ErrorKind::NotFound`] for a
    /// missing parent directory, [`ErrorKind::Corrupt`] for a directory, a
    /// symbolic link or another non-regular file at the path,
    /// [`ErrorKind::PermissionDenied`] without permission,
    /// [`ErrorKind::Unsupported`] for the flock flavor on NFS.
    pub fn open(&self, path: impl AsRef<Path>) -> Result<FileLock> {
        let given = path.as_ref();
        // Absolute, so that a later chdir() cannot make the path check look
        // at another file.
        let path = std::path::absolute(given).map_err(|e| {
            Error::io("open lock file", e)
                .with_path(given)
                .with_kind(ErrorKind::InvalidInput)
        })?;
        let (file, id, hint, writable) = open_file(&path, self.mode, self.hints, false)?;
        if self.flavor == Flavor::Flock
            && fcntl::on_nfs(file.as_fd())
                .map_err(|e| Error::io("stat file system", e).with_path(&path))?
        {
            // The gate and slot (fcntl locks) would conflict with the data
            // (flock, emulated by fcntl locks on NFS) and could deadlock.
            return Err(Error::new(ErrorKind::Unsupported, "open lock file")
                .with_path(&path)
                .with_detail("the flock flavor does not work on NFS; use the fcntl flavor"));
        }
        Ok(FileLock {
            path,
            mode: self.mode,
            flavor: self.flavor,
            fairness: self.fairness,
            writer_patience: self.writer_patience,
            verify_path: self.verify_path,
            hints: self.hints,
            on_block: self.on_block.clone(),
            rw: Arc::new(RwLock::new(Mutex::new(State {
                file: Arc::new(file),
                id,
                readers: 0,
                writer_ofd: false,
                hint,
                verified: None,
                unchecked: 0,
                removed: false,
                gate_held: None,
                stamp_held: None,
                slot_held: None,
            }))),
            read_only: AtomicBool::new(!writable),
            kernel_blocked: AtomicBool::new(false),
        })
    }
}

/// An opened lock file: descriptor, (device, inode), hint, whether it is
/// writable.
type Reopened = (File, (u64, u64), Option<Hint>, bool);

/// Opens or creates the lock file and returns it with its (device, inode).
/// A file this user may only read is opened read-only: shared locks need no
/// more (fcntl read locks and flock both work on a read-only descriptor),
/// nor does the flock flavor's exclusive lock (`LOCK_EX`, with a read lock
/// on the slot); the fcntl flavor's exclusive lock and the upgradable lock
/// are refused when asked for (their fcntl write locks on the data, gate
/// and slot bytes need a writable descriptor).
/// `again`: this handle removed its own file at the path (see
/// [`open_lock_file_again`]).
fn open_file(path: &Path, mode: u32, hints: bool, again: bool) -> Result<Reopened> {
    let opened = if again {
        open_lock_file_again(path, mode, "open lock file")?
    } else {
        open_lock_file(path, mode, "open lock file")?
    };
    let writable = opened.writable;
    if !hints {
        return Ok((opened.file, opened.id, None, writable));
    }
    let hint = hint::for_file(opened.id, opened.owner, opened.mode).map_err(|e| {
        Error::io("open the shared-memory hints", e)
            .with_path(path)
            .with_detail(format!(
                "the lock's hints (/dev/shm/interlock-hints-{}) could not be opened",
                opened.owner
            ))
    })?;
    if let Some(h) = &hint {
        h.note_open();
    }
    Ok((opened.file, opened.id, hint, writable))
}

/// What the in-process layer knows about this handle's kernel locks.
///
/// Invariant: the descriptor may be replaced (after the path check failed)
/// only while no kernel lock is held through it: `readers == 0` and no
/// writer (the writer holds `rw` exclusively, so it is the one replacing it).
/// An upgradable reader waiting for the slot without this mutex keeps its own
/// `Arc` and checks, once it has the slot, that the descriptor is unchanged.
struct State {
    file: Arc<File>,
    id: (u64, u64),
    /// In-process holders that rely on the kernel's shared data lock:
    /// readers and the upgradable reader. The first takes it, the last
    /// releases it.
    readers: usize,
    /// flock flavor: the writer also holds the OFD gate and slot (it came
    /// through the slow path or an upgrade).
    writer_ofd: bool,
    /// This file's bucket in the shared-memory hints (see `hint.rs`), if
    /// hints can be used for it.
    hint: Option<Hint>,
    /// The hint's epoch (removals announced in the bucket, opens in the
    /// table) at the last acquisition that checked the path; `None`: the
    /// next acquisition checks it.
    verified: Option<(u64, u64)>,
    /// Acquisitions since the last path check.
    unchecked: u32,
    /// This handle removed its file ([`FileWriteGuard::remove_and_unlock`]):
    /// the next acquisition opens the path anew before it locks, instead of
    /// locking the removed file, finding it gone and reopening.
    removed: bool,
    /// The bucket whose gate count this handle raised (it holds the gate).
    gate_held: Option<Hint>,
    /// The stamp this handle placed in its bucket (a patient writer holding
    /// the gate in the kernel; see `hint::Hint::place_stamp`).
    stamp_held: Option<(Hint, u32)>,
    /// The bucket whose slot count this handle raised (flock flavor: an
    /// upgradable reader, or the writer it became, holds the slot; writers
    /// that queue at the slot do not raise it).
    slot_held: Option<Hint>,
}

impl State {
    /// Announces that this handle holds the gate.
    fn enter_gate(&mut self) {
        if self.gate_held.is_none() {
            if let Some(h) = &self.hint {
                h.enter_gate();
                self.gate_held = Some(h.clone());
            }
        }
    }

    /// Says until when readers may still pass the gate this handle holds
    /// (see `hint::Hint::place_stamp`).
    fn place_stamp(&mut self, deadline_ns: u64) {
        if self.stamp_held.is_none() {
            if let Some(h) = &self.hint {
                self.stamp_held = Some((h.clone(), h.place_stamp(deadline_ns)));
            }
        }
    }

    /// Takes the gate announcement and any stamp back (before the gate is
    /// unlocked).
    fn leave_gate(&mut self) {
        if let Some(h) = self.gate_held.take() {
            h.leave_gate();
        }
        if let Some((h, stamp)) = self.stamp_held.take() {
            h.clear_stamp(stamp);
        }
    }

    fn enter_slot(&mut self) {
        if self.slot_held.is_none() {
            if let Some(h) = &self.hint {
                h.enter_slot();
                self.slot_held = Some(h.clone());
            }
        }
    }

    fn leave_slot(&mut self) {
        if let Some(h) = self.slot_held.take() {
            h.leave_slot();
        }
    }
}

/// A reader-writer lock on a path, shared by threads and processes.
///
/// `FileLock::open(path)` opens (creating if needed) the lock file; `read()`
/// and `write()` block; `try_read()`/`try_write()` never block;
/// `try_read_for(d)` and `try_read_until(t)` wait at most so long. Guards
/// release on drop. An upgradable read coexists with readers and can become
/// a write lock atomically.
///
/// # Scope and semantics
///
/// - **Scope:** per host. Threads sharing one `FileLock`, threads with their
///   own, and processes all exclude each other. It is not reentrant: a thread
///   that asks again for a lock it holds may deadlock.
/// - **Writers first:** under [`Fairness::PreferWriters`] a reader arriving
///   once a writer has waited [`FileLockOptions::writer_patience`] (1 ms)
///   queues behind it, between processes through the gate byte; between
///   threads of one handle at once, through the in-process lock.
/// - **close:** closing any other descriptor of the file releases nothing
///   (OFD locks and flock belong to the open file description).
/// - **crash:** the kernel releases the locks when the last descriptor of
///   the description closes, i.e. when the process dies, unless a child
///   forked without exec still has it.
/// - **fork:** a child forked while a lock is held shares the description and
///   so the lock, until both release it; an unlock in either releases it for
///   both. The in-process state is copied as it was at the fork (another
///   thread may have held the internal mutex). Do not use a `FileLock` across
///   fork: open a new one in the child. The descriptor is close-on-exec.
/// - **NFS:** OFD locks become NFS byte-range locks (NLM or NFSv4) and work
///   between hosts when the server supports them. The Linux NFS client
///   emulates flock with a whole-file fcntl lock, which would conflict with
///   the flock flavor's own gate and slot, so opening the flock flavor on
///   NFS fails with [`ErrorKind::Unsupported`]. The lock file must not be
///   removed on NFS while others use it (silly-rename keeps the inode alive
///   under another name).
/// - **Removing the lock file** while holding the write lock is safe: a
///   waiter that then gets the lock on the removed inode notices and retries
///   on the new file (unless [`FileLockOptions::verify_path`] is off).
pub struct FileLock {
    path: PathBuf,
    mode: u32,
    flavor: Flavor,
    fairness: Fairness,
    /// See [`FileLockOptions::writer_patience`].
    writer_patience: Duration,
    verify_path: bool,
    hints: bool,
    on_block: Option<OnBlock>,
    /// The in-process reader-writer lock, which threads of this process queue
    /// on, around the kernel side (descriptor and reader count). A writer
    /// reaches the kernel side through its exclusive guard, without the
    /// mutex; readers and the upgradable reader take the mutex. The mutex is
    /// held across a blocking kernel call only when no in-process holder
    /// needs it to leave (`readers == 0`).
    ///
    /// It sits in an `Arc` so that the owned guards of
    /// [`FileLock::write_arc`] and friends hold it without a borrow; the
    /// guards of `read()`, `write()` and friends borrow it (see [`ReadRw`]).
    rw: Arc<RwLock<Mutex<State>>>,
    /// Set while a thread holding the state mutex is blocked in the kernel, so that a
    /// `try_*` in another thread answers WouldBlock instead of waiting.
    kernel_blocked: AtomicBool,
    /// The descriptor is read-only: only shared locks, and the flock
    /// flavor's exclusive lock, can be taken.
    read_only: AtomicBool,
}

impl fmt::Debug for FileLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileLock")
            .field("path", &self.path)
            .field("flavor", &self.flavor)
            .field("fairness", &self.fairness)
            .field("verify_path", &self.verify_path)
            .finish()
    }
}

/// The in-process lock a guard holds, by a borrow (the `&self` API) or by
/// a clone of its `Arc` (the `*_arc` API). The borrow is the uncontended
/// read or write pair's cheaper half: an `Arc` guard adds a reference-count
/// increment and decrement, two locked instructions, to the lock's own.
enum ReadRw<'a> {
    Borrowed(RwLockReadGuard<'a, Mutex<State>>),
    Owned(ArcRwLockReadGuard<RawRwLock, Mutex<State>>),
}

/// See [`ReadRw`].
enum WriteRw<'a> {
    Borrowed(RwLockWriteGuard<'a, Mutex<State>>),
    Owned(ArcRwLockWriteGuard<RawRwLock, Mutex<State>>),
}

/// See [`ReadRw`].
enum UpgRw<'a> {
    Borrowed(RwLockUpgradableReadGuard<'a, Mutex<State>>),
    Owned(ArcRwLockUpgradableReadGuard<RawRwLock, Mutex<State>>),
}

impl Deref for ReadRw<'_> {
    type Target = Mutex<State>;

    #[inline]
    fn deref(&self) -> &Mutex<State> {
        match self {
            ReadRw::Borrowed(g) => g,
            ReadRw::Owned(g) => g,
        }
    }
}

impl Deref for WriteRw<'_> {
    type Target = Mutex<State>;

    #[inline]
    fn deref(&self) -> &Mutex<State> {
        match self {
            WriteRw::Borrowed(g) => g,
            WriteRw::Owned(g) => g,
        }
    }
}

impl DerefMut for WriteRw<'_> {
    #[inline]
    fn deref_mut(&mut self) -> &mut Mutex<State> {
        match self {
            WriteRw::Borrowed(g) => g,
            WriteRw::Owned(g) => g,
        }
    }
}

impl Deref for UpgRw<'_> {
    type Target = Mutex<State>;

    #[inline]
    fn deref(&self) -> &Mutex<State> {
        match self {
            UpgRw::Borrowed(g) => g,
            UpgRw::Owned(g) => g,
        }
    }
}

impl<'a> WriteRw<'a> {
    fn downgrade(self) -> ReadRw<'a> {
        match self {
            WriteRw::Borrowed(g) => ReadRw::Borrowed(RwLockWriteGuard::downgrade(g)),
            WriteRw::Owned(g) => ReadRw::Owned(ArcRwLockWriteGuard::downgrade(g)),
        }
    }

    fn downgrade_to_upgradable(self) -> UpgRw<'a> {
        match self {
            WriteRw::Borrowed(g) => UpgRw::Borrowed(RwLockWriteGuard::downgrade_to_upgradable(g)),
            WriteRw::Owned(g) => UpgRw::Owned(ArcRwLockWriteGuard::downgrade_to_upgradable(g)),
        }
    }
}

impl<'a> UpgRw<'a> {
    fn try_upgrade(self) -> Result<WriteRw<'a>, Self> {
        match self {
            UpgRw::Borrowed(g) => RwLockUpgradableReadGuard::try_upgrade(g)
                .map(WriteRw::Borrowed)
                .map_err(UpgRw::Borrowed),
            UpgRw::Owned(g) => ArcRwLockUpgradableReadGuard::try_upgrade(g)
                .map(WriteRw::Owned)
                .map_err(UpgRw::Owned),
        }
    }

    fn try_upgrade_until(self, t: Instant) -> Result<WriteRw<'a>, Self> {
        match self {
            UpgRw::Borrowed(g) => RwLockUpgradableReadGuard::try_upgrade_until(g, t)
                .map(WriteRw::Borrowed)
                .map_err(UpgRw::Borrowed),
            UpgRw::Owned(g) => ArcRwLockUpgradableReadGuard::try_upgrade_until(g, t)
                .map(WriteRw::Owned)
                .map_err(UpgRw::Owned),
        }
    }

    fn upgrade(self) -> WriteRw<'a> {
        match self {
            UpgRw::Borrowed(g) => WriteRw::Borrowed(RwLockUpgradableReadGuard::upgrade(g)),
            UpgRw::Owned(g) => WriteRw::Owned(ArcRwLockUpgradableReadGuard::upgrade(g)),
        }
    }

    fn downgrade(self) -> ReadRw<'a> {
        match self {
            UpgRw::Borrowed(g) => ReadRw::Borrowed(RwLockUpgradableReadGuard::downgrade(g)),
            UpgRw::Owned(g) => ReadRw::Owned(ArcRwLockUpgradableReadGuard::downgrade(g)),
        }
    }
}

/// How a guard reaches its lock (see `crate::handle`).
type Handle<'a> = crate::handle::Handle<'a, FileLock>;

/// How many more times a contended fast path tries before it sleeps.
const SPIN_TRIES: u32 = 8;

/// A request to the kernel.
#[derive(Clone, Copy, Debug)]
enum Req {
    Ofd(RangeLock, ByteRange),
    Flock(FlockOp),
}

impl Req {
    /// Without waiting; `Ok(false)` if a conflicting lock is held.
    ///
    /// The fast paths of `read`, `write` and their `try_*` forms are inlined
    /// from the public call down to this system call (`#[inline(always)]`
    /// on each step): every frame between the caller and the call costs a
    /// mispredicted return once the call is made (see `sys/raw.rs`; 45-50 ns
    /// a pair measured on the flock and fcntl pairs). The slow paths stay
    /// out of line.
    #[inline(always)]
    fn try_on(self, f: &File) -> io::Result<bool> {
        match self {
            Req::Ofd(k, r) => fcntl::ofd_try(f.as_fd(), k, r),
            Req::Flock(op) => fcntl::flock(f.as_fd(), op, false),
        }
    }

    /// Without sleeping: one try and, if it conflicts and the caller may
    /// still wait (not a `try_*`, no deadline passed), [`SPIN_TRIES`] more.
    /// Under contention with short holds the holder is often gone a
    /// microsecond later, and a later try then saves two sleeps and
    /// wake-ups (ours, and that of whoever would queue behind us); with long
    /// holds it costs a few microseconds of calls before the caller sleeps
    /// as before.
    #[inline(always)]
    fn try_spinning(self, f: &File, wait: Wait) -> io::Result<bool> {
        if self.try_on(f)? {
            return Ok(true);
        }
        if wait.expired() {
            return Ok(false);
        }
        for _ in 0..SPIN_TRIES {
            std::hint::spin_loop();
            if self.try_on(f)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Waiting; `Err(EINTR)` when a signal cuts the wait.
    fn wait_on(self, f: &File) -> io::Result<()> {
        match self {
            Req::Ofd(k, r) => fcntl::ofd_wait(f.as_fd(), k, r),
            Req::Flock(op) => fcntl::flock(f.as_fd(), op, true).map(|_| ()),
        }
    }
}

/// Releases the OFD locks on `range` (never waits).
fn unlock_ofd(f: &File, range: ByteRange) -> io::Result<()> {
    fcntl::ofd_try(f.as_fd(), RangeLock::Unlock, range).map(|_| ())
}

/// Releases the flock lock (never waits).
fn unlock_flock(f: &File) -> io::Result<()> {
    fcntl::flock(f.as_fd(), FlockOp::Unlock, false).map(|_| ())
}

/// Whether no other description holds the gate exclusively (a writer is
/// waiting or holding). One `F_OFD_GETLK`.
fn gate_open(f: &File, gate: ByteRange) -> io::Result<bool> {
    Ok(fcntl::ofd_get(f.as_fd(), RangeLock::Read, gate)?.is_none())
}

/// One acquisition in progress: how long it may wait, and whether the
/// on-block callback was told already (it is told at most once).
struct Attempt<'a> {
    lock: &'a FileLock,
    wait: Wait,
    mode: Mode,
    told: bool,
    /// A panic of the on-block callback. The callback runs in the middle of
    /// the protocol (say, holding the slot while the data is busy), so its
    /// panic is caught, the acquisition fails through its ordinary error
    /// paths (which give back whatever it took), and [`Attempt::finish`]
    /// re-raises it.
    panicked: Option<Box<dyn std::any::Any + Send>>,
}

impl<'a> Attempt<'a> {
    fn new(lock: &'a FileLock, wait: Wait, mode: Mode) -> Self {
        Attempt {
            lock,
            wait,
            mode,
            told: false,
            panicked: None,
        }
    }

    /// Tells the callback (the first time). If it panics, the acquisition
    /// must fail: `Err`, and the panic is kept for [`Attempt::finish`].
    fn about_to_block(&mut self) -> Result<(), TryLockError> {
        if !self.told {
            self.told = true;
            if let Some(cb) = &self.lock.on_block {
                let blocked = Blocked {
                    resource: &self.lock.path,
                    mode: self.mode,
                    range: None,
                };
                let told = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cb(&blocked)));
                if let Err(p) = told {
                    self.panicked = Some(p);
                    return Err(TryLockError::WouldBlock);
                }
            }
        }
        Ok(())
    }

    /// The acquisition's result, unless the callback panicked: then the
    /// result (an error that released everything) is dropped and the panic
    /// goes on.
    fn finish<T>(&mut self, result: T) -> T {
        if let Some(p) = self.panicked.take() {
            drop(result);
            std::panic::resume_unwind(p);
        }
        result
    }

    /// An in-process wait: try, and if that fails, tell and wait as allowed.
    fn park<G>(
        &mut self,
        try_now: impl FnOnce() -> Option<G>,
        forever: impl FnOnce() -> G,
        until: impl FnOnce(Instant) -> Option<G>,
    ) -> Result<G, TryLockError> {
        if let Some(g) = try_now() {
            return Ok(g);
        }
        match self.wait {
            Wait::NonBlocking => Err(TryLockError::WouldBlock),
            Wait::Forever => {
                self.about_to_block()?;
                Ok(forever())
            }
            Wait::Until(t) => {
                self.about_to_block()?;
                until(t).ok_or(TryLockError::TimedOut)
            }
        }
    }

    /// One kernel request: first without waiting (the uncontended path is
    /// one system call), then, if held, tell and wait as allowed.
    fn kernel(&mut self, f: &File, req: Req, under_state: bool) -> Result<(), TryLockError> {
        if req.try_on(f).map_err(|e| self.lock.io_err("lock", e))? {
            return Ok(());
        }
        self.block(f, req, under_state)
    }

    /// One kernel request that may wait (until the deadline). `under_state`
    /// says the caller holds the state mutex, so other threads' `try_*`
    /// should not wait for it.
    fn block(&mut self, f: &File, req: Req, under_state: bool) -> Result<(), TryLockError> {
        self.block_by(f, req, under_state, None).map(drop)
    }

    /// [`Attempt::block`], cut short at `by` (a writer's patience) if that
    /// comes before the deadline: `Ok(true)` holds, `Ok(false)` means `by`
    /// passed first. With `by` = `None` it never answers `Ok(false)`.
    fn block_by(
        &mut self,
        f: &File,
        req: Req,
        under_state: bool,
        by: Option<Instant>,
    ) -> Result<bool, TryLockError> {
        let deadline = match self.wait {
            Wait::NonBlocking => {
                return if req.try_on(f).map_err(|e| self.lock.io_err("lock", e))? {
                    Ok(true)
                } else {
                    Err(TryLockError::WouldBlock)
                }
            }
            Wait::Forever => None,
            Wait::Until(t) => {
                if Instant::now() >= t {
                    // Past the deadline, a free lock is still taken.
                    return if req.try_on(f).map_err(|e| self.lock.io_err("lock", e))? {
                        Ok(true)
                    } else {
                        Err(TryLockError::TimedOut)
                    };
                }
                Some(t)
            }
        };
        let by = by.filter(|b| deadline.is_none_or(|t| *b < t));
        if by.is_some_and(|b| Instant::now() >= b) {
            return Ok(false);
        }
        let _flag = under_state.then(|| BlockedFlag::raise(&self.lock.kernel_blocked));
        // After the flag: a callback that asks this same lock for a try_*
        // gets WouldBlock instead of waiting for the mutex we hold.
        self.about_to_block()?;
        match timer::block_until(by.or(deadline), || req.wait_on(f)) {
            Ok(Some(())) => Ok(true),
            // `by` passed; a cancelled wait (an async acquisition dropped, a
            // signal that ends waits) gives up as at the deadline.
            Ok(None) if by.is_some() && !timer::cancelled() => Ok(false),
            Ok(None) => Err(TryLockError::TimedOut),
            Err(e) => Err(self.lock.io_err("wait for lock", e).into()),
        }
    }
}

/// Raises `kernel_blocked` until dropped (also if the callback panics).
struct BlockedFlag<'a>(&'a AtomicBool);

impl<'a> BlockedFlag<'a> {
    fn raise(flag: &'a AtomicBool) -> Self {
        flag.store(true, Ordering::Release);
        BlockedFlag(flag)
    }
}

impl Drop for BlockedFlag<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// How a failed kernel upgrade left things.
enum UpgradeErr {
    /// The shared lock is held as before.
    Restored(TryLockError),
    /// The shared lock could not be restored (flock flavor only); every
    /// kernel lock of this holder was released.
    Lost(TryLockError),
}

impl FileLock {
    /// Opens or creates the lock file at `path` with the default options:
    /// see [`FileLockOptions::open`].
    pub fn open(path: impl AsRef<Path>) -> Result<FileLock> {
        FileLockOptions::default().open(path)
    }

    /// Options for opening: mode, flavor, fairness, path check, on-block
    /// callback.
    pub fn options() -> FileLockOptions {
        FileLockOptions::default()
    }

    /// The lock file's path (made absolute at open).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The kernel lock family in use.
    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// The reader policy in use.
    pub fn fairness(&self) -> Fairness {
        self.fairness
    }

    /// The OFD bytes `r` of the fcntl layout, where this flavor keeps them
    /// (the flock flavor's are `FLOCK_BASE` further on).
    fn flavored(&self, r: ByteRange) -> ByteRange {
        match self.flavor {
            Flavor::Fcntl => r,
            Flavor::Flock => ByteRange {
                start: FLOCK_BASE + r.start,
                len: r.len,
            },
        }
    }

    fn gate(&self) -> ByteRange {
        self.flavored(GATE)
    }

    fn slot(&self) -> ByteRange {
        self.flavored(SLOT)
    }

    fn queue(&self) -> ByteRange {
        self.flavored(QUEUE)
    }

    fn gate_slot(&self) -> ByteRange {
        self.flavored(GATE_SLOT)
    }

    fn gate_slot_queue(&self) -> ByteRange {
        self.flavored(GATE_SLOT_QUEUE)
    }

    fn io_err(&self, op: &'static str, e: io::Error) -> Error {
        Error::io(op, e).with_path(&self.path)
    }

    // ----- the public vocabulary -------------------------------------------

    /// Blocks until a shared lock is held.
    pub fn read(&self) -> Result<FileReadGuard<'_>> {
        self.read_with(Wait::Forever).map_err(Error::from)
    }

    /// A shared lock if it is free now, else `Err(TryLockError::WouldBlock)`.
    pub fn try_read(&self) -> Result<FileReadGuard<'_>, TryLockError> {
        self.read_with(Wait::NonBlocking)
    }

    /// A shared lock, waiting at most `timeout` (`Err(TimedOut)` after).
    pub fn try_read_for(&self, timeout: Duration) -> Result<FileReadGuard<'_>, TryLockError> {
        self.read_with(Wait::timeout(timeout))
    }

    /// A shared lock, waiting until `deadline` at most.
    pub fn try_read_until(&self, deadline: Instant) -> Result<FileReadGuard<'_>, TryLockError> {
        self.read_with(Wait::Until(deadline))
    }

    /// Blocks until the exclusive lock is held.
    pub fn write(&self) -> Result<FileWriteGuard<'_>> {
        self.write_with(Wait::Forever).map_err(Error::from)
    }

    /// The exclusive lock if it is free now, else `Err(WouldBlock)`.
    pub fn try_write(&self) -> Result<FileWriteGuard<'_>, TryLockError> {
        self.write_with(Wait::NonBlocking)
    }

    /// The exclusive lock, waiting at most `timeout`.
    pub fn try_write_for(&self, timeout: Duration) -> Result<FileWriteGuard<'_>, TryLockError> {
        self.write_with(Wait::timeout(timeout))
    }

    /// The exclusive lock, waiting until `deadline` at most.
    pub fn try_write_until(&self, deadline: Instant) -> Result<FileWriteGuard<'_>, TryLockError> {
        self.write_with(Wait::Until(deadline))
    }

    /// Blocks until an upgradable shared lock is held: it coexists with
    /// readers, excludes writers and other upgradable readers, and can be
    /// upgraded to the exclusive lock without letting a writer in between.
    pub fn upgradable_read(&self) -> Result<FileUpgradableGuard<'_>> {
        self.upgradable_with(Wait::Forever).map_err(Error::from)
    }

    /// An upgradable shared lock if it is free now.
    pub fn try_upgradable_read(&self) -> Result<FileUpgradableGuard<'_>, TryLockError> {
        self.upgradable_with(Wait::NonBlocking)
    }

    /// An upgradable shared lock, waiting at most `timeout`.
    pub fn try_upgradable_read_for(
        &self,
        timeout: Duration,
    ) -> Result<FileUpgradableGuard<'_>, TryLockError> {
        self.upgradable_with(Wait::timeout(timeout))
    }

    /// An upgradable shared lock, waiting until `deadline` at most.
    pub fn try_upgradable_read_until(
        &self,
        deadline: Instant,
    ) -> Result<FileUpgradableGuard<'_>, TryLockError> {
        self.upgradable_with(Wait::Until(deadline))
    }

    // ----- acquisition -------------------------------------------------------

    /// A shared lock, waiting as `wait` allows.
    pub fn read_with(&self, wait: Wait) -> Result<FileReadGuard<'_>, TryLockError> {
        let rw = self.read_rw(wait, |a| {
            a.park(
                || self.rw.try_read(),
                || self.rw.read(),
                |t| self.rw.try_read_until(t),
            )
        })?;
        Ok(FileReadGuard {
            lock: Handle::Borrowed(self),
            rw: Some(ReadRw::Borrowed(rw)),
        })
    }

    /// The exclusive lock, waiting as `wait` allows.
    pub fn write_with(&self, wait: Wait) -> Result<FileWriteGuard<'_>, TryLockError> {
        let rw = self.write_rw(wait, |a| {
            a.park(
                || self.rw.try_write(),
                || self.rw.write(),
                |t| self.rw.try_write_until(t),
            )
        })?;
        Ok(FileWriteGuard {
            lock: Handle::Borrowed(self),
            rw: Some(WriteRw::Borrowed(rw)),
        })
    }

    /// An upgradable shared lock, waiting as `wait` allows.
    pub fn upgradable_with(&self, wait: Wait) -> Result<FileUpgradableGuard<'_>, TryLockError> {
        let rw = self.upgradable_rw(wait, |a| {
            a.park(
                || self.rw.try_upgradable_read(),
                || self.rw.upgradable_read(),
                |t| self.rw.try_upgradable_read_until(t),
            )
        })?;
        Ok(FileUpgradableGuard {
            lock: Handle::Borrowed(self),
            rw: Some(UpgRw::Borrowed(rw)),
        })
    }

    // ----- owned guards ------------------------------------------------------
    //
    // The same acquisitions, for a lock shared through an `Arc`: the guard
    // holds a clone of the `Arc` instead of a borrow, so it may outlive the
    // caller's reference and be released from any thread (what a binding to
    // a garbage-collected language needs, in the manner of parking_lot's
    // `arc_lock`).

    /// As [`FileLock::read_with`], returning a guard that owns a reference
    /// to the lock.
    pub fn read_arc(self: &Arc<Self>, wait: Wait) -> Result<FileReadGuard<'static>, TryLockError> {
        let rw = self.read_rw(wait, |a| {
            a.park(
                || self.rw.try_read_arc(),
                || self.rw.read_arc(),
                |t| self.rw.try_read_arc_until(t),
            )
        })?;
        Ok(FileReadGuard {
            lock: Handle::Owned(Arc::clone(self)),
            rw: Some(ReadRw::Owned(rw)),
        })
    }

    /// As [`FileLock::write_with`], returning a guard that owns a reference
    /// to the lock.
    pub fn write_arc(
        self: &Arc<Self>,
        wait: Wait,
    ) -> Result<FileWriteGuard<'static>, TryLockError> {
        let rw = self.write_rw(wait, |a| {
            a.park(
                || self.rw.try_write_arc(),
                || self.rw.write_arc(),
                |t| self.rw.try_write_arc_until(t),
            )
        })?;
        Ok(FileWriteGuard {
            lock: Handle::Owned(Arc::clone(self)),
            rw: Some(WriteRw::Owned(rw)),
        })
    }

    /// As [`FileLock::upgradable_with`], returning a guard that owns a
    /// reference to the lock.
    pub fn upgradable_arc(
        self: &Arc<Self>,
        wait: Wait,
    ) -> Result<FileUpgradableGuard<'static>, TryLockError> {
        let rw = self.upgradable_rw(wait, |a| {
            a.park(
                || self.rw.try_upgradable_read_arc(),
                || self.rw.upgradable_read_arc(),
                |t| self.rw.try_upgradable_read_arc_until(t),
            )
        })?;
        Ok(FileUpgradableGuard {
            lock: Handle::Owned(Arc::clone(self)),
            rw: Some(UpgRw::Owned(rw)),
        })
    }

    /// A shared lock: `park` takes the in-process read guard (borrowed or
    /// owned), then this joins the in-process readers.
    fn read_rw<G: Deref<Target = Mutex<State>>>(
        &self,
        wait: Wait,
        park: impl FnOnce(&mut Attempt<'_>) -> Result<G, TryLockError>,
    ) -> Result<G, TryLockError> {
        let mut a = Attempt::new(self, wait, Mode::Shared);
        let got = self.read_attempt(&mut a, park);
        a.finish(got)
    }

    #[inline(always)]
    fn read_attempt<G: Deref<Target = Mutex<State>>>(
        &self,
        a: &mut Attempt<'_>,
        park: impl FnOnce(&mut Attempt<'_>) -> Result<G, TryLockError>,
    ) -> Result<G, TryLockError> {
        let rw = park(a)?;
        self.join_shared(&rw, a)?;
        Ok(rw)
    }

    /// Refuses the exclusive and upgradable locks on a read-only file.
    fn needs_write(&self) -> Result<(), TryLockError> {
        if self.read_only.load(Ordering::Relaxed) {
            return Err(Error::new(ErrorKind::PermissionDenied, "lock")
                .with_path(&self.path)
                .with_detail(
                    "the lock file is opened read-only (no write permission): only shared locks, \
                     and exclusive ones with the flock flavor",
                )
                .into());
        }
        Ok(())
    }

    /// The exclusive lock: `park` takes the in-process write guard
    /// (borrowed or owned), then this takes the kernel's.
    fn write_rw<G: DerefMut<Target = Mutex<State>>>(
        &self,
        wait: Wait,
        park: impl FnOnce(&mut Attempt<'_>) -> Result<G, TryLockError>,
    ) -> Result<G, TryLockError> {
        // flock(LOCK_EX) works on a read-only descriptor, and the flock
        // flavor's writer then needs no fcntl write lock (see
        // `kernel_exclusive`); the fcntl flavor's exclusive lock is an fcntl
        // write lock, which does.
        if self.flavor == Flavor::Fcntl {
            self.needs_write()?;
        }
        let mut a = Attempt::new(self, wait, Mode::Exclusive);
        let got = self.write_attempt(&mut a, park);
        a.finish(got)
    }

    #[inline(always)]
    fn write_attempt<G: DerefMut<Target = Mutex<State>>>(
        &self,
        a: &mut Attempt<'_>,
        park: impl FnOnce(&mut Attempt<'_>) -> Result<G, TryLockError>,
    ) -> Result<G, TryLockError> {
        let rw = park(a)?;
        // With `rw` held exclusively no other thread of ours touches the
        // kernel side: no mutex needed.
        let mut rw = rw;
        self.take_exclusive(rw.get_mut(), a)?;
        Ok(rw)
    }

    /// An upgradable shared lock: `park` takes the in-process upgradable
    /// guard (borrowed or owned), then this takes the slot and joins the
    /// readers.
    fn upgradable_rw<G: Deref<Target = Mutex<State>>>(
        &self,
        wait: Wait,
        park: impl FnOnce(&mut Attempt<'_>) -> Result<G, TryLockError>,
    ) -> Result<G, TryLockError> {
        self.needs_write()?;
        let mut a = Attempt::new(self, wait, Mode::Shared);
        let got = self.upgradable_attempt(&mut a, park);
        a.finish(got)
    }

    fn upgradable_attempt<G: Deref<Target = Mutex<State>>>(
        &self,
        a: &mut Attempt<'_>,
        park: impl FnOnce(&mut Attempt<'_>) -> Result<G, TryLockError>,
    ) -> Result<G, TryLockError> {
        let rw = park(a)?;
        loop {
            let file = self.lock_state(&rw, a)?.file.clone();
            // The slot, without the state mutex: in-process readers must be
            // able to come and go while we wait for another process's
            // upgrader or writer.
            a.kernel(&file, Req::Ofd(RangeLock::Write, self.slot()), false)?;
            let mut st = match self.lock_state(&rw, a) {
                Ok(st) => st,
                Err(e) => {
                    let _ = unlock_ofd(&file, self.slot());
                    return Err(e);
                }
            };
            if !Arc::ptr_eq(&st.file, &file) {
                // A reader replaced the descriptor meanwhile (the file was
                // removed); our slot is on the old inode.
                drop(st);
                unlock_ofd(&file, self.slot()).map_err(|e| self.io_err("unlock", e))?;
                continue;
            }
            if self.flavor == Flavor::Flock {
                // flock writers' fast path looks for us in the hints.
                st.enter_slot();
            }
            if st.readers > 0 {
                // Holding the slot, no writer of ours can be at the gate.
                st.readers += 1;
            } else if let Err(e) = self.take_first_shared(&mut st, a) {
                st.leave_slot();
                let _ = unlock_ofd(&file, self.slot());
                return Err(e);
            } else if !Arc::ptr_eq(&st.file, &file) {
                // The path check replaced the descriptor: start again there.
                st.leave_slot();
                self.release_shared_kernel(&st)
                    .map_err(|e| self.io_err("unlock", e))?;
                drop(st);
                unlock_ofd(&file, self.slot()).map_err(|e| self.io_err("unlock", e))?;
                continue;
            } else {
                st.readers = 1;
            }
            drop(st);
            return Ok(rw);
        }
    }

    /// The state mutex. Its holders do only short work except while
    /// `kernel_blocked` is set; a `try_*` gives up only then.
    fn lock_state<'m>(
        &self,
        m: &'m Mutex<State>,
        a: &mut Attempt<'_>,
    ) -> Result<MutexGuard<'m, State>, TryLockError> {
        loop {
            if let Some(st) = m.try_lock() {
                return Ok(st);
            }
            if self.kernel_blocked.load(Ordering::Acquire) {
                return a.park(|| m.try_lock(), || m.lock(), |t| m.try_lock_until(t));
            }
            std::thread::yield_now();
        }
    }

    /// Joins the in-process readers, taking the kernel's shared lock if we
    /// are the first.
    #[inline(always)]
    fn join_shared(&self, m: &Mutex<State>, a: &mut Attempt<'_>) -> Result<(), TryLockError> {
        loop {
            let mut st = self.lock_state(m, a)?;
            if st.readers == 0 {
                self.take_first_shared(&mut st, a)?;
                st.readers = 1;
                return Ok(());
            }
            if self.fairness == Fairness::Kernel
                || st.hint.as_ref().is_some_and(Hint::gate_clear)
                || gate_open(&st.file, self.gate()).map_err(|e| self.io_err("test lock", e))?
            {
                st.readers += 1;
                return Ok(());
            }
            // A writer in another process holds the gate while our readers
            // hold the data: wait behind it, holding nothing of our own and
            // without the mutex (our readers must be able to leave).
            let file = st.file.clone();
            drop(st);
            a.block(&file, Req::Ofd(RangeLock::Read, self.gate()), false)?;
            unlock_ofd(&file, self.gate()).map_err(|e| self.io_err("unlock", e))?;
        }
    }

    /// Takes the kernel's shared lock for the first in-process holder, on
    /// the file that is at the path (reopening it if it was replaced).
    #[inline(always)]
    fn take_first_shared(&self, st: &mut State, a: &mut Attempt<'_>) -> Result<(), TryLockError> {
        if std::mem::take(&mut st.removed) {
            self.reopen_after_removal(st)?;
        }
        loop {
            self.kernel_shared(&st.file, st.hint.as_ref(), a)?;
            let held = self.path_holds(st);
            if let Ok(true) = held {
                return Ok(());
            }
            // A mismatch, or a check that failed: either way let go of the
            // kernel lock before anything else (an error must not keep it).
            let released = self.release_shared_kernel(st);
            held?;
            released.map_err(|e| self.io_err("unlock", e))?;
            self.reopen(st)?;
        }
    }

    #[inline(always)]
    fn kernel_shared(
        &self,
        f: &File,
        hint: Option<&Hint>,
        a: &mut Attempt<'_>,
    ) -> Result<(), TryLockError> {
        use RangeLock::Read;
        match (self.flavor, self.fairness) {
            (Flavor::Fcntl, Fairness::Kernel) => a.kernel(f, Req::Ofd(Read, DATA), true),
            (Flavor::Fcntl, Fairness::PreferWriters) => {
                // Fast path: the data alone, then the hints: no writer
                // announced at the gate means any writer that shuts it later
                // finds us holding the data and waits for us.
                if let Some(h) = hint {
                    if Req::Ofd(Read, DATA)
                        .try_spinning(f, a.wait)
                        .map_err(|e| self.io_err("lock", e))?
                    {
                        hint::after_grant();
                        if h.gate_clear() {
                            return Ok(());
                        }
                        unlock_ofd(f, DATA).map_err(|e| self.io_err("unlock", e))?;
                    }
                }
                // Data and gate in one request: while a writer holds the
                // gate, this waits; then let the gate go at once.
                self.kernel_queued(f, hint, a, Req::Ofd(Read, DATA_GATE))?;
                if let Err(e) = unlock_ofd(f, self.gate()) {
                    let _ = unlock_ofd(f, DATA_GATE);
                    return Err(self.io_err("unlock", e).into());
                }
                Ok(())
            }
            (Flavor::Flock, Fairness::Kernel) => a.kernel(f, Req::Flock(FlockOp::Shared), true),
            (Flavor::Flock, Fairness::PreferWriters) => {
                // Fast path: take the data, then look at the gate. A writer
                // that shuts the gate after our look finds us holding the
                // data and waits for us, as it waits for any reader.
                if Req::Flock(FlockOp::Shared)
                    .try_spinning(f, a.wait)
                    .map_err(|e| self.io_err("lock", e))?
                {
                    if let Some(h) = hint {
                        hint::after_grant();
                        if h.gate_clear() {
                            return Ok(());
                        }
                    }
                    match gate_open(f, self.gate()) {
                        Ok(true) => return Ok(()),
                        Ok(false) => {}
                        Err(e) => {
                            let _ = unlock_flock(f);
                            return Err(self.io_err("test lock", e).into());
                        }
                    }
                    unlock_flock(f).map_err(|e| self.io_err("unlock", e))?;
                }
                if a.wait == Wait::NonBlocking {
                    return Err(TryLockError::WouldBlock);
                }
                // Slow path: through the gate, then the data.
                let queued = self.enter_queue(f, hint);
                let got = a
                    .block(f, Req::Ofd(Read, self.gate()), true)
                    .and_then(|()| {
                        if let Some(h) = hint {
                            h.forget_passed_stamp();
                        }
                        let got = a.block(f, Req::Flock(FlockOp::Shared), true);
                        if got.is_err() {
                            let _ = unlock_ofd(f, self.gate());
                        }
                        got
                    });
                self.leave_queue(f, queued);
                got?;
                let ungated = unlock_ofd(f, self.gate());
                if let Err(e) = ungated {
                    let _ = unlock_flock(f);
                    return Err(self.io_err("unlock", e).into());
                }
                Ok(())
            }
        }
    }

    /// A reader's [`Attempt::kernel`]: if `req` has to wait, the reader
    /// waits queued behind the writer (see [`FileLock::enter_queue`]).
    fn kernel_queued(
        &self,
        f: &File,
        hint: Option<&Hint>,
        a: &mut Attempt<'_>,
        req: Req,
    ) -> Result<(), TryLockError> {
        if req.try_on(f).map_err(|e| self.io_err("lock", e))? {
            if let Some(h) = hint {
                h.forget_passed_stamp();
            }
            return Ok(());
        }
        let queued = self.enter_queue(f, hint);
        let got = a.block(f, req, true);
        self.leave_queue(f, queued);
        got
    }

    /// Announces a reader that is about to wait behind a writer: a shared
    /// lock on the queue byte (which never waits: only a foreign whole-file
    /// lock can refuse it, and then the reader just waits unannounced), then
    /// the count in the hints. A writer that gets the data at once and sees
    /// the count asks the kernel whether the queue byte is held and, if so,
    /// gives the data back to the readers (see `kernel_exclusive`). Without
    /// hints nothing is announced and writers never give way.
    fn enter_queue<'h>(&self, f: &File, hint: Option<&'h Hint>) -> Option<&'h Hint> {
        let h = hint?;
        match fcntl::ofd_try(f.as_fd(), RangeLock::Read, self.queue()) {
            Ok(true) => {
                h.enter_queue();
                Some(h)
            }
            _ => None,
        }
    }

    /// Takes [`FileLock::enter_queue`]'s announcement back: the count first,
    /// so that a raised count always has the byte behind it.
    fn leave_queue(&self, f: &File, queued: Option<&Hint>) {
        if let Some(h) = queued {
            h.leave_queue();
            let _ = unlock_ofd(f, self.queue());
        }
    }

    /// After a writer got the data at once: whether readers wait behind it
    /// (announced in the hints, and confirmed by the kernel: one of them
    /// holds the queue byte), so that it should give the data back and
    /// queue. `slot` is the bucket's slot word as read after the grant.
    /// Never for a try or a passed deadline (it takes what it got). A count
    /// the kernel does not confirm is forgotten (readers killed while they
    /// waited).
    fn readers_queued(
        &self,
        f: &File,
        hint: Option<&Hint>,
        slot: u32,
        wait: Wait,
    ) -> io::Result<bool> {
        let Some(h) = hint else {
            return Ok(false);
        };
        if !hint::queued(slot) || wait.expired() {
            return Ok(false);
        }
        if fcntl::ofd_get(f.as_fd(), RangeLock::Write, self.queue())?.is_some() {
            return Ok(true);
        }
        h.forget_queue(slot);
        Ok(false)
    }

    /// Releases the kernel's shared data lock (the last in-process reader).
    fn release_shared_kernel(&self, st: &State) -> io::Result<()> {
        match self.flavor {
            Flavor::Fcntl => unlock_ofd(&st.file, DATA),
            Flavor::Flock => unlock_flock(&st.file),
        }
    }

    /// Takes the kernel's exclusive lock on the file at the path. The caller
    /// holds `rw` exclusively.
    #[inline(always)]
    fn take_exclusive(&self, st: &mut State, a: &mut Attempt<'_>) -> Result<(), TryLockError> {
        if std::mem::take(&mut st.removed) {
            self.reopen_after_removal(st)?;
        }
        loop {
            st.writer_ofd = self.kernel_exclusive(st, a)?;
            let held = self.path_holds(st);
            if let Ok(true) = held {
                return Ok(());
            }
            // As in `take_first_shared`: never return holding the lock.
            let released = self.release_exclusive_kernel(st);
            held?;
            released.map_err(|e| self.io_err("unlock", e))?;
            self.reopen(st)?;
        }
    }

    /// The writer's kernel locks; `Ok(true)` if it holds the OFD gate and
    /// slot besides the flock (flock flavor, slow path).
    #[inline(always)]
    fn kernel_exclusive(&self, st: &mut State, a: &mut Attempt<'_>) -> Result<bool, TryLockError> {
        use RangeLock::Write;
        match self.flavor {
            Flavor::Fcntl => {
                // Fast path: the data alone. It passes writers queued at the
                // slot and gate (they hold those, not the data), as a kernel
                // lock lets its releaser take it straight back; readers are
                // kept out by the data lock itself, and an upgrader holds
                // the data shared through its (atomic) conversion. Readers
                // that wait behind a writer are let in first, though.
                let mut deferred = false;
                if Req::Ofd(Write, DATA)
                    .try_spinning(&st.file, a.wait)
                    .map_err(|e| self.io_err("lock", e))?
                {
                    let slot = st.hint.as_ref().map_or(0, |h| {
                        hint::after_grant();
                        h.slot_announced()
                    });
                    match self.readers_queued(&st.file, st.hint.as_ref(), slot, a.wait) {
                        Ok(false) => return Ok(false),
                        Ok(true) => deferred = true,
                        Err(e) => {
                            let _ = unlock_ofd(&st.file, DATA);
                            return Err(self.io_err("test lock", e).into());
                        }
                    }
                    unlock_ofd(&st.file, DATA).map_err(|e| self.io_err("unlock", e))?;
                }
                if a.wait == Wait::NonBlocking {
                    return Err(TryLockError::WouldBlock);
                }
                let f = st.file.clone();
                let got = self.exclusive_slow(st, a, &f, Req::Ofd(Write, DATA), deferred);
                if got.is_err() {
                    st.leave_gate();
                    let _ = unlock_ofd(&f, ALL_QUEUE);
                }
                got.map(|()| false)
            }
            Flavor::Flock => {
                // Fast path: the data, then make sure no upgrader is in the
                // middle of its (non-atomic) flock conversion; if one may
                // be, make way. The hints say so without a system call when
                // no upgradable reader announced itself: then the writer
                // keeps the lock even if writers are queued at the gate (it
                // passes them, as a kernel lock lets its releaser take it
                // straight back). Without hints the kernel cannot tell a
                // queued writer's slot from an upgrader's, and the writer
                // makes way for both.
                let f = &*st.file;
                let mut deferred = false;
                if Req::Flock(FlockOp::Exclusive)
                    .try_spinning(f, a.wait)
                    .map_err(|e| self.io_err("lock", e))?
                {
                    let slot = st.hint.as_ref().map(|h| {
                        hint::after_grant();
                        h.slot_announced()
                    });
                    let converting = if slot.is_none_or(hint::upgraders) {
                        match fcntl::ofd_get(f.as_fd(), Write, self.gate_slot()) {
                            Ok(held) => held.is_some(),
                            Err(e) => {
                                let _ = unlock_flock(f);
                                return Err(self.io_err("test lock", e).into());
                            }
                        }
                    } else {
                        false
                    };
                    if !converting {
                        // Readers queued behind a writer go first (not for a
                        // read-only descriptor's writer: it cannot wait for
                        // them on the queue byte, see below).
                        let queued = if self.read_only.load(Ordering::Relaxed) {
                            Ok(false)
                        } else {
                            self.readers_queued(f, st.hint.as_ref(), slot.unwrap_or(0), a.wait)
                        };
                        match queued {
                            Ok(false) => return Ok(false),
                            Ok(true) => deferred = true,
                            Err(e) => {
                                let _ = unlock_flock(f);
                                return Err(self.io_err("test lock", e).into());
                            }
                        }
                    }
                    unlock_flock(f).map_err(|e| self.io_err("unlock", e))?;
                }
                if a.wait == Wait::NonBlocking {
                    return Err(TryLockError::WouldBlock);
                }
                let f = st.file.clone();
                if self.read_only.load(Ordering::Relaxed) {
                    // A descriptor opened read-only (this user may only read
                    // the file) cannot take fcntl write locks, so it cannot
                    // shut the gate: this writer gets no preference over
                    // readers. A read lock on the slot still keeps it out of
                    // an upgrader's conversion (the upgrader holds the slot
                    // with a write lock through it), and queues it behind
                    // the slow-path writers (they hold the slot too).
                    let slot = Req::Ofd(RangeLock::Read, self.slot());
                    let got = a
                        .block(&f, slot, true)
                        .and_then(|()| a.block(&f, Req::Flock(FlockOp::Exclusive), true));
                    let freed = unlock_ofd(&f, self.slot());
                    got?;
                    if let Err(e) = freed {
                        let _ = unlock_flock(&f);
                        return Err(self.io_err("unlock", e).into());
                    }
                    return Ok(false);
                }
                // The slot is not announced in the hints: only upgraders
                // are, so that fast-path writers can pass this one. Holding
                // the slot, this writer may wait for the data without the
                // gate (no upgrader can be converting meanwhile: it would
                // hold the slot).
                let got = self.exclusive_slow(st, a, &f, Req::Flock(FlockOp::Exclusive), deferred);
                match got {
                    Ok(()) => Ok(true),
                    Err(e) => {
                        st.leave_gate();
                        let _ = unlock_ofd(&f, self.gate_slot_queue());
                        Err(e)
                    }
                }
            }
        }
    }

    /// The writer's slow path, both flavors (`data` is the flavor's data
    /// request): X slot; if the fast path gave the data back to queued
    /// readers (`deferred`), X on the queue byte, i.e. until they have all
    /// been granted, so that it does not take the data straight back before
    /// they wake; then the data for up to the writer's patience, counted
    /// from here, while readers still come and go; then X gate (new readers
    /// queue) and the data. On error the caller releases what was taken.
    ///
    /// With hints, the writer shuts the gate in the kernel *before* its
    /// patience and places a stamp saying when the patience ends: readers
    /// that look at the hints come in until then and queue at the gate from
    /// then on, by themselves. Without the stamp the patience ends only when
    /// the writer's timer fires *and* the writer gets a processor again,
    /// which under oversubscription (every processor busy with readers) is
    /// the next scheduler tick or later. Readers without hints find the gate
    /// shut at once (they have no patience to be shown).
    #[inline(never)]
    fn exclusive_slow(
        &self,
        st: &mut State,
        a: &mut Attempt<'_>,
        f: &File,
        data: Req,
        deferred: bool,
    ) -> Result<(), TryLockError> {
        use RangeLock::Write;
        // `None`: a patience too long to represent, never shut the gate.
        let by = Instant::now().checked_add(self.writer_patience);
        // The end of the patience for a stamp, if this writer places one.
        let stamp_by = (st.hint.is_some()
            && !self.writer_patience.is_zero()
            && self.writer_patience <= hint::STAMPED_PATIENCE_MAX)
            .then(|| crate::sys::timer::monotonic_ns() + self.writer_patience.as_nanos() as u64);
        a.block(f, Req::Ofd(Write, self.slot()), true)?;
        if deferred && a.block_by(f, Req::Ofd(Write, self.queue()), true, by)? {
            unlock_ofd(f, self.queue()).map_err(|e| self.io_err("unlock", e))?;
        }
        if let Some(t) = stamp_by {
            // Before the stamp: a reader that sees it has passed must find
            // the gate shut.
            a.block(f, Req::Ofd(Write, self.gate()), true)?;
            st.place_stamp(t);
        }
        if a.block_by(f, data, true, by)? {
            return Ok(());
        }
        if stamp_by.is_none() {
            a.block(f, Req::Ofd(Write, self.gate()), true)?;
        }
        // Past the gate: readers that look at the hints must now queue at
        // the gate too.
        st.enter_gate();
        a.block(f, data, true)
    }

    /// Releases the writer's kernel locks.
    fn release_exclusive_kernel(&self, st: &mut State) -> io::Result<()> {
        st.leave_gate();
        st.leave_slot();
        match self.flavor {
            Flavor::Fcntl => unlock_ofd(&st.file, ALL),
            Flavor::Flock => {
                let r = unlock_flock(&st.file);
                if std::mem::take(&mut st.writer_ofd) {
                    unlock_ofd(&st.file, self.gate_slot())?;
                }
                r
            }
        }
    }

    /// Whether the locked descriptor is still the file at the path, after
    /// an acquisition. With hints, an unchanged epoch since the last check
    /// means no holder removed the file with
    /// [`FileWriteGuard::remove_and_unlock`] (it bumps the bucket's counter
    /// before it releases) and no lock file was opened, perhaps made anew
    /// at this path, since; so the `lstat` is skipped, except once every
    /// [`RECHECK_EVERY`] acquisitions, which bounds how long a handle can go
    /// on locking a file removed some other way (not safe, but then not for
    /// ever).
    fn path_holds(&self, st: &mut State) -> Result<bool> {
        if !self.verify_path {
            return Ok(true);
        }
        let seen = st.hint.as_ref().map(Hint::epoch);
        if seen.is_some() && seen == st.verified && st.unchecked < RECHECK_EVERY {
            st.unchecked += 1;
            return Ok(true);
        }
        let held = self.path_matches(st)?;
        if held {
            st.verified = seen;
            st.unchecked = 0;
        }
        Ok(held)
    }

    /// One `lstat` of the path, compared with the descriptor's identity.
    fn path_matches(&self, st: &State) -> Result<bool> {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) => Ok((m.dev(), m.ino()) == st.id),
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                Ok(false)
            }
            Err(e) => Err(self.io_err("check lock file", e)),
        }
    }

    /// Replaces the descriptor with a fresh open of the path (creating the
    /// file). Only when no kernel lock is held through the old one.
    fn reopen(&self, st: &mut State) -> Result<()> {
        self.reopen_as(st, false)
    }

    /// [`Self::reopen`] after this handle removed its own file
    /// ([`FileWriteGuard::remove_and_unlock`]).
    fn reopen_after_removal(&self, st: &mut State) -> Result<()> {
        self.reopen_as(st, true)
    }

    fn reopen_as(&self, st: &mut State, again: bool) -> Result<()> {
        let (file, id, hint, writable) = open_file(&self.path, self.mode, self.hints, again)?;
        self.read_only.store(!writable, Ordering::Relaxed);
        st.file = Arc::new(file);
        st.id = id;
        st.hint = hint;
        st.verified = None;
        Ok(())
    }

    // ----- release and conversion -------------------------------------------

    #[inline(always)]
    fn leave_shared(&self, m: &Mutex<State>) -> Result<()> {
        let mut st = m.lock();
        st.readers -= 1;
        if st.readers == 0 {
            self.release_shared_kernel(&st)
                .map_err(|e| self.io_err("unlock", e))?;
        }
        Ok(())
    }

    fn leave_upgradable(&self, m: &Mutex<State>) -> Result<()> {
        let mut st = m.lock();
        st.readers -= 1;
        st.leave_slot();
        let r = if st.readers > 0 {
            unlock_ofd(&st.file, self.slot())
        } else {
            match self.flavor {
                Flavor::Fcntl => unlock_ofd(&st.file, ALL),
                Flavor::Flock => {
                    let r = unlock_flock(&st.file);
                    unlock_ofd(&st.file, self.slot()).and(r)
                }
            }
        };
        r.map_err(|e| self.io_err("unlock", e))
    }

    fn leave_exclusive(&self, st: &mut State) -> Result<()> {
        self.release_exclusive_kernel(st)
            .map_err(|e| self.io_err("unlock", e))
    }

    /// Write to read, in the kernel: converting never waits.
    fn kernel_downgrade(&self, st: &mut State) -> io::Result<()> {
        match self.flavor {
            Flavor::Fcntl => {
                if !fcntl::ofd_try(st.file.as_fd(), RangeLock::Read, DATA)? {
                    return Err(io::Error::from_raw_os_error(libc::EAGAIN));
                }
                st.leave_gate();
                unlock_ofd(&st.file, self.gate_slot())
            }
            Flavor::Flock => {
                // EX to SH with no other holder is atomic in the kernel.
                if !fcntl::flock(st.file.as_fd(), FlockOp::Shared, false)? {
                    return Err(io::Error::from_raw_os_error(libc::EAGAIN));
                }
                st.leave_gate();
                st.leave_slot();
                if std::mem::take(&mut st.writer_ofd) {
                    unlock_ofd(&st.file, self.gate_slot())?;
                }
                Ok(())
            }
        }
    }

    /// Upgradable to write, in the kernel. The caller holds `rw`
    /// exclusively, so the only in-process reader is the upgrader.
    fn kernel_upgrade(&self, st: &mut State, a: &mut Attempt<'_>) -> Result<(), UpgradeErr> {
        use RangeLock::Write;
        let f = st.file.clone();
        let f = &*f;
        let io = |e: io::Error| UpgradeErr::Restored(self.io_err("lock", e).into());
        match self.flavor {
            Flavor::Fcntl => {
                // OFD conversion keeps the shared lock while it waits and
                // when it fails, so every failure leaves the read lock held.
                if Req::Ofd(Write, DATA_GATE).try_on(f).map_err(io)? {
                    return Ok(());
                }
                if a.wait == Wait::NonBlocking {
                    return Err(UpgradeErr::Restored(TryLockError::WouldBlock));
                }
                let got = a
                    .block(f, Req::Ofd(Write, self.gate()), true)
                    .and_then(|()| {
                        st.enter_gate();
                        a.block(f, Req::Ofd(Write, DATA), true)
                    });
                got.map_err(|e| {
                    st.leave_gate();
                    let _ = unlock_ofd(f, self.gate());
                    UpgradeErr::Restored(e)
                })
            }
            Flavor::Flock => {
                // Shut the gate first: no interlock reader enters, and no
                // interlock writer passes our slot, while the kernel drops
                // our shared lock to convert it.
                a.kernel(f, Req::Ofd(Write, self.gate()), true)
                    .map_err(UpgradeErr::Restored)?;
                st.enter_gate();
                let got = if Req::Flock(FlockOp::Exclusive).try_on(f).map_err(|e| {
                    st.leave_gate();
                    let _ = unlock_ofd(f, self.gate());
                    io(e)
                })? {
                    Ok(())
                } else if a.wait == Wait::NonBlocking {
                    Err(TryLockError::WouldBlock)
                } else {
                    a.block(f, Req::Flock(FlockOp::Exclusive), true)
                };
                match got {
                    Ok(()) => {
                        st.writer_ofd = true;
                        Ok(())
                    }
                    Err(e) => {
                        // The kernel dropped our shared lock. Take it back:
                        // only a foreign flock user can hold the file now
                        // (interlock writers make way for our slot).
                        let back =
                            timer::block_restarting(|| Req::Flock(FlockOp::Shared).wait_on(f));
                        st.leave_gate();
                        let ungated = unlock_ofd(f, self.gate());
                        match back.and(ungated) {
                            Ok(_) => Err(UpgradeErr::Restored(e)),
                            Err(lost) => {
                                st.leave_slot();
                                let _ = unlock_flock(f);
                                let _ = unlock_ofd(f, self.gate_slot());
                                Err(UpgradeErr::Lost(
                                    self.io_err("restore shared lock after failed upgrade", lost)
                                        .with_kind(ErrorKind::Io)
                                        .into(),
                                ))
                            }
                        }
                    }
                }
            }
        }
    }
}

impl Lock for FileLock {
    type Guard<'a> = FileLockGuard<'a>;

    fn acquire(&self, mode: Mode, wait: Wait) -> Result<FileLockGuard<'_>, TryLockError> {
        match mode {
            Mode::Shared => self.read_with(wait).map(FileLockGuard::Shared),
            Mode::Exclusive => self.write_with(wait).map(FileLockGuard::Exclusive),
        }
    }
}

/// A held lock of either mode (what [`Lock::acquire`] returns).
#[derive(Debug)]
pub enum FileLockGuard<'a> {
    /// A shared lock.
    Shared(FileReadGuard<'a>),
    /// The exclusive lock.
    Exclusive(FileWriteGuard<'a>),
}

impl FileLockGuard<'_> {
    /// Releases the lock, reporting errors that drop would swallow.
    pub fn unlock(self) -> Result<()> {
        match self {
            FileLockGuard::Shared(g) => g.unlock(),
            FileLockGuard::Exclusive(g) => g.unlock(),
        }
    }

    /// See [`FileWriteGuard::try_clone_file`].
    pub fn try_clone_file(&self) -> Result<File> {
        match self {
            FileLockGuard::Shared(g) => g.try_clone_file(),
            FileLockGuard::Exclusive(g) => g.try_clone_file(),
        }
    }
}

/// A new descriptor of `st`'s open file description (close-on-exec).
fn clone_file(lock: &FileLock, st: &State) -> Result<File> {
    st.file
        .try_clone()
        .map_err(|e| lock.io_err("duplicate lock file descriptor", e))
}

/// A shared lock on a [`FileLock`]; released on drop.
#[must_use = "the lock is released when the guard is dropped"]
pub struct FileReadGuard<'a> {
    lock: Handle<'a>,
    rw: Option<ReadRw<'a>>,
}

impl FileReadGuard<'_> {
    /// Releases the lock, reporting errors that drop would swallow.
    pub fn unlock(mut self) -> Result<()> {
        self.release()
    }

    /// See [`FileWriteGuard::try_clone_file`].
    pub fn try_clone_file(&self) -> Result<File> {
        let rw = self.rw.as_ref().expect("a read guard holds its lock");
        let st = rw.lock();
        clone_file(&self.lock, &st)
    }

    fn release(&mut self) -> Result<()> {
        let Some(rw) = self.rw.take() else {
            return Ok(());
        };
        // The kernel first, then the in-process lock: a writer of ours that
        // gets `rw` finds no kernel lock of ours left.
        let r = self.lock.leave_shared(&rw);
        drop(rw);
        r
    }
}

impl Drop for FileReadGuard<'_> {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

impl fmt::Debug for FileReadGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileReadGuard")
            .field("path", &self.lock.path)
            .finish()
    }
}

/// The exclusive lock on a [`FileLock`]; released on drop.
#[must_use = "the lock is released when the guard is dropped"]
pub struct FileWriteGuard<'a> {
    lock: Handle<'a>,
    rw: Option<WriteRw<'a>>,
}

impl<'a> FileWriteGuard<'a> {
    /// Releases the lock, reporting errors that drop would swallow.
    pub fn unlock(mut self) -> Result<()> {
        self.release()
    }

    /// A new descriptor (`dup`, close-on-exec) of the open file description
    /// through which the lock is held. The kernel's locks belong to that
    /// description, so a process that inherits the descriptor (with
    /// close-on-exec cleared) holds the lock as long as it keeps it open,
    /// even if this process dies; this guard's unlock still releases it for
    /// everyone. This is how `interlock run` lets its command hold the lock
    /// itself, as flock(1) does.
    pub fn try_clone_file(&self) -> Result<File> {
        let rw = self.rw.as_ref().expect("a write guard holds its lock");
        clone_file(&self.lock, &rw.lock())
    }

    /// Removes the lock file, then releases the lock: the one safe way for
    /// a holder to delete the lock file.
    ///
    /// The guard is consumed, so nothing can run under the lock after the
    /// removal. That matters: from the moment the file is gone, a newcomer
    /// creates a fresh file at the path and takes its lock at once, while
    /// this holder still has the old one. Removing the file *in the middle*
    /// of a critical section (and going on with it) therefore lets a second
    /// holder in; removing it as the last act, here, does not, because
    /// processes that had opened the old file find, once they get its lock,
    /// that it is no longer at the path and open the new one (with
    /// [`FileLockOptions::verify_path`] on, the default).
    ///
    /// The file is removed only if the path still names the locked file;
    /// otherwise nothing is removed and the lock is released all the same,
    /// and the error says so ([`ErrorKind::Corrupt`]). After a removal the
    /// handle's next acquisition opens (creates) the path anew before it
    /// locks.
    pub fn remove_and_unlock(mut self) -> Result<()> {
        let lock = self.lock.clone();
        let removed = {
            let rw = self.rw.as_ref().expect("a write guard holds its lock");
            let mut st = rw.lock();
            match std::fs::symlink_metadata(&lock.path) {
                Ok(m) if (m.dev(), m.ino()) == st.id => {
                    let r = std::fs::remove_file(&lock.path)
                        .map_err(|e| lock.io_err("remove lock file", e));
                    st.removed = r.is_ok();
                    // Before the release: whoever gets the old file next
                    // sees the bump and checks the path.
                    if let Some(h) = &st.hint {
                        h.bump_removed();
                    }
                    st.verified = None;
                    r
                }
                Ok(_) => Err(Error::new(ErrorKind::Corrupt, "remove lock file")
                    .with_path(&lock.path)
                    .with_detail("another file is at the path now; nothing was removed")),
                Err(e) => Err(lock.io_err("remove lock file", e)),
            }
        };
        let released = self.release();
        removed.and(released)
    }

    fn release(&mut self) -> Result<()> {
        let Some(mut rw) = self.rw.take() else {
            return Ok(());
        };
        let r = self.lock.leave_exclusive(rw.get_mut());
        drop(rw);
        r
    }

    /// Turns the exclusive lock into a shared one without letting a writer
    /// in between. It never waits. On the (unlikely) error the lock is
    /// released.
    pub fn downgrade(mut self) -> Result<FileReadGuard<'a>> {
        let lock = self.lock.clone();
        let mut rw = self.rw.take().expect("write guard holds its lock");
        let st = rw.get_mut();
        if let Err(e) = lock.kernel_downgrade(st) {
            let _ = lock.release_exclusive_kernel(st);
            return Err(lock.io_err("downgrade", e));
        }
        st.readers = 1;
        Ok(FileReadGuard {
            lock,
            rw: Some(rw.downgrade()),
        })
    }
}

impl Drop for FileWriteGuard<'_> {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

impl fmt::Debug for FileWriteGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileWriteGuard")
            .field("path", &self.lock.path)
            .finish()
    }
}

/// An upgradable shared lock on a [`FileLock`]; released on drop.
///
/// It coexists with readers and excludes writers and other upgradable
/// readers, in this process and in others, so [`upgrade`](Self::upgrade)
/// cannot let a writer in between.
#[must_use = "the lock is released when the guard is dropped"]
pub struct FileUpgradableGuard<'a> {
    lock: Handle<'a>,
    rw: Option<UpgRw<'a>>,
}

impl<'a> FileUpgradableGuard<'a> {
    /// Releases the lock, reporting errors that drop would swallow.
    pub fn unlock(mut self) -> Result<()> {
        self.release()
    }

    fn release(&mut self) -> Result<()> {
        let Some(rw) = self.rw.take() else {
            return Ok(());
        };
        let r = self.lock.leave_upgradable(&rw);
        drop(rw);
        r
    }

    /// Waits until the readers are gone and turns this into the exclusive
    /// lock; new readers queue behind the upgrade.
    ///
    /// With [`Flavor::Flock`] the kernel drops the shared lock while it
    /// waits for the exclusive one; interlock users are kept out by the slot
    /// and gate, but another program's flock user may get the file in
    /// between.
    pub fn upgrade(self) -> Result<FileWriteGuard<'a>, UpgradeFailed<'a>> {
        self.upgrade_with(Wait::Forever)
    }

    /// The exclusive lock if no one else holds the data now; on failure the
    /// guard comes back in the error, still holding the read lock.
    pub fn try_upgrade(self) -> Result<FileWriteGuard<'a>, UpgradeFailed<'a>> {
        self.upgrade_with(Wait::NonBlocking)
    }

    /// As [`upgrade`](Self::upgrade), waiting at most `timeout`; on failure
    /// the guard comes back, still holding the read lock.
    pub fn try_upgrade_for(
        self,
        timeout: Duration,
    ) -> Result<FileWriteGuard<'a>, UpgradeFailed<'a>> {
        self.upgrade_with(Wait::timeout(timeout))
    }

    /// As [`upgrade`](Self::upgrade), waiting until `deadline` at most.
    pub fn try_upgrade_until(
        self,
        deadline: Instant,
    ) -> Result<FileWriteGuard<'a>, UpgradeFailed<'a>> {
        self.upgrade_with(Wait::Until(deadline))
    }

    /// Upgrades, waiting as `wait` allows.
    pub fn upgrade_with(self, wait: Wait) -> Result<FileWriteGuard<'a>, UpgradeFailed<'a>> {
        let lock = self.lock.clone();
        let mut a = Attempt::new(&lock, wait, Mode::Exclusive);
        // On a panic of the callback, the guard comes back in the error and
        // is dropped (released) before the panic goes on.
        let got = self.upgrade_attempt(&mut a, wait);
        a.finish(got)
    }

    fn upgrade_attempt(
        mut self,
        a: &mut Attempt<'_>,
        wait: Wait,
    ) -> Result<FileWriteGuard<'a>, UpgradeFailed<'a>> {
        let lock = self.lock.clone();
        let u = self.rw.take().expect("upgradable guard holds its lock");
        let w = match u.try_upgrade() {
            Ok(w) => Ok(w),
            Err(u) if wait == Wait::NonBlocking => Err(u),
            Err(u) => match (a.about_to_block(), wait) {
                (Err(_), _) => Err(u),
                (Ok(()), Wait::Until(t)) => u.try_upgrade_until(t),
                (Ok(()), _) => Ok(u.upgrade()),
            },
        };
        let mut w = match w {
            Ok(w) => w,
            Err(u) => {
                self.rw = Some(u);
                return Err(UpgradeFailed {
                    guard: Some(self),
                    error: wait.gave_up(),
                });
            }
        };
        debug_assert_eq!(w.get_mut().readers, 1);
        match lock.kernel_upgrade(w.get_mut(), a) {
            Ok(()) => {
                w.get_mut().readers = 0;
                Ok(FileWriteGuard { lock, rw: Some(w) })
            }
            Err(UpgradeErr::Restored(error)) => {
                self.rw = Some(w.downgrade_to_upgradable());
                Err(UpgradeFailed {
                    guard: Some(self),
                    error,
                })
            }
            Err(UpgradeErr::Lost(error)) => {
                w.get_mut().readers = 0;
                drop(w);
                Err(UpgradeFailed { guard: None, error })
            }
        }
    }

    /// Gives up the right to upgrade, keeping a plain shared lock.
    pub fn downgrade(mut self) -> Result<FileReadGuard<'a>> {
        let lock = self.lock.clone();
        let u = self.rw.take().expect("upgradable guard holds its lock");
        // The slot first, while no other thread of ours can take it.
        let mut st = u.lock();
        st.leave_slot();
        let r = unlock_ofd(&st.file, lock.slot());
        drop(st);
        let err = r.map_err(|e| lock.io_err("downgrade", e));
        let g = FileReadGuard {
            lock,
            rw: Some(u.downgrade()),
        };
        err.map(|()| g)
    }
}

impl Drop for FileUpgradableGuard<'_> {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

impl fmt::Debug for FileUpgradableGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileUpgradableGuard")
            .field("path", &self.lock.path)
            .finish()
    }
}

/// A failed upgrade: why, and the upgradable guard back (still holding the
/// read lock).
pub struct UpgradeFailed<'a> {
    guard: Option<FileUpgradableGuard<'a>>,
    error: TryLockError,
}

impl<'a> UpgradeFailed<'a> {
    /// Why the upgrade failed: `WouldBlock`, `TimedOut` or an error.
    pub fn error(&self) -> &TryLockError {
        &self.error
    }

    /// The kind, as [`TryLockError::kind`] reports it.
    pub fn kind(&self) -> ErrorKind {
        self.error.kind()
    }

    /// The upgradable guard, still holding the read lock. `None` only if the
    /// flock flavor could not take back the shared lock the kernel dropped
    /// during the attempt (then nothing is held and `error` says so).
    pub fn into_guard(self) -> Option<FileUpgradableGuard<'a>> {
        self.guard
    }

    /// Both parts.
    pub fn into_parts(self) -> (Option<FileUpgradableGuard<'a>>, TryLockError) {
        (self.guard, self.error)
    }
}

impl fmt::Debug for UpgradeFailed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpgradeFailed")
            .field("error", &self.error)
            .field("still_held", &self.guard.is_some())
            .finish()
    }
}

impl fmt::Display for UpgradeFailed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "upgrade failed: {}", self.error)
    }
}

impl From<UpgradeFailed<'_>> for TryLockError {
    fn from(e: UpgradeFailed<'_>) -> TryLockError {
        e.error
    }
}
