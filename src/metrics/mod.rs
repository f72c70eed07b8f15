//! One registry that pools and model caches report into. Knows nothing of pools or
//! models themselves: they hold recorders and push events; gauges are read through
//! callbacks they install.

pub mod cost;
pub mod exposition;
pub mod health;
pub mod histogram;
pub mod leaks;
pub mod process;
pub mod rates;
pub mod snapshot;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

pub use exposition::{ExpositionFormat, ExpositionOptions};
pub use health::{Check, Health, HealthStatus};
pub use histogram::{LatencyHistogram, Percentiles};
pub use leaks::{LiveResource, LiveSet, LiveToken};
pub use process::{
    AlertLevel, AlertThresholds, GrowthConfig, GrowthDetector, GrowthReport, ProcessSample,
    Thresholds,
};
pub use rates::{RateTracker, Rates, Totals};
pub use snapshot::{
    Baseline, CacheSnapshot, ModelSnapshot, PoolSnapshot, ProcessSnapshot, Snapshot,
};

/// A monotonic counter.
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (bytes held, for example).
#[derive(Default, Debug)]
pub struct Gauge(AtomicI64);

impl Gauge {
    #[inline]
    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    #[inline]
    pub fn set(&self, n: i64) {
        self.0.store(n, Ordering::Relaxed);
    }
    #[inline]
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Point-in-time occupancy a pool reports when asked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolGauges {
    pub max_size: u64,
    pub size: u64,
    pub idle: u64,
    pub in_use: u64,
    pub waiting: u64,
}

type GaugeFn = Box<dyn Fn() -> Option<PoolGauges> + Send + Sync>;

/// Everything one connection pool reports. Counters are monotonic for the life of the process.
pub struct PoolRecorder {
    pub name: String,
    /// `postgres`, `sqlite` or `redis`.
    pub backend: &'static str,
    pub gets: Counter,
    pub successful_gets: Counter,
    pub timeouts_wait: Counter,
    pub timeouts_connect: Counter,
    pub timeouts_validate: Counter,
    /// Acquires refused at once because the wait queue was full (`POOL_EXHAUSTED`).
    pub rejected: Counter,
    pub errors_connect: Counter,
    pub errors_query: Counter,
    pub created: Counter,
    pub recycled: Counter,
    pub destroyed: Counter,
    pub leaked_leases: Counter,
    /// Exceptions thrown by `listen()` callbacks.
    pub listener_errors: Counter,
    /// Statements run on the calling thread (SQLite's cheap-statement path and `querySync`).
    pub inline_statements: Counter,
    pub queries: Counter,
    pub acquire_latency: LatencyHistogram,
    pub usage_latency: LatencyHistogram,
    pub query_latency: LatencyHistogram,
    gauges: RwLock<Option<GaugeFn>>,
    pub started: Instant,
}

impl PoolRecorder {
    fn new(name: &str, backend: &'static str) -> Self {
        PoolRecorder {
            name: name.to_string(),
            backend,
            gets: Counter::default(),
            successful_gets: Counter::default(),
            timeouts_wait: Counter::default(),
            timeouts_connect: Counter::default(),
            timeouts_validate: Counter::default(),
            rejected: Counter::default(),
            errors_connect: Counter::default(),
            errors_query: Counter::default(),
            created: Counter::default(),
            recycled: Counter::default(),
            destroyed: Counter::default(),
            leaked_leases: Counter::default(),
            listener_errors: Counter::default(),
            inline_statements: Counter::default(),
            queries: Counter::default(),
            acquire_latency: LatencyHistogram::new(),
            usage_latency: LatencyHistogram::new(),
            query_latency: LatencyHistogram::new(),
            gauges: RwLock::new(None),
            started: Instant::now(),
        }
    }

    /// Installs the callback that reads the pool's occupancy; it returns `None` once the pool is gone.
    pub fn set_gauges(&self, read: impl Fn() -> Option<PoolGauges> + Send + Sync + 'static) {
        *self.gauges.write() = Some(Box::new(read));
    }

    pub fn gauges(&self) -> PoolGauges {
        self.gauges
            .read()
            .as_ref()
            .and_then(|f| f())
            .unwrap_or_default()
    }

