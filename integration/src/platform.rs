//! Starting a platform's services in one process, on listeners bound here and handed in.
//!
//! `mailctl up` and the end-to-end tests go through this same code; tests bind port 0 and read
//! the real addresses back from [`Running`].

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use common::location::{Cached, Database, Directory, Filer, FilerState};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::PlatformSettings;
use crate::runfile::Listener;

/// A started platform.
pub struct Running {
    /// Every bound listener.
    pub listeners: Vec<Listener>,
    /// The filers' bound addresses, by name.
    pub filers: Vec<FilerAddrs>,
    /// The spool's bound SMTP and reinjection addresses, when it runs.
    pub spool: Option<(Option<SocketAddr>, Option<SocketAddr>)>,
    /// The relay's bound submission (STARTTLS) and submissions (TLS) addresses, when it runs.
    pub relay: Option<(Option<SocketAddr>, Option<SocketAddr>)>,
    /// The access proxy's bound addresses (IMAP, IMAPS, POP3, POP3S), when it runs.
    pub access: Option<[Option<SocketAddr>; 4]>,
    /// The location database (cached), as the services see it.
    pub directory: Arc<dyn Directory>,
    shutdown: CancellationToken,
    tasks: JoinSet<(String, anyhow::Result<()>)>,
}

/// Where one filer listens.
#[derive(Debug, Clone)]
pub struct FilerAddrs {
    /// Its name.
    pub name: String,
    /// LMTP.
    pub lmtp: Option<SocketAddr>,
    /// IMAP.
    pub imap: Option<SocketAddr>,
    /// POP3.
    pub pop3: Option<SocketAddr>,
}

/// Opens (and migrates) the location database of a platform, SQLite or PostgreSQL.
pub async fn open_directory(settings: &PlatformSettings) -> anyhow::Result<Database> {
    Database::open(&settings.shared.database)
        .await
        .context("opening the location database")
}

/// Registers the configured filers in the database (new ones are added in state `up`;
/// existing ones get their addresses and weight updated and keep their state).
pub async fn register_filers(
    settings: &PlatformSettings,
    db: &dyn Directory,
) -> anyhow::Result<()> {
    for f in &settings.filers {
        let addr = |a: Option<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_default();
        db.register_filer(&Filer {
            name: f.name.clone(),
            lmtp: addr(f.lmtp),
            imap: addr(f.imap),
            pop3: addr(f.pop3),
            state: FilerState::Up,
            weight: f.weight,
        })
        .await
        .with_context(|| format!("registering filer {}", f.name))?;
    }
    Ok(())
}

async fn bind(addr: Option<SocketAddr>, what: &str) -> anyhow::Result<Option<TcpListener>> {
    match addr {
        None => Ok(None),
        Some(a) => Ok(Some(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("binding {what} on {a}"))?,
        )),
    }
}

fn local(l: &Option<TcpListener>) -> Option<SocketAddr> {
    l.as_ref().and_then(|l| l.local_addr().ok())
}

