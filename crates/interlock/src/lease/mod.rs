//! `LeaseLock`: a lock that is a directory, held for a time to live, with
//! fencing tokens; for file systems where kernel locks are missing or cannot
//! be trusted (many network file systems), and whenever the protected
//! resource must be able to refuse a holder whose lease ran out.
//!
//! Why it is built this way. lockbydir had the right idea (a lock is a
//! directory made by an atomic `mkdir`; it is stale after TIMEOUT; a waiter
//! gives up after PATIENCE) and three defects, each fixed here:
//!
//! 1. *It broke a live holder's lock after a fixed time.* Here a holder
//!    renews its lease (explicitly or from a background thread), and a lock
//!    is broken only if its owner is a dead process of this host, or its
//!    lease ran out.
//! 2. *Two processes breaking the same stale lock raced, and a breaker
//!    could remove a lock that had just been freshly taken.* Breaking was
//!    "look, then remove by name", and between the look and the removal the
//!    name can come to mean a different, fresh lock (ABA). Here the state
//!    that is judged (version, token, expiry) is the *name* of the one file
//!    in the lock directory, and breaking it is `renameat(dirfd, judged,
//!    dirfd, tombstone)` through a descriptor of the judged directory. The
//!    rename succeeds only if that exact state is still there, in that exact
//!    directory, so of two breakers one gets `ENOENT`, and a renewal (which
//!    renames the same file to a new name) and a break exclude each other.
//!    A lock directory is removed by name only with `rmdir`, which fails on
//!    a non-empty directory, and a live lock directory is never empty (it
//!    appears at its path already holding its lease file: it is built in a
//!    private staging directory and renamed into place).
//! 3. *The resource had no way to refuse a holder whose lease ran out.*
//!    Every acquisition gets a fencing token, strictly increasing across
//!    takeovers and crashes (see `fence.rs` and the argument below).
//!
//! Layout, for a lock at `DIR/NAME`:
//!
//! ```text
//! DIR/NAME/                      exists while held; one file:
//!   lease.VERSION.TOKEN.EXPIRY   the lease; content: host, boot id, pid
//!                                namespace, pid, start time, nonce, ttl
//!   (dead.VERSION.TOKEN.EXPIRY)  the same file once released or broken
//! DIR/NAME.lease/                made on first use; never delete it while
//!   tokens/N                     the lock is in use: the newest claimed
//!                                fencing token(s), empty files
//!   stage/TAG.PID.START.NONCE/   an acquirer's private staging directory
//! ```
//!
//! Acquiring: build `stage/X/lease.0.0.EXPIRY` with the owner record (or
//! take the `stage/X/` that the last release left, holding the record);
//! rename `stage/X` to `DIR/NAME` refusing to replace (`RENAME_NOREPLACE`;
//! where the file system lacks it, plain `rename`, which can replace only an
//! empty directory, and an empty lock directory is dead); claim a fencing
//! token; publish it by the compare-and-swap rename `lease.0.0.E` →
//! `lease.1.TOKEN.E'`. Only after that rename succeeds is the token issued.
//! The exception: a lease staged as `lease.1.P.E` under the next number P of
//! its handle's batch is issued P by the claim check after the install (the
//! batch's claim file still linked), with no rename (see `fence.rs`).
//!
//! Why tokens increase: a token `t` is issued at the moment its holder's
//! publishing rename succeeds, so its lock directory was live then. A later
//! holder's directory appears only after that one was killed, and the later
//! holder lists the claims only after its own directory is installed, so it
//! sees a claim ≥ `t` (claims are removed only below a newer existing claim,
//! so the largest never decreases) and claims a larger number. Two holders
//! can never be issued the same number: a number is claimed by an exclusive
//! create (`O_CREAT|O_EXCL`), and
//! one that was claimed, issued and later trimmed could only be claimed
//! again by a process that listed before it existed, whose own directory
//! would then have to have been live both before and after the other's
//! issue, i.e. at the same time as another live directory, which cannot be.
//!
//! Scope: per lock path, across threads, processes and hosts that share the
//! directory. Not reentrant: a second acquisition by the same thread waits
//! like anyone else. Fork: the child inherits no lease (its copy of a guard
//! does nothing on drop). Close: leases are not tied to descriptors.
//! Crash: a dead holder of this host, boot and pid namespace is taken over
//! at once (waiters watch it with a pidfd); a holder elsewhere only after its
//! lease plus the clock-skew allowance. NFS: needs atomic `mkdir`/`rename`
//! and exclusive create (NFSv3 and later) and wall clocks within the skew
//! allowance; inotify does
//! not see other clients' changes, so waiters there poll with back-off.

mod clock;
mod fence;
mod guard;
mod record;

use std::ffi::OsString;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

pub use clock::{Clock, ManualClock, SystemClock};
pub use guard::{LeaseGuard, OnLost};

use clock::{from_unix_nanos, nanos, unix_nanos};
use fence::Fence;
use guard::Held;
use record::{judge, LeaseName, Locality, Owner, Verdict, MAX_RECORD};

use crate::sys::dir::{rename_noreplace, Dir};
use crate::sys::notify::{self, Inotify, PidFd};
use crate::sys::proc::{self, liveness, Liveness, ProcessId};
use crate::{Blocked, Error, ErrorKind, Lock, Mode, OnBlock, Result, TryLockError, Wait};

/// How a [`LeaseLock`] behaves: time to live, clock, renewal, waiting.
#[derive(Clone)]
pub struct LeaseOptions {
    ttl: Duration,
    clock: Arc<dyn Clock>,
    max_clock_skew: Duration,
    keep_alive: Option<Duration>,
    on_block: Option<OnBlock>,
    on_lost: Option<OnLost>,
    durable: bool,
    notify: bool,
    max_poll: Duration,
    dir_mode: u32,
    foreign_state: bool,
}

impl LeaseOptions {
    /// Options with time to live `ttl` (lockbydir's TIMEOUT) and defaults:
    /// system clock, 1 s clock-skew allowance, no background renewal, durable
    /// tokens, inotify waits with a 100 ms fallback poll.
    pub fn new(ttl: Duration) -> LeaseOptions {
        LeaseOptions {
            ttl,
            clock: Arc::new(SystemClock),
            max_clock_skew: Duration::from_secs(1),
            keep_alive: None,
            on_block: None,
            on_lost: None,
            durable: true,
            notify: true,
            max_poll: Duration::from_millis(100),
            dir_mode: 0o755,
            foreign_state: false,
        }
    }

    /// Whether a state directory `NAME.lease/` (or its `tokens/` and
    /// `stage/`) owned by another user may be used (default `false`:
    /// refused with [`ErrorKind::PermissionDenied`]).
    ///
    /// Whoever owns the state directory decides the fencing tokens: they can
    /// remove the claims (so that tokens start over) or plant the largest
    /// number (so that no token can ever be issued again). A holder never
    /// sees its own tokens go backwards (each handle remembers the last it
    /// was issued), but other processes would. Opt in only when the owner
    /// is trusted, e.g. a lock shared by the users of one group.
    #[must_use]
    pub fn allow_foreign_state(mut self, on: bool) -> Self {
        self.foreign_state = on;
        self
    }

