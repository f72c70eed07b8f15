//! Process monitor: resident memory, open file descriptors against their limit, threads (read
//! from `/proc` on Linux; other systems report `None`), alert levels, and a steady-growth
//! detector that flags a suspected leak.

use std::collections::VecDeque;
use std::time::Instant;

/// One reading of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessSample {
    pub resident_bytes: u64,
    pub open_fds: u64,
    /// Soft limit on open files (`ulimit -n`); `None` when unlimited.
    pub max_fds: Option<u64>,
    pub threads: u64,
    /// The memory the process may use: the cgroup limit when one is set, else physical memory.
    pub memory_limit_bytes: Option<u64>,
}

impl ProcessSample {
    pub fn memory_percent(&self) -> Option<f64> {
        percent(self.resident_bytes, self.memory_limit_bytes)
    }

    pub fn fd_percent(&self) -> Option<f64> {
        percent(self.open_fds, self.max_fds)
    }
}

fn percent(used: u64, limit: Option<u64>) -> Option<f64> {
    limit
        .filter(|&l| l > 0)
        .map(|l| used as f64 * 100.0 / l as f64)
}

/// Reads the current process. `None` where `/proc` is not available.
pub fn sample() -> Option<ProcessSample> {
    #[cfg(target_os = "linux")]
    {
        linux::sample()
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use super::{open_files_soft_limit, status_kib, status_value, ProcessSample};
    use std::fs;

    pub(super) fn sample() -> Option<ProcessSample> {
        let status = fs::read_to_string("/proc/self/status").ok()?;
        let resident_bytes = status_kib(&status, "VmRSS:")? * 1024;
        let threads = status_value(&status, "Threads:")?;
        let open_fds = fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        let max_fds = fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|l| open_files_soft_limit(&l));
        let physical = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| status_kib(&m, "MemTotal:"))
            .map(|kib| kib * 1024);
        let cgroup = fs::read_to_string("/sys/fs/cgroup/memory.max")
            .or_else(|_| fs::read_to_string("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        let memory_limit_bytes = match (cgroup, physical) {
            (Some(c), Some(p)) => Some(c.min(p)),
            (c, p) => c.or(p),
        };
        Some(ProcessSample {
            resident_bytes,
            open_fds,
            max_fds,
            threads,
            memory_limit_bytes,
        })
    }
}

/// The number after `key` on its line (`/proc/self/status`, `/proc/meminfo` layout).
pub(crate) fn status_value(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// A `kB` value from `/proc/self/status` or `/proc/meminfo`.
pub(crate) fn status_kib(text: &str, key: &str) -> Option<u64> {
    status_value(text, key)
}

/// The soft `Max open files` limit from `/proc/self/limits`; `None` if unlimited or absent.
pub(crate) fn open_files_soft_limit(limits: &str) -> Option<u64> {
    limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|soft| soft.parse().ok())
}

/// How bad a reading is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum AlertLevel {
    #[default]
    Ok,
    Warning,
    Error,
    Critical,
}

impl AlertLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertLevel::Ok => "ok",
            AlertLevel::Warning => "warning",
            AlertLevel::Error => "error",
            AlertLevel::Critical => "critical",
        }
    }
}

/// Percent levels at which a reading becomes a warning, an error, critical (each inclusive).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    pub warning: f64,
    pub error: f64,
    pub critical: f64,
}

impl Thresholds {
    pub const fn new(warning: f64, error: f64, critical: f64) -> Self {
        Thresholds {
            warning,
            error,
            critical,
        }
    }

    /// Levels must not decrease: warning ≤ error ≤ critical, all finite.
    pub fn is_valid(&self) -> bool {
        [self.warning, self.error, self.critical]
            .iter()
            .all(|v| v.is_finite())
            && self.warning <= self.error
            && self.error <= self.critical
    }

    /// The level of a value where higher is worse.
    pub fn level(&self, value: f64) -> AlertLevel {
        if value >= self.critical {
            AlertLevel::Critical
        } else if value >= self.error {
            AlertLevel::Error
        } else if value >= self.warning {
            AlertLevel::Warning
        } else {
            AlertLevel::Ok
        }
    }
}

