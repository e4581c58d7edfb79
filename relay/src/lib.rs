//! The relay: authenticated submission (RFC 6409, RFC 8314) and outbound delivery.
//!
//! - **In:** SMTP submission on the STARTTLS listener (587) and the implicit-TLS listener
//!   (465). AUTH (RFC 4954: PLAIN, LOGIN, SCRAM-SHA-256, with initial responses) only over
//!   TLS (`538 5.7.11` otherwise), except from loopback when `plaintext_on_loopback` is set;
//!   MAIL before AUTH is `530 5.7.0`. A user may send only as their own address or an alias
//!   that points to them, in the envelope and in the single `From:` header (`553 5.7.1`);
//!   per-user limits on messages per hour (`450 4.7.1`) and recipients per message
//!   (`452 4.5.3`). Failed logins slow down per address and account ([`common::throttle`],
//!   shared with the access proxy).
//! - **Queue:** [`common::queue`] in `relay.queue_dir`, the same code as the spool's: the
//!   message is signed (DKIM, when its `From:` domain has a key), written and fsynced before
//!   `250`.
//! - **Out:** [`transport`] (through the shared runner): routes, hosted domains to a spool,
//!   MX lookup; one result per recipient, retries with backoff, DSN bounces to the sender.
//! - **Internal:** the spools hand mail for other domains (bounces to remote senders,
//!   forwarding aliases) to the internal listener, `trust.spool_networks` only, without AUTH
//!   and without the sender checks.
//! - **Trusts:** nobody before AUTH, except the spools on the internal listener.

pub mod dkim;
mod limits;
mod session;
mod settings;
mod transport;

use std::sync::Arc;

use common::dns::Resolver;
use common::location::Directory;
use common::net::{AcceptOptions, accept_loop};
use common::queue::runner::{self, Runner, RunnerSettings};
use common::queue::{Queue, StoreError};
use common::sasl::Verifier;
use common::smtp::server::{Connection, TlsInfo};
use common::throttle::Throttle;
use common::tls::{Identity, TlsError};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

pub use settings::{FileConfig, Route, Settings};

/// The already-bound listeners of the relay.
#[derive(Debug, Default)]
pub struct Listeners {
    /// Submission with STARTTLS (587).
    pub submission: Option<TcpListener>,
    /// Submission with implicit TLS (465).
    pub submissions: Option<TcpListener>,
    /// Mail for other domains from the spools (trusted networks, no AUTH).
    pub internal: Option<TcpListener>,
}

/// Which listener a session came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Submission, STARTTLS.
    Submission,
    /// Submission, implicit TLS.
    Submissions,
    /// From a spool.
    Internal,
}

