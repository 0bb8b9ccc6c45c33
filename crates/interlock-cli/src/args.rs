//! The command line, parsed and checked before anything is locked.
//!
//! Why it is built this way: a lock tool is run from scripts, where a typo
//! must fail loudly and distinguishably, never be taken for "lock busy". So
//! every argument is validated here into typed values, and bad input exits
//! with EX_USAGE (64) and one line that names the problem.

use std::ffi::OsString;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

/// Run a command while holding a lock, or show who holds one.
#[derive(Debug, Parser)]
#[command(name = "interlock", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Take a lock, run COMMAND while holding it, release it, and exit with
    /// COMMAND's status (128+N if it was killed by signal N).
    Run(RunArgs),
    /// Print the holders and waiters of the lock at PATH, one per line.
    Status(StatusArgs),
}

/// Which family of lock `run` takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// A reader-writer lock on a file (OFD fcntl locks; excludes Python's
    /// fcntl.lockf users such as fasteners and pylocksfile).
    File,
    /// A reader-writer lock on a file with flock(2) (excludes flock(1),
    /// filelock and portalocker users).
    Flock,
    /// Indices of a lock-set file (lock i is byte i); needs --range.
    Set,
    /// A process-shared reader-writer lock in shared memory, by name or path.
    Shm,
    /// A lease: a lock directory with a time to live and a fencing token.
    Lease,
    /// One of N permits (--permits N) of a counting semaphore in shared
    /// memory, by name or path; a dead holder's permits return.
    Sem,
    /// One of N permits (--permits N) of a semaphore file (a permit is a
    /// kernel lock on one byte): for processes that share the file but not
    /// /dev/shm.
    FileSem,
    /// A PostgreSQL advisory lock named NAME, with a fencing token (server
    /// from --url, INTERLOCK_PG_URL, or the libpq environment).
    Pg,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Take the lock shared (many holders at once).
    #[arg(short = 's', long, conflicts_with = "exclusive")]
    pub shared: bool,
    /// Take the lock exclusive (the default).
    #[arg(short = 'x', long)]
    pub exclusive: bool,
    /// Fail at once if the lock is held.
    #[arg(short = 'n', long = "nonblock", conflicts_with = "wait")]
    pub nonblock: bool,
    /// Give up after SECS seconds (fractions allowed).
    #[arg(short = 'w', long = "wait", value_name = "SECS", value_parser = parse_secs)]
    pub wait: Option<Duration>,
    /// Exit with CODE when the lock is not taken (default 1).
    #[arg(
        short = 'E',
        long = "conflict-exit-code",
        value_name = "CODE",
        default_value_t = 1
    )]
    pub conflict_exit_code: u8,
    /// Do not say on stderr that we are waiting.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// The family of lock.
    #[arg(long, value_enum, default_value_t = Kind::File)]
    pub kind: Kind,
    /// For --kind set: the indices to lock, `A..B` (B excluded), `A..=B` or `I`.
    #[arg(long, value_name = "A..B", value_parser = parse_range)]
    pub range: Option<Range<u64>>,
    /// For --kind lease: the lease's time to live in seconds (renewed in the
    /// background while COMMAND runs). For --kind pg: the loss bound (the
    /// server frees a silent holder's lock after SECS; default 10).
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub ttl: Option<Duration>,
    /// For --kind sem and file-sem: the semaphore's number of permits N
    /// (1..=4094; every user gives the same N).
    #[arg(long, value_name = "N")]
    pub permits: Option<u32>,
    /// For --kind sem and file-sem: how many permits COMMAND holds (default 1).
    #[arg(long, value_name = "K")]
    pub take: Option<u32>,
    /// For --kind pg: the server, as a postgres:// URL or libpq key=value
    /// string (default: INTERLOCK_PG_URL, then PGHOST, PGPORT, PGUSER, ...).
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// The lock: a file path (file, flock, set, file-sem), a name or path
    /// (shm, sem), a directory path (lease), a name (pg).
    pub path: PathBuf,
    /// The command to run, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// `pg` for a PostgreSQL lock NAME; other kinds are recognized from PATH.
    #[arg(long, value_enum)]
    pub kind: Option<Kind>,
    /// For --kind pg: the server (as for `run`).
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// The lock file (or, with --kind pg, the lock's name).
    pub path: PathBuf,
}

