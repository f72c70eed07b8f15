//! `query`/`execute`/`command` without a lease: statements queue here and dispatcher tasks
//! serve them in batches. A batch shares one checked-out connection, its statements in flight
//! together (pipelined on PostgreSQL and Redis), so one checkout and one wake-up serve many
//! statements. Statements that open or end a transaction never share a connection.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures::FutureExt;

use crate::error::{Error, ErrorCode, Phase, Result};
use crate::pool::connection::{Outcome, Statement};
use crate::pool::{Bounds, LaneKind, Pool, PoolShared, Waiting};

/// Called once with the statement's outcome, on a runtime thread.
pub type Done = Box<dyn FnOnce(Result<Outcome>) + Send>;

/// Most statements one connection carries in one batch.
const MAX_BATCH: usize = 64;

struct Job {
    statement: Statement,
    submitted: Instant,
    done: Done,
}

#[derive(Default)]
pub(crate) struct Queue {
    jobs: VecDeque<Job>,
    dispatchers: usize,
    reaper: bool,
}

impl Queue {
    pub(crate) fn len(&self) -> usize {
        self.jobs.len()
    }
}

impl Pool {
    /// Queues one statement; `done` receives its outcome. Never blocks the caller. A
    /// statement with bounds (a timeout or an abort signal) runs on a connection of its own,
    /// so stopping it can never touch another caller's statement.
    pub fn submit(&self, statement: Statement, bounds: Bounds, done: Done) {
        let s = &self.shared;
        if self.is_closed() {
            return done(Err(self.closed_error()));
        }
        if let Some(fired) = bounds.check() {
            return done(Err(bounds
                .error(fired, "before it was sent")
                .with_sent(false)));
        }
        // Slow statements (by their record) run alone too: never at the head of a pipeline
        // that fast statements join.
        let slow = match &statement {
            Statement::Query(sql, _) | Statement::Execute(sql, _) => {
                s.profiles.get(sql).is_some_and(|p| p.is_slow())
            }
            _ => false,
        };
        if !statement.can_pipeline() || bounds.is_set() || slow {
            let pool = self.clone();
            let pending = Pending::new(done);
            s.runtime.spawn(async move {
                pending.settle(pool.run_within(&statement.borrow(), &bounds).await)
            });
            return;
        }
        let kind = s.lane_for(&statement.borrow());
        let lane = s.lane(kind);
        let occupancy = lane.inventory.occupancy();
        let mut queue = lane.queue.lock();
        if self.queue_full(queue.jobs.len(), &occupancy) {
            drop(queue);
            s.recorder.gets.inc();
            s.recorder.rejected.inc();
            return done(Err(self.exhausted_error()));
        }
        queue.jobs.push_back(Job {
            statement,
            submitted: Instant::now(),
            done,
        });
        let max = occupancy.max_size.max(1);
        let start_dispatcher = queue.dispatchers < max && queue.dispatchers < queue.jobs.len();
        if start_dispatcher {
            queue.dispatchers += 1;
        }
        let start_reaper = !queue.reaper;
        queue.reaper = true;
        drop(queue);
        if start_dispatcher {
            s.runtime.spawn(dispatch(self.clone(), kind));
        }
        if start_reaper {
            s.runtime.spawn(reap(Arc::downgrade(&self.shared), kind));
        }
    }

    pub(crate) fn exhausted_error(&self) -> Error {
        Error::new(
            ErrorCode::PoolExhausted,
            format!(
                "pool '{}' has {} callers waiting already (maxWaiting); shed load or raise maxWaiting/maxSize",
                self.name(),
                self.shared.config.max_waiting
            ),
        )
    }
}

/// One dispatcher's claim on its lane's queue; given up when it ends, even by a panic.
struct Dispatcher<'a> {
    pool: &'a Pool,
    kind: LaneKind,
}

impl Drop for Dispatcher<'_> {
    fn drop(&mut self) {
        let mut queue = self.pool.shared.lane(self.kind).queue.lock();
        queue.dispatchers -= 1;
        let orphaned = !queue.jobs.is_empty() && queue.dispatchers == 0;
        if orphaned {
            // A dispatcher that panicked leaves work behind: hand it to a new one.
            queue.dispatchers += 1;
            drop(queue);
            self.pool
                .shared
                .runtime
                .spawn(dispatch(self.pool.clone(), self.kind));
        }
    }
}

/// Takes batches off the lane's queue until it is empty.
async fn dispatch(pool: Pool, kind: LaneKind) {
    let _claim = Dispatcher { pool: &pool, kind };
    loop {
        let (batch, waiting): (Vec<Job>, Waiting<'_>) = {
            let lane = pool.shared.lane(kind);
            let mut queue = lane.queue.lock();
            if queue.jobs.is_empty() {
                return;
            }
            // Spread the queue over every connection the lane may open.
            let connections = lane.inventory.occupancy().max_size.max(1);
            let take = queue.jobs.len().div_ceil(connections).clamp(1, MAX_BATCH);
            // Counted as waiting before the queue lock is let go: `maxWaiting` must never
            // see a statement in neither the queue nor the waiters.
            (queue.jobs.drain(..take).collect(), pool.waiting(take))
        };
        serve(&pool, kind, batch, waiting).await;
    }
}

