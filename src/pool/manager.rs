//! deadpool's `Manager` for every backend: connect with retry inside the acquire deadline,
//! validate on checkout.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use rand::Rng;

use crate::error::{Error, Phase, Result};
use crate::metrics::PoolRecorder;
use crate::pool::config::{PoolConfig, Target};
use crate::pool::connection::{Backend, Connection};
use crate::pool::sqlite::SqliteTarget;
use crate::pool::{postgres, redis, sqlite};

/// A connection used this recently is handed out without a validation round trip.
pub const VALIDATION_GRACE: Duration = Duration::from_millis(500);
const FIRST_BACKOFF: Duration = Duration::from_millis(25);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

tokio::task_local! {
    /// The acquire in progress on this task, read by `create` and `recycle`.
    pub(crate) static ACQUIRE: Arc<AcquireContext>;
}

/// One acquire's deadline and the phase it has reached (for timeout errors).
pub(crate) struct AcquireContext {
    pub deadline: Instant,
    phase: AtomicU8,
    /// `tryAcquire`: no awaiting, so no validation round trip.
    pub skip_validation: bool,
}

impl AcquireContext {
    pub fn new(deadline: Instant, skip_validation: bool) -> Arc<Self> {
        Arc::new(AcquireContext {
            deadline,
            phase: AtomicU8::new(0),
            skip_validation,
        })
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            1 => Phase::Connect,
            2 => Phase::Validate,
            _ => Phase::Wait,
        }
    }

    fn set_phase(&self, phase: Phase) {
        let v = match phase {
            Phase::Wait => 0,
            Phase::Connect => 1,
            Phase::Validate => 2,
        };
        self.phase.store(v, Ordering::Relaxed);
    }
}

fn current() -> Option<Arc<AcquireContext>> {
    ACQUIRE.try_with(Arc::clone).ok()
}

enum Connector {
    Postgres {
        config: tokio_postgres::Config,
        tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    },
    Sqlite(SqliteTarget),
    Redis(::redis::Client),
}

pub struct Manager {
    config: Arc<PoolConfig>,
    recorder: Arc<PoolRecorder>,
    connector: Connector,
}

impl Manager {
    pub fn new(
        config: Arc<PoolConfig>,
        recorder: Arc<PoolRecorder>,
        sqlite_memory: Option<SqliteTarget>,
    ) -> Result<Manager> {
        let connector = match &config.target {
            Target::Postgres { url } => {
                let mut pg: tokio_postgres::Config = url.parse().map_err(|e| {
                    Error::invalid_argument(format!("url is not a valid PostgreSQL URL: {e}"))
                })?;
                pg.connect_timeout(config.connect_timeout);
                if pg.get_application_name().is_none() {
                    pg.application_name("quartermaster");
                }
                let tls = match &config.tls {
                    Some(t) if t.mode != crate::pool::tls::TlsMode::Disable => {
                        pg.ssl_mode(match t.mode {
                            crate::pool::tls::TlsMode::Prefer => {
                                tokio_postgres::config::SslMode::Prefer
                            }
                            _ => tokio_postgres::config::SslMode::Require,
                        });
                        Some(tokio_postgres_rustls::MakeRustlsConnect::new(
                            t.client_config()?,
                        ))
                    }
                    _ => {
                        pg.ssl_mode(tokio_postgres::config::SslMode::Disable);
                        None
                    }
                };
                Connector::Postgres { config: pg, tls }
            }
            Target::SqliteFile { path } => Connector::Sqlite(SqliteTarget::File(path.clone())),
            Target::SqliteMemory => {
                Connector::Sqlite(sqlite_memory.unwrap_or_else(SqliteTarget::memory))
            }
            Target::Redis { url } => Connector::Redis(redis::client(url, config.tls.as_ref())?),
        };
        Ok(Manager {
            config,
            recorder,
            connector,
        })
    }

