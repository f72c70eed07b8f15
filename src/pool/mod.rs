//! Connection pools for PostgreSQL, SQLite and Redis: one acquire deadline, validation on
//! checkout, paced opening, background retirement and keepalive, clean return of every lease.

pub mod bounds;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod connector;
pub mod copy;
pub mod cursor;
pub mod dispatch;
pub mod health;
pub mod inventory;
pub mod lease;
pub mod listen;
pub mod postgres;
pub mod profile;
pub mod redis;
pub mod socket;
pub mod sqlite;
mod sqlite_fast;
pub mod tls;
pub mod value;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::runtime::Handle;

pub use bounds::{Bounds, Fired};
pub use config::{PoolConfig, PoolOptions, Target};
pub use connection::{Connection, Operation, Outcome, Statement};
pub use dispatch::Done;
pub use health::{PoolHealth, PoolMetrics, PoolStatus, Recommendation};
pub use lease::{Lease, OrderedLease};
pub use value::{ExecuteResult, QueryResult, Value};

use crate::error::{Error, ErrorCode, Result};
use crate::metrics::{LiveResource, PoolGauges, PoolRecorder, Registry};
use crate::shared::{Directory, Shareable};
use connector::{Connector, VALIDATION_GRACE};
use inventory::Inventory;
use sqlite::SqliteTarget;

/// How often a statement that never reached the server may be tried on another connection:
/// within the acquire deadline, and a few more times than the pool has connections.
pub(crate) struct Retries {
    deadline: Instant,
    left: usize,
}

impl Retries {
    pub(crate) fn new(shared: &PoolShared) -> Retries {
        Retries {
            deadline: Instant::now() + shared.config.acquire_timeout,
            left: shared.config.max_size + 2,
        }
    }

    pub(crate) fn again(&mut self) -> bool {
        if self.left == 0 || Instant::now() >= self.deadline {
            return false;
        }
        self.left -= 1;
        true
    }
}

/// Which connections a call uses. A SQLite pool (of more than one connection) has two
/// lanes: the one writer connection, for writes, leases and transactions, and the others
/// for reads, so under WAL writers never wait in SQLite's busy handler. Every other pool has
/// one lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LaneKind {
    Main,
    Writer,
}

/// A set of connections and the queue of statements that feeds them.
pub(crate) struct Lane {
    pub(crate) inventory: Arc<Inventory>,
    /// Statements queued by `submit`, served in batches by dispatcher tasks.
    pub(crate) queue: Mutex<dispatch::Queue>,
}

/// State shared by the pool and every lease it hands out.
pub(crate) struct PoolShared {
    lanes: Vec<Lane>,
    /// What each statement has cost, for dispatch.
    pub(crate) profiles: Arc<profile::Profiles>,
    pub(crate) config: Arc<PoolConfig>,
    pub(crate) recorder: Arc<PoolRecorder>,
    registry: Arc<Registry>,
    closed: AtomicBool,
    waiters: AtomicUsize,
    peak_in_use: AtomicUsize,
    /// Most statements a calling-thread group takes now: halved when a group runs into the
    /// calling-thread bound, grown back by one after each group that ran well within it.
    group_cap: AtomicUsize,
    pub(crate) runtime: Handle,
    /// The listening connection (LISTEN / SUBSCRIBE), started by the first `listen`.
    hub: std::sync::OnceLock<Arc<listen::Hub>>,
    /// Keeps a `sqlite::memory:` database alive while the pool lives.
    _memory_anchor: Mutex<Option<sqlite::MemoryDatabase>>,
    /// Opens the connections (and, for SQLite, owns the checkpoint thread).
    connector: Arc<Connector>,
}

impl PoolShared {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(crate) fn lane(&self, kind: LaneKind) -> &Lane {
        match kind {
            LaneKind::Writer if self.lanes.len() > 1 => &self.lanes[1],
            _ => &self.lanes[0],
        }
    }

    pub(crate) fn lanes(&self) -> &[Lane] {
        &self.lanes
    }

    /// Where a statement goes: on a split SQLite pool, reads known to be read-only to the
    /// readers and everything else (writes, the unknown) to the writer.
    pub(crate) fn lane_for(&self, op: &Operation<'_>) -> LaneKind {
        if self.lanes.len() == 1 {
            return LaneKind::Main;
        }
        match op {
            Operation::Query(sql, _) | Operation::Execute(sql, _)
                if self
                    .profiles
                    .get(sql)
                    .is_some_and(|p| p.read_only == Some(true)) =>
            {
                LaneKind::Main
            }
            _ => LaneKind::Writer,
        }
    }

