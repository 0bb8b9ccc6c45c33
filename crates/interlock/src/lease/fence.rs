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

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;

use crate::sys::dir::Dir;

/// The claims directory of one lock.
#[derive(Debug)]
pub(crate) struct Fence {
    dir: Dir,
    durable: bool,
    /// Whether the quick claim may be used: the directory is on a local
    /// file system, where an open file's link count drops to 0 when its
    /// name is removed (NFS renames it to `.nfsXXXX` instead).
    quick: bool,
    /// The last token this handle was issued, with its claim file kept
    /// open: the quick claim's evidence (see [`Fence::claim`]).
    last: parking_lot::Mutex<Option<(u64, File)>>,
}

/// A claimed number, not yet issued.
#[derive(Debug)]
pub(crate) struct Claim {
    pub token: u64,
    /// The older claims seen, removed by [`Fence::issued`].
    older: Vec<u64>,
    /// The claim file, kept open.
    file: File,
}

impl Fence {
    pub fn new(dir: Dir, durable: bool) -> Fence {
        let fs = dir.fs_type().ok();
        let quick = fs.is_some_and(crate::sys::notify::fs_is_local);
        // tmpfs and ramfs: a machine crash empties them, claims and all, so
        // an fsync there makes nothing more durable.
        let in_memory = matches!(fs, Some(0x0102_1994) | Some(0x8584_58F6));
        Fence {
            dir,
            durable: durable && !in_memory,
            quick,
            last: parking_lot::Mutex::new(None),
        }
    }

    /// Claims the number one above every existing claim and above `floor`
    /// (the last token the caller was issued, so that its tokens never go
    /// backwards even if the claims were removed).
    ///
    /// The quick claim, when this handle was issued `floor` itself and
    /// still has its claim file open: create `floor + 1`, then check that
    /// the file of `floor` is still linked. No listing is needed, because
    /// then no number above `floor` can have been issued. Why: the smallest
    /// claim above `floor` ever made is `floor + 1` (a lister claims one
    /// above the largest it saw, and saw `floor`, which existed throughout;
    /// a caller's own floor is at most the largest claim). If a token above
    /// `floor` had been issued, some claim above `floor` would exist now
    /// (the largest claim never decreases), so `floor + 1` would have been
    /// made, and since our exclusive create of it succeeded, someone
    /// removed it; but claims are removed only by [`Fence::issued`], in
    /// ascending order and stopping at the first failure, by a claimant
    /// whose listing saw it, and so saw `floor` too (which existed
    /// throughout), and removed `floor` first. Its file would then be
    /// unlinked: a contradiction. Nor can a quick claimant have removed
    /// `floor + 1` after a quick claim of `floor + 2`: it was issued
    /// `floor + 1` by a listing claim that saw `floor`, and it quick-claims
    /// only if its trim then removed everything it saw below (`floor`
    /// included). A removal by hand (claims reset by their owner) also
    /// unlinks `floor`'s file, and the full claim below runs instead.
    pub fn claim(&self, floor: u64) -> io::Result<Claim> {
        if let Some((next, file)) = self.quick_start(floor)? {
            if let Some(c) = self.quick_confirm(next, file)? {
                return Ok(c);
            }
        }
        loop {
            let mut seen = self.scan()?;
            seen.push(floor);
            let next = next_after(&seen)?;
            seen.pop();
            if let Some(file) = self.try_claim(next)? {
                return Ok(Claim {
                    token: next,
                    older: seen,
                    file,
                });
            }
            // Someone claimed it first: look again.
        }
    }