    pub fn timeouts(&self) -> u64 {
        self.timeouts_wait.get() + self.timeouts_connect.get() + self.timeouts_validate.get()
    }

    pub fn errors(&self) -> u64 {
        self.errors_connect.get() + self.errors_query.get()
    }
}

/// Why a model left the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictionReason {
    /// LRU under the model-count bound.
    Count,
    /// LRU under the byte bound.
    Bytes,
    /// Past its TTL.
    Expired,
    /// `evict()` / `clear()`.
    Explicit,
}

/// Per-model series.
pub struct ModelRecorder {
    pub name: String,
    pub predicts: Counter,
    pub predict_latency: LatencyHistogram,
    pub host_bytes: Gauge,
    pub gpu_bytes: Gauge,
    /// `cpu` or `cuda:N`.
    pub device: RwLock<String>,
}

/// Per-model series a cache keeps before it drops those of models no longer loaded (their
/// counters restart from zero if the id is loaded again, which Prometheus reads as a reset).
/// Bounds memory when an app loads many distinct model ids over its life.
pub const MODEL_SERIES_SOFT_LIMIT: usize = 1024;

/// Everything one model cache reports.
pub struct CacheRecorder {
    pub name: String,
    pub loads: Counter,
    pub load_failures: Counter,
    pub hits: Counter,
    pub misses: Counter,
    pub evictions_count: Counter,
    pub evictions_bytes: Counter,
    pub evictions_explicit: Counter,
    /// Model handles the garbage collector collected without `release()`.
    pub collected_handles: Counter,
    pub expirations: Counter,
    /// Native buffers allocated / freed for model weights and workspaces.
    pub allocations: Counter,
    pub deallocations: Counter,
    pub host_bytes: Gauge,
    pub gpu_bytes: Gauge,
    pub models: Gauge,
    pub load_latency: LatencyHistogram,
    pub predict_latency: LatencyHistogram,
    per_model: RwLock<Vec<Arc<ModelRecorder>>>,
    /// Predictions counted by per-model series since dropped, so totals stay monotonic.
    retired_predicts: Counter,
}

impl CacheRecorder {
    fn new(name: &str) -> Self {
        CacheRecorder {
            name: name.to_string(),
            loads: Counter::default(),
            load_failures: Counter::default(),
            hits: Counter::default(),
            misses: Counter::default(),
            evictions_count: Counter::default(),
            evictions_bytes: Counter::default(),
            evictions_explicit: Counter::default(),
            collected_handles: Counter::default(),
            expirations: Counter::default(),
            allocations: Counter::default(),
            deallocations: Counter::default(),
            host_bytes: Gauge::default(),
            gpu_bytes: Gauge::default(),
            models: Gauge::default(),
            load_latency: LatencyHistogram::new(),
            predict_latency: LatencyHistogram::new(),
            per_model: RwLock::new(Vec::new()),
            retired_predicts: Counter::default(),
        }
    }

    pub fn record_eviction(&self, reason: EvictionReason) {
        match reason {
            EvictionReason::Count => self.evictions_count.inc(),
            EvictionReason::Bytes => self.evictions_bytes.inc(),
            EvictionReason::Expired => self.expirations.inc(),
            EvictionReason::Explicit => self.evictions_explicit.inc(),
        }
    }

    pub fn evictions(&self) -> u64 {
        self.evictions_count.get() + self.evictions_bytes.get() + self.evictions_explicit.get()
    }

    /// The series for one model id, created on first use and kept (counters stay monotonic).
    pub fn model(&self, name: &str) -> Arc<ModelRecorder> {
        if let Some(m) = self.per_model.read().iter().find(|m| m.name == name) {
            return Arc::clone(m);
        }
        let mut all = self.per_model.write();
        if let Some(m) = all.iter().find(|m| m.name == name) {
            return Arc::clone(m);
        }
        if all.len() >= MODEL_SERIES_SOFT_LIMIT {
            // Only this list holds the recorder of a model that is no longer loaded.
            all.retain(|m| {
                let loaded = Arc::strong_count(m) > 1;
                if !loaded {
                    self.retired_predicts.add(m.predicts.get());
                }
                loaded
            });
        }
        let m = Arc::new(ModelRecorder {
            name: name.to_string(),
            predicts: Counter::default(),
            predict_latency: LatencyHistogram::compact(),
            host_bytes: Gauge::default(),
            gpu_bytes: Gauge::default(),
            device: RwLock::new(String::from("cpu")),
        });
        all.push(Arc::clone(&m));
        m
    }

