//! Redis connections on redis-rs (tokio). A pooled connection is used by one caller at a time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, ConnectionAddr, TlsCertificates, Value as RedisValue};
use rustls::pki_types::ServerName;

use crate::error::{Error, ErrorCode, Phase, Result};
use crate::pool::socket::{self, Stream, Watch, Watched};
use crate::pool::tls::{TlsMode, TlsOptions};
use crate::pool::value::Value;

pub struct RedisConnection {
    conn: MultiplexedConnection,
    /// The socket under it: whether a command was written, whether Redis has gone.
    watch: Arc<Watch>,
    /// Inside MULTI or WATCH: must be DISCARDed / UNWATCHed before reuse.
    pub in_transaction: AtomicBool,
    /// Session state a next user must not inherit (SELECT, SUBSCRIBE, CLIENT …): close on return.
    pub tainted: AtomicBool,
}

/// Opens one connection over our own socket (TLS with the pool's settings for rediss://),
/// so the pool can tell a command that never went out from one that may have run.
pub async fn connect(
    client: &Client,
    tls: Option<&TlsOptions>,
    timeout: Duration,
    statement_timeout: Duration,
) -> Result<RedisConnection> {
    // No response timeout unless statementTimeoutMs asks: blocking commands (BLPOP 30)
    // legitimately wait; redis-rs's default of 500 ms would fail them. Lost connections
    // still surface as errors.
    let response_timeout = (!statement_timeout.is_zero()).then_some(statement_timeout);
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(response_timeout);
    let info = client.get_connection_info();
    let failed = |e: &dyn std::fmt::Display| {
        Error::new(
            ErrorCode::ConnectFailed,
            format!("could not connect to Redis: {e}"),
        )
        .with_phase(Phase::Connect)
    };
    let attempt = async {
        let stream = match info.addr() {
            ConnectionAddr::Tcp(host, port) => Stream::Tcp(
                socket::tcp_host(host, *port)
                    .await
                    .map_err(|e| failed(&e))?,
            ),
            ConnectionAddr::TcpTls { host, port, .. } => {
                let tcp = socket::tcp_host(host, *port)
                    .await
                    .map_err(|e| failed(&e))?;
                let options = tls.cloned().unwrap_or(TlsOptions {
                    mode: TlsMode::VerifyFull,
                    ca_pem: None,
                });
                let connector =
                    tokio_rustls::TlsConnector::from(Arc::new(options.client_config()?));
                let name = ServerName::try_from(host.clone()).map_err(|_| {
                    failed(&format!("{host:?} is not a valid TLS server name")).permanent()
                })?;
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| failed(&format!("TLS handshake failed: {e}")).permanent())?;
                Stream::Tls(Box::new(tls))
            }
            ConnectionAddr::Unix(path) => {
                Stream::Unix(socket::unix(path).await.map_err(|e| failed(&e))?)
            }
            other => {
                return Err(failed(&format!("unsupported Redis address {other:?}")).permanent())
            }
        };
        let (watched, watch) = Watched::new(stream);
        let (conn, driver) =
            MultiplexedConnection::new_with_config(info.redis_settings(), watched, config)
                .await
                .map_err(|e| failed(&e))?;
        tokio::spawn(driver);
        Ok::<_, Error>((conn, watch))
    };
    let (conn, watch) = match tokio::time::timeout(timeout, attempt).await {
        Ok(outcome) => outcome?,
        Err(_) => {
            return Err(Error::new(
                ErrorCode::ConnectFailed,
                format!(
                    "Redis did not answer within connectTimeoutMs ({} ms)",
                    timeout.as_millis()
                ),
            )
            .with_phase(Phase::Connect)
            .timed_out())
        }
    };
    Ok(RedisConnection {
        conn,
        watch,
        in_transaction: AtomicBool::new(false),
        tainted: AtomicBool::new(false),
    })
}

