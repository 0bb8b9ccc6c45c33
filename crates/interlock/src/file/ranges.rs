//! Interval arithmetic for a [`crate::LockSet`]: which indices an owner
//! holds, in which mode.
//!
//! Why it is built this way: the kernel keeps the truth about byte-range
//! locks, but will not tell an owner what *it* holds (`F_OFD_GETLK` only
//! reports conflicts with *others*). A lock set needs its own holdings to
//! answer `held()`, to restore the previous state at the end of a scope, and
//! to publish what it holds when it waits (deadlock detection). So it keeps a
//! mirror of the kernel's view, updated after each successful `fcntl`, with
//! the kernel's own rules: a request replaces whatever the owner held on the
//! range (conversion in place, splitting the intervals it cuts), and adjacent
//! intervals of one mode are one lock.
//!
//! The map is a sorted `Vec` of disjoint, coalesced intervals rather than a
//! tree: a lock set usually holds few intervals, the vector keeps its
//! capacity across lock/unlock (no allocation on the hot path), and with many
//! intervals the kernel's own list walk dominates anyway (FACTS.md: 13 µs
//! per call at 1,000 locks on a file).
//!
//! The pure parts live here, apart from any system call, so they can be
//! checked exhaustively against a model (see the property tests below).

use std::ops::{Range, RangeFrom, RangeFull, RangeInclusive, RangeTo, RangeToInclusive};

use crate::sys::fcntl::MAX_OFFSET;
use crate::Mode;

/// The largest index a [`crate::LockSet`] can lock, plus one: the end of
/// every unbounded range (`..`, `5..`). Lock *i* is byte *i*, and the kernel
/// addresses bytes `0 ..= i64::MAX`; the top byte is left unaddressed so that
/// every interval has an exclusive end that fits a `u64`.
pub const INDEX_END: u64 = MAX_OFFSET;

/// Something that names an interval of indices of a [`crate::LockSet`]: a
/// single index (`3`) or any Rust range of `u64` (`3..7`, `3..=6`, `..`,
/// `5..`, `..7`, `..=6`).
///
/// Unbounded ends stop at [`INDEX_END`]. An empty interval, or one that
/// reaches beyond [`INDEX_END`], is rejected with
/// [`crate::ErrorKind::InvalidInput`] by the lock set.
pub trait IndexRange {
    /// The half-open interval `start..end`, unchecked (it may be empty or
    /// out of bounds; `None` if it cannot even be expressed, e.g. `..=u64::MAX`).
    fn to_interval(&self) -> Option<Range<u64>>;

    /// The range as its caller wrote it (`5..=3`, not the empty `5..5` it
    /// stands for), for error messages.
    fn shown(&self) -> String {
        match self.to_interval() {
            Some(r) => format!("{}..{}", r.start, r.end),
            None => "beyond u64".to_string(),
        }
    }
}

impl IndexRange for u64 {
    #[inline]
    fn to_interval(&self) -> Option<Range<u64>> {
        Some(*self..self.checked_add(1)?)
    }

    fn shown(&self) -> String {
        self.to_string()
    }
}

impl IndexRange for Range<u64> {
    #[inline]
    fn to_interval(&self) -> Option<Range<u64>> {
        Some(self.clone())
    }
}

impl IndexRange for RangeInclusive<u64> {
    #[inline]
    fn to_interval(&self) -> Option<Range<u64>> {
        if self.is_empty() {
            // `3..=2`, or an exhausted iterator: an empty interval.
            return Some(*self.start()..*self.start());
        }
        Some(*self.start()..self.end().checked_add(1)?)
    }

    fn shown(&self) -> String {
        format!("{}..={}", self.start(), self.end())
    }
}

impl IndexRange for RangeFull {
    #[inline]
    fn to_interval(&self) -> Option<Range<u64>> {
        Some(0..INDEX_END)
    }

    fn shown(&self) -> String {
        "..".to_string()
    }
}

impl IndexRange for RangeFrom<u64> {
    #[inline]
    fn to_interval(&self) -> Option<Range<u64>> {
        Some(self.start..INDEX_END)
    }

    fn shown(&self) -> String {
        format!("{}..", self.start)
    }
}

impl IndexRange for RangeTo<u64> {
    #[inline]
    fn to_interval(&self) -> Option<Range<u64>> {
        Some(0..self.end)
    }

