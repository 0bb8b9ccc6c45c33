//! [`holders`]: who holds or waits for locks on a file, as far as the
//! kernel shows it.
//!
//! Why it is built this way: "waiting for lock" with no name is the most
//! common complaint about file locks, and the kernel knows more than it
//! tells in one place. /proc/locks lists every lock on the host with the
//! inode, but names the process only for classic POSIX and flock locks (and
//! for flock, the process that *took* it, which may have exited since
//! forking); an OFD lock shows pid -1 because it belongs to an open file
//! description, not a process. The descriptions are findable: each process's
//! /proc/PID/fdinfo/FD lists the locks held through that descriptor. And an
//! OFD *waiter* is nameless there, so waiting [`crate::LockSet`]s are read
//! from the deadlock registry, where they publish their waits (those that
//! hold something or have an on-block callback; a set that holds nothing
//! skips the registry, since it cannot be on a cycle).
//!
//! /proc/locks is host-wide, not a consistent snapshot, and slow to read:
//! this is for diagnostics (the CLI, an on-block message), never for
//! deciding who gets a lock. The parsers take any text and never panic; a
//! line they do not understand is skipped.

use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::deadlock::{self, Access, FileKey};
use crate::sys::proc;
use crate::{Error, Mode, Result};

/// Which kernel mechanism a lock belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LockKind {
    /// An open-file-description byte-range lock (`F_OFD_SETLK`), as taken by
    /// [`crate::LockSet`].
    Ofd,
    /// A classic POSIX byte-range lock (`F_SETLK`, `lockf`, Python's
    /// `fcntl.lockf`).
    Posix,
    /// A whole-file `flock` lock.
    Flock,
}

impl fmt::Display for LockKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LockKind::Ofd => "ofd",
            LockKind::Posix => "fcntl",
            LockKind::Flock => "flock",
        })
    }
}

/// One lock on a file, held or waited for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// The process, if the kernel (or the wait registry) names it.
    pub pid: Option<u32>,
    /// Its short command name (/proc/PID/comm), if readable.
    pub command: Option<String>,
    /// Shared (read) or exclusive (write).
    pub mode: Mode,
    /// Byte (= [`crate::LockSet`] index) range: `start` and exclusive `end`,
    /// `None` meaning "to the end of the file, however large".
    pub range: (u64, Option<u64>),
    /// The mechanism.
    pub kind: LockKind,
    /// Whether this is a request waiting to be granted rather than a lock
    /// held.
    pub waiting: bool,
}

impl fmt::Display for Holder {
    /// One line, e.g. `pid 4242 (python3) exclusive 0..EOF fcntl held`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pid {
            Some(p) => write!(f, "pid {p}")?,
            None => f.write_str("pid ?")?,
        }
        if let Some(c) = &self.command {
            write!(f, " ({c})")?;
        }
        write!(f, " {} {}..", self.mode, self.range.0)?;
        match self.range.1 {
            Some(e) => write!(f, "{e}")?,
            None => f.write_str("EOF")?,
        }
        write!(
            f,
            " {} {}",
            self.kind,
            if self.waiting { "waiting" } else { "held" }
        )
    }
}

/// One parsed line of /proc/locks (or a `lock:` line of fdinfo).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LockLine {
    pub kind: LockKind,
    pub mode: Mode,
    pub pid: Option<u32>,
    pub major: u32,
    pub minor: u32,
    pub ino: u64,
    pub start: u64,
    /// Exclusive end; `None` for EOF.
    pub end: Option<u64>,
    pub waiting: bool,
}

