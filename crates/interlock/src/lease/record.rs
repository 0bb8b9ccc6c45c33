//! The lease record and the staleness verdict: pure logic, no I/O.
//!
//! Why it is built this way: a lease's changing state (version, fencing
//! token, expiry) is carried in the *name* of the one file in the lock
//! directory, and its fixed identity (host, boot, pid namespace, pid, start
//! time) in that file's *content*, written completely before the directory
//! first becomes visible. A rename is the only atomic compare-and-swap a
//! file system offers: `rename(old, new)` succeeds only if `old` is still
//! there. By putting the state in the name, renewing, publishing a token,
//! releasing and breaking are all one rename of the exact name that was
//! judged, so two actors can never both act on the same state, and nobody
//! ever sees a half-written record. The verdict is a pure function so that
//! it can be checked against a model.

use crate::sys::proc::{Liveness, ProcessId};

/// Prefix of the live lease file.
const LIVE: &str = "lease";
/// Prefix of the tombstone a released or broken lease is renamed to.
const DEAD: &str = "dead";
/// First line of the content.
const MAGIC: &str = "interlock-lease 1";
/// The most we read of a record.
pub(crate) const MAX_RECORD: u64 = 4096;

/// The state carried in the lease file's name:
/// `lease.VERSION.TOKEN.EXPIRY` or `dead.VERSION.TOKEN.EXPIRY`, EXPIRY in
/// nanoseconds since the Unix epoch, TOKEN 0 while the fencing token is not
/// yet issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LeaseName {
    pub dead: bool,
    pub version: u64,
    pub token: u64,
    pub expiry_ns: u64,
}

impl LeaseName {
    /// The name, rendered on the stack: it is made several times in every
    /// acquisition, and an allocation plus `format!` each time was a
    /// measurable part of an uncontended cycle.
    pub fn render(&self) -> NameBuf {
        use std::io::Write;
        let mut buf = [0; NAME_BUF];
        let mut rest = &mut buf[..];
        let prefix = if self.dead { DEAD } else { LIVE };
        // Always fits: NAME_BUF has room for the longest name.
        let _ = write!(
            rest,
            "{prefix}.{}.{}.{}",
            self.version, self.token, self.expiry_ns
        );
        let len = NAME_BUF - rest.len();
        NameBuf { len, buf }
    }

    /// Parses a name; `None` for anything not in the format (decimal
    /// numbers without signs or leading zeros).
    pub fn parse(name: &str) -> Option<LeaseName> {
        let mut parts = name.split('.');
        let dead = match parts.next()? {
            LIVE => false,
            DEAD => true,
            _ => return None,
        };
        let mut num = || -> Option<u64> {
            let p = parts.next()?;
            if p.is_empty()
                || (p.len() > 1 && p.starts_with('0'))
                || !p.bytes().all(|b| b.is_ascii_digit())
            {
                return None;
            }
            p.parse().ok()
        };
        let (version, token, expiry_ns) = (num()?, num()?, num()?);
        if parts.next().is_some() {
            return None;
        }
        Some(LeaseName {
            dead,
            version,
            token,
            expiry_ns,
        })
    }

    /// The tombstone this lease becomes when released or broken.
    pub fn tombstone(&self) -> LeaseName {
        LeaseName {
            dead: true,
            ..*self
        }
    }
}

/// Room for `dead.` and three 20-digit numbers with their dots.
const NAME_BUF: usize = 72;

/// A rendered [`LeaseName`] (ASCII, at most [`NAME_BUF`] bytes).
#[derive(Clone, Copy)]
pub(crate) struct NameBuf {
    len: usize,
    buf: [u8; NAME_BUF],
}

impl std::ops::Deref for NameBuf {
    type Target = str;
    fn deref(&self) -> &str {
        // Only ASCII is ever pushed.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

impl AsRef<std::ffi::OsStr> for NameBuf {
    fn as_ref(&self) -> &std::ffi::OsStr {
        std::ffi::OsStr::new(&**self)
    }
}

impl std::fmt::Debug for NameBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self)
    }
}

impl PartialEq<&str> for NameBuf {
    fn eq(&self, other: &&str) -> bool {
        **self == **other
    }
}

