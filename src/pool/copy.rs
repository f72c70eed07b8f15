//! COPY with backpressure, on a lease held for the transfer: `COPY … FROM STDIN` takes data
//! as the writer hands it over, `COPY … TO STDOUT` reads only as the reader asks. An abort
//! (or a dropped handle) ends the COPY on the server and returns the connection clean.

use std::pin::Pin;

use bytes::Bytes;
use futures::{FutureExt, SinkExt, StreamExt};
use tokio_postgres::{CopyInSink, CopyOutStream};

use crate::error::{Error, ErrorCode, Result};
use crate::pool::{Bounds, Lease, Pool};

/// Most bytes one `CopyOut::read` hands over.
const READ_BATCH: usize = 256 * 1024;

fn finished() -> Error {
    Error::new(ErrorCode::PoolClosed, "this COPY has already ended")
}

pub struct CopyIn {
    lease: Option<Lease>,
    sink: Option<Pin<Box<CopyInSink<Bytes>>>>,
}

impl CopyIn {
    pub async fn open(pool: &Pool, sql: &str, bounds: &Bounds) -> Result<CopyIn> {
        let lease = pool.acquire_within(None, bounds).await?;
        let sink = lease.connection()?.postgres()?.copy_in(sql).await?;
        Ok(CopyIn {
            lease: Some(lease),
            sink: Some(Box::pin(sink)),
        })
    }

    fn fail(&mut self, e: tokio_postgres::Error) -> Error {
        let err = match self.lease.as_ref().map(|l| l.connection()) {
            Some(Ok(conn)) => match conn.postgres() {
                Ok(pg) => pg.copy_failure(e),
                Err(other) => other,
            },
            _ => Error::new(ErrorCode::QueryFailed, e.to_string()),
        };
        self.abort();
        err
    }

    /// Hands one chunk to the server; resolves when the connection can take more.
    pub async fn write(&mut self, chunk: Bytes) -> Result<()> {
        let sink = self.sink.as_mut().ok_or_else(finished)?;
        match sink.send(chunk).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Ends the data; the server's row count when it accepted it all.
    pub async fn finish(&mut self) -> Result<u64> {
        let mut sink = self.sink.take().ok_or_else(finished)?;
        let outcome = sink.as_mut().finish().await;
        match outcome {
            Ok(rows) => {
                self.lease = None;
                Ok(rows)
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Abandons the COPY: the server is told (CopyFail) and rolls it back. Idempotent.
    pub fn abort(&mut self) {
        self.sink = None;
        self.lease = None;
    }
}

pub struct CopyOut {
    lease: Option<Lease>,
    stream: Option<Pin<Box<CopyOutStream>>>,
    /// The end (or an error) met while batching, reported by the next read.
    ended: Option<Option<tokio_postgres::Error>>,
}

impl CopyOut {
    pub async fn open(pool: &Pool, sql: &str, bounds: &Bounds) -> Result<CopyOut> {
        let lease = pool.acquire_within(None, bounds).await?;
        let stream = lease.connection()?.postgres()?.copy_out(sql).await?;
        Ok(CopyOut {
            lease: Some(lease),
            stream: Some(Box::pin(stream)),
            ended: None,
        })
    }

    /// The next chunk of output, `None` at the end (the connection is then released).
    /// The server sends a message per row; whatever has already arrived is handed over
    /// together, up to [`READ_BATCH`] bytes, so a reader pays one call per batch, not per row.
    pub async fn read(&mut self) -> Result<Option<Bytes>> {
        let Some(stream) = self.stream.as_mut() else {
            return Ok(None);
        };
        let next = match self.ended.take() {
            Some(ended) => ended.map(Err),
            None => stream.next().await,
        };
        match next {
            Some(Ok(first)) => {
                let mut batch = bytes::BytesMut::from(first.as_ref());
                while batch.len() < READ_BATCH {
                    match stream.next().now_or_never() {
                        Some(Some(Ok(more))) => batch.extend_from_slice(&more),
                        Some(Some(Err(e))) => {
                            self.ended = Some(Some(e));
                            break;
                        }
                        Some(None) => {
                            self.ended = Some(None);
                            break;
                        }
                        None => break, // nothing more has arrived yet
                    }
                }
                Ok(Some(batch.freeze()))
            }
            Some(Err(e)) => {
                let err = match self.lease.as_ref().map(|l| l.connection()) {
                    Some(Ok(conn)) => conn
                        .postgres()
                        .map(|pg| pg.copy_failure(e))
                        .unwrap_or_else(|x| x),
                    _ => Error::new(ErrorCode::QueryFailed, "COPY failed"),
                };
                self.stream = None;
                self.lease = None;
                Err(err)
            }
            None => {
                self.stream = None;
                self.lease = None;
                Ok(None)
            }
        }
    }

    /// Stops reading early: the server is asked to cancel the COPY so the rest of its output
    /// is not streamed for nothing, and the connection goes back once it has stopped.
    pub async fn close(&mut self) {
        let Some(stream) = self.stream.take() else {
            self.lease = None;
            return;
        };
        if let Some(Ok(conn)) = self.lease.as_ref().map(|l| l.connection()) {
            if let Ok(pg) = conn.postgres() {
                // Bounded by the cancel request's own bound.
                let _ = pg.cancel_in_background().await;
            }
        }
        // Drain what was already on its way, so the connection is returned idle.
        let mut stream = stream;
        let drained = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            while let Some(Ok(_)) = stream.next().await {}
        })
        .await;
        if drained.is_err() {
            if let Some(Ok(conn)) = self.lease.as_ref().map(|l| l.connection()) {
                conn.retire();
            }
        }
        self.lease = None;
    }
}
