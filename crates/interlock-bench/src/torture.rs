//! The fault harness: processes take a lock in a loop, check exclusion
//! inside the critical section, and are SIGKILLed at random, often while
//! holding.
//!
//! Why it is built this way (the occupancy check must neither invent nor
//! hide violations):
//!
//! - Each worker owns one *slot* in the shared page and publishes its state
//!   there: IDLE, WAITING (with the time the wait began) or HOLDING (shared
//!   or exclusive). HOLDING is stored after the lock is acquired and cleared
//!   before it is released, so a live slot that reads HOLDING is inside the
//!   critical section. A holder stores its state, issues a SeqCst fence and
//!   then reads every other slot (Dekker's pattern): of two holders that
//!   overlap, at least one sees the other. It checks again just before it
//!   releases.
//! - A killed holder leaves its HOLDING mark behind, and for kernel locks
//!   the lock is released at its death, so a new holder may legitimately
//!   enter before the parent has reaped the corpse and cleared the slot.
//!   The killer therefore (1) SIGSTOPs the victim and waits until it is
//!   stopped, which freezes its slot (a stopped HOLDING victim really holds
//!   the lock), (2) reads the clock and stores that time in the slot's
//!   `kill_ns`, (3) sends SIGKILL and reaps, (4) clears the state to IDLE
//!   and only then `kill_ns` to 0, and (5) respawns the slot. A checker
//!   reads `kill_ns` *before* the state; a conflicting HOLDING mark is
//!   ignored as stale only if `kill_ns != 0` and the checker acquired the
//!   lock at or after `kill_ns`. Anything else is counted as a violation:
//!   if the checker acquired before `kill_ns`, the victim was alive and
//!   (frozen) holding at that moment, so the overlap was real.
//! - The one blind spot: a lock that wrongly admits a new holder in the
//!   microseconds between the SIGKILL and the victim's exit is not caught
//!   (the victim is already condemned). For a semaphore (capacity N > 1)
//!   the victim is ignored from the moment it is frozen, because a checker
//!   that entered beside it may legitimately be joined by a new holder
//!   once the victim's death frees its permit; and since a scan of the
//!   slots is no snapshot, the semaphore check reads every slot twice and
//!   counts only holders whose hold parity shows they held throughout (see
//!   `check_capacity`). Its states IDLE-before-release and
//!   acquired-before-HOLDING are also not visible; both windows are a few
//!   instructions long.
//! - Stalls: an acquirer computes how long the lock had been free while
//!   someone waited: from max(last release or holder's death, earliest
//!   live waiter's wait start) to its own acquisition. Recovery after a
//!   holder's death is the time from that holder's SIGKILL to the next
//!   acquisition that conflicts with what it held. At the end the parent
//!   also measures any stall still open (a wedged lock never ends one).

use std::fs::File;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use interlock::Mode;

use crate::contention::{spin, Rng};
use crate::page::{self, state, Page, Phase};
use crate::report::fmt_ns;
use crate::sys::{self, now_ns, SharedPage};
use crate::targets::{self, Ctx, Group, Impl, Target};

