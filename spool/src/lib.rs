//! The spool: the inbound MX.
//!
//! - **In:** SMTP from the internet on the MX listener, for hosted domains only: every
//!   recipient is checked against the location database at RCPT time (unknown: `550 5.1.1`;
//!   database unreachable: `451 4.3.0`; other domains and relay syntax: `554 5.7.1`), aliases
//!   are expanded, and a message is on disk, fsynced, before its `250`. Mail returning from the
//!   filter comes in on the reinjection listener, from `trust.spool_networks` only.
//! - **Queue:** [`common::queue`], in `spool.queue_dir`; re-read at start after a crash.
//! - **Out:** the queue runner ([`common::queue::runner`]) groups each message's recipients by filer and delivers over
//!   LMTP, one reply per recipient; 4xx and unreachable filers retry with backoff, 5xx bounce
//!   (RFC 3464) to a non-null sender. New mail from the MX listener goes to the filter first
//!   when one is configured (with XFORWARD, so the filter sees the real client); it is then
//!   settled for the spool, and comes back on the reinjection listener as a new entry.
//! - **Trusts:** nothing from the MX listener; the reinjection listener trusts its peers'
//!   envelopes (they are the filter).
//!
//! The session (`session/`, one file per verb) runs on the SMTP core of `common::smtp`.

mod deliver;
mod listener;
mod session;
mod settings;

use std::sync::Arc;

use common::location::Directory;
use common::queue::runner::{self, Runner, RunnerSettings};
use common::queue::{Queue, StoreError};
use common::tls::{Identity, TlsError};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

pub use settings::{FileConfig, PeerRoute, Settings};

/// The already-bound listeners of the spool.
#[derive(Debug, Default)]
pub struct Listeners {
    /// The MX listener (SMTP from the internet).
    pub smtp: Option<TcpListener>,
    /// The reinjection listener (SMTP from the filter, trusted networks only).
    pub reinject: Option<TcpListener>,
}

/// Why the spool stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener failed for good.
    #[error("accept failed: {0}")]
    Accept(#[source] std::io::Error),
    /// The queue directory could not be opened or read.
    #[error("queue: {0}")]
    Queue(#[from] StoreError),
    /// No TLS certificate could be loaded for STARTTLS.
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
}

/// What every session and the queue runner share.
pub(crate) struct Spool {
    pub(crate) settings: Arc<Settings>,
    pub(crate) directory: Arc<dyn Directory>,
    /// The queue and its delivery loop.
    pub(crate) runner: Arc<Runner>,
    /// STARTTLS on the MX listener; `None` when turned off.
    pub(crate) tls: Option<TlsAcceptor>,
    pub(crate) per_ip: Arc<listener::PerIp>,
    /// Clients that passed the early-talker test recently.
    pub(crate) greet_passed: listener::GreetPassed,
}

/// Serves the listeners and runs the queue until `shutdown` is cancelled. The queue is
/// recovered first, so mail accepted before a crash is delivered.
pub async fn serve(
    settings: Arc<Settings>,
    directory: Arc<dyn Directory>,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let dir = settings.queue_dir.clone();
    let queue = blocking(move || Ok(Queue::open(&dir)?)).await?;
    let tls = if settings.starttls {
        let shared = settings.shared.clone();
        let config = blocking(move || {
            Ok::<_, ServeError>(Identity::from_settings(&shared)?.server_config()?)
        })
        .await?;
        Some(TlsAcceptor::from(config))
    } else {
        None
    };
    let transport = Arc::new(deliver::Filers::new(settings.clone(), directory.clone()));
    let runner = Arc::new(Runner::new(
        queue,
        RunnerSettings {
            service: "spool",
            hostname: settings.shared.hostname.clone(),
            retry_min: settings.retry_min,
            retry_max: settings.retry_max,
            queue_lifetime: settings.queue_lifetime,
            max_deliveries: settings.max_deliveries,
            shutdown_grace: settings.shared.shutdown_grace,
        },
        transport,
    ));
    let (entries, held) = runner.recover().await?;
    tracing::info!(entries, held, "queue recovered");
    let spool = Arc::new(Spool {
        settings: settings.clone(),
        directory,
        runner: runner.clone(),
        tls,
        per_ip: Arc::default(),
        greet_passed: listener::GreetPassed::default(),
    });

    let mut tasks = tokio::task::JoinSet::new();
    {
        let (r, t) = (runner.clone(), shutdown.clone());
        tasks.spawn(async move {
            runner::run(r, t).await;
            Ok(())
        });
    }
    if let Some(l) = listeners.smtp {
        tasks.spawn(listener::serve_mx(spool.clone(), l, shutdown.clone()));
    }
    if let Some(l) = listeners.reinject {
        tasks.spawn(listener::serve_reinject(spool.clone(), l, shutdown.clone()));
    }
    while let Some(r) = tasks.join_next().await {
        let e = match r {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(e) => std::io::Error::other(e),
        };
        shutdown.cancel();
        while tasks.join_next().await.is_some() {}
        return Err(ServeError::Accept(e));
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ServeError> + Send + 'static,
) -> Result<T, ServeError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServeError::Accept(std::io::Error::other(e)))?
}
