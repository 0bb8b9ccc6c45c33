//! `PgLock` and `PgMutex`: locks held in a PostgreSQL server (session-level
//! advisory locks), for processes on many machines; with fencing tokens and
//! loss detection. Behind the cargo feature `postgres`.
//!
//! Why it is built this way. PostgreSQL's advisory locks give the hard parts
//! for free: one lock manager that every client of a database shares, FIFO
//! queueing (a shared request waits behind a queued exclusive one, so
//! writers are not starved), shared and exclusive modes, a deadlock
//! detector, and release when a session ends. What they do not give, and
//! this module adds:
//!
//! 1. *Owners.* A server session is reentrant: the same session locking
//!    twice succeeds twice, and never conflicts with itself. So a session is
//!    never shared: each guard owns one session for as long as it holds the
//!    lock, and a [`PgLock`] keeps released sessions in a small idle pool
//!    for reuse (two threads holding the same `PgLock` use two sessions).
//! 2. *Fencing.* The server drops every advisory lock on restart or
//!    failover (they are not written to the WAL, so a standby has none). A
//!    holder may therefore lose its lock without having done anything, and
//!    a resource must be able to refuse it: every grant carries a token,
//!    strictly increasing per lock, kept in the table `interlock_fence` and
//!    issued by the same statement that takes the lock (see `sql.rs`). A
//!    session taking a key again, with no other session granted since,
//!    takes the next token of its own batch without a write, so the
//!    uncontended lock and unlock commit nothing.
//! 3. *Loss is never silent.* A heartbeat while held, and server-side
//!    session settings so that a cut-off holder's session is ended (and its
//!    lock released) within the lease; see `session.rs` for the argument.
//!    A guard that learns of the loss reports [`ErrorKind::LeaseLost`] from
//!    [`PgGuard::check`] and [`PgGuard::unlock`] and calls the `on_lost`
//!    callback once; nothing is re-acquired behind the caller's back.
//!
//! Keys. A lock is named by a string, hashed to one bigint key with
//! FNV-1a 64 (see [`PgKey::name`]), or by an explicit bigint or pair of
//! int4 keys, to share locks with other applications' `pg_advisory_lock`
//! calls. The bigint and the pair spaces are separate, as in PostgreSQL.
//! Locks are per database.
//!
//! Connection settings: a `postgres://` URL (or `key=value` string), with
//! the libpq environment variables (`PGHOST`, `PGPORT`, `PGUSER`,
//! `PGPASSWORD`, `PGDATABASE`, `PGAPPNAME`, `PGCONNECT_TIMEOUT`,
//! `PGOPTIONS`) filling in whatever it leaves out. TLS is not supported.
//!
//! Poolers: session locks behind a *transaction*-pooling proxy (PgBouncer
//! `pool_mode = transaction` or `statement`) are handed to strangers. Each
//! grant reports which server process granted it; if that is not the
//! process the session started on, the lock is released and the
//! acquisition fails with [`ErrorKind::Unsupported`]. A pooler with one
//! server connection cannot be detected that way: use a direct connection
//! or session pooling.
//!
//! Scope: per lock key and database, across threads, processes and hosts.
//! Not reentrant across guards: a second acquisition waits like anyone
//! else. Fork: a child's copies of guards and pools do nothing (the
//! connections are the parent's). Crash: the server ends the session when
//! its socket closes, releasing at once. Network cut or stopped holder:
//! released by the server after the lease of silence.

mod session;
mod sql;

/// The statements PgLock sends, for the benchmark floors (which send them
/// raw): not a stable API.
#[doc(hidden)]
pub use sql::{ACQUIRE, BATCH, RELEASE, SESSION_ID, TRY_ACQUIRE};

use crate::handle::Handle;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;

use session::{describe, Grant, Held, Session};

use crate::{Blocked, Error, ErrorKind, Lock, Mode, OnBlock, OnLost, Result, TryLockError, Wait};

/// FNV-1a 64 of `name`'s UTF-8 bytes, as a signed bigint key.
pub(crate) fn name_key(name: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h as i64
}

/// The advisory-lock key of a [`PgLock`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PgKey {
    /// One bigint key (`pg_advisory_lock(bigint)`).
    Int(i64),
    /// Two int4 keys (`pg_advisory_lock(int, int)`), a separate space.
    Pair(i32, i32),
}

impl PgKey {
    /// The key of a lock named by a string: FNV-1a 64 (offset basis
    /// `0xcbf29ce484222325`, prime `0x100000001b3`) of the name's UTF-8
    /// bytes, reinterpreted as a signed 64-bit integer. Stable across
    /// versions, so another program can compute the same key; e.g. `"a"` is
    /// `0xaf63dc4c8601ec8c` (`-5808556873153909620`).
    pub fn name(name: &str) -> PgKey {
        PgKey::Int(name_key(name))
    }

