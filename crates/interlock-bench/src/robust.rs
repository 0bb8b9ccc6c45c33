//! `robust`: measures the kernel mechanism that lets a blocked shared-memory
//! waiter learn of its holder's death without waking periodically (see
//! docs/design-shm.md, "Waiting without waking").
//!
//! A holder process links a *liveness word* (its tid) into its thread's
//! robust list, using glibc's own entry layout, in between two robust
//! pthread mutexes it also holds (locked and unlocked around the link, so
//! glibc rewrites our entry's neighbour pointers and we rewrite its). A
//! waiter thread in this process sleeps in `futex_waitv` on a stand-in for
//! the lock's state word and on the liveness word (with FUTEX_WAITERS set).
//! The holder is SIGKILLed; the kernel walks the dead thread's list, flags
//! the word FUTEX_OWNER_DIED and wakes the waiter. Reported: the time from
//! `kill` to the waiter running (p50/p99/max), how often the holder was not
//! yet a zombie at that moment (what a /proc liveness check would then see),
//! the waiter's wake-ups and CPU per second of waiting, whether both pthread
//! mutexes still reported EOWNERDEAD (glibc's list survived our entry), and
//! a control round with the entry not linked (the waiter must *not* be
//! woken: the check catches a broken mechanism).

use crate::sys::{self, PthreadMutex, RobustWord, SharedPage, WaitvOutcome, FUTEX_OWNER_DIED};
use crate::sys::{FUTEX_WAITERS, PTHREAD_SLOT};
use anyhow::{bail, Context};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

/// Stand-in for the lock's state word (never changes: only death wakes).
const STATE: usize = 0;
/// The liveness word; its list entry is at `LIVE - futex_offset - 8`.
const LIVE: usize = 256;
const M1: usize = 512;
const M2: usize = M1 + PTHREAD_SLOT;
/// The holder stores 1 here when it holds everything.
const READY: usize = 1024;
const PAGE: usize = 4096;

#[derive(clap::Args)]
pub struct RobustArgs {
    /// Kill rounds measured.
    #[arg(long, default_value_t = 100)]
    rounds: usize,
    /// How long the waiter sleeps before the holder is killed, in ms.
    #[arg(long, default_value_t = 20)]
    hold_ms: u64,
    /// Length of the one round that measures the cost of waiting, in ms.
    #[arg(long, default_value_t = 1000)]
    cost_ms: u64,
}

#[derive(clap::Args)]
pub struct RobustHolderArgs {
    #[arg(long)]
    page: PathBuf,
    /// Link the liveness word (the control round does not).
    #[arg(long)]
    link: bool,
    /// Hold everything in a second thread (the main thread just sleeps).
    #[arg(long)]
    thread: bool,
}

/// The holder: two robust pthread mutexes and the liveness word, linked in
/// glibc's list in mixed order; then it waits to be killed.
pub fn holder(a: RobustHolderArgs) -> anyhow::Result<()> {
    if a.thread {
        let t = std::thread::spawn(move || hold(&a));
        return t
            .join()
            .map_err(|_| anyhow::anyhow!("holder thread panicked"))?;
    }
    hold(&a)
}

fn hold(a: &RobustHolderArgs) -> anyhow::Result<()> {
    let page = Arc::new(SharedPage::attach(&a.page)?);
    let m1 = PthreadMutex::attach(&page, M1);
    let m2 = PthreadMutex::attach(&page, M2);
    let tid = sys::gettid();
    m1.lock()?;
    let mut live = if a.link {
        Some(RobustWord::link(&page, LIVE).context("linking the liveness word")?)
    } else {
        None
    };
    m2.lock()?; // glibc enqueues in front of our entry (writes its prev)
    m1.unlock()?; // glibc dequeues behind it (writes its next)
    if let Some(w) = live.take() {
        w.unlink(); // ours, between glibc's entries
        live = Some(RobustWord::link(&page, LIVE)?);
    }
    m1.lock()?; // list: head, m1, ours, m2
    page.u32_at(LIVE)
        .store(tid, std::sync::atomic::Ordering::SeqCst);
    let ready = page.u32_at(READY);
    ready.store(1, std::sync::atomic::Ordering::SeqCst);
    sys::futex_wake(ready, i32::MAX);
    std::mem::forget(live);
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

fn thread_cost() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
    let sw = status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let sched = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let ns = sched
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (sw, ns)
}