    pub fn models(&self) -> Vec<Arc<ModelRecorder>> {
        self.per_model.read().clone()
    }

    /// Every prediction the cache's models have run, including models whose series are gone.
    pub fn predicts(&self) -> u64 {
        let live: u64 = self.per_model.read().iter().map(|m| m.predicts.get()).sum();
        self.retired_predicts.get() + live
    }
}

/// The registry: every pool and cache recorder, and the live-resource set behind `leaks()`.
pub struct Registry {
    pub started: Instant,
    pools: RwLock<Vec<Arc<PoolRecorder>>>,
    caches: RwLock<Vec<Arc<CacheRecorder>>>,
    pub live: Arc<LiveSet>,
    naming: Mutex<()>,
    state: Mutex<RegistryState>,
}

/// What `reset()`, `rates()` and the process monitor remember between calls.
struct RegistryState {
    /// Shared so a snapshot takes it without copying every series' key.
    baseline: Arc<Baseline>,
    reset_at: Instant,
    rates: RateTracker,
    thresholds: AlertThresholds,
    memory_growth: GrowthDetector,
    fd_growth: GrowthDetector,
    growth_every: Duration,
    last_growth_sample: Option<Instant>,
}

/// Minimum spacing of growth-detector samples, so a hot `snapshot()` loop cannot fill the
/// window with readings a few microseconds apart.
const DEFAULT_GROWTH_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

impl Registry {
    pub fn new() -> Arc<Registry> {
        let started = Instant::now();
        Arc::new(Registry {
            started,
            pools: RwLock::new(Vec::new()),
            caches: RwLock::new(Vec::new()),
            live: Arc::new(LiveSet::default()),
            naming: Mutex::new(()),
            state: Mutex::new(RegistryState {
                baseline: Arc::new(Baseline::default()),
                reset_at: started,
                rates: RateTracker::new(started, Totals::default()),
                thresholds: AlertThresholds::default(),
                memory_growth: GrowthDetector::new(GrowthConfig::default()),
                fd_growth: GrowthDetector::new(GrowthConfig::default()),
                growth_every: DEFAULT_GROWTH_SAMPLE_INTERVAL,
                last_growth_sample: None,
            }),
        })
    }

    /// The process-wide registry that pools and caches use unless given their own.
    pub fn global() -> Arc<Registry> {
        static GLOBAL: OnceLock<Arc<Registry>> = OnceLock::new();
        Arc::clone(GLOBAL.get_or_init(Registry::new))
    }

    /// A recorder for a new pool. Names are made unique (`orders`, `orders#2`, …) so two pools
    /// never share a series.
    pub fn register_pool(&self, name: &str, backend: &'static str) -> Arc<PoolRecorder> {
        let _guard = self.naming.lock();
        let mut pools = self.pools.write();
        let unique = unique_name(name, |n| pools.iter().any(|p| p.name == n));
        let rec = Arc::new(PoolRecorder::new(&unique, backend));
        pools.push(Arc::clone(&rec));
        rec
    }

    /// A recorder for a new model cache, named uniquely like pools.
    pub fn register_cache(&self, name: &str) -> Arc<CacheRecorder> {
        let _guard = self.naming.lock();
        let mut caches = self.caches.write();
        let unique = unique_name(name, |n| caches.iter().any(|c| c.name == n));
        let rec = Arc::new(CacheRecorder::new(&unique));
        caches.push(Arc::clone(&rec));
        rec
    }

    pub fn pools(&self) -> Vec<Arc<PoolRecorder>> {
        self.pools.read().clone()
    }

    pub fn caches(&self) -> Vec<Arc<CacheRecorder>> {
        self.caches.read().clone()
    }

