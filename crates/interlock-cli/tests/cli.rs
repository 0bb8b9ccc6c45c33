//! The real `interlock` binary, run as a user would, each test in its own
//! temporary directory. Holders are real processes that announce on stdout
//! that they hold the lock and then wait for their stdin to close, so no
//! test depends on timing.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_interlock");
const WAIT: Duration = Duration::from_secs(30);

fn interlock(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run interlock")
}

fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a usage-style failure: the exit code, exactly one line on
/// stderr, mentioning `needle`, and no panic or backtrace.
fn assert_fails(o: &Output, code: i32, needle: &str) {
    let err = stderr_of(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "want one line: {err:?}");
    assert!(err.contains(needle), "{needle:?} not in {err:?}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
}

/// A process that holds a lock until dropped (its stdin is closed). Its
/// stderr is kept, and shown only if the test fails, so that messages a
/// test expects (a lost lease) do not read like failures in the output.
struct Holder {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Holder {
    /// Starts `program args...`, which must print `held` once it holds the
    /// lock and then wait for stdin to close; returns once `held` is read.
    fn start(program: &str, args: &[&str]) -> Holder {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn holder");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (err_pipe, kept) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(err_pipe).lines().map_while(Result::ok) {
                let mut k = kept.lock().unwrap();
                k.push_str(&line);
                k.push('\n');
            }
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut h = Holder {
            child,
            stdin,
            lines: rx,
            stderr,
        };
        h.expect_line("held");
        h
    }

    fn expect_line(&mut self, want: &str) {
        let line = self.lines.recv_timeout(WAIT).expect("holder said nothing");
        assert_eq!(line, want);
    }

    /// An `interlock run` holder of `path` with extra `flags`.
    fn interlock(flags: &[&str], path: &Path) -> Holder {
        let mut args = vec!["run"];
        args.extend_from_slice(flags);
        let p = path.to_str().unwrap();
        args.extend_from_slice(&[p, "--", "sh", "-c", "echo held; read x; exit 0"]);
        Holder::start(BIN, &args)
    }

    fn release(mut self) -> i32 {
        drop(self.stdin.take());
        let end = Instant::now() + WAIT;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            assert!(Instant::now() < end, "holder did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let err = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
            eprintln!("holder's stderr:\n{err}");
        }
    }
}

#[test]
fn bad_usage_is_one_line_and_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("l");
    let p = p.to_str().unwrap();
    assert_fails(
        &interlock(&["run", "--bogus", p, "--", "true"]),
        64,
        "--bogus",
    );
    assert_fails(&interlock(&["run", p]), 64, "COMMAND");
    assert_fails(
        &interlock(&["run", "-s", "-x", p, "--", "true"]),
        64,
        "cannot be used",
    );
    assert_fails(&interlock(&["run", "-w", "-1", p, "--", "true"]), 64, "-1");
    assert_fails(
        &interlock(&["run", "-w", "soon", p, "--", "true"]),
        64,
        "soon",
    );
    assert_fails(
        &interlock(&["run", "-n", "-w", "1", p, "--", "true"]),
        64,
        "cannot be used",
    );
    assert_fails(
        &interlock(&["run", "--kind", "set", "--range", "7..3", p, "--", "true"]),
        64,
        "empty",
    );
    assert_fails(
        &interlock(&["run", "--kind", "set", "--range", "x", p, "--", "true"]),
        64,
        "range",
    );
    assert_fails(
        &interlock(&["run", "--kind", "set", p, "--", "true"]),
        64,
        "--range",
    );
    assert_fails(
        &interlock(&["run", "--range", "1..2", p, "--", "true"]),
        64,
        "--kind set",
    );
    assert_fails(
        &interlock(&["run", "--kind", "nope", p, "--", "true"]),
        64,
        "nope",
    );
    assert_fails(
        &interlock(&["run", "-E", "300", p, "--", "true"]),
        64,
        "300",
    );
    assert_fails(&interlock(&["frobnicate"]), 64, "frobnicate");
    assert_fails(&interlock(&["status"]), 64, "PATH");
}

