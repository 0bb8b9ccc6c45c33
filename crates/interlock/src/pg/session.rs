//! One server session: the connection, its prepared statements, and the
//! heartbeat that notices when a held lock is lost.
//!
//! Why it is built this way: PostgreSQL's advisory locks are reentrant per
//! session, so a session shared by two owners would let both "hold" one
//! lock. A [`Session`] therefore has exactly one owner at a time (a
//! [`super::PgLock`]'s idle pool, or one guard), and is moved, never shared.
//!
//! The sync client makes progress only while someone calls it, so a held
//! lock whose session was terminated, whose server restarted, or whose
//! network was cut would otherwise stay "held" in the holder's mind forever.
//! Each session has one long-lived heartbeat thread (started once, parked
//! while the session holds nothing, so an uncontended lock and unlock pay
//! no thread start) that, while a guard holds the session, sends an empty
//! query every `lease / 4` with a time-out of `lease / 4`. The server ends a
//! held session that stays idle for `lease` (`idle_session_timeout`, set by
//! the acquisition), and the client counts the lock as held only until
//! `lease / 2` after the *sending* of the last answered heartbeat, which the
//! server received no earlier; so a holder stops believing it holds the
//! lock at least `lease / 2` before the server may give it to someone else.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, MappedMutexGuard, Mutex, MutexGuard};
use postgres::{Client, NoTls, Statement};

use super::{pg_error, sql, PgKey as Key, PgOptions};
use crate::{Error, ErrorKind, Mode, Result};

/// How many keys' last tokens a session remembers.
const LAST_KEYS: usize = 32;

/// What a held guard and the heartbeat thread share.
pub(crate) struct Held {
    pub(crate) lost: AtomicBool,
    last_ok: Mutex<Instant>,
    lease: Duration,
    opts: PgOptions,
    what: String,
}

impl Held {
    fn new(opts: &PgOptions, what: String) -> Held {
        Held {
            lost: AtomicBool::new(false),
            last_ok: Mutex::new(Instant::now()),
            lease: opts.lease,
            opts: opts.clone(),
            what,
        }
    }

    pub(crate) fn lost_error(&self, op: &'static str, detail: impl Into<String>) -> Error {
        Error::new(ErrorKind::LeaseLost, op)
            .with_path(&self.what)
            .with_detail(detail)
    }

    /// Marks the lock lost and tells the callback, the first time only.
    pub(crate) fn lose(&self, err: &Error) {
        if !self.lost.swap(true, Ordering::SeqCst) {
            if let Some(cb) = &self.opts.on_lost {
                cb(err);
            }
        }
    }

    /// `Ok` while the lock counts as held.
    pub(crate) fn check(&self) -> Result<()> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(self.lost_error("check lock", "the server session was lost"));
        }
        let since = self.last_ok.lock().elapsed();
        if since > self.lease / 2 {
            let err = self.lost_error(
                "check lock",
                format!(
                    "no heartbeat answered for {since:?} (lease {:?}): the server may have ended the session",
                    self.lease
                ),
            );
            self.lose(&err);
            return Err(err);
        }
        Ok(())
    }
}

struct Beat {
    /// The guards holding locks on this session (one, except for a
    /// [`super::PgSession`] holding several keys).
    held: Vec<(Key, Arc<Held>)>,
    stop: bool,
    /// The thread waits for a first holder (untimed): only then does
    /// [`Session::hold`] wake it.
    parked: bool,
}

/// The part of a session the heartbeat thread also uses.
struct Link {
    /// `None` only while the link is dropped (see `Drop for Link`).
    client: Mutex<Option<Client>>,
    /// The session failed or its state is unknown: never reuse it, and
    /// close it without waiting (see `Drop for Link`).
    dead: AtomicBool,
    beat: Mutex<Beat>,
    cv: Condvar,
    every: Duration,
}

impl Link {
    fn client(&self) -> MappedMutexGuard<'_, Client> {
        MutexGuard::map(self.client.lock(), |c| {
            c.as_mut().expect("the client is taken only on drop")
        })
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let Some(client) = self.client.get_mut().take() else {
            return;
        };
        if !self.dead.load(Ordering::SeqCst) {
            return drop(client);
        }
        // Closing the client waits for the answers still owed to it (the
        // client sends Terminate only then), which a cut-off server never
        // sends: close it on a thread of its own, which ends when the
        // socket fails (tcp_user_timeout), so that a release never hangs
        // on a dead network. The client itself moves to that thread: were
        // the thread given only a reference to the link, whichever owner
        // dropped the link last would do the waiting (a CI run saw an
        // `unlock` hang when the closing thread finished first).
        let slot = Arc::new(Mutex::new(Some(client)));
        let theirs = Arc::clone(&slot);
        let spawned = std::thread::Builder::new()
            .name("interlock-pg-close".into())
            .spawn(move || drop(theirs.lock().take()));
        if spawned.is_err() {
            // No thread (the closure was dropped unrun): leak the
            // connection rather than hang.
            std::mem::forget(slot.lock().take());
        }
    }
}