    /// The clock expiry is measured on (a [`ManualClock`] in tests).
    #[must_use]
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// How far apart the wall clocks of the hosts sharing the lock may be. A
    /// lease is broken only this long after its expiry.
    #[must_use]
    pub fn max_clock_skew(mut self, skew: Duration) -> Self {
        self.max_clock_skew = skew;
        self
    }

    /// Renew every acquired lease from a background thread every `ttl / 3`.
    #[must_use]
    pub fn keep_alive(mut self, on: bool) -> Self {
        self.keep_alive = on.then(|| self.ttl / 3);
        self
    }

    /// Renew every acquired lease from a background thread every `every`.
    #[must_use]
    pub fn keep_alive_every(mut self, every: Duration) -> Self {
        self.keep_alive = Some(every);
        self
    }

    /// Called once per acquisition just before it blocks.
    #[must_use]
    pub fn on_block(mut self, f: impl Fn(&Blocked<'_>) + Send + Sync + 'static) -> Self {
        self.on_block = Some(Arc::new(f));
        self
    }

    /// Called once per guard when it learns its lease was lost.
    #[must_use]
    pub fn on_lost(mut self, f: impl Fn(&Error) + Send + Sync + 'static) -> Self {
        self.on_lost = Some(Arc::new(f));
        self
    }

    /// Whether each token claim is fsynced before the token is issued
    /// (default on), so that a machine crash cannot make a token be issued
    /// twice. Off, a crash of the *machine* (not of a process) may lose the
    /// last claims.
    #[must_use]
    pub fn durable(mut self, on: bool) -> Self {
        self.durable = on;
        self
    }

    /// Whether waiters use inotify and pidfds (default on). Off, they poll
    /// with back-off up to [`LeaseOptions::max_poll`].
    #[must_use]
    pub fn notify(mut self, on: bool) -> Self {
        self.notify = on;
        self
    }

    /// The mode of the directories the lock creates (default `0o755`, less
    /// the umask). Breaking or releasing a lease renames a file inside the
    /// holder's lock directory, so processes of *different users* sharing a
    /// lock need a mode such as `0o775` with a common group (and a umask
    /// that keeps it), and no sticky bit on the lock's parent directory.
    #[must_use]
    pub fn dir_mode(mut self, mode: u32) -> Self {
        self.dir_mode = mode & 0o7777;
        self
    }

    /// The longest a waiter sleeps between looks when it cannot be woken
    /// (network file systems, `notify(false)`). Default 100 ms.
    #[must_use]
    pub fn max_poll(mut self, d: Duration) -> Self {
        self.max_poll = d.max(Duration::from_micros(100));
        self
    }
}

impl std::fmt::Debug for LeaseOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseOptions")
            .field("ttl", &self.ttl)
            .field("clock", &self.clock)
            .field("max_clock_skew", &self.max_clock_skew)
            .field("keep_alive", &self.keep_alive)
            .field("durable", &self.durable)
            .field("notify", &self.notify)
            .field("max_poll", &self.max_poll)
            .field("dir_mode", &format_args!("{:o}", self.dir_mode))
            .field("foreign_state", &self.foreign_state)
            .finish_non_exhaustive()
    }
}

/// Who holds a lease, as read from its lock directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseHolder {
    /// The holder's host name, if the record could be read.
    pub host: Option<String>,
    /// The holder's process, if the record could be read.
    pub process: Option<ProcessId>,
    /// Whether the holder runs on this host, boot and pid namespace.
    pub local: bool,
    /// The fencing token. While the holder is still being issued one: 0,
    /// or the number its lease was staged under, issued to it unless its
    /// batch turns out to be gone (then the name changes before its
    /// acquisition returns).
    pub token: u64,
    /// When the lease runs out unless renewed.
    pub expires: SystemTime,
}

/// "pid 4242 on host build-3 (token 17, lease expires in 12.0 s)", for
/// waiting messages.
impl std::fmt::Display for LeaseHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.process, &self.host) {
            // The host is whatever the record says: print it escaped.
            (Some(p), Some(h)) => write!(f, "pid {} on host {}", p.pid, proc::printable(h))?,
            _ => f.write_str("an unknown owner (unreadable record)")?,
        }
        if self.token == 0 {
            f.write_str(" (being issued a token")?;
        } else {
            write!(f, " (token {}", self.token)?;
        }
        match self.expires.duration_since(SystemTime::now()) {
            Ok(left) => write!(f, ", lease expires in {:.1} s)", left.as_secs_f64()),
            Err(past) => write!(
                f,
                ", lease expired {:.1} s ago)",
                past.duration().as_secs_f64()
            ),
        }
    }
}

/// A lock that is a directory, held for a time to live, with fencing tokens.
///
/// Scope: everyone who opens the same path, threads, processes and hosts
/// alike; exclusive only. On fork the child inherits no lease; closing
/// descriptors never releases; a crashed holder on this host is taken over
/// at once, one elsewhere once its lease (plus the clock-skew allowance) ran
/// out; on NFS (v3+) it works with atomic `mkdir`/`rename` and clocks within the
/// skew allowance, and waiters poll. See the module source for the protocol
/// and docs/design-lease.md for the arguments.
///
/// [`Mode::Shared`] is not supported: [`Lock::acquire`] returns an error of
/// kind [`ErrorKind::Unsupported`].
///
/// Holding a lease while a child process runs, renewed in the background,
/// and handing the child the fencing token:
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use interlock::{LeaseLock, LeaseOptions};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// let opts = LeaseOptions::new(Duration::from_secs(30))
///     .keep_alive(true) // renew every ttl/3 from a background thread
///     .on_lost(|e| eprintln!("lost the lease: {e}"));
/// let lock = LeaseLock::with_options(dir.path().join("job.lock"), opts)?;
/// let guard = lock.try_lock_for(Duration::from_secs(10))?;
/// let token: u64 = guard.token();
/// let status = std::process::Command::new("true")
///     .env("LOCK_TOKEN", token.to_string())
///     .status()?;
/// assert!(status.success());
/// guard.release()?; // Err(LeaseLost) if it was lost meanwhile
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct LeaseLock {
    inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    /// The last token this handle was issued: the next is larger whatever
    /// the claims directory says (it may have been reset).
    last_token: AtomicU64,
    path: PathBuf,
    name: OsString,
    parent_path: PathBuf,
    parent: Dir,
    stage: Dir,
    fence: Fence,
    opts: LeaseOptions,
    here: Locality,
    /// `here.tag()`, computed once: it names every staging directory.
    tag: String,
    local_fs: bool,
    /// Inotify instances watching the parent, kept for reuse: closing one
    /// costs an SRCU grace period in the kernel (4-16 ms measured here),
    /// which would otherwise be added to every acquisition that waited.
    /// Each is tagged with the pid that made it: after `fork` a child must
    /// not share an instance (and its events) with its parent.
    notifiers: parking_lot::Mutex<Vec<(u32, Inotify)>>,
    /// Staging directories ready for the next attempt, tagged with the pid
    /// that made them (see [`Stage::create`]).
    spare_stages: parking_lot::Mutex<Vec<Spare>>,
    /// Empty staging directories, made before an install so that the
    /// release can move the lease file straight into one (see
    /// [`Inner::release_into_stage`]), tagged with the pid that made them.
    empty_stages: parking_lot::Mutex<Vec<(u32, String, Dir)>>,
    /// Lease records moved out of released lock directories into `stage/`,
    /// tagged with the pid whose record they are, each the next
    /// acquisition's record (one rename instead of creating, writing and
    /// closing a file, and removing the old one).
    spare_records: parking_lot::Mutex<Vec<(u32, String)>>,
    /// The background renewer of this handle's guards (`keep_alive`).
    renewers: guard::Renewers,
}