    /// Transactions (and anything else that will write): the writer on a split SQLite pool
    /// (SQLite has one writer). A plain lease takes a reader connection.
    pub(crate) fn write_lane(&self) -> LaneKind {
        if self.lanes.len() > 1 {
            LaneKind::Writer
        } else {
            LaneKind::Main
        }
    }
}

pub(crate) fn sync_needs_sqlite(backend: &str) -> Error {
    Error::invalid_argument(format!(
        "querySync/executeSync are for SQLite pools (this pool is {backend}): a network round trip would block the event loop; use query/execute"
    ))
}

/// Callers counted as waiting for a connection; uncounted on drop.
pub(crate) struct Waiting<'a> {
    waiters: &'a AtomicUsize,
    callers: usize,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.waiters.fetch_sub(self.callers, Ordering::Relaxed);
    }
}

/// A connection pool. Cheap to clone; every clone is the same pool.
#[derive(Clone)]
pub struct Pool {
    shared: Arc<PoolShared>,
}

/// Most statements one calling-thread group carries ([`Pool::try_inline_group`],
/// [`Pool::try_inline_reads`]).
pub const MAX_GROUP: usize = 64;

/// What a calling-thread group holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Together {
    /// Writes committed together.
    Writes,
    /// Reads in one read transaction.
    Reads,
}

impl Pool {
    /// Builds the pool, warms `minIdle` connections in the background and starts maintenance.
    /// `runtime` runs background work; it must be a multi-threaded tokio runtime.
    pub fn new(config: PoolConfig, registry: Arc<Registry>, runtime: Handle) -> Result<Pool> {
        let config = Arc::new(config);
        let recorder = registry.register_pool(&config.name, config.target.backend());
        let (memory, anchor) = match config.target {
            Target::SqliteMemory => {
                let target = SqliteTarget::memory();
                let anchor = sqlite::MemoryDatabase::create(&target, config.acquire_timeout)?;
                (Some(target), Some(anchor))
            }
            _ => (None, None),
        };
        let profiles = profile::Profiles::new();
        let connector = Arc::new(Connector::new(
            Arc::clone(&config),
            Arc::clone(&recorder),
            memory,
            Arc::clone(&profiles),
        )?);
        // SQLite: one writer connection, the rest readers.
        let split = config.target.backend() == "sqlite" && config.max_size > 1;
        let sizes: Vec<(usize, usize)> = if split {
            vec![
                (config.max_size - 1, config.min_idle.saturating_sub(1)),
                (1, config.min_idle.min(1)),
            ]
        } else {
            vec![(config.max_size, config.min_idle)]
        };
        let lanes = sizes
            .into_iter()
            .map(|(max_size, min_idle)| Lane {
                inventory: Inventory::new(
                    Arc::clone(&connector),
                    Arc::clone(&config),
                    Arc::clone(&recorder),
                    runtime.clone(),
                    max_size,
                    min_idle,
                ),
                queue: Mutex::new(dispatch::Queue::default()),
            })
            .collect();
        let shared = Arc::new(PoolShared {
            lanes,
            profiles,
            config,
            recorder: Arc::clone(&recorder),
            registry,
            closed: AtomicBool::new(false),
            waiters: AtomicUsize::new(0),
            peak_in_use: AtomicUsize::new(0),
            group_cap: AtomicUsize::new(MAX_GROUP),
            runtime: runtime.clone(),
            hub: std::sync::OnceLock::new(),
            _memory_anchor: Mutex::new(anchor),
            connector,
        });
        let weak = Arc::downgrade(&shared);
        recorder.set_gauges(move || weak.upgrade().map(|s| Pool { shared: s }.gauges()));
        runtime.spawn(maintain(Arc::downgrade(&shared)));
        Ok(Pool { shared })
    }

    pub fn name(&self) -> &str {
        &self.shared.recorder.name
    }

    pub fn config(&self) -> &PoolConfig {
        &self.shared.config
    }

    pub fn recorder(&self) -> &Arc<PoolRecorder> {
        &self.shared.recorder
    }

    pub fn is_closed(&self) -> bool {
        self.shared.is_closed()
    }

