//! The pool's connections: idle ones (the most recently returned first), callers waiting in
//! arrival order, and connections being opened. A returned connection goes straight to the
//! oldest waiter. Opening is paced as HikariCP paces it: a new connection is opened when
//! waiters have waited longer than a connect takes, not one per waiter, so a spike that warm
//! connections can serve does not storm the database with connects.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::Rng;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::error::{Error, ErrorCode, Phase, Result};
use crate::metrics::PoolRecorder;
use crate::pool::config::PoolConfig;
use crate::pool::connection::Connection;
use crate::pool::connector::{Connector, Validation, VALIDATION_GRACE};

/// Pause after a failed connect, doubling to [`MAX_BACKOFF`] (jittered down by up to half).
/// Short: a server back from a restart is found within about 50 ms, and while connects
/// fail at most [`FAILING_OPENERS`] retry, so an outage costs the process next to nothing.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_millis(50);

/// Connects in flight at once while connects are failing: one patient attempt with all of
/// `connectTimeoutMs`, and a quick one given up after [`quick_limit`] — so an attempt lost
/// in a silent network does not hold recovery back for a whole connect timeout.
const FAILING_OPENERS: usize = 2;

fn unanswered_attempt(bound: Duration) -> Error {
    Error::new(
        ErrorCode::ConnectFailed,
        format!(
            "a connect attempt made while connects were failing got no answer in {} ms (a few times the usual connect time); retrying",
            bound.as_millis()
        ),
    )
    .with_phase(Phase::Connect)
}

/// A quick attempt's bound: four connects' worth of the measured connect time, between
/// 20 and 50 ms (and never above `connectTimeoutMs`). Capped, so a connect time measured on
/// a loaded machine cannot stretch it: a link slower than that is served by the patient
/// attempt, and after a silent spell a fresh quick attempt starts within 50 ms.
fn quick_limit(connect_time: Duration, connect_timeout: Duration) -> Duration {
    (connect_time * 4)
        .clamp(Duration::from_millis(20), Duration::from_millis(50))
        .min(connect_timeout)
}

/// What a waiting caller is handed.
enum Handoff {
    Ready(Box<Connection>),
    Failed(Error),
}

struct Waiter {
    id: u64,
    since: Instant,
    tx: oneshot::Sender<Handoff>,
}

struct State {
    /// Most recently returned last. Boxed: connections move between this list, waiters and
    /// leases as one pointer.
    #[allow(clippy::vec_box)]
    idle: Vec<Box<Connection>>,
    /// Connections being opened.
    opening: usize,
    /// Idle connections out for a keepalive ping (counted as idle).
    checking: usize,
    max_size: usize,
    waiters: VecDeque<Waiter>,
    next_id: u64,
    closed: bool,
    /// The last failed connect, for timeout messages.
    last_error: Option<Error>,
    /// How long a connect takes (moving average), which paces new connections.
    connect_time: Option<Duration>,
    /// While connects fail: an attempt with the whole `connectTimeoutMs` is in flight.
    patient: bool,
}

/// Connection counts right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Occupancy {
    pub max_size: usize,
    pub open: usize,
    pub idle: usize,
    pub opening: usize,
    pub waiters: usize,
}

pub(crate) struct Inventory {
    state: Mutex<State>,
    /// Open connections: idle, leased or out for a ping. Counted down by each connection's
    /// [`Slot`] as it is dropped, wherever that happens.
    open: Arc<AtomicUsize>,
    /// Open connections per server (`host:port`), for status.
    hosts: Arc<HostCounts>,
    connector: Arc<Connector>,
    config: Arc<PoolConfig>,
    /// Connections kept open even when idle (`minIdle`, this set's share of it).
    min_idle: usize,
    recorder: Arc<PoolRecorder>,
    runtime: Handle,
}

/// Open connections per server (`host:port`).
type HostCounts = Mutex<HashMap<Arc<str>, usize>>;

