//! Pool options: documented defaults, validation that names the bad option.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::pool::tls::{TlsMode, TlsOptions};

/// Where the pool connects, parsed from its URL.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// A libpq-style URL (multi-host and `target_session_attrs` allowed), with `sslmode`
    /// and `sslrootcert` removed (handled through [`TlsOptions`]).
    Postgres { url: String },
    /// A database file.
    SqliteFile { path: String },
    /// A private in-memory database shared by every connection of this pool.
    SqliteMemory,
    /// `redis://` or `rediss://`.
    Redis { url: String },
    /// `cluster: true`: one `redis://host:port` per seed node (credentials on each).
    RedisCluster { nodes: Vec<String> },
}

impl Target {
    pub fn backend(&self) -> &'static str {
        match self {
            Target::Postgres { .. } => "postgres",
            Target::SqliteFile { .. } | Target::SqliteMemory => "sqlite",
            Target::Redis { .. } | Target::RedisCluster { .. } => "redis",
        }
    }
}

/// How int8 columns reach JavaScript.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Int8Mode {
    #[default]
    BigInt,
    String,
}

/// Every pool option, already validated. Durations of zero mean "off" where documented.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub target: Target,
    pub max_size: usize,
    pub min_idle: usize,
    pub acquire_timeout: Duration,
    pub connect_timeout: Duration,
    /// Zero: connections live forever.
    pub max_lifetime: Duration,
    /// Zero: idle connections are never closed for idleness.
    pub idle_timeout: Duration,
    /// Zero: no keepalive pings.
    pub keepalive: Duration,
    pub max_waiting: usize,
    /// Zero: leak detection off (and no acquire stacks captured).
    pub leak_detection: Duration,
    pub statement_cache: bool,
    /// Zero: statements are unbounded unless a call says otherwise.
    pub statement_timeout: Duration,
    /// SQLite: statements averaging at most this run on the calling thread; zero: never.
    pub inline_max: Duration,
    pub tls: Option<TlsOptions>,
    pub name: String,
    pub int8: Int8Mode,
}

pub const MAX_POOL_SIZE: usize = 10_000;

/// Options as given by the caller; `None` takes the documented default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolOptions {
    pub url: String,
    pub max_size: Option<f64>,
    pub min_idle: Option<f64>,
    pub acquire_timeout_ms: Option<f64>,
    pub connect_timeout_ms: Option<f64>,
    pub max_lifetime_ms: Option<f64>,
    pub idle_timeout_ms: Option<f64>,
    pub keepalive_ms: Option<f64>,
    pub max_waiting: Option<f64>,
    pub leak_detection_ms: Option<f64>,
    pub statement_cache: Option<bool>,
    pub statement_timeout_ms: Option<f64>,
    /// SQLite: microseconds of average running time under which a statement may run on the
    /// calling thread (0..=2000; 0 = never).
    pub inline_micros: Option<f64>,
    /// Redis Cluster: `url` lists the seed nodes, `redis://h1:p1,h2:p2`.
    pub cluster: Option<bool>,
    pub tls_mode: Option<String>,
    pub tls_ca: Option<String>,
    pub name: Option<String>,
    pub int8: Option<String>,
}

pub mod defaults {
    pub const MAX_SIZE: usize = 10;
    pub const MIN_IDLE: usize = 0;
    pub const ACQUIRE_TIMEOUT_MS: u64 = 5_000;
    pub const CONNECT_TIMEOUT_MS: u64 = 5_000;
    pub const MAX_LIFETIME_MS: u64 = 3_600_000;
    pub const IDLE_TIMEOUT_MS: u64 = 600_000;
    pub const KEEPALIVE_MS: u64 = 60_000;
    pub const MAX_WAITING: usize = 10_000;
}

const DAY_MS: f64 = 86_400_000.0;

