//! The filter service: the stateless anti-spam/content filter chain between spool and filers.
//!
//! Not built yet (TODO(#8)): only the entry point exists, so the platform can be assembled.

pub mod auth;
pub mod classifier;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// This service's validated settings.
#[derive(Debug, Clone, Default)]
pub struct Settings {}

/// The already-bound listeners of this service.
#[derive(Debug, Default)]
pub struct Listeners {
    /// The listeners.
    pub listeners: Vec<TcpListener>,
}

/// Why the service stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener failed for good.
    #[error("accept failed: {0}")]
    Accept(#[source] std::io::Error),
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    settings: std::sync::Arc<Settings>,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let _ = (settings, listeners);
    shutdown.cancelled().await;
    Ok(())
}
