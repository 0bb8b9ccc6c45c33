//! The CLI's only `unsafe`: signal dispositions while the command runs, and
//! how the command is tied to the lock.
//!
//! Why it is built this way: `interlock run` must hold the lock exactly as
//! long as the command runs. If a `kill` or a closing terminal ended
//! interlock first, the lock would be released while the command still
//! works on the protected resource. So while the command runs, SIGTERM and
//! SIGHUP sent to interlock are passed on to the command (interlock then
//! exits with the command's status, still holding the lock until then), and
//! SIGINT and SIGQUIT are ignored by interlock: from a terminal they reach
//! the command directly, being in the same process group.
#![allow(unsafe_code)]

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn pass_on(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe; `pid` is our own child,
        // which we have not reaped yet (we reap it only after this state is
        // reset in `restore`).
        unsafe { libc::kill(pid, sig) };
    }
}

fn set(sig: libc::c_int, handler: libc::sighandler_t) {
    // SAFETY: an all-zero sigaction is valid (empty mask, no flags).
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = handler;
    act.sa_flags = libc::SA_RESTART;
    // SAFETY: `act` is initialised; the handler only calls kill(2), which
    // is async-signal-safe, and reads an atomic.
    unsafe {
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(sig, &act, std::ptr::null_mut());
    }
}

/// From now on, pass SIGTERM and SIGHUP to `pid` and ignore SIGINT and
/// SIGQUIT. Call after spawning the child (so it starts with default
/// dispositions).
pub fn forward_signals_to(pid: u32) {
    CHILD.store(pid as i32, Ordering::Relaxed);
    let handler = pass_on as *const () as libc::sighandler_t;
    set(libc::SIGTERM, handler);
    set(libc::SIGHUP, handler);
    set(libc::SIGINT, libc::SIG_IGN);
    set(libc::SIGQUIT, libc::SIG_IGN);
}

/// Stops passing signals on (before the child is reaped, so its pid cannot
/// be reused while a handler might still send to it).
pub fn stop_forwarding() {
    CHILD.store(0, Ordering::Relaxed);
}

/// Blocks until child `pid` has exited, without reaping it (WNOWAIT), so
/// that its pid stays reserved while signals may still be passed to it.
pub fn wait_exit_unreaped(pid: u32) -> std::io::Result<()> {
    loop {
        // SAFETY: an all-zero siginfo_t is a valid out-buffer for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is valid for writes; `pid` is our unreaped child.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Sends SIGTERM to `pid` if it is set (non-zero): our child, not yet
/// reaped (the caller clears `pid` before reaping).
pub fn terminate(pid: u32) {
    if pid > 0 {
        // SAFETY: kill(2) has no memory effects; `pid` is our unreaped child.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
}

/// Clears close-on-exec on `f`, so that a command spawned next inherits it.
pub fn inheritable(f: &std::fs::File) -> std::io::Result<()> {
    // SAFETY: fcntl(F_SETFD) on a descriptor `f` owns has no memory effects.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFD, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the command `cmd` spawns receive SIGKILL when interlock dies
/// (PR_SET_PDEATHSIG), checking afterwards that interlock has not died
/// already (then the command is not started).
///
/// Limits (see docs/threat-model.md): the signal is cleared when the command
/// executes a set-user-ID program, and it reaches only the command itself,
/// not processes the command started.
pub fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the child between fork and exec, and
    // calls only prctl(2) and getppid(2), which are async-signal-safe and
    // touch no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        })
    };
}

/// EX_OSERR from sysexits.h.
const EX_OSERR: i32 = 71;

extern "C" fn bus_error(_sig: libc::c_int) {
    const MSG: &[u8] = b"interlock: a memory-mapped lock file was truncated while in use \
(SIGBUS): the lock's state is gone; exiting with 71\n";
    // SAFETY: write(2) and _exit(2) are async-signal-safe; MSG is a static
    // buffer of the given length.
    unsafe {
        libc::write(2, MSG.as_ptr().cast(), MSG.len());
        libc::_exit(EX_OSERR);
    }
}

/// Turns SIGBUS (touching a shared-memory lock's mapping after its file was
/// truncated, see docs/threat-model.md) into a one-line message and exit
/// status 71 instead of a crash with 135. The library cannot prevent the
/// signal: a truncation unmaps the pages from every process at once.
pub fn bus_error_exits() {
    // SAFETY: an all-zero sigaction is valid (empty mask, no flags).
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = bus_error as *const () as libc::sighandler_t;
    // SAFETY: `act` is initialised; the handler only calls write(2) and
    // _exit(2), both async-signal-safe.
    unsafe {
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut());
    }
}
