//! A lease: one connection checked out of a pool, returned clean exactly once.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::runtime::Handle;

use crate::error::{Error, ErrorCode, Result};
use crate::metrics::LiveToken;
use crate::pool::bounds::Bounds;
use crate::pool::connection::{Connection, Operation, Outcome, Statement};
use crate::pool::dispatch::{Done, Pending};
use crate::pool::profile::{Profiles, INLINE_LIMIT};
use crate::pool::{LaneKind, PoolShared, Retries};

fn released() -> Error {
    Error::new(
        ErrorCode::PoolClosed,
        "this connection was already released to its pool",
    )
}

/// How long a returned connection may take to roll back before it is closed instead.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Lease {
    conn: Option<Box<Connection>>,
    shared: Arc<PoolShared>,
    /// The lane whose connections it came from (and goes back to).
    kind: LaneKind,
    acquired: Instant,
    /// Nothing has run on it yet, so nothing can be lost by moving it to another connection.
    fresh: bool,
    /// Its connection was lost and could not be replaced.
    lost: bool,
    tracking: Option<LiveToken>,
}

impl Lease {
    pub(crate) fn new(
        conn: Box<Connection>,
        shared: Arc<PoolShared>,
        kind: LaneKind,
        tracking: Option<LiveToken>,
    ) -> Lease {
        Lease {
            conn: Some(conn),
            shared,
            kind,
            acquired: Instant::now(),
            fresh: true,
            lost: false,
            tracking,
        }
    }

    /// The connection, or `POOL_CLOSED` once released.
    pub fn connection(&self) -> Result<&Connection> {
        self.conn.as_deref().ok_or_else(|| {
            if self.lost {
                Error::connection_lost(false, "this lease's connection was lost earlier")
            } else {
                released()
            }
        })
    }

    /// Runs one operation on the leased connection. Only the lease's first statement may
    /// move to another connection, and only when it provably never reached the server:
    /// after that the session (a transaction, settings) lives on this connection alone.
    pub async fn run(&mut self, op: &Operation<'_>, bounds: &Bounds) -> Result<Outcome> {
        let mut retry = Retries::new(&self.shared);
        loop {
            let result = Box::pin(self.connection()?.run_within(op, bounds)).await;
            match result {
                Err(e) if e.never_sent() && self.fresh && retry.again() => {
                    let inventory = Arc::clone(&self.shared.lane(self.kind).inventory);
                    if let Some(dead) = self.conn.take() {
                        inventory.discard(dead);
                    }
                    let deadline = Instant::now() + self.shared.config.acquire_timeout;
                    match Box::pin(inventory.checkout(deadline)).await {
                        Ok(conn) => self.conn = Some(conn),
                        Err(replacement) => {
                            self.lost = true;
                            return Err(replacement);
                        }
                    }
                }
                other => {
                    self.fresh = false;
                    return other;
                }
            }
        }
    }

    pub fn is_released(&self) -> bool {
        self.conn.is_none() && !self.lost
    }

    /// The pool's statement costs (for the calling-thread path).
    pub fn profiles(&self) -> Arc<Profiles> {
        Arc::clone(&self.shared.profiles)
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
        self.lost = false;
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        self.tracking = None;
        let recorder = &self.shared.recorder;
        recorder.usage_latency.record(self.acquired.elapsed());
        if leaked {
            recorder.leaked_leases.inc();
        }
        let inventory = Arc::clone(&self.shared.lane(self.kind).inventory);
        // Dropped while unwinding a panic: the statement may be half done.
        if conn.is_unusable() || std::thread::panicking() {
            inventory.discard(conn);
            return;
        }
        if leaked || conn.needs_reset() {
            let reset = async move {
                match tokio::time::timeout(RESET_TIMEOUT, conn.reset()).await {
                    Ok(Ok(())) if !conn.is_unusable() => {
                        conn.last_returned = Instant::now();
                        conn.last_checked = conn.last_returned;
                        inventory.give_back(conn);
                    }
                    _ => inventory.discard(conn),
                }
            };
            self.shared.runtime.spawn(reset);
            return;
        }
        conn.last_returned = Instant::now();
        conn.last_checked = conn.last_returned;
        inventory.give_back(conn);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.finish(false);
    }
}