/// Whether thread `tid` of `pid` is gone, a zombie, or exiting (PF_EXITING,
/// 0x4, in the flags field of /proc/PID/task/TID/stat).
fn thread_exiting(pid: u32, tid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")) {
        Err(_) => true,
        Ok(s) => {
            let rest = s.rfind(')').map_or("", |i| &s[i + 1..]);
            let f: Vec<&str> = rest.split_whitespace().collect();
            // After the comm: state is field 3, flags field 9.
            matches!(f.first(), Some(&("Z" | "X")))
                || f.get(6).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) & 0x4 != 0
        }
    }
}

fn alive_not_zombie(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(s) => {
            let rest = s.rfind(')').map_or("", |i| &s[i + 1..]);
            !matches!(rest.trim_start().as_bytes().first(), Some(b'Z' | b'X'))
        }
    }
}

struct Round {
    outcome: WaitvOutcome,
    latency_ns: u64,
    waited_ns: u64,
    switches: u64,
    cpu_ns: u64,
    live: u32,
    not_zombie: bool,
    /// From the waiter running to /proc showing a zombie (0 if it already did).
    confirm_ns: u64,
    /// The holder *thread* was gone, a zombie or PF_EXITING when the waiter ran.
    exiting: bool,
    mutexes_owner_died: bool,
}

fn round(
    dir: &std::path::Path,
    n: usize,
    link: bool,
    thread: bool,
    hold: Duration,
) -> anyhow::Result<Round> {
    let path = dir.join(format!("robust-{n}"));
    let page = Arc::new(SharedPage::create(&path, PAGE)?);
    PthreadMutex::init(&page, M1, true)?;
    PthreadMutex::init(&page, M2, true)?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("robust-holder").arg("--page").arg(&path);
    if link {
        cmd.arg("--link");
    }
    if thread {
        cmd.arg("--thread");
    }
    let mut child = cmd.stdin(Stdio::null()).spawn()?;
    let pid = child.id();
    let ready = page.u32_at(READY);
    let t0 = sys::now_ns();
    while ready.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        if sys::now_ns() - t0 > 30_000_000_000 {
            let _ = child.kill();
            bail!("the holder did not get ready");
        }
        sys::futex_wait(ready, 0, Some(Duration::from_millis(100)));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let p2 = page.clone();
    let timeout = if link {
        Duration::from_secs(10)
    } else {
        hold + Duration::from_millis(300)
    };
    let waiter = std::thread::spawn(move || {
        let live = p2.u32_at(LIVE);
        let state = p2.u32_at(STATE);
        let tid = live.load(std::sync::atomic::Ordering::SeqCst);
        let _ = live.compare_exchange(
            tid,
            tid | FUTEX_WAITERS,
            std::sync::atomic::Ordering::SeqCst,
            std::sync::atomic::Ordering::SeqCst,
        );
        let before = thread_cost();
        let start = sys::now_ns();
        let _ = tx.send(());
        let outcome = sys::futex_waitv(&[(state, 0), (live, tid | FUTEX_WAITERS)], timeout);
        let woke = sys::now_ns();
        let not_zombie = alive_not_zombie(pid);
        let exiting = thread_exiting(pid, tid & 0x3fff_ffff);
        // What confirming the death by /proc would add: poll until the
        // holder is a zombie (or gone).
        let mut confirmed = woke;
        if not_zombie {
            while alive_not_zombie(pid) && sys::now_ns() - woke < 1_000_000_000 {
                std::thread::sleep(Duration::from_micros(50));
            }
            confirmed = sys::now_ns();
        }
        let after = thread_cost();
        (
            outcome,
            start,
            woke,
            after.0 - before.0,
            after.1 - before.1,
            not_zombie,
            confirmed - woke,
            exiting,
        )
    });
    rx.recv()?;
    std::thread::sleep(hold);
    let killed = sys::now_ns();
    sys::kill(pid, libc::SIGKILL)?;
    let (outcome, start, woke, switches, cpu_ns, not_zombie, confirm_ns, exiting) =
        waiter
            .join()
            .map_err(|_| anyhow::anyhow!("waiter panicked"))?;
    child.wait()?;
    let m1 = PthreadMutex::attach(&page, M1).probe_owner_died()?;
    let m2 = PthreadMutex::attach(&page, M2).probe_owner_died()?;
    Ok(Round {
        outcome,
        latency_ns: woke.saturating_sub(killed),
        waited_ns: woke - start,
        switches,
        cpu_ns,
        live: page.u32_at(LIVE).load(std::sync::atomic::Ordering::SeqCst),
        not_zombie,
        confirm_ns,
        exiting,
        mutexes_owner_died: m1 == Some(true) && m2 == Some(true),
    })
}

