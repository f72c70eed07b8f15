//! `Metrics`: the registry pools and model caches report into, seen from JavaScript.
//! Conversion only; every number is computed in `crate::metrics`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use napi::bindgen_prelude::{
    CallbackContext, Function, JsObjectValue, JsValue, Object, PromiseRaw, ToNapiValue, Unknown,
};
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::{sys, Env, Status};
use napi_derive::napi;
use serde::Serialize;

use crate::error::Error;
use crate::metrics::exposition::{self, Family, Kind, Sink, Suffix, Value};
use crate::metrics::{
    self as core, ExpositionFormat, ExpositionOptions, GrowthReport, LiveResource, Percentiles,
    RateTracker, Registry,
};

use super::js_error;

/// The registry that connection pools and model caches report into: counters, latency
/// histograms, rates, health, leak reports and Prometheus exposition, all kept in Rust.
///
/// `Metrics.global()` is the process-wide registry (shared by every worker thread) that pools and
/// caches use unless given their own `new Metrics()`.
#[napi]
pub struct Metrics {
    pub(crate) registry: Arc<Registry>,
}

impl Metrics {
    /// Wraps an existing registry (for other bindings).
    pub(crate) fn from_registry(registry: Arc<Registry>) -> Self {
        Metrics { registry }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::from_registry(Registry::new())
    }
}

/// Latency percentiles in milliseconds. `max` is exact; the others are within 0.1 % (per-model
/// series: 1 %). All zero before the first event.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
#[napi(object, object_from_js = false)]
#[derive(Clone, Copy)]
pub struct MetricsLatency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest observed (exact).
    pub max: f64,
}

impl From<Percentiles> for MetricsLatency {
    fn from(p: Percentiles) -> Self {
        MetricsLatency {
            p50: p.p50,
            p90: p.p90,
            p95: p.p95,
            p99: p.p99,
            max: p.max,
        }
    }
}

/// One connection pool in a snapshot. Counters count since the last `reset()`; occupancy is now.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
#[napi(object, object_from_js = false)]
pub struct PoolDetail {
    /// The pool's `name` option (made unique: `orders`, `orders#2`).
    pub name: String,
    /// `postgres`, `sqlite` or `redis`.
    pub backend: String,
    /// Most connections the pool may open.
    pub max_size: f64,
    /// Open connections, idle or in use.
    pub size: f64,
    /// Open connections waiting in the pool.
    pub idle: f64,
    /// Connections leased out now.
    pub in_use: f64,
    /// Callers waiting for a connection.
    pub waiting: f64,
    /// `inUse / maxSize` in percent.
    pub utilization_percent: f64,
    /// Acquires requested.
    pub gets: f64,
    /// Acquires that returned a connection.
    pub successful_gets: f64,
    /// All acquire timeouts: `timeoutsWait + timeoutsConnect + timeoutsValidate`.
    pub timeouts: f64,
    /// Timed out waiting for a free connection.
    pub timeouts_wait: f64,
    /// Timed out opening a connection.
    pub timeouts_connect: f64,
    /// Timed out checking a connection before handing it out.
    pub timeouts_validate: f64,
    /// Acquires refused at once because the wait queue was full (`POOL_EXHAUSTED`).
    pub rejected: f64,
    /// `errorsConnect + errorsQuery`.
    pub errors: f64,
    /// Connections that failed to open.
    pub errors_connect: f64,
    /// Queries that failed.
    pub errors_query: f64,
    /// Connections opened.
    pub created: f64,
    /// Connections retired for age or idleness.
    pub recycled: f64,
    /// Connections closed.
    pub destroyed: f64,
    /// Leases collected by the garbage collector without release.
    pub leaked_leases: f64,
    /// Queries and commands run.
    pub queries: f64,
    /// `successfulGets / gets`, 0..1; 1 when nothing was asked.
    pub success_rate: f64,
    /// Time to acquire a connection.
    pub acquire_latency: MetricsLatency,
    /// Time a lease held its connection.
    pub usage_latency: MetricsLatency,
    /// Time to run a query.
    pub query_latency: MetricsLatency,
}

impl From<&core::PoolSnapshot> for PoolDetail {
    fn from(p: &core::PoolSnapshot) -> Self {
        let c = &p.counts;
        PoolDetail {
            name: p.name.clone(),
            backend: p.backend.to_string(),
            max_size: p.gauges.max_size as f64,
            size: p.gauges.size as f64,
            idle: p.gauges.idle as f64,
            in_use: p.gauges.in_use as f64,
            waiting: p.gauges.waiting as f64,
            utilization_percent: p.utilization_percent,
            gets: c.gets as f64,
            successful_gets: c.successful_gets as f64,
            timeouts: c.timeouts() as f64,
            timeouts_wait: c.timeouts_wait as f64,
            timeouts_connect: c.timeouts_connect as f64,
            timeouts_validate: c.timeouts_validate as f64,
            rejected: c.rejected as f64,
            errors: c.errors() as f64,
            errors_connect: c.errors_connect as f64,
            errors_query: c.errors_query as f64,
            created: c.created as f64,
            recycled: c.recycled as f64,
            destroyed: c.destroyed as f64,
            leaked_leases: c.leaked_leases as f64,
            queries: c.queries as f64,
            success_rate: p.success_rate,
            acquire_latency: p.acquire.into(),
            usage_latency: p.usage.into(),
            query_latency: p.query.into(),
        }
    }
}

