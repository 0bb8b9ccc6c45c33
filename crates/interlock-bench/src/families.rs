//! interlock's own families as harness targets.
//!
//! Why it is built this way: the families land on `main` one by one; each
//! becomes a target with a few lines here (a name, its primitive, whether
//! it has a shared mode, how to open it), driven through the crate's
//! [`interlock::Lock`] trait so the harness measures exactly what users call.

use std::time::Duration;

use anyhow::Result;
use interlock::pg::{ACQUIRE, RELEASE, SESSION_ID, TRY_ACQUIRE};
use interlock::{
    ErrorKind, FileLock, FileSemaphore, Flavor, LeaseLock, Lock, LockSet, Mode, PgLock, PgOptions,
    Semaphore, ShmMutex, ShmRwLock, TryLockError, Wait,
};

use crate::targets::{setup_file, setup_none, Ctx, Floor, Group, Handle, Impl, Target};

#[path = "../../interlock/tests/support/pg.rs"]
#[allow(dead_code, clippy::all)]
mod pgsupport;

/// The server of the pg target: `INTERLOCK_PG_URL`, or a throwaway cluster
/// started here (once per harness process; its URL is exported so that the
/// workers, children of this process, use it too).
fn pg_url() -> Result<String> {
    if let Some(u) = std::env::var("INTERLOCK_PG_URL")
        .ok()
        .filter(|u| !u.is_empty())
    {
        return Ok(u);
    }
    let pg = pgsupport::shared().ok_or_else(|| {
        anyhow::anyhow!("no PostgreSQL server: set INTERLOCK_PG_URL or install postgresql")
    })?;
    let url = pg.url();
    std::env::set_var("INTERLOCK_PG_URL", &url);
    Ok(url)
}

/// The scenario's lock name (unique per run: the scenario directory).
fn pg_name(c: &Ctx) -> String {
    format!("bench:{}", c.dir.display())
}

/// [`PgLock`] through the [`Lock`] trait, checking on every exclusive grant
/// that its fencing token is above every token issued before it. The last
/// token is kept as 8 bytes at the start of a file of the scenario
/// directory, overwritten in place under the lock (a write-and-rename, as
/// before, cost about 3 ms per grant on ext4, which flushes a file renamed
/// over another: the harness measured its own check, not the lock).
struct PgTarget {
    lock: PgLock,
    last: std::fs::File,
}

impl PgTarget {
    fn open(c: &Ctx) -> Result<PgTarget> {
        let lock = PgLock::with_options(&pg_name(c), PgOptions::new().url(pg_url()?))?;
        let last = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(c.dir.join("pg-token"))?;
        Ok(PgTarget { lock, last })
    }
}

impl Handle for PgTarget {
    fn run(&mut self, mode: Mode, body: &mut dyn FnMut()) -> Result<bool> {
        use std::os::unix::fs::FileExt;
        let g = self.lock.acquire(mode, Wait::Forever)?;
        if mode == Mode::Exclusive {
            let mut b = [0u8; 8];
            let prev = match self.last.read_exact_at(&mut b, 0) {
                Ok(()) => u64::from_le_bytes(b),
                Err(_) => 0, // no token yet
            };
            if g.token() <= prev {
                anyhow::bail!("fencing token {} not above the previous {prev}", g.token());
            }
            self.last.write_all_at(&g.token().to_le_bytes(), 0)?;
        }
        body();
        g.unlock()?;
        Ok(false)
    }
}

/// A lease's time to live in the harness: long, so that only a dead local
/// owner (detected at once) ever ends a lease early.
const LEASE_TTL: Duration = Duration::from_secs(30);

fn family(
    name: &'static str,
    label: &'static str,
    floor: Floor,
    shared: bool,
    setup: fn(&Ctx) -> Result<()>,
    open: fn(&Ctx) -> Result<Box<dyn Handle>>,
) -> Target {
    Target {
        name,
        label,
        group: Group::Interlock,
        floor,
        shared,
        recovers: true,
        capacity: 1,
        imp: Impl::Rust { setup, open },
    }
}

/// The permits of the semaphore targets (and the POSIX semaphore peer).
pub const SEM_PERMITS: u32 = 2;

