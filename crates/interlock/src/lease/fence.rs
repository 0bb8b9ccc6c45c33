//! Fencing tokens: a number per acquisition, strictly greater than every
//! number issued before it for the same lock, across takeovers and crashes.
//!
//! Why it is built this way: the obvious design, a counter file that the
//! holder rewrites (write temp, fsync, rename), is unsafe exactly when
//! fencing matters. A holder that stalls between reading `N` and renaming
//! `N+1` into place can wake after its lease was taken over and the counter
//! moved on to `N+5`, and its late rename rolls the counter back to `N+1`,
//! so the next holder re-issues a number. Here nothing is ever overwritten:
//! each number is *claimed* by creating an empty file named by it in
//! `tokens/` with `O_CREAT|O_EXCL` (an atomic create-or-fail on local file
//! systems and on NFS since version 3; an empty file rather than a
//! directory because on ext4 a directory costs a block, measured at ten
//! times the price), so two processes can never claim the same number while
//! it exists; and a claim only becomes an issued token when its claimant
//! then proves, by a compare-and-swap rename inside its own lock directory,
//! that its lease was still current (see `lease/mod.rs` for the argument).
//! Old claims are removed only below a newer existing claim, so the largest
//! claim never goes down, and with `durable` the directory is fsynced after
//! each claim so a machine crash cannot forget an issued number.

use std::io;

use crate::sys::dir::Dir;

/// The claims directory of one lock.
#[derive(Debug)]
pub(crate) struct Fence {
    dir: Dir,
    durable: bool,
}

impl Fence {
    pub fn new(dir: Dir, durable: bool) -> Fence {
        Fence { dir, durable }
    }

    /// Claims the number one above every existing claim. Returns it and the
    /// older claims seen, for [`Fence::trim`] once it is issued.
    pub fn claim(&self) -> io::Result<(u64, Vec<u64>)> {
        loop {
            let seen: Vec<u64> = self
                .dir
                .names()?
                .iter()
                .filter_map(|n| n.to_str()?.parse::<u64>().ok())
                .collect();
            let next = seen
                .iter()
                .copied()
                .max()
                .unwrap_or(0)
                .checked_add(1)
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, "fencing tokens exhausted")
                })?;
            match self.dir.create_file(next.to_string(), b"", 0o644, false) {
                Ok(()) => {
                    if self.durable {
                        self.dir.sync()?;
                    }
                    return Ok((next, seen));
                }
                // Someone claimed it first: look again.
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Removes the claims in `older`, all below the issued token `issued`
    /// (which itself stays, so the largest claim never decreases). Errors
    /// are ignored: leftover claims cost only listing time.
    pub fn trim(&self, issued: u64, older: &[u64]) {
        for &n in older.iter().filter(|&&n| n < issued) {
            let _ = self.dir.unlink(n.to_string());
        }
    }

    /// The largest claim, if any (for inspection).
    pub fn latest(&self) -> io::Result<Option<u64>> {
        Ok(self
            .dir
            .names()?
            .iter()
            .filter_map(|n| n.to_str()?.parse::<u64>().ok())
            .max())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_increase_and_trim_keeps_the_latest() {
        let t = tempfile::tempdir().unwrap();
        let f = Fence::new(Dir::open(t.path()).unwrap(), true);
        let (a, seen) = f.claim().unwrap();
        assert_eq!((a, seen.len()), (1, 0));
        // A stale claimant's leftover claim above: the next claim skips it.
        std::fs::write(t.path().join("5"), b"").unwrap();
        let (b, seen) = f.claim().unwrap();
        assert_eq!(b, 6);
        f.trim(b, &seen);
        assert_eq!(f.latest().unwrap(), Some(6));
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 1);
        // Junk names are ignored.
        std::fs::write(t.path().join("x"), b"").unwrap();
        assert_eq!(f.claim().unwrap().0, 7);
    }
}
