//! One pooled connection, whatever the backend, with the state the pool needs to hand it
//! on clean: transaction state (from the server), session changes, age, last use.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::error::{Error, ErrorCode, Result};
use crate::metrics::PoolRecorder;
use crate::pool::bounds::Bounds;
use crate::pool::cluster::ClusterConn;
use crate::pool::postgres::wire::TxStatus;
use crate::pool::postgres::PgConnection;
use crate::pool::profile::Profiles;
use crate::pool::redis::RedisConnection;
use crate::pool::sqlite::SqliteConnection;
use crate::pool::value::{ExecuteResult, QueryResult, Value};
use crate::pool::Together;

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

    /// Whether it may share one transaction with other statements in a group commit
    /// (SQLite): a plain INSERT, UPDATE, DELETE or REPLACE run for its effect.
    pub fn can_group(&self) -> bool {
        match self {
            Statement::Execute(sql, _) => {
                matches!(
                    leading_keyword(sql).0.as_str(),
                    "insert" | "update" | "delete" | "replace"
                ) && self.can_pipeline()
            }
            _ => false,
        }
    }

    /// Whether it can share a connection with other statements in flight: not when it opens
    /// or ends a transaction, changes session state (or is a Redis MULTI/WATCH or blocking
    /// command), which would bleed into its neighbours or stall them.
    pub fn can_pipeline(&self) -> bool {
        self.borrow().can_pipeline()
    }
}

impl Operation<'_> {
    /// See [`Statement::can_pipeline`].
    pub fn can_pipeline(&self) -> bool {
        match *self {
            Operation::Query(sql, _) | Operation::Execute(sql, _) => {
                let facts = text_facts(sql);
                !facts.transaction_control && !facts.changes_session
            }
            Operation::Command(name, _) => !is_session_command(name),
            Operation::Pipeline(cmds) => cmds.iter().all(|(name, _)| !is_session_command(name)),
        }
    }
}

/// Redis commands that change or read the state of one connection (transactions, the
/// selected database, subscriptions): meaningless on a cluster, where commands go by slot.
pub(crate) const CONNECTION_STATE_COMMANDS: &[&str] = &[
    "MULTI",
    "EXEC",
    "DISCARD",
    "WATCH",
    "UNWATCH",
    "SELECT",
    "SUBSCRIBE",
    "PSUBSCRIBE",
    "SSUBSCRIBE",
    "MONITOR",
];