/// Who holds a lease: the fixed part of the record, in the file's content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Owner {
    pub host: String,
    pub boot_id: String,
    pub pid_ns: String,
    pub process: ProcessId,
    pub nonce: u64,
    pub ttl_ns: u64,
}

impl Owner {
    pub fn render(&self) -> String {
        format!(
            "{MAGIC}\nhost {}\nboot {}\npidns {}\npid {}\nstart {}\nnonce {:016x}\nttl_ns {}\n",
            self.host,
            self.boot_id,
            self.pid_ns,
            self.process.pid,
            self.process.start_time,
            self.nonce,
            self.ttl_ns
        )
    }

    /// Parses a record; `None` if it is not one of ours or is damaged.
    pub fn parse(bytes: &[u8]) -> Option<Owner> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut lines = text.lines();
        if lines.next()? != MAGIC {
            return None;
        }
        let mut field = |key: &str| -> Option<String> {
            let line = lines.next()?;
            let v = line.strip_prefix(key)?.strip_prefix(' ')?;
            Some(v.to_string())
        };
        let host = field("host")?;
        let boot_id = field("boot")?;
        let pid_ns = field("pidns")?;
        let pid = field("pid")?.parse().ok()?;
        let start_time = field("start")?.parse().ok()?;
        let nonce = u64::from_str_radix(&field("nonce")?, 16).ok()?;
        let ttl_ns = field("ttl_ns")?.parse().ok()?;
        Some(Owner {
            host,
            boot_id,
            pid_ns,
            process: ProcessId { pid, start_time },
            nonce,
            ttl_ns,
        })
    }

    /// Whether this owner's pid can be checked here: same boot of the same
    /// kernel and the same pid namespace (containers share a boot id but
    /// not pids). An unknown boot id or namespace is never local.
    pub fn is_local_to(&self, here: &Locality) -> bool {
        !here.boot_id.is_empty()
            && !here.pid_ns.is_empty()
            && self.boot_id == here.boot_id
            && self.pid_ns == here.pid_ns
    }
}

/// Where "here" is, for [`Owner::is_local_to`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Locality {
    pub host: String,
    pub boot_id: String,
    pub pid_ns: String,
}

impl Locality {
    /// This host, boot and pid namespace.
    pub fn current() -> Locality {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        };
        let pid_ns = std::fs::read_link("/proc/self/ns/pid")
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        Locality {
            host: sanitize(&read("/proc/sys/kernel/hostname")),
            boot_id: crate::sys::proc::boot_id().to_string(),
            pid_ns,
        }
    }

    /// A short tag naming this boot and pid namespace, for file names.
    pub fn tag(&self) -> String {
        // FNV-1a: stable across processes and builds (std's hasher is not).
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.boot_id.bytes().chain([0]).chain(self.pid_ns.bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{h:016x}")
    }
}

/// Keeps a value on one line of the record.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// What a waiter or breaker concludes about a live lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The owner is alive or may be; look again at `wake_at_ns` (when the
    /// lease, with the skew allowance, runs out).
    Live { wake_at_ns: u64 },
    /// The owner is a dead process of this host, boot and pid namespace.
    OwnerDead,
    /// The lease ran out longer than the skew allowance ago.
    Expired,
}