    fn space(&self) -> i16 {
        match self {
            PgKey::Int(_) => 1,
            PgKey::Pair(..) => 2,
        }
    }

    /// The key of the token row: the bigint, or the pair packed as
    /// `key1 << 32 | key2` (key2 as unsigned).
    fn fence_key(&self) -> i64 {
        match *self {
            PgKey::Int(k) => k,
            PgKey::Pair(a, b) => (i64::from(a) << 32) | i64::from(b as u32),
        }
    }

    /// The two int4 halves as passed to the pair functions.
    fn pair(&self) -> (i32, i32) {
        match *self {
            PgKey::Int(k) => ((k >> 32) as i32, k as i32),
            PgKey::Pair(a, b) => (a, b),
        }
    }

    /// `pg_locks`' `classid`, `objid`, `objsubid` for this key.
    fn pg_locks_ids(&self) -> (u32, u32, i16) {
        let (a, b) = self.pair();
        (a as u32, b as u32, self.space())
    }
}

impl From<i64> for PgKey {
    fn from(k: i64) -> PgKey {
        PgKey::Int(k)
    }
}

impl From<(i32, i32)> for PgKey {
    fn from((a, b): (i32, i32)) -> PgKey {
        PgKey::Pair(a, b)
    }
}

impl fmt::Display for PgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PgKey::Int(k) => write!(f, "{k}"),
            PgKey::Pair(a, b) => write!(f, "({a}, {b})"),
        }
    }
}

/// How a [`PgLock`] connects and behaves.
#[derive(Clone)]
pub struct PgOptions {
    url: Option<String>,
    lease: Duration,
    on_block: Option<OnBlock>,
    on_lost: Option<OnLost>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions::new()
    }
}