/// Commands that must stay on one connection, never pipelined with other callers'.
fn is_session_command(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    CONNECTION_STATE_COMMANDS.contains(&upper.as_str())
        || matches!(
            upper.as_str(),
            "CLIENT"
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
                | "BRPOPLPUSH"
                | "BLMPOP"
                | "BZMPOP"
                | "XREAD"
                | "XREADGROUP"
                | "WAIT"
                | "WAITAOF"
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
    Postgres(Box<PgConnection>),
    Sqlite(SqliteConnection),
    Redis(RedisConnection),
    RedisCluster(Box<ClusterConn>),
}

pub struct Connection {
    backend: Backend,
    /// This connection's own lifetime: `maxLifetimeMs` less a random jitter, so a pool's
    /// connections don't all expire together.
    lifetime: Option<Duration>,
    created: Instant,
    /// When it last came back to the pool (or was created): the idle timeout counts from here.
    pub(crate) last_returned: Instant,
    /// When it last answered (a statement or a ping): validation and keepalive count from here.
    pub(crate) last_checked: Instant,
    /// A statement changed session state a next user must not inherit (SET, an advisory
    /// lock, a temp table, PRAGMA): reset (PostgreSQL) or closed (SQLite) before reuse.
    session_dirty: AtomicBool,
    /// Retire instead of returning it: a lost connection or session state we can't undo.
    broken: AtomicBool,
    /// PostgreSQL: the first failure inside the open transaction, for COMMIT's error.
    failed_in_transaction: Mutex<Option<Error>>,
    recorder: Arc<PoolRecorder>,
    /// Where each statement's cost (and, SQLite, read-only-ness) is recorded.
    profiles: Arc<Profiles>,
    /// When its last statement answered: in a pipeline, a statement's own cost starts at
    /// the answer before it, not at its send (the wait behind others is theirs).
    last_answer: Mutex<Option<Instant>>,
    /// Its place in the pool, freed when the connection is dropped.
    pub(crate) slot: Option<crate::pool::inventory::Slot>,
}

impl Connection {
    pub(crate) fn new(
        backend: Backend,
        lifetime: Option<Duration>,
        recorder: Arc<PoolRecorder>,
        profiles: Arc<Profiles>,
    ) -> Self {
        recorder.created.inc();
        let now = Instant::now();
        Connection {
            backend,
            lifetime,
            created: now,
            last_returned: now,
            last_checked: now,
            session_dirty: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            failed_in_transaction: Mutex::new(None),
            last_answer: Mutex::new(None),
            recorder,
            profiles,
            slot: None,
        }
    }

    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Postgres(_) => "postgres",
            Backend::Sqlite(_) => "sqlite",
            Backend::Redis(_) | Backend::RedisCluster(_) => "redis",
        }
    }

    /// `host:port` of the server (PostgreSQL), for status; never credentials.
    pub fn host(&self) -> Option<&str> {
        match &self.backend {
            Backend::Postgres(pg) => Some(pg.host()),
            _ => None,
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
                Backend::Redis(r) => r.tainted.load(Ordering::Relaxed) || r.is_closed(),
                Backend::RedisCluster(_) => false,
                // SQLite session state (PRAGMA, ATTACH, temp tables) has no reset: close it.
                Backend::Sqlite(_) => self.session_dirty.load(Ordering::Relaxed),
            }
    }

    /// True when the next user could inherit an open transaction or changed session state.
    pub(crate) fn needs_reset(&self) -> bool {
        match &self.backend {
            Backend::Postgres(pg) => {
                pg.status() != TxStatus::Idle
                    || pg.session_changed()
                    || self.session_dirty.load(Ordering::Relaxed)
            }
            // Busy (locked) means we cannot tell: reset, which waits for it.
            Backend::Sqlite(s) => s.in_transaction().unwrap_or(true),
            Backend::Redis(r) => r.in_transaction.load(Ordering::Relaxed),
            Backend::RedisCluster(_) => false,
        }
    }

    pub(crate) async fn ping(&self) -> Result<()> {
        match &self.backend {
            Backend::Postgres(pg) => pg.ping().await,
            Backend::Sqlite(s) => s.ping().await,
            Backend::Redis(r) => r.ping().await,
            Backend::RedisCluster(c) => c.ping().await,
        }
    }

    /// Rolls back whatever a previous user left open and, on PostgreSQL, discards session
    /// state (DISCARD ALL) a statement changed.
    pub(crate) async fn reset(&self) -> Result<()> {
        match &self.backend {
            Backend::Postgres(pg) => {
                if pg.status() != TxStatus::Idle {
                    pg.utility("ROLLBACK").await?;
                }
                if pg.session_changed() || self.session_dirty.load(Ordering::Relaxed) {
                    pg.utility("DISCARD ALL").await?;
                    pg.wire().clear_session_changed();
                    self.session_dirty.store(false, Ordering::Relaxed);
                }
            }
            Backend::Sqlite(s) => s.rollback().await?,
            Backend::Redis(r) => r.reset().await?,
            Backend::RedisCluster(_) => {}
        }
        *self.failed_in_transaction.lock() = None;
        Ok(())
    }

    /// PostgreSQL: the connection itself, for COPY.
    pub(crate) fn postgres(&self) -> Result<&PgConnection> {
        match &self.backend {
            Backend::Postgres(pg) => Ok(pg),
            _ => Err(Error::invalid_argument(format!(
                "COPY needs PostgreSQL; this pool is {}",
                self.backend_name()
            ))),
        }
    }

    /// Marks the connection as not to be reused (a COPY left half done).
    pub(crate) fn retire(&self) {
        self.broken.store(true, Ordering::Relaxed);
    }

    /// SQLite: runs `op` on the calling thread (see [`SqliteConnection::run_now`]). `None`
    /// when `limit` cut it off (no effect; run it elsewhere) or it is not a SQL statement.
    pub(crate) fn run_now(
        &self,
        op: &Operation<'_>,
        limit: Option<Duration>,
    ) -> Option<Result<Outcome>> {
        self.run_now_timed(op, limit).0
    }

    /// [`run_now`](Self::run_now), with when it started and ended: the clock read once on
    /// each side serves the caller's bookkeeping too.
    pub(crate) fn run_now_timed(
        &self,
        op: &Operation<'_>,
        limit: Option<Duration>,
    ) -> (Option<Result<Outcome>>, Instant, Instant) {
        let started = Instant::now();
        let Backend::Sqlite(s) = &self.backend else {
            return (None, started, started);
        };
        let (sql, params, query) = match *op {
            Operation::Query(sql, params) => (sql, params, true),
            Operation::Execute(sql, params) => (sql, params, false),
            _ => return (None, started, started),
        };
        forced_panic(op);
        let Some(outcome) = s.run_now(sql, params, query, limit) else {
            return (None, started, Instant::now());
        };
        let ended = self.after_statement(sql, started, &outcome);
        (Some(outcome), started, ended)
    }

    /// SQLite: statements issued together, on the calling thread: writes as one transaction
    /// (see [`SqliteConnection::run_group_now`](crate::pool::sqlite::SqliteConnection::run_group_now)),
    /// reads in one read transaction
    /// ([`run_reads_now`](crate::pool::sqlite::SqliteConnection::run_reads_now)). `None`: not
    /// SQLite, or cut off at `limit` (nothing took effect).
    pub(crate) fn run_together_now(
        &self,
        items: &[(&str, &[Value])],
        limit: Duration,
        together: Together,
    ) -> Option<Vec<Result<Outcome>>> {
        let Backend::Sqlite(s) = &self.backend else {
            return None;
        };
        let started = Instant::now();
        let sqls = items.iter().map(|(sql, _)| *sql);
        Some(match together {
            Together::Writes => {
                self.after_group(sqls, started, s.run_group_now(items, limit)?, Outcome::Done)
            }
            Together::Reads => {
                self.after_group(sqls, started, s.run_reads_now(items, limit)?, Outcome::Rows)
            }
        })
    }

    /// A group of writes off the calling thread (a dispatcher's batch of
    /// queued writes), within statementTimeoutMs when set.
    pub(crate) async fn run_group(&self, statements: &[Statement]) -> Option<Vec<Result<Outcome>>> {
        let Backend::Sqlite(s) = &self.backend else {
            return None;
        };
        let items: Vec<(String, Vec<Value>)> = statements
            .iter()
            .filter_map(|st| match st {
                Statement::Execute(sql, params) => Some((sql.clone(), params.clone())),
                _ => None,
            })
            .collect();
        if items.len() != statements.len() {
            return None;
        }
        let started = Instant::now();
        let outcomes = s.run_group(items).await?;
        let sqls = statements.iter().map(|st| match st {
            Statement::Execute(sql, _) => sql.as_str(),
            _ => "",
        });
        Some(self.after_group(sqls, started, outcomes, Outcome::Done))
    }

    /// Counts a group's statements, each profiled at its share of the group: what it costs
    /// in one.
    fn after_group<'s, T>(
        &self,
        sqls: impl ExactSizeIterator<Item = &'s str>,
        started: Instant,
        outcomes: Vec<Result<T>>,
        outcome: fn(T) -> Outcome,
    ) -> Vec<Result<Outcome>> {
        let share = started.elapsed() / sqls.len().max(1) as u32;
        for (sql, result) in sqls.zip(&outcomes) {
            self.record(sql, share, share, None, result);
        }
        outcomes.into_iter().map(|o| o.map(outcome)).collect()
    }

    /// SQLite: the rows of `sql` in batches, read only as they are taken.
    pub(crate) fn sqlite_stream(
        &self,
        sql: &str,
        params: &[Value],
        batch: usize,
    ) -> Result<tokio::sync::mpsc::Receiver<Result<QueryResult>>> {
        match &self.backend {
            Backend::Sqlite(s) => Ok(s.stream(sql, params, batch)),
            _ => Err(Error::internal("a row stream needs SQLite")),
        }
    }

    /// Interrupts what runs on this connection (SQLite), e.g. a cursor being closed.
    pub(crate) fn interrupt(&self) {
        if let Backend::Sqlite(s) = &self.backend {
            s.interrupt();
        }
    }

    /// PostgreSQL, inside a transaction about to commit: undoes session changes made in it
    /// (settings, session advisory locks) as part of the transaction. Behind a transaction
    /// pooler (PgBouncer) the server session is only ours until COMMIT, so this is the one
    /// moment it can be cleaned.
    pub(crate) async fn reset_session_in_transaction(&self) -> Result<()> {
        let Backend::Postgres(pg) = &self.backend else {
            return Ok(());
        };
        let changed = pg.session_changed() || self.session_dirty.load(Ordering::Relaxed);
        if !changed || pg.status() != TxStatus::InTransaction {
            return Ok(());
        }
        pg.utility("RESET ALL").await?;
        pg.utility("SELECT pg_advisory_unlock_all()").await?;
        pg.wire().clear_session_changed();
        Ok(())
    }

    /// What a statement sent at `started` and answered at `now` cost by itself: from the
    /// later of its send and the answer before it on this connection. Measured from the
    /// send alone, `select 1` deep in a 250-statement pipeline "took" milliseconds, was
    /// profiled slow, and from then on ran unpipelined.
    fn own_cost(&self, started: Instant, now: Instant) -> Duration {
        let mut last = self.last_answer.lock();
        let from = last.map_or(started, |answered| answered.max(started));
        *last = Some(now);
        now.saturating_duration_since(from)
    }

    fn sql_only(&self, what: &str) -> Error {
        Error::invalid_argument(format!(
            "{what} needs a SQL database; this pool is {} (use command/pipeline)",
            self.backend_name()
        ))
    }

    /// Counts and profiles a statement that ran from `started` until now; returns now.
    fn after_statement<T>(&self, sql: &str, started: Instant, result: &Result<T>) -> Instant {
        let now = Instant::now();
        let read_only = match &self.backend {
            Backend::Sqlite(s) => s.last_read_only(),
            _ => None,
        };
        let own = self.own_cost(started, now);
        self.record(sql, now - started, own, read_only, result);
        now
    }

    /// Counts one statement that took `took` (`own` of it its own cost) and profiles it.
    fn record<T>(
        &self,
        sql: &str,
        took: Duration,
        own: Duration,
        read_only: Option<bool>,
        result: &Result<T>,
    ) {
        self.recorder.queries.inc();
        self.recorder.query_latency.record(took);
        if result.is_ok() {
            self.profiles.observe(sql, own, read_only);
        }
        if changes_session(sql) {
            self.session_dirty.store(true, Ordering::Relaxed);
        }
        if let Err(e) = result {
            self.recorder.errors_query.inc();
            if e.code == ErrorCode::ConnectionLost || e.desync {
                self.broken.store(true, Ordering::Relaxed);
            }
        }
        if let Backend::Postgres(pg) = &self.backend {
            // A server error inside a transaction aborts it (until a ROLLBACK TO SAVEPOINT, after
            // which statements succeed again). Read on failure before its ReadyForQuery may have
            // arrived, the status can still say "in transaction": either way it is not idle.
            let mut failed = self.failed_in_transaction.lock();
            match (pg.status(), result) {
                (TxStatus::Idle, _) | (_, Ok(_)) => *failed = None,
                (_, Err(e)) if e.sqlstate.is_some() && failed.is_none() => {
                    *failed = Some(e.clone())
                }
                _ => {}
            }
        }
    }

    /// A COMMIT the server answered with ROLLBACK did not commit: say so, and why.
    fn check_commit(&self, sql: &str, tag: Option<&str>) -> Result<()> {
        if tag != Some("ROLLBACK") || !is_commit(sql) {
            return Ok(());
        }
        let cause = self.failed_in_transaction.lock().take();
        let why = match &cause {
            Some(e) => format!(
                "a statement in it failed earlier ({}{}) and the failure was not rolled back to a savepoint",
                e.sqlstate.as_deref().map(|s| format!("{s}: ")).unwrap_or_default(),
                e.message
            ),
            None => "the transaction had failed earlier".to_string(),
        };
        let mut err = Error::new(
            ErrorCode::QueryFailed,
            format!("COMMIT did not commit: the server rolled the transaction back because {why}; nothing in it was applied"),
        )
        .with_sqlstate(
            cause
                .and_then(|e| e.sqlstate)
                .unwrap_or_else(|| "25P02".to_string()),
        );
        err.rolled_back = true;
        Err(err)
    }

    /// Runs `op` within `bounds`. A bound that fires mid-statement stops it where it runs,
    /// and the caller is told at once: PostgreSQL gets a cancel request (sent in the
    /// background) and the statement's own answer is awaited for [`STOP_WAIT`]; with no
    /// answer by then the connection is closed rather than handed out busy. SQLite is
    /// interrupted; a Redis command's connection is closed. A statement that finished
    /// before the stop took effect reports what it really did.
    pub async fn run_within(&self, op: &Operation<'_>, bounds: &Bounds) -> Result<Outcome> {
        if !bounds.is_set() {
            return self.run(op).await;
        }
        if let Some(fired) = bounds.check() {
            return Err(bounds.error(fired, "before it was sent").with_sent(false));
        }
        let run = self.run(op);
        tokio::pin!(run);
        let fired = tokio::select! {
            biased;
            outcome = &mut run => return outcome,
            fired = bounds.fired() => fired,
        };
        let mut cancel = None;
        let grace = match &self.backend {
            Backend::Postgres(pg) => {
                cancel = Some(pg.cancel_in_background());
                STOP_WAIT
            }
            Backend::Sqlite(s) => {
                s.interrupt();
                STOP_GRACE
            }
            Backend::Redis(_) | Backend::RedisCluster(_) => {
                self.broken.store(true, Ordering::Relaxed);
                return Err(bounds
                    .error(
                        fired,
                        "waiting for Redis's answer; its connection was closed",
                    )
                    .with_sent(true));
            }
        };
        match tokio::time::timeout(grace, &mut run).await {
            Ok(Err(e)) if was_stopped(&e) => {
                Err(bounds.error(fired, "while running; it was cancelled and rolled back"))
            }
            Ok(outcome) => {
                // It finished by itself just as the bound fired. A cancel request still on its
                // way could stop this session's next statement: never reuse it then.
                if cancel.is_some_and(|c| !c.is_finished()) {
                    self.broken.store(true, Ordering::Relaxed);
                }
                outcome
            }
            Err(_) => {
                self.broken.store(true, Ordering::Relaxed);
                if let Backend::Postgres(pg) = &self.backend {
                    pg.close_now();
                }
                Err(bounds
                    .error(
                        fired,
                        "while running; a cancel was requested but not confirmed in time, so the connection was closed and the statement may have run",
                    )
                    .with_sent(true))
            }
        }
    }

    pub async fn run(&self, op: &Operation<'_>) -> Result<Outcome> {
        forced_panic(op);
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
            Backend::Postgres(pg) => match pg.query(sql, params).await {
                Ok(ran) => self
                    .check_commit(sql, ran.tag.as_deref())
                    .map(|()| ran.value),
                Err(e) => Err(e),
            },
            Backend::Sqlite(s) => s.query(sql, params).await,
            Backend::Redis(_) | Backend::RedisCluster(_) => return Err(self.sql_only("query")),
        };
        self.after_statement(sql, started, &result);
        result
    }

    pub async fn execute(&self, sql: &str, params: &[Value]) -> Result<ExecuteResult> {
        let started = Instant::now();
        let result = match &self.backend {
            Backend::Postgres(pg) => match pg.execute(sql, params).await {
                Ok(ran) => self
                    .check_commit(sql, ran.tag.as_deref())
                    .map(|()| ran.value),
                Err(e) => Err(e),
            },
            Backend::Sqlite(s) => s.execute(sql, params).await,
            Backend::Redis(_) | Backend::RedisCluster(_) => return Err(self.sql_only("execute")),
        };
        self.after_statement(sql, started, &result);
        result
    }

    pub async fn command(&self, name: &str, args: &[Value]) -> Result<Value> {
        let started = Instant::now();
        let result = match &self.backend {
            Backend::Redis(r) => r.command(name, args).await,
            Backend::RedisCluster(c) => c.command(name, args).await,
            _ => return Err(redis_only(self.backend_name())),
        };
        self.after_command(started, &result);
        result
    }

    pub async fn pipeline(&self, commands: &[(String, Vec<Value>)]) -> Result<Vec<Value>> {
        let started = Instant::now();
        let result = match &self.backend {
            Backend::Redis(r) => r.pipeline(commands).await,
            Backend::RedisCluster(c) => c.pipeline(commands).await,
            _ => return Err(redis_only(self.backend_name())),
        };
        self.after_command(started, &result);
        result
    }

    fn after_command<T>(&self, started: Instant, result: &Result<T>) {
        self.recorder.queries.inc();
        self.recorder.query_latency.record(started.elapsed());
        if let Err(e) = result {
            self.recorder.errors_query.inc();
            if e.code == ErrorCode::ConnectionLost || e.desync {
                self.broken.store(true, Ordering::Relaxed);
            }
        }
    }
}