#[test]
fn unusable_paths_are_typed_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no/such/dir/l");
    let o = interlock(&["run", missing.to_str().unwrap(), "--", "true"]);
    assert_fails(&o, 66, missing.to_str().unwrap());

    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let o = interlock(&["run", sub.to_str().unwrap(), "--", "true"]);
    assert_fails(&o, 65, "directory");

    let link = dir.path().join("link");
    std::os::unix::fs::symlink(dir.path().join("target"), &link).unwrap();
    let o = interlock(&["run", link.to_str().unwrap(), "--", "true"]);
    assert_fails(&o, 65, "symbolic link");
    assert!(!dir.path().join("target").exists(), "followed the symlink");
}

#[test]
fn runs_the_command_and_passes_its_status() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("l");
    let p = p.to_str().unwrap();
    assert_eq!(interlock(&["run", p, "--", "true"]).status.code(), Some(0));
    assert_eq!(
        interlock(&["run", p, "--", "sh", "-c", "exit 3"])
            .status
            .code(),
        Some(3)
    );
    let o = interlock(&["run", p, "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(o.status.code(), Some(128 + 15));
    let o = interlock(&["run", p, "--", "/no/such/program"]);
    assert_eq!(o.status.code(), Some(127), "{}", stderr_of(&o));
    let o = interlock(&["run", p, "--", dir.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(126), "{}", stderr_of(&o));
    let o = interlock(&["run", "-s", p, "--", "sh", "-c", "echo out"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "out\n");
}

#[test]
fn held_lock_fails_fast_with_conflict_code() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l");
    let p = path.to_str().unwrap();
    let holder = Holder::interlock(&[], &path);
    let o = interlock(&["run", "-n", p, "--", "true"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    let o = interlock(&["run", "-n", "-E", "9", p, "--", "true"]);
    assert_eq!(o.status.code(), Some(9));
    let o = interlock(&["run", "-n", "-q", p, "--", "true"]);
    assert_eq!((o.status.code(), stderr_of(&o).as_str()), (Some(1), ""));
    let o = interlock(&["run", "-n", "-s", p, "--", "true"]);
    assert_eq!(o.status.code(), Some(1), "a shared lock is refused too");
    let start = Instant::now();
    let o = interlock(&["run", "-w", "0.2", p, "--", "true"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(start.elapsed() >= Duration::from_millis(200));
    assert_eq!(holder.release(), 0);
    assert_eq!(
        interlock(&["run", "-n", p, "--", "true"]).status.code(),
        Some(0)
    );
}

#[test]
fn shared_holders_coexist() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l");
    let p = path.to_str().unwrap();
    let holder = Holder::interlock(&["-s"], &path);
    assert_eq!(
        interlock(&["run", "-n", "-s", p, "--", "true"])
            .status
            .code(),
        Some(0)
    );
    assert_eq!(
        interlock(&["run", "-n", p, "--", "true"]).status.code(),
        Some(1)
    );
    holder.release();
}

#[test]
fn waiting_is_announced_once_with_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l");
    let p = path.to_str().unwrap();
    let holder = Holder::interlock(&[], &path);
    let o = interlock(&["run", "-w", "0.1", p, "--", "true"]);
    let err = stderr_of(&o);
    let waiting: Vec<_> = err
        .lines()
        .filter(|l| l.starts_with("interlock: waiting"))
        .collect();
    assert_eq!(waiting.len(), 1, "{err}");
    assert!(
        err.contains(&holder.child.id().to_string()) || err.contains("pid"),
        "{err}"
    );
    holder.release();
}

#[test]
fn flock_kind_excludes_flock1_and_file_kind_excludes_lockf() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l");
    let p = path.to_str().unwrap();
    let h = Holder::start("flock", &[p, "-c", "echo held; read x; exit 0"]);
    assert_eq!(
        interlock(&["run", "-n", "--kind", "flock", p, "--", "true"])
            .status
            .code(),
        Some(1)
    );
    h.release();
    assert_eq!(
        interlock(&["run", "-n", "--kind", "flock", p, "--", "true"])
            .status
            .code(),
        Some(0)
    );

    let script = format!(
        "import fcntl,sys\nf=open({p:?},'a')\nfcntl.lockf(f,fcntl.LOCK_EX)\nprint('held',flush=True)\nsys.stdin.read()"
    );
    let h = Holder::start("python3", &["-c", &script]);
    assert_eq!(
        interlock(&["run", "-n", p, "--", "true"]).status.code(),
        Some(1)
    );
    h.release();
    assert_eq!(
        interlock(&["run", "-n", p, "--", "true"]).status.code(),
        Some(0)
    );
}

#[test]
fn set_kind_locks_only_its_range() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("set");
    let p = path.to_str().unwrap();
    let holder = Holder::interlock(&["--kind", "set", "--range", "3..7"], &path);
    let run = |r: &str| interlock(&["run", "-n", "--kind", "set", "--range", r, p, "--", "true"]);
    assert_eq!(run("6..=6").status.code(), Some(1));
    assert_eq!(run("0..3").status.code(), Some(0));
    assert_eq!(run("7..100").status.code(), Some(0));
    holder.release();
    assert_eq!(run("6").status.code(), Some(0));
}

#[test]
fn status_lists_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l");
    let p = path.to_str().unwrap();
    let holder = Holder::interlock(&["-s"], &path);
    let o = interlock(&["status", p]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(0), "{}", stderr_of(&o));
    assert!(out.contains("shared"), "{out}");
    assert!(out.contains("pid"), "{out}");
    holder.release();
    let o = interlock(&["status", dir.path().join("missing").to_str().unwrap()]);
    assert_fails(&o, 66, "missing");
}

#[test]
fn sigterm_is_passed_to_the_command_and_the_lock_held_until_it_exits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l");
    let p = path.to_str().unwrap();
    // The command survives TERM, says it got it, and exits when stdin closes.
    let script = "import signal,sys\n\
        signal.signal(signal.SIGTERM, lambda *a: print('got-term', flush=True))\n\
        print('held', flush=True)\n\
        sys.stdin.read()";
    let mut holder = Holder::start(BIN, &["run", p, "--", "python3", "-c", script]);
    let st = Command::new("kill")
        .args(["-TERM", &holder.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    // interlock passed TERM on and is still alive, holding the lock.
    holder.expect_line("got-term");
    assert_eq!(
        interlock(&["run", "-n", p, "--", "true"]).status.code(),
        Some(1),
        "lock held"
    );
    assert!(holder.child.try_wait().unwrap().is_none());
    let _ = holder.stdin.as_mut().unwrap().write_all(b"bye\n");
    assert_eq!(holder.release(), 0);
}

#[test]
fn lease_kind_exports_increasing_tokens_and_excludes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job");
    let p = path.to_str().unwrap();
    let token = || {
        let o = interlock(&[
            "run",
            "--kind",
            "lease",
            "--ttl",
            "5",
            p,
            "--",
            "sh",
            "-c",
            "echo $INTERLOCK_TOKEN",
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr_of(&o));
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse::<u64>()
            .expect("a token")
    };
    let (a, b) = (token(), token());
    assert!(b > a, "{a} then {b}");
    let holder = Holder::interlock(&["--kind", "lease", "--ttl", "5"], &path);
    let o = interlock(&["run", "-n", "--kind", "lease", p, "--", "true"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr_of(&o));
    let o = interlock(&["run", "-w", "0.1", "--kind", "lease", p, "--", "true"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr_of(&o).contains(&format!("pid {}", holder.child.id())),
        "{}",
        stderr_of(&o)
    );
    let o = interlock(&["status", p]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.contains(&format!("pid {}", holder.child.id())), "{out}");
    assert_eq!(holder.release(), 0);
    let o = interlock(&["status", p]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("no lease held"));
    assert!(token() > b);
    assert_fails(
        &interlock(&["run", "-s", "--kind", "lease", p, "--", "true"]),
        64,
        "exclusive",
    );
    assert_fails(
        &interlock(&["run", "--ttl", "1", p, "--", "true"]),
        64,
        "--ttl",
    );
}

#[test]
fn lost_lease_stops_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job");
    let p = path.to_str().unwrap();
    // A holder with a short lease that we freeze past its expiry.
    let mut holder = Holder::interlock(&["--kind", "lease", "--ttl", "0.3"], &path);
    let pid = holder.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    // Another run takes the lease over once it expired (plus the 1 s
    // clock-skew allowance), with a larger token.
    let o = interlock(&["run", "-w", "20", "-q", "--kind", "lease", p, "--", "true"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr_of(&o));
    // Resumed, the first holder learns it lost the lease and stops its command.
    assert!(Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    let end = Instant::now() + WAIT;
    let status = loop {
        if let Some(st) = holder.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < end,
            "holder kept running without its lease"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(128 + 15), "the command was terminated");
}

#[test]
fn shm_kind_excludes_and_reports_a_dead_exclusive_holder() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shm-lock");
    let p = path.to_str().unwrap();
    let run = |extra: &[&str], cmd: &str| {
        let mut args = vec!["run", "--kind", "shm"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[p, "--", "sh", "-c", cmd]);
        interlock(&args)
    };
    assert_eq!(run(&[], "true").status.code(), Some(0));

    let holder = Holder::interlock(&["--kind", "shm", "-s"], &path);
    assert_eq!(
        run(&["-n", "-s"], "true").status.code(),
        Some(0),
        "readers share"
    );
    assert_eq!(run(&["-n"], "true").status.code(), Some(1));
    assert_eq!(holder.release(), 0);

    let mut holder = Holder::interlock(&["--kind", "shm"], &path);
    let o = run(&["-w", "0.1"], "true");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr_of(&o).contains(&format!("pid {}", holder.child.id())),
        "{}",
        stderr_of(&o)
    );
    // The exclusive holder dies holding the lock.
    holder.child.kill().unwrap();
    holder.child.wait().unwrap();
    let o = run(&["-w", "10"], "echo died=$INTERLOCK_OWNER_DIED");
    assert_eq!(o.status.code(), Some(0), "{}", stderr_of(&o));
    assert!(
        stderr_of(&o).contains("died holding it"),
        "{}",
        stderr_of(&o)
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout), "died=1\n");
    // That run succeeded exclusively, so the poison is cleared.
    let o = run(&["-n"], "echo died=$INTERLOCK_OWNER_DIED");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "died=\n",
        "{}",
        stderr_of(&o)
    );
    assert_eq!(stderr_of(&o), "");
}

/// Whether process `pid` is gone (no such process, or a zombie).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => matches!(
            s[s.rfind(')').unwrap() + 1..]
                .split_ascii_whitespace()
                .next(),
            Some("Z") | Some("X")
        ),
    }
}

