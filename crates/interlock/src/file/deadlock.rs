//! Deadlock detection for OFD byte-range locks, which the kernel does not do.
//!
//! Why it is built this way: classic fcntl locks get `EDEADLK` from the
//! kernel (for cycles of up to 12 processes, and falsely between threads);
//! OFD locks get nothing, and two readers that both upgrade the same index
//! hang forever (FACTS.md). So a [`crate::LockSet`] that is about to block
//! first publishes who it is, what it holds and what it wants, and looks for
//! a cycle among the owners that have done the same.
//!
//! The argument, in short (docs/design-set.md has it in full):
//! - Only blocked owners can be part of a cycle, and a blocked owner's
//!   holdings cannot change while it waits (its lock set is busy with the
//!   wait). So the wait-for graph among *published* owners is the real one,
//!   with an edge W → V when W's wanted interval and mode conflict with an
//!   interval V holds.
//! - Checking and publishing happen under one registry-wide lock, so of the
//!   owners that close a cycle, the last to publish sees all the others and
//!   finds it; it fails with `Deadlock` and the others proceed once it
//!   releases.
//! - A record can outlive its wait by a moment (the owner was granted and has
//!   not yet removed it), but such a stale record never forms an edge with a
//!   fresh one: the stale owner already holds what it wanted, so nobody can
//!   hold anything conflicting with it. Hence no false `Deadlock`.
//! - The uncontended path never touches the registry: only an owner whose
//!   non-blocking attempt failed publishes, and only if it holds something
//!   (nobody can wait for an owner that holds nothing, so it is on no
//!   cycle) or its set has an on-block callback.
//!
//! The registry is a directory per lock file in /dev/shm (tmpfs: no disk
//! I/O), named by the file's device and inode, holding one small text record
//! per waiting owner (written to a temporary name, then renamed, so a reader
//! never sees half a record); an `flock` of the directory itself serialises
//! check-and-publish. Records of dead processes are ignored and removed,
//! and the last waiter to leave removes the directory.
//!
//! The base directory is shared by every user, so the registry is read as
//! hostile input: see [`read_waiters`] for what is believed, and
//! docs/threat-model.md for what another user can and cannot do with it.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs::{self, DirBuilder, File};
use std::io;
use std::ops::Range;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::ranges::Seg;
use crate::sys::dir::Dir;
use crate::sys::fcntl::{flock, FlockOp};
use crate::sys::proc::{self, Liveness, ProcessId};
use crate::sys::timer;
use crate::Mode;
use std::time::{Duration, Instant};

/// The variable that overrides where registries live (default /dev/shm,
/// else /tmp). Set to the empty string to disable deadlock detection.
pub const REGISTRY_DIR_ENV: &str = "INTERLOCK_WAIT_DIR";

const MAGIC: &str = "interlock-wait 1";

/// How long a waiter waits for the registry lock before it gives up on
/// detection for this wait (the lock is normally held for well under 1 ms).
pub(crate) const REGISTRY_PATIENCE: Duration = Duration::from_secs(1);

/// A file, as the kernel names it for locking.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct FileKey {
    pub dev: u64,
    pub ino: u64,
}

