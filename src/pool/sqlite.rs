//! SQLite connections on rusqlite (bundled). Statements run on tokio's blocking pool.

use foldhash::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rusqlite::types::{ToSqlOutput, Value as SqlValue, ValueRef};
use rusqlite::{Connection, OpenFlags};

use crate::error::{Error, ErrorCode, Phase, Result};
use crate::pool::connection::Outcome;
use crate::pool::connection::{is_transaction_control, leading_keyword};
use crate::pool::sqlite_fast::FastReads;
use crate::pool::value::{timestamp_to_iso, ExecuteResult, QueryResult, Value};

/// Largest integer JavaScript holds exactly; larger SQLite integers become `bigint`.
const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

pub struct SqliteConnection {
    conn: Arc<Mutex<Db>>,
    interrupt: rusqlite::InterruptHandle,
    /// `statementTimeoutMs`, enforced by a progress handler against `deadline`.
    statement_timeout: Option<Duration>,
    /// The running statement's deadline in microseconds since [`epoch`]; 0 for none.
    deadline: Arc<AtomicU64>,
    /// What the connection learnt of its statements.
    notes: Arc<Notes>,
    /// How long a statement off the calling thread waits for another connection's lock.
    busy_timeout: Duration,
}

/// A connection and the reads kept prepared on it, under one lock: the statements are used
/// only with the connection, and finalized before it closes (rusqlite panics closing a
/// connection with statements still open). Dropped with its last holder, which may be a
/// statement still running off the thread: nothing waits for it.
pub(crate) struct Db {
    /// Calling-thread reads prepared on SQLite's own API (`None` when the statement cache is
    /// off).
    fast: Option<FastReads>,
    conn: Connection,
}

impl std::ops::Deref for Db {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        if let Some(fast) = &mut self.fast {
            fast.clear();
        }
    }
}

/// What a connection keeps about its statements between runs.
#[derive(Default)]
pub(crate) struct Notes {
    /// Whether the last statement prepared only reads (0 unknown, 1 yes, 2 no).
    read_only: AtomicU8,
    /// Each statement's column names, reused while the statement still reports them.
    columns: parking_lot::Mutex<HashMap<Box<str>, Arc<[String]>>>,
}

/// Statements whose column names a connection keeps; past it the list starts over.
const COLUMNS_KEPT: usize = 256;

impl Notes {
    /// `stmt`'s column names: the ones kept for `sql` when they still match (a schema change
    /// can change what `select *` returns), else read afresh and kept.
    fn columns(&self, sql: &str, stmt: &rusqlite::Statement<'_>) -> Arc<[String]> {
        let mut kept = self.columns.lock();
        if let Some(names) = kept.get(sql) {
            let same = names.len() == stmt.column_count()
                && names
                    .iter()
                    .enumerate()
                    .all(|(i, n)| stmt.column_name(i).is_ok_and(|c| c == n));
            if same {
                return Arc::clone(names);
            }
        }
        let names: Arc<[String]> = stmt.column_names().map(|c| c.to_string()).collect();
        if kept.len() >= COLUMNS_KEPT {
            kept.clear();
        }
        kept.insert(sql.into(), Arc::clone(&names));
        names
    }
}

/// A fixed instant that statement deadlines are counted from.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn micros_since_epoch(at: Instant) -> u64 {
    at.saturating_duration_since(epoch()).as_micros() as u64 + 1
}

/// Where a pool's SQLite connections point.
#[derive(Debug, Clone)]
pub enum SqliteTarget {
    File(String),
    /// A private database for `sqlite::memory:`: a scratch file in RAM (`/dev/shm`) where
    /// there is one, else in the temp directory, removed with its [`MemoryDatabase`]. A file
    /// rather than SQLite's memdb, whose locking lets no reader in while a write
    /// transaction is open; as a file it runs under WAL like any other.
    Memory(PathBuf),
}

impl SqliteTarget {
    pub fn memory() -> SqliteTarget {
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        SqliteTarget::Memory(dir.join(format!("qm-{}.db", uuid::Uuid::new_v4().simple())))
    }

    fn path(&self) -> &Path {
        match self {
            SqliteTarget::File(p) => Path::new(p),
            SqliteTarget::Memory(p) => p,
        }
    }
}

/// Keeps a `sqlite::memory:` database open while its pool lives, and removes its files
/// when the pool closes or is dropped.
pub struct MemoryDatabase {
    anchor: Option<Connection>,
    path: PathBuf,
}

impl MemoryDatabase {
    pub fn create(target: &SqliteTarget, busy_timeout: Duration) -> Result<MemoryDatabase> {
        let anchor = open(target, busy_timeout, false)?;
        Ok(MemoryDatabase {
            anchor: Some(anchor),
            path: target.path().to_path_buf(),
        })
    }
}

impl Drop for MemoryDatabase {
    fn drop(&mut self) {
        drop(self.anchor.take());
        for suffix in ["", "-wal", "-shm"] {
            let mut file = self.path.clone().into_os_string();
            file.push(suffix);
            let _ = std::fs::remove_file(file);
        }
    }
}

/// WAL pages past which a commit asks for a checkpoint (SQLite's own default threshold).
const CHECKPOINT_PAGES: i32 = 1000;

/// Checkpoints a pool's database off every connection that writes. SQLite's automatic
/// checkpoint runs inside the COMMIT that crosses the threshold, on whatever thread ran it:
/// the calling thread, for a write run there, stalled for the copy and its fsync (every few
/// thousand single-row inserts; in the demo it set the p99 of writes at 5 ms). Instead a
/// commit past [`CHECKPOINT_PAGES`] wakes this thread, which runs a PASSIVE checkpoint on its
/// own connection: it waits for no reader or writer, and the WAL is reused as before.
pub struct Checkpointer {
    target: SqliteTarget,
    wake: Arc<Wake>,
}

