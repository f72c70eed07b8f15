//! What recording costs, measured inside Rust on a private registry (for `npm run bench:metrics`;
//! a JavaScript loop would measure the call into the addon, not the recording).

use std::hint::black_box;
use std::time::{Duration, Instant};

use super::Registry;

/// Nanoseconds per recorded event.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecordingCost {
    pub events: u64,
    /// One counter increment.
    pub counter_ns: f64,
    /// One latency recorded into a histogram.
    pub histogram_ns: f64,
    /// Everything one `pool.query` records (acquire: 2 counters + 1 histogram; query: 1 counter +
    /// 1 histogram; release: 1 histogram).
    pub pool_query_ns: f64,
    /// The same with two threads recording into the same pool at once (per event, per thread).
    pub pool_query_contended_ns: f64,
}

/// Records `events` events of each kind and times them.
pub fn measure(events: u64) -> RecordingCost {
    let events = events.max(1);
    let registry = Registry::new();
    let pool = registry.register_pool("bench", "sqlite");
    let per_event = |elapsed: Duration| elapsed.as_nanos() as f64 / events as f64;

    let started = Instant::now();
    for _ in 0..events {
        black_box(&pool.gets).inc();
    }
    let counter_ns = per_event(started.elapsed());

    let started = Instant::now();
    for i in 0..events {
        pool.acquire_latency
            .record_micros(black_box(100 + (i & 1023)));
    }
    let histogram_ns = per_event(started.elapsed());

    let pool_query = || {
        for i in 0..events {
            let us = 50 + (i & 4095);
            pool.gets.inc();
            pool.successful_gets.inc();
            pool.acquire_latency.record_micros(us);
            pool.queries.inc();
            pool.query_latency.record_micros(us * 2);
            pool.usage_latency.record_micros(us * 3);
        }
    };
    let started = Instant::now();
    pool_query();
    let pool_query_ns = per_event(started.elapsed());

    let started = Instant::now();
    std::thread::scope(|s| {
        s.spawn(pool_query);
        s.spawn(pool_query);
    });
    let pool_query_contended_ns = per_event(started.elapsed());

    RecordingCost {
        events,
        counter_ns,
        histogram_ns,
        pool_query_ns,
        pool_query_contended_ns,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_every_kind_of_event() {
        let cost = measure(1000);
        assert_eq!(cost.events, 1000);
        assert!(cost.counter_ns > 0.0 && cost.histogram_ns > 0.0);
        assert!(cost.pool_query_ns > 0.0 && cost.pool_query_contended_ns > 0.0);
    }
}
