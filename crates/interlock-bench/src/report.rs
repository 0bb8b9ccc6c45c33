//! BENCHMARKS.md and the CSV files the plots read.
//!
//! Why it is built this way: a benchmark report is only worth its
//! reproducibility, so the file is regenerated whole from one run: the
//! exact command, a machine line, the tables, and the plots made from the
//! same CSV. Ratios are computed within a scenario (the same processes,
//! the same minute of machine weather): to the best peer of the same kind
//! (file-system locks with file-system locks, shared memory with shared
//! memory) and to the floor of the row's own primitive.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::contention::{Mix, Row, Scenario};
use crate::targets::{Group, Target};

/// What the report says about the run besides the rows.
pub struct ReportCtx {
    /// The command that produced it.
    pub command: String,
    /// Seconds per phase.
    pub secs_per_phase: f64,
    /// Rounds per scenario (targets interleaved).
    pub rounds: usize,
    /// Wall time of the measurements.
    pub elapsed: Duration,
    /// Skips and caveats.
    pub notes: Vec<String>,
    /// Python libraries used, with versions.
    pub py_libs: Vec<(String, String)>,
    /// matplotlib version, if plots were made.
    pub matplotlib: Option<String>,
    /// The CSV and plot directory, relative to the report.
    pub bench_rel: String,
    /// 1-minute load average before and after the measurements.
    pub load: (String, String),
    /// Plot paths relative to the workspace root.
    pub plots: Vec<String>,
    /// The semaphores' waiting-cost table (`sem-wait`), if measured.
    pub sem_wait: Option<String>,
    /// The timed-wait lateness table (`deadline`), if measured.
    pub deadline: Option<String>,
}

/// The command line as a user would type it (scripts/benchmarks.sh names
/// itself through INTERLOCK_BENCH_COMMAND).
pub fn command_line() -> String {
    if let Ok(c) = std::env::var("INTERLOCK_BENCH_COMMAND") {
        return c.trim_end().to_string();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!(
        "cargo run --release -p interlock-bench -- {}",
        args.join(" ")
    )
    .trim_end()
    .to_string()
}

fn target<'a>(ts: &'a [Target], name: &str) -> Option<&'a Target> {
    ts.iter().find(|t| t.name == name)
}

/// Ratios of one row within its scenario.
#[derive(Clone, Debug, Default)]
pub struct Ratios {
    /// Best peer of the same class, and this row's throughput over it.
    pub best_peer: Option<(String, f64)>,
    /// This row's throughput over its primitive's floor.
    pub floor: Option<(String, f64)>,
}

fn same(a: &Scenario, b: &Scenario) -> bool {
    a == b
}

/// Ratios for `r` among `rows`.
pub fn ratios(r: &Row, rows: &[Row], ts: &[Target]) -> Ratios {
    let mut out = Ratios::default();
    let Some(t) = target(ts, &r.target) else {
        return out;
    };
    if r.error.is_some() || r.acq_per_s <= 0.0 {
        return out;
    }
    let class = t.floor.class();
    // A semaphore of N permits is compared with peers of N permits only,
    // and has no floor in the contention run (the floors are locks).
    let best = rows
        .iter()
        .filter(|o| same(&o.scenario, &r.scenario) && o.error.is_none() && o.acq_per_s > 0.0)
        .filter(|o| {
            target(ts, &o.target).is_some_and(|ot| {
                ot.group == Group::Peer && ot.floor.class() == class && ot.capacity == t.capacity
            })
        })
        .max_by(|a, b| a.acq_per_s.total_cmp(&b.acq_per_s));
    if let Some(b) = best {
        out.best_peer = Some((b.target.clone(), r.acq_per_s / b.acq_per_s));
    }
    let fname = t.floor.target(r.scenario.mix.shared());
    if t.capacity > 1 {
        return out;
    }
    if let Some(f) = rows.iter().find(|o| {
        o.target == fname
            && same(&o.scenario, &r.scenario)
            && o.error.is_none()
            && o.acq_per_s > 0.0
    }) {
        out.floor = Some((fname.to_string(), r.acq_per_s / f.acq_per_s));
    }
    out
}

fn ns_opt(v: Option<u64>) -> String {
    v.map_or(String::new(), |v| v.to_string())
}

