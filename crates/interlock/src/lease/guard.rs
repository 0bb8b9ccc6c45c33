//! The held lease: renewal (explicit and in the background), loss
//! detection, release.
//!
//! Why it is built this way: lockbydir's holder never learned that its lock
//! had been broken; it went on writing as if it still held it. Here every
//! change a holder makes to its lease is a compare-and-swap rename of the
//! exact lease name it last wrote, done through a descriptor of its own lock
//! directory, so a renewal after a takeover can never resurrect the lease or
//! touch the new holder's directory: it fails with `ENOENT`, and the guard
//! reports [`ErrorKind::LeaseLost`] and calls the on-lost callback once.

use std::marker::PhantomData;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::{Condvar, Mutex};

use super::clock::{from_unix_nanos, nanos};
use super::record::LeaseName;
use super::{Inner, LeaseLock};
use crate::sys::dir::{rename_noreplace, Dir};
use crate::{Error, ErrorKind, Result};

/// A callback told, once per guard, that its lease was lost: broken by a
/// waiter after it expired, removed by hand, or expired while renewal
/// failed. Called on the thread that found out (the background renewer or
/// the caller of `renew`/`check`/`release`).
pub type OnLost = Arc<dyn Fn(&Error) + Send + Sync>;

/// A lease just acquired: the lock directory (by descriptor) and the name
/// of the lease file in it.
pub(crate) struct Held {
    pub dir: Dir,
    pub name: LeaseName,
}

struct State {
    dir: Dir,
    name: LeaseName,
    released: bool,
}

struct Shared {
    inner: Arc<Inner>,
    state: Mutex<State>,
    token: u64,
    lost: AtomicBool,
}

fn gone(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESTALE))
}

impl Shared {
    fn lost_error(&self, op: &'static str, detail: impl Into<String>) -> Error {
        Error::new(ErrorKind::LeaseLost, op)
            .with_path(&self.inner.path)
            .with_detail(detail)
    }

    /// Marks the lease lost and tells the callback, the first time only.
    fn lose(&self, err: &Error) {
        if !self.lost.swap(true, Ordering::SeqCst) {
            if let Some(cb) = &self.inner.opts.on_lost {
                cb(err);
            }
        }
    }

    fn renew(&self) -> Result<()> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(self.lost_error("renew lease", "the lease was already lost"));
        }
        let mut st = self.state.lock();
        if st.released {
            return Err(self.lost_error("renew lease", "the lease was released"));
        }
        let next = LeaseName {
            version: st.name.version + 1,
            expiry_ns: self.inner.expiry_from_now(),
            ..st.name
        };
        match st.dir.rename(st.name.render(), next.render()) {
            Ok(()) => {
                st.name = next;
                Ok(())
            }
            Err(e) if gone(&e) => {
                drop(st);
                let err = self.lost_error(
                    "renew lease",
                    "the lease was broken by a waiter or removed by hand",
                );
                self.lose(&err);
                Err(err)
            }
            Err(e) => Err(Error::io("renew lease", e).with_path(&self.inner.path)),
        }
    }

    fn check(&self) -> Result<()> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(self.lost_error("check lease", "the lease was lost"));
        }
        let st = self.state.lock();
        if st.released {
            return Err(self.lost_error("check lease", "the lease was released"));
        }
        match st.dir.contains(st.name.render()) {
            Ok(true) => {}
            Ok(false) => {
                drop(st);
                let err = self.lost_error(
                    "check lease",
                    "the lease was broken by a waiter or removed by hand",
                );
                self.lose(&err);
                return Err(err);
            }
            Err(e) => return Err(Error::io("check lease", e).with_path(&self.inner.path)),
        }
        if self.inner.now_ns() >= st.name.expiry_ns {
            return Err(self.lost_error(
                "check lease",
                "the lease expired; another host may take it over at any moment (renew to keep it)",
            ));
        }
        Ok(())
    }

    fn release(&self) -> Result<()> {
        let mut st = self.state.lock();
        if st.released {
            return Ok(());
        }
        st.released = true;
        // The compare-and-swap that ends the lease: moving the lease file
        // out (into an empty staging directory as the next acquisition's
        // staged lease, or else to `stage/` as its record) or renaming it
        // to a tombstone; each fails if it was broken. On any failure of
        // a move (the lease broken, `stage/` gone, the name taken), the
        // tombstone rename below tells what happened.
        let ended = if matches!(self.inner.release_into_stage(&st.dir, &st.name), Ok(true)) {
            Ok(())
        } else {
            let me = crate::sys::proc::current();
            let moved = self.inner.record_slot(me).and_then(|slot| {
                rename_noreplace(&st.dir, st.name.render(), &self.inner.stage, &slot)
                    .ok()
                    .map(|_| slot)
            });
            match moved {
                Some(slot) => {
                    self.inner.keep_record(me.pid, slot);
                    Ok(())
                }
                None => {
                    let tomb = st.name.tombstone();
                    let r = st.dir.rename(st.name.render(), tomb.render());
                    if r.is_ok() {
                        let _ = st.dir.unlink(tomb.render());
                    }
                    r
                }
            }
        };
        match ended {
            Ok(()) => {
                // The directory is ours, dead and empty now: remove it by
                // name; `rmdir` cannot remove anyone else's lease, because
                // a live lock directory is never empty.
                let _ = self.inner.parent.rmdir(&self.inner.name);
                if self.lost.load(Ordering::SeqCst) {
                    Err(self.lost_error(
                        "release lease",
                        "the lease had expired before it was released",
                    ))
                } else {
                    Ok(())
                }
            }
            Err(e) if gone(&e) => {
                drop(st);
                let err = self.lost_error(
                    "release lease",
                    "the lease was broken by a waiter or removed by hand before release",
                );
                self.lose(&err);
                Err(err)
            }
            Err(e) => Err(Error::io("release lease", e).with_path(&self.inner.path)),
        }
    }
}

