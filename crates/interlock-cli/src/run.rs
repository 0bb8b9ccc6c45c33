//! `run` and `status`: take a lock, run the command, report.
//!
//! Why it is built this way: the command runs as a child, not by exec, so
//! that interlock itself stays alive as the holder. That is what keeps a
//! lease renewed and a shared-memory lock attributed to a live process, and
//! it lets interlock release explicitly (reporting errors) and pass on the
//! command's exit status. The lock is released only after the child has
//! been reaped, so no process outside the lock ever runs the command.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use interlock::{
    Blocked, Error, ErrorKind, FileLock, FileSemaphore, Flavor, LeaseLock, LeaseOptions,
    LockResult, LockSet, Mode, PgLock, PgOptions, Semaphore, ShmOptions, ShmReadGuard, ShmRwLock,
    ShmWriteGuard, TryLockError, Wait,
};

use crate::args::{Kind, RunArgs, StatusArgs};
use crate::sys;

/// Writes one line to stderr; a stderr that cannot be written (closed, a
/// full disk) loses the message but changes nothing else.
macro_rules! note {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

/// Writes one line to stdout; `false` if it could not be written.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($t)*).is_ok()
    }};
}

const EX_USAGE: u8 = 64;
const EX_DATAERR: u8 = 65;
const EX_NOINPUT: u8 = 66;
const EX_UNAVAILABLE: u8 = 69;
const EX_SOFTWARE: u8 = 70;
const EX_OSERR: u8 = 71;
const EX_NOPERM: u8 = 77;

/// The exit status for an error that is not "the lock is held".
fn exit_code(e: &Error) -> u8 {
    match e.kind() {
        ErrorKind::InvalidInput => EX_USAGE,
        ErrorKind::Corrupt => EX_DATAERR,
        ErrorKind::NotFound => EX_NOINPUT,
        ErrorKind::Unsupported => EX_UNAVAILABLE,
        ErrorKind::PermissionDenied => EX_NOPERM,
        ErrorKind::Io => EX_OSERR,
        _ => EX_SOFTWARE,
    }
}

fn fail(e: &Error) -> u8 {
    note!("interlock: {e}");
    exit_code(e)
}

/// Settings shared by every kind.
struct Plan<'a> {
    args: &'a RunArgs,
    mode: Mode,
    wait: Wait,
}

impl Plan<'_> {
    /// Reports an acquisition that did not return a guard.
    fn not_taken(&self, e: TryLockError) -> u8 {
        let path = self.args.path.display();
        let why = match &e {
            TryLockError::WouldBlock => format!("{path} is locked"),
            TryLockError::TimedOut => format!("gave up waiting for {path}"),
            TryLockError::Error(e) if e.kind() == ErrorKind::Deadlock => e.to_string(),
            TryLockError::Error(e) => return fail(e),
        };
        if !self.args.quiet {
            note!("interlock: {why}");
        }
        self.args.conflict_exit_code
    }
}

/// The on-block callback: one line on stderr naming who holds the lock,
/// as far as the kernel shows it.
fn announce_wait(kind: Kind) -> impl Fn(&Blocked<'_>) + Send + Sync + 'static {
    move |b: &Blocked<'_>| {
        let who = holders_of(b.resource, kind, b.range);
        let range = match b.range {
            Some((s, e)) => format!(" indices {s}..{e} of"),
            None => String::new(),
        };
        let by = if who.is_empty() {
            String::new()
        } else {
            format!(" held by {}", who.join(", "))
        };
        note!(
            "interlock: waiting for {} lock on{range} {}{by}",
            b.mode,
            b.resource.display()
        );
    }
}

/// The holders (not waiters) that conflict with what `kind` takes, one
/// short description each; empty if the kernel does not say.
fn holders_of(path: &Path, kind: Kind, range: Option<(u64, u64)>) -> Vec<String> {
    let Ok(all) = interlock::holders(path) else {
        return Vec::new();
    };
    let me = std::process::id();
    let (lo, hi) = match (kind, range) {
        (_, Some(r)) => r,
        // A file lock's data is byte 0; bytes 1 and 2 are its writer gate
        // and upgrade slot, held only briefly or by a waiting writer.
        _ => (0, 1),
    };
    let mut out: Vec<String> = all
        .iter()
        .filter(|h| !h.waiting && h.pid != Some(me))
        .filter(|h| (kind == Kind::Flock) == (h.kind == interlock::LockKind::Flock))
        .filter(|h| h.range.0 < hi && h.range.1.is_none_or(|e| e > lo))
        .map(|h| match (h.pid, &h.command) {
            (Some(p), Some(c)) => format!("pid {p} ({c}) {}", h.mode),
            (Some(p), None) => format!("pid {p} {}", h.mode),
            _ => format!("an unnamed process {}", h.mode),
        })
        .collect();
    out.dedup();
    out
}