#[derive(Default)]
struct Wake {
    state: Mutex<WakeState>,
    signal: parking_lot::Condvar,
}

#[derive(Default)]
struct WakeState {
    wanted: bool,
    running: bool,
    stopped: bool,
}

impl Checkpointer {
    pub fn new(target: SqliteTarget) -> Arc<Checkpointer> {
        Arc::new(Checkpointer {
            target,
            wake: Arc::default(),
        })
    }

    /// Asks for a checkpoint; the first request starts the thread.
    fn request(&self) {
        let mut state = self.wake.state.lock();
        if state.stopped {
            return;
        }
        state.wanted = true;
        if !state.running {
            let (target, wake) = (self.target.clone(), Arc::clone(&self.wake));
            let spawned = std::thread::Builder::new()
                .name("qm-sqlite-checkpoint".into())
                .spawn(move || checkpoint_loop(&target, &wake));
            state.running = spawned.is_ok();
        }
        self.wake.signal.notify_one();
    }
}

impl Checkpointer {
    /// Ends the thread (its connection closes with it); later requests do nothing.
    pub fn stop(&self) {
        self.wake.state.lock().stopped = true;
        self.wake.signal.notify_one();
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Least time between two checkpoint rounds: every commit past the threshold asks for one.
const ROUND_GAP: Duration = Duration::from_millis(10);

fn checkpoint_loop(target: &SqliteTarget, wake: &Wake) {
    let mut conn: Option<Connection> = None;
    let mut last: Option<Instant> = None;
    let (mut restart_at, mut backoff) = (Instant::now(), RESTART_BACKOFF);
    loop {
        {
            let mut state = wake.state.lock();
            while !state.wanted && !state.stopped {
                wake.signal.wait(&mut state);
            }
            if let Some(due) = last.map(|at| at + ROUND_GAP) {
                while !state.stopped && Instant::now() < due {
                    wake.signal.wait_until(&mut state, due);
                }
            }
            if state.stopped {
                state.running = false;
                return;
            }
            state.wanted = false;
        }
        if conn.is_none() {
            conn = open(target, RESTART_WAIT, false).ok();
        }
        if let Some(c) = &conn {
            match checkpoint(c, Instant::now() >= restart_at) {
                Ok(Some(true)) => backoff = RESTART_BACKOFF,
                Ok(Some(false)) => {
                    restart_at = Instant::now() + backoff;
                    backoff = (backoff * 2).min(RESTART_BACKOFF_MAX);
                }
                Ok(None) => {}
                Err(_) => conn = None, // opened again on the next request
            }
        }
        last = Some(Instant::now());
    }
}

/// WAL pages past which a checkpoint also restarts the log (about 64 MiB of 4 KiB pages).
const RESTART_PAGES: i64 = 16 * CHECKPOINT_PAGES as i64;

/// Longest a restarting checkpoint waits (for the writer, then for readers to move off the
/// log), writers held back meanwhile: a write on the calling thread meets the lock at once
/// and runs off the thread, so the calling thread never waits for a checkpoint.
const RESTART_WAIT: Duration = Duration::from_millis(100);

/// One round: a PASSIVE checkpoint, which waits for nobody. A writer that never pauses keeps
/// it from ever catching up, so the log would never start over (it grew past 900 MiB in
/// 5 s of 16 writers and 8 readers); past [`RESTART_PAGES`] the round ends with a RESTART
/// checkpoint, which holds writers back while it finishes: the next writer starts the log
/// from its beginning again, and `journal_size_limit` cuts the file back. (SQLite's own
/// checkpoint, in the committing writer, kept the log at 4 MiB for writers alone but let it
/// grow past 160 MiB in those 5 s with readers.)
/// `may_restart`: whether a RESTART may be tried this round. `Ok(Some(done))` when one was:
/// `false` when a reader kept it from finishing (it waited [`RESTART_WAIT`] for nothing).
fn checkpoint(conn: &Connection, may_restart: bool) -> rusqlite::Result<Option<bool>> {
    // Each row: (blocked, frames in the log, frames checkpointed).
    let run = |mode: &str| -> rusqlite::Result<(i64, i64)> {
        conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
    };
    let (_, log) = run("PASSIVE")?;
    if !may_restart || log < RESTART_PAGES {
        return Ok(None);
    }
    let (blocked, _) = run("RESTART")?;
    Ok(Some(blocked == 0))
}

/// After a RESTART a reader kept from finishing, the next waits this long, doubling up to
/// [`RESTART_BACKOFF_MAX`]: a read that holds an old snapshot for seconds (a cursor) must not
/// have writers held back for most of that time.
const RESTART_BACKOFF: Duration = Duration::from_millis(100);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(32);

pub async fn connect(
    target: &SqliteTarget,
    busy_timeout: Duration,
    statement_cache: bool,
    statement_timeout: Duration,
    checkpointer: &Arc<Checkpointer>,
) -> Result<SqliteConnection> {
    let target = target.clone();
    let deadline = Arc::new(AtomicU64::new(0));
    let watched = Arc::clone(&deadline);
    let checkpointer = Arc::downgrade(checkpointer);
    let conn = tokio::task::spawn_blocking(move || {
        let mut conn = open(&target, busy_timeout, statement_cache)?;
        // Replaces SQLite's automatic checkpoint (itself a WAL hook): see `Checkpointer`.
        conn.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, pages| {
            if pages >= CHECKPOINT_PAGES {
                if let Some(checkpointer) = checkpointer.upgrade() {
                    checkpointer.request();
                }
            }
            Ok(())
        }))
        .map_err(query_error)?;
        // Checked every thousand VM steps: cheap (nothing to do while no deadline is set),
        // and stops a statement past statementTimeoutMs or the calling-thread limit in µs.
        conn.progress_handler(
            1000,
            Some(move || {
                let at = watched.load(Ordering::Relaxed);
                at != 0 && micros_since_epoch(Instant::now()) > at
            }),
        )
        .map_err(query_error)?;
        Ok::<_, Error>(conn)
    })
    .await
    .map_err(|e| Error::internal(format!("SQLite open task failed: {e}")))??;
    Ok(SqliteConnection {
        interrupt: conn.get_interrupt_handle(),
        conn: Arc::new(Mutex::new(Db {
            fast: statement_cache.then(FastReads::default),
            conn,
        })),
        statement_timeout: (!statement_timeout.is_zero()).then_some(statement_timeout),
        deadline,
        notes: Arc::default(),
        busy_timeout,
    })
}