/// For every kind and every default-fatal signal interlock does not handle
/// (SIGKILL included), interlock's death never leaves COMMAND running
/// without the lock: a kernel lock stays held by COMMAND until it exits
/// (as with flock(1)); a shared-memory lock or lease ends COMMAND with it.
#[test]
fn the_lock_is_held_exactly_as_long_as_the_command_runs() {
    let dir = tempfile::tempdir().unwrap();
    let kinds: [(&str, &[&str]); 5] = [
        ("file", &[]),
        ("flock", &["--kind", "flock"]),
        ("set", &["--kind", "set", "--range", "0..4"]),
        ("shm", &["--kind", "shm"]),
        ("lease", &["--kind", "lease", "--ttl", "30"]),
    ];
    let signals = [
        "KILL", "USR1", "USR2", "ALRM", "VTALRM", "PROF", "IO", "PWR", "STKFLT", "SYS", "XCPU",
    ];
    for (kind, flags) in kinds {
        let path = dir.path().join(kind);
        let p = path.to_str().unwrap();
        let try_now = || {
            let mut args = vec!["run", "-n", "-q"];
            args.extend_from_slice(flags);
            args.extend_from_slice(&[p, "--", "true"]);
            interlock(&args).status.code()
        };
        for sig in signals {
            let mut args = vec!["run", "-q"];
            args.extend_from_slice(flags);
            args.extend_from_slice(&[p, "--", "sh", "-c", "echo held $$; read x"]);
            let mut child = Command::new(BIN)
                .args(&args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut stdin = child.stdin.take();
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            let cmd_pid: u32 = line.trim().strip_prefix("held ").unwrap().parse().unwrap();
            let st = Command::new("kill")
                .args([&format!("-{sig}"), &child.id().to_string()])
                .status()
                .unwrap();
            assert!(st.success());
            let st = child.wait().unwrap();
            assert!(
                st.code().is_none(),
                "{kind}/{sig}: interlock survived: {st:?}"
            );
            let end = Instant::now() + WAIT;
            if matches!(kind, "shm" | "lease") {
                // COMMAND dies with interlock...
                while !gone(cmd_pid) {
                    assert!(
                        Instant::now() < end,
                        "{kind}/{sig}: command outlived the lock"
                    );
                    std::thread::sleep(Duration::from_millis(2));
                }
            } else {
                // ... or holds the lock itself while it runs.
                assert!(!gone(cmd_pid), "{kind}/{sig}");
                assert_eq!(
                    try_now(),
                    Some(1),
                    "{kind}/{sig}: lock released under COMMAND"
                );
                drop(stdin.take());
                while !gone(cmd_pid) {
                    assert!(Instant::now() < end, "{kind}/{sig}: command kept running");
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            assert_eq!(try_now(), Some(0), "{kind}/{sig}: lock not free afterwards");
        }
    }
}

/// Unwritable stdout or stderr is no panic (101): the documented codes stay.
#[test]
fn unwritable_output_is_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l");
    let p = path.to_str().unwrap();
    let holder = Holder::interlock(&[], &path);
    let full = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    let o = Command::new(BIN)
        .args(["run", "-n", p, "--", "true"])
        .stderr(full())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let o = Command::new(BIN)
        .args(["status", p])
        .stdout(full())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(71), "{}", stderr_of(&o));
    assert!(!stderr_of(&o).contains("panicked"), "{}", stderr_of(&o));
    // A closed pipe (`| head -c0`).
    let mut c = Command::new(BIN)
        .args(["status", p])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(c.stdout.take());
    let o = c.wait_with_output().unwrap();
    assert_ne!(o.status.code(), Some(101), "{}", stderr_of(&o));
    assert!(!stderr_of(&o).contains("panicked"), "{}", stderr_of(&o));
    let o = Command::new(BIN)
        .args(["frobnicate"])
        .stderr(full())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(64));
    holder.release();
}