impl PoolConfig {
    pub fn from_options(opts: PoolOptions) -> Result<PoolConfig> {
        let (target, url_tls) = if opts.cluster.unwrap_or(false) {
            (parse_cluster_url(&opts.url)?, None)
        } else {
            parse_url(&opts.url)?
        };
        let max_size = count(
            "maxSize",
            opts.max_size,
            defaults::MAX_SIZE,
            1,
            MAX_POOL_SIZE,
        )?;
        let min_idle = count(
            "minIdle",
            opts.min_idle,
            defaults::MIN_IDLE,
            0,
            MAX_POOL_SIZE,
        )?;
        if min_idle > max_size {
            return Err(Error::invalid_argument(format!(
                "minIdle ({min_idle}) must not exceed maxSize ({max_size})"
            )));
        }
        let tls = match (opts.tls_mode.as_deref(), url_tls) {
            (Some(mode), _) => Some(TlsOptions {
                mode: TlsMode::parse(mode)?,
                ca_pem: opts.tls_ca.clone(),
            }),
            (None, Some(mode)) => Some(TlsOptions {
                mode,
                ca_pem: opts.tls_ca.clone(),
            }),
            (None, None) if opts.tls_ca.is_some() => Some(TlsOptions {
                mode: TlsMode::VerifyFull,
                ca_pem: opts.tls_ca.clone(),
            }),
            (None, None) => None,
        };
        if let Some(tls) = &tls {
            tls.client_config()?;
        }
        let int8 = match opts.int8.as_deref() {
            None | Some("bigint") => Int8Mode::BigInt,
            Some("string") => Int8Mode::String,
            Some(other) => {
                return Err(Error::invalid_argument(format!(
                    "int8 must be 'bigint' or 'string' (got {other:?})"
                )))
            }
        };
        let name = match opts.name {
            Some(n) if n.trim().is_empty() || n.len() > 200 => {
                return Err(Error::invalid_argument("name must be 1..200 characters"))
            }
            Some(n) => n,
            None => target.backend().to_string(),
        };
        Ok(PoolConfig {
            max_size,
            min_idle,
            acquire_timeout: millis(
                "acquireTimeoutMs",
                opts.acquire_timeout_ms,
                defaults::ACQUIRE_TIMEOUT_MS,
                false,
            )?,
            connect_timeout: millis(
                "connectTimeoutMs",
                opts.connect_timeout_ms,
                defaults::CONNECT_TIMEOUT_MS,
                false,
            )?,
            max_lifetime: millis(
                "maxLifetimeMs",
                opts.max_lifetime_ms,
                defaults::MAX_LIFETIME_MS,
                true,
            )?,
            idle_timeout: millis(
                "idleTimeoutMs",
                opts.idle_timeout_ms,
                defaults::IDLE_TIMEOUT_MS,
                true,
            )?,
            keepalive: millis(
                "keepaliveMs",
                opts.keepalive_ms,
                defaults::KEEPALIVE_MS,
                true,
            )?,
            max_waiting: count(
                "maxWaiting",
                opts.max_waiting,
                defaults::MAX_WAITING,
                0,
                usize::MAX >> 1,
            )?,
            leak_detection: millis("leakDetectionMs", opts.leak_detection_ms, 0, true)?,
            statement_cache: opts.statement_cache.unwrap_or(true),
            statement_timeout: millis("statementTimeoutMs", opts.statement_timeout_ms, 0, true)?,
            inline_max: match opts.inline_micros {
                None => crate::pool::profile::INLINE_MAX,
                Some(us) if us.is_finite() && (0.0..=2000.0).contains(&us) => {
                    Duration::from_micros(us as u64)
                }
                Some(us) => {
                    return Err(Error::invalid_argument(format!(
                        "inlineMicros must be between 0 (never) and 2000 (got {us})"
                    )))
                }
            },
            tls,
            name,
            int8,
            target,
        })
    }
}

fn count(
    option: &str,
    value: Option<f64>,
    default: usize,
    min: usize,
    max: usize,
) -> Result<usize> {
    let Some(v) = value else { return Ok(default) };
    if !v.is_finite() || v.fract() != 0.0 || v < min as f64 || v > max as f64 {
        return Err(Error::invalid_argument(format!(
            "{option} must be an integer in {min}..={max} (got {v})"
        )));
    }
    Ok(v as usize)
}

fn millis(
    option: &str,
    value: Option<f64>,
    default_ms: u64,
    zero_allowed: bool,
) -> Result<Duration> {
    let Some(v) = value else {
        return Ok(Duration::from_millis(default_ms));
    };
    let min = if zero_allowed { 0.0 } else { 1.0 };
    if !v.is_finite() || v < min || v > 30.0 * DAY_MS {
        let floor = if zero_allowed { "0 (off)" } else { "1" };
        return Err(Error::invalid_argument(format!(
            "{option} must be between {floor} and 30 days in milliseconds (got {v})"
        )));
    }
    Ok(Duration::from_micros((v * 1000.0) as u64))
}

/// Parses a pool URL. Errors never echo the URL itself (it may hold a password).
pub fn parse_url(url: &str) -> Result<(Target, Option<TlsMode>)> {
    let url = url.trim();
    let scheme_end = url.find(':').ok_or_else(|| {
        Error::invalid_argument(
            "url must start with postgres://, postgresql://, sqlite:, redis:// or rediss://",
        )
    })?;
    let scheme = url[..scheme_end].to_ascii_lowercase();
    let rest = &url[scheme_end + 1..];
    match scheme.as_str() {
        "postgres" | "postgresql" => parse_postgres(url),
        "sqlite" => {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path == ":memory:" {
                Ok((Target::SqliteMemory, None))
            } else if path.is_empty() {
                Err(Error::invalid_argument("url sqlite: needs a file path or :memory:"))
            } else {
                Ok((Target::SqliteFile { path: path.to_string() }, None))
            }
        }
        "redis" | "rediss" => {
            redis::Client::open(url).map_err(|e| {
                Error::invalid_argument(format!("url is not a valid Redis URL ({:?})", e.kind()))
            })?;
            Ok((Target::Redis { url: url.to_string() }, None))
        }
        _ => Err(Error::invalid_argument(format!(
            "url scheme {scheme:?} is not supported; use postgres://, postgresql://, sqlite:, redis:// or rediss://"
        ))),
    }
}

