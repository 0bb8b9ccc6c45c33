//! [`LockSet`]: many reader-writer locks in one file, lock *i* being byte *i*.
//!
//! Why it is built this way: pylocksfile showed how useful it is to have
//! millions of named locks for the price of one file, with atomic intervals
//! and in-place conversion between read and write, but it built them on
//! classic POSIX locks, which belong to the *process*: two threads never
//! exclude each other, and closing any descriptor of the file anywhere in
//! the process silently drops every lock. This set uses open-file-description
//! (OFD) locks, which belong to the descriptor this set opened, so every
//! `LockSet` is an owner of its own, and the kernel still does the
//! splitting, merging and converting of ranges in one `fcntl` call.
//!
//! The kernel does not tell an owner what it holds, so the set keeps a
//! mirror ([`RangeMap`]) updated after each successful call; and the kernel
//! does no deadlock detection for OFD locks, so a set that is about to block
//! while it holds something publishes its wait in a registry first (see
//! `deadlock.rs`). The uncontended path is one `fcntl` and a small vector
//! update, nothing else; a set that holds nothing waits as a bare
//! `F_OFD_SETLKW` does.

use super::open::{open_lock_file, Opened};
use std::fmt;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::deadlock::{Access, FileKey, Owner, Published, Record, Registry};
use super::ranges::{self, BadRange, IndexRange, RangeMap, INDEX_END};
use crate::sys::fcntl::{ofd_try, ofd_wait, ByteRange, RangeLock};
use crate::sys::{proc, timer};
use crate::{Blocked, Error, ErrorKind, Lock, Mode, OnBlock, Result, TryLockError, Wait};

/// What a [`Scope`] restores: each part of its range and the mode it had.
type Before = Vec<(Range<u64>, Option<Mode>)>;

/// Serial numbers that tell apart the lock sets of one process.
static NEXT_SERIAL: AtomicU64 = AtomicU64::new(1);

/// How a [`LockSet`] opens its file: the creation mode and the on-block
/// callback. Made by [`LockSet::options`].
#[derive(Clone)]
pub struct LockSetOptions {
    mode: u32,
    on_block: Option<OnBlock>,
}

impl fmt::Debug for LockSetOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockSetOptions")
            .field("mode", &format_args!("{:#o}", self.mode))
            .field("on_block", &self.on_block.is_some())
            .finish()
    }
}

impl Default for LockSetOptions {
    fn default() -> Self {
        LockSetOptions {
            mode: 0o644,
            on_block: None,
        }
    }
}

impl LockSetOptions {
    /// The permission bits for a newly created lock file (default `0o644`,
    /// narrowed by the umask; bits outside 0o777 are ignored). An existing
    /// file keeps its mode.
    pub fn mode(&mut self, mode: u32) -> &mut Self {
        self.mode = mode;
        self
    }