    /// Sums of every monotonic counter, for rates.
    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for p in self.pools.read().iter() {
            t.pool_gets += p.gets.get();
            t.pool_successful_gets += p.successful_gets.get();
            t.pool_timeouts += p.timeouts();
            t.pool_rejected += p.rejected.get();
            t.pool_errors += p.errors();
            t.pool_queries += p.queries.get();
            t.pool_created += p.created.get();
            t.pool_destroyed += p.destroyed.get();
            t.pool_leaked_leases += p.leaked_leases.get();
        }
        for c in self.caches.read().iter() {
            t.neural_allocations += c.allocations.get();
            t.neural_deallocations += c.deallocations.get();
            t.neural_loads += c.loads.get();
            t.neural_cache_hits += c.hits.get();
            t.neural_cache_misses += c.misses.get();
            t.neural_evictions += c.evictions();
            t.neural_expirations += c.expirations.get();
            t.neural_predictions += c.predicts();
        }
        t
    }

    /// Per-second rates since the previous call (or the last reset, or creation).
    pub fn rates(&self) -> Rates {
        self.rates_at(Instant::now())
    }

    /// [`rates`](Registry::rates) with the clock injected.
    pub fn rates_at(&self, now: Instant) -> Rates {
        let totals = self.totals();
        self.state.lock().rates.observe(now, totals)
    }

    /// Re-baselines snapshots, rates and percentile windows. The recorders' counters are not
    /// touched: Prometheus keeps seeing monotonic series.
    pub fn reset(&self) {
        self.reset_at(Instant::now())
    }

    /// [`reset`](Registry::reset) with the clock injected.
    pub fn reset_at(&self, now: Instant) {
        let totals = self.totals();
        let baseline = Baseline::capture(self);
        for p in self.pools() {
            p.acquire_latency.reset();
            p.usage_latency.reset();
            p.query_latency.reset();
        }
        for c in self.caches() {
            c.load_latency.reset();
            c.predict_latency.reset();
            for m in c.models() {
                m.predict_latency.reset();
            }
        }
        let mut state = self.state.lock();
        state.baseline = Arc::new(baseline);
        state.reset_at = now;
        state.rates.rebase(now, totals);
    }

    pub fn alert_thresholds(&self) -> AlertThresholds {
        self.state.lock().thresholds
    }

    pub fn set_alert_thresholds(&self, thresholds: AlertThresholds) {
        self.state.lock().thresholds = thresholds;
    }

    /// Replaces the growth detectors' tuning (and clears their windows); `sample_every` spaces
    /// their samples.
    pub fn set_growth_config(&self, config: GrowthConfig, sample_every: Duration) {
        let mut state = self.state.lock();
        state.memory_growth = GrowthDetector::new(config);
        state.fd_growth = GrowthDetector::new(config);
        state.growth_every = sample_every;
        state.last_growth_sample = None;
    }

    /// Reads the process, feeds the growth detectors (at most once per sample interval) and
    /// grades the reading. `None` where the process cannot be read.
    pub fn process_at(&self, now: Instant) -> Option<ProcessSnapshot> {
        let sample = process::sample()?;
        Some(self.grade_process(now, sample))
    }

    /// Grades a given reading (the injectable half of [`process_at`](Registry::process_at)).
    pub fn grade_process(&self, now: Instant, sample: ProcessSample) -> ProcessSnapshot {
        let mut state = self.state.lock();
        let due = state
            .last_growth_sample
            .is_none_or(|last| now.saturating_duration_since(last) >= state.growth_every);
        if due {
            state.last_growth_sample = Some(now);
            state.memory_growth.push(now, sample.resident_bytes as f64);
            state.fd_growth.push(now, sample.open_fds as f64);
        }
        let memory_percent = sample.memory_percent();
        let fd_percent = sample.fd_percent();
        let t = state.thresholds;
        ProcessSnapshot {
            sample,
            memory_percent,
            fd_percent,
            memory_level: memory_percent.map_or(AlertLevel::Ok, |p| t.memory_percent.level(p)),
            fd_level: fd_percent.map_or(AlertLevel::Ok, |p| t.fd_percent.level(p)),
            memory_growth: state.memory_growth.report(),
            fd_growth: state.fd_growth.report(),
        }
    }

    /// Live leases and model handles older than their threshold at `now`, oldest first.
    pub fn leaks_at(&self, now: Instant) -> Vec<LiveResource> {
        self.live.overdue(now)
    }
}

