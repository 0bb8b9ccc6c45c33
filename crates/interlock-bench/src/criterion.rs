//! The uncontended tables of BENCHMARKS.md, read from criterion's results.
//!
//! Why it is built this way: the criterion benches in crates/interlock/benches
//! measure one lock+unlock pair with no contention, side by side with the
//! floor and the peers. Their figures belong in BENCHMARKS.md, which must be
//! generated, never edited; so this module reads what criterion left in
//! `target/criterion/` and renders it. It needs no knowledge of each bench:
//! every benchmark is named `PRIMITIVE/ROLE/NAME/OP` (role `floor`,
//! `interlock`, `peer`, `reference` or `part`), and a row is compared with
//! the floor and the fastest peer of the same primitive and operation in
//! the same group, which criterion measured minutes apart in one run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

/// One measured benchmark.
#[derive(Clone, Debug, PartialEq)]
pub struct Bench {
    pub group: String,
    pub primitive: String,
    pub role: String,
    pub name: String,
    pub op: String,
    /// Median time per iteration (one lock+unlock pair), nanoseconds.
    pub median_ns: f64,
}

/// Splits `PRIMITIVE/ROLE/NAME/OP` (NAME may contain `/`).
fn parse_id(group: &str, id: &str, median_ns: f64) -> Option<Bench> {
    let (primitive, rest) = id.split_once('/')?;
    let (role, rest) = rest.split_once('/')?;
    let (name, op) = rest.rsplit_once('/')?;
    Some(Bench {
        group: group.to_string(),
        primitive: primitive.to_string(),
        role: role.to_string(),
        name: name.to_string(),
        op: op.to_string(),
        median_ns,
    })
}

/// Every benchmark under `dir` (criterion's output directory) whose id
/// follows the convention; others are skipped.
pub fn load(dir: &Path) -> Result<Vec<Bench>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if !(p.ends_with("new/benchmark.json")) {
                continue;
            }
            let meta: serde_json::Value = serde_json::from_str(&fs::read_to_string(&p)?)
                .with_context(|| format!("parse {}", p.display()))?;
            let est_path = p.with_file_name("estimates.json");
            let Ok(est_text) = fs::read_to_string(&est_path) else {
                continue;
            };
            let est: serde_json::Value = serde_json::from_str(&est_text)
                .with_context(|| format!("parse {}", est_path.display()))?;
            let (Some(group), Some(func), Some(median)) = (
                meta["group_id"].as_str(),
                meta["function_id"].as_str(),
                est["median"]["point_estimate"].as_f64(),
            ) else {
                continue;
            };
            let id = match meta["value_str"].as_str() {
                Some(v) => format!("{func}/{v}"),
                None => func.to_string(),
            };
            out.extend(parse_id(group, &id, median));
        }
    }
    out.sort_by(|a, b| (&a.group, &a.op, &a.name).cmp(&(&b.group, &b.op, &b.name)));
    Ok(out)
}

