//! interlock's own families as harness targets.
//!
//! Why it is built this way: the families land on `main` one by one; each
//! becomes a target with a few lines here (a name, its primitive, whether
//! it has a shared mode, how to open it), driven through the crate's
//! [`interlock::Lock`] trait so the harness measures exactly what users call.

use std::time::Duration;

use anyhow::Result;
use interlock::{ErrorKind, FileLock, Flavor, LeaseLock, Lock, LockSet, Mode, TryLockError, Wait};

use crate::targets::{setup_file, setup_none, Ctx, Floor, Group, Handle, Impl, Target};

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
        imp: Impl::Rust { setup, open },
    }
}

fn file_lock(c: &Ctx, flavor: Flavor) -> Result<FileLock> {
    let mut o = FileLock::options();
    o.flavor(flavor);
    Ok(o.open(c.lock_path())?)
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
            "lease",
            "interlock LeaseLock (TTL 30 s)",
            Floor::Mkdir,
            false,
            setup_none,
            |c| Ok(Box::new(Il(LeaseLock::new(c.lease_path(), LEASE_TTL)?))),
        ),
    ]
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