/// Binds every listener the settings enable, registers the filers with their real addresses,
/// and starts the services.
pub async fn start(settings: PlatformSettings) -> anyhow::Result<Running> {
    // Before any service counts anything.
    crate::web::recorder();
    std::fs::create_dir_all(&settings.shared.data_dir)
        .with_context(|| format!("creating {}", settings.shared.data_dir.display()))?;
    // Made once here: services started together must not race to create it.
    let shared = settings.shared.clone();
    tokio::task::spawn_blocking(move || shared.resolve_proxy_secret())
        .await?
        .context("making the proxy secret")?;
    // The dev certificate too: the spool and the proxy would both make it at once.
    let shared = settings.shared.clone();
    tokio::task::spawn_blocking(move || common::tls::Identity::from_settings(&shared).map(drop))
        .await?
        .context("loading the TLS certificate")?;
    let sqlite = open_directory(&settings).await?;
    let directory: Arc<dyn Directory> =
        Arc::new(Cached::new(Arc::new(sqlite), settings.shared.cache_ttl));
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let mut listeners = Vec::new();
    let mut filers = Vec::new();
    let mut bound_settings = Vec::new();

    for f in &settings.filers {
        let l = filer::Listeners {
            lmtp: bind(f.lmtp, &format!("{} lmtp", f.name)).await?,
            imap: bind(f.imap, &format!("{} imap", f.name)).await?,
            pop3: bind(f.pop3, &format!("{} pop3", f.name)).await?,
        };
        let addrs = FilerAddrs {
            name: f.name.clone(),
            lmtp: local(&l.lmtp),
            imap: local(&l.imap),
            pop3: local(&l.pop3),
        };
        for (proto, a) in [
            ("lmtp", addrs.lmtp),
            ("imap", addrs.imap),
            ("pop3", addrs.pop3),
        ] {
            if let Some(a) = a {
                listeners.push(Listener {
                    service: f.name.clone(),
                    protocol: proto.into(),
                    address: a.to_string(),
                });
            }
        }
        // The database must hold the addresses really bound (port 0 in tests).
        let mut real = (**f).clone();
        real.lmtp = addrs.lmtp;
        real.imap = addrs.imap;
        real.pop3 = addrs.pop3;
        bound_settings.push((Arc::new(real), l));
        filers.push(addrs);
    }
    let registered = PlatformSettings {
        shared: settings.shared.clone(),
        filers: bound_settings.iter().map(|(s, _)| s.clone()).collect(),
        spool: None,
        access: None,
        relay: None,
        filter: None,
        roles: settings.roles.clone(),
        admin: settings.admin.clone(),
    };
    register_filers(&registered, directory.as_ref()).await?;

    // The spool and the filter point at each other: bind both before starting either.
    let spool_bound = match &settings.spool {
        Some(s) => Some(spool::Listeners {
            smtp: bind(s.smtp, "spool smtp").await?,
            reinject: bind(s.reinject, "spool reinject").await?,
        }),
        None => None,
    };
    let filter_bound = match &settings.filter {
        Some(f) => Some(filter::Listeners {
            smtp: bind(f.listen, "filter smtp").await?,
        }),
        None => None,
    };
    let filter_addr = filter_bound.as_ref().and_then(|l| local(&l.smtp));
    let relay_bound = match &settings.relay {
        Some(r) => Some(relay::Listeners {
            submission: bind(r.submission, "relay submission").await?,
            submissions: bind(r.submissions, "relay submissions").await?,
            internal: bind(r.internal, "relay internal").await?,
        }),
        None => None,
    };
    let relay_internal = relay_bound.as_ref().and_then(|l| local(&l.internal));
    let mut spool_addrs = None;
    if let (Some(s), Some(l)) = (&settings.spool, spool_bound) {
        let addrs = (local(&l.smtp), local(&l.reinject));
        for (proto, a) in [("smtp", addrs.0), ("reinject", addrs.1)] {
            if let Some(a) = a {
                listeners.push(Listener {
                    service: "spool".into(),
                    protocol: proto.into(),
                    address: a.to_string(),
                });
            }
        }
        spool_addrs = Some(addrs);
        let mut s = (**s).clone();
        // New mail goes to the filter started here, unless configured otherwise.
        if s.filter == spool::PeerRoute::Local {
            s.filter = filter_addr.map_or(spool::PeerRoute::None, spool::PeerRoute::At);
        }
        // Mail for other domains goes to the relay started here, unless configured.
        if s.relay == spool::PeerRoute::Local {
            s.relay = relay_internal.map_or(spool::PeerRoute::None, spool::PeerRoute::At);
        }
        let (s, dir, token) = (Arc::new(s), directory.clone(), shutdown.child_token());
        tasks.spawn(async move {
            let r = spool::serve(s, dir, l, token).await;
            ("spool".to_owned(), r.map_err(anyhow::Error::from))
        });
    }
    if let (Some(f), Some(l)) = (&settings.filter, filter_bound) {
        if let Some(a) = filter_addr {
            listeners.push(Listener {
                service: "filter".into(),
                protocol: "smtp".into(),
                address: a.to_string(),
            });
        }
        let mut f = (**f).clone();
        // Filtered mail goes back to the spool started here, unless configured otherwise.
        if f.reinject.is_none() {
            f.reinject = spool_addrs.and_then(|(_, reinject)| reinject);
        }
        let (f, token) = (Arc::new(f), shutdown.child_token());
        let dns = common::dns::system_or_unavailable();
        tasks.spawn(async move {
            let r = filter::serve(f, dns, l, token).await;
            ("filter".to_owned(), r.map_err(anyhow::Error::from))
        });
    }

    let mut relay_addrs = None;
    if let (Some(s), Some(l)) = (&settings.relay, relay_bound) {
        let addrs = (local(&l.submission), local(&l.submissions));
        for (proto, a) in [
            ("submission", addrs.0),
            ("submissions", addrs.1),
            ("internal", relay_internal),
        ] {
            if let Some(a) = a {
                listeners.push(Listener {
                    service: "relay".into(),
                    protocol: proto.into(),
                    address: a.to_string(),
                });
            }
        }
        relay_addrs = Some(addrs);
        let mut s = (**s).clone();
        // Mail for hosted domains goes to the spool started here, unless configured.
        if s.hosted_route.is_none()
            && let Some((Some(smtp), _)) = spool_addrs
        {
            s.hosted_route = Some(relay::Route {
                host: smtp.ip().to_string(),
                port: smtp.port(),
            });
        }
        let (s, dir, token) = (Arc::new(s), directory.clone(), shutdown.child_token());
        let dns = common::dns::system_or_unavailable();
        tasks.spawn(async move {
            let r = relay::serve(s, dir, dns, l, token).await;
            ("relay".to_owned(), r.map_err(anyhow::Error::from))
        });
    }

    let mut access_addrs = None;
    if let Some(s) = &settings.access {
        let l = access::Listeners {
            imap: bind(s.imap, "access imap").await?,
            imaps: bind(s.imaps, "access imaps").await?,
            pop3: bind(s.pop3, "access pop3").await?,
            pop3s: bind(s.pop3s, "access pop3s").await?,
        };
        let addrs = [
            local(&l.imap),
            local(&l.imaps),
            local(&l.pop3),
            local(&l.pop3s),
        ];
        for (proto, a) in ["imap", "imaps", "pop3", "pop3s"].into_iter().zip(addrs) {
            if let Some(a) = a {
                listeners.push(Listener {
                    service: "access".into(),
                    protocol: proto.into(),
                    address: a.to_string(),
                });
            }
        }
        access_addrs = Some(addrs);
        let (s, dir, token) = (s.clone(), directory.clone(), shutdown.child_token());
        tasks.spawn(async move {
            let r = access::serve(s, dir, l, token).await;
            ("access".to_owned(), r.map_err(anyhow::Error::from))
        });
    }

    for (s, l) in bound_settings {
        let token = shutdown.child_token();
        let name = s.name.clone();
        let dir = directory.clone();
        tasks.spawn(async move {
            let r = filer::serve(s, dir, l, token).await;
            (name, r.map_err(anyhow::Error::from))
        });
    }
    if let Some(addr) = settings.admin.listen {
        let l = bind(Some(addr), "admin http")
            .await?
            .context("binding the admin listener")?;
        if let Ok(a) = l.local_addr() {
            listeners.push(Listener {
                service: "admin".into(),
                protocol: "http".into(),
                address: a.to_string(),
            });
        }
        let web = Arc::new(crate::web::Web {
            settings: settings.clone(),
            directory: directory.clone(),
            roles: settings.roles.clone(),
        });
        let token = shutdown.child_token();
        tasks.spawn(async move {
            let r = crate::web::serve(l, web, token).await;
            ("admin".to_owned(), r.map_err(anyhow::Error::from))
        });
    }
    tracing::info!(listeners = listeners.len(), "platform started");
    Ok(Running {
        listeners,
        filers,
        spool: spool_addrs,
        relay: relay_addrs,
        access: access_addrs,
        directory,
        shutdown,
        tasks,
    })
}