/// One server session with exactly one owner.
pub(crate) struct Session {
    link: Arc<Link>,
    thread: Option<JoinHandle<()>>,
    backend: i32,
    /// This session's id for token batches (drawn by the server at
    /// connect; see `sql.rs`).
    sid: String,
    /// The last token this session got for each key it has locked: a try
    /// passes it back, and the server issues the next one without a write
    /// while the key's batch is still this session's.
    last: Mutex<Vec<(Key, i64)>>,
    acquire: Statement,
    try_acquire: Statement,
    release: Statement,
    /// Whether the session may go back to the idle pool.
    pub(crate) reusable: bool,
}

/// What an acquisition statement came back with.
pub(crate) enum Grant {
    Granted { token: u64, backend: i32 },
    NotGranted,
}

impl Session {
    pub(crate) fn connect(cfg: &postgres::Config, opts: &PgOptions, what: &str) -> Result<Session> {
        let mut client = cfg
            .connect(NoTls)
            .map_err(|e| pg_error("connect to PostgreSQL", what, &e))?;
        let row = client
            .query_one(sql::PROBE, &[])
            .map_err(|e| pg_error("connect to PostgreSQL", what, &e))?;
        let backend: i32 = row.get(0);
        let installed: bool = row.get(1);
        let sid: String = row.get(2);
        if !installed {
            let key = super::name_key(sql::SCHEMA_KEY_NAME);
            client
                .batch_execute(&sql::INSTALL.replace("$KEY", &key.to_string()))
                .map_err(|e| {
                    let kind = pg_error("install", what, &e).kind();
                    Error::new(kind, "install interlock's table and functions")
                        .with_path(what)
                        .with_detail(format!(
                            "{} (the first user of a database needs CREATE on its schema)",
                            describe(&e)
                        ))
                })?;
        }
        let acquire = client
            .prepare(sql::ACQUIRE)
            .map_err(|e| pg_error("prepare lock statement", what, &e))?;
        let try_acquire = client
            .prepare(sql::TRY_ACQUIRE)
            .map_err(|e| pg_error("prepare lock statement", what, &e))?;
        let release = client
            .prepare(sql::RELEASE)
            .map_err(|e| pg_error("prepare unlock statement", what, &e))?;
        let link = Arc::new(Link {
            client: Mutex::new(Some(client)),
            dead: AtomicBool::new(false),
            beat: Mutex::new(Beat {
                held: Vec::new(),
                stop: false,
                parked: false,
            }),
            cv: Condvar::new(),
            every: opts.lease / 4,
        });
        let l = Arc::clone(&link);
        let thread = std::thread::Builder::new()
            .name("interlock-pg-heartbeat".into())
            .spawn(move || heartbeat(l))
            .map_err(|e| Error::io("start heartbeat thread", e).with_path(what))?;
        Ok(Session {
            link,
            thread: Some(thread),
            backend,
            sid,
            last: Mutex::new(Vec::new()),
            acquire,
            try_acquire,
            release,
            reusable: true,
        })
    }

    /// The server process serving this session.
    pub(crate) fn backend(&self) -> i32 {
        self.backend
    }

    /// Sends the acquisition. `wait_ms < 0` tries once.
    pub(crate) fn acquire(
        &self,
        key: &Key,
        mode: Mode,
        wait_ms: i32,
        lease_ms: i32,
    ) -> std::result::Result<Grant, postgres::Error> {
        let (k1, k2) = key.pair();
        let shared = mode == Mode::Shared;
        let mut client = self.link.client();
        let row = if wait_ms < 0 {
            let prev = self.last_token(key);
            client.query_one(
                &self.try_acquire,
                &[
                    &key.space(),
                    &key.fence_key(),
                    &k1,
                    &k2,
                    &shared,
                    &lease_ms,
                    &self.sid,
                    &prev,
                ],
            )?
        } else {
            client.query_one(
                &self.acquire,
                &[
                    &key.space(),
                    &key.fence_key(),
                    &k1,
                    &k2,
                    &shared,
                    &wait_ms,
                    &lease_ms,
                    &self.sid,
                ],
            )?
        };
        drop(client);
        let token: Option<i64> = row.get(0);
        let backend: i32 = row.get(1);
        Ok(match token {
            Some(t) => {
                self.set_last_token(key, t);
                Grant::Granted {
                    token: t as u64,
                    backend,
                }
            }
            None => Grant::NotGranted,
        })
    }

    fn last_token(&self, key: &Key) -> Option<i64> {
        let last = self.last.lock();
        last.iter().find(|(k, _)| k == key).map(|&(_, t)| t)
    }

