//! membarrier(2): an asymmetric fence, so that a reader's release needs no
//! locked instruction and a draining writer can still sleep until woken.
//!
//! Why it is built this way: an own-slot reader releases with a plain store
//! of its counter and then loads the state word; a writer about to sleep on
//! that counter sets `DRAIN_SLEEP` and then lets the kernel re-check the
//! counter. That is Dekker's pattern, and a plain store followed by a load
//! may be reordered by the CPU's store buffer, so both sides could miss
//! each other (a writer asleep behind a reader that left). A full fence in
//! every release would cost a second locked instruction per read pair.
//! Instead the fence is split unevenly: the reader keeps only a compiler
//! barrier ([`light`]), and the writer, on its slow path, calls
//! `membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED)` ([`heavy`]), which makes
//! every running thread of every *registered* process execute a full memory
//! barrier before the call returns (threads not running have passed through
//! the scheduler's full barrier). Registration
//! (`MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED`, [`register`]) is per
//! process (per address space), covers threads created later, and is lost at
//! exec; it is redone in a forked child (fork generation). A process whose
//! registration fails (`ENOSYS`: no `CONFIG_MEMBARRIER` or Linux < 4.16;
//! `EPERM`/`EINVAL`: a seccomp profile, an old kernel) is not registered,
//! and says so in its slot owner identity (see `shm::layout::MEMBARRIER`):
//! writers then keep polling behind its readers. See docs/design-shm.md,
//! "Waiting without waking", item 8.
//!
//! References: membarrier(2); the kernel's kernel/sched/membarrier.c
//! (ordering scenarios A-E in its opening comment).

#[cfg(not(loom))]
use std::sync::atomic::{AtomicU64, Ordering};

/// `MEMBARRIER_CMD_GLOBAL_EXPEDITED` (linux/membarrier.h).
const CMD_GLOBAL_EXPEDITED: libc::c_int = 1 << 1;
/// `MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED` (linux/membarrier.h).
const CMD_REGISTER_GLOBAL_EXPEDITED: libc::c_int = 1 << 2;

/// This process's registration: `generation << 2 | KNOWN | OK`, 0 = not
/// tried yet. A forked child (another generation) registers again: whether
/// the kernel keeps the registration across fork is not part of the
/// documented interface.
#[cfg(not(loom))]
static STATE: AtomicU64 = AtomicU64::new(0);
const KNOWN: u64 = 2;
const OK: u64 = 1;

/// membarrier(2) with `cmd`, no flags, on no particular CPU.
#[cfg(not(loom))]
fn membarrier(cmd: libc::c_int) -> std::io::Result<()> {
    // SAFETY: membarrier takes three integers and touches no memory of
    // ours; any failure is reported through errno.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0u32, 0i32) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Registers this process for `MEMBARRIER_CMD_GLOBAL_EXPEDITED` barriers
/// (once per process and fork generation; later calls return the first
/// answer). Returns whether it is registered: false if the kernel or a
/// seccomp profile refuses (`ENOSYS`, `EPERM`, `EINVAL`), or after
/// [`refuse`].
#[cfg(not(loom))]
pub fn register() -> bool {
    super::fork::watch();
    let gen = super::fork::generation();
    let s = STATE.load(Ordering::Relaxed);
    if s & KNOWN != 0 && s >> 2 == gen {
        return s & OK != 0;
    }
    let ok = membarrier(CMD_REGISTER_GLOBAL_EXPEDITED).is_ok();
    // Racing first callers make the same call and get the same answer;
    // a refusal recorded by `refuse` in this generation wins.
    let new = gen << 2 | KNOWN | u64::from(ok);
    match STATE.compare_exchange(s, new, Ordering::Relaxed, Ordering::Relaxed) {
        Ok(_) => ok,
        Err(now) if now & KNOWN != 0 && now >> 2 == gen => now & OK != 0,
        Err(_) => ok,
    }
}

/// Under loom every model process is registered (the model tests choose
/// per process through their identities instead).
#[cfg(loom)]
pub fn register() -> bool {
    true
}

/// Records this process (this fork generation) as not registered, as if
/// the kernel had refused: for tests of the fallback. Call before the
/// first lock is opened; a registration already made stays in the kernel,
/// but this process no longer claims it.
#[cfg(not(loom))]
pub fn refuse() {
    super::fork::watch();
    STATE.store(super::fork::generation() << 2 | KNOWN, Ordering::Relaxed);
}

/// The writer's half: a full memory barrier on every running thread of
/// every registered process, before this returns. Returns false if the
/// call failed (then nothing is promised and the caller must poll).
#[cfg(not(loom))]
pub fn heavy() -> bool {
    membarrier(CMD_GLOBAL_EXPEDITED).is_ok()
}

/// Under loom, a SeqCst fence (with [`light`]'s fence on the other side,
/// the model checks the pairing that membarrier provides).
#[cfg(loom)]
pub fn heavy() -> bool {
    loom::sync::atomic::fence(loom::sync::atomic::Ordering::SeqCst);
    true
}

/// The reader's half: a compiler barrier (no instruction), which keeps the
/// compiler from moving the release store after the following load; the
/// CPU's reordering is what [`heavy`] takes care of.
#[inline(always)]
pub fn light() {
    #[cfg(not(loom))]
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    // Under loom: the fence that `heavy`'s barrier stands in for on this
    // side (loom has no asymmetric fences).
    #[cfg(loom)]
    loom::sync::atomic::fence(loom::sync::atomic::Ordering::SeqCst);
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn registration_is_answered_once_and_the_barrier_runs() {
        let first = register();
        assert_eq!(register(), first);
        if first {
            assert!(heavy(), "registered, but the barrier failed");
        }
        // Unregistered processes may still call the barrier; only a kernel
        // without membarrier refuses it.
        let _ = heavy();
    }
}