/// Every configurable alert threshold, in percent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AlertThresholds {
    /// Resident memory as a percentage of the memory limit. Default 70 / 85 / 95.
    pub memory_percent: Thresholds,
    /// Open file descriptors as a percentage of the soft limit. Default 70 / 85 / 95.
    pub fd_percent: Thresholds,
    /// Connections in use as a percentage of a pool's maximum. Default 80 / 90 / 100.
    pub pool_utilization_percent: Thresholds,
    /// Failed acquires as a percentage of acquires since the last reset. Default 1 / 5 / 20
    /// (the seeds expect ≥ 95 % success under load).
    pub pool_failure_percent: Thresholds,
    /// Cache misses as a percentage of lookups since the last reset. Default 30 / 50 / 80
    /// (the seeds expect a hit rate above 70 %).
    pub cache_miss_percent: Thresholds,
}

impl Default for AlertThresholds {
    fn default() -> Self {
        AlertThresholds {
            memory_percent: Thresholds::new(70.0, 85.0, 95.0),
            fd_percent: Thresholds::new(70.0, 85.0, 95.0),
            pool_utilization_percent: Thresholds::new(80.0, 90.0, 100.0),
            pool_failure_percent: Thresholds::new(1.0, 5.0, 20.0),
            cache_miss_percent: Thresholds::new(30.0, 50.0, 80.0),
        }
    }
}

/// Tuning of the growth detector.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GrowthConfig {
    /// Samples kept in the sliding window.
    pub window: usize,
    /// Samples needed before any verdict.
    pub min_samples: usize,
    /// Least-squares fit quality (R²) at or above which growth counts as steady, not noise.
    pub min_r_squared: f64,
    /// Growth over the window, as a percentage of the window's mean, at or above which it matters.
    pub min_growth_percent: f64,
    /// Share of consecutive steps that must go up (a leak climbs most of the time).
    pub min_rising_fraction: f64,
}

impl Default for GrowthConfig {
    fn default() -> Self {
        GrowthConfig {
            window: 60,
            min_samples: 12,
            min_r_squared: 0.8,
            min_growth_percent: 5.0,
            min_rising_fraction: 0.6,
        }
    }
}

/// What the growth detector concluded from its window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GrowthReport {
    pub suspected_leak: bool,
    /// Least-squares slope, units per second.
    pub slope_per_sec: f64,
    pub r_squared: f64,
    /// Fitted growth across the window as a percentage of the window's mean.
    pub growth_percent: f64,
    pub samples: usize,
    pub window_seconds: f64,
}

/// Least-squares slope over a sliding window plus two consistency tests (fit quality, share of
/// rising steps): fires on a steady climb, stays quiet on a flat series however noisy.
#[derive(Debug, Clone)]
pub struct GrowthDetector {
    config: GrowthConfig,
    origin: Option<Instant>,
    samples: VecDeque<(f64, f64)>,
}

impl GrowthDetector {
    pub fn new(config: GrowthConfig) -> Self {
        GrowthDetector {
            config,
            origin: None,
            samples: VecDeque::with_capacity(config.window.max(2)),
        }
    }

    pub fn config(&self) -> GrowthConfig {
        self.config
    }

    /// Adds a reading taken at `at`.
    pub fn push(&mut self, at: Instant, value: f64) {
        let origin = *self.origin.get_or_insert(at);
        self.push_seconds(at.saturating_duration_since(origin).as_secs_f64(), value);
    }

    /// Adds a reading at `seconds` on the detector's own time axis (recorded series, tests).
    pub fn push_seconds(&mut self, seconds: f64, value: f64) {
        if !seconds.is_finite() || !value.is_finite() {
            return;
        }
        if self.samples.len() >= self.config.window.max(2) {
            self.samples.pop_front();
        }
        self.samples.push_back((seconds, value));
    }

    pub fn clear(&mut self) {
        self.samples.clear();
        self.origin = None;
    }

