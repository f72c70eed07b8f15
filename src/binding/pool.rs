//! `ConnectionPool` and `PooledConnection`: thin JS classes over `pool::Pool` and `pool::Lease`.

use std::sync::Arc;
use std::time::Duration;

use napi::bindgen_prelude::{
    Either, FnArgs, Function, JsObjectValue, Object, PromiseRaw, ToNapiValue, TypeTag, Unknown,
};
use napi::{sys, Env, JsValue};
use napi_derive::napi;

use super::completion::Complete;
use super::metrics::{Metrics, MetricsLatency};
use super::values::{self, Packed, Reply, Rows};
use super::{js_error, promise, runtime, settled, spawn};
use crate::error::{Error, Result as CoreResult};
use crate::metrics::Registry;
use crate::pool::config::{Int8Mode, PoolConfig, PoolOptions as CoreOptions};
use crate::pool::{self, Bounds, Lease, Operation, OrderedLease, Outcome, Pool, Statement, Value};

/// TLS settings. PostgreSQL: every libpq mode. Redis (`rediss://` URLs): `verify-full`
/// (default) or `require`.
#[napi(object)]
pub struct TlsOptions {
    /// `disable` | `prefer` | `require` | `verify-ca` | `verify-full`. Default `verify-full` when `ca` is given.
    pub mode: Option<String>,
    /// PEM text of the CA certificate(s) to trust (default: the Mozilla root store).
    pub ca: Option<String>,
}

/// Options for a `ConnectionPool`. Every duration is in milliseconds.
#[napi(object)]
pub struct PoolOptions {
    /// `postgres://…`, `postgresql://…` (multi-host and `target_session_attrs` allowed),
    /// `sqlite:PATH`, `sqlite::memory:`, `redis://…` or `rediss://…`.
    pub url: String,
    /// Most connections open at once, 1..10000. Default 10.
    pub max_size: Option<f64>,
    /// Connections kept open and warm even when idle. Default 0.
    pub min_idle: Option<f64>,
    /// One deadline for wait + connect + validate. Default 5000.
    pub acquire_timeout_ms: Option<f64>,
    /// Bound on opening one connection (TCP, TLS and authentication). Default 5000.
    pub connect_timeout_ms: Option<f64>,
    /// Connections are retired after this age, less up to 10 % jitter. 0 = never. Default 3 600 000.
    pub max_lifetime_ms: Option<f64>,
    /// Idle connections above `minIdle` close after this long. 0 = never. Default 600 000.
    pub idle_timeout_ms: Option<f64>,
    /// Idle connections are pinged this often so firewalls and PgBouncer keep them. 0 = off. Default 60 000.
    pub keepalive_ms: Option<f64>,
    /// Callers allowed to queue for a connection; beyond it acquire fails at once with `POOL_EXHAUSTED`. Default 10 000.
    pub max_waiting: Option<f64>,
    /// A lease held longer is reported by `leaks()` with the stack of its acquire. 0 = off (default).
    pub leak_detection_ms: Option<f64>,
    /// Prepared statements cached per connection. Turn off for PgBouncer transaction mode. Default true.
    pub statement_cache: Option<bool>,
    /// Default bound on every statement, in ms; 0 = off (default). PostgreSQL enforces it on
    /// the server (`statement_timeout`, sent at connect), SQLite interrupts the statement,
    /// Redis closes the command's connection. Fails with `QUERY_TIMEOUT`.
    pub statement_timeout_ms: Option<f64>,
    /// SQLite: a statement whose average running time is at most this many µs (default 200,
    /// 0..2000, 0 = never) runs on the calling thread when a connection is idle, settling at
    /// once; the run is cut off at 2 ms and then taken off the thread.
    pub inline_micros: Option<f64>,
    /// TLS settings; `sslmode` in the URL is honoured too.
    pub tls: Option<TlsOptions>,
    /// Label in metrics. Default: the backend name (`postgres`, `sqlite`, `redis`).
    pub name: Option<String>,
    /// Redis Cluster: `url` lists seed nodes (`redis://h1:p1,h2:p2,h3:p3`); keys are routed
    /// by slot, MOVED/ASK followed, failovers followed within `acquireTimeoutMs`. Pipelines
    /// must keep their keys in one slot; MULTI/WATCH/SELECT and listen are refused.
    pub cluster: Option<bool>,
    /// How int8 columns arrive: `bigint` (default) or `string`.
    pub int8: Option<String>,
}

/// Bounds on one call. The wait for a connection counts against them too.
#[napi(object, object_to_js = false)]
#[allow(dead_code)] // declares the TypeScript interface; `bounds` reads the fields itself
pub struct CallOptions {
    /// Fail with `QUERY_TIMEOUT` after this many ms. A running PostgreSQL statement is
    /// cancelled on the server (and its connection goes back idle), SQLite is interrupted,
    /// a Redis command's connection is closed.
    pub timeout_ms: Option<f64>,
    /// Abort with an `AbortError` (`code: 'ABORT_ERR'`, the signal's reason as `cause`),
    /// stopping the call the same way. An already-aborted signal rejects at once.
    #[napi(ts_type = "AbortSignal")]
    pub signal: Option<Unknown<'static>>,
}

/// Internal: the native side of an `AbortSignal` given in `CallOptions`, made and
/// cancelled by quartermaster's own wrapper. Pass `signal`; you never need this class.
#[napi]
pub struct Cancellation {
    token: tokio_util::sync::CancellationToken,
}

#[napi]
impl Cancellation {
    #[napi(constructor)]
    pub fn new() -> Self {
        Cancellation {
            token: tokio_util::sync::CancellationToken::new(),
        }
    }

    #[napi]
    pub fn cancel(&self) {
        self.token.cancel();
    }
}

impl Default for Cancellation {
    fn default() -> Self {
        Cancellation::new()
    }
}

/// Reads `timeoutMs` from the options and the wrapper's cancellation into core bounds.
pub(super) fn bounds(
    env: &Env,
    options: Option<Unknown<'_>>,
    cancel: Option<&Cancellation>,
) -> CoreResult<Bounds> {
    let timeout = match options {
        Some(o)
            if !matches!(
                o.get_type(),
                Ok(napi::ValueType::Undefined) | Ok(napi::ValueType::Null)
            ) =>
        {
            values::number_property(env, o.raw(), "timeoutMs", "options.timeoutMs")?
        }
        _ => None,
    };
    let timeout = match timeout {
        None => None,
        Some(ms) if ms.is_finite() && ms > 0.0 && ms <= 30.0 * 86_400_000.0 => {
            Some(Duration::from_micros((ms * 1000.0) as u64))
        }
        Some(ms) => {
            return Err(Error::invalid_argument(format!(
                "options.timeoutMs must be a positive number of milliseconds (got {ms})"
            )))
        }
    };
    Ok(Bounds::new(timeout, cancel.map(|c| c.token.clone())))
}

/// Rows of one statement.
#[napi(object, object_from_js = false)]
pub struct QueryResult {
    /// One object per row, keyed by column name.
    #[napi(ts_type = "Array<Record<string, any>>")]
    pub rows: Rows,
    /// Rows returned (or affected, for statements without a result set).
    pub row_count: f64,
    /// Column names, in order.
    pub fields: Vec<String>,
}

/// Outcome of a statement run for its effect.
#[napi(object, object_from_js = false)]
pub struct ExecuteResult {
    /// Rows inserted, updated or deleted.
    pub row_count: f64,
    /// SQLite: rowid of the last insert. Absent for other backends.
    pub last_insert_id: Option<f64>,
}

/// Open connections to one server.
#[napi(object, object_from_js = false)]
pub struct HostConnections {
    /// `host:port` (never credentials).
    pub host: String,
    pub connections: u32,
}