/// A client for `url`, trusting `tls.ca` when given. `tls.mode: 'require'` encrypts without
/// verifying; `verify-full` (the default for `rediss://`) checks chain and host name.
pub fn client(url: &str, tls: Option<&TlsOptions>) -> Result<Client> {
    let invalid = |e: redis::RedisError| {
        Error::invalid_argument(format!("url is not a valid Redis URL ({:?})", e.kind()))
    };
    let Some(tls) = tls else {
        return Client::open(url).map_err(invalid);
    };
    if !url.starts_with("rediss://") {
        return Err(Error::invalid_argument(
            "tls options need a rediss:// URL for Redis",
        ));
    }
    let url = match tls.mode {
        TlsMode::VerifyFull => url.to_string(),
        TlsMode::Require | TlsMode::Prefer => {
            format!("{}#insecure", url.split('#').next().unwrap_or(url))
        }
        TlsMode::VerifyCa | TlsMode::Disable => {
            return Err(Error::invalid_argument(
                "tls.mode for Redis must be 'verify-full' or 'require'",
            ))
        }
    };
    match &tls.ca_pem {
        Some(pem) => Client::build_with_tls(
            url.as_str(),
            TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone().into_bytes()),
            },
        )
        .map_err(|e| {
            Error::invalid_argument(format!("tls.ca cannot be used for Redis ({:?})", e.kind()))
        }),
        None => Client::open(url.as_str()).map_err(invalid),
    }
}

pub fn is_permanent(err: &Error) -> bool {
    let m = err.message.to_ascii_lowercase();
    m.contains("auth") || m.contains("password") || m.contains("tls") || m.contains("certificate")
}

/// Maps a redis-rs failure. `sent` says whether any byte went out after the command was
/// queued (a lost connection with nothing written never ran the command).
fn command_error(e: redis::RedisError, sent: bool) -> Error {
    if e.is_timeout() {
        // statementTimeoutMs: the answer may still come; the connection is not reused.
        let mut err = Error::new(
            ErrorCode::QueryTimeout,
            format!("timed out after statementTimeoutMs waiting for Redis ({e}); the connection was closed"),
        )
        .with_sent(true);
        err.desync = true;
        return err;
    }
    if let Some(code) = e.code() {
        return Error::new(ErrorCode::QueryFailed, e.to_string()).with_sqlstate(code);
    }
    if e.is_connection_dropped() || e.is_io_error() || e.is_unrecoverable_error() {
        return Error::connection_lost(sent, e.to_string());
    }
    Error::new(ErrorCode::QueryFailed, e.to_string())
}

fn arg(cmd: &mut redis::Cmd, value: &Value, position: usize) -> Result<()> {
    match value {
        Value::Bytes(b) => {
            cmd.arg(b.as_slice());
        }
        Value::Null => {
            return Err(Error::invalid_argument(format!(
                "Redis argument {position} is null; Redis has no null argument"
            )))
        }
        other => {
            cmd.arg(other.to_text().unwrap_or_default());
        }
    }
    Ok(())
}

/// Builds one command from its name and arguments.
pub fn build_command(name: &str, args: &[Value]) -> Result<redis::Cmd> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'|')
    {
        return Err(Error::invalid_argument(format!(
            "{name:?} is not a Redis command name"
        )));
    }
    let mut cmd = redis::cmd(name);
    for (i, a) in args.iter().enumerate() {
        arg(&mut cmd, a, i + 1)?;
    }
    Ok(cmd)
}

/// A reply inside an array: an error reply stays in its place (the rest were applied).
pub(crate) fn element(v: RedisValue) -> Result<Value> {
    match reply(v) {
        Err(e) if e.sqlstate.is_some() => Ok(Value::Failed(Box::new(e))),
        other => other,
    }
}