/// What an [`OrderedLease`] has been asked to do, in order.
enum Work {
    Run(Statement, Bounds, Pending),
    /// Undo session changes inside the open transaction (before a transaction's COMMIT).
    ResetSession(Pending),
    Finish {
        leaked: bool,
    },
}

struct Ordered {
    queue: VecDeque<Work>,
    running: bool,
    released: bool,
    /// A bound on everything run on this lease (a transaction's `timeoutMs` / signal).
    bounds: Bounds,
}

/// A lease whose statements are issued without waiting (a JS handle): they run one at a
/// time in the order issued, and a release runs after everything issued before it. A
/// statement issued after the release is refused, so none can land outside the lease's
/// transaction.
pub struct OrderedLease {
    state: parking_lot::Mutex<Ordered>,
    /// The pool's `inlineMicros`.
    inline_max: Duration,
    lease: tokio::sync::Mutex<Lease>,
    runtime: Handle,
}

fn lease_inline_max(lease: &OrderedLease) -> Duration {
    lease.inline_max
}

impl OrderedLease {
    pub fn new(lease: Lease) -> Arc<OrderedLease> {
        let runtime = lease.shared.runtime.clone();
        let inline_max = lease.shared.config.inline_max;
        Arc::new(OrderedLease {
            inline_max,
            state: parking_lot::Mutex::new(Ordered {
                queue: VecDeque::new(),
                running: false,
                released: false,
                bounds: Bounds::default(),
            }),
            lease: tokio::sync::Mutex::new(lease),
            runtime,
        })
    }

    /// Queues one statement behind those issued before it; `done` gets its outcome. The
    /// statement's own bounds and the lease's apply, whichever is tighter.
    pub fn submit(self: &Arc<Self>, statement: Statement, bounds: Bounds, done: Done) {
        let mut state = self.state.lock();
        if state.released {
            drop(state);
            return done(Err(released()));
        }
        let bounds = bounds.within(&state.bounds);
        state
            .queue
            .push_back(Work::Run(statement, bounds, Pending::new(done)));
        self.ensure_running(&mut state);
    }

    /// Queues [`Connection::reset_session_in_transaction`] behind what was issued before.
    pub fn reset_session(self: &Arc<Self>, done: Done) {
        let mut state = self.state.lock();
        if state.released {
            drop(state);
            return done(Err(released()));
        }
        state
            .queue
            .push_back(Work::ResetSession(Pending::new(done)));
        self.ensure_running(&mut state);
    }

    /// SQLite: runs a cheap statement on the calling thread when nothing is queued on this
    /// lease. A read is cut off at [`INLINE_LIMIT`]; a write in a transaction is not (that
    /// would roll the whole transaction back): one that overran it is marked slow and takes
    /// the queue from then on. `None`: use [`submit`](Self::submit).
    pub fn try_inline(
        &self,
        statement: &Statement,
        profiles: &Profiles,
    ) -> Option<Result<Outcome>> {
        let (Statement::Query(sql, _) | Statement::Execute(sql, _)) = statement else {
            return None;
        };
        let profile = profiles.get(sql)?;
        // (Only SQLite says whether a statement reads only; no other backend runs here.)
        if !profile.is_cheap(lease_inline_max(self)) || profile.read_only.is_none() {
            return None;
        }
        let state = self.state.lock();
        if state.released || state.running || !state.queue.is_empty() {
            return None;
        }
        let lease = self.lease.try_lock().ok()?;
        drop(state);
        let (outcome, started, ended) = lease
            .connection()
            .ok()?
            .run_now_timed(&statement.borrow(), Some(INLINE_LIMIT));
        let took = ended - started;
        match &outcome {
            // A write in a transaction is not cut off (see `SqliteConnection::run_now`): one
            // that overran the bound runs off the thread from now on.
            Some(_) => {
                lease.shared.recorder.inline_statements.inc();
                if took >= INLINE_LIMIT {
                    profiles.mark_slow(sql);
                }
            }
            None => profiles.given_up(sql, took),
        }
        outcome
    }