/// One model cache in a snapshot. Counters count since the last `reset()`; sizes are now.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
#[napi(object, object_from_js = false)]
pub struct ModelCacheDetail {
    /// The cache's `name` option (made unique).
    pub name: String,
    /// Models held now.
    pub models: f64,
    /// Host bytes held now.
    pub host_bytes: f64,
    /// GPU bytes held now.
    pub gpu_bytes: f64,
    /// Models loaded.
    pub loads: f64,
    /// Loads that failed.
    pub load_failures: f64,
    /// Lookups served from the cache.
    pub hits: f64,
    /// Lookups that had to load.
    pub misses: f64,
    /// `hits / (hits + misses)`, 0..1; 0 when nothing was looked up.
    pub hit_rate: f64,
    /// LRU (count and bytes) and explicit evictions.
    pub evictions: f64,
    /// LRU evictions under `maxModels`.
    pub evictions_count: f64,
    /// LRU evictions under `maxBytes`.
    pub evictions_bytes: f64,
    /// `evict()` / `clear()`.
    pub evictions_explicit: f64,
    /// Models removed for age (TTL).
    pub expirations: f64,
    /// Native buffers allocated for weights and workspaces.
    pub allocations: f64,
    /// Native buffers freed.
    pub deallocations: f64,
    /// Time to load a model.
    pub load_latency: MetricsLatency,
    /// Time to run a prediction, across models.
    pub predict_latency: MetricsLatency,
}

impl From<&core::CacheSnapshot> for ModelCacheDetail {
    fn from(c: &core::CacheSnapshot) -> Self {
        let n = &c.counts;
        ModelCacheDetail {
            name: c.name.clone(),
            models: c.models as f64,
            host_bytes: c.host_bytes as f64,
            gpu_bytes: c.gpu_bytes as f64,
            loads: n.loads as f64,
            load_failures: n.load_failures as f64,
            hits: n.hits as f64,
            misses: n.misses as f64,
            hit_rate: c.hit_rate,
            evictions: n.evictions() as f64,
            evictions_count: n.evictions_count as f64,
            evictions_bytes: n.evictions_bytes as f64,
            evictions_explicit: n.evictions_explicit as f64,
            expirations: n.expirations as f64,
            allocations: n.allocations as f64,
            deallocations: n.deallocations as f64,
            load_latency: c.load.into(),
            predict_latency: c.predict.into(),
        }
    }
}

/// One model in a snapshot.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
#[napi(object, object_from_js = false)]
pub struct ModelDetail {
    /// The cache holding the model.
    pub cache: String,
    /// The model id given to `cache.load`.
    pub name: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Predictions since the last `reset()`.
    pub predictions: f64,
    /// Host bytes held by this model now.
    pub host_bytes: f64,
    /// GPU bytes held by this model now.
    pub gpu_bytes: f64,
    /// Time to run one prediction (1 % precision).
    pub predict_latency: MetricsLatency,
}

impl From<&core::ModelSnapshot> for ModelDetail {
    fn from(m: &core::ModelSnapshot) -> Self {
        ModelDetail {
            cache: m.cache.clone(),
            name: m.name.clone(),
            device: m.device.clone(),
            predictions: m.predicts as f64,
            host_bytes: m.host_bytes as f64,
            gpu_bytes: m.gpu_bytes as f64,
            predict_latency: m.predict.into(),
        }
    }
}

/// The growth detector's verdict on one series (least-squares slope over a sliding window).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
#[napi(object, object_from_js = false)]
pub struct GrowthDetail {
    /// Steady growth: positive slope, good linear fit, most steps rising, ≥ 5 % over the window.
    pub suspected_leak: bool,
    /// Units per second (bytes/s for memory, descriptors/s for FDs).
    pub slope_per_sec: f64,
    /// Fit quality 0..1 of the straight line.
    pub r_squared: f64,
    /// Fitted growth over the window as a percentage of its mean.
    pub growth_percent: f64,
    /// Samples in the window (one per second at most, taken by `snapshot()`, `health()` and the reporter).
    pub samples: u32,
    /// Time the window spans.
    pub window_seconds: f64,
}

impl From<GrowthReport> for GrowthDetail {
    fn from(g: GrowthReport) -> Self {
        GrowthDetail {
            suspected_leak: g.suspected_leak,
            slope_per_sec: g.slope_per_sec,
            r_squared: g.r_squared,
            growth_percent: g.growth_percent,
            samples: u32::try_from(g.samples).unwrap_or(u32::MAX),
            window_seconds: g.window_seconds,
        }
    }
}