/// Occupancy right now.
#[napi(object, object_from_js = false)]
pub struct PoolStatus {
    pub max_size: u32,
    pub size: u32,
    pub idle: u32,
    pub in_use: u32,
    pub waiting: u32,
    /// PostgreSQL: open connections per server, e.g. which replicas a read pool reached.
    pub hosts: Vec<HostConnections>,
}

/// Counters since the pool was created, and latency percentiles.
#[napi(object, object_from_js = false)]
pub struct PoolMetrics {
    pub max_size: f64,
    pub current_size: f64,
    /// Idle connections ready for use.
    pub available: f64,
    pub in_use: f64,
    pub waiting: f64,
    pub total_gets: f64,
    pub successful_gets: f64,
    /// Acquires that ran out of `acquireTimeoutMs`.
    pub timeouts: f64,
    /// Connect failures and failed statements.
    pub errors: f64,
    /// Percent of gets that succeeded.
    pub success_rate: f64,
    pub uptime_seconds: f64,
    /// Connections opened.
    pub created: f64,
    /// Connections retired for age (`maxLifetimeMs`) or idleness (`idleTimeoutMs`).
    pub recycled: f64,
    /// Connections closed for any reason.
    pub destroyed: f64,
    /// Leases collected by the garbage collector without `release()`.
    pub leaked_leases: f64,
    /// Exceptions thrown by `listen()` callbacks (reported, the others carried on).
    pub listener_errors: f64,
    /// Statements run on the calling thread (SQLite: cheap statements and `querySync`).
    pub inline_statements: f64,
    /// Acquires refused at once because `maxWaiting` callers were queued.
    pub rejected: f64,
    /// Time to check out a connection.
    pub acquire: MetricsLatency,
    /// Time a lease was held.
    pub usage: MetricsLatency,
    /// Time a statement or command took on its connection.
    pub query: MetricsLatency,
}

/// `healthy` / `degraded` / `unhealthy` with the figures behind it.
#[napi(object, object_from_js = false)]
pub struct PoolHealth {
    #[napi(ts_type = "'healthy' | 'degraded' | 'unhealthy'")]
    pub status: String,
    /// 0..100.
    pub health_score: f64,
    pub available_connections: f64,
    pub waiting_requests: f64,
    pub utilization_percent: f64,
}

/// Sizing or usage advice from observed waits, timeouts and utilisation.
#[napi(object, object_from_js = false)]
pub struct PoolRecommendation {
    /// `increase-max-size`, `decrease-max-size`, `connect-failures`, `leaked-leases` or `ok`.
    pub kind: String,
    #[napi(ts_type = "'info' | 'warning'")]
    pub severity: String,
    pub message: String,
    pub suggested_max_size: Option<f64>,
}

/// A lease held past `leakDetectionMs`.
#[napi(object, object_from_js = false)]
pub struct LeaseLeak {
    pub pool: String,
    pub age_ms: f64,
    /// The JavaScript stack of the `acquire()` call.
    pub stack: Option<String>,
}

/// Options for `close()`.
#[napi(object)]
pub struct CloseOptions {
    /// How long queued and running work may take before sockets are closed. Default 10 000.
    pub timeout_ms: Option<f64>,
}

/// A pool of PostgreSQL, SQLite or Redis connections kept inside Rust. One native call per
/// `query`/`execute`/`command`: checkout, run and return happen without crossing into JS.
#[napi]
pub struct ConnectionPool {
    pub(super) pool: Pool,
    pub(super) int8: Int8Mode,
    /// Set for a handle from `ConnectionPool.shared`.
    claim: Option<pool::SharedPool>,
}

impl ConnectionPool {
    /// Runs `open` on the runtime with the call's bounds (checked open, options read first)
    /// and settles the promise with `wrap` of its result.
    pub(super) fn spawn_bounded<'e, T, V, F, Fut>(
        &self,
        env: &'e Env,
        options: Option<Unknown<'e>>,
        cancel: Option<&Cancellation>,
        open: F,
        wrap: impl FnOnce(T) -> V + Send + 'static,
    ) -> napi::Result<PromiseRaw<'e, V>>
    where
        T: Send + 'static,
        V: napi::bindgen_prelude::ToNapiValue + 'static,
        F: FnOnce(Pool, Bounds) -> Fut,
        Fut: std::future::Future<Output = CoreResult<T>> + Send + 'static,
    {
        let bounds = match self
            .check_open()
            .and_then(|()| bounds(env, options, cancel))
        {
            Ok(b) => b,
            Err(e) => return settled(env, Err(e)),
        };
        spawn(env, open(self.pool.clone(), bounds), move |_, v| {
            Ok(wrap(v))
        })
    }

    /// `POOL_CLOSED` once this handle is closed, even while other holders of a shared pool
    /// keep it open.
    pub(super) fn check_open(&self) -> CoreResult<()> {
        match &self.claim {
            Some(claim) if claim.is_released() => Err(self.pool.closed_error()),
            _ => Ok(()),
        }
    }
}

fn core_options(o: PoolOptions) -> CoreOptions {
    let (tls_mode, tls_ca) = match o.tls {
        Some(t) => (t.mode, t.ca),
        None => (None, None),
    };
    CoreOptions {
        url: o.url,
        max_size: o.max_size,
        min_idle: o.min_idle,
        acquire_timeout_ms: o.acquire_timeout_ms,
        connect_timeout_ms: o.connect_timeout_ms,
        max_lifetime_ms: o.max_lifetime_ms,
        idle_timeout_ms: o.idle_timeout_ms,
        keepalive_ms: o.keepalive_ms,
        max_waiting: o.max_waiting,
        leak_detection_ms: o.leak_detection_ms,
        statement_cache: o.statement_cache,
        statement_timeout_ms: o.statement_timeout_ms,
        inline_micros: o.inline_micros,
        cluster: o.cluster,
        tls_mode,
        tls_ca,
        name: o.name,
        int8: o.int8,
    }
}

/// A statement's outcome of another kind than its method returns (a bug, never user input).
fn unreachable_value<V>() -> napi::Result<V> {
    Err(napi::Error::from_reason(
        "internal: the statement produced an outcome of another kind",
    ))
}

pub(super) fn rows(result: pool::QueryResult, int8: Int8Mode) -> QueryResult {
    QueryResult {
        row_count: result.row_count as f64,
        fields: result.columns.to_vec(),
        rows: Rows { result, int8 },
    }
}

fn packed(result: pool::QueryResult, int8: Int8Mode) -> Packed {
    Packed { result, int8 }
}

fn done(result: pool::ExecuteResult) -> ExecuteResult {
    ExecuteResult {
        row_count: result.row_count as f64,
        last_insert_id: result.last_insert_id.map(|i| i as f64),
    }
}

fn raw(v: &Option<Unknown<'_>>) -> Option<sys::napi_value> {
    v.as_ref().map(|u| u.raw())
}

/// Reads `[sql, params, sql, params, …]` into statements.
fn group_from_js(
    env: &Env,
    items: sys::napi_value,
    statement: fn(String, Vec<Value>) -> Statement,
) -> CoreResult<Vec<Statement>> {
    let n = values::array_length(env, items)?;
    let mut out = Vec::with_capacity(n as usize / 2);
    // The same text as the item before (often all of them): copied, not read again.
    let mut last: Option<(sys::napi_value, String)> = None;
    for i in (0..n.saturating_sub(1)).step_by(2) {
        let js_sql = values::element_at(env, items, i)?;
        let sql = match &last {
            Some((js, text)) if values::strict_equals(env, *js, js_sql) => text.clone(),
            _ => {
                let text = values::string_value(env, js_sql, "group sql")?;
                last = Some((js_sql, text.clone()));
                text
            }
        };
        let params = values::element_at(env, items, i + 1)?;
        out.push(statement(sql, values::params_from_js(env, Some(params))?));
    }
    Ok(out)
}

