//! One pooled connection, whatever the backend, with the state the pool needs to hand it
//! on clean: transaction state, age, last use.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorCode, Result};
use crate::metrics::PoolRecorder;
use crate::pool::postgres::PgConnection;
use crate::pool::redis::RedisConnection;
use crate::pool::sqlite::SqliteConnection;
use crate::pool::value::{ExecuteResult, QueryResult, Value};

/// One unit of work on a connection.
#[derive(Debug)]
pub enum Operation<'a> {
    Query(&'a str, &'a [Value]),
    Execute(&'a str, &'a [Value]),
    Command(&'a str, &'a [Value]),
    Pipeline(&'a [(String, Vec<Value>)]),
}

/// An [`Operation`] that owns its text and values, for work queued across threads.
#[derive(Debug, Clone)]
pub enum Statement {
    Query(String, Vec<Value>),
    Execute(String, Vec<Value>),
    Command(String, Vec<Value>),
    Pipeline(Vec<(String, Vec<Value>)>),
}

impl Statement {
    pub fn borrow(&self) -> Operation<'_> {
        match self {
            Statement::Query(s, p) => Operation::Query(s, p),
            Statement::Execute(s, p) => Operation::Execute(s, p),
            Statement::Command(s, p) => Operation::Command(s, p),
            Statement::Pipeline(c) => Operation::Pipeline(c),
        }
    }

    /// Whether it can share a connection with other statements in flight: not when it opens
    /// or ends a transaction (or a Redis MULTI/WATCH), which would bleed into its neighbours.
    pub fn can_pipeline(&self) -> bool {
        match self {
            Statement::Query(sql, _) | Statement::Execute(sql, _) => {
                transaction_effect(sql).is_none()
            }
            Statement::Command(name, _) => !is_session_command(name),
            Statement::Pipeline(cmds) => cmds.iter().all(|(name, _)| !is_session_command(name)),
        }
    }
}

fn is_session_command(name: &str) -> bool {
    matches!(
        name.to_ascii_uppercase().as_str(),
        "MULTI"
            | "EXEC"
            | "DISCARD"
            | "WATCH"
            | "UNWATCH"
            | "SELECT"
            | "SUBSCRIBE"
            | "PSUBSCRIBE"
            | "SSUBSCRIBE"
            | "MONITOR"
            | "CLIENT"
            | "HELLO"
            | "AUTH"
            | "RESET"
            | "READONLY"
            | "READWRITE"
            | "SWAPDB"
            | "BLPOP"
            | "BRPOP"
            | "BLMOVE"
            | "BZPOPMIN"
            | "BZPOPMAX"
            | "XREAD"
            | "XREADGROUP"
            | "WAIT"
    )
}

/// What an [`Operation`] produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Rows(QueryResult),
    Done(ExecuteResult),
    Reply(Value),
    Replies(Vec<Value>),
}

impl Outcome {
    pub fn into_rows(self) -> QueryResult {
        match self {
            Outcome::Rows(r) => r,
            _ => QueryResult::default(),
        }
    }
}

pub enum Backend {
    Postgres(PgConnection),
    Sqlite(SqliteConnection),
    Redis(RedisConnection),
}

pub struct Connection {
    backend: Backend,
    /// This connection's own lifetime: `maxLifetimeMs` less a random jitter, so a pool's
    /// connections don't all expire together.
    lifetime: Option<Duration>,
    created: Instant,
    /// When it last came back to the pool (or was created).
    pub(crate) last_returned: Instant,
    /// PostgreSQL: a statement may have opened a transaction that is still open.
    maybe_in_transaction: AtomicBool,
    /// Retire instead of returning it: a lost connection or session state we can't undo.
    broken: AtomicBool,
    recorder: Arc<PoolRecorder>,
}