/// How long an interrupted SQLite statement may take to report that it stopped before its
/// connection is closed instead.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// How long a cancelled PostgreSQL statement's own answer is awaited (a cancel on a healthy
/// network is confirmed in a few milliseconds) before its connection is closed instead: a
/// bound is kept to within this much.
const STOP_WAIT: Duration = Duration::from_millis(25);

/// The statement ended because it was cancelled (PostgreSQL) or interrupted (SQLite).
fn was_stopped(e: &Error) -> bool {
    matches!(e.sqlstate.as_deref(), Some("57014") | Some("SQLITE_9"))
}

/// The statement text that, with `QM_TEST_PANIC` set in the environment, panics where
/// statements run: the test suite's way to show a panic reaches JavaScript as `INTERNAL`
/// while the process and the pool carry on.
pub const PANIC_MARKER: &str = "-- qm:test-panic";

fn forced_panic(op: &Operation<'_>) {
    if let Operation::Query(sql, _) | Operation::Execute(sql, _) = op {
        if *sql == PANIC_MARKER && std::env::var_os("QM_TEST_PANIC").is_some() {
            panic!("forced by the test hook (QM_TEST_PANIC)");
        }
    }
}

fn redis_only(backend: &str) -> Error {
    Error::new(
        ErrorCode::InvalidArgument,
        format!("command/pipeline need a Redis pool; this pool is {backend} (use query/execute)"),
    )
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.recorder.destroyed.inc();
    }
}

