//! A lease: one connection checked out of a pool, returned clean exactly once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool::managed::Object;

use crate::error::{Error, ErrorCode, Result};
use crate::metrics::LiveToken;
use crate::pool::connection::Connection;
use crate::pool::manager::Manager;
use crate::pool::PoolShared;

/// How long a returned connection may take to roll back before it is closed instead.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Lease {
    object: Option<Object<Manager>>,
    shared: Arc<PoolShared>,
    acquired: Instant,
    /// Whether the connection was reused (not freshly opened) — a lost one may be retried.
    pub(crate) reused: bool,
    tracking: Option<LiveToken>,
}

impl Lease {
    pub(crate) fn new(
        object: Object<Manager>,
        shared: Arc<PoolShared>,
        reused: bool,
        tracking: Option<LiveToken>,
    ) -> Lease {
        Lease {
            object: Some(object),
            shared,
            acquired: Instant::now(),
            reused,
            tracking,
        }
    }

    /// The connection, or `POOL_CLOSED` once released.
    pub fn connection(&self) -> Result<&Connection> {
        self.object.as_deref().ok_or_else(|| {
            Error::new(
                ErrorCode::PoolClosed,
                "this connection was already released to its pool",
            )
        })
    }

    pub fn is_released(&self) -> bool {
        self.object.is_none()
    }

    /// How long this lease has been held.
    pub fn held_for(&self) -> Duration {
        self.acquired.elapsed()
    }

    /// Returns the connection to the pool (rolled back first if a transaction may be open).
    pub fn release(&mut self) {
        self.finish(false);
    }

    /// The owner was garbage-collected without releasing: count it, roll back, return it.
    pub fn abandon(&mut self) {
        self.finish(true);
    }

    fn finish(&mut self, leaked: bool) {
        let Some(mut object) = self.object.take() else {
            return;
        };
        self.tracking = None;
        let recorder = &self.shared.recorder;
        recorder.usage_latency.record(self.acquired.elapsed());
        if leaked {
            recorder.leaked_leases.inc();
        }
        if object.is_unusable() || self.shared.is_closed() {
            drop(Object::take(object));
            return;
        }
        if leaked || object.needs_reset() {
            let reset = async move {
                match tokio::time::timeout(RESET_TIMEOUT, object.reset()).await {
                    Ok(Ok(())) => {
                        object.last_returned = Instant::now();
                        drop(object);
                    }
                    _ => drop(Object::take(object)),
                }
            };
            self.shared.runtime.spawn(reset);
            return;
        }
        object.last_returned = Instant::now();
        drop(object);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.finish(false);
    }
}
