//! `interlock run --kind pg` and `interlock status --kind pg`, the real
//! binary against a throwaway PostgreSQL cluster (shared by these tests).

#[path = "../../interlock/tests/support/pg.rs"]
mod pgsupport;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_interlock");

fn interlock(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args)
        .stdin(Stdio::null())
        .env_remove("INTERLOCK_PG_URL");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run interlock")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn unique(tag: &str) -> String {
    format!("cli-{tag}-{}", std::process::id())
}

/// `interlock run ... NAME -- sh -c SCRIPT`, where SCRIPT prints a line
/// once it runs (under the lock) and then waits for stdin to close.
struct Holder {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Holder {
    fn start(args: &[&str], script: &str) -> Holder {
        let mut child = Command::new(BIN)
            .args(args)
            .args(["--", "sh", "-c", script])
            .env_remove("INTERLOCK_PG_URL")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn interlock");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Holder { child, lines }
    }

    fn line(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(30))
            .expect("a line from the command")
    }

    /// Closes the command's stdin and returns interlock's exit code and stderr.
    fn finish(mut self) -> (Option<i32>, String) {
        drop(self.child.stdin.take());
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let st = self.child.wait().expect("wait interlock");
        (st.code(), err)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn pg_kind_excludes_exports_increasing_tokens_and_shows_status() {
    let Some(pg) = pgsupport::shared() else {
        return;
    };
    let url = pg.url();
    let name = unique("run");
    let h = Holder::start(
        &["run", "--kind", "pg", "--url", &url, &name],
        "echo held $INTERLOCK_TOKEN; read _x || true",
    );
    let t1: u64 = h.line().strip_prefix("held ").unwrap().parse().unwrap();
    let o = interlock(
        &[
            "run", "-n", "--kind", "pg", "--url", &url, &name, "--", "true",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("is locked"), "{}", text(&o.stderr));
    // The URL from the environment; a bounded wait that gives up.
    let o = interlock(
        &["run", "-w", "0.2", "--kind", "pg", &name, "--", "true"],
        &[("INTERLOCK_PG_URL", &url)],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(err.contains("waiting for exclusive lock on pg:"), "{err}");
    assert!(err.contains("held by backend pid"), "{err}");
    assert!(err.contains("gave up waiting"), "{err}");
    let o = interlock(&["status", "--kind", "pg", "--url", &url, &name], &[]);
    assert_eq!(o.status.code(), Some(0));
    let out = text(&o.stdout);
    assert!(out.contains("exclusive pg held on"), "{out}");
    assert!(out.contains(&format!("last token {t1}")), "{out}");
    let (code, err) = h.finish();
    assert_eq!(code, Some(0), "{err}");
    // Shared holders coexist; the next token is larger.
    let r = Holder::start(
        &["run", "-s", "--kind", "pg", "--url", &url, &name],
        "echo held $INTERLOCK_TOKEN; read _x || true",
    );
    let t2: u64 = r.line().strip_prefix("held ").unwrap().parse().unwrap();
    assert!(t2 > t1);
    let o = interlock(
        &[
            "run",
            "-s",
            "-n",
            "--kind",
            "pg",
            "--url",
            &url,
            &name,
            "--",
            "sh",
            "-c",
            "echo $INTERLOCK_TOKEN",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(text(&o.stdout).trim().parse::<u64>().unwrap() > t2);
    r.finish();
    let o = interlock(&["status", "--kind", "pg", "--url", &url, &name], &[]);
    assert!(text(&o.stdout).contains("no locks"), "{}", text(&o.stdout));
}

#[test]
fn lost_pg_lock_stops_the_command() {
    let Some(pg) = pgsupport::shared() else {
        return;
    };
    let url = pg.url();
    let name = unique("lost");
    let h = Holder::start(
        &["run", "--kind", "pg", "--ttl", "1", "--url", &url, &name],
        "trap 'echo term; exit 0' TERM; echo held; while :; do sleep 0.05; done",
    );
    assert_eq!(h.line(), "held");
    let o = interlock(&["status", "--kind", "pg", "--url", &url, &name], &[]);
    let out = text(&o.stdout);
    let pid: i32 = out
        .split_whitespace()
        .nth(2)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no backend pid in {out:?}"));
    assert_eq!(pg.psql(&format!("SELECT pg_terminate_backend({pid})")), "t");
    assert_eq!(h.line(), "term");
    let (code, err) = h.finish();
    assert_eq!(code, Some(75), "{err}");
    assert!(err.contains("lost"), "{err}");
}

#[test]
fn pg_usage_and_connection_errors_are_one_line() {
    let Some(_pg) = pgsupport::shared() else {
        return;
    };
    let o = interlock(
        &["run", "--url", "postgres://x@y/z", "p", "--", "true"],
        &[],
    );
    assert_eq!(o.status.code(), Some(64), "{}", text(&o.stderr));
    let o = interlock(&["run", "--kind", "pg", "", "--", "true"], &[]);
    assert_eq!(o.status.code(), Some(64), "{}", text(&o.stderr));
    // Nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let o = interlock(
        &["run", "--kind", "pg", "--url", &url, "n", "--", "true"],
        &[],
    );
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(71), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("connect to PostgreSQL"), "{err}");
}