/// The statement's first keyword, lower-cased, after whitespace and comments. Every call
/// site compares it with keywords of at most [`Keyword::MAX`] letters; a longer word is kept
/// as `""`, which matches none. Allocates nothing: it runs for every statement.
pub(crate) fn leading_keyword(sql: &str) -> (Keyword, &str) {
    let text = skip_comments(sql);
    let len = text.bytes().take_while(u8::is_ascii_alphabetic).count();
    let mut word = Keyword {
        letters: [0; Keyword::MAX],
        len: 0,
    };
    if len <= Keyword::MAX {
        for (slot, b) in word.letters.iter_mut().zip(text.bytes()) {
            *slot = b.to_ascii_lowercase();
        }
        word.len = len;
    }
    (word, &text[len..])
}

/// A statement's first keyword, lower-cased (see [`leading_keyword`]).
pub(crate) struct Keyword {
    letters: [u8; Keyword::MAX],
    len: usize,
}

impl Keyword {
    const MAX: usize = 12;

    pub(crate) fn as_str(&self) -> &str {
        // SAFETY: `leading_keyword` stores ASCII letters only, which are UTF-8.
        unsafe { std::str::from_utf8_unchecked(&self.letters[..self.len]) }
    }
}

impl PartialEq<&str> for Keyword {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Whether `haystack` contains `needle` (lower-case ASCII) in any letter case.
fn contains_ignoring_case(haystack: &str, needle: &str) -> bool {
    let (hay, needle) = (haystack.as_bytes(), needle.as_bytes());
    hay.len() >= needle.len()
        && hay
            .windows(needle.len())
            .any(|w| w[0].to_ascii_lowercase() == needle[0] && w.eq_ignore_ascii_case(needle))
}

fn is_commit(sql: &str) -> bool {
    matches!(leading_keyword(sql).0.as_str(), "commit" | "end")
}

/// Whether a statement may leave state in the session beyond its own result: settings,
/// prepared statements, cursors, listeners, locks held past the statement, temp tables,
/// SQLite pragmas and attached databases. Read from the text, so it errs towards yes; it
/// only keeps such statements out of shared pipelines and resets the session after them.
pub(crate) fn changes_session(sql: &str) -> bool {
    text_facts(sql).changes_session
}

/// What dispatch reads from a statement's text, several times per statement: kept for the
/// texts seen last on this thread (hot statements repeat), found by comparing the text.
#[derive(Clone, Copy)]
struct TextFacts {
    changes_session: bool,
    transaction_control: bool,
}

/// Texts whose facts a thread keeps, and the longest kept.
const FACTS_KEPT: usize = 8;
const FACTS_TEXT_MAX: usize = 1024;

thread_local! {
    static FACTS: std::cell::RefCell<Vec<(Box<str>, TextFacts)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

fn text_facts(sql: &str) -> TextFacts {
    let found = FACTS.with(|kept| {
        let mut kept = kept.borrow_mut();
        let i = kept.iter().position(|(text, _)| **text == *sql)?;
        kept[..=i].rotate_right(1); // most recent first
        Some(kept[0].1)
    });
    if let Some(facts) = found {
        return facts;
    }
    let facts = TextFacts {
        changes_session: changes_session_uncached(sql),
        transaction_control: matches!(
            leading_keyword(sql).0.as_str(),
            "begin" | "start" | "savepoint" | "release" | "commit" | "end" | "abort" | "rollback"
        ),
    };
    if sql.len() <= FACTS_TEXT_MAX {
        FACTS.with(|kept| {
            let mut kept = kept.borrow_mut();
            kept.truncate(FACTS_KEPT - 1);
            kept.insert(0, (sql.into(), facts));
        });
    }
    facts
}

fn changes_session_uncached(sql: &str) -> bool {
    let (word, rest) = leading_keyword(sql);
    let keyword = matches!(
        word.as_str(),
        "set"
            | "reset"
            | "prepare"
            | "deallocate"
            | "discard"
            | "listen"
            | "unlisten"
            | "load"
            | "lock"
            | "pragma"
            | "attach"
            | "detach"
    );
    if keyword {
        return true;
    }
    // A cursor ends with its transaction unless declared WITH HOLD.
    if word == "declare" && contains_ignoring_case(sql, "with hold") {
        return true;
    }
    let temp_table = word == "create" && {
        let next = rest.trim_start().as_bytes();
        let starts =
            |p: &str| next.len() >= p.len() && next[..p.len()].eq_ignore_ascii_case(p.as_bytes());
        starts("temp") || starts("global temp") || starts("local temp")
    };
    // Every function named below has an underscore: most statements skip the scans.
    temp_table
        || (sql.contains('_')
            && [
                "set_config",
                "pg_advisory_lock",
                "pg_try_advisory_lock",
                "dblink_connect",
            ]
            .iter()
            .any(|f| contains_ignoring_case(sql, f)))
}

/// Whether a statement opens, ends or steps within a transaction (BEGIN, COMMIT, SAVEPOINT
/// …): such a statement never shares a pipeline. The state itself is read from the server.
pub(crate) fn is_transaction_control(sql: &str) -> bool {
    text_facts(sql).transaction_control
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
    fn facts_kept_per_text_are_the_facts_of_that_text() {
        // More texts than are kept, some of one length, asked in turn and again: each answer
        // is the one its own text gives.
        let texts: Vec<String> = (0..3 * FACTS_KEPT)
            .flat_map(|i| {
                [
                    format!("select {i:03}"),
                    format!("begin  {i:03}"),
                    format!("set x={i:03}"),
                ]
            })
            .collect();
        for _ in 0..2 {
            for t in texts.iter().chain(texts.iter().rev()) {
                let word = leading_keyword(t).0;
                assert_eq!(is_transaction_control(t), word == "begin", "{t}");
                assert_eq!(changes_session(t), changes_session_uncached(t), "{t}");
                assert_eq!(changes_session(t), word == "set", "{t}");
            }
        }
        let long = format!("begin {}", "x".repeat(2 * FACTS_TEXT_MAX));
        assert!(is_transaction_control(&long) && is_transaction_control(&long));
    }

    #[test]
    fn transaction_control_is_recognised_past_comments() {
        for sql in [
            "BEGIN",
            "  /* tx */ -- go\n start transaction isolation level serializable",
            "commit",
            "ROLLBACK",
            "rollback to savepoint a",
            "release savepoint a",
            "end",
        ] {
            assert!(is_transaction_control(sql), "{sql}");
        }
        assert!(!is_transaction_control("select 1"));
        assert!(is_commit(" -- c\n COMMIT"));
        assert!(!is_commit("rollback"));
    }

    #[test]
    fn session_changing_statements_are_kept_out_of_pipelines() {
        for sql in [
            "set statement_timeout = 100",
            "SET ROLE app",
            "select set_config('app.user', '7', false)",
            "select pg_advisory_lock(1)",
            "create temp table t(x int)",
            "CREATE TEMPORARY TABLE t(x int)",
            "prepare p as select 1",
            "listen fills",
            "PRAGMA foreign_keys=OFF",
            "attach database 'x.db' as x",
        ] {
            assert!(changes_session(sql), "{sql}");
            assert!(
                !Statement::Query(sql.into(), vec![]).can_pipeline(),
                "{sql}"
            );
        }
        for sql in [
            "select 1",
            "insert into t values (1)",
            "create table t(x int)",
        ] {
            assert!(!changes_session(sql), "{sql}");
            assert!(Statement::Query(sql.into(), vec![]).can_pipeline(), "{sql}");
        }
        assert!(!Statement::Command("BLMPOP".into(), vec![]).can_pipeline());
    }
}
