//! `deadline`: how late every family's timed wait returns after its
//! deadline.
//!
//! Why it is measured here: the promise is that a `try_*_for(d)` on a lock
//! that stays held returns `TimedOut` within 5 ms after `d` (issue 10, item
//! 16). Lateness depends on the machine's load, so it is a benchmark
//! figure, never a timed test.
//!
//! How: a holder thread with its own handle (its own open file
//! description, mapping or lease handle) takes the lock and keeps it; the
//! measuring thread, with another handle, makes `trials` timed waits of
//! `wait_ms` each and notes how long after the deadline each returned. For
//! FileLock one more case: the waiting handle's other thread is blocked in
//! the kernel (in `write()`) while this thread makes a timed wait on the
//! same handle.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use interlock::{
    FileLock, FileSemaphore, Flavor, LeaseLock, LockSet, Mode, Semaphore, ShmMutex, ShmRwLock,
    TryLockError,
};

/// Options of the `deadline` subcommand.
#[derive(Clone, Debug, clap::Args)]
pub struct DeadlineArgs {
    /// Timed waits per case.
    #[arg(long, default_value_t = 60)]
    pub trials: usize,
    /// The timeout of each wait (milliseconds).
    #[arg(long, default_value_t = 10)]
    pub wait_ms: u64,
}

/// One case's figures.
pub struct Lateness {
    /// What was measured.
    pub case: String,
    /// Time from the deadline to the return, ns, sorted (0 if early).
    pub late_ns: Vec<u64>,
    /// Waits that returned before their deadline (a bug if not zero).
    pub early: usize,
}

impl Lateness {
    /// The q-quantile (nearest rank).
    pub fn late(&self, q: f64) -> u64 {
        if self.late_ns.is_empty() {
            return 0;
        }
        let i = ((self.late_ns.len() as f64 * q).ceil() as usize).clamp(1, self.late_ns.len());
        self.late_ns[i - 1]
    }
}