pub fn open(
    target: &SqliteTarget,
    busy_timeout: Duration,
    statement_cache: bool,
) -> Result<Connection> {
    let connect_err = |e: rusqlite::Error| {
        Error::new(
            ErrorCode::ConnectFailed,
            format!("could not open SQLite database: {e}"),
        )
        .with_phase(Phase::Connect)
    };
    let conn = Connection::open_with_flags(
        target.path(),
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(connect_err)?;
    conn.busy_timeout(busy_timeout).map_err(connect_err)?;
    conn.set_prepared_statement_cache_capacity(if statement_cache { 256 } else { 0 });
    // WAL lets readers and one writer work at once across the pool's connections.
    let _: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(connect_err)?;
    conn.execute_batch("PRAGMA synchronous=NORMAL")
        .map_err(connect_err)?;
    // A log restarted by a checkpoint is cut back to this (see `Checkpointer`).
    conn.execute_batch("PRAGMA journal_size_limit=67108864")
        .map_err(connect_err)?;
    conn.execute_batch("PRAGMA foreign_keys=ON")
        .map_err(connect_err)?;
    Ok(conn)
}

pub(crate) fn query_error(e: rusqlite::Error) -> Error {
    match &e {
        rusqlite::Error::SqliteFailure(code, msg) => {
            let text = msg.clone().unwrap_or_else(|| code.to_string());
            Error::new(ErrorCode::QueryFailed, text)
                .with_sqlstate(format!("SQLITE_{}", code.extended_code))
        }
        rusqlite::Error::InvalidParameterCount(got, expected) => Error::invalid_argument(format!(
            "statement expects {expected} parameter(s), got {got}"
        )),
        rusqlite::Error::ToSqlConversionFailure(inner) => {
            Error::invalid_argument(inner.to_string())
        }
        _ => Error::new(ErrorCode::QueryFailed, e.to_string()),
    }
}

struct Param<'a>(&'a Value);

impl rusqlite::ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self.0 {
            Value::Null | Value::Failed(_) => ToSqlOutput::Owned(SqlValue::Null),
            Value::Bool(b) => ToSqlOutput::Owned(SqlValue::Integer(*b as i64)),
            Value::Int(i) | Value::BigInt(i) => ToSqlOutput::Owned(SqlValue::Integer(*i)),
            Value::Float(f) => ToSqlOutput::Owned(SqlValue::Real(*f)),
            Value::Numeric(s) | Value::Text(s) => {
                ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes()))
            }
            Value::Bytes(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
            Value::Timestamp(ms) => ToSqlOutput::Owned(SqlValue::Text(timestamp_to_iso(*ms))),
            Value::Json(_) | Value::Array(_) => {
                ToSqlOutput::Owned(SqlValue::Text(self.0.to_json().to_string()))
            }
        })
    }
}

pub(crate) fn cell(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) if i.abs() <= MAX_SAFE_INTEGER => Value::Int(i),
        ValueRef::Integer(i) => Value::BigInt(i),
        ValueRef::Real(f) => Value::Float(f),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Bytes(b.to_vec()),
    }
}

fn row_cells(row: &rusqlite::Row<'_>, width: usize) -> Result<Vec<Value>> {
    let mut cells = Vec::with_capacity(width);
    for i in 0..width {
        cells.push(cell(row.get_ref(i).map_err(query_error)?));
    }
    Ok(cells)
}

/// Steps `sql` and hands over `batch` rows at a time. The channel holds one batch, so the
/// next is read from SQLite only after the previous one was taken; a dropped receiver
/// ends the statement.
fn stream_rows(
    conn: &Connection,
    sql: &str,
    params: &[Value],
    batch: usize,
    out: &tokio::sync::mpsc::Sender<Result<QueryResult>>,
) -> Result<()> {
    let mut stmt = conn.prepare(sql).map_err(query_error)?;
    let columns: Arc<[String]> = stmt.column_names().map(|c| c.to_string()).collect();
    let width = columns.len();
    let bound: Vec<Param<'_>> = params.iter().map(Param).collect();
    let mut rows = stmt
        .query(rusqlite::params_from_iter(bound.iter()))
        .map_err(query_error)?;
    let mut pending = Vec::with_capacity(batch);
    loop {
        let next = rows.next().map_err(query_error)?;
        let end = next.is_none();
        if let Some(row) = next {
            pending.push(row_cells(row, width)?);
        }
        if pending.len() == batch || (end && !pending.is_empty()) {
            let rows = std::mem::replace(&mut pending, Vec::with_capacity(batch));
            let result = QueryResult {
                columns: Arc::clone(&columns),
                row_count: rows.len() as u64,
                rows,
            };
            if out.blocking_send(Ok(result)).is_err() {
                return Ok(()); // the reader stopped
            }
        }
        if end {
            return Ok(());
        }
    }
}

/// Remembers whether the last prepared statement only reads: 1 yes, 2 no.
fn note_read_only(stmt: &rusqlite::Statement<'_>, notes: &Notes) {
    notes
        .read_only
        .store(if stmt.readonly() { 1 } else { 2 }, Ordering::Relaxed);
}

fn run_query(conn: &Connection, sql: &str, params: &[Value], notes: &Notes) -> Result<QueryResult> {
    let mut stmt = conn.prepare_cached(sql).map_err(query_error)?;
    query_on(conn, &mut stmt, sql, params, notes, &mut None)
}