pub fn run(args: RunArgs) -> u8 {
    if let Err(msg) = args.validate() {
        note!("interlock: {msg} (see `interlock --help`)");
        return EX_USAGE;
    }
    let plan = Plan {
        mode: if args.shared {
            Mode::Shared
        } else {
            Mode::Exclusive
        },
        wait: match (args.nonblock, args.wait) {
            (true, _) => Wait::NonBlocking,
            (false, Some(d)) => Wait::timeout(d),
            (false, None) => Wait::Forever,
        },
        args: &args,
    };
    match args.kind {
        Kind::File | Kind::Flock => run_file(&plan),
        Kind::Set => run_set(&plan),
        Kind::Lease => run_lease(&plan),
        Kind::Shm => run_shm(&plan),
        Kind::Sem => run_sem(&plan),
        Kind::FileSem => run_file_sem(&plan),
        Kind::Pg => run_pg(&plan),
    }
}

/// `--kind sem`: K of the N permits of a shared-memory semaphore, held by
/// interlock's process while COMMAND runs (which dies with it).
fn run_sem(plan: &Plan<'_>) -> u8 {
    let a = plan.args;
    let n = a.permits.expect("validated: --kind sem has --permits");
    let k = a.take.unwrap_or(1);
    let mut opts = ShmOptions::new();
    if !a.quiet {
        opts = opts.on_block(move |b: &Blocked<'_>| {
            let by = Semaphore::open(b.resource, n)
                .map(|s| permit_holders(&s.holders()))
                .unwrap_or_default();
            note!(
                "interlock: waiting for {k} of {n} permits of {}{by}",
                b.resource.display()
            );
        });
    }
    let sem = match opts.open_semaphore(&a.path, n) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let guard = match sem.try_acquire_many(k, plan.wait) {
        Ok(g) => g,
        Err(e) => return plan.not_taken(e),
    };
    let code = execute(&a.command, &[], None, Tie::DieWithUs);
    match guard.release() {
        Ok(()) => code,
        Err(e) => release_failed(code, &e),
    }
}

/// ` held by pid P (cmd) ×2, ...` for a list of permit holders.
fn permit_holders(holders: &[interlock::ProcessId]) -> String {
    let mut counted: Vec<(interlock::ProcessId, usize)> = Vec::new();
    for &p in holders {
        match counted.iter_mut().find(|(q, _)| *q == p) {
            Some((_, c)) => *c += 1,
            None => counted.push((p, 1)),
        }
    }
    if counted.is_empty() {
        return String::new();
    }
    let each: Vec<String> = counted
        .iter()
        .map(|(p, c)| {
            let times = if *c > 1 {
                format!(" x{c}")
            } else {
                String::new()
            };
            match p.command() {
                Some(cmd) => format!("pid {} ({cmd}){times}", p.pid),
                None => format!("pid {}{times}", p.pid),
            }
        })
        .collect();
    format!(" held by {}", each.join(", "))
}

/// `--kind file-sem`: K of the N permits of a semaphore file; COMMAND
/// inherits the locked open file description, so it holds the permits
/// itself until it exits (as with `--kind file`).
fn run_file_sem(plan: &Plan<'_>) -> u8 {
    let a = plan.args;
    let n = a.permits.expect("validated: --kind file-sem has --permits");
    let k = a.take.unwrap_or(1);
    let on_block: Option<interlock::OnBlock> = if a.quiet {
        None
    } else {
        Some(Arc::new(move |b: &Blocked<'_>| {
            note!(
                "interlock: waiting for {k} of {n} permits of {}",
                b.resource.display()
            );
        }))
    };
    let sem = match FileSemaphore::open_with(&a.path, n, 0o644, on_block) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let guard = match sem.try_acquire_many(k, plan.wait) {
        Ok(g) => g,
        Err(e) => return plan.not_taken(e),
    };
    let fd = match sem.try_clone_file() {
        Ok(f) => f,
        Err(e) => return fail(&e),
    };
    let code = execute(&a.command, &[], None, Tie::Descriptor(fd));
    match guard.release() {
        Ok(()) => code,
        Err(e) => release_failed(code, &e),
    }
}

