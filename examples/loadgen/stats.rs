//! Latency histograms and small statistics helpers for the load generator.

/// Values below this are recorded exactly (one bucket each).
const EXACT: u64 = 64;
/// Sub-buckets per power of two above [`EXACT`]: about 3% relative error.
const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;
/// Buckets for the whole `u64` range.
const BUCKETS: usize = EXACT as usize + (64 - 6) * SUB as usize;

/// A log-linear histogram of nanosecond latencies: constant memory, so every
/// delivery of a million-socket fan-out can be recorded.
#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    count: u64,
    max: u64,
    sum: u128,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            count: 0,
            max: 0,
            sum: 0,
        }
    }
}

fn index(v: u64) -> usize {
    if v < EXACT {
        return v as usize;
    }
    let e = 63 - v.leading_zeros(); // >= 6
    let top = (v >> (e - SUB_BITS)) - SUB; // 0..SUB
    EXACT as usize + (e as usize - 6) * SUB as usize + top as usize
}

fn value_at(i: usize) -> u64 {
    if i < EXACT as usize {
        return i as u64;
    }
    let i = i - EXACT as usize;
    let e = (i / SUB as usize) as u32 + 6;
    let top = (i % SUB as usize) as u64 + SUB;
    let width = 1u64 << (e - SUB_BITS);
    (top << (e - SUB_BITS)) + width / 2
}

impl Histogram {
    pub fn record(&mut self, nanos: u64) {
        self.counts[index(nanos)] += 1;
        self.count += 1;
        self.max = self.max.max(nanos);
        self.sum += nanos as u128;
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.count += other.count;
        self.max = self.max.max(other.max);
        self.sum += other.sum;
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    /// The share of values above `nanos` (within a bucket's 3%); 0 when empty.
    pub fn share_above(&self, nanos: u64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let above: u64 = self.counts[index(nanos) + 1..].iter().sum();
        above as f64 / self.count as f64
    }

    /// The value at quantile `q` (0..=1), in nanoseconds; 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return value_at(i).min(self.max);
            }
        }
        self.max
    }
}

/// Median of a list of figures (the mean of the middle two for even counts).
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Tracks `seq` continuity of one socket: every seq must be the previous + 1.
#[derive(Default, Clone, Copy)]
pub struct SeqCheck {
    last: Option<u64>,
    /// Missing seqs plus duplicated or out-of-order ones.
    pub gaps: u64,
}

impl SeqCheck {
    pub fn starting_after(last: u64) -> Self {
        SeqCheck {
            last: Some(last),
            gaps: 0,
        }
    }

    pub fn see(&mut self, seq: u64) {
        match self.last {
            Some(last) if seq == last + 1 => {}
            Some(last) if seq > last => self.gaps += seq - last - 1,
            Some(_) => self.gaps += 1,
            None => {}
        }
        self.last = Some(self.last.map_or(seq, |l| l.max(seq)));
    }

    pub fn last(&self) -> u64 {
        self.last.unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_three_percent() {
        let mut h = Histogram::default();
        for v in 1..=100_000u64 {
            h.record(v * 1000);
        }
        for q in [0.5, 0.9, 0.99] {
            let want = q * 100_000_000.0;
            let got = h.quantile(q) as f64;
            assert!((got - want).abs() / want < 0.03, "q{q}: {got} vs {want}");
        }
        assert_eq!(h.max(), 100_000_000);
    }

    #[test]
    fn share_above_counts_the_values_past_a_bound() {
        let mut h = Histogram::default();
        assert_eq!(h.share_above(1_000_000), 0.0);
        for v in 1..=1_000u64 {
            h.record(v * 10_000);
        }
        // 10 us .. 10 ms: a quarter of the values are above 7.5 ms.
        let share = h.share_above(7_500_000);
        assert!((share - 0.25).abs() < 0.03, "{share}");
    }

    #[test]
    fn seq_gaps() {
        let mut s = SeqCheck::starting_after(0);
        for q in [1, 2, 3, 5, 6, 6, 7] {
            s.see(q);
        }
        assert_eq!(s.gaps, 2);
    }
}
