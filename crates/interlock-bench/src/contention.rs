//! Contention scenarios: N processes hammer one lock; the figures users feel.
//!
//! Why it is built this way:
//! - Workers are separate processes (the harness re-executed, or the Python
//!   driver), because every lock here is meant to work across processes and
//!   threads inside one process would share file descriptions and caches in
//!   ways real users do not.
//! - They start together on a barrier in the shared page (a phase word they
//!   futex-wait on), never on sleeps, and the parent times the window.
//! - Each scenario runs two phases on the same processes. The *throughput*
//!   phase reads no clock in the loop, so a 10 ns lock is not measured as a
//!   60 ns clock read; it gives acquisitions per second, the share that
//!   changed owner and Jain's index. The *latency* phase timestamps every
//!   acquisition (CLOCK_MONOTONIC, comparable across processes) and gives
//!   waits and release-to-waiter latency.
//! - Ownership is tracked under the lock being measured: the exclusive
//!   holder reads and writes the page's "last owner" and "last release"
//!   words, so no extra synchronisation perturbs the lock.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use interlock::Mode;

use crate::hist::{jain, Hist};
use crate::page::{self, Page, Phase};
use crate::sys::{self, now_ns, SharedPage};
use crate::targets::{Ctx, Impl, Target};

/// Who asks for what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mix {
    /// Every acquisition exclusive.
    Writers,
    /// Each acquisition shared with probability 0.9.
    Read90,
    /// Worker 0 only writes; every other worker only reads.
    OneWriter,
}

impl Mix {
    /// Stable name (CLI, CSV).
    pub fn name(self) -> &'static str {
        match self {
            Mix::Writers => "writers",
            Mix::Read90 => "read90",
            Mix::OneWriter => "1writer",
        }
    }
    /// Parses [`Mix::name`].
    pub fn parse(s: &str) -> Option<Mix> {
        [Mix::Writers, Mix::Read90, Mix::OneWriter]
            .into_iter()
            .find(|m| m.name() == s)
    }
    /// What the report calls it.
    pub fn title(self) -> &'static str {
        match self {
            Mix::Writers => "all writers",
            Mix::Read90 => "90% readers",
            Mix::OneWriter => "one writer, the rest readers",
        }
    }
    /// Whether shared acquisitions occur.
    pub fn shared(self) -> bool {
        self != Mix::Writers
    }
}

/// One point of the matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scenario {
    /// Worker processes.
    pub procs: usize,
    /// Reader/writer mix.
    pub mix: Mix,
    /// Time spent holding the lock per acquisition (busy, ns).
    pub hold_ns: u64,
}

/// Phase lengths.
#[derive(Clone, Copy, Debug)]
pub struct Durations {
    /// Throughput phase.
    pub throughput: Duration,
    /// Latency phase.
    pub latency: Duration,
}

/// What one worker reports.
#[derive(Clone, Debug, Default)]
pub struct WorkerResult {
    /// Throughput phase, exclusive acquisitions.
    pub tp_ex: u64,
    /// Throughput phase, shared acquisitions.
    pub tp_sh: u64,
    /// Throughput phase, exclusive acquisitions that changed owner.
    pub tp_changes: u64,
    /// Latency phase acquisitions.
    pub lat_acq: u64,
    /// Acquisitions that reported a dead previous holder.
    pub owner_died: u64,
    /// Waits of exclusive acquisitions (ns).
    pub wait_ex: Hist,
    /// Waits of shared acquisitions (ns).
    pub wait_sh: Hist,
    /// Release-to-waiter latency (ns) of exclusive acquisitions that took
    /// the lock from another process while already waiting.
    pub handoff: Hist,
}

impl WorkerResult {
    fn encode(&self) -> String {
        format!(
            "tp_ex {}\ntp_sh {}\ntp_changes {}\nlat_acq {}\nowner_died {}\nhist wait_ex {}\nhist wait_sh {}\nhist handoff {}\n",
            self.tp_ex,
            self.tp_sh,
            self.tp_changes,
            self.lat_acq,
            self.owner_died,
            self.wait_ex.encode(),
            self.wait_sh.encode(),
            self.handoff.encode()
        )
    }