impl fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgOptions")
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl PgOptions {
    /// Defaults: connection settings from the libpq environment, a lease of
    /// 10 s.
    pub fn new() -> PgOptions {
        PgOptions {
            url: None,
            lease: Duration::from_secs(10),
            on_block: None,
            on_lost: None,
        }
    }

    /// Connection settings: a `postgres://user@host:port/db` URL or a
    /// libpq `key=value` string; the libpq environment fills in the rest.
    #[must_use]
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// The loss bound (default 10 s, at least 40 ms). While a lock is held,
    /// the holder sends a heartbeat every `lease / 4` that must be answered
    /// within `lease / 4`; it counts the lock as lost (and calls `on_lost`)
    /// once a heartbeat fails or none was answered for `lease / 2`. The
    /// server ends a holder's session that has been silent for `lease`
    /// (`idle_session_timeout`), which releases its lock; TCP keepalives
    /// and `tcp_user_timeout` are set on both ends within the same bound.
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Called once per acquisition just before it blocks.
    #[must_use]
    pub fn on_block(mut self, f: impl Fn(&Blocked<'_>) + Send + Sync + 'static) -> Self {
        self.on_block = Some(Arc::new(f));
        self
    }

    /// Called once per guard when it learns that its lock was lost (from the
    /// heartbeat thread, or from whichever call found out).
    #[must_use]
    pub fn on_lost(mut self, f: impl Fn(&Error) + Send + Sync + 'static) -> Self {
        self.on_lost = Some(Arc::new(f));
        self
    }
}

fn ms(d: Duration) -> i32 {
    let m = d.as_nanos().div_ceil(1_000_000);
    m.clamp(1, i32::MAX as u128) as i32
}

/// The client configuration: the URL, then the libpq environment, then
/// interlock's keepalive and session settings.
fn config(url: Option<&str>, lease: Duration, what: &str) -> Result<postgres::Config> {
    let bad = |d: String| {
        Error::new(
            ErrorKind::InvalidInput,
            "parse PostgreSQL connection settings",
        )
        .with_path(what)
        .with_detail(d)
    };
    let mut cfg = match url {
        Some(u) => u
            .parse::<postgres::Config>()
            .map_err(|e| bad(format!("{u:?}: {e}")))?,
        None => postgres::Config::new(),
    };
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if cfg.get_hosts().is_empty() {
        match env("PGHOST") {
            Some(h) => {
                for h in h.split(',') {
                    cfg.host(h);
                }
            }
            None => {
                cfg.host("/var/run/postgresql");
            }
        }
    }
    if cfg.get_ports().is_empty() {
        if let Some(p) = env("PGPORT") {
            let p = p
                .parse::<u16>()
                .map_err(|_| bad(format!("PGPORT={p:?} is not a port")))?;
            cfg.port(p);
        }
    }
    if cfg.get_user().is_none() {
        let user = env("PGUSER")
            .or_else(|| env("USER"))
            .or_else(|| env("LOGNAME"))
            .ok_or_else(|| bad("no user name: give one in the URL or PGUSER".into()))?;
        cfg.user(&user);
    }
    if cfg.get_password().is_none() {
        if let Some(p) = env("PGPASSWORD") {
            cfg.password(p);
        }
    }
    if cfg.get_dbname().is_none() {
        if let Some(d) = env("PGDATABASE") {
            cfg.dbname(&d);
        }
    }
    if cfg.get_application_name().is_none() {
        cfg.application_name(&env("PGAPPNAME").unwrap_or_else(|| "interlock".into()));
    }
    if cfg.get_connect_timeout().is_none() {
        let t = match env("PGCONNECT_TIMEOUT") {
            Some(t) => t
                .parse::<u64>()
                .map_err(|_| bad(format!("PGCONNECT_TIMEOUT={t:?} is not seconds")))?,
            None => 10,
        };
        if t > 0 {
            cfg.connect_timeout(Duration::from_secs(t.max(2)));
        }
    }
    if let Some(m) = env("PGSSLMODE") {
        if !matches!(m.as_str(), "disable" | "allow" | "prefer") {
            return Err(Error::new(ErrorKind::Unsupported, "connect to PostgreSQL")
                .with_path(what)
                .with_detail(format!(
                    "PGSSLMODE={m}: interlock's client does not speak TLS"
                )));
        }
    }
    // Keepalives on both ends, well inside the lease (whole seconds are the
    // kernel's unit for the idle and interval times).
    let quarter = (lease / 4).max(Duration::from_millis(10));
    let secs = quarter.as_secs().max(1);
    cfg.keepalives(true)
        .keepalives_idle(Duration::from_secs(secs))
        .keepalives_interval(Duration::from_secs(secs))
        .keepalives_retries(3)
        .tcp_user_timeout(lease / 2);
    let mut options = cfg
        .get_options()
        .map(str::to_string)
        .or_else(|| env("PGOPTIONS"))
        .unwrap_or_default();
    options.push_str(&format!(
        " -c tcp_keepalives_idle={secs} -c tcp_keepalives_interval={secs} \
         -c tcp_keepalives_count=3 -c tcp_user_timeout={}",
        ms(lease)
    ));
    cfg.options(options.trim());
    Ok(cfg)
}

/// An error from the client or the server, classified.
pub(crate) fn pg_error(op: &'static str, what: &str, e: &postgres::Error) -> Error {
    let kind = match e.code().map(|c| c.code()) {
        Some("55P03") | Some("57014") => ErrorKind::TimedOut,
        Some("40P01") => ErrorKind::Deadlock,
        Some("28000") | Some("28P01") | Some("42501") => ErrorKind::PermissionDenied,
        Some("3D000") => ErrorKind::NotFound,
        Some("IL001") => ErrorKind::LeaseLost,
        Some("22023") | Some("42601") => ErrorKind::InvalidInput,
        _ => ErrorKind::Io,
    };
    Error::new(kind, op)
        .with_path(what)
        .with_detail(describe(e))
}

/// Whether the error means the session itself is gone (not a refusal).
fn session_gone(e: &postgres::Error) -> bool {
    match e.as_db_error() {
        None => true,
        Some(db) => {
            let c = db.code().code();
            c.starts_with("08") || c.starts_with("57P")
        }
    }
}

/// The session an acquisition uses: one of the lock's own (moved into the
/// guard) or a [`PgSession`]'s (shared by that owner's guards).
enum Owner {
    Own(Session),
    Bound(Arc<Session>),
}

impl std::ops::Deref for Owner {
    type Target = Session;
    fn deref(&self) -> &Session {
        match self {
            Owner::Own(s) => s,
            Owner::Bound(s) => s,
        }
    }
}

impl Owner {
    /// Never reuse this session (its state is unknown): an own session is
    /// closed when dropped; a bound one is the owner's to close.
    fn discard(&mut self) {
        self.kill();
        if let Owner::Own(s) = self {
            s.reusable = false;
        }
    }
}

/// One server session used as one lock owner for many keys, so that
/// PostgreSQL's deadlock detector sees the owner's cycles: holding `a` and
/// waiting for `b` on one session while another session holds `b` and
/// waits for `a` ends one of the waits with [`ErrorKind::Deadlock`].
///
/// An owner is one thread of control: its locks share one connection, so
/// a second acquisition of a key the session already holds fails at once
/// with [`ErrorKind::Deadlock`] (the server would grant it again), and an
/// acquisition that blocks holds up every other call on the session,
/// heartbeats included: a lock held while the same owner waits longer than
/// `lease / 2` for another counts as lost.
pub struct PgSession {
    session: Arc<Session>,
    cfg: postgres::Config,
    opts: PgOptions,
    pid: u32,
}

impl fmt::Debug for PgSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgSession")
            .field("backend", &self.session.backend())
            .finish_non_exhaustive()
    }
}