/// How long a waiter with inotify on a local file system sleeps at most
/// between looks (a safety net; releases wake it at once).
const SAFETY_POLL: Duration = Duration::from_secs(1);
/// Consecutive "something changed, look again" rounds before a waiter
/// backs off instead of spinning.
const QUICK_ROUNDS: u32 = 64;

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

fn mkdir_ok_if_exists(dir: &Dir, name: &str, mode: u32) -> io::Result<()> {
    match dir.mkdir(name, mode) {
        Err(e) if errno(&e) == libc::EEXIST => Ok(()),
        r => r,
    }
}

/// The live lease in the lock directory `name` of `parent`, if any.
fn holder_in(
    parent: &Dir,
    name: &std::ffi::OsStr,
    here: &Locality,
) -> io::Result<Option<LeaseHolder>> {
    let inst = match parent.open_at(name) {
        Ok(d) => d,
        Err(e) if errno(&e) == libc::ENOENT => return Ok(None),
        Err(e) => return Err(e),
    };
    for n in inst.names()? {
        let Some(l) = n.to_str().and_then(LeaseName::parse) else {
            continue;
        };
        if l.dead {
            continue;
        }
        let owner = inst
            .read_file(l.render(), MAX_RECORD)
            .ok()
            .and_then(|b| Owner::parse(&b));
        return Ok(Some(LeaseHolder {
            host: owner.as_ref().map(|o| o.host.clone()),
            process: owner.as_ref().map(|o| o.process),
            local: owner.as_ref().is_some_and(|o| o.is_local_to(here)),
            token: l.token,
            expires: from_unix_nanos(l.expiry_ns),
        }));
    }
    Ok(None)
}

fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(crate::sys::fork::pid());
    h.write_u128(unix_nanos(SystemTime::now()).into());
    h.finish()
}

impl LeaseLock {
    /// A lease lock at `path` (a directory that exists while the lock is
    /// held) with time to live `ttl` and default options.
    pub fn new(path: impl AsRef<Path>, ttl: Duration) -> Result<LeaseLock> {
        LeaseLock::with_options(path, LeaseOptions::new(ttl))
    }