pub(crate) fn reply(v: RedisValue) -> Result<Value> {
    Ok(match v {
        RedisValue::Nil => Value::Null,
        RedisValue::Int(i) => Value::Int(i),
        RedisValue::BulkString(bytes) => match String::from_utf8(bytes) {
            Ok(s) => Value::Text(s),
            Err(e) => Value::Bytes(e.into_bytes()),
        },
        RedisValue::Array(items) | RedisValue::Set(items) => {
            Value::Array(items.into_iter().map(element).collect::<Result<_>>()?)
        }
        RedisValue::SimpleString(s) => Value::Text(s),
        RedisValue::Okay => Value::Text("OK".into()),
        RedisValue::Map(pairs) => {
            let mut flat = Vec::with_capacity(pairs.len() * 2);
            for (k, v) in pairs {
                flat.push(reply(k)?);
                flat.push(reply(v)?);
            }
            Value::Array(flat)
        }
        RedisValue::Attribute { data, .. } => reply(*data)?,
        RedisValue::Double(d) => Value::Float(d),
        RedisValue::Boolean(b) => Value::Bool(b),
        RedisValue::VerbatimString { text, .. } => Value::Text(text),
        RedisValue::BigNumber(n) => Value::Numeric(format!("{n:?}")),
        RedisValue::Push { data, .. } => {
            Value::Array(data.into_iter().map(reply).collect::<Result<_>>()?)
        }
        RedisValue::ServerError(e) => {
            let code = e.code().to_string();
            return Err(Error::new(
                ErrorCode::QueryFailed,
                format!("{code}: {}", e.details().unwrap_or("")),
            )
            .with_sqlstate(code));
        }
        other => Value::Text(format!("{other:?}")),
    })
}

impl RedisConnection {
    fn track(&self, name: &str) {
        match name.to_ascii_uppercase().as_str() {
            "MULTI" | "WATCH" => self.in_transaction.store(true, Ordering::Relaxed),
            "EXEC" | "DISCARD" | "UNWATCH" => self.in_transaction.store(false, Ordering::Relaxed),
            "SELECT" | "SUBSCRIBE" | "PSUBSCRIBE" | "SSUBSCRIBE" | "MONITOR" | "CLIENT"
            | "HELLO" | "AUTH" | "RESET" | "READONLY" | "READWRITE" | "SWAPDB" => {
                self.tainted.store(true, Ordering::Relaxed)
            }
            _ => {}
        }
    }

    pub async fn command(&self, name: &str, args: &[Value]) -> Result<Value> {
        let cmd = build_command(name, args)?;
        self.track(name);
        // The raw reply: an EXEC whose array holds one command's error must not turn into
        // one error for all (the others were applied).
        let mark = self.watch.written();
        let out = self
            .conn
            .clone()
            .req_packed_command(&cmd)
            .await
            .map_err(|e| self.failure(e, mark))?;
        reply(out)
    }

    pub async fn pipeline(&self, commands: &[(String, Vec<Value>)]) -> Result<Vec<Value>> {
        let mut pipe = redis::pipe();
        // Each command's error reply in its place: the others ran and must not look failed.
        pipe.ignore_errors();
        for (name, args) in commands {
            pipe.add_command(build_command(name, args)?);
        }
        for (name, _) in commands {
            self.track(name);
        }
        let mark = self.watch.written();
        let out: Vec<RedisValue> = pipe
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.failure(e, mark))?;
        out.into_iter().map(element).collect()
    }

    pub async fn ping(&self) -> Result<()> {
        let mark = self.watch.written();
        let _: RedisValue = redis::cmd("PING")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.failure(e, mark))?;
        Ok(())
    }

    fn failure(&self, e: redis::RedisError, mark: u64) -> Error {
        command_error(e, self.watch.written() != mark)
    }

    /// Redis closed the connection (or it failed): it must not be handed out.
    pub fn is_closed(&self) -> bool {
        self.watch.is_closed()
    }

    /// Leaves MULTI/WATCH so the next user starts clean.
    pub async fn reset(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        // DISCARD fails harmlessly when no MULTI is open; UNWATCH always succeeds on a live connection.
        let _: std::result::Result<RedisValue, _> =
            redis::cmd("DISCARD").query_async(&mut conn).await;
        let mark = self.watch.written();
        let _: RedisValue = redis::cmd("UNWATCH")
            .query_async(&mut conn)
            .await
            .map_err(|e| self.failure(e, mark))?;
        self.in_transaction.store(false, Ordering::Relaxed);
        Ok(())
    }
}
