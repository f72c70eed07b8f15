//! Calling-thread SQLite reads on SQLite's own API: a connection's repeated one-statement
//! queries stay prepared here, each bound, stepped and reset in place. rusqlite's statement
//! cache takes a statement out of its list and puts it back on every run, and checks its
//! parameters and columns each time; for a point read that was a fifth of the call.
//!
//! Only what cannot change what a caller sees comes here: one statement that only reads,
//! returns columns and takes exactly the parameters given. Anything else (and any text met
//! for the first time past [`KEPT`] statements) goes through rusqlite as before.

use std::ffi::{c_int, CStr};
use std::ptr::{self, NonNull};
use std::sync::Arc;

use foldhash::HashMap;
use rusqlite::ffi;
use rusqlite::types::ValueRef;
use rusqlite::Connection;

use crate::error::Result;
use crate::pool::value::{QueryResult, Value};

/// Statements a connection keeps prepared here; past it the list starts over.
const KEPT: usize = 64;

/// One statement text's entry: prepared, or known not to fit.
enum Kept {
    Ready(Prepared),
    /// Several statements, a write, no columns: rusqlite runs it.
    Unfit,
}

struct Prepared {
    stmt: NonNull<ffi::sqlite3_stmt>,
    params: usize,
    /// The column names, and the schema-change re-preparations they were read at: a
    /// `select *` re-prepared after `ALTER TABLE` can return other columns.
    columns: Arc<[String]>,
    reprepared: c_int,
}

/// A connection's statements prepared for [`FastReads::query`]. Kept beside the connection
/// under its lock (see `sqlite::Db`), and finalized before the connection closes.
#[derive(Default)]
pub(crate) struct FastReads {
    kept: HashMap<Box<str>, Kept>,
    /// Statements run here (for tests: whether a read took this path).
    #[cfg(test)]
    pub(crate) runs: u64,
}

// SAFETY: the statements are used only under their connection's lock, one thread at a time
// (connections are opened NO_MUTEX, which allows that).
unsafe impl Send for FastReads {}

/// A parameter the statement reads after binding: a text or blob's bytes stay where they
/// are until the statement is reset.
fn bind(stmt: *mut ffi::sqlite3_stmt, i: c_int, v: &Value) -> Option<c_int> {
    // SAFETY: a live statement; bytes bound SQLITE_STATIC outlive the step (the caller holds
    // `params` until the statement is reset).
    unsafe {
        Some(match v {
            Value::Null => ffi::sqlite3_bind_null(stmt, i),
            Value::Bool(b) => ffi::sqlite3_bind_int64(stmt, i, *b as i64),
            Value::Int(n) | Value::BigInt(n) => ffi::sqlite3_bind_int64(stmt, i, *n),
            Value::Float(f) => ffi::sqlite3_bind_double(stmt, i, *f),
            // An empty text or blob is bound from a real address (an empty `String`'s is
            // dangling), and an empty blob as a zero-length blob, never NULL.
            Value::Text(s) | Value::Numeric(s) => ffi::sqlite3_bind_text64(
                stmt,
                i,
                if s.is_empty() {
                    c"".as_ptr()
                } else {
                    s.as_ptr().cast()
                },
                s.len() as u64,
                ffi::SQLITE_STATIC(),
                ffi::SQLITE_UTF8 as u8,
            ),
            Value::Bytes(b) if b.is_empty() => ffi::sqlite3_bind_zeroblob(stmt, i, 0),
            Value::Bytes(b) => ffi::sqlite3_bind_blob64(
                stmt,
                i,
                b.as_ptr().cast(),
                b.len() as u64,
                ffi::SQLITE_STATIC(),
            ),
            // Converted to text by rusqlite's path (timestamps, JSON, arrays).
            _ => return None,
        })
    }
}