    /// A lease lock at `path` with `opts`. Creates the side directory
    /// `NAME.lease/` beside it if needed. Errors: the parent directory is
    /// missing ([`ErrorKind::NotFound`]), not writable
    /// ([`ErrorKind::PermissionDenied`]), `path` has no final name or `ttl`
    /// is zero ([`ErrorKind::InvalidInput`]).
    pub fn with_options(path: impl AsRef<Path>, opts: LeaseOptions) -> Result<LeaseLock> {
        let path = path.as_ref().to_path_buf();
        let bad = |detail: &str| {
            Error::new(ErrorKind::InvalidInput, "open lease lock")
                .with_path(&path)
                .with_detail(detail.to_string())
        };
        if opts.ttl.is_zero() {
            return Err(bad("the time to live must be positive"));
        }
        let name = path
            .file_name()
            .ok_or_else(|| bad("the path has no final name"))?
            .to_os_string();
        let name_str = name
            .to_str()
            .ok_or_else(|| bad("the lock's name must be valid UTF-8"))?;
        let side = format!("{name_str}.lease");
        if side.len() > 255 {
            return Err(bad("the lock's name is too long"));
        }
        let parent_path = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let parent = Dir::open_following(&parent_path).map_err(|e| {
            Error::io("open parent directory of lease lock", e)
                .with_path(&path)
                .with_detail(format!("cannot open {}", parent_path.display()))
        })?;
        let side_path = parent_path.join(&side);
        let io_err = |op: &'static str, p: &Path, e: io::Error| {
            let err = Error::io(op, e).with_path(p);
            if matches!(err.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) {
                err.with_kind(ErrorKind::Corrupt)
                    .with_detail("something other than a directory is in the way")
            } else {
                err
            }
        };
        // Never take over what interlock did not make: a directory at the
        // lock path with no state directory beside it is someone else's
        // (and an empty one would be removed as a dead lease), and nothing
        // is created beside a file or link.
        match (parent.kind_of(&name), parent.kind_of(&side)) {
            (Ok(Some(k)), _) if k != libc::S_IFDIR => {
                return Err(Error::new(ErrorKind::Corrupt, "open lease lock")
                    .with_path(&path)
                    .with_detail("something other than a directory is at the lock path"))
            }
            (Ok(Some(_)), Ok(None)) => {
                return Err(Error::new(ErrorKind::Corrupt, "open lease lock")
                    .with_path(&path)
                    .with_detail(format!(
                        "a directory that interlock did not make is at the lock path \
                         (there is no {side} beside it); choose another path"
                    )))
            }
            _ => {}
        }
        mkdir_ok_if_exists(&parent, &side, opts.dir_mode)
            .map_err(|e| io_err("create lease side directory", &side_path, e))?;
        let side_dir = parent
            .open_at(&side)
            .map_err(|e| io_err("open lease side directory", &side_path, e))?;
        for sub in ["tokens", "stage"] {
            mkdir_ok_if_exists(&side_dir, sub, opts.dir_mode)
                .map_err(|e| io_err("create lease side directory", &side_path.join(sub), e))?;
        }
        if !opts.foreign_state {
            let me = proc::credentials(crate::sys::fork::pid()).map(|c| c.uid);
            for (d, p) in [
                (Some(&side_dir), side_path.clone()),
                (None, side_path.join("tokens")),
                (None, side_path.join("stage")),
            ] {
                let sub;
                let d = match d {
                    Some(d) => d,
                    None => {
                        sub = side_dir
                            .open_at(p.file_name().expect("a named subdirectory"))
                            .map_err(|e| io_err("open lease side directory", &p, e))?;
                        &sub
                    }
                };
                let owner = d
                    .owner()
                    .map_err(|e| io_err("inspect lease side directory", &p, e))?;
                if me.is_some_and(|uid| uid != owner) {
                    return Err(Error::new(ErrorKind::PermissionDenied, "open lease lock")
                        .with_path(&p)
                        .with_detail(format!(
                            "the lease's state is owned by uid {owner}, another user, who could \
                             reset or exhaust its fencing tokens; see \
                             LeaseOptions::allow_foreign_state"
                        )));
                }
            }
        }
        let tokens = side_dir
            .open_at("tokens")
            .map_err(|e| io_err("open lease token directory", &side_path.join("tokens"), e))?;
        let stage = side_dir
            .open_at("stage")
            .map_err(|e| io_err("open lease staging directory", &side_path.join("stage"), e))?;
        let local_fs = parent.fs_type().map(notify::fs_is_local).unwrap_or(false);
        let here = Locality::current();
        let inner = Inner {
            last_token: AtomicU64::new(0),
            fence: Fence::new(tokens, opts.durable),
            name,
            path,
            parent_path,
            parent,
            stage,
            opts,
            tag: here.tag(),
            here,
            local_fs,
            notifiers: parking_lot::Mutex::new(Vec::new()),
            spare_stages: parking_lot::Mutex::new(Vec::new()),
            empty_stages: parking_lot::Mutex::new(Vec::new()),
            spare_records: parking_lot::Mutex::new(Vec::new()),
            renewers: guard::Renewers::default(),
        };
        inner.sweep_stages();
        Ok(LeaseLock {
            inner: Arc::new(inner),
        })
    }

    /// The lock directory's path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The time to live of each lease.
    pub fn ttl(&self) -> Duration {
        self.inner.opts.ttl
    }

    /// Blocks until the lease is acquired.
    pub fn lock(&self) -> Result<LeaseGuard<'_>> {
        self.acquire_with(Wait::Forever).map_err(Error::from)
    }

    /// Acquires the lease if it is free, or stale and can be taken over,
    /// without waiting; `Err(TryLockError::WouldBlock)` if it is held.
    pub fn try_lock(&self) -> Result<LeaseGuard<'_>, TryLockError> {
        self.acquire_with(Wait::NonBlocking)
    }

    /// Waits at most `patience` (lockbydir's PATIENCE);
    /// `Err(TryLockError::TimedOut)` past it.
    pub fn try_lock_for(&self, patience: Duration) -> Result<LeaseGuard<'_>, TryLockError> {
        self.acquire_with(Wait::timeout(patience))
    }

    /// Waits until `deadline` at most; `Err(TryLockError::TimedOut)` past it.
    pub fn try_lock_until(&self, deadline: Instant) -> Result<LeaseGuard<'_>, TryLockError> {
        self.acquire_with(Wait::Until(deadline))
    }

    /// Who holds the lease now, if anyone (a snapshot, for messages such as
    /// "waiting for the lock held by pid 4242 on host h").
    pub fn holder(&self) -> Result<Option<LeaseHolder>> {
        let inner = &self.inner;
        holder_in(&inner.parent, &inner.name, &inner.here)
            .map_err(|e| inner.err("inspect lease lock", e))
    }

    /// Who holds the lease at `path` now, if anyone, without creating or
    /// changing anything (for inspection: [`LeaseLock::new`] creates the
    /// state directory). Errors: the parent directory is missing
    /// ([`ErrorKind::NotFound`]); a file or symbolic link is at `path`
    /// ([`ErrorKind::Corrupt`]).
    pub fn peek(path: impl AsRef<Path>) -> Result<Option<LeaseHolder>> {
        let path = path.as_ref();
        let err = |op: &'static str, e: io::Error| {
            let err = Error::io(op, e).with_path(path);
            if matches!(err.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) {
                err.with_kind(ErrorKind::Corrupt).with_detail(
                    "a file or symbolic link, not a lock directory, is at the lock path",
                )
            } else {
                err
            }
        };
        let name = path.file_name().ok_or_else(|| {
            Error::new(ErrorKind::InvalidInput, "inspect lease lock")
                .with_path(path)
                .with_detail("the path has no final name")
        })?;
        let parent_path = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let parent = Dir::open_following(parent_path)
            .map_err(|e| Error::io("open parent directory of lease lock", e).with_path(path))?;
        holder_in(&parent, name, &Locality::current()).map_err(|e| err("inspect lease lock", e))
    }

    /// The largest fencing token claimed so far for this lock, if any: the
    /// last one issued, or a larger one that a failed acquisition claimed
    /// or that the last holder's handle reserved in its batch (tokens are
    /// claimed in batches while one handle keeps the lock; every later
    /// token is larger than this).
    pub fn last_token(&self) -> Result<Option<u64>> {
        self.inner
            .fence
            .latest()
            .map_err(|e| self.inner.err("read fencing tokens", e))
    }

    /// Acquires the lease, waiting as `wait` allows, with a guard that
    /// does not borrow the lock (`'static`: the guard keeps what it needs
    /// alive), for callers that cannot express the borrow, such as a binding
    /// to a garbage-collected language. The guard may be released from any
    /// thread.
    pub fn lock_arc(&self, wait: Wait) -> Result<LeaseGuard<'static>, TryLockError> {
        self.acquire_with(wait)
    }

    fn acquire_with(&self, wait: Wait) -> Result<LeaseGuard<'static>, TryLockError> {
        let inner = &*self.inner;
        let mut stage: Option<Stage<'_>> = None;
        let mut waiter: Option<Waiter<'_>> = None;
        let mut told = false;
        let mut quick = 0u32;
        // The pidfd of the holder last seen, kept across looks: a wake-up
        // by a release that the same holder re-took then costs neither a
        // new pidfd nor a read of /proc.
        let mut watch: Option<Watched> = None;
        let mut prepared = false;
        loop {
            let st = match stage.take() {
                Some(mut s) => match s.refresh() {
                    Ok(()) => s,
                    Err(_) => Stage::create(inner)?,
                },
                None => Stage::create(inner)?,
            };
            if !prepared {
                // The directory the release will move the lease file
                // into, made now, outside the time the lock is held.
                prepared = true;
                inner.prepare_empty_stage();
            }
            let observed = match inner.try_install(st, &mut watch)? {
                Step::Acquired(held) => return Ok(LeaseGuard::new(self, held)),
                Step::Changed(s) => {
                    stage = s;
                    quick += 1;
                    if quick < QUICK_ROUNDS {
                        continue;
                    }
                    Observed::default()
                }
                Step::Busy(s, obs) => {
                    stage = Some(s);
                    obs
                }
            };
            quick = 0;
            if !wait.may_block() {
                return Err(TryLockError::WouldBlock);
            }
            if wait.expired() {
                return Err(wait.gave_up());
            }
            if !told {
                told = true;
                if let Some(cb) = &inner.opts.on_block {
                    cb(&Blocked {
                        resource: &inner.path,
                        mode: Mode::Exclusive,
                        range: None,
                    });
                }
            }
            match &mut waiter {
                None => {
                    // Watch first, then look again: a release between the
                    // last look and the watch would otherwise be missed.
                    waiter = Some(Waiter::new(inner));
                    // Unless the deadline passed meanwhile: then nothing
                    // can be missed any more, and a look would make the
                    // answer late.
                    if wait.expired() {
                        return Err(wait.gave_up());
                    }
                }
                Some(w) => {
                    w.wait(&observed, &wait, &mut watch);
                    // Slept to the deadline: give up now. Another look
                    // (renames and a listing, a millisecond or more on a
                    // loaded disk) would only make the answer late; a
                    // release that came in time has woken us already.
                    if wait.expired() {
                        return Err(wait.gave_up());
                    }
                }
            }
        }
    }
}