/// The process: memory, file descriptors, threads, their alert levels and growth verdicts.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
#[napi(object, object_from_js = false)]
pub struct ProcessDetail {
    /// Resident set size.
    pub resident_bytes: f64,
    /// `residentBytes` in MiB.
    pub resident_mb: f64,
    /// Cgroup memory limit if set, else physical memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_limit_bytes: Option<f64>,
    /// `residentBytes / memoryLimitBytes` in percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_percent: Option<f64>,
    /// Alert level of `memoryPercent` (thresholds: `alertThresholds().memoryPercent`).
    #[napi(ts_type = "'ok' | 'warning' | 'error' | 'critical'")]
    pub memory_level: String,
    /// Open file descriptors.
    pub open_fds: f64,
    /// Soft limit on open files; absent when unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_fds: Option<f64>,
    /// `openFds / maxFds` in percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fd_percent: Option<f64>,
    /// Alert level of `fdPercent` (thresholds: `alertThresholds().fdPercent`).
    #[napi(ts_type = "'ok' | 'warning' | 'error' | 'critical'")]
    pub fd_level: String,
    /// Operating-system threads.
    pub threads: f64,
    /// Growth verdict on resident memory.
    pub memory_growth: GrowthDetail,
    /// Growth verdict on open descriptors.
    pub fd_growth: GrowthDetail,
}

impl From<&core::ProcessSnapshot> for ProcessDetail {
    fn from(p: &core::ProcessSnapshot) -> Self {
        let s = &p.sample;
        ProcessDetail {
            resident_bytes: s.resident_bytes as f64,
            resident_mb: s.resident_bytes as f64 / (1024.0 * 1024.0),
            memory_limit_bytes: s.memory_limit_bytes.map(|v| v as f64),
            memory_percent: p.memory_percent,
            memory_level: p.memory_level.as_str().to_string(),
            open_fds: s.open_fds as f64,
            max_fds: s.max_fds.map(|v| v as f64),
            fd_percent: p.fd_percent,
            fd_level: p.fd_level.as_str().to_string(),
            threads: s.threads as f64,
            memory_growth: p.memory_growth.into(),
            fd_growth: p.fd_growth.into(),
        }
    }
}

/// One whole snapshot: the seed's `SystemMetrics` / `MetricsSnapshot` fields plus per-pool,
/// per-cache, per-model and process detail. Counters count since the last `reset()`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
#[napi(object, object_from_js = false)]
pub struct MetricsSnapshot {
    /// Connection acquires across every pool.
    pub pool_gets: f64,
    /// Acquires that timed out (wait, connect or validate).
    pub pool_timeouts: f64,
    /// Connect and query failures.
    pub pool_errors: f64,
    /// Native buffers allocated for model weights and workspaces.
    pub neural_allocations: f64,
    /// Native buffers freed.
    pub neural_deallocations: f64,
    /// Host + GPU bytes held by every model cache now.
    pub neural_memory_bytes: f64,
    /// Model lookups served from a cache.
    pub neural_cache_hits: f64,
    /// Model lookups that had to load.
    pub neural_cache_misses: f64,
    /// Successful acquires / acquires, 0..1; 1 when nothing was asked.
    pub pool_success_rate: f64,
    /// `neuralMemoryBytes` in MiB.
    pub neural_memory_mb: f64,
    /// Hits / lookups, 0..1; 0 when nothing was looked up.
    pub neural_cache_hit_rate: f64,
    /// Seconds since the registry was created.
    pub uptime_seconds: f64,
    /// Seconds since the last `reset()` (the uptime before the first).
    pub seconds_since_reset: f64,
    /// Leases and model handles alive now.
    pub live_resources: f64,
    /// One entry per connection pool.
    pub pools: Vec<PoolDetail>,
    /// One entry per model cache.
    pub caches: Vec<ModelCacheDetail>,
    /// One entry per model ever loaded (series are kept, counters monotonic).
    pub models: Vec<ModelDetail>,
    /// Absent where the process cannot be read (non-Linux).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessDetail>,
}

impl From<&core::Snapshot> for MetricsSnapshot {
    fn from(s: &core::Snapshot) -> Self {
        MetricsSnapshot {
            pool_gets: s.pool_gets as f64,
            pool_timeouts: s.pool_timeouts as f64,
            pool_errors: s.pool_errors as f64,
            neural_allocations: s.neural_allocations as f64,
            neural_deallocations: s.neural_deallocations as f64,
            neural_memory_bytes: s.neural_memory_bytes as f64,
            neural_cache_hits: s.neural_cache_hits as f64,
            neural_cache_misses: s.neural_cache_misses as f64,
            pool_success_rate: s.pool_success_rate,
            neural_memory_mb: s.neural_memory_mb,
            neural_cache_hit_rate: s.neural_cache_hit_rate,
            uptime_seconds: s.uptime_seconds,
            seconds_since_reset: s.seconds_since_reset,
            live_resources: s.live_resources as f64,
            pools: s.pools.iter().map(PoolDetail::from).collect(),
            caches: s.caches.iter().map(ModelCacheDetail::from).collect(),
            models: s.models.iter().map(ModelDetail::from).collect(),
            process: s.process.as_ref().map(ProcessDetail::from),
        }
    }
}

