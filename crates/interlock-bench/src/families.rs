//! interlock's own families as harness targets.
//!
//! Why it is built this way: the families land on `main` one by one; each
//! becomes a target with a few lines here (a name, its primitive, whether
//! it has a shared mode, how to open it), driven through the crate's
//! [`interlock::Lock`] trait so the harness measures exactly what users call.

use anyhow::Result;
use interlock::{ErrorKind, Lock, LockSet, Mode, TryLockError, Wait};

use crate::targets::{setup_file, Ctx, Floor, Group, Handle, Impl, Target};

/// The families present in this build.
pub fn targets() -> Vec<Target> {
    vec![Target {
        name: "lockset",
        label: "interlock LockSet (index 0; OFD)",
        group: Group::Interlock,
        floor: Floor::Ofd,
        shared: true,
        recovers: true,
        imp: Impl::Rust {
            setup: setup_file,
            open: |c: &Ctx| Ok(Box::new(SetIndex(LockSet::open(c.lock_path())?))),
        },
    }]
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
#[allow(dead_code)] // until the first family lands on main
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