/// Options of the `torture` subcommand.
#[derive(Clone, Debug, clap::Args)]
pub struct TortureArgs {
    /// Target to torture (see `interlock-bench list`).
    #[arg(long, required_unless_present = "all")]
    pub kind: Option<String>,
    /// Every interlock family, plus the kernel-lock floors as a check of
    /// the harness itself.
    #[arg(long, conflicts_with = "kind")]
    pub all: bool,
    /// Worker processes.
    #[arg(long, default_value_t = 8)]
    pub procs: usize,
    /// Length of the run per target.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Fail if a stall or a recovery after a holder's death exceeds this.
    #[arg(long, default_value_t = 100)]
    pub stall_bound_ms: u64,
    /// Longest hold inside the critical section (µs; uniform 0..=this).
    #[arg(long, default_value_t = 20)]
    pub hold_max_us: u64,
    /// Share of shared acquisitions (%), for targets with a shared mode.
    #[arg(long, default_value_t = 30)]
    pub shared_pct: u64,
    /// Shortest pause between kills (ms).
    #[arg(long, default_value_t = 5)]
    pub kill_min_ms: u64,
    /// Longest pause between kills (ms).
    #[arg(long, default_value_t = 40)]
    pub kill_max_ms: u64,
    /// Share of kills aimed at a current holder (%).
    #[arg(long, default_value_t = 75)]
    pub kill_holder_pct: u64,
    /// Random seed of the killer.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Arguments of the hidden `torture-worker` subcommand.
#[derive(Clone, Debug, clap::Args)]
pub struct TortureWorkerArgs {
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
    /// Slot index.
    #[arg(long)]
    pub idx: usize,
    /// Number of slots.
    #[arg(long)]
    pub procs: usize,
    /// Longest hold (ns).
    #[arg(long)]
    pub hold_max_ns: u64,
    /// Share of shared acquisitions (%).
    #[arg(long)]
    pub shared_pct: u64,
    /// Seed.
    #[arg(long)]
    pub seed: u64,
}

fn held_mode(s: u64) -> Option<Mode> {
    match s {
        state::HOLD_EX => Some(Mode::Exclusive),
        state::HOLD_SH => Some(Mode::Shared),
        _ => None,
    }
}

/// Scans the other slots from inside the critical section; returns whether
/// another live holder was seen (any mode). `capacity` is how many may hold
/// exclusively at once (N for a semaphore): a violation is a conflicting
/// holder for a lock, more than N exclusive holders for a semaphore.
fn check(p: &Page<'_>, me: usize, n: usize, mode: Mode, t_acq: u64, capacity: usize) -> bool {
    if capacity > 1 {
        return check_capacity(p, me, n, capacity);
    }
    let mut others = false;
    for j in (0..n).filter(|&j| j != me) {
        let k = p.slot(j, page::S_KILL_NS).load(Ordering::SeqCst);
        let s = p.slot(j, page::S_STATE).load(Ordering::SeqCst);
        let Some(m) = held_mode(s) else { continue };
        if k != 0 && k <= t_acq {
            // A holder killed before we acquired: its mark is stale.
            p.g(page::T_STALE_IGNORED).fetch_add(1, Ordering::Relaxed);
            continue;
        }
        others = true;
        if mode.conflicts_with(m) {
            p.g(page::T_VIOLATIONS).fetch_add(1, Ordering::SeqCst);
            let code = ((me as u64 + 1) << 16) | (j as u64 + 1);
            let _ = p.g(page::T_FIRST_VIOLATION).compare_exchange(
                0,
                code,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
        }
    }
    others
}

/// The check for a semaphore (capacity N > 1): more than N holders at one
/// instant is a violation. A scan of the slots one after another is no
/// snapshot (a holder seen in slot 1 may have left, and its permit gone to
/// the holder seen next in slot 2), so the slots are read twice: a slot whose
/// hold parity was odd and unchanged in both passes held throughout, and all
/// such slots held together at the instant between the passes (the checker
/// itself holds throughout). A slot under a kill at either pass, or killed
/// in between, is left out: its death may have freed its permit for a new
/// holder while its mark still says HOLDING. Counts only holders it can
/// prove overlapped, so it never reports a violation that did not happen.
fn check_capacity(p: &Page<'_>, me: usize, n: usize, capacity: usize) -> bool {
    let read = |j: usize| {
        (
            p.slot(j, page::S_KILLS).load(Ordering::SeqCst),
            p.slot(j, page::S_KILL_NS).load(Ordering::SeqCst),
            p.slot(j, page::S_HOLD_SEQ).load(Ordering::SeqCst),
        )
    };
    let mut first = [(0u64, 0u64, 0u64); page::MAX_SLOTS];
    for (j, f) in first.iter_mut().enumerate().take(n) {
        if j != me {
            *f = read(j);
        }
    }
    let mut others = false;
    let mut holding = 1;
    let mut last = me;
    for j in (0..n).filter(|&j| j != me) {
        let (c1, k1, q1) = first[j];
        let (c2, k2, q2) = read(j);
        if q1 % 2 == 0 && q2 % 2 == 0 {
            continue;
        }
        if k1 != 0 || k2 != 0 || c1 != c2 {
            p.g(page::T_STALE_IGNORED).fetch_add(1, Ordering::Relaxed);
            continue;
        }
        others = true;
        if q1 == q2 {
            holding += 1;
            last = j;
        }
    }
    if holding > capacity {
        p.g(page::T_VIOLATIONS).fetch_add(1, Ordering::SeqCst);
        let code = ((me as u64 + 1) << 16) | (last as u64 + 1);
        let _ = p.g(page::T_FIRST_VIOLATION).compare_exchange(
            0,
            code,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }
    others
}

fn mode_code(m: Mode) -> u64 {
    match m {
        Mode::Shared => 1,
        Mode::Exclusive => 2,
    }
}

/// Stall and recovery accounting, right after acquiring.
fn account(p: &Page<'_>, me: usize, n: usize, mode: Mode, t0: u64, t_acq: u64, others: bool) {
    // Recovery after a holder's death.
    let pk = p.g(page::T_PENDING_KILL).load(Ordering::SeqCst);
    if pk != 0 && t_acq >= pk {
        let pm = p.g(page::T_PENDING_MODE).load(Ordering::SeqCst);
        if (pm == mode_code(Mode::Exclusive) || mode == Mode::Exclusive)
            && p.g(page::T_PENDING_KILL)
                .compare_exchange(pk, 0, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            let r = t_acq - pk;
            p.g(page::T_RECOVERY_MAX).fetch_max(r, Ordering::SeqCst);
            p.g(page::T_RECOVERY_COUNT).fetch_add(1, Ordering::SeqCst);
            p.g(page::T_RECOVERY_SUM).fetch_add(r, Ordering::SeqCst);
            let i =
                p.g(page::T_REC_IDX).fetch_add(1, Ordering::SeqCst) as usize % page::T_REC_RING_LEN;
            p.g(page::T_REC_RING + 8 * i).store(r, Ordering::SeqCst);
        }
    }
    // Stall: the lock was free (nobody else holds now, and for an exclusive
    // acquisition nobody can) while someone waited.
    if mode == Mode::Exclusive || !others {
        let free_since = p.g(page::LAST_RELEASE).load(Ordering::SeqCst);
        let mut earliest = t0;
        for j in (0..n).filter(|&j| j != me) {
            let k = p.slot(j, page::S_KILL_NS).load(Ordering::SeqCst);
            let s = p.slot(j, page::S_STATE).load(Ordering::SeqCst);
            if k == 0 && (s == state::WAIT_EX || s == state::WAIT_SH) {
                earliest = earliest.min(p.slot(j, page::S_WAIT_START).load(Ordering::SeqCst));
            }
        }
        let start = free_since.max(earliest);
        if t_acq > start && free_since != 0 {
            p.g(page::T_STALL_MAX)
                .fetch_max(t_acq - start, Ordering::SeqCst);
        }
    }
}

/// The worker side (`interlock-bench torture-worker ...`).
pub fn worker(a: TortureWorkerArgs) -> Result<()> {
    let t = targets::by_name(&a.target).with_context(|| format!("unknown target {}", a.target))?;
    let Impl::Rust { open, .. } = t.imp else {
        bail!("{} is not a Rust target", a.target);
    };
    let shm = Arc::new(SharedPage::attach(&a.page).context("attach page")?);
    let p = Page(&shm);
    if p.g(0).load(Ordering::Acquire) != page::MAGIC {
        bail!("shared page has the wrong magic");
    }
    let ctx = Ctx {
        dir: a.dir.clone(),
        page: shm.clone(),
        shm_dir: a.shm_dir.clone(),
    };
    let mut h = open(&ctx)?;
    let me = a.idx;
    let slot = |f| p.slot(me, f);
    slot(page::S_PID).store(std::process::id() as u64, Ordering::SeqCst);
    slot(page::S_ACK).store(1, Ordering::SeqCst);
    let phase = p.phase();
    while phase.load(Ordering::Acquire) < Phase::Throughput as u32 {
        sys::futex_wait(phase, Phase::Setup as u32, Some(Duration::from_millis(100)));
    }
    let mut rng = Rng::new(a.seed ^ ((a.idx as u64 + 1) << 32) ^ std::process::id() as u64);
    while phase.load(Ordering::Acquire) < Phase::Stop as u32 {
        let mode = if t.shared && rng.next() % 100 < a.shared_pct {
            Mode::Shared
        } else {
            Mode::Exclusive
        };
        let hold = if a.hold_max_ns == 0 {
            0
        } else {
            rng.next() % (a.hold_max_ns + 1)
        };
        let t0 = now_ns();
        slot(page::S_WAIT_START).store(t0, Ordering::SeqCst);
        slot(page::S_STATE).store(
            if mode == Mode::Exclusive {
                state::WAIT_EX
            } else {
                state::WAIT_SH
            },
            Ordering::SeqCst,
        );
        let died = h.run(mode, &mut || {
            let t_acq = now_ns();
            slot(page::S_STATE).store(
                if mode == Mode::Exclusive {
                    state::HOLD_EX
                } else {
                    state::HOLD_SH
                },
                Ordering::SeqCst,
            );
            slot(page::S_HOLD_SEQ).fetch_add(1, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            let others = check(&p, me, a.procs, mode, t_acq, t.capacity);
            account(&p, me, a.procs, mode, t0, t_acq, others);
            slot(page::S_ACQ).fetch_add(1, Ordering::Relaxed);
            spin(hold);
            check(&p, me, a.procs, mode, t_acq, t.capacity);
            p.g(page::LAST_RELEASE)
                .fetch_max(now_ns(), Ordering::SeqCst);
            slot(page::S_HOLD_SEQ).fetch_add(1, Ordering::SeqCst);
            slot(page::S_STATE).store(state::IDLE, Ordering::SeqCst);
        });
        match died {
            Ok(true) => {
                p.g(page::T_OWNER_DIED).fetch_add(1, Ordering::Relaxed);
            }
            Ok(false) => {}
            Err(e) => {
                slot(page::S_STATE).store(state::IDLE, Ordering::SeqCst);
                p.g(page::T_ERRORS).fetch_add(1, Ordering::SeqCst);
                return Err(e.context("acquire"));
            }
        }
    }
    slot(page::S_STATE).store(state::IDLE, Ordering::SeqCst);
    Ok(())
}

/// The outcome of torturing one target.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Target name.
    pub target: String,
    /// Acquisitions completed.
    pub acquisitions: u64,
    /// SIGKILLs sent.
    pub kills: u64,
    /// ... of which to a process holding the lock.
    pub kills_holding: u64,
    /// Violation detections (each overlap may be seen by both holders).
    pub violations: u64,
    /// First violation: (checker slot, other slot).
    pub first_violation: Option<(u64, u64)>,
    /// Stale marks of killed holders ignored.
    pub stale_ignored: u64,
    /// Longest stall (ns), including one still open at the end.
    pub stall_max: u64,
    /// Recoveries after a holder's death: count, max, mean, p50, p99 (ns).
    pub recoveries: (u64, u64, u64, u64, u64),
    /// A holder's death never recovered from, for this long at the end (ns).
    pub unrecovered: u64,
    /// Workers that failed on their own (errors).
    pub worker_errors: u64,
    /// First worker error message.
    pub first_error: Option<String>,
    /// Workers still blocked when told to stop.
    pub wedged: u64,
    /// Acquisitions that reported a dead previous owner.
    pub owner_died: u64,
    /// The bound (ns).
    pub bound: u64,
    /// Run length.
    pub seconds: f64,
}

impl Outcome {
    /// Whether the run passed.
    pub fn passed(&self) -> bool {
        self.violations == 0
            && self.worker_errors == 0
            && self.wedged == 0
            && self.stall_max <= self.bound
            && self.recoveries.1 <= self.bound
            && self.unrecovered <= self.bound
    }

    /// Why it failed, in words.
    pub fn failures(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.violations > 0 {
            v.push(format!("{} exclusion violations", self.violations));
        }
        if self.stall_max > self.bound {
            v.push(format!("stall of {}", fmt_ns(self.stall_max)));
        }
        if self.recoveries.1 > self.bound {
            v.push(format!("recovery took {}", fmt_ns(self.recoveries.1)));
        }
        if self.unrecovered > self.bound {
            v.push(format!(
                "a dead holder's lock was not recovered for {}",
                fmt_ns(self.unrecovered)
            ));
        }
        if self.worker_errors > 0 {
            v.push(format!(
                "{} worker errors ({})",
                self.worker_errors,
                self.first_error.as_deref().unwrap_or("?")
            ));
        }
        if self.wedged > 0 {
            v.push(format!("{} workers still blocked at the end", self.wedged));
        }
        v
    }

    /// The one-paragraph summary printed per target.
    pub fn summary(&self) -> String {
        let (n, max, mean, p50, p99) = self.recoveries;
        let rec = if n == 0 {
            "none measured".to_string()
        } else {
            format!(
                "n={n} p50 {} p99 {} mean {} max {}",
                fmt_ns(p50),
                fmt_ns(p99),
                fmt_ns(mean),
                fmt_ns(max)
            )
        };
        let verdict = if self.passed() {
            "PASS".to_string()
        } else {
            format!("FAIL: {}", self.failures().join("; "))
        };
        format!(
            "torture {}: {:.0} s: {} acquisitions, {} kills ({} while holding), {} violations \
             ({} stale marks of killed holders ignored), longest stall {}, recovery after a holder's death: {}; \
             dead-owner reports {}; {}",
            self.target,
            self.seconds,
            self.acquisitions,
            self.kills,
            self.kills_holding,
            self.violations,
            self.stale_ignored,
            fmt_ns(self.stall_max),
            rec,
            self.owner_died,
            verdict
        )
    }
}

struct Slot {
    pid: u32,
    alive: bool,
}

struct Pool<'a> {
    exe: PathBuf,
    target: &'a Target,
    page_path: PathBuf,
    dir: PathBuf,
    wait_dir: PathBuf,
    procs: usize,
    a: &'a TortureArgs,
    slots: Vec<Slot>,
    spawned: u64,
}

impl Pool<'_> {
    fn spawn(&mut self, i: usize) -> Result<()> {
        self.spawned += 1;
        let err = File::create(self.dir.join(format!("err-{i}-{}", self.spawned)))?;
        let child = Command::new(&self.exe)
            .arg("torture-worker")
            .arg("--target")
            .arg(self.target.name)
            .arg("--page")
            .arg(&self.page_path)
            .arg("--dir")
            .arg(&self.dir)
            .arg("--shm-dir")
            .arg(&self.wait_dir)
            .arg("--idx")
            .arg(i.to_string())
            .arg("--procs")
            .arg(self.procs.to_string())
            .arg("--hold-max-ns")
            .arg((self.a.hold_max_us * 1000).to_string())
            .arg("--shared-pct")
            .arg(self.a.shared_pct.to_string())
            .arg("--seed")
            .arg((self.a.seed.wrapping_mul(1000) + self.spawned).to_string())
            .env(interlock::REGISTRY_DIR_ENV, &self.wait_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .context("spawn torture worker")?;
        let pid = child.id();
        // We reap by pid ourselves (waitpid), so the Child handle is dropped
        // without waiting.
        drop(child);
        let s = Slot { pid, alive: true };
        if i < self.slots.len() {
            self.slots[i] = s;
        } else {
            self.slots.push(s);
        }
        Ok(())
    }

    fn last_error(&self) -> Option<String> {
        let mut newest: Option<(std::time::SystemTime, String)> = None;
        for e in std::fs::read_dir(&self.dir).ok()?.flatten() {
            if !e.file_name().to_string_lossy().starts_with("err-") {
                continue;
            }
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let Some(line) = text.lines().rev().find(|l| !l.trim().is_empty()) else {
                continue;
            };
            let m = e.metadata().and_then(|m| m.modified()).ok()?;
            if newest.as_ref().is_none_or(|(t, _)| m > *t) {
                newest = Some((m, line.chars().take(300).collect()));
            }
        }
        newest.map(|(_, l)| l)
    }
}

impl Drop for Pool<'_> {
    fn drop(&mut self) {
        for s in &mut self.slots {
            if s.alive {
                let _ = sys::kill(s.pid, libc::SIGKILL);
                let _ = sys::reap(s.pid);
                s.alive = false;
            }
        }
    }
}

/// The stall bound for `t`: the option's, except that a PostgreSQL lock is
/// allowed at least 500 ms (a grant is a server round trip and a wake-up of
/// the waiting server process, on a machine shared with the workers).
fn stall_bound_ms(t: &Target, a: &TortureArgs) -> u64 {
    if t.floor == targets::Floor::Pg {
        a.stall_bound_ms.max(500)
    } else {
        a.stall_bound_ms
    }
}

/// Tortures one target; never panics, errors are setup failures.
pub fn torture_one(t: &Target, a: &TortureArgs) -> Result<Outcome> {
    if !matches!(t.imp, Impl::Rust { .. }) {
        bail!(
            "{} runs in Python; the torture drives Rust targets only",
            t.name
        );
    }
    if a.procs < 2 || a.procs > page::MAX_SLOTS {
        bail!("--procs must be 2..={}", page::MAX_SLOTS);
    }
    let sc = crate::contention::scratch(&format!("torture-{}", t.name))?;
    let dir = sc.dir.clone();
    let shm = sc.page.clone();
    let page_path = shm.path().to_path_buf();
    let p = Page(&shm);
    let ctx = Ctx {
        dir: dir.clone(),
        page: shm.clone(),
        shm_dir: sc.wait_dir.clone(),
    };
    if let Impl::Rust { setup, .. } = t.imp {
        setup(&ctx).context("setup")?;
    }
    let mut pool = Pool {
        exe: std::env::current_exe()?,
        target: t,
        page_path: page_path.clone(),
        dir: dir.clone(),
        wait_dir: sc.wait_dir.clone(),
        procs: a.procs,
        a,
        slots: Vec::new(),
        spawned: 0,
    };
    for i in 0..a.procs {
        pool.spawn(i)?;
    }
    // Start together once every worker has opened the lock.
    let t_ready = Instant::now();
    while (0..a.procs).any(|i| p.slot(i, page::S_ACK).load(Ordering::SeqCst) == 0) {
        if t_ready.elapsed() > Duration::from_secs(30) {
            bail!(
                "workers did not start: {}",
                pool.last_error().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    p.phase().store(Phase::Throughput as u32, Ordering::SeqCst);
    sys::futex_wake(p.phase(), i32::MAX);

    let mut o = Outcome {
        target: t.name.to_string(),
        bound: stall_bound_ms(t, a) * 1_000_000,
        seconds: a.seconds,
        ..Outcome::default()
    };
    let mut rng = Rng::new(a.seed);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(a.seconds);
    loop {
        // Workers must never exit on their own: reap and respawn any that did.
        for i in 0..a.procs {
            if pool.slots[i].alive && sys::try_reap(pool.slots[i].pid)? {
                pool.slots[i].alive = false;
                o.worker_errors += 1;
                if o.first_error.is_none() {
                    o.first_error = pool.last_error();
                }
                p.slot(i, page::S_STATE)
                    .store(state::IDLE, Ordering::SeqCst);
                pool.spawn(i)?;
            }
        }
        let span = a.kill_max_ms.max(a.kill_min_ms) - a.kill_min_ms;
        let pause = a.kill_min_ms + if span > 0 { rng.next() % (span + 1) } else { 0 };
        let now = Instant::now();
        if now >= end {
            break;
        }
        std::thread::sleep(Duration::from_millis(pause).min(end - now));
        if Instant::now() >= end {
            break;
        }
        // Pick a victim, preferring a current holder: for a slow lock with
        // short holds, watch the slots for up to 20 ms to catch one.
        let want_holder = rng.next() % 100 < a.kill_holder_pct;
        let watch = Instant::now();
        let holders = loop {
            let h: Vec<usize> = (0..a.procs)
                .filter(|&i| held_mode(p.slot(i, page::S_STATE).load(Ordering::SeqCst)).is_some())
                .collect();
            if !h.is_empty() || !want_holder || watch.elapsed() > Duration::from_millis(20) {
                break h;
            }
            std::thread::yield_now();
        };
        let victim = if want_holder && !holders.is_empty() {
            holders[(rng.next() % holders.len() as u64) as usize]
        } else {
            (rng.next() % a.procs as u64) as usize
        };
        let pid = pool.slots[victim].pid;
        if !pool.slots[victim].alive {
            continue;
        }
        // (1) Freeze it.
        sys::kill(pid, libc::SIGSTOP)?;
        if sys::wait_stopped(pid)? == sys::StopWait::Exited {
            pool.slots[victim].alive = false;
            o.worker_errors += 1;
            if o.first_error.is_none() {
                o.first_error = pool.last_error();
            }
            p.slot(victim, page::S_STATE)
                .store(state::IDLE, Ordering::SeqCst);
            pool.spawn(victim)?;
            continue;
        }
        let frozen = p.slot(victim, page::S_STATE).load(Ordering::SeqCst);
        let held = held_mode(frozen);
        // (2) Condemn it, with the time.
        p.slot(victim, page::S_KILLS).fetch_add(1, Ordering::SeqCst);
        let t_kill = now_ns();
        p.slot(victim, page::S_KILL_NS)
            .store(t_kill, Ordering::SeqCst);
        if let Some(m) = held {
            o.kills_holding += 1;
            p.g(page::LAST_RELEASE).fetch_max(t_kill, Ordering::SeqCst);
            if p.g(page::T_PENDING_KILL).load(Ordering::SeqCst) == 0 {
                p.g(page::T_PENDING_MODE)
                    .store(mode_code(m), Ordering::SeqCst);
                p.g(page::T_PENDING_KILL).store(t_kill, Ordering::SeqCst);
            }
        }
        // (3) Kill and reap.
        sys::kill(pid, libc::SIGKILL)?;
        sys::reap(pid)?;
        pool.slots[victim].alive = false;
        o.kills += 1;
        // (4) Clear the state, then the condemnation.
        p.slot(victim, page::S_STATE)
            .store(state::IDLE, Ordering::SeqCst);
        let q = p.slot(victim, page::S_HOLD_SEQ).load(Ordering::SeqCst);
        if q % 2 == 1 {
            p.slot(victim, page::S_HOLD_SEQ)
                .store(q + 1, Ordering::SeqCst);
        }
        p.slot(victim, page::S_KILL_NS).store(0, Ordering::SeqCst);
        // (5) Respawn.
        pool.spawn(victim)?;
    }
    // A stall still open at the end (a wedged lock never closes one).
    let now = now_ns();
    let live = |i: usize| p.slot(i, page::S_KILL_NS).load(Ordering::SeqCst) == 0;
    let holding = (0..a.procs)
        .any(|i| live(i) && held_mode(p.slot(i, page::S_STATE).load(Ordering::SeqCst)).is_some());
    let earliest_wait = (0..a.procs)
        .filter(|&i| {
            live(i)
                && matches!(
                    p.slot(i, page::S_STATE).load(Ordering::SeqCst),
                    state::WAIT_EX | state::WAIT_SH
                )
        })
        .map(|i| p.slot(i, page::S_WAIT_START).load(Ordering::SeqCst))
        .min();
    let mut open_stall = 0;
    if let (false, Some(w)) = (holding, earliest_wait) {
        let since = p.g(page::LAST_RELEASE).load(Ordering::SeqCst).max(w);
        open_stall = now.saturating_sub(since);
    }
    let pk = p.g(page::T_PENDING_KILL).load(Ordering::SeqCst);
    if pk != 0 {
        o.unrecovered = now.saturating_sub(pk);
    }
    // Stop, and give workers a moment to finish their current acquisition.
    p.phase().store(Phase::Stop as u32, Ordering::SeqCst);
    sys::futex_wake(p.phase(), i32::MAX);
    let t_stop = Instant::now();
    while t_stop.elapsed() < Duration::from_secs(3) {
        let mut any = false;
        for s in pool.slots.iter_mut().filter(|s| s.alive) {
            if sys::try_reap(s.pid)? {
                s.alive = false;
            } else {
                any = true;
            }
        }
        if !any {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    o.wedged = pool.slots.iter().filter(|s| s.alive).count() as u64;
    drop(pool);

    o.acquisitions = (0..a.procs)
        .map(|i| p.slot(i, page::S_ACQ).load(Ordering::SeqCst))
        .sum();
    o.violations = p.g(page::T_VIOLATIONS).load(Ordering::SeqCst);
    let fv = p.g(page::T_FIRST_VIOLATION).load(Ordering::SeqCst);
    o.first_violation = (fv != 0).then(|| ((fv >> 16) - 1, (fv & 0xffff) - 1));
    o.stale_ignored = p.g(page::T_STALE_IGNORED).load(Ordering::SeqCst);
    o.stall_max = p
        .g(page::T_STALL_MAX)
        .load(Ordering::SeqCst)
        .max(open_stall);
    o.owner_died = p.g(page::T_OWNER_DIED).load(Ordering::SeqCst);
    let n = p.g(page::T_RECOVERY_COUNT).load(Ordering::SeqCst);
    let sum = p.g(page::T_RECOVERY_SUM).load(Ordering::SeqCst);
    let mut ring: Vec<u64> = (0..(n as usize).min(page::T_REC_RING_LEN))
        .map(|i| p.g(page::T_REC_RING + 8 * i).load(Ordering::SeqCst))
        .collect();
    ring.sort_unstable();
    let q = |f: f64| {
        ring.get(((ring.len() as f64 * f).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(0)
    };
    o.recoveries = (
        n,
        p.g(page::T_RECOVERY_MAX).load(Ordering::SeqCst),
        sum.checked_div(n).unwrap_or(0),
        q(0.5),
        q(0.99),
    );
    Ok(o)
}

/// The `torture` subcommand: returns whether every target passed.
pub fn torture(a: TortureArgs) -> Result<bool> {
    let list: Vec<Target> = if a.all {
        let all = targets::all();
        let fams: Vec<Target> = all
            .iter()
            // The Python package's rows belong to the Interlock group too,
            // but the torture drives Rust targets only.
            .filter(|t| t.group == Group::Interlock && !t.is_python())
            .cloned()
            .collect();
        if fams.is_empty() {
            eprintln!(
                "torture --all: no interlock family in this build; running the kernel floors only"
            );
        }
        fams.into_iter()
            .chain(
                all.into_iter()
                    .filter(|t| t.name == "floor-ofd" || t.name == "floor-flock"),
            )
            .collect()
    } else {
        let k = a.kind.as_deref().unwrap_or_default();
        vec![targets::by_name(k)
            .with_context(|| format!("unknown kind {k} (see `interlock-bench list`)"))?]
    };
    let (mut passed, mut failed) = (0, 0);
    for t in &list {
        match torture_one(t, &a) {
            Ok(o) => {
                println!("{}", o.summary());
                if let Some((x, y)) = o.first_violation {
                    println!("  first violation: slot {x} saw slot {y} holding");
                }
                if o.passed() {
                    passed += 1;
                } else {
                    failed += 1;
                }
            }
            Err(e) => {
                println!("torture {}: ERROR: {e:#}", t.name);
                failed += 1;
            }
        }
    }
    println!("torture: {passed} passed, {failed} failed");
    Ok(failed == 0)
}