/// `_executeGroup` / `_queryGroup`: the group run on the calling thread by `run`, as a JS
/// array of each statement's result (an error object for a failed one), or `null` when
/// nothing ran — a malformed item too: then each goes its own way and meets its own error.
fn run_group<'e>(
    pool: &ConnectionPool,
    env: &'e Env,
    items: Unknown<'e>,
    statement: fn(String, Vec<Value>) -> Statement,
    run: impl FnOnce(&Pool, &[Statement]) -> Option<Vec<Option<CoreResult<Outcome>>>>,
) -> napi::Result<Unknown<'e>> {
    let raw_env = env.raw();
    let outcomes = match group_from_js(env, items.raw(), statement) {
        Ok(statements) if pool.check_open().is_ok() => {
            let n = statements.len();
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run(&pool.pool, &statements)
            }))
            .unwrap_or_else(|_| {
                // It may have run part way: never let JavaScript run them again.
                let may_have_run = Error::internal(crate::pool::sqlite::MAY_HAVE_RUN);
                Some((0..n).map(|_| Some(Err(may_have_run.clone()))).collect())
            })
        }
        _ => None,
    };
    let mut out = std::ptr::null_mut();
    let Some(outcomes) = outcomes else {
        unsafe { sys::napi_get_null(raw_env, &mut out) };
        return Ok(unsafe { Unknown::from_raw_unchecked(raw_env, out) });
    };
    unsafe { sys::napi_create_array_with_length(raw_env, outcomes.len(), &mut out) };
    for (i, outcome) in outcomes.into_iter().enumerate() {
        let value = match outcome.map(|o| group_value(env, pool.int8, o)) {
            Some(value) => value,
            None => {
                // Not taken into the group: JavaScript runs it on its own.
                let mut null = std::ptr::null_mut();
                unsafe { sys::napi_get_null(raw_env, &mut null) };
                null
            }
        };
        unsafe { sys::napi_set_element(raw_env, out, i as u32, value) };
    }
    Ok(unsafe { Unknown::from_raw_unchecked(raw_env, out) })
}

/// One group statement's outcome as JavaScript: its result, or an error object. A result
/// that cannot be converted becomes an INTERNAL error for that statement alone (it ran:
/// it must not run again).
fn group_value(env: &Env, int8: Int8Mode, outcome: CoreResult<Outcome>) -> sys::napi_value {
    let raw_env = env.raw();
    let converted = match outcome {
        Ok(Outcome::Done(d)) => unsafe { ExecuteResult::to_napi_value(raw_env, done(d)) }
            .map_err(|e| Error::internal(format!("its result could not be converted: {e}"))),
        Ok(Outcome::Rows(rows)) => unsafe { Packed::to_napi_value(raw_env, packed(rows, int8)) }
            .map_err(|e| Error::internal(format!("its rows could not be converted: {e}"))),
        Ok(_) => Err(Error::internal(
            "the statement produced an outcome of another kind",
        )),
        Err(e) => Err(e),
    };
    converted.unwrap_or_else(|e| match super::errors::error_object(env, &e) {
        Ok(obj) => obj.raw(),
        Err(_) => {
            let mut undefined = std::ptr::null_mut();
            unsafe { sys::napi_get_undefined(raw_env, &mut undefined) };
            undefined
        }
    })
}

/// Reads `[[name, ...args], ...]`.
fn pipeline_from_js(env: &Env, commands: sys::napi_value) -> CoreResult<Vec<(String, Vec<Value>)>> {
    let n = values::array_length(env, commands)?;
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n {
        let cmd = values::element_at(env, commands, i)?;
        let len = values::array_length(env, cmd).map_err(|_| {
            Error::invalid_argument(format!("commands[{i}] must be an array [name, ...args]"))
        })?;
        if len == 0 {
            return Err(Error::invalid_argument(format!("commands[{i}] is empty")));
        }
        let name = values::string_at(env, cmd, 0, &format!("commands[{i}][0]"))?;
        let mut args = values::values_from_array(env, cmd, &format!("commands[{i}]"))?;
        args.remove(0);
        out.push((name, args));
    }
    Ok(out)
}

/// Where a statement goes: the pool's queue, or one lease's connection.
trait Runner {
    fn int8(&self) -> Int8Mode;
    fn send(&self, statement: Statement, bounds: Bounds, complete: Complete<Outcome>);
    /// Runs a cheap SQLite statement on this thread; `None` to send it instead.
    fn try_inline(&self, statement: &Statement) -> Option<CoreResult<Outcome>>;
    /// `querySync` / `executeSync`.
    fn run_sync(&self, op: &Operation<'_>) -> CoreResult<Outcome>;
}

impl Runner for ConnectionPool {
    fn int8(&self) -> Int8Mode {
        self.int8
    }

    fn send(&self, statement: Statement, bounds: Bounds, complete: Complete<Outcome>) {
        match self.check_open() {
            Ok(()) => self.pool.submit(statement, bounds, complete),
            Err(e) => complete(Err(e)),
        }
    }

    fn try_inline(&self, statement: &Statement) -> Option<CoreResult<Outcome>> {
        self.check_open().ok()?;
        self.pool.try_inline(statement)
    }

    fn run_sync(&self, op: &Operation<'_>) -> CoreResult<Outcome> {
        self.check_open()?;
        self.pool.run_sync(op)
    }
}

impl Runner for PooledConnection {
    fn int8(&self) -> Int8Mode {
        self.int8
    }

    fn send(&self, statement: Statement, bounds: Bounds, complete: Complete<Outcome>) {
        self.lease.submit(statement, bounds, complete);
    }

    fn try_inline(&self, statement: &Statement) -> Option<CoreResult<Outcome>> {
        self.lease.try_inline(statement, &self.profiles)
    }

    fn run_sync(&self, op: &Operation<'_>) -> CoreResult<Outcome> {
        self.lease.run_sync(op)
    }
}

/// A statement's parameters as JavaScript passed them: one `params` value (`undefined`,
/// `null` or an array), or spread as separate arguments (a bare function's, see
/// [`bare_functions`]).
#[derive(Clone, Copy)]
enum JsParams<'a> {
    Value(Option<sys::napi_value>),
    Spread(&'a [sys::napi_value]),
}

impl JsParams<'_> {
    fn read(self, env: &Env) -> CoreResult<Vec<Value>> {
        match self {
            JsParams::Value(v) => values::params_from_js(env, v),
            JsParams::Spread(args) => values::params_from_args(env, args),
        }
    }
}

impl<'e> From<&Option<Unknown<'e>>> for JsParams<'static> {
    fn from(params: &Option<Unknown<'e>>) -> Self {
        JsParams::Value(raw(params))
    }
}

fn send_query<'e>(
    to: &impl Runner,
    env: &'e Env,
    sql: String,
    params: JsParams<'_>,
    options: Option<Unknown<'e>>,
    cancel: Option<&Cancellation>,
) -> napi::Result<Either<PromiseRaw<'e, Packed>, Packed>> {
    let (params, bounds) = match params
        .read(env)
        .and_then(|p| Ok((p, bounds(env, options, cancel)?)))
    {
        Ok(v) => v,
        Err(e) => return settled(env, Err(e)).map(Either::A),
    };
    let int8 = to.int8();
    let statement = Statement::Query(sql, params);
    if !bounds.is_set() {
        match inline(to, &statement) {
            // Run already: wrappers.js shapes it and resolves without a native promise.
            Some(Ok(out)) => return Ok(Either::B(packed(out.into_rows(), int8))),
            Some(Err(e)) => return settled(env, Err(e)).map(Either::A),
            None => {}
        }
    }
    let (complete, promise) = promise(env, move |_, out: Outcome| {
        Ok(packed(out.into_rows(), int8))
    })?;
    to.send(statement, bounds, complete);
    Ok(Either::A(promise))
}