impl Lock for LeaseLock {
    type Guard<'a> = LeaseGuard<'a>;

    /// Exclusive only: [`Mode::Shared`] fails with [`ErrorKind::Unsupported`].
    fn acquire(&self, mode: Mode, wait: Wait) -> Result<LeaseGuard<'_>, TryLockError> {
        if mode == Mode::Shared {
            return Err(Error::new(ErrorKind::Unsupported, "acquire lease lock")
                .with_path(&self.inner.path)
                .with_detail("a lease lock has no shared mode")
                .into());
        }
        self.acquire_with(wait)
    }
}

/// What a look at a held lock found, for the waiter.
#[derive(Clone, Copy, Debug, Default)]
struct Observed {
    /// The holder, if it is a process of this host that we can watch.
    local_owner: Option<ProcessId>,
    /// When the lease (with skew allowance) runs out, on the lock's clock.
    wake_at_ns: Option<u64>,
}

enum Step<'a> {
    Acquired(Held),
    /// Something changed (a stale lease broken, a dead directory removed,
    /// our fresh lease broken before its token was issued): look again.
    Changed(Option<Stage<'a>>),
    /// Held by someone else.
    Busy(Stage<'a>, Observed),
}

/// An acquirer's private directory, holding a ready lease file, waiting to
/// be renamed into place.
struct Stage<'a> {
    inner: &'a Inner,
    name: String,
    /// `None` once renamed into place (then it is the lock directory).
    dir: Option<Dir>,
    lease: LeaseName,
}

/// A staging directory kept for reuse: name, directory, lease file.
type Spare = (u32, String, Dir, LeaseName);

/// Staging directories kept per handle at most.
const SPARE_STAGES: usize = 4;

impl<'a> Stage<'a> {
    fn create(inner: &'a Inner) -> Result<Stage<'a>> {
        let me = proc::current();
        // A staging directory a release, or a timed-out or failed attempt,
        // of this process left ready: no directory operation at all, or
        // one rename.
        loop {
            let spare = {
                let mut pool = inner.spare_stages.lock();
                pool.retain(|(pid, ..)| *pid == me.pid);
                pool.pop()
            };
            let Some((_, name, dir, lease)) = spare else {
                break;
            };
            let mut st = Stage {
                inner,
                name,
                dir: Some(dir),
                lease,
            };
            if st.refresh().is_ok() {
                return Ok(st);
            }
            // Gone or damaged: dropping it cleans up (it is not pooled
            // again: the refresh failure marks it).
            st.lease.dead = true;
        }
        let stage_path = || {
            inner
                .parent_path
                .join(format!("{}.lease/stage", inner.name.to_string_lossy()))
        };
        let (name, dir) = match inner.take_empty_stage(me.pid) {
            Some(e) => e,
            None => inner.make_stage_dir(me)?,
        };
        let owner = Owner {
            host: inner.here.host.clone(),
            boot_id: inner.here.boot_id.clone(),
            pid_ns: inner.here.pid_ns.clone(),
            process: me,
            nonce: nonce(),
            ttl_ns: nanos(inner.opts.ttl),
        };
        let lease = inner.staged_name();
        let st = Stage {
            inner,
            name,
            dir: Some(dir),
            lease,
        };
        if let Some(rec) = inner.take_record(me.pid) {
            // The record of this process, kept from its last release.
            if rename_noreplace(&inner.stage, &rec, st.dir(), lease.render()).is_ok() {
                return Ok(st);
            }
            let _ = inner.stage.unlink(&rec);
        }
        st.dir()
            .create_file(lease.render(), owner.render().as_bytes(), 0o644, false)
            .map_err(|e| Error::io("write lease record", e).with_path(stage_path()))?;
        Ok(st)
    }

    fn dir(&self) -> &Dir {
        self.dir
            .as_ref()
            .expect("a stage's directory is taken only when it is installed")
    }

    /// Brings the staged lease's name up to date before an install: the
    /// token the handle's batch would issue next, and a fresh expiry.
    ///
    /// With a predicted token the install is also the publish (the name
    /// is not renamed again when the token is confirmed), so the lease
    /// must start with nearly a full time to live: the name is renamed if
    /// its expiry is more than 1/32 of a time to live old. Without one the
    /// publish sets a fresh expiry, and the staged one only has to last
    /// from the install to the publish: renamed only when less than half
    /// a time to live is left. A retry after a wake-up then costs no
    /// rename.
    fn refresh(&mut self) -> io::Result<()> {
        let now = self.inner.now_ns();
        let ttl = nanos(self.inner.opts.ttl);
        let predicted = self.inner.fence.predict();
        let left = self.lease.expiry_ns.saturating_sub(now);
        let current = if predicted != 0 {
            self.lease.token == predicted && self.lease.version == 1 && left >= ttl - ttl / 32
        } else {
            left > ttl / 2
        };
        if current {
            return Ok(());
        }
        let next = if predicted != 0 {
            LeaseName {
                dead: false,
                version: 1,
                token: predicted,
                expiry_ns: now.saturating_add(ttl),
            }
        } else {
            LeaseName {
                expiry_ns: now.saturating_add(ttl),
                ..self.lease
            }
        };
        if next != self.lease {
            self.dir().rename(self.lease.render(), next.render())?;
            self.lease = next;
        }
        Ok(())
    }
}

impl Drop for Stage<'_> {
    fn drop(&mut self) {
        let Some(d) = self.dir.take() else { return };
        // Kept for the next attempt (so that giving up at a deadline costs
        // no directory operations), unless enough are kept already.
        if !self.lease.dead {
            let mut pool = self.inner.spare_stages.lock();
            if pool.len() < SPARE_STAGES {
                let name = std::mem::take(&mut self.name);
                pool.push((crate::sys::fork::pid(), name, d, self.lease));
                return;
            }
        }
        let mut lease = self.lease;
        lease.dead = false;
        let _ = d.unlink(lease.render());
        let _ = self.inner.stage.rmdir(&self.name);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let me = crate::sys::fork::pid();
        for (pid, name) in self.spare_records.get_mut().drain(..) {
            if pid == me {
                let _ = self.stage.unlink(&name);
            }
        }
        for (pid, name, d, lease) in self.spare_stages.get_mut().drain(..) {
            if pid == me {
                let _ = d.unlink(lease.render());
                let _ = self.stage.rmdir(&name);
            }
        }
        for (pid, name, _) in self.empty_stages.get_mut().drain(..) {
            if pid == me {
                let _ = self.stage.rmdir(&name);
            }
        }
    }
}

/// Spare records kept per handle at most.
const SPARE_RECORDS: usize = 4;

/// Empty staging directories kept per handle at most.
const EMPTY_STAGES: usize = 2;

