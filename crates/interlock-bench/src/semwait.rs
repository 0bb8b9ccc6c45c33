//! `sem-wait`: what a blocked semaphore waiter costs while it waits, and
//! how late it sees a freed permit.
//!
//! Why it is measured here: the file semaphore cannot sleep until *any* of
//! its N bytes is free (the kernel has no such wait), so it blocks on one
//! byte for at most a slice and then tries them all again
//! (crates/interlock/src/file/sem.rs). That costs wake-ups and CPU while
//! waiting, and a permit freed on another byte than the one the waiter
//! blocks on is seen up to a slice late. The shared-memory semaphore is
//! measured the same way beside it.
//!
//! How: one holder handle takes all N = 2 permits; a waiter thread with its
//! own handle (its own open file description, its own mapping) blocks in
//! `acquire`. Its thread's run count and CPU time come from
//! /proc/thread-self/schedstat (time on CPU in ns, number of times it
//! ran), read before and after the wait. For the lateness, the holder
//! frees one of its two permits (chosen at random) after the waiter has
//! blocked a while, and the waiter notes when its `acquire` returned.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use interlock::{FileSemaphore, Semaphore};

/// The permits of the measured semaphores.
const PERMITS: u32 = 2;

/// Options of the `sem-wait` subcommand.
#[derive(Clone, Debug, clap::Args)]
pub struct SemWaitArgs {
    /// How long the waiter waits in the idle phase (seconds).
    #[arg(long, default_value_t = 1.0)]
    pub seconds: f64,
    /// Release-to-acquire trials per family.
    #[arg(long, default_value_t = 100)]
    pub trials: usize,
}

/// One family's figures.
pub struct WaitCost {
    /// What was measured.
    pub family: &'static str,
    /// How many times the waiting thread ran, per second of waiting.
    pub runs_per_s: f64,
    /// CPU time of the waiting thread per second of waiting, microseconds.
    pub cpu_us_per_s: f64,
    /// Release-to-acquire lateness of each trial, ns, sorted.
    pub late_ns: Vec<u64>,
}

impl WaitCost {
    /// The q-quantile of the lateness (nearest rank).
    pub fn late(&self, q: f64) -> u64 {
        if self.late_ns.is_empty() {
            return 0;
        }
        let i = ((self.late_ns.len() as f64 * q).ceil() as usize).clamp(1, self.late_ns.len());
        self.late_ns[i - 1]
    }
}

/// A held permit of either family.
trait Held {}
impl<T> Held for T {}

trait Sem: Sync {
    fn take(&self) -> Result<Box<dyn Held + '_>>;
}

impl Sem for Semaphore {
    fn take(&self) -> Result<Box<dyn Held + '_>> {
        Ok(Box::new(self.acquire()))
    }
}

impl Sem for FileSemaphore {
    fn take(&self) -> Result<Box<dyn Held + '_>> {
        Ok(Box::new(self.acquire()?))
    }
}

/// (ns on CPU, times run) of the calling thread.
fn schedstat() -> Result<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat")
        .context("read /proc/thread-self/schedstat")?;
    let v: Vec<u64> = s
        .split_whitespace()
        .map(str::parse)
        .collect::<std::result::Result<_, _>>()
        .context("parse schedstat")?;
    match v[..] {
        [cpu, _, runs, ..] => Ok((cpu, runs)),
        _ => Err(anyhow!("schedstat: {s}")),
    }
}

struct Acquired {
    at: Instant,
    waited: Duration,
    cpu_ns: u64,
    runs: u64,
}

