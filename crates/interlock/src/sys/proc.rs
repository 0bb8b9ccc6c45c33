//! Readers of /proc: process identity, liveness, command names.
//!
//! Why it is built this way: a pid alone does not name a process for long.
//! Pids are reused, so "is the holder alive?" asked with a pid can answer
//! "yes" about a stranger. A process is named here by its pid *and* its start
//! time (field 22 of /proc/PID/stat, in clock ticks since boot), and across
//! machines or reboots also by the boot id. A zombie counts as dead: it holds
//! nothing and will never release anything.

use std::fs;
use std::io;
use std::sync::OnceLock;

/// A process, named so that pid reuse cannot be mistaken for the original.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProcessId {
    /// The process id.
    pub pid: u32,
    /// The start time in clock ticks after boot (/proc/PID/stat field 22).
    pub start_time: u64,
}

impl ProcessId {
    /// Whether the process still runs (a zombie or a reused pid does not;
    /// if it cannot be told, it counts as running).
    pub fn is_alive(&self) -> bool {
        liveness(*self) == Liveness::Alive
    }

    /// The process's short command name (/proc/PID/comm), if it still runs
    /// and /proc shows it.
    pub fn command(&self) -> Option<String> {
        match liveness(*self) {
            Liveness::Alive => command(self.pid),
            Liveness::Dead => None,
        }
    }
}

/// The effective user id of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid(2) takes no arguments, cannot fail and touches no
    // memory of ours.
    unsafe { libc::geteuid() }
}

/// Liveness of a process named by [`ProcessId`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// The same process (same pid and start time) is running.
    Alive,
    /// No such process, a different process with the reused pid, or a zombie.
    Dead,
}

/// The fields of /proc/PID/stat that we need.
struct Stat {
    state: u8,
    start_time: u64,
}

fn read_stat(pid: u32) -> io::Result<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unparsable /proc/{pid}/stat"),
        )
    })
}

/// Parses /proc/PID/stat. The command (field 2) is in parentheses and may
/// itself contain spaces and parentheses, so fields are counted from the
/// last ')'.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // After the command: field 3 is the state, field 22 the start time.
    let state = *fields.next()?.as_bytes().first()?;
    let start_time = fields.nth(22 - 4)?.parse().ok()?;
    Some(Stat { state, start_time })
}

/// This process's identity (computed once; a forked child recomputes it
/// because its pid differs from the cached one).
pub fn current() -> ProcessId {
    static CACHE: OnceLock<ProcessId> = OnceLock::new();
    let pid = crate::sys::fork::pid();
    let cached = *CACHE.get_or_init(|| identity_of(pid));
    if cached.pid == pid {
        cached
    } else {
        identity_of(pid)
    }
}

fn identity_of(pid: u32) -> ProcessId {
    // Reading our own stat cannot fail on Linux with /proc mounted; without
    // /proc, a start time of 0 still names us uniquely among live processes.
    let start_time = read_stat(pid).map(|s| s.start_time).unwrap_or(0);
    ProcessId { pid, start_time }
}

/// Whether the process named by `id` still runs, erring on "alive".
///
/// `/proc/PID/stat` answers with the start time, so pid reuse is caught.
/// But a missing entry can also mean that /proc hides other users'
/// processes (`hidepid=`), and judging a hidden live holder dead would break
/// its lock; so a missing entry is believed only if the kernel confirms,
/// through `pidfd_open`, that no process has the pid. If it cannot tell,
/// the process counts as alive.
pub fn liveness(id: ProcessId) -> Liveness {
    match read_stat(id.pid) {
        Ok(s) if s.start_time == id.start_time && s.state != b'Z' && s.state != b'X' => {
            Liveness::Alive
        }
        // A zombie leader: the process has ended, or is ending, unless
        // another thread still runs (the main thread left alone, by
        // pthread_exit or the exit system call).
        Ok(s) if s.start_time == id.start_time && other_thread_lives(id.pid) => Liveness::Alive,
        // Visible with another start time, or a zombie: really dead.
        Ok(_) => Liveness::Dead,
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) => {
            match super::notify::PidFd::open(id.pid) {
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Liveness::Dead,
                _ => Liveness::Alive,
            }
        }
        // Anything odd: only proof of death counts, so we err on "alive"
        // and let the caller retry later rather than break a live lock.
        Err(_) => Liveness::Alive,
    }
}

