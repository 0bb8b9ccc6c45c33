//! A throwaway PostgreSQL cluster for tests: `initdb` in a temporary
//! directory, `pg_ctl start` on a unix socket in that directory and on a
//! loopback port, stopped and removed afterwards.
//!
//! Why it is built this way: the PgLock tests must run against a real
//! server (its lock manager, its deadlock detector, its session ends are
//! what is being tested), yet must not depend on, or disturb, a server the
//! machine may already run. So each test binary starts its own cluster, as
//! the unprivileged `postgres` user when the tests run as root (the server
//! refuses to run as root), on a free port.
//!
//! Cleanup does not rely on destructors alone: a static is never dropped,
//! and a test binary may be killed. Each cluster has a *watchdog*, a small
//! shell process in its own process group reading from a pipe whose only
//! writer is the test process; when the test process ends, however it ends,
//! the watchdog reads end-of-file, stops the postmaster (SIGQUIT, an
//! immediate shutdown) and removes the directory.
//!
//! Finding the server: `INTERLOCK_PG_BIN` (a directory holding `initdb`,
//! `pg_ctl`, `psql`), else the newest `/usr/lib/postgresql/*/bin`, else
//! `initdb` on the `PATH`. When none is found, [`shared`] and [`start`]
//! panic if `CI=true` (a missing server is a failure there: `.ci/run`
//! installs it) and otherwise print a loud `SKIPPED` line and return `None`.
#![allow(dead_code)]

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A running throwaway cluster. The superuser is `postgres`, with `trust`
/// authentication; the database is `postgres`.
pub struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    owner: Option<(u32, u32)>,
    watchdog: Option<Child>,
}

fn in_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"))
}

/// Where the server's binaries are, if installed.
pub fn bin_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("INTERLOCK_PG_BIN") {
        let d = PathBuf::from(d);
        return d.join("initdb").exists().then_some(d);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    if let Some((_, b)) = found.pop() {
        return Some(b);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
}

fn missing(why: &str) -> Option<Cluster> {
    if in_ci() {
        panic!("PostgreSQL server unusable in CI ({why}); .ci/run installs it with scripts/ensure-postgres.sh");
    }
    eprintln!(
        "\n*** SKIPPED: PostgreSQL tests need a server ({why}); \
         run scripts/ensure-postgres.sh or set INTERLOCK_PG_BIN ***\n"
    );
    None
}

/// The uid and gid of `postgres` from /etc/passwd, when running as root.
fn unprivileged_owner() -> Option<(u32, u32)> {
    let me = std::fs::metadata("/proc/self").ok()?.uid();
    if me != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() > 3 && f[0] == "postgres" {
            Some((f[2].parse().ok()?, f[3].parse().ok()?))
        } else {
            None
        }
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("find a free loopback port")
}

/// The cluster shared by every test of this test binary (started on first
/// use, removed when the process ends).
pub fn shared() -> Option<&'static Cluster> {
    static SHARED: OnceLock<Option<Cluster>> = OnceLock::new();
    SHARED.get_or_init(start).as_ref()
}

/// A cluster of the caller's own (for a test that restarts the server),
/// stopped and removed on drop.
pub fn start() -> Option<Cluster> {
    let Some(bin) = bin_dir() else {
        return missing("no initdb under /usr/lib/postgresql/*/bin or on PATH");
    };
    let owner = unprivileged_owner();
    if std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0)
        == 0
        && owner.is_none()
    {
        return missing("running as root and no `postgres` user to run the server as");
    }
    let base = std::env::temp_dir();
    let dir = tempfile::Builder::new()
        .prefix("interlock-pg-")
        .tempdir_in(&base)
        .expect("make cluster dir")
        .keep();
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("chown cluster dir");
    }
    let mut c = Cluster {
        dir,
        bin,
        port: 0,
        owner,
        watchdog: None,
    };
    c.arm_watchdog();
    let t = Instant::now();
    c.run_as_server(
        "initdb",
        &[
            "-A",
            "trust",
            "--no-sync",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "-D",
        ],
        &[c.data()],
    );
    // Fast and quiet; deadlocks detected after 100 ms instead of 1 s.
    let conf = format!(
        "listen_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
         fsync = off\nfull_page_writes = off\ndeadlock_timeout = '100ms'\n\
         max_connections = 200\nlogging_collector = off\n",
        c.dir.display()
    );
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(c.data().join("postgresql.conf"))
        .expect("open postgresql.conf");
    f.write_all(conf.as_bytes()).unwrap();
    for attempt in 0..3 {
        c.port = free_port();
        if c.pg_ctl_start() {
            break;
        }
        assert!(attempt < 2, "pg_ctl start failed 3 times; log: {}", c.log());
    }
    eprintln!(
        "[pg] cluster at {} port {} ready in {:?}",
        c.dir.display(),
        c.port,
        t.elapsed()
    );
    Some(c)
}

