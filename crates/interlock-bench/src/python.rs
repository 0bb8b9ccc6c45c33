//! The harness's own Python environment, for the Python peers and the plots.
//!
//! Why it is built this way: the Python rows must compare the libraries
//! people actually install, so the harness makes a virtual environment of
//! its own (`.venv-bench/` at the workspace root, gitignored) with
//! `python3 -m venv` and `pip install`, never touching the system Python.
//! Anything that goes wrong here (no python3, no network to PyPI, a library
//! that fails to import) turns into a note in the report and the Python
//! rows or plots are skipped: the Rust measurements never depend on it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::contention::PythonEnv;

/// The libraries the Python peers use, and matplotlib for the plots.
pub const PACKAGES: &[&str] = &[
    "fasteners",
    "filelock",
    "locks",
    "portalocker",
    "prwlock",
    "pylocksfile",
];

/// What is available after [`prepare`].
#[derive(Debug, Default)]
pub struct PySetup {
    /// How to start Python workers, if the interpreter and driver exist.
    pub env: Option<PythonEnv>,
    /// Libraries that import, with their versions.
    pub libs: Vec<(String, String)>,
    /// Whether matplotlib imports (plots).
    pub matplotlib: Option<String>,
    /// Human-readable notes for the report (what was skipped and why).
    pub notes: Vec<String>,
}

impl PySetup {
    /// Whether the Python peer using `lib` can run.
    pub fn has(&self, lib: &str) -> bool {
        self.env.is_some() && self.libs.iter().any(|(l, _)| l == lib)
    }
}

const DRIVER: &str = include_str!("../py/driver.py");
/// The plotting script (written next to the driver).
pub const PLOT: &str = include_str!("../py/plot.py");

/// Runs `cmd` with a time limit, returning (success, combined output).
fn run_limited(cmd: &mut Command, limit: Duration) -> (bool, String) {
    let dir = std::env::temp_dir().join(format!("interlock-bench-py-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let out_path = dir.join("out.txt");
    let Ok(out) = std::fs::File::create(&out_path) else {
        return (false, "cannot create a temporary file".into());
    };
    let Ok(err) = out.try_clone() else {
        return (false, "cannot create a temporary file".into());
    };
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return (false, e.to_string()),
    };
    let start = Instant::now();
    let ok = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st.success(),
            Ok(None) if start.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                break false;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(_) => break false,
        }
    };
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    (ok, text)
}

fn probe(python: &Path, driver: &Path) -> (Vec<(String, String)>, Vec<String>) {
    let (_, text) = run_limited(
        Command::new(python).arg(driver).arg("probe"),
        Duration::from_secs(60),
    );
    let mut ok = Vec::new();
    let mut missing = Vec::new();
    for line in text.lines() {
        let mut it = line.splitn(3, ' ');
        match (it.next(), it.next(), it.next()) {
            (Some(lib), Some("ok"), v) => ok.push((lib.to_string(), v.unwrap_or("?").to_string())),
            (Some(lib), Some("missing"), _) => missing.push(lib.to_string()),
            _ => {}
        }
    }
    (ok, missing)
}

fn matplotlib_version(python: &Path) -> Option<String> {
    let (ok, text) = run_limited(
        Command::new(python).args(["-c", "import matplotlib; print(matplotlib.__version__)"]),
        Duration::from_secs(60),
    );
    ok.then(|| text.trim().to_string())
}