/// Why the relay stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener failed for good.
    #[error("accept failed: {0}")]
    Accept(#[source] std::io::Error),
    /// The queue directory could not be opened or read.
    #[error("queue: {0}")]
    Queue(#[from] StoreError),
    /// No TLS certificate could be loaded.
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    /// The DKIM keys could not be loaded.
    #[error("dkim: {0}")]
    Dkim(#[from] dkim::DkimError),
    /// The SASL verifier could not be set up.
    #[error("sasl: {0}")]
    Sasl(String),
}

/// What every session and the queue runner share.
pub(crate) struct Relay {
    pub(crate) settings: Arc<Settings>,
    pub(crate) directory: Arc<dyn Directory>,
    pub(crate) runner: Arc<Runner>,
    pub(crate) tls: TlsAcceptor,
    pub(crate) verifier: Arc<Verifier>,
    pub(crate) throttle: Throttle,
    pub(crate) hourly: limits::Hourly,
    pub(crate) dkim: dkim::Signer,
}

/// Serves the listeners and runs the queue until `shutdown` is cancelled. The queue is
/// recovered first, so mail accepted before a crash is delivered. `dns` answers the MX
/// lookups ([`common::dns::System`] in production).
pub async fn serve(
    settings: Arc<Settings>,
    directory: Arc<dyn Directory>,
    dns: Arc<dyn Resolver>,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let (dir, dkim_dir, shared) = (
        settings.queue_dir.clone(),
        settings.dkim_dir.clone(),
        settings.shared.clone(),
    );
    let (queue, dkim, server_config) = blocking(move || {
        let queue = Queue::open(&dir)?;
        let dkim = dkim::Signer::load(&dkim_dir)?;
        let server_config = Identity::from_settings(&shared)?.server_config()?;
        Ok((queue, dkim, server_config))
    })
    .await?;
    let client_tls = if settings.starttls_outbound {
        Some(common::tls::opportunistic_client_config()?)
    } else {
        None
    };
    let secret = settings
        .shared
        .resolve_proxy_secret()
        .map_err(|e| ServeError::Sasl(e.to_string()))?;
    let verifier = Verifier::new(
        directory.clone(),
        settings.argon2_concurrency,
        secret.as_bytes(),
    )
    .await
    .map_err(|e| ServeError::Sasl(e.to_string()))?;
    let transport = Arc::new(transport::Outbound::new(
        settings.clone(),
        directory.clone(),
        dns,
        client_tls,
    ));
    let runner = Arc::new(Runner::new(
        queue,
        RunnerSettings {
            service: "relay",
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
    tracing::info!(
        entries,
        held,
        dkim_domains = dkim.domains().len(),
        "relay queue recovered"
    );
    let relay = Arc::new(Relay {
        settings: settings.clone(),
        directory,
        runner: runner.clone(),
        tls: TlsAcceptor::from(server_config),
        verifier: Arc::new(verifier),
        throttle: Throttle::new(settings.throttle),
        hourly: limits::Hourly::new(settings.messages_per_hour),
        dkim,
    });

    let mut tasks = tokio::task::JoinSet::new();
    {
        let (r, t) = (runner.clone(), shutdown.clone());
        tasks.spawn(async move {
            runner::run(r, t).await;
            Ok(())
        });
    }
    for (listener, kind) in [
        (listeners.submission, Kind::Submission),
        (listeners.submissions, Kind::Submissions),
        (listeners.internal, Kind::Internal),
    ] {
        if let Some(l) = listener {
            tasks.spawn(serve_listener(relay.clone(), l, kind, shutdown.clone()));
        }
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

/// Accepts connections; on the implicit-TLS listener the handshake comes first, the internal
/// one takes only trusted networks.
async fn serve_listener(
    relay: Arc<Relay>,
    listener: TcpListener,
    kind: Kind,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let implicit_tls = kind == Kind::Submissions;
    let opts = AcceptOptions {
        service: "relay",
        protocol: match kind {
            Kind::Submission => "submission",
            Kind::Submissions => "submissions",
            Kind::Internal => "relay-internal",
        },
        max_connections: relay.settings.max_connections,
        busy_reply: b"421 4.3.2 too many connections, try again later\r\n",
        trusted: (kind == Kind::Internal).then(|| relay.settings.shared.spool_networks.clone()),
        untrusted_reply: b"554 5.7.1 this listener is for the platform's spools only\r\n",
        shutdown_grace: relay.settings.shared.shutdown_grace,
    };
    let token = shutdown.clone();
    accept_loop(listener, opts, shutdown, move |stream, peer, id| {
        let (relay, token) = (relay.clone(), token.clone());
        async move {
            let limits = session::limits(&relay.settings);
            let conn = if implicit_tls {
                let accept = relay.tls.accept(stream);
                match tokio::time::timeout(relay.settings.command_timeout, accept).await {
                    Ok(Ok(tls)) => {
                        let info = TlsInfo::from_server(tls.get_ref().1);
                        Connection::new(Box::new(tls), peer, limits).with_tls(info)
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "tls handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!("tls handshake timed out");
                        return;
                    }
                }
            } else {
                Connection::new(Box::new(stream), peer, limits)
            };
            session::run(relay, conn, id, kind, token).await;
        }
    })
    .await
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ServeError> + Send + 'static,
) -> Result<T, ServeError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServeError::Accept(std::io::Error::other(e)))?
}
