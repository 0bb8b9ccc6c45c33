//! System calls made inline, for the calls on the file locks' fast paths.
//!
//! Why it is built this way: on this project's machines (AMD EPYC VMs) a
//! `ret` into a frame that was entered before a system call costs about
//! 45 ns for the first such return and 5-10 ns for each further one, as if
//! the return predictor were emptied by the call; calls and returns made
//! after the system call cost nothing extra. (The kernel reports
//! `spec_rstack_overflow: Vulnerable: Safe RET, no microcode`, a mitigation
//! that works on the return predictor; that it is the cause is our reading,
//! not a measurement.) libc's wrappers are functions, so every call through
//! them pays that first return inside the wrapper. Measured 2026-12-05
//! (2 CPUs, load 0, a scratch loop): `getppid` 164 ns through libc, 118 ns
//! with the `syscall` instruction inlined, 163 ns inlined into a function
//! the loop calls; a `flock(LOCK_EX)` + `flock(LOCK_UN)` pair 743 ns through
//! libc, 528 ns inline (rustix, which fd-lock uses, inlines the same way).
//! So the lock's fast paths make the call inline and keep the frames
//! between the caller and the call few (see `file/lock.rs`).
//!
//! Only x86_64 Linux, where it is measured and tested, gets the inline form;
//! elsewhere the same function calls libc's `syscall`.

use std::io;

/// The result of a raw system call: a negative value in `-4095..=-1` is
/// `-errno`, anything else the call's return value.
#[inline(always)]
fn check(ret: isize) -> io::Result<usize> {
    if (-4095..0).contains(&ret) {
        Err(io::Error::from_raw_os_error(-ret as i32))
    } else {
        Ok(ret as usize)
    }
}

/// System call `nr` with three arguments, made inline.
///
/// # Safety
///
/// The caller must uphold the contract of system call `nr` for these
/// arguments (live descriptors, pointers valid for what the kernel reads and
/// writes), exactly as for `libc::syscall(nr, a1, a2, a3)`.
#[inline(always)]
pub unsafe fn syscall3(nr: libc::c_long, a1: usize, a2: usize, a3: usize) -> io::Result<usize> {
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    {
        let ret: isize;
        // SAFETY: the caller upholds the call's contract. `syscall` clobbers
        // rcx and r11 (declared) and no other register; the kernel may read
        // and write memory through the arguments, which the default (no
        // `nomem`/`readonly`) allows for. It does not touch the user stack.
        unsafe {
            std::arch::asm!(
                "syscall",
                inlateout("rax") nr as isize => ret,
                in("rdi") a1,
                in("rsi") a2,
                in("rdx") a3,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack, preserves_flags),
            );
        }
        check(ret)
    }
    #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
    {
        // SAFETY: the caller upholds the call's contract.
        let rc = unsafe { libc::syscall(nr, a1, a2, a3) };
        if rc == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc as usize)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_returns_its_value_and_an_error_its_errno() {
        // SAFETY: getppid takes no arguments (the extra ones are ignored).
        let ppid = unsafe { syscall3(libc::SYS_getppid, 0, 0, 0) }.unwrap();
        assert_eq!(ppid as u32, std::os::unix::process::parent_id());
        // SAFETY: fcntl on a descriptor that is not open only reads the
        // number and fails with EBADF.
        let e = unsafe { syscall3(libc::SYS_fcntl, -1i32 as usize, libc::F_GETFD as usize, 0) }
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
    }
}