fn f_opt(v: Option<f64>) -> String {
    v.map_or(String::new(), |v| format!("{v:.4}"))
}

/// Writes results.csv (one line per row) and latency.csv (bucketed
/// distributions of the scenario the latency plots show).
pub fn write_csv(dir: &Path, rows: &[Row], ts: &[Target]) -> Result<()> {
    let mut s = String::from(
        "target,label,group,class,mix,hold_ns,procs,acq_per_s,best_peer,ratio_best_peer,floor,ratio_floor,owner_change_share,handoff_p50_ns,handoff_p99_ns,handoff_samples,max_wait_ns,jain,writer_p99_wait_ns,reader_p99_wait_ns,owner_died,per_proc,error\n",
    );
    for r in rows {
        let Some(t) = target(ts, &r.target) else {
            continue;
        };
        let q = ratios(r, rows, ts);
        let sc = r.scenario;
        let per: Vec<String> = r.per_proc.iter().map(u64::to_string).collect();
        let _ = writeln!(
            s,
            "{},\"{}\",{},{},{},{},{},{:.1},{},{},{},{},{},{},{},{},{},{},{},{},{},{},\"{}\"",
            t.name,
            t.label,
            t.group.name(),
            t.floor.class(),
            sc.mix.name(),
            sc.hold_ns,
            sc.procs,
            r.acq_per_s,
            q.best_peer.as_ref().map_or("", |b| b.0.as_str()),
            f_opt(q.best_peer.as_ref().map(|b| b.1)),
            q.floor.as_ref().map_or("", |b| b.0.as_str()),
            f_opt(q.floor.as_ref().map(|b| b.1)),
            f_opt(r.changed),
            ns_opt(r.handoff.quantile(0.5)),
            ns_opt(r.handoff.quantile(0.99)),
            r.handoff.len(),
            if r.error.is_some() {
                String::new()
            } else {
                r.max_wait().to_string()
            },
            f_opt(r.jain),
            ns_opt(r.wait_ex.quantile(0.99)),
            ns_opt(r.wait_sh.quantile(0.99)),
            r.owner_died,
            per.join(" "),
            r.error.as_deref().unwrap_or("").replace('"', "'")
        );
    }
    std::fs::write(dir.join("results.csv"), s).context("write results.csv")?;

    // The latency plots show one scenario: all writers, no hold, the
    // largest process count <= 4 that was run.
    let pick = rows
        .iter()
        .filter(|r| {
            r.scenario.mix == Mix::Writers && r.scenario.hold_ns == 0 && r.scenario.procs <= 4
        })
        .map(|r| r.scenario.procs)
        .max();
    let mut l = String::from("target,group,class,mix,hold_ns,procs,kind,bucket_ns,count\n");
    if let Some(p) = pick {
        for r in rows.iter().filter(|r| {
            r.scenario.mix == Mix::Writers
                && r.scenario.hold_ns == 0
                && r.scenario.procs == p
                && r.error.is_none()
        }) {
            let Some(t) = target(ts, &r.target) else {
                continue;
            };
            for (kind, h) in [("handoff", &r.handoff), ("wait_ex", &r.wait_ex)] {
                for (b, c) in h.buckets() {
                    let _ = writeln!(
                        l,
                        "{},{},{},writers,0,{},{},{},{}",
                        t.name,
                        t.group.name(),
                        t.floor.class(),
                        p,
                        kind,
                        b,
                        c
                    );
                }
            }
        }
    }
    std::fs::write(dir.join("latency.csv"), l).context("write latency.csv")?;
    Ok(())
}

/// A duration in ns, human-readable with 2–3 significant figures.
pub fn fmt_ns(v: u64) -> String {
    let v = v as f64;
    let (x, unit) = if v >= 1e9 {
        (v / 1e9, "s")
    } else if v >= 1e6 {
        (v / 1e6, "ms")
    } else if v >= 1e3 {
        (v / 1e3, "µs")
    } else {
        (v, "ns")
    };
    if x >= 100.0 {
        format!("{x:.0} {unit}")
    } else if x >= 10.0 {
        format!("{x:.1} {unit}")
    } else {
        format!("{x:.2} {unit}")
    }
}

