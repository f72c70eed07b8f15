//! How long a model's forward pass takes, per batch size: what decides whether `predict` may
//! run it on the calling thread. One moving average per power-of-two batch bucket, each kept as
//! the time of the bucket's largest batch (a measured time is scaled up by `top / batch`), so
//! the estimate for any batch in a bucket is an upper estimate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Buckets 1, 2, 3–4, 5–8, … up to 2³¹; larger batches are never estimated.
const BUCKETS: usize = 32;

/// Weight of a new measurement: 1/8, so one preempted run moves the average by an eighth.
const SHIFT: u32 = 3;

/// Per-bucket moving averages of the forward time, in nanoseconds; 0 means not yet measured.
#[derive(Debug)]
pub struct ForwardTimes {
    buckets: [AtomicU64; BUCKETS],
}

impl Default for ForwardTimes {
    fn default() -> Self {
        ForwardTimes {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// The bucket of `batch` and that bucket's largest batch.
fn bucket(batch: usize) -> Option<(usize, u64)> {
    let top = batch.max(1).checked_next_power_of_two()?;
    let index = top.trailing_zeros() as usize;
    (index < BUCKETS).then_some((index, top as u64))
}

impl ForwardTimes {
    /// Records one forward pass of `batch` samples that took `elapsed`.
    pub fn record(&self, batch: usize, elapsed: Duration) {
        let Some((index, top)) = bucket(batch) else {
            return;
        };
        let nanos = elapsed.as_nanos().min(u128::from(u64::MAX >> 8)) as u64;
        let scaled = nanos.saturating_mul(top) / batch.max(1) as u64;
        let slot = &self.buckets[index];
        // Relaxed read-modify-write: a lost update between racing calls only drops a sample.
        let old = slot.load(Ordering::Relaxed);
        let new = if old == 0 {
            scaled.max(1)
        } else {
            (old - (old >> SHIFT) + (scaled >> SHIFT)).max(1)
        };
        slot.store(new, Ordering::Relaxed);
    }

    /// The estimated forward time at `batch`, once that bucket has been measured.
    pub fn estimate(&self, batch: usize) -> Option<Duration> {
        let (index, _) = bucket(batch)?;
        match self.buckets[index].load(Ordering::Relaxed) {
            0 => None,
            nanos => Some(Duration::from_nanos(nanos)),
        }
    }

    /// True when the estimate at `batch` is known and under `bound`.
    pub fn under(&self, batch: usize, bound: Duration) -> bool {
        self.estimate(batch).is_some_and(|t| t < bound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn unknown_until_measured_and_per_bucket() {
        let t = ForwardTimes::default();
        assert!(
            !t.under(1, 20 * US),
            "the first call at a batch size is measured, not guessed"
        );
        t.record(1, 5 * US);
        assert!(t.under(1, 20 * US));
        assert!(!t.under(2, 20 * US), "batch 2 is another bucket");
        assert_eq!(t.estimate(usize::MAX), None);
    }

    #[test]
    fn a_bucket_holds_the_time_of_its_largest_batch() {
        let t = ForwardTimes::default();
        t.record(5, 10 * US); // bucket 5..=8: scaled to batch 8
        assert_eq!(t.estimate(8), Some(16 * US));
        assert_eq!(t.estimate(6), Some(16 * US));
        assert!(!t.under(7, 15 * US));
    }

    #[test]
    fn one_slow_run_moves_the_average_by_an_eighth_and_a_slow_model_stays_slow() {
        let t = ForwardTimes::default();
        t.record(1, 4 * US);
        t.record(1, 100 * US); // a preempted run
        assert!(t.under(1, 20 * US), "{:?}", t.estimate(1));
        for _ in 0..40 {
            t.record(1, 30 * US);
        }
        assert!(!t.under(1, 20 * US), "{:?}", t.estimate(1));
        for _ in 0..40 {
            t.record(1, 3 * US);
        }
        assert!(t.under(1, 5 * US), "{:?}", t.estimate(1));
    }
}