    /// A callback told once per acquisition that is about to block (after
    /// the deadlock check passed), e.g. to print who holds the range
    /// ([`LockSet::holders`]). A set with a callback publishes every wait
    /// in the deadlock registry before the callback, so `holders` then
    /// names this set's wait too; without one, a set that holds nothing
    /// blocks without publishing (it cannot be on a cycle) and shows in
    /// `holders` as a waiter without a pid. The callback runs while the set
    /// is busy with the acquisition, so it must not call the set's other
    /// methods (they would wait for the acquisition, which waits for the
    /// callback).
    pub fn on_block(&mut self, f: impl Fn(&Blocked<'_>) + Send + Sync + 'static) -> &mut Self {
        self.on_block = Some(std::sync::Arc::new(f));
        self
    }

    /// Opens or creates the lock file at `path`.
    ///
    /// The file is opened with `O_CLOEXEC | O_NOFOLLOW`, created if missing,
    /// and never truncated or written. If it exists but this user may not
    /// write it, it is opened read-only and only [`Mode::Shared`] locks can
    /// be taken (an exclusive request fails with
    /// [`ErrorKind::PermissionDenied`]).
    ///
    /// Errors name the path: [`ErrorKind::NotFound`] if the parent directory
    /// is missing, [`ErrorKind::Corrupt`] if a directory, a symbolic link or
    /// another non-regular file is at the path, and
    /// [`ErrorKind::PermissionDenied`] if it cannot be opened at all.
    pub fn open(&self, path: impl AsRef<Path>) -> Result<LockSet> {
        let path = path.as_ref();
        let Opened { file, writable, .. } = open_lock_file(path, self.mode, "open lock set")?;
        let key = FileKey::of(&file).map_err(|e| Error::io("stat lock file", e).with_path(path))?;
        Ok(LockSet {
            file,
            path: path.to_path_buf(),
            writable,
            key,
            on_block: self.on_block.clone(),
            serial: NEXT_SERIAL.fetch_add(1, Ordering::Relaxed),
            state: Mutex::new(State {
                detection: Detection::Unopened,
                held: RangeMap::new(),
            }),
        })
    }
}

/// The state of deadlock detection for one set.
enum Detection {
    /// No wait yet: the registry is opened on the first contended wait.
    Unopened,
    /// Detection works.
    Open(Registry),
    /// The registry could not be used (disabled by the environment, no
    /// writable /dev/shm or /tmp, or a foreign object at its name).
    Disabled,
}

/// Many reader-writer locks in one file: lock *i* is byte *i*, for indices
/// `0 .. INDEX_END` (2^63 − 1, so any `u64` below 2^62 and more).
///
/// Any interval of indices is taken in one step (one `fcntl` call: all of it
/// or none of it), in [`Mode::Shared`] or [`Mode::Exclusive`]; locking a
/// sub-range that the set already holds converts it in place and keeps the
/// rest; unlocking part of a held interval splits it. Dropping the set
/// releases everything. A blocking wait that would close a cycle of owners
/// waiting for each other fails with [`ErrorKind::Deadlock`].
///
/// ```no_run
/// use interlock::{LockSet, Mode};
/// let set = LockSet::open("/tmp/accounts.locks")?;
/// set.lock(3..7, Mode::Exclusive)?;      // indices 3, 4, 5, 6 at once
/// set.lock(5, Mode::Shared)?;            // convert 5 only
/// set.unlock(3)?;                        // release 3, keep 4..7
/// assert_eq!(set.held(), vec![(4..5, Mode::Exclusive), (5..6, Mode::Shared), (6..7, Mode::Exclusive)]);
/// {
///     let _scope = set.scoped(.., Mode::Shared)?; // everything shared for a block
/// }                                              // ... then back as before
/// # Ok::<(), interlock::Error>(())
/// ```
///
/// # Ownership: one set is one owner
///
/// The locks belong to this `LockSet` (its open file description), not to a
/// thread or a process. Threads that share one `LockSet` (methods take
/// `&self`) act as **one** owner: they never exclude each other, and their
/// operations on the set run one at a time (a blocking `lock` keeps the set
/// busy until it returns, and `held` and `mode_of` wait for it too).
/// Threads or tasks that must exclude each other open their own `LockSet` on
/// the same path; two sets exclude each other exactly as two processes do,
/// and deadlocks between them are detected the same way.
///
/// # Scope, fork, close, crash, NFS
///
/// - Scope: the host (every process that opens the same file). The set is
///   the owner; see above.
/// - Fork: the child inherits the descriptor, so parent and child are the
///   *same* owner of the same locks (the kernel's rule for OFD locks); either
///   one unlocking releases for both. Do not use one set on both sides of a
///   fork: open a new set in the child.
/// - Close: only dropping this set releases its locks. Closing or dropping
///   other descriptors of the same file (another `LockSet`, a `File`) never
///   does, unlike classic POSIX locks.
/// - Crash: the kernel releases all of a dead process's locks at once; its
///   waiting record (if any) is ignored and cleaned up by the next waiter.
/// - NFS: OFD locks are forwarded to the server by NFSv4 as ordinary byte
///   locks; deadlock detection, however, only sees waiters on this host
///   (the registry is in this host's /dev/shm).
/// - Interop: OFD locks conflict with classic `fcntl`/`lockf` locks on the
///   same bytes (so a Python `fcntl.lockf` user and a `LockSet` exclude each
///   other), but not with `flock`.
/// - The file is never written or truncated, and must not be removed while
///   in use: a process that opens a new file at the path would not exclude
///   holders of the old one.
///
/// # Deadlock detection and its limits
///
/// Only waits between `LockSet`s on one host are seen. A holder that is not
/// a `LockSet` (a Python `lockf`, another library) can be waited on but not
/// part of a detected cycle, and a single thread that waits on a second set
/// while its first set holds the range simply waits (no cycle of waiters).
/// If the registry cannot be used (see [`LockSet::detects_deadlocks`]), waits
/// block without detection.
pub struct LockSet {
    file: File,
    path: PathBuf,
    writable: bool,
    key: FileKey,
    on_block: Option<OnBlock>,
    serial: u64,
    /// Held by every operation of this owner, including for the whole of a
    /// blocking wait: a waiting owner's holdings must not change (the
    /// deadlock argument), and one mutex keeps the uncontended path short.
    state: Mutex<State>,
}

/// What an owner knows about itself.
struct State {
    detection: Detection,
    /// A mirror of what the kernel has granted this set.
    held: RangeMap,
}

impl fmt::Debug for LockSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockSet")
            .field("path", &self.path)
            .field("writable", &self.writable)
            .field("held", &self.held())
            .finish()
    }
}

