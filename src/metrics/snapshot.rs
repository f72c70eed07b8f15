//! One whole snapshot of the registry: the seed's `SystemMetrics` / `MetricsSnapshot` fields plus
//! per-pool, per-cache, per-model and process detail.
//!
//! Counters in a snapshot count from the last `reset()` (baseline offsets: the recorders
//! themselves never go down, so Prometheus still sees monotonic counters). Gauges (sizes, bytes)
//! are current values.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use super::histogram::Percentiles;
use super::process::{AlertLevel, GrowthReport, ProcessSample};
use super::{CacheRecorder, ModelRecorder, PoolGauges, PoolRecorder, Registry};

const MIB: f64 = 1024.0 * 1024.0;

/// A pool's counters at one moment (or their increase since a baseline).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolCounts {
    pub gets: u64,
    pub successful_gets: u64,
    pub timeouts_wait: u64,
    pub timeouts_connect: u64,
    pub timeouts_validate: u64,
    pub rejected: u64,
    pub errors_connect: u64,
    pub errors_query: u64,
    pub created: u64,
    pub recycled: u64,
    pub destroyed: u64,
    pub leaked_leases: u64,
    pub queries: u64,
}

impl PoolCounts {
    pub fn read(p: &PoolRecorder) -> Self {
        PoolCounts {
            gets: p.gets.get(),
            successful_gets: p.successful_gets.get(),
            timeouts_wait: p.timeouts_wait.get(),
            timeouts_connect: p.timeouts_connect.get(),
            timeouts_validate: p.timeouts_validate.get(),
            rejected: p.rejected.get(),
            errors_connect: p.errors_connect.get(),
            errors_query: p.errors_query.get(),
            created: p.created.get(),
            recycled: p.recycled.get(),
            destroyed: p.destroyed.get(),
            leaked_leases: p.leaked_leases.get(),
            queries: p.queries.get(),
        }
    }

    /// The increase since `base`.
    pub fn since(&self, base: &Self) -> Self {
        PoolCounts {
            gets: self.gets.saturating_sub(base.gets),
            successful_gets: self.successful_gets.saturating_sub(base.successful_gets),
            timeouts_wait: self.timeouts_wait.saturating_sub(base.timeouts_wait),
            timeouts_connect: self.timeouts_connect.saturating_sub(base.timeouts_connect),
            timeouts_validate: self
                .timeouts_validate
                .saturating_sub(base.timeouts_validate),
            rejected: self.rejected.saturating_sub(base.rejected),
            errors_connect: self.errors_connect.saturating_sub(base.errors_connect),
            errors_query: self.errors_query.saturating_sub(base.errors_query),
            created: self.created.saturating_sub(base.created),
            recycled: self.recycled.saturating_sub(base.recycled),
            destroyed: self.destroyed.saturating_sub(base.destroyed),
            leaked_leases: self.leaked_leases.saturating_sub(base.leaked_leases),
            queries: self.queries.saturating_sub(base.queries),
        }
    }

    pub fn timeouts(&self) -> u64 {
        self.timeouts_wait + self.timeouts_connect + self.timeouts_validate
    }

    pub fn errors(&self) -> u64 {
        self.errors_connect + self.errors_query
    }
}

/// A model cache's counters at one moment (or their increase since a baseline).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheCounts {
    pub loads: u64,
    pub load_failures: u64,
    pub hits: u64,
    pub misses: u64,
    pub evictions_count: u64,
    pub evictions_bytes: u64,
    pub evictions_explicit: u64,
    pub expirations: u64,
    pub allocations: u64,
    pub deallocations: u64,
}

impl CacheCounts {
    pub fn read(c: &CacheRecorder) -> Self {
        CacheCounts {
            loads: c.loads.get(),
            load_failures: c.load_failures.get(),
            hits: c.hits.get(),
            misses: c.misses.get(),
            evictions_count: c.evictions_count.get(),
            evictions_bytes: c.evictions_bytes.get(),
            evictions_explicit: c.evictions_explicit.get(),
            expirations: c.expirations.get(),
            allocations: c.allocations.get(),
            deallocations: c.deallocations.get(),
        }
    }

