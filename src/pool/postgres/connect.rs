//! Opening PostgreSQL connections: every host of a multi-host URL in turn (shuffled with
//! `load_balance_hosts=random`), TLS negotiated here with rustls, libpq's
//! `target_session_attrs` (any, read-write, read-only, primary, standby, prefer-standby), and
//! the byte stream watched by [`Wire`] before tokio-postgres sees it.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rand::seq::SliceRandom;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc::UnboundedSender;
use tokio_postgres::config::Host;
use tokio_postgres::{NoTls, Notification, SimpleQueryMessage};

use super::wire::Wire;
use super::{describe, PgConnection};
use crate::error::{Error, ErrorCode, Phase, Result};
use crate::pool::socket::{tcp, Stream};
use crate::pool::tls::{TlsMode, TlsOptions};

/// libpq's `target_session_attrs`: which kind of server a connection must reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionTarget {
    Any,
    ReadWrite,
    ReadOnly,
    Primary,
    Standby,
    /// A standby if any host is one, else any host.
    PreferStandby,
}

impl SessionTarget {
    fn parse(value: &str) -> Result<SessionTarget> {
        Ok(match value {
            "any" => SessionTarget::Any,
            "read-write" => SessionTarget::ReadWrite,
            "read-only" => SessionTarget::ReadOnly,
            "primary" => SessionTarget::Primary,
            "standby" => SessionTarget::Standby,
            "prefer-standby" => SessionTarget::PreferStandby,
            other => {
                return Err(Error::invalid_argument(format!(
                    "target_session_attrs must be any, read-write, read-only, primary, standby or prefer-standby (got {other:?})"
                )))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SessionTarget::Any => "any",
            SessionTarget::ReadWrite => "read-write",
            SessionTarget::ReadOnly => "read-only",
            SessionTarget::Primary => "primary",
            SessionTarget::Standby => "standby",
            SessionTarget::PreferStandby => "prefer-standby",
        }
    }
}

/// One entry of the host list: where to connect, and the name TLS verifies.
#[derive(Debug, Clone)]
struct HostSpec {
    address: Address,
    /// Host name for TLS (SNI and verification), when the host was given by name.
    tls_name: Option<String>,
    /// `host:port` as shown in status and errors.
    label: String,
}

#[derive(Debug, Clone)]
enum Address {
    Tcp { host: String, port: u16 },
    Ip(SocketAddr),
    Unix(PathBuf),
}

/// Where one open connection went, for its cancel requests.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    address: ResolvedAddress,
    tls_name: Option<String>,
    pub label: String,
}

#[derive(Debug, Clone)]
enum ResolvedAddress {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// Everything needed to open connections to one PostgreSQL URL.
pub struct Connector {
    /// Authentication, database and session settings (TLS and hosts are handled here).
    config: tokio_postgres::Config,
    hosts: Vec<HostSpec>,
    pub target: SessionTarget,
    load_balance: bool,
    tls: Option<(TlsMode, tokio_rustls::TlsConnector)>,
    statement_cache: bool,
    /// `statementTimeoutMs`, enforced by the server (`statement_timeout`).
    pub statement_timeout: Option<Duration>,
}

/// Splits our own URL parameters off a PostgreSQL URL and validates the rest.
/// Errors never echo the URL (it may hold a password).
pub fn parse_url(url: &str) -> Result<(tokio_postgres::Config, SessionTarget, bool)> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut kept = Vec::new();
    let mut target = SessionTarget::Any;
    let mut load_balance = false;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "target_session_attrs" => target = SessionTarget::parse(value)?,
            "load_balance_hosts" => {
                load_balance = match value {
                    "random" => true,
                    "disable" => false,
                    other => {
                        return Err(Error::invalid_argument(format!(
                            "load_balance_hosts must be disable or random (got {other:?})"
                        )))
                    }
                }
            }
            _ => kept.push(pair),
        }
    }
    let cleaned = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    let config = cleaned
        .parse::<tokio_postgres::Config>()
        .map_err(|e| Error::invalid_argument(format!("url is not a valid PostgreSQL URL: {e}")))?;
    Ok((config, target, load_balance))
}

