//! What outlives one call: `Listener` (LISTEN/NOTIFY, SUBSCRIBE/PUBLISH), the SQLite row
//! cursor and the two COPY directions. Thin classes over the pool's core; the JavaScript around them (async iterators,
//! guarded callbacks) is in wrappers.js.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use napi::bindgen_prelude::{FnArgs, Function, PromiseRaw};
use napi::threadsafe_function::ThreadsafeFunctionCallMode;
use napi::{Env, JsValue};
use napi_derive::napi;

use napi::bindgen_prelude::Unknown;

use super::pool::{bounds, rows, Cancellation, ConnectionPool, QueryResult};
use super::values;
use super::{js_error, settled, spawn};
use crate::error::Error;
use crate::pool::config::Int8Mode;
use crate::pool::copy::{CopyIn, CopyOut};
use crate::pool::cursor::SqliteCursor;
use crate::pool::listen::{Event, Sink, Topic};
use crate::pool::{Pool, Statement, Value};

/// Options for `cursor()`.
#[napi(object, object_to_js = false)]
#[allow(dead_code)] // declares the TypeScript interface; wrappers.js reads the fields
pub struct CursorOptions {
    /// Rows per batch (default 1000). Memory stays bounded by it, not by the result.
    pub batch_size: Option<f64>,
    /// Bound on the whole iteration; past it the cursor is closed with `QUERY_TIMEOUT`.
    pub timeout_ms: Option<f64>,
    /// Closes the cursor with an `AbortError`.
    #[napi(ts_type = "AbortSignal")]
    pub signal: Option<Unknown<'static>>,
}

/// Internal: the native side of a SQLite `cursor()` (wrappers.js turns it into an async
/// iterator). It holds a connection of its own until it ends or is closed.
#[napi]
pub struct RowCursor {
    cursor: Arc<tokio::sync::Mutex<SqliteCursor>>,
    int8: Int8Mode,
}

#[napi]
impl RowCursor {
    /// The next batch, or `null` at the end (the connection is then released).
    #[napi(ts_return_type = "Promise<QueryResult | null>")]
    pub fn next<'e>(
        &self,
        env: &'e Env,
        options: Option<Unknown<'e>>,
        cancel: Option<&Cancellation>,
    ) -> napi::Result<PromiseRaw<'e, Option<QueryResult>>> {
        let bounds = match bounds(env, options, cancel) {
            Ok(b) => b,
            Err(e) => return settled(env, Err(e)),
        };
        let cursor = Arc::clone(&self.cursor);
        let int8 = self.int8;
        spawn(
            env,
            async move { cursor.lock().await.next(&bounds).await },
            move |_, batch| Ok(batch.map(|b| rows(b, int8))),
        )
    }

    /// Stops the statement and releases the connection. Idempotent.
    #[napi]
    pub fn close(&self) {
        match self.cursor.try_lock() {
            Ok(mut c) => c.close(),
            Err(_) => {
                let cursor = Arc::clone(&self.cursor);
                super::runtime().spawn(async move { cursor.lock().await.close() });
            }
        }
    }
}

/// Options for `listen()`.
#[napi(object)]
pub struct ListenOptions {
    /// Called after the first LISTEN and again after every reconnect: resync what may have
    /// been missed while the connection was down.
    #[napi(ts_type = "() => void")]
    pub on_listen: Option<napi::bindgen_prelude::Unknown<'static>>,
    /// Redis: `channel` is a pattern (PSUBSCRIBE).
    pub pattern: Option<bool>,
}

/// One subscription on the pool's listening connection.
#[napi]
pub struct Listener {
    pool: Pool,
    id: u64,
    channel: String,
    closed: AtomicBool,
    errors: Arc<std::sync::atomic::AtomicU64>,
}

/// The native callback the wrapper passes: (kind, payload, channel); kind 0 is a message,
/// 1 is "listening (again)".
type Delivery<'e> = Function<'e, FnArgs<(u32, String, String)>, ()>;