impl Cluster {
    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The directory holding the unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// The loopback TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL that reaches the server over TCP on 127.0.0.1.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// A URL for a TCP endpoint other than the server's (a proxy's port).
    pub fn url_via(&self, port: u16) -> String {
        format!("postgres://postgres@127.0.0.1:{port}/postgres")
    }

    /// Connection settings in key=value form that reach the unix socket.
    pub fn socket_conninfo(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.dir.display(),
            self.port
        )
    }

    /// The server log so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    fn server_cmd(&self, prog: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(prog));
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        cmd.current_dir(&self.dir);
        cmd
    }

    fn run_as_server(&self, prog: &str, args: &[&str], paths: &[PathBuf]) {
        let out = self
            .server_cmd(prog)
            .args(args)
            .args(paths)
            .output()
            .unwrap_or_else(|e| panic!("run {prog}: {e}"));
        assert!(
            out.status.success(),
            "{prog} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn pg_ctl_start(&self) -> bool {
        self.server_cmd("pg_ctl")
            .args(["-w", "-t", "30", "-D"])
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(["-o", &format!("-p {}", self.port), "start"])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Restarts the server (a fast shutdown: every session is ended, every
    /// advisory lock dropped), on the same port.
    pub fn restart(&self) {
        self.restart_with("fast");
    }

    /// Restarts the server after an immediate shutdown: the server stops
    /// as in a crash (no shutdown checkpoint) and recovers from its WAL.
    pub fn crash_restart(&self) {
        self.restart_with("immediate");
    }

    fn restart_with(&self, mode: &str) {
        let ok = self
            .server_cmd("pg_ctl")
            .args(["-w", "-t", "30", "-m", mode, "-D"])
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(["-o", &format!("-p {}", self.port), "restart"])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "pg_ctl restart failed; log: {}", self.log());
    }

    /// Runs `sql` with psql over the unix socket; returns its unaligned,
    /// tuples-only output (trimmed). Panics on failure.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-c", sql])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Starts the watchdog that stops the server and removes the directory
    /// once this process is gone (it reads EOF on its stdin).
    fn arm_watchdog(&mut self) {
        let script = r#"read _ignored
pidfile="$1/data/postmaster.pid"
if [ -f "$pidfile" ]; then
  pid=$(head -n 1 "$pidfile")
  kill -QUIT "$pid" 2>/dev/null
  i=0
  while kill -0 "$pid" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
  kill -KILL "$pid" 2>/dev/null
fi
rm -rf "$1""#;
        let child = Command::new("/bin/sh")
            .args(["-c", script, "watchdog"])
            .arg(&self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("spawn cluster watchdog");
        self.watchdog = Some(child);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut w) = self.watchdog.take() {
            drop(w.stdin.take());
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end {
                if let Ok(Some(_)) = w.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

/// This process (every thread) and some server backends pinned to one CPU,
/// for a side-by-side measurement of round trips: otherwise each backend
/// (and, through the scheduler's wake-ups, the client while it talks to
/// it) settles on a CPU of its own choosing, and on a shared machine one
/// CPU can be twice as slow as the other for a whole run, which then
/// tilts the comparison of two connections by up to 2x either way. Undone
/// on drop. `None` if `taskset` (util-linux) is missing or refused.
pub struct Pinned {
    allowed: String,
    pids: Vec<String>,
    pub cpu: u32,
}

pub fn pin_together(backends: &[i32]) -> Option<Pinned> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let allowed = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?
        .trim()
        .to_string();
    let cpu = allowed
        .split(',')
        .filter_map(|r| r.rsplit('-').next()?.parse::<u32>().ok())
        .max()?;
    let mut pids: Vec<String> = backends.iter().map(|p| p.to_string()).collect();
    pids.push(std::process::id().to_string());
    let pinned = Pinned { allowed, pids, cpu };
    for p in &pinned.pids {
        taskset(&cpu.to_string(), p).then_some(())?;
    }
    Some(pinned)
}

fn taskset(cpus: &str, pid: &str) -> bool {
    Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, pid])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

impl Drop for Pinned {
    fn drop(&mut self) {
        for p in &self.pids {
            // A backend may be gone by now.
            let _ = taskset(&self.allowed, p);
        }
    }
}