/// A thread that holds a lock until dropped.
struct Held {
    done: Option<mpsc::Sender<()>>,
    join: Option<JoinHandle<()>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

/// Runs `body` in a thread: it takes its lock, calls `ready`, and keeps
/// the lock until `done` is closed.
fn hold<F>(body: F) -> Result<Held>
where
    F: FnOnce(&dyn Fn(), &mpsc::Receiver<()>) -> Result<()> + Send + 'static,
{
    let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let join = std::thread::spawn(move || {
        let tx = ready_tx.clone();
        let r = body(&move || drop(tx.send(Ok(()))), &done_rx);
        if let Err(e) = r {
            let _ = ready_tx.send(Err(e));
        }
    });
    let held = Held {
        done: Some(done_tx),
        join: Some(join),
    };
    ready_rx
        .recv_timeout(Duration::from_secs(30))
        .context("the holder did not take its lock")??;
    Ok(held)
}

/// Keeps the holder's guard until the measurement is over.
fn wait_done(done: &mpsc::Receiver<()>) {
    let _ = done.recv();
}

/// One case: a name and a timed wait that must time out.
type WaitFn = Box<dyn FnMut(Duration) -> std::result::Result<(), String>>;

/// Everything the cases need alive while they are measured: the holders,
/// and the threads blocked in the kernel (joined after the holders let go).
#[derive(Default)]
struct Setup {
    cases: Vec<(String, WaitFn)>,
    holders: Vec<Held>,
    blocked: Vec<JoinHandle<interlock::Result<()>>>,
}

impl Setup {
    fn case(
        &mut self,
        name: impl Into<String>,
        f: impl FnMut(Duration) -> std::result::Result<(), String> + 'static,
    ) {
        self.cases.push((name.into(), Box::new(f)));
    }
}

/// `Ok(())` for a timeout, a message otherwise.
fn timed_out<T>(r: std::result::Result<T, TryLockError>) -> std::result::Result<(), String> {
    match r {
        Err(TryLockError::TimedOut) => Ok(()),
        Err(e) => Err(format!("{e}")),
        Ok(_) => Err("got the lock, which another handle holds".into()),
    }
}

fn file_lock(path: &std::path::Path, flavor: Flavor) -> Result<FileLock> {
    let mut o = FileLock::options();
    o.flavor(flavor);
    Ok(o.open(path)?)
}

fn file_cases(dir: &std::path::Path, s: &mut Setup) -> Result<()> {
    for (flavor, name) in [(Flavor::Fcntl, "fcntl"), (Flavor::Flock, "flock")] {
        let path = dir.join(format!("file-{name}.lock"));
        let p = path.clone();
        s.holders.push(hold(move |ready, done| {
            let l = file_lock(&p, flavor)?;
            let _g = l.write()?;
            ready();
            wait_done(done);
            Ok(())
        })?);
        let l = std::rc::Rc::new(file_lock(&path, flavor)?);
        let (a, b) = (l.clone(), l);
        s.case(format!("FileLock ({name}) try_write_for"), move |d| {
            timed_out(a.try_write_for(d))
        });
        s.case(format!("FileLock ({name}) try_read_for"), move |d| {
            timed_out(b.try_read_for(d))
        });
        // Another handle whose other thread is blocked in the kernel in
        // write(): this thread's timed waits park in the handle's
        // in-process layer.
        let l = std::sync::Arc::new(file_lock(&path, flavor)?);
        s.blocked.push({
            let l = l.clone();
            std::thread::spawn(move || l.write().map(drop))
        });
        let (a, b) = (l.clone(), l);
        s.case(
            format!("FileLock ({name}) try_read_for, other thread blocked in kernel"),
            move |d| timed_out(a.try_read_for(d)),
        );
        s.case(
            format!("FileLock ({name}) try_write_for, other thread blocked in kernel"),
            move |d| timed_out(b.try_write_for(d)),
        );
    }
    Ok(())
}

fn other_cases(dir: &std::path::Path, s: &mut Setup) -> Result<()> {
    let path = dir.join("set.lock");
    let p = path.clone();
    s.holders.push(hold(move |ready, done| {
        let s = LockSet::open(&p)?;
        s.lock(0..4, Mode::Exclusive)?;
        ready();
        wait_done(done);
        Ok(())
    })?);
    let set = std::rc::Rc::new(LockSet::open(&path)?);
    let (a, b) = (set.clone(), set);
    s.case("LockSet lock_for (exclusive)", move |d| {
        timed_out(a.lock_for(1, Mode::Exclusive, d))
    });
    s.case("LockSet lock_for (shared)", move |d| {
        timed_out(b.lock_for(2, Mode::Shared, d))
    });

    let path = dir.join("shm-rw");
    let p = path.clone();
    s.holders.push(hold(move |ready, done| {
        let l = ShmRwLock::open(&p)?;
        let _g = l.write();
        ready();
        wait_done(done);
        Ok(())
    })?);
    let l = std::rc::Rc::new(ShmRwLock::open(&path)?);
    let (a, b) = (l.clone(), l);
    s.case("ShmRwLock try_write_for", move |d| {
        timed_out(a.try_write_for(d))
    });
    s.case("ShmRwLock try_read_for", move |d| {
        timed_out(b.try_read_for(d))
    });

    let path = dir.join("shm-mutex");
    let p = path.clone();
    s.holders.push(hold(move |ready, done| {
        let m = ShmMutex::open(&p)?;
        let _g = m.lock();
        ready();
        wait_done(done);
        Ok(())
    })?);
    let m = ShmMutex::open(&path)?;
    s.case("ShmMutex try_lock_for", move |d| {
        timed_out(m.try_lock_for(d))
    });

    let path = dir.join("job");
    let p = path.clone();
    s.holders.push(hold(move |ready, done| {
        let l = LeaseLock::new(&p, Duration::from_secs(60))?;
        let _g = l.lock()?;
        ready();
        wait_done(done);
        Ok(())
    })?);
    let l = LeaseLock::new(&path, Duration::from_secs(60))?;
    s.case("LeaseLock try_lock_for", move |d| {
        timed_out(l.try_lock_for(d))
    });

    let path = dir.join("sem");
    let p = path.clone();
    s.holders.push(hold(move |ready, done| {
        let s = Semaphore::open(&p, 1)?;
        let _g = s.acquire();
        ready();
        wait_done(done);
        Ok(())
    })?);
    let sem = Semaphore::open(&path, 1)?;
    s.case("Semaphore try_acquire_for", move |d| {
        timed_out(sem.try_acquire_for(d))
    });

    let path = dir.join("file-sem.lock");
    let p = path.clone();
    s.holders.push(hold(move |ready, done| {
        let s = FileSemaphore::open(&p, 2)?;
        let _a = s.acquire()?;
        let _b = s.acquire()?;
        ready();
        wait_done(done);
        Ok(())
    })?);
    let fsem = FileSemaphore::open(&path, 2)?;
    s.case("FileSemaphore try_acquire_for", move |d| {
        timed_out(fsem.try_acquire_for(d))
    });
    Ok(())
}

/// Measures every case. The trials go round-robin over the cases (and the
/// floor, `thread::sleep`), so that a burst of load on the machine falls
/// on all of them alike.
pub fn measure_all(a: &DeadlineArgs) -> Result<Vec<Lateness>> {
    let dir = tempfile::tempdir().context("temporary directory")?;
    let mut s = Setup::default();
    s.case("floor: thread::sleep", |d| {
        std::thread::sleep(d);
        Ok(())
    });
    file_cases(dir.path(), &mut s)?;
    other_cases(dir.path(), &mut s)?;
    // Give the blocked threads time to get into the kernel (a bench).
    std::thread::sleep(Duration::from_millis(50));
    let d = Duration::from_millis(a.wait_ms);
    let mut out: Vec<Lateness> = s
        .cases
        .iter()
        .map(|(name, _)| Lateness {
            case: name.clone(),
            late_ns: Vec::with_capacity(a.trials),
            early: 0,
        })
        .collect();
    for _ in 0..a.trials {
        for ((name, wait), l) in s.cases.iter_mut().zip(out.iter_mut()) {
            let t = Instant::now();
            wait(d).map_err(|e| anyhow!("{name}: {e}"))?;
            match t.elapsed().checked_sub(d) {
                Some(x) => l.late_ns.push(x.as_nanos() as u64),
                None => {
                    l.early += 1;
                    l.late_ns.push(0);
                }
            }
        }
    }
    for l in &mut out {
        l.late_ns.sort_unstable();
    }
    drop(s.cases);
    drop(s.holders);
    for b in s.blocked {
        b.join().map_err(|_| anyhow!("blocked writer panicked"))??;
    }
    Ok(out)
}

/// The markdown table.
pub fn table(v: &[Lateness]) -> String {
    use crate::report::fmt_ns;
    let mut s = String::from(
        "| timed wait on a held lock | late after deadline: p50 | p99 | max | over 5 ms | early |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    for c in v {
        let over = c.late_ns.iter().filter(|&&n| n > 5_000_000).count();
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} of {} | {} |\n",
            c.case,
            fmt_ns(c.late(0.5)),
            fmt_ns(c.late(0.99)),
            fmt_ns(c.late(1.0)),
            over,
            c.late_ns.len(),
            c.early
        ));
    }
    s
}

/// The `deadline` subcommand: prints the table.
pub fn run(a: DeadlineArgs) -> Result<()> {
    let before = crate::report::loadavg();
    let v = measure_all(&a)?;
    println!(
        "load average {before} before, {} after; {} waits of {} ms per case\n",
        crate::report::loadavg(),
        a.trials,
        a.wait_ms
    );
    print!("{}", table(&v));
    Ok(())
}