/// The background renewer of one [`LeaseLock`] handle in one process: a
/// thread that renews the handle's kept-alive guards, reused by its
/// successive guards and ending after [`IDLE`] without one.
///
/// Why not a thread per guard: starting and joining one cost about 90 µs,
/// half of an uncontended acquire+release (docs/python.md). Why not one
/// thread for the process: a renewal that hangs (an NFS server away)
/// would then hold up the leases of every other lock.
#[derive(Default)]
pub(crate) struct Renewers {
    /// (pid that made it, its service): a forked child makes its own (the
    /// parent's thread is not in the child).
    svc: Mutex<Option<(u32, Arc<Service>)>>,
}

impl std::fmt::Debug for Renewers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Renewers").finish_non_exhaustive()
    }
}

/// How long a handle's renewer thread waits for a next guard before it ends.
const IDLE: Duration = Duration::from_secs(2);

struct Service {
    jobs: Mutex<Jobs>,
    cv: Condvar,
}

#[derive(Default)]
struct Jobs {
    list: Vec<Job>,
    next_id: u64,
    /// A thread runs [`renew_loop`] for this service.
    running: bool,
}

struct Job {
    id: u64,
    shared: Arc<Shared>,
    every: Duration,
    due: std::time::Instant,
}

/// A guard's place in its handle's renewer.
struct Renewer {
    svc: Arc<Service>,
    id: u64,
}

impl Renewers {
    /// Renews `shared` every `every` from the handle's thread (started if
    /// none runs). None if no thread could be started.
    fn add(&self, shared: Arc<Shared>, every: Duration) -> Option<Renewer> {
        let svc = {
            let mut slot = self.svc.lock();
            let pid = crate::sys::fork::pid();
            match &*slot {
                Some((p, svc)) if *p == pid => Arc::clone(svc),
                _ => {
                    // In a forked child the parent's service is left as it
                    // was (its lock may have been held by the parent's
                    // thread at the fork, and its jobs are the parent's).
                    if let Some(old) = slot.take() {
                        std::mem::forget(old);
                    }
                    let svc = Arc::new(Service {
                        jobs: Mutex::new(Jobs::default()),
                        cv: Condvar::new(),
                    });
                    *slot = Some((pid, Arc::clone(&svc)));
                    svc
                }
            }
        };
        let mut jobs = svc.jobs.lock();
        jobs.next_id += 1;
        let id = jobs.next_id;
        jobs.list.push(Job {
            id,
            shared,
            every,
            due: std::time::Instant::now() + every,
        });
        if !jobs.running {
            let s = Arc::clone(&svc);
            let spawned = std::thread::Builder::new()
                .name("interlock-lease-renew".into())
                .spawn(move || renew_loop(&s));
            if spawned.is_err() {
                jobs.list.retain(|j| j.id != id);
                return None;
            }
            jobs.running = true;
        }
        drop(jobs);
        svc.cv.notify_all();
        Some(Renewer { svc, id })
    }
}