    /// SQLite: runs a statement on the calling thread (`querySync` on a lease). Statements
    /// issued before it without awaiting must have finished first.
    pub fn run_sync(&self, op: &Operation<'_>) -> Result<Outcome> {
        let state = self.state.lock();
        if state.released {
            return Err(released());
        }
        if state.running || !state.queue.is_empty() {
            return Err(Error::invalid_argument(
                "statements issued on this lease are still running: await them before querySync/executeSync",
            ));
        }
        let lease = self.lease.try_lock().map_err(|_| {
            Error::invalid_argument("this lease is busy: await its statements before querySync")
        })?;
        drop(state);
        let conn = lease.connection()?;
        if conn.backend_name() != "sqlite" {
            return Err(crate::pool::sync_needs_sqlite(conn.backend_name()));
        }
        lease.shared.recorder.inline_statements.inc();
        conn.run_now(op, None)
            .unwrap_or_else(|| Err(Error::internal("statement was not run")))
    }

    /// SQLite: runs a transaction's BEGIN IMMEDIATE or COMMIT on the calling thread when
    /// nothing else is issued on this lease, never waiting for another connection's lock and
    /// cut off at [`INLINE_LIMIT`]. `Ok(false)`: not run (send it instead). Such a statement
    /// does no work an interrupt could cut in two: it either took effect or it did not.
    pub fn try_transaction_control_now(&self, sql: &str) -> Result<bool> {
        let state = self.state.lock();
        if state.released || state.running || !state.queue.is_empty() || state.bounds.is_set() {
            return Ok(false);
        }
        let Ok(lease) = self.lease.try_lock() else {
            return Ok(false);
        };
        drop(state);
        let conn = lease.connection()?;
        if conn.backend_name() != "sqlite" {
            return Ok(false);
        }
        match conn.run_now(&Operation::Execute(sql, &[]), Some(INLINE_LIMIT)) {
            Some(outcome) => {
                lease.shared.recorder.inline_statements.inc();
                outcome.map(|_| true)
            }
            None => Ok(false),
        }
    }

    /// Bounds every statement run on this lease from now on (a transaction's deadline).
    pub fn bound(&self, bounds: Bounds) {
        self.state.lock().bounds = bounds;
    }

    /// Releases after everything issued so far (at once when nothing is). Idempotent.
    pub fn release(self: &Arc<Self>, leaked: bool) {
        let mut state = self.state.lock();
        if state.released {
            return;
        }
        state.released = true;
        if !state.running && state.queue.is_empty() {
            if let Ok(mut lease) = self.lease.try_lock() {
                drop(state);
                return lease.finish(leaked);
            }
        }
        state.queue.push_back(Work::Finish { leaked });
        self.ensure_running(&mut state);
    }

    pub fn is_released(&self) -> bool {
        self.state.lock().released
    }

    fn ensure_running(self: &Arc<Self>, state: &mut Ordered) {
        if !state.running {
            state.running = true;
            self.runtime.spawn(Arc::clone(self).drain());
        }
    }

    async fn drain(self: Arc<Self>) {
        loop {
            let work = {
                let mut state = self.state.lock();
                match state.queue.pop_front() {
                    Some(w) => w,
                    None => {
                        state.running = false;
                        return;
                    }
                }
            };
            let mut lease = self.lease.lock().await;
            match work {
                Work::Run(statement, bounds, pending) => {
                    let op = statement.borrow();
                    let run = lease.run(&op, &bounds);
                    // A panic settles the caller with INTERNAL (as `pending` drops) and the
                    // queue goes on.
                    if let Ok(outcome) = AssertUnwindSafe(run).catch_unwind().await {
                        pending.settle(outcome);
                    }
                }
                Work::ResetSession(pending) => {
                    let outcome = match lease.connection() {
                        Ok(conn) => conn
                            .reset_session_in_transaction()
                            .await
                            .map(|()| Outcome::Replies(Vec::new())),
                        Err(e) => Err(e),
                    };
                    pending.settle(outcome);
                }
                Work::Finish { leaked } => lease.finish(leaked),
            }
        }
    }
}
