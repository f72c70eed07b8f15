//! Prometheus exposition: text format 0.0.4 and OpenMetrics 1.0.
//!
//! Names follow HikariCP's pattern under `qm_` (`qm_pool_connections_active`,
//! `qm_pool_connections_pending`, `qm_pool_connection_timeout_total`, `qm_pool_acquire_seconds`),
//! one `pool` / `cache` / `model` label per series, seconds as the unit, `_total` on counters,
//! histograms as cumulative `le` buckets with `_sum` and `_count` so fleets can aggregate.
//!
//! The family table below is the single list of series: the text renderer and the prom-client
//! collector (binding) both walk it through a [`Sink`], so the two can never disagree.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use super::histogram::{LatencyHistogram, BUCKET_BOUNDS_MICROS};
use super::process::{self, ProcessSample};
use super::{CacheRecorder, ModelRecorder, PoolGauges, PoolRecorder, Registry};

/// Which text format to render.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpositionFormat {
    /// `text/plain; version=0.0.4`.
    #[default]
    Prometheus,
    /// `application/openmetrics-text; version=1.0.0`, ending in `# EOF`.
    OpenMetrics,
}

impl ExpositionFormat {
    pub fn content_type(self) -> &'static str {
        match self {
            ExpositionFormat::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            ExpositionFormat::OpenMetrics => {
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
            }
        }
    }
}

/// What to render.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpositionOptions {
    pub format: ExpositionFormat,
    /// Include `qm_process_*` series (leave out when prom-client's default metrics export the
    /// process already).
    pub include_process: bool,
}

impl Default for ExpositionOptions {
    fn default() -> Self {
        ExpositionOptions {
            format: ExpositionFormat::Prometheus,
            include_process: true,
        }
    }
}

/// Metric type of a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric family.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    /// Without `_total` for counters (the OpenMetrics family name); see [`Family::exposed_name`].
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    /// OpenMetrics `# UNIT`, the name's suffix.
    pub unit: Option<&'static str>,
    pub process: bool,
    source: Source,
}

