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
//!   non-blocking attempt failed publishes.
//!
//! The registry is a directory per lock file in /dev/shm (tmpfs: no disk
//! I/O), named by the file's device and inode, holding one small text record
//! per waiting owner (written to a temporary name, then renamed, so a reader
//! never sees half a record) and a `lock` file whose `flock` serialises
//! check-and-publish. Records of dead processes are ignored and removed.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write as _};
use std::ops::Range;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::ranges::Seg;
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

/// The wait registry of one lock file.
#[derive(Debug)]
pub(crate) struct Registry {
    dir: PathBuf,
    lock: File,
    key: FileKey,
}

/// What [`Registry::publish`] found.
pub(crate) enum Published<'a> {
    /// Waiting would close a cycle; nothing was published.
    Deadlock,
    /// The record is published; dropping this removes it.
    Waiting(Waiter<'a>),
}

/// A published record; removed on drop.
pub(crate) struct Waiter<'a> {
    registry: &'a Registry,
    name: String,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        // Removal needs no registry lock: a record that lingers a moment
        // after its wait ended can never form an edge with a live waiter
        // (see the module docs), and removing it is atomic.
        let _ = fs::remove_file(self.registry.dir.join(&self.name));
    }
}

impl Registry {
    /// Opens (creating if needed) the registry for `key`. `Ok(None)` when
    /// detection is disabled.
    pub fn open(key: FileKey) -> io::Result<Option<Registry>> {
        let Some(base) = base_dir() else {
            return Ok(None);
        };
        let dir = registry_dir(&base, key);
        match DirBuilder::new().mode(0o1777).create(&dir) {
            Ok(()) => {
                // The umask narrowed the mode; every user who may open the
                // lock file must be able to publish.
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777))?;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let m = fs::symlink_metadata(&dir)?;
        if !m.is_dir() {
            // A symlink or a file planted at the name: refuse to follow it.
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        let lock_path = dir.join("lock");
        let lock = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o666)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&lock_path)
        {
            Ok(f) => {
                f.set_permissions(fs::Permissions::from_mode(0o666))?;
                f
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(&lock_path)?,
            Err(e) => return Err(e),
        };
        Ok(Some(Registry { dir, lock, key }))
    }

    /// Under the registry lock: reads the other waiters, checks whether
    /// `me` would close a cycle, and if not publishes `me`.
    ///
    /// The registry lock is held for a few hundred microseconds at most, but
    /// a process stopped (SIGSTOP, a debugger) while holding it would hold
    /// it indefinitely; so this gives up after [`REGISTRY_PATIENCE`] (or at
    /// the caller's `deadline`, if sooner) with `TimedOut`, and the caller
    /// waits without detection.
    pub fn publish(&self, me: &Record, deadline: Option<Instant>) -> io::Result<Published<'_>> {
        let patience = Instant::now() + REGISTRY_PATIENCE;
        let give_up = deadline.map_or(patience, |d| d.min(patience));
        let _serial = RegistryLock::take(&self.lock, give_up)?;
        let others = self.read_waiters(Some(me.owner), true);
        if closes_cycle(me, &others) {
            return Ok(Published::Deadlock);
        }
        let name = me.owner.file_name();
        let tmp = self.dir.join(format!("t{}", &name[1..]));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o644)
                .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                .open(&tmp)?;
            f.write_all(me.encode().as_bytes())?;
            drop(f);
            fs::rename(&tmp, self.dir.join(&name))
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(Published::Waiting(Waiter {
            registry: self,
            name,
        }))
    }

    /// The live waiters' records, except `skip`'s. With `collect`, removes
    /// the records of dead processes (best effort).
    fn read_waiters(&self, skip: Option<Owner>, collect: bool) -> Vec<Record> {
        read_dir_waiters(&self.dir, self.key, skip, collect)
    }
}

/// The registry-wide lock, released on drop.
struct RegistryLock<'a>(&'a File);

impl<'a> RegistryLock<'a> {
    fn take(f: &'a File, give_up: Instant) -> io::Result<RegistryLock<'a>> {
        if flock(f.as_fd(), FlockOp::Exclusive, false)? {
            return Ok(RegistryLock(f));
        }
        match timer::block_until(Some(give_up), || flock(f.as_fd(), FlockOp::Exclusive, true))? {
            Some(_) => Ok(RegistryLock(f)),
            None => Err(io::Error::from(io::ErrorKind::TimedOut)),
        }
    }
}

impl Drop for RegistryLock<'_> {
    fn drop(&mut self) {
        let _ = flock(self.0.as_fd(), FlockOp::Unlock, false);
    }
}

fn read_dir_waiters(dir: &Path, key: FileKey, skip: Option<Owner>, collect: bool) -> Vec<Record> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
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
                let _ = fs::remove_file(entry.path());
            }
            continue;
        }
        if name.starts_with("t-") || Some(who) == skip {
            continue;
        }
        let Ok(text) = fs::read_to_string(entry.path()) else {
            continue;
        };
        match Record::decode(&text) {
            Some(r) if r.file == key && r.owner == who => out.push(r),
            _ => {}
        }
    }
    out
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

/// The owners waiting on the file `key`, as far as the registry shows
/// (for [`super::inspect::holders`]); empty if detection is disabled.
pub(crate) fn waiters(key: FileKey) -> Vec<Record> {
    match base_dir() {
        Some(base) => read_dir_waiters(&registry_dir(&base, key), key, None, false),
        None => Vec::new(),
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