/// A semaphore of `SEM_PERMITS + 1` permits that claims `SEM_PERMITS`:
/// the torture must report violations for it (the control of its
/// "never more than N inside" check).
pub fn broken_semaphore() -> Target {
    Target {
        capacity: SEM_PERMITS as usize,
        ..family(
            "sem-broken",
            "Semaphore with one permit too many (harness self-test)",
            Floor::Futex,
            false,
            |c| {
                Semaphore::open(shm_path(c, "sem-broken"), SEM_PERMITS + 1)
                    .map(drop)
                    .map_err(Into::into)
            },
            |c| {
                Ok(Box::new(Il(Semaphore::open(
                    shm_path(c, "sem-broken"),
                    SEM_PERMITS + 1,
                )?)))
            },
        )
    }
}

fn file_lock(c: &Ctx, flavor: Flavor) -> Result<FileLock> {
    let mut o = FileLock::options();
    o.flavor(flavor);
    Ok(o.open(c.lock_path())?)
}

fn shm_path(c: &Ctx, what: &str) -> std::path::PathBuf {
    c.shm_dir.join(what)
}

/// The families present in this build.
pub fn targets() -> Vec<Target> {
    vec![
        family(
            "filelock-fcntl",
            "interlock FileLock (fcntl flavor)",
            Floor::Ofd,
            true,
            setup_file,
            |c| Ok(Box::new(Il(file_lock(c, Flavor::Fcntl)?))),
        ),
        family(
            "filelock-flock",
            "interlock FileLock (flock flavor)",
            Floor::Flock,
            true,
            setup_file,
            |c| Ok(Box::new(Il(file_lock(c, Flavor::Flock)?))),
        ),
        family(
            "lockset",
            "interlock LockSet (index 0; OFD)",
            Floor::Ofd,
            true,
            setup_file,
            |c| Ok(Box::new(SetIndex(LockSet::open(c.lock_path())?))),
        ),
        family(
            "shm-rwlock",
            "interlock ShmRwLock",
            Floor::Futex,
            true,
            |c| {
                ShmRwLock::open(shm_path(c, "rw"))
                    .map(drop)
                    .map_err(Into::into)
            },
            |c| Ok(Box::new(ShmRw(ShmRwLock::open(shm_path(c, "rw"))?))),
        ),
        family(
            "shm-mutex",
            "interlock ShmMutex",
            Floor::Futex,
            false,
            |c| {
                ShmMutex::open(shm_path(c, "mutex"))
                    .map(drop)
                    .map_err(Into::into)
            },
            |c| Ok(Box::new(ShmMx(ShmMutex::open(shm_path(c, "mutex"))?))),
        ),
        Target {
            capacity: SEM_PERMITS as usize,
            ..family(
                "shm-sem",
                "interlock Semaphore (shm, N=2)",
                Floor::Futex,
                false,
                |c| {
                    Semaphore::open(shm_path(c, "sem"), SEM_PERMITS)
                        .map(drop)
                        .map_err(Into::into)
                },
                |c| {
                    Ok(Box::new(Il(Semaphore::open(
                        shm_path(c, "sem"),
                        SEM_PERMITS,
                    )?)))
                },
            )
        },
        Target {
            capacity: SEM_PERMITS as usize,
            ..family(
                "file-sem",
                "interlock FileSemaphore (OFD byte per permit, N=2)",
                Floor::Ofd,
                false,
                setup_file,
                |c| {
                    Ok(Box::new(Il(FileSemaphore::open(
                        c.lock_path(),
                        SEM_PERMITS,
                    )?)))
                },
            )
        },
        family(
            "lease",
            "interlock LeaseLock (TTL 30 s)",
            Floor::Mkdir,
            false,
            setup_none,
            |c| Ok(Box::new(Il(LeaseLock::new(c.lease_path(), LEASE_TTL)?))),
        ),
        family(
            "pg",
            "interlock PgLock (PostgreSQL, loopback TCP)",
            Floor::Pg,
            true,
            |_| pg_url().map(drop),
            |c| Ok(Box::new(PgTarget::open(c)?)),
        ),
        Target {
            name: "floor-pg",
            label: "floor: interlock's two statements, raw, prepared (PostgreSQL)",
            group: Group::Floor,
            floor: Floor::Pg,
            shared: true,
            recovers: true,
            capacity: 1,
            imp: Impl::Rust {
                setup: |c| {
                    // The table and functions, made by a first PgLock.
                    PgLock::with_options(&pg_name(c), PgOptions::new().url(pg_url()?))?;
                    Ok(())
                },
                open: |c| Ok(Box::new(PgFloor::connect(&pg_url()?, &pg_name(c))?)),
            },
        },
    ]
}