impl Inner {
    /// The name a lease is staged under: version 1 and the token the
    /// handle's batch would issue next, if it has one (then the install
    /// is the publish), else version 0 and token 0; a full time to live.
    fn staged_name(&self) -> LeaseName {
        let predicted = self.fence.predict();
        LeaseName {
            dead: false,
            version: u64::from(predicted != 0),
            token: predicted,
            expiry_ns: self.expiry_from_now(),
        }
    }

    /// Makes and opens a new staging directory of process `me`.
    fn make_stage_dir(&self, me: ProcessId) -> Result<(String, Dir)> {
        let name = format!("{}.{}.{}.{:016x}", self.tag, me.pid, me.start_time, nonce());
        let stage_path = || {
            self.parent_path
                .join(format!("{}.lease/stage", self.name.to_string_lossy()))
        };
        self.stage
            .mkdir(&name, self.opts.dir_mode)
            .map_err(|e| Error::io("create lease staging directory", e).with_path(stage_path()))?;
        match self.stage.open_at(&name) {
            Ok(d) => Ok((name, d)),
            Err(e) => {
                let _ = self.stage.rmdir(&name);
                Err(Error::io("open lease staging directory", e).with_path(stage_path()))
            }
        }
    }

    /// An empty staging directory of process `pid`, if one is kept.
    fn take_empty_stage(&self, pid: u32) -> Option<(String, Dir)> {
        let mut pool = self.empty_stages.lock();
        pool.retain(|(p, ..)| *p == pid);
        pool.pop().map(|(_, n, d)| (n, d))
    }

    /// Makes an empty staging directory for the release of the coming
    /// acquisition, unless one is kept already or the kept staged leases
    /// leave no room for another. Failures are left to the release, which
    /// then keeps the record the older way.
    fn prepare_empty_stage(&self) {
        let me = proc::current();
        {
            let mut pool = self.empty_stages.lock();
            pool.retain(|(p, ..)| *p == me.pid);
            if !pool.is_empty() {
                return;
            }
        }
        if self.spare_stages.lock().len() >= SPARE_STAGES {
            return;
        }
        if let Ok((name, d)) = self.make_stage_dir(me) {
            self.keep_empty_stage(me.pid, name, d);
        }
    }

    /// Keeps an empty staging directory, or removes it if enough are kept.
    fn keep_empty_stage(&self, pid: u32, name: String, d: Dir) {
        let mut pool = self.empty_stages.lock();
        if pool.len() < EMPTY_STAGES {
            pool.push((pid, name, d));
        } else {
            drop(pool);
            drop(d);
            let _ = self.stage.rmdir(&name);
        }
    }

    /// The release's fast way: moves the lease file `from` out of the lock
    /// directory `dir`, through its descriptor, straight into an empty
    /// staging directory, renamed as the next acquisition's staged lease
    /// (a compare-and-swap like every other change of the name: it fails
    /// if the lease was broken). `Ok(false)` if no empty staging directory
    /// is kept or no staged lease could be kept beside it; an error of the
    /// rename otherwise, the directory kept for another time.
    pub(crate) fn release_into_stage(&self, dir: &Dir, from: &LeaseName) -> io::Result<bool> {
        let me = crate::sys::fork::pid();
        if self.spare_stages.lock().len() >= SPARE_STAGES {
            return Ok(false);
        }
        let Some((name, d)) = self.take_empty_stage(me) else {
            return Ok(false);
        };
        let next = self.staged_name();
        match rename_noreplace(dir, from.render(), &d, next.render()) {
            Ok(_) => {
                let mut pool = self.spare_stages.lock();
                if pool.len() < SPARE_STAGES {
                    pool.push((me, name, d, next));
                } else {
                    drop(pool);
                    let _ = d.unlink(next.render());
                    let _ = self.stage.rmdir(&name);
                }
                Ok(true)
            }
            Err(e) => {
                self.keep_empty_stage(me, name, d);
                Err(e)
            }
        }
    }

    /// A spare record of process `pid`, if one is kept.
    fn take_record(&self, pid: u32) -> Option<String> {
        let mut pool = self.spare_records.lock();
        pool.retain(|(p, _)| *p == pid);
        pool.pop().map(|(_, n)| n)
    }

    /// A name in `stage/` for a released lease's record of process `me`,
    /// if fewer than [`SPARE_RECORDS`] are kept; it is named like a
    /// staging directory (tag, pid, start time), so that the sweep of dead
    /// processes' leftovers removes it too.
    pub(crate) fn record_slot(&self, me: ProcessId) -> Option<String> {
        if self.spare_records.lock().len() >= SPARE_RECORDS {
            return None;
        }
        // Unique within the process (pid and start time name the process).
        static SERIAL: AtomicU64 = AtomicU64::new(0);
        let n = SERIAL.fetch_add(1, Ordering::Relaxed);
        Some(format!("{}.{}.{}.r{n}", self.tag, me.pid, me.start_time))
    }

    /// Keeps a record moved to `stage/NAME` for the next acquisition.
    pub(crate) fn keep_record(&self, pid: u32, name: String) {
        let mut pool = self.spare_records.lock();
        if pool.len() < SPARE_RECORDS {
            pool.push((pid, name));
        } else {
            drop(pool);
            let _ = self.stage.unlink(&name);
        }
    }

    fn now_ns(&self) -> u64 {
        unix_nanos(self.opts.clock.now())
    }

    fn err(&self, op: &'static str, e: io::Error) -> Error {
        Error::io(op, e).with_path(&self.path)
    }

    /// One attempt: rename the staged directory into place, or look at the
    /// one that is there.
    fn try_install<'a>(&'a self, st: Stage<'a>, watch: &mut Option<Watched>) -> Result<Step<'a>> {
        match rename_noreplace(&self.stage, &st.name, &self.parent, &self.name) {
            Ok(_) => {
                // Installed: the staging directory is now the lock directory.
                let mut st = st;
                let dir = st.dir.take().expect("a stage is installed once");
                self.publish(dir, st.lease)
            }
            Err(e) if matches!(errno(&e), libc::EEXIST | libc::ENOTEMPTY) => {
                self.inspect(st, watch)
            }
            Err(e) if errno(&e) == libc::ENOTDIR => Err(self
                .err("acquire lease lock", e)
                .with_kind(ErrorKind::Corrupt)
                .with_detail("something other than a directory is at the lock path")),
            Err(e) if errno(&e) == libc::ENOENT => {
                let staged = self.stage.contains(&st.name).unwrap_or(false);
                Err(self.err("acquire lease lock", e).with_detail(if staged {
                    "the parent directory vanished"
                } else {
                    "the staging directory vanished (was NAME.lease/ removed?)"
                }))
            }
            Err(e) => Err(self.err("acquire lease lock", e)),
        }
    }