    fn shown(&self) -> String {
        format!("..{}", self.end)
    }
}

impl IndexRange for RangeToInclusive<u64> {
    #[inline]
    fn to_interval(&self) -> Option<Range<u64>> {
        Some(0..self.end.checked_add(1)?)
    }

    fn shown(&self) -> String {
        format!("..={}", self.end)
    }
}

impl<T: IndexRange + ?Sized> IndexRange for &T {
    #[inline]
    fn to_interval(&self) -> Option<Range<u64>> {
        (**self).to_interval()
    }

    fn shown(&self) -> String {
        (**self).shown()
    }
}

/// Why an [`IndexRange`] is unusable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BadRange {
    /// `start >= end`.
    Empty,
    /// The end lies beyond [`INDEX_END`] (or overflows `u64`).
    OutOfBounds,
}

/// Checks an interval: non-empty and within `0..INDEX_END`.
#[inline]
pub(crate) fn checked(r: &impl IndexRange) -> Result<Range<u64>, BadRange> {
    let r = r.to_interval().ok_or(BadRange::OutOfBounds)?;
    if r.end > INDEX_END || r.start > INDEX_END {
        return Err(BadRange::OutOfBounds);
    }
    if r.start >= r.end {
        return Err(BadRange::Empty);
    }
    Ok(r)
}

/// One maximal interval held in one mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Seg {
    pub start: u64,
    pub end: u64,
    pub mode: Mode,
}

/// What one owner holds: disjoint, sorted, non-empty intervals, with no two
/// adjacent intervals of the same mode (they are merged, as the kernel
/// merges them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct RangeMap {
    segs: Vec<Seg>,
}

impl RangeMap {
    /// Nothing held.
    pub fn new() -> RangeMap {
        RangeMap { segs: Vec::new() }
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    /// The held intervals, in order.
    pub fn segs(&self) -> &[Seg] {
        &self.segs
    }

    /// The held intervals and modes, in order.
    pub fn iter(&self) -> impl Iterator<Item = (Range<u64>, Mode)> + '_ {
        self.segs.iter().map(|s| (s.start..s.end, s.mode))
    }

    /// The index of the first segment that ends after `at`.
    fn first_ending_after(&self, at: u64) -> usize {
        self.segs.partition_point(|s| s.end <= at)
    }

    /// The mode index `i` is held in, if any.
    pub fn get(&self, i: u64) -> Option<Mode> {
        let k = self.first_ending_after(i);
        self.segs.get(k).filter(|s| s.start <= i).map(|s| s.mode)
    }

    /// Whether every index of `r` is held in exactly `mode`.
    pub fn covers(&self, r: &Range<u64>, mode: Mode) -> bool {
        if r.start >= r.end {
            return false;
        }
        // Coalescing means a fully covered range lies in one segment.
        let k = self.first_ending_after(r.start);
        self.segs
            .get(k)
            .is_some_and(|s| s.start <= r.start && s.end >= r.end && s.mode == mode)
    }

    #[cfg(test)]
    /// Whether some held interval overlapping `r` conflicts with `mode`
    /// (for another owner's request).
    pub fn conflicts(&self, r: &Range<u64>, mode: Mode) -> bool {
        if r.start >= r.end {
            return false;
        }
        let k = self.first_ending_after(r.start);
        self.segs[k..]
            .iter()
            .take_while(|s| s.start < r.end)
            .any(|s| s.mode.conflicts_with(mode))
    }

    /// The state of each maximal piece of `r`: held intervals clipped to `r`
    /// and the gaps between them (`None`), in order, covering `r` exactly.
    pub fn segments(&self, r: &Range<u64>) -> Vec<(Range<u64>, Option<Mode>)> {
        let mut out = Vec::new();
        if r.start >= r.end {
            return out;
        }
        let mut at = r.start;
        let k = self.first_ending_after(r.start);
        for s in self.segs[k..].iter().take_while(|s| s.start < r.end) {
            let start = s.start.max(r.start);
            if at < start {
                out.push((at..start, None));
            }
            let end = s.end.min(r.end);
            out.push((start..end, Some(s.mode)));
            at = end;
        }
        if at < r.end {
            out.push((at..r.end, None));
        }
        out
    }