    pub fn since(&self, base: &Self) -> Self {
        CacheCounts {
            loads: self.loads.saturating_sub(base.loads),
            load_failures: self.load_failures.saturating_sub(base.load_failures),
            hits: self.hits.saturating_sub(base.hits),
            misses: self.misses.saturating_sub(base.misses),
            evictions_count: self.evictions_count.saturating_sub(base.evictions_count),
            evictions_bytes: self.evictions_bytes.saturating_sub(base.evictions_bytes),
            evictions_explicit: self
                .evictions_explicit
                .saturating_sub(base.evictions_explicit),
            expirations: self.expirations.saturating_sub(base.expirations),
            allocations: self.allocations.saturating_sub(base.allocations),
            deallocations: self.deallocations.saturating_sub(base.deallocations),
        }
    }

    /// LRU and explicit evictions (expirations are counted apart).
    pub fn evictions(&self) -> u64 {
        self.evictions_count + self.evictions_bytes + self.evictions_explicit
    }
}

/// Counter values captured by `reset()`; snapshots subtract them.
#[derive(Debug, Clone, Default)]
pub struct Baseline {
    pub pools: HashMap<String, PoolCounts>,
    pub caches: HashMap<String, CacheCounts>,
    /// Keyed by (cache, model).
    pub predicts: HashMap<(String, String), u64>,
}

impl Baseline {
    /// The current counter values of every recorder in `registry`.
    pub fn capture(registry: &Registry) -> Self {
        let mut b = Baseline::default();
        for p in registry.pools() {
            b.pools.insert(p.name.clone(), PoolCounts::read(&p));
        }
        for c in registry.caches() {
            b.caches.insert(c.name.clone(), CacheCounts::read(&c));
            for m in c.models() {
                b.predicts
                    .insert((c.name.clone(), m.name.clone()), m.predicts.get());
            }
        }
        b
    }
}

/// One pool in a snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSnapshot {
    pub name: String,
    pub backend: &'static str,
    pub gauges: PoolGauges,
    /// In use as a percentage of `max_size` (0 when the pool reports no maximum).
    pub utilization_percent: f64,
    /// Counts since the last reset.
    pub counts: PoolCounts,
    /// Successful acquires / acquires since the last reset; 1 when nothing was asked.
    pub success_rate: f64,
    pub acquire: Percentiles,
    pub usage: Percentiles,
    pub query: Percentiles,
}

impl PoolSnapshot {
    fn build(p: &PoolRecorder, base: Option<&PoolCounts>) -> Self {
        let gauges = p.gauges();
        let now = PoolCounts::read(p);
        let counts = base.map_or(now, |b| now.since(b));
        PoolSnapshot {
            name: p.name.clone(),
            backend: p.backend,
            gauges,
            utilization_percent: ratio(gauges.in_use, gauges.max_size).map_or(0.0, |r| r * 100.0),
            counts,
            success_rate: ratio(counts.successful_gets, counts.gets).unwrap_or(1.0),
            acquire: p.acquire_latency.percentiles(),
            usage: p.usage_latency.percentiles(),
            query: p.query_latency.percentiles(),
        }
    }
}

/// One model cache in a snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheSnapshot {
    pub name: String,
    pub models: i64,
    pub host_bytes: i64,
    pub gpu_bytes: i64,
    /// Counts since the last reset.
    pub counts: CacheCounts,
    /// Hits / lookups since the last reset; 0 when nothing was looked up.
    pub hit_rate: f64,
    pub load: Percentiles,
    pub predict: Percentiles,
}

/// One model in a snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSnapshot {
    pub cache: String,
    pub name: String,
    pub device: String,
    /// Predictions since the last reset.
    pub predicts: u64,
    pub host_bytes: i64,
    pub gpu_bytes: i64,
    pub predict: Percentiles,
}

