//! Which thread locked which indices through which `LockSet`: so that a
//! thread asking, through a second set of the same file, for indices it
//! locked through a first one gets `AlreadyHeld` at once instead of waiting
//! for itself.
//!
//! A lock set is one owner (any thread may lock and unlock through it), so
//! the kernel and the core see two sets, not one thread: the core's
//! deadlock detection finds no cycle, and the wait would last until some
//! other thread unlocked the first set. The rule here: a request by holder
//! T (a thread, or an asyncio task) through set B conflicts with T's own
//! hold when T locked an overlapping index through another set A of the
//! same file and A still holds it in a mode the request conflicts with.
//! What A holds is read from A itself (its `held()`), so unlocks and scope
//! restores through A, by any thread, are seen; the record only says who
//! locked each index last. A is asked only if it answers at once: while
//! another thread is inside a call on A (waiting through it), the request
//! goes on as before the rule.

use interlock::{LockSet, Mode};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Weak};

/// One lock made through a set: by `holder`, of `range`, through `set`.
struct Entry {
    holder: u64,
    range: Range<u64>,
    set: Weak<LockSet>,
}

/// (fork generation, file (device, inode) -> entries).
type Record = (u64, HashMap<(u64, u64), Vec<Entry>>);

static RECORD: Mutex<Option<Record>> = Mutex::new(None);

fn with<T>(f: impl FnOnce(&mut HashMap<(u64, u64), Vec<Entry>>) -> T) -> T {
    let mut r = RECORD.lock();
    let gen = crate::hold::generation();
    let r = r.get_or_insert_with(|| (gen, HashMap::new()));
    if r.0 != gen {
        // A forked child: the parent's threads hold nothing here.
        r.1.clear();
        r.0 = gen;
    }
    f(&mut r.1)
}

/// Cuts `range` out of the entries of `set` (it now holds there what
/// `by` asked for, or nothing).
fn cut(v: &mut Vec<Entry>, set: &Arc<LockSet>, range: &Range<u64>) {
    let mut kept = Vec::with_capacity(v.len());
    for e in v.drain(..) {
        let same = e.set.as_ptr() == Arc::as_ptr(set);
        if e.set.strong_count() == 0 {
            continue;
        }
        if !same || e.range.end <= range.start || range.end <= e.range.start {
            kept.push(e);
            continue;
        }
        if e.range.start < range.start {
            kept.push(Entry {
                holder: e.holder,
                range: e.range.start..range.start,
                set: e.set.clone(),
            });
        }
        if range.end < e.range.end {
            kept.push(Entry {
                holder: e.holder,
                range: range.end..e.range.end,
                set: e.set.clone(),
            });
        }
    }
    *v = kept;
}

/// What `holder` holds, through another set of the file than `set`, that a
/// request for `range` in `mode` conflicts with: (first index, mode).
pub(crate) fn conflict(
    file: (u64, u64),
    set: &Arc<LockSet>,
    holder: u64,
    range: &Range<u64>,
    mode: Mode,
) -> Option<(u64, Mode)> {
    let mine: Vec<(Range<u64>, Arc<LockSet>)> = with(|m| {
        m.get(&file).map_or_else(Vec::new, |v| {
            v.iter()
                .filter(|e| e.holder == holder && e.set.as_ptr() != Arc::as_ptr(set))
                .filter(|e| e.range.start < range.end && range.start < e.range.end)
                .filter_map(|e| Some((e.range.clone(), e.set.upgrade()?)))
                .collect()
        })
    });
    for (r, other) in mine {
        let lo = r.start.max(range.start);
        let hi = r.end.min(range.end);
        // A set that another thread is inside (waiting through it, say) is
        // not asked: waiting for its answer could itself wait for this
        // thread. The request then goes on as before the rule (the core's
        // deadlock detection still sees cycles between sets).
        let Some(held) = other.try_held() else {
            continue;
        };
        for (h, m) in held {
            if h.start < hi && lo < h.end && m.conflicts_with(mode) {
                return Some((h.start.max(lo), m));
            }
        }
    }
    None
}

/// `holder` locked `range` through `set`.
pub(crate) fn locked(file: (u64, u64), set: &Arc<LockSet>, holder: u64, range: Range<u64>) {
    with(|m| {
        let v = m.entry(file).or_default();
        cut(v, set, &range);
        v.push(Entry {
            holder,
            range,
            set: Arc::downgrade(set),
        });
    });
}

/// `set` unlocked `range` (by whichever thread).
pub(crate) fn unlocked(file: (u64, u64), set: &Arc<LockSet>, range: Range<u64>) {
    with(|m| {
        if let Some(v) = m.get_mut(&file) {
            cut(v, set, &range);
            if v.is_empty() {
                m.remove(&file);
            }
        }
    });
}