impl Running {
    /// The token that stops every service.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until a service stops on its own (an error) or `stop` is cancelled; then stops
    /// every service and waits for them.
    pub async fn run_until(mut self, stop: CancellationToken) -> anyhow::Result<()> {
        let first = tokio::select! {
            _ = stop.cancelled() => None,
            Some(done) = self.tasks.join_next() => Some(done),
        };
        self.shutdown.cancel();
        let mut result = Ok(());
        if let Some(done) = first {
            result = service_result(done);
        }
        while let Some(done) = self.tasks.join_next().await {
            if let Err(e) = service_result(done)
                && result.is_ok()
            {
                result = Err(e);
            }
        }
        result
    }

    /// Stops every service and waits for them.
    pub async fn stop(self) -> anyhow::Result<()> {
        let t = CancellationToken::new();
        t.cancel();
        self.run_until(t).await
    }
}

fn service_result(
    done: Result<(String, anyhow::Result<()>), tokio::task::JoinError>,
) -> anyhow::Result<()> {
    match done {
        Ok((name, Ok(()))) => {
            tracing::info!(service = %name, "stopped");
            Ok(())
        }
        Ok((name, Err(e))) => Err(e.context(format!("service {name} failed"))),
        Err(e) => Err(anyhow::anyhow!("a service panicked: {e}")),
    }
}