/// `status` shows shared-memory holders (pid, command, mode, poisoned),
/// by path and by bare name, and creates nothing.
#[test]
fn status_shows_shm_holders() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shm-lock");
    let p = path.to_str().unwrap();
    let holder = Holder::interlock(&["--kind", "shm", "-s"], &path);
    let o = interlock(&["status", p]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(0), "{}", stderr_of(&o));
    assert!(
        out.contains(&format!("pid {} (interlock) shared", holder.child.id())),
        "{out}"
    );
    holder.release();
    let mut holder = Holder::interlock(&["--kind", "shm"], &path);
    let out = String::from_utf8_lossy(&interlock(&["status", p]).stdout).into_owned();
    assert!(
        out.contains(&format!("pid {} (interlock) exclusive", holder.child.id())),
        "{out}"
    );
    holder.child.kill().unwrap();
    holder.child.wait().unwrap();
    let out = String::from_utf8_lossy(&interlock(&["status", p]).stdout).into_owned();
    assert!(out.contains("poisoned"), "{out}");

    let name = format!("cli-status-{}", std::process::id());
    let shm_file = std::path::PathBuf::from(format!("/dev/shm/interlock-{name}"));
    let o = interlock(&["status", &name]);
    assert_ne!(o.status.code(), Some(0), "a missing bare name is no lock");
    assert!(!shm_file.exists(), "status created the lock");
    let holder = Holder::interlock(&["--kind", "shm"], Path::new(&name));
    let o = Command::new(BIN)
        .args(["status", &name])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        out.contains(&format!("pid {} (interlock) exclusive", holder.child.id())),
        "{out}"
    );
    holder.release();
    let _ = std::fs::remove_file(&shm_file);
}

