//! Opening and creating shared-memory locks: names, files, headers, and the
//! per-process handle.
//!
//! Why it is built this way: a lock file is shared with processes we do not
//! control, so it is created complete under a temporary name and linked into
//! place (nobody sees a half-written header), opened without following
//! symbolic links, checked (regular file, local file system, magic, layout
//! version, kind, size) before it is mapped, and mapped only to the length
//! its header and its real size agree on (touching a mapped page past the
//! end of a file is SIGBUS).

use super::layout::{self, Header, Kind, Slot, Words, HEADER_LEN, SLOTS_OFFSET, WORDS_OFFSET};
use super::local;
use super::protocol::{Core, Env, DEFAULT_READERS_TURN, MAX_READERS_TURN};
use super::{Semaphore, ShmMutex, ShmRwLock};
use crate::error::{Error, ErrorKind, Result};
use crate::sys::mmap::{Mapping, View};
use crate::wait::{Blocked, Mode, OnBlock};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Where a bare lock name lives.
pub const SHM_DIR: &str = "/dev/shm";
/// The prefix of a bare name's file.
pub const NAME_PREFIX: &str = "interlock-";
/// Slots per lock unless [`ShmOptions::slots`] says otherwise.
pub const DEFAULT_SLOTS: u32 = 128;

/// Maps a lock name to its file: a bare name goes to
/// `/dev/shm/interlock-NAME`, anything with a `/` is a path.
pub fn resolve(name: impl AsRef<Path>) -> Result<PathBuf> {
    let p = name.as_ref();
    let s = p.as_os_str().as_encoded_bytes();
    let bad = |why: &str| {
        Err(
            Error::new(ErrorKind::InvalidInput, "open shared-memory lock")
                .with_path(p)
                .with_detail(why.to_string()),
        )
    };
    if s.is_empty() {
        return bad("empty lock name");
    }
    if s.contains(&0) {
        return bad("lock name contains a NUL byte");
    }
    if s.contains(&b'/') {
        if s.ends_with(b"/") {
            return bad("lock path names a directory");
        }
        return Ok(p.to_path_buf());
    }
    if s == b"." || s == b".." {
        return bad("lock name is . or ..");
    }
    let mut file = std::ffi::OsString::from(NAME_PREFIX);
    file.push(p.as_os_str());
    Ok(Path::new(SHM_DIR).join(file))
}

/// How to open or create a shared-memory lock.
#[derive(Clone)]
pub struct ShmOptions {
    slots: u32,
    mode: u32,
    on_block: Option<OnBlock>,
    create: bool,
    foreign_owner: bool,
    readers_turn: Duration,
}

impl Default for ShmOptions {
    fn default() -> Self {
        ShmOptions::new()
    }
}

impl fmt::Debug for ShmOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShmOptions")
            .field("slots", &self.slots)
            .field("mode", &format_args!("{:o}", self.mode))
            .field("on_block", &self.on_block.is_some())
            .field("create", &self.create)
            .field("foreign_owner", &self.foreign_owner)
            .field("readers_turn", &self.readers_turn)
            .finish()
    }
}

impl ShmOptions {
    /// The defaults: 128 slots, mode 0o600, no on-block callback.
    pub fn new() -> ShmOptions {
        ShmOptions {
            slots: DEFAULT_SLOTS,
            mode: 0o600,
            on_block: None,
            create: true,
            foreign_owner: false,
            readers_turn: DEFAULT_READERS_TURN,
        }
    }

    /// Whether a missing lock is created (default `true`); with `false`, a
    /// missing lock is [`ErrorKind::NotFound`] and nothing is written (for
    /// inspection).
    pub fn create(mut self, on: bool) -> ShmOptions {
        self.create = on;
        self
    }

    /// Whether a lock file owned by another user (root included) may be
    /// used (default `false`: refused with [`ErrorKind::PermissionDenied`]).
    ///
    /// The owner of the file can always break the lock: change its words
    /// (wedging every user), or truncate the file, after which every process
    /// that touches the mapping is killed by SIGBUS. Opt in only if you
    /// trust that user as you trust your own processes.
    pub fn allow_foreign_owner(mut self, on: bool) -> ShmOptions {
        self.foreign_owner = on;
        self
    }

    /// The number of slots of a lock this call creates (1..=4094; an
    /// existing lock keeps its own). More slots let more threads read
    /// without sharing a cache line; each costs 128 bytes.
    pub fn slots(mut self, n: u32) -> ShmOptions {
        self.slots = n;
        self
    }