impl PgSession {
    /// Connects one session with `opts`.
    pub fn connect(opts: PgOptions) -> Result<PgSession> {
        if opts.lease < Duration::from_millis(40) {
            return Err(
                Error::new(ErrorKind::InvalidInput, "open PostgreSQL session")
                    .with_detail(format!("lease {:?} is below 40 ms", opts.lease)),
            );
        }
        let cfg = config(opts.url.as_deref(), opts.lease, "pg session")?;
        let session = Arc::new(Session::connect(&cfg, &opts, "pg session")?);
        Ok(PgSession {
            session,
            cfg,
            opts,
            pid: std::process::id(),
        })
    }

    /// The server process of this session.
    pub fn backend_pid(&self) -> i32 {
        self.session.backend()
    }

    /// The lock named `name`, acquired on this session.
    pub fn lock(&self, name: &str) -> Result<PgLock> {
        if name.is_empty() {
            return Err(Error::new(ErrorKind::InvalidInput, "open PostgreSQL lock")
                .with_detail("the lock name is empty"));
        }
        Ok(self.bind(PgKey::name(name), format!("pg:{name}")))
    }

    /// The lock with an explicit key, acquired on this session.
    pub fn lock_key(&self, key: impl Into<PgKey>) -> PgLock {
        let key = key.into();
        self.bind(key, format!("pg:key {key}"))
    }

    fn bind(&self, key: PgKey, what: String) -> PgLock {
        PgLock {
            key,
            what,
            cfg: self.cfg.clone(),
            opts: self.opts.clone(),
            idle: Mutex::new(Vec::new()),
            bound: Some(Arc::clone(&self.session)),
            pid: std::process::id(),
        }
    }
}

impl Drop for PgSession {
    fn drop(&mut self) {
        if std::process::id() != self.pid {
            // A forked child's copy: the connection is the parent's.
            std::mem::forget(Arc::clone(&self.session));
        }
    }
}

/// Who holds or awaits a [`PgLock`], as `pg_locks` and `pg_stat_activity`
/// show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgHolder {
    /// The server process of the holder's session.
    pub pid: i32,
    /// The client's address (`None` over a unix socket).
    pub client_addr: Option<String>,
    /// The session's `application_name`.
    pub application_name: Option<String>,
    /// Shared or exclusive.
    pub mode: Mode,
    /// Held (`true`) or waiting.
    pub granted: bool,
    /// Since when: the grant (for the holder whose session wrote the
    /// lock's newest token batch; other shared holders show `None`; a
    /// session that released and took the lock again from its batch shows
    /// its first grant of the batch) or the start of the wait.
    pub since: Option<SystemTime>,
}

/// A reader-writer lock held in a PostgreSQL server: shared and exclusive
/// session-level advisory locks on one key, with fencing tokens and loss
/// detection. See the module documentation.
pub struct PgLock {
    key: PgKey,
    what: String,
    cfg: postgres::Config,
    opts: PgOptions,
    idle: Mutex<Vec<Session>>,
    /// Set for a lock of a [`PgSession`]: every acquisition uses that one
    /// session.
    bound: Option<Arc<Session>>,
    pid: u32,
}

impl fmt::Debug for PgLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgLock")
            .field("key", &self.key)
            .field("what", &self.what)
            .finish_non_exhaustive()
    }
}

impl PgLock {
    /// The lock named `name` (hashed by [`PgKey::name`]) on the server the
    /// URL (or, with `None`, the libpq environment) names, with default
    /// options. Connects one session now, so that bad settings fail here.
    pub fn new(url: Option<&str>, name: &str) -> Result<PgLock> {
        let mut opts = PgOptions::new();
        if let Some(u) = url {
            opts = opts.url(u);
        }
        PgLock::with_options(name, opts)
    }

    /// The lock named `name` with `opts`.
    pub fn with_options(name: &str, opts: PgOptions) -> Result<PgLock> {
        if name.is_empty() {
            return Err(Error::new(ErrorKind::InvalidInput, "open PostgreSQL lock")
                .with_detail("the lock name is empty"));
        }
        PgLock::open(PgKey::name(name), format!("pg:{name}"), opts)
    }

    /// The lock with an explicit key (shared with other applications'
    /// `pg_advisory_lock` calls on the same key and database).
    pub fn with_key(key: impl Into<PgKey>, opts: PgOptions) -> Result<PgLock> {
        let key = key.into();
        PgLock::open(key, format!("pg:key {key}"), opts)
    }

    fn open(key: PgKey, what: String, opts: PgOptions) -> Result<PgLock> {
        if opts.lease < Duration::from_millis(40) {
            return Err(Error::new(ErrorKind::InvalidInput, "open PostgreSQL lock")
                .with_path(&what)
                .with_detail(format!("lease {:?} is below 40 ms", opts.lease)));
        }
        let cfg = config(opts.url.as_deref(), opts.lease, &what)?;
        let first = Session::connect(&cfg, &opts, &what)?;
        Ok(PgLock {
            key,
            what,
            cfg,
            opts,
            idle: Mutex::new(vec![first]),
            bound: None,
            pid: std::process::id(),
        })
    }

