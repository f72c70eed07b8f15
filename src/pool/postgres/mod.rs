//! PostgreSQL connections on tokio-postgres over a watched byte stream: a bounded statement
//! cache that follows the server (re-prepared after DISCARD ALL or a changed result type),
//! row counts from command tags, and every failure classified by what it means for the
//! statement (it ran, it failed on the server, or the connection was lost — sent or not).

pub mod connect;
pub mod listen;
pub mod values;
pub mod wire;

use std::collections::HashMap;
use std::error::Error as StdError;
use std::sync::Arc;

use futures::{pin_mut, TryStreamExt};
use postgres_types::{ToSql, Type};
use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::{Client, Row, RowStream, Statement};

use crate::error::{Error, ErrorCode, Result};
use crate::pool::socket::Stream;
use crate::pool::value::{ExecuteResult, QueryResult, Value};
use connect::{Connector, Endpoint, SessionTarget};
use values::{inferred_type, Cell};
use wire::{TxStatus, Wire, WireState};

/// Bound on prepared statements kept per connection.
const STATEMENT_CACHE_SIZE: usize = 256;

/// A prepared statement and the column names every result of it shares.
#[derive(Clone)]
struct Prepared {
    statement: Statement,
    columns: Arc<[String]>,
}

/// Prepared statements, valid while the server has not discarded them.
#[derive(Default)]
struct Cache {
    /// The wire's discard count when these were prepared.
    generation: u64,
    entries: HashMap<Arc<str>, Prepared>,
}

pub struct PgConnection {
    client: Client,
    /// The task running the connection's protocol, ended by force when the session cannot
    /// close by itself (a request the server will never answer keeps it open otherwise).
    driver: tokio::task::AbortHandle,
    runtime: tokio::runtime::Handle,
    /// Out of step with the server: close the socket at once, don't wait for replies.
    abandoned: std::sync::atomic::AtomicBool,
    wire: Arc<WireState>,
    statements: parking_lot::Mutex<Cache>,
    statement_cache: bool,
    endpoint: Endpoint,
    target: SessionTarget,
    connector: Arc<Connector>,
    /// The wire's discard count when a statement on this session set `statement_timeout`
    /// itself (`u64::MAX`: never): the silence backstop is off until DISCARD ALL.
    own_timeout: std::sync::atomic::AtomicU64,
}

/// Runs a connection's protocol until it closes, forwarding the server's notifications
/// (LISTEN) in order when asked to.
pub(crate) async fn drive(
    mut connection: tokio_postgres::Connection<Wire<Stream>, NoTlsStream>,
    notifications: Option<tokio::sync::mpsc::UnboundedSender<tokio_postgres::Notification>>,
) {
    let Some(tx) = notifications else {
        let _ = connection.await;
        return;
    };
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    while let Some(Ok(message)) = futures::StreamExt::next(&mut messages).await {
        if let tokio_postgres::AsyncMessage::Notification(n) = message {
            if tx.send(n).is_err() {
                return;
            }
        }
    }
}

/// The server's message (with detail and hint) or the client-side cause.
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut text = db.message().to_string();
        if let Some(detail) = db.detail() {
            text.push_str(" — ");
            text.push_str(detail);
        }
        if let Some(hint) = db.hint() {
            text.push_str(" (hint: ");
            text.push_str(hint);
            text.push(')');
        }
        return text;
    }
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// SQLSTATEs meaning the server ended the session (connection exception, shutdown).
fn ends_session(sqlstate: &str) -> bool {
    sqlstate.starts_with("08") || matches!(sqlstate, "57P01" | "57P02" | "57P03")
}

/// A prepared statement the server no longer has, or whose result type changed under it.
/// Rejected at bind, so it never ran.
fn is_stale_plan(e: &Error) -> bool {
    match e.sqlstate.as_deref() {
        Some("26000") => true,
        Some("0A000") => e
            .message
            .contains("cached plan must not change result type"),
        _ => false,
    }
}

fn column_names(statement: &Statement) -> Arc<[String]> {
    statement
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect()
}

fn check_arity(expected: usize, got: usize) -> Result<()> {
    if expected != got {
        return Err(Error::invalid_argument(format!(
            "statement expects {expected} parameter(s), got {got}"
        )));
    }
    Ok(())
}

fn cells(row: &Row) -> Result<Vec<Value>> {
    let mut out = Vec::with_capacity(row.len());
    for i in 0..row.len() {
        let cell: Cell = row.try_get(i).map_err(|e| {
            Error::new(
                ErrorCode::QueryFailed,
                format!("column {i}: {}", describe(&e)),
            )
        })?;
        out.push(cell.0);
    }
    Ok(out)
}

/// What a statement produced, with the server's tag when this connection ran it alone.
pub struct Ran<T> {
    pub value: T,
    pub tag: Option<String>,
}