/// A connection's place in its pool: dropping the connection, anywhere, frees the place
/// and lets a waiter have a new connection opened.
pub(crate) struct Slot {
    open: Arc<AtomicUsize>,
    /// The server it reached, counted in [`Inventory::hosts`].
    host: Option<(Arc<str>, Arc<HostCounts>)>,
    inventory: Weak<Inventory>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        if let Some((host, hosts)) = self.host.take() {
            let mut hosts = hosts.lock();
            if let Some(n) = hosts.get_mut(&host) {
                *n -= 1;
                if *n == 0 {
                    hosts.remove(&host);
                }
            }
        }
        if let Some(inventory) = self.inventory.upgrade() {
            inventory.open_if_needed();
        }
    }
}

/// A caller waiting for a connection. Dropped (timed out, or its caller gave up) it leaves
/// the queue, and a connection handed to it meanwhile goes back to the pool.
struct Queued<'a> {
    inventory: &'a Inventory,
    id: u64,
    rx: oneshot::Receiver<Handoff>,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.inventory
            .state
            .lock()
            .waiters
            .retain(|w| w.id != self.id);
        if let Ok(Handoff::Ready(conn)) = self.rx.try_recv() {
            self.inventory.give_back(conn);
        }
    }
}

impl Inventory {
    pub fn new(
        connector: Arc<Connector>,
        config: Arc<PoolConfig>,
        recorder: Arc<PoolRecorder>,
        runtime: Handle,
        max_size: usize,
        min_idle: usize,
    ) -> Arc<Inventory> {
        Arc::new(Inventory {
            open: Arc::new(AtomicUsize::new(0)),
            hosts: Arc::default(),
            state: Mutex::new(State {
                idle: Vec::new(),
                opening: 0,
                checking: 0,
                max_size,
                waiters: VecDeque::new(),
                next_id: 0,
                closed: false,
                last_error: None,
                connect_time: None,
                patient: false,
            }),
            connector,
            config,
            min_idle,
            recorder,
            runtime,
        })
    }

    /// Open connections per server, sorted by host.
    pub fn hosts(&self) -> Vec<(String, usize)> {
        let mut out: Vec<(String, usize)> = self
            .hosts
            .lock()
            .iter()
            .map(|(h, n)| (h.to_string(), *n))
            .collect();
        out.sort();
        out
    }

    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    pub fn occupancy(&self) -> Occupancy {
        self.occupancy_of(&self.state.lock())
    }

    fn occupancy_of(&self, s: &State) -> Occupancy {
        Occupancy {
            max_size: s.max_size,
            open: self.open(),
            idle: s.idle.len() + s.checking,
            opening: s.opening,
            waiters: s.waiters.len(),
        }
    }

    /// An idle connection right now, if any. Never waits, connects or pings.
    pub fn take_idle(&self) -> Option<Box<Connection>> {
        self.state.lock().idle.pop()
    }