    /// Applies `mode` to `r` (`None` releases it), as the kernel does: the
    /// range takes the new state whatever it held before, intervals cut by
    /// its ends are split, and neighbours of equal mode merge.
    pub fn set(&mut self, r: Range<u64>, mode: Option<Mode>) {
        if r.start >= r.end {
            return;
        }
        // The common cases first: nothing held yet, or releasing a range
        // that covers everything held.
        match (self.segs.first(), self.segs.last(), mode) {
            (None, _, Some(mode)) => {
                self.segs.push(Seg {
                    start: r.start,
                    end: r.end,
                    mode,
                });
                return;
            }
            (Some(first), Some(last), None) if r.start <= first.start && r.end >= last.end => {
                self.segs.clear();
                return;
            }
            _ => {}
        }
        // Segments lo..hi overlap or touch r. Only the first can stick out
        // on the left and only the last on the right; the parts that stick
        // out keep their mode, or merge into the new interval if it has the
        // same mode (they touch it by construction).
        let lo = self.segs.partition_point(|s| s.end < r.start);
        let hi = self.segs.partition_point(|s| s.start <= r.end);
        let (mut start, mut end) = (r.start, r.end);
        let (mut left, mut right) = (None, None);
        for s in &self.segs[lo..hi] {
            if s.start < r.start {
                if Some(s.mode) == mode {
                    start = s.start;
                } else {
                    left = Some(Seg { end: r.start, ..*s });
                }
            }
            if s.end > r.end {
                if Some(s.mode) == mode {
                    end = s.end;
                } else {
                    right = Some(Seg { start: r.end, ..*s });
                }
            }
        }
        let middle = mode.map(|mode| Seg { start, end, mode });
        // Replace segs[lo..hi] by the (at most three) new segments, in place
        // where possible: `splice` costs more than the rest of a lock call.
        let mut new = [left, middle, right].into_iter().flatten();
        let mut at = lo;
        while at < hi {
            match new.next() {
                Some(seg) => self.segs[at] = seg,
                None => {
                    if hi == self.segs.len() {
                        self.segs.truncate(at);
                    } else {
                        self.segs.drain(at..hi);
                    }
                    return;
                }
            }
            at += 1;
        }
        for seg in new {
            if at == self.segs.len() {
                self.segs.push(seg);
            } else {
                self.segs.insert(at, seg);
            }
            at += 1;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    const N: u64 = 64;

    /// The model: one slot per index.
    #[derive(Clone, Debug)]
    struct Model(Vec<Option<Mode>>);

    impl Model {
        fn set(&mut self, r: Range<u64>, m: Option<Mode>) {
            for i in r {
                self.0[i as usize] = m;
            }
        }
        /// Maximal runs of equal, held mode.
        fn runs(&self) -> Vec<(Range<u64>, Mode)> {
            model_runs(&self.0)
        }
    }

    /// The maximal runs of equal, held mode in a model where index `i`
    /// holds `model[i]`: what a [`RangeMap`] (and a `LockSet`) must report.
    pub(crate) fn model_runs(model: &[Option<Mode>]) -> Vec<(Range<u64>, Mode)> {
        let mut out: Vec<(Range<u64>, Mode)> = Vec::new();
        for (i, m) in model.iter().enumerate() {
            let i = i as u64;
            if let Some(m) = *m {
                match out.last_mut() {
                    Some((r, lm)) if r.end == i && *lm == m => r.end = i + 1,
                    _ => out.push((i..i + 1, m)),
                }
            }
        }
        out
    }

    fn invariant(m: &RangeMap) {
        for s in m.segs() {
            assert!(s.start < s.end, "{m:?}");
        }
        for w in m.segs().windows(2) {
            assert!(w[0].end <= w[1].start, "overlap {m:?}");
            assert!(
                !(w[0].end == w[1].start && w[0].mode == w[1].mode),
                "not coalesced {m:?}"
            );
        }
    }

    fn op() -> impl Strategy<Value = (Range<u64>, Option<Mode>)> {
        (
            0..=N,
            0..=N,
            prop_oneof![
                Just(None),
                Just(Some(Mode::Shared)),
                Just(Some(Mode::Exclusive))
            ],
        )
            .prop_map(|(a, b, m)| (a.min(b)..a.max(b), m))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn matches_model(ops in proptest::collection::vec(op(), 0..40),
                         q in 0..=N, qe in 0..=N, qm in prop_oneof![Just(Mode::Shared), Just(Mode::Exclusive)]) {
            let mut map = RangeMap::new();
            let mut model = Model(vec![None; N as usize]);
            for (r, m) in ops {
                map.set(r.clone(), m);
                model.set(r, m);
                invariant(&map);
                prop_assert_eq!(map.iter().collect::<Vec<_>>(), model.runs());
            }
            for i in 0..N {
                prop_assert_eq!(map.get(i), model.0[i as usize]);
            }
            let r = q.min(qe)..q.max(qe);
            // segments() covers r exactly and agrees with the model.
            let segs = map.segments(&r);
            let mut at = r.start;
            for (s, m) in &segs {
                prop_assert_eq!(s.start, at);
                prop_assert!(s.start < s.end);
                for i in s.clone() {
                    prop_assert_eq!(model.0[i as usize], *m);
                }
                at = s.end;
            }
            prop_assert_eq!(at, r.end.max(r.start));
            let covers = !r.is_empty() && r.clone().all(|i| model.0[i as usize] == Some(qm));
            prop_assert_eq!(map.covers(&r, qm), covers);
            let conflicts = r.clone().any(|i| model.0[i as usize].is_some_and(|h| h.conflicts_with(qm)));
            prop_assert_eq!(map.conflicts(&r, qm), conflicts);
        }
    }

    #[test]
    fn extremes() {
        let top = INDEX_END;
        let big = 1u64 << 62;
        let mut m = RangeMap::new();
        m.set(0..top, Some(Mode::Shared));
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![(0..top, Mode::Shared)]);
        m.set(big..big + 1, Some(Mode::Exclusive));
        assert_eq!(
            m.iter().collect::<Vec<_>>(),
            vec![
                (0..big, Mode::Shared),
                (big..big + 1, Mode::Exclusive),
                (big + 1..top, Mode::Shared)
            ]
        );
        assert_eq!(m.get(big), Some(Mode::Exclusive));
        assert_eq!(m.get(top - 1), Some(Mode::Shared));
        assert_eq!(m.get(top), None);
        m.set(top - 1..top, None);
        m.set(0..1, None);
        assert_eq!(m.segs().first().unwrap().start, 1);
        assert_eq!(m.segs().last().unwrap().end, top - 1);
        m.set(big..big + 1, Some(Mode::Shared));
        assert_eq!(
            m.iter().collect::<Vec<_>>(),
            vec![(1..top - 1, Mode::Shared)]
        );
        assert!(m.covers(&(1..top - 1), Mode::Shared));
        assert!(!m.covers(&(0..top), Mode::Shared));
        m.set(0..top, None);
        assert!(m.is_empty());
    }

    #[test]
    fn index_ranges() {
        assert_eq!(checked(&3), Ok(3..4));
        assert_eq!(checked(&(3..7)), Ok(3..7));
        assert_eq!(checked(&(3..=6)), Ok(3..7));
        assert_eq!(checked(&(..)), Ok(0..INDEX_END));
        assert_eq!(checked(&(5..)), Ok(5..INDEX_END));
        assert_eq!(checked(&(..7)), Ok(0..7));
        assert_eq!(checked(&(..=6)), Ok(0..7));
        assert_eq!(checked(&(1u64 << 62)), Ok((1 << 62)..(1 << 62) + 1));
        assert_eq!(checked(&(INDEX_END - 1)), Ok(INDEX_END - 1..INDEX_END));
        assert_eq!(checked(&(3..3)), Err(BadRange::Empty));
        #[allow(clippy::reversed_empty_ranges)]
        let backwards = 7..3;
        assert_eq!(checked(&backwards), Err(BadRange::Empty));
        #[allow(clippy::reversed_empty_ranges)]
        let backwards_incl = 7..=3;
        assert_eq!(checked(&backwards_incl), Err(BadRange::Empty));
        assert_eq!(checked(&INDEX_END), Err(BadRange::OutOfBounds));
        assert_eq!(checked(&u64::MAX), Err(BadRange::OutOfBounds));
        assert_eq!(checked(&(..=u64::MAX)), Err(BadRange::OutOfBounds));
        assert_eq!(checked(&(0..INDEX_END + 1)), Err(BadRange::OutOfBounds));
        assert_eq!(checked(&(u64::MAX..)), Err(BadRange::OutOfBounds));
    }
}