/// [`run_query`] on a statement already prepared. `known` carries the column names from one
/// run to the next of the same statement within one read transaction, where the schema
/// cannot change: read once, then reused as they are.
fn query_on(
    conn: &Connection,
    stmt: &mut rusqlite::Statement<'_>,
    sql: &str,
    params: &[Value],
    notes: &Notes,
    known: &mut Option<Arc<[String]>>,
) -> Result<QueryResult> {
    note_read_only(stmt, notes);
    let bound: Vec<Param<'_>> = params.iter().map(Param).collect();
    let mut rows = stmt
        .query(rusqlite::params_from_iter(bound.iter()))
        .map_err(query_error)?;
    // The columns are read after the first step: a cached statement whose schema changed
    // (`select *` after ALTER TABLE) is prepared again by that step.
    let mut out = Vec::with_capacity(1);
    let first = match rows.next().map_err(query_error)? {
        Some(row) => {
            let columns = match known {
                Some(columns) => Arc::clone(columns),
                None => notes.columns(sql, row.as_ref()),
            };
            out.push(row_cells(row, columns.len())?);
            Some(columns)
        }
        None => None,
    };
    let columns = match first {
        Some(columns) => {
            let width = columns.len();
            while let Some(row) = rows.next().map_err(query_error)? {
                out.push(row_cells(row, width)?);
            }
            columns
        }
        None => {
            drop(rows);
            match known {
                Some(columns) => Arc::clone(columns),
                None => notes.columns(sql, stmt),
            }
        }
    };
    *known = Some(Arc::clone(&columns));
    let width = columns.len();
    let row_count = if width == 0 {
        conn.changes()
    } else {
        out.len() as u64
    };
    Ok(QueryResult {
        columns,
        rows: out,
        row_count,
    })
}

fn run_execute(
    conn: &Connection,
    sql: &str,
    params: &[Value],
    notes: &Notes,
) -> Result<ExecuteResult> {
    let (rowid_before, total_before) = (conn.last_insert_rowid(), conn.total_changes());
    match execute_once(conn, sql, params, notes, rowid_before) {
        // SQLite asks the progress handler once more as a statement returns, after an
        // autocommit statement's COMMIT: interrupted then, it took effect all the same (in a
        // stress run it was counted as cut off and run again: a row twice). What it changed
        // says which: a statement cut off earlier was rolled back and changed nothing.
        Err(e) if interrupted(&e) && conn.is_autocommit() => {
            let changed = conn.total_changes().saturating_sub(total_before);
            if changed == 0 {
                return Err(e);
            }
            let rowid = conn.last_insert_rowid();
            Ok(ExecuteResult {
                row_count: changed,
                last_insert_id: (rowid != rowid_before || is_insert(sql)).then_some(rowid),
            })
        }
        other => other,
    }
}

fn execute_once(
    conn: &Connection,
    sql: &str,
    params: &[Value],
    notes: &Notes,
    rowid_before: i64,
) -> Result<ExecuteResult> {
    let mut stmt = conn.prepare_cached(sql).map_err(query_error)?;
    note_read_only(&stmt, notes);
    let bound: Vec<Param<'_>> = params.iter().map(Param).collect();
    let changed = if stmt.column_count() == 0 {
        stmt.execute(rusqlite::params_from_iter(bound.iter()))
            .map_err(query_error)? as u64
    } else {
        // `execute` refuses statements that return rows; step through them instead.
        let mut rows = stmt
            .query(rusqlite::params_from_iter(bound.iter()))
            .map_err(query_error)?;
        while rows.next().map_err(query_error)?.is_some() {}
        conn.changes()
    };
    // SQLite keeps the last rowid of any earlier insert: report one only if this
    // statement inserted (the rowid moved, or an insert/replace changed rows).
    let rowid = conn.last_insert_rowid();
    let inserted = rowid != rowid_before || (changed > 0 && is_insert(sql));
    Ok(ExecuteResult {
        row_count: changed,
        last_insert_id: inserted.then_some(rowid),
    })
}

/// A group that failed part way for a bug: its statements may or may not have run.
pub(crate) const MAY_HAVE_RUN: &str =
    "the statement failed unexpectedly (a bug); it may or may not have run";

fn interrupted(e: &Error) -> bool {
    e.sqlstate.as_deref() == Some("SQLITE_9")
}

/// SQLITE_BUSY or SQLITE_LOCKED (any extended code): another connection holds a lock the
/// statement needs, and it did nothing.
fn busy(e: &Error) -> bool {
    let code = e
        .sqlstate
        .as_deref()
        .and_then(|s| s.strip_prefix("SQLITE_"));
    code.and_then(|c| c.parse::<u32>().ok())
        .is_some_and(|c| matches!(c & 0xff, 5 | 6))
}

/// Whether `sql` may write (`sqlite3_stmt_readonly` is false); a text that does not prepare
/// counts as writing, and fails when run.
fn writes(conn: &Connection, sql: &str) -> bool {
    conn.prepare_cached(sql)
        .map_or(true, |stmt| !stmt.readonly())
}

/// While it lives, statements on the calling thread never sleep in SQLite's busy handler:
/// a lock held elsewhere fails them at once (with no effect), and they run off the thread.
struct NeverWait<'c> {
    conn: &'c Connection,
    restore: Duration,
}

impl<'c> NeverWait<'c> {
    fn new(conn: &'c Connection, restore: Duration) -> NeverWait<'c> {
        let _ = conn.busy_timeout(Duration::ZERO);
        NeverWait { conn, restore }
    }
}

impl Drop for NeverWait<'_> {
    fn drop(&mut self) {
        let _ = self.conn.busy_timeout(self.restore);
    }
}

/// A statement's text, its prepared statement and the column names its runs found.
type Prepared<'t, 'c> = (
    &'t str,
    rusqlite::CachedStatement<'c>,
    Option<Arc<[String]>>,
);

