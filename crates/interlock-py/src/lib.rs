//! `interlock._native`: the Python binding of interlock.
//!
//! Why it is built this way: the lock logic is the Rust crate's; this crate
//! only converts (arguments to [`Wait`]s, errors to Python exceptions, guards
//! to Python objects) and lets go of the interpreter while a call may wait.
//! What Python needs beyond the Rust API, and what lives here for that
//! reason:
//!
//! - **Owned guards.** A Python guard object lives as long as the program
//!   keeps it and may be released by any thread (`asyncio.to_thread`,
//!   executors), so it holds the crate's owned (`*_arc`) guards, never a
//!   borrow.
//! - **Waits that let go of the GIL and hear Ctrl-C.** Every call that may
//!   wait first tries without waiting (with the GIL: the uncontended path
//!   costs no GIL round trip), then waits inside `py.detach`. In the main
//!   thread a signal ends the kernel wait (Python's handlers have no
//!   `SA_RESTART`, so the call returns EINTR, and the core, asked to, gives
//!   back what it took); `Python::check_signals()` then raises the
//!   KeyboardInterrupt with nothing held, or the wait goes on with its
//!   deadline. A slice of [`wait::SAFETY_SLICE`] is the net for a signal
//!   that lands just before the blocking call.
//! - **Reentrancy defined.** A thread that asks again for a lock it holds
//!   (through the same object or another one on the same file or name)
//!   would wait for itself. Holds are recorded per thread ([`hold`]): the
//!   second request fails at once with `AlreadyHeld`, or, on an object made
//!   with `reentrant=True`, counts.
//! - **asyncio without threads of its own.** A contended async acquisition
//!   is the crate's cancel-safe future driven from the event loop
//!   ([`aio`]): its waker writes to a socket the loop watches, and a
//!   cancelled task drops the future, which ends the wait at once.
//! - **fork.** A child must never release its parent's lock: guards and
//!   lock objects remember the fork generation they were made in; in a
//!   child an inherited guard is forgotten (releasing it releases nothing)
//!   and a lock object reopens its lock on first use, leaking (never
//!   closing or unlocking) the inherited one.

mod aio;
mod errors;
mod file;
mod hold;
mod lease;
mod pg;
mod sem;
mod set;
mod setrecord;
mod shm;
mod wait;

use pyo3::prelude::*;

/// The module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    interlock::__fork::watch();
    m.add_class::<hold::Guard>()?;
    m.add_class::<hold::Ready>()?;
    m.add_class::<aio::AsyncWait>()?;
    m.add_class::<file::PyFileLock>()?;
    m.add_class::<set::PyLockSet>()?;
    m.add_class::<shm::PyShmRwLock>()?;
    m.add_class::<shm::PyShmMutex>()?;
    m.add_class::<lease::PyLeaseLock>()?;
    m.add_class::<pg::PyPgLock>()?;
    m.add_class::<pg::PyPgMutex>()?;
    m.add_class::<sem::PySemaphore>()?;
    m.add_class::<sem::PyFileSemaphore>()?;
    m.add_function(wrap_pyfunction!(file::holders, m)?)?;
    m.add_function(wrap_pyfunction!(wait::_hold_as, m)?)?;
    m.add_function(wrap_pyfunction!(aio::_async_wait, m)?)?;
    m.add_function(wrap_pyfunction!(aio::_busy_waiters, m)?)?;
    m.add("INDEX_END", interlock::INDEX_END)?;
    m.add("SLICE_SECONDS", wait::SLICE.as_secs_f64())?;
    Ok(())
}