fn send_execute<'e>(
    to: &impl Runner,
    env: &'e Env,
    sql: String,
    params: JsParams<'_>,
    options: Option<Unknown<'e>>,
    cancel: Option<&Cancellation>,
) -> napi::Result<Either<PromiseRaw<'e, ExecuteResult>, ExecuteResult>> {
    let (params, bounds) = match params
        .read(env)
        .and_then(|p| Ok((p, bounds(env, options, cancel)?)))
    {
        Ok(v) => v,
        Err(e) => return settled(env, Err(e)).map(Either::A),
    };
    let statement = Statement::Execute(sql, params);
    if !bounds.is_set() {
        match inline(to, &statement) {
            // Run already: wrappers.js resolves it without a native promise.
            Some(Ok(Outcome::Done(d))) => return Ok(Either::B(done(d))),
            Some(Ok(_)) => return unreachable_value(),
            Some(Err(e)) => return settled(env, Err(e)).map(Either::A),
            None => {}
        }
    }
    let (complete, promise) = promise(env, |_, out: Outcome| match out {
        Outcome::Done(d) => Ok(done(d)),
        _ => unreachable_value(),
    })?;
    to.send(statement, bounds, complete);
    Ok(Either::A(promise))
}

fn send_command<'e>(
    to: &impl Runner,
    env: &'e Env,
    name: String,
    args: Option<Unknown<'e>>,
    options: Option<Unknown<'e>>,
    cancel: Option<&Cancellation>,
) -> napi::Result<PromiseRaw<'e, Reply>> {
    let (args, bounds) = match values::params_from_js(env, raw(&args))
        .and_then(|a| Ok((a, bounds(env, options, cancel)?)))
    {
        Ok(v) => v,
        Err(e) => return settled(env, Err(e)),
    };
    let (complete, promise) = promise(env, |_, out: Outcome| match out {
        Outcome::Reply(v) => Ok(Reply(v)),
        _ => unreachable_value(),
    })?;
    to.send(Statement::Command(name, args), bounds, complete);
    Ok(promise)
}

fn send_pipeline<'e>(
    to: &impl Runner,
    env: &'e Env,
    commands: Unknown<'e>,
    options: Option<Unknown<'e>>,
    cancel: Option<&Cancellation>,
) -> napi::Result<PromiseRaw<'e, Reply>> {
    let (commands, bounds) = match pipeline_from_js(env, commands.raw())
        .and_then(|c| Ok((c, bounds(env, options, cancel)?)))
    {
        Ok(v) => v,
        Err(e) => return settled(env, Err(e)),
    };
    let (complete, promise) = promise(env, |_, out: Outcome| match out {
        Outcome::Replies(v) => Ok(Reply(Value::Array(v))),
        _ => unreachable_value(),
    })?;
    to.send(Statement::Pipeline(commands), bounds, complete);
    Ok(promise)
}

/// [`Runner::try_inline`], with a panic turned into `INTERNAL`.
fn inline(to: &impl Runner, statement: &Statement) -> Option<CoreResult<Outcome>> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| to.try_inline(statement)))
        .unwrap_or_else(|_| {
            Some(Err(Error::internal(
                "the statement failed unexpectedly (a bug); it may or may not have run",
            )))
        })
}

/// Runs core work on the calling thread with a panic turned into `INTERNAL` (never an
/// abort of Node).
fn on_this_thread<T>(work: impl FnOnce() -> CoreResult<T>) -> CoreResult<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).unwrap_or_else(|_| {
        Err(Error::internal(
            "the statement failed unexpectedly (a bug); it may or may not have run",
        ))
    })
}

fn query_sync(
    to: &impl Runner,
    env: &Env,
    sql: &str,
    params: JsParams<'_>,
) -> napi::Result<Packed> {
    let outcome = params
        .read(env)
        .and_then(|p| on_this_thread(|| to.run_sync(&Operation::Query(sql, &p))));
    match outcome {
        Ok(out) => Ok(packed(out.into_rows(), to.int8())),
        Err(e) => Err(js_error(env, e)),
    }
}

fn execute_sync(
    to: &impl Runner,
    env: &Env,
    sql: &str,
    params: JsParams<'_>,
) -> napi::Result<ExecuteResult> {
    let outcome = params
        .read(env)
        .and_then(|p| on_this_thread(|| to.run_sync(&Operation::Execute(sql, &p))));
    match outcome {
        Ok(Outcome::Done(d)) => Ok(done(d)),
        Ok(_) => unreachable_value(),
        Err(e) => Err(js_error(env, e)),
    }
}

/// What a bare function ([`bare_functions`]) does.
const QUERY: u8 = 0;
const EXECUTE: u8 = 1;
const QUERY_SYNC: u8 = 2;
const EXECUTE_SYNC: u8 = 3;
/// Added to a kind: the parameters come spread, `(sql, ...params)`.
const SPREAD: u8 = 4;
/// Most parameters a bare function takes spread (wrappers.js passes longer lists whole).
const SPREAD_MAX: usize = 16;

/// `query`, `execute`, `querySync` and `executeSync` as plain functions of
/// `(receiver, sql, params)`, and of `(receiver, sql, ...params)` under the same names with
/// `Spread` appended (at most [`SPREAD_MAX`] parameters), called by wrappers.js when no
/// options are given. They skip what napi-rs does on every method call (the borrow scope,
/// and for a pool's the receiver's unwrap and type-tag check): about a third of a cheap
/// SQLite statement's cost outside SQLite.
///
/// `Some(target)` (a pool's, made once per pool): each function holds `target`'s address.
/// wrappers.js takes `_bare` off the prototype at load and keeps what it makes only in a
/// `WeakMap` keyed by the JavaScript object that owns `target`: no other code can reach the
/// functions, and they are unreachable once that object is, so `target` outlives every call.
///
/// `None` (leases', made once per environment): each call unwraps its receiver, checked to
/// be an `R` by its type tag. It comes as the first argument: a method call with `this` took
/// longer. A lease is short-lived: eight functions made for each one survived the
/// young-generation collections (V8 keeps a native function's data alive until a full
/// collection), and in a workload of transactions those collections took 5 to 12 ms each
/// instead of under one.
fn bare_functions<'e, R: Runner + TypeTag + 'static>(
    env: &'e Env,
    target: Option<&R>,
) -> napi::Result<Object<'e>> {
    let data = target.map_or(std::ptr::null_mut(), |t| {
        (t as *const R).cast_mut().cast::<std::ffi::c_void>()
    });
    let mut functions = Object::new(env)?;
    let kinds: [(&str, sys::napi_callback); 8] = [
        ("query", Some(bare::<R, QUERY>)),
        ("execute", Some(bare::<R, EXECUTE>)),
        ("querySync", Some(bare::<R, QUERY_SYNC>)),
        ("executeSync", Some(bare::<R, EXECUTE_SYNC>)),
        ("querySpread", Some(bare::<R, { QUERY + SPREAD }>)),
        ("executeSpread", Some(bare::<R, { EXECUTE + SPREAD }>)),
        ("querySyncSpread", Some(bare::<R, { QUERY_SYNC + SPREAD }>)),
        (
            "executeSyncSpread",
            Some(bare::<R, { EXECUTE_SYNC + SPREAD }>),
        ),
    ];
    for (name, callback) in kinds {
        let mut f = std::ptr::null_mut();
        let status = unsafe {
            sys::napi_create_function(
                env.raw(),
                name.as_ptr().cast(),
                name.len() as isize,
                callback,
                data,
                &mut f,
            )
        };
        if status != sys::Status::napi_ok {
            return Err(napi::Error::from_reason("cannot create a function"));
        }
        functions.set_named_property(name, unsafe { Unknown::from_raw_unchecked(env.raw(), f) })?;
    }
    Ok(functions)
}