    /// The permission bits of a file this call creates (minus the umask;
    /// bits outside 0o777 are ignored). Every process that uses the lock
    /// needs read and write access.
    pub fn mode(mut self, mode: u32) -> ShmOptions {
        self.mode = mode;
        self
    }

    /// How long a writer of a reader-writer lock opened with these options
    /// waits, at most, for the readers that slept behind the writer before
    /// it to come in, before it shuts readers out (default
    /// [`DEFAULT_READERS_TURN`], 1 ms). Without this turn, a writer that
    /// asks again the moment it lets go takes the lock back before the
    /// readers its release woke have run, and can keep them out for as
    /// long as it goes on. `Duration::ZERO` gives no turn: writers always
    /// go first. A turn longer than a minute is taken as a minute: a
    /// reader killed while it waited leaves a count that only the turn's
    /// end clears, and that costs the next writer one whole turn. It is
    /// this handle's writers' setting; other handles and processes have
    /// their own.
    pub fn readers_turn(mut self, d: Duration) -> ShmOptions {
        self.readers_turn = d;
        self
    }

    /// A callback told once per acquisition, just before it blocks.
    pub fn on_block(mut self, f: impl Fn(&Blocked<'_>) + Send + Sync + 'static) -> ShmOptions {
        self.on_block = Some(std::sync::Arc::new(f));
        self
    }

    /// Opens or creates the reader-writer lock `name` (see [`resolve`]).
    pub fn open_rwlock(&self, name: impl AsRef<Path>) -> Result<ShmRwLock> {
        Ok(ShmRwLock::from_parts(
            Inner::open(name.as_ref(), Kind::RwLock, self)?,
            self.on_block.clone(),
        ))
    }

    /// A reader-writer lock in a fresh anonymous shared mapping.
    pub fn anonymous_rwlock(&self) -> Result<ShmRwLock> {
        Ok(ShmRwLock::from_parts(
            Inner::anonymous(Kind::RwLock, self)?,
            self.on_block.clone(),
        ))
    }

    /// Opens or creates the mutex `name` (see [`resolve`]).
    pub fn open_mutex(&self, name: impl AsRef<Path>) -> Result<ShmMutex> {
        Ok(ShmMutex::from_parts(
            Inner::open(name.as_ref(), Kind::Mutex, self)?,
            self.on_block.clone(),
        ))
    }

    /// Opens or creates the semaphore `name` (see [`resolve`]) with
    /// `permits` permits (1..=4094). An existing semaphore with another
    /// number of permits is an `InvalidInput` error (the count is fixed at
    /// creation). The slot count of these options is not used.
    pub fn open_semaphore(&self, name: impl AsRef<Path>, permits: u32) -> Result<Semaphore> {
        let opts = self.clone().slots(permits);
        let inner = Inner::open(name.as_ref(), Kind::Semaphore, &opts)?;
        let have = inner.permits().permits() as u32;
        if have != permits {
            return Err(Error::new(ErrorKind::InvalidInput, "open semaphore")
                .with_path(&inner.path)
                .with_detail(format!(
                    "the semaphore exists with {have} permits, not {permits}"
                )));
        }
        Ok(Semaphore::from_parts(inner, self.on_block.clone()))
    }

    /// Opens the existing semaphore `name` with whatever number of permits
    /// it has (never creates one: `NotFound` if missing), e.g. to inspect
    /// it.
    pub fn open_existing_semaphore(&self, name: impl AsRef<Path>) -> Result<Semaphore> {
        let opts = self.clone().create(false);
        let inner = Inner::open(name.as_ref(), Kind::Semaphore, &opts)?;
        Ok(Semaphore::from_parts(inner, self.on_block.clone()))
    }

    /// A semaphore with `permits` permits in a fresh anonymous shared
    /// mapping, shared with children forked afterwards.
    pub fn anonymous_semaphore(&self, permits: u32) -> Result<Semaphore> {
        let opts = self.clone().slots(permits);
        Ok(Semaphore::from_parts(
            Inner::anonymous(Kind::Semaphore, &opts)?,
            self.on_block.clone(),
        ))
    }

    /// A mutex in a fresh anonymous shared mapping.
    pub fn anonymous_mutex(&self) -> Result<ShmMutex> {
        Ok(ShmMutex::from_parts(
            Inner::anonymous(Kind::Mutex, self)?,
            self.on_block.clone(),
        ))
    }
}

/// The identity oracle of real processes: pid + start time from /proc.
pub(crate) struct ProcEnv;

impl Env for ProcEnv {
    fn me(&self) -> u64 {
        let id = crate::sys::proc::current();
        // The MEMBARRIER flag says, in every slot this process claims,
        // whether draining writers may rely on their barrier behind its
        // readers (registered once per process and fork generation, so a
        // forked child answers for itself).
        let fenced = if crate::sys::membarrier::register() {
            layout::MEMBARRIER
        } else {
            0
        };
        layout::pack(id.pid, id.start_time) | fenced
    }