impl Family {
    /// The name as Prometheus 0.0.4 (and prom-client) shows it: counters end in `_total`.
    pub fn exposed_name(&self) -> String {
        match self.kind {
            Kind::Counter => format!("{}_total", self.name),
            _ => self.name.to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Source {
    PoolGauge(fn(&PoolGauges) -> u64),
    PoolCounter(fn(&PoolRecorder) -> u64),
    PoolTimeouts,
    PoolErrors,
    PoolLatency(fn(&PoolRecorder) -> &LatencyHistogram),
    CacheModels,
    CacheMemory,
    CacheCounter(fn(&CacheRecorder) -> u64),
    CacheEvictions,
    CacheLoadLatency,
    ModelPredictions,
    ModelMemory,
    ModelPredictLatency,
    Overdue,
    Process(fn(&ProcessSample) -> Option<u64>),
}

const fn family(name: &'static str, help: &'static str, kind: Kind, source: Source) -> Family {
    Family {
        name,
        help,
        kind,
        unit: None,
        process: false,
        source,
    }
}

const fn with_unit(f: Family, unit: &'static str) -> Family {
    Family {
        unit: Some(unit),
        ..f
    }
}

const fn of_process(f: Family) -> Family {
    Family { process: true, ..f }
}

use Kind::{Counter, Gauge, Histogram};

/// Every family quartermaster exports, in exposition order.
pub static FAMILIES: &[Family] = &[
    family(
        "qm_pool_connections_max",
        "Maximum connections the pool may open.",
        Gauge,
        Source::PoolGauge(|g| g.max_size),
    ),
    family(
        "qm_pool_connections",
        "Open connections, idle or in use.",
        Gauge,
        Source::PoolGauge(|g| g.size),
    ),
    family(
        "qm_pool_connections_active",
        "Connections leased out.",
        Gauge,
        Source::PoolGauge(|g| g.in_use),
    ),
    family(
        "qm_pool_connections_idle",
        "Open connections waiting in the pool.",
        Gauge,
        Source::PoolGauge(|g| g.idle),
    ),
    family(
        "qm_pool_connections_pending",
        "Callers waiting for a connection.",
        Gauge,
        Source::PoolGauge(|g| g.waiting),
    ),
    family(
        "qm_pool_acquires",
        "Connection acquires requested.",
        Counter,
        Source::PoolCounter(|p| p.gets.get()),
    ),
    family(
        "qm_pool_acquire_successes",
        "Connection acquires that returned a connection.",
        Counter,
        Source::PoolCounter(|p| p.successful_gets.get()),
    ),
    family(
        "qm_pool_connection_timeout",
        "Acquires that ran out of time, by phase (wait, connect, validate).",
        Counter,
        Source::PoolTimeouts,
    ),
    family(
        "qm_pool_acquire_rejected",
        "Acquires refused at once because the wait queue was full.",
        Counter,
        Source::PoolCounter(|p| p.rejected.get()),
    ),
    family(
        "qm_pool_errors",
        "Connect and query failures, by kind.",
        Counter,
        Source::PoolErrors,
    ),
    family(
        "qm_pool_connections_created",
        "Connections opened.",
        Counter,
        Source::PoolCounter(|p| p.created.get()),
    ),
    family(
        "qm_pool_connections_recycled",
        "Connections closed for age or idleness and replaced.",
        Counter,
        Source::PoolCounter(|p| p.recycled.get()),
    ),
    family(
        "qm_pool_connections_destroyed",
        "Connections closed.",
        Counter,
        Source::PoolCounter(|p| p.destroyed.get()),
    ),
    family(
        "qm_pool_leaked_leases",
        "Leases collected by the garbage collector without release.",
        Counter,
        Source::PoolCounter(|p| p.leaked_leases.get()),
    ),
    family(
        "qm_pool_listener_errors",
        "Exceptions thrown by listen() callbacks (the other callbacks carried on).",
        Counter,
        Source::PoolCounter(|p| p.listener_errors.get()),
    ),
    family(
        "qm_pool_queries",
        "Queries and commands run.",
        Counter,
        Source::PoolCounter(|p| p.queries.get()),
    ),
    with_unit(
        family(
            "qm_pool_acquire_seconds",
            "Time to acquire a connection.",
            Histogram,
            Source::PoolLatency(|p| &p.acquire_latency),
        ),
        "seconds",
    ),
    with_unit(
        family(
            "qm_pool_usage_seconds",
            "Time a connection was held by a lease.",
            Histogram,
            Source::PoolLatency(|p| &p.usage_latency),
        ),
        "seconds",
    ),
    with_unit(
        family(
            "qm_pool_query_seconds",
            "Time to run a query.",
            Histogram,
            Source::PoolLatency(|p| &p.query_latency),
        ),
        "seconds",
    ),
    family(
        "qm_model_cache_models",
        "Models held by the cache.",
        Gauge,
        Source::CacheModels,
    ),
    with_unit(
        family(
            "qm_model_cache_memory_bytes",
            "Bytes held by the cache, by device (host, gpu).",
            Gauge,
            Source::CacheMemory,
        ),
        "bytes",
    ),
    family(
        "qm_model_cache_loads",
        "Models loaded.",
        Counter,
        Source::CacheCounter(|c| c.loads.get()),
    ),
    family(
        "qm_model_cache_load_failures",
        "Model loads that failed.",
        Counter,
        Source::CacheCounter(|c| c.load_failures.get()),
    ),
    family(
        "qm_model_cache_hits",
        "Lookups served from the cache.",
        Counter,
        Source::CacheCounter(|c| c.hits.get()),
    ),
    family(
        "qm_model_cache_misses",
        "Lookups that had to load.",
        Counter,
        Source::CacheCounter(|c| c.misses.get()),
    ),
    family(
        "qm_model_cache_evictions",
        "Models removed, by reason (count, bytes, explicit, expired).",
        Counter,
        Source::CacheEvictions,
    ),
    family(
        "qm_model_cache_allocations",
        "Native buffers allocated for weights and workspaces.",
        Counter,
        Source::CacheCounter(|c| c.allocations.get()),
    ),
    family(
        "qm_model_cache_deallocations",
        "Native buffers freed.",
        Counter,
        Source::CacheCounter(|c| c.deallocations.get()),
    ),
    with_unit(
        family(
            "qm_model_cache_load_seconds",
            "Time to load a model.",
            Histogram,
            Source::CacheLoadLatency,
        ),
        "seconds",
    ),
    family(
        "qm_model_predictions",
        "Predictions run.",
        Counter,
        Source::ModelPredictions,
    ),
    with_unit(
        family(
            "qm_model_memory_bytes",
            "Bytes held by one model, by device (host, gpu).",
            Gauge,
            Source::ModelMemory,
        ),
        "bytes",
    ),
    with_unit(
        family(
            "qm_model_predict_seconds",
            "Time to run one prediction.",
            Histogram,
            Source::ModelPredictLatency,
        ),
        "seconds",
    ),
    family(
        "qm_resources_overdue",
        "Leases and model handles held past their leak threshold.",
        Gauge,
        Source::Overdue,
    ),
    of_process(with_unit(
        family(
            "qm_process_resident_memory_bytes",
            "Resident memory of the process.",
            Gauge,
            Source::Process(|s| Some(s.resident_bytes)),
        ),
        "bytes",
    )),
    of_process(with_unit(
        family(
            "qm_process_memory_limit_bytes",
            "Memory the process may use (cgroup limit or physical memory).",
            Gauge,
            Source::Process(|s| s.memory_limit_bytes),
        ),
        "bytes",
    )),
    of_process(family(
        "qm_process_open_fds",
        "Open file descriptors.",
        Gauge,
        Source::Process(|s| Some(s.open_fds)),
    )),
    of_process(family(
        "qm_process_max_fds",
        "Soft limit on open file descriptors.",
        Gauge,
        Source::Process(|s| s.max_fds),
    )),
    of_process(family(
        "qm_process_threads",
        "Operating-system threads of the process.",
        Gauge,
        Source::Process(|s| Some(s.threads)),
    )),
];

/// A sample value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Int(u64),
    Signed(i64),
    Float(f64),
}

impl Value {
    pub fn as_f64(self) -> f64 {
        match self {
            Value::Int(v) => v as f64,
            Value::Signed(v) => v as f64,
            Value::Float(v) => v,
        }
    }
}

/// Sample-name suffix within a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suffix {
    None,
    Total,
    Bucket,
    Sum,
    Count,
}

impl Suffix {
    pub fn as_str(self) -> &'static str {
        match self {
            Suffix::None => "",
            Suffix::Total => "_total",
            Suffix::Bucket => "_bucket",
            Suffix::Sum => "_sum",
            Suffix::Count => "_count",
        }
    }
}