/// Seconds as a non-negative, finite decimal number.
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("`{s}` is not a non-negative number of seconds"));
    }
    Duration::try_from_secs_f64(v).map_err(|_| format!("`{s}` seconds is too long"))
}

/// `A..B`, `A..=B` or a single index `I`, as a half-open range.
pub fn parse_range(s: &str) -> Result<Range<u64>, String> {
    let num = |t: &str| {
        t.trim()
            .parse::<u64>()
            .ok()
            .filter(|&i| i < interlock::INDEX_END)
            .ok_or_else(|| format!("`{t}` in range `{s}` is not an index (0 to 2^63-2)"))
    };
    let r = if let Some((a, b)) = s.split_once("..=") {
        let (a, b) = (num(a)?, num(b)?);
        a..b + 1
    } else if let Some((a, b)) = s.split_once("..") {
        // The end is excluded, so it may be the end of the index space.
        let end = b
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|&e| e <= interlock::INDEX_END)
            .ok_or_else(|| format!("`{b}` in range `{s}` is not an end (0 to 2^63-1)"))?;
        num(a)?..end
    } else {
        let i = num(s)?;
        i..i + 1
    };
    if r.start >= r.end {
        return Err(format!("range `{s}` is empty"));
    }
    Ok(r)
}

impl RunArgs {
    /// Cross-argument checks clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        match (self.kind, &self.range) {
            (Kind::Set, None) => return Err("--kind set needs --range A..B".into()),
            (k, Some(_)) if k != Kind::Set => {
                return Err("--range applies only to --kind set".into())
            }
            _ => {}
        }
        if self.ttl.is_some() && !matches!(self.kind, Kind::Lease | Kind::Pg) {
            return Err("--ttl applies only to --kind lease and --kind pg".into());
        }
        let sem = matches!(self.kind, Kind::Sem | Kind::FileSem);
        match (sem, self.permits) {
            (true, None) => return Err("--kind sem and file-sem need --permits N".into()),
            (true, Some(0)) => return Err("--permits must be at least 1".into()),
            (false, Some(_)) => {
                return Err("--permits applies only to --kind sem and file-sem".into())
            }
            _ => {}
        }
        match (sem, self.take) {
            (false, Some(_)) => return Err("--take applies only to --kind sem and file-sem".into()),
            (true, Some(k)) if k == 0 || self.permits.is_some_and(|n| k > n) => {
                return Err("--take must be 1..=N (the --permits)".into())
            }
            _ => {}
        }
        if sem && self.shared {
            return Err("a permit is taken whole: -s does not apply to a semaphore".into());
        }
        if self.url.is_some() && self.kind != Kind::Pg {
            return Err("--url applies only to --kind pg".into());
        }
        if self.kind == Kind::Pg {
            if self.path.to_str().is_none_or(str::is_empty) {
                return Err("a pg lock name must be non-empty UTF-8".into());
            }
            if self.ttl.is_some_and(|t| t < Duration::from_millis(40)) {
                return Err("--ttl for --kind pg must be at least 0.04 s".into());
            }
        }
        if self.kind == Kind::Lease {
            if self.shared {
                return Err("a lease is exclusive: -s does not apply to --kind lease".into());
            }
            if self.ttl.is_some_and(|t| t.is_zero()) {
                return Err("--ttl must be greater than zero".into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds() {
        assert_eq!(parse_secs("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_secs("0"), Ok(Duration::ZERO));
        for bad in ["-1", "nan", "inf", "abc", "", "1e300"] {
            assert!(parse_secs(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("3..7"), Ok(3..7));
        assert_eq!(parse_range("3..=6"), Ok(3..7));
        assert_eq!(parse_range("5"), Ok(5..6));
        let last = interlock::INDEX_END - 1;
        assert_eq!(parse_range(&last.to_string()), Ok(last..last + 1));
        assert_eq!(parse_range(&format!("0..{}", last + 1)), Ok(0..last + 1));
        assert!(parse_range(&(last + 1).to_string()).is_err());
        assert!(parse_range("5..=3").unwrap_err().contains("`5..=3`"));
        for bad in [
            "7..3",
            "3..3",
            "a..b",
            "..",
            "3..",
            "-1..2",
            "18446744073709551615..=18446744073709551615",
            "18446744073709551615",
        ] {
            assert!(parse_range(bad).is_err(), "{bad}");
        }
    }
}