    /// The quick claim's first step: creates `floor + 1` if this handle was
    /// issued `floor` and keeps its file; `None` if it does not apply or the
    /// number is taken.
    fn quick_start(&self, floor: u64) -> io::Result<Option<(u64, File)>> {
        if !self.quick || floor == 0 {
            return Ok(None);
        }
        if !matches!(&*self.last.lock(), Some((n, _)) if *n == floor) {
            return Ok(None);
        }
        let next = floor.checked_add(1).ok_or_else(exhausted)?;
        match self.dir.create_empty(next.to_string(), 0o644) {
            Ok(file) => Ok(Some((next, file))),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The quick claim's second step, after the create: the claim holds if
    /// the file of the number below is still linked; otherwise `None` says
    /// to claim the long way. The number made is then left as it is: a
    /// claim that is never issued, like that of an acquirer broken before
    /// it published, which the next listing claimant above it removes.
    fn quick_confirm(&self, next: u64, file: File) -> io::Result<Option<Claim>> {
        let mut last = self.last.lock();
        let linked = match &*last {
            Some((n, f)) if *n + 1 == next => f.metadata()?.nlink() > 0,
            _ => false,
        };
        if !linked {
            *last = None;
            return Ok(None);
        }
        drop(last);
        if self.durable {
            self.dir.sync()?;
        }
        Ok(Some(Claim {
            token: next,
            older: vec![next - 1],
            file,
        }))
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

    /// Creates claim `n`; `Ok(None)` if it exists. With `durable`, the
    /// directory is fsynced before returning.
    fn try_claim(&self, n: u64) -> io::Result<Option<File>> {
        match self.dir.create_empty(n.to_string(), 0o644) {
            Ok(f) => {
                if self.durable {
                    self.dir.sync()?;
                }
                Ok(Some(f))
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The claim was issued (its publishing rename succeeded): removes the
    /// older claims it saw, in ascending order, stopping at the first that
    /// cannot be removed (so that a claim is never gone while a smaller one
    /// this claimant saw is still there: the quick claim relies on it), and
    /// keeps the claim's file open as the next quick claim's evidence.
    /// Errors are otherwise ignored: leftover claims cost only listing time.
    pub fn issued(&self, claim: Claim) {
        let Claim {
            token,
            mut older,
            file,
        } = claim;
        older.retain(|&n| n < token);
        older.sort_unstable();
        let mut all = true;
        for n in older {
            match self.dir.unlink(n.to_string()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(_) => {
                    all = false;
                    break;
                }
            }
        }
        // A quick claim later removes this claim (and nothing below it),
        // which is sound only if everything below that this claimant saw
        // is gone: without that, no quick claim from here.
        *self.last.lock() = all.then_some((token, file));
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
        .ok_or_else(exhausted)
}

fn exhausted() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "fencing tokens exhausted")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_increase_and_trim_keeps_the_latest() {
        let t = tempfile::tempdir().unwrap();
        let f = Fence::new(Dir::open(t.path()).unwrap(), true);
        let a = f.claim(0).unwrap();
        assert_eq!((a.token, a.older.len()), (1, 0));
        drop(a); // never issued: a leftover claim
                 // A stale claimant's leftover claim above: the next claim skips it.
        std::fs::write(t.path().join("5"), b"").unwrap();
        let b = f.claim(0).unwrap();
        assert_eq!(b.token, 6);
        f.issued(b);
        assert_eq!(f.latest().unwrap(), Some(6));
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 1);
        // Junk names are ignored.
        std::fs::write(t.path().join("x"), b"").unwrap();
        let c = f.claim(0).unwrap();
        assert_eq!(c.token, 7);
        drop(c);
        // Claims removed behind our back: a caller's floor still holds.
        for n in ["5", "6", "7", "x"] {
            let _ = std::fs::remove_file(t.path().join(n));
        }
        assert_eq!(f.claim(7).unwrap().token, 8);
    }

    #[test]
    fn the_quick_claim_needs_its_evidence() {
        let t = tempfile::tempdir().unwrap();
        let f = Fence::new(Dir::open(t.path()).unwrap(), false);
        let other = Fence::new(Dir::open(t.path()).unwrap(), false);
        assert!(f.quick, "a temporary directory is on a local file system");
        let a = f.claim(0).unwrap();
        f.issued(a);
        // Issued 1 and holding its file: 2 is claimed without a listing,
        // and 1 is then removed.
        let (next, file) = f.quick_start(1).unwrap().expect("quick");
        let b = f
            .quick_confirm(next, file)
            .unwrap()
            .expect("evidence holds");
        assert_eq!(b.token, 2);
        f.issued(b);
        let names = |d: &std::path::Path| {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(t.path()), ["2"]);
        // Another handle issues 3 and 4 and removes 2 and 3: our evidence
        // (2) is gone, so our create of 3 (which succeeds) is not a claim.
        let c = other.claim(0).unwrap();
        assert_eq!(c.token, 3);
        other.issued(c);
        let d = other.claim(3).unwrap();
        assert_eq!(d.token, 4);
        other.issued(d);
        assert_eq!(names(t.path()), ["4"]);
        let (next, file) = f.quick_start(2).unwrap().expect("3 is free to create");
        assert_eq!(next, 3);
        assert!(f.quick_confirm(next, file).unwrap().is_none(), "control");
        // The long way then claims above 4 (3 is left, never issued).
        assert_eq!(f.claim(2).unwrap().token, 5);
        // A handle whose last issue is not the floor does not try.
        assert!(other.quick_start(1).unwrap().is_none());
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
            /// The quick claim's create done, its check not yet.
            QuickMade(Dir, u64, File),
            Claimed(Dir, Claim),
            Holding(Dir, Claim),
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
            // One handle per process: each has its own quick-claim state.
            let fences: Vec<Fence> = (0..procs)
                .map(|_| Fence::new(root.open_at("tokens").unwrap(), false))
                .collect();
            let mut floors = vec![0u64; procs];
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
                let fence = &fences[a];
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
                    P::Installed(d) => match fence.quick_start(floors[a]).unwrap() {
                        Some((n, f)) => P::QuickMade(d, n, f),
                        None => {
                            let seen = fence.scan().unwrap();
                            P::Listed(d, seen)
                        }
                    },
                    P::QuickMade(d, n, f) => match fence.quick_confirm(n, f).unwrap() {
                        Some(c) => P::Claimed(d, c),
                        None => P::Listed(d, fence.scan().unwrap()),
                    },
                    P::Listed(d, mut seen) => {
                        seen.push(floors[a]);
                        let n = next_after(&seen).unwrap();
                        seen.pop();
                        match fence.try_claim(n).unwrap() {
                            Some(file) => P::Claimed(
                                d,
                                Claim {
                                    token: n,
                                    older: seen,
                                    file,
                                },
                            ),
                            None => P::Installed(d),
                        }
                    }
                    P::Claimed(d, c) => match d.rename(LIVE0, live(c.token)) {
                        Ok(()) => {
                            issued.push(c.token);
                            floors[a] = floors[a].max(c.token);
                            P::Holding(d, c)
                        }
                        Err(_) => P::Idle, // broken before publishing
                    },
                    P::Holding(d, c) => {
                        let n = c.token;
                        fence.issued(c);
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
