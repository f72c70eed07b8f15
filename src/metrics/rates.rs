//! Per-second rates between two readings of the registry's monotonic totals.
//!
//! The clock is whatever `Instant` the caller passes, so tests drive it with synthetic instants.

use std::time::Instant;

/// Registry-wide monotonic totals (sums over every pool and cache).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub pool_gets: u64,
    pub pool_successful_gets: u64,
    pub pool_timeouts: u64,
    pub pool_rejected: u64,
    pub pool_errors: u64,
    pub pool_queries: u64,
    pub pool_created: u64,
    pub pool_destroyed: u64,
    pub pool_leaked_leases: u64,
    pub neural_allocations: u64,
    pub neural_deallocations: u64,
    pub neural_loads: u64,
    pub neural_cache_hits: u64,
    pub neural_cache_misses: u64,
    pub neural_evictions: u64,
    pub neural_expirations: u64,
    pub neural_predictions: u64,
}

/// Events per second over `interval_seconds`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    pub interval_seconds: f64,
    pub pool_gets_per_sec: f64,
    pub pool_successful_gets_per_sec: f64,
    pub pool_timeouts_per_sec: f64,
    pub pool_rejected_per_sec: f64,
    pub pool_errors_per_sec: f64,
    pub pool_queries_per_sec: f64,
    pub pool_created_per_sec: f64,
    pub pool_destroyed_per_sec: f64,
    pub pool_leaked_leases_per_sec: f64,
    pub neural_allocations_per_sec: f64,
    pub neural_deallocations_per_sec: f64,
    pub neural_loads_per_sec: f64,
    pub neural_cache_hits_per_sec: f64,
    pub neural_cache_misses_per_sec: f64,
    pub neural_evictions_per_sec: f64,
    pub neural_expirations_per_sec: f64,
    pub neural_predictions_per_sec: f64,
}

/// Remembers the previous reading; each [`observe`](RateTracker::observe) returns the rates since
/// it and becomes the new previous reading.
#[derive(Debug, Clone)]
pub struct RateTracker {
    last_at: Instant,
    last: Totals,
}

impl RateTracker {
    pub fn new(at: Instant, totals: Totals) -> Self {
        RateTracker {
            last_at: at,
            last: totals,
        }
    }

    /// Rates since the previous reading (or since `new` / `rebase`). A zero-length interval gives
    /// zero rates rather than infinities.
    pub fn observe(&mut self, now: Instant, totals: Totals) -> Rates {
        let elapsed = now.saturating_duration_since(self.last_at).as_secs_f64();
        let rates = rates_between(&self.last, &totals, elapsed);
        self.last_at = now;
        self.last = totals;
        rates
    }

    /// Makes `totals` at `at` the new previous reading (what `reset()` does).
    pub fn rebase(&mut self, at: Instant, totals: Totals) {
        self.last_at = at;
        self.last = totals;
    }
}

fn rates_between(prev: &Totals, cur: &Totals, seconds: f64) -> Rates {
    let per_sec = |a: u64, b: u64| {
        if seconds > 0.0 {
            b.saturating_sub(a) as f64 / seconds
        } else {
            0.0
        }
    };
    Rates {
        interval_seconds: seconds,
        pool_gets_per_sec: per_sec(prev.pool_gets, cur.pool_gets),
        pool_successful_gets_per_sec: per_sec(prev.pool_successful_gets, cur.pool_successful_gets),
        pool_timeouts_per_sec: per_sec(prev.pool_timeouts, cur.pool_timeouts),
        pool_rejected_per_sec: per_sec(prev.pool_rejected, cur.pool_rejected),
        pool_errors_per_sec: per_sec(prev.pool_errors, cur.pool_errors),
        pool_queries_per_sec: per_sec(prev.pool_queries, cur.pool_queries),
        pool_created_per_sec: per_sec(prev.pool_created, cur.pool_created),
        pool_destroyed_per_sec: per_sec(prev.pool_destroyed, cur.pool_destroyed),
        pool_leaked_leases_per_sec: per_sec(prev.pool_leaked_leases, cur.pool_leaked_leases),
        neural_allocations_per_sec: per_sec(prev.neural_allocations, cur.neural_allocations),
        neural_deallocations_per_sec: per_sec(prev.neural_deallocations, cur.neural_deallocations),
        neural_loads_per_sec: per_sec(prev.neural_loads, cur.neural_loads),
        neural_cache_hits_per_sec: per_sec(prev.neural_cache_hits, cur.neural_cache_hits),
        neural_cache_misses_per_sec: per_sec(prev.neural_cache_misses, cur.neural_cache_misses),
        neural_evictions_per_sec: per_sec(prev.neural_evictions, cur.neural_evictions),
        neural_expirations_per_sec: per_sec(prev.neural_expirations, cur.neural_expirations),
        neural_predictions_per_sec: per_sec(prev.neural_predictions, cur.neural_predictions),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rates_are_deltas_over_the_injected_interval() {
        let t0 = Instant::now();
        let mut tracker = RateTracker::new(t0, Totals::default());
        let after_two_secs = Totals {
            pool_gets: 200,
            pool_timeouts: 4,
            neural_allocations: 10,
            neural_deallocations: 6,
            ..Totals::default()
        };
        let r = tracker.observe(t0 + Duration::from_secs(2), after_two_secs);
        assert_eq!(r.interval_seconds, 2.0);
        assert_eq!(r.pool_gets_per_sec, 100.0);
        assert_eq!(r.pool_timeouts_per_sec, 2.0);
        assert_eq!(r.neural_allocations_per_sec, 5.0);
        assert_eq!(r.neural_deallocations_per_sec, 3.0);

        // Second call: only what happened since the first.
        let later = Totals {
            pool_gets: 250,
            ..after_two_secs
        };
        let r = tracker.observe(t0 + Duration::from_millis(2500), later);
        assert_eq!(r.pool_gets_per_sec, 100.0);
        assert_eq!(r.pool_timeouts_per_sec, 0.0);
    }

    #[test]
    fn zero_interval_gives_zero_not_infinity_and_rebase_restarts() {
        let t0 = Instant::now();
        let mut tracker = RateTracker::new(t0, Totals::default());
        let totals = Totals {
            pool_gets: 5,
            ..Totals::default()
        };
        assert_eq!(tracker.observe(t0, totals).pool_gets_per_sec, 0.0);
        tracker.rebase(
            t0 + Duration::from_secs(10),
            Totals {
                pool_gets: 1000,
                ..Totals::default()
            },
        );
        let r = tracker.observe(
            t0 + Duration::from_secs(20),
            Totals {
                pool_gets: 1010,
                ..Totals::default()
            },
        );
        assert_eq!(r.pool_gets_per_sec, 1.0);
    }
}