fn to_js<V: ToNapiValue>(env: sys::napi_env, value: V) -> napi::Result<sys::napi_value> {
    // SAFETY: `env` is the environment of the call in progress.
    unsafe { V::to_napi_value(env, value) }
}

/// One bare function (see [`bare_functions`]): the method's work on `(sql, params)`. Bad
/// arguments reject the promise (`query`, `execute`) or throw (the sync ones) with
/// `INVALID_ARGUMENT`; nothing unwinds into Node.
unsafe extern "C" fn bare<R: Runner + TypeTag + 'static, const KIND: u8>(
    raw_env: sys::napi_env,
    info: sys::napi_callback_info,
) -> sys::napi_value {
    // (receiver, sql, params…): the receiver is read only by a shared function (`data` null).
    let mut argc = 2 + SPREAD_MAX;
    let mut argv = [std::ptr::null_mut(); 2 + SPREAD_MAX];
    let mut data = std::ptr::null_mut();
    let status = unsafe {
        sys::napi_get_cb_info(
            raw_env,
            info,
            &mut argc,
            argv.as_mut_ptr(),
            std::ptr::null_mut(),
            &mut data,
        )
    };
    let env = Env::from_raw(raw_env);
    let run = || -> napi::Result<sys::napi_value> {
        if status != sys::Status::napi_ok {
            return Err(napi::Error::from_reason("cannot read the call's arguments"));
        }
        let to: &R = if data.is_null() {
            // SAFETY: an argument of the call, alive for the call.
            match unsafe { receiver::<R>(raw_env, argv[0]) } {
                Some(to) => to,
                None => {
                    let name = std::any::type_name::<R>().rsplit("::").next();
                    let message = format!(
                        "this method needs a {} as `this`",
                        name.unwrap_or("native object")
                    );
                    return Err(js_error(&env, Error::invalid_argument(message)));
                }
            }
        } else {
            // SAFETY: `data` is the `R` that `bare_functions` was given, alive for every call.
            unsafe { &*data.cast_const().cast::<R>() }
        };
        // The sync calls read a short text without allocating; the others keep it.
        let mut short = [0u8; values::SHORT_STRING];
        let sql = values::string_value_in(&env, argv[1], "sql", &mut short);
        // Fewer arguments than asked for: napi fills the rest with `undefined`.
        let params = if KIND & SPREAD != 0 {
            JsParams::Spread(&argv[2..argc.clamp(2, 2 + SPREAD_MAX)])
        } else {
            JsParams::Value(Some(argv[2]))
        };
        match KIND & !SPREAD {
            QUERY => match sql {
                Ok(sql) => to_js(
                    raw_env,
                    send_query(to, &env, sql.into_owned(), params, None, None)?,
                ),
                Err(e) => to_js(raw_env, settled::<Packed>(&env, Err(e))?),
            },
            EXECUTE => match sql {
                Ok(sql) => to_js(
                    raw_env,
                    send_execute(to, &env, sql.into_owned(), params, None, None)?,
                ),
                Err(e) => to_js(raw_env, settled::<ExecuteResult>(&env, Err(e))?),
            },
            QUERY_SYNC => {
                let sql = sql.map_err(|e| js_error(&env, e))?;
                to_js(raw_env, query_sync(to, &env, &sql, params)?)
            }
            _ => {
                let sql = sql.map_err(|e| js_error(&env, e))?;
                to_js(raw_env, execute_sync(to, &env, &sql, params)?)
            }
        }
    };
    let outcome =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).unwrap_or_else(|_| {
            Err(js_error(
                &env,
                Error::internal("the call failed unexpectedly (a bug); it may or may not have run"),
            ))
        });
    match outcome {
        Ok(value) => value,
        Err(e) => {
            unsafe { napi::JsError::from(e).throw_into(raw_env) };
            std::ptr::null_mut()
        }
    }
}

/// The `R` wrapped by `value` (a method's receiver), when its type tag says it is one: an
/// object of another class, or a plain object made with `R`'s prototype, is `None`, refused
/// before any cast.
///
/// # Safety
/// `value` is a value of the call in progress in `env`; the reference is used only during it.
unsafe fn receiver<'a, R: TypeTag + 'static>(
    env: sys::napi_env,
    value: sys::napi_value,
) -> Option<&'a R> {
    let mut wrapped = std::ptr::null_mut();
    let status = unsafe { sys::napi_unwrap(env, value, &mut wrapped) };
    if status != sys::Status::napi_ok || wrapped.is_null() {
        return None;
    }
    let mut tagged = false;
    let status =
        unsafe { sys::napi_check_object_type_tag(env, value, &R::type_tag(), &mut tagged) };
    (status == sys::Status::napi_ok && tagged)
        .then(|| unsafe { &*wrapped.cast_const().cast::<R>() })
}

/// The JS stack of the caller, taken only when leak detection wants it.
fn capture_stack(env: &Env, wanted: bool) -> Option<String> {
    if !wanted {
        return None;
    }
    let err = env
        .create_error(napi::Error::from_reason("acquired here"))
        .ok()?;
    let stack: Option<String> = err.get_named_property("stack").ok();
    stack.map(|s| {
        s.lines()
            .skip(1)
            .map(str::trim)
            .collect::<Vec<_>>()
            .join("\n")
    })
}

#[napi]
impl ConnectionPool {
    /// Validates the options (`INVALID_ARGUMENT` names the bad one) and starts the pool.
    /// Connections open lazily, except `minIdle` which are warmed in the background.
    /// The pool reports into `metrics`, or into `Metrics.global()` when none is given.
    #[napi(constructor)]
    pub fn new(env: Env, options: PoolOptions, metrics: Option<&Metrics>) -> napi::Result<Self> {
        let config =
            PoolConfig::from_options(core_options(options)).map_err(|e| js_error(&env, e))?;
        let int8 = config.int8;
        let pool = Pool::new(
            config,
            metrics.map_or_else(Registry::global, |m| Arc::clone(&m.registry)),
            runtime(),
        )
        .map_err(|e| js_error(&env, e))?;
        Ok(ConnectionPool {
            pool,
            int8,
            claim: None,
        })
    }

    /// The pool shared process-wide under `options.name` (required), created on the first
    /// call: every `worker_thread` asking with the same name and options uses the same
    /// connections, so N workers do not open N pools. Asking again with other options (or
    /// another `metrics`) is `INVALID_ARGUMENT`. `close()` lets go of this handle; the pool
    /// drains and closes when its last handle is closed or collected.
    #[napi(factory)]
    pub fn shared(env: Env, options: PoolOptions, metrics: Option<&Metrics>) -> napi::Result<Self> {
        let registry = metrics.map_or_else(Registry::global, |m| Arc::clone(&m.registry));
        let claim = pool::SharedPool::claim(core_options(options), registry, runtime())
            .map_err(|e| js_error(&env, e))?;
        Ok(ConnectionPool {
            pool: claim.pool().clone(),
            int8: claim.pool().config().int8,
            claim: Some(claim),
        })
    }

    /// The pool's label in metrics (made unique per process).
    #[napi(getter)]
    pub fn name(&self) -> String {
        self.pool.name().to_string()
    }

    /// `postgres`, `sqlite` or `redis`.
    #[napi(getter)]
    pub fn backend(&self) -> String {
        self.pool.config().target.backend().to_string()
    }