    fn is_dead(&self, owner: u64) -> bool {
        let (pid, start_time) = layout::unpack(owner);
        if pid == 0 {
            return false;
        }
        let id = crate::ProcessId { pid, start_time };
        crate::sys::proc::liveness(id) == crate::sys::proc::Liveness::Dead
    }

    fn thread_exited(&self, owner: u64, tid: u32) -> bool {
        let (pid, _) = layout::unpack(owner);
        if pid == 0 || tid == 0 {
            return false;
        }
        // The process is the one named (a reused pid is `is_dead`), so its
        // task directory tells about the thread: gone, a zombie or exiting.
        self.is_dead(owner) || crate::sys::robust::thread_exiting(pid, tid)
    }

    fn is_dying(&self, owner: u64) -> bool {
        let (pid, _) = layout::unpack(owner);
        pid != 0 && (self.is_dead(owner) || crate::sys::robust::process_exiting(pid))
    }
}

/// The watch slots a new lock of `kind` gets: a semaphore's table, or none.
fn watch_of(kind: Kind) -> u32 {
    match kind {
        Kind::Semaphore => layout::WATCH_SLOTS,
        _ => 0,
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// One process's handle on one lock's memory (shared by the `ShmRwLock` or
/// `ShmMutex` and the thread-local slot caches, which hold it weakly).
pub(crate) struct Inner {
    /// The slots, and after them a semaphore's watch table (if any).
    view: View<Words, Slot>,
    /// How many of the view's slots are the lock's (the rest: watch slots).
    cells: usize,
    /// A semaphore's identity cache and watch-slot cover (see semaphore.rs).
    pub(crate) cover: super::semaphore::Cover,
    /// Process-unique, never reused: the key of the thread-local caches.
    pub(crate) id: u64,
    pub(crate) path: PathBuf,
    pub(crate) pool: parking_lot::Mutex<local::Pool>,
    /// The pool's shared slot, readable without its lock: the fork
    /// generation it was claimed in (0: none yet) and the slot
    /// ([`local::shared_slot`]).
    pub(crate) shared_gen: AtomicU64,
    pub(crate) shared_slot: std::sync::atomic::AtomicU32,
    /// The longest this handle's writers give readers their turn (the
    /// option, at most [`MAX_READERS_TURN`]).
    pub(crate) readers_turn: Duration,
}

impl Inner {
    /// The process holding (or first waiting for) the exclusive or
    /// upgradable token, if any.
    pub(crate) fn holder(&self) -> Option<crate::ProcessId> {
        let o = self.core().token_owner()?;
        let (pid, start_time) = super::layout::unpack(o);
        Some(crate::ProcessId { pid, start_time })
    }

    /// The processes with read holds, each with the number of holds taken
    /// through its slots (a snapshot, for diagnostics).
    pub(crate) fn readers(&self) -> Vec<(crate::ProcessId, u32)> {
        let words = self.view.words();
        let slots = &self.view.slots()[..self.cells];
        let high = (words.high.load(Ordering::Relaxed) as usize).min(slots.len());
        let mut out: Vec<(crate::ProcessId, u32)> = Vec::new();
        for s in &slots[..high] {
            let held = s.held.load(Ordering::Relaxed);
            let o = s.owner.load(Ordering::Relaxed) & !layout::RECLAIMING;
            if held == 0 || o == 0 {
                continue;
            }
            let (pid, start_time) = layout::unpack(o);
            let id = crate::ProcessId { pid, start_time };
            match out.iter_mut().find(|(p, _)| *p == id) {
                Some((_, n)) => *n += held,
                None => out.push((id, held)),
            }
        }
        out
    }

    /// Whether the exclusive (rather than the upgradable) token is taken.
    pub(crate) fn token_is_exclusive(&self) -> bool {
        self.view.words().state.load(Ordering::Relaxed) & layout::WRITER != 0
    }

    /// The semaphore protocol over this mapping (its slots are the permits).
    #[inline]
    pub(crate) fn permits(&self) -> super::permits::Permits<'_, ProcEnv> {
        let (cells, watch) = self.view.slots().split_at(self.cells);
        super::permits::Permits {
            words: self.view.words(),
            cells,
            watch,
            env: &ProcEnv,
        }
    }

    #[inline]
    /// The mapping (kept alive by robust-list entries linked into it).
    pub(crate) fn mapping(&self) -> &std::sync::Arc<Mapping> {
        self.view.mapping()
    }

    #[inline]
    pub(crate) fn core(&self) -> Core<'_, ProcEnv> {
        Core {
            words: self.view.words(),
            slots: &self.view.slots()[..self.cells],
            env: &ProcEnv,
            readers_turn: self.readers_turn,
        }
    }

    fn from_mapping(map: Mapping, h: &Header, path: PathBuf, opts: &ShmOptions) -> Inner {
        crate::sys::fork::watch();
        // Register for membarrier now (once per process), before any slot
        // of this lock is claimed with our identity, which carries the
        // answer (see `ProcEnv::me`).
        crate::sys::membarrier::register();
        Inner {
            view: View::new(
                map,
                WORDS_OFFSET,
                SLOTS_OFFSET,
                h.slots as usize + h.watch as usize,
            ),
            cells: h.slots as usize,
            cover: super::semaphore::Cover::new(),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            path,
            pool: parking_lot::Mutex::new(local::Pool::default()),
            shared_gen: AtomicU64::new(0),
            shared_slot: std::sync::atomic::AtomicU32::new(0),
            readers_turn: opts.readers_turn.min(MAX_READERS_TURN),
        }
    }

    fn check_slots(opts: &ShmOptions) -> Result<()> {
        if !(layout::MIN_SLOTS..=layout::MAX_SLOTS).contains(&opts.slots) {
            return Err(
                Error::new(ErrorKind::InvalidInput, "create shared-memory lock").with_detail(
                    format!(
                        "{} slots (or permits) requested; a lock has {}..={}",
                        opts.slots,
                        layout::MIN_SLOTS,
                        layout::MAX_SLOTS
                    ),
                ),
            );
        }
        Ok(())
    }

    pub(crate) fn anonymous(kind: Kind, opts: &ShmOptions) -> Result<Inner> {
        Inner::check_slots(opts)?;
        let h = Header {
            kind,
            slots: opts.slots,
            pid_ns: 0,
            watch: watch_of(kind),
        };
        let map = Mapping::shared_anonymous(h.total_len())
            .map_err(|e| Error::io("map anonymous shared memory", e))?;
        Ok(Inner::from_mapping(
            map,
            &h,
            PathBuf::from("(anonymous shared memory)"),
            opts,
        ))
    }

    pub(crate) fn open(name: &Path, kind: Kind, opts: &ShmOptions) -> Result<Inner> {
        Inner::check_slots(opts)?;
        let path = resolve(name)?;
        let (file, header) = open_or_create(&path, kind, opts)?;
        let map = Mapping::shared_file(&file, header.total_len())
            .map_err(|e| Error::io("map shared-memory lock", e).with_path(&path))?;
        Ok(Inner::from_mapping(map, &header, path, opts))
    }

    /// The description the on-block callback gets.
    pub(crate) fn blocked(&self, mode: Mode) -> Blocked<'_> {
        Blocked {
            resource: &self.path,
            mode,
            range: None,
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        local::unlink_mine(self);
        local::release_all(self);
    }
}

const OPEN_FLAGS: i32 = libc::O_NOFOLLOW | libc::O_CLOEXEC;

/// File systems on which a shared mapping is not shared memory.
fn network_fs(magic: i64) -> Option<&'static str> {
    match magic {
        0x6969 => Some("NFS"),
        0x517b => Some("SMB"),
        0xff53_4d42 => Some("CIFS"),
        0xfe53_4d42 => Some("SMB2"),
        0x0102_1997 => Some("9P"),
        0x00c3_6400 => Some("Ceph"),
        _ => None,
    }
}

