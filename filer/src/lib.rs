//! The filer: the storage server.
//!
//! Mailboxes are Maildirs on this host's local disk ([`store`]), each with a SQLite index for
//! UIDs, flags and modseq. Spools deliver over LMTP, and only from `trust.spool_networks`;
//! access proxies read over POP3 (and IMAP) with the trusted proxy login
//! (`user\0principal\0secret`), and only from `trust.proxy_networks`. The filer never sees a
//! user's password. Nothing else reaches the disk.

mod imap;
mod lmtp;
pub mod migrate;
mod pop3;
mod settings;
pub mod store;

use std::sync::Arc;

use common::location::Directory;
use common::net::{AcceptOptions, accept_loop};
use common::smtp::server::Connection;
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
    /// The proxy secret could not be read or made.
    #[error("cannot read the proxy secret: {0}")]
    Secret(#[source] std::io::Error),
}

/// What every session of this filer shares.
pub(crate) struct Filer {
    pub(crate) settings: Arc<Settings>,
    pub(crate) directory: Arc<dyn Directory>,
    pub(crate) store: Arc<store::Store>,
    pub(crate) proxy_secret: String,
    pub(crate) pop3_locks: pop3::Locks,
}

/// How often a logged-in IMAP or POP3 session checks that its mailbox is still served here
/// (not being moved, not moved away, not disabled): the lookup cache's TTL, within bounds, so
/// a migration ends the sessions on the old filer soon after it marks the mailbox.
pub(crate) fn residency_check(settings: &Settings) -> std::time::Duration {
    settings.shared.cache_ttl.clamp(
        std::time::Duration::from_millis(250),
        std::time::Duration::from_secs(5),
    )
}

/// The principal a migration logs in with on the source filer (same secret as the proxy's):
/// unlike the proxy's, its login is allowed while the mailbox is `moving`.
pub fn migration_principal(proxy_principal: &str) -> String {
    format!("{proxy_principal}+migrate")
}

/// Why a session of `address` must end now, if it must: the mailbox is being moved (unless
/// the session is the migration's own), lives on another filer, is disabled or gone. A failed
/// lookup ends nothing (the database may be briefly down; the sessions carry on).
pub(crate) async fn not_served_here(
    filer: &Filer,
    address: &str,
    migrator: bool,
) -> Option<&'static str> {
    match filer.directory.mailbox(address).await {
        Ok(Some(_)) if migrator => None,
        Ok(Some(m)) if m.filer != filer.settings.name => Some("mailbox has moved, log in again"),
        Ok(Some(m)) => match m.state {
            common::location::MailboxState::Active => None,
            common::location::MailboxState::Moving => {
                Some("mailbox is being moved, log in again shortly")
            }
            common::location::MailboxState::Disabled => Some("mailbox disabled"),
        },
        Ok(None) => Some("mailbox removed"),
        Err(_) => None,
    }
}

/// Most concurrent LMTP sessions.
const MAX_LMTP_SESSIONS: usize = 200;
/// Most concurrent IMAP sessions (IDLE connections are long-lived).
const MAX_IMAP_SESSIONS: usize = 20_000;
/// Most concurrent POP3 sessions.
const MAX_POP3_SESSIONS: usize = 5000;

/// Serves LMTP, IMAP and POP3 until `shutdown` is cancelled.
pub async fn serve(
    settings: Arc<Settings>,
    directory: Arc<dyn Directory>,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let shared = settings.shared.clone();
    let proxy_secret = tokio::task::spawn_blocking(move || shared.resolve_proxy_secret())
        .await
        .map_err(|e| ServeError::Secret(std::io::Error::other(e)))?
        .map_err(ServeError::Secret)?;
    let store = Arc::new(store::Store::new(
        settings.mail_root.clone(),
        &settings.shared.hostname,
    ));
    let filer = Arc::new(Filer {
        settings: settings.clone(),
        directory,
        store,
        proxy_secret,
        pop3_locks: pop3::Locks::default(),
    });
    let mut tasks = tokio::task::JoinSet::new();
    let shared = &settings.shared;
    if let Some(l) = listeners.imap {
        let opts = AcceptOptions {
            service: "filer",
            protocol: "imap",
            max_connections: MAX_IMAP_SESSIONS,
            busy_reply: b"* BYE [UNAVAILABLE] too many connections\r\n",
            trusted: Some(shared.proxy_networks.clone()),
            untrusted_reply:
                b"* BYE [UNAVAILABLE] this server is reached through the access proxy\r\n",
            shutdown_grace: shared.shutdown_grace,
        };
        spawn_listener(
            &mut tasks,
            l,
            opts,
            &filer,
            &shutdown,
            |f, stream, peer, _id, token| imap::run(f, Box::new(stream), peer, token),
        );
    }
    if let Some(l) = listeners.pop3 {
        let opts = AcceptOptions {
            service: "filer",
            protocol: "pop3",
            max_connections: MAX_POP3_SESSIONS,
            busy_reply: b"-ERR [SYS/TEMP] too many connections, try again later\r\n",
            trusted: Some(shared.proxy_networks.clone()),
            untrusted_reply: b"-ERR [AUTH] this server is reached through the access proxy\r\n",
            shutdown_grace: shared.shutdown_grace,
        };
        spawn_listener(
            &mut tasks,
            l,
            opts,
            &filer,
            &shutdown,
            |f, stream, _peer, _id, token| pop3::session(f, Box::new(stream), token),
        );
    }
    if let Some(l) = listeners.lmtp {
        let opts = AcceptOptions {
            service: "filer",
            protocol: "lmtp",
            max_connections: MAX_LMTP_SESSIONS,
            busy_reply: b"421 4.3.2 too many connections, try again later\r\n",
            trusted: Some(shared.spool_networks.clone()),
            untrusted_reply: b"554 5.7.1 LMTP is not available to you\r\n",
            shutdown_grace: shared.shutdown_grace,
        };
        spawn_listener(
            &mut tasks,
            l,
            opts,
            &filer,
            &shutdown,
            |f, stream, peer, id, token| {
                let conn = Connection::new(Box::new(stream), peer, lmtp::limits(&f));
                lmtp::session(f, conn, id, token)
            },
        );
    }
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                shutdown.cancel();
                return Err(ServeError::Accept(e));
            }
            Err(e) => {
                shutdown.cancel();
                return Err(ServeError::Accept(std::io::Error::other(e)));
            }
        }
    }
    shutdown.cancelled().await;
    Ok(())
}

/// Runs an accept loop for one listener in `tasks`, each connection handled by `session`.
fn spawn_listener<Fut>(
    tasks: &mut tokio::task::JoinSet<std::io::Result<()>>,
    listener: TcpListener,
    opts: AcceptOptions,
    filer: &Arc<Filer>,
    shutdown: &CancellationToken,
    session: fn(
        Arc<Filer>,
        tokio::net::TcpStream,
        std::net::SocketAddr,
        common::net::ConnId,
        CancellationToken,
    ) -> Fut,
) where
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (f, token) = (filer.clone(), shutdown.clone());
    tasks.spawn(accept_loop(
        listener,
        opts,
        shutdown.clone(),
        move |stream, peer, id| session(f.clone(), stream, peer, id, token.clone()),
    ));
}

/// Compares secrets in time independent of where they differ.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