/// A job's `done`, called exactly once: with the outcome, or with `INTERNAL` if serving it
/// panicked, so no caller waits forever.
pub(crate) struct Pending(Option<Done>);

impl Pending {
    pub(crate) fn new(done: Done) -> Pending {
        Pending(Some(done))
    }

    pub(crate) fn settle(mut self, outcome: Result<Outcome>) {
        if let Some(done) = self.0.take() {
            done(outcome);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(done) = self.0.take() {
            done(Err(Error::internal(
                "the statement's dispatcher failed unexpectedly (a bug); the statement may not have run",
            )));
        }
    }
}

async fn serve(pool: &Pool, kind: LaneKind, batch: Vec<Job>, waiting: Waiting<'_>) {
    let s = &pool.shared;
    let n = batch.len() as u64;
    s.recorder.gets.add(n);
    let oldest = batch[0].submitted;
    let submitted: Vec<Instant> = batch.iter().map(|j| j.submitted).collect();
    // `done` callbacks are Send but not Sync: keep them out of the futures that borrow.
    let (statements, pending): (Vec<Statement>, Vec<Pending>) = batch
        .into_iter()
        .map(|j| (j.statement, Pending::new(j.done)))
        .unzip();
    let checkout =
        Box::pin(pool.checkout(kind, oldest, oldest + s.config.acquire_timeout, None)).await;
    drop(waiting);
    let lease = match checkout {
        Ok(lease) => lease,
        Err(err) => {
            // `checkout` counted one failure; count the rest of the batch the same way.
            for _ in 1..n {
                count_failure(pool, &err);
            }
            for p in pending {
                p.settle(Err(err.clone()));
            }
            return;
        }
    };
    let picked = Instant::now();
    s.recorder.successful_gets.add(n - 1);
    for at in &submitted[1..] {
        s.recorder
            .acquire_latency
            .record(picked.saturating_duration_since(*at));
    }
    let results = {
        let conn = match lease.connection() {
            Ok(c) => c,
            Err(e) => {
                for p in pending {
                    p.settle(Err(e.clone()));
                }
                return;
            }
        };
        // SQLite writes queued together commit together (one transaction, each statement's
        // outcome its own); anything else, or a group cut off, runs statement by statement.
        let group = statements.len() > 1 && statements.iter().all(Statement::can_group);
        let run = async {
            if group {
                if let Some(results) = conn.run_group(&statements).await {
                    return results;
                }
            }
            futures::future::join_all(
                statements
                    .iter()
                    .map(|st| async move { conn.run(&st.borrow()).await }),
            )
            .await
        };
        match AssertUnwindSafe(run).catch_unwind().await {
            Ok(results) => results,
            // `pending` settles every caller with INTERNAL as it drops.
            Err(_) => return,
        }
    };
    drop(lease);
    for ((statement, p), result) in statements.into_iter().zip(pending).zip(results) {
        match result {
            // Found lost before any of it was written: it never ran, so it may run elsewhere.
            Err(e) if e.never_sent() => {
                let pool = pool.clone();
                s.runtime.spawn(async move {
                    let outcome = pool.run(&statement.borrow()).await;
                    p.settle(outcome)
                });
            }
            other => p.settle(other),
        }
    }
}

fn count_failure(pool: &Pool, err: &Error) {
    let r = &pool.shared.recorder;
    match (err.code, err.phase) {
        (ErrorCode::PoolTimeout, Some(Phase::Connect)) => r.timeouts_connect.inc(),
        (ErrorCode::PoolTimeout, Some(Phase::Validate)) => r.timeouts_validate.inc(),
        (ErrorCode::PoolTimeout, _) => r.timeouts_wait.inc(),
        _ => {}
    }
}

/// Fails queued statements whose `acquireTimeoutMs` ran out before a connection was free.
async fn reap(shared: Weak<PoolShared>, kind: LaneKind) {
    let tick = match shared.upgrade() {
        Some(s) => (s.config.acquire_timeout / 8)
            .clamp(Duration::from_millis(5), Duration::from_millis(250)),
        None => return,
    };
    loop {
        tokio::time::sleep(tick).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let pool = Pool { shared };
        let now = Instant::now();
        let expired: Vec<Job> = {
            let mut queue = pool.shared.lane(kind).queue.lock();
            if queue.jobs.is_empty() {
                queue.reaper = false;
                return;
            }
            let timeout = pool.shared.config.acquire_timeout;
            let stale = queue
                .jobs
                .iter()
                .take_while(|j| now >= j.submitted + timeout)
                .count();
            queue.jobs.drain(..stale).collect()
        };
        for job in expired {
            pool.shared.recorder.gets.inc();
            (job.done)(Err(pool.shared.lane(kind).inventory.timeout_now()));
        }
    }
}
