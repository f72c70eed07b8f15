//! What a pool reports about itself: status, metrics, health, sizing advice.

pub use crate::metrics::health::HealthStatus;
use crate::metrics::{Percentiles, PoolGauges, PoolRecorder};
use crate::pool::config::PoolConfig;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStatus {
    pub max_size: u64,
    pub size: u64,
    pub idle: u64,
    pub in_use: u64,
    pub waiting: u64,
    /// Open connections per server (`host:port`, never credentials); PostgreSQL only.
    pub hosts: Vec<(String, usize)>,
}

/// The seed's `PoolMetrics` fields plus lifecycle counters and latency percentiles.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolMetrics {
    pub max_size: u64,
    pub current_size: u64,
    pub available: u64,
    pub in_use: u64,
    pub waiting: u64,
    pub total_gets: u64,
    pub successful_gets: u64,
    pub timeouts: u64,
    pub errors: u64,
    /// Percent of gets that succeeded (100 before the first get).
    pub success_rate: f64,
    pub uptime_seconds: f64,
    pub created: u64,
    pub recycled: u64,
    pub destroyed: u64,
    pub leaked_leases: u64,
    pub listener_errors: u64,
    pub inline_statements: u64,
    pub rejected: u64,
    pub acquire: Percentiles,
    pub usage: Percentiles,
    pub query: Percentiles,
}

impl PoolMetrics {
    pub fn from_recorder(r: &PoolRecorder, g: PoolGauges) -> PoolMetrics {
        let total = r.gets.get();
        let ok = r.successful_gets.get();
        PoolMetrics {
            max_size: g.max_size,
            current_size: g.size,
            available: g.idle,
            in_use: g.in_use,
            waiting: g.waiting,
            total_gets: total,
            successful_gets: ok,
            timeouts: r.timeouts(),
            errors: r.errors(),
            success_rate: if total == 0 {
                100.0
            } else {
                ok as f64 * 100.0 / total as f64
            },
            uptime_seconds: r.started.elapsed().as_secs_f64(),
            created: r.created.get(),
            recycled: r.recycled.get(),
            destroyed: r.destroyed.get(),
            leaked_leases: r.leaked_leases.get(),
            listener_errors: r.listener_errors.get(),
            inline_statements: r.inline_statements.get(),
            rejected: r.rejected.get(),
            acquire: r.acquire_latency.percentiles(),
            usage: r.usage_latency.percentiles(),
            query: r.query_latency.percentiles(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolHealth {
    pub status: HealthStatus,
    /// 0..=100.
    pub health_score: f64,
    pub available_connections: u64,
    pub waiting_requests: u64,
    pub utilization_percent: f64,
}

impl PoolHealth {
    /// Scores 100 minus penalties for saturation, queueing and failed gets.
    pub fn assess(m: &PoolMetrics, closed: bool) -> PoolHealth {
        let utilization = if m.max_size == 0 {
            100.0
        } else {
            m.in_use as f64 * 100.0 / m.max_size as f64
        };
        let score = if closed {
            0.0
        } else {
            let saturation = ((utilization - 80.0).max(0.0) / 20.0) * 30.0;
            let queueing = if m.max_size == 0 {
                0.0
            } else {
                (m.waiting as f64 / m.max_size as f64).min(1.0) * 30.0
            };
            let failures = ((100.0 - m.success_rate) * 2.0).min(40.0);
            (100.0 - saturation - queueing - failures).clamp(0.0, 100.0)
        };
        let status = match score {
            s if s >= 80.0 => HealthStatus::Healthy,
            s if s >= 50.0 => HealthStatus::Degraded,
            _ => HealthStatus::Unhealthy,
        };
        PoolHealth {
            status,
            health_score: (score * 10.0).round() / 10.0,
            available_connections: m.available,
            waiting_requests: m.waiting,
            utilization_percent: (utilization * 10.0).round() / 10.0,
        }
    }
}

/// One piece of sizing or usage advice.
#[derive(Debug, Clone, PartialEq)]
pub struct Recommendation {
    /// `increase-max-size`, `decrease-max-size`, `connect-failures`, `leaked-leases`, `ok`.
    pub kind: &'static str,
    /// `info` or `warning`.
    pub severity: &'static str,
    pub message: String,
    /// The `maxSize` suggested, when the advice is about size.
    pub suggested_max_size: Option<u64>,
}

/// Advice from observed waits, timeouts and utilisation.
pub fn recommend(m: &PoolMetrics, peak_in_use: u64, config: &PoolConfig) -> Vec<Recommendation> {
    let mut out = Vec::new();
    let max = config.max_size as u64;
    let acquire_budget_ms = config.acquire_timeout.as_secs_f64() * 1000.0;
    let queued = m.timeouts > 0 || m.rejected > 0 || m.acquire.p95 > acquire_budget_ms * 0.25;
    if queued && peak_in_use >= max {
        let suggested = (max + max / 2).clamp(max + 1, crate::pool::config::MAX_POOL_SIZE as u64);
        out.push(Recommendation {
            kind: "increase-max-size",
            severity: "warning",
            message: format!(
                "callers waited for connections ({} timeouts, {} rejected, acquire p95 {:.1} ms) while all {max} were in use; raise maxSize to about {suggested} if the database has headroom",
                m.timeouts, m.rejected, m.acquire.p95
            ),
            suggested_max_size: Some(suggested),
        });
    } else if m.total_gets >= 1000 && peak_in_use * 4 <= max && max > 2 {
        let suggested = (peak_in_use * 2).max(2);
        out.push(Recommendation {
            kind: "decrease-max-size",
            severity: "info",
            message: format!(
                "at most {peak_in_use} of {max} connections were ever in use over {} gets; maxSize {suggested} would hold fewer server connections",
                m.total_gets
            ),
            suggested_max_size: Some(suggested),
        });
    }
    if m.errors > 0 && m.created == 0 {
        out.push(Recommendation {
            kind: "connect-failures",
            severity: "warning",
            message: "no connection could be opened yet; check the URL, network and credentials"
                .into(),
            suggested_max_size: None,
        });
    }
    if m.leaked_leases > 0 {
        out.push(Recommendation {
            kind: "leaked-leases",
            severity: "warning",
            message: format!(
                "{} leases were garbage-collected without release(); use `await using` or try/finally, and set leakDetectionMs to find where they are taken",
                m.leaked_leases
            ),
            suggested_max_size: None,
        });
    }
    if out.is_empty() {
        out.push(Recommendation {
            kind: "ok",
            severity: "info",
            message: format!("pool size {max} fits the observed load (peak {peak_in_use} in use)"),
            suggested_max_size: None,
        });
    }
    out
}