/// Every path below `dir` with its size and modification time, sorted: what
/// a command that writes nothing leaves as it was.
fn tree(dir: &Path) -> Vec<(std::path::PathBuf, u64, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                todo.push(e.path());
            }
            out.push((e.path(), m.len(), m.modified().unwrap()));
        }
    }
    out.sort();
    out
}

/// `status` on a lease writes nothing; `run --kind lease` never takes over
/// (or deletes) a directory it did not make, and leaves nothing beside a
/// file; run and status agree on a symbolic link.
#[test]
fn lease_inspection_writes_nothing_and_foreign_directories_are_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job");
    let p = path.to_str().unwrap();
    let holder = Holder::interlock(&["--kind", "lease", "--ttl", "30"], &path);
    let lease_dir = path.with_file_name("job.lease");
    let before = tree(&lease_dir);
    let o = interlock(&["status", p]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("exclusive lease"),
        "{}",
        stderr_of(&o)
    );
    assert_eq!(tree(&lease_dir), before, "status wrote");
    holder.release();

    let mine = dir.path().join("d");
    std::fs::create_dir(&mine).unwrap();
    let o = interlock(&[
        "run",
        "--kind",
        "lease",
        mine.to_str().unwrap(),
        "--",
        "true",
    ]);
    assert_fails(&o, 65, "did not make");
    assert!(mine.is_dir(), "the user's directory was removed");
    assert!(!dir.path().join("d.lease").exists());

    let file = dir.path().join("f");
    std::fs::write(&file, b"data").unwrap();
    let o = interlock(&[
        "run",
        "--kind",
        "lease",
        file.to_str().unwrap(),
        "--",
        "true",
    ]);
    assert_eq!(o.status.code(), Some(65), "{}", stderr_of(&o));
    assert!(!dir.path().join("f.lease").exists());

    let link = dir.path().join("lnk");
    std::os::unix::fs::symlink(&mine, &link).unwrap();
    std::fs::create_dir(dir.path().join("lnk.lease")).unwrap();
    let l = link.to_str().unwrap();
    let o = interlock(&["run", "--kind", "lease", l, "--", "true"]);
    assert_eq!(o.status.code(), Some(65), "{}", stderr_of(&o));
    assert_eq!(interlock(&["status", l]).status.code(), Some(65));
}

