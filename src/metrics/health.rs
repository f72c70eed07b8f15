//! `health()`: pool, cache, process and leak checks folded into one status and score.

use std::time::Instant;

use super::process::{AlertLevel, AlertThresholds};
use super::snapshot::{ratio, Snapshot};
use super::Registry;

/// Overall verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthStatus {
    Healthy,
    Degraded,
    Unhealthy,
}

impl HealthStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Healthy => "healthy",
            HealthStatus::Degraded => "degraded",
            HealthStatus::Unhealthy => "unhealthy",
        }
    }
}

/// One check behind the verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// `pool.utilization`, `pool.waiting`, `pool.failures`, `cache.misses`, `cache.load_failures`,
    /// `process.memory`, `process.fds`, `process.memory_growth`, `process.fd_growth`, `leaks`.
    pub name: &'static str,
    /// The pool or cache name; `process` / `registry` otherwise.
    pub target: String,
    pub level: AlertLevel,
    /// The measured value (a percentage, a count or a slope; see `message`).
    pub value: f64,
    /// What was measured, in words a person can act on.
    pub message: String,
}

/// `{ status, score, checks }`.
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    pub status: HealthStatus,
    /// 100 minus a penalty per failing check (warning 10, error 25, critical 50), floored at 0.
    pub score: f64,
    pub checks: Vec<Check>,
}

/// Lookups below which a cache's hit rate is not judged (a cold cache misses by design).
const MIN_LOOKUPS: u64 = 20;
/// Acquires below which a pool's failure ratio is not judged.
const MIN_ACQUIRES: u64 = 20;

impl Health {
    /// Folds checks into a verdict: any critical → unhealthy, any warning or error → degraded.
    pub fn from_checks(checks: Vec<Check>) -> Health {
        let worst = checks
            .iter()
            .map(|c| c.level)
            .max()
            .unwrap_or(AlertLevel::Ok);
        let penalty: f64 = checks
            .iter()
            .map(|c| match c.level {
                AlertLevel::Ok => 0.0,
                AlertLevel::Warning => 10.0,
                AlertLevel::Error => 25.0,
                AlertLevel::Critical => 50.0,
            })
            .sum();
        let status = match worst {
            AlertLevel::Critical => HealthStatus::Unhealthy,
            AlertLevel::Error | AlertLevel::Warning => HealthStatus::Degraded,
            AlertLevel::Ok => HealthStatus::Healthy,
        };
        Health {
            status,
            score: (100.0 - penalty).max(0.0),
            checks,
        }
    }
}

/// Every check for a snapshot, with `overdue` live resources (the leak report's length).
pub fn checks(snapshot: &Snapshot, overdue: usize, t: &AlertThresholds) -> Vec<Check> {
    let mut out = Vec::new();
    for p in &snapshot.pools {
        let g = p.gauges;
        if g.max_size > 0 {
            out.push(Check {
                name: "pool.utilization",
                target: p.name.clone(),
                level: t.pool_utilization_percent.level(p.utilization_percent),
                value: p.utilization_percent,
                message: format!(
                    "{} of {} connections in use ({:.0} %)",
                    g.in_use, g.max_size, p.utilization_percent
                ),
            });
        }
        let waiting_level = if g.waiting == 0 {
            AlertLevel::Ok
        } else if g.max_size > 0 && g.waiting >= g.max_size {
            AlertLevel::Error
        } else {
            AlertLevel::Warning
        };
        out.push(Check {
            name: "pool.waiting",
            target: p.name.clone(),
            level: waiting_level,
            value: g.waiting as f64,
            message: format!("{} callers waiting for a connection", g.waiting),
        });
        let c = &p.counts;
        // Acquires still waiting are neither successes nor failures.
        let failed = c.timeouts() + c.rejected + c.errors_connect;
        let failure_percent = ratio(failed, c.gets).unwrap_or(0.0) * 100.0;
        out.push(Check {
            name: "pool.failures",
            target: p.name.clone(),
            level: if c.gets >= MIN_ACQUIRES {
                t.pool_failure_percent.level(failure_percent)
            } else {
                AlertLevel::Ok
            },
            value: failure_percent,
            message: format!(
                "{failed} of {} acquires failed since reset ({} timeouts, {} rejected, {} connect errors)",
                c.gets,
                c.timeouts(),
                c.rejected,
                c.errors_connect
            ),
        });
    }
    for c in &snapshot.caches {
        let lookups = c.counts.hits + c.counts.misses;
        let miss_percent = ratio(c.counts.misses, lookups).unwrap_or(0.0) * 100.0;
        out.push(Check {
            name: "cache.misses",
            target: c.name.clone(),
            level: if lookups >= MIN_LOOKUPS {
                t.cache_miss_percent.level(miss_percent)
            } else {
                AlertLevel::Ok
            },
            value: miss_percent,
            message: format!(
                "{} of {lookups} lookups missed since reset",
                c.counts.misses
            ),
        });
        out.push(Check {
            name: "cache.load_failures",
            target: c.name.clone(),
            level: if c.counts.load_failures > 0 {
                AlertLevel::Warning
            } else {
                AlertLevel::Ok
            },
            value: c.counts.load_failures as f64,
            message: format!("{} model loads failed since reset", c.counts.load_failures),
        });
    }
    if let Some(p) = &snapshot.process {
        if let Some(pct) = p.memory_percent {
            out.push(Check {
                name: "process.memory",
                target: "process".into(),
                level: p.memory_level,
                value: pct,
                message: format!(
                    "resident memory {:.0} MiB, {pct:.1} % of the limit",
                    p.sample.resident_bytes as f64 / (1024.0 * 1024.0)
                ),
            });
        }
        if let Some(pct) = p.fd_percent {
            out.push(Check {
                name: "process.fds",
                target: "process".into(),
                level: p.fd_level,
                value: pct,
                message: format!(
                    "{} open file descriptors of {} ({pct:.1} %)",
                    p.sample.open_fds,
                    p.sample.max_fds.unwrap_or(0)
                ),
            });
        }
        for (name, report, unit) in [
            ("process.memory_growth", &p.memory_growth, "bytes"),
            ("process.fd_growth", &p.fd_growth, "descriptors"),
        ] {
            out.push(Check {
                name,
                target: "process".into(),
                level: if report.suspected_leak {
                    AlertLevel::Warning
                } else {
                    AlertLevel::Ok
                },
                value: report.slope_per_sec,
                message: if report.suspected_leak {
                    format!(
                        "steady growth: {:.1} {unit}/s over {:.0} s (R² {:.2}), suspected leak",
                        report.slope_per_sec, report.window_seconds, report.r_squared
                    )
                } else {
                    format!("no steady growth over {} samples", report.samples)
                },
            });
        }
    }
    out.push(Check {
        name: "leaks",
        target: "registry".into(),
        level: if overdue > 0 {
            AlertLevel::Warning
        } else {
            AlertLevel::Ok
        },
        value: overdue as f64,
        message: format!("{overdue} leases or model handles held past their leak threshold"),
    });
    out
}

