//! The filter: the anti-spam/content filter chain between the spool's queue and the filers,
//! like Postfix's after-queue content filter.
//!
//! - **In:** SMTP from spools (`trust.spool_networks` only) with XFORWARD, so the checks see
//!   the original client's address and HELO.
//! - **Checks** ([`scan`]), in the configured order, each adding scored reasons: allow/block
//!   lists, header sanity, SPF/DKIM/DMARC ([`auth`]), DNSBL, content rules, the statistical
//!   classifier ([`classifier`]), and the scan limits. The total decides: pass, tag
//!   (`X-Spam-Flag: YES`; the filer files it into Junk) or quarantine (rerouted to the
//!   quarantine mailbox). `Authentication-Results` is always added; `X-Spam-*` headers from
//!   the internet are removed.
//! - **Out:** the message goes back to a spool's reinjection listener; the filter answers the
//!   first spool only after that reinjection answered `250`, so it never holds mail alone:
//!   any failure on the way is a `451` and the spool retries.
//! - **State:** none that could lose mail. The classifier's model is read at start and again
//!   whenever its file changes (`mailctl filter train` replaces it atomically).

pub mod auth;
pub mod classifier;
mod scan;
mod session;
mod settings;

use std::sync::Arc;

use common::dns::Resolver;
use common::net::{AcceptOptions, accept_loop};
use common::smtp::server::Connection;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use scan::{Action, Verdict};
pub use settings::{CHECKS, FileConfig, ListFile, RuleFile, Settings};

/// The already-bound listeners of the filter.
#[derive(Debug, Default)]
pub struct Listeners {
    /// The listener for spools.
    pub smtp: Option<TcpListener>,
}

/// Why the filter stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listener failed for good.
    #[error("accept failed: {0}")]
    Accept(#[source] std::io::Error),
    /// The SPF/DKIM/DMARC resolver could not be set up.
    #[error("auth: {0}")]
    Auth(String),
}

/// What every session shares.
pub(crate) struct Filter {
    pub(crate) settings: Arc<Settings>,
    pub(crate) dns: Arc<dyn Resolver>,
    pub(crate) auth: auth::Authenticator,
    pub(crate) model: ModelSlot,
}

/// How often the model file is checked for a new version.
const MODEL_CHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// The classifier's model, reloaded when its file changes.
pub(crate) struct ModelSlot {
    path: std::path::PathBuf,
    current: std::sync::RwLock<Option<Arc<classifier::Model>>>,
    /// The file's modification time when loaded, and when it was last looked at.
    seen: std::sync::Mutex<(Option<std::time::SystemTime>, Option<tokio::time::Instant>)>,
}

impl ModelSlot {
    pub(crate) fn new(path: std::path::PathBuf) -> Self {
        Self {
            path,
            current: std::sync::RwLock::new(None),
            seen: std::sync::Mutex::new((None, None)),
        }
    }

    /// The model, if any; looks at the file at most every [`MODEL_CHECK`]. Blocking (it may
    /// read the file): call it off the async workers.
    pub(crate) fn get(&self) -> Option<Arc<classifier::Model>> {
        let now = tokio::time::Instant::now();
        let reload = {
            let mut seen = self
                .seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let due = seen.1.is_none_or(|t| now.duration_since(t) >= MODEL_CHECK);
            if due {
                seen.1 = Some(now);
                let mtime = std::fs::metadata(&self.path)
                    .and_then(|m| m.modified())
                    .ok();
                let changed = mtime.is_some() && mtime != seen.0;
                if changed {
                    seen.0 = mtime;
                }
                changed
            } else {
                false
            }
        };
        if reload {
            match classifier::Model::load(&self.path) {
                Ok(m) => {
                    tracing::info!(path = %self.path.display(), spam = m.spam_count(), ham = m.ham_count(), "classifier model loaded");
                    *self
                        .current
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(m));
                }
                Err(e) => {
                    tracing::error!(path = %self.path.display(), error = %e, "classifier model not loaded");
                }
            }
        }
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Serves until `shutdown` is cancelled. `dns` answers DNSBL lookups.
pub async fn serve(
    settings: Arc<Settings>,
    dns: Arc<dyn Resolver>,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let auth = if settings.network_checks {
        auth::Authenticator::system().map_err(|e| ServeError::Auth(e.to_string()))?
    } else {
        auth::Authenticator::offline().map_err(|e| ServeError::Auth(e.to_string()))?
    };
    let model = ModelSlot::new(settings.model.clone());
    let probe = tokio::task::spawn_blocking(move || {
        let loaded = model.get().is_some();
        (model, loaded)
    })
    .await;
    let model = match probe {
        Ok((model, loaded)) => {
            if !loaded {
                tracing::info!(path = %settings.model.display(), "no classifier model yet; train one with `mailctl filter train`");
            }
            model
        }
        Err(_) => ModelSlot::new(settings.model.clone()),
    };
    let filter = Arc::new(Filter {
        settings: settings.clone(),
        dns,
        auth,
        model,
    });
    let Some(listener) = listeners.smtp else {
        shutdown.cancelled().await;
        return Ok(());
    };
    let opts = AcceptOptions {
        service: "filter",
        protocol: "filter",
        max_connections: 200,
        busy_reply: b"421 4.3.2 too many connections, try again later\r\n",
        trusted: Some(settings.shared.spool_networks.clone()),
        untrusted_reply: b"554 5.7.1 the filter is not available to you\r\n",
        shutdown_grace: settings.shared.shutdown_grace,
    };
    let token = shutdown.clone();
    accept_loop(listener, opts, shutdown, move |stream, peer, id| {
        let (filter, token) = (filter.clone(), token.clone());
        async move {
            let conn = Connection::new(Box::new(stream), peer, session::limits(&filter.settings));
            session::run(filter, conn, id, token).await;
        }
    })
    .await
    .map_err(ServeError::Accept)
}