    /// The key.
    pub fn key(&self) -> PgKey {
        self.key
    }

    /// `pg:NAME`, or `pg:key K` for an explicit key.
    pub fn description(&self) -> &str {
        &self.what
    }

    /// Blocks until held shared.
    pub fn read(&self) -> Result<PgGuard<'_>> {
        Ok(self.acquire(Mode::Shared, Wait::Forever)?)
    }

    /// Blocks until held exclusively.
    pub fn write(&self) -> Result<PgGuard<'_>> {
        Ok(self.acquire(Mode::Exclusive, Wait::Forever)?)
    }

    /// Shared, if free now: else [`TryLockError::WouldBlock`].
    pub fn try_read(&self) -> Result<PgGuard<'_>, TryLockError> {
        self.acquire(Mode::Shared, Wait::NonBlocking)
    }

    /// Exclusive, if free now: else [`TryLockError::WouldBlock`].
    pub fn try_write(&self) -> Result<PgGuard<'_>, TryLockError> {
        self.acquire(Mode::Exclusive, Wait::NonBlocking)
    }

    /// Shared, waiting at most `d` (the server's `lock_timeout`, rounded up
    /// to a millisecond; no polling): else [`TryLockError::TimedOut`].
    pub fn try_read_for(&self, d: Duration) -> Result<PgGuard<'_>, TryLockError> {
        self.acquire(Mode::Shared, Wait::timeout(d))
    }

    /// Exclusive, waiting at most `d`.
    pub fn try_write_for(&self, d: Duration) -> Result<PgGuard<'_>, TryLockError> {
        self.acquire(Mode::Exclusive, Wait::timeout(d))
    }

    /// Shared, waiting until `t`.
    pub fn try_read_until(&self, t: Instant) -> Result<PgGuard<'_>, TryLockError> {
        self.acquire(Mode::Shared, Wait::Until(t))
    }

    /// Exclusive, waiting until `t`.
    pub fn try_write_until(&self, t: Instant) -> Result<PgGuard<'_>, TryLockError> {
        self.acquire(Mode::Exclusive, Wait::Until(t))
    }

    /// As [`PgLock::read`] and the `try_read*` calls (waiting as `wait`
    /// allows), with a guard that owns a reference to the lock (`'static`).
    pub fn read_arc(self: &Arc<Self>, wait: Wait) -> Result<PgGuard<'static>, TryLockError> {
        self.acquire_arc(Mode::Shared, wait)
    }

    /// As [`PgLock::write`] and the `try_write*` calls (waiting as `wait`
    /// allows), with a guard that owns a reference to the lock (`'static`).
    pub fn write_arc(self: &Arc<Self>, wait: Wait) -> Result<PgGuard<'static>, TryLockError> {
        self.acquire_arc(Mode::Exclusive, wait)
    }

    fn acquire_arc(
        self: &Arc<Self>,
        mode: Mode,
        wait: Wait,
    ) -> Result<PgGuard<'static>, TryLockError> {
        let mut g = self.acquire_inner(mode, wait)?;
        // The borrowed guard hands its session over; dropped empty, it
        // releases nothing.
        Ok(PgGuard {
            lock: Handle::Owned(Arc::clone(self)),
            session: g.session.take(),
            held: Arc::clone(&g.held),
            mode: g.mode,
            token: g.token,
            pid: g.pid,
        })
    }

    fn take_session(&self) -> Result<(Owner, bool)> {
        // In a forked child the pooled sessions (and a PgSession's) are the
        // parent's connections: never used here (dropping the lock
        // abandons them).
        let forked = std::process::id() != self.pid;
        if let Some(b) = &self.bound {
            if forked {
                return Err(Error::new(ErrorKind::Unsupported, "acquire PostgreSQL lock")
                    .with_path(&self.what)
                    .with_detail("a PgSession's connection belongs to the parent process; connect a new one in the child"));
            }
            return Ok((Owner::Bound(Arc::clone(b)), false));
        }
        if !forked {
            if let Some(s) = self.idle.lock().pop() {
                return Ok((Owner::Own(s), true));
            }
        }
        Ok((
            Owner::Own(Session::connect(&self.cfg, &self.opts, &self.what)?),
            false,
        ))
    }

    fn put_session(&self, s: Owner) {
        if let Owner::Own(s) = s {
            // A forked child's own sessions are closed, not pooled beside
            // the parent's.
            if s.reusable && !s.is_dead() && std::process::id() == self.pid {
                self.idle.lock().push(s);
            }
        }
    }

    fn acquire_inner(&self, mode: Mode, wait: Wait) -> Result<PgGuard<'_>, TryLockError> {
        let lease_ms = ms(self.opts.lease);
        let (mut s, reused) = self.take_session()?;
        if s.holds_key(&self.key) {
            // The server would grant it again (session locks are
            // reentrant); an owner waiting for itself is a deadlock.
            return Err(Error::new(ErrorKind::Deadlock, "acquire PostgreSQL lock")
                .with_path(&self.what)
                .with_detail("this session already holds the lock")
                .into());
        }
        let first = match s.acquire(&self.key, mode, -1, lease_ms) {
            // An idle session may have died meanwhile (a server restart):
            // nothing was held on it, so a new one is safe.
            Err(e) if reused && session_gone(&e) => {
                s.discard();
                drop(s);
                s = Owner::Own(Session::connect(&self.cfg, &self.opts, &self.what)?);
                s.acquire(&self.key, mode, -1, lease_ms)
            }
            r => r,
        };
        match first {
            Ok(Grant::Granted { token, backend }) => return self.granted(s, mode, token, backend),
            Ok(Grant::NotGranted) => {}
            Err(e) => {
                s.discard();
                return Err(pg_error("acquire PostgreSQL lock", &self.what, &e).into());
            }
        }
        if !wait.may_block() {
            self.put_session(s);
            return Err(TryLockError::WouldBlock);
        }
        if let Some(cb) = &self.opts.on_block {
            cb(&Blocked {
                resource: Path::new(&self.what),
                mode,
                range: None,
            });
        }
        // An async acquisition's waiter (crate::aio) is cancelled by a
        // cancel request: the statement then fails and the session, whose
        // state is unknown, is closed below, which releases a grant that
        // raced the cancel. Not for a PgSession's session, which the owner
        // keeps: that waiter finishes its wait and releases at once.
        let _cancel = match &s {
            Owner::Own(own) => crate::aio::on_cancel(|| {
                let token = own.cancel_token();
                Arc::new(move || {
                    let _ = token.cancel_query(postgres::NoTls);
                })
            }),
            Owner::Bound(_) => crate::aio::on_cancel_none(),
        };
        loop {
            let wait_ms = match wait.remaining() {
                None => 0,
                Some(d) if d.is_zero() => {
                    self.put_session(s);
                    return Err(TryLockError::TimedOut);
                }
                Some(d) => ms(d),
            };
            match s.acquire(&self.key, mode, wait_ms, lease_ms) {
                Ok(Grant::Granted { token, backend }) => {
                    return self.granted(s, mode, token, backend)
                }
                Ok(Grant::NotGranted) => {
                    s.discard();
                    return Err(Error::new(ErrorKind::Io, "acquire PostgreSQL lock")
                        .with_path(&self.what)
                        .with_detail("a blocking acquisition came back without a grant")
                        .into());
                }
                Err(e) if e.code().map(|c| c.code()) == Some("55P03") => {
                    if wait.expired() {
                        self.put_session(s);
                        return Err(TryLockError::TimedOut);
                    }
                }
                Err(e) if e.code().map(|c| c.code()) == Some("40P01") => {
                    self.put_session(s);
                    return Err(pg_error("acquire PostgreSQL lock", &self.what, &e).into());
                }
                // Anything else: the session's state is unknown (the grant
                // may have happened before the failure), so it is closed,
                // which releases whatever it held.
                Err(e) => {
                    s.discard();
                    return Err(pg_error("acquire PostgreSQL lock", &self.what, &e).into());
                }
            }
        }
    }

    fn granted(
        &self,
        mut s: Owner,
        mode: Mode,
        token: u64,
        backend: i32,
    ) -> Result<PgGuard<'_>, TryLockError> {
        if backend != s.backend() {
            let _ = s.release(&self.key, mode, true);
            s.discard();
            return Err(Error::new(ErrorKind::Unsupported, "acquire PostgreSQL lock")
                .with_path(&self.what)
                .with_detail(format!(
                    "the session started on server process {} but was granted the lock by {backend}: \
                     a transaction-pooling proxy (PgBouncer pool_mode=transaction) is in between, \
                     and session locks are not safe there; connect directly or use session pooling",
                    s.backend()
                ))
                .into());
        }
        let held = s.hold(self.key, &self.opts, self.what.clone());
        Ok(PgGuard {
            lock: Handle::Borrowed(self),
            session: Some(s),
            held,
            mode,
            token,
            pid: std::process::id(),
        })
    }

    /// Who holds or awaits this lock now, holders first.
    pub fn holders(&self) -> Result<Vec<PgHolder>> {
        let (s, _) = self.take_session()?;
        let (classid, objid, objsubid) = self.key.pg_locks_ids();
        let rows = s.with_client(|c| {
            c.query(
                sql::HOLDERS,
                &[
                    &self.key.space(),
                    &self.key.fence_key(),
                    &classid,
                    &objid,
                    &objsubid,
                ],
            )
        });
        let rows = match rows {
            Ok(r) => {
                self.put_session(s);
                r
            }
            Err(e) => return Err(pg_error("list PostgreSQL lock holders", &self.what, &e)),
        };
        Ok(rows
            .iter()
            .map(|r| {
                let mode: String = r.get(3);
                PgHolder {
                    pid: r.get(0),
                    client_addr: r.get(1),
                    application_name: r.get::<_, Option<String>>(2).filter(|s| !s.is_empty()),
                    mode: if mode.starts_with("Exclusive") {
                        Mode::Exclusive
                    } else {
                        Mode::Shared
                    },
                    granted: r.get(4),
                    since: r.get(5),
                }
            })
            .collect())
    }

    /// The lowest fencing token `interlock_fence_check` accepts for this
    /// lock now, if any was issued: the first token of the newest batch.
    /// The session that wrote that batch may have issued later tokens from
    /// it (up to 999 more) without a write; every other session's next
    /// token is above all of them.
    pub fn last_token(&self) -> Result<Option<u64>> {
        let (s, _) = self.take_session()?;
        let r = s.with_client(|c| {
            c.query_opt(sql::LAST_TOKEN, &[&self.key.space(), &self.key.fence_key()])
        });
        match r {
            Ok(row) => {
                self.put_session(s);
                Ok(row.map(|r| r.get::<_, i64>(0) as u64))
            }
            Err(e) => Err(pg_error("read PostgreSQL lock token", &self.what, &e)),
        }
    }
}