fn kind_of(mode: Mode) -> RangeLock {
    match mode {
        Mode::Shared => RangeLock::Read,
        Mode::Exclusive => RangeLock::Write,
    }
}

fn bytes(r: &Range<u64>) -> ByteRange {
    ByteRange {
        start: r.start,
        len: r.end - r.start,
    }
}

impl LockSet {
    /// Opens or creates the lock set at `path` with default options
    /// (see [`LockSetOptions::open`]).
    pub fn open(path: impl AsRef<Path>) -> Result<LockSet> {
        LockSetOptions::default().open(path)
    }

    /// Options for opening: creation mode, on-block callback.
    pub fn options() -> LockSetOptions {
        LockSetOptions::default()
    }

    /// The path this set was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file could be opened for writing (otherwise only shared
    /// locks can be taken).
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Locks `range` in `mode`, waiting as long as it takes. Converts any
    /// part already held in the other mode, keeping the rest of the set's
    /// holdings. Fails with [`ErrorKind::Deadlock`] if waiting would close a
    /// cycle of waiting owners; the set's holdings are then unchanged.
    pub fn lock(&self, range: impl IndexRange, mode: Mode) -> Result<()> {
        self.lock_with(range, mode, Wait::Forever)
            .map_err(Error::from)
    }

    /// Locks `range` in `mode` only if that is possible right now;
    /// otherwise `Err(TryLockError::WouldBlock)` and nothing changes (a
    /// failed conversion keeps the previous mode).
    pub fn try_lock(&self, range: impl IndexRange, mode: Mode) -> Result<(), TryLockError> {
        self.lock_with(range, mode, Wait::NonBlocking)
    }

    /// Locks `range` in `mode`, waiting at most `timeout`; then
    /// `Err(TryLockError::TimedOut)` and nothing changes.
    pub fn lock_for(
        &self,
        range: impl IndexRange,
        mode: Mode,
        timeout: Duration,
    ) -> Result<(), TryLockError> {
        self.lock_with(range, mode, Wait::timeout(timeout))
    }

    /// Locks `range` in `mode`, waiting until `deadline` at most; then
    /// `Err(TryLockError::TimedOut)` and nothing changes.
    pub fn lock_until(
        &self,
        range: impl IndexRange,
        mode: Mode,
        deadline: Instant,
    ) -> Result<(), TryLockError> {
        self.lock_with(range, mode, Wait::Until(deadline))
    }

    /// Locks `range` in `mode`, waiting as `wait` allows (the general form
    /// of the four methods above).
    pub fn lock_with(
        &self,
        range: impl IndexRange,
        mode: Mode,
        wait: Wait,
    ) -> Result<(), TryLockError> {
        let r = self.check(&range)?;
        let mut st = self.state.lock();
        self.acquire_locked(&mut st, r, mode, wait)
    }

    /// Releases `range` (whatever part of it is held; the rest of the
    /// set's holdings stay). Never blocks.
    pub fn unlock(&self, range: impl IndexRange) -> Result<()> {
        let r = self.check(&range)?;
        let mut st = self.state.lock();
        self.unlock_locked(&mut st, r)
    }

    /// Releases everything this set holds. Never blocks.
    pub fn unlock_all(&self) -> Result<()> {
        let mut st = self.state.lock();
        if st.held.is_empty() {
            return Ok(());
        }
        self.unlock_locked(&mut st, 0..INDEX_END)
    }