/// Events per second across every pool and cache since the previous `rates()` call (or the last
/// `reset()`, or creation).
#[napi(object, object_from_js = false)]
pub struct MetricsRates {
    /// Seconds the rates cover.
    pub interval_seconds: f64,
    /// Pool gets per second.
    pub pool_gets_per_sec: f64,
    /// Pool successful gets per second.
    pub pool_successful_gets_per_sec: f64,
    /// Pool timeouts per second.
    pub pool_timeouts_per_sec: f64,
    /// Pool rejected per second.
    pub pool_rejected_per_sec: f64,
    /// Pool errors per second.
    pub pool_errors_per_sec: f64,
    /// Pool queries per second.
    pub pool_queries_per_sec: f64,
    /// Pool created per second.
    pub pool_created_per_sec: f64,
    /// Pool destroyed per second.
    pub pool_destroyed_per_sec: f64,
    /// Pool leaked leases per second.
    pub pool_leaked_leases_per_sec: f64,
    /// Neural allocations per second.
    pub neural_allocations_per_sec: f64,
    /// Neural deallocations per second.
    pub neural_deallocations_per_sec: f64,
    /// Neural loads per second.
    pub neural_loads_per_sec: f64,
    /// Neural cache hits per second.
    pub neural_cache_hits_per_sec: f64,
    /// Neural cache misses per second.
    pub neural_cache_misses_per_sec: f64,
    /// Neural evictions per second.
    pub neural_evictions_per_sec: f64,
    /// Neural expirations per second.
    pub neural_expirations_per_sec: f64,
    /// Neural predictions per second.
    pub neural_predictions_per_sec: f64,
}

impl From<core::Rates> for MetricsRates {
    fn from(r: core::Rates) -> Self {
        MetricsRates {
            interval_seconds: r.interval_seconds,
            pool_gets_per_sec: r.pool_gets_per_sec,
            pool_successful_gets_per_sec: r.pool_successful_gets_per_sec,
            pool_timeouts_per_sec: r.pool_timeouts_per_sec,
            pool_rejected_per_sec: r.pool_rejected_per_sec,
            pool_errors_per_sec: r.pool_errors_per_sec,
            pool_queries_per_sec: r.pool_queries_per_sec,
            pool_created_per_sec: r.pool_created_per_sec,
            pool_destroyed_per_sec: r.pool_destroyed_per_sec,
            pool_leaked_leases_per_sec: r.pool_leaked_leases_per_sec,
            neural_allocations_per_sec: r.neural_allocations_per_sec,
            neural_deallocations_per_sec: r.neural_deallocations_per_sec,
            neural_loads_per_sec: r.neural_loads_per_sec,
            neural_cache_hits_per_sec: r.neural_cache_hits_per_sec,
            neural_cache_misses_per_sec: r.neural_cache_misses_per_sec,
            neural_evictions_per_sec: r.neural_evictions_per_sec,
            neural_expirations_per_sec: r.neural_expirations_per_sec,
            neural_predictions_per_sec: r.neural_predictions_per_sec,
        }
    }
}

/// One check behind `health()`.
#[napi(object, object_from_js = false)]
pub struct HealthCheck {
    /// `pool.utilization`, `pool.waiting`, `pool.failures`, `cache.misses`,
    /// `cache.load_failures`, `process.memory`, `process.fds`, `process.memory_growth`,
    /// `process.fd_growth` or `leaks`.
    pub name: String,
    /// The pool or cache name; `process` or `registry` otherwise.
    pub target: String,
    /// How bad the measured value is.
    #[napi(ts_type = "'ok' | 'warning' | 'error' | 'critical'")]
    pub level: String,
    /// The measured value (percent, count or slope; see `message`).
    pub value: f64,
    /// What was measured, in words a person can act on.
    pub message: String,
}

/// Overall health: any critical check makes it `unhealthy`, any warning or error `degraded`.
#[napi(object, object_from_js = false)]
pub struct MetricsHealth {
    /// Worst check wins: critical → `unhealthy`; warning or error → `degraded`.
    #[napi(ts_type = "'healthy' | 'degraded' | 'unhealthy'")]
    pub status: String,
    /// 0..100: 100 minus 10 per warning, 25 per error, 50 per critical check.
    pub score: f64,
    /// Every check, passing or not.
    pub checks: Vec<HealthCheck>,
}

impl From<core::Health> for MetricsHealth {
    fn from(h: core::Health) -> Self {
        MetricsHealth {
            status: h.status.as_str().to_string(),
            score: h.score,
            checks: h
                .checks
                .into_iter()
                .map(|c| HealthCheck {
                    name: c.name.to_string(),
                    target: c.target,
                    level: c.level.as_str().to_string(),
                    value: c.value,
                    message: c.message,
                })
                .collect(),
        }
    }
}

/// A lease or model handle held longer than its leak threshold.
#[napi(object, object_from_js = false)]
pub struct LeakReport {
    /// `lease` (a pool connection) or `model` (a model handle).
    #[napi(ts_type = "'lease' | 'model'")]
    pub kind: String,
    /// Pool or model name.
    pub name: String,
    /// How long it has been held.
    pub age_ms: f64,
    /// The threshold it passed (`leakDetectionMs` for leases).
    pub threshold_ms: f64,
    /// JavaScript stack of the acquire, when captured.
    pub stack: Option<String>,
}

fn leak_report(now: Instant, r: LiveResource) -> LeakReport {
    LeakReport {
        kind: r.kind.to_string(),
        name: r.name,
        age_ms: now.saturating_duration_since(r.acquired_at).as_secs_f64() * 1000.0,
        threshold_ms: r.threshold.as_secs_f64() * 1000.0,
        stack: r.stack,
    }
}