/// This process's PID namespace (the inode of /proc/self/ns/pid), 0 if
/// unknown.
pub(crate) fn pid_namespace() -> u64 {
    std::fs::read_link("/proc/self/ns/pid")
        .ok()
        .and_then(|l| {
            let s = l.to_str()?.to_owned();
            s.strip_prefix("pid:[")?.strip_suffix(']')?.parse().ok()
        })
        .unwrap_or(0)
}

fn open_or_create(path: &Path, kind: Kind, opts: &ShmOptions) -> Result<(File, Header)> {
    // A file may vanish between "create failed: exists" and "open": retry a
    // few times, then report what we last saw.
    let mut last = None;
    for _ in 0..16 {
        match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(OPEN_FLAGS)
            .open(path)
        {
            Ok(f) => return validate(f, path, kind, opts),
            Err(e) if e.kind() == io::ErrorKind::NotFound && !opts.create => {
                return Err(Error::io("open shared-memory lock", e).with_path(path));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => match create(path, kind, opts) {
                Ok(Some(done)) => return Ok(done),
                Ok(None) => last = Some(e),
                Err(e) => return Err(e),
            },
            Err(e) => {
                return Err(Error::io("open shared-memory lock", e).with_path(path));
            }
        }
    }
    Err(Error::io(
        "open shared-memory lock",
        last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::ENOENT)),
    )
    .with_path(path)
    .with_detail("the file kept appearing and disappearing"))
}

