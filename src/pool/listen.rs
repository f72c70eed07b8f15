//! LISTEN/NOTIFY (PostgreSQL) and SUBSCRIBE/PUBLISH (Redis) on one dedicated connection per
//! pool, outside `maxSize`. After any loss (a restart, `pg_terminate_backend`, a dropped
//! network) it reconnects with jittered backoff, listens to every channel again, and tells
//! every subscriber (`Event::Listening`) so the app can resync what it missed meanwhile.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures::StreamExt;
use parking_lot::Mutex;
use rand::Rng;
use tokio::sync::{oneshot, Notify};

use crate::error::{Error, ErrorCode, Phase, Result};
use crate::pool::postgres::listen::PgSession;
use crate::pool::PoolShared;

const FIRST_BACKOFF: Duration = Duration::from_millis(25);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How often an idle listening connection is checked, and how long the check may take.
const PING_EVERY: Duration = Duration::from_secs(15);
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// What a subscriber is told, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Listening (again): after the first LISTEN and after every reconnect.
    Listening,
    Message {
        channel: String,
        payload: String,
    },
}

pub type Sink = Arc<dyn Fn(Event) + Send + Sync>;

/// A channel, or (Redis) a pattern of channels.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Topic {
    pub name: String,
    pub pattern: bool,
}

struct Subscriber {
    topic: Topic,
    sink: Sink,
    /// Told once the first LISTEN for it is in effect (or why it could not be).
    ready: Option<(oneshot::Sender<Result<()>>, Instant)>,
}

#[derive(Default)]
struct HubState {
    subscribers: HashMap<u64, Subscriber>,
    next_id: u64,
    running: bool,
    closed: bool,
    last_error: Option<Error>,
}

/// The listening connection of one pool, and who listens to what.
pub struct Hub {
    state: Mutex<HubState>,
    changed: Notify,
    pool: Weak<PoolShared>,
}

/// An open listening connection.
pub enum Session {
    Postgres(Box<PgSession>),
    Redis {
        sink: redis::aio::PubSubSink,
        stream: redis::aio::PubSubStream,
    },
}

impl Session {
    async fn listen(&mut self, topic: &Topic) -> Result<()> {
        match self {
            Session::Postgres(pg) => pg.listen(&topic.name).await,
            Session::Redis { sink, .. } => {
                let done = if topic.pattern {
                    sink.psubscribe(&topic.name).await
                } else {
                    sink.subscribe(&topic.name).await
                };
                done.map_err(|e| Error::connection_lost(true, e.to_string()))
            }
        }
    }

    async fn unlisten(&mut self, topic: &Topic) -> Result<()> {
        match self {
            Session::Postgres(pg) => pg.unlisten(&topic.name).await,
            Session::Redis { sink, .. } => {
                let done = if topic.pattern {
                    sink.punsubscribe(&topic.name).await
                } else {
                    sink.unsubscribe(&topic.name).await
                };
                done.map_err(|e| Error::connection_lost(true, e.to_string()))
            }
        }
    }

    async fn ping(&mut self) -> Result<()> {
        match self {
            Session::Postgres(pg) => pg.ping().await,
            Session::Redis { sink, .. } => sink
                .ping::<String>()
                .await
                .map(|_| ())
                .map_err(|e| Error::connection_lost(true, e.to_string())),
        }
    }

    /// The next message as (topic it matched, channel, payload); `None` once lost.
    async fn next(&mut self) -> Option<(Topic, String, String)> {
        match self {
            Session::Postgres(pg) => pg.next().await.map(|(channel, payload)| {
                let topic = Topic {
                    name: channel.clone(),
                    pattern: false,
                };
                (topic, channel, payload)
            }),
            Session::Redis { stream, .. } => {
                let msg = stream.next().await?;
                let channel = msg.get_channel_name().to_string();
                let payload = String::from_utf8_lossy(msg.get_payload_bytes()).into_owned();
                let topic = match msg.get_pattern::<String>() {
                    Ok(pattern) if msg.from_pattern() => Topic {
                        name: pattern,
                        pattern: true,
                    },
                    _ => Topic {
                        name: channel.clone(),
                        pattern: false,
                    },
                };
                Some((topic, channel, payload))
            }
        }
    }
}

/// A channel name the servers accept: PostgreSQL identifiers are at most 63 bytes.
pub fn check_topic(topic: &Topic, backend: &str) -> Result<()> {
    if topic.name.is_empty() || topic.name.contains('\0') {
        return Err(Error::invalid_argument(
            "channel must be a non-empty string without NUL",
        ));
    }
    if backend == "postgres" && topic.name.len() > 63 {
        return Err(Error::invalid_argument(format!(
            "PostgreSQL channel names are at most 63 bytes (got {})",
            topic.name.len()
        )));
    }
    if backend == "postgres" && topic.pattern {
        return Err(Error::invalid_argument(
            "pattern subscriptions are a Redis feature (PSUBSCRIBE)",
        ));
    }
    if backend == "sqlite" {
        return Err(Error::invalid_argument(
            "listen/notify need PostgreSQL or Redis; SQLite has no notifications",
        ));
    }
    Ok(())
}

impl Hub {
    pub(crate) fn new(pool: Weak<PoolShared>) -> Arc<Hub> {
        Arc::new(Hub {
            state: Mutex::new(HubState::default()),
            changed: Notify::new(),
            pool,
        })
    }