/// Options of `prometheus()` and `prometheusCollector()`.
#[napi(object, object_to_js = false)]
pub struct PrometheusOptions {
    /// OpenMetrics 1.0 (ending in `# EOF`) instead of text format 0.0.4. Default false.
    pub open_metrics: Option<bool>,
    /// Include `qm_process_*` series. Default true; set false when prom-client's
    /// `collectDefaultMetrics()` already exports the process.
    pub include_process: Option<bool>,
}

fn exposition_options(options: Option<PrometheusOptions>) -> ExpositionOptions {
    let options = options.unwrap_or(PrometheusOptions {
        open_metrics: None,
        include_process: None,
    });
    ExpositionOptions {
        format: if options.open_metrics.unwrap_or(false) {
            ExpositionFormat::OpenMetrics
        } else {
            ExpositionFormat::Prometheus
        },
        include_process: options.include_process.unwrap_or(true),
    }
}

/// Warning, error and critical levels of one alert, each inclusive.
#[napi(object)]
#[derive(Clone, Copy)]
pub struct ThresholdLevels {
    /// Percent at or above which the level is `warning`.
    pub warning: f64,
    /// Percent at or above which the level is `error`.
    pub error: f64,
    /// Percent at or above which the level is `critical`.
    pub critical: f64,
}

impl From<core::Thresholds> for ThresholdLevels {
    fn from(t: core::Thresholds) -> Self {
        ThresholdLevels {
            warning: t.warning,
            error: t.error,
            critical: t.critical,
        }
    }
}

/// Alert thresholds in percent; each level set must satisfy warning ≤ error ≤ critical.
#[napi(object)]
pub struct AlertThresholdsOptions {
    /// Resident memory / memory limit. Default 70 / 85 / 95.
    pub memory_percent: Option<ThresholdLevels>,
    /// Open FDs / soft limit. Default 70 / 85 / 95.
    pub fd_percent: Option<ThresholdLevels>,
    /// Connections in use / pool maximum. Default 80 / 90 / 100.
    pub pool_utilization_percent: Option<ThresholdLevels>,
    /// Failed acquires / acquires since reset (judged from 20 acquires). Default 1 / 5 / 20.
    pub pool_failure_percent: Option<ThresholdLevels>,
    /// Misses / lookups since reset (judged from 20 lookups). Default 30 / 50 / 80.
    pub cache_miss_percent: Option<ThresholdLevels>,
}

/// What `onReport` receives on every tick.
#[napi(object, object_from_js = false)]
pub struct MetricsReport {
    /// As `snapshot()` returns it.
    pub snapshot: MetricsSnapshot,
    /// Rates since the reporter's previous tick (the reporter keeps its own baseline, so it does
    /// not disturb the app's `rates()` calls).
    pub rates: MetricsRates,
    /// As `health()` returns it.
    pub health: MetricsHealth,
    /// As `leaks()` returns it.
    pub leaks: Vec<LeakReport>,
}

/// Nanoseconds per recorded event, from `Metrics.benchmarkRecording()`.
#[napi(object, object_from_js = false)]
pub struct RecordingCost {
    /// Events recorded of each kind.
    pub events: f64,
    /// One counter increment.
    pub counter_ns: f64,
    /// One latency recorded into a histogram.
    pub histogram_ns: f64,
    /// Everything one `pool.query` records (3 counters, 3 histograms).
    pub pool_query_ns: f64,
    /// The same with two threads recording into one pool at once.
    pub pool_query_contended_ns: f64,
}

/// Options of `startReporter()`.
#[napi(object, object_to_js = false)]
pub struct ReporterOptions {
    /// Milliseconds between reports, at least 10.
    pub interval_ms: u32,
    /// Called with each report. A throw or a rejected promise is counted in `errors` and the
    /// reporter keeps going.
    pub on_report:
        ThreadsafeFunction<MetricsReport, Unknown<'static>, MetricsReport, Status, false, true>,
}

/// A running reporter. It never keeps the process alive; `stop()` ends it.
#[napi]
pub struct MetricsReporter {
    stopped: Arc<AtomicBool>,
    reports: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    task: Option<tokio::task::JoinHandle<()>>,
}