/// The floor of the pg target: the statements interlock sends, raw,
/// prepared once: the try (grant with token, one round trip), then, only
/// if it was not granted, the blocking wait (`ACQUIRE` with no time-out,
/// one round trip); and the release. The library's own
/// statements (`interlock::pg`), not copies, with a session id drawn as
/// the library draws it and the last token passed back to the try.
struct PgFloor {
    client: postgres::Client,
    try_acquire: postgres::Statement,
    acquire: postgres::Statement,
    release: postgres::Statement,
    key: i64,
    sid: String,
    last: Option<i64>,
}

impl PgFloor {
    fn connect(url: &str, name: &str) -> Result<PgFloor> {
        let mut client = postgres::Client::connect(url, postgres::NoTls)?;
        let try_acquire = client.prepare(TRY_ACQUIRE)?;
        let acquire = client.prepare(ACQUIRE)?;
        let release = client.prepare(RELEASE)?;
        let sid = client.query_one(SESSION_ID, &[])?.get(0);
        let key = match interlock::PgKey::name(name) {
            interlock::PgKey::Int(k) => k,
            interlock::PgKey::Pair(..) => unreachable!(),
        };
        Ok(PgFloor {
            client,
            try_acquire,
            acquire,
            release,
            key,
            sid,
            last: None,
        })
    }
}

impl Handle for PgFloor {
    fn run(&mut self, mode: Mode, body: &mut dyn FnMut()) -> Result<bool> {
        let (k, k1, k2) = (self.key, (self.key >> 32) as i32, self.key as i32);
        let shared = mode == Mode::Shared;
        let got = self.client.query_one(
            &self.try_acquire,
            &[
                &1i16, &k, &k1, &k2, &shared, &10_000i32, &self.sid, &self.last,
            ],
        )?;
        self.last = match got.get::<_, Option<i64>>(0) {
            Some(t) => Some(t),
            None => self
                .client
                .query_one(
                    &self.acquire,
                    &[&1i16, &k, &k1, &k2, &shared, &0i32, &10_000i32, &self.sid],
                )?
                .get(0),
        };
        body();
        self.client
            .query_one(&self.release, &[&1i16, &k, &k1, &k2, &shared, &true])?;
        Ok(false)
    }
}

/// One index of a [`LockSet`] ("lock i is byte i"), the way a user who
/// keeps many locks in one file takes one of them; blocking waits go
/// through the set's deadlock registry.
struct SetIndex(LockSet);
impl Handle for SetIndex {
    fn run(&mut self, mode: Mode, body: &mut dyn FnMut()) -> Result<bool> {
        self.0.lock(0u64, mode)?;
        body();
        self.0.unlock(0u64)?;
        Ok(false)
    }
}

/// [`ShmRwLock`] through its own methods, so that a writer's death (the
/// lock is then poisoned) is counted and recovered from as a user would:
/// a writer takes the guard and clears the poison, a reader proceeds.
struct ShmRw(ShmRwLock);
impl Handle for ShmRw {
    fn run(&mut self, mode: Mode, body: &mut dyn FnMut()) -> Result<bool> {
        Ok(match mode {
            Mode::Exclusive => match self.0.write() {
                Ok(g) => {
                    body();
                    drop(g);
                    false
                }
                Err(p) => {
                    let mut g = p.into_inner();
                    g.clear_poison();
                    body();
                    drop(g);
                    true
                }
            },
            Mode::Shared => match self.0.read() {
                Ok(g) => {
                    body();
                    drop(g);
                    false
                }
                Err(p) => {
                    let g = p.into_inner();
                    body();
                    drop(g);
                    true
                }
            },
        })
    }
}

/// [`ShmMutex`] likewise (the next holder after a death clears the poison).
struct ShmMx(ShmMutex);
impl Handle for ShmMx {
    fn run(&mut self, _mode: Mode, body: &mut dyn FnMut()) -> Result<bool> {
        Ok(match self.0.lock() {
            Ok(g) => {
                body();
                drop(g);
                false
            }
            Err(p) => {
                let mut g = p.into_inner();
                g.clear_poison();
                body();
                drop(g);
                true
            }
        })
    }
}

/// Drives any [`Lock`] with a blocking acquisition.
pub struct Il<L>(pub L);

impl<L: Lock> Handle for Il<L> {
    fn run(&mut self, mode: Mode, body: &mut dyn FnMut()) -> Result<bool> {
        match self.0.acquire(mode, Wait::Forever) {
            Ok(g) => {
                body();
                drop(g);
                Ok(false)
            }
            Err(TryLockError::Error(e)) if e.kind() == ErrorKind::OwnerDied => {
                Err(anyhow::anyhow!("owner died: {e}"))
            }
            Err(e) => Err(e.into()),
        }
    }
}