fn column_names(stmt: *mut ffi::sqlite3_stmt) -> Arc<[String]> {
    // SAFETY: a live statement; names are read before the next step or reset.
    unsafe {
        (0..ffi::sqlite3_column_count(stmt))
            .map(|i| {
                let name = ffi::sqlite3_column_name(stmt, i);
                if name.is_null() {
                    String::new()
                } else {
                    CStr::from_ptr(name).to_string_lossy().into_owned()
                }
            })
            .collect()
    }
}

fn reprepared(stmt: *mut ffi::sqlite3_stmt) -> c_int {
    // SAFETY: a live statement.
    unsafe { ffi::sqlite3_stmt_status(stmt, ffi::SQLITE_STMTSTATUS_REPREPARE, 0) }
}

/// Column `i` of the current row.
fn cell(stmt: *mut ffi::sqlite3_stmt, i: c_int) -> Value {
    // SAFETY: a live statement on a row; each pointer is read before the next column call.
    let v = unsafe {
        match ffi::sqlite3_column_type(stmt, i) {
            ffi::SQLITE_INTEGER => ValueRef::Integer(ffi::sqlite3_column_int64(stmt, i)),
            ffi::SQLITE_FLOAT => ValueRef::Real(ffi::sqlite3_column_double(stmt, i)),
            ffi::SQLITE_TEXT => {
                let p = ffi::sqlite3_column_text(stmt, i);
                let n = ffi::sqlite3_column_bytes(stmt, i) as usize;
                ValueRef::Text(if p.is_null() {
                    &[]
                } else {
                    std::slice::from_raw_parts(p, n)
                })
            }
            ffi::SQLITE_BLOB => {
                let p = ffi::sqlite3_column_blob(stmt, i);
                let n = ffi::sqlite3_column_bytes(stmt, i) as usize;
                ValueRef::Blob(if p.is_null() {
                    &[]
                } else {
                    std::slice::from_raw_parts(p.cast(), n)
                })
            }
            _ => ValueRef::Null,
        }
    };
    super::sqlite::cell(v)
}

/// SQLite's error for `rc` on `conn`, as rusqlite reports it.
fn failure(conn: &Connection, rc: c_int) -> rusqlite::Error {
    // SAFETY: the connection's handle, used under its lock.
    let message = unsafe {
        let m = ffi::sqlite3_errmsg(conn.handle());
        (!m.is_null()).then(|| CStr::from_ptr(m).to_string_lossy().into_owned())
    };
    rusqlite::Error::SqliteFailure(ffi::Error::new(rc), message)
}

impl FastReads {
    /// Runs `sql` if it fits (see the module's note), calling `arm` just before it starts;
    /// `None`: it does not fit, nothing ran (and `arm` was not called).
    pub(crate) fn query(
        &mut self,
        conn: &Connection,
        sql: &str,
        params: &[Value],
        arm: impl FnOnce(),
    ) -> Option<Result<QueryResult>> {
        let p = match self.kept.get_mut(sql) {
            Some(Kept::Ready(p)) => p,
            Some(Kept::Unfit) => return None,
            None => {
                // A text that fails to prepare (a table not made yet, say) is not kept:
                // rusqlite's path reports the error, and the next call tries again.
                let prepared = prepare(conn, sql)?;
                if self.kept.len() >= KEPT {
                    self.clear();
                }
                let Kept::Ready(p) = self.kept.entry(sql.into()).or_insert(prepared) else {
                    return None;
                };
                p
            }
        };
        if p.params != params.len() {
            return None; // rusqlite's path reports the count
        }
        let stmt = Unbind(p.stmt.as_ptr());
        for (i, v) in params.iter().enumerate() {
            let bound = bind(stmt.0, i as c_int + 1, v);
            if bound != Some(ffi::SQLITE_OK) {
                // A value rusqlite's path converts first: there.
                return bound.map(|rc| Err(super::sqlite::query_error(failure(conn, rc))));
            }
        }
        arm();
        #[cfg(test)]
        {
            self.runs += 1;
        }
        let outcome = Self::step_all(conn, p);
        drop(stmt); // reset before the parameters' bytes can go
        Some(outcome.map_err(super::sqlite::query_error))
    }

