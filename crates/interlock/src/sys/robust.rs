//! A liveness word linked into the calling thread's robust-futex list
//! (glibc's), and `futex_waitv` on two words.
//!
//! Why it is built this way: a waiter behind a lock holder in another
//! process must learn that the holder died without waking periodically to
//! ask /proc. At thread exit (SIGKILL included) the kernel walks the list
//! registered with `set_robust_list`; for every entry whose word (at
//! `entry + futex_offset`) holds the dying thread's tid it sets
//! `FUTEX_OWNER_DIED` and wakes one sleeper of that word. glibc registers one
//! list per thread and keeps its robust mutexes on it; we link our entry
//! into that same list exactly as glibc's ENQUEUE/DEQUEUE do (a doubly
//! linked list whose `next` is what the kernel follows), so glibc's own
//! robust mutexes stay recovered. Registering a list of our own would
//! replace glibc's. See docs/design-shm.md, "Waiting without waking".
//!
//! The kernel follows only `next`, and every edit below changes the chain it
//! follows with one store, so a death between any two stores leaves a list
//! the kernel can walk.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::futex::WaitOutcome;
use super::mmap::Mapping;

/// Set by the kernel in a robust word whose owner thread died.
pub const FUTEX_OWNER_DIED: u32 = 0x4000_0000;
/// Set by a sleeper in a robust word so that the kernel wakes it.
pub const FUTEX_WAITERS: u32 = 0x8000_0000;
/// The tid bits of a robust word.
pub const FUTEX_TID_MASK: u32 = 0x3fff_ffff;

/// This thread's id (what the kernel compares a robust word with).
pub fn gettid() -> u32 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as u32 }
}

/// This thread's registered robust-list head (glibc's, in its thread
/// descriptor) and its `futex_offset`; `None` if no list is registered.
/// (Also the `interlock-bench robust` probe's, through `__robust`.)
pub fn head() -> Option<(*mut usize, isize)> {
    let mut head: *mut usize = std::ptr::null_mut();
    let mut len: libc::size_t = 0;
    // SAFETY: get_robust_list(0, ...) writes this thread's registration
    // into the two out-pointers, valid for writes on this frame.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            0,
            &mut head as *mut *mut usize,
            &mut len as *mut libc::size_t,
        )
    };
    if rc != 0 || head.is_null() || len < 3 * std::mem::size_of::<usize>() {
        return None;
    }
    // SAFETY: a registered head is this thread's live `struct
    // robust_list_head { list, futex_offset, list_op_pending }` (glibc's,
    // in its thread descriptor), pointer-sized fields.
    let off = unsafe { head.add(1).read_volatile() } as isize;
    Some((head, off))
}

/// Links the entry `node` (glibc's `__pthread_list_t`: `prev` at `node`,
/// `next` at `node + 1`, the address the kernel and glibc link) at the
/// front of the list `head`, as glibc's ENQUEUE_MUTEX does: the kernel
/// follows only `next`, and the one store that puts the entry on the chain
/// it follows comes last.
///
/// # Safety
///
/// `head` is the calling thread's registered head (from [`head`]); `node`
/// is a 16-byte, 8-aligned entry, linked in no list, that stays mapped and
/// is written by nobody else for as long as it is linked; the caller
/// unlinks it with [`dequeue`] on this thread before that memory goes.
pub unsafe fn enqueue(head: *mut usize, node: *mut usize) {
    // SAFETY: (the caller's contract) the list is edited only by this
    // thread (glibc's robust mutex calls and ours do not interleave), and
    // `first - 8` is the `prev` field of the first entry, or glibc's
    // `robust_prev` just before the head when the list is empty: the word
    // glibc's ENQUEUE_MUTEX writes too.
    unsafe {
        let me = node.add(1) as usize;
        let first = head.read_volatile();
        ((first & !1) as *mut usize).sub(1).write_volatile(me);
        node.add(1).write_volatile(first);
        node.write_volatile(head as usize);
        std::sync::atomic::compiler_fence(Ordering::SeqCst);
        head.write_volatile(me);
    }
}

/// Unlinks the entry `node` (as glibc's DEQUEUE_MUTEX does) and zeroes it.
///
/// # Safety
///
/// `node` was linked by [`enqueue`] on this thread and is still linked.
pub unsafe fn dequeue(node: *mut usize) {
    // SAFETY: (the caller's contract) its neighbours' fields (an entry of
    // ours or glibc's, or glibc's head and `robust_prev`) are live: glibc
    // keeps its entries linked while held, ours stay mapped while linked,
    // and the list is edited by this thread only.
    unsafe {
        let me_next = node.add(1).read_volatile();
        let me_prev = node.read_volatile();
        ((me_next & !1) as *mut usize)
            .sub(1)
            .write_volatile(me_prev);
        ((me_prev & !1) as *mut usize).write_volatile(me_next);
        std::sync::atomic::compiler_fence(Ordering::SeqCst);
        node.write_volatile(0);
        node.add(1).write_volatile(0);
    }
}