/// The PostgreSQL connection settings: --url, else INTERLOCK_PG_URL, else
/// (none: the libpq environment).
fn pg_options(url: Option<&str>) -> PgOptions {
    let url = url.map(str::to_string).or_else(|| {
        std::env::var("INTERLOCK_PG_URL")
            .ok()
            .filter(|u| !u.is_empty())
    });
    match url {
        Some(u) => PgOptions::new().url(u),
        None => PgOptions::new(),
    }
}

/// One line per holder or waiter of a PostgreSQL lock.
fn pg_holder_line(name: &str, h: &interlock::PgHolder) -> String {
    let mut s = format!("backend pid {}", h.pid);
    if let Some(app) = &h.application_name {
        s.push_str(&format!(" ({})", app.escape_debug()));
    }
    match &h.client_addr {
        Some(a) => s.push_str(&format!(" from {a}")),
        None => s.push_str(" from local socket"),
    }
    let state = if h.granted { "held" } else { "waiting" };
    s.push_str(&format!(
        " {} pg {state} on {}",
        h.mode,
        name.escape_debug()
    ));
    if let Some(t) = h.since.and_then(|t| t.elapsed().ok()) {
        s.push_str(&format!(" for {:.1}s", t.as_secs_f64()));
    }
    s
}

const DEFAULT_PG_LEASE: Duration = Duration::from_secs(10);