    fn step_all(conn: &Connection, p: &mut Prepared) -> rusqlite::Result<QueryResult> {
        let stmt = p.stmt.as_ptr();
        let mut rows = Vec::with_capacity(1);
        loop {
            // SAFETY: a live statement, bound.
            match unsafe { ffi::sqlite3_step(stmt) } {
                ffi::SQLITE_ROW => {
                    if rows.is_empty() && reprepared(stmt) != p.reprepared {
                        p.columns = column_names(stmt);
                        p.reprepared = reprepared(stmt);
                    }
                    let width = p.columns.len() as c_int;
                    rows.push((0..width).map(|i| cell(stmt, i)).collect());
                }
                ffi::SQLITE_DONE => break,
                rc => return Err(failure(conn, rc)),
            }
        }
        if rows.is_empty() && reprepared(stmt) != p.reprepared {
            p.columns = column_names(stmt);
            p.reprepared = reprepared(stmt);
        }
        Ok(QueryResult {
            columns: Arc::clone(&p.columns),
            row_count: rows.len() as u64,
            rows,
        })
    }

    /// Finalizes every statement kept (the connection's lock held).
    pub(crate) fn clear(&mut self) {
        for (_, kept) in self.kept.drain() {
            if let Kept::Ready(p) = kept {
                // SAFETY: prepared here, finalized once.
                unsafe { ffi::sqlite3_finalize(p.stmt.as_ptr()) };
            }
        }
    }
}

/// Resets a statement and clears its parameters when dropped, however its run ended: no
/// bound bytes are read after it, and the next run starts from the first row.
struct Unbind(*mut ffi::sqlite3_stmt);

impl Drop for Unbind {
    fn drop(&mut self) {
        // SAFETY: a live statement, under its connection's lock.
        unsafe {
            ffi::sqlite3_reset(self.0);
            ffi::sqlite3_clear_bindings(self.0);
        }
    }
}

/// Prepares `sql` for [`FastReads::query`], or says it does not fit; `None` when it fails to
/// prepare.
fn prepare(conn: &Connection, sql: &str) -> Option<Kept> {
    let mut stmt = ptr::null_mut();
    let mut tail = ptr::null();
    // SAFETY: the connection's handle, used under its lock; `sql` outlives the call.
    let rc = unsafe {
        ffi::sqlite3_prepare_v3(
            conn.handle(),
            sql.as_ptr().cast(),
            sql.len() as c_int,
            ffi::SQLITE_PREPARE_PERSISTENT,
            &mut stmt,
            &mut tail,
        )
    };
    if rc != ffi::SQLITE_OK {
        if !stmt.is_null() {
            // SAFETY: prepared just now, finalized once.
            unsafe { ffi::sqlite3_finalize(stmt) };
        }
        return None;
    }
    let Some(stmt) = NonNull::new(stmt) else {
        return Some(Kept::Unfit); // no statement (a comment, say)
    };
    let raw = stmt.as_ptr();
    // SAFETY: `tail` points into `sql` (or is null); the statement is live.
    let fits = unsafe {
        let used = if tail.is_null() {
            sql.len()
        } else {
            (tail as usize).saturating_sub(sql.as_ptr() as usize)
        };
        let rest = sql.get(used..).unwrap_or("");
        rest.trim_matches(|c: char| c.is_whitespace() || c == ';')
            .is_empty()
            && ffi::sqlite3_stmt_readonly(raw) != 0
            && ffi::sqlite3_column_count(raw) > 0
    };
    if !fits {
        // SAFETY: prepared just now, finalized once.
        unsafe { ffi::sqlite3_finalize(raw) };
        return Some(Kept::Unfit);
    }
    Some(Kept::Ready(Prepared {
        stmt,
        // SAFETY: a live statement.
        params: unsafe { ffi::sqlite3_bind_parameter_count(raw) } as usize,
        columns: column_names(raw),
        reprepared: reprepared(raw),
    }))
}