/// Round trips per second between two threads that always sleep on a turn
/// word (no spinning), with FUTEX_WAIT or (`two`) futex_waitv on the turn
/// word and an idle second word.
fn ping_pong(dir: &std::path::Path, two: bool) -> anyhow::Result<f64> {
    const ROUNDS: u32 = 20_000;
    let page = Arc::new(SharedPage::create(
        &dir.join(format!("pingpong-{two}")),
        PAGE,
    )?);
    let run = move |page: Arc<SharedPage>, me: u32| {
        let turn = page.u32_at(0);
        let idle = page.u32_at(64);
        for _ in 0..ROUNDS {
            loop {
                let t = turn.load(std::sync::atomic::Ordering::SeqCst);
                if t == me {
                    break;
                }
                if two {
                    sys::futex_waitv(&[(turn, t), (idle, 0)], Duration::from_secs(10));
                } else {
                    sys::futex_wait(turn, t, Some(Duration::from_secs(10)));
                }
            }
            turn.store(1 - me, std::sync::atomic::Ordering::SeqCst);
            sys::futex_wake(turn, 1);
        }
    };
    let p2 = page.clone();
    let t0 = sys::now_ns();
    let other = std::thread::spawn(move || run(p2, 1));
    run(page, 0);
    other
        .join()
        .map_err(|_| anyhow::anyhow!("ping-pong thread panicked"))?;
    Ok(f64::from(ROUNDS) / ((sys::now_ns() - t0) as f64 / 1e9))
}

fn pct(v: &mut [u64], q: f64) -> f64 {
    v.sort_unstable();
    v[((v.len() - 1) as f64 * q).round() as usize] as f64 / 1e6
}

