//! Latency histograms: HDR percentiles (microsecond resolution, exact max) for snapshots, and
//! fixed cumulative-bucket counts, sum and count for Prometheus exposition.
//!
//! The two views answer different questions and have different lifetimes. Percentiles cover the
//! window since the last [`LatencyHistogram::reset`] (what `snapshot()` shows after
//! `Metrics.reset()`); the exposition buckets, sum and count are monotonic for the life of the
//! process, as Prometheus requires. Both are updated under one lock per recorded event, and the
//! exposition never walks the HDR counts array, so rendering stays cheap with thousands of series.

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use std::time::Duration;

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

/// Upper bounds (inclusive, microseconds) of the exposition buckets: 100 µs to 60 s, the range
/// where acquire, query, load and predict latencies live. `+Inf` is implied after the last.
pub const BUCKET_BOUNDS_MICROS: [u64; 18] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000, 60_000_000,
];

/// Number of buckets including `+Inf`.
pub const BUCKETS: usize = BUCKET_BOUNDS_MICROS.len() + 1;

/// The monotonic view used by exposition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketCounts {
    /// Cumulative counts per bound of [`BUCKET_BOUNDS_MICROS`], then `+Inf` (= `count`).
    pub cumulative: [u64; BUCKETS],
    pub count: u64,
    pub sum_micros: u64,
}

/// A thread-safe latency histogram recording microseconds from 1 µs to one hour.
pub struct LatencyHistogram {
    inner: Mutex<Inner>,
    significant_digits: u8,
}

struct Inner {
    /// Allocated on first record: an idle series costs a few hundred bytes, not the HDR array.
    hdr: Option<Histogram<u64>>,
    /// Exact maximum since the last reset, in microseconds.
    window_max: u64,
    /// Non-cumulative counts per bucket, monotonic.
    buckets: [u64; BUCKETS],
    count: u64,
    sum_micros: u64,
}

const MAX_MICROS: u64 = 3_600_000_000;

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    /// Three significant digits (0.1 % error): pool and cache-wide series.
    pub fn new() -> Self {
        Self::with_precision(3)
    }

    /// Two significant digits (1 % error, ~7× smaller): per-model series, of which there may be
    /// thousands.
    pub fn compact() -> Self {
        Self::with_precision(2)
    }

    fn with_precision(significant_digits: u8) -> Self {
        LatencyHistogram {
            inner: Mutex::new(Inner {
                hdr: None,
                window_max: 0,
                buckets: [0; BUCKETS],
                count: 0,
                sum_micros: 0,
            }),
            significant_digits,
        }
    }

    pub fn record(&self, elapsed: Duration) {
        self.record_micros(u64::try_from(elapsed.as_micros()).unwrap_or(MAX_MICROS));
    }

    /// Records one latency given in microseconds (clamped to 1 µs ..= 1 h).
    pub fn record_micros(&self, micros: u64) {
        let micros = micros.clamp(1, MAX_MICROS);
        let bucket = BUCKET_BOUNDS_MICROS.partition_point(|&bound| bound < micros);
        let mut inner = self.inner.lock();
        let digits = self.significant_digits;
        inner
            .hdr
            .get_or_insert_with(|| {
                Histogram::new_with_bounds(1, MAX_MICROS, digits)
                    .expect("static histogram bounds are valid")
            })
            .saturating_record(micros);
        inner.window_max = inner.window_max.max(micros);
        inner.buckets[bucket] += 1;
        inner.count += 1;
        inner.sum_micros = inner.sum_micros.saturating_add(micros);
    }

    /// Events recorded over the life of the histogram (not affected by [`reset`](Self::reset)).
    pub fn count(&self) -> u64 {
        self.inner.lock().count
    }

    /// Percentiles over the window since the last reset; the max is exact.
    pub fn percentiles(&self) -> Percentiles {
        let inner = self.inner.lock();
        let Some(h) = inner.hdr.as_ref().filter(|h| !h.is_empty()) else {
            return Percentiles::default();
        };
        let ms = |v: u64| v as f64 / 1000.0;
        let max = inner.window_max;
        Percentiles {
            p50: ms(h.value_at_quantile(0.50).min(max)),
            p90: ms(h.value_at_quantile(0.90).min(max)),
            p95: ms(h.value_at_quantile(0.95).min(max)),
            p99: ms(h.value_at_quantile(0.99).min(max)),
            max: ms(max),
        }
    }

    /// Monotonic cumulative buckets, count and sum for exposition.
    pub fn buckets(&self) -> BucketCounts {
        let inner = self.inner.lock();
        let mut cumulative = [0u64; BUCKETS];
        let mut running = 0;
        for (slot, n) in cumulative.iter_mut().zip(inner.buckets.iter()) {
            running += n;
            *slot = running;
        }
        BucketCounts {
            cumulative,
            count: inner.count,
            sum_micros: inner.sum_micros,
        }
    }

    /// A copy of the HDR histogram of the current window (empty if nothing was recorded).
    pub fn snapshot(&self) -> Histogram<u64> {
        let inner = self.inner.lock();
        match &inner.hdr {
            Some(h) => h.clone(),
            None => Histogram::new_with_bounds(1, MAX_MICROS, self.significant_digits)
                .expect("static histogram bounds are valid"),
        }
    }

    /// Starts a new percentile window. Exposition buckets, sum and count stay monotonic.
    pub fn reset(&self) {
        let mut inner = self.inner.lock();
        if let Some(h) = inner.hdr.as_mut() {
            h.reset();
        }
        inner.window_max = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_in_milliseconds_with_exact_max() {
        let h = LatencyHistogram::new();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        h.record(Duration::from_micros(123_457));
        let p = h.percentiles();
        assert!((p.p50 - 0.5).abs() < 0.01, "{p:?}");
        assert!((p.p99 - 0.99).abs() < 0.01, "{p:?}");
        assert_eq!(p.max, 123.457, "{p:?}");
        assert_eq!(h.count(), 1001);
    }

    #[test]
    fn buckets_are_cumulative_and_survive_reset() {
        let h = LatencyHistogram::compact();
        h.record_micros(50); // <= 100 µs
        h.record_micros(100); // <= 100 µs (bounds are inclusive)
        h.record_micros(101); // <= 250 µs
        h.record_micros(7_200_000_000); // clamped to 1 h: +Inf only
        let b = h.buckets();
        assert_eq!(b.cumulative[0], 2);
        assert_eq!(b.cumulative[1], 3);
        assert_eq!(b.cumulative[BUCKETS - 2], 3);
        assert_eq!(b.cumulative[BUCKETS - 1], 4);
        assert_eq!(b.count, 4);
        assert_eq!(b.sum_micros, 50 + 100 + 101 + MAX_MICROS);

        h.reset();
        assert_eq!(h.percentiles(), Percentiles::default());
        assert_eq!(h.buckets(), b, "exposition stays monotonic across reset");
        h.record_micros(2_000);
        assert_eq!(h.percentiles().max, 2.0);
        assert_eq!(h.buckets().count, 5);
    }

    #[test]
    fn idle_histograms_allocate_nothing_and_report_zero() {
        let h = LatencyHistogram::new();
        assert!(h.inner.lock().hdr.is_none());
        assert_eq!(h.percentiles(), Percentiles::default());
        assert_eq!(h.snapshot().len(), 0);
    }
}