/// Parses one /proc/locks line, e.g.
/// `2: -> OFDLCK ADVISORY  WRITE -1 fe:00:10010641 3 6`, or the same after
/// fdinfo's `lock:\t`. `None` for anything else (leases, odd lines).
pub(crate) fn parse_lock_line(line: &str) -> Option<LockLine> {
    let line = line.strip_prefix("lock:").unwrap_or(line);
    let mut t = line.split_ascii_whitespace();
    let id = t.next()?;
    if !id.ends_with(':') || id[..id.len() - 1].parse::<u64>().is_err() {
        return None;
    }
    let mut tok = t.next()?;
    let mut waiting = false;
    while tok == "->" {
        waiting = true;
        tok = t.next()?;
    }
    let kind = match tok {
        "POSIX" => LockKind::Posix,
        "OFDLCK" => LockKind::Ofd,
        "FLOCK" => LockKind::Flock,
        _ => return None,
    };
    // ADVISORY / MANDATORY / MSNFS (old kernels): not needed.
    t.next()?;
    let mode = match t.next()? {
        "READ" => Mode::Shared,
        "WRITE" => Mode::Exclusive,
        _ => return None,
    };
    let pid = t.next()?.parse::<i64>().ok()?;
    let pid = u32::try_from(pid).ok().filter(|&p| p > 0);
    let mut dev = t.next()?.split(':');
    let major = u32::from_str_radix(dev.next()?, 16).ok()?;
    let minor = u32::from_str_radix(dev.next()?, 16).ok()?;
    let ino = dev.next()?.parse().ok()?;
    if dev.next().is_some() {
        return None;
    }
    let start = t.next()?.parse().ok()?;
    let end = match t.next()? {
        "EOF" => None,
        // The kernel prints the last byte; keep it exclusive. A last byte
        // of u64::MAX cannot be exclusive: call it EOF.
        e => e.parse::<u64>().ok()?.checked_add(1),
    };
    if t.next().is_some() {
        return None;
    }
    Some(LockLine {
        kind,
        mode,
        pid,
        major,
        minor,
        ino,
        start,
        end,
        waiting,
    })
}

/// The lock lines of a /proc/locks or fdinfo text that are about `key`.
pub(crate) fn lines_for(text: &str, key: FileKey) -> Vec<LockLine> {
    let (major, minor) = split_dev(key.dev);
    text.lines()
        .filter_map(parse_lock_line)
        .filter(|l| l.major == major && l.minor == minor && l.ino == key.ino)
        .collect()
}

/// glibc's `major()`/`minor()` of a `st_dev`.
fn split_dev(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major as u32, minor as u32)
}

/// Reads a /proc file with large reads. The kernel builds each read of a
/// seq_file under its lock, so one large read is a consistent page of
/// lines, where the small probing first read of `fs::read_to_string` would
/// split the listing across two moments.
fn read_proc(path: impl AsRef<Path>) -> io::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 16];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        match f.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(len);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// OFD locks on `key` and the processes whose descriptors hold them, from
/// /proc/*/fdinfo (processes that cannot be read are skipped).
fn ofd_holders(key: FileKey) -> Vec<(u32, LockLine)> {
    let mut out = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            // stat follows the magic link to the open file: cheap filter
            // before reading fdinfo.
            let Ok(m) = fs::metadata(fd.path()) else {
                continue;
            };
            if m.dev() != key.dev || m.ino() != key.ino {
                continue;
            }
            let info = p.path().join("fdinfo").join(fd.file_name());
            let Ok(text) = read_proc(&info) else {
                continue;
            };
            for l in lines_for(&text, key) {
                if l.kind == LockKind::Ofd {
                    out.push((pid, l));
                }
            }
        }
    }
    out.sort_by_key(|(pid, l)| (*pid, l.start, l.end, l.mode == Mode::Exclusive));
    out.dedup();
    out
}

/// Lists who holds or waits for locks on the file at `path` (pid, command,
/// mode, range, kind), as far as the kernel shows it.
///
/// Sources: /proc/locks for every lock on the file's inode; for OFD locks
/// (which /proc/locks shows without a pid) the processes whose
/// /proc/PID/fdinfo lists them; for waiting [`crate::LockSet`]s, the
/// deadlock registry.
///
/// What it cannot see or name:
/// - OFD holders in processes this user may not inspect (other users'
///   processes, unless root): listed with `pid: None`.
/// - OFD waiters that are not `LockSet`s, whose registry is disabled, or
///   that held nothing in their set when they blocked and have no on-block
///   callback (such a wait skips the registry): listed with `pid: None`;
///   the kernel does not say who waits.
/// - An OFD lock shared by several processes (after fork) is listed once
///   per process that has a descriptor for it.
/// - For flock locks the pid is the process that took the lock, which may
///   have exited while a forked child still holds it.
/// - Processes in other pid namespaces (containers) show no pid.
/// - The answer is not a snapshot: locks come and go while it is read,
///   and identical OFD locks that cannot be named are listed once.
pub fn holders(path: impl AsRef<Path>) -> Result<Vec<Holder>> {
    let path = path.as_ref();
    let meta = fs::metadata(path).map_err(|e| Error::io("inspect lock file", e).with_path(path))?;
    let key = FileKey {
        dev: meta.dev(),
        ino: meta.ino(),
    };
    holders_of(key, Access::of(&meta), path)
}