#[napi]
impl ConnectionPool {
    /// Listens on `channel` (PostgreSQL LISTEN; Redis SUBSCRIBE, or PSUBSCRIBE with
    /// `pattern`) over one dedicated connection per pool, outside `maxSize`. `onNotify`
    /// gets each payload in order. After any loss the connection is reopened with backoff,
    /// every channel listened to again, and `onListen` called so the app can resync. A
    /// callback that throws is counted (`errors`, `listenerErrors`) and the others carry
    /// on. Resolves once listening; a listener keeps the process alive until `unlisten()`.
    #[napi(
        ts_args_type = "channel: string, onNotify: (payload: string, channel: string) => void, options?: ListenOptions",
        ts_return_type = "Promise<Listener>"
    )]
    pub fn listen<'e>(
        &self,
        env: &'e Env,
        channel: String,
        deliver: Delivery<'e>,
        options: Option<ListenOptions>,
    ) -> napi::Result<PromiseRaw<'e, Listener>> {
        if let Err(e) = self.check_open() {
            return settled(env, Err(e));
        }
        let tsfn = deliver
            .build_threadsafe_function::<FnArgs<(u32, String, String)>>()
            .callee_handled::<false>()
            .build()?;
        let sink: Sink = Arc::new(move |event| {
            let args = match event {
                Event::Message { channel, payload } => (0, payload, channel),
                Event::Listening => (1, String::new(), String::new()),
            };
            tsfn.call(args.into(), ThreadsafeFunctionCallMode::NonBlocking);
        });
        let topic = Topic {
            name: channel.clone(),
            pattern: options.and_then(|o| o.pattern).unwrap_or(false),
        };
        let pool = self.pool.clone();
        spawn(
            env,
            async move {
                let id = pool.listen(topic, sink).await?;
                Ok((pool, id))
            },
            move |_, (pool, id)| {
                Ok(Listener {
                    pool,
                    id,
                    channel,
                    closed: AtomicBool::new(false),
                    errors: Arc::default(),
                })
            },
        )
    }

    /// Sends `payload` on `channel`: PostgreSQL `pg_notify` (delivered at commit; on a
    /// lease inside a transaction, at its COMMIT), Redis PUBLISH.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn notify<'e>(
        &self,
        env: &'e Env,
        channel: String,
        payload: String,
    ) -> napi::Result<PromiseRaw<'e, ()>> {
        if let Err(e) = self.check_open() {
            return settled(env, Err(e));
        }
        let statement = match self.pool.config().target.backend() {
            "redis" => Statement::Command(
                "PUBLISH".into(),
                vec![Value::Text(channel), Value::Text(payload)],
            ),
            "postgres" => Statement::Query(
                "select pg_notify($1, $2)".into(),
                vec![Value::Text(channel), Value::Text(payload)],
            ),
            _ => {
                return settled(
                    env,
                    Err(Error::invalid_argument(
                        "listen/notify need PostgreSQL or Redis; SQLite has no notifications",
                    )),
                )
            }
        };
        let pool = self.pool.clone();
        spawn(
            env,
            async move { pool.run(&statement.borrow()).await.map(|_| ()) },
            |_, ()| Ok(()),
        )
    }
}

#[napi]
impl ConnectionPool {
    /// Internal (wrappers.js): opens a SQLite row cursor.
    #[napi(js_name = "_sqliteCursor", skip_typescript)]
    pub fn sqlite_cursor<'e>(
        &self,
        env: &'e Env,
        sql: String,
        params: Option<Unknown<'e>>,
        batch_size: f64,
        options: Option<Unknown<'e>>,
        cancel: Option<&Cancellation>,
    ) -> napi::Result<PromiseRaw<'e, RowCursor>> {
        let opened = self.check_open().and_then(|()| {
            let params = values::params_from_js(env, params.as_ref().map(|p| p.raw()))?;
            let bounds = bounds(env, options, cancel)?;
            Ok((params, bounds))
        });
        let (params, bounds) = match opened {
            Ok(v) => v,
            Err(e) => return settled(env, Err(e)),
        };
        let pool = self.pool.clone();
        let int8 = self.int8;
        let batch = batch_size.clamp(1.0, 1_000_000.0) as usize;
        spawn(
            env,
            async move { SqliteCursor::open(&pool, &sql, &params, batch, &bounds).await },
            move |_, cursor| {
                Ok(RowCursor {
                    cursor: Arc::new(tokio::sync::Mutex::new(cursor)),
                    int8,
                })
            },
        )
    }

    /// Streams the rows of `sql` in batches of `options.batchSize` (default 1000), fetched
    /// only as the loop asks for them: `for await (const batch of pool.cursor(sql, params))`.
    /// PostgreSQL: a cursor (DECLARE … FETCH) in a transaction on a lease held for the
    /// iteration; SQLite: the statement stepped on a connection of its own. `break`, a
    /// throw, `timeoutMs` or `signal` close it and release the connection.
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
}

/// Internal: the native side of `copyFrom()` (wrappers.js wraps it in a Node `Writable`).
#[napi]
pub struct CopyInHandle {
    copy: Arc<tokio::sync::Mutex<CopyIn>>,
}

/// Internal: the native side of `copyTo()` (wrappers.js wraps it in a Node `Readable`).
#[napi]
pub struct CopyOutHandle {
    copy: Arc<tokio::sync::Mutex<CopyOut>>,
}

#[napi]
impl CopyInHandle {
    /// Hands one chunk to the server; resolves when more may be written.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn write<'e>(
        &self,
        env: &'e Env,
        chunk: napi::bindgen_prelude::Buffer,
    ) -> napi::Result<PromiseRaw<'e, ()>> {
        let data = bytes::Bytes::copy_from_slice(&chunk);
        let copy = Arc::clone(&self.copy);
        spawn(
            env,
            async move { copy.lock().await.write(data).await },
            |_, ()| Ok(()),
        )
    }

    /// Ends the data; resolves with the rows the server copied.
    #[napi(ts_return_type = "Promise<number>")]
    pub fn finish<'e>(&self, env: &'e Env) -> napi::Result<PromiseRaw<'e, f64>> {
        let copy = Arc::clone(&self.copy);
        spawn(
            env,
            async move { copy.lock().await.finish().await },
            |_, rows| Ok(rows as f64),
        )
    }

    /// Aborts the COPY on the server and releases the connection. Idempotent.
    #[napi]
    pub fn abort(&self) {
        let copy = Arc::clone(&self.copy);
        super::runtime().spawn(async move { copy.lock().await.abort() });
    }
}