    pub fn report(&self) -> GrowthReport {
        let n = self.samples.len();
        let mut report = GrowthReport {
            samples: n,
            ..GrowthReport::default()
        };
        if n < 2 {
            return report;
        }
        let nf = n as f64;
        let (sum_t, sum_v) = self
            .samples
            .iter()
            .fold((0.0, 0.0), |(st, sv), &(t, v)| (st + t, sv + v));
        let (mean_t, mean_v) = (sum_t / nf, sum_v / nf);
        let (mut stt, mut stv, mut svv) = (0.0, 0.0, 0.0);
        for &(t, v) in &self.samples {
            let (dt, dv) = (t - mean_t, v - mean_v);
            stt += dt * dt;
            stv += dt * dv;
            svv += dv * dv;
        }
        let first_t = self.samples.front().map_or(0.0, |s| s.0);
        let last_t = self.samples.back().map_or(0.0, |s| s.0);
        report.window_seconds = last_t - first_t;
        if stt <= 0.0 {
            return report;
        }
        let slope = stv / stt;
        report.slope_per_sec = slope;
        report.r_squared = if svv > 0.0 {
            (stv * stv) / (stt * svv)
        } else {
            0.0
        };
        report.growth_percent = if mean_v.abs() > f64::EPSILON {
            slope * report.window_seconds * 100.0 / mean_v.abs()
        } else {
            0.0
        };
        let steps = n - 1;
        let rising = self
            .samples
            .iter()
            .zip(self.samples.iter().skip(1))
            .filter(|(a, b)| b.1 > a.1)
            .count();
        let rising_fraction = rising as f64 / steps as f64;
        let c = &self.config;
        report.suspected_leak = n >= c.min_samples
            && slope > 0.0
            && report.r_squared >= c.min_r_squared
            && report.growth_percent >= c.min_growth_percent
            && rising_fraction >= c.min_rising_fraction;
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic noise source (xorshift), so recorded series are reproducible.
    fn noise(seed: &mut u64) -> f64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        (*seed % 10_000) as f64 / 10_000.0 - 0.5
    }

    const MIB: f64 = 1024.0 * 1024.0;

    fn detector_over(series: impl Iterator<Item = (f64, f64)>) -> GrowthReport {
        let mut d = GrowthDetector::new(GrowthConfig::default());
        for (t, v) in series {
            d.push_seconds(t, v);
        }
        d.report()
    }

    #[test]
    fn fires_on_a_steady_leak_with_noise() {
        // 200 MiB resident, leaking 1 MiB per 10 s sample, ±1 MiB noise.
        let mut seed = 42;
        let report = detector_over((0..60).map(|i| {
            let t = i as f64 * 10.0;
            (
                t,
                200.0 * MIB + i as f64 * MIB + 2.0 * MIB * noise(&mut seed),
            )
        }));
        assert!(report.suspected_leak, "{report:?}");
        assert!(
            (report.slope_per_sec - MIB / 10.0).abs() < MIB / 50.0,
            "{report:?}"
        );
        assert!(report.r_squared > 0.9, "{report:?}");
    }

    #[test]
    fn quiet_on_a_flat_noisy_series() {
        // Same level, ±20 MiB noise (GC sawtooth): no trend.
        let mut seed = 7;
        let report = detector_over(
            (0..60).map(|i| (i as f64 * 10.0, 200.0 * MIB + 40.0 * MIB * noise(&mut seed))),
        );
        assert!(!report.suspected_leak, "{report:?}");
        assert!(report.r_squared < 0.3, "{report:?}");
    }

    #[test]
    fn quiet_on_a_sawtooth_and_on_a_one_off_step() {
        // GC sawtooth: climbs then drops, every 6 samples.
        let saw =
            detector_over((0..60).map(|i| (i as f64, 100.0 * MIB + (i % 6) as f64 * 5.0 * MIB)));
        assert!(!saw.suspected_leak, "{saw:?}");
        // A cache warming up once: one step, then flat.
        let step = detector_over(
            (0..60).map(|i| (i as f64, if i < 30 { 100.0 * MIB } else { 150.0 * MIB })),
        );
        assert!(!step.suspected_leak, "{step:?}");
    }

    #[test]
    fn quiet_on_tiny_growth_and_before_enough_samples() {
        // Steady but negligible: 0.5 % over the window.
        let tiny = detector_over((0..60).map(|i| (i as f64, 1000.0 + i as f64 * 0.083)));
        assert!(!tiny.suspected_leak, "{tiny:?}");
        let short = detector_over((0..5).map(|i| (i as f64, 100.0 * (i + 1) as f64)));
        assert!(!short.suspected_leak, "{short:?}");
    }

    #[test]
    fn window_slides_so_a_leak_that_stopped_clears() {
        let mut d = GrowthDetector::new(GrowthConfig::default());
        for i in 0..60 {
            d.push_seconds(i as f64, 100.0 + i as f64 * 10.0);
        }
        assert!(d.report().suspected_leak);
        let mut seed = 3;
        for i in 60..120 {
            d.push_seconds(i as f64, 700.0 + noise(&mut seed));
        }
        assert!(!d.report().suspected_leak, "{:?}", d.report());
    }