/// A rate with a k/M suffix.
pub fn fmt_rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn fmt_ratio(v: Option<f64>) -> String {
    match v {
        Some(x) if x >= 10.0 => format!("{x:.0}×"),
        Some(x) if x >= 0.1 => format!("{x:.2}×"),
        Some(x) => format!("{x:.3}×"),
        None => "–".into(),
    }
}

/// One line describing the machine.
pub fn machine_line() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    format!("{cpu}, {cores} CPUs, Linux {kernel}, {}", today_utc())
}

/// The 1-minute load average (the machine is shared: other work skews
/// the figures, so the report says how busy it was).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// Today's date (UTC) as YYYY-MM-DD, from the system clock.
pub fn today_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn hold_title(ns: u64) -> String {
    if ns == 0 {
        "no hold".into()
    } else {
        format!("hold {}", fmt_ns(ns))
    }
}

/// A row is "behind" below this share of the best peer's throughput.
const BEHIND_PEER: f64 = 0.9;
/// ... or below this share of its floor's.
const FAR_FROM_FLOOR: f64 = 0.5;

/// Where criterion left its results: `$CARGO_TARGET_DIR/criterion`, or the
/// workspace's `target/criterion`.
fn criterion_dir() -> std::path::PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("criterion")
}

/// The criterion benches' uncontended pairs, if they have been run.
fn uncontended_section(s: &mut String) {
    let _ = writeln!(s, "## Uncontended: one lock+unlock pair, one thread\n");
    let benches = crate::criterion::load(&criterion_dir()).unwrap_or_default();
    match crate::criterion::section(&benches) {
        Some(tables) => {
            let _ = writeln!(
                s,
                "From the criterion benches (`cargo bench -p interlock`), read from \
                 target/criterion: the median time of one lock+unlock pair, its ratio to the \
                 bare primitive it is built on (floor) and to the fastest peer on the same \
                 primitive, all measured in one run. These are ratios of times: below 1× \
                 is faster (the throughput tables below are the other way round). \
                 `handoff_2_processes` (from the \
                 `shm_handoff` bench) is the time per handoff of two processes alternating \
                 strictly through the lock. `async_wake_2_processes` (the `async_handoff` \
                 bench) is the median release-to-waiter wake between two processes of an \
                 async waiter beside the blocking one; `async_uncontended` the async \
                 acquisition taken on its first poll beside the blocking `*_arc` call.\n{tables}"
            );
            notes_of_benches(s);
        }
        None => {
            let _ = writeln!(
                s,
                "Not measured in this run: run `cargo bench -p interlock` first \
                 (scripts/benchmarks.sh does both).\n"
            );
        }
    }
}

/// Figures the benches measure beside criterion's (each bench writes its
/// `target/criterion/NAME.notes.md`, one list item per figure): appended
/// under the criterion tables, by file name.
fn notes_of_benches(s: &mut String) {
    let mut files: Vec<_> = std::fs::read_dir(criterion_dir())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".notes.md"))
        .collect();
    files.sort();
    for f in files {
        if let Ok(text) = std::fs::read_to_string(&f) {
            let name = f.file_name().unwrap_or_default().to_string_lossy();
            let _ = writeln!(s, "\nFrom {name}:\n\n{}", text.trim_end());
        }
    }
}

