//! One error type with stable codes. The only place that maps to `napi::Error`.

use std::fmt;

/// Stable error codes, surfaced to JavaScript as `err.code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InvalidArgument,
    PoolTimeout,
    PoolExhausted,
    PoolClosed,
    ConnectFailed,
    QueryFailed,
    /// The statement ran past its `timeoutMs` and was cancelled.
    QueryTimeout,
    /// The connection died under the statement; `sent` says whether it may have run.
    ConnectionLost,
    /// The caller's `AbortSignal` fired (`ABORT_ERR`, as Node's own APIs reject).
    Aborted,
    ModelNotFound,
    ModelFormat,
    ModelEvicted,
    DeviceUnavailable,
    DeviceOutOfMemory,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 15] = [
        ErrorCode::InvalidArgument,
        ErrorCode::PoolTimeout,
        ErrorCode::PoolExhausted,
        ErrorCode::PoolClosed,
        ErrorCode::ConnectFailed,
        ErrorCode::QueryFailed,
        ErrorCode::QueryTimeout,
        ErrorCode::ConnectionLost,
        ErrorCode::Aborted,
        ErrorCode::ModelNotFound,
        ErrorCode::ModelFormat,
        ErrorCode::ModelEvicted,
        ErrorCode::DeviceUnavailable,
        ErrorCode::DeviceOutOfMemory,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "INVALID_ARGUMENT",
            ErrorCode::PoolTimeout => "POOL_TIMEOUT",
            ErrorCode::PoolExhausted => "POOL_EXHAUSTED",
            ErrorCode::PoolClosed => "POOL_CLOSED",
            ErrorCode::ConnectFailed => "CONNECT_FAILED",
            ErrorCode::QueryFailed => "QUERY_FAILED",
            ErrorCode::QueryTimeout => "QUERY_TIMEOUT",
            ErrorCode::ConnectionLost => "CONNECTION_LOST",
            ErrorCode::Aborted => "ABORT_ERR",
            ErrorCode::ModelNotFound => "MODEL_NOT_FOUND",
            ErrorCode::ModelFormat => "MODEL_FORMAT",
            ErrorCode::ModelEvicted => "MODEL_EVICTED",
            ErrorCode::DeviceUnavailable => "DEVICE_UNAVAILABLE",
            ErrorCode::DeviceOutOfMemory => "DEVICE_OUT_OF_MEMORY",
            ErrorCode::Internal => "INTERNAL",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl AsRef<str> for ErrorCode {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

/// Which step of an acquire ran out of time or failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    Wait,
    Connect,
    Validate,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Wait => "wait",
            Phase::Connect => "connect",
            Phase::Validate => "validate",
        }
    }
}

/// Every failure in quartermaster. The message is safe to show: secrets are redacted
/// before an `Error` is built (see [`redact_secrets`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Error {
    pub code: ErrorCode,
    pub message: String,
    /// PostgreSQL SQLSTATE for `QUERY_FAILED` (and some `CONNECT_FAILED`).
    pub sqlstate: Option<String>,
    /// Acquire phase for pool timeouts and connect failures.
    pub phase: Option<Phase>,
    /// `CONNECTION_LOST`: `false` when the statement provably never reached the server
    /// (nothing was written after it was queued), `true` when it may have run.
    pub sent: Option<bool>,
    /// `QUERY_TIMEOUT`: the bound that expired, in milliseconds.
    pub timeout_ms: Option<f64>,
    /// A COMMIT that the server answered with ROLLBACK: nothing in the transaction applied.
    pub rolled_back: bool,
    /// A connect failure that retrying cannot fix (bad credentials, TLS refused).
    pub(crate) permanent: bool,
    /// A connect attempt that ran out of time rather than being refused.
    pub(crate) timed_out: bool,
    /// The connection can no longer be trusted (protocol out of step, host demoted).
    pub(crate) desync: bool,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error {
            code,
            message: redact_secrets(&message.into()),
            sqlstate: None,
            phase: None,
            sent: None,
            timeout_ms: None,
            rolled_back: false,
            permanent: false,
            timed_out: false,
            desync: false,
        }
    }

    /// The connection died under a statement; `sent` says whether it may have run.
    pub fn connection_lost(sent: bool, detail: impl fmt::Display) -> Self {
        let what = if sent {
            "it may have run: it is not retried, check before running it again"
        } else {
            "it was never sent"
        };
        let mut e = Error::new(
            ErrorCode::ConnectionLost,
            format!("the connection was lost under the statement ({detail}); {what}"),
        );
        e.sent = Some(sent);
        e
    }

    /// True for a lost connection whose statement provably never reached the server.
    pub fn never_sent(&self) -> bool {
        self.code == ErrorCode::ConnectionLost && self.sent == Some(false)
    }

    pub fn with_sent(mut self, sent: bool) -> Self {
        self.sent = Some(sent);
        self
    }

    pub(crate) fn permanent(mut self) -> Self {
        self.permanent = true;
        self
    }

    pub(crate) fn timed_out(mut self) -> Self {
        self.timed_out = true;
        self
    }

    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::InvalidArgument, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::Internal, message)
    }

    pub fn with_sqlstate(mut self, sqlstate: impl Into<String>) -> Self {
        self.sqlstate = Some(sqlstate.into());
        self
    }

    pub fn with_phase(mut self, phase: Phase) -> Self {
        self.phase = Some(phase);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for Error {}

/// Removes passwords from anything that may carry a connection string:
/// `scheme://user:secret@host` becomes `scheme://user:***@host`, and
/// `password=secret` (libpq key/value form) becomes `password=***`.
pub fn redact_secrets(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("://") {
        let (head, tail) = rest.split_at(pos + 3);
        out.push_str(head);
        let authority_end = tail
            .find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..authority_end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..colon]);
                        out.push_str(":***");
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[authority_end..];
    }
    out.push_str(rest);
    redact_key_value(&out)
}

fn redact_key_value(text: &str) -> String {
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    let mut search = 0;
    while let Some(found) = lower[search..].find("password=") {
        let start = search + found + "password=".len();
        let end = text[start..]
            .find(|c: char| c.is_whitespace() || c == '&' || c == ';')
            .map_or(text.len(), |e| start + e);
        out.push_str(&text[last..start]);
        out.push_str("***");
        last = end;
        search = end;
    }
    out.push_str(&text[last..]);
    out
}

#[cfg(feature = "napi")]
impl From<Error> for napi::Error {
    fn from(err: Error) -> Self {
        napi::Error::new(napi::Status::GenericFailure, err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_url_passwords() {
        assert_eq!(
            redact_secrets("failed to reach postgres://trader:hunter2@db:5432/x?sslmode=require"),
            "failed to reach postgres://trader:***@db:5432/x?sslmode=require"
        );
        assert_eq!(
            redact_secrets("redis://:s3cr3t@cache:6379/0"),
            "redis://:***@cache:6379/0"
        );
        assert_eq!(
            redact_secrets("postgres://user@host/db"),
            "postgres://user@host/db"
        );
    }

    #[test]
    fn redacts_key_value_passwords() {
        assert_eq!(
            redact_secrets("host=db user=a password=hunter2 dbname=x"),
            "host=db user=a password=*** dbname=x"
        );
    }

    #[test]
    fn error_messages_are_redacted_at_construction() {
        let e = Error::new(ErrorCode::ConnectFailed, "bad postgres://u:pw@h/d");
        assert!(!e.message.contains("pw@"));
        assert!(!format!("{e:?}").contains(":pw@"));
    }
}