impl Connector {
    pub fn new(
        url: &str,
        tls: Option<&TlsOptions>,
        statement_cache: bool,
        statement_timeout: Duration,
    ) -> Result<Connector> {
        let (mut config, target, load_balance) = parse_url(url)?;
        let hosts = host_list(&config)?;
        if config.get_application_name().is_none() {
            config.application_name("quartermaster");
        }
        let statement_timeout = (!statement_timeout.is_zero()).then_some(statement_timeout);
        if let Some(t) = statement_timeout {
            // The server bounds each statement itself, cancelling exactly that one: pipelined
            // neighbours are unaffected.
            let setting = format!("-c statement_timeout={}", t.as_millis().max(1));
            let options = match config.get_options() {
                Some(existing) if !existing.trim().is_empty() => format!("{existing} {setting}"),
                _ => setting,
            };
            config.options(&options);
        }
        // TLS is negotiated before tokio-postgres sees the stream.
        config.ssl_mode(tokio_postgres::config::SslMode::Disable);
        let tls = match tls {
            Some(t) if t.mode != TlsMode::Disable => Some((
                t.mode,
                tokio_rustls::TlsConnector::from(Arc::new(t.client_config()?)),
            )),
            _ => None,
        };
        Ok(Connector {
            config,
            hosts,
            target,
            load_balance,
            tls,
            statement_cache,
            statement_timeout,
        })
    }

    /// Opens one connection: each host in turn, each bounded by `per_host`. For
    /// `prefer-standby`, standbys are tried first, then any host.
    pub async fn connect(self: &Arc<Self>, per_host: Duration) -> Result<PgConnection> {
        self.connect_with(per_host, None).await
    }

    /// [`connect`](Self::connect), with the server's notifications (LISTEN) forwarded to
    /// `notifications`; the sender is dropped when the connection ends.
    pub async fn connect_with(
        self: &Arc<Self>,
        per_host: Duration,
        notifications: Option<UnboundedSender<Notification>>,
    ) -> Result<PgConnection> {
        let mut order: Vec<&HostSpec> = self.hosts.iter().collect();
        if self.load_balance {
            order.shuffle(&mut rand::rng());
        }
        let passes: &[SessionTarget] = match self.target {
            SessionTarget::PreferStandby => &[SessionTarget::Standby, SessionTarget::Any],
            other => &[other][..],
        };
        let mut last = None;
        for &wanted in passes {
            for host in &order {
                match self
                    .connect_host(host, wanted, per_host, notifications.clone())
                    .await
                {
                    Ok(conn) => return Ok(conn),
                    Err(e) => last = Some(e),
                }
            }
        }
        Err(last.unwrap_or_else(|| connect_failed("the URL names no host".into())))
    }

    async fn connect_host(
        self: &Arc<Self>,
        host: &HostSpec,
        wanted: SessionTarget,
        per_host: Duration,
        notifications: Option<UnboundedSender<Notification>>,
    ) -> Result<PgConnection> {
        let attempt = async {
            let (stream, endpoint) = self.open_stream(host).await?;
            let (wire, state) = Wire::new(stream);
            let (client, connection) = self
                .config
                .connect_raw(wire, NoTls)
                .await
                .map_err(|e| startup_error(&e, &host.label))?;
            let driver = tokio::spawn(super::drive(connection, notifications)).abort_handle();
            let conn = PgConnection::new(
                client,
                driver,
                state,
                endpoint,
                self.statement_cache,
                self.target,
                Arc::clone(self),
            );
            check_role(&conn, wanted, &host.label).await?;
            Ok(conn)
        };
        match tokio::time::timeout(per_host, attempt).await {
            Ok(outcome) => outcome,
            Err(_) => Err(Error::new(
                ErrorCode::ConnectFailed,
                format!(
                    "PostgreSQL at {} did not complete startup within connectTimeoutMs ({} ms)",
                    host.label,
                    per_host.as_millis()
                ),
            )
            .with_phase(Phase::Connect)
            .timed_out()),
        }
    }