impl Lock for PgLock {
    type Guard<'a> = PgGuard<'a>;

    fn acquire(&self, mode: Mode, wait: Wait) -> Result<PgGuard<'_>, TryLockError> {
        self.acquire_inner(mode, wait)
    }
}

impl Drop for PgLock {
    fn drop(&mut self) {
        if std::process::id() != self.pid {
            for s in self.idle.get_mut().drain(..) {
                s.abandon();
            }
            if let Some(b) = self.bound.take() {
                std::mem::forget(b);
            }
        }
    }
}

/// A mutex held in a PostgreSQL server: a [`PgLock`] used in exclusive mode
/// only ([`Mode::Shared`] through the [`Lock`] trait is taken exclusively).
#[derive(Debug)]
pub struct PgMutex {
    inner: Arc<PgLock>,
}

impl PgMutex {
    /// The mutex named `name` on the server the URL (or the libpq
    /// environment) names.
    pub fn new(url: Option<&str>, name: &str) -> Result<PgMutex> {
        Ok(PgMutex {
            inner: Arc::new(PgLock::new(url, name)?),
        })
    }

    /// The mutex named `name` with `opts`.
    pub fn with_options(name: &str, opts: PgOptions) -> Result<PgMutex> {
        Ok(PgMutex {
            inner: Arc::new(PgLock::with_options(name, opts)?),
        })
    }