impl ModelSnapshot {
    fn build(cache: &str, m: &ModelRecorder, base: Option<&u64>) -> Self {
        ModelSnapshot {
            cache: cache.to_string(),
            name: m.name.clone(),
            device: m.device.read().clone(),
            predicts: m.predicts.get().saturating_sub(base.copied().unwrap_or(0)),
            host_bytes: m.host_bytes.get(),
            gpu_bytes: m.gpu_bytes.get(),
            predict: m.predict_latency.percentiles(),
        }
    }
}

/// The process in a snapshot: one reading plus its alert levels and growth verdicts.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessSnapshot {
    pub sample: ProcessSample,
    pub memory_percent: Option<f64>,
    pub fd_percent: Option<f64>,
    pub memory_level: AlertLevel,
    pub fd_level: AlertLevel,
    pub memory_growth: GrowthReport,
    pub fd_growth: GrowthReport,
}

/// The whole registry at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    // The seed's SystemMetrics counters (since the last reset) …
    pub pool_gets: u64,
    pub pool_timeouts: u64,
    pub pool_errors: u64,
    pub neural_allocations: u64,
    pub neural_deallocations: u64,
    /// Host + GPU bytes held by every cache now (a gauge, not reset).
    pub neural_memory_bytes: u64,
    pub neural_cache_hits: u64,
    pub neural_cache_misses: u64,
    // … and its MetricsSnapshot ratios.
    /// Successful acquires / acquires across pools; 1 when nothing was asked.
    pub pool_success_rate: f64,
    pub neural_memory_mb: f64,
    /// Hits / lookups across caches; 0 when nothing was looked up.
    pub neural_cache_hit_rate: f64,
    /// Seconds since the registry was created.
    pub uptime_seconds: f64,
    /// Seconds since the last reset (equals uptime before the first).
    pub seconds_since_reset: f64,
    pub pools: Vec<PoolSnapshot>,
    pub caches: Vec<CacheSnapshot>,
    pub models: Vec<ModelSnapshot>,
    /// Live leases and model handles tracked for the leak report.
    pub live_resources: usize,
    pub process: Option<ProcessSnapshot>,
}

