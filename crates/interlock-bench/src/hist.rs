//! A small log-linear histogram of nanosecond samples.
//!
//! Why it is built this way: the fastest locks run tens of millions of
//! acquisitions a second, so keeping every sample is out of the question,
//! and a dependency (hdrhistogram) is more than needed. Sixteen linear
//! sub-buckets per power of two give every recorded value within 6.25% (the
//! report prints two significant figures), recording is a shift and an
//! increment, and histograms from different processes (Rust or the Python
//! driver, which uses the same bucket function) merge by addition. The
//! exact maximum is kept beside the buckets.

/// Sub-buckets per power of two (2^SUB_BITS).
const SUB_BITS: u32 = 4;
const SUB: u64 = 1 << SUB_BITS;
/// Number of buckets: values < 16 exactly, then 16 per octave up to 2^64.
pub const BUCKETS: usize = ((64 - SUB_BITS as usize) + 1) * SUB as usize;

/// The bucket of `v`.
pub fn bucket(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let e = 63 - v.leading_zeros(); // >= SUB_BITS
    let sub = (v >> (e - SUB_BITS)) & (SUB - 1);
    ((e - SUB_BITS + 1) as u64 * SUB + sub) as usize
}

/// The smallest value in bucket `i`, and the bucket's width.
pub fn bounds(i: usize) -> (u64, u64) {
    let i = i as u64;
    if i < SUB {
        return (i, 1);
    }
    let e = i / SUB + SUB_BITS as u64 - 1;
    let sub = i % SUB;
    let shift = e - SUB_BITS as u64;
    ((SUB + sub) << shift, 1 << shift)
}

/// Histogram of u64 samples.
#[derive(Clone, Debug)]
pub struct Hist {
    counts: Vec<u64>,
    n: u64,
    max: u64,
}

impl Default for Hist {
    fn default() -> Self {
        Hist {
            counts: vec![0; BUCKETS],
            n: 0,
            max: 0,
        }
    }
}

impl Hist {
    /// Records one sample.
    #[inline]
    pub fn record(&mut self, v: u64) {
        self.counts[bucket(v)] += 1;
        self.n += 1;
        if v > self.max {
            self.max = v;
        }
    }

    /// Number of samples.
    pub fn len(&self) -> u64 {
        self.n
    }

    /// Largest sample (exact).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Adds `other`'s samples.
    pub fn merge(&mut self, other: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.n += other.n;
        self.max = self.max.max(other.max);
    }

    /// The `q`-quantile (0..=1): the middle of the bucket holding it, capped
    /// at the exact maximum (the last rank is the exact maximum). `None`
    /// when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.n == 0 {
            return None;
        }
        let rank = ((q * self.n as f64).ceil() as u64).clamp(1, self.n);
        if rank == self.n {
            return Some(self.max);
        }
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (lo, w) = bounds(i);
                return Some((lo + w / 2).min(self.max));
            }
        }
        Some(self.max)
    }

    /// Non-empty buckets as (lower bound, count), for plots.
    pub fn buckets(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(i, &c)| (bounds(i).0, c))
    }

    /// Text form: `n max idx:count,idx:count` (the Python driver writes the same).
    pub fn encode(&self) -> String {
        let body: Vec<String> = self
            .counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(i, c)| format!("{i}:{c}"))
            .collect();
        format!("{} {} {}", self.n, self.max, body.join(","))
    }

    /// Parses [`Hist::encode`]'s form.
    pub fn decode(s: &str) -> Option<Hist> {
        let mut it = s.split_whitespace();
        let n: u64 = it.next()?.parse().ok()?;
        let max: u64 = it.next()?.parse().ok()?;
        let mut h = Hist {
            n,
            max,
            ..Hist::default()
        };
        if let Some(body) = it.next() {
            for pair in body.split(',').filter(|p| !p.is_empty()) {
                let (i, c) = pair.split_once(':')?;
                let i: usize = i.parse().ok()?;
                *h.counts.get_mut(i)? = c.parse().ok()?;
            }
        }
        (h.counts.iter().sum::<u64>() == n).then_some(h)
    }
}

/// Jain's fairness index of per-process counts: (Σx)² / (n·Σx²); 1 when
/// every process got the same share, 1/n when one got everything.
pub fn jain(xs: &[u64]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let s: f64 = xs.iter().map(|&x| x as f64).sum();
    let s2: f64 = xs.iter().map(|&x| (x as f64) * (x as f64)).sum();
    if s2 == 0.0 {
        return None;
    }
    Some(s * s / (xs.len() as f64 * s2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_bound_their_values() {
        let mut v = 1u64;
        let probe = |x: u64| {
            let i = bucket(x);
            let (lo, w) = bounds(i);
            assert!(lo <= x && x - lo < w, "{x} in {i}: {lo}+{w}");
            assert!(i < BUCKETS);
            if x >= 16 {
                assert!(w as f64 / lo as f64 <= 1.0 / 16.0 + 1e-12);
            }
        };
        for x in 0..5000 {
            probe(x);
        }
        while v < u64::MAX / 3 {
            probe(v);
            probe(v * 3 - 1);
            v *= 3;
        }
        probe(u64::MAX);
        // Bucket indices are monotone in the value.
        let mut last = 0;
        for x in (0..1_000_000u64).step_by(7) {
            let b = bucket(x);
            assert!(b >= last);
            last = b;
        }
    }

    #[test]
    fn quantiles_encode_merge() {
        let mut h = Hist::default();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5).unwrap() as f64;
        assert!((p50 - 500_000.0).abs() / 500_000.0 < 0.07, "{p50}");
        assert_eq!(h.quantile(1.0), Some(1_000_000));
        let d = Hist::decode(&h.encode()).unwrap();
        assert_eq!(d.len(), 1000);
        let mut m = d.clone();
        m.merge(&h);
        assert_eq!(m.len(), 2000);
        assert_eq!(m.quantile(0.5), h.quantile(0.5));
        assert!(Hist::decode("3 5 1:1").is_none());
        assert!(Hist::default().quantile(0.5).is_none());
    }

    #[test]
    fn jain_extremes() {
        assert_eq!(jain(&[5, 5, 5, 5]), Some(1.0));
        assert!((jain(&[10, 0, 0, 0]).unwrap() - 0.25).abs() < 1e-12);
        assert_eq!(jain(&[0, 0]), None);
    }
}