    /// A connection by `deadline`: an idle one (pinged when idle past the grace period), else
    /// one handed back by another caller or newly opened. Dropping the future gives up
    /// cleanly: the waiter leaves the queue, a connection on its way goes back.
    pub async fn checkout(self: &Arc<Self>, deadline: Instant) -> Result<Box<Connection>> {
        loop {
            let claim = {
                let mut s = self.state.lock();
                if s.closed {
                    return Err(self.closed());
                }
                match s.idle.pop() {
                    Some(conn) => Err(conn),
                    None => {
                        let (tx, rx) = oneshot::channel();
                        let id = s.next_id;
                        s.next_id += 1;
                        s.waiters.push_back(Waiter {
                            id,
                            since: Instant::now(),
                            tx,
                        });
                        Ok((id, rx))
                    }
                }
            };
            let (id, rx) = match claim {
                Ok(waiting) => waiting,
                Err(conn) => {
                    // If the caller gives up mid-ping, `conn` is dropped half-pinged: closed,
                    // and its slot freed.
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    match self.connector.validate(&conn, remaining).await {
                        Ok(()) => return Ok(conn),
                        Err(Validation::Closed) => drop(conn),
                        Err(Validation::Unanswered) => {
                            drop(conn);
                            // What silenced one idle connection (a NAT that forgot it, a
                            // server gone) has most likely silenced every one idle as long:
                            // close those too and wait for a fresh connection instead of
                            // pinging each in turn.
                            self.close_unchecked(VALIDATION_GRACE);
                        }
                    }
                    if Instant::now() >= deadline {
                        return Err(self.timeout(Phase::Validate));
                    }
                    continue;
                }
            };
            let mut queued = Queued {
                inventory: self,
                id,
                rx,
            };
            self.open_if_needed();
            let handoff = match tokio::time::timeout_at(deadline.into(), &mut queued.rx).await {
                Ok(Ok(h)) => h,
                Ok(Err(_)) => return Err(self.closed()),
                Err(_) => {
                    let phase = self.waiting_phase();
                    // Handed a connection just as time ran out: take it.
                    match queued.rx.try_recv() {
                        Ok(h) => h,
                        Err(_) => return Err(self.timeout(phase)),
                    }
                }
            };
            return match handoff {
                Handoff::Ready(conn) => Ok(conn),
                Handoff::Failed(e) => Err(e),
            };
        }
    }

    /// Returns a connection: to the oldest waiter, else to the idle list.
    pub fn give_back(&self, conn: Box<Connection>) {
        let mut conn = conn;
        let mut s = self.state.lock();
        if s.closed || self.open() > s.max_size {
            drop(s);
            drop(conn);
            return;
        }
        while let Some(waiter) = s.waiters.pop_front() {
            match waiter.tx.send(Handoff::Ready(conn)) {
                Ok(()) => return,
                Err(Handoff::Ready(back)) => conn = back, // that caller stopped waiting
                Err(Handoff::Failed(_)) => unreachable!("sent Ready"),
            }
        }
        s.idle.push(conn);
    }

    /// Closes a connection that must not be reused; its slot lets a waiter have a new one.
    pub fn discard(&self, conn: Box<Connection>) {
        drop(conn);
    }

    /// Closes every idle connection that has not answered for `older_than` (even below
    /// `minIdle`: fresh ones replace them). Returns how many were closed.
    pub fn close_unchecked(&self, older_than: Duration) -> usize {
        let removed: Vec<Box<Connection>> = {
            let mut s = self.state.lock();
            let (stale, kept) = std::mem::take(&mut s.idle)
                .into_iter()
                .partition(|c| c.last_checked.elapsed() >= older_than);
            s.idle = kept;
            stale
        };
        // Dropped outside the lock: each freed slot asks for a replacement.
        removed.len()
    }

    /// Starts as many connects as the pacing allows.
    pub fn open_if_needed(self: &Arc<Self>) {
        let starts = {
            let mut s = self.state.lock();
            let n = self.connects_to_start(&s);
            s.opening += n;
            n
        };
        for _ in 0..starts {
            let inventory = Arc::clone(self);
            self.runtime
                .spawn(async move { inventory.open_one().await });
        }
    }

    fn connects_to_start(&self, s: &State) -> usize {
        if s.closed {
            return 0;
        }
        let open = self.open();
        let free = s.max_size.saturating_sub(open + s.opening);
        let wanted = match s.waiters.front() {
            Some(oldest) => {
                let allowed = match s.connect_time {
                    // Nothing measured yet (a cold pool): one connect per waiter.
                    None => s.waiters.len(),
                    // One connect, plus one more per connect-time the oldest has waited:
                    // connections coming back soon serve waiters faster than new ones.
                    Some(t) => {
                        let waited = oldest.since.elapsed().as_secs_f64();
                        1 + (waited / t.as_secs_f64().max(0.000_5)) as usize
                    }
                };
                allowed.min(s.waiters.len())
            }
            None if open + s.opening < self.min_idle => 1,
            None => 0,
        };
        let wanted = if s.last_error.is_some() {
            wanted.min(FAILING_OPENERS)
        } else {
            wanted
        };
        wanted.saturating_sub(s.opening).min(free)
    }