    /// True when a new caller would wait behind `maxWaiting` others. Callers that a free
    /// slot will serve (a connection still to be opened) are not counted as waiting.
    pub(crate) fn queue_full(&self, queued: usize, occ: &inventory::Occupancy) -> bool {
        // `waiters` counts every lane's; fine as a bound on the whole pool's queue.
        let s = &self.shared;
        if occ.idle > 0 {
            return false;
        }
        let free_slots = occ.max_size.saturating_sub(occ.open + occ.opening);
        s.waiters.load(Ordering::Relaxed) + queued >= s.config.max_waiting + free_slots
    }

    pub(crate) fn closed_error(&self) -> Error {
        Error::new(
            ErrorCode::PoolClosed,
            format!("pool '{}' is closed", self.name()),
        )
    }

    /// Checks out a connection within `acquireTimeoutMs` (wait + connect + validate).
    /// `stack` is the caller's stack, kept for the leak report when leak detection is on.
    /// On a split SQLite pool a lease is a reader connection (writes on it wait for the
    /// writer's lock); `transaction()` leases the writer ([`acquire_for_write`]).
    ///
    /// [`acquire_for_write`]: Self::acquire_for_write
    pub async fn acquire(&self, stack: Option<String>) -> Result<Lease> {
        if let Some(lease) = self.take_writer_when_readers_are_busy(&stack) {
            return Ok(lease);
        }
        self.acquire_in(LaneKind::Main, stack).await
    }

    /// A split SQLite pool lends its writer as a lease only when every reader is taken, so
    /// `maxSize` leases can be out at once.
    fn take_writer_when_readers_are_busy(&self, stack: &Option<String>) -> Option<Lease> {
        let s = &self.shared;
        if s.lanes.len() < 2 || self.is_closed() {
            return None;
        }
        let readers = s.lanes[0].inventory.occupancy();
        if readers.idle > 0 || readers.open + readers.opening < readers.max_size {
            return None;
        }
        let started = Instant::now();
        // A local SQLite connection needs no validation ping.
        let conn = self.idle_connection(LaneKind::Writer, false)?;
        s.recorder.gets.inc();
        Some(self.lease(LaneKind::Writer, conn, started, stack.clone()))
    }

    /// A lease of the connection writes go through (the writer on a split SQLite pool).
    pub async fn acquire_for_write(&self, stack: Option<String>, bounds: &Bounds) -> Result<Lease> {
        self.acquire_within_lane(self.shared.write_lane(), stack, bounds)
            .await
    }

    pub(crate) async fn acquire_in(&self, kind: LaneKind, stack: Option<String>) -> Result<Lease> {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        let s = &self.shared;
        let lane = s.lane(kind);
        s.recorder.gets.inc();
        let started = Instant::now();
        let queued = lane.queue.lock().len();
        if self.queue_full(queued, &lane.inventory.occupancy()) {
            s.recorder.rejected.inc();
            return Err(self.exhausted_error());
        }
        let _waiting = self.waiting(1);
        self.checkout(kind, started, started + s.config.acquire_timeout, stack)
            .await
    }