/// The verdict on a live lease file `name` whose record parsed as `owner`
/// (`None`: damaged or foreign content, so only its expiry can be trusted),
/// at wall-clock `now_ns`, allowing `skew_ns` of clock difference between
/// hosts. `alive` is asked only for a local owner.
pub(crate) fn judge(
    name: &LeaseName,
    owner: Option<&Owner>,
    here: &Locality,
    now_ns: u64,
    skew_ns: u64,
    alive: impl FnOnce(ProcessId) -> Liveness,
) -> Verdict {
    if let Some(o) = owner {
        if o.is_local_to(here) && alive(o.process) == Liveness::Dead {
            return Verdict::OwnerDead;
        }
    }
    let deadline = name.expiry_ns.saturating_add(skew_ns);
    if now_ns > deadline {
        Verdict::Expired
    } else {
        Verdict::Live {
            wake_at_ns: deadline.saturating_add(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn here() -> Locality {
        Locality {
            host: "h".into(),
            boot_id: "boot-a".into(),
            pid_ns: "pid:[1]".into(),
        }
    }

    fn owner(boot: &str, ns: &str) -> Owner {
        Owner {
            host: "h".into(),
            boot_id: boot.into(),
            pid_ns: ns.into(),
            process: ProcessId {
                pid: 42,
                start_time: 7,
            },
            nonce: 0xdead_beef,
            ttl_ns: 5,
        }
    }

    #[test]
    fn names_round_trip_and_reject_junk() {
        let n = LeaseName {
            dead: false,
            version: 3,
            token: 17,
            expiry_ns: 1_700_000_000_000_000_000,
        };
        assert_eq!(n.render(), "lease.3.17.1700000000000000000");
        assert_eq!(LeaseName::parse(&n.render()), Some(n));
        assert!(LeaseName::parse("dead.0.0.0").unwrap().dead);
        for bad in [
            "",
            "lease",
            "lease.1.2",
            "lease.1.2.3.4",
            "lease.01.2.3",
            "lease.-1.2.3",
            "lease.1.2.x",
            "pid",
            "lease.1.2.99999999999999999999999",
            "lease..2.3",
        ] {
            assert_eq!(LeaseName::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn record_round_trips_and_damage_is_none() {
        let o = owner("boot-a", "pid:[1]");
        assert_eq!(Owner::parse(o.render().as_bytes()), Some(o.clone()));
        let text = o.render();
        assert_eq!(Owner::parse(&text.as_bytes()[..text.len() / 2]), None);
        assert_eq!(Owner::parse(b"12345\n"), None);
        assert_eq!(Owner::parse(&[0xff, 0xfe, 0]), None);
    }

    #[test]
    fn locality_needs_same_boot_and_namespace() {
        assert!(owner("boot-a", "pid:[1]").is_local_to(&here()));
        assert!(!owner("boot-b", "pid:[1]").is_local_to(&here()));
        assert!(!owner("boot-a", "pid:[2]").is_local_to(&here()));
        let unknown = Locality {
            boot_id: String::new(),
            ..here()
        };
        assert!(!owner("", "pid:[1]").is_local_to(&unknown));
        assert_eq!(here().tag(), here().tag());
        assert_ne!(here().tag(), unknown.tag());
    }

    proptest! {
        #[test]
        fn any_name_round_trips(dead: bool, version: u64, token: u64, expiry_ns: u64) {
            let n = LeaseName { dead, version, token, expiry_ns };
            prop_assert_eq!(LeaseName::parse(&n.render()), Some(n));
        }

        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Owner::parse(&bytes);
            if let Ok(s) = std::str::from_utf8(&bytes) {
                let _ = LeaseName::parse(s);
            }
        }

        /// The verdict against a model: a lease is broken at once only for
        /// a dead owner of this boot and namespace; otherwise only once the
        /// clock is past expiry plus skew; and a live verdict wakes exactly
        /// when that becomes true.
        #[test]
        fn verdict_matches_model(
            same_boot: bool, same_ns: bool, parsed: bool, dead: bool,
            expiry in 0u64..1_000, skew in 0u64..100, now in 0u64..1_200,
        ) {
            let o = owner(if same_boot { "boot-a" } else { "boot-b" },
                          if same_ns { "pid:[1]" } else { "pid:[9]" });
            let name = LeaseName { dead: false, version: 1, token: 1, expiry_ns: expiry };
            let mut asked = false;
            let v = judge(&name, parsed.then_some(&o), &here(), now, skew, |_| {
                asked = true;
                if dead { Liveness::Dead } else { Liveness::Alive }
            });
            let local = parsed && same_boot && same_ns;
            prop_assert_eq!(asked, local, "liveness asked only for local owners");
            let expected = if local && dead {
                Verdict::OwnerDead
            } else if now > expiry + skew {
                Verdict::Expired
            } else {
                Verdict::Live { wake_at_ns: expiry + skew + 1 }
            };
            prop_assert_eq!(v, expected);
        }
    }
}