impl FileKey {
    pub fn of(file: &File) -> io::Result<FileKey> {
        let m = file.metadata()?;
        Ok(FileKey {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// Who waits: a process (pid + start time, so a reused pid is not mistaken
/// for it) and which of its lock sets (a per-process serial).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Owner {
    pub process: ProcessId,
    pub serial: u64,
}

impl Owner {
    fn file_name(&self) -> String {
        format!(
            "w-{}-{}-{}",
            self.process.pid, self.process.start_time, self.serial
        )
    }
}

/// One waiting owner, as published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    pub file: FileKey,
    pub owner: Owner,
    pub want: Range<u64>,
    pub want_mode: Mode,
    pub held: Vec<Seg>,
}

fn mode_char(m: Mode) -> char {
    match m {
        Mode::Shared => 'S',
        Mode::Exclusive => 'X',
    }
}

fn parse_mode(s: &str) -> Option<Mode> {
    match s {
        "S" => Some(Mode::Shared),
        "X" => Some(Mode::Exclusive),
        _ => None,
    }
}

impl Record {
    fn encode(&self) -> String {
        let mut s = String::with_capacity(128 + 32 * self.held.len());
        let o = &self.owner;
        // Writing to a String cannot fail.
        let _ = writeln!(s, "{MAGIC}");
        let _ = writeln!(s, "file {} {}", self.file.dev, self.file.ino);
        let _ = writeln!(
            s,
            "owner {} {} {}",
            o.process.pid, o.process.start_time, o.serial
        );
        let _ = writeln!(
            s,
            "want {} {} {}",
            self.want.start,
            self.want.end,
            mode_char(self.want_mode)
        );
        for h in &self.held {
            let _ = writeln!(s, "held {} {} {}", h.start, h.end, mode_char(h.mode));
        }
        s.push_str("end\n");
        s
    }

    /// Parses a record; `None` for anything malformed or truncated.
    fn decode(text: &str) -> Option<Record> {
        let mut lines = text.lines();
        if lines.next()? != MAGIC {
            return None;
        }
        let mut fields = |name: &str, n: usize| -> Option<Vec<String>> {
            let line = lines.next()?;
            let mut it = line.split(' ');
            if it.next()? != name {
                return None;
            }
            let v: Vec<String> = it.map(str::to_string).collect();
            (v.len() == n).then_some(v)
        };
        let f = fields("file", 2)?;
        let file = FileKey {
            dev: f[0].parse().ok()?,
            ino: f[1].parse().ok()?,
        };
        let o = fields("owner", 3)?;
        let owner = Owner {
            process: ProcessId {
                pid: o[0].parse().ok()?,
                start_time: o[1].parse().ok()?,
            },
            serial: o[2].parse().ok()?,
        };
        let w = fields("want", 3)?;
        let want = w[0].parse().ok()?..w[1].parse().ok()?;
        let want_mode = parse_mode(&w[2])?;
        let mut held = Vec::new();
        for line in lines {
            if line == "end" {
                return Some(Record {
                    file,
                    owner,
                    want,
                    want_mode,
                    held,
                });
            }
            let mut it = line.split(' ');
            if it.next()? != "held" {
                return None;
            }
            let start = it.next()?.parse().ok()?;
            let end = it.next()?.parse().ok()?;
            let mode = parse_mode(it.next()?)?;
            if it.next().is_some() {
                return None;
            }
            held.push(Seg { start, end, mode });
        }
        // No "end" line: truncated.
        None
    }

    /// Whether this owner's request conflicts with something `other` holds.
    fn waits_for(&self, other: &Record) -> bool {
        self.owner != other.owner
            && other.held.iter().any(|h| {
                h.start < self.want.end
                    && self.want.start < h.end
                    && h.mode.conflicts_with(self.want_mode)
            })
    }
}

/// Whether adding `me` to the waiting owners `others` closes a cycle
/// through `me` in the wait-for graph. Cycles not through `me` are not
/// looked for: they cannot exist (the owner that closed one was told).
pub(crate) fn closes_cycle(me: &Record, others: &[Record]) -> bool {
    // Depth-first search from `me`; reaching an owner that waits for `me`
    // closes the cycle.
    let mut seen = HashSet::new();
    let mut stack: Vec<&Record> = others.iter().filter(|o| me.waits_for(o)).collect();
    while let Some(v) = stack.pop() {
        if !seen.insert(v.owner) {
            continue;
        }
        if v.waits_for(me) {
            return true;
        }
        stack.extend(
            others
                .iter()
                .filter(|w| !seen.contains(&w.owner) && v.waits_for(w)),
        );
    }
    false
}

/// The directory that holds the registries, or `None` if detection is
/// disabled.
fn base_dir() -> Option<PathBuf> {
    match std::env::var_os(REGISTRY_DIR_ENV) {
        Some(v) if v.is_empty() => None,
        Some(v) => Some(PathBuf::from(v)),
        None => {
            let shm = Path::new("/dev/shm");
            if fs::metadata(shm).is_ok_and(|m| m.is_dir()) {
                Some(shm.to_path_buf())
            } else {
                Some(PathBuf::from("/tmp"))
            }
        }
    }
}

fn registry_dir(base: &Path, key: FileKey) -> PathBuf {
    base.join(format!("interlock-wait-{}-{}", key.dev, key.ino))
}

/// Who may use a lock file: its owner, group and permission bits, against
/// which each record's claims are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Access {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

impl Access {
    pub fn of(m: &fs::Metadata) -> Access {
        Access {
            uid: m.uid(),
            gid: m.gid(),
            mode: m.mode(),
        }
    }
}

/// At most this many entries of a registry directory are looked at.
const MAX_ENTRIES: usize = 4096;
/// A record longer than this is neither written nor read.
const MAX_RECORD: u64 = 256 * 1024;
/// At most this many bytes of records are read per look.
const MAX_READ: u64 = 8 * 1024 * 1024;

/// The wait registry of one lock file.
#[derive(Debug)]
pub(crate) struct Registry {
    dir: PathBuf,
    key: FileKey,
    access: Access,
}

/// What [`Registry::publish`] found.
pub(crate) enum Published {
    /// Waiting would close a cycle; nothing was published.
    Deadlock,
    /// The record is published; dropping this removes it.
    Waiting(Waiter),
}

/// A published record; removed on drop, and the registry directory with it
/// if nothing else is left in it.
pub(crate) struct Waiter {
    path: PathBuf,
    dir: Dir,
    name: String,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        // Removal needs no registry lock: a record that lingers a moment
        // after its wait ended can never form an edge with a live waiter
        // (see the module docs), and removing it is atomic.
        let _ = self.dir.unlink(&self.name);
        // Removing the directory does: whoever holds the lock may be about
        // to publish into it. If it is busy, its holder cleans up after.
        if let Ok(Some(held)) = RegistryLock::try_take(&self.dir, &self.path) {
            held.remove_if_empty();
        }
    }
}

impl Registry {
    /// The registry for the lock file `key` (with `access`). `None` when
    /// detection is disabled. Nothing is created until a wait is published.
    pub fn open(key: FileKey, access: Access) -> Option<Registry> {
        Some(Registry {
            dir: registry_dir(&base_dir()?, key),
            key,
            access,
        })
    }