fn run_pg(plan: &Plan<'_>) -> u8 {
    let a = plan.args;
    let name = a.path.to_str().expect("validated: UTF-8").to_string();
    let base = pg_options(a.url.as_deref()).lease(a.ttl.unwrap_or(DEFAULT_PG_LEASE));
    let child = Arc::new(Mutex::new(Running::default()));
    let lost = Arc::new(AtomicBool::new(false));
    let mut opts = base.clone().on_lost({
        let (child, lost) = (Arc::clone(&child), Arc::clone(&lost));
        move |e| {
            lost.store(true, Ordering::SeqCst);
            note!("interlock: {e}; stopping the command");
            let mut c = child.lock().unwrap_or_else(|p| p.into_inner());
            c.stop = true;
            sys::terminate(c.pid);
        }
    });
    if !a.quiet {
        let (probe_opts, probe_name) = (base.clone(), name.clone());
        opts = opts.on_block(move |b| {
            let who: Vec<String> = PgLock::with_options(&probe_name, probe_opts.clone())
                .and_then(|p| p.holders())
                .map(|hs| {
                    hs.iter()
                        .filter(|h| h.granted)
                        .map(|h| {
                            let app = h.application_name.as_deref().unwrap_or("?");
                            let from = h.client_addr.as_deref().unwrap_or("local socket");
                            format!(
                                "backend pid {} ({}) from {from} {}",
                                h.pid,
                                app.escape_debug(),
                                h.mode
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let by = if who.is_empty() {
                String::new()
            } else {
                format!(" held by {}", who.join(", "))
            };
            note!(
                "interlock: waiting for {} lock on {}{by}",
                b.mode,
                b.resource.display()
            );
        });
    }
    let lock = match PgLock::with_options(&name, opts) {
        Ok(l) => l,
        Err(e) => return fail(&e),
    };
    let guard = match interlock::Lock::acquire(&lock, plan.mode, plan.wait) {
        Ok(g) => g,
        Err(e) => return plan.not_taken(e),
    };
    let token = guard.token().to_string();
    let code = execute(
        &a.command,
        &[("INTERLOCK_TOKEN", token)],
        Some(&child),
        Tie::DieWithUs,
    );
    match guard.unlock() {
        Ok(()) if !lost.load(Ordering::SeqCst) => code,
        Ok(()) => lease_lost_code(code),
        Err(e) if e.kind() == ErrorKind::LeaseLost => {
            if !lost.load(Ordering::SeqCst) {
                note!("interlock: {e}");
            }
            lease_lost_code(code)
        }
        Err(e) => release_failed(code, &e),
    }
}

fn pg_status(args: &StatusArgs) -> u8 {
    let Some(name) = args.path.to_str().filter(|n| !n.is_empty()) else {
        note!("interlock: a pg lock name must be non-empty UTF-8");
        return EX_USAGE;
    };
    let lock = match PgLock::with_options(name, pg_options(args.url.as_deref())) {
        Ok(l) => l,
        Err(e) => return fail(&e),
    };
    let holders = match lock.holders() {
        Ok(h) => h,
        Err(e) => return fail(&e),
    };
    let mut lines: Vec<String> = holders.iter().map(|h| pg_holder_line(name, h)).collect();
    if lines.is_empty() {
        lines.push(format!("pg:{}: no locks", name.escape_debug()));
    }
    match lock.last_token() {
        Ok(Some(t)) => lines.push(format!("pg:{}: last token {t}", name.escape_debug())),
        Ok(None) => {}
        Err(e) => return fail(&e),
    }
    for l in lines {
        if !out!("{l}") {
            return unwritten();
        }
    }
    0
}

fn run_file(plan: &Plan<'_>) -> u8 {
    let a = plan.args;
    let mut opts = FileLock::options();
    opts.flavor(if a.kind == Kind::Flock {
        Flavor::Flock
    } else {
        Flavor::Fcntl
    });
    if !a.quiet {
        opts.on_block(announce_wait(a.kind));
    }
    let lock = match opts.open(&a.path) {
        Ok(l) => l,
        Err(e) => return fail(&e),
    };
    let guard = match interlock::Lock::acquire(&lock, plan.mode, plan.wait) {
        Ok(g) => g,
        Err(e) => return plan.not_taken(e),
    };
    let fd = match guard.try_clone_file() {
        Ok(f) => f,
        Err(e) => return fail(&e),
    };
    let code = execute(&a.command, &[], None, Tie::Descriptor(fd));
    match guard.unlock() {
        Ok(()) => code,
        Err(e) => release_failed(code, &e),
    }
}

fn run_set(plan: &Plan<'_>) -> u8 {
    let a = plan.args;
    let range = a.range.clone().expect("validated: --kind set has --range");
    let mut opts = LockSet::options();
    if !a.quiet {
        opts.on_block(announce_wait(a.kind));
    }
    let set = match opts.open(&a.path) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    if let Err(e) = set.lock_with(range, plan.mode, plan.wait) {
        return plan.not_taken(e);
    }
    let fd = match set.try_clone_file() {
        Ok(f) => f,
        Err(e) => return fail(&e),
    };
    let code = execute(&a.command, &[], None, Tie::Descriptor(fd));
    match set.unlock_all() {
        Ok(()) => code,
        Err(e) => release_failed(code, &e),
    }
}

/// A held shared-memory lock, either mode.
enum ShmHeld<'a> {
    Read(ShmReadGuard<'a>),
    Write(ShmWriteGuard<'a>),
}

/// Takes `lock` in `mode`, waiting as `wait` allows. The flag says the lock
/// was poisoned: a holder died holding it exclusively.
fn shm_acquire(
    lock: &ShmRwLock,
    mode: Mode,
    wait: Wait,
) -> Result<(ShmHeld<'_>, bool), TryLockError> {
    fn held<'a, G>(r: LockResult<G>, f: fn(G) -> ShmHeld<'a>) -> (ShmHeld<'a>, bool) {
        match r {
            Ok(g) => (f(g), false),
            Err(p) => (f(p.into_inner()), true),
        }
    }
    Ok(match (mode, wait) {
        (Mode::Shared, Wait::Forever) => held(lock.read(), ShmHeld::Read),
        (Mode::Shared, Wait::NonBlocking) => held(lock.try_read()?, ShmHeld::Read),
        (Mode::Shared, Wait::Until(t)) => held(lock.try_read_until(t)?, ShmHeld::Read),
        (Mode::Exclusive, Wait::Forever) => held(lock.write(), ShmHeld::Write),
        (Mode::Exclusive, Wait::NonBlocking) => held(lock.try_write()?, ShmHeld::Write),
        (Mode::Exclusive, Wait::Until(t)) => held(lock.try_write_until(t)?, ShmHeld::Write),
    })
}

fn run_shm(plan: &Plan<'_>) -> u8 {
    let a = plan.args;
    let mut opts = ShmOptions::new();
    if !a.quiet {
        opts = opts.on_block(|b: &Blocked<'_>| {
            let holder = ShmRwLock::open(b.resource).ok().and_then(|l| l.holder());
            let by = match holder {
                Some(p) => match p.command() {
                    Some(c) => format!(" held by pid {} ({c}) exclusive", p.pid),
                    None => format!(" held by pid {} exclusive", p.pid),
                },
                None => String::new(),
            };
            note!(
                "interlock: waiting for {} lock on {}{by}",
                b.mode,
                b.resource.display()
            );
        });
    }
    let lock = match opts.open_rwlock(&a.path) {
        Ok(l) => l,
        Err(e) => return fail(&e),
    };
    let (held, owner_died) = match shm_acquire(&lock, plan.mode, plan.wait) {
        Ok(h) => h,
        Err(e) => return plan.not_taken(e),
    };
    let mut env = Vec::new();
    if owner_died {
        note!(
            "interlock: the previous holder of {} died holding it exclusively; \
             running the command anyway with INTERLOCK_OWNER_DIED=1",
            lock.path().display()
        );
        env.push(("INTERLOCK_OWNER_DIED", "1".to_string()));
    }
    let code = execute(&a.command, &env, None, Tie::DieWithUs);
    let released = match held {
        ShmHeld::Read(g) => g.unlock(),
        ShmHeld::Write(mut g) => {
            // An exclusive command that succeeded after its predecessor
            // died has had its chance to repair: the poison is cleared.
            if owner_died && code == 0 {
                g.clear_poison();
            }
            g.unlock()
        }
    };
    match released {
        Ok(()) => code,
        Err(e) => release_failed(code, &e),
    }
}

/// The command's pid while it runs (0 otherwise), and whether it must stop.
#[derive(Default)]
struct Running {
    pid: u32,
    stop: bool,
}

/// The default lease time to live when `--ttl` is not given.
const DEFAULT_TTL: Duration = Duration::from_secs(60);

fn run_lease(plan: &Plan<'_>) -> u8 {
    let a = plan.args;
    let ttl = a.ttl.unwrap_or(DEFAULT_TTL);
    // If the lease is lost, another holder may be in, so the command is
    // told to stop, whether it runs already or is about to start.
    let child = Arc::new(Mutex::new(Running::default()));
    let lost = Arc::new(AtomicBool::new(false));
    let mut opts = LeaseOptions::new(ttl).keep_alive(true).on_lost({
        let (child, lost) = (Arc::clone(&child), Arc::clone(&lost));
        move |e| {
            lost.store(true, Ordering::SeqCst);
            note!("interlock: {e}; stopping the command");
            let mut c = child.lock().unwrap_or_else(|p| p.into_inner());
            c.stop = true;
            sys::terminate(c.pid);
        }
    });
    if !a.quiet {
        let probe = LeaseLock::new(&a.path, ttl);
        opts = opts.on_block(move |b| {
            let by = match probe.as_ref().ok().and_then(|p| p.holder().ok().flatten()) {
                Some(h) => format!(" held by {h}"),
                None => String::new(),
            };
            note!("interlock: waiting for lease {}{by}", b.resource.display());
        });
    }
    let lock = match LeaseLock::with_options(&a.path, opts) {
        Ok(l) => l,
        Err(e) => return fail(&e),
    };
    let guard = match interlock::Lock::acquire(&lock, Mode::Exclusive, plan.wait) {
        Ok(g) => g,
        Err(e) => return plan.not_taken(e),
    };
    let token = guard.token().to_string();
    let code = execute(
        &a.command,
        &[("INTERLOCK_TOKEN", token)],
        Some(&child),
        Tie::DieWithUs,
    );
    match guard.release() {
        Ok(()) if !lost.load(Ordering::SeqCst) => code,
        Ok(()) => lease_lost_code(code),
        Err(e) if e.kind() == ErrorKind::LeaseLost => {
            note!("interlock: {e}");
            lease_lost_code(code)
        }
        Err(e) => release_failed(code, &e),
    }
}

/// A command that ran while its lease was lost did not run under the lock:
/// its own failure status stands; success becomes EX_TEMPFAIL (75).
fn lease_lost_code(code: u8) -> u8 {
    if code == 0 {
        75
    } else {
        code
    }
}

/// The command ran, but releasing failed (the lock is released anyway when
/// interlock exits): say so, and keep the command's status unless it
/// succeeded.
fn release_failed(code: u8, e: &Error) -> u8 {
    note!("interlock: {e}");
    if code == 0 {
        EX_OSERR
    } else {
        code
    }
}

/// How the command is tied to the lock, so that it never runs without it,
/// however interlock ends (SIGKILL included).
enum Tie {
    /// A kernel lock: the command inherits a descriptor of the locked open
    /// file description, and so holds the lock itself until it exits (as
    /// with flock(1)), even if interlock dies first.
    Descriptor(std::fs::File),
    /// A lock held by interlock's process (shared memory, lease): the
    /// command is killed if interlock dies.
    DieWithUs,
}

/// Runs `argv` with extra environment `env`, tied to the lock by `tie`,
/// passing on SIGTERM/SIGHUP;
/// returns its exit status, 128+N if killed by signal N, 127 if not found,
/// 126 if not executable.
///
/// While it runs, `running` (if given) holds its pid; it is reset to 0
/// under the mutex before the child is reaped, so whoever signals the pid
/// while holding the mutex never signals a reused pid. If `stop` was set
/// before the child started, it is terminated at once.
fn execute(
    argv: &[OsString],
    env: &[(&str, String)],
    running: Option<&Mutex<Running>>,
    tie: Tie,
) -> u8 {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    // Kept open until the command has started (it then has its own copy).
    let mut _inherited = None;
    match tie {
        Tie::Descriptor(f) => match sys::inheritable(&f) {
            Ok(()) => _inherited = Some(f),
            Err(e) => {
                note!("interlock: cannot pass the lock to the command: {e}");
                return EX_OSERR;
            }
        },
        Tie::DieWithUs => sys::die_with_parent(&mut cmd),
    }
    let spawned = cmd.spawn();
    drop(_inherited);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            note!("interlock: cannot run {}: {e}", argv[0].to_string_lossy());
            return if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
        }
    };
    if let Some(r) = running {
        let mut r = r.lock().unwrap_or_else(|p| p.into_inner());
        r.pid = child.id();
        if r.stop {
            sys::terminate(r.pid);
        }
    }
    sys::forward_signals_to(child.id());
    let waited = sys::wait_exit_unreaped(child.id());
    sys::stop_forwarding();
    if let Some(r) = running {
        r.lock().unwrap_or_else(|p| p.into_inner()).pid = 0;
    }
    if let Err(e) = waited {
        note!("interlock: waiting for the command: {e}");
    }
    match child.wait() {
        Ok(st) => match (st.code(), st.signal()) {
            (Some(c), _) => c as u8,
            (None, Some(sig)) => (128 + sig) as u8,
            (None, None) => EX_SOFTWARE,
        },
        Err(e) => {
            note!("interlock: waiting for the command: {e}");
            EX_OSERR
        }
    }
}

/// Status output that could not be written: EX_OSERR, said on stderr.
fn unwritten() -> u8 {
    note!("interlock: cannot write to standard output");
    EX_OSERR
}

pub fn status(args: StatusArgs) -> u8 {
    match args.kind {
        Some(Kind::Pg) => return pg_status(&args),
        Some(_) | None if args.url.is_some() => {
            note!("interlock: --url applies only to --kind pg (see `interlock --help`)");
            return EX_USAGE;
        }
        _ => {}
    }
    let path = &args.path;
    if args.kind == Some(Kind::Shm) {
        // Asked for by name: no sniffing (a file too short for the magic is
        // then a damaged shm lock, not a plain lock file).
        return match interlock::shm::resolve(path) {
            Ok(shm) => shm_status(path, &shm),
            Err(e) => fail(&e),
        };
    }
    if let Some(shm) = shm_target(path) {
        return shm_status(path, &shm);
    }
    if is_lease(path) {
        return lease_status(path);
    }
    match interlock::holders(path) {
        Ok(list) if list.is_empty() => {
            if !out!("{}: no locks", path.display()) {
                return unwritten();
            }
            0
        }
        Ok(list) => {
            for h in list {
                if !out!("{h}") {
                    return unwritten();
                }
            }
            0
        }
        Err(e) => fail(&e),
    }
}

/// The shared-memory lock file `path` names, if it names one: a file that
/// starts with the shm magic, or a bare name with no file of that name here
/// whose `/dev/shm/interlock-NAME` exists.
fn shm_target(path: &Path) -> Option<std::path::PathBuf> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let has_magic = |p: &Path| {
        let regular = std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file());
        let mut magic = [0u8; 8];
        regular
            && std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
                .open(p)
                .and_then(|mut f| f.read_exact(&mut magic))
                .is_ok()
            && &magic == b"ILCKSHM\0"
    };
    if has_magic(path) {
        return Some(path.to_path_buf());
    }
    let bare = !path.as_os_str().as_encoded_bytes().contains(&b'/');
    if bare && std::fs::symlink_metadata(path).is_err() {
        let resolved = interlock::shm::resolve(path).ok()?;
        if has_magic(&resolved) {
            return Some(resolved);
        }
    }
    None
}