/// Text from other processes (a command name, a lease record's host) is
/// printed escaped, never as terminal control sequences.
#[test]
fn untrusted_text_is_printed_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l");
    let p = path.to_str().unwrap();
    let script = format!(
        "import fcntl,sys\nopen('/proc/self/comm','w').write('\\x1b[2Jevil')\nf=open({p:?},'a')\nfcntl.lockf(f,fcntl.LOCK_EX)\nprint('held',flush=True)\nsys.stdin.read()"
    );
    let h = Holder::start("python3", &["-c", &script]);
    let o = interlock(&["status", p]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.contains("evil") && !out.contains('\x1b'), "{out:?}");
    let o = interlock(&["run", "-w", "0.05", "--kind", "file", p, "--", "true"]);
    let err = stderr_of(&o);
    assert!(!err.contains('\x1b'), "{err:?}");
    h.release();

    let job = dir.path().join("job");
    let j = job.to_str().unwrap();
    let holder = Holder::interlock(&["--kind", "lease", "--ttl", "30"], &job);
    let lease = std::fs::read_dir(&job)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let text = std::fs::read_to_string(&lease).unwrap();
    let forged: String = text
        .lines()
        .map(|l| {
            if l.starts_with("host ") {
                "host \x1b]0;owned\x07h".to_string()
            } else {
                l.to_string()
            }
        })
        .map(|l| l + "\n")
        .collect();
    std::fs::write(&lease, forged).unwrap();
    let out = String::from_utf8_lossy(&interlock(&["status", j]).stdout).into_owned();
    assert!(
        out.contains("on host ") && !out.contains('\x1b') && !out.contains('\x07'),
        "{out:?}"
    );
    let o = interlock(&["run", "-w", "0.05", "--kind", "lease", j, "--", "true"]);
    let err = stderr_of(&o);
    assert!(err.contains("on host ") && !err.contains('\x1b'), "{err:?}");
    holder.release();
}