    /// What this set holds: maximal intervals of one mode, in order.
    pub fn held(&self) -> Vec<(Range<u64>, Mode)> {
        self.state.lock().held.iter().collect()
    }

    /// [`LockSet::held`] if it can be answered without waiting: `None`
    /// while another thread is inside a call on this set (a lock call
    /// waiting for its indices, for one).
    pub fn try_held(&self) -> Option<Vec<(Range<u64>, Mode)>> {
        Some(self.state.try_lock()?.held.iter().collect())
    }

    /// The mode index `i` is held in by this set, if any.
    pub fn mode_of(&self, i: u64) -> Option<Mode> {
        self.state.lock().held.get(i)
    }

    /// Applies `mode` to `range` until the returned [`Scope`] ends, then
    /// restores each part of the range to what this set held before
    /// (unlocked, shared or exclusive); the `with locksfile(...)` of
    /// pylocksfile. Waits as long as it takes; see [`LockSet::lock`].
    pub fn scoped(&self, range: impl IndexRange, mode: Mode) -> Result<Scope<'_>> {
        self.scope_with(range, mode, Wait::Forever)
            .map_err(Error::from)
    }

    /// As [`LockSet::scoped`], waiting as `wait` allows.
    pub fn scope_with(
        &self,
        range: impl IndexRange,
        mode: Mode,
        wait: Wait,
    ) -> Result<Scope<'_>, TryLockError> {
        let before = self.scope_begin(&range, mode, wait)?;
        Ok(Scope {
            set: crate::handle::Handle::Borrowed(self),
            before,
            restored: false,
        })
    }

    /// As [`LockSet::scope_with`], returning a scope that owns a reference
    /// to the set (`'static`: it may be kept and ended anywhere).
    pub fn scope_arc(
        self: &std::sync::Arc<Self>,
        range: impl IndexRange,
        mode: Mode,
        wait: Wait,
    ) -> Result<Scope<'static>, TryLockError> {
        let before = self.scope_begin(&range, mode, wait)?;
        Ok(Scope {
            set: crate::handle::Handle::Owned(std::sync::Arc::clone(self)),
            before,
            restored: false,
        })
    }

    fn scope_begin(
        &self,
        range: &impl IndexRange,
        mode: Mode,
        wait: Wait,
    ) -> Result<Before, TryLockError> {
        let r = self.check(range)?;
        let mut st = self.state.lock();
        let before = st.held.segments(&r);
        self.acquire_locked(&mut st, r, mode, wait)?;
        Ok(before)
    }

    /// Who holds or waits for locks on this set's file (this set included),
    /// as far as the kernel shows it; see [`crate::holders`]. Does not take
    /// the set's mutex, so an on-block callback may call it.
    pub fn holders(&self) -> Result<Vec<super::inspect::Holder>> {
        super::inspect::holders_of(self.key, self.access(), &self.path)
    }

    /// Whether blocking waits of this set are checked for deadlocks: true
    /// unless the wait registry (in /dev/shm, else /tmp; see
    /// [`crate::REGISTRY_DIR_ENV`]) could not be used. Opens the registry
    /// if no wait has done so yet.
    pub fn detects_deadlocks(&self) -> bool {
        let mut st = self.state.lock();
        self.registry(&mut st.detection).is_some()
    }

    fn check(&self, range: &impl IndexRange) -> Result<Range<u64>> {
        ranges::checked(range).map_err(|bad| {
            let shown = range.shown();
            let detail = match bad {
                BadRange::Empty => format!("empty index range {shown}"),
                BadRange::OutOfBounds => {
                    format!(
                        "index range {shown} ends beyond the last index ({INDEX_END} is the end)"
                    )
                }
            };
            Error::new(ErrorKind::InvalidInput, "lock set range")
                .with_path(&self.path)
                .with_detail(detail)
        })
    }

    fn io_error(&self, op: &'static str, e: io::Error) -> Error {
        Error::io(op, e).with_path(&self.path)
    }

    /// A new descriptor (`dup`, close-on-exec) of the open file description
    /// this set locks through. OFD locks belong to that description: a
    /// process that inherits the descriptor (close-on-exec cleared) keeps
    /// the set's locks held while it keeps it open, even if this process
    /// dies; unlocking here still releases them for everyone.
    pub fn try_clone_file(&self) -> Result<File> {
        self.file
            .try_clone()
            .map_err(|e| self.io_error("duplicate lock file descriptor", e))
    }

    /// Who may use the lock file (its owner, group and mode), against which
    /// the registry's records are checked.
    fn access(&self) -> Access {
        match self.file.metadata() {
            Ok(m) => Access::of(&m),
            // Unknown: only records of root and this user are believed.
            Err(_) => Access {
                uid: 0,
                gid: 0,
                mode: 0,
            },
        }
    }

    fn registry<'a>(&self, detection: &'a mut Detection) -> Option<&'a Registry> {
        if let Detection::Unopened = detection {
            *detection = match Registry::open(self.key, self.access()) {
                Some(r) => Detection::Open(r),
                None => Detection::Disabled,
            };
        }
        match detection {
            Detection::Open(r) => Some(r),
            _ => None,
        }
    }

    /// Blocks in `F_OFD_SETLKW` for `r` until granted (recorded in
    /// `held`) or `deadline`.
    fn wait_in_kernel(
        &self,
        held: &mut RangeMap,
        r: Range<u64>,
        mode: Mode,
        deadline: Option<Instant>,
    ) -> Result<(), TryLockError> {
        let (fd, kind, br) = (self.file.as_fd(), kind_of(mode), bytes(&r));
        match timer::block_until(deadline, || ofd_wait(fd, kind, br))
            .map_err(|e| self.io_error("lock set range", e))?
        {
            Some(()) => {
                held.set(r, Some(mode));
                Ok(())
            }
            None => Err(TryLockError::TimedOut),
        }
    }

    fn acquire_locked(
        &self,
        st: &mut State,
        r: Range<u64>,
        mode: Mode,
        wait: Wait,
    ) -> Result<(), TryLockError> {
        const OP: &str = "lock set range";
        if mode == Mode::Exclusive && !self.writable {
            return Err(Error::new(ErrorKind::PermissionDenied, OP)
                .with_path(&self.path)
                .with_detail("opened read-only (no write permission): only shared locks")
                .into());
        }
        if st.held.covers(&r, mode) {
            return Ok(());
        }
        let kind = kind_of(mode);
        let br = bytes(&r);
        let fd = self.file.as_fd();
        // A set that holds nothing cannot be part of a cycle (an edge leads
        // to an owner that holds something), so unless a callback wants to
        // look at a published wait, it waits in the kernel without the
        // registry, as a bare `F_OFD_SETLKW` does. Waiting as long as it
        // takes, it makes that one blocking call at once (granted at once
        // if the range is free).
        let bare = st.held.is_empty() && self.on_block.is_none();
        if bare && matches!(wait, Wait::Forever) && !wait.expired() {
            return self.wait_in_kernel(&mut st.held, r, mode, None);
        }
        // The uncontended path: one non-blocking call, no registry.
        if ofd_try(fd, kind, br).map_err(|e| self.io_error(OP, e))? {
            st.held.set(r, Some(mode));
            return Ok(());
        }
        if !wait.may_block() {
            return Err(TryLockError::WouldBlock);
        }
        let deadline = match wait {
            Wait::Until(t) => Some(t),
            _ => None,
        };
        if wait.expired() {
            return Err(TryLockError::TimedOut);
        }
        // Contended.
        let State { detection, held } = st;
        if bare {
            return self.wait_in_kernel(held, r, mode, deadline);
        }
        // Publish the wait and check for a cycle first.
        let registry = self.registry(detection);
        let _waiter = match registry {
            None => None,
            Some(reg) => {
                let me = Record {
                    file: self.key,
                    owner: Owner {
                        process: proc::current(),
                        serial: self.serial,
                    },
                    want: r.clone(),
                    want_mode: mode,
                    held: held.segs().to_vec(),
                };
                match reg.publish(&me, deadline) {
                    Ok(Published::Deadlock) => {
                        return Err(Error::new(ErrorKind::Deadlock, OP)
                            .with_path(&self.path)
                            .with_detail(format!(
                                "waiting for {mode} {}..{} would close a cycle of waiting owners",
                                r.start, r.end
                            ))
                            .into())
                    }
                    Ok(Published::Waiting(w)) => Some(w),
                    // The registry failed (full /dev/shm, ...): wait
                    // without detection rather than fail the lock.
                    Err(_) => None,
                }
            }
        };
        if let Some(cb) = &self.on_block {
            cb(&Blocked {
                resource: &self.path,
                mode,
                range: Some((r.start, r.end)),
            });
        }
        self.wait_in_kernel(held, r, mode, deadline)
        // `_waiter` is dropped here, removing the record.
    }

    fn unlock_locked(&self, st: &mut State, r: Range<u64>) -> Result<()> {
        ofd_try(self.file.as_fd(), RangeLock::Unlock, bytes(&r))
            .map_err(|e| self.io_error("unlock lock set range", e))?;
        st.held.set(r, None);
        Ok(())
    }
}