impl Renewer {
    /// Stops renewing. A renewal already under way may still finish; it
    /// changes nothing once the guard is released (renewal and release
    /// take the guard's state lock, and a released lease is not renewed).
    fn stop(&self) -> Option<Job> {
        let mut jobs = self.svc.jobs.lock();
        let i = jobs.list.iter().position(|j| j.id == self.id)?;
        Some(jobs.list.swap_remove(i))
    }

    fn is_running(&self) -> bool {
        self.svc.jobs.lock().list.iter().any(|j| j.id == self.id)
    }
}

/// What a renewal asks of its job next.
enum Next {
    Again(Duration),
    Done,
}

fn renew_once(shared: &Shared, every: Duration) -> Next {
    match shared.renew() {
        Ok(()) => Next::Again(every),
        Err(e) if e.kind() == ErrorKind::LeaseLost => Next::Done,
        Err(e) => {
            // A transient failure (an NFS server away, say): retry
            // sooner, and declare the lease lost once it has run out.
            let expiry = shared.state.lock().name.expiry_ns;
            if shared.inner.now_ns() >= expiry {
                let err = shared.lost_error(
                    "renew lease",
                    format!("the lease expired while renewal kept failing: {e}"),
                );
                shared.lose(&err);
                return Next::Done;
            }
            Next::Again((every / 4).clamp(Duration::from_millis(1), Duration::from_millis(250)))
        }
    }
}

/// The renewer thread of one handle: renews each job when due; ends after
/// [`IDLE`] with no job.
fn renew_loop(svc: &Service) {
    let mut jobs = svc.jobs.lock();
    loop {
        let now = std::time::Instant::now();
        let first = jobs
            .list
            .iter()
            .enumerate()
            .min_by_key(|(_, j)| j.due)
            .map(|(i, j)| (i, j.due));
        match first {
            None => {
                if svc.cv.wait_for(&mut jobs, IDLE).timed_out() && jobs.list.is_empty() {
                    jobs.running = false;
                    return;
                }
            }
            Some((_, due)) if due > now => {
                svc.cv.wait_until(&mut jobs, due);
            }
            Some((i, _)) => {
                let (id, shared, every) = {
                    let j = &jobs.list[i];
                    (j.id, Arc::clone(&j.shared), j.every)
                };
                // Renew without the jobs' lock (a renewal may wait for the
                // file system); the clone is dropped there too, since the
                // last reference may drop the handle.
                let next = parking_lot::MutexGuard::unlocked(&mut jobs, || {
                    let n = renew_once(&shared, every);
                    drop(shared);
                    n
                });
                if let Some(k) = jobs.list.iter().position(|j| j.id == id) {
                    match next {
                        Next::Again(d) => jobs.list[k].due = std::time::Instant::now() + d,
                        Next::Done => {
                            let job = jobs.list.swap_remove(k);
                            parking_lot::MutexGuard::unlocked(&mut jobs, || drop(job));
                        }
                    }
                }
            }
        }
    }
}

/// A held [`LeaseLock`]; dropping it releases the lease.
///
/// The guard belongs to the process that acquired it: a child made by
/// `fork` gets a copy that does nothing when dropped (the record names the
/// parent, and the background renewer is a thread of the parent).
pub struct LeaseGuard<'a> {
    shared: Arc<Shared>,
    renewer: Option<Renewer>,
    pid: u32,
    _lock: PhantomData<&'a LeaseLock>,
}