    /// Counts `callers` as waiting for a connection (for `maxWaiting` and `status().waiting`)
    /// until the guard is dropped.
    pub(crate) fn waiting(&self, callers: usize) -> Waiting<'_> {
        self.shared.waiters.fetch_add(callers, Ordering::Relaxed);
        Waiting {
            waiters: &self.shared.waiters,
            callers,
        }
    }

    /// Checks out a connection for a caller that started waiting at `started`, by `deadline`.
    /// Counts one successful get (or one timeout); the caller counts the attempt.
    async fn checkout(
        &self,
        kind: LaneKind,
        started: Instant,
        deadline: Instant,
        stack: Option<String>,
    ) -> Result<Lease> {
        let inventory = &self.shared.lane(kind).inventory;
        let conn = Box::pin(inventory.checkout(deadline)).await?;
        Ok(self.lease(kind, conn, started, stack))
    }

    /// A connection that is idle right now, or `None`; never waits, connects or pings.
    pub fn try_acquire(&self, stack: Option<String>) -> Result<Option<Lease>> {
        self.take_idle(stack, false)
    }

    /// An idle connection used within the validation grace period (so it needs no ping),
    /// or `None`: the synchronous fast path of `acquire`. Never waits, connects or pings.
    pub fn try_acquire_validated(&self, stack: Option<String>) -> Result<Option<Lease>> {
        self.take_idle(stack, true)
    }

    /// [`try_acquire_validated`](Self::try_acquire_validated) of the connection writes go
    /// through (a transaction's), when no write is queued or waiting for it ahead.
    pub fn try_acquire_for_write_validated(&self, stack: Option<String>) -> Result<Option<Lease>> {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        let s = &self.shared;
        let kind = s.write_lane();
        let lane = s.lane(kind);
        if lane.queue.lock().len() > 0 || lane.inventory.occupancy().waiters > 0 {
            return Ok(None);
        }
        let started = Instant::now();
        let Some(conn) = self.idle_connection(kind, true) else {
            return Ok(None);
        };
        s.recorder.gets.inc();
        Ok(Some(self.lease(kind, conn, started, stack)))
    }

    fn take_idle(&self, stack: Option<String>, recently_used: bool) -> Result<Option<Lease>> {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        let s = &self.shared;
        if let Some(lease) = self.take_writer_when_readers_are_busy(&stack) {
            return Ok(Some(lease));
        }
        let kind = LaneKind::Main;
        let started = Instant::now();
        let Some(conn) = self.idle_connection(kind, recently_used) else {
            return Ok(None);
        };
        s.recorder.gets.inc();
        Ok(Some(self.lease(kind, conn, started, stack)))
    }

    /// An idle connection of `kind` right now; with `recently_used`, only one that needs no
    /// validation ping. Never waits.
    pub(crate) fn idle_connection(
        &self,
        kind: LaneKind,
        recently_used: bool,
    ) -> Option<Box<Connection>> {
        let inventory = &self.shared.lane(kind).inventory;
        let conn = inventory.take_idle()?;
        if recently_used && conn.last_checked.elapsed() >= VALIDATION_GRACE {
            // Idle too long to hand out unchecked: back untouched, for a validated checkout.
            inventory.give_back(conn);
            return None;
        }
        Some(conn)
    }

    fn lease(
        &self,
        kind: LaneKind,
        conn: Box<Connection>,
        started: Instant,
        stack: Option<String>,
    ) -> Lease {
        let s = &self.shared;
        s.recorder.successful_gets.inc();
        s.recorder.acquire_latency.record(started.elapsed());
        let occ = s.lane(kind).inventory.occupancy();
        s.peak_in_use
            .fetch_max(occ.open.saturating_sub(occ.idle), Ordering::Relaxed);
        let tracking = (!s.config.leak_detection.is_zero()).then(|| {
            s.registry.live.track(LiveResource {
                kind: "lease",
                name: self.name().to_string(),
                acquired_at: Instant::now(),
                threshold: s.config.leak_detection,
                stack,
            })
        });
        Lease::new(conn, Arc::clone(s), kind, tracking)
    }

    /// Checks out a connection, runs one operation and returns the connection. A statement
    /// that provably never reached the server (its connection was found lost before any of
    /// it was written) is run on another connection; one that may have run never is.
    pub async fn run(&self, op: &Operation<'_>) -> Result<Outcome> {
        self.run_within(op, &Bounds::default()).await
    }

    /// [`run`](Self::run) within `bounds`: the wait for a connection and the statement.
    pub async fn run_within(&self, op: &Operation<'_>, bounds: &Bounds) -> Result<Outcome> {
        let mut retry = self.never_sent_retries();
        let kind = self.shared.lane_for(op);
        loop {
            let lease = self.acquire_within_lane(kind, None, bounds).await?;
            let result = Box::pin(lease.connection()?.run_within(op, bounds)).await;
            match result {
                // Each try discards one dead connection; after a server restart every idle
                // one may be dead, so keep going within the acquire deadline.
                Err(e) if e.never_sent() && retry.again() => {}
                other => return other,
            }
        }
    }

    pub(crate) fn never_sent_retries(&self) -> Retries {
        Retries::new(&self.shared)
    }

    /// [`acquire`](Self::acquire) that gives up when `bounds` fire: the waiter leaves the
    /// queue and nothing is sent.
    pub async fn acquire_within(&self, stack: Option<String>, bounds: &Bounds) -> Result<Lease> {
        self.acquire_within_lane(LaneKind::Main, stack, bounds)
            .await
    }

    pub(crate) async fn acquire_within_lane(
        &self,
        kind: LaneKind,
        stack: Option<String>,
        bounds: &Bounds,
    ) -> Result<Lease> {
        if !bounds.is_set() {
            if kind == LaneKind::Main {
                return self.acquire(stack).await;
            }
            return self.acquire_in(kind, stack).await;
        }
        if let Some(fired) = bounds.check() {
            return Err(bounds.error(fired, "before it was sent").with_sent(false));
        }
        let acquire = Box::pin(self.acquire_in(kind, stack));
        tokio::select! {
            biased;
            lease = acquire => lease,
            fired = bounds.fired() => Err(bounds
                .error(fired, "waiting for a connection; it was never sent")
                .with_sent(false)),
        }
    }

    /// SQLite: runs a statement known to be cheap on the calling thread, on a connection
    /// idle right now, when nothing is queued ahead of it — no thread hop. Cut off at
    /// [`profile::INLINE_LIMIT`] (and then marked too slow for this path). `None`: use the
    /// queue.
    pub fn try_inline(&self, statement: &Statement) -> Option<Result<Outcome>> {
        let s = &self.shared;
        if self.is_closed() || s.config.target.backend() != "sqlite" || !statement.can_pipeline() {
            return None;
        }
        let (Statement::Query(sql, _) | Statement::Execute(sql, _)) = statement else {
            return None;
        };
        let profile = s.profiles.get(sql)?;
        if !profile.is_cheap(s.config.inline_max) {
            return None;
        }
        let op = statement.borrow();
        let kind = match (s.lanes.len(), profile.read_only) {
            (1, _) => LaneKind::Main,
            (_, Some(true)) => LaneKind::Main,
            _ => LaneKind::Writer,
        };
        if s.lane(kind).queue.lock().len() > 0 {
            return None;
        }
        let conn = self.idle_connection(kind, true)?;
        let (outcome, started, ended) = conn.run_now_timed(&op, Some(profile::INLINE_LIMIT));
        self.give_back_at(kind, conn, ended);
        let took = ended - started;
        match outcome {
            Some(done) => {
                s.recorder.gets.inc();
                s.recorder.successful_gets.inc();
                s.recorder.inline_statements.inc();
                // A write not cut off (see `SqliteConnection::run_now`) that overran the bound
                // runs off the thread from now on.
                if took >= profile::INLINE_LIMIT {
                    s.profiles.mark_slow(sql);
                }
                Some(done)
            }
            None => {
                s.profiles.given_up(sql, took);
                None
            }
        }
    }

    /// SQLite: runs writes issued together (`execute` calls in one turn of the event loop) as
    /// one transaction on the calling thread, when each is a plain cheap INSERT, UPDATE,
    /// DELETE or REPLACE, the writer connection is idle and nothing is queued for it: one
    /// commit instead of one each. See [`try_inline_together`](Self::try_inline_together).
    pub fn try_inline_group(
        &self,
        statements: &[Statement],
    ) -> Option<Vec<Option<Result<Outcome>>>> {
        self.try_inline_together(statements, Together::Writes)
    }

    /// SQLite: runs reads issued together (`query` calls in one turn of the event loop) in
    /// one read transaction on the calling thread, when each is known to be cheap and
    /// read-only, a reader is idle and nothing is queued for it: one snapshot and one lock
    /// round instead of one each. See [`try_inline_together`](Self::try_inline_together).
    pub fn try_inline_reads(
        &self,
        statements: &[Statement],
    ) -> Option<Vec<Option<Result<Outcome>>>> {
        self.try_inline_together(statements, Together::Reads)
    }

    /// [`try_inline_group`](Self::try_inline_group) / [`try_inline_reads`](Self::try_inline_reads):
    /// the first statements, up to the current cap (at most [`MAX_GROUP`]), run as one group
    /// on the calling thread within [`profile::INLINE_LIMIT`]; `None` in an entry: not taken
    /// (send it on its own). `None` for all: nothing ran. A group cut off at the limit halves
    /// the cap instead of marking its statements slow (each is cheap on its own).
    fn try_inline_together(
        &self,
        statements: &[Statement],
        together: Together,
    ) -> Option<Vec<Option<Result<Outcome>>>> {
        let s = &self.shared;
        let taken = statements.len().min(s.group_cap.load(Ordering::Relaxed));
        if self.is_closed()
            || s.config.target.backend() != "sqlite"
            || !(2..=MAX_GROUP).contains(&taken)
        {
            return None;
        }
        let mut items = Vec::with_capacity(taken);
        for statement in &statements[..taken] {
            let (sql, params, fits) = match (together, statement) {
                (Together::Writes, Statement::Execute(sql, params)) => {
                    (sql, params, statement.can_group())
                }
                (Together::Reads, Statement::Query(sql, params)) => {
                    (sql, params, statement.can_pipeline())
                }
                _ => return None,
            };
            let profile = s.profiles.get(sql)?;
            let read_only = together == Together::Reads;
            if !fits
                || !profile.is_cheap(s.config.inline_max)
                || (read_only && profile.read_only != Some(true))
            {
                return None;
            }
            items.push((sql.as_str(), params.as_slice()));
        }
        let kind = match together {
            Together::Writes => s.write_lane(),
            Together::Reads => LaneKind::Main,
        };
        if s.lane(kind).queue.lock().len() > 0 {
            return None;
        }
        let conn = self.idle_connection(kind, true)?;
        let tried = Instant::now();
        let outcomes = conn.run_together_now(&items, profile::INLINE_LIMIT, together);
        self.give_back(kind, conn);
        let tried = tried.elapsed();
        let Some(outcomes) = outcomes else {
            if tried >= profile::INLINE_LIMIT {
                s.group_cap.store((taken / 2).max(2), Ordering::Relaxed);
            }
            return None;
        };
        if tried < profile::INLINE_LIMIT / 4 && taken == s.group_cap.load(Ordering::Relaxed) {
            s.group_cap
                .store((taken + 1).min(MAX_GROUP), Ordering::Relaxed);
        }
        let n = taken as u64;
        s.recorder.gets.add(n);
        s.recorder.successful_gets.add(n);
        s.recorder.inline_statements.add(n);
        let mut all: Vec<Option<Result<Outcome>>> = outcomes.into_iter().map(Some).collect();
        all.resize_with(statements.len(), || None);
        Some(all)
    }

    /// SQLite: runs a statement on the calling thread and returns its outcome
    /// (`querySync` / `executeSync`). Waits at most `acquireTimeoutMs` for a connection.
    pub fn run_sync(&self, op: &Operation<'_>) -> Result<Outcome> {
        let s = &self.shared;
        if self.is_closed() {
            return Err(self.closed_error());
        }
        if s.config.target.backend() != "sqlite" {
            return Err(sync_needs_sqlite(s.config.target.backend()));
        }
        let kind = if op.can_pipeline() {
            s.lane_for(op)
        } else {
            s.write_lane()
        };
        s.recorder.gets.inc();
        let conn = match self.idle_connection(kind, false) {
            Some(conn) => conn,
            None => {
                // Connections come back from the runtime's threads; none needs this thread.
                let _runtime = s.runtime.enter();
                let deadline = Instant::now() + s.config.acquire_timeout;
                futures::executor::block_on(s.lane(kind).inventory.checkout(deadline))?
            }
        };
        s.recorder.successful_gets.inc();
        let (outcome, _, ended) = conn.run_now_timed(op, None);
        self.give_back_at(kind, conn, ended);
        s.recorder.inline_statements.inc();
        outcome.unwrap_or_else(|| Err(Error::internal("statement was not run")))
    }

    /// Returns a connection taken outside a lease (the calling-thread paths).
    fn give_back(&self, kind: LaneKind, conn: Box<Connection>) {
        self.give_back_at(kind, conn, Instant::now());
    }

    /// [`give_back`](Self::give_back) of a connection last used at `now`.
    fn give_back_at(&self, kind: LaneKind, mut conn: Box<Connection>, now: Instant) {
        let inventory = &self.shared.lane(kind).inventory;
        if conn.is_unusable() || conn.needs_reset() {
            inventory.discard(conn);
            return;
        }
        conn.last_returned = now;
        conn.last_checked = now;
        inventory.give_back(conn);
    }

    pub async fn query(&self, sql: &str, params: &[Value]) -> Result<QueryResult> {
        self.run(&Operation::Query(sql, params))
            .await
            .map(Outcome::into_rows)
    }

    pub async fn execute(&self, sql: &str, params: &[Value]) -> Result<ExecuteResult> {
        match self.run(&Operation::Execute(sql, params)).await? {
            Outcome::Done(done) => Ok(done),
            other => Err(Error::internal(format!("execute produced {other:?}"))),
        }
    }

    /// Every lane's connections added up.
    fn occupancy(&self) -> inventory::Occupancy {
        let mut total = inventory::Occupancy::default();
        for lane in &self.shared.lanes {
            let o = lane.inventory.occupancy();
            total.max_size += o.max_size;
            total.open += o.open;
            total.idle += o.idle;
            total.opening += o.opening;
            total.waiters += o.waiters;
        }
        total
    }

    fn queued(&self) -> usize {
        self.shared.lanes.iter().map(|l| l.queue.lock().len()).sum()
    }

    fn gauges(&self) -> PoolGauges {
        let occ = self.occupancy();
        PoolGauges {
            max_size: if self.is_closed() {
                0
            } else {
                occ.max_size as u64
            },
            size: occ.open as u64,
            idle: occ.idle as u64,
            in_use: occ.open.saturating_sub(occ.idle) as u64,
            waiting: (self.shared.waiters.load(Ordering::Relaxed) + self.queued()) as u64,
        }
    }

    pub fn status(&self) -> PoolStatus {
        let g = self.gauges();
        PoolStatus {
            max_size: g.max_size,
            size: g.size,
            idle: g.idle,
            in_use: g.in_use,
            waiting: g.waiting,
            hosts: self.shared.lanes[0].inventory.hosts(),
        }
    }

    pub fn metrics(&self) -> PoolMetrics {
        PoolMetrics::from_recorder(&self.shared.recorder, self.gauges())
    }

    pub fn health(&self) -> PoolHealth {
        PoolHealth::assess(&self.metrics(), self.is_closed())
    }

    pub fn recommendations(&self) -> Vec<Recommendation> {
        health::recommend(
            &self.metrics(),
            self.shared.peak_in_use.load(Ordering::Relaxed) as u64,
            &self.shared.config,
        )
    }

    /// Leases of this pool held longer than `leakDetectionMs`, oldest first.
    pub fn overdue_leases(&self) -> Vec<LiveResource> {
        self.shared
            .registry
            .live
            .overdue(Instant::now())
            .into_iter()
            .filter(|r| r.kind == "lease" && r.name == self.name())
            .collect()
    }

    /// Changes `maxSize`; excess idle connections close at once, busy ones when returned.
    pub fn resize(&self, max_size: usize) -> Result<()> {
        if !(1..=config::MAX_POOL_SIZE).contains(&max_size) {
            return Err(Error::invalid_argument(format!(
                "maxSize must be an integer in 1..={} (got {max_size})",
                config::MAX_POOL_SIZE
            )));
        }
        if self.is_closed() {
            return Err(self.closed_error());
        }
        match self.shared.lanes.as_slice() {
            // A split SQLite pool keeps its one writer; the readers take the rest.
            [readers, _writer] => readers.inventory.resize(max_size.saturating_sub(1).max(1)),
            lanes => lanes[0].inventory.resize(max_size),
        }
        Ok(())
    }

    /// From now on every call fails with `POOL_CLOSED`; work already queued is still served.
    /// `close` does this first; call it directly to refuse work before the drain is awaited.
    pub fn refuse_new_work(&self) {
        self.shared.closed.store(true, Ordering::Release);
    }

    /// Stops new work, lets queued and running work finish within `timeout` (connections
    /// returned meanwhile serve the queue), then closes every connection. Leases still out
    /// are closed when they come back.
    pub async fn close(&self, timeout: Duration) -> Result<()> {
        self.refuse_new_work();
        let deadline = Instant::now() + timeout;
        loop {
            let g = self.gauges();
            if (g.in_use == 0 && g.waiting == 0) || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for lane in &self.shared.lanes {
            lane.inventory.close();
        }
        if let Some(hub) = self.shared.hub.get() {
            hub.close();
        }
        self.shared.connector.close();
        self.shared._memory_anchor.lock().take();
        Ok(())
    }
}