pub fn probe(a: RobustArgs) -> anyhow::Result<bool> {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let dir = tempfile::Builder::new()
        .prefix("interlock-robust")
        .tempdir_in("/dev/shm")?;
    let mut ok = true;
    println!("robust-futex death notice (load before: {})", load.trim());
    // Control: not linked, so the kernel has nothing to flag.
    let c = round(
        dir.path(),
        0,
        false,
        false,
        Duration::from_millis(a.hold_ms),
    )?;
    let control_ok = c.outcome == WaitvOutcome::TimedOut
        && c.live & FUTEX_OWNER_DIED == 0
        && c.mutexes_owner_died;
    println!(
        "control (entry not linked): waiter {:?}, word {:#x}, pthread robust mutexes EOWNERDEAD: {} -> {}",
        c.outcome,
        c.live,
        c.mutexes_owner_died,
        if control_ok { "as expected" } else { "UNEXPECTED" }
    );
    ok &= control_ok;
    // The cost of waiting, over one long wait.
    let w = round(dir.path(), 1, true, false, Duration::from_millis(a.cost_ms))?;
    let secs = w.waited_ns as f64 / 1e9;
    println!(
        "waiting cost: waited {:.2} s, {} wake-ups ({:.1}/s), {:.3} ms CPU/s, {:?}",
        secs,
        w.switches,
        w.switches as f64 / secs,
        w.cpu_ns as f64 / 1e6 / secs,
        w.outcome
    );
    let mut lat = Vec::new();
    let mut confirm = Vec::new();
    let (mut on_live, mut flagged, mut glibc_ok, mut not_zombie) = (0, 0, 0, 0);
    let mut exiting = 0;
    for n in 0..a.rounds {
        // Every other round, the holder is a second thread of its process.
        let r = round(
            dir.path(),
            n + 2,
            true,
            n % 2 == 1,
            Duration::from_millis(a.hold_ms),
        )?;
        lat.push(r.latency_ns);
        confirm.push(r.latency_ns + r.confirm_ns);
        on_live += usize::from(r.outcome == WaitvOutcome::Woken(1));
        flagged += usize::from(r.live & FUTEX_OWNER_DIED != 0);
        glibc_ok += usize::from(r.mutexes_owner_died);
        not_zombie += usize::from(r.not_zombie);
        exiting += usize::from(r.exiting);
    }
    let n = a.rounds;
    if n > 0 {
        let max = *lat.iter().max().unwrap_or(&0) as f64 / 1e6;
        println!("(holder: the main thread in even rounds, a second thread in odd ones)");
        println!(
            "SIGKILL to waiter running, n={n}: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.99),
            max
        );
        println!(
            "SIGKILL to /proc showing the holder dead (what a confirming waiter waits), n={n}: \
             p50 {:.3} ms, p99 {:.3} ms",
            pct(&mut confirm, 0.5),
            pct(&mut confirm, 0.99)
        );
        println!(
            "woken on the liveness word: {on_live}/{n}; word flagged OWNER_DIED: {flagged}/{n}; \
             both pthread robust mutexes EOWNERDEAD: {glibc_ok}/{n}; holder not yet a zombie \
             when the waiter ran: {not_zombie}/{n}; holder thread gone, a zombie or \
             PF_EXITING then: {exiting}/{n}"
        );
        ok &= on_live == n && flagged == n && glibc_ok == n;
    }
    // What sleeping on two words costs a handoff: two threads alternate on
    // a turn word, sleeping with FUTEX_WAIT or with futex_waitv on {turn,
    // an idle liveness word} (what a waiter would do), 3 runs each,
    // interleaved.
    let mut best = [0f64; 2];
    for _ in 0..3 {
        for (i, two) in [false, true].into_iter().enumerate() {
            best[i] = best[i].max(ping_pong(dir.path(), two)?);
        }
    }
    println!(
        "handoff between two threads sleeping on the futex, best of 3: FUTEX_WAIT {:.0} k/s, \
         futex_waitv on 2 words {:.0} k/s ({:.2}x)",
        best[0] / 1e3,
        best[1] / 1e3,
        best[1] / best[0]
    );
    // The asymmetric fence a draining writer would issue before sleeping
    // (docs/design-shm.md, item 8): its cost per call.
    match sys::membarrier(sys::MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED) {
        Err(e) => println!("membarrier: not available ({e})"),
        Ok(()) => {
            let mut t = Vec::with_capacity(1000);
            for _ in 0..1000 {
                let t0 = sys::now_ns();
                sys::membarrier(sys::MEMBARRIER_CMD_GLOBAL_EXPEDITED)?;
                t.push(sys::now_ns() - t0);
            }
            println!(
                "membarrier(GLOBAL_EXPEDITED), n=1000: p50 {:.1} µs, p99 {:.1} µs",
                pct(&mut t, 0.5) * 1e3,
                pct(&mut t, 0.99) * 1e3
            );
        }
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load after: {}", load.trim());
    Ok(ok)
}