impl<'a> LeaseGuard<'a> {
    pub(crate) fn new(lock: &LeaseLock, held: Held) -> LeaseGuard<'a> {
        let shared = Arc::new(Shared {
            inner: Arc::clone(&lock.inner),
            token: held.name.token,
            state: Mutex::new(State {
                dir: held.dir,
                name: held.name,
                released: false,
            }),
            lost: AtomicBool::new(false),
        });
        let mut g = LeaseGuard {
            shared,
            renewer: None,
            pid: crate::sys::fork::pid(),
            _lock: PhantomData,
        };
        if let Some(every) = lock.inner.opts.keep_alive {
            g.keep_alive(every);
        }
        g
    }

    /// The fencing token of this acquisition: strictly greater than the
    /// token of every earlier acquisition of the same lock, also across
    /// takeovers and crashes. Pass it to the resource the lock protects,
    /// which should refuse any request carrying a smaller token than one it
    /// has already seen (Kleppmann's fencing token, Chubby's sequencer).
    pub fn token(&self) -> u64 {
        self.shared.token
    }

    /// The lock directory's path.
    pub fn path(&self) -> &Path {
        &self.shared.inner.path
    }

    /// When the lease runs out unless renewed (by the lock's clock).
    pub fn expires(&self) -> SystemTime {
        from_unix_nanos(self.shared.state.lock().name.expiry_ns)
    }

    /// Extends the lease to a full time to live from now.
    ///
    /// Fails with [`ErrorKind::LeaseLost`] if the lease was broken (after it
    /// expired, or its owner was judged dead) or removed; a renewal after
    /// expiry succeeds if no one has taken the lease over meanwhile, since
    /// then no one else held it in between.
    pub fn renew(&self) -> Result<()> {
        self.shared.renew()
    }

    /// Whether this guard still holds the lease: it was not lost, its lease
    /// file is still in place, and it has not expired by the lock's clock.
    /// (Past expiry the lease may be taken over at any moment without this
    /// process being told, so an expired lease counts as not held.)
    pub fn is_held(&self) -> bool {
        self.check().is_ok()
    }

    /// As [`LeaseGuard::is_held`], with the reason: `Ok(())` or an error of
    /// kind [`ErrorKind::LeaseLost`] (or an I/O error if the lock directory
    /// could not be examined).
    pub fn check(&self) -> Result<()> {
        self.shared.check()
    }

    /// Starts renewing the lease from a background thread every `every`
    /// (until release); on a lost lease the thread calls the on-lost
    /// callback and stops. A second call does nothing.
    ///
    /// The thread is the handle's (one per [`LeaseLock`] and process,
    /// shared by its successive guards, ending 2 s after the last one).
    pub fn keep_alive(&mut self, every: Duration) {
        if self.renewer.is_some() {
            return;
        }
        let every = every.max(Duration::from_millis(1));
        self.renewer = self
            .shared
            .inner
            .renewers
            .add(Arc::clone(&self.shared), every);
    }

    /// Whether a background renewer is renewing this guard's lease (it
    /// stops once the lease is lost).
    pub fn is_kept_alive(&self) -> bool {
        self.renewer.as_ref().is_some_and(Renewer::is_running)
    }

    fn stop_renewer(&mut self) {
        if let Some(r) = self.renewer.take() {
            drop(r.stop());
        }
    }

    /// Releases the lease, reporting what drop has to swallow:
    /// [`ErrorKind::LeaseLost`] if it had been broken or had expired, or an
    /// I/O error.
    pub fn release(mut self) -> Result<()> {
        self.stop_renewer();
        self.shared.release()
    }
}

impl Drop for LeaseGuard<'_> {
    fn drop(&mut self) {
        if crate::sys::fork::pid() != self.pid {
            // A forked child's copy: the lease is the parent's.
            return;
        }
        self.stop_renewer();
        let _ = self.shared.release();
    }
}

impl std::fmt::Debug for LeaseGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseGuard")
            .field("path", &self.shared.inner.path)
            .field("token", &self.shared.token)
            .finish_non_exhaustive()
    }
}

/// Expiry is computed as now plus the time to live, on the lock's clock.
impl Inner {
    pub(crate) fn expiry_from_now(&self) -> u64 {
        self.now_ns().saturating_add(nanos(self.opts.ttl))
    }
}