    async fn connect_once(&self, timeout: Duration) -> Result<Backend> {
        match &self.connector {
            Connector::Postgres { config, tls } => {
                postgres::connect(config, tls.as_ref(), timeout, self.config.statement_cache)
                    .await
                    .map(Backend::Postgres)
            }
            Connector::Sqlite(target) => sqlite::connect(
                target,
                self.config.acquire_timeout,
                self.config.statement_cache,
            )
            .await
            .map(Backend::Sqlite),
            Connector::Redis(client) => redis::connect(client, timeout).await.map(Backend::Redis),
        }
    }

    fn is_permanent(&self, err: &Error) -> bool {
        match self.connector {
            Connector::Postgres { .. } => postgres::is_permanent(err),
            Connector::Redis(_) => redis::is_permanent(err),
            Connector::Sqlite(_) => true,
        }
    }

    fn lifetime(&self) -> Option<Duration> {
        let max = self.config.max_lifetime;
        if max.is_zero() {
            return None;
        }
        let jitter = rand::rng().random_range(0.0..0.1);
        Some(max.mul_f64(1.0 - jitter))
    }
}

impl managed::Manager for Manager {
    type Type = Connection;
    type Error = Error;

    // Boxed: connecting is a large state machine, and deadpool embeds these futures in every
    // checkout's future, which callers move around (a hot-path memcpy otherwise).
    fn create(&self) -> impl std::future::Future<Output = Result<Connection>> + Send {
        Box::pin(self.open())
    }

    fn recycle(
        &self,
        conn: &mut Connection,
        metrics: &Metrics,
    ) -> impl std::future::Future<Output = RecycleResult<Error>> + Send {
        Box::pin(self.validate(conn, metrics))
    }
}

impl Manager {
    /// Opens a connection, retrying with backoff inside the acquire deadline.
    async fn open(&self) -> Result<Connection> {
        let ctx = current();
        if let Some(c) = &ctx {
            c.set_phase(Phase::Connect);
        }
        let mut backoff = FIRST_BACKOFF;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let remaining = ctx.as_ref().map_or(self.config.connect_timeout, |c| {
                c.deadline.saturating_duration_since(Instant::now())
            });
            let timeout = self
                .config
                .connect_timeout
                .min(remaining)
                .max(Duration::from_millis(1));
            match self.connect_once(timeout).await {
                Ok(backend) => {
                    if let Some(c) = &ctx {
                        c.set_phase(Phase::Wait);
                    }
                    return Ok(Connection::new(
                        backend,
                        self.lifetime(),
                        Arc::clone(&self.recorder),
                    ));
                }
                Err(err) => {
                    self.recorder.errors_connect.inc();
                    let Some(c) = &ctx else { return Err(err) };
                    let left = c.deadline.saturating_duration_since(Instant::now());
                    if self.is_permanent(&err) || left <= backoff {
                        let message = if attempts > 1 {
                            format!("{} (gave up after {attempts} attempts)", err.message)
                        } else {
                            err.message.clone()
                        };
                        return Err(Error { message, ..err });
                    }
                    let jittered = backoff.mul_f64(rand::rng().random_range(0.5..1.0));
                    tokio::time::sleep(jittered).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Checkout validation: closed, expired or (idle past the grace period) unanswered → replaced.
    async fn validate(&self, conn: &mut Connection, _: &Metrics) -> RecycleResult<Error> {
        let ctx = current();
        if conn.is_unusable() {
            return Err(RecycleError::message(
                "connection is closed or carries session state",
            ));
        }
        if conn.is_expired() {
            self.recorder.recycled.inc();
            return Err(RecycleError::message("connection reached maxLifetimeMs"));
        }
        let skip = ctx.as_ref().is_some_and(|c| c.skip_validation);
        if skip || conn.last_returned.elapsed() < VALIDATION_GRACE {
            return Ok(());
        }
        if let Some(c) = &ctx {
            c.set_phase(Phase::Validate);
        }
        let remaining = ctx.as_ref().map_or(self.config.connect_timeout, |c| {
            c.deadline.saturating_duration_since(Instant::now())
        });
        let outcome =
            tokio::time::timeout(remaining.min(self.config.connect_timeout), conn.ping()).await;
        if let Some(c) = &ctx {
            c.set_phase(Phase::Wait);
        }
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(RecycleError::Backend(e)),
            Err(_) => Err(RecycleError::message("validation ping timed out")),
        }
    }
}
