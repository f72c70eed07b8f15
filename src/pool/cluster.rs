//! Redis Cluster connections (`cluster: true`) on redis-rs's cluster client: keys routed by
//! slot, MOVED/ASK followed. redis-rs's own retries are off — they would re-send a command
//! whose answer was lost — so this layer retries only what provably did not run: a redirect
//! or a cluster that is briefly down (the server refused it), or a node that refused the
//! connection (nothing was sent); after the latter the connection is rebuilt, which reads
//! the topology afresh (a promoted replica after a failover).

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::aio::ConnectionLike;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::Value as RedisValue;

use crate::error::{Error, ErrorCode, Phase, Result};
use crate::pool::redis::{build_command, element, reply};
use crate::pool::tls::{TlsMode, TlsOptions};
use crate::pool::value::Value;

const FIRST_PAUSE: Duration = Duration::from_millis(10);
const MAX_PAUSE: Duration = Duration::from_millis(200);

/// Builds the cluster client for `nodes` (`redis://host:port` each, credentials included).
pub fn client(
    nodes: &[String],
    tls: Option<&TlsOptions>,
    connect_timeout: Duration,
    statement_timeout: Duration,
) -> Result<ClusterClient> {
    let mut builder = ClusterClientBuilder::new(nodes.to_vec())
        .retries(0)
        .connection_timeout(connect_timeout);
    if !statement_timeout.is_zero() {
        builder = builder.response_timeout(statement_timeout);
    }
    if nodes.iter().any(|n| n.starts_with("rediss://")) {
        let mode = tls.map_or(TlsMode::VerifyFull, |t| t.mode);
        builder = builder.tls(match mode {
            TlsMode::VerifyFull => redis::TlsMode::Secure,
            _ => redis::TlsMode::Insecure,
        });
        if let Some(pem) = tls.and_then(|t| t.ca_pem.clone()) {
            builder = builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.into_bytes()),
            });
        }
    }
    builder.build().map_err(|e| {
        Error::invalid_argument(format!("the cluster URL cannot be used ({:?})", e.kind()))
    })
}

async fn open(client: &ClusterClient, timeout: Duration) -> Result<ClusterConnection> {
    match tokio::time::timeout(timeout, client.get_async_connection()).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(Error::new(
            ErrorCode::ConnectFailed,
            format!("could not connect to the Redis Cluster: {e}"),
        )
        .with_phase(Phase::Connect)),
        Err(_) => Err(Error::new(
            ErrorCode::ConnectFailed,
            format!(
                "the Redis Cluster did not answer within connectTimeoutMs ({} ms)",
                timeout.as_millis()
            ),
        )
        .with_phase(Phase::Connect)
        .timed_out()),
    }
}

pub struct ClusterConn {
    client: ClusterClient,
    conn: Mutex<ClusterConnection>,
    /// How long one command may keep retrying redirects and refused nodes.
    patience: Duration,
    connect_timeout: Duration,
}

pub async fn connect(
    client: &ClusterClient,
    connect_timeout: Duration,
    patience: Duration,
) -> Result<ClusterConn> {
    let conn = open(client, connect_timeout).await?;
    Ok(ClusterConn {
        client: client.clone(),
        conn: Mutex::new(conn),
        patience,
        connect_timeout,
    })
}

/// Server answers that mean "not run here, try again": a slot moved, is migrating, the
/// cluster is electing, the node is loading.
fn is_redirect(e: &redis::RedisError) -> bool {
    matches!(
        e.code(),
        Some("MOVED" | "ASK" | "TRYAGAIN" | "CLUSTERDOWN" | "LOADING" | "MASTERDOWN")
    )
}