impl Pool {
    /// Subscribes `sink` to `topic` on the pool's listening connection. Resolves once the
    /// subscription is in effect; `sink` then gets `Listening` after every (re)connect and
    /// each message, in order, until [`unlisten`](Self::unlisten).
    pub async fn listen(&self, topic: listen::Topic, sink: listen::Sink) -> Result<u64> {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        listen::check_topic(&topic, self.config().target.backend())?;
        if let Target::RedisCluster { .. } = self.config().target {
            return Err(Error::invalid_argument(
                "listen/notify are not available on a Redis Cluster pool; use a pool on one node",
            ));
        }
        let shared = &self.shared;
        let hub = shared
            .hub
            .get_or_init(|| listen::Hub::new(Arc::downgrade(shared)));
        let deadline = Instant::now() + shared.config.acquire_timeout;
        let (id, ready) = hub.subscribe(topic, sink, deadline);
        match ready.await {
            Ok(Ok(())) => Ok(id),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(self.closed_error()),
        }
    }

    pub fn unlisten(&self, id: u64) {
        if let Some(hub) = self.shared.hub.get() {
            hub.unsubscribe(id);
        }
    }
}

impl Shareable for Pool {
    type Weak = Weak<PoolShared>;

    fn downgrade(&self) -> Self::Weak {
        Arc::downgrade(&self.shared)
    }