/// [`SqliteConnection::run_reads_now`]'s transaction; `None` when interrupted or locked out.
fn read_group(
    conn: &Connection,
    items: &[(&str, &[Value])],
    notes: &Notes,
) -> Option<Vec<Result<QueryResult>>> {
    let give_up = |e: &Error| interrupted(e) || busy(e);
    if conn.execute_batch("BEGIN").is_err() {
        return None;
    }
    let mut outcomes = Vec::with_capacity(items.len());
    // Reads issued together are often one statement many times: prepared (and its columns
    // read) once for each run of the same text.
    let mut current: Option<Prepared<'_, '_>> = None;
    for &(sql, params) in items {
        if current.as_ref().is_none_or(|(text, ..)| *text != sql) {
            current = None; // back to the cache first
            match conn.prepare_cached(sql) {
                Ok(stmt) => current = Some((sql, stmt, None)),
                Err(e) => {
                    let e = query_error(e);
                    if give_up(&e) {
                        return None;
                    }
                    outcomes.push(Err(e));
                    continue;
                }
            }
        }
        let Some((_, stmt, known)) = current.as_mut() else {
            continue;
        };
        match query_on(conn, stmt, sql, params, notes, known) {
            Err(e) if give_up(&e) => return None,
            other => outcomes.push(other),
        }
    }
    drop(current);
    // Nothing was written: the end of the transaction only lets the snapshot go.
    let _ = conn.execute_batch("COMMIT");
    Some(outcomes)
}

/// A group on its locked connection, within `limit`: never inside an open transaction.
fn group_locked(
    conn: &Connection,
    items: &[(&str, &[Value])],
    limit: Option<Duration>,
    give_up_when_busy: bool,
    deadline: &AtomicU64,
    notes: &Notes,
) -> Option<Vec<Result<ExecuteResult>>> {
    in_transaction_within(conn, limit, deadline, || {
        run_group(conn, items, give_up_when_busy, notes)
    })
}

/// Runs `group` (which opens its own transaction) from autocommit only, within `limit`, and
/// rolls back whatever transaction it leaves open (cut off, or failed before its COMMIT).
fn in_transaction_within<T>(
    conn: &Connection,
    limit: Option<Duration>,
    deadline: &AtomicU64,
    group: impl FnOnce() -> Option<T>,
) -> Option<T> {
    if !conn.is_autocommit() {
        return None;
    }
    /// Ends what `group` leaves behind, even if it panics: the deadline, and an open
    /// transaction (which would otherwise swallow the next statements on the connection).
    struct Cleanup<'c>(&'c Connection, &'c AtomicU64);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            self.1.store(0, Ordering::Relaxed);
            if !self.0.is_autocommit() {
                let _ = self.0.execute_batch("ROLLBACK");
            }
        }
    }
    if let Some(limit) = limit {
        deadline.store(
            micros_since_epoch(Instant::now() + limit),
            Ordering::Relaxed,
        );
    }
    let _cleanup = Cleanup(conn, deadline);
    group()
}

/// [`SqliteConnection::run_group_now`]'s transaction; `None` when interrupted (or, when
/// `give_up_when_busy`, locked out by another connection).
fn run_group(
    conn: &Connection,
    items: &[(&str, &[Value])],
    give_up_when_busy: bool,
    notes: &Notes,
) -> Option<Vec<Result<ExecuteResult>>> {
    let give_up = |e: &Error| interrupted(e) || (give_up_when_busy && busy(e));
    let mut outcomes: Vec<Option<Result<ExecuteResult>>> = vec![None; items.len()];
    'transaction: loop {
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE").map_err(query_error) {
            if give_up(&e) {
                return None;
            }
            return Some(items.iter().map(|_| Err(e.clone())).collect());
        }
        for (i, (sql, params)) in items.iter().enumerate() {
            if matches!(outcomes[i], Some(Err(_))) {
                continue; // failed in an earlier attempt: reported, never run again
            }
            match run_execute(conn, sql, params, notes) {
                Ok(done) => outcomes[i] = Some(Ok(done)),
                Err(e) if give_up(&e) => return None,
                Err(e) => {
                    outcomes[i] = Some(Err(e));
                    if conn.is_autocommit() {
                        // The failure rolled the whole transaction back (e.g. ON CONFLICT
                        // ROLLBACK): the statements before it are undone; run them again.
                        continue 'transaction;
                    }
                }
            }
        }
        if conn.execute_batch("COMMIT").is_err() {
            // Nothing took effect (e.g. a deferred constraint, which one of them broke):
            // rolled back by the caller, each runs again on its own and meets its own outcome.
            return None;
        }
        return Some(
            outcomes
                .into_iter()
                .map(|o| o.unwrap_or_else(|| Err(Error::internal("statement was not run"))))
                .collect(),
        );
    }
}

fn is_insert(sql: &str) -> bool {
    matches!(leading_keyword(sql).0.as_str(), "insert" | "replace")
}

