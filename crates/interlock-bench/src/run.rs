//! The full contention run: the matrix of scenarios, the progress display,
//! and the hand-off to the report.
//!
//! Why it is built this way: machines drift (FACTS.md measured ±20% between
//! runs here), so the run is scenario-major: for each scenario every target
//! runs back to back, and rows are compared within a scenario, never
//! across runs. Each scenario runs in rounds (every target once per round,
//! in a rotated order), and a row is its median round, so a target whose
//! workers got little CPU in one phase does not decide its ratio. With 3
//! rounds, `--procs 1,2,4,8 --holds 0,100000` took 22 minutes on a 2-CPU
//! machine; `--quick` (1 round) takes about one.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::contention::{run_scenario, Durations, Mix, Row, Scenario};
use crate::python;
use crate::report;
use crate::targets::{self, Target};

/// Options of the `run` subcommand.
#[derive(Clone, Debug, clap::Args)]
pub struct RunArgs {
    /// A one-minute smoke run: fewer scenarios, shorter phases.
    #[arg(long)]
    pub quick: bool,
    /// Seconds per phase (throughput, then latency) of each scenario.
    #[arg(long)]
    pub phase_seconds: Option<f64>,
    /// Rounds per scenario (default 3, `--quick` 1): every target of the
    /// scenario runs once per round, the rounds interleaved and each in a
    /// rotated order; a row reports the median round's throughput and the
    /// latencies of all rounds.
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Only these targets (comma-separated names; see `list`). Floors and
    /// peers needed for ratios are not added automatically.
    #[arg(long, value_delimiter = ',')]
    pub targets: Vec<String>,
    /// Process counts (default 1,2,4,8; reader mixes skip 1).
    #[arg(long, value_delimiter = ',')]
    pub procs: Vec<usize>,
    /// Hold times in ns (default 0,1000,100000).
    #[arg(long, value_delimiter = ',')]
    pub holds: Vec<u64>,
    /// Mixes (writers,read90,1writer).
    #[arg(long, value_delimiter = ',')]
    pub mixes: Vec<String>,
    /// Skip the Python peers.
    #[arg(long)]
    pub no_python: bool,
    /// Skip the plots.
    #[arg(long)]
    pub no_plots: bool,
    /// Never pip install (use .venv-bench as it is).
    #[arg(long)]
    pub offline: bool,
    /// Workspace root (BENCHMARKS.md, docs/bench/, .venv-bench/); default:
    /// the enclosing cargo workspace.
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Write the report here instead of <root>/BENCHMARKS.md; the CSV
    /// files and plots then go to `bench/` beside it, so a trial run does
    /// not overwrite the committed ones.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// The enclosing cargo workspace (a Cargo.toml with `[workspace]`), or the
/// current directory.
pub fn workspace_root() -> PathBuf {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let mut d: Option<&Path> = Some(&cwd);
    while let Some(p) = d {
        if std::fs::read_to_string(p.join("Cargo.toml")).is_ok_and(|s| s.contains("[workspace]")) {
            return p.to_path_buf();
        }
        d = p.parent();
    }
    cwd
}

/// The scenarios to run, in order, with the targets each applies to.
pub fn matrix(a: &RunArgs, targets: &[Target]) -> Result<Vec<(Scenario, Vec<Target>)>> {
    let procs = if !a.procs.is_empty() {
        a.procs.clone()
    } else if a.quick {
        vec![1, 4]
    } else {
        vec![1, 2, 4, 8]
    };
    let holds = if !a.holds.is_empty() {
        a.holds.clone()
    } else if a.quick {
        vec![0, 100_000]
    } else {
        vec![0, 1_000, 100_000]
    };
    let mixes: Vec<Mix> = if a.mixes.is_empty() {
        vec![Mix::Writers, Mix::Read90, Mix::OneWriter]
    } else {
        a.mixes
            .iter()
            .map(|m| Mix::parse(m).ok_or_else(|| anyhow::anyhow!("unknown mix {m}")))
            .collect::<Result<_>>()?
    };
    if procs.iter().any(|&p| p == 0 || p > crate::page::MAX_SLOTS) {
        bail!("process counts must be 1..={}", crate::page::MAX_SLOTS);
    }
    let mut out = Vec::new();
    for &mix in &mixes {
        for &hold_ns in &holds {
            for &p in &procs {
                if mix.shared() && p < 2 {
                    continue;
                }
                // Quick runs keep the reader mixes to one process count.
                if a.quick && mix.shared() && a.procs.is_empty() && p != 4 {
                    continue;
                }
                if a.quick && mix.shared() && a.holds.is_empty() && hold_ns != 0 {
                    continue;
                }
                let s = Scenario {
                    procs: p,
                    mix,
                    hold_ns,
                };
                let ts: Vec<Target> = targets
                    .iter()
                    .filter(|t| applies(t, mix))
                    .cloned()
                    .collect();
                if !ts.is_empty() {
                    out.push((s, ts));
                }
            }
        }
    }
    Ok(out)
}

fn applies(t: &Target, mix: Mix) -> bool {
    if mix.shared() {
        // The mutex floor stands in for shared memory only when all write.
        t.shared
    } else {
        t.name != "floor-futex-rw"
    }
}

struct Progress {
    tty: bool,
    total: usize,
    done: usize,
    start: Instant,
}

impl Progress {
    fn step(&mut self, what: &str) {
        self.done += 1;
        let el = self.start.elapsed().as_secs_f64();
        let eta = el / self.done as f64 * (self.total - self.done) as f64;
        let mut e = std::io::stderr().lock();
        if self.tty {
            let width = 30;
            let fill = width * self.done / self.total.max(1);
            let _ = write!(
                e,
                "\r\x1b[K[{}{}] {}/{} {:.0}s left  {}",
                "#".repeat(fill),
                ".".repeat(width - fill),
                self.done,
                self.total,
                eta,
                what
            );
            if self.done == self.total {
                let _ = writeln!(e);
            }
        } else {
            let _ = writeln!(e, "[{}/{}] {what}", self.done, self.total);
        }
    }
}

/// The `run` subcommand.
pub fn run(a: RunArgs) -> Result<()> {
    let root = a.root.clone().unwrap_or_else(workspace_root);
    let mut all = targets::all();
    if !a.targets.is_empty() {
        for n in &a.targets {
            if !all.iter().any(|t| t.name == n) {
                bail!("unknown target {n} (see `interlock-bench list`)");
            }
        }
        all.retain(|t| a.targets.iter().any(|n| n == t.name));
    }
    let want_py = !a.no_python && all.iter().any(Target::is_python);
    let py = python::prepare(&root, want_py, !a.no_plots, a.offline);
    let mut notes = py.notes.clone();
    all.retain(|t| match t.imp {
        targets::Impl::Python(lib) => want_py && py.has(lib),
        _ => true,
    });
    let secs = a.phase_seconds.unwrap_or(if a.quick { 0.1 } else { 0.3 });
    let d = Durations {
        throughput: Duration::from_secs_f64(secs),
        latency: Duration::from_secs_f64(secs),
    };
    let rounds = a.rounds.unwrap_or(if a.quick { 1 } else { 3 });
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let m = matrix(&a, &all)?;
    let total: usize = m.iter().map(|(_, ts)| ts.len() * rounds).sum();
    let mut prog = Progress {
        tty: std::io::stderr().is_terminal(),
        total,
        done: 0,
        start: Instant::now(),
    };
    eprintln!(
        "interlock-bench: {} scenarios x targets x rounds, {:.2} s per phase, {} CPUs",
        total,
        secs,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let load_before = report::loadavg();
    let started = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    for (s, ts) in &m {
        let mut runs: Vec<Vec<Row>> = vec![Vec::new(); ts.len()];
        for round in 0..rounds {
            // Each round starts one target later, so no target always runs
            // first (on a cold page cache) or last.
            for k in 0..ts.len() {
                let i = (round + k) % ts.len();
                let t = &ts[i];
                let r = run_scenario(t, *s, d, py.env.as_ref());
                let what = format!(
                    "{:<22} {:>8} hold {:>6} ns {} procs, round {}{}",
                    t.name,
                    s.mix.name(),
                    s.hold_ns,
                    s.procs,
                    round + 1,
                    r.error
                        .as_ref()
                        .map_or(String::new(), |e| format!("  FAILED: {e}"))
                );
                prog.step(&what);
                runs[i].push(r);
            }
        }
        rows.extend(runs.into_iter().map(Row::median_round));
    }
    // The semaphores' waiting cost, when a semaphore is in the run.
    let sem_wait = if all.iter().any(|t| t.capacity > 1) {
        eprintln!("interlock-bench: semaphore waiting cost (sem-wait)");
        let args = crate::semwait::SemWaitArgs {
            seconds: 1.0,
            trials: if a.quick { 30 } else { 100 },
        };
        match crate::semwait::measure_all(&args) {
            Ok(v) => Some(crate::semwait::table(&v)),
            Err(e) => {
                notes.push(format!("semaphore waiting cost not measured: {e:#}"));
                None
            }
        }
    } else {
        None
    };
    eprintln!("interlock-bench: timed-wait lateness (deadline)");
    let dl = crate::deadline::DeadlineArgs {
        trials: if a.quick { 20 } else { 100 },
        wait_ms: 10,
    };
    let deadline = match crate::deadline::measure_all(&dl) {
        Ok(v) => Some(crate::deadline::table(&v)),
        Err(e) => {
            notes.push(format!("timed-wait lateness not measured: {e:#}"));
            None
        }
    };
    let elapsed = started.elapsed();
    let load_after = report::loadavg();
    let report_path = a
        .report
        .clone()
        .unwrap_or_else(|| root.join("BENCHMARKS.md"));
    // Links in the report are relative to the report's directory.
    let report_dir = report_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| root.clone());
    let bench_dir = if a.report.is_some() {
        report_dir.join("bench")
    } else {
        root.join("docs").join("bench")
    };
    std::fs::create_dir_all(&bench_dir)?;
    let all_targets = targets::all();
    report::write_csv(&bench_dir, &rows, &all_targets)?;
    let plots = if a.no_plots {
        notes.push("plots skipped (--no-plots)".into());
        Vec::new()
    } else {
        match python::plot(&py, &bench_dir) {
            Ok(p) => p,
            Err(n) => {
                notes.push(n);
                Vec::new()
            }
        }
    };
    let mut seen = std::collections::HashSet::new();
    notes.retain(|n| seen.insert(n.clone()));
    let ctx = report::ReportCtx {
        command: report::command_line(),
        secs_per_phase: secs,
        rounds,
        elapsed,
        notes,
        py_libs: py.libs.clone(),
        matplotlib: py.matplotlib.clone(),
        load: (load_before, load_after),
        sem_wait,
        deadline,
        bench_rel: bench_dir
            .strip_prefix(&report_dir)
            .unwrap_or(&bench_dir)
            .to_string_lossy()
            .into_owned(),
        plots: plots
            .iter()
            .map(|p| {
                p.strip_prefix(&report_dir)
                    .unwrap_or(p.as_path())
                    .to_string_lossy()
                    .into_owned()
            })
            .collect(),
    };
    report::write_markdown(&report_path, &rows, &all_targets, &ctx)?;
    eprintln!(
        "wrote {} and {} ({:.0} s)",
        report_path.display(),
        bench_dir.display(),
        elapsed.as_secs_f64()
    );
    Ok(())
}