impl Drop for LockSet {
    fn drop(&mut self) {
        // Closing the descriptor would release too, unless a forked child
        // or a dup still refers to the description; release explicitly.
        if !self.state.get_mut().held.is_empty() {
            let _ = ofd_try(self.file.as_fd(), RangeLock::Unlock, bytes(&(0..INDEX_END)));
        }
    }
}

/// A mode applied to a range of a [`LockSet`] for a block; when it ends
/// (drop or [`Scope::restore`]) each part of the range returns to what the
/// set held before: unlocked, shared or exclusive.
///
/// Restoring never blocks when the scope's mode was at least as strong as
/// what it replaced (for example an exclusive scope over shared or unlocked
/// indices). Restoring an exclusive lock that a *shared* scope downgraded
/// has to take it back, which may wait for other owners and may fail with
/// [`ErrorKind::Deadlock`]; drop then leaves that part shared (use
/// [`Scope::restore`] to see the error). Changes made to the range through
/// the set during the scope are overwritten by the restore.
#[must_use = "the previous state is restored when the scope is dropped"]
pub struct Scope<'a> {
    set: crate::handle::Handle<'a, LockSet>,
    before: Before,
    restored: bool,
}

impl fmt::Debug for Scope<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scope")
            .field("path", &self.set.path)
            .field("before", &self.before)
            .finish()
    }
}