/// An entry linked into this thread's robust list. Not `Send`: only the
/// linking thread may unlink it. Holds the mapping, so the memory the kernel
/// walks stays mapped for as long as the entry may be linked. Dropping it
/// does *not* unlink (a forked child must never edit its parent's entries):
/// call [`Linked::unlink`].
pub struct Linked {
    _map: Arc<Mapping>,
    /// The entry's `prev` field; `next` follows it.
    node: *mut usize,
    word: *const AtomicU32,
    _not_send: PhantomData<*const ()>,
}

impl Linked {
    /// Links the entry of `word` into this thread's list and stores `tid` in
    /// the word (after linking: a death in between leaves 0, which the
    /// kernel skips). The entry (`{prev, next}` at `word - futex_offset -
    /// 8`) must fall inside `area`, 8-aligned, and both must lie in `map`;
    /// otherwise, or with no registered list, `None` (the word stays 0:
    /// uncovered).
    pub fn link(
        map: &Arc<Mapping>,
        word: &AtomicU32,
        area: &[AtomicU64],
        tid: u32,
    ) -> Option<Linked> {
        let (head, futex_offset) = head()?;
        let w = word.as_ptr() as usize;
        let next = w.checked_add_signed(-futex_offset)?;
        let node = next.checked_sub(8)?;
        let a0 = area.as_ptr() as usize;
        let a1 = a0 + std::mem::size_of_val(area);
        if node % 8 != 0 || node < a0 || node + 16 > a1 || !map.contains(w, 4) {
            return None;
        }
        let node = node as *mut usize;
        // SAFETY: `head` is this thread's (from `head()`); `node` is the
        // 8-aligned 16-byte entry inside `area`, which lives in `map`, kept
        // mapped by the Arc stored in the result; only this thread writes
        // it (`entry` is written through here only, by the slot's one
        // linking thread), and `unlink` dequeues it on this thread (not
        // `Send`).
        unsafe { enqueue(head, node) };
        word.store(tid, Ordering::SeqCst);
        Some(Linked {
            _map: Arc::clone(map),
            node,
            word,
            _not_send: PhantomData,
        })
    }

    /// The liveness word.
    pub fn word(&self) -> &AtomicU32 {
        // SAFETY: `word` points into the mapping held by `_map`, valid and
        // aligned for as long as `self` lives.
        unsafe { &*self.word }
    }

    /// Swaps the word to 0 (waking its sleepers if it had `FUTEX_WAITERS`),
    /// then unlinks the entry (as glibc's DEQUEUE_MUTEX does).
    pub fn unlink(self) {
        let old = self.word().swap(0, Ordering::SeqCst);
        if old & FUTEX_WAITERS != 0 {
            super::futex::wake(self.word(), i32::MAX);
        }
        // SAFETY: the entry is linked in this thread's list (by `link`; not
        // `Send`, so this is that thread), and still is: only this consumes
        // `self`.
        unsafe { dequeue(self.node) };
    }
}