/// [`holders`] for a file already open (named by its device and inode;
/// `path` only labels errors).
pub(crate) fn holders_of(key: FileKey, access: Access, path: &Path) -> Result<Vec<Holder>> {
    let text =
        read_proc("/proc/locks").map_err(|e| Error::io("read /proc/locks", e).with_path(path))?;
    Ok(assemble(
        lines_for(&text, key),
        || ofd_holders(key),
        deadlock::waiters(key, access)
            .into_iter()
            .map(|w| Waiter {
                pid: w.owner.process.pid,
                mode: w.want_mode,
                start: w.want.start,
                end: w.want.end,
            })
            .collect(),
        proc::command,
    ))
}

/// A waiting owner from the registry.
#[derive(Clone, Copy, Debug)]
struct Waiter {
    pid: u32,
    mode: Mode,
    start: u64,
    end: u64,
}

/// Joins the three sources (pure, for tests).
fn assemble(
    locks: Vec<LockLine>,
    ofd: impl FnOnce() -> Vec<(u32, LockLine)>,
    waiters: Vec<Waiter>,
    command: impl Fn(u32) -> Option<String>,
) -> Vec<Holder> {
    let holder = |pid: Option<u32>, l: &LockLine, kind, waiting| Holder {
        pid,
        command: pid.and_then(&command),
        mode: l.mode,
        range: (l.start, l.end),
        kind,
        waiting,
    };
    // /proc/locks is not a snapshot: a line can appear twice when locks
    // change while it is read. Identical lines are taken as one lock (so
    // identical OFD locks that cannot be named are listed once).
    let mut distinct: Vec<LockLine> = Vec::with_capacity(locks.len());
    for l in locks {
        if !distinct.contains(&l) {
            distinct.push(l);
        }
    }
    let mut out = Vec::new();
    let mut ofd_held: Vec<LockLine> = Vec::new();
    let mut ofd_waiting: Vec<LockLine> = Vec::new();
    for l in &distinct {
        match (l.kind, l.waiting) {
            (LockKind::Ofd, false) => ofd_held.push(*l),
            (LockKind::Ofd, true) => ofd_waiting.push(*l),
            (kind, waiting) => out.push(holder(l.pid, l, kind, waiting)),
        }
    }
    let same =
        |a: &LockLine, b: &LockLine| a.mode == b.mode && a.start == b.start && a.end == b.end;
    if !ofd_held.is_empty() {
        let named = ofd();
        // Every named holder of a lock that /proc/locks shows; a lock that
        // no readable descriptor accounts for is listed without a name.
        for (pid, l) in &named {
            if ofd_held.iter().any(|h| same(h, l)) {
                out.push(holder(Some(*pid), l, LockKind::Ofd, false));
            }
        }
        for l in &ofd_held {
            if !named.iter().any(|(_, n)| same(n, l)) {
                out.push(holder(None, l, LockKind::Ofd, false));
            }
        }
    }
    // Registry waiters (they may not have reached the kernel yet), then
    // the kernel's OFD waiters that no registry record accounts for.
    let mut registry_lines = Vec::with_capacity(waiters.len());
    for w in &waiters {
        let l = LockLine {
            kind: LockKind::Ofd,
            mode: w.mode,
            pid: Some(w.pid),
            major: 0,
            minor: 0,
            ino: 0,
            start: w.start,
            end: Some(w.end),
            waiting: true,
        };
        out.push(holder(Some(w.pid), &l, LockKind::Ofd, true));
        registry_lines.push(l);
    }
    for l in &ofd_waiting {
        if !registry_lines.iter().any(|r| same(r, l)) {
            out.push(holder(None, l, LockKind::Ofd, true));
        }
    }
    out.sort_by_key(|h| (h.waiting, h.range.0, h.pid));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
1: POSIX  ADVISORY  READ 9572 fe:00:10010641 10 EOF
2: OFDLCK ADVISORY  WRITE -1 fe:00:10010641 3 6
2: -> OFDLCK ADVISORY  WRITE -1 fe:00:10010641 5 5
2:  -> -> POSIX  ADVISORY  READ 9675 fe:00:10010641 2 4
3: FLOCK  ADVISORY  WRITE 812 00:1a:77 0 EOF
4: LEASE  ACTIVE    READ 1234 fe:00:10010641 0 EOF
5: DELEG  ACTIVE    READ 1234 fe:00:10010641 0 EOF
6: POSIX  ADVISORY  UNLCK 1 fe:00:10010641 0 EOF
7: FLOCK  ADVISORY  READ 0 fe:00:10010641 0 EOF
8: POSIX  ADVISORY  WRITE 1 <none>:0 0 EOF
9: OFDLCK ADVISORY  READ -1 103:1f:10010641 0 18446744073709551615
garbage
: POSIX ADVISORY READ 1 fe:00:1 0 EOF
10: POSIX ADVISORY READ 1 fe:00:1 0
11: POSIX ADVISORY READ 1 fe:00:1 0 EOF extra
12: POSIX ADVISORY READ 1 fe:00:1:9 0 EOF
13: POSIX ADVISORY READ 99999999999 fe:00:1 0 EOF

\u{0}\u{ffff} ->
";

    fn key() -> FileKey {
        FileKey {
            dev: (0xfe << 8),
            ino: 10010641,
        }
    }

    #[test]
    fn parses_proc_locks_lines() {
        let ls = lines_for(SAMPLE, key());
        let want = [
            (LockKind::Posix, Mode::Shared, Some(9572), 10, None, false),
            (LockKind::Ofd, Mode::Exclusive, None, 3, Some(7), false),
            (LockKind::Ofd, Mode::Exclusive, None, 5, Some(6), true),
            (LockKind::Posix, Mode::Shared, Some(9675), 2, Some(5), true),
            (LockKind::Flock, Mode::Shared, None, 0, None, false),
        ];
        let got: Vec<_> = ls
            .iter()
            .map(|l| (l.kind, l.mode, l.pid, l.start, l.end, l.waiting))
            .collect();
        assert_eq!(got, want);
        // A device with a large minor, and a last byte at u64::MAX.
        let l =
            parse_lock_line("9: OFDLCK ADVISORY  READ -1 103:1f:5 0 18446744073709551615").unwrap();
        assert_eq!((l.major, l.minor, l.end), (0x103, 0x1f, None));
        // fdinfo form.
        let l = parse_lock_line("lock:\t1: OFDLCK ADVISORY  WRITE -1 fe:00:10010641 3 6").unwrap();
        assert_eq!((l.kind, l.start, l.end), (LockKind::Ofd, 3, Some(7)));
    }

    #[test]
    fn parser_never_panics_on_any_prefix_or_byte_soup() {
        for line in SAMPLE.lines() {
            for cut in 0..=line.len() {
                if line.is_char_boundary(cut) {
                    let _ = parse_lock_line(&line[..cut]);
                }
            }
        }
        for s in [
            "",
            " ",
            ":",
            "1:",
            "1: ->",
            "1: -> ->",
            "lock:",
            "1: OFDLCK",
            "1: OFDLCK A WRITE -1 zz:00:1 0 EOF",
        ] {
            assert_eq!(parse_lock_line(s), None, "{s:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn parser_total(s in "\\PC{0,80}") {
            let _ = parse_lock_line(&s);
        }
    }

    #[test]
    fn split_dev_matches_libc() {
        for dev in [0u64, 0xfe00, 0x1_0301, 0x0000_0123_4567_89ab, u64::MAX] {
            let (ma, mi) = split_dev(dev);
            assert_eq!(ma, libc::major(dev as libc::dev_t));
            assert_eq!(mi, libc::minor(dev as libc::dev_t));
        }
    }

    #[test]
    fn assembles_sources_and_displays() {
        let ls = lines_for(SAMPLE, key());
        let ofd = || {
            vec![(
                4242,
                parse_lock_line("lock:\t1: OFDLCK ADVISORY  WRITE -1 fe:00:10010641 3 6").unwrap(),
            )]
        };
        let waiters = vec![Waiter {
            pid: 77,
            mode: Mode::Exclusive,
            start: 5,
            end: 6,
        }];
        let hs = assemble(ls, ofd, waiters, |p| Some(format!("cmd{p}")));
        let shown: Vec<String> = hs.iter().map(|h| h.to_string()).collect();
        assert_eq!(
            shown,
            [
                "pid ? shared 0..EOF flock held",
                "pid 4242 (cmd4242) exclusive 3..7 ofd held",
                "pid 9572 (cmd9572) shared 10..EOF fcntl held",
                "pid 9675 (cmd9675) shared 2..5 fcntl waiting",
                "pid 77 (cmd77) exclusive 5..6 ofd waiting",
            ]
        );
        // Without fdinfo names or registry, OFD locks are still listed.
        let hs = assemble(lines_for(SAMPLE, key()), Vec::new, Vec::new(), |_| None);
        let ofd: Vec<String> = hs
            .iter()
            .filter(|h| h.kind == LockKind::Ofd)
            .map(|h| h.to_string())
            .collect();
        assert_eq!(
            ofd,
            [
                "pid ? exclusive 3..7 ofd held",
                "pid ? exclusive 5..6 ofd waiting"
            ]
        );
    }
}