impl Connection {
    pub(crate) fn new(
        backend: Backend,
        lifetime: Option<Duration>,
        recorder: Arc<PoolRecorder>,
    ) -> Self {
        recorder.created.inc();
        let now = Instant::now();
        Connection {
            backend,
            lifetime,
            created: now,
            last_returned: now,
            maybe_in_transaction: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            recorder,
        }
    }

    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Postgres(_) => "postgres",
            Backend::Sqlite(_) => "sqlite",
            Backend::Redis(_) => "redis",
        }
    }

    pub(crate) fn is_expired(&self) -> bool {
        self.lifetime.is_some_and(|l| self.created.elapsed() >= l)
    }

    /// Cheap, synchronous: the socket is known dead or the session can't be reused.
    pub(crate) fn is_unusable(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
            || match &self.backend {
                Backend::Postgres(pg) => pg.is_closed(),
                Backend::Redis(r) => r.tainted.load(Ordering::Relaxed),
                Backend::Sqlite(_) => false,
            }
    }

    /// True when the next user could inherit an open transaction.
    pub(crate) fn needs_reset(&self) -> bool {
        match &self.backend {
            Backend::Postgres(_) => self.maybe_in_transaction.load(Ordering::Relaxed),
            Backend::Sqlite(s) => s.in_transaction(),
            Backend::Redis(r) => r.in_transaction.load(Ordering::Relaxed),
        }
    }

    pub(crate) async fn ping(&self) -> Result<()> {
        match &self.backend {
            Backend::Postgres(pg) => pg.ping().await,
            Backend::Sqlite(s) => s.ping().await,
            Backend::Redis(r) => r.ping().await,
        }
    }

    /// Rolls back whatever a previous user left open.
    pub(crate) async fn reset(&self) -> Result<()> {
        match &self.backend {
            Backend::Postgres(pg) => pg.rollback().await?,
            Backend::Sqlite(s) => s.rollback().await?,
            Backend::Redis(r) => r.reset().await?,
        }
        self.maybe_in_transaction.store(false, Ordering::Relaxed);
        Ok(())
    }

    fn sql_only(&self, what: &str) -> Error {
        Error::invalid_argument(format!(
            "{what} needs a SQL database; this pool is {} (use command/pipeline)",
            self.backend_name()
        ))
    }

    fn after_statement<T>(&self, sql: &str, started: Instant, result: &Result<T>) {
        self.recorder.queries.inc();
        self.recorder.query_latency.record(started.elapsed());
        if let Some(opens) = transaction_effect(sql) {
            self.maybe_in_transaction.store(opens, Ordering::Relaxed);
        }
        if let Err(e) = result {
            self.recorder.errors_query.inc();
            if is_connection_lost(e) {
                self.broken.store(true, Ordering::Relaxed);
            }
        }
    }

    pub async fn run(&self, op: &Operation<'_>) -> Result<Outcome> {
        match *op {
            Operation::Query(sql, params) => self.query(sql, params).await.map(Outcome::Rows),
            Operation::Execute(sql, params) => self.execute(sql, params).await.map(Outcome::Done),
            Operation::Command(name, args) => self.command(name, args).await.map(Outcome::Reply),
            Operation::Pipeline(commands) => self.pipeline(commands).await.map(Outcome::Replies),
        }
    }

    pub async fn query(&self, sql: &str, params: &[Value]) -> Result<QueryResult> {
        let started = Instant::now();
        let result = match &self.backend {
            Backend::Postgres(pg) => pg.query(sql, params).await,
            Backend::Sqlite(s) => s.query(sql, params).await,
            Backend::Redis(_) => return Err(self.sql_only("query")),
        };
        self.after_statement(sql, started, &result);
        result
    }

    pub async fn execute(&self, sql: &str, params: &[Value]) -> Result<ExecuteResult> {
        let started = Instant::now();
        let result = match &self.backend {
            Backend::Postgres(pg) => pg.execute(sql, params).await,
            Backend::Sqlite(s) => s.execute(sql, params).await,
            Backend::Redis(_) => return Err(self.sql_only("execute")),
        };
        self.after_statement(sql, started, &result);
        result
    }

    pub async fn command(&self, name: &str, args: &[Value]) -> Result<Value> {
        let started = Instant::now();
        let Backend::Redis(r) = &self.backend else {
            return Err(redis_only(self.backend_name()));
        };
        let result = r.command(name, args).await;
        self.after_command(started, &result);
        result
    }

    pub async fn pipeline(&self, commands: &[(String, Vec<Value>)]) -> Result<Vec<Value>> {
        let started = Instant::now();
        let Backend::Redis(r) = &self.backend else {
            return Err(redis_only(self.backend_name()));
        };
        let result = r.pipeline(commands).await;
        self.after_command(started, &result);
        result
    }

    fn after_command<T>(&self, started: Instant, result: &Result<T>) {
        self.recorder.queries.inc();
        self.recorder.query_latency.record(started.elapsed());
        if let Err(e) = result {
            self.recorder.errors_query.inc();
            if e.sqlstate.is_none() {
                // No server error code: the connection itself failed.
                self.broken.store(true, Ordering::Relaxed);
            }
        }
    }
}

fn redis_only(backend: &str) -> Error {
    Error::new(
        ErrorCode::InvalidArgument,
        format!("command/pipeline need a Redis pool; this pool is {backend} (use query/execute)"),
    )
}

/// The server or the network dropped the connection (SQLSTATE class 08, admin shutdown).
pub(crate) fn is_connection_lost(e: &Error) -> bool {
    e.sqlstate
        .as_deref()
        .is_some_and(|s| s.starts_with("08") || s == "57P01")
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.recorder.destroyed.inc();
    }
}

/// Whether a statement opens (`Some(true)`) or closes (`Some(false)`) a transaction.
/// Reads the leading keyword after whitespace and comments; `ROLLBACK TO` keeps it open.
pub(crate) fn transaction_effect(sql: &str) -> Option<bool> {
    let text = skip_comments(sql);
    let word: String = text
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect::<String>()
        .to_ascii_lowercase();
    match word.as_str() {
        "begin" | "start" | "savepoint" => Some(true),
        "commit" | "end" | "abort" => Some(false),
        "rollback" => {
            let rest = text[word.len()..].trim_start().to_ascii_lowercase();
            let rest = rest
                .strip_prefix("work")
                .or(rest.strip_prefix("transaction"))
                .unwrap_or(&rest)
                .trim_start()
                .to_string();
            if rest.starts_with("to") {
                None
            } else {
                Some(false)
            }
        }
        _ => None,
    }
}

fn skip_comments(mut text: &str) -> &str {
    loop {
        text = text.trim_start();
        if let Some(rest) = text.strip_prefix("--") {
            text = rest.split_once('\n').map_or("", |(_, r)| r);
        } else if let Some(rest) = text.strip_prefix("/*") {
            text = rest.split_once("*/").map_or("", |(_, r)| r);
        } else {
            return text;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_keywords_are_recognised() {
        assert_eq!(transaction_effect("BEGIN"), Some(true));
        assert_eq!(
            transaction_effect("  /* tx */ -- go\n start transaction isolation level serializable"),
            Some(true)
        );
        assert_eq!(transaction_effect("commit"), Some(false));
        assert_eq!(transaction_effect("ROLLBACK"), Some(false));
        assert_eq!(transaction_effect("rollback to savepoint a"), None);
        assert_eq!(transaction_effect("rollback work"), Some(false));
        assert_eq!(transaction_effect("select 1"), None);
    }
}