    fn upgrade(weak: &Self::Weak) -> Option<Self> {
        weak.upgrade().map(|shared| Pool { shared })
    }

    fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    fn is_usable(&self) -> bool {
        !self.is_closed()
    }
}

/// Pools shared by name, with the options (and the metrics registry) they were made with.
static SHARED_POOLS: Directory<Pool, (PoolOptions, usize)> = Directory::new("pool");

/// One holder's claim on a pool shared by name across the process's `worker_threads`.
/// The pool closes when its last claim is released (or every holder is gone).
pub struct SharedPool {
    pool: Pool,
    name: String,
    released: AtomicBool,
}

impl SharedPool {
    /// The pool shared as `options.name`, built from `options` if none is open. Asking for
    /// an open one with other options (or another registry) is `INVALID_ARGUMENT`.
    pub fn claim(options: PoolOptions, registry: Arc<Registry>, runtime: Handle) -> Result<Self> {
        let name = options
            .name
            .clone()
            .ok_or_else(|| Error::invalid_argument("a shared pool needs options.name"))?;
        let settings = (options.clone(), Arc::as_ptr(&registry) as usize);
        let claimed = SHARED_POOLS.claim(&name, settings, || {
            Pool::new(PoolConfig::from_options(options)?, registry, runtime)
        })?;
        Ok(SharedPool {
            pool: claimed.object,
            name,
            released: AtomicBool::new(false),
        })
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn is_released(&self) -> bool {
        self.released.load(Ordering::Acquire)
    }

    /// Lets go of this claim (once). True when it was the last: the caller closes the pool.
    pub fn release(&self) -> bool {
        !self.released.swap(true, Ordering::AcqRel) && SHARED_POOLS.release(&self.name, &self.pool)
    }
}

impl Drop for SharedPool {
    fn drop(&mut self) {
        // A collected holder: the pool itself goes when its last `Pool` clone does.
        self.release();
    }
}

/// Background upkeep: retire idle and over-age connections, ping idle ones, keep `minIdle`
/// warm. Holds only a weak reference, so a dropped pool ends it.
async fn maintain(pool: Weak<PoolShared>) {
    let tick = match pool.upgrade() {
        Some(s) => maintenance_tick(&s.config),
        None => return,
    };
    let mut last_keepalive = Instant::now();
    loop {
        let Some(shared) = pool.upgrade() else { return };
        if shared.is_closed() {
            return;
        }
        retire(&shared);
        let keepalive = shared.config.keepalive;
        if !keepalive.is_zero() && last_keepalive.elapsed() >= keepalive / 2 {
            ping_idle(&shared, keepalive).await;
            last_keepalive = Instant::now();
        }
        // Keeps `minIdle` open (one connect at a time) and replaces retired connections.
        for lane in &shared.lanes {
            lane.inventory.open_if_needed();
        }
        drop(shared);
        tokio::time::sleep(tick).await;
    }
}

fn maintenance_tick(config: &PoolConfig) -> Duration {
    [config.idle_timeout, config.max_lifetime, config.keepalive]
        .into_iter()
        .filter(|d| !d.is_zero())
        .map(|d| d / 4)
        .min()
        .unwrap_or(Duration::from_secs(30))
        .clamp(Duration::from_millis(20), Duration::from_secs(30))
}

fn retire(shared: &PoolShared) {
    let config = &shared.config;
    for lane in &shared.lanes {
        let removed = lane.inventory.retire(|conn| {
            !config.idle_timeout.is_zero() && conn.last_returned.elapsed() >= config.idle_timeout
        });
        shared.recorder.recycled.add(removed as u64);
    }
}

/// Pings idle connections not heard from in `keepalive / 2`, one at a time, so a pool of
/// idle connections never has them all out at once.
async fn ping_idle(shared: &Arc<PoolShared>, keepalive: Duration) {
    for lane in &shared.lanes {
        ping_lane(shared, &lane.inventory, keepalive).await;
    }
}

async fn ping_lane(shared: &PoolShared, inventory: &Arc<Inventory>, keepalive: Duration) {
    let count = inventory.occupancy().idle;
    for _ in 0..count {
        let Some(mut conn) = inventory.take_for_ping(keepalive / 2) else {
            return;
        };
        let answered = tokio::time::timeout(shared.config.connect_timeout, conn.ping())
            .await
            .is_ok_and(|r| r.is_ok());
        if answered {
            conn.last_checked = Instant::now();
        }
        inventory.after_ping(conn, answered);
    }
}