    /// Runs one statement on a pooled connection and returns its rows.
    #[napi(
        ts_args_type = "sql: string, params?: unknown[], options?: CallOptions",
        ts_return_type = "Promise<QueryResult>"
    )]
    pub fn query<'e>(
        &self,
        env: &'e Env,
        sql: String,
        params: Option<Unknown<'e>>,
        options: Option<Unknown<'e>>,
        cancel: Option<&Cancellation>,
    ) -> napi::Result<Either<PromiseRaw<'e, Packed>, Packed>> {
        send_query(self, env, sql, (&params).into(), options, cancel)
    }

    /// Runs one statement for its effect and returns the rows affected.
    #[napi(
        ts_args_type = "sql: string, params?: unknown[], options?: CallOptions",
        ts_return_type = "Promise<ExecuteResult>"
    )]
    pub fn execute<'e>(
        &self,
        env: &'e Env,
        sql: String,
        params: Option<Unknown<'e>>,
        options: Option<Unknown<'e>>,
        cancel: Option<&Cancellation>,
    ) -> napi::Result<Either<PromiseRaw<'e, ExecuteResult>, ExecuteResult>> {
        send_execute(self, env, sql, (&params).into(), options, cancel)
    }

    /// SQLite: runs one statement on the calling thread and returns its rows — no promise,
    /// no thread hop (the `predictSync` of connections). Waits at most `acquireTimeoutMs`
    /// for a connection. Other backends: `INVALID_ARGUMENT` (a network round trip would
    /// block the event loop).
    #[napi(
        ts_args_type = "sql: string, params?: unknown[]",
        ts_return_type = "QueryResult"
    )]
    pub fn query_sync(
        &self,
        env: Env,
        sql: String,
        params: Option<Unknown<'_>>,
    ) -> napi::Result<Packed> {
        query_sync(self, &env, &sql, (&params).into())
    }

    /// SQLite: runs one statement for its effect on the calling thread.
    #[napi(ts_args_type = "sql: string, params?: unknown[]")]
    pub fn execute_sync(
        &self,
        env: Env,
        sql: String,
        params: Option<Unknown<'_>>,
    ) -> napi::Result<ExecuteResult> {
        execute_sync(self, &env, &sql, (&params).into())
    }

    /// Internal (wrappers.js): this pool's `query`, `execute`, `querySync` and `executeSync`
    /// as bare functions of `(sql, params)` (see `bare_functions`).
    #[napi(js_name = "_bare", skip_typescript)]
    pub fn bare<'e>(&self, env: &'e Env) -> napi::Result<Object<'e>> {
        bare_functions(env, Some(self))
    }

    /// Internal (wrappers.js): `execute` calls made in one turn of the event loop, as
    /// `[sql, params, sql, params, …]`, run as one transaction on the calling thread when
    /// they qualify ([`Pool::try_inline_group`]). Each item's result or error, in order;
    /// `null` when nothing ran (then each is executed on its own).
    #[napi(js_name = "_executeGroup", skip_typescript)]
    pub fn execute_group<'e>(&self, env: &'e Env, items: Unknown<'e>) -> napi::Result<Unknown<'e>> {
        run_group(self, env, items, Statement::Execute, |pool, statements| {
            pool.try_inline_group(statements)
        })
    }

    /// Internal (wrappers.js): `query` calls made in one turn of the event loop, run in one
    /// read transaction on the calling thread when they qualify ([`Pool::try_inline_reads`]).
    /// Each item's packed rows or error, in order; `null` when nothing ran.
    #[napi(js_name = "_queryGroup", skip_typescript)]
    pub fn query_group<'e>(&self, env: &'e Env, items: Unknown<'e>) -> napi::Result<Unknown<'e>> {
        run_group(self, env, items, Statement::Query, |pool, statements| {
            pool.try_inline_reads(statements)
        })
    }

    /// Redis: runs one command, e.g. `command('SET', 'k', 'v')`; the arguments may also come
    /// as one array, `command('SET', ['k', 'v'])`.
    #[napi(
        ts_args_type = "name: string, ...args: Array<string | number | bigint | Buffer | CallOptions> | [Array<string | number | bigint | Buffer>, CallOptions?]",
        ts_return_type = "Promise<unknown>"
    )]
    pub fn command<'e>(
        &self,
        env: &'e Env,
        name: String,
        args: Option<Unknown<'e>>,
        options: Option<Unknown<'e>>,
        cancel: Option<&Cancellation>,
    ) -> napi::Result<PromiseRaw<'e, Reply>> {
        send_command(self, env, name, args, options, cancel)
    }

    /// Redis: sends several commands in one round trip, e.g. `pipeline([['SET','k','v'], ['GET','k']])`.
    #[napi(
        ts_args_type = "commands: Array<[string, ...Array<string | number | bigint | Buffer>]>, options?: CallOptions",
        ts_return_type = "Promise<unknown[]>"
    )]
    pub fn pipeline<'e>(
        &self,
        env: &'e Env,
        commands: Unknown<'e>,
        options: Option<Unknown<'e>>,
        cancel: Option<&Cancellation>,
    ) -> napi::Result<PromiseRaw<'e, Reply>> {
        send_pipeline(self, env, commands, options, cancel)
    }

    /// Checks out a connection for several statements (a transaction, session state).
    /// Release it with `release()`, `using` or `await using`; a lease the garbage collector
    /// finds unreleased is rolled back, returned and counted in `leakedLeases`.
    /// `options.timeoutMs` / `options.signal` bound the wait (never past `acquireTimeoutMs`).
    #[napi(
        ts_args_type = "options?: CallOptions",
        ts_return_type = "Promise<PooledConnection>"
    )]
    pub fn acquire<'e>(
        &self,
        env: &'e Env,
        options: Option<Unknown<'e>>,
        cancel: Option<&Cancellation>,
    ) -> napi::Result<PromiseRaw<'e, PooledConnection>> {
        if let Err(e) = self.check_open() {
            return settled(env, Err(e));
        }
        let bounds = match bounds(env, options, cancel) {
            Ok(b) => b,
            Err(e) => return settled(env, Err(e)),
        };
        if let Some(fired) = bounds.check() {
            return settled(
                env,
                Err(bounds.error(fired, "before a connection was taken")),
            );
        }
        let stack = capture_stack(env, !self.pool.config().leak_detection.is_zero());
        // An idle connection used moments ago needs no validation: hand it out without
        // leaving the main thread.
        match self.pool.try_acquire_validated(stack.clone()) {
            Ok(Some(lease)) => return settled(env, Ok(PooledConnection::new(lease, self.int8))),
            Ok(None) => {}
            Err(e) => return settled(env, Err(e)),
        }
        let pool = self.pool.clone();
        let int8 = self.int8;
        spawn(
            env,
            async move { pool.acquire_within(stack, &bounds).await },
            move |_, lease| Ok(PooledConnection::new(lease, int8)),
        )
    }

    /// Internal (transaction): a lease of the connection writes go through (SQLite's one
    /// writer), so two transactions queue for it instead of meeting in the busy handler.
    #[napi(js_name = "_acquireForWrite", skip_typescript)]
    pub fn acquire_for_write<'e>(
        &self,
        env: &'e Env,
        options: Option<Unknown<'e>>,
        cancel: Option<&Cancellation>,
    ) -> napi::Result<PromiseRaw<'e, PooledConnection>> {
        let int8 = self.int8;
        let stack = capture_stack(env, !self.pool.config().leak_detection.is_zero());
        // The writer idle and used moments ago, no write ahead of it: without leaving the
        // main thread, as `acquire` does.
        let unbounded = options.is_none() && cancel.is_none();
        if unbounded && self.check_open().is_ok() {
            match self.pool.try_acquire_for_write_validated(stack.clone()) {
                Ok(Some(lease)) => return settled(env, Ok(PooledConnection::new(lease, int8))),
                Ok(None) => {}
                Err(e) => return settled(env, Err(e)),
            }
        }
        self.spawn_bounded(
            env,
            options,
            cancel,
            move |pool, bounds| async move { pool.acquire_for_write(stack, &bounds).await },
            move |lease| PooledConnection::new(lease, int8),
        )
    }

    /// An idle connection right now, or `null`. Never waits, connects or validates.
    #[napi]
    pub fn try_acquire(&self, env: Env) -> napi::Result<Option<PooledConnection>> {
        self.check_open().map_err(|e| js_error(&env, e))?;
        let stack = capture_stack(&env, !self.pool.config().leak_detection.is_zero());
        match self.pool.try_acquire(stack) {
            Ok(lease) => Ok(lease.map(|l| PooledConnection::new(l, self.int8))),
            Err(e) => Err(js_error(&env, e)),
        }
    }

    /// Runs `fn` inside a transaction on one connection: BEGIN (SQLite: BEGIN IMMEDIATE),
    /// then COMMIT when `fn` resolves or ROLLBACK when it throws (MULTI/EXEC/DISCARD on
    /// Redis). Resolves with what `fn` returned only if the server committed: when a
    /// statement inside failed and `fn` caught it, COMMIT is answered with ROLLBACK and this
    /// rejects (`QUERY_FAILED`, `rolledBack: true`, the failed statement's SQLSTATE). On
    /// Redis it resolves with EXEC's replies, a failed command's reply an `Error` in its
    /// place (the others were applied). `options.timeoutMs` / `options.signal` bound the
    /// whole transaction (the wait, every statement, `fn` itself): past them it is rolled
    /// back and rejects with `QUERY_TIMEOUT` / `ABORT_ERR`. The connection is released
    /// either way.
    #[napi(
        ts_args_type = "fn: (tx: PooledConnection) => Promise<T>, options?: CallOptions",
        ts_return_type = "Promise<T>",
        ts_generic_types = "T"
    )]
    pub fn transaction<'e>(&self, env: &'e Env) -> napi::Result<PromiseRaw<'e, ()>> {
        // Replaced at module load by the JavaScript in wrappers.js.
        settled(
            env,
            Err(Error::internal(
                "transaction() was not installed by the module loader",
            )),
        )
    }

    /// Occupancy right now.
    #[napi]
    pub fn status(&self) -> PoolStatus {
        let s = self.pool.status();
        PoolStatus {
            max_size: s.max_size as u32,
            size: s.size as u32,
            idle: s.idle as u32,
            in_use: s.in_use as u32,
            waiting: s.waiting as u32,
            hosts: s
                .hosts
                .into_iter()
                .map(|(host, n)| HostConnections {
                    host,
                    connections: n as u32,
                })
                .collect(),
        }
    }

    /// Counters since the pool was created; latency percentiles over the window since the
    /// last `reset()` of the `Metrics` registry the pool reports into.
    #[napi]
    pub fn metrics(&self) -> PoolMetrics {
        let m = self.pool.metrics();
        PoolMetrics {
            max_size: m.max_size as f64,
            current_size: m.current_size as f64,
            available: m.available as f64,
            in_use: m.in_use as f64,
            waiting: m.waiting as f64,
            total_gets: m.total_gets as f64,
            successful_gets: m.successful_gets as f64,
            timeouts: m.timeouts as f64,
            errors: m.errors as f64,
            success_rate: m.success_rate,
            uptime_seconds: m.uptime_seconds,
            created: m.created as f64,
            recycled: m.recycled as f64,
            destroyed: m.destroyed as f64,
            leaked_leases: m.leaked_leases as f64,
            listener_errors: m.listener_errors as f64,
            inline_statements: m.inline_statements as f64,
            rejected: m.rejected as f64,
            acquire: m.acquire.into(),
            usage: m.usage.into(),
            query: m.query.into(),
        }
    }

    /// Health score and status from saturation, queueing and failures.
    #[napi]
    pub fn health(&self) -> PoolHealth {
        let h = self.pool.health();
        PoolHealth {
            status: h.status.as_str().to_string(),
            health_score: h.health_score,
            available_connections: h.available_connections as f64,
            waiting_requests: h.waiting_requests as f64,
            utilization_percent: h.utilization_percent,
        }
    }

    /// Sizing advice from observed waits, timeouts and utilisation.
    #[napi]
    pub fn recommendations(&self) -> Vec<PoolRecommendation> {
        self.pool
            .recommendations()
            .into_iter()
            .map(|r| PoolRecommendation {
                kind: r.kind.to_string(),
                severity: r.severity.to_string(),
                message: r.message,
                suggested_max_size: r.suggested_max_size.map(|s| s as f64),
            })
            .collect()
    }

    /// Leases of this pool held longer than `leakDetectionMs`, oldest first.
    #[napi]
    pub fn leaks(&self) -> Vec<LeaseLeak> {
        let now = std::time::Instant::now();
        self.pool
            .overdue_leases()
            .into_iter()
            .map(|r| LeaseLeak {
                pool: r.name,
                age_ms: now.saturating_duration_since(r.acquired_at).as_secs_f64() * 1000.0,
                stack: r.stack,
            })
            .collect()
    }

    /// Changes `maxSize` (1..10000). Idle connections beyond it close at once, busy ones on return.
    #[napi]
    pub fn resize(&self, env: Env, max_size: f64) -> napi::Result<()> {
        let size = if max_size.fract() == 0.0 && max_size >= 0.0 {
            max_size as usize
        } else {
            0
        };
        self.check_open()
            .and_then(|()| self.pool.resize(size))
            .map_err(|e| js_error(&env, e))
    }

    /// Refuses new work, lets queued and running work finish within `timeoutMs`
    /// (default 10 000), then closes every connection. On a shared pool it closes this
    /// handle, and the pool itself only when this was its last open handle.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn close<'e>(
        &self,
        env: &'e Env,
        options: Option<CloseOptions>,
    ) -> napi::Result<PromiseRaw<'e, ()>> {
        let timeout_ms = options.and_then(|o| o.timeout_ms).unwrap_or(10_000.0);
        if !timeout_ms.is_finite() || timeout_ms < 0.0 {
            return settled(
                env,
                Err(Error::invalid_argument(
                    "close timeoutMs must be a non-negative number",
                )),
            );
        }
        if let Some(claim) = &self.claim {
            if !claim.release() {
                return settled(env, Ok(()));
            }
        }
        self.pool.refuse_new_work();
        let pool = self.pool.clone();
        spawn(
            env,
            async move {
                pool.close(Duration::from_secs_f64(timeout_ms / 1000.0))
                    .await
            },
            |_, ()| Ok(()),
        )
    }
}