fn ns(v: f64) -> String {
    if v < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

fn ratio(v: Option<f64>) -> String {
    v.map(|r| format!("{r:.2}×")).unwrap_or_else(|| "".into())
}

/// The default form of each family, for the summary at the top of the
/// report: (bench name, operation, or `None` for every operation).
const SUMMARY: &[(&str, Option<&str>)] = &[
    ("FileLock", None),
    ("FileLock flock", None),
    ("LockSet", Some("1 index exclusive")),
    ("ShmRwLock", Some("write")),
    ("ShmRwLock", Some("read")),
    ("ShmMutex", Some("lock")),
    ("LeaseLock durable", None),
    ("Semaphore (shm)", Some("acquire")),
    ("FileSemaphore", Some("acquire")),
];

/// The summary rows: the default form of each family, uncontended, as
/// `| lock | operation | ns | × floor |` lines; empty without results.
pub fn summary(benches: &[Bench]) -> Vec<String> {
    let mut out = Vec::new();
    for (name, op) in SUMMARY {
        let mut rows: Vec<&Bench> = benches
            .iter()
            .filter(|b| b.role == "interlock" && b.name == *name && op.is_none_or(|o| b.op == o))
            .collect();
        rows.sort_by(|a, b| b.op.cmp(&a.op));
        for b in rows {
            let floor = benches
                .iter()
                .find(|o| {
                    o.group == b.group
                        && o.role == "floor"
                        && o.primitive == b.primitive
                        && o.op == b.op
                })
                .map(|f| b.median_ns / f.median_ns);
            // criterion names the group `lease_uncontended/<fs>` (its
            // directory `lease_uncontended_<fs>`): say which file system.
            let fs = b.group.strip_prefix("lease_uncontended/");
            let name = match fs.or_else(|| b.group.strip_prefix("lease_uncontended_")) {
                Some(fs) => format!("{} on {fs}", b.name),
                None => b.name.clone(),
            };
            out.push(format!(
                "| {} | {} | {} | {} |",
                name,
                b.op,
                ns(b.median_ns),
                ratio(floor)
            ));
        }
    }
    out
}

/// The markdown section, one table per criterion group; `None` if there
/// are no results.
pub fn section(benches: &[Bench]) -> Option<String> {
    if benches.is_empty() {
        return None;
    }
    let mut groups: BTreeMap<&str, Vec<&Bench>> = BTreeMap::new();
    for b in benches {
        groups.entry(&b.group).or_default().push(b);
    }
    let mut s = String::new();
    for (group, rows) in groups {
        let _ = writeln!(s, "\n### {group}\n");
        let _ = writeln!(
            s,
            "| lock | operation | ns per pair | × floor | × best peer |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|");
        let same = |b: &Bench, role: &str| {
            rows.iter()
                .filter(|o| o.role == role && o.primitive == b.primitive && o.op == b.op)
                .map(|o| o.median_ns)
                .collect::<Vec<_>>()
        };
        // interlock first, then peers and references, then floors and parts.
        let order = |r: &str| match r {
            "interlock" => 0,
            "peer" => 1,
            "reference" => 2,
            "floor" => 3,
            _ => 4,
        };
        let mut sorted = rows.clone();
        sorted.sort_by(|a, b| {
            (&a.op, order(&a.role), &a.name).cmp(&(&b.op, order(&b.role), &b.name))
        });
        for b in sorted {
            let floor = same(b, "floor").into_iter().next();
            let best_peer = same(b, "peer").into_iter().reduce(f64::min);
            let (x_floor, x_peer) = match b.role.as_str() {
                "interlock" | "peer" | "reference" => (
                    floor.map(|f| b.median_ns / f),
                    best_peer
                        .filter(|_| b.role == "interlock")
                        .map(|p| b.median_ns / p),
                ),
                _ => (None, None),
            };
            let label = match b.role.as_str() {
                "interlock" => format!("**interlock {}**", b.name),
                "floor" => format!("floor: {}", b.name),
                "reference" => format!("{} (reference)", b.name),
                "part" => format!("part: {}", b.name),
                _ => b.name.clone(),
            };
            let _ = writeln!(
                s,
                "| {label} | {} ({}) | {} | {} | {} |",
                b.op,
                b.primitive,
                ns(b.median_ns),
                ratio(x_floor),
                ratio(x_peer)
            );
        }
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_convention() {
        let b = parse_id(
            "g",
            "fcntl/interlock/FileLock flock, verify_path(false)/write",
            5.0,
        )
        .unwrap();
        assert_eq!(
            (
                b.primitive.as_str(),
                b.role.as_str(),
                b.name.as_str(),
                b.op.as_str()
            ),
            (
                "fcntl",
                "interlock",
                "FileLock flock, verify_path(false)",
                "write"
            )
        );
        let b = parse_id(
            "g",
            "dir/peer/O_EXCL lock file (create + unlink)/acquire+release",
            1.0,
        )
        .unwrap();
        assert_eq!(b.name, "O_EXCL lock file (create + unlink)");
        assert!(parse_id("g", "floor_ofd", 1.0).is_none());
    }

    #[test]
    fn ratios_against_floor_and_best_peer_of_the_same_primitive_and_op() {
        let mk = |p: &str, r: &str, n: &str, op: &str, v: f64| {
            parse_id("g", &format!("{p}/{r}/{n}/{op}"), v).unwrap()
        };
        let rows = vec![
            mk("flock", "floor", "raw", "write", 100.0),
            mk("flock", "peer", "a", "write", 110.0),
            mk("flock", "peer", "b", "write", 105.0),
            mk("flock", "interlock", "X", "write", 210.0),
            mk("fcntl", "floor", "raw", "write", 1000.0),
        ];
        let s = section(&rows).unwrap();
        assert!(
            s.contains("| **interlock X** | write (flock) | 210 | 2.10× | 2.00× |"),
            "{s}"
        );
        assert!(
            s.contains("| floor: raw | write (fcntl) | 1000 |  |  |"),
            "{s}"
        );
    }
}