/// Receives the samples of one family at a time. `le` is set on histogram buckets only.
pub trait Sink {
    fn sample(
        &mut self,
        family: &Family,
        suffix: Suffix,
        labels: &[(&str, &str)],
        le: Option<&str>,
        value: Value,
    );
}

/// The `le` label values, in seconds, formatted once (`1.0`, not `1`: canonical in both formats).
fn le_values() -> &'static [String] {
    static LE: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    LE.get_or_init(|| {
        BUCKET_BOUNDS_MICROS
            .iter()
            .map(|&us| {
                let secs = us as f64 / 1e6;
                if secs.fract() == 0.0 {
                    format!("{secs:.1}")
                } else {
                    format!("{secs}")
                }
            })
            .chain(std::iter::once("+Inf".to_string()))
            .collect()
    })
}

/// Everything a render reads, fetched once (each gauge callback runs once per pool).
pub struct Collection {
    pools: Vec<(Arc<PoolRecorder>, PoolGauges)>,
    caches: Vec<(Arc<CacheRecorder>, Vec<Arc<ModelRecorder>>)>,
    process: Option<ProcessSample>,
    overdue: usize,
}

impl Collection {
    pub fn gather(registry: &Registry, include_process: bool) -> Self {
        Collection {
            pools: registry
                .pools()
                .into_iter()
                .map(|p| {
                    let g = p.gauges();
                    (p, g)
                })
                .collect(),
            caches: registry
                .caches()
                .into_iter()
                .map(|c| {
                    let models = c.models();
                    (c, models)
                })
                .collect(),
            process: if include_process {
                process::sample()
            } else {
                None
            },
            overdue: registry.leaks_at(Instant::now()).len(),
        }
    }