    /// Parses the text a Rust or Python worker wrote.
    pub fn decode(s: &str) -> Result<WorkerResult> {
        let mut r = WorkerResult::default();
        for line in s.lines() {
            let (k, v) = line.split_once(' ').unwrap_or((line, ""));
            let num = || v.trim().parse::<u64>().context("bad number");
            match k {
                "tp_ex" => r.tp_ex = num()?,
                "tp_sh" => r.tp_sh = num()?,
                "tp_changes" => r.tp_changes = num()?,
                "lat_acq" => r.lat_acq = num()?,
                "owner_died" => r.owner_died = num()?,
                "hist" => {
                    let (name, h) = v.split_once(' ').unwrap_or((v, ""));
                    let h = Hist::decode(h).with_context(|| format!("bad histogram {name}"))?;
                    match name {
                        "wait_ex" => r.wait_ex = h,
                        "wait_sh" => r.wait_sh = h,
                        "handoff" => r.handoff = h,
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        Ok(r)
    }
}

/// Arguments of the hidden `worker` subcommand.
#[derive(Clone, Debug, clap::Args)]
pub struct WorkerArgs {
    /// Target name.
    #[arg(long)]
    pub target: String,
    /// Shared page file.
    #[arg(long)]
    pub page: PathBuf,
    /// Scenario directory.
    #[arg(long)]
    pub dir: PathBuf,
    /// Scenario directory in /dev/shm.
    #[arg(long)]
    pub shm_dir: PathBuf,
    /// Worker index.
    #[arg(long)]
    pub idx: usize,
    /// Mix name.
    #[arg(long)]
    pub mix: String,
    /// Hold time (ns).
    #[arg(long)]
    pub hold_ns: u64,
    /// Result file.
    #[arg(long)]
    pub out: PathBuf,
}

/// A tiny xorshift generator (deterministic per worker).
pub struct Rng(u64);
impl Rng {
    /// Seeded generator (seed 0 is remapped).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Next value.
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

fn pick(mix: Mix, idx: usize, rng: &mut Rng) -> Mode {
    match mix {
        Mix::Writers => Mode::Exclusive,
        Mix::Read90 if rng.next().is_multiple_of(10) => Mode::Exclusive,
        Mix::Read90 => Mode::Shared,
        Mix::OneWriter if idx == 0 => Mode::Exclusive,
        Mix::OneWriter => Mode::Shared,
    }
}

/// Busy-waits `ns` (the critical section's work).
#[inline]
pub fn spin(ns: u64) {
    if ns > 0 {
        let end = now_ns() + ns;
        while now_ns() < end {
            std::hint::spin_loop();
        }
    }
}

fn wait_phase(page: &Page<'_>, at_least: Phase) {
    let w = page.phase();
    loop {
        let v = w.load(Ordering::Acquire);
        if v >= at_least as u32 {
            return;
        }
        sys::futex_wait(w, v, Some(Duration::from_millis(100)));
    }
}

/// The worker side (`interlock-bench worker ...`).
pub fn worker(a: WorkerArgs) -> Result<()> {
    let target = crate::targets::by_name(&a.target)
        .with_context(|| format!("unknown target {}", a.target))?;
    let Impl::Rust { open, .. } = target.imp else {
        bail!("{} is not a Rust target", a.target);
    };
    let mix = Mix::parse(&a.mix).context("unknown mix")?;
    let shm = Arc::new(SharedPage::attach(&a.page).context("attach page")?);
    let page = Page(&shm);
    if page.g(0).load(Ordering::Acquire) != page::MAGIC {
        bail!("shared page has the wrong magic");
    }
    let ctx = Ctx {
        dir: a.dir.clone(),
        page: shm.clone(),
        shm_dir: a.shm_dir.clone(),
    };
    let mut h = open(&ctx)?;
    let me = a.idx as u64 + 1;
    let mut rng = Rng::new(a.idx as u64 + 1);
    let phase = page.phase();
    let last_owner = page.g(page::LAST_OWNER);
    let last_release = page.g(page::LAST_RELEASE);
    let hold = a.hold_ns;
    let mut r = WorkerResult::default();

    page.slot(a.idx, page::S_PID)
        .store(std::process::id() as u64, Ordering::Relaxed);
    page.slot(a.idx, page::S_ACK).store(1, Ordering::Release);
    wait_phase(&page, Phase::Throughput);

    // Throughput: no clock reads unless the hold needs them.
    while phase.load(Ordering::Relaxed) == Phase::Throughput as u32 {
        let mode = pick(mix, a.idx, &mut rng);
        let ex = mode == Mode::Exclusive;
        let mut changed = false;
        let died = h.run(mode, &mut || {
            if ex {
                let prev = last_owner.load(Ordering::Relaxed);
                if prev != me {
                    last_owner.store(me, Ordering::Relaxed);
                    // The very first acquisition has no previous owner.
                    changed = prev != 0;
                }
            }
            spin(hold);
        })?;
        r.owner_died += died as u64;
        r.tp_changes += changed as u64;
        if ex {
            r.tp_ex += 1;
        } else {
            r.tp_sh += 1;
        }
    }
    page.slot(a.idx, page::S_ACK).store(2, Ordering::Release);
    wait_phase(&page, Phase::Latency);

    // Latency: every acquisition timed.
    while phase.load(Ordering::Relaxed) == Phase::Latency as u32 {
        let mode = pick(mix, a.idx, &mut rng);
        let ex = mode == Mode::Exclusive;
        let t0 = now_ns();
        let (mut wait, mut handoff) = (0u64, None);
        let died = h.run(mode, &mut || {
            let t1 = now_ns();
            wait = t1.saturating_sub(t0);
            if ex {
                let prev = last_owner.load(Ordering::Relaxed);
                if prev != me {
                    let rel = last_release.load(Ordering::Relaxed);
                    // Only a waiter that was already waiting when the previous
                    // owner released measures a handoff.
                    if prev != 0 && rel > t0 {
                        handoff = Some(t1.saturating_sub(rel));
                    }
                    last_owner.store(me, Ordering::Relaxed);
                }
            }
            spin(hold);
            if ex {
                last_release.store(now_ns(), Ordering::Relaxed);
            }
        })?;
        r.owner_died += died as u64;
        r.lat_acq += 1;
        if ex {
            r.wait_ex.record(wait);
        } else {
            r.wait_sh.record(wait);
        }
        if let Some(l) = handoff {
            r.handoff.record(l);
        }
    }
    let mut f = File::create(&a.out).context("create result file")?;
    f.write_all(r.encode().as_bytes())?;
    f.sync_data().ok();
    page.slot(a.idx, page::S_ACK).store(3, Ordering::Release);
    Ok(())
}

/// One measured row.
#[derive(Clone, Debug)]
pub struct Row {
    /// Target name.
    pub target: String,
    /// The scenario.
    pub scenario: Scenario,
    /// Why it has no figures, if it failed.
    pub error: Option<String>,
    /// Acquisitions per second (throughput phase).
    pub acq_per_s: f64,
    /// Per-process acquisitions (throughput phase).
    pub per_proc: Vec<u64>,
    /// Share of exclusive acquisitions that changed owner (0..1).
    pub changed: Option<f64>,
    /// Jain's index over processes of the same role.
    pub jain: Option<f64>,
    /// Release-to-waiter latency.
    pub handoff: Hist,
    /// Waits of exclusive acquisitions.
    pub wait_ex: Hist,
    /// Waits of shared acquisitions.
    pub wait_sh: Hist,
    /// Acquisitions reporting a dead previous holder (should be 0 here).
    pub owner_died: u64,
}

impl Row {
    /// One row from the rounds of one target in one scenario: the round
    /// with the median throughput (the lower middle of an even count), with
    /// the latency histograms and dead-holder counts of every round. A
    /// failed round fails the row.
    pub fn median_round(mut rounds: Vec<Row>) -> Row {
        if let Some(i) = rounds.iter().position(|r| r.error.is_some()) {
            return rounds.swap_remove(i);
        }
        rounds.sort_by(|a, b| a.acq_per_s.total_cmp(&b.acq_per_s));
        let mid = (rounds.len() - 1) / 2;
        let mut row = rounds.swap_remove(mid);
        for r in &rounds {
            row.handoff.merge(&r.handoff);
            row.wait_ex.merge(&r.wait_ex);
            row.wait_sh.merge(&r.wait_sh);
            row.owner_died += r.owner_died;
        }
        row
    }

    fn failed(target: &str, scenario: Scenario, e: String) -> Row {
        Row {
            target: target.to_string(),
            scenario,
            error: Some(e),
            acq_per_s: 0.0,
            per_proc: Vec::new(),
            changed: None,
            jain: None,
            handoff: Hist::default(),
            wait_ex: Hist::default(),
            wait_sh: Hist::default(),
            owner_died: 0,
        }
    }

    /// The longest wait of any acquirer.
    pub fn max_wait(&self) -> u64 {
        self.wait_ex.max().max(self.wait_sh.max())
    }
}

/// How to start a Python worker.
#[derive(Clone, Debug)]
pub struct PythonEnv {
    /// The venv's interpreter.
    pub python: PathBuf,
    /// The driver script.
    pub driver: PathBuf,
}

/// A scratch directory and page for one scenario, removed on drop.
pub struct Scratch {
    /// Lock files and result files.
    pub dir: PathBuf,
    /// The shared page.
    pub page: Arc<SharedPage>,
    /// LockSet's deadlock registry for this scenario's lock file (in
    /// /dev/shm like the library's default, but private and removed).
    pub wait_dir: PathBuf,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(&self.wait_dir);
        // The posix-sem target's semaphore (sem.NAME in /dev/shm).
        crate::sys::PosixSem::unlink(&crate::targets::posix_sem_name_for(&self.wait_dir));
    }
}

static SCRATCH_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A fresh scratch directory and page for one scenario or torture run.
pub fn scratch(tag: &str) -> Result<Scratch> {
    let n = SCRATCH_SEQ.fetch_add(1, Ordering::Relaxed);
    let id = format!("interlock-bench-{}-{tag}-{n}", std::process::id());
    let dir = std::env::temp_dir().join(&id);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let shm_dir = Path::new("/dev/shm");
    let (page_path, wait_dir) = if shm_dir.is_dir() {
        (
            shm_dir.join(format!("{id}.page")),
            shm_dir.join(format!("{id}.wait")),
        )
    } else {
        (dir.join("page"), dir.join("wait"))
    };
    std::fs::create_dir_all(&wait_dir)?;
    let page = Arc::new(SharedPage::create(&page_path, page::PAGE_LEN).context("create page")?);
    Page(&page).g(0).store(page::MAGIC, Ordering::Release);
    Ok(Scratch {
        dir,
        page,
        wait_dir,
    })
}

struct Workers {
    children: Vec<Child>,
}

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.children {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Workers {
    /// Waits until `done(i)` holds for every worker, failing if one exits
    /// first or `limit` passes.
    fn until(
        &mut self,
        page: &Page<'_>,
        ack: u64,
        limit: Duration,
        dir: &Path,
        what: &str,
    ) -> Result<()> {
        let start = Instant::now();
        loop {
            let all = (0..self.children.len())
                .all(|i| page.slot(i, page::S_ACK).load(Ordering::Acquire) >= ack);
            if all {
                return Ok(());
            }
            for (i, c) in self.children.iter_mut().enumerate() {
                if let Ok(Some(st)) = c.try_wait() {
                    if page.slot(i, page::S_ACK).load(Ordering::Acquire) < ack {
                        let err = std::fs::read_to_string(dir.join(format!("err-{i}")))
                            .unwrap_or_default();
                        bail!(
                            "worker {i} exited ({st}) before {what}: {}",
                            last_line(&err)
                        );
                    }
                }
            }
            if start.elapsed() > limit {
                bail!("workers did not reach {what} within {limit:?}");
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }
}

fn last_line(s: &str) -> String {
    s.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .chars()
        .take(300)
        .collect()
}

fn set_phase(page: &Page<'_>, p: Phase) {
    page.phase().store(p as u32, Ordering::Release);
    sys::futex_wake(page.phase(), i32::MAX);
}

/// Runs one scenario for one target and returns its row (an error row if
/// anything failed; never panics the run).
pub fn run_scenario(t: &Target, s: Scenario, d: Durations, py: Option<&PythonEnv>) -> Row {
    match run_inner(t, s, d, py) {
        Ok(r) => r,
        Err(e) => Row::failed(t.name, s, format!("{e:#}")),
    }
}

fn run_inner(t: &Target, s: Scenario, d: Durations, py: Option<&PythonEnv>) -> Result<Row> {
    let sc = scratch(t.name)?;
    let ctx = Ctx {
        dir: sc.dir.clone(),
        page: sc.page.clone(),
        shm_dir: sc.wait_dir.clone(),
    };
    let page = Page(&sc.page);
    if let Impl::Rust { setup, .. } = t.imp {
        setup(&ctx).context("setup")?;
    } else {
        crate::targets::setup_file(&ctx)?;
        if t.floor == crate::targets::Floor::Futex {
            // prwlock attaches to a pthread rwlock that we initialise in a
            // page-sized file, as its own pickling support does.
            let f = ctx.dir.join("prwlock.page");
            let mut p = SharedPage::create(&f, 4096)?;
            p.keep_file(); // removed with the directory
            sys::PthreadRwLock::init(&Arc::new(p), 0)?;
        }
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let mut w = Workers {
        children: Vec::new(),
    };
    for i in 0..s.procs {
        let out = sc.dir.join(format!("result-{i}"));
        let err = File::create(sc.dir.join(format!("err-{i}")))?;
        let mut cmd = match t.imp {
            Impl::Rust { .. } => {
                let mut c = Command::new(&exe);
                c.arg("worker").arg("--target").arg(t.name);
                c.arg("--shm-dir").arg(&sc.wait_dir);
                c
            }
            Impl::Python(lib) => {
                let py = py.context("Python environment unavailable")?;
                let mut c = Command::new(&py.python);
                c.arg(&py.driver).arg("worker").arg("--lib").arg(lib);
                c
            }
        };
        cmd.arg("--page")
            .arg(sc.page.path())
            .arg("--dir")
            .arg(&sc.dir)
            .arg("--idx")
            .arg(i.to_string())
            .arg("--mix")
            .arg(s.mix.name())
            .arg("--hold-ns")
            .arg(s.hold_ns.to_string())
            .arg("--out")
            .arg(&out)
            .env(interlock::REGISTRY_DIR_ENV, &sc.wait_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err);
        w.children.push(cmd.spawn().context("spawn worker")?);
    }
    w.until(
        &page,
        1,
        Duration::from_secs(30),
        &sc.dir,
        "the start barrier",
    )?;
    let t0 = Instant::now();
    set_phase(&page, Phase::Throughput);
    std::thread::sleep(d.throughput);
    set_phase(&page, Phase::Pause);
    let tp_elapsed = t0.elapsed();
    w.until(
        &page,
        2,
        Duration::from_secs(20),
        &sc.dir,
        "the end of the throughput phase",
    )?;
    set_phase(&page, Phase::Latency);
    std::thread::sleep(d.latency);
    set_phase(&page, Phase::Stop);
    w.until(
        &page,
        3,
        Duration::from_secs(20),
        &sc.dir,
        "the end of the latency phase",
    )?;
    for c in &mut w.children {
        c.wait()?;
    }
    let mut results = Vec::new();
    for i in 0..s.procs {
        let text = std::fs::read_to_string(sc.dir.join(format!("result-{i}")))
            .with_context(|| format!("worker {i} wrote no result"))?;
        results.push(WorkerResult::decode(&text)?);
    }
    Ok(summarise(t.name, s, tp_elapsed, &results))
}

fn summarise(target: &str, s: Scenario, tp: Duration, rs: &[WorkerResult]) -> Row {
    let per_proc: Vec<u64> = rs.iter().map(|r| r.tp_ex + r.tp_sh).collect();
    let total: u64 = per_proc.iter().sum();
    let ex: u64 = rs.iter().map(|r| r.tp_ex).sum();
    let changes: u64 = rs.iter().map(|r| r.tp_changes).sum();
    // Jain's index compares processes that do the same thing: with one
    // writer, the readers among themselves.
    let fair: Vec<u64> = match s.mix {
        Mix::OneWriter => per_proc.iter().skip(1).copied().collect(),
        _ => per_proc.clone(),
    };
    let mut row = Row::failed(target, s, String::new());
    row.error = None;
    row.acq_per_s = total as f64 / tp.as_secs_f64();
    // With a single writer the exclusive owner never changes.
    row.changed = (ex > 0 && s.mix != Mix::OneWriter).then(|| changes as f64 / ex as f64);
    row.jain = if fair.len() >= 2 { jain(&fair) } else { None };
    for r in rs {
        row.handoff.merge(&r.handoff);
        row.wait_ex.merge(&r.wait_ex);
        row.wait_sh.merge(&r.wait_sh);
        row.owner_died += r.owner_died;
    }
    row.per_proc = per_proc;
    row
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_round_trip() {
        let mut r = WorkerResult {
            tp_ex: 5,
            tp_sh: 7,
            tp_changes: 2,
            lat_acq: 9,
            ..Default::default()
        };
        r.wait_ex.record(1234);
        r.handoff.record(99);
        let d = WorkerResult::decode(&r.encode()).unwrap();
        assert_eq!((d.tp_ex, d.tp_sh, d.tp_changes, d.lat_acq), (5, 7, 2, 9));
        assert_eq!(d.wait_ex.len(), 1);
        assert_eq!(d.handoff.max(), 99);
        assert_eq!(d.wait_sh.len(), 0);
    }

    #[test]
    fn mixes_pick_modes() {
        let mut rng = Rng::new(1);
        assert_eq!(pick(Mix::OneWriter, 0, &mut rng), Mode::Exclusive);
        assert_eq!(pick(Mix::OneWriter, 3, &mut rng), Mode::Shared);
        let ex = (0..10_000)
            .filter(|_| pick(Mix::Read90, 1, &mut rng) == Mode::Exclusive)
            .count();
        assert!((800..1200).contains(&ex), "{ex}");
    }
}