impl Registry {
    /// Pool, cache, process and leak checks folded into one verdict.
    pub fn health(&self) -> Health {
        self.health_at(Instant::now(), true)
    }

    /// [`health`](Registry::health) with the clock injected; `with_process` reads `/proc`.
    pub fn health_at(&self, now: Instant, with_process: bool) -> Health {
        let snapshot = self.snapshot_at(now, with_process);
        let overdue = self.leaks_at(now).len();
        Health::from_checks(checks(&snapshot, overdue, &self.alert_thresholds()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{LiveResource, PoolGauges, ProcessSample};
    use std::time::Duration;

    #[test]
    fn quiet_registry_is_healthy() {
        let h = Registry::new().health_at(Instant::now(), false);
        assert_eq!(h.status, HealthStatus::Healthy);
        assert_eq!(h.score, 100.0);
        assert_eq!(
            h.checks.len(),
            1,
            "only the leak check without pools or caches"
        );
    }

    #[test]
    fn saturated_pool_with_waiters_and_timeouts_is_unhealthy() {
        let reg = Registry::new();
        let p = reg.register_pool("orders", "sqlite");
        p.set_gauges(|| {
            Some(PoolGauges {
                max_size: 4,
                size: 4,
                idle: 0,
                in_use: 4,
                waiting: 9,
            })
        });
        p.gets.add(100);
        p.successful_gets.add(70);
        p.timeouts_wait.add(30);
        let h = reg.health_at(Instant::now(), false);
        assert_eq!(h.status, HealthStatus::Unhealthy);
        let level = |name| h.checks.iter().find(|c| c.name == name).unwrap().level;
        assert_eq!(level("pool.utilization"), AlertLevel::Critical);
        assert_eq!(level("pool.waiting"), AlertLevel::Error);
        assert_eq!(level("pool.failures"), AlertLevel::Critical);
        assert_eq!(h.score, 0.0);

        // After a reset the failure ratio starts over; occupancy is still what it is.
        reg.reset();
        let h = reg.health_at(Instant::now(), false);
        let level = |name| h.checks.iter().find(|c| c.name == name).unwrap().level;
        assert_eq!(level("pool.failures"), AlertLevel::Ok);
        assert_eq!(level("pool.utilization"), AlertLevel::Critical);
    }

    #[test]
    fn cold_cache_is_not_judged_but_a_missing_one_is() {
        let reg = Registry::new();
        let c = reg.register_cache("default");
        c.misses.add(5);
        let h = reg.health_at(Instant::now(), false);
        assert_eq!(h.status, HealthStatus::Healthy);
        c.misses.add(40);
        c.hits.add(55);
        let h = reg.health_at(Instant::now(), false);
        let misses = h.checks.iter().find(|c| c.name == "cache.misses").unwrap();
        assert_eq!(misses.level, AlertLevel::Warning, "{misses:?}");
        assert_eq!(h.status, HealthStatus::Degraded);
    }

    #[test]
    fn overdue_leases_degrade() {
        let reg = Registry::new();
        let now = Instant::now();
        let _lease = reg.live.track(LiveResource {
            kind: "lease",
            name: "orders".into(),
            acquired_at: now,
            threshold: Duration::from_secs(30),
            stack: None,
        });
        assert_eq!(reg.health_at(now, false).status, HealthStatus::Healthy);
        let later = now + Duration::from_secs(31);
        let h = reg.health_at(later, false);
        assert_eq!(h.status, HealthStatus::Degraded);
        assert_eq!(h.score, 90.0);
    }

    #[test]
    fn process_levels_follow_configured_thresholds() {
        let reg = Registry::new();
        let sample = ProcessSample {
            resident_bytes: 80,
            open_fds: 10,
            max_fds: Some(100),
            threads: 4,
            memory_limit_bytes: Some(100),
        };
        let graded = reg.grade_process(Instant::now(), sample);
        assert_eq!(graded.memory_level, AlertLevel::Warning);
        assert_eq!(graded.fd_level, AlertLevel::Ok);
        let mut t = reg.alert_thresholds();
        t.memory_percent = crate::metrics::Thresholds::new(50.0, 60.0, 75.0);
        reg.set_alert_thresholds(t);
        assert_eq!(
            reg.grade_process(Instant::now(), sample).memory_level,
            AlertLevel::Critical
        );
    }
}