    /// The mutex with an explicit key.
    pub fn with_key(key: impl Into<PgKey>, opts: PgOptions) -> Result<PgMutex> {
        Ok(PgMutex {
            inner: Arc::new(PgLock::with_key(key, opts)?),
        })
    }

    /// Blocks until held.
    pub fn lock(&self) -> Result<PgGuard<'_>> {
        self.inner.write()
    }

    /// Held if free now: else [`TryLockError::WouldBlock`].
    pub fn try_lock(&self) -> Result<PgGuard<'_>, TryLockError> {
        self.inner.try_write()
    }

    /// Waiting at most `d`: else [`TryLockError::TimedOut`].
    pub fn try_lock_for(&self, d: Duration) -> Result<PgGuard<'_>, TryLockError> {
        self.inner.try_write_for(d)
    }

    /// Waiting until `t`.
    pub fn try_lock_until(&self, t: Instant) -> Result<PgGuard<'_>, TryLockError> {
        self.inner.try_write_until(t)
    }

    /// Locks, waiting as `wait` allows, with a guard that owns a reference
    /// to the mutex's lock (`'static`).
    pub fn lock_arc(&self, wait: Wait) -> Result<PgGuard<'static>, TryLockError> {
        self.inner.write_arc(wait)
    }

    /// Who holds or awaits it.
    pub fn holders(&self) -> Result<Vec<PgHolder>> {
        self.inner.holders()
    }

    /// The lowest fencing token the fence check accepts for it now (see
    /// [`PgLock::last_token`]).
    pub fn last_token(&self) -> Result<Option<u64>> {
        self.inner.last_token()
    }

    /// The key.
    pub fn key(&self) -> PgKey {
        self.inner.key()
    }
}

impl Lock for PgMutex {
    type Guard<'a> = PgGuard<'a>;

    fn acquire(&self, _mode: Mode, wait: Wait) -> Result<PgGuard<'_>, TryLockError> {
        self.inner.acquire_inner(Mode::Exclusive, wait)
    }
}