#[napi]
impl MetricsReporter {
    /// Stops the reporter; no report is delivered after this returns. Safe to call twice.
    #[napi]
    pub fn stop(&mut self) {
        self.stopped.store(true, Ordering::Release);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// False once stopped (or once its environment shut down).
    #[napi(getter)]
    pub fn running(&self) -> bool {
        !self.stopped.load(Ordering::Acquire)
            && self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Reports delivered to `onReport`.
    #[napi(getter)]
    pub fn reports(&self) -> f64 {
        self.reports.load(Ordering::Relaxed) as f64
    }

    /// `onReport` calls that threw or returned a rejected promise.
    #[napi(getter)]
    pub fn errors(&self) -> f64 {
        self.errors.load(Ordering::Relaxed) as f64
    }
}

/// One metric family shaped like a prom-client metric (`name`, `help`, `type`, `aggregator`,
/// `get()`, `reset()`), so a prom-client `Registry` can register it or merge it.
#[napi]
pub struct PromClientMetric {
    /// The family name as prom-client prints it (counters end in `_total`).
    pub name: String,
    /// Help text.
    pub help: String,
    /// `counter`, `gauge` or `histogram`.
    #[napi(js_name = "type")]
    pub kind: String,
    /// How prom-client's cluster mode combines workers' values.
    pub aggregator: String,
    registry: Arc<Registry>,
    family: &'static Family,
}

/// A sample as prom-client's `get()` returns it.
#[napi(object, object_from_js = false)]
pub struct PromClientSample {
    /// The sample value.
    pub value: f64,
    /// Label names and values.
    #[napi(ts_type = "Record<string, string>")]
    pub labels: Labels,
    /// `…_bucket`, `…_sum`, `…_count` for histograms; absent otherwise.
    pub metric_name: Option<String>,
}

/// What `PromClientMetric.get()` returns (prom-client's `MetricObjectWithValues`).
#[napi(object, object_from_js = false)]
pub struct PromClientMetricData {
    /// Family name.
    pub name: String,
    /// Help text.
    pub help: String,
    /// `counter`, `gauge` or `histogram`.
    #[napi(js_name = "type")]
    pub kind: String,
    /// `sum`.
    pub aggregator: String,
    /// Every sample of the family.
    pub values: Vec<PromClientSample>,
}

/// Label names and values, in order.
pub struct Labels(Vec<(&'static str, String)>);

impl ToNapiValue for Labels {
    unsafe fn to_napi_value(env: sys::napi_env, val: Self) -> napi::Result<sys::napi_value> {
        let env = Env::from_raw(env);
        let mut obj = Object::new(&env)?;
        for (name, value) in val.0 {
            obj.set(name, value)?;
        }
        // SAFETY: `obj` was created in this `env` a moment ago.
        unsafe { Object::to_napi_value(env.raw(), obj) }
    }
}

struct PromClientSink<'a> {
    name: &'a str,
    out: Vec<PromClientSample>,
}

/// Label names used by the family table, interned so `Labels` can hold `&'static str`.
fn static_label(name: &str) -> &'static str {
    match name {
        "pool" => "pool",
        "phase" => "phase",
        "kind" => "kind",
        "cache" => "cache",
        "model" => "model",
        "device" => "device",
        "reason" => "reason",
        _ => "label",
    }
}

impl Sink for PromClientSink<'_> {
    fn sample(
        &mut self,
        _family: &Family,
        suffix: Suffix,
        labels: &[(&str, &str)],
        le: Option<&str>,
        value: Value,
    ) {
        let mut pairs: Vec<(&'static str, String)> = labels
            .iter()
            .map(|(k, v)| (static_label(k), (*v).to_string()))
            .collect();
        if let Some(le) = le {
            pairs.push(("le", le.to_string()));
        }
        let metric_name = match suffix {
            Suffix::Bucket | Suffix::Sum | Suffix::Count => {
                Some(format!("{}{}", self.name, suffix.as_str()))
            }
            Suffix::None | Suffix::Total => None,
        };
        self.out.push(PromClientSample {
            value: value.as_f64(),
            labels: Labels(pairs),
            metric_name,
        });
    }
}

#[napi]
impl PromClientMetric {
    /// The family's current samples, in prom-client's shape.
    #[napi]
    pub fn get(&self) -> PromClientMetricData {
        let collection = exposition::Collection::gather(&self.registry, self.family.process);
        let base = self.name.strip_suffix("_total").unwrap_or(&self.name);
        let mut sink = PromClientSink {
            name: if self.family.kind == Kind::Counter {
                base
            } else {
                &self.name
            },
            out: Vec::new(),
        };
        collection.emit(self.family, &mut sink);
        PromClientMetricData {
            name: self.name.clone(),
            help: self.help.clone(),
            kind: self.kind.clone(),
            aggregator: self.aggregator.clone(),
            values: sink.out,
        }
    }

    /// Does nothing: quartermaster's counters are monotonic for the life of the process (use
    /// `Metrics.reset()` to re-baseline snapshots and rates).
    #[napi]
    pub fn reset(&self) {}
}

/// quartermaster's series for an app's prom-client registry:
/// `Registry.merge([register, collector as any])`, or
/// `for (const m of collector.getMetricsAsArray()) register.registerMetric(m as any)`.
/// Every name starts with `qm_`, so nothing collides with prom-client's default metrics.
#[napi]
pub struct PrometheusCollector {
    registry: Arc<Registry>,
    options: ExpositionOptions,
}

#[napi]
impl PrometheusCollector {
    /// Matches prom-client's `Registry.contentType` (merge requires equal content types).
    #[napi(getter)]
    pub fn content_type(&self) -> String {
        self.options.format.content_type().to_string()
    }

    /// One prom-client-shaped metric per family.
    #[napi]
    pub fn get_metrics_as_array(&self) -> Vec<PromClientMetric> {
        exposition::families(self.options.include_process)
            .map(|family| PromClientMetric {
                name: family.exposed_name(),
                help: family.help.to_string(),
                kind: family.kind.as_str().to_string(),
                aggregator: "sum".to_string(),
                registry: Arc::clone(&self.registry),
                family,
            })
            .collect()
    }

    /// The same series rendered by quartermaster itself.
    #[napi]
    pub fn metrics(&self) -> String {
        self.registry.prometheus(self.options)
    }
}

fn apply_levels(
    name: &str,
    target: &mut core::Thresholds,
    given: Option<ThresholdLevels>,
) -> Result<(), Error> {
    let Some(l) = given else { return Ok(()) };
    let t = core::Thresholds::new(l.warning, l.error, l.critical);
    if !t.is_valid() {
        return Err(Error::invalid_argument(format!(
            "{name}: thresholds must be finite with warning <= error <= critical (got {} / {} / {})",
            l.warning, l.error, l.critical
        )));
    }
    *target = t;
    Ok(())
}

/// Hands a large plain object to JavaScript as one JSON text parsed by V8: with a thousand
/// models this is several times faster than setting each property through N-API.
fn to_js_via_json<'env, T: Serialize>(env: &'env Env, value: &T) -> napi::Result<Unknown<'env>> {
    let text = serde_json::to_string(value).map_err(|e| napi::Error::from_reason(e.to_string()))?;
    let json: Object<'_> = env.get_global()?.get_named_property("JSON")?;
    let parse: Function<'_, String, Unknown<'_>> = json.get_named_property("parse")?;
    parse.call(text)
}

