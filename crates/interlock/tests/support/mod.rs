//! Multi-process test support: the test binary re-executes itself as the
//! child.
//!
//! A test that needs a child calls [`Child::spawn`] with its own name and a
//! role; the child is this same test binary, run with `--exact NAME`, and the
//! environment variable [`ROLE_ENV`] set. The test function starts with
//! `if let Some(role) = support::role() { ...child code...; return; }`.
//!
//! Parent and child talk over the child's stdin and stdout, one line per
//! message; the child's protocol lines carry the prefix `@@ ` so that the
//! test harness's own output is ignored. Every read is bounded
//! ([`WAIT`] by default), and a [`Child`] is killed and reaped on drop, so a
//! failing test never leaves a process behind or hangs.
#![allow(dead_code)]

pub mod pg;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// The variable that tells a re-executed test binary which role to play.
pub const ROLE_ENV: &str = "INTERLOCK_TEST_ROLE";
/// The variable that carries an argument (a path, a number) to the child.
pub const ARG_ENV: &str = "INTERLOCK_TEST_ARG";
/// The default bound on any wait for a child.
pub const WAIT: Duration = Duration::from_secs(30);

/// The role this process was started with, if it is a child.
pub fn role() -> Option<String> {
    std::env::var(ROLE_ENV).ok()
}

/// The argument this child was started with.
pub fn arg() -> String {
    std::env::var(ARG_ENV).unwrap_or_default()
}

/// In a child: sends one protocol line to the parent.
pub fn say(msg: impl AsRef<str>) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "@@ {}", msg.as_ref()).unwrap();
    out.flush().unwrap();
}

/// In a child: waits for the next line from the parent (`None` at EOF,
/// which means the parent is gone: the child should exit).
pub fn hear() -> Option<String> {
    let mut line = String::new();
    match std::io::stdin().read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(line.trim_end().to_string()),
    }
}

/// A child process running one role of a test.
pub struct Child {
    child: std::process::Child,
    lines: Receiver<String>,
    name: String,
}

impl Child {
    /// Starts this test binary as a child that runs `test` (its full path
    /// within the binary, e.g. `"file_lock_excludes_processes"`) in `role`.
    pub fn spawn(test: &str, role: &str, arg: &str) -> Child {
        Child::spawn_with(test, role, arg, &[])
    }

    /// As [`Child::spawn`], with extra environment variables.
    pub fn spawn_with(test: &str, role: &str, arg: &str, env: &[(&str, &str)]) -> Child {
        let exe = std::env::current_exe().expect("current_exe");
        let mut cmd = Command::new(exe);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Child::spawn_cmd(cmd, test, role, arg).expect("spawn child test process")
    }

    /// As [`Child::spawn`], but as user `uid` (group `uid` too), running
    /// `exe`, a copy of this test binary that the user may execute (the
    /// original may lie under /root). Needs root; the copy is retried on
    /// ETXTBSY (another test's fork may briefly hold it open for writing).
    pub fn spawn_as(exe: &std::path::Path, uid: u32, test: &str, role: &str, arg: &str) -> Child {
        use std::os::unix::process::CommandExt;
        for _ in 0..100 {
            let mut cmd = Command::new(exe);
            cmd.uid(uid).gid(uid);
            match Child::spawn_cmd(cmd, test, role, arg) {
                Ok(c) => return c,
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("spawn {} as uid {uid}: {e}", exe.display()),
            }
        }
        panic!("could not start {} as uid {uid}", exe.display());
    }

    fn spawn_cmd(mut cmd: Command, test: &str, role: &str, arg: &str) -> std::io::Result<Child> {
        cmd.args([test, "--exact", "--nocapture", "--test-threads=1", "-q"])
            .env(ROLE_ENV, role)
            .env(ARG_ENV, arg)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(msg) = line.strip_prefix("@@ ") {
                    if tx.send(msg.to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        Ok(Child {
            child,
            lines,
            name: format!("{test}/{role}"),
        })
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next protocol line, waiting at most `limit`; panics on time-out
    /// or if the child closed its output.
    pub fn recv_within(&mut self, limit: Duration) -> String {
        match self.lines.recv_timeout(limit) {
            Ok(l) => l,
            Err(RecvTimeoutError::Timeout) => {
                panic!("child {} said nothing within {limit:?}", self.name)
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.wait().ok();
                panic!(
                    "child {} exited ({status:?}) before saying anything",
                    self.name
                )
            }
        }
    }

    /// The next protocol line, within [`WAIT`].
    pub fn recv(&mut self) -> String {
        self.recv_within(WAIT)
    }

    /// The next protocol line if one arrives within `limit`, else `None`.
    pub fn try_recv_within(&mut self, limit: Duration) -> Option<String> {
        self.lines.recv_timeout(limit).ok()
    }

    /// Waits for the line `expected`, panicking on anything else.
    pub fn expect(&mut self, expected: &str) {
        let got = self.recv();
        assert_eq!(got, expected, "child {} said {got:?}", self.name);
    }

    /// Sends one line to the child's stdin.
    pub fn send(&mut self, msg: &str) {
        let stdin = self.child.stdin.as_mut().expect("child stdin");
        writeln!(stdin, "{msg}").expect("write to child");
        stdin.flush().expect("flush to child");
    }

    /// Closes the child's stdin (it then reads EOF).
    pub fn close_stdin(&mut self) {
        drop(self.child.stdin.take());
    }

    /// SIGKILLs the child and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the child to exit, at most `limit`; panics past it.
    pub fn wait_within(&mut self, limit: Duration) -> ExitStatus {
        let end = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            assert!(
                Instant::now() < end,
                "child {} still running after {limit:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits for the child to exit successfully, within [`WAIT`].
    pub fn join(&mut self) {
        let st = self.wait_within(WAIT);
        assert!(st.success(), "child {} failed: {st:?}", self.name);
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}