/// The JavaScript parts of the API (AbortSignal wiring, variadic `command`, `transaction`),
/// installed on the classes once per environment.
#[cfg_attr(test, allow(dead_code))] // napi's module registration is left out of unit tests
const WRAPPERS_JS: &str = include_str!("wrappers.js");

#[cfg_attr(test, allow(dead_code))]
#[napi(module_exports)]
pub fn install_wrappers(exports: Object, env: Env) -> napi::Result<()> {
    type Args<'a> = (
        Unknown<'a>,
        Unknown<'a>,
        Unknown<'a>,
        Unknown<'a>,
        Object<'a>,
    );
    let install: Function<'_, FnArgs<Args<'_>>, Unknown<'_>> = env.run_script(WRAPPERS_JS)?;
    let pool: Unknown = exports.get_named_property("ConnectionPool")?;
    let lease: Unknown = exports.get_named_property("PooledConnection")?;
    let cancellation: Unknown = exports.get_named_property("Cancellation")?;
    // SAFETY: a function just made in this environment.
    let shape_key =
        unsafe { Unknown::from_raw_unchecked(env.raw(), values::shape_key_function(env.raw())?) };
    // The installer returns the function that shapes small results (values::Packed).
    // Leases' bare functions, shared by every lease (see `bare_functions`).
    let lease_bare = bare_functions::<PooledConnection>(&env, None)?;
    let shaper = install.call((pool, lease, cancellation, shape_key, lease_bare).into())?;
    values::set_shaper(env.raw(), shaper.raw())?;
    Ok(())
}