    /// Emits every sample of `family` into `sink`.
    pub fn emit(&self, family: &Family, sink: &mut impl Sink) {
        let total = Suffix::Total;
        match family.source {
            Source::PoolGauge(read) => {
                for (p, g) in &self.pools {
                    sink.sample(
                        family,
                        Suffix::None,
                        &[("pool", &p.name)],
                        None,
                        Value::Int(read(g)),
                    );
                }
            }
            Source::PoolCounter(read) => {
                for (p, _) in &self.pools {
                    sink.sample(
                        family,
                        total,
                        &[("pool", &p.name)],
                        None,
                        Value::Int(read(p)),
                    );
                }
            }
            Source::PoolTimeouts => {
                for (p, _) in &self.pools {
                    for (phase, n) in [
                        ("wait", &p.timeouts_wait),
                        ("connect", &p.timeouts_connect),
                        ("validate", &p.timeouts_validate),
                    ] {
                        sink.sample(
                            family,
                            total,
                            &[("pool", &p.name), ("phase", phase)],
                            None,
                            Value::Int(n.get()),
                        );
                    }
                }
            }
            Source::PoolErrors => {
                for (p, _) in &self.pools {
                    for (kind, n) in [("connect", &p.errors_connect), ("query", &p.errors_query)] {
                        sink.sample(
                            family,
                            total,
                            &[("pool", &p.name), ("kind", kind)],
                            None,
                            Value::Int(n.get()),
                        );
                    }
                }
            }
            Source::PoolLatency(hist) => {
                for (p, _) in &self.pools {
                    histogram(sink, family, &[("pool", &p.name)], hist(p));
                }
            }
            Source::CacheModels => {
                for (c, _) in &self.caches {
                    sink.sample(
                        family,
                        Suffix::None,
                        &[("cache", &c.name)],
                        None,
                        Value::Signed(c.models.get()),
                    );
                }
            }
            Source::CacheMemory => {
                for (c, _) in &self.caches {
                    for (device, bytes) in [("host", &c.host_bytes), ("gpu", &c.gpu_bytes)] {
                        let labels = [("cache", c.name.as_str()), ("device", device)];
                        sink.sample(
                            family,
                            Suffix::None,
                            &labels,
                            None,
                            Value::Signed(bytes.get()),
                        );
                    }
                }
            }
            Source::CacheCounter(read) => {
                for (c, _) in &self.caches {
                    sink.sample(
                        family,
                        total,
                        &[("cache", &c.name)],
                        None,
                        Value::Int(read(c)),
                    );
                }
            }
            Source::CacheEvictions => {
                for (c, _) in &self.caches {
                    for (reason, n) in [
                        ("count", &c.evictions_count),
                        ("bytes", &c.evictions_bytes),
                        ("explicit", &c.evictions_explicit),
                        ("expired", &c.expirations),
                    ] {
                        sink.sample(
                            family,
                            total,
                            &[("cache", &c.name), ("reason", reason)],
                            None,
                            Value::Int(n.get()),
                        );
                    }
                }
            }
            Source::CacheLoadLatency => {
                for (c, _) in &self.caches {
                    histogram(sink, family, &[("cache", &c.name)], &c.load_latency);
                }
            }
            Source::ModelPredictions => {
                for (c, models) in &self.caches {
                    for m in models {
                        let labels = [("cache", c.name.as_str()), ("model", m.name.as_str())];
                        sink.sample(family, total, &labels, None, Value::Int(m.predicts.get()));
                    }
                }
            }
            Source::ModelMemory => {
                for (c, models) in &self.caches {
                    for m in models {
                        for (device, bytes) in [("host", &m.host_bytes), ("gpu", &m.gpu_bytes)] {
                            let labels = [
                                ("cache", c.name.as_str()),
                                ("model", m.name.as_str()),
                                ("device", device),
                            ];
                            sink.sample(
                                family,
                                Suffix::None,
                                &labels,
                                None,
                                Value::Signed(bytes.get()),
                            );
                        }
                    }
                }
            }
            Source::ModelPredictLatency => {
                for (c, models) in &self.caches {
                    for m in models {
                        let labels = [("cache", c.name.as_str()), ("model", m.name.as_str())];
                        histogram(sink, family, &labels, &m.predict_latency);
                    }
                }
            }
            Source::Overdue => sink.sample(
                family,
                Suffix::None,
                &[],
                None,
                Value::Int(self.overdue as u64),
            ),
            Source::Process(read) => {
                if let Some(v) = self.process.as_ref().and_then(read) {
                    sink.sample(family, Suffix::None, &[], None, Value::Int(v));
                }
            }
        }
    }
}

fn histogram(
    sink: &mut impl Sink,
    family: &Family,
    labels: &[(&str, &str)],
    hist: &LatencyHistogram,
) {
    let b = hist.buckets();
    for (le, count) in le_values().iter().zip(b.cumulative.iter()) {
        sink.sample(family, Suffix::Bucket, labels, Some(le), Value::Int(*count));
    }
    sink.sample(
        family,
        Suffix::Sum,
        labels,
        None,
        Value::Float(b.sum_micros as f64 / 1e6),
    );
    sink.sample(family, Suffix::Count, labels, None, Value::Int(b.count));
}