    /// Issues a token to the lease just installed (see the module docs for
    /// why this order makes tokens increase).
    fn publish<'a>(&'a self, dir: Dir, lease: LeaseName) -> Result<Step<'a>> {
        let floor = self.last_token.load(Ordering::Relaxed);
        let claim = match self.fence.claim(floor) {
            Ok(c) => c,
            Err(e) => {
                self.kill_own(&dir, &lease);
                return Err(Error::io("claim fencing token", e).with_path(
                    self.parent_path
                        .join(format!("{}.lease/tokens", self.name.to_string_lossy())),
                ));
            }
        };
        let token = claim.token;
        if claim.is_from_batch() && token != 0 && lease.token == token {
            // Staged under the very token the batch issues: the install
            // was the publish, and the claim, still linked after it, is
            // the evidence (docs/design-lease.md, "Why tokens increase").
            self.last_token.fetch_max(token, Ordering::Relaxed);
            self.fence.issued(claim);
            return Ok(Step::Acquired(Held { dir, name: lease }));
        }
        let published = LeaseName {
            dead: false,
            version: lease.version + 1,
            token,
            expiry_ns: self.expiry_from_now(),
        };
        match dir.rename(lease.render(), published.render()) {
            Ok(()) => {
                self.last_token.fetch_max(token, Ordering::Relaxed);
                self.fence.issued(claim);
                Ok(Step::Acquired(Held {
                    dir,
                    name: published,
                }))
            }
            // Broken before its token was issued (the lease expired during
            // the claim): the claim is never issued; start over.
            Err(e) if matches!(errno(&e), libc::ENOENT | libc::ESTALE) => Ok(Step::Changed(None)),
            Err(e) => {
                self.kill_own(&dir, &lease);
                Err(self.err("publish fencing token", e))
            }
        }
    }

    /// Kills and removes a lock directory of ours that we will not use.
    fn kill_own(&self, dir: &Dir, lease: &LeaseName) {
        let tomb = lease.tombstone();
        if dir.rename(lease.render(), tomb.render()).is_ok() {
            let _ = dir.unlink(tomb.render());
            let _ = self.parent.rmdir(&self.name);
        }
    }

    /// Looks at the lock directory in place: busy, or stale (then breaks
    /// it), or dead (then removes it), or foreign (an error).
    fn inspect<'a>(&'a self, st: Stage<'a>, watch: &mut Option<Watched>) -> Result<Step<'a>> {
        let inst = match self.parent.open_at(&self.name) {
            Ok(d) => d,
            Err(e) if errno(&e) == libc::ENOENT => return Ok(Step::Changed(Some(st))),
            Err(e) if matches!(errno(&e), libc::ELOOP | libc::ENOTDIR) => {
                return Err(self
                    .err("inspect lease lock", e)
                    .with_kind(ErrorKind::Corrupt)
                    .with_detail(
                        "a file or symbolic link, not a lock directory, is at the lock path",
                    ))
            }
            Err(e) => return Err(self.err("inspect lease lock", e)),
        };
        // Two live files cannot exist, but a listing that raced with a
        // renewal's rename on a network file system could show both names:
        // look twice before calling the directory corrupt.
        let mut second_look = false;
        let (live, dead, foreign) = loop {
            let names = match inst.names_direct(usize::MAX) {
                Ok(n) => n,
                Err(e) if matches!(errno(&e), libc::ENOENT | libc::ESTALE) => {
                    return Ok(Step::Changed(Some(st)))
                }
                Err(e) => return Err(self.err("list lease lock", e)),
            };
            let mut live = Vec::new();
            let mut dead = Vec::new();
            let mut foreign = Vec::new();
            for n in names {
                match n.to_str().and_then(LeaseName::parse) {
                    Some(l) if l.dead => dead.push(l),
                    Some(l) => live.push(l),
                    None => foreign.push(n),
                }
            }
            if live.len() <= 1 {
                break (live.pop(), dead, foreign);
            }
            if second_look {
                return Err(Error::new(ErrorKind::Corrupt, "inspect lease lock")
                    .with_path(&self.path)
                    .with_detail("two live lease files in one lock directory"));
            }
            second_look = true;
        };
        let Some(lease) = live else {
            if !foreign.is_empty() {
                let shown: Vec<_> = foreign
                    .iter()
                    .take(3)
                    .map(|n| proc::printable(&n.to_string_lossy()))
                    .collect();
                return Err(Error::new(ErrorKind::Corrupt, "inspect lease lock")
                    .with_path(&self.path)
                    .with_detail(format!(
                        "the directory holds no lease but foreign content ({}); it was not made by \
                         interlock: remove it by hand if nobody uses it",
                        shown.join(", ")
                    )));
            }
            // Empty or only tombstones: a release or a break in progress, or
            // one whose process died. Finish it.
            self.remove_dead(&inst, &dead)?;
            return Ok(Step::Changed(Some(st)));
        };
        let owner = match inst.read_file(lease.render(), MAX_RECORD) {
            Ok(b) => Owner::parse(&b),
            Err(e) if matches!(errno(&e), libc::ENOENT | libc::ESTALE) => {
                return Ok(Step::Changed(Some(st)))
            }
            // Unreadable content: judge by the name (expiry) alone.
            Err(_) => None,
        };
        let verdict = judge(
            &lease,
            owner.as_ref(),
            &self.here,
            self.now_ns(),
            nanos(self.opts.max_clock_skew),
            |p| match watch {
                // A pidfd of this very process (pid and start time checked
                // when it was opened): it turns readable when it exits.
                Some(w) if w.id == p => {
                    if notify::poll_readable(&[w.fd.as_fd()], Some(Duration::ZERO)).unwrap_or(true)
                    {
                        *watch = None;
                        Liveness::Dead
                    } else {
                        Liveness::Alive
                    }
                }
                _ => liveness(p),
            },
        );
        match verdict {
            Verdict::Live { wake_at_ns } => {
                let local_owner = owner
                    .as_ref()
                    .filter(|o| o.is_local_to(&self.here))
                    .map(|o| o.process);
                Ok(Step::Busy(
                    st,
                    Observed {
                        local_owner,
                        wake_at_ns: Some(wake_at_ns),
                    },
                ))
            }
            Verdict::OwnerDead | Verdict::Expired => {
                // Break exactly the state we judged, in exactly the directory
                // we judged: if anything changed, the rename fails.
                let tomb = lease.tombstone();
                match inst.rename(lease.render(), tomb.render()) {
                    Ok(()) => {
                        self.remove_dead(&inst, &[tomb])?;
                        if verdict == Verdict::OwnerDead {
                            self.sweep_stages();
                        }
                        Ok(Step::Changed(Some(st)))
                    }
                    Err(e) if matches!(errno(&e), libc::ENOENT | libc::ESTALE) => {
                        Ok(Step::Changed(Some(st)))
                    }
                    Err(e) => Err(self.err("break stale lease", e)),
                }
            }
        }
    }

    /// Empties a dead lock directory (through its descriptor) and removes
    /// it by name, which succeeds only while it is empty.
    /// Errors other than "someone else got there first" (a read-only file
    /// system, no permission) are returned, so that a dead lock directory
    /// that cannot be removed is reported instead of waited on forever.
    fn remove_dead(&self, inst: &Dir, tombstones: &[LeaseName]) -> Result<()> {
        let benign = |e: &io::Error| {
            matches!(
                errno(e),
                libc::ENOENT | libc::ESTALE | libc::ENOTEMPTY | libc::EEXIST | libc::EBUSY
            )
        };
        for t in tombstones {
            match inst.unlink(t.render()) {
                Err(e) if !benign(&e) => return Err(self.err("remove dead lease", e)),
                _ => {}
            }
        }
        match self.parent.rmdir(&self.name) {
            Err(e) if !benign(&e) => Err(self.err("remove dead lock directory", e)),
            _ => Ok(()),
        }
    }

    /// Removes staging directories left by dead processes of this host.
    fn sweep_stages(&self) {
        let Ok(names) = self.stage.names() else {
            return;
        };
        let tag = &self.tag;
        for n in names {
            let Some(s) = n.to_str() else { continue };
            let mut parts = s.split('.');
            if parts.next() != Some(tag.as_str()) {
                continue;
            }
            let pid = parts.next().and_then(|p| p.parse().ok());
            let start = parts.next().and_then(|p| p.parse().ok());
            let (Some(pid), Some(start_time)) = (pid, start) else {
                continue;
            };
            if liveness(ProcessId { pid, start_time }) != Liveness::Dead {
                continue;
            }
            match self.stage.open_at(s) {
                Ok(d) => {
                    for f in d.names().unwrap_or_default() {
                        let _ = d.unlink(&f);
                    }
                    let _ = self.stage.rmdir(s);
                }
                // A spare record (a file).
                Err(e) if errno(&e) == libc::ENOTDIR => {
                    let _ = self.stage.unlink(s);
                }
                Err(_) => {}
            }
        }
    }
}