    /// Adds a subscriber; the receiver resolves once its channel is listened to (or with
    /// the connect error when that could not happen within `acquireTimeoutMs`).
    pub fn subscribe(
        self: &Arc<Self>,
        topic: Topic,
        sink: Sink,
        deadline: Instant,
    ) -> (u64, oneshot::Receiver<Result<()>>) {
        let (tx, rx) = oneshot::channel();
        let (id, start) = {
            let mut s = self.state.lock();
            let id = s.next_id;
            s.next_id += 1;
            s.subscribers.insert(
                id,
                Subscriber {
                    topic,
                    sink,
                    ready: Some((tx, deadline)),
                },
            );
            let start = !s.running && !s.closed;
            s.running |= start;
            (id, start)
        };
        if start {
            if let Some(pool) = self.pool.upgrade() {
                pool.runtime.spawn(Arc::clone(self).run());
            }
        }
        self.changed.notify_one();
        (id, rx)
    }

    pub fn unsubscribe(&self, id: u64) {
        self.state.lock().subscribers.remove(&id);
        self.changed.notify_one();
    }

    /// Ends every subscription; the listening connection closes.
    pub fn close(&self) {
        let dropped = {
            let mut s = self.state.lock();
            s.closed = true;
            std::mem::take(&mut s.subscribers)
        };
        drop(dropped);
        self.changed.notify_one();
    }

    fn wanted(&self) -> HashSet<Topic> {
        let s = self.state.lock();
        s.subscribers
            .values()
            .map(|sub| sub.topic.clone())
            .collect()
    }

    fn stop_if_idle(&self) -> bool {
        let mut s = self.state.lock();
        if s.closed || s.subscribers.is_empty() {
            s.running = false;
            return true;
        }
        false
    }

    /// Tells the subscribers of `topics` that they are listening (all of them after a
    /// (re)connect, else only the ones still waiting for their first LISTEN).
    fn announce(&self, topics: &HashSet<Topic>, everyone: bool) {
        let sinks: Vec<Sink> = {
            let mut s = self.state.lock();
            s.last_error = None;
            s.subscribers
                .values_mut()
                .filter(|sub| topics.contains(&sub.topic) && (everyone || sub.ready.is_some()))
                .map(|sub| {
                    if let Some((ready, _)) = sub.ready.take() {
                        let _ = ready.send(Ok(()));
                    }
                    Arc::clone(&sub.sink)
                })
                .collect()
        };
        for sink in sinks {
            sink(Event::Listening);
        }
    }

    fn deliver(&self, topic: &Topic, channel: String, payload: String) {
        let sinks: Vec<Sink> = {
            let s = self.state.lock();
            s.subscribers
                .values()
                .filter(|sub| sub.topic == *topic && sub.ready.is_none())
                .map(|sub| Arc::clone(&sub.sink))
                .collect()
        };
        for sink in sinks {
            sink(Event::Message {
                channel: channel.clone(),
                payload: payload.clone(),
            });
        }
    }

    /// Fails first waits whose deadline has passed, with why the connection is not up.
    fn expire_waits(&self, err: &Error) {
        let now = Instant::now();
        let mut s = self.state.lock();
        s.last_error = Some(err.clone());
        let expired: Vec<u64> = s
            .subscribers
            .iter()
            .filter(|(_, sub)| sub.ready.as_ref().is_some_and(|(_, d)| now >= *d))
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(mut sub) = s.subscribers.remove(&id) {
                if let Some((ready, _)) = sub.ready.take() {
                    let mut e = Error::new(
                        ErrorCode::PoolTimeout,
                        format!(
                            "could not start listening within acquireTimeoutMs: {}",
                            err.message
                        ),
                    )
                    .with_phase(Phase::Connect);
                    e.sqlstate = err.sqlstate.clone();
                    let _ = ready.send(Err(e));
                }
            }
        }
    }

    /// The listening connection's life: connect, listen, deliver; again after any loss.
    async fn run(self: Arc<Self>) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            if self.stop_if_idle() {
                return;
            }
            let Some(pool) = self.pool.upgrade() else {
                return;
            };
            let opened = pool.lanes()[0]
                .inventory
                .connector()
                .open_session(pool.config.connect_timeout)
                .await;
            drop(pool);
            match opened {
                Ok(session) => {
                    backoff = FIRST_BACKOFF;
                    if let Err(e) = self.serve(session).await {
                        self.state.lock().last_error = Some(e);
                    }
                }
                Err(e) => {
                    self.expire_waits(&e);
                    let jittered = backoff.mul_f64(rand::rng().random_range(0.5..1.0));
                    // Woken early by a new subscriber or close, to fail or stop at once.
                    let _ = tokio::time::timeout(jittered, self.changed.notified()).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Listens to every wanted topic on `session` and delivers until it is lost or closed.
    async fn serve(&self, mut session: Session) -> Result<()> {
        let mut listening: HashSet<Topic> = HashSet::new();
        let mut fresh = true;
        loop {
            let wanted = self.wanted();
            if wanted.is_empty() && self.stop_if_idle() {
                return Ok(());
            }
            for topic in listening.difference(&wanted).cloned().collect::<Vec<_>>() {
                session.unlisten(&topic).await?;
                listening.remove(&topic);
            }
            let added: Vec<Topic> = wanted.difference(&listening).cloned().collect();
            for topic in added {
                session.listen(&topic).await?;
                listening.insert(topic);
            }
            // After a (re)connect every subscriber hears it; later, only new subscribers.
            self.announce(&listening, fresh);
            fresh = false;
            tokio::select! {
                message = session.next() => match message {
                    Some((topic, channel, payload)) => self.deliver(&topic, channel, payload),
                    None => return Err(Error::connection_lost(false, "the listening connection closed")),
                },
                () = self.changed.notified() => {}
                () = tokio::time::sleep(PING_EVERY) => {
                    match tokio::time::timeout(PING_TIMEOUT, session.ping()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Err(e),
                        Err(_) => return Err(Error::connection_lost(false, "the listening connection stopped answering")),
                    }
                }
            }
        }
    }
}