/// A connection checked out of a pool. Use `release()` (or `using` / `await using`);
/// statements on one lease run in the order they were issued, and a release runs after
/// every statement issued before it.
#[napi]
pub struct PooledConnection {
    lease: Arc<OrderedLease>,
    int8: Int8Mode,
    profiles: Arc<crate::pool::profile::Profiles>,
}

impl PooledConnection {
    fn new(lease: Lease, int8: Int8Mode) -> Self {
        PooledConnection {
            profiles: lease.profiles(),
            lease: OrderedLease::new(lease),
            int8,
        }
    }
}

#[napi]
impl PooledConnection {
    /// Runs one statement on this connection and returns its rows.
    #[napi(
        ts_args_type = "sql: string, params?: unknown[], options?: CallOptions",
        ts_return_type = "Promise<QueryResult>"
    )]
    pub fn query<'e>(
        &self,
        env: &'e Env,
        sql: String,
        params: Option<Unknown<'e>>,
        options: Option<Unknown<'e>>,
        cancel: Option<&Cancellation>,
    ) -> napi::Result<Either<PromiseRaw<'e, Packed>, Packed>> {
        send_query(self, env, sql, (&params).into(), options, cancel)
    }

    /// Runs one statement for its effect on this connection.
    #[napi(
        ts_args_type = "sql: string, params?: unknown[], options?: CallOptions",
        ts_return_type = "Promise<ExecuteResult>"
    )]
    pub fn execute<'e>(
        &self,
        env: &'e Env,
        sql: String,
        params: Option<Unknown<'e>>,
        options: Option<Unknown<'e>>,
        cancel: Option<&Cancellation>,
    ) -> napi::Result<Either<PromiseRaw<'e, ExecuteResult>, ExecuteResult>> {
        send_execute(self, env, sql, (&params).into(), options, cancel)
    }

    /// Internal (transaction): BEGIN IMMEDIATE or COMMIT on the calling thread when it can
    /// run there at once (SQLite, nothing else issued on this lease, no lock held elsewhere);
    /// `false` when it did not run, so it is sent as usual.
    #[napi(js_name = "_transactionControlNow", skip_typescript)]
    pub fn transaction_control_now(&self, env: Env, sql: String) -> napi::Result<bool> {
        if !matches!(sql.as_str(), "BEGIN IMMEDIATE" | "COMMIT") {
            return Ok(false);
        }
        on_this_thread(|| self.lease.try_transaction_control_now(&sql))
            .map_err(|e| js_error(&env, e))
    }

    /// SQLite: runs one statement on this connection on the calling thread (statements
    /// issued before it must have finished).
    #[napi(
        ts_args_type = "sql: string, params?: unknown[]",
        ts_return_type = "QueryResult"
    )]
    pub fn query_sync(
        &self,
        env: Env,
        sql: String,
        params: Option<Unknown<'_>>,
    ) -> napi::Result<Packed> {
        query_sync(self, &env, &sql, (&params).into())
    }

    /// SQLite: runs one statement for its effect on this connection on the calling thread.
    #[napi(ts_args_type = "sql: string, params?: unknown[]")]
    pub fn execute_sync(
        &self,
        env: Env,
        sql: String,
        params: Option<Unknown<'_>>,
    ) -> napi::Result<ExecuteResult> {
        execute_sync(self, &env, &sql, (&params).into())
    }

    /// Redis: runs one command on this connection, e.g. `command('INCR', 'k')` (or with the
    /// arguments as one array).
    #[napi(
        ts_args_type = "name: string, ...args: Array<string | number | bigint | Buffer | CallOptions> | [Array<string | number | bigint | Buffer>, CallOptions?]",
        ts_return_type = "Promise<unknown>"
    )]
    pub fn command<'e>(
        &self,
        env: &'e Env,
        name: String,
        args: Option<Unknown<'e>>,
        options: Option<Unknown<'e>>,
        cancel: Option<&Cancellation>,
    ) -> napi::Result<PromiseRaw<'e, Reply>> {
        send_command(self, env, name, args, options, cancel)
    }

    /// Redis: several commands in one round trip on this connection.
    #[napi(
        ts_args_type = "commands: Array<[string, ...Array<string | number | bigint | Buffer>]>, options?: CallOptions",
        ts_return_type = "Promise<unknown[]>"
    )]
    pub fn pipeline<'e>(
        &self,
        env: &'e Env,
        commands: Unknown<'e>,
        options: Option<Unknown<'e>>,
        cancel: Option<&Cancellation>,
    ) -> napi::Result<PromiseRaw<'e, Reply>> {
        send_pipeline(self, env, commands, options, cancel)
    }

    /// Internal (transaction): undoes session changes inside the open transaction, before
    /// its COMMIT.
    #[napi(js_name = "_resetSession", skip_typescript)]
    pub fn reset_session<'e>(&self, env: &'e Env) -> napi::Result<PromiseRaw<'e, ()>> {
        let (complete, promise) = promise(env, |_, _: Outcome| Ok(()))?;
        self.lease.reset_session(complete);
        Ok(promise)
    }

    /// Internal (transaction): bounds every statement run on this lease from now on.
    #[napi(js_name = "_bound", skip_typescript)]
    pub fn bound(
        &self,
        env: Env,
        options: Option<Unknown<'_>>,
        cancel: Option<&Cancellation>,
    ) -> napi::Result<()> {
        let bounds = bounds(&env, options, cancel).map_err(|e| js_error(&env, e))?;
        self.lease.bound(bounds);
        Ok(())
    }

    /// PostgreSQL: streams the rows of `sql` in batches through a cursor (DECLARE … FETCH)
    /// on this lease, inside its open transaction (or one of its own). `break`, a throw,
    /// `timeoutMs` or `signal` close the cursor. For SQLite use `pool.cursor`.
    #[napi(
        ts_args_type = "sql: string, params?: unknown[], options?: CursorOptions",
        ts_return_type = "AsyncIterable<Array<Record<string, any>>>"
    )]
    pub fn cursor(&self, env: Env) -> napi::Result<()> {
        // Replaced at module load by the JavaScript in wrappers.js.
        Err(js_error(
            &env,
            Error::internal("cursor() was not installed by the module loader"),
        ))
    }

    /// True once released; further calls fail with `POOL_CLOSED`.
    #[napi(getter)]
    pub fn released(&self) -> bool {
        self.lease.is_released()
    }

    /// Returns the connection to its pool once the statements issued before this call have
    /// run (rolled back first if a transaction is open, session state discarded if a
    /// statement changed it). Safe to call more than once.
    #[napi]
    pub fn release(&self) {
        self.lease.release(false);
    }

    /// `using conn = …` releases here.
    #[napi(well_known_symbol = "dispose")]
    pub fn dispose(&self) {
        self.lease.release(false);
    }

    /// `await using conn = …` releases here.
    #[napi(well_known_symbol = "asyncDispose", ts_return_type = "Promise<void>")]
    pub fn async_dispose<'e>(&self, env: &'e Env) -> napi::Result<PromiseRaw<'e, ()>> {
        self.lease.release(false);
        settled(env, Ok(()))
    }
}

impl Drop for PooledConnection {
    fn drop(&mut self) {
        // Collected by the GC: a lease still held was never released.
        if !self.lease.is_released() {
            self.lease.release(true);
        }
    }
}