fn measure(
    family: &'static str,
    holder: &dyn Sem,
    waiter: &dyn Sem,
    idle: Duration,
    trials: usize,
) -> Result<WaitCost> {
    std::thread::scope(|s| {
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel::<Result<Acquired>>();
        let (rel_tx, rel_rx) = mpsc::channel::<()>();
        s.spawn(move || {
            for () in go_rx {
                let r = (|| {
                    let a = schedstat()?;
                    let t = Instant::now();
                    let g = waiter.take()?;
                    let at = Instant::now();
                    let b = schedstat()?;
                    Ok((
                        Acquired {
                            at,
                            waited: at - t,
                            cpu_ns: b.0 - a.0,
                            runs: b.1 - a.1,
                        },
                        g,
                    ))
                })();
                match r {
                    Ok((a, g)) => {
                        if done_tx.send(Ok(a)).is_err() {
                            return;
                        }
                        let _ = rel_rx.recv();
                        drop(g);
                    }
                    Err(e) => {
                        let _ = done_tx.send(Err(e));
                        return;
                    }
                }
            }
        });
        let mut held: Vec<Box<dyn Held + '_>> = Vec::new();
        for _ in 0..PERMITS {
            held.push(holder.take()?);
        }
        let mut round = |pause: Duration, which: usize| -> Result<(Instant, Acquired)> {
            go_tx.send(()).map_err(|_| anyhow!("waiter gone"))?;
            std::thread::sleep(pause);
            let t0 = Instant::now();
            drop(held.remove(which));
            let a = done_rx
                .recv_timeout(Duration::from_secs(10))
                .map_err(|_| {
                    anyhow!("{family}: the waiter did not get a freed permit in 10 s")
                })??;
            rel_tx.send(()).map_err(|_| anyhow!("waiter gone"))?;
            held.insert(which, holder.take()?);
            Ok((t0, a))
        };
        // The idle phase: one long wait.
        let (_, a) = round(idle, 0)?;
        let secs = a.waited.as_secs_f64();
        let runs_per_s = a.runs as f64 / secs;
        let cpu_us_per_s = a.cpu_ns as f64 / 1e3 / secs;
        // Lateness: many short waits, a random permit freed.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
        let mut late_ns = Vec::with_capacity(trials);
        for i in 0..trials {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let pause = Duration::from_millis(10 + (i as u64 % 7));
            let (t0, a) = round(pause, (x % u64::from(PERMITS)) as usize)?;
            late_ns.push(a.at.saturating_duration_since(t0).as_nanos() as u64);
        }
        late_ns.sort_unstable();
        drop(held);
        drop(go_tx);
        Ok(WaitCost {
            family,
            runs_per_s,
            cpu_us_per_s,
            late_ns,
        })
    })
}

/// Measures both semaphore families (N = 2) in a scratch directory.
pub fn measure_all(a: &SemWaitArgs) -> Result<Vec<WaitCost>> {
    let dir = tempfile::tempdir().context("scratch directory")?;
    let idle = Duration::from_secs_f64(a.seconds.max(0.05));
    let mut out = Vec::new();
    let p = dir.path().join("shm-sem");
    let (h, w) = (Semaphore::open(&p, PERMITS)?, Semaphore::open(&p, PERMITS)?);
    out.push(measure("Semaphore (shm)", &h, &w, idle, a.trials)?);
    let p = dir.path().join("file-sem");
    let (h, w) = (
        FileSemaphore::open(&p, PERMITS)?,
        FileSemaphore::open(&p, PERMITS)?,
    );
    out.push(measure("FileSemaphore", &h, &w, idle, a.trials)?);
    Ok(out)
}

/// The markdown table of [`measure_all`]'s figures.
pub fn table(v: &[WaitCost]) -> String {
    use crate::report::fmt_ns;
    let mut s = String::from(
        "| semaphore (N = 2) | waiter runs per s | waiter CPU per s | freed permit seen after: p50 | p90 | max | seen within 100 µs |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    for c in v {
        let fast = c.late_ns.iter().filter(|&&n| n <= 100_000).count();
        s.push_str(&format!(
            "| {} | {:.0} | {:.0} µs | {} | {} | {} | {} of {} |\n",
            c.family,
            c.runs_per_s,
            c.cpu_us_per_s,
            fmt_ns(c.late(0.5)),
            fmt_ns(c.late(0.9)),
            fmt_ns(c.late(1.0)),
            fast,
            c.late_ns.len()
        ));
    }
    s
}

/// The `sem-wait` subcommand: prints the table.
pub fn run(a: SemWaitArgs) -> Result<()> {
    let v = measure_all(&a)?;
    println!(
        "load average {}; idle wait {:.2} s, {} trials per family\n",
        crate::report::loadavg(),
        a.seconds,
        a.trials
    );
    print!("{}", table(&v));
    Ok(())
}