/// Checks an opened file: a regular file, on a local file system, of this
/// kind, with a sound header matching its size.
fn validate(f: File, path: &Path, kind: Kind, opts: &ShmOptions) -> Result<(File, Header)> {
    let corrupt = |detail: String| {
        Error::new(ErrorKind::Corrupt, "open shared-memory lock")
            .with_path(path)
            .with_detail(detail)
    };
    let meta = f
        .metadata()
        .map_err(|e| Error::io("stat shared-memory lock", e).with_path(path))?;
    if !meta.is_file() {
        return Err(corrupt("not a regular file".into()));
    }
    if !opts.foreign_owner {
        use std::os::unix::fs::MetadataExt;
        let me = crate::sys::proc::credentials(std::process::id()).map(|c| c.uid);
        if me.is_some_and(|uid| uid != meta.uid()) {
            return Err(
                Error::new(ErrorKind::PermissionDenied, "open shared-memory lock")
                    .with_path(path)
                    .with_detail(format!(
                        "the file is owned by uid {}, another user, who could wedge the lock or \
                         truncate it (killing its users with SIGBUS); \
                         see ShmOptions::allow_foreign_owner",
                        meta.uid()
                    )),
            );
        }
    }
    if let Ok(magic) = crate::sys::mmap::fs_type(&f) {
        if let Some(fs) = network_fs(magic) {
            return Err(
                Error::new(ErrorKind::Unsupported, "open shared-memory lock")
                    .with_path(path)
                    .with_detail(format!(
                        "the file is on {fs}: memory mapped from a network file system is not shared between hosts"
                    )),
            );
        }
    }
    let len = meta.len();
    let mut buf = vec![0u8; HEADER_LEN.min(len as usize)];
    f.read_exact_at(&mut buf, 0)
        .map_err(|e| Error::io("read shared-memory lock header", e).with_path(path))?;
    let h = Header::decode(&buf, len).map_err(corrupt)?;
    if h.kind != kind {
        return Err(corrupt(format!(
            "the file holds a {}, not a {}",
            h.kind.name(),
            kind.name()
        )));
    }
    let ns = pid_namespace();
    if h.pid_ns != 0 && ns != 0 && h.pid_ns != ns {
        return Err(
            Error::new(ErrorKind::Unsupported, "open shared-memory lock")
                .with_path(path)
                .with_detail(
                    "the lock was created in another PID namespace: holders' liveness cannot be checked from here",
                ),
        );
    }
    Ok((f, h))
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Creates the lock file complete under a temporary name in the same
/// directory, then hard-links it into place, so nobody ever sees a partial
/// header. `Ok(None)` if another process linked its own first (the caller
/// opens that one).
fn create(path: &Path, kind: Kind, opts: &ShmOptions) -> Result<Option<(File, Header)>> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    path.file_name().ok_or_else(|| {
        Error::new(ErrorKind::InvalidInput, "create shared-memory lock")
            .with_path(path)
            .with_detail("the path has no file name")
    })?;
    // A short temporary name of its own, so that any lock name whose file
    // name fits also has a temporary name that fits.
    let tmp = dir.join(format!(
        ".interlock-tmp.{}.{}.tmp",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let h = Header {
        kind,
        slots: opts.slots,
        pid_ns: pid_namespace(),
        watch: watch_of(kind),
    };
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(opts.mode & crate::file::PERMISSION_BITS)
        .custom_flags(OPEN_FLAGS)
        .open(&tmp)
        .map_err(|e| Error::io("create shared-memory lock", e).with_path(path))?;
    let cleanup = |e: Error| {
        let _ = std::fs::remove_file(&tmp);
        e
    };
    f.set_len(h.total_len() as u64)
        .and_then(|_| f.write_all_at(&h.encode(), 0))
        .map_err(|e| cleanup(Error::io("initialise shared-memory lock", e).with_path(path)))?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            // Re-check as any opener would (and catch a network file system).
            validate(f, path, kind, opts).map(Some)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(None),
        Err(e) => Err(Error::io("create shared-memory lock", e)
            .with_path(path)
            .with_detail("could not link the initialised file into place")),
    }
}