/// "How fast is interlock": the default form of each family, uncontended
/// (criterion) and under contention (this run), in two short tables.
fn summary_section(s: &mut String, rows: &[Row], ts: &[Target]) {
    let _ = writeln!(s, "## How fast is interlock\n");
    let benches = crate::criterion::load(&criterion_dir()).unwrap_or_default();
    let lines = crate::criterion::summary(&benches);
    if !lines.is_empty() {
        let _ = writeln!(
            s,
            "One thread, no contention: one lock+unlock pair with the defaults, and its time over \
             the bare primitive's (OFD fcntl, flock, a futex lock, mkdir+rmdir; 1× is the floor).\n"
        );
        let _ = writeln!(s, "| lock | operation | ns per pair | × floor |");
        let _ = writeln!(s, "|---|---|---:|---:|");
        for l in lines {
            let _ = writeln!(s, "{l}");
        }
        let _ = writeln!(s);
    }
    let procs: Vec<usize> = {
        let mut p: Vec<usize> = rows
            .iter()
            .filter(|r| r.scenario.mix == Mix::Writers && r.scenario.hold_ns == 0)
            .map(|r| r.scenario.procs)
            .filter(|&p| p > 1)
            .collect();
        p.sort_unstable();
        p.dedup();
        p
    };
    let fams: Vec<&Target> = ts
        .iter()
        .filter(|t| t.group == Group::Interlock && t.capacity == 1)
        .collect();
    if procs.is_empty() || fams.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "Contended, every acquisition exclusive, no hold: acquisitions per second of all \
         processes together, over the floor's and the best peer's in the same scenario \
         (above 1× is faster).\n"
    );
    let mut head = String::from("| lock |");
    let mut rule = String::from("|---|");
    for p in &procs {
        let _ = write!(head, " {p} procs: acq/s (× floor, × best peer) |");
        rule.push_str("---:|");
    }
    let _ = writeln!(s, "{head}\n{rule}");
    for t in fams {
        let mut line = format!("| {} |", t.label);
        let mut any = false;
        for p in &procs {
            let r = rows.iter().find(|r| {
                r.target == t.name
                    && r.scenario.procs == *p
                    && r.scenario.mix == Mix::Writers
                    && r.scenario.hold_ns == 0
                    && r.error.is_none()
            });
            match r {
                Some(r) => {
                    any = true;
                    let x = ratios(r, rows, ts);
                    let _ = write!(
                        line,
                        " {} ({}, {}) |",
                        fmt_rate(r.acq_per_s),
                        fmt_ratio(x.floor.map(|f| f.1)),
                        fmt_ratio(x.best_peer.map(|b| b.1))
                    );
                }
                None => line.push_str(" – |"),
            }
        }
        if any {
            let _ = writeln!(s, "{line}");
        }
    }
    let _ = writeln!(s);
}

/// "Semaphores": the targets of more than one permit, every acquisition
/// taking one permit, side by side with the POSIX semaphore, and the
/// waiting cost of each family.
fn semaphore_section(s: &mut String, rows: &[Row], ts: &[Target], c: &ReportCtx) {
    let sems: Vec<&Target> = ts.iter().filter(|t| t.capacity > 1).collect();
    let in_sems = |r: &&Row| sems.iter().any(|t| t.name == r.target);
    let sem_rows: Vec<&Row> = rows
        .iter()
        .filter(in_sems)
        .filter(|r| r.scenario.mix == Mix::Writers)
        .collect();
    if sem_rows.is_empty() && c.sem_wait.is_none() {
        return;
    }
    let _ = writeln!(
        s,
        "## Semaphores
"
    );
    let mut holds: Vec<u64> = sem_rows.iter().map(|r| r.scenario.hold_ns).collect();
    holds.sort_unstable();
    holds.dedup();
    let mut procs: Vec<usize> = sem_rows.iter().map(|r| r.scenario.procs).collect();
    procs.sort_unstable();
    procs.dedup();
    if !sem_rows.is_empty() {
        let _ = writeln!(
            s,
            "Every process takes one permit of the same semaphore of {} permits, holds it, gives it \
             back, again: acquisitions per second of all processes together, and in parentheses \
             over the POSIX semaphore's (`sem_open`, a futex word with no record of holders) in the \
             same scenario (above 1× is faster).\n",
            sems.first().map_or(0, |t| t.capacity)
        );
    }
    for hold in holds {
        let _ = writeln!(s, "**{}**\n", capitalise(&hold_title(hold)));
        let head: Vec<String> = procs.iter().map(|p| format!("{p} procs")).collect();
        let _ = writeln!(s, "| semaphore | {} |", head.join(" | "));
        let _ = writeln!(s, "|---|{}", "---:|".repeat(procs.len()));
        for t in &sems {
            let cells: Vec<String> = procs
                .iter()
                .map(|&p| {
                    let find = |name: &str| {
                        sem_rows.iter().find(|r| {
                            r.target == name && r.scenario.procs == p && r.scenario.hold_ns == hold
                        })
                    };
                    match find(t.name) {
                        Some(r) if r.error.is_some() => "failed".into(),
                        Some(r) => match find("posix-sem")
                            .filter(|o| o.error.is_none() && o.acq_per_s > 0.0)
                        {
                            Some(o) if t.name != "posix-sem" => format!(
                                "{} ({})",
                                fmt_rate(r.acq_per_s),
                                fmt_ratio(Some(r.acq_per_s / o.acq_per_s))
                            ),
                            _ => fmt_rate(r.acq_per_s),
                        },
                        None => String::new(),
                    }
                })
                .collect();
            if cells.iter().all(String::is_empty) {
                continue;
            }
            let label = if t.group == Group::Interlock {
                format!("**{}**", t.label)
            } else {
                t.label.to_string()
            };
            let _ = writeln!(s, "| {label} | {} |", cells.join(" | "));
        }
        s.push('\n');
    }
    if let Some(w) = &c.sem_wait {
        let _ = writeln!(
            s,
            "**Waiting** (`interlock-bench sem-wait`): a thread blocked on a semaphore whose 2 \
             permits another handle holds; how many times it ran and how much CPU it used per \
             second of waiting (/proc/thread-self/schedstat), and how long after the holder freed \
             one of its permits (at random) the waiter's acquire returned.\n\n{w}"
        );
    }
}

