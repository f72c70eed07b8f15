//! The PostgreSQL byte stream, watched as it passes. It tells what tokio-postgres does not:
//! whether any byte went out after a given moment (so a statement lost with its connection
//! is known never to have been sent), the server's transaction status from every
//! ReadyForQuery, the tag of every CommandComplete, and session changes the server reports.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes of a message body kept for inspection (tags, status, parameter values).
const CAPTURE: usize = 256;

/// The server's transaction status, from the last ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    Idle,
    InTransaction,
    /// Inside a transaction that failed: everything up to its end is rejected, and
    /// COMMIT rolls it back.
    Failed,
}

/// What the watched stream has shown so far. Shared by the stream and its connection.
#[derive(Default)]
pub struct WireState {
    written: AtomicU64,
    /// Bytes received from the server so far: unchanged across a stretch of time means
    /// the server said nothing in it.
    read: AtomicU64,
    status: AtomicU8,
    tags: AtomicU64,
    last_tag: Mutex<String>,
    /// DISCARD ALL / DEALLOCATE seen: the server forgot prepared statements.
    discards: AtomicU64,
    /// Set when the server reports a session change (SET, PREPARE, LISTEN, a changed
    /// parameter); cleared by whoever resets the session.
    session_changed: AtomicBool,
    started: AtomicBool,
    /// Parameters the server reports (`in_hot_standby`, `default_transaction_read_only`…).
    parameters: Mutex<HashMap<String, String>>,
}

impl WireState {
    /// Bytes handed to the socket so far. Compare two readings: equal means nothing was
    /// written in between.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    /// Bytes received so far. Compare two readings: equal means the server was silent.
    pub fn read(&self) -> u64 {
        self.read.load(Ordering::Acquire)
    }

    pub fn status(&self) -> TxStatus {
        match self.status.load(Ordering::Acquire) {
            b'T' => TxStatus::InTransaction,
            b'E' => TxStatus::Failed,
            _ => TxStatus::Idle,
        }
    }

    /// CommandComplete messages seen so far.
    pub fn tags(&self) -> u64 {
        self.tags.load(Ordering::Acquire)
    }

    pub fn last_tag(&self) -> String {
        self.last_tag.lock().clone()
    }

    pub fn discards(&self) -> u64 {
        self.discards.load(Ordering::Acquire)
    }

    pub fn session_changed(&self) -> bool {
        self.session_changed.load(Ordering::Acquire)
    }

    pub fn clear_session_changed(&self) {
        self.session_changed.store(false, Ordering::Release);
    }

    pub fn parameter(&self, name: &str) -> Option<String> {
        self.parameters.lock().get(name).cloned()
    }

    fn on_message(&self, kind: u8, body: &[u8]) {
        match kind {
            b'Z' => {
                self.status
                    .store(body.first().copied().unwrap_or(b'I'), Ordering::Release);
                self.started.store(true, Ordering::Release);
            }
            b'C' => {
                let tag = text(body);
                if tag.starts_with("DISCARD ALL") || tag.starts_with("DEALLOCATE") {
                    self.discards.fetch_add(1, Ordering::AcqRel);
                }
                if changes_session(tag) {
                    self.session_changed.store(true, Ordering::Release);
                }
                *self.last_tag.lock() = tag.to_string();
                self.tags.fetch_add(1, Ordering::AcqRel);
            }
            b'S' => {
                let mut parts = body.split(|b| *b == 0);
                let name = parts.next().map(text).unwrap_or_default();
                let value = parts.next().map(text).unwrap_or_default();
                // At startup the server reports every parameter; later reports are changes.
                if self.started.load(Ordering::Acquire) && name != "in_hot_standby" {
                    self.session_changed.store(true, Ordering::Release);
                }
                self.parameters
                    .lock()
                    .insert(name.to_string(), value.to_string());
            }
            _ => {}
        }
    }
}

/// Command tags of statements whose effect outlives them in the session.
fn changes_session(tag: &str) -> bool {
    let verb = tag.split(' ').next().unwrap_or("");
    matches!(verb, "SET" | "RESET" | "PREPARE" | "LISTEN" | "LOAD")
}

fn text(bytes: &[u8]) -> &str {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    std::str::from_utf8(&bytes[..end]).unwrap_or("")
}