    /// How the next connect attempt is bounded: by `connectTimeoutMs` per host (`None`), or
    /// while connects fail and another attempt is the patient one, by [`quick_limit`]. True
    /// when this attempt is the patient one.
    fn attempt_bound(&self) -> (Option<Duration>, bool) {
        let mut s = self.state.lock();
        if s.last_error.is_none() {
            return (None, false);
        }
        match s.connect_time {
            Some(t) if s.patient => (Some(quick_limit(t, self.config.connect_timeout)), false),
            _ => {
                s.patient = true;
                (None, true)
            }
        }
    }

    /// Opens one connection, retrying with backoff while it is still wanted.
    async fn open_one(self: Arc<Self>) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let started = Instant::now();
            let (quick, patient) = self.attempt_bound();
            let attempt = self.connector.open(self.config.connect_timeout);
            let mut unanswered = false;
            let result = match quick {
                None => attempt.await,
                Some(bound) => tokio::time::timeout(bound, attempt)
                    .await
                    .unwrap_or_else(|_| {
                        unanswered = true;
                        Err(unanswered_attempt(bound))
                    }),
            };
            if patient {
                self.state.lock().patient = false;
            }
            match result {
                Ok(mut conn) => {
                    self.open.fetch_add(1, Ordering::AcqRel);
                    let host = conn.host().map(|h| {
                        let h: Arc<str> = Arc::from(h);
                        *self.hosts.lock().entry(Arc::clone(&h)).or_insert(0) += 1;
                        (h, Arc::clone(&self.hosts))
                    });
                    conn.slot = Some(Slot {
                        open: Arc::clone(&self.open),
                        host,
                        inventory: Arc::downgrade(&self),
                    });
                    {
                        let mut s = self.state.lock();
                        s.opening -= 1;
                        s.last_error = None;
                        let took = started.elapsed();
                        s.connect_time = Some(match s.connect_time {
                            Some(t) => t.mul_f64(0.7) + took.mul_f64(0.3),
                            None => took,
                        });
                    }
                    self.give_back(Box::new(conn));
                    self.open_if_needed();
                    return;
                }
                Err(err) => {
                    if !self.after_failed_connect(err) {
                        return;
                    }
                    if unanswered {
                        // It has waited its bound already: the next attempt starts now.
                        continue;
                    }
                    let jittered = backoff.mul_f64(rand::rng().random_range(0.5..1.0));
                    tokio::time::sleep(jittered).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Records a failed connect; true when it should be tried again (still wanted and not
    /// a failure that retrying cannot fix).
    fn after_failed_connect(&self, err: Error) -> bool {
        let permanent = self.connector.is_permanent(&err);
        let mut s = self.state.lock();
        s.last_error = Some(err.clone());
        let open = self.open();
        let still_wanted = !s.closed
            && s.opening <= FAILING_OPENERS
            && (!s.waiters.is_empty() || open + s.opening <= self.min_idle);
        if !permanent && still_wanted {
            return true;
        }
        s.opening -= 1;
        if permanent {
            // Nothing will come back if nothing is open: fail every waiter; else the one
            // this connect was for.
            let waiting = s.waiters.len();
            let fail = if open == 0 { waiting } else { waiting.min(1) };
            for w in s.waiters.drain(..fail) {
                let _ = w.tx.send(Handoff::Failed(err.clone()));
            }
        }
        false
    }

    /// Which step a caller timing out now was waiting for.
    fn waiting_phase(&self) -> Phase {
        let s = self.state.lock();
        if s.opening > 0 {
            Phase::Connect
        } else {
            Phase::Wait
        }
    }

    /// The acquire deadline ran out now, in the step it was waiting for.
    pub fn timeout_now(&self) -> Error {
        self.timeout(self.waiting_phase())
    }

    /// The acquire deadline ran out in `phase`.
    pub fn timeout(&self, phase: Phase) -> Error {
        match phase {
            Phase::Wait => self.recorder.timeouts_wait.inc(),
            Phase::Connect => self.recorder.timeouts_connect.inc(),
            Phase::Validate => self.recorder.timeouts_validate.inc(),
        }
        let (occupancy, last_error) = {
            let s = self.state.lock();
            (self.occupancy_of(&s), s.last_error.clone())
        };
        let what = match phase {
            Phase::Wait => "waiting for a free connection",
            Phase::Connect => "opening a new connection",
            Phase::Validate => "validating an idle connection",
        };
        let cause = match (&last_error, phase) {
            (Some(e), Phase::Connect) => format!("; last connect attempt: {}", e.message),
            _ => String::new(),
        };
        Error::new(
            ErrorCode::PoolTimeout,
            format!(
                "pool '{}' timed out after {} ms {what} ({} of {} in use, {} waiting){cause}; raise maxSize or acquireTimeoutMs, or shed load",
                self.recorder.name,
                self.config.acquire_timeout.as_millis(),
                occupancy.open.saturating_sub(occupancy.idle),
                occupancy.max_size,
                occupancy.waiters,
            ),
        )
        .with_phase(phase)
    }

    /// Closes idle connections for which `retire` says so, keeping `minIdle` open at least
    /// (always those past their lifetime or unusable). Returns how many were closed.
    pub fn retire(&self, retire: impl Fn(&Connection) -> bool) -> usize {
        let keep = self.min_idle;
        let removed: Vec<Box<Connection>> = {
            let mut s = self.state.lock();
            let mut open = self.open();
            let mut removed = Vec::new();
            let mut kept = Vec::with_capacity(s.idle.len());
            for conn in s.idle.drain(..) {
                let must = conn.is_expired() || conn.is_unusable();
                if must || (open > keep && retire(&conn)) {
                    open -= 1;
                    removed.push(conn);
                } else {
                    kept.push(conn);
                }
            }
            s.idle = kept;
            removed
        };
        removed.len()
    }

    /// Takes out the idle connection checked longest ago, if that was `older_than` ago.
    pub fn take_for_ping(&self, older_than: Duration) -> Option<Box<Connection>> {
        let mut s = self.state.lock();
        let index = s
            .idle
            .iter()
            .enumerate()
            .filter(|(_, c)| c.last_checked.elapsed() >= older_than)
            .min_by_key(|(_, c)| c.last_checked)
            .map(|(i, _)| i)?;
        s.checking += 1;
        Some(s.idle.remove(index))
    }

    /// Puts back a connection taken for a ping: to waiters or idle when it answered.
    pub fn after_ping(self: &Arc<Self>, conn: Box<Connection>, answered: bool) {
        self.state.lock().checking -= 1;
        if answered {
            self.give_back(conn);
        } else {
            self.discard(conn);
        }
    }

    pub fn resize(self: &Arc<Self>, max_size: usize) {
        let excess: Vec<Box<Connection>> = {
            let mut s = self.state.lock();
            s.max_size = max_size;
            let excess = self.open().saturating_sub(max_size).min(s.idle.len());
            s.idle.drain(..excess).collect()
        };
        drop(excess);
        self.open_if_needed();
    }

    /// Closes every idle connection and fails every waiter; connections still out close
    /// when they come back.
    pub fn close(&self) {
        let (idle, waiters) = {
            let mut s = self.state.lock();
            s.closed = true;
            (std::mem::take(&mut s.idle), std::mem::take(&mut s.waiters))
        };
        for w in waiters {
            let _ = w.tx.send(Handoff::Failed(self.closed()));
        }
        drop(idle);
    }

    fn closed(&self) -> Error {
        Error::new(
            ErrorCode::PoolClosed,
            format!("pool '{}' is closed", self.recorder.name),
        )
    }
}