/// Whether `futex_waitv` was found missing (`ENOSYS`, Linux < 5.16).
static NO_WAITV: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The most words one `futex_waitv` call takes (the kernel's
/// `FUTEX_WAITV_MAX`).
pub const WAITV_MAX: usize = 128;

/// `futex_waitv` on `{a == ea, b == eb}` (shared futexes), at most
/// `timeout`. `None` if the call is not available (then poll).
pub fn wait2(
    a: &AtomicU32,
    ea: u32,
    b: &AtomicU32,
    eb: u32,
    timeout: Option<Duration>,
) -> Option<WaitOutcome> {
    waitv(&[(a, ea), (b, eb)], timeout)
}

/// `futex_waitv` on every `(word, expected)` of `words` (shared futexes;
/// at most [`WAITV_MAX`], the rest are left out), at most `timeout`.
/// `None` if the call is not available (then poll).
pub fn waitv(words: &[(&AtomicU32, u32)], timeout: Option<Duration>) -> Option<WaitOutcome> {
    if NO_WAITV.load(Ordering::Relaxed) {
        return None;
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct FutexWaitv {
        val: u64,
        uaddr: u64,
        flags: u32,
        reserved: u32,
    }
    const FUTEX2_SIZE_U32: u32 = 2;
    let mut v = [FutexWaitv {
        val: 0,
        uaddr: 0,
        flags: 0,
        reserved: 0,
    }; WAITV_MAX];
    let n = words.len().min(WAITV_MAX);
    for (slot, (w, e)) in v.iter_mut().zip(words) {
        *slot = FutexWaitv {
            val: u64::from(*e),
            uaddr: w.as_ptr() as u64,
            flags: FUTEX2_SIZE_U32,
            reserved: 0,
        };
    }
    let ts = timeout.map(|d| {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `now` is a valid out-pointer on this frame.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
        let ns = now.tv_nsec as u64 + u64::from(d.subsec_nanos());
        libc::timespec {
            tv_sec: now
                .tv_sec
                .saturating_add(d.as_secs().min(i32::MAX as u64) as libc::time_t)
                .saturating_add((ns / 1_000_000_000) as libc::time_t),
            tv_nsec: (ns % 1_000_000_000) as libc::c_long,
        }
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `v[..n]` are futex_waitv records whose addresses are live,
    // aligned u32s borrowed for the call; `ts_ptr` is null or an absolute
    // CLOCK_MONOTONIC time on this frame.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex_waitv,
            v.as_ptr(),
            n as u32,
            0u32,
            ts_ptr,
            libc::CLOCK_MONOTONIC,
        )
    };
    if rc >= 0 {
        return Some(WaitOutcome::Woken);
    }
    Some(match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) => WaitOutcome::Changed,
        Some(libc::ETIMEDOUT) => WaitOutcome::TimedOut,
        Some(libc::EINTR) => {
            super::timer::note_signal();
            WaitOutcome::Interrupted
        }
        Some(libc::ENOSYS) | Some(libc::EPERM) => {
            NO_WAITV.store(true, Ordering::Relaxed);
            return None;
        }
        _ => WaitOutcome::Woken,
    })
}

/// Whether every thread of process `pid` is gone, a zombie or exiting (so
/// none of them runs user code again): what a SIGKILL leaves from the
/// moment each thread enters its exit, before the process is a zombie.
/// The task directory is listed twice around the checks, so that a thread
/// started in between is not missed. False if /proc cannot tell.
pub fn process_exiting(pid: u32) -> bool {
    let list = || -> Option<Vec<u32>> {
        let mut v: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .ok()?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        v.sort_unstable();
        Some(v)
    };
    let Some(before) = list() else {
        return false;
    };
    if before.is_empty() || !before.iter().all(|&t| thread_exiting(pid, t)) {
        return false;
    }
    // Exiting threads leave the list; a new one would have to be added.
    match list() {
        Some(after) => after.iter().all(|t| before.contains(t)),
        None => true,
    }
}

/// Whether thread `tid` of process `pid` is gone, a zombie, or exiting
/// (`PF_EXITING`, 0x4, in the flags field of /proc/PID/task/TID/stat).
pub fn thread_exiting(pid: u32, tid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")) {
        Err(e) => e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH),
        Ok(s) => {
            let rest = s.rfind(')').map_or("", |i| &s[i + 1..]);
            let f: Vec<&str> = rest.split_whitespace().collect();
            // After the comm: state is field 3, flags field 9.
            matches!(f.first(), Some(&("Z" | "X")))
                || f.get(6).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) & 0x4 != 0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_killed_by_exit_flags_its_linked_word() {
        // A thread links a word and exits without unlinking (as a SIGKILL
        // would leave it): the kernel's walk flags the word OWNER_DIED and
        // wakes the sleeper. The control: the word of a thread that unlinks
        // is 0 and not flagged.
        let map = Arc::new(Mapping::shared_anonymous(4096).unwrap());
        let word: &AtomicU32 = map.get::<AtomicU32>(128 + 16);
        let m2 = Arc::clone(&map);
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let area = m2.slice::<AtomicU64>(128 + 24, 6);
            let w = m2.get::<AtomicU32>(128 + 16);
            let l = Linked::link(&m2, w, area, gettid());
            let linked = l.is_some();
            std::mem::forget(l);
            tx.send(linked).unwrap();
        });
        let linked = rx.recv().unwrap();
        t.join().unwrap();
        if !linked {
            // glibc registers a list for every thread: there it must link.
            #[cfg(target_env = "gnu")]
            panic!("glibc thread without a robust list");
            #[cfg(not(target_env = "gnu"))]
            return; // another libc: nothing to check
        }
        // The thread has exited; the kernel walked its list at exit.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while word.load(Ordering::SeqCst) & FUTEX_OWNER_DIED == 0 {
            assert!(std::time::Instant::now() < deadline, "never flagged");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(word.load(Ordering::SeqCst) & FUTEX_TID_MASK, 0);
    }
}