    /// Resident memory (KiB) of a Node process, sampled every 50 ms: V8 churning garbage at a
    /// steady working set (young-generation spikes of ~10 MiB every fourth sample) …
    const RECORDED_FLAT_WITH_GC_SPIKES: [u32; 60] = [
        83244, 83372, 83500, 93008, 83232, 83360, 83488, 92968, 83200, 83328, 83584, 93080, 83500,
        83628, 83756, 84140, 83152, 83280, 83408, 93164, 83208, 83336, 83592, 83352, 83280, 83664,
        83792, 93020, 83500, 83628, 83756, 93104, 83128, 83384, 83512, 93228, 83604, 83732, 83860,
        93224, 83268, 83396, 83524, 93096, 83200, 83328, 83584, 93032, 83500, 83628, 83756, 93100,
        83464, 83592, 83720, 93072, 83516, 83644, 83772, 84080,
    ];
    /// … the same churn with a smaller heap …
    const RECORDED_FLAT: [u32; 60] = [
        82364, 82124, 82252, 83324, 83452, 82252, 82380, 82508, 82396, 82524, 82736, 82864, 82252,
        82380, 82508, 82436, 82564, 82752, 82752, 82016, 82144, 82272, 82140, 82268, 82748, 82748,
        82288, 82416, 82544, 82396, 82524, 82908, 82908, 82196, 82324, 82580, 82436, 82564, 83020,
        83148, 82184, 82312, 82440, 82396, 82524, 82812, 82940, 82268, 82396, 82524, 82452, 82580,
        82928, 83056, 82508, 82636, 82764, 82692, 82820, 82836,
    ];
    /// … and the same churn while also keeping one string per sample (a leak).
    const RECORDED_LEAK: [u32; 60] = [
        82964, 82508, 82636, 82764, 82652, 82780, 83052, 83180, 83292, 83420, 83548, 83492, 83620,
        83704, 83832, 83948, 84076, 84204, 84136, 84264, 84288, 84416, 84432, 84560, 84688, 84616,
        84744, 84880, 85008, 85176, 85304, 85432, 85360, 85488, 85616, 85744, 85780, 85908, 86036,
        85844, 85972, 86212, 86340, 86380, 86508, 86764, 86580, 86708, 86764, 86892, 86776, 86904,
        87032, 86960, 87088, 87308, 87308, 87332, 87460, 87588,
    ];

    fn recorded(series: &[u32]) -> GrowthReport {
        detector_over(
            series
                .iter()
                .enumerate()
                .map(|(i, &kib)| (i as f64 * 0.05, kib as f64 * 1024.0)),
        )
    }

    #[test]
    fn recorded_node_series_leak_fires_and_steady_churn_stays_quiet() {
        let leak = recorded(&RECORDED_LEAK);
        assert!(leak.suspected_leak, "{leak:?}");
        let flat = recorded(&RECORDED_FLAT);
        assert!(!flat.suspected_leak, "{flat:?}");
        let spikes = recorded(&RECORDED_FLAT_WITH_GC_SPIKES);
        assert!(!spikes.suspected_leak, "{spikes:?}");
    }

    #[test]
    fn thresholds_map_to_levels() {
        let t = AlertThresholds::default().memory_percent;
        assert_eq!(t.level(10.0), AlertLevel::Ok);
        assert_eq!(t.level(70.0), AlertLevel::Warning);
        assert_eq!(t.level(90.0), AlertLevel::Error);
        assert_eq!(t.level(99.0), AlertLevel::Critical);
        assert!(t.is_valid());
        assert!(!Thresholds::new(90.0, 80.0, 95.0).is_valid());
        assert!(!Thresholds::new(f64::NAN, 80.0, 95.0).is_valid());
    }

    #[test]
    fn parses_proc_files() {
        let status = "Name:\tnode\nVmRSS:\t  123456 kB\nThreads:\t11\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(123_456));
        assert_eq!(status_value(status, "Threads:"), Some(11));
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 1048576              files\n";
        assert_eq!(open_files_soft_limit(limits), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(open_files_soft_limit(unlimited), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn samples_this_process() {
        let s = sample().expect("/proc is readable on Linux");
        assert!(s.resident_bytes > 0);
        assert!(s.open_fds > 0);
        assert!(s.threads >= 1);
        assert!(s.memory_percent().is_some());
    }
}