/// The messages of issue 10, item 12, and of sockets and /proc (item 11).
#[test]
fn messages_name_the_real_problem() {
    let dir = tempfile::tempdir().unwrap();
    let o = interlock(&[]);
    assert_fails(&o, 64, "subcommand");
    let missing = format!("{}/", dir.path().join("missing").display());
    assert_fails(&interlock(&["run", &missing, "--", "true"]), 64, "slash");
    let sock = dir.path().join("sock");
    let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    assert_fails(
        &interlock(&["run", sock.to_str().unwrap(), "--", "true"]),
        65,
        "socket",
    );
    if Path::new("/proc/self/status").exists() {
        assert_fails(
            &interlock(&["run", "/proc/self/status", "--", "true"]),
            69,
            "proc",
        );
    }
    let set = dir.path().join("set");
    let s = set.to_str().unwrap();
    let run = |r: &str| interlock(&["run", "--kind", "set", "--range", r, s, "--", "true"]);
    assert_eq!(run("9223372036854775806").status.code(), Some(0));
    assert_fails(&run("9223372036854775807"), 64, "2^63-2");
    assert_fails(&run("5..=3"), 64, "`5..=3`");
    assert_fails(&run("5..3"), 64, "`5..3`");

    // A symbolic link that another user planted in a sticky directory
    // (where the kernel refuses to follow it: EACCES) is named as a link.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::process::CommandExt;
    if std::fs::metadata("/proc/self").unwrap().uid() == 0 {
        let sticky = dir.path().join("sticky");
        std::fs::create_dir(&sticky).unwrap();
        std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let link = sticky.join("planted");
        let st = Command::new("ln")
            .arg("-s")
            .arg(dir.path().join("elsewhere"))
            .arg(&link)
            .uid(65534)
            .gid(65534)
            .status()
            .unwrap();
        assert!(st.success());
        let l = link.to_str().unwrap();
        for kind in ["file", "flock", "set"] {
            let mut args = vec!["run", "--kind", kind, l];
            if kind == "set" {
                args.extend(["--range", "0"]);
            }
            args.extend(["--", "true"]);
            assert_fails(&interlock(&args), 65, "symbolic link");
        }
        assert!(!dir.path().join("elsewhere").exists());
    }
}

/// A user who may only read the lock file takes it shared (both kinds), as
/// flock(1) and fcntl read locks allow, and exclusive with `flock` (as
/// flock(1) can); the exclusive fcntl lock needs write permission (77).
#[test]
fn a_read_only_lock_file_can_be_locked_shared_and_flock_exclusive() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::process::CommandExt;
    if std::fs::metadata("/proc/self").unwrap().uid() != 0 {
        eprintln!("skipped: acting as another user needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.path().join("interlock");
    std::fs::copy(BIN, &bin).unwrap();
    let lock = dir.path().join("ro.lock");
    std::fs::write(&lock, b"").unwrap();
    std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o644)).unwrap();
    let as_nobody = |args: &[&str]| {
        let mut cmd = Command::new(&bin);
        cmd.args(args).uid(65534).gid(65534).stdin(Stdio::null());
        // ETXTBSY: another test's fork may briefly hold the copy open.
        let mut tries = 0;
        loop {
            match cmd.output() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                r => break r.unwrap(),
            }
        }
    };
    // A file of root's that nobody may read, and one of nobody's own that
    // it made read-only (chmod 0444): the exclusive flock works on both, as
    // flock(1) does; the exclusive fcntl lock needs write access (77).
    let own = dir.path().join("own.lock");
    std::fs::write(&own, b"").unwrap();
    std::os::unix::fs::chown(&own, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o444)).unwrap();
    for lock in [&lock, &own] {
        let l = lock.to_str().unwrap();
        for kind in ["file", "flock"] {
            let o = as_nobody(&["run", "-s", "--kind", kind, l, "--", "true"]);
            assert_eq!(o.status.code(), Some(0), "{kind}: {}", stderr_of(&o));
        }
        let o = as_nobody(&["run", "--kind", "flock", l, "--", "true"]);
        assert_eq!(o.status.code(), Some(0), "{l}: {}", stderr_of(&o));
        let o = as_nobody(&["run", "--kind", "file", l, "--", "true"]);
        assert_eq!(o.status.code(), Some(77), "{l}: {}", stderr_of(&o));
        assert!(stderr_of(&o).contains("read-only"), "{}", stderr_of(&o));

        // The locks are real. Shared: keeps a writer out, lets a reader
        // in. Exclusive: keeps both out, and so does it to flock(1). Once
        // the holder is gone, the same requests succeed (the control).
        for (mode, reader_in) in [("-s", true), ("-x", false)] {
            let script = format!(
                "exec {} run {mode} --kind flock {l} -- sh -c 'echo held; read x'",
                bin.display()
            );
            let mut h = Command::new("sh")
                .args(["-c", &script])
                .uid(65534)
                .gid(65534)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut line = String::new();
            BufReader::new(h.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            assert_eq!(line.trim(), "held", "{mode}");
            let try_now = |args: &[&str]| {
                let mut a = vec!["run", "-n", "--kind", "flock"];
                a.extend_from_slice(args);
                a.extend([l, "--", "true"]);
                interlock(&a).status.code()
            };
            assert_eq!(try_now(&[]), Some(1), "{mode}: a writer got in");
            let reader = try_now(&["-s"]);
            assert_eq!(reader, Some(if reader_in { 0 } else { 1 }), "{mode}");
            let flock1 = Command::new("flock").args(["-n", "-x", l, "true"]).status();
            if let Ok(st) = flock1 {
                assert!(!st.success(), "{mode}: flock(1) got in");
            }
            drop(h.stdin.take());
            h.wait().unwrap();
            assert_eq!(try_now(&[]), Some(0), "{mode}: control");
            assert_eq!(try_now(&["-s"]), Some(0), "{mode}: control");
        }
    }
    assert_eq!(std::fs::metadata(&lock).unwrap().uid(), 0);
}

