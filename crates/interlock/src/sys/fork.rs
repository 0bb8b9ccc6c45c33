//! A counter that tells a forked child from its parent, without a syscall.
//!
//! Why it is built this way: a child created by fork() inherits its parent's
//! memory, including per-thread caches of "which slot of the shared lock is
//! mine". Those slots belong to the parent; a child that kept using one would
//! be counted as the parent, and the parent's death would wipe the child's
//! hold. Comparing `getpid()` on every acquisition would cost a syscall
//! (glibc no longer caches the pid), so a `pthread_atfork` child handler
//! bumps a process-local generation instead, and caches compare generations.
//! Only fork() through libc runs the handler; a raw `clone` syscall does not.
//!
//! References: pthread_atfork(3).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

static GENERATION: AtomicU64 = AtomicU64::new(1);
static REGISTER: Once = Once::new();

extern "C" fn in_child() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// Registers the fork handler (once per process). Call before any state
/// that depends on [`generation`] is created.
pub fn watch() {
    REGISTER.call_once(|| {
        // SAFETY: `in_child` is an `extern "C" fn()` that only touches a
        // static atomic, which is async-signal-safe and valid in the child.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
        // pthread_atfork only fails with ENOMEM; without the handler a child
        // would reuse its parent's slots, so refuse to continue.
        assert_eq!(rc, 0, "pthread_atfork failed");
    });
}

/// This process's fork generation: differs in a child from its parent.
#[inline]
pub fn generation() -> u64 {
    GENERATION.load(Ordering::Relaxed)
}

/// This process's id, without a syscall after the first call in a process
/// (`getpid` each time cost a lease acquire+release six syscalls): cached
/// with the fork generation it was read in, and read again in a child.
pub fn pid() -> u32 {
    // Generation (low 32 bits) << 32 | pid; 0 = not read yet.
    static CACHED: AtomicU64 = AtomicU64::new(0);
    watch();
    let gen = generation() & 0xffff_ffff;
    let v = CACHED.load(Ordering::Relaxed);
    if v != 0 && v >> 32 == gen {
        return v as u32;
    }
    let pid = std::process::id();
    CACHED.store(gen << 32 | u64::from(pid), Ordering::Relaxed);
    pid
}

/// Test helper: fork(2) without exec; the child runs `f` and leaves with
/// `_exit(f())`, the parent gets the child's pid.
///
/// The child of a multi-threaded process has one thread; `f` must not wait
/// for locks that another thread of the parent might have held at the fork
/// (glibc's allocator is safe; std's stdout lock may not be).
#[cfg(test)]
pub fn fork_run(f: impl FnOnce() -> i32) -> std::io::Result<u32> {
    // SAFETY: fork has no memory-safety preconditions of its own; the child
    // runs only `f` and then _exit, never returning into the test harness.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
        // SAFETY: _exit is async-signal-safe and ends the child without
        // running the parent's atexit handlers or destructors twice.
        unsafe { libc::_exit(code) };
    }
    Ok(pid as u32)
}

/// Test helper: waits for child `pid`; returns its exit code (or 128 +
/// signal number).
#[cfg(test)]
pub fn wait_child(pid: u32) -> std::io::Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid out-pointer; waitpid only writes it.
        let rc = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
        if rc == pid as libc::pid_t {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
    if libc::WIFEXITED(status) {
        Ok(libc::WEXITSTATUS(status))
    } else {
        Ok(128 + libc::WTERMSIG(status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cached_pid_is_the_childs_after_fork() {
        assert_eq!(pid(), std::process::id());
        assert_eq!(pid(), std::process::id(), "cached");
        let child = fork_run(|| i32::from(pid() != std::process::id())).unwrap();
        assert_eq!(wait_child(child).unwrap(), 0, "a child reads its own pid");
        assert_eq!(pid(), std::process::id(), "the parent's is kept");
    }
}