/// The families to export under `options`.
pub fn families(include_process: bool) -> impl Iterator<Item = &'static Family> {
    FAMILIES
        .iter()
        .filter(move |f| include_process || !f.process)
}

/// Renders text exposition. Families without samples are left out.
pub fn render(registry: &Registry, options: ExpositionOptions) -> String {
    let collection = Collection::gather(registry, options.include_process);
    let mut text = TextSink {
        out: String::with_capacity(16 * 1024),
        format: options.format,
        open: None,
    };
    for f in families(options.include_process) {
        collection.emit(f, &mut text);
    }
    let mut out = text.out;
    if options.format == ExpositionFormat::OpenMetrics {
        out.push_str("# EOF\n");
    }
    out
}

struct TextSink {
    out: String,
    format: ExpositionFormat,
    /// The family whose header was written last.
    open: Option<&'static str>,
}

impl Sink for TextSink {
    fn sample(
        &mut self,
        family: &Family,
        suffix: Suffix,
        labels: &[(&str, &str)],
        le: Option<&str>,
        value: Value,
    ) {
        let out = &mut self.out;
        if self.open != Some(family.name) {
            self.open = Some(family.name);
            write_header(out, family, self.format);
        }
        out.push_str(family.name);
        out.push_str(suffix.as_str());
        if !labels.is_empty() || le.is_some() {
            out.push('{');
            let mut first = true;
            let le_label = le.map(|v| ("le", v));
            for (name, v) in labels.iter().copied().chain(le_label) {
                if !first {
                    out.push(',');
                }
                first = false;
                out.push_str(name);
                out.push_str("=\"");
                escape_label_value(out, v);
                out.push('"');
            }
            out.push('}');
        }
        out.push(' ');
        write_value(out, value);
        out.push('\n');
    }
}

fn write_header(out: &mut String, family: &Family, format: ExpositionFormat) {
    // 0.0.4 names a counter family by its samples (`_total`); OpenMetrics by the bare name.
    let (name, suffix) = match (format, family.kind) {
        (ExpositionFormat::Prometheus, Kind::Counter) => (family.name, "_total"),
        _ => (family.name, ""),
    };
    let _ = writeln!(out, "# HELP {name}{suffix} {}", family.help);
    let _ = writeln!(out, "# TYPE {name}{suffix} {}", family.kind.as_str());
    if let (ExpositionFormat::OpenMetrics, Some(unit)) = (format, family.unit) {
        let _ = writeln!(out, "# UNIT {name} {unit}");
    }
}