/// The slot of `key`: CRC16 (XMODEM) of the key, or of its `{hash tag}`, mod 16384.
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|b| *b == b'}')
                .filter(|close| *close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for byte in tagged {
        crc ^= (*byte as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// Commands that address the connection or the cluster, not a key's slot.
fn refused_in_cluster(name: &str) -> bool {
    crate::pool::connection::CONNECTION_STATE_COMMANDS
        .iter()
        .any(|c| c.eq_ignore_ascii_case(name))
}

impl ClusterConn {
    fn connection(&self) -> ClusterConnection {
        self.conn.lock().clone()
    }

    /// Runs one packed request, retrying within the patience what provably did not run.
    async fn request<T>(
        &self,
        send: impl Fn(ClusterConnection) -> futures::future::BoxFuture<'static, redis::RedisResult<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + self.patience;
        let mut pause = FIRST_PAUSE;
        loop {
            let outcome = send(self.connection()).await;
            let e = match outcome {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let retry = is_redirect(&e) || e.is_connection_refusal();
            if !retry || Instant::now() + pause >= deadline {
                return Err(failure(e));
            }
            if e.is_connection_refusal() {
                // A node is gone: a new connection reads the topology afresh.
                if let Ok(fresh) = open(&self.client, self.connect_timeout).await {
                    *self.conn.lock() = fresh;
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }

    pub async fn command(&self, name: &str, args: &[Value]) -> Result<Value> {
        if refused_in_cluster(name) {
            return Err(Error::invalid_argument(format!(
                "{name} addresses one connection, which a Redis Cluster pool does not have; use a pipeline whose keys share a slot ({{hash tags}})"
            )));
        }
        let cmd = build_command(name, args)?;
        let out = self
            .request(|mut conn| {
                let cmd = cmd.clone();
                Box::pin(async move { conn.req_packed_command(&cmd).await })
            })
            .await?;
        reply(out)
    }

    /// A pipeline runs on one node: every command's key must be in one slot.
    pub async fn pipeline(&self, commands: &[(String, Vec<Value>)]) -> Result<Vec<Value>> {
        let mut slots = std::collections::BTreeSet::new();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for (name, args) in commands {
            if refused_in_cluster(name) {
                return Err(Error::invalid_argument(format!(
                    "{name} is not available in a Redis Cluster pool"
                )));
            }
            if let Some(key) = args.first().and_then(Value::to_text) {
                slots.insert(key_slot(key.as_bytes()));
            }
            pipe.add_command(build_command(name, args)?);
        }
        if slots.len() > 1 {
            return Err(Error::invalid_argument(format!(
                "the pipeline's keys are in {} slots ({slots:?}); in a Redis Cluster a pipeline runs on one node: split it, or give the keys one {{hash tag}}",
                slots.len()
            )));
        }
        let out: Vec<RedisValue> = self
            .request(|mut conn| {
                let pipe = pipe.clone();
                Box::pin(async move { pipe.query_async(&mut conn).await })
            })
            .await?;
        out.into_iter().map(element).collect()
    }

    pub async fn ping(&self) -> Result<()> {
        self.command("PING", &[]).await.map(|_| ())
    }
}

/// A cluster failure: the server's error, a timeout, or a lost connection (may have run).
fn failure(e: redis::RedisError) -> Error {
    if e.is_timeout() {
        let mut err = Error::new(
            ErrorCode::QueryTimeout,
            format!("timed out after statementTimeoutMs waiting for the Redis Cluster ({e})"),
        )
        .with_sent(true);
        err.desync = true;
        return err;
    }
    if let Some(code) = e.code() {
        return Error::new(ErrorCode::QueryFailed, e.to_string()).with_sqlstate(code);
    }
    if e.is_connection_refusal() {
        return Error::connection_lost(false, e.to_string());
    }
    if e.is_connection_dropped() || e.is_io_error() || e.is_unrecoverable_error() {
        return Error::connection_lost(true, e.to_string());
    }
    Error::new(ErrorCode::QueryFailed, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis_and_honour_hash_tags() {
        // Known values from the Redis Cluster specification / CLUSTER KEYSLOT.
        assert_eq!(key_slot(b"123456789"), 12739);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"{}x"), key_slot(b"{}x"));
        assert_ne!(key_slot(b"{}x"), key_slot(b"x"));
    }
}
