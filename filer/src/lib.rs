//! The filer: the storage server.
//!
//! Mailboxes are Maildirs on this host's local disk. Spools deliver over LMTP (only from
//! `trust.spool_networks`); access proxies read over IMAP and POP3 with the trusted proxy login
//! (only from `trust.proxy_networks`). Nothing else reaches the disk.

mod settings;
pub mod store;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use settings::{FileConfig, Settings};

/// The already-bound listeners of one filer.
#[derive(Debug, Default)]
pub struct Listeners {
    /// LMTP from spools.
    pub lmtp: Option<TcpListener>,
    /// IMAP from access proxies.
    pub imap: Option<TcpListener>,
    /// POP3 from access proxies.
    pub pop3: Option<TcpListener>,
}

/// Why the filer stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener failed for good.
    #[error("accept failed: {0}")]
    Accept(#[source] std::io::Error),
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    settings: Arc<Settings>,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    // TODO(#3): LMTP delivery, the index and POP3; TODO(#4): IMAP.
    let _keep = (settings, listeners);
    shutdown.cancelled().await;
    Ok(())
}
