//! Opening and checking connections for every backend: one bounded attempt at a time (the
//! pool decides when to retry), a ping for connections idle past the grace period.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

use crate::error::{Error, ErrorCode, Phase, Result};
use crate::metrics::PoolRecorder;
use crate::pool::config::{PoolConfig, Target};
use crate::pool::connection::{Backend, Connection};
use crate::pool::listen::Session;
use crate::pool::postgres::listen::PgSession;
use crate::pool::profile::Profiles;
use crate::pool::sqlite::SqliteTarget;
use crate::pool::{cluster, postgres, redis, sqlite};

/// A connection used this recently is handed out without a validation round trip.
pub const VALIDATION_GRACE: Duration = Duration::from_millis(500);

/// Why an idle connection failed its checkout validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validation {
    /// Known closed or unusable without asking.
    Closed,
    /// The ping failed or went unanswered in its bound.
    Unanswered,
}

enum Dial {
    Postgres(Arc<postgres::connect::Connector>),
    Sqlite(SqliteTarget, Arc<sqlite::Checkpointer>),
    Redis(Box<::redis::Client>),
    RedisCluster(Box<::redis::cluster::ClusterClient>),
}

pub(crate) struct Connector {
    config: Arc<PoolConfig>,
    recorder: Arc<PoolRecorder>,
    profiles: Arc<Profiles>,
    dial: Dial,
}

impl Connector {
    pub fn new(
        config: Arc<PoolConfig>,
        recorder: Arc<PoolRecorder>,
        sqlite_memory: Option<SqliteTarget>,
        profiles: Arc<Profiles>,
    ) -> Result<Connector> {
        let dial = match &config.target {
            Target::Postgres { url } => {
                Dial::Postgres(Arc::new(postgres::connect::Connector::new(
                    url,
                    config.tls.as_ref(),
                    config.statement_cache,
                    config.statement_timeout,
                )?))
            }
            Target::SqliteFile { path } => {
                let target = SqliteTarget::File(path.clone());
                Dial::Sqlite(target.clone(), sqlite::Checkpointer::new(target))
            }
            Target::SqliteMemory => {
                let target = sqlite_memory.unwrap_or_else(SqliteTarget::memory);
                Dial::Sqlite(target.clone(), sqlite::Checkpointer::new(target))
            }
            Target::RedisCluster { nodes } => Dial::RedisCluster(Box::new(cluster::client(
                nodes,
                config.tls.as_ref(),
                config.connect_timeout,
                config.statement_timeout,
            )?)),
            Target::Redis { url } => {
                Dial::Redis(Box::new(redis::client(url, config.tls.as_ref())?))
            }
        };
        Ok(Connector {
            config,
            recorder,
            profiles,
            dial,
        })
    }

    /// The pool is closing: SQLite's checkpoint thread ends (and closes its connection).
    pub fn close(&self) {
        if let Dial::Sqlite(_, checkpointer) = &self.dial {
            checkpointer.stop();
        }
    }

    /// One attempt to open a connection, bounded by `timeout`.
    pub async fn open(&self, timeout: Duration) -> Result<Connection> {
        let backend = match &self.dial {
            Dial::Postgres(pg) => pg
                .connect(timeout)
                .await
                .map(|c| Backend::Postgres(Box::new(c))),
            Dial::Sqlite(target, checkpointer) => sqlite::connect(
                target,
                self.config.acquire_timeout,
                self.config.statement_cache,
                self.config.statement_timeout,
                checkpointer,
            )
            .await
            .map(Backend::Sqlite),
            Dial::Redis(client) => redis::connect(
                client,
                self.config.tls.as_ref(),
                timeout,
                self.config.statement_timeout,
            )
            .await
            .map(Backend::Redis),
            Dial::RedisCluster(client) => {
                cluster::connect(client, timeout, self.config.acquire_timeout)
                    .await
                    .map(|c| Backend::RedisCluster(Box::new(c)))
            }
        };
        match backend {
            Ok(b) => Ok(Connection::new(
                b,
                self.lifetime(),
                Arc::clone(&self.recorder),
                Arc::clone(&self.profiles),
            )),
            Err(e) => {
                self.recorder.errors_connect.inc();
                Err(e)
            }
        }
    }

    /// Opens the pool's listening connection (outside `maxSize`).
    pub async fn open_session(&self, timeout: Duration) -> Result<Session> {
        match &self.dial {
            Dial::Postgres(pg) => PgSession::open(pg, timeout)
                .await
                .map(|s| Session::Postgres(Box::new(s))),
            Dial::Redis(client) => {
                let pubsub = tokio::time::timeout(timeout, client.get_async_pubsub())
                    .await
                    .map_err(|_| {
                        Error::new(
                            ErrorCode::ConnectFailed,
                            format!(
                                "Redis did not answer within connectTimeoutMs ({} ms)",
                                timeout.as_millis()
                            ),
                        )
                        .with_phase(Phase::Connect)
                    })?
                    .map_err(|e| {
                        Error::new(
                            ErrorCode::ConnectFailed,
                            format!("could not connect to Redis: {e}"),
                        )
                        .with_phase(Phase::Connect)
                    })?;
                let (sink, stream) = pubsub.split();
                Ok(Session::Redis { sink, stream })
            }
            Dial::Sqlite(..) => Err(Error::invalid_argument(
                "listen/notify need PostgreSQL or Redis; SQLite has no notifications",
            )),
            Dial::RedisCluster(_) => Err(Error::invalid_argument(
                "listen/notify are not available on a Redis Cluster pool; use a pool on one node",
            )),
        }
    }

    /// True when retrying cannot help: bad credentials, a missing database, TLS refused.
    pub fn is_permanent(&self, err: &Error) -> bool {
        err.permanent
            || match self.dial {
                Dial::Postgres(_) => false,
                Dial::Redis(_) | Dial::RedisCluster(_) => redis::is_permanent(err),
                Dial::Sqlite(..) => true,
            }
    }

    /// Pings a connection idle past the grace period. The ping gets a quarter of what is
    /// left of the caller's deadline (at least 20 ms, at most `connectTimeoutMs`): a healthy
    /// server answers in a round trip, and a silent connection must leave the caller time
    /// for a fresh one.
    pub async fn validate(
        &self,
        conn: &Connection,
        remaining: Duration,
    ) -> std::result::Result<(), Validation> {
        if conn.is_unusable() {
            return Err(Validation::Closed);
        }
        if conn.last_checked.elapsed() < VALIDATION_GRACE {
            return Ok(());
        }
        let bound = (remaining / 4)
            .max(Duration::from_millis(20))
            .min(remaining)
            .min(self.config.connect_timeout);
        match tokio::time::timeout(bound, conn.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) | Err(_) => Err(Validation::Unanswered),
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
