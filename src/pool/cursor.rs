//! SQLite cursors: the rows of one statement in batches on a connection of their own, read
//! from SQLite only as the consumer takes them (PostgreSQL cursors are DECLARE/FETCH on a
//! lease, in wrappers.js).

use tokio::sync::mpsc::Receiver;

use crate::error::{Error, Result};
use crate::pool::{Bounds, Lease, Pool, QueryResult, Value};

pub struct SqliteCursor {
    lease: Option<Lease>,
    rows: Option<Receiver<Result<QueryResult>>>,
}

impl SqliteCursor {
    pub async fn open(
        pool: &Pool,
        sql: &str,
        params: &[Value],
        batch: usize,
        bounds: &Bounds,
    ) -> Result<SqliteCursor> {
        if pool.config().target.backend() != "sqlite" {
            return Err(Error::internal("SqliteCursor needs a SQLite pool"));
        }
        let lease = pool.acquire_within(None, bounds).await?;
        let rows = lease.connection()?.sqlite_stream(sql, params, batch)?;
        Ok(SqliteCursor {
            lease: Some(lease),
            rows: Some(rows),
        })
    }

    /// The next batch, `None` at the end (the connection is then back in the pool). A bound
    /// that fires stops the statement and closes the cursor.
    pub async fn next(&mut self, bounds: &Bounds) -> Result<Option<QueryResult>> {
        let Some(rows) = self.rows.as_mut() else {
            return Ok(None);
        };
        let next = tokio::select! {
            biased;
            next = rows.recv() => next,
            fired = bounds.fired() => {
                self.close();
                return Err(bounds.error(fired, "reading the cursor; it was closed"));
            }
        };
        match next {
            Some(Ok(batch)) => Ok(Some(batch)),
            Some(Err(e)) => {
                self.close();
                Err(e)
            }
            None => {
                self.close();
                Ok(None)
            }
        }
    }

    /// Stops the statement and returns the connection. Idempotent.
    pub fn close(&mut self) {
        if let Some(lease) = self.lease.as_ref() {
            if self.rows.is_some() {
                if let Ok(conn) = lease.connection() {
                    conn.interrupt();
                }
            }
        }
        self.rows = None;
        self.lease = None;
    }
}

impl Drop for SqliteCursor {
    fn drop(&mut self) {
        self.close();
    }
}