#[test]
fn sem_kinds_run_the_command_under_a_permit_and_status_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    for kind in ["sem", "file-sem"] {
        let p = dir.path().join(kind);
        let ps = p.to_str().unwrap();
        let o = interlock(&["run", "--kind", kind, "--permits", "2", ps, "--", "true"]);
        assert!(o.status.success(), "{kind}: {}", stderr_of(&o));
        // Both permits taken: a second run with -n is refused.
        let o = interlock(&[
            "run",
            "--kind",
            kind,
            "--permits",
            "2",
            "--take",
            "2",
            ps,
            "--",
            "sh",
            "-c",
            &format!("{BIN} run -n --kind {kind} --permits 2 {ps} -- true; echo $?"),
        ]);
        assert!(o.status.success(), "{kind}: {}", stderr_of(&o));
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "1", "{kind}");
        let o = interlock(&["run", "--kind", kind, ps, "--", "true"]);
        assert_fails(&o, 64, "--permits");
    }
    let p = dir.path().join("sem");
    let o = interlock(&["status", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("2 of 2 permits free"));
}

/// A shared-memory lock file that is shorter than its layout is a typed
/// error (65), whatever its size, and one truncated while interlock has it
/// mapped ends interlock with 71 and a message, not SIGBUS (135).
#[test]
fn a_truncated_shm_lock_is_an_error_not_a_signal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shm.lock");
    let p = path.to_str().unwrap();
    let o = interlock(&["run", "--kind", "shm", p, "--", "true"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr_of(&o));
    let good = std::fs::read(&path).unwrap();
    let full = good.len();
    for len in [1, 60, 200, 4096, full - 128, full + 4096] {
        let mut bytes = good.clone();
        bytes.resize(len, 0);
        std::fs::write(&path, &bytes).unwrap();
        let o = interlock(&["run", "--kind", "shm", p, "--", "true"]);
        assert_fails(&o, 65, "bytes");
        let o = interlock(&["status", "--kind", "shm", p]);
        assert_fails(&o, 65, "bytes");
    }
    std::fs::remove_file(&path).unwrap();
    // Truncated by the command while interlock holds it (the same user may
    // do that; see docs/threat-model.md): the release touches the mapping.
    for mode in [&["-s"][..], &[][..]] {
        let mut args = vec!["run", "--kind", "shm"];
        args.extend_from_slice(mode);
        args.extend([p, "--", "truncate", "-s", "0", p]);
        let o = interlock(&args);
        assert_fails(&o, 71, "truncated while in use");
        std::fs::remove_file(&path).unwrap();
    }
}