/// Whether some thread of `pid` (whose leader is a zombie) will run user
/// code again: one that is not a zombie, not exiting (`PF_EXITING`) and has
/// no SIGKILL pending. A process being killed (or calling `exit`) has its
/// leader reaped first while the other threads still wait for a CPU to
/// die; those have SIGKILL pending and count as dead. A process whose main
/// thread left by `pthread_exit` keeps running in its other threads, and
/// counts as alive. If the task list cannot be read, the zombie is dead (as
/// it always counted).
fn other_thread_lives(pid: u32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        let dir = t.path();
        let Ok(stat) = fs::read_to_string(dir.join("stat")) else {
            return false;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            return false;
        };
        let f: Vec<&str> = rest.split_ascii_whitespace().collect();
        let exiting = matches!(f.first(), Some(&("Z" | "X")))
            || f.get(6).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) & 0x4 != 0;
        !exiting && fs::read_to_string(dir.join("status")).is_ok_and(|st| !sigkill_pending(&st))
    })
}

/// Whether a /proc/.../status text shows SIGKILL pending (`SigPnd` or
/// `ShdPnd`, hexadecimal masks whose bit 8 is signal 9).
fn sigkill_pending(status: &str) -> bool {
    status.lines().any(|l| {
        let (k, v) = l.split_once(':').unwrap_or(("", ""));
        (k == "SigPnd" || k == "ShdPnd")
            && u64::from_str_radix(v.trim(), 16).is_ok_and(|m| m & (1 << (libc::SIGKILL - 1)) != 0)
    })
}

