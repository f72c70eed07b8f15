//! How long one call may take, and whether its caller gave up: a deadline (`timeoutMs`,
//! `statementTimeoutMs`) and a cancellation (an `AbortSignal`). Every wait and every
//! statement of the call is bounded by them.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::error::{Error, ErrorCode};

/// Which bound ended the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fired {
    Timeout,
    Aborted,
}

#[derive(Debug, Clone, Default)]
pub struct Bounds {
    pub deadline: Option<Instant>,
    /// The `timeoutMs` the deadline came from, for the error.
    pub timeout: Option<Duration>,
    pub cancel: Option<CancellationToken>,
}

impl Bounds {
    pub fn new(timeout: Option<Duration>, cancel: Option<CancellationToken>) -> Bounds {
        Bounds {
            deadline: timeout.map(|t| Instant::now() + t),
            timeout,
            cancel,
        }
    }

    pub fn is_set(&self) -> bool {
        self.deadline.is_some() || self.cancel.is_some()
    }

    /// The tighter of two bounds (a lease-wide bound and a statement's own).
    pub fn within(&self, outer: &Bounds) -> Bounds {
        let (deadline, timeout) = match (self.deadline, outer.deadline) {
            (Some(a), Some(b)) if b < a => (Some(b), outer.timeout),
            (Some(a), _) => (Some(a), self.timeout),
            (None, b) => (b, outer.timeout),
        };
        Bounds {
            deadline,
            timeout,
            cancel: self.cancel.clone().or_else(|| outer.cancel.clone()),
        }
    }

    /// Already over: cancelled, or past the deadline.
    pub fn check(&self) -> Option<Fired> {
        if self.cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
            return Some(Fired::Aborted);
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Some(Fired::Timeout);
        }
        None
    }

    /// Resolves when a bound fires; never when there is none.
    pub async fn fired(&self) -> Fired {
        let cancelled = async {
            match &self.cancel {
                Some(c) => c.cancelled().await,
                None => std::future::pending().await,
            }
        };
        let expired = async {
            match self.deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = cancelled => Fired::Aborted,
            () = expired => Fired::Timeout,
        }
    }

    /// The error for a call ended by `fired`. `what` says where it was stopped.
    pub fn error(&self, fired: Fired, what: &str) -> Error {
        match fired {
            Fired::Aborted => Error::new(
                ErrorCode::Aborted,
                format!("The operation was aborted ({what})"),
            ),
            Fired::Timeout => {
                let ms = self.timeout.map_or(0.0, |t| t.as_secs_f64() * 1000.0);
                let mut e = Error::new(
                    ErrorCode::QueryTimeout,
                    format!("timed out after timeoutMs ({ms} ms) {what}"),
                );
                e.timeout_ms = Some(ms);
                e
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_tighter_bound_wins_and_fires() {
        let token = CancellationToken::new();
        let outer = Bounds::new(Some(Duration::from_millis(10)), Some(token.clone()));
        let inner = Bounds::new(Some(Duration::from_secs(60)), None);
        let both = inner.within(&outer);
        assert_eq!(both.timeout, Some(Duration::from_millis(10)));
        assert_eq!(both.fired().await, Fired::Timeout);
        let e = both.error(Fired::Timeout, "running");
        assert_eq!(e.code, ErrorCode::QueryTimeout);
        assert_eq!(e.timeout_ms, Some(10.0));
        let aborted = Bounds::new(None, Some(token.clone()));
        token.cancel();
        assert_eq!(aborted.check(), Some(Fired::Aborted));
        assert_eq!(aborted.fired().await, Fired::Aborted);
        assert!(!Bounds::default().is_set());
    }
}