/// Writes BENCHMARKS.md.
pub fn write_markdown(path: &Path, rows: &[Row], ts: &[Target], c: &ReportCtx) -> Result<()> {
    let mut s = String::new();
    let _ = writeln!(s, "# interlock benchmarks\n");
    let _ = writeln!(
        s,
        "Generated by `interlock-bench` (crates/interlock-bench); do not edit by hand. \
         How it measures and what each figure means: [docs/bench.md](docs/bench.md).\n"
    );
    let _ = writeln!(s, "- Command: `{}`", c.command);
    let _ = writeln!(
        s,
        "- Machine: {}; 1-minute load average {} before the run, {} after (the machine is shared; \
         load above its CPU count means the locks competed with other work)",
        machine_line(),
        c.load.0,
        c.load.1
    );
    let _ = writeln!(
        s,
        "- **This machine has {} CPUs**: with 4 and 8 processes the workers outnumber the CPUs, \
         so those rows measure the locks under oversubscription (sleeping, waking, preemption while holding), \
         not parallel speed-up.",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let _ = writeln!(
        s,
        "- Each scenario: a {:.2} s throughput phase (no clock reads in the loop) then a {:.2} s latency phase \
         (every acquisition timed) on the same processes, in {} rounds: each round runs every target of \
         the scenario once, in a rotated order, and a row gives the median round's throughput and the \
         latencies of all its rounds; {} rows took {:.0} s.",
        c.secs_per_phase,
        c.secs_per_phase,
        c.rounds,
        rows.len(),
        c.elapsed.as_secs_f64()
    );
    if !c.py_libs.is_empty() {
        let v: Vec<String> = c.py_libs.iter().map(|(l, v)| format!("{l} {v}")).collect();
        let _ = writeln!(s, "- Python peers (in `.venv-bench/`): {}", v.join(", "));
    }
    for n in &c.notes {
        let _ = writeln!(s, "- Note: {n}");
    }
    let failed: Vec<&Row> = rows.iter().filter(|r| r.error.is_some()).collect();
    if !failed.is_empty() {
        let _ = writeln!(
            s,
            "- {} measurements failed (listed at the end).",
            failed.len()
        );
    }
    let _ = writeln!(
        s,
        "\nTimes drift by ±20% between runs on this shared VM: compare rows within one table (measured minutes apart), \
         not against another run. `× best peer` compares throughput with the fastest peer library of the same kind \
         (file-system locks with file-system locks, shared memory with shared memory); `× floor` with the bare primitive \
         the row is built on (raw OFD fcntl, raw flock, a spin-then-futex lock in shared memory, raw mkdir/rmdir).\n"
    );

    summary_section(&mut s, rows, ts);

    // Plots.
    if !c.plots.is_empty() {
        let _ = writeln!(s, "## Plots\n");
        if let Some(v) = &c.matplotlib {
            let _ = writeln!(
                s,
                "Drawn with matplotlib {v} from {}/results.csv and latency.csv.\n",
                c.bench_rel
            );
        }
        for p in &c.plots {
            let _ = writeln!(s, "![{p}]({p})\n");
        }
    }

    // At a glance: throughput by process count, no hold, per mix.
    uncontended_section(&mut s);
    let _ = writeln!(s, "## At a glance: acquisitions per second, no hold\n");
    let _ = writeln!(
        s,
        "Throughput by process count (2 CPUs), with the ratio to the row's floor in parentheses. \
         Full figures per scenario are in the tables further down.\n"
    );
    for mix in [Mix::Writers, Mix::Read90, Mix::OneWriter] {
        let in_mix: Vec<&Row> = rows
            .iter()
            .filter(|r| r.scenario.mix == mix && r.scenario.hold_ns == 0)
            .collect();
        if in_mix.is_empty() {
            continue;
        }
        let mut procs: Vec<usize> = in_mix.iter().map(|r| r.scenario.procs).collect();
        procs.sort_unstable();
        procs.dedup();
        let _ = writeln!(s, "**{}**\n", capitalise(mix.title()));
        let head: Vec<String> = procs.iter().map(|p| format!("{p} procs")).collect();
        let _ = writeln!(s, "| lock | {} |", head.join(" | "));
        let _ = writeln!(s, "|---|{}", "---:|".repeat(procs.len()));
        for t in ts {
            if !in_mix.iter().any(|r| r.target == t.name) {
                continue;
            }
            let cells: Vec<String> = procs
                .iter()
                .map(|&p| {
                    match in_mix
                        .iter()
                        .find(|r| r.target == t.name && r.scenario.procs == p)
                    {
                        Some(r) if r.error.is_some() => "failed".into(),
                        Some(r) => {
                            let q = ratios(r, rows, ts);
                            match q.floor {
                                Some((_, f)) if t.group != Group::Floor => {
                                    format!("{} ({})", fmt_rate(r.acq_per_s), fmt_ratio(Some(f)))
                                }
                                _ => fmt_rate(r.acq_per_s),
                            }
                        }
                        None => String::new(),
                    }
                })
                .collect();
            let label = if t.group == Group::Interlock {
                format!("**{}**", t.label)
            } else {
                t.label.to_string()
            };
            let _ = writeln!(s, "| {label} | {} |", cells.join(" | "));
        }
        s.push('\n');
    }

    semaphore_section(&mut s, rows, ts, c);
    if let Some(d) = &c.deadline {
        let _ = writeln!(
            s,
            "## Timed waits\n\n`interlock-bench deadline`: a timed wait of 10 ms on a lock another \
             handle holds, for every family; how long after its deadline it returned. The trials go \
             round-robin over the cases and the floor (`thread::sleep`, the scheduler's own \
             lateness), so load falls on all alike.\n\n{d}"
        );
    }

    // Where interlock stands.
    let il: Vec<&Row> = rows
        .iter()
        .filter(|r| target(ts, &r.target).is_some_and(|t| t.group == Group::Interlock))
        .collect();
    let _ = writeln!(s, "## Where interlock is behind\n");
    if il.is_empty() {
        let _ = writeln!(
            s,
            "No interlock family was present in this build: the tables below are the peers and floors that each \
             family will be measured against.\n"
        );
    } else {
        let mut behind = String::new();
        for r in &il {
            let q = ratios(r, rows, ts);
            let bp = q.best_peer.as_ref().map(|b| b.1);
            let fl = q.floor.as_ref().map(|b| b.1);
            if r.error.is_some()
                || bp.is_some_and(|x| x < BEHIND_PEER)
                || fl.is_some_and(|x| x < FAR_FROM_FLOOR)
            {
                let sc = r.scenario;
                let _ = writeln!(
                    behind,
                    "| {} | {} | {} | {} | {} | {} ({}) | {} ({}) |",
                    r.target,
                    sc.mix.title(),
                    hold_title(sc.hold_ns),
                    sc.procs,
                    r.error
                        .as_deref()
                        .map_or_else(|| fmt_rate(r.acq_per_s), |_| "failed".into()),
                    fmt_ratio(bp),
                    q.best_peer.as_ref().map_or("", |b| b.0.as_str()),
                    fmt_ratio(fl),
                    q.floor.as_ref().map_or("", |b| b.0.as_str()),
                );
            }
        }
        if behind.is_empty() {
            let _ = writeln!(
                s,
                "In every scenario each interlock family is within 10% of the best peer of its kind (or faster) and within 2× of its floor.\n"
            );
        } else {
            let _ = writeln!(
                s,
                "Rows where an interlock family's throughput is more than 10% below the best peer of its kind (run-to-run noise \
                 here is ±20%, so single rows near 0.9× are weak evidence), or under half its floor's:\n"
            );
            let _ = writeln!(
                s,
                "| lock | mix | hold | procs | acq/s | × best peer | × floor |"
            );
            let _ = writeln!(s, "|---|---|---|---:|---:|---:|---:|");
            s.push_str(&behind);
            s.push('\n');
        }
    }

    // Full tables: one per (mix, hold), rows by target then procs.
    let mut groups: BTreeMap<(u8, u64), Vec<&Row>> = BTreeMap::new();
    for r in rows {
        let k = match r.scenario.mix {
            Mix::Writers => 0,
            Mix::Read90 => 1,
            Mix::OneWriter => 2,
        };
        groups.entry((k, r.scenario.hold_ns)).or_default().push(r);
    }
    let order = |name: &str| ts.iter().position(|t| t.name == name).unwrap_or(usize::MAX);
    for ((_, hold), mut rs) in groups {
        let mix = rs[0].scenario.mix;
        let _ = writeln!(s, "## {}, {}\n", capitalise(mix.title()), hold_title(hold));
        let _ = writeln!(
            s,
            "| lock | procs | acq/s | × best peer | × floor | handoff p50 | handoff p99 | owner changes | longest wait | Jain | writers' p99 wait |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        rs.sort_by_key(|r| (order(&r.target), r.scenario.procs));
        for r in rs {
            let label = target(ts, &r.target).map_or(r.target.as_str(), |t| t.label);
            let name = if target(ts, &r.target).is_some_and(|t| t.group == Group::Interlock) {
                format!("**{label}**")
            } else {
                label.to_string()
            };
            if let Some(e) = &r.error {
                let _ = writeln!(
                    s,
                    "| {name} | {} | failed: {} | | | | | | | | |",
                    r.scenario.procs,
                    short(e)
                );
                continue;
            }
            let q = ratios(r, rows, ts);
            let _ = writeln!(
                s,
                "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.scenario.procs,
                fmt_rate(r.acq_per_s),
                fmt_ratio(q.best_peer.as_ref().map(|b| b.1)),
                fmt_ratio(q.floor.as_ref().map(|b| b.1)),
                r.handoff.quantile(0.5).map_or("–".into(), fmt_ns),
                r.handoff.quantile(0.99).map_or("–".into(), fmt_ns),
                r.changed
                    .map_or("–".into(), |x| format!("{:.1}%", x * 100.0)),
                fmt_ns(r.max_wait()),
                r.jain.map_or("–".into(), |j| format!("{j:.2}")),
                r.wait_ex.quantile(0.99).map_or("–".into(), fmt_ns),
            );
        }
        s.push('\n');
    }
    if !failed.is_empty() {
        let _ = writeln!(s, "## Failed measurements\n");
        for r in failed {
            let sc = r.scenario;
            let _ = writeln!(
                s,
                "- {} ({}, {}, {} procs): {}",
                r.target,
                sc.mix.name(),
                hold_title(sc.hold_ns),
                sc.procs,
                r.error.as_deref().unwrap_or("")
            );
        }
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "Raw figures: [{b}/results.csv]({b}/results.csv) (per-process counts included), \
         latency buckets: [{b}/latency.csv]({b}/latency.csv).",
        b = c.bench_rel
    );
    std::fs::write(path, s).with_context(|| format!("write {}", path.display()))
}

fn short(e: &str) -> String {
    let one: String = e.replace(['\n', '|'], " ");
    one.chars().take(120).collect()
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_formats() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(fmt_ns(950), "950 ns");
        assert_eq!(fmt_ns(1_500), "1.50 µs");
        assert_eq!(fmt_ns(123_456_789), "123 ms");
        assert_eq!(fmt_rate(2_500_000.0), "2.50 M");
        assert_eq!(fmt_rate(12_345.0), "12.3 k");
    }
}