/// `part / whole`, `None` when `whole` is zero.
pub(crate) fn ratio(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

impl Registry {
    /// One snapshot of everything, counters since the last [`reset`](Registry::reset).
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot_at(Instant::now(), true)
    }

    /// A snapshot at `now`; `with_process` reads `/proc` and feeds the growth detectors.
    pub fn snapshot_at(&self, now: Instant, with_process: bool) -> Snapshot {
        let (baseline, reset_at) = {
            let state = self.state.lock();
            (Arc::clone(&state.baseline), state.reset_at)
        };
        let pools: Vec<PoolSnapshot> = self
            .pools()
            .iter()
            .map(|p| PoolSnapshot::build(p, baseline.pools.get(&p.name)))
            .collect();
        let mut caches = Vec::new();
        let mut models = Vec::new();
        for c in self.caches() {
            let now_counts = CacheCounts::read(&c);
            let counts = baseline
                .caches
                .get(&c.name)
                .map_or(now_counts, |b| now_counts.since(b));
            for m in c.models() {
                let key = (c.name.clone(), m.name.clone());
                models.push(ModelSnapshot::build(
                    &c.name,
                    &m,
                    baseline.predicts.get(&key),
                ));
            }
            caches.push(CacheSnapshot {
                name: c.name.clone(),
                models: c.models.get(),
                host_bytes: c.host_bytes.get(),
                gpu_bytes: c.gpu_bytes.get(),
                counts,
                hit_rate: ratio(counts.hits, counts.hits + counts.misses).unwrap_or(0.0),
                load: c.load_latency.percentiles(),
                predict: c.predict_latency.percentiles(),
            });
        }

        let pool_gets = pools.iter().map(|p| p.counts.gets).sum();
        let pool_successful: u64 = pools.iter().map(|p| p.counts.successful_gets).sum();
        let hits = caches.iter().map(|c| c.counts.hits).sum();
        let misses: u64 = caches.iter().map(|c| c.counts.misses).sum();
        let memory: i64 = caches
            .iter()
            .map(|c| c.host_bytes.max(0) + c.gpu_bytes.max(0))
            .sum();
        let neural_memory_bytes = u64::try_from(memory).unwrap_or(0);
        Snapshot {
            pool_gets,
            pool_timeouts: pools.iter().map(|p| p.counts.timeouts()).sum(),
            pool_errors: pools.iter().map(|p| p.counts.errors()).sum(),
            neural_allocations: caches.iter().map(|c| c.counts.allocations).sum(),
            neural_deallocations: caches.iter().map(|c| c.counts.deallocations).sum(),
            neural_memory_bytes,
            neural_cache_hits: hits,
            neural_cache_misses: misses,
            pool_success_rate: ratio(pool_successful, pool_gets).unwrap_or(1.0),
            neural_memory_mb: neural_memory_bytes as f64 / MIB,
            neural_cache_hit_rate: ratio(hits, hits + misses).unwrap_or(0.0),
            uptime_seconds: now.saturating_duration_since(self.started).as_secs_f64(),
            seconds_since_reset: now.saturating_duration_since(reset_at).as_secs_f64(),
            pools,
            caches,
            models,
            live_resources: self.live.len(),
            process: if with_process {
                self.process_at(now)
            } else {
                None
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn seed_fields_add_up_across_pools_and_caches() {
        let reg = Registry::new();
        let a = reg.register_pool("orders", "sqlite");
        let b = reg.register_pool("quotes", "postgres");
        a.gets.add(10);
        a.successful_gets.add(9);
        a.timeouts_wait.inc();
        b.gets.add(10);
        b.successful_gets.add(10);
        b.errors_query.add(2);
        a.acquire_latency.record(Duration::from_millis(3));
        a.set_gauges(|| {
            Some(PoolGauges {
                max_size: 4,
                size: 3,
                idle: 1,
                in_use: 2,
                waiting: 0,
            })
        });
        let c = reg.register_cache("default");
        c.hits.add(3);
        c.misses.add(1);
        c.allocations.add(5);
        c.deallocations.add(2);
        c.host_bytes.add(3 * 1024 * 1024);
        c.gpu_bytes.add(1024 * 1024);
        c.model("btc").predicts.add(7);

        let s = reg.snapshot_at(Instant::now(), false);
        assert_eq!(s.pool_gets, 20);
        assert_eq!(s.pool_timeouts, 1);
        assert_eq!(s.pool_errors, 2);
        assert_eq!(s.pool_success_rate, 19.0 / 20.0);
        assert_eq!(s.neural_allocations, 5);
        assert_eq!(s.neural_deallocations, 2);
        assert_eq!(s.neural_memory_bytes, 4 * 1024 * 1024);
        assert_eq!(s.neural_memory_mb, 4.0);
        assert_eq!(s.neural_cache_hits, 3);
        assert_eq!(s.neural_cache_misses, 1);
        assert_eq!(s.neural_cache_hit_rate, 0.75);
        assert_eq!(s.pools[0].utilization_percent, 50.0);
        assert_eq!(s.pools[0].acquire.max, 3.0);
        assert_eq!(s.models[0].predicts, 7);
        assert_eq!(s.models[0].cache, "default");
        assert!(s.process.is_none());
    }

    #[test]
    fn empty_registry_has_neutral_ratios() {
        let s = Registry::new().snapshot_at(Instant::now(), false);
        assert_eq!(s.pool_success_rate, 1.0);
        assert_eq!(s.neural_cache_hit_rate, 0.0);
        assert!(s.pools.is_empty());
    }
}
