//! Outbound delivery: the relay's [`Transport`] for the shared queue runner.
//!
//! Recipients are grouped by domain and each domain gets one SMTP transaction, which gives
//! one result per recipient (a remote `550` for one does not stop the others). Where a domain
//! goes, in order:
//!
//! 1. a route in `relay.routes` for the domain;
//! 2. a hosted domain: `relay.hosted_route`, a spool's MX listener (the spool checks the
//!    recipient and filters like any incoming mail);
//! 3. the `*` route (a smarthost), for every other domain;
//! 4. its MX records in preference order (RFC 5321 §5.1); with none, the domain's own
//!    A/AAAA (the implicit MX); a null MX (RFC 7505) fails at once.
//!
//! Each host's addresses are tried in turn: a connection that fails or a temporary refusal
//! before the transaction moves on to the next one. STARTTLS is used when offered
//! (opportunistic). DNS answers that point at loopback or unspecified addresses are not
//! used, so a hostile domain cannot aim the relay at this host's internal listeners.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use common::dns::{DnsError, Resolver};
use common::location::{Directory, domain_of};
use common::queue::Envelope;
use common::queue::runner::{Outcome, Transport};
use common::smtp::Reply;
use common::smtp::client::{
    Client, ClientSettings, HopError, Protocol, Stage, TlsClient, TlsPolicy,
};
use rustls::pki_types::ServerName;

use crate::settings::{Route, Settings};

/// Port of SMTP relay between MTAs (RFC 5321 §4.5.4.2).
const SMTP_PORT: u16 = 25;
/// Most addresses tried for one domain in one attempt.
const MAX_ADDRESSES: usize = 10;

/// The relay's transport.
pub(crate) struct Outbound {
    settings: Arc<Settings>,
    directory: Arc<dyn Directory>,
    dns: Arc<dyn Resolver>,
    /// Opportunistic TLS client configuration; `None` when STARTTLS is off.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Sessions per destination domain, made on first use.
    per_destination:
        std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

/// One place to connect to.
struct Hop {
    /// The name to show in logs and to offer as TLS server name.
    name: String,
    addr: SocketAddr,
}

impl Outbound {
    pub(crate) fn new(
        settings: Arc<Settings>,
        directory: Arc<dyn Directory>,
        dns: Arc<dyn Resolver>,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Self {
        Self {
            settings,
            directory,
            dns,
            tls,
            per_destination: std::sync::Mutex::default(),
        }
    }

    /// The session limit of one destination domain. Idle limits are forgotten when the map
    /// grows large, so a flood of domains cannot grow it without bound.
    fn destination_slots(&self, domain: &str) -> Arc<tokio::sync::Semaphore> {
        let mut map = self
            .per_destination
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= 10_000 {
            let limit = self.settings.destination_concurrency;
            map.retain(|_, s| s.available_permits() < limit);
        }
        map.entry(domain.to_owned())
            .or_insert_with(|| {
                Arc::new(tokio::sync::Semaphore::new(
                    self.settings.destination_concurrency,
                ))
            })
            .clone()
    }

    /// Where `domain`'s mail goes now, or the outcome for all of its recipients.
    async fn hops(&self, domain: &str) -> Result<Vec<Hop>, Outcome> {
        if let Some(route) = self.settings.routes.get(domain) {
            return self.route_hops(route, true).await;
        }
        match self.directory.is_hosted_domain(domain).await {
            Ok(true) => {
                return match &self.settings.hosted_route {
                    Some(route) => self.route_hops(route, true).await,
                    None => Err(Outcome::held(
                        "no hosted_route configured for hosted domains".into(),
                    )),
                };
            }
            Ok(false) => {}
            Err(e) => return Err(Outcome::held(format!("location lookup failed: {e}"))),
        }
        if let Some(route) = self.settings.routes.get("*") {
            return self.route_hops(route, true).await;
        }
        let exchanges = match self.dns.mx(domain).await {
            Ok(mx) => {
                if mx
                    .iter()
                    .any(|m| m.exchange.is_empty() || m.exchange == ".")
                {
                    return Err(Outcome::Failed(format!(
                        "556 5.1.10 {domain} accepts no mail (null MX)"
                    )));
                }
                mx.into_iter().map(|m| m.exchange).collect()
            }
            // No MX: the domain itself is the implicit MX (RFC 5321 §5.1).
            Err(DnsError::NotFound(_)) => vec![domain.to_owned()],
            Err(e) => return Err(Outcome::retry(e.to_string())),
        };
        let mut hops = Vec::new();
        let mut last = None;
        for host in exchanges {
            let route = Route {
                host,
                port: SMTP_PORT,
            };
            match self.route_hops(&route, false).await {
                Ok(h) => hops.extend(h),
                Err(o) => last = Some(o),
            }
            if hops.len() >= MAX_ADDRESSES {
                break;
            }
        }
        if hops.is_empty() {
            return Err(match last {
                Some(Outcome::Failed(_)) | None => {
                    Outcome::Failed(format!("550 5.1.2 {domain}: no mail server found in DNS"))
                }
                Some(o) => o,
            });
        }
        hops.truncate(MAX_ADDRESSES);
        Ok(hops)
    }

    /// The addresses of one host. A configured route may name any address; one found in DNS
    /// may not be loopback or unspecified.
    async fn route_hops(&self, route: &Route, configured: bool) -> Result<Vec<Hop>, Outcome> {
        let ips = match route.host.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => match self.dns.ips(&route.host).await {
                Ok(ips) => ips,
                // A configured route that does not resolve is our mistake: never bounce.
                Err(DnsError::NotFound(h)) if configured => {
                    return Err(Outcome::retry(format!("route {h} does not resolve")));
                }
                Err(DnsError::NotFound(h)) => {
                    return Err(Outcome::Failed(format!("550 5.1.2 {h} does not resolve")));
                }
                Err(e) => return Err(Outcome::retry(e.to_string())),
            },
        };
        let usable: Vec<Hop> = ips
            .into_iter()
            .filter(|ip| configured || !(ip.is_loopback() || ip.is_unspecified()))
            .map(|ip| Hop {
                name: route.host.clone(),
                addr: SocketAddr::new(ip, route.port),
            })
            .collect();
        if usable.is_empty() {
            return Err(Outcome::retry(format!(
                "{} has no usable address (loopback or unspecified)",
                route.host
            )));
        }
        Ok(usable)
    }