fn build_report(registry: &Registry, rates: &mut RateTracker) -> MetricsReport {
    let now = Instant::now();
    let snapshot = registry.snapshot_at(now, true);
    let overdue = registry.leaks_at(now);
    let health = core::Health::from_checks(core::health::checks(
        &snapshot,
        overdue.len(),
        &registry.alert_thresholds(),
    ));
    MetricsReport {
        snapshot: MetricsSnapshot::from(&snapshot),
        rates: rates.observe(now, registry.totals()).into(),
        health: health.into(),
        leaks: overdue.into_iter().map(|r| leak_report(now, r)).collect(),
    }
}

/// Counts a rejected promise returned by `onReport` instead of letting it go unhandled.
fn catch_rejection(env: &Env, returned: Unknown<'_>, errors: Arc<AtomicU64>) -> napi::Result<()> {
    let mut is_promise = false;
    // SAFETY: `returned` is a live value of this `env` for the duration of the callback.
    let status = unsafe { sys::napi_is_promise(env.raw(), returned.raw(), &mut is_promise) };
    if status != sys::Status::napi_ok || !is_promise {
        return Ok(());
    }
    // SAFETY: checked to be a promise just above.
    let promise: PromiseRaw<'_, Unknown<'_>> = unsafe { returned.cast()? };
    promise.catch(move |_: CallbackContext<Unknown<'_>>| {
        errors.fetch_add(1, Ordering::Relaxed);
        Ok(())
    })?;
    Ok(())
}

#[napi]
impl Metrics {
    /// A new, empty registry (pass it to pools and caches to keep their series apart).
    #[napi(constructor)]
    pub fn new() -> Self {
        Metrics::default()
    }

    /// The process-wide registry pools and caches report into unless given their own.
    #[napi(factory)]
    pub fn global() -> Self {
        Metrics::from_registry(Registry::global())
    }