impl PgConnection {
    pub(crate) fn new(
        client: Client,
        driver: tokio::task::AbortHandle,
        wire: Arc<WireState>,
        endpoint: Endpoint,
        statement_cache: bool,
        target: SessionTarget,
        connector: Arc<Connector>,
    ) -> PgConnection {
        PgConnection {
            client,
            driver,
            runtime: tokio::runtime::Handle::current(),
            abandoned: std::sync::atomic::AtomicBool::new(false),
            statements: parking_lot::Mutex::new(Cache {
                generation: wire.discards(),
                entries: HashMap::new(),
            }),
            wire,
            statement_cache,
            endpoint,
            target,
            connector,
            own_timeout: std::sync::atomic::AtomicU64::new(u64::MAX),
        }
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    pub(crate) fn wire(&self) -> &WireState {
        &self.wire
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// `host:port` of the server this connection reached.
    pub fn host(&self) -> &str {
        &self.endpoint.label
    }

    /// The server's transaction status after the last statement.
    pub fn status(&self) -> TxStatus {
        self.wire.status()
    }

    /// Whether the session carries state a next user must not inherit.
    pub fn session_changed(&self) -> bool {
        self.wire.session_changed()
    }

    /// Maps a tokio-postgres failure. `mark` is the written-byte count taken just before
    /// the statement was queued: unchanged means none of it reached the socket.
    fn failure(&self, e: tokio_postgres::Error, mark: u64) -> Error {
        let text = describe(&e);
        if let Some(db) = e.as_db_error() {
            let code = db.code().code();
            if ends_session(code) {
                return Error::connection_lost(true, text).with_sqlstate(code);
            }
            if code == "57014" && db.message().contains("statement timeout") {
                // statementTimeoutMs, enforced by the server: cancelled, rolled back.
                let ms = self
                    .connector
                    .statement_timeout
                    .map_or(0.0, |t| t.as_secs_f64() * 1000.0);
                let mut err = Error::new(
                    ErrorCode::QueryTimeout,
                    format!(
                        "timed out after statementTimeoutMs ({ms} ms); cancelled on the server"
                    ),
                )
                .with_sqlstate(code);
                err.timeout_ms = Some(ms);
                return err;
            }
            let mut err = Error::new(ErrorCode::QueryFailed, text).with_sqlstate(code);
            if code == "25006" && self.target == SessionTarget::ReadWrite {
                // A read-write pool on a host that became read-only (demoted): retire it.
                err.desync = true;
            }
            return err;
        }
        if text.starts_with("error serializing parameter") {
            return Error::invalid_argument(text);
        }
        if e.is_closed() || text.starts_with("error communicating with the server") {
            return Error::connection_lost(self.wire.written() != mark, text);
        }
        // The client and the server no longer agree on the protocol state (e.g. COPY sent
        // through query): replies could be matched to the wrong requests from here on.
        let mut err = Error::new(
            ErrorCode::QueryFailed,
            format!("protocol error ({text}); the connection was closed"),
        );
        err.desync = true;
        self.abandoned
            .store(true, std::sync::atomic::Ordering::Release);
        err
    }

    pub async fn ping(&self) -> Result<()> {
        let mark = self.wire.written();
        self.client
            .simple_query("")
            .await
            .map(|_| ())
            .map_err(|e| self.failure(e, mark))
    }

    /// Runs a utility statement (ROLLBACK, DISCARD ALL) through the simple protocol.
    pub async fn utility(&self, sql: &str) -> Result<()> {
        let mark = self.wire.written();
        self.client
            .batch_execute(sql)
            .await
            .map_err(|e| self.failure(e, mark))
    }

    /// Closes the socket when this connection is dropped, without waiting for replies.
    pub fn abandon(&self) {
        self.abandoned
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Closes the socket now: every request still waiting for an answer fails as lost.
    pub fn close_now(&self) {
        self.abandon();
        self.driver.abort();
    }

    /// Asks the server to cancel whatever this connection is running, on a task of its
    /// own (bounded by [`CANCEL_BOUND`]): the caller never waits for the cancel request.
    pub fn cancel_in_background(&self) -> tokio::task::JoinHandle<()> {
        let token = self.client.cancel_token();
        let endpoint = self.endpoint.clone();
        let connector = Arc::clone(&self.connector);
        self.runtime.spawn(async move {
            let _ = tokio::time::timeout(CANCEL_BOUND, connector.cancel(&token, &endpoint)).await;
        })
    }

    /// How long this session may stay silent while a statement is out before it is taken
    /// for dead: `statementTimeoutMs` (the server's own bound, after which it answers with
    /// an error) plus as much again, at least 100 ms and at most 1 s, for that answer to
    /// arrive. `None` without `statementTimeoutMs`, or once a statement on this session set
    /// `statement_timeout` itself.
    fn silence_limit(&self) -> Option<std::time::Duration> {
        let timeout = self.connector.statement_timeout?;
        let own = self.own_timeout.load(std::sync::atomic::Ordering::Acquire);
        if own == self.wire.discards() {
            return None;
        }
        let grace = timeout.clamp(
            std::time::Duration::from_millis(100),
            std::time::Duration::from_secs(1),
        );
        Some(timeout + grace)
    }

    /// Runs one statement's exchange, backstopped by [`silence_limit`](Self::silence_limit):
    /// a session that says nothing for that long (a dropped network path the kernel has not
    /// noticed) is closed, and the statement settles `QUERY_TIMEOUT` instead of waiting
    /// for TCP to give up.
    async fn answered<T>(
        &self,
        sql: &str,
        exchange: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        if self.connector.statement_timeout.is_none() {
            return exchange.await;
        }
        if mentions_statement_timeout(sql) {
            self.own_timeout
                .store(self.wire.discards(), std::sync::atomic::Ordering::Release);
        }
        let Some(limit) = self.silence_limit() else {
            return exchange.await;
        };
        let mark = self.wire.written();
        tokio::pin!(exchange);
        let mut heard = self.wire.read();
        loop {
            match tokio::time::timeout(limit, &mut exchange).await {
                Ok(outcome) => return outcome,
                Err(_) if self.wire.read() != heard => heard = self.wire.read(),
                Err(_) => {
                    self.close_now();
                    let ms = limit.as_secs_f64() * 1000.0;
                    let mut err = Error::new(
                        ErrorCode::QueryTimeout,
                        format!(
                            "the server said nothing for {ms} ms (statementTimeoutMs and a grace for its answer): the connection was closed; the statement may have run"
                        ),
                    )
                    .with_sent(self.wire.written() != mark);
                    err.timeout_ms = Some(ms);
                    return Err(err);
                }
            }
        }
    }

    async fn statement(&self, sql: &str) -> Result<Prepared> {
        {
            let mut cache = self.statements.lock();
            let discards = self.wire.discards();
            if cache.generation != discards {
                // DISCARD ALL / DEALLOCATE: the server no longer has these.
                cache.entries.clear();
                cache.generation = discards;
            }
            if let Some(prepared) = cache.entries.get(sql) {
                return Ok(prepared.clone());
            }
        }
        let mark = self.wire.written();
        let statement = self.client.prepare(sql).await.map_err(|e| {
            if e.is_closed()
                || e.as_db_error().is_none() && describe(&e).starts_with("error communicating")
            {
                // Lost during Parse: the statement itself never ran.
                Error::connection_lost(false, describe(&e))
            } else {
                self.failure(e, mark)
            }
        })?;
        let prepared = Prepared {
            columns: column_names(&statement),
            statement,
        };
        let mut cache = self.statements.lock();
        if cache.entries.len() >= STATEMENT_CACHE_SIZE {
            cache.entries.clear();
        }
        cache.entries.insert(Arc::from(sql), prepared.clone());
        Ok(prepared)
    }

    fn forget(&self, sql: &str) {
        self.statements.lock().entries.remove(sql);
    }

    /// Runs `attempt` on the cached statement; a plan the server rejected at bind is
    /// prepared again and run once more, unless a transaction failed with it.
    async fn with_statement<T, F, Fut>(&self, sql: &str, attempt: F) -> Result<T>
    where
        F: Fn(Prepared) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let prepared = self.statement(sql).await?;
        match attempt(prepared).await {
            Err(e) if is_stale_plan(&e) => {
                self.forget(sql);
                if self.wire.status() != TxStatus::Idle {
                    return Err(e);
                }
                attempt(self.statement(sql).await?).await
            }
            other => other,
        }
    }

    async fn collect(&self, stream: RowStream, mark: u64) -> Result<(Vec<Vec<Value>>, u64)> {
        pin_mut!(stream);
        let mut rows = Vec::new();
        while let Some(row) = stream.try_next().await.map_err(|e| self.failure(e, mark))? {
            rows.push(cells(&row)?);
        }
        let count = stream.rows_affected().unwrap_or(rows.len() as u64);
        Ok((rows, count))
    }

    pub async fn query(&self, sql: &str, params: &[Value]) -> Result<Ran<QueryResult>> {
        self.answered(sql, self.query_unguarded(sql, params)).await
    }

    async fn query_unguarded(&self, sql: &str, params: &[Value]) -> Result<Ran<QueryResult>> {
        let tags = self.wire.tags();
        let result = if self.statement_cache {
            self.with_statement(sql, |prepared| async move {
                check_arity(prepared.statement.params().len(), params.len())?;
                let mark = self.wire.written();
                let stream = self
                    .client
                    .query_raw(&prepared.statement, params.iter().map(|p| p as &dyn ToSql))
                    .await
                    .map_err(|e| self.failure(e, mark))?;
                let (rows, row_count) = self.collect(stream, mark).await?;
                Ok(QueryResult {
                    columns: prepared.columns,
                    rows,
                    row_count,
                })
            })
            .await?
        } else {
            // No named statements: one Parse/Bind/Execute/Sync, safe behind PgBouncer
            // transaction mode. Parameter types come from the JS values.
            let mark = self.wire.written();
            let stream = self
                .client
                .query_typed_raw(sql, typed(params))
                .await
                .map_err(|e| self.failure(e, mark))?;
            let mut columns: Arc<[String]> = Arc::from(Vec::new());
            let (rows, row_count) = {
                pin_mut!(stream);
                let mut rows = Vec::new();
                while let Some(row) = stream.try_next().await.map_err(|e| self.failure(e, mark))? {
                    if rows.is_empty() {
                        columns = row.columns().iter().map(|c| c.name().to_string()).collect();
                    }
                    rows.push(cells(&row)?);
                }
                let count = stream.rows_affected().unwrap_or(rows.len() as u64);
                (rows, count)
            };
            QueryResult {
                columns,
                rows,
                row_count,
            }
        };
        Ok(Ran {
            value: result,
            tag: self.tag_since(tags),
        })
    }

    pub async fn execute(&self, sql: &str, params: &[Value]) -> Result<Ran<ExecuteResult>> {
        self.answered(sql, self.execute_unguarded(sql, params))
            .await
    }

    async fn execute_unguarded(&self, sql: &str, params: &[Value]) -> Result<Ran<ExecuteResult>> {
        let tags = self.wire.tags();
        let row_count = if self.statement_cache {
            self.with_statement(sql, |prepared| async move {
                check_arity(prepared.statement.params().len(), params.len())?;
                let mark = self.wire.written();
                self.client
                    .execute_raw(&prepared.statement, params.iter().map(|p| p as &dyn ToSql))
                    .await
                    .map_err(|e| self.failure(e, mark))
            })
            .await?
        } else {
            let mark = self.wire.written();
            self.client
                .execute_typed(sql, &typed(params))
                .await
                .map_err(|e| self.failure(e, mark))?
        };
        Ok(Ran {
            value: ExecuteResult {
                row_count,
                last_insert_id: None,
            },
            tag: self.tag_since(tags),
        })
    }

    /// Starts `COPY … FROM STDIN`: the sink takes the data; dropping it unfinished sends
    /// CopyFail, so the server aborts the COPY and the connection stays clean.
    pub async fn copy_in(&self, sql: &str) -> Result<tokio_postgres::CopyInSink<bytes::Bytes>> {
        let mark = self.wire.written();
        self.client
            .copy_in(sql)
            .await
            .map_err(|e| self.failure(e, mark))
    }

    /// Starts `COPY … TO STDOUT`.
    pub async fn copy_out(&self, sql: &str) -> Result<tokio_postgres::CopyOutStream> {
        let mark = self.wire.written();
        self.client
            .copy_out(sql)
            .await
            .map_err(|e| self.failure(e, mark))
    }

    /// Maps an error met while copying data.
    pub(crate) fn copy_failure(&self, e: tokio_postgres::Error) -> Error {
        self.failure(e, u64::MAX)
    }

    /// The tag of the one statement completed since `before`, if exactly one was.
    fn tag_since(&self, before: u64) -> Option<String> {
        (self.wire.tags() == before + 1).then(|| self.wire.last_tag())
    }
}

/// Bound on one background cancel request (connect, TLS, send).
const CANCEL_BOUND: std::time::Duration = std::time::Duration::from_secs(2);

/// True when `sql` may set `statement_timeout` (ASCII case-insensitive).
fn mentions_statement_timeout(sql: &str) -> bool {
    const NEEDLE: &[u8] = b"statement_timeout";
    sql.as_bytes()
        .windows(NEEDLE.len())
        .any(|w| w.eq_ignore_ascii_case(NEEDLE))
}

/// How long a dropped connection may take to close itself before its socket is closed.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

impl Drop for PgConnection {
    fn drop(&mut self) {
        if self.abandoned.load(std::sync::atomic::Ordering::Acquire) {
            self.driver.abort();
            return;
        }
        // Normally the session ends with a Terminate once every reply is in; a request
        // the server never answers would keep it (and its backend) alive forever.
        let driver = self.driver.clone();
        self.runtime.spawn(async move {
            tokio::time::sleep(CLOSE_GRACE).await;
            driver.abort();
        });
    }
}

fn typed(params: &[Value]) -> Vec<(&(dyn ToSql + Sync), Type)> {
    params
        .iter()
        .map(|p| (p as &(dyn ToSql + Sync), inferred_type(p)))
        .collect()
}