/// This boot's id (/proc/sys/kernel/random/boot_id), to tell a process of
/// this boot from one of an earlier boot or another host.
pub fn boot_id() -> &'static str {
    static BOOT: OnceLock<String> = OnceLock::new();
    BOOT.get_or_init(|| {
        fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
}

/// The short command name of `pid` (/proc/PID/comm), if it can be read,
/// made printable: any process can name itself anything, escape sequences
/// included, so control characters and invalid UTF-8 come back escaped
/// (see [`printable`]).
pub fn command(pid: u32) -> Option<String> {
    let bytes = fs::read(format!("/proc/{pid}/comm")).ok()?;
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
    Some(printable(&String::from_utf8_lossy(bytes)))
}

/// `s` with every control character (C0, DEL, C1: terminal escape
/// sequences among them) and backslash written as a Rust-style escape
/// (`\u{1b}`, `\\`), so that text from another user can be printed to a
/// terminal as it is.
pub fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() || c == '\\' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The credentials a process accesses files with (from /proc/PID/status:
/// the file-system uid and gid and the supplementary groups).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    /// The file-system uid (the effective uid unless changed by setfsuid).
    pub uid: u32,
    /// The file-system gid.
    pub gid: u32,
    /// The supplementary groups.
    pub groups: Vec<u32>,
}

impl Credentials {
    /// Whether these credentials may open a file of owner `uid`, group
    /// `gid` and permission bits `mode` for reading (and, with `write`, for
    /// writing), by its permission bits alone (access control lists are
    /// not read: a process they admit counts as refused).
    pub fn may_open(&self, uid: u32, gid: u32, mode: u32, write: bool) -> bool {
        if self.uid == 0 {
            return true;
        }
        let bits = if self.uid == uid {
            mode >> 6
        } else if self.gid == gid || self.groups.contains(&gid) {
            mode >> 3
        } else {
            mode
        } & 0o7;
        bits & 0o4 != 0 && (!write || bits & 0o2 != 0)
    }
}

/// The credentials of `pid`, if /proc shows them.
pub fn credentials(pid: u32) -> Option<Credentials> {
    parse_status(&fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

fn parse_status(text: &str) -> Option<Credentials> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|rest| rest.split_ascii_whitespace().collect::<Vec<_>>())
    };
    // "Uid: real effective saved fs", likewise "Gid:".
    let uid = field("Uid:")?.get(3)?.parse().ok()?;
    let gid = field("Gid:")?.get(3)?.parse().ok()?;
    let groups = field("Groups:")
        .unwrap_or_default()
        .iter()
        .filter_map(|g| g.parse().ok())
        .collect();
    Some(Credentials { uid, gid, groups })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untrusted_text_is_made_printable() {
        assert_eq!(printable("make"), "make");
        assert_eq!(printable("\u{1b}[2Jx"), "\\u{1b}[2Jx");
        assert_eq!(printable("a\\b\u{9b}c\n"), "a\\\\b\\u{9b}c\\n");
        assert_eq!(printable("h\u{e9}te"), "h\u{e9}te");
    }

    #[test]
    fn credentials_parse_and_decide() {
        let c =
            parse_status("Name:\tx\nUid:\t1\t2\t3\t4\nGid:\t5\t6\t7\t8\nGroups:\t9 10 \n").unwrap();
        assert_eq!((c.uid, c.gid, c.groups.clone()), (4, 8, vec![9, 10]));
        assert!(c.may_open(4, 0, 0o600, true));
        assert!(!c.may_open(5, 0, 0o600, false));
        assert!(c.may_open(5, 10, 0o640, false));
        assert!(!c.may_open(5, 10, 0o640, true));
        assert!(c.may_open(5, 11, 0o604, false));
        assert!(!c.may_open(5, 11, 0o640, false));
        assert_eq!(parse_status("Uid:\t1\n"), None);
        let me = credentials(std::process::id()).unwrap();
        assert!(me.may_open(me.uid, me.gid, 0o600, true));
    }

    #[test]
    fn a_process_whose_main_thread_left_is_alive_until_its_last_thread_ends() {
        // The child's main thread leaves by pthread_exit while another
        // thread runs on (a zombie leader, a live process): alive. When that
        // thread ends, the process is dead. The control for the first half
        // is the second: the same check does say "dead".
        let (mut r, w) = std::io::pipe().unwrap();
        let (r2, mut w2) = std::io::pipe().unwrap();
        let w2_fd = std::os::fd::AsRawFd::as_raw_fd(&w2);
        let pid = crate::sys::fork::fork_run(move || {
            // SAFETY: closes the child's inherited copy of the parent's end
            // (a number, not an object of ours), so the read below ends when
            // the parent's copy closes, even if the parent panics.
            unsafe { libc::close(w2_fd) };
            let t = std::thread::spawn(move || {
                use std::io::Read;
                let mut b = [0u8; 1];
                let _ = (&r2).read(&mut b);
                // SAFETY: _exit ends the process at once (no destructors).
                unsafe { libc::_exit(0) }
            });
            drop(t);
            use std::io::Write;
            let _ = (&w).write_all(b"x");
            drop(w);
            // SAFETY: the raw exit(2) system call (not exit_group) ends only
            // this, the main, thread, without unwinding; the other thread
            // keeps the process alive until it calls _exit.
            unsafe { libc::syscall(libc::SYS_exit, 0) };
            unreachable!()
        })
        .unwrap();
        use std::io::Read;
        let mut b = [0u8; 1];
        r.read_exact(&mut b).unwrap();
        let start = read_stat(pid).unwrap().start_time;
        let id = ProcessId {
            pid,
            start_time: start,
        };
        // Wait (bounded) until the leader is a zombie.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while read_stat(pid).unwrap().state != b'Z' {
            assert!(std::time::Instant::now() < deadline, "leader never left");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(liveness(id), Liveness::Alive);
        use std::io::Write;
        w2.write_all(b"x").unwrap();
        drop(w2);
        assert_eq!(crate::sys::fork::wait_child(pid).unwrap(), 0);
        assert_eq!(liveness(id), Liveness::Dead);
    }

    #[test]
    fn sigkill_pending_is_read_from_status() {
        assert!(sigkill_pending(
            "Name:\tx\nSigPnd:\t0000000000000100\nShdPnd:\t0\n"
        ));
        assert!(sigkill_pending("ShdPnd:\t0000000000000100\n"));
        assert!(!sigkill_pending(
            "SigPnd:\t0000000000000200\nShdPnd:\t0000000000000000\n"
        ));
    }

    #[test]
    fn parses_stat_with_awkward_command() {
        let line = "4242 (a (weird) cmd) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.state, b'S');
        assert_eq!(s.start_time, 987654);
    }

    #[test]
    fn self_is_alive_and_a_fake_start_time_is_dead() {
        let me = current();
        assert_eq!(me.pid, std::process::id());
        assert_eq!(liveness(me), Liveness::Alive);
        let impostor = ProcessId {
            pid: me.pid,
            start_time: me.start_time + 1,
        };
        assert_eq!(liveness(impostor), Liveness::Dead);
        assert!(!boot_id().is_empty());
        assert!(command(me.pid).is_some());
    }
}