/// Makes (or reuses) `<root>/.venv-bench`, installing what is missing
/// unless `offline`. Never fails: problems become notes.
pub fn prepare(root: &Path, want_peers: bool, want_plots: bool, offline: bool) -> PySetup {
    let mut s = PySetup::default();
    if !want_peers && !want_plots {
        return s;
    }
    let venv = root.join(".venv-bench");
    let python = venv.join("bin").join("python");
    if !python.exists() {
        if offline {
            s.notes
                .push("no .venv-bench and --offline: Python rows and plots skipped".into());
            return s;
        }
        let (ok, text) = run_limited(
            Command::new("python3").arg("-m").arg("venv").arg(&venv),
            Duration::from_secs(120),
        );
        if !ok || !python.exists() {
            s.notes.push(format!(
                "could not create a Python virtual environment (python3 -m venv): {}; Python rows and plots skipped",
                text.lines().last().unwrap_or("no output")
            ));
            return s;
        }
    }
    let dir = venv.join("interlock-bench");
    let driver = dir.join("driver.py");
    if std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&driver, DRIVER))
        .and_then(|()| std::fs::write(dir.join("plot.py"), PLOT))
        .is_err()
    {
        s.notes
            .push("could not write the Python driver; Python rows and plots skipped".into());
        return s;
    }
    if want_peers && !offline && root.join("pyproject.toml").exists() {
        // The rows of interlock's own Python package (the compat modules):
        // build this checkout into the venv, release profile, sharing
        // target/ so that a rebuild is incremental. Done every run, so the
        // rows never measure a stale build.
        let (ok, text) = run_limited(
            Command::new(&python)
                .args(["-m", "pip", "install", "--disable-pip-version-check", "-q"])
                .args(["--timeout", "20", "--retries", "1"])
                .args(["--no-deps", "--force-reinstall"])
                .arg(root)
                .env("CARGO_TARGET_DIR", root.join("target")),
            Duration::from_secs(1200),
        );
        if !ok {
            s.notes.push(format!(
                "pip install of this checkout's Python package failed: {}",
                text.lines().last().unwrap_or("no output")
            ));
        }
    }
    let (mut libs, mut missing) = probe(&python, &driver);
    let mut mpl = matplotlib_version(&python);
    let mut need: Vec<&str> = Vec::new();
    if want_peers {
        need.extend(
            missing
                .iter()
                .filter_map(|m| PACKAGES.iter().copied().find(|p| p == m)),
        );
    }
    if want_plots && mpl.is_none() {
        need.push("matplotlib");
    }
    if !need.is_empty() && !offline {
        let (ok, text) = run_limited(
            Command::new(&python)
                .args(["-m", "pip", "install", "--disable-pip-version-check", "-q"])
                .args(["--timeout", "20", "--retries", "1"])
                .args(&need),
            Duration::from_secs(600),
        );
        if !ok {
            s.notes.push(format!(
                "pip install {} failed (PyPI unreachable?): {}",
                need.join(" "),
                text.lines().last().unwrap_or("no output")
            ));
        }
        (libs, missing) = probe(&python, &driver);
        mpl = matplotlib_version(&python);
    }
    if want_peers && !missing.is_empty() {
        s.notes.push(format!(
            "Python libraries unavailable, their rows skipped: {}",
            missing.join(", ")
        ));
    }
    if want_plots && mpl.is_none() {
        s.notes.push("matplotlib unavailable: plots skipped".into());
    }
    s.libs = libs;
    s.matplotlib = mpl;
    s.env = Some(PythonEnv {
        python: python.clone(),
        driver,
    });
    s
}

/// Runs the plotting script over the CSVs in `bench_dir`; returns the PNGs
/// it wrote or a note.
pub fn plot(setup: &PySetup, bench_dir: &Path) -> Result<Vec<PathBuf>, String> {
    let (Some(env), Some(_)) = (&setup.env, &setup.matplotlib) else {
        return Err("matplotlib unavailable: plots skipped".into());
    };
    let script = env.driver.with_file_name("plot.py");
    let (ok, text) = run_limited(
        Command::new(&env.python).arg(&script).arg(bench_dir),
        Duration::from_secs(300),
    );
    if !ok {
        return Err(format!(
            "plotting failed: {}",
            text.lines().last().unwrap_or("no output")
        ));
    }
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix("wrote "))
        .map(PathBuf::from)
        .collect())
}