/// `redis://[user:pass@]h1:p1,h2:p2[/…]` (or `rediss://`) into one URL per seed node.
fn parse_cluster_url(url: &str) -> Result<Target> {
    let url = url.trim();
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        Error::invalid_argument("a cluster url must start with redis:// or rediss://")
    })?;
    if scheme != "redis" && scheme != "rediss" {
        return Err(Error::invalid_argument(
            "cluster: true needs a redis:// or rediss:// url",
        ));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let mut nodes = Vec::new();
    for host in hosts.split(',').filter(|h| !h.is_empty()) {
        let node = match userinfo {
            Some(u) => format!("{scheme}://{u}@{host}"),
            None => format!("{scheme}://{host}"),
        };
        redis::Client::open(node.as_str()).map_err(|e| {
            Error::invalid_argument(format!(
                "url is not a valid Redis Cluster URL ({:?})",
                e.kind()
            ))
        })?;
        nodes.push(node);
    }
    if nodes.is_empty() {
        return Err(Error::invalid_argument(
            "a cluster url names at least one node: redis://h1:p1,h2:p2",
        ));
    }
    Ok(Target::RedisCluster { nodes })
}

fn parse_postgres(url: &str) -> Result<(Target, Option<TlsMode>)> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut kept = Vec::new();
    let mut tls = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "sslmode" => tls = Some(TlsMode::parse(value)?),
            "sslrootcert" | "sslcert" | "sslkey" => {
                return Err(Error::invalid_argument(format!(
                    "url parameter {key} is not supported; pass the PEM text as tls.ca"
                )))
            }
            _ => kept.push(pair),
        }
    }
    let cleaned = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    // Our own parameters (target_session_attrs' full set, load_balance_hosts) are validated
    // with the rest, as the connector will read them.
    crate::pool::postgres::connect::parse_url(&cleaned)?;
    Ok((Target::Postgres { url: cleaned }, tls))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(url: &str) -> PoolOptions {
        PoolOptions {
            url: url.into(),
            ..Default::default()
        }
    }

    #[test]
    fn parses_every_scheme() {
        assert!(matches!(
            parse_url("sqlite::memory:").unwrap().0,
            Target::SqliteMemory
        ));
        assert_eq!(
            parse_url("sqlite:./trading.db").unwrap().0,
            Target::SqliteFile {
                path: "./trading.db".into()
            }
        );
        assert!(matches!(
            parse_url("redis://127.0.0.1:6379/0").unwrap().0,
            Target::Redis { .. }
        ));
        let (t, tls) = parse_url(
            "postgres://u:p@h1:5432,h2:5433/db?target_session_attrs=read-write&sslmode=verify-full",
        )
        .unwrap();
        assert_eq!(tls, Some(TlsMode::VerifyFull));
        match t {
            Target::Postgres { url } => assert!(!url.contains("sslmode")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_options_name_themselves_and_hide_passwords() {
        let e = PoolConfig::from_options(PoolOptions {
            max_size: Some(0.0),
            ..opts("sqlite::memory:")
        })
        .unwrap_err();
        assert!(e.message.contains("maxSize"), "{}", e.message);
        let e = PoolConfig::from_options(PoolOptions {
            max_size: Some(10_001.0),
            ..opts("sqlite::memory:")
        })
        .unwrap_err();
        assert!(e.message.contains("maxSize"));
        let e = PoolConfig::from_options(opts("mysql://root:hunter2@h/db")).unwrap_err();
        assert!(!e.message.contains("hunter2"));
        let e = PoolConfig::from_options(opts("postgres://u:hunter2@h:notaport/db")).unwrap_err();
        assert!(!e.message.contains("hunter2"), "{}", e.message);
        let e = PoolConfig::from_options(PoolOptions {
            acquire_timeout_ms: Some(0.0),
            ..opts("sqlite::memory:")
        })
        .unwrap_err();
        assert!(e.message.contains("acquireTimeoutMs"));
        let e = PoolConfig::from_options(PoolOptions {
            min_idle: Some(5.0),
            max_size: Some(2.0),
            ..opts("sqlite::memory:")
        })
        .unwrap_err();
        assert!(e.message.contains("minIdle"));
    }

    #[test]
    fn defaults_are_documented_values() {
        let c = PoolConfig::from_options(opts("sqlite::memory:")).unwrap();
        assert_eq!(c.max_size, defaults::MAX_SIZE);
        assert_eq!(c.acquire_timeout, Duration::from_millis(5000));
        assert_eq!(c.name, "sqlite");
        assert!(c.statement_cache);
    }
}