    async fn open_stream(&self, host: &HostSpec) -> Result<(Stream, Endpoint)> {
        let (stream, address) = match &host.address {
            Address::Unix(dir) => {
                let path = dir.clone();
                let s = UnixStream::connect(&path)
                    .await
                    .map_err(|e| io_failed(&host.label, e))?;
                (Stream::Unix(s), ResolvedAddress::Unix(path))
            }
            Address::Ip(addr) => {
                let s = tcp(*addr).await.map_err(|e| io_failed(&host.label, e))?;
                (Stream::Tcp(s), ResolvedAddress::Tcp(*addr))
            }
            Address::Tcp { host: name, port } => {
                let addrs = tokio::net::lookup_host((name.as_str(), *port))
                    .await
                    .map_err(|e| io_failed(&host.label, e))?;
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
                let mut found = None;
                for addr in addrs {
                    match tcp(addr).await {
                        Ok(s) => {
                            found = Some((s, addr));
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let (s, addr) = found.ok_or_else(|| io_failed(&host.label, last))?;
                (Stream::Tcp(s), ResolvedAddress::Tcp(addr))
            }
        };
        let endpoint = Endpoint {
            address,
            tls_name: host.tls_name.clone(),
            label: host.label.clone(),
        };
        let stream = self.negotiate_tls(stream, &endpoint).await?;
        Ok((stream, endpoint))
    }

    /// Sends SSLRequest and upgrades to TLS when the pool uses it (`prefer` falls back to
    /// plain text when the server declines).
    async fn negotiate_tls(&self, stream: Stream, endpoint: &Endpoint) -> Result<Stream> {
        let Some((mode, connector)) = &self.tls else {
            return Ok(stream);
        };
        let Stream::Tcp(mut tcp) = stream else {
            return Ok(stream); // PostgreSQL has no TLS over Unix sockets
        };
        let label = &endpoint.label;
        tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
            .await
            .map_err(|e| io_failed(label, e))?;
        let answer = tcp.read_u8().await.map_err(|e| io_failed(label, e))?;
        match answer {
            b'S' => {}
            b'N' if *mode == TlsMode::Prefer => return Ok(Stream::Tcp(tcp)),
            b'N' => {
                return Err(connect_failed(format!(
                    "PostgreSQL at {label} does not accept TLS connections (tls.mode is {mode:?})"
                ))
                .permanent())
            }
            _ => {
                return Err(connect_failed(format!(
                    "PostgreSQL at {label} answered the TLS request with an unexpected byte"
                )))
            }
        }
        let name = match (&endpoint.tls_name, &endpoint.address) {
            (Some(n), _) => ServerName::try_from(n.clone()).map_err(|_| {
                connect_failed(format!("{n:?} is not a valid TLS server name")).permanent()
            })?,
            (None, ResolvedAddress::Tcp(addr)) => ServerName::IpAddress(addr.ip().into()),
            (None, ResolvedAddress::Unix(_)) => unreachable_unix(),
        };
        let tls = connector.connect(name, tcp).await.map_err(|e| {
            connect_failed(format!(
                "TLS handshake with PostgreSQL at {label} failed: {e}"
            ))
            .permanent()
        })?;
        Ok(Stream::Tls(Box::new(tls)))
    }

    /// Asks the server to cancel what `token`'s session is running, over a new connection
    /// to the same address (TLS when the pool uses it).
    pub(crate) async fn cancel(
        &self,
        token: &tokio_postgres::CancelToken,
        endpoint: &Endpoint,
    ) -> Result<()> {
        let label = &endpoint.label;
        let stream = match &endpoint.address {
            ResolvedAddress::Tcp(addr) => {
                Stream::Tcp(tcp(*addr).await.map_err(|e| io_failed(label, e))?)
            }
            ResolvedAddress::Unix(path) => Stream::Unix(
                UnixStream::connect(path)
                    .await
                    .map_err(|e| io_failed(label, e))?,
            ),
        };
        let stream = self.negotiate_tls(stream, endpoint).await?;
        token.cancel_query_raw(stream, NoTls).await.map_err(|e| {
            connect_failed(format!(
                "cancel request to {label} failed: {}",
                describe(&e)
            ))
        })
    }
}

fn unreachable_unix() -> ServerName<'static> {
    // `negotiate_tls` returns before this for Unix sockets.
    ServerName::IpAddress(IpAddr::from([127, 0, 0, 1]).into())
}

/// Expands the URL's hosts, host addresses and ports as libpq does.
fn host_list(config: &tokio_postgres::Config) -> Result<Vec<HostSpec>> {
    let hosts = config.get_hosts();
    let addrs = config.get_hostaddrs();
    let ports = config.get_ports();
    let count = hosts.len().max(addrs.len());
    if count == 0 {
        return Err(Error::invalid_argument("url names no PostgreSQL host"));
    }
    if !hosts.is_empty() && !addrs.is_empty() && hosts.len() != addrs.len() {
        return Err(Error::invalid_argument(
            "url has a different number of host and hostaddr entries",
        ));
    }
    if ports.len() > 1 && ports.len() != count {
        return Err(Error::invalid_argument(
            "url has a different number of hosts and ports",
        ));
    }
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        let spec = match (hosts.get(i), addrs.get(i)) {
            (_, Some(ip)) => HostSpec {
                address: Address::Ip(SocketAddr::new(*ip, port)),
                tls_name: match hosts.get(i) {
                    Some(Host::Tcp(name)) => Some(name.clone()),
                    _ => None,
                },
                label: format!("{ip}:{port}"),
            },
            (Some(Host::Tcp(name)), None) => match name.parse::<IpAddr>() {
                Ok(ip) => HostSpec {
                    address: Address::Ip(SocketAddr::new(ip, port)),
                    tls_name: None,
                    label: format!("{name}:{port}"),
                },
                Err(_) => HostSpec {
                    address: Address::Tcp {
                        host: name.clone(),
                        port,
                    },
                    tls_name: Some(name.clone()),
                    label: format!("{name}:{port}"),
                },
            },
            (Some(Host::Unix(dir)), None) => HostSpec {
                address: Address::Unix(dir.join(format!(".s.PGSQL.{port}"))),
                tls_name: None,
                label: format!("{}:{port}", dir.display()),
            },
            (None, None) => unreachable!("count is the longer list"),
        };
        out.push(spec);
    }
    Ok(out)
}

/// Accepts the connection only if its server is the kind `wanted` names. Read from the
/// parameters PostgreSQL 14+ reports at startup, else asked.
async fn check_role(conn: &PgConnection, wanted: SessionTarget, label: &str) -> Result<()> {
    let (read_only, standby) = match wanted {
        SessionTarget::Any | SessionTarget::PreferStandby => return Ok(()),
        SessionTarget::ReadWrite | SessionTarget::ReadOnly => {
            let hot = conn.wire().parameter("in_hot_standby");
            let default_ro = conn.wire().parameter("default_transaction_read_only");
            let read_only = match (hot.as_deref(), default_ro.as_deref()) {
                (Some(h), Some(d)) => h == "on" || d == "on",
                _ => ask(conn, "SHOW transaction_read_only").await? == "on",
            };
            (read_only, read_only)
        }
        SessionTarget::Primary | SessionTarget::Standby => {
            let standby = match conn.wire().parameter("in_hot_standby").as_deref() {
                Some(h) => h == "on",
                None => ask(conn, "SELECT pg_catalog.pg_is_in_recovery()").await? == "t",
            };
            (standby, standby)
        }
    };
    let accepted = match wanted {
        SessionTarget::ReadWrite => !read_only,
        SessionTarget::ReadOnly => read_only,
        SessionTarget::Primary => !standby,
        SessionTarget::Standby => standby,
        SessionTarget::Any | SessionTarget::PreferStandby => true,
    };
    if accepted {
        return Ok(());
    }
    let what = if standby { "a standby" } else { "a primary" };
    Err(connect_failed(format!(
        "PostgreSQL at {label} is {what} (read-only: {read_only}), not {} as target_session_attrs asks",
        wanted.as_str()
    )))
}

async fn ask(conn: &PgConnection, sql: &str) -> Result<String> {
    let messages = conn
        .client()
        .simple_query(sql)
        .await
        .map_err(|e| connect_failed(describe(&e)))?;
    for m in messages {
        if let SimpleQueryMessage::Row(row) = m {
            return Ok(row.get(0).unwrap_or("").to_string());
        }
    }
    Err(connect_failed(format!("{sql} returned no row")))
}

fn connect_failed(message: String) -> Error {
    Error::new(
        ErrorCode::ConnectFailed,
        format!("could not connect to PostgreSQL: {message}"),
    )
    .with_phase(Phase::Connect)
}

fn io_failed(label: &str, e: io::Error) -> Error {
    connect_failed(format!("{label}: {e}"))
}

fn startup_error(e: &tokio_postgres::Error, label: &str) -> Error {
    let mut err = connect_failed(format!("{label}: {}", describe(e)));
    if let Some(db) = e.as_db_error() {
        err = err.with_sqlstate(db.code().code());
        // Bad credentials, a missing database or no permission: retrying cannot help.
        if matches!(db.code().code(), "28P01" | "28000" | "3D000" | "42501") {
            err = err.permanent();
        }
    }
    err
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_url_parameters_are_taken_off_and_validated() {
        let (config, target, lb) = parse_url(
            "postgres://u:p@h1:5432,h2:5433/db?target_session_attrs=prefer-standby&load_balance_hosts=random&application_name=x",
        )
        .unwrap();
        assert_eq!(target, SessionTarget::PreferStandby);
        assert!(lb);
        assert_eq!(config.get_application_name(), Some("x"));
        let hosts = host_list(&config).unwrap();
        let labels: Vec<_> = hosts.iter().map(|h| h.label.as_str()).collect();
        assert_eq!(labels, ["h1:5432", "h2:5433"]);
        let e = parse_url("postgres://u:hunter2@h/db?target_session_attrs=writer").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert!(!e.message.contains("hunter2"));
    }

    #[test]
    fn one_port_serves_every_host_and_ip_hosts_skip_lookup() {
        let (config, _, _) = parse_url("postgresql://127.0.0.1,localhost:6000/db").unwrap();
        let hosts = host_list(&config).unwrap();
        assert!(matches!(hosts[0].address, Address::Ip(_)));
        assert!(matches!(hosts[1].address, Address::Tcp { .. }));
        assert_eq!(hosts[1].label, "localhost:6000");
    }
}
