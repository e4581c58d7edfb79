//! The access service: the IMAP/POP3 front end users connect to. It holds no mail and no disk
//! state, so any number of proxies can stand behind DNS round robin.
//!
//! - **In:** IMAP (STARTTLS, and implicit TLS) and POP3 (STLS, and implicit TLS) from anyone.
//!   Before login the proxy answers everything itself: IMAP `CAPABILITY`, `NOOP`, `LOGOUT`,
//!   `STARTTLS`, `ID`, `LOGIN`, `AUTHENTICATE` (PLAIN, LOGIN, SCRAM-SHA-256, SASL-IR); POP3
//!   `CAPA`, `STLS`, `USER`/`PASS`, `AUTH`, `QUIT`. Its parser is internet-facing: bounded
//!   lines and literals, only the pre-login commands are parsed at all, a few bad commands or
//!   failed logins close the connection, and a short idle timeout applies. Logins need TLS,
//!   except on loopback listeners in dev mode (`access.plaintext_on_loopback`).
//! - **Checks:** credentials against the location database through [`common::sasl`] (argon2
//!   off the async workers, behind a semaphore; an unknown user costs and answers the same as a
//!   wrong password), with growing delays per client address and per account
//!   ([`common::throttle`]).
//! - **Out:** after a good login, the mailbox's filer (from the database) is logged into with
//!   the trusted login (`user\0principal\0secret`, from `[trust]`), told the client's address
//!   (IMAP `ID`), and from then on bytes are copied both ways with no per-command work. The
//!   client gets `OK [CAPABILITY <the filer's>] Logged in` (POP3 `+OK Logged in`).
//! - **Fails fast:** a filer that cannot be reached, refuses the trusted login, or holds a
//!   mailbox being moved gives `NO [UNAVAILABLE]` (RFC 5530) or `-ERR [SYS/TEMP]` (RFC 3206)
//!   at once and the connection closes. A circuit breaker per filer (`health`) answers without
//!   even trying while a filer is known down; only connection failures seen by several client
//!   connections mark it down. The proxy's view is kept in `<data_dir>/run/access-health.json`
//!   for `mailctl status` ([`read_health`]).
//! - **Trusts:** nobody on the client side. The proxy secret is what filers trust it with.

mod backend;
mod health;
mod imap;
mod listener;
mod pop3;
mod route;
mod settings;

use std::sync::Arc;

use common::location::Directory;
use common::sasl::{SetupError, Verifier};
use common::throttle::Throttle;
use common::tls::{Identity, TlsError};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

pub use health::{BreakerSettings, FilerHealth, health_path, read_health};
pub use settings::{FileConfig, Settings};

/// The already-bound listeners of the proxy.
#[derive(Debug, Default)]
pub struct Listeners {
    /// IMAP with STARTTLS.
    pub imap: Option<TcpListener>,
    /// IMAP over implicit TLS.
    pub imaps: Option<TcpListener>,
    /// POP3 with STLS.
    pub pop3: Option<TcpListener>,
    /// POP3 over implicit TLS.
    pub pop3s: Option<TcpListener>,
}

/// Why the proxy stopped serving (or could not start).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener failed for good.
    #[error("accept failed: {0}")]
    Accept(#[source] std::io::Error),
    /// No TLS certificate could be loaded.
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    /// The proxy secret could not be read or made.
    #[error("cannot read the proxy secret: {0}")]
    Secret(#[source] std::io::Error),
    /// The SASL machinery could not be set up.
    #[error("sasl: {0}")]
    Sasl(#[from] SetupError),
}

/// What every session of the proxy shares.
pub(crate) struct Access {
    pub(crate) settings: Arc<Settings>,
    pub(crate) directory: Arc<dyn Directory>,
    pub(crate) verifier: Arc<Verifier>,
    pub(crate) throttle: Throttle,
    pub(crate) health: Arc<health::Health>,
    /// STARTTLS/STLS and the implicit-TLS listeners.
    pub(crate) tls: TlsAcceptor,
    /// The trusted login's secret on filers.
    pub(crate) proxy_secret: String,
}

/// Serves the listeners until `shutdown` is cancelled.
pub async fn serve(
    settings: Arc<Settings>,
    directory: Arc<dyn Directory>,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let shared = settings.shared.clone();
    let (proxy_secret, tls) = tokio::task::spawn_blocking(move || {
        let secret = shared.resolve_proxy_secret().map_err(ServeError::Secret)?;
        let tls = Identity::from_settings(&shared)?.server_config()?;
        Ok::<_, ServeError>((secret, tls))
    })
    .await
    .map_err(|e| ServeError::Accept(std::io::Error::other(e)))??;
    let verifier = Verifier::new(
        directory.clone(),
        settings.argon2_concurrency,
        proxy_secret.as_bytes(),
    )
    .await?;
    let access = Arc::new(Access {
        settings: settings.clone(),
        directory,
        verifier: Arc::new(verifier),
        throttle: Throttle::new(settings.throttle),
        health: Arc::new(health::Health::new(settings.breaker)),
        tls: TlsAcceptor::from(tls),
        proxy_secret,
    });
    let mut tasks = tokio::task::JoinSet::new();
    {
        let (health, dir) = (access.health.clone(), settings.shared.data_dir.clone());
        let token = shutdown.clone();
        tasks.spawn(async move {
            health::publish(health, dir, token).await;
            Ok(())
        });
    }
    let Listeners {
        imap,
        imaps,
        pop3,
        pop3s,
    } = listeners;
    for (l, protocol, implicit_tls) in [
        (imap, backend::Protocol::Imap, false),
        (imaps, backend::Protocol::Imap, true),
        (pop3, backend::Protocol::Pop3, false),
        (pop3s, backend::Protocol::Pop3, true),
    ] {
        if let Some(l) = l {
            tasks.spawn(listener::serve(
                access.clone(),
                l,
                protocol,
                implicit_tls,
                shutdown.clone(),
            ));
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
