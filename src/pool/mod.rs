//! Connection pools for PostgreSQL, SQLite and Redis on deadpool: one acquire deadline,
//! validation on checkout, background retirement and keepalive, clean return of every lease.

pub mod config;
pub mod connection;
pub mod dispatch;
pub mod health;
pub mod lease;
pub mod manager;
pub mod postgres;
pub mod redis;
pub mod sqlite;
pub mod tls;
pub mod value;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use deadpool::managed::{Object, PoolError, TimeoutType, Timeouts};
use deadpool::Runtime;
use futures::FutureExt;
use parking_lot::Mutex;
use tokio::runtime::Handle;

pub use config::{PoolConfig, PoolOptions, Target};
pub use connection::{Connection, Operation, Outcome, Statement};
pub use dispatch::Done;
pub use health::{PoolHealth, PoolMetrics, PoolStatus, Recommendation};
pub use lease::Lease;
pub use value::{ExecuteResult, QueryResult, Value};

use crate::error::{Error, ErrorCode, Phase, Result};
use crate::metrics::{LiveResource, PoolGauges, PoolRecorder, Registry};
use crate::shared::{Directory, Shareable};
use manager::{AcquireContext, Manager, ACQUIRE};
use sqlite::SqliteTarget;

type Inner = deadpool::managed::Pool<Manager>;

/// State shared by the pool and every lease it hands out.
pub(crate) struct PoolShared {
    pool: Inner,
    pub(crate) config: Arc<PoolConfig>,
    pub(crate) recorder: Arc<PoolRecorder>,
    registry: Arc<Registry>,
    closed: AtomicBool,
    waiters: AtomicUsize,
    peak_in_use: AtomicUsize,
    pub(crate) runtime: Handle,
    /// Statements queued by `submit`, served in batches by dispatcher tasks.
    queue: Mutex<dispatch::Queue>,
    /// Keeps a `sqlite::memory:` database alive while the pool lives.
    _memory_anchor: Mutex<Option<rusqlite::Connection>>,
}