/// Splits the backend stream into messages (type byte, length, body) as bytes arrive.
#[derive(Default)]
struct Frames {
    header: [u8; 5],
    header_len: usize,
    in_body: bool,
    remaining: usize,
    body: Vec<u8>,
}

impl Frames {
    fn feed(&mut self, mut data: &[u8], on_message: &mut impl FnMut(u8, &[u8])) {
        while !data.is_empty() {
            if !self.in_body {
                let take = (5 - self.header_len).min(data.len());
                self.header[self.header_len..self.header_len + take].copy_from_slice(&data[..take]);
                self.header_len += take;
                data = &data[take..];
                if self.header_len < 5 {
                    continue;
                }
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                self.remaining = len.saturating_sub(4);
                self.body.clear();
                self.in_body = true;
            }
            let take = self.remaining.min(data.len());
            let keep = take.min(CAPTURE.saturating_sub(self.body.len()));
            if wants_body(self.header[0]) && keep > 0 {
                self.body.extend_from_slice(&data[..keep]);
            }
            self.remaining -= take;
            data = &data[take..];
            if self.remaining == 0 {
                on_message(self.header[0], &self.body);
                self.in_body = false;
                self.header_len = 0;
            }
        }
    }
}

fn wants_body(kind: u8) -> bool {
    matches!(kind, b'Z' | b'C' | b'S')
}

/// A stream that reports what passes through it to a [`WireState`].
pub struct Wire<S> {
    inner: S,
    frames: Frames,
    state: Arc<WireState>,
}

impl<S> Wire<S> {
    pub fn new(inner: S) -> (Wire<S>, Arc<WireState>) {
        let state = Arc::new(WireState::default());
        let wire = Wire {
            inner,
            frames: Frames::default(),
            state: Arc::clone(&state),
        };
        (wire, state)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Wire<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let Wire {
            inner,
            frames,
            state,
        } = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &polled {
            let arrived = buf.filled().len() - before;
            state.read.fetch_add(arrived as u64, Ordering::AcqRel);
            frames.feed(&buf.filled()[before..], &mut |kind, body| {
                state.on_message(kind, body)
            });
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Wire<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &polled {
            this.state.written.fetch_add(*n as u64, Ordering::AcqRel);
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &polled {
            this.state.written.fetch_add(*n as u64, Ordering::AcqRel);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn feed_in_pieces(state: &WireState, bytes: &[u8], piece: usize) {
        let mut frames = Frames::default();
        for chunk in bytes.chunks(piece) {
            frames.feed(chunk, &mut |k, b| state.on_message(k, b));
        }
    }

    #[test]
    fn status_tags_and_session_changes_survive_any_split() {
        let mut stream = Vec::new();
        stream.extend(message(b'S', b"TimeZone\0UTC\0"));
        stream.extend(message(b'Z', b"I"));
        stream.extend(message(b'D', &[0, 1, 0, 0, 0, 1, b'x']));
        stream.extend(message(b'C', b"INSERT 0 1\0"));
        stream.extend(message(b'Z', b"T"));
        stream.extend(message(b'C', b"ROLLBACK\0"));
        stream.extend(message(b'Z', b"E"));
        for piece in [1, 2, 3, 7, stream.len()] {
            let state = WireState::default();
            feed_in_pieces(&state, &stream, piece);
            assert_eq!(state.status(), TxStatus::Failed, "piece {piece}");
            assert_eq!(state.tags(), 2);
            assert_eq!(state.last_tag(), "ROLLBACK");
            // The startup report is not a change.
            assert!(!state.session_changed());
            assert_eq!(state.parameter("TimeZone").as_deref(), Some("UTC"));
        }
    }

    #[test]
    fn session_changes_and_discards_are_seen_from_tags_and_reports() {
        let state = WireState::default();
        let mut stream = message(b'Z', b"I");
        stream.extend(message(b'C', b"SET\0"));
        feed_in_pieces(&state, &stream, 4);
        assert!(state.session_changed());
        state.clear_session_changed();
        feed_in_pieces(&state, &message(b'S', b"application_name\0x\0"), 3);
        assert!(state.session_changed());
        feed_in_pieces(&state, &message(b'C', b"DISCARD ALL\0"), 5);
        assert_eq!(state.discards(), 1);
    }
}