    fn client_settings(&self, hop: &Hop) -> ClientSettings {
        let s = &self.settings;
        let mut c = ClientSettings::new(s.shared.hostname.clone(), Protocol::Smtp);
        c.connect_timeout = s.connect_timeout;
        c.command_timeout = s.smtp_timeout;
        c.data_timeout = s.smtp_timeout;
        if let Some(config) = &self.tls {
            let name = match hop.name.parse::<IpAddr>() {
                Ok(ip) => Some(ServerName::IpAddress(ip.into())),
                Err(_) => ServerName::try_from(hop.name.clone()).ok(),
            };
            if let Some(server_name) = name {
                c.tls = TlsPolicy::Opportunistic(TlsClient {
                    config: config.clone(),
                    server_name,
                });
            }
        }
        c
    }

    /// One domain's recipients: the hops in turn until one gives an answer for them.
    async fn deliver_domain(
        &self,
        domain: &str,
        reverse_path: &str,
        paths: &[String],
        message: &[u8],
    ) -> Vec<Outcome> {
        let hops = match self.hops(domain).await {
            Ok(h) => h,
            Err(o) => {
                tracing::info!(domain, outcome = ?o, "no route");
                return vec![o; paths.len()];
            }
        };
        let mut last = String::new();
        for hop in &hops {
            let settings = self.client_settings(hop);
            let mut client = match Client::connect(hop.addr, &settings).await {
                Ok(c) => c,
                Err(e) if e.is_permanent() => {
                    // A 5xx greeting or EHLO: this host refuses us; the next may not.
                    tracing::info!(host = %hop.name, addr = %hop.addr, error = %e, "refused");
                    last = refusal_text(&e);
                    continue;
                }
                Err(e) => {
                    tracing::info!(host = %hop.name, addr = %hop.addr, error = %e, "unreachable");
                    last = format!("{} [{}]: {e}", hop.name, hop.addr);
                    continue;
                }
            };
            let result = client.send(reverse_path, paths, message).await;
            client.quit().await;
            match result {
                Ok(replies) => {
                    tracing::info!(host = %hop.name, addr = %hop.addr, tls = settings_tls(&settings), "transaction done");
                    return replies.iter().map(classify).collect();
                }
                Err(e) if e.is_permanent() => {
                    let text = refusal_text(&e);
                    tracing::info!(host = %hop.name, error = %e, "transaction refused");
                    return vec![Outcome::Failed(text); paths.len()];
                }
                Err(
                    e @ (HopError::Io {
                        stage: Stage::EndOfData,
                        ..
                    }
                    | HopError::Timeout(Stage::EndOfData)),
                ) => {
                    // The message may have been taken: retry later rather than at once
                    // elsewhere (a duplicate is better than a loss, but fewer is better).
                    tracing::warn!(host = %hop.name, error = %e, "lost after the data");
                    return vec![Outcome::retry(format!("{}: {e}", hop.name)); paths.len()];
                }
                Err(e) => {
                    tracing::info!(host = %hop.name, error = %e, "transaction failed");
                    last = format!("{} [{}]: {e}", hop.name, hop.addr);
                }
            }
        }
        vec![Outcome::retry(last); paths.len()]
    }
}

fn settings_tls(s: &ClientSettings) -> bool {
    !matches!(s.tls, TlsPolicy::Never)
}

/// The text of a permanent refusal, for the bounce.
fn refusal_text(e: &HopError) -> String {
    match e {
        HopError::Unsupported(what) => {
            format!("550 5.6.7 the next hop does not support {what}")
        }
        e => e.reply().map_or_else(|| e.to_string(), Reply::to_string),
    }
}

/// What one reply means for its recipient: by reply class.
fn classify(reply: &Reply) -> Outcome {
    let text = reply.to_string();
    if reply.is_positive() {
        Outcome::Delivered(text)
    } else if reply.is_permanent() {
        Outcome::Failed(text)
    } else {
        Outcome::retry(text)
    }
}

#[async_trait::async_trait]
impl Transport for Outbound {
    async fn deliver(
        &self,
        envelope: &Envelope,
        recipients: &[String],
        message: Arc<[u8]>,
    ) -> Vec<Outcome> {
        let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, r) in recipients.iter().enumerate() {
            let domain = domain_of(r).unwrap_or_default().to_ascii_lowercase();
            groups.entry(domain).or_default().push(i);
        }
        let mut outcomes: Vec<Option<Outcome>> = vec![None; recipients.len()];
        let results = futures_util::future::join_all(groups.into_iter().map(|(domain, idx)| {
            let paths: Vec<String> = idx
                .iter()
                .filter_map(|&i| recipients.get(i).cloned())
                .collect();
            let message = message.clone();
            let reverse_path = envelope.reverse_path.clone();
            async move {
                let slots = self.destination_slots(&domain);
                let o = match slots.acquire_owned().await {
                    Ok(_permit) => {
                        self.deliver_domain(&domain, &reverse_path, &paths, &message)
                            .await
                    }
                    Err(_) => vec![Outcome::retry("shutting down".into()); paths.len()],
                };
                (idx, o)
            }
        }))
        .await;
        for (idx, results) in results {
            for (i, o) in idx.into_iter().zip(results) {
                if let Some(slot) = outcomes.get_mut(i) {
                    *slot = Some(o);
                }
            }
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Outcome::retry("not attempted".into())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use common::config::Shared;
    use common::dns::Static;
    use common::location::Sqlite;

    use super::*;

    async fn outbound(dns: Static, settings: impl FnOnce(&mut Settings)) -> Outbound {
        let dir = tempfile::tempdir().unwrap();
        let db = Sqlite::open(&dir.path().join("location.db")).unwrap();
        db.add_domain("hosted.test").await.unwrap();
        let mut s = Settings::for_tests(&Shared::for_tests(dir.path()));
        s.hosted_route = Some(Route {
            host: "127.0.0.1".into(),
            port: 2525,
        });
        settings(&mut s);
        Outbound::new(Arc::new(s), Arc::new(db), Arc::new(dns), None)
    }

    fn addrs(hops: &[Hop]) -> Vec<String> {
        hops.iter().map(|h| h.addr.to_string()).collect()
    }

    #[tokio::test]
    async fn routes_hosted_domains_then_mx_in_preference_order() {
        let dns = Static::new();
        dns.add_mx("remote.test", 20, "mx2.remote.test")
            .add_mx("remote.test", 10, "mx1.remote.test")
            .add_ip("mx1.remote.test", "192.0.2.1".parse().unwrap())
            .add_ip("mx1.remote.test", "2001:db8::1".parse().unwrap())
            .add_ip("mx2.remote.test", "192.0.2.2".parse().unwrap())
            .add_ip("nomx.test", "192.0.2.9".parse().unwrap())
            .add_mx("null.test", 0, ".")
            .add_mx("evil.test", 10, "mx.evil.test")
            .add_ip("mx.evil.test", "127.0.0.1".parse().unwrap())
            .fail("broken.test");
        let o = outbound(dns, |s| {
            s.routes.insert(
                "routed.test".into(),
                Route {
                    host: "127.0.0.1".into(),
                    port: 2600,
                },
            );
        })
        .await;
        assert_eq!(
            addrs(&o.hops("remote.test").await.unwrap()),
            ["192.0.2.1:25", "[2001:db8::1]:25", "192.0.2.2:25"]
        );
        assert_eq!(
            addrs(&o.hops("hosted.test").await.unwrap()),
            ["127.0.0.1:2525"]
        );
        assert_eq!(
            addrs(&o.hops("routed.test").await.unwrap()),
            ["127.0.0.1:2600"],
            "a configured route may be loopback"
        );
        assert_eq!(
            addrs(&o.hops("nomx.test").await.unwrap()),
            ["192.0.2.9:25"],
            "no MX: the implicit MX"
        );
        let failed = |r: Result<Vec<Hop>, Outcome>| match r {
            Err(Outcome::Failed(text)) => text,
            other => panic!("expected a failure, got {:?}", other.map(|h| addrs(&h))),
        };
        let retried = |r: Result<Vec<Hop>, Outcome>| match r {
            Err(Outcome::Deferred { reason, .. }) => reason,
            other => panic!("expected a deferral, got {:?}", other.map(|h| addrs(&h))),
        };
        assert!(failed(o.hops("null.test").await).starts_with("556 5.1.10"));
        assert!(failed(o.hops("nowhere.test").await).starts_with("550 5.1.2"));
        assert!(retried(o.hops("broken.test").await).contains("temporary"));
        assert!(
            retried(o.hops("evil.test").await).contains("loopback"),
            "DNS may not aim the relay at this host"
        );
    }

    #[tokio::test]
    async fn a_smarthost_takes_every_other_domain() {
        let o = outbound(Static::new(), |s| {
            s.routes.insert(
                "*".into(),
                Route {
                    host: "192.0.2.50".into(),
                    port: 587,
                },
            );
        })
        .await;
        assert_eq!(
            addrs(&o.hops("anything.test").await.unwrap()),
            ["192.0.2.50:587"]
        );
        assert_eq!(
            addrs(&o.hops("hosted.test").await.unwrap()),
            ["127.0.0.1:2525"],
            "hosted domains stay with the platform"
        );
    }

    #[tokio::test]
    async fn at_most_the_destination_limit_of_sessions_run_at_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicUsize::new(0));
        let max = Arc::new(AtomicUsize::new(0));
        let (o, m) = (open.clone(), max.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (o, m) = (o.clone(), m.clone());
                tokio::spawn(async move {
                    let now = o.fetch_add(1, Ordering::SeqCst) + 1;
                    m.fetch_max(now, Ordering::SeqCst);
                    let (r, mut w) = stream.into_split();
                    let mut r = tokio::io::BufReader::new(r);
                    w.write_all(b"220 sink\r\n").await.unwrap();
                    let mut line = String::new();
                    while r.read_line(&mut line).await.unwrap_or(0) > 0 {
                        let up = line.to_ascii_uppercase();
                        let reply: &[u8] = if up.starts_with("DATA") {
                            b"354 go\r\n"
                        } else if line == ".\r\n" {
                            b"250 ok\r\n"
                        } else if up.starts_with("QUIT") {
                            let _ = w.write_all(b"221 bye\r\n").await;
                            break;
                        } else if up.starts_with("EHLO")
                            || up.starts_with("MAIL")
                            || up.starts_with("RCPT")
                        {
                            b"250 ok\r\n"
                        } else {
                            // message lines
                            line.clear();
                            continue;
                        };
                        w.write_all(reply).await.unwrap();
                        line.clear();
                    }
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        let o = outbound(Static::new(), |s| {
            s.destination_concurrency = 2;
            s.routes.insert(
                "remote.test".into(),
                Route {
                    host: "127.0.0.1".into(),
                    port: addr.port(),
                },
            );
        })
        .await;
        let o = Arc::new(o);
        let env = Envelope {
            id: common::queue::QueueId::generate(),
            reverse_path: "a@hosted.test".into(),
            smtputf8: false,
            origin: common::queue::Origin::Submission,
            queued_ms: 0,
            conn: String::new(),
            client_ip: String::new(),
            helo: String::new(),
            size: 0,
            held: false,
            recipients: Vec::new(),
        };
        let message: Arc<[u8]> = Arc::from(&b"Subject: x\r\n\r\nhi\r\n"[..]);
        let mut tasks = Vec::new();
        for i in 0..12 {
            let (o, env, message) = (o.clone(), env.clone(), message.clone());
            tasks.push(tokio::spawn(async move {
                o.deliver(&env, &[format!("r{i}@remote.test")], message)
                    .await
            }));
        }
        for t in tasks {
            let outcomes = t.await.unwrap();
            assert!(matches!(outcomes[0], Outcome::Delivered(_)), "{outcomes:?}");
        }
        let seen = max.load(Ordering::SeqCst);
        assert!((1..=2).contains(&seen), "{seen} sessions at once");
    }
}