fn unique_name(base: &str, taken: impl Fn(&str) -> bool) -> String {
    if !taken(base) {
        return base.to_string();
    }
    (2..)
        .map(|i| format!("{base}#{i}"))
        .find(|n| !taken(n))
        .expect("an unused name exists")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_model_series_of_unloaded_models_are_dropped_beyond_the_limit() {
        let reg = Registry::new();
        let cache = reg.register_cache("models");
        let live: Vec<_> = (0..10).map(|i| cache.model(&format!("live-{i}"))).collect();
        for i in 0..MODEL_SERIES_SOFT_LIMIT * 3 {
            cache.model(&format!("gone-{i}")).predicts.inc(); // loaded, used, unloaded
        }
        let kept = cache.models();
        assert!(
            kept.len() <= MODEL_SERIES_SOFT_LIMIT,
            "{} series",
            kept.len()
        );
        for m in &live {
            assert!(
                kept.iter().any(|k| Arc::ptr_eq(k, m)),
                "a loaded model's series stays"
            );
        }
        // Series of unloaded models stay visible until the limit needs the room.
        assert!(kept.len() > live.len());
        // Totals do not go backwards when series are dropped.
        assert_eq!(cache.predicts(), (MODEL_SERIES_SOFT_LIMIT * 3) as u64);
    }

    #[test]
    fn pool_names_are_unique_and_gauges_read_through_callback() {
        let reg = Registry::new();
        let a = reg.register_pool("orders", "postgres");
        let b = reg.register_pool("orders", "postgres");
        assert_eq!(a.name, "orders");
        assert_eq!(b.name, "orders#2");
        assert_eq!(a.gauges(), PoolGauges::default());
        a.set_gauges(|| {
            Some(PoolGauges {
                max_size: 4,
                size: 2,
                idle: 1,
                in_use: 1,
                waiting: 0,
            })
        });
        assert_eq!(a.gauges().size, 2);
    }

    #[test]
    fn reset_rebaselines_snapshot_and_rates_but_not_the_counters() {
        use std::time::Duration;
        let reg = Registry::new();
        let t0 = reg.started;
        let p = reg.register_pool("orders", "sqlite");
        let c = reg.register_cache("default");
        p.gets.add(100);
        p.successful_gets.add(90);
        p.query_latency.record(Duration::from_millis(40));
        c.allocations.add(10);
        c.model("btc").predicts.add(5);
        let r = reg.rates_at(t0 + Duration::from_secs(10));
        assert_eq!(r.pool_gets_per_sec, 10.0);
        assert_eq!(r.neural_allocations_per_sec, 1.0);

        reg.reset_at(t0 + Duration::from_secs(20));
        let s = reg.snapshot_at(t0 + Duration::from_secs(20), false);
        assert_eq!(
            (s.pool_gets, s.neural_allocations, s.models[0].predicts),
            (0, 0, 0)
        );
        assert_eq!(s.pool_success_rate, 1.0);
        assert_eq!(s.pools[0].query.max, 0.0, "percentile window restarts");
        assert_eq!(p.gets.get(), 100, "recorders stay monotonic");
        assert_eq!(p.query_latency.buckets().count, 1);

        p.gets.add(30);
        p.successful_gets.add(15);
        let s = reg.snapshot_at(t0 + Duration::from_secs(30), false);
        assert_eq!(s.pool_gets, 30);
        assert_eq!(s.pool_success_rate, 0.5);
        assert_eq!(s.seconds_since_reset, 10.0);
        let r = reg.rates_at(t0 + Duration::from_secs(30));
        assert_eq!(r.interval_seconds, 10.0, "rates count from the reset");
        assert_eq!(r.pool_gets_per_sec, 3.0);
    }

    #[test]
    fn series_created_after_a_reset_count_from_zero() {
        let reg = Registry::new();
        reg.reset();
        let p = reg.register_pool("late", "sqlite");
        p.gets.add(2);
        assert_eq!(reg.snapshot_at(Instant::now(), false).pool_gets, 2);
    }

    #[test]
    fn model_series_are_created_once() {
        let reg = Registry::new();
        let c = reg.register_cache("default");
        let m1 = c.model("btc");
        m1.predicts.inc();
        assert_eq!(c.model("btc").predicts.get(), 1);
        assert_eq!(c.models().len(), 1);
    }
}