/// A pidfd of a holder, checked to be that process when opened.
struct Watched {
    id: ProcessId,
    fd: PidFd,
}

/// How a blocked acquirer sleeps: in `poll` on an inotify watch of the
/// parent directory (woken when the lock directory is removed) and a pidfd
/// of a local holder (woken when it dies), until the lease's expiry at the
/// latest; where neither can see changes (network file systems), with a
/// back-off from 1 ms to `max_poll`.
struct Waiter<'a> {
    inner: &'a Inner,
    notify: Option<Inotify>,
    backoff: Duration,
}

impl<'a> Waiter<'a> {
    /// Takes a watching inotify instance from the handle's pool (or makes
    /// one) and discards its old events; the caller must look at the lock
    /// again before the first wait.
    fn new(inner: &'a Inner) -> Waiter<'a> {
        let notify = if inner.opts.notify {
            let me = crate::sys::fork::pid();
            let pooled = {
                let mut pool = inner.notifiers.lock();
                // Instances inherited from a parent process are dropped
                // (closing a shared copy is cheap: the parent keeps it).
                pool.retain(|(pid, _)| *pid == me);
                pool.pop().map(|(_, n)| n)
            };
            match pooled {
                Some(n) => n.drain(&inner.name).map(|_| n).ok(),
                None => Inotify::new()
                    .and_then(|n| n.watch_removals(&inner.parent_path).map(|()| n))
                    .ok(),
            }
        } else {
            None
        };
        Waiter {
            inner,
            notify,
            backoff: Duration::from_millis(1),
        }
    }

    fn wait(&mut self, obs: &Observed, wait: &Wait, watch: &mut Option<Watched>) {
        let inner = self.inner;
        match obs.local_owner {
            Some(p) if watch.as_ref().is_some_and(|w| w.id == p) => {}
            Some(p) => {
                *watch = None;
                match PidFd::open(p.pid) {
                    // The pidfd names whatever process has the pid now:
                    // check it is still the holder (pids are reused).
                    Ok(fd) if liveness(p) == Liveness::Alive => {
                        *watch = Some(Watched { id: p, fd })
                    }
                    Ok(_) => return,
                    Err(e) if errno(&e) == libc::ESRCH => return,
                    Err(_) => {}
                }
            }
            None => {}
        }
        let pidfd = watch
            .as_ref()
            .filter(|w| Some(w.id) == obs.local_owner)
            .map(|w| &w.fd);
        let woken_by_kernel = self.notify.is_some() && inner.local_fs;
        let mut timeout = if woken_by_kernel {
            SAFETY_POLL
        } else {
            let b = self.backoff;
            self.backoff = (b * 2).min(inner.opts.max_poll);
            b
        };
        if let Some(w) = obs.wake_at_ns {
            let left = Duration::from_nanos(w.saturating_sub(inner.now_ns()));
            timeout = timeout.min(left);
        }
        if let Some(r) = wait.remaining() {
            timeout = timeout.min(r);
        }
        let mut fds = Vec::with_capacity(2);
        if let Some(n) = &self.notify {
            fds.push(n.as_fd());
        }
        if let Some(p) = &pidfd {
            fds.push(p.as_fd());
        }
        if fds.is_empty() {
            std::thread::sleep(timeout);
            return;
        }
        // Sleep until something that concerns this lock happens: events
        // about other names in a busy parent directory (say /tmp) are
        // drained and slept through rather than answered with a new look.
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let ready = match notify::poll_ready(&fds, Some(left)) {
                Ok(m) if m != 0 => m,
                // Time-out, EINTR, or a poll error: look at the lock again.
                _ => return,
            };
            // The inotify instance is fds[0] when there is one, the pidfd
            // the last.
            let relevant = match &self.notify {
                Some(n) if ready & 1 != 0 => n.drain(&inner.name).unwrap_or(true),
                Some(_) => false,
                None => true,
            };
            let died = pidfd.is_some() && ready & (1 << (fds.len() - 1)) != 0;
            if relevant || died || left.is_zero() {
                return;
            }
        }
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.notify.take() {
            self.inner
                .notifiers
                .lock()
                .push((crate::sys::fork::pid(), n));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::dir::FORCE_PLAIN_RENAME;

    /// Without `RENAME_NOREPLACE` (NFS), installing is a plain rename, which
    /// replaces an empty directory: that is only ever a dead lock directory,
    /// so it is taken; a live one is never empty, so it is never replaced.
    #[test]
    fn plain_rename_fallback_replaces_only_dead_empty_directories() {
        FORCE_PLAIN_RENAME.with(|c| c.set(true));
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("lk");
        let a = LeaseLock::new(&path, Duration::from_secs(60)).unwrap();
        let b = LeaseLock::new(&path, Duration::from_secs(60)).unwrap();
        std::fs::create_dir(&path).unwrap();
        let g = a.try_lock().expect("an empty (dead) directory is replaced");
        assert_eq!(g.token(), 1);
        for _ in 0..3 {
            assert!(matches!(b.try_lock(), Err(TryLockError::WouldBlock)));
        }
        assert!(g.is_held(), "a live lock directory is never replaced");
        g.release().unwrap();
        let g = b.try_lock().unwrap();
        assert_eq!(g.token(), 2);
        drop(g);
        FORCE_PLAIN_RENAME.with(|c| c.set(false));
    }
}