impl PoolShared {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
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

impl Pool {
    /// Builds the pool, warms `minIdle` connections in the background and starts maintenance.
    /// `runtime` runs background work; it must be a multi-threaded tokio runtime.
    pub fn new(config: PoolConfig, registry: Arc<Registry>, runtime: Handle) -> Result<Pool> {
        let config = Arc::new(config);
        let recorder = registry.register_pool(&config.name, config.target.backend());
        let (memory, anchor) = match config.target {
            Target::SqliteMemory => {
                let target = SqliteTarget::memory();
                let anchor = sqlite::open(&target, config.acquire_timeout, false)?;
                (Some(target), Some(anchor))
            }
            _ => (None, None),
        };
        let manager = Manager::new(Arc::clone(&config), Arc::clone(&recorder), memory)?;
        let pool = Inner::builder(manager)
            .max_size(config.max_size)
            .runtime(Runtime::Tokio1)
            .queue_mode(deadpool::managed::QueueMode::Lifo)
            .build()
            .map_err(|e| Error::internal(format!("pool could not be built: {e}")))?;
        let shared = Arc::new(PoolShared {
            pool,
            config,
            recorder: Arc::clone(&recorder),
            registry,
            closed: AtomicBool::new(false),
            waiters: AtomicUsize::new(0),
            peak_in_use: AtomicUsize::new(0),
            runtime: runtime.clone(),
            queue: Mutex::new(dispatch::Queue::default()),
            _memory_anchor: Mutex::new(anchor),
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
    pub(crate) fn queue_full(&self, queued: usize, st: &deadpool::Status) -> bool {
        let s = &self.shared;
        if st.available > 0 {
            return false;
        }
        let free_slots = st.max_size.saturating_sub(st.size);
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
    pub async fn acquire(&self, stack: Option<String>) -> Result<Lease> {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        let s = &self.shared;
        s.recorder.gets.inc();
        let started = Instant::now();
        let queued = s.queue.lock().len();
        if self.queue_full(queued, &s.pool.status()) {
            s.recorder.rejected.inc();
            return Err(self.exhausted_error());
        }
        let _waiting = self.waiting(1);
        self.checkout(started, started + s.config.acquire_timeout, stack)
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
        started: Instant,
        deadline: Instant,
        stack: Option<String>,
    ) -> Result<Lease> {
        let s = &self.shared;
        let ctx = AcquireContext::new(deadline, false);
        let budget = Some(deadline.saturating_duration_since(Instant::now()));
        let timeouts = Timeouts {
            wait: budget,
            create: budget,
            recycle: budget,
        };
        // Boxed: the connect path makes this future several KB, and callers move theirs around.
        let get = Box::pin(ACQUIRE.scope(Arc::clone(&ctx), s.pool.timeout_get(&timeouts)));
        let outcome = tokio::time::timeout_at(deadline.into(), get).await;
        let result = match outcome {
            Ok(Ok(object)) => Ok(object),
            Ok(Err(PoolError::Timeout(t))) => Err(self.timeout_error(match t {
                TimeoutType::Wait => Phase::Wait,
                TimeoutType::Create => Phase::Connect,
                TimeoutType::Recycle => Phase::Validate,
            })),
            Ok(Err(PoolError::Backend(e))) => Err(e),
            Ok(Err(PoolError::Closed)) => Err(self.closed_error()),
            Ok(Err(other)) => Err(Error::internal(format!("pool error: {other}"))),
            Err(_) => Err(self.timeout_error(ctx.phase())),
        };
        let object = result?;
        Ok(self.lease(object, started, stack))
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

    fn take_idle(&self, stack: Option<String>, recently_used: bool) -> Result<Option<Lease>> {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        let s = &self.shared;
        if s.pool.status().available == 0 {
            return Ok(None);
        }
        let started = Instant::now();
        let _runtime = s.runtime.enter();
        let ctx = AcquireContext::new(started + s.config.acquire_timeout, true);
        // Zero wait takes deadpool's non-blocking path; no recycle timeout (recycle does not
        // await when validation is skipped), so no timer is armed.
        let no_wait = Timeouts {
            wait: Some(Duration::ZERO),
            create: Some(Duration::ZERO),
            recycle: None,
        };
        match ACQUIRE
            .scope(ctx, s.pool.timeout_get(&no_wait))
            .now_or_never()
        {
            Some(Ok(object)) => {
                if recently_used && object.last_returned.elapsed() >= manager::VALIDATION_GRACE {
                    // Idle too long to hand out unchecked: back untouched, for a validated checkout.
                    drop(object);
                    return Ok(None);
                }
                s.recorder.gets.inc();
                Ok(Some(self.lease(object, started, stack)))
            }
            Some(Err(PoolError::Closed)) => Err(self.closed_error()),
            _ => Ok(None),
        }
    }

    fn lease(&self, object: Object<Manager>, started: Instant, stack: Option<String>) -> Lease {
        let s = &self.shared;
        s.recorder.successful_gets.inc();
        s.recorder.acquire_latency.record(started.elapsed());
        let reused = Object::metrics(&object).recycle_count > 0;
        let status = s.pool.status();
        s.peak_in_use.fetch_max(
            status.size.saturating_sub(status.available),
            Ordering::Relaxed,
        );
        let tracking = (!s.config.leak_detection.is_zero()).then(|| {
            s.registry.live.track(LiveResource {
                kind: "lease",
                name: self.name().to_string(),
                acquired_at: Instant::now(),
                threshold: s.config.leak_detection,
                stack,
            })
        });
        Lease::new(object, Arc::clone(s), reused, tracking)
    }

    pub(crate) fn timeout_error(&self, phase: Phase) -> Error {
        let s = &self.shared;
        match phase {
            Phase::Wait => s.recorder.timeouts_wait.inc(),
            Phase::Connect => s.recorder.timeouts_connect.inc(),
            Phase::Validate => s.recorder.timeouts_validate.inc(),
        }
        let g = self.gauges();
        let what = match phase {
            Phase::Wait => "waiting for a free connection",
            Phase::Connect => "opening a new connection",
            Phase::Validate => "validating an idle connection",
        };
        Error::new(
            ErrorCode::PoolTimeout,
            format!(
                "pool '{}' timed out after {} ms {what} ({} of {} in use, {} waiting); raise maxSize or acquireTimeoutMs, or shed load",
                self.name(),
                s.config.acquire_timeout.as_millis(),
                g.in_use,
                g.max_size,
                g.waiting
            ),
        )
        .with_phase(phase)
    }

    /// Checks out a connection, runs one operation and returns the connection. A connection
    /// found lost on its first statement is replaced and the operation tried once more.
    pub async fn run(&self, op: &Operation<'_>) -> Result<Outcome> {
        let lease = self.acquire(None).await?;
        let result = Box::pin(lease.connection()?.run(op)).await;
        if let Err(e) = &result {
            if connection::is_connection_lost(e) && lease.reused {
                drop(lease);
                let fresh = Box::pin(self.acquire(None)).await?;
                return Box::pin(fresh.connection()?.run(op)).await;
            }
        }
        result
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

    fn gauges(&self) -> PoolGauges {
        let st = self.shared.pool.status();
        PoolGauges {
            max_size: if self.is_closed() {
                0
            } else {
                st.max_size as u64
            },
            size: st.size as u64,
            idle: st.available as u64,
            in_use: st.size.saturating_sub(st.available) as u64,
            waiting: (self.shared.waiters.load(Ordering::Relaxed) + self.shared.queue.lock().len())
                as u64,
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
        self.shared.pool.resize(max_size);
        Ok(())
    }

    /// From now on every call fails with `POOL_CLOSED`; work already queued is still served.
    /// `close` does this first; call it directly to refuse work before the drain is awaited.
    pub fn refuse_new_work(&self) {
        self.shared.closed.store(true, Ordering::Release);
    }

    /// Stops new work, lets queued and running work finish within `timeout`, then closes
    /// every connection. Leases still out are closed when they come back.
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
        self.shared.pool.close();
        self.shared._memory_anchor.lock().take();
        Ok(())
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
        fill_min_idle(&shared).await;
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
    let mut remaining = shared.pool.status().size;
    let removed = shared.pool.retain(|conn, _| {
        let idle_too_long = !config.idle_timeout.is_zero()
            && conn.last_returned.elapsed() >= config.idle_timeout
            && remaining > config.min_idle;
        let retire = conn.is_expired() || conn.is_unusable() || idle_too_long;
        if retire {
            remaining -= 1;
        }
        !retire
    });
    shared.recorder.recycled.add(removed.removed.len() as u64);
}

async fn ping_idle(shared: &PoolShared, keepalive: Duration) {
    let idle = shared.pool.status().available;
    let no_wait = Timeouts {
        wait: Some(Duration::ZERO),
        create: Some(Duration::ZERO),
        recycle: Some(shared.config.connect_timeout),
    };
    let mut held = Vec::with_capacity(idle);
    for _ in 0..idle {
        // Checkout validates anything idle past the grace period, which is the ping.
        let ctx = AcquireContext::new(Instant::now() + shared.config.connect_timeout, false);
        match ACQUIRE.scope(ctx, shared.pool.timeout_get(&no_wait)).await {
            Ok(mut object) => {
                if object.last_returned.elapsed() >= keepalive / 2 {
                    object.last_returned = Instant::now();
                }
                held.push(object);
            }
            Err(_) => break,
        }
    }
}

async fn fill_min_idle(shared: &PoolShared) {
    let want = shared.config.min_idle;
    let status = shared.pool.status();
    if status.size >= want || shared.waiters.load(Ordering::Relaxed) > 0 {
        return;
    }
    let timeouts = Timeouts {
        wait: Some(Duration::ZERO),
        create: Some(shared.config.connect_timeout),
        recycle: Some(shared.config.connect_timeout),
    };
    // Checkouts take idle connections first, so ask for enough to open the missing ones.
    let missing = (want - status.size + status.available).min(status.max_size);
    let opened =
        futures::future::join_all((0..missing).map(|_| shared.pool.timeout_get(&timeouts))).await;
    drop(opened);
}
