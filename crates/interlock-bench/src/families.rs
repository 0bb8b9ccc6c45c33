//! interlock's own families as harness targets.
//!
//! Why it is built this way: the families land on `main` one by one; each
//! becomes a target with a few lines here (a name, its primitive, whether
//! it has a shared mode, how to open it), driven through the crate's
//! [`interlock::Lock`] trait so the harness measures exactly what users call.

use anyhow::Result;
use interlock::{ErrorKind, Lock, Mode, TryLockError, Wait};

use crate::targets::{Handle, Target};

/// The families present in this build.
pub fn targets() -> Vec<Target> {
    Vec::new()
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