    /// Under the registry lock: reads the other waiters, checks whether
    /// `me` would close a cycle, and if not publishes `me`.
    ///
    /// The registry lock is held for a few hundred microseconds at most, but
    /// a process stopped (SIGSTOP, a debugger) or hostile while holding it
    /// would hold it indefinitely; so this gives up after
    /// [`REGISTRY_PATIENCE`] (or at the caller's `deadline`, if sooner) with
    /// `TimedOut`, and the caller waits without detection.
    pub fn publish(&self, me: &Record, deadline: Option<Instant>) -> io::Result<Published> {
        let patience = Instant::now() + REGISTRY_PATIENCE;
        let give_up = deadline.map_or(patience, |d| d.min(patience));
        let text = me.encode();
        if text.len() as u64 > MAX_RECORD {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        let held = RegistryLock::take(&self.dir, give_up)?;
        let others = read_waiters(&held.dir, self.key, self.access, Some(me.owner), true);
        if closes_cycle(me, &others) {
            held.remove_if_empty();
            return Ok(Published::Deadlock);
        }
        let name = me.owner.file_name();
        let tmp = format!("t{}", &name[1..]);
        let result = (|| {
            let _ = held.dir.unlink(&tmp);
            held.dir.create_file(&tmp, text.as_bytes(), 0o644, false)?;
            held.dir.rename(&tmp, &name)
        })();
        if let Err(e) = result {
            let _ = held.dir.unlink(&tmp);
            held.remove_if_empty();
            return Err(e);
        }
        let dir = held.dir.open_at(".")?;
        Ok(Published::Waiting(Waiter {
            path: self.dir.clone(),
            dir,
            name,
        }))
    }
}

/// The registry-wide lock: `flock` of the registry directory itself,
/// released on drop. Holding it, the directory at the registry's path is
/// the one locked (checked after locking, since it may have been removed
/// and made anew meanwhile).
struct RegistryLock {
    path: PathBuf,
    dir: Dir,
}

impl RegistryLock {
    /// Makes the directory if needed, opens and locks it, waiting until
    /// `give_up` at most.
    fn take(path: &Path, give_up: Instant) -> io::Result<RegistryLock> {
        loop {
            match DirBuilder::new().mode(0o1777).create(path) {
                Ok(()) => {
                    // The umask narrowed the mode; every user who may open
                    // the lock file must be able to publish.
                    fs::set_permissions(path, fs::Permissions::from_mode(0o1777))?;
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            // Not following a symlink planted at the name.
            let dir = Dir::open(path)?;
            let got = flock(dir.as_fd(), FlockOp::Exclusive, false)?
                || timer::block_until(Some(give_up), || {
                    flock(dir.as_fd(), FlockOp::Exclusive, true)
                })?
                .is_some();
            if !got {
                return Err(io::Error::from(io::ErrorKind::TimedOut));
            }
            if still_at(&dir, path) {
                return Ok(RegistryLock {
                    path: path.to_path_buf(),
                    dir,
                });
            }
            // Removed (and perhaps made anew) while we waited: again.
            if Instant::now() >= give_up {
                return Err(io::Error::from(io::ErrorKind::TimedOut));
            }
        }
    }

    /// Locks the directory `dir` (at `path`) if that is possible at once
    /// and it is still at `path`.
    fn try_take(dir: &Dir, path: &Path) -> io::Result<Option<RegistryLock>> {
        let dir = dir.open_at(".")?;
        if !flock(dir.as_fd(), FlockOp::Exclusive, false)? || !still_at(&dir, path) {
            return Ok(None);
        }
        Ok(Some(RegistryLock {
            path: path.to_path_buf(),
            dir,
        }))
    }

    /// Removes the directory if nothing is left in it but records of dead
    /// processes (collected first) and the `lock` file of earlier releases.
    /// Only its owner can remove it (the base directory is sticky).
    fn remove_if_empty(self) {
        let Ok(names) = self.dir.names_limited(64) else {
            return;
        };
        for n in &names {
            let Some(s) = n.to_str() else { return };
            let gone = match s.strip_prefix("w-").or_else(|| s.strip_prefix("t-")) {
                Some(rest) => owner_from_name(rest)
                    .is_some_and(|o| proc::liveness(o.process) == Liveness::Dead),
                None => s == "lock",
            };
            if !gone || self.dir.unlink(n).is_err() {
                return;
            }
        }
        let _ = fs::remove_dir(&self.path);
    }
}

impl Drop for RegistryLock {
    fn drop(&mut self) {
        let _ = flock(self.dir.as_fd(), FlockOp::Unlock, false);
    }
}

/// Whether the directory open as `dir` is (still) the one at `path`.
fn still_at(dir: &Dir, path: &Path) -> bool {
    match (dir.identity(), fs::symlink_metadata(path)) {
        (Ok((dev, ino)), Ok(m)) => m.is_dir() && m.dev() == dev && m.ino() == ino,
        _ => false,
    }
}

/// The live, believable waiters' records in `dir`, except `skip`'s. With
/// `collect`, removes the records of dead processes (best effort).
///
/// Anyone may write in a registry, so nothing read from it is taken on
/// trust: entries are opened without following links or blocking, must be
/// regular files of bounded size, and a record is believed only if its
/// file's owner is the user the process it names runs as, and that user
/// may open the lock file for what the record claims to hold (writing for
/// an exclusive holding). Records written by root or by this user are
/// believed. A record that fails any check is ignored: that can only hide
/// a real cycle from detection (the wait then goes on as without
/// detection), never make one up.
fn read_waiters(
    dir: &Dir,
    key: FileKey,
    access: Access,
    skip: Option<Owner>,
    collect: bool,
) -> Vec<Record> {
    let Ok(names) = dir.names_limited(MAX_ENTRIES) else {
        return Vec::new();
    };
    let my_uid = proc::credentials(std::process::id()).map(|c| c.uid);
    let mut budget = MAX_READ;
    let mut out = Vec::new();
    for name in names {
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with("w-") && !name.starts_with("t-") {
            continue;
        }
        // The name alone tells whose record it is, so even an unreadable
        // or damaged record of a dead process is collected.
        let Some(who) = owner_from_name(&name[2..]) else {
            continue;
        };
        if proc::liveness(who.process) == Liveness::Dead {
            if collect {
                let _ = dir.unlink(name);
            }
            continue;
        }
        if name.starts_with("t-") || Some(who) == skip {
            continue;
        }
        if budget == 0 {
            break;
        }
        let Ok((bytes, file_uid)) = dir.read_regular(name, MAX_RECORD.min(budget)) else {
            continue;
        };
        budget = budget.saturating_sub(bytes.len() as u64);
        let Ok(text) = std::str::from_utf8(&bytes) else {
            continue;
        };
        match Record::decode(text) {
            Some(r)
                if r.file == key && r.owner == who && believable(&r, file_uid, my_uid, access) =>
            {
                out.push(r)
            }
            _ => {}
        }
    }
    out
}

/// Whether the record `r`, in a file owned by `file_uid`, is a claim its
/// writer could make (see [`read_waiters`]).
fn believable(r: &Record, file_uid: u32, my_uid: Option<u32>, access: Access) -> bool {
    if file_uid == 0 || Some(file_uid) == my_uid {
        return true;
    }
    let Some(c) = proc::credentials(r.owner.process.pid) else {
        return false;
    };
    // Re-check the process after reading its credentials: the pid may have
    // been reused in between.
    if c.uid != file_uid || proc::liveness(r.owner.process) == Liveness::Dead {
        return false;
    }
    let exclusive =
        r.held.iter().any(|h| h.mode == Mode::Exclusive) || r.want_mode == Mode::Exclusive;
    c.may_open(access.uid, access.gid, access.mode, exclusive)
}

fn owner_from_name(s: &str) -> Option<Owner> {
    let mut it = s.split('-');
    let pid = it.next()?.parse().ok()?;
    let start_time = it.next()?.parse().ok()?;
    let serial = it.next()?.parse().ok()?;
    if it.next().is_some() {
        return None;
    }
    Some(Owner {
        process: ProcessId { pid, start_time },
        serial,
    })
}

/// The owners waiting on the file `key` (with `access`), as far as the
/// registry shows (for [`super::inspect::holders`]); empty if detection is
/// disabled.
pub(crate) fn waiters(key: FileKey, access: Access) -> Vec<Record> {
    let Some(base) = base_dir() else {
        return Vec::new();
    };
    match Dir::open(&registry_dir(&base, key)) {
        Ok(dir) => read_waiters(&dir, key, access, None, false),
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn owner(n: u64) -> Owner {
        Owner {
            process: ProcessId {
                pid: 1,
                start_time: 1,
            },
            serial: n,
        }
    }

    fn rec(n: u64, want: Range<u64>, m: Mode, held: &[(u64, u64, Mode)]) -> Record {
        Record {
            file: FileKey { dev: 1, ino: 2 },
            owner: owner(n),
            want,
            want_mode: m,
            held: held
                .iter()
                .map(|&(start, end, mode)| Seg { start, end, mode })
                .collect(),
        }
    }

    use Mode::{Exclusive as X, Shared as S};

    #[test]
    fn record_round_trip_and_damage() {
        let r = rec(7, 3..9, X, &[(0, 1, S), (1 << 62, (1 << 62) + 5, X)]);
        let text = r.encode();
        assert_eq!(Record::decode(&text), Some(r.clone()));
        // Truncated at every byte: never a panic, never a wrong record.
        for cut in 0..text.len() {
            let d = Record::decode(&text[..cut]);
            assert!(d.is_none() || d == Some(r.clone()), "cut {cut}");
        }
        assert_eq!(Record::decode("garbage"), None);
        assert_eq!(Record::decode(""), None);
        assert_eq!(owner_from_name("1-1-7"), Some(owner(7)));
        assert_eq!(owner_from_name("1-x-7"), None);
        assert_eq!(owner_from_name("1-1-7-8"), None);
    }

    #[test]
    fn cycles() {
        // Two owners each holding what the other wants.
        let a = rec(1, 1..2, X, &[(0, 1, X)]);
        let b = rec(2, 0..1, X, &[(1, 2, X)]);
        assert!(closes_cycle(&b, std::slice::from_ref(&a)));
        // Two readers upgrading the same index.
        let a = rec(1, 0..1, X, &[(0, 1, S)]);
        let b = rec(2, 0..1, X, &[(0, 1, S)]);
        assert!(closes_cycle(&b, std::slice::from_ref(&a)));
        // Shared wants do not conflict with shared holdings.
        let a = rec(1, 1..2, S, &[(0, 1, S)]);
        let b = rec(2, 0..1, S, &[(1, 2, S)]);
        assert!(!closes_cycle(&b, std::slice::from_ref(&a)));
        // A ring of 16.
        let n = 16;
        let ring: Vec<Record> = (0..n)
            .map(|i| rec(i, (i + 1) % n..(i + 1) % n + 1, X, &[(i, i + 1, X)]))
            .collect();
        assert!(closes_cycle(&ring[n as usize - 1], &ring[..n as usize - 1]));
        // A chain is not a cycle.
        assert!(!closes_cycle(
            &ring[n as usize - 1],
            &ring[1..n as usize - 1]
        ));
        // Nobody waits for an owner's own holdings.
        let a = rec(1, 0..1, X, &[(0, 1, S)]);
        assert!(!closes_cycle(&a, std::slice::from_ref(&a)));
    }

    fn arb_record(n: u64) -> impl Strategy<Value = Record> {
        (
            0..8u64,
            1..3u64,
            prop_oneof![Just(S), Just(X)],
            proptest::collection::vec((0..8u64, 1..3u64, prop_oneof![Just(S), Just(X)]), 0..3),
        )
            .prop_map(move |(ws, wl, wm, held)| {
                let held: Vec<(u64, u64, Mode)> =
                    held.into_iter().map(|(s, l, m)| (s, s + l, m)).collect();
                rec(n, ws..ws + wl, wm, &held)
            })
    }

    proptest! {
        /// `closes_cycle` agrees with a brute-force search over all
        /// simple paths (small graphs).
        #[test]
        fn cycle_search_matches_brute_force(
            others in (1..6usize).prop_flat_map(|k| {
                (0..k as u64).map(arb_record).collect::<Vec<_>>()
            }),
            me in arb_record(99),
        ) {
            let all: Vec<&Record> = std::iter::once(&me).chain(others.iter()).collect();
            let n = all.len();
            let edge = |i: usize, j: usize| all[i].waits_for(all[j]);
            // Reachability closure (Floyd–Warshall).
            let mut reach = vec![vec![false; n]; n];
            for (i, row) in reach.iter_mut().enumerate() {
                for (j, cell) in row.iter_mut().enumerate() {
                    *cell = edge(i, j);
                }
            }
            for k in 0..n {
                for i in 0..n {
                    for j in 0..n {
                        if reach[i][k] && reach[k][j] {
                            reach[i][j] = true;
                        }
                    }
                }
            }
            prop_assert_eq!(closes_cycle(&me, &others), reach[0][0]);
        }
    }
}