/// A held [`PgLock`] or [`PgMutex`]; owns its server session. Dropping it
/// releases the lock; [`PgGuard::unlock`] reports what drop swallows.
pub struct PgGuard<'a> {
    lock: Handle<'a, PgLock>,
    session: Option<Owner>,
    held: Arc<Held>,
    mode: Mode,
    token: u64,
    pid: u32,
}

impl PgGuard<'_> {
    /// The fencing token of this grant: strictly greater than every earlier
    /// grant's of the same key, across holders, crashes and server restarts
    /// (two shared holds that overlap may get theirs in either order).
    /// Give it to the resource the lock protects; in PostgreSQL, call
    /// `interlock_fence_check(key, token)` in the writing transaction, or
    /// keep the token in the resource's rows and write
    /// `... WHERE fence <= $token` (see docs/design-pg.md). The fence check
    /// refuses every token issued before the last grant by another session
    /// (so every token of a lost holder), but not one of an earlier,
    /// released hold on the same session with no check in between: do not
    /// use a token after unlock.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// Shared or exclusive.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The lock's key.
    pub fn key(&self) -> PgKey {
        self.lock.key
    }

    /// The server process holding the lock for this guard.
    pub fn backend_pid(&self) -> i32 {
        self.session.as_ref().map_or(0, |s| s.backend())
    }

    /// `Ok(())` while the lock counts as held; [`ErrorKind::LeaseLost`] once
    /// the session was lost or a heartbeat is overdue (calls `on_lost` the
    /// first time). Costs no round trip.
    pub fn check(&self) -> Result<()> {
        self.held.check()
    }

    /// Whether [`PgGuard::check`] passes.
    pub fn is_held(&self) -> bool {
        self.check().is_ok()
    }

    /// Releases the lock, reporting [`ErrorKind::LeaseLost`] if it had been
    /// lost, or the error of the release statement.
    pub fn unlock(mut self) -> Result<()> {
        self.release()
    }

    fn release(&mut self) -> Result<()> {
        let Some(mut s) = self.session.take() else {
            return Ok(());
        };
        let last = s.unhold(&self.held);
        if self.held.lost.load(std::sync::atomic::Ordering::SeqCst) {
            // Closing the session releases whatever it may still hold.
            s.discard();
            return Err(self.held.lost_error(
                "unlock PostgreSQL lock",
                "the lock had been lost before unlock",
            ));
        }
        match s.release(&self.lock.key, self.mode, last) {
            Ok(true) => {
                self.lock.put_session(s);
                Ok(())
            }
            Ok(false) => {
                s.discard();
                let err = self.held.lost_error(
                    "unlock PostgreSQL lock",
                    "the server session no longer held the lock",
                );
                self.held.lose(&err);
                Err(err)
            }
            Err(e) if session_gone(&e) => {
                s.discard();
                let err = self.held.lost_error(
                    "unlock PostgreSQL lock",
                    format!("the server session was lost: {}", describe(&e)),
                );
                self.held.lose(&err);
                Err(err)
            }
            Err(e) => {
                s.discard();
                Err(pg_error("unlock PostgreSQL lock", &self.lock.what, &e))
            }
        }
    }
}

impl Drop for PgGuard<'_> {
    fn drop(&mut self) {
        if std::process::id() != self.pid {
            match self.session.take() {
                Some(Owner::Own(s)) => s.abandon(),
                Some(Owner::Bound(b)) => std::mem::forget(b),
                None => {}
            }
            return;
        }
        let _ = self.release();
    }
}

impl fmt::Debug for PgGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgGuard")
            .field("lock", &self.lock.what)
            .field("mode", &self.mode)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_hash_known_vectors() {
        // FNV-1a 64 reference values.
        assert_eq!(name_key("") as u64, 0xcbf2_9ce4_8422_2325);
        assert_eq!(name_key("a") as u64, 0xaf63_dc4c_8601_ec8c);
        assert_eq!(name_key("foobar") as u64, 0x8594_4171_f739_67e8);
        assert_eq!(PgKey::name("a"), PgKey::Int(-5808556873153909620));
    }

    #[test]
    fn key_layout_matches_pg_locks() {
        let k = PgKey::Int(0x0000_0001_ffff_fffe);
        assert_eq!(k.pg_locks_ids(), (1, 0xffff_fffe, 1));
        let p = PgKey::Pair(-1, 7);
        assert_eq!(p.pg_locks_ids(), (0xffff_ffff, 7, 2));
        assert_eq!(p.fence_key(), (-1i64 << 32) | 7);
        assert_eq!(PgKey::Pair(3, -1).fence_key(), (3i64 << 32) | 0xffff_ffff);
    }

    #[test]
    fn millis_round_up() {
        assert_eq!(ms(Duration::from_micros(1)), 1);
        assert_eq!(ms(Duration::from_micros(1500)), 2);
        assert_eq!(ms(Duration::from_secs(u64::MAX)), i32::MAX);
    }
}