/// Appends `value` escaped for a label: `\` → `\\`, `"` → `\"`, newline → `\n`.
pub fn escape_label_value(out: &mut String, value: &str) {
    if !value.bytes().any(|b| matches!(b, b'\\' | b'"' | b'\n')) {
        out.push_str(value);
        return;
    }
    for ch in value.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn write_value(out: &mut String, value: Value) {
    match value {
        Value::Int(v) => {
            let _ = write!(out, "{v}");
        }
        Value::Signed(v) => {
            let _ = write!(out, "{v}");
        }
        Value::Float(v) if v.is_nan() => out.push_str("NaN"),
        Value::Float(v) if v.is_infinite() => out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" }),
        Value::Float(v) => {
            let _ = write!(out, "{v}");
        }
    }
}

impl Registry {
    /// Text exposition of every series (see [`render`]).
    pub fn prometheus(&self, options: ExpositionOptions) -> String {
        render(self, options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::time::Duration;

    fn busy_registry() -> Arc<Registry> {
        let reg = Registry::new();
        let p = reg.register_pool("orders", "sqlite");
        p.gets.add(3);
        p.timeouts_connect.inc();
        p.acquire_latency.record(Duration::from_micros(300));
        p.acquire_latency.record(Duration::from_millis(2));
        p.set_gauges(|| {
            Some(PoolGauges {
                max_size: 8,
                size: 2,
                idle: 1,
                in_use: 1,
                waiting: 0,
            })
        });
        let c = reg.register_cache("default");
        c.record_eviction(super::super::EvictionReason::Bytes);
        c.model("btc \"lstm\"\\v1\nnext").predicts.add(4);
        reg
    }

    fn opts(format: ExpositionFormat) -> ExpositionOptions {
        ExpositionOptions {
            format,
            include_process: false,
        }
    }

    #[test]
    fn prometheus_text_has_help_type_totals_and_cumulative_buckets() {
        let text = busy_registry().prometheus(opts(ExpositionFormat::Prometheus));
        assert!(text.contains("# HELP qm_pool_acquires_total Connection acquires requested.\n"));
        assert!(text.contains(
            "# TYPE qm_pool_acquires_total counter\nqm_pool_acquires_total{pool=\"orders\"} 3\n"
        ));
        assert!(text
            .contains("qm_pool_connection_timeout_total{pool=\"orders\",phase=\"connect\"} 1\n"));
        assert!(text.contains("qm_pool_connections_active{pool=\"orders\"} 1\n"));
        assert!(text.contains("qm_pool_acquire_seconds_bucket{pool=\"orders\",le=\"0.0001\"} 0\n"));
        assert!(text.contains("qm_pool_acquire_seconds_bucket{pool=\"orders\",le=\"0.0005\"} 1\n"));
        assert!(text.contains("qm_pool_acquire_seconds_bucket{pool=\"orders\",le=\"0.0025\"} 2\n"));
        assert!(text.contains("qm_pool_acquire_seconds_bucket{pool=\"orders\",le=\"1.0\"} 2\n"));
        assert!(text.contains("qm_pool_acquire_seconds_bucket{pool=\"orders\",le=\"+Inf\"} 2\n"));
        assert!(text.contains("qm_pool_acquire_seconds_sum{pool=\"orders\"} 0.0023\n"));
        assert!(text.contains("qm_pool_acquire_seconds_count{pool=\"orders\"} 2\n"));
        assert!(
            text.contains("qm_model_cache_evictions_total{cache=\"default\",reason=\"bytes\"} 1\n")
        );
        assert!(!text.contains("# EOF"));
        assert!(!text.contains("qm_process_"));
    }

    #[test]
    fn label_values_are_escaped() {
        let text = busy_registry().prometheus(opts(ExpositionFormat::Prometheus));
        assert!(
            text.contains(
                r#"qm_model_predictions_total{cache="default",model="btc \"lstm\"\\v1\nnext"} 4"#
            ),
            "{text}"
        );
    }

    #[test]
    fn every_family_header_appears_once() {
        let text = busy_registry().prometheus(opts(ExpositionFormat::Prometheus));
        let mut seen = HashSet::new();
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            assert!(
                seen.insert(line.split(' ').nth(2).unwrap().to_string()),
                "duplicate {line}"
            );
        }
        // Every sample belongs to the family declared just before it.
        let mut current = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                current = rest.split(' ').next().unwrap().to_string();
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|b| *b == current))
                    .unwrap_or(name);
                assert_eq!(base, current, "{line}");
            }
        }
    }

    #[test]
    fn openmetrics_names_counter_families_bare_and_ends_with_eof() {
        let text = busy_registry().prometheus(opts(ExpositionFormat::OpenMetrics));
        assert!(text.contains("# TYPE qm_pool_acquires counter\n"));
        assert!(text.contains("qm_pool_acquires_total{pool=\"orders\"} 3\n"));
        assert!(text.contains("# UNIT qm_pool_acquire_seconds seconds\n"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn process_series_are_optional() {
        let reg = busy_registry();
        let with = reg.prometheus(ExpositionOptions {
            format: ExpositionFormat::Prometheus,
            include_process: true,
        });
        if cfg!(target_os = "linux") {
            assert!(with.contains("qm_process_resident_memory_bytes "));
            assert!(with.contains("qm_process_open_fds "));
            assert!(with.contains("qm_process_threads "));
        }
    }

    #[test]
    fn counters_stay_monotonic_across_reset() {
        let reg = busy_registry();
        let before = reg.prometheus(opts(ExpositionFormat::Prometheus));
        reg.reset();
        let after = reg.prometheus(opts(ExpositionFormat::Prometheus));
        assert_eq!(before, after);
        assert_eq!(reg.snapshot_at(Instant::now(), false).pool_gets, 0);
    }

    #[test]
    fn le_values_are_canonical() {
        let le = le_values();
        assert_eq!(le[0], "0.0001");
        assert_eq!(le[12], "1.0");
        assert_eq!(le[13], "2.5");
        assert_eq!(le.last().unwrap(), "+Inf");
    }
}