    /// One plain object with every counter (since the last `reset()`), gauge, latency
    /// percentile and process reading.
    #[napi(ts_return_type = "MetricsSnapshot")]
    pub fn snapshot<'env>(&self, env: &'env Env) -> napi::Result<Unknown<'env>> {
        to_js_via_json(env, &MetricsSnapshot::from(&self.registry.snapshot()))
    }

    /// Per-second rates since the previous `rates()` call (or `reset()`, or creation).
    #[napi]
    pub fn rates(&self) -> MetricsRates {
        self.registry.rates().into()
    }

    /// Re-baselines `snapshot()` counters, latency percentiles and `rates()`. Exported
    /// Prometheus counters stay monotonic.
    #[napi]
    pub fn reset(&self) {
        self.registry.reset();
    }

    /// Text exposition: Prometheus 0.0.4 by default, OpenMetrics 1.0 with `{ openMetrics: true }`.
    #[napi]
    pub fn prometheus(&self, options: Option<PrometheusOptions>) -> String {
        self.registry.prometheus(exposition_options(options))
    }

    /// The `Content-Type` header for `prometheus(options)`.
    #[napi]
    pub fn content_type(&self, options: Option<PrometheusOptions>) -> String {
        exposition_options(options)
            .format
            .content_type()
            .to_string()
    }

    /// Pool, cache, process and leak checks folded into `{ status, score, checks }`.
    #[napi]
    pub fn health(&self) -> MetricsHealth {
        self.registry.health().into()
    }

    /// Leases and model handles held longer than their threshold, oldest first, with the stack
    /// of their acquire when it was captured.
    #[napi]
    pub fn leaks(&self) -> Vec<LeakReport> {
        let now = Instant::now();
        self.registry
            .leaks_at(now)
            .into_iter()
            .map(|r| leak_report(now, r))
            .collect()
    }

    /// The alert thresholds `health()` and `snapshot().process` use.
    #[napi]
    pub fn alert_thresholds(&self) -> AlertThresholdsOptions {
        let t = self.registry.alert_thresholds();
        AlertThresholdsOptions {
            memory_percent: Some(t.memory_percent.into()),
            fd_percent: Some(t.fd_percent.into()),
            pool_utilization_percent: Some(t.pool_utilization_percent.into()),
            pool_failure_percent: Some(t.pool_failure_percent.into()),
            cache_miss_percent: Some(t.cache_miss_percent.into()),
        }
    }

    /// Changes the given alert thresholds; the others keep their values. Fails with
    /// `INVALID_ARGUMENT` unless warning ≤ error ≤ critical.
    #[napi]
    pub fn set_alert_thresholds(
        &self,
        env: Env,
        thresholds: AlertThresholdsOptions,
    ) -> napi::Result<()> {
        let mut t = self.registry.alert_thresholds();
        let applied = apply_levels(
            "memoryPercent",
            &mut t.memory_percent,
            thresholds.memory_percent,
        )
        .and_then(|_| apply_levels("fdPercent", &mut t.fd_percent, thresholds.fd_percent))
        .and_then(|_| {
            apply_levels(
                "poolUtilizationPercent",
                &mut t.pool_utilization_percent,
                thresholds.pool_utilization_percent,
            )
        })
        .and_then(|_| {
            apply_levels(
                "poolFailurePercent",
                &mut t.pool_failure_percent,
                thresholds.pool_failure_percent,
            )
        })
        .and_then(|_| {
            apply_levels(
                "cacheMissPercent",
                &mut t.cache_miss_percent,
                thresholds.cache_miss_percent,
            )
        });
        match applied {
            Ok(()) => {
                self.registry.set_alert_thresholds(t);
                Ok(())
            }
            Err(err) => Err(js_error(&env, err)),
        }
    }

    /// Calls `onReport` every `intervalMs` with `{ snapshot, rates, health, leaks }`.
    /// The reporter never keeps the process alive (like an `unref()`'d timer), survives a
    /// throwing or rejecting `onReport`, and runs until `stop()` or until its thread's
    /// environment shuts down — also when the returned handle is garbage-collected, so keep it
    /// to stop it. Fails with `INVALID_ARGUMENT` below 10 ms.
    #[napi]
    pub fn start_reporter(
        &self,
        env: Env,
        options: ReporterOptions,
    ) -> napi::Result<MetricsReporter> {
        if options.interval_ms < 10 {
            return Err(js_error(
                &env,
                Error::invalid_argument(format!(
                    "intervalMs must be at least 10 (got {})",
                    options.interval_ms
                )),
            ));
        }
        let registry = Arc::clone(&self.registry);
        let callback = options.on_report;
        let period = Duration::from_millis(u64::from(options.interval_ms));
        let stopped = Arc::new(AtomicBool::new(false));
        let reports = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let (task_stopped, task_reports, task_errors) = (
            Arc::clone(&stopped),
            Arc::clone(&reports),
            Arc::clone(&errors),
        );
        let task = napi::bindgen_prelude::spawn(async move {
            let mut rates = RateTracker::new(Instant::now(), registry.totals());
            let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                ticker.tick().await;
                if task_stopped.load(Ordering::Acquire) {
                    break;
                }
                let report = build_report(&registry, &mut rates);
                let (delivered, failed) = (Arc::clone(&task_reports), Arc::clone(&task_errors));
                let status = callback.call_with_return_value(
                    report,
                    ThreadsafeFunctionCallMode::NonBlocking,
                    move |ret, env| {
                        delivered.fetch_add(1, Ordering::Relaxed);
                        match ret {
                            // A failure to inspect the return value must not become a fatal exception.
                            Ok(value) => drop(catch_rejection(&env, value, failed)),
                            // `onReport` threw: napi caught it; count it and keep reporting.
                            Err(_) => drop(failed.fetch_add(1, Ordering::Relaxed)),
                        }
                        Ok(())
                    },
                );
                if status != Status::Ok {
                    // The environment is shutting down (worker terminated, process exiting).
                    task_stopped.store(true, Ordering::Release);
                    break;
                }
            }
        });
        Ok(MetricsReporter {
            stopped,
            reports,
            errors,
            task: Some(task),
        })
    }

    /// Benchmark hook for `npm run bench:metrics`: records `events` events of each kind into a
    /// private registry and returns nanoseconds per event, timed inside Rust. Touches no real
    /// series.
    #[napi]
    pub fn benchmark_recording(events: u32) -> RecordingCost {
        let c = crate::metrics::cost::measure(u64::from(events));
        RecordingCost {
            events: c.events as f64,
            counter_ns: c.counter_ns,
            histogram_ns: c.histogram_ns,
            pool_query_ns: c.pool_query_ns,
            pool_query_contended_ns: c.pool_query_contended_ns,
        }
    }

    /// quartermaster's series for an app's prom-client registry (see `PrometheusCollector`).
    /// Pass `{ includeProcess: false }` when prom-client's `collectDefaultMetrics()` already
    /// exports the process.
    #[napi]
    pub fn prometheus_collector(&self, options: Option<PrometheusOptions>) -> PrometheusCollector {
        PrometheusCollector {
            registry: Arc::clone(&self.registry),
            options: exposition_options(options),
        }
    }
}