    fn set_last_token(&self, key: &Key, token: i64) {
        let mut last = self.last.lock();
        match last.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = token,
            None => {
                // A PgSession may lock many keys: remember the newest few
                // (a forgotten key's next try only writes a new batch).
                if last.len() == LAST_KEYS {
                    last.remove(0);
                }
                last.push((*key, token));
            }
        }
    }

    /// Sends the release; `Ok(false)` if the session did not hold it.
    pub(crate) fn release(
        &self,
        key: &Key,
        mode: Mode,
        last: bool,
    ) -> std::result::Result<bool, postgres::Error> {
        let (k1, k2) = key.pair();
        let shared = mode == Mode::Shared;
        let row = self.link.client().query_one(
            &self.release,
            &[&key.space(), &key.fence_key(), &k1, &k2, &shared, &last],
        )?;
        // NULL only for a space other than 1 and 2, which keys never have.
        Ok(row.get::<_, Option<bool>>(0).unwrap_or(false))
    }

    /// What cancels the statement this session runs (from another thread).
    pub(crate) fn cancel_token(&self) -> postgres::CancelToken {
        self.link.client().cancel_token()
    }

    /// Runs `f` on the client (for inspection queries).
    pub(crate) fn with_client<T>(&self, f: impl FnOnce(&mut Client) -> T) -> T {
        f(&mut self.link.client())
    }

    /// Starts heartbeats for a lock just granted.
    pub(crate) fn hold(&self, key: Key, opts: &PgOptions, what: String) -> Arc<Held> {
        let held = Arc::new(Held::new(opts, what));
        let mut b = self.link.beat.lock();
        b.held.push((key, Arc::clone(&held)));
        // Wake the thread only if it is parked: if it is waiting out an
        // interval, it beats at that interval's end (at most `lease / 4`
        // from now), so a lock taken and released again and again costs
        // no thread wake-up.
        if b.parked {
            b.parked = false;
            self.link.cv.notify_all();
        }
        held
    }

    /// Stops heartbeats for `held` (before its release is sent); returns
    /// whether no other guard holds a lock on this session.
    pub(crate) fn unhold(&self, held: &Arc<Held>) -> bool {
        // The thread is not woken: at its interval's end it finds nothing
        // held and parks.
        let mut b = self.link.beat.lock();
        b.held.retain(|(_, h)| !Arc::ptr_eq(h, held));
        b.held.is_empty()
    }

    /// Whether a guard holds `key` on this session.
    pub(crate) fn holds_key(&self, key: &Key) -> bool {
        self.link.beat.lock().held.iter().any(|(k, _)| k == key)
    }

    /// Closes the session without waiting for anything: used in a forked
    /// child, where the connection belongs to the parent. Leaks the client
    /// (its socket stays open until the child exits) rather than send a
    /// Terminate message on the parent's connection.
    pub(crate) fn abandon(mut self) {
        self.thread.take();
        std::mem::forget(self);
    }
}

impl Session {
    /// Marks the session unusable: it is closed when its owner drops it.
    pub(crate) fn kill(&self) {
        self.link.dead.store(true, Ordering::SeqCst);
    }

    /// Whether the session failed or was marked unusable.
    pub(crate) fn is_dead(&self) -> bool {
        self.link.dead.load(Ordering::SeqCst)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.link.beat.lock().stop = true;
        self.link.cv.notify_all();
        if let Some(t) = self.thread.take() {
            // Bounded: a heartbeat in flight gives up after lease / 4.
            let _ = t.join();
        }
        // The link, dropped with the session's last reference, closes
        // the client (on a thread of its own if the session is dead).
    }
}

fn heartbeat(link: Arc<Link>) {
    let timeout = link.every.max(Duration::from_millis(1));
    loop {
        // Park until something is held (or the session is closing), then
        // wait one interval: holds and releases meanwhile do not wake the
        // thread (only a hold while parked, and the session's close, do).
        // At the interval's end, beat if anything is held, else park. So a
        // guard is first beaten for at most `lease / 4` after its grant,
        // and then every `lease / 4` after the previous answer.
        {
            let mut b = link.beat.lock();
            while !b.stop && b.held.is_empty() {
                b.parked = true;
                link.cv.wait(&mut b);
            }
            b.parked = false;
            let deadline = Instant::now() + link.every;
            while !b.stop && !link.cv.wait_until(&mut b, deadline).timed_out() {}
            if b.stop {
                return;
            }
            if b.held.is_empty() {
                continue;
            }
        }
        let sent = Instant::now();
        let res = link.client().is_valid(timeout);
        // Only the guards that held before the heartbeat was sent count.
        let mut b = link.beat.lock();
        match res {
            Ok(()) => {
                for (_, h) in &b.held {
                    let mut last = h.last_ok.lock();
                    if sent > *last {
                        *last = sent;
                    }
                }
            }
            Err(e) => {
                link.dead.store(true, Ordering::SeqCst);
                let lost: Vec<Arc<Held>> = b.held.drain(..).map(|(_, h)| h).collect();
                drop(b);
                for held in lost {
                    let err = held.lost_error(
                        "heartbeat",
                        format!("the server session was lost: {}", describe(&e)),
                    );
                    held.lose(&err);
                }
            }
        }
    }
}

/// A postgres error in words: the server's message and SQLSTATE, or the
/// client's (with its cause).
pub(crate) fn describe(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        );
    }
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