/// One line per holder of a shared-memory lock: pid, command, mode, and
/// whether it is poisoned. Nothing is created or changed.
fn shm_status(given: &Path, path: &Path) -> u8 {
    let opts = ShmOptions::new().create(false).allow_foreign_owner(true);
    let who = |p: interlock::ProcessId| match p.command() {
        Some(c) => format!("pid {} ({c})", p.pid),
        None if !p.is_alive() => format!("pid {} (dead)", p.pid),
        None => format!("pid {}", p.pid),
    };
    let mut lines = Vec::new();
    let poisoned = match opts.open_rwlock(path) {
        Ok(l) => {
            let h = l.holders();
            let mut dead_writer = false;
            if let Some((p, mode)) = h.token {
                dead_writer = mode == "exclusive" && !p.is_alive();
                lines.push(format!("{} {mode} shm held", who(p)));
            }
            for (p, n) in h.readers {
                let holds = if n == 1 { "hold" } else { "holds" };
                lines.push(format!("{} shared shm held ({n} {holds})", who(p)));
            }
            // A dead exclusive holder poisons the lock for the next taker.
            h.poisoned || dead_writer
        }
        Err(e) if e.kind() == ErrorKind::Corrupt => match opts.open_mutex(path) {
            Ok(m) => {
                let mut dead = false;
                if let Some(p) = m.holder() {
                    dead = !p.is_alive();
                    lines.push(format!("{} exclusive shm mutex held", who(p)));
                }
                m.is_poisoned() || dead
            }
            Err(_) => match opts.open_existing_semaphore(path) {
                Ok(s) => {
                    let mut counted: Vec<(interlock::ProcessId, usize)> = Vec::new();
                    for p in s.holders() {
                        match counted.iter_mut().find(|(q, _)| *q == p) {
                            Some((_, c)) => *c += 1,
                            None => counted.push((p, 1)),
                        }
                    }
                    for (p, c) in counted {
                        let permits = if c == 1 { "permit" } else { "permits" };
                        lines.push(format!("{} semaphore held ({c} {permits})", who(p)));
                    }
                    lines.push(format!(
                        "{}: {} of {} permits free",
                        given.display(),
                        s.available(),
                        s.permits()
                    ));
                    false
                }
                Err(_) => return fail(&e),
            },
        },
        Err(e) => return fail(&e),
    };
    if poisoned {
        lines.push(format!(
            "{}: poisoned (a holder died holding it exclusively)",
            given.display()
        ));
    }
    if lines.is_empty() {
        lines.push(format!("{}: no locks", given.display()));
    }
    for l in lines {
        if !out!("{l}") {
            return unwritten();
        }
    }
    0
}

/// A lease lock at `path` keeps its side directory `NAME.lease` beside it
/// (a real directory: a symbolic link is not followed).
fn is_lease(path: &Path) -> bool {
    match path.file_name() {
        Some(name) => {
            let mut side = name.to_os_string();
            side.push(".lease");
            std::fs::symlink_metadata(path.with_file_name(side)).is_ok_and(|m| m.is_dir())
        }
        None => false,
    }
}

/// The lease's holder, read without creating or changing anything.
fn lease_status(path: &Path) -> u8 {
    let written = match LeaseLock::peek(path) {
        Ok(Some(h)) => out!("{h} exclusive lease"),
        Ok(None) => out!("{}: no lease held", path.display()),
        Err(e) => return fail(&e),
    };
    if written {
        0
    } else {
        unwritten()
    }
}