#[napi]
impl CopyOutHandle {
    /// The next chunk, or `null` at the end.
    #[napi(ts_return_type = "Promise<Buffer | null>")]
    pub fn read<'e>(
        &self,
        env: &'e Env,
    ) -> napi::Result<PromiseRaw<'e, Option<napi::bindgen_prelude::Buffer>>> {
        let copy = Arc::clone(&self.copy);
        spawn(
            env,
            async move { copy.lock().await.read().await },
            |_, chunk| Ok(chunk.map(|c| c.to_vec().into())),
        )
    }

    /// Stops the COPY early (cancelled on the server) and releases the connection.
    #[napi]
    pub fn close(&self) {
        let copy = Arc::clone(&self.copy);
        super::runtime().spawn(async move { copy.lock().await.close().await });
    }
}

#[napi]
impl ConnectionPool {
    /// Internal (wrappers.js): starts `COPY … FROM STDIN`.
    #[napi(js_name = "_copyIn", skip_typescript)]
    pub fn copy_in<'e>(
        &self,
        env: &'e Env,
        sql: String,
        options: Option<Unknown<'e>>,
        cancel: Option<&Cancellation>,
    ) -> napi::Result<PromiseRaw<'e, CopyInHandle>> {
        self.spawn_bounded(
            env,
            options,
            cancel,
            move |pool, bounds| async move { CopyIn::open(&pool, &sql, &bounds).await },
            |copy| CopyInHandle {
                copy: Arc::new(tokio::sync::Mutex::new(copy)),
            },
        )
    }

    /// Internal (wrappers.js): starts `COPY … TO STDOUT`.
    #[napi(js_name = "_copyOut", skip_typescript)]
    pub fn copy_out<'e>(
        &self,
        env: &'e Env,
        sql: String,
        options: Option<Unknown<'e>>,
        cancel: Option<&Cancellation>,
    ) -> napi::Result<PromiseRaw<'e, CopyOutHandle>> {
        self.spawn_bounded(
            env,
            options,
            cancel,
            move |pool, bounds| async move { CopyOut::open(&pool, &sql, &bounds).await },
            |copy| CopyOutHandle {
                copy: Arc::new(tokio::sync::Mutex::new(copy)),
            },
        )
    }

    /// PostgreSQL: `COPY … FROM STDIN` as a Node `Writable` (text, CSV or binary bytes, with
    /// backpressure) on a lease held for the transfer. `finish` means the server copied
    /// everything (`writable.rowCount` then holds its count); `destroy()` or an error
    /// aborts the COPY on the server (nothing copied) and returns the connection clean.
    /// `options.timeoutMs` / `signal` bound the wait for a connection.
    #[napi(
        ts_args_type = "sql: string, options?: CallOptions",
        ts_return_type = "Promise<import('node:stream').Writable & { rowCount?: number }>"
    )]
    pub fn copy_from(&self, env: Env) -> napi::Result<()> {
        // Replaced at module load by the JavaScript in wrappers.js.
        Err(js_error(
            &env,
            Error::internal("copyFrom() was not installed by the module loader"),
        ))
    }

    /// PostgreSQL: `COPY … TO STDOUT` as a Node `Readable` of the server's bytes, read only
    /// as fast as it is consumed. `destroy()` cancels the COPY on the server and returns
    /// the connection clean.
    #[napi(
        ts_args_type = "sql: string, options?: CallOptions",
        ts_return_type = "Promise<import('node:stream').Readable>"
    )]
    pub fn copy_to(&self, env: Env) -> napi::Result<()> {
        Err(js_error(
            &env,
            Error::internal("copyTo() was not installed by the module loader"),
        ))
    }
}

#[napi]
impl Listener {
    #[napi(getter)]
    pub fn channel(&self) -> String {
        self.channel.clone()
    }

    /// Exceptions thrown by this listener's callbacks so far.
    #[napi(getter)]
    pub fn errors(&self) -> f64 {
        self.errors.load(Ordering::Relaxed) as f64
    }

    /// Internal (wrappers.js): a callback threw.
    #[napi(js_name = "_reportError", skip_typescript)]
    pub fn report_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.pool.recorder().listener_errors.inc();
    }

    /// Stops listening (UNLISTEN when it was the channel's last listener). Idempotent.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn unlisten<'e>(&self, env: &'e Env) -> napi::Result<PromiseRaw<'e, ()>> {
        self.stop();
        settled(env, Ok(()))
    }

    /// `await using l = await pool.listen(…)` unlistens here.
    #[napi(well_known_symbol = "asyncDispose", ts_return_type = "Promise<void>")]
    pub fn async_dispose<'e>(&self, env: &'e Env) -> napi::Result<PromiseRaw<'e, ()>> {
        self.stop();
        settled(env, Ok(()))
    }
}

impl Listener {
    fn stop(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.pool.unlisten(self.id);
        }
    }
}
