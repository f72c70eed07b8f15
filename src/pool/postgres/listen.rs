//! A PostgreSQL connection given to LISTEN: channel names quoted as identifiers (never SQL
//! built from them), the server's notifications in the order it sent them.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio_postgres::Notification;

use super::connect::Connector;
use super::PgConnection;
use crate::error::Result;

pub struct PgSession {
    conn: PgConnection,
    notifications: UnboundedReceiver<Notification>,
}

/// `name` as a quoted SQL identifier: `"fills"`, `"a""b"` for `a"b`.
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl PgSession {
    pub async fn open(connector: &Arc<Connector>, per_host: Duration) -> Result<PgSession> {
        let (tx, notifications) = unbounded_channel();
        let conn = connector.connect_with(per_host, Some(tx)).await?;
        Ok(PgSession {
            conn,
            notifications,
        })
    }

    pub async fn listen(&self, channel: &str) -> Result<()> {
        self.conn
            .utility(&format!("LISTEN {}", quote_identifier(channel)))
            .await
    }

    pub async fn unlisten(&self, channel: &str) -> Result<()> {
        self.conn
            .utility(&format!("UNLISTEN {}", quote_identifier(channel)))
            .await
    }

    pub async fn ping(&self) -> Result<()> {
        self.conn.ping().await
    }

    /// The next notification as (channel, payload); `None` once the connection is gone.
    pub async fn next(&mut self) -> Option<(String, String)> {
        self.notifications
            .recv()
            .await
            .map(|n| (n.channel().to_string(), n.payload().to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_are_quoted_identifiers() {
        assert_eq!(quote_identifier("fills"), "\"fills\"");
        assert_eq!(
            quote_identifier("x\"; drop table t; --"),
            "\"x\"\"; drop table t; --\""
        );
    }
}
