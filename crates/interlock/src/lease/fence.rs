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

    /// Claims the number one above every existing claim and above `floor`
    /// (the last token the caller was issued, so that its tokens never go
    /// backwards even if the claims were removed). Returns it and the older
    /// claims seen, for [`Fence::trim`] once it is issued.
    pub fn claim(&self, floor: u64) -> io::Result<(u64, Vec<u64>)> {
        loop {
            let mut seen = self.scan()?;
            seen.push(floor);
            let next = next_after(&seen)?;
            seen.pop();
            if self.try_claim(next)? {
                return Ok((next, seen));
            }
            // Someone claimed it first: look again.
        }
    }

    /// The claims present now.
    fn scan(&self) -> io::Result<Vec<u64>> {
        Ok(self
            .dir
            .names()?
            .iter()
            .filter_map(|n| n.to_str()?.parse::<u64>().ok())
            .collect())
    }

    /// Creates claim `n`; `Ok(false)` if it exists. With `durable`, the
    /// directory is fsynced before returning.
    fn try_claim(&self, n: u64) -> io::Result<bool> {
        match self.dir.create_file(n.to_string(), b"", 0o644, false) {
            Ok(()) => {
                if self.durable {
                    self.dir.sync()?;
                }
                Ok(true)
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(e),
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

/// One above the largest of `seen` (1 if none).
fn next_after(seen: &[u64]) -> io::Result<u64> {
    seen.iter()
        .copied()
        .max()
        .unwrap_or(0)
        .checked_add(1)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "fencing tokens exhausted"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_increase_and_trim_keeps_the_latest() {
        let t = tempfile::tempdir().unwrap();
        let f = Fence::new(Dir::open(t.path()).unwrap(), true);
        let (a, seen) = f.claim(0).unwrap();
        assert_eq!((a, seen.len()), (1, 0));
        // A stale claimant's leftover claim above: the next claim skips it.
        std::fs::write(t.path().join("5"), b"").unwrap();
        let (b, seen) = f.claim(0).unwrap();
        assert_eq!(b, 6);
        f.trim(b, &seen);
        assert_eq!(f.latest().unwrap(), Some(6));
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 1);
        // Junk names are ignored.
        std::fs::write(t.path().join("x"), b"").unwrap();
        assert_eq!(f.claim(0).unwrap().0, 7);
        // Claims removed behind our back: a caller's floor still holds.
        for n in ["5", "6", "7", "x"] {
            let _ = std::fs::remove_file(t.path().join(n));
        }
        assert_eq!(f.claim(7).unwrap().0, 8);
    }

    /// The fencing argument, checked against real directories under every
    /// interleaving proptest finds: processes run the acquisition protocol
    /// step by step (install the staged lock directory, list the claims,
    /// claim one, publish it by renaming the lease file, trim, release),
    /// while an adversary breaks whatever lease is in place at arbitrary
    /// moments (as expiry plus a paused holder can). Whatever happens, the
    /// tokens issued (publishing renames that succeeded), in the order they
    /// were issued, strictly increase.
    mod interleavings {
        use super::*;
        use crate::lease::record::LeaseName;
        use crate::sys::dir::rename_noreplace;
        use proptest::prelude::*;

        enum P {
            Idle,
            Staged(String),
            Installed(Dir),
            Listed(Dir, Vec<u64>),
            Claimed(Dir, u64, Vec<u64>),
            Holding(Dir, u64, Vec<u64>),
        }

        const LIVE0: &str = "lease.0.0.0";

        fn live(t: u64) -> String {
            LeaseName {
                dead: false,
                version: 1,
                token: t,
                expiry_ns: 0,
            }
            .render()
        }

        /// Breaks (or, for its holder, releases) the lock directory in place.
        fn kill_in_place(root: &Dir) {
            let Ok(inst) = root.open_at("lk") else { return };
            for n in inst.names().unwrap() {
                let n = n.to_str().unwrap().to_string();
                if let Some(l) = LeaseName::parse(&n) {
                    let tomb = l.tombstone().render();
                    if l.dead || inst.rename(&n, &tomb).is_ok() {
                        let _ = inst.unlink(&tomb);
                    }
                }
            }
            let _ = root.rmdir("lk");
        }

        fn run(schedule: &[u8], procs: usize) -> Vec<u64> {
            let t = tempfile::tempdir().unwrap();
            let root = Dir::open(t.path()).unwrap();
            root.mkdir("tokens", 0o755).unwrap();
            root.mkdir("stage", 0o755).unwrap();
            let fence = Fence::new(root.open_at("tokens").unwrap(), false);
            let stage = root.open_at("stage").unwrap();
            let mut ps: Vec<P> = (0..procs).map(|_| P::Idle).collect();
            let mut issued = Vec::new();
            let mut serial = 0;
            for &a in schedule {
                let a = a as usize % (procs + 1);
                if a == procs {
                    kill_in_place(&root);
                    continue;
                }
                let p = std::mem::replace(&mut ps[a], P::Idle);
                ps[a] = match p {
                    P::Idle => {
                        serial += 1;
                        let name = format!("s{a}.{serial}");
                        stage.mkdir(&name, 0o755).unwrap();
                        stage
                            .open_at(&name)
                            .unwrap()
                            .create_file(LIVE0, b"", 0o644, false)
                            .unwrap();
                        P::Staged(name)
                    }
                    P::Staged(name) => {
                        let d = stage.open_at(&name).unwrap();
                        match rename_noreplace(&stage, &name, &root, "lk") {
                            Ok(_) => P::Installed(d),
                            Err(_) => P::Staged(name),
                        }
                    }
                    P::Installed(d) => {
                        let seen = fence.scan().unwrap();
                        P::Listed(d, seen)
                    }
                    P::Listed(d, seen) => {
                        let n = next_after(&seen).unwrap();
                        if fence.try_claim(n).unwrap() {
                            P::Claimed(d, n, seen)
                        } else {
                            P::Installed(d)
                        }
                    }
                    P::Claimed(d, n, seen) => match d.rename(LIVE0, live(n)) {
                        Ok(()) => {
                            issued.push(n);
                            P::Holding(d, n, seen)
                        }
                        Err(_) => P::Idle, // broken before publishing
                    },
                    P::Holding(d, n, seen) => {
                        fence.trim(n, &seen);
                        let tomb = LeaseName::parse(&live(n)).unwrap().tombstone().render();
                        if d.rename(live(n), &tomb).is_ok() {
                            let _ = d.unlink(&tomb);
                            let _ = root.rmdir("lk");
                        }
                        P::Idle
                    }
                };
            }
            issued
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
            #[test]
            fn issued_tokens_strictly_increase(
                schedule in proptest::collection::vec(any::<u8>(), 0..300),
                procs in 2usize..5,
            ) {
                let issued = run(&schedule, procs);
                prop_assert!(
                    issued.windows(2).all(|w| w[0] < w[1]),
                    "issued out of order: {:?}", issued
                );
            }
        }

        /// The case the argument has to handle: A lists the claims (none),
        /// is broken; B issues 1; C issues 2 and trims claim 1; A now
        /// claims 1 again (its file is gone) but cannot publish it.
        #[test]
        fn a_stale_claim_of_a_trimmed_number_is_never_issued() {
            let schedule = [0, 0, 0, 3, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0, 0];
            assert_eq!(run(&schedule, 3), vec![1, 2]);
        }
    }
}