impl Scope<'_> {
    /// Ends the scope now, restoring the previous state, and reports any
    /// error that drop would have to swallow.
    pub fn restore(mut self) -> Result<()> {
        self.restore_inner()
    }

    /// Ends the scope keeping its changes: the set goes on holding what
    /// the scope took, as after [`LockSet::lock`].
    pub(crate) fn keep(mut self) {
        self.restored = true;
    }

    fn restore_inner(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.restored, true) {
            return Ok(());
        }
        let set = &*self.set;
        let mut st = set.state.lock();
        let mut first_error = None;
        // Releases and downgrades first: they never wait, and they may be
        // what another owner needs before we can re-take an exclusive part.
        for (r, m) in &self.before {
            let res = match m {
                None => set.unlock_locked(&mut st, r.clone()),
                Some(Mode::Shared) => set
                    .acquire_locked(&mut st, r.clone(), Mode::Shared, Wait::Forever)
                    .map_err(Error::from),
                Some(Mode::Exclusive) => continue,
            };
            if let Err(e) = res {
                first_error.get_or_insert(e);
            }
        }
        for (r, m) in &self.before {
            if *m == Some(Mode::Exclusive) {
                if let Err(e) =
                    set.acquire_locked(&mut st, r.clone(), Mode::Exclusive, Wait::Forever)
                {
                    first_error.get_or_insert(e.into());
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Scope<'_> {
    fn drop(&mut self) {
        let _ = self.restore_inner();
    }
}

/// Generic use of a whole set as one lock: `acquire` applies the mode to
/// every index (`..`) for the life of the returned [`Scope`].
impl Lock for LockSet {
    type Guard<'a> = Scope<'a>;

    fn acquire(&self, mode: Mode, wait: Wait) -> Result<Scope<'_>, TryLockError> {
        self.scope_with(.., mode, wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::ranges::tests::model_runs;
    use proptest::prelude::*;

    fn set_in(dir: &tempfile::TempDir) -> LockSet {
        LockSet::open(dir.path().join("set.lock")).unwrap()
    }

    #[test]
    fn open_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no/such/dir/x.lock");
        let e = LockSet::open(&missing).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(e.path(), Some(missing.as_path()));
        let e = LockSet::open(dir.path()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert!(e.to_string().contains("directory"), "{e}");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path().join("target"), &link).unwrap();
        let e = LockSet::open(&link).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(!dir.path().join("target").exists());
    }

    #[test]
    fn creates_with_mode_and_never_writes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.lock");
        let s = LockSet::options().mode(0o600).open(&p).unwrap();
        s.lock(.., Mode::Exclusive).unwrap();
        s.unlock_all().unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        assert_eq!(m.len(), 0);
        std::fs::write(&p, b"keep").unwrap();
        let s2 = LockSet::open(&p).unwrap();
        s2.lock(0..10, Mode::Shared).unwrap();
        drop(s2);
        assert_eq!(std::fs::read(&p).unwrap(), b"keep");
    }

    #[test]
    fn bad_ranges_are_invalid_input() {
        let dir = tempfile::tempdir().unwrap();
        let s = set_in(&dir);
        #[allow(clippy::reversed_empty_ranges)]
        let cases: Vec<Box<dyn Fn() -> Result<()>>> = vec![
            Box::new(|| s.lock(3..3, Mode::Shared)),
            Box::new(|| s.lock(7..3, Mode::Shared)),
            Box::new(|| s.lock(INDEX_END, Mode::Shared)),
            Box::new(|| s.lock(0..INDEX_END + 1, Mode::Shared)),
            Box::new(|| s.lock(..=u64::MAX, Mode::Shared)),
            Box::new(|| s.unlock(u64::MAX)),
            Box::new(|| s.lock(5..=3, Mode::Shared)),
        ];
        for c in cases {
            let e = c().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
            assert!(e.path().is_some());
        }
        // The range is named as written, not as the empty interval it is.
        #[allow(clippy::reversed_empty_ranges)]
        let e = s.lock(5..=3, Mode::Shared).unwrap_err().to_string();
        assert!(e.contains("5..=3"), "{e}");
        let e = s.lock(..=u64::MAX, Mode::Shared).unwrap_err().to_string();
        assert!(e.contains("..=18446744073709551615"), "{e}");
        s.lock(1 << 62, Mode::Exclusive).unwrap();
        s.lock(INDEX_END - 1, Mode::Exclusive).unwrap();
        assert_eq!(s.mode_of(1 << 62), Some(Mode::Exclusive));
    }

    #[test]
    fn two_sets_in_one_process_exclude_and_convert() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (set_in(&dir), set_in(&dir));
        a.lock(3..7, Mode::Exclusive).unwrap();
        assert!(matches!(
            b.try_lock(6, Mode::Shared),
            Err(TryLockError::WouldBlock)
        ));
        b.try_lock(7, Mode::Exclusive).unwrap();
        a.lock(4..=5, Mode::Shared).unwrap();
        b.try_lock(4, Mode::Shared).unwrap();
        assert!(b.try_lock(3, Mode::Shared).is_err());
        a.unlock(3).unwrap();
        b.try_lock(3, Mode::Shared).unwrap();
        assert_eq!(
            a.held(),
            vec![(4..6, Mode::Shared), (6..7, Mode::Exclusive)]
        );
        let t = Instant::now();
        assert!(matches!(
            b.lock_for(6, Mode::Shared, Duration::from_millis(20)),
            Err(TryLockError::TimedOut)
        ));
        assert!(t.elapsed() >= Duration::from_millis(20));
        drop(a);
        b.lock_for(0..100, Mode::Exclusive, Duration::from_secs(5))
            .unwrap();
    }

    #[test]
    fn scope_restores_each_part() {
        let dir = tempfile::tempdir().unwrap();
        let s = set_in(&dir);
        s.lock(0..2, Mode::Shared).unwrap();
        s.lock(4..6, Mode::Exclusive).unwrap();
        let before = s.held();
        {
            let _g = s.scoped(1..5, Mode::Exclusive).unwrap();
            assert_eq!(
                s.held(),
                vec![(0..1, Mode::Shared), (1..6, Mode::Exclusive)]
            );
        }
        assert_eq!(s.held(), before);
        let g = s.scoped(.., Mode::Shared).unwrap();
        assert_eq!(s.held(), vec![(0..INDEX_END, Mode::Shared)]);
        g.restore().unwrap();
        assert_eq!(s.held(), before);
        let g = Lock::acquire(&s, Mode::Exclusive, Wait::NonBlocking).unwrap();
        assert_eq!(s.held(), vec![(0..INDEX_END, Mode::Exclusive)]);
        drop(g);
        assert_eq!(s.held(), before);
    }

    #[test]
    fn two_readers_upgrading_get_deadlock_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (set_in(&dir), set_in(&dir));
        if !a.detects_deadlocks() {
            eprintln!("deadlock detection unavailable here; skipping");
            return;
        }
        a.lock(0, Mode::Shared).unwrap();
        b.lock(0, Mode::Shared).unwrap();
        std::thread::scope(|sc| {
            let h = sc.spawn(|| a.lock(0, Mode::Exclusive));
            // Wait until `a` has published its wait (it is blocked).
            let deadline = Instant::now() + Duration::from_secs(10);
            while super::super::deadlock::waiters(a.key, a.access()).is_empty() {
                assert!(Instant::now() < deadline, "a never waited");
                std::thread::yield_now();
            }
            let e = b.lock(0, Mode::Exclusive).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Deadlock, "{e}");
            assert_eq!(b.mode_of(0), Some(Mode::Shared));
            assert!(!h.is_finished());
            b.unlock(0).unwrap();
            h.join().unwrap().unwrap();
        });
        assert_eq!(a.mode_of(0), Some(Mode::Exclusive));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Lock(u64, u64, Mode),
        Unlock(u64, u64),
        UnlockAll,
        Scope(u64, u64, Mode, Vec<(u64, u64, Mode)>),
    }

    fn arb_mode() -> impl Strategy<Value = Mode> {
        prop_oneof![Just(Mode::Shared), Just(Mode::Exclusive)]
    }

    fn arb_range() -> impl Strategy<Value = (u64, u64)> {
        (0..32u64, 1..8u64).prop_map(|(s, l)| (s, s + l))
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (arb_range(), arb_mode()).prop_map(|((s, e), m)| Op::Lock(s, e, m)),
            2 => arb_range().prop_map(|(s, e)| Op::Unlock(s, e)),
            1 => Just(Op::UnlockAll),
            1 => (arb_range(), arb_mode(), proptest::collection::vec((arb_range(), arb_mode()), 0..3))
                .prop_map(|((s, e), m, inner)| Op::Scope(s, e, m, inner.into_iter().map(|((a, b), m)| (a, b, m)).collect())),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// After any sequence of operations, `held()` matches a model, and
        /// a second set in the same process sees exactly those holdings
        /// (probed with `F_OFD_GETLK`).
        #[test]
        fn lock_set_matches_model(ops in proptest::collection::vec(arb_op(), 1..30)) {
            let dir = tempfile::tempdir().unwrap();
            let s = set_in(&dir);
            let probe = set_in(&dir);
            let mut model: Vec<Option<Mode>> = vec![None; 48];
            for op in ops {
                match op {
                    Op::Lock(a, b, m) => {
                        s.try_lock(a..b, m).unwrap();
                        model[a as usize..b as usize].fill(Some(m));
                    }
                    Op::Unlock(a, b) => {
                        s.unlock(a..b).unwrap();
                        model[a as usize..b as usize].fill(None);
                    }
                    Op::UnlockAll => {
                        s.unlock_all().unwrap();
                        model.fill(None);
                    }
                    Op::Scope(a, b, m, inner) => {
                        let saved = model.clone();
                        let g = s.scope_with(a..b, m, Wait::NonBlocking).unwrap();
                        model[a as usize..b as usize].fill(Some(m));
                        prop_assert_eq!(s.held(), model_runs(&model));
                        for (c, d, m2) in inner {
                            s.try_lock(c..d, m2).unwrap();
                            model[c as usize..d as usize].fill(Some(m2));
                        }
                        g.restore().unwrap();
                        model[a as usize..b as usize].copy_from_slice(&saved[a as usize..b as usize]);
                    }
                }
                prop_assert_eq!(s.held(), model_runs(&model));
            }
            for (i, m) in model.iter().enumerate() {
                let i = i as u64;
                prop_assert_eq!(s.mode_of(i), *m);
                // The kernel agrees: another owner can read-lock exactly
                // the indices not held exclusively, write-lock the free ones.
                let can_read = probe.try_lock(i, Mode::Shared).is_ok();
                prop_assert_eq!(can_read, *m != Some(Mode::Exclusive));
                probe.unlock(i).unwrap();
                let can_write = probe.try_lock(i, Mode::Exclusive).is_ok();
                prop_assert_eq!(can_write, m.is_none());
                probe.unlock(i).unwrap();
            }
        }
    }
}