impl SqliteConnection {
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let conn = Arc::clone(&self.conn);
        let limit = self
            .statement_timeout
            .map(|t| (Arc::clone(&self.deadline), t));
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock();
            let Some((deadline, timeout)) = limit else {
                return work(&conn);
            };
            deadline.store(
                micros_since_epoch(Instant::now() + timeout),
                Ordering::Relaxed,
            );
            let outcome = work(&conn);
            deadline.store(0, Ordering::Relaxed);
            outcome.map_err(|e| match e.sqlstate.as_deref() {
                Some("SQLITE_9") => {
                    let ms = timeout.as_secs_f64() * 1000.0;
                    let mut err = Error::new(
                        ErrorCode::QueryTimeout,
                        format!("timed out after statementTimeoutMs ({ms} ms); interrupted"),
                    );
                    err.timeout_ms = Some(ms);
                    err
                }
                _ => e,
            })
        })
        .await
        .map_err(|e| Error::internal(format!("SQLite task failed: {e}")))?
    }

    /// Streams the rows of `sql` in batches of `batch` (see [`stream_rows`]); the connection
    /// is held by the stream until it ends or the receiver is dropped.
    pub fn stream(
        &self,
        sql: &str,
        params: &[Value],
        batch: usize,
    ) -> tokio::sync::mpsc::Receiver<Result<QueryResult>> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let conn = Arc::clone(&self.conn);
        let (sql, params) = (sql.to_string(), params.to_vec());
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock();
            if let Err(e) = stream_rows(&conn, &sql, &params, batch, &tx) {
                let _ = tx.blocking_send(Err(e));
            }
        });
        rx
    }

    /// Runs one statement on the calling thread, within `limit` when given (else within
    /// statementTimeoutMs). `None`: the limit cut it off — SQLite rolled the statement back,
    /// so it had no effect and may run again elsewhere.
    ///
    /// A statement that writes is cut off at `limit` only when it runs on its own (autocommit)
    /// for its effect: inside an open transaction SQLite would roll the whole transaction
    /// back, and a write returning rows (`RETURNING`) would lose them if cut off as it ends.
    /// BEGIN, COMMIT and the like are never cut off: SQLite asks the progress handler once
    /// more as a statement returns, so a COMMIT "interrupted" there has committed.
    /// Such a write runs to the end (within statementTimeoutMs when set, the user's own
    /// bound); the caller sees from its running time whether it overran `limit` and keeps it
    /// off the thread from then on.
    pub fn run_now(
        &self,
        sql: &str,
        params: &[Value],
        query: bool,
        limit: Option<Duration>,
    ) -> Option<Result<Outcome>> {
        let mut db = self.conn.lock();
        let Db { fast, conn } = &mut *db;
        let conn: &Connection = conn;
        let _never_wait = limit.map(|_| NeverWait::new(conn, self.busy_timeout));
        // The deadline for a statement cut off at `cut_off` (else statementTimeoutMs).
        let arm = |cut_off: Option<Duration>| {
            let bound = cut_off.or(self.statement_timeout);
            if let Some(b) = bound {
                self.deadline
                    .store(micros_since_epoch(Instant::now() + b), Ordering::Relaxed);
            }
            bound
        };
        let control = || is_transaction_control(sql);
        let (cut_off, bound, outcome) = if query {
            let fast = fast.as_mut().and_then(|fast| {
                // Only reads, and returns columns (so it is no BEGIN or COMMIT): cut off at
                // `limit`.
                let mut armed = None;
                fast.query(conn, sql, params, || armed = Some(arm(limit)))
                    .map(|rows| (limit, armed.flatten(), rows))
            });
            if let Some((cut_off, bound, rows)) = fast {
                self.notes.read_only.store(1, Ordering::Relaxed);
                (cut_off, bound, rows.map(Outcome::Rows))
            } else {
                // Prepared once, here: whether it only reads decides the cut-off.
                match conn.prepare_cached(sql) {
                    Err(e) => (None, None, Err(query_error(e))),
                    Ok(mut stmt) => {
                        let cut_off = limit.filter(|_| stmt.readonly() && !control());
                        let bound = arm(cut_off);
                        let rows = query_on(conn, &mut stmt, sql, params, &self.notes, &mut None);
                        (cut_off, bound, rows.map(Outcome::Rows))
                    }
                }
            }
        } else {
            // An autocommit write is cut off (see `run_execute` for one cut off as it ends);
            // inside a transaction only one that does not write.
            let cut_off =
                limit.filter(|_| !control() && (conn.is_autocommit() || !writes(conn, sql)));
            let bound = arm(cut_off);
            let done = run_execute(conn, sql, params, &self.notes);
            (cut_off, bound, done.map(Outcome::Done))
        };
        if bound.is_some() {
            self.deadline.store(0, Ordering::Relaxed);
        }
        match outcome {
            // Locked out by another connection (inside a transaction too): no effect; run it
            // off the thread, where it waits for the lock.
            Err(e) if limit.is_some() && busy(&e) => None,
            // Cut off at `limit`: SQLite rolled the statement back; run it off the thread. (A
            // write in a transaction is never cut off here: an interrupt there is
            // statementTimeoutMs, and it rolled the whole transaction back.)
            Err(e) if cut_off.is_some() && interrupted(&e) => None,
            Err(e) if e.sqlstate.as_deref() == Some("SQLITE_9") => {
                let ms = bound.map_or(0.0, |b| b.as_secs_f64() * 1000.0);
                let mut err = Error::new(
                    ErrorCode::QueryTimeout,
                    format!("timed out after statementTimeoutMs ({ms} ms); interrupted"),
                );
                err.timeout_ms = Some(ms);
                Some(Err(err))
            }
            other => Some(other),
        }
    }

    /// Runs independent writes as one transaction on the calling thread, within `limit`
    /// (group commit: one WAL commit for the lot). Each statement's outcome is its own: one
    /// that fails is undone alone and the others carry on; one whose failure undid the whole
    /// transaction is reported and the rest run again in a fresh one, so every statement
    /// reported done is in the committed transaction, and none is in it twice. `None`:
    /// nothing took effect (the limit cut it off, or the COMMIT failed): everything was
    /// rolled back, so each statement may run again on its own.
    pub fn run_group_now(
        &self,
        items: &[(&str, &[Value])],
        limit: Duration,
    ) -> Option<Vec<Result<ExecuteResult>>> {
        let conn = self.conn.lock();
        let _never_wait = NeverWait::new(&conn, self.busy_timeout);
        group_locked(&conn, items, Some(limit), true, &self.deadline, &self.notes)
    }

    /// Runs reads issued together on the calling thread in one read transaction, within
    /// `limit`: one snapshot and one lock round for the lot instead of one each (they were
    /// concurrent, so one instant serves them all). Each read's outcome is its own. `None`:
    /// cut off at `limit`, or locked out (nothing was returned; run them elsewhere).
    pub fn run_reads_now(
        &self,
        items: &[(&str, &[Value])],
        limit: Duration,
    ) -> Option<Vec<Result<QueryResult>>> {
        let conn = self.conn.lock();
        let _never_wait = NeverWait::new(&conn, self.busy_timeout);
        in_transaction_within(&conn, Some(limit), &self.deadline, || {
            read_group(&conn, items, &self.notes)
        })
    }

    /// [`run_group_now`](Self::run_group_now) on a blocking thread, within
    /// statementTimeoutMs when set. `None`: cut off by it (nothing took effect).
    pub async fn run_group(
        &self,
        items: Vec<(String, Vec<Value>)>,
    ) -> Option<Vec<Result<ExecuteResult>>> {
        let (conn, deadline, notes) = (
            Arc::clone(&self.conn),
            Arc::clone(&self.deadline),
            Arc::clone(&self.notes),
        );
        let limit = self.statement_timeout;
        let n = items.len();
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock();
            let items: Vec<(&str, &[Value])> = items
                .iter()
                .map(|(sql, params)| (sql.as_str(), params.as_slice()))
                .collect();
            group_locked(&conn, &items, limit, false, &deadline, &notes)
        })
        .await
        .unwrap_or_else(|_| {
            // It panicked part way: what ran is unknown, so nothing may run again.
            Some((0..n).map(|_| Err(Error::internal(MAY_HAVE_RUN))).collect())
        })
    }

    /// Whether the last statement run only reads (for routing it to the readers next time).
    pub fn last_read_only(&self) -> Option<bool> {
        match self.notes.read_only.load(Ordering::Relaxed) {
            1 => Some(true),
            2 => Some(false),
            _ => None,
        }
    }

    /// Interrupts the statement running now, if any (it fails with SQLITE_INTERRUPT).
    pub fn interrupt(&self) {
        self.interrupt.interrupt();
    }

    pub async fn query(&self, sql: &str, params: &[Value]) -> Result<QueryResult> {
        let (sql, params) = (sql.to_string(), params.to_vec());
        let notes = Arc::clone(&self.notes);
        self.blocking(move |c| run_query(c, &sql, &params, &notes))
            .await
    }

    pub async fn execute(&self, sql: &str, params: &[Value]) -> Result<ExecuteResult> {
        let (sql, params) = (sql.to_string(), params.to_vec());
        let notes = Arc::clone(&self.notes);
        self.blocking(move |c| run_execute(c, &sql, &params, &notes))
            .await
    }

    /// Whether a transaction is open on this connection; `None` while a statement holds it.
    pub fn in_transaction(&self) -> Option<bool> {
        self.conn.try_lock().map(|c| !c.is_autocommit())
    }

    pub async fn ping(&self) -> Result<()> {
        self.blocking(|c| c.execute_batch("SELECT 1").map_err(query_error))
            .await
    }

    pub async fn rollback(&self) -> Result<()> {
        self.blocking(|c| {
            if !c.is_autocommit() {
                c.execute_batch("ROLLBACK").map_err(query_error)?;
            }
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection as a pool opens one (1 s busy timeout, statement cache, no timeout).
    async fn connect_to(target: &SqliteTarget) -> SqliteConnection {
        let checkpointer = Checkpointer::new(target.clone());
        connect(
            target,
            Duration::from_secs(1),
            true,
            Duration::ZERO,
            &checkpointer,
        )
        .await
        .unwrap()
    }

    /// One connection to a new in-memory database (kept while the database is).
    async fn memory_connection() -> (MemoryDatabase, SqliteConnection) {
        let target = SqliteTarget::memory();
        let db = MemoryDatabase::create(&target, Duration::from_secs(1)).unwrap();
        (db, connect_to(&target).await)
    }

    #[tokio::test]
    async fn memory_database_is_shared_by_the_pools_connections() {
        let target = SqliteTarget::memory();
        let _db = MemoryDatabase::create(&target, Duration::from_secs(1)).unwrap();
        let a = connect_to(&target).await;
        let b = connect_to(&target).await;
        a.execute("create table t(x integer)", &[]).await.unwrap();
        a.execute("insert into t values (?1)", &[Value::Int(7)])
            .await
            .unwrap();
        let r = b.query("select x from t", &[]).await.unwrap();
        assert_eq!(r.rows, vec![&[Value::Int(7)]]);
        let elsewhere = SqliteTarget::memory();
        let _other_db = MemoryDatabase::create(&elsewhere, Duration::from_secs(1)).unwrap();
        let other = connect_to(&elsewhere).await;
        assert!(other.query("select x from t", &[]).await.is_err());
    }

    /// Reads run on SQLite's own API so far on `c`.
    fn fast_runs(c: &SqliteConnection) -> u64 {
        c.conn.lock().fast.as_ref().map_or(0, |f| f.runs)
    }

    #[tokio::test]
    async fn repeated_reads_run_kept_and_what_does_not_fit_goes_through_rusqlite() {
        let (_db, c) = memory_connection().await;
        c.execute("create table t(x integer)", &[]).await.unwrap();
        let limit = Some(Duration::from_secs(5));
        let read = |sql: &str, params: &[Value]| match c.run_now(sql, params, true, limit) {
            Some(Ok(out)) => Ok(out.into_rows().rows),
            Some(Err(e)) => Err(e),
            None => panic!("{sql}: cut off"),
        };
        for i in 1..=3 {
            assert_eq!(
                read("select count(*) from t", &[]).unwrap(),
                vec![vec![Value::Int(0)]]
            );
            assert_eq!(fast_runs(&c), i);
        }
        // Empty text and blob are bound as such: '' and a zero-length blob, not NULL.
        let echo = "select ?1, typeof(?1)";
        let text = |s: &str| Value::Text(s.into());
        assert_eq!(
            read(echo, &[text("")]).unwrap(),
            vec![vec![text(""), text("text")]]
        );
        let blob = read(echo, &[Value::Bytes(vec![])]).unwrap();
        assert_eq!(blob, vec![vec![Value::Bytes(vec![]), text("blob")]]);
        assert_eq!(fast_runs(&c), 5);
        // A write returning rows is not kept: rusqlite's path runs it (and it writes).
        let returned = read("insert into t values (?1) returning x", &[Value::Int(4)]).unwrap();
        assert_eq!(returned, vec![vec![Value::Int(4)]]);
        assert_eq!(fast_runs(&c), 5);
        // A text that failed to prepare is tried again once it can be: kept from then on.
        let later = "select count(*) from later";
        assert!(read(later, &[]).is_err());
        c.execute("create table later(y integer)", &[])
            .await
            .unwrap();
        assert_eq!(read(later, &[]).unwrap(), vec![vec![Value::Int(0)]]);
        assert_eq!(fast_runs(&c), 6);
        // A kept read past its limit is cut off (None: nothing returned, free to run again
        // elsewhere), and the statement serves the next call from its first row.
        let slow = "with recursive n(i) as (select 1 union all select i + 1 from n where i < ?1) \
                    select count(*) from n";
        let cut = c.run_now(slow, &[Value::Int(50_000_000)], true, Some(Duration::ZERO));
        assert!(cut.is_none(), "{cut:?}");
        assert_eq!(fast_runs(&c), 7);
        assert_eq!(
            read(slow, &[Value::Int(3)]).unwrap(),
            vec![vec![Value::Int(3)]]
        );
        assert_eq!(fast_runs(&c), 8);
    }

    #[tokio::test]
    async fn a_connection_held_by_a_running_statement_is_dropped_without_waiting_for_it() {
        let (_db, c) = memory_connection().await;
        c.run_now("select 1", &[], true, None).unwrap().unwrap();
        assert_eq!(fast_runs(&c), 1);
        // As a statement off the thread holds it: the connection's lock is taken here.
        let held = Arc::clone(&c.conn);
        let guard = held.lock();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(c); // a lease's release on the JavaScript thread
            let _ = tx.send(());
        });
        let dropped = rx.recv_timeout(Duration::from_secs(10));
        drop(guard);
        assert!(
            dropped.is_ok(),
            "dropping the connection waited for its lock"
        );
        drop(held); // the last holder finalizes the kept reads, then closes
    }

    #[tokio::test]
    async fn an_interrupt_as_a_statement_returns_after_its_commit_is_reported_as_done() {
        let (_db, c) = memory_connection().await;
        c.execute("create table t(x integer)", &[]).await.unwrap();
        let conn = c.conn.lock();
        let rows = |conn: &Connection| -> i64 {
            conn.query_row("select count(*) from t", [], |r| r.get(0))
                .unwrap()
        };
        // A deadline long past: every progress check (each thousand VM steps, counted over
        // the cached statement's runs) interrupts — sometimes mid-statement, sometimes as it
        // returns, after its COMMIT. Whatever run_execute says must be what the table holds.
        let (mut done, mut cut_off) = (0, 0);
        for i in 0..3000 {
            let before = rows(&conn);
            c.deadline.store(1, Ordering::Relaxed);
            let outcome = run_execute(
                &conn,
                "insert into t values (?1)",
                &[Value::Int(i)],
                &c.notes,
            );
            c.deadline.store(0, Ordering::Relaxed);
            match outcome {
                Ok(r) => {
                    assert_eq!((r.row_count, rows(&conn)), (1, before + 1), "run {i}");
                    done += 1;
                }
                Err(e) => {
                    assert!(interrupted(&e), "run {i}: {e:?}");
                    assert_eq!(
                        rows(&conn),
                        before,
                        "run {i}: reported cut off, yet inserted"
                    );
                    cut_off += 1;
                }
            }
        }
        assert!(done > 0 && cut_off > 0, "{done} done, {cut_off} cut off");
    }

    #[tokio::test]
    async fn begin_and_commit_on_the_calling_thread_are_never_cut_off_after_taking_effect() {
        let (_db, c) = memory_connection().await;
        c.execute("create table t(x integer)", &[]).await.unwrap();
        // A limit of zero cuts off any statement at its first progress check; BEGIN and
        // COMMIT (cached, their VM steps counted over thousands of runs) must not be, or a
        // COMMIT that took effect would be reported as not run and sent again.
        let now = |sql: &str, params: &[Value]| c.run_now(sql, params, false, Some(Duration::ZERO));
        for i in 0..3000 {
            let begun = now("BEGIN IMMEDIATE", &[]).expect("BEGIN run");
            assert!(begun.is_ok(), "run {i}: {begun:?}");
            let inserted = now("insert into t values (?1)", &[Value::Int(i)]).expect("insert run");
            assert!(inserted.is_ok(), "run {i}: {inserted:?}");
            let committed = now("COMMIT", &[]).expect("COMMIT run");
            assert!(committed.is_ok(), "run {i}: {committed:?}");
        }
        let conn = c.conn.lock();
        let rows: i64 = conn
            .query_row("select count(*) from t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 3000);
    }

    #[tokio::test]
    async fn transaction_state_and_errors_are_reported() {
        let (_db, c) = memory_connection().await;
        c.execute("begin", &[]).await.unwrap();
        assert_eq!(c.in_transaction(), Some(true));
        c.rollback().await.unwrap();
        assert_eq!(c.in_transaction(), Some(false));
        let e = c.query("selec 1", &[]).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::QueryFailed);
        let e = c.query("select ?1", &[]).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
        let big = c.query("select 9007199254740993", &[]).await.unwrap();
        assert_eq!(big.rows[0][0], Value::BigInt(9_007_199_254_740_993));
    }
}
