//! DNS for the services that need it (the relay's MX lookups, the filter's SPF/DNSBL checks),
//! behind one trait so tests answer from memory and never touch the network.
//!
//! - [`System`]: `hickory-resolver` with the host's `/etc/resolv.conf`, caching as the
//!   resolver does.
//! - [`Static`]: an in-memory zone for tests (and for hosts without DNS): names that are not
//!   in it do not exist.
//!
//! Answers are split the way mail needs them: a name that does not exist (NXDOMAIN) or has no
//! record of the type asked is [`DnsError::NotFound`], which is final; everything else
//! (timeouts, SERVFAIL, no resolver) is [`DnsError::Temporary`], which is retried later and
//! never bounces a message.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};

use hickory_resolver::TokioResolver;
use hickory_resolver::proto::rr::RData;

/// One MX record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mx {
    /// Lower is preferred.
    pub preference: u16,
    /// The mail exchanger's host name, without the trailing dot; `""` (or `"."`) is a null
    /// MX (RFC 7505: the domain accepts no mail).
    pub exchange: String,
}

/// Why a lookup gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// The name does not exist, or has no record of that type: final.
    #[error("{0}: no such record")]
    NotFound(String),
    /// The lookup failed for now (timeout, server failure): try again later.
    #[error("{0}: temporary dns failure: {1}")]
    Temporary(String, String),
}

/// The lookups the platform makes.
#[async_trait::async_trait]
pub trait Resolver: Send + Sync {
    /// The MX records of `domain`, sorted by preference (ties in the order received).
    async fn mx(&self, domain: &str) -> Result<Vec<Mx>, DnsError>;
    /// The IPv4 and IPv6 addresses of `host`.
    async fn ips(&self, host: &str) -> Result<Vec<IpAddr>, DnsError>;
    /// The TXT records of `name`, each one's strings joined.
    async fn txt(&self, name: &str) -> Result<Vec<String>, DnsError>;
}

/// The system resolver (`/etc/resolv.conf`).
pub struct System {
    inner: TokioResolver,
}

impl std::fmt::Debug for System {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("System").finish_non_exhaustive()
    }
}

impl System {
    /// A resolver configured from the host's `/etc/resolv.conf`.
    pub fn from_system() -> Result<Self, DnsError> {
        let inner = TokioResolver::builder_tokio()
            .and_then(|b| b.build())
            .map_err(|e| DnsError::Temporary("resolver".into(), e.to_string()))?;
        Ok(Self { inner })
    }
}

/// Absolute form of a name, so the search list is never applied to a mail domain.
fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_owned()
    } else {
        format!("{name}.")
    }
}

fn lookup_error(name: &str, e: &hickory_resolver::net::NetError) -> DnsError {
    if e.is_nx_domain() || e.is_no_records_found() {
        DnsError::NotFound(name.to_owned())
    } else {
        DnsError::Temporary(name.to_owned(), e.to_string())
    }
}

#[async_trait::async_trait]
impl Resolver for System {
    async fn mx(&self, domain: &str) -> Result<Vec<Mx>, DnsError> {
        let lookup = self
            .inner
            .mx_lookup(fqdn(domain))
            .await
            .map_err(|e| lookup_error(domain, &e))?;
        let mut out: Vec<Mx> = lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::MX(mx) => Some(Mx {
                    preference: mx.preference,
                    exchange: mx.exchange.to_ascii().trim_end_matches('.').to_owned(),
                }),
                _ => None,
            })
            .collect();
        out.sort_by_key(|m| m.preference);
        Ok(out)
    }

    async fn ips(&self, host: &str) -> Result<Vec<IpAddr>, DnsError> {
        let lookup = self
            .inner
            .lookup_ip(fqdn(host))
            .await
            .map_err(|e| lookup_error(host, &e))?;
        Ok(lookup.iter().collect())
    }

    async fn txt(&self, name: &str) -> Result<Vec<String>, DnsError> {
        let lookup = self
            .inner
            .txt_lookup(fqdn(name))
            .await
            .map_err(|e| lookup_error(name, &e))?;
        Ok(lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::TXT(txt) => Some(
                    txt.txt_data
                        .iter()
                        .map(|s| String::from_utf8_lossy(s))
                        .collect::<String>(),
                ),
                _ => None,
            })
            .collect())
    }
}

/// A resolver for a host without one (no usable `/etc/resolv.conf`): every lookup is a
/// temporary failure, so mail waits in the queue instead of bouncing.
#[derive(Debug, Default)]
pub struct Unavailable(pub String);

#[async_trait::async_trait]
impl Resolver for Unavailable {
    async fn mx(&self, domain: &str) -> Result<Vec<Mx>, DnsError> {
        Err(DnsError::Temporary(domain.to_owned(), self.0.clone()))
    }

    async fn ips(&self, host: &str) -> Result<Vec<IpAddr>, DnsError> {
        Err(DnsError::Temporary(host.to_owned(), self.0.clone()))
    }

    async fn txt(&self, name: &str) -> Result<Vec<String>, DnsError> {
        Err(DnsError::Temporary(name.to_owned(), self.0.clone()))
    }
}

/// The system resolver, or [`Unavailable`] (with a warning) when it cannot be set up.
pub fn system_or_unavailable() -> std::sync::Arc<dyn Resolver> {
    match System::from_system() {
        Ok(r) => std::sync::Arc::new(r),
        Err(e) => {
            tracing::warn!(error = %e, "no dns resolver: outbound mail to the internet will wait");
            std::sync::Arc::new(Unavailable(e.to_string()))
        }
    }
}

/// An in-memory zone. Names are compared without case and without a trailing dot. A name
/// added with [`Static::fail`] answers every lookup with a temporary failure.
#[derive(Debug, Default)]
pub struct Static {
    zone: Mutex<Zone>,
}

#[derive(Debug, Default)]
struct Zone {
    mx: HashMap<String, Vec<Mx>>,
    ips: HashMap<String, Vec<IpAddr>>,
    txt: HashMap<String, Vec<String>>,
    failing: std::collections::HashSet<String>,
}

fn norm(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl Static {
    /// An empty zone: every name is unknown.
    pub fn new() -> Self {
        Self::default()
    }

    fn zone(&self) -> std::sync::MutexGuard<'_, Zone> {
        self.zone.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds an MX record.
    pub fn add_mx(&self, domain: &str, preference: u16, exchange: &str) -> &Self {
        let mut z = self.zone();
        let list = z.mx.entry(norm(domain)).or_default();
        list.push(Mx {
            preference,
            exchange: norm(exchange),
        });
        list.sort_by_key(|m| m.preference);
        drop(z);
        self
    }

    /// Adds an A or AAAA record.
    pub fn add_ip(&self, host: &str, ip: IpAddr) -> &Self {
        self.zone().ips.entry(norm(host)).or_default().push(ip);
        self
    }

    /// Adds a TXT record.
    pub fn add_txt(&self, name: &str, text: &str) -> &Self {
        self.zone()
            .txt
            .entry(norm(name))
            .or_default()
            .push(text.to_owned());
        self
    }

    /// Makes every lookup of `name` a temporary failure.
    pub fn fail(&self, name: &str) -> &Self {
        self.zone().failing.insert(norm(name));
        self
    }

    fn get<T: Clone>(
        &self,
        name: &str,
        pick: impl Fn(&Zone) -> &HashMap<String, Vec<T>>,
    ) -> Result<Vec<T>, DnsError> {
        let key = norm(name);
        let z = self.zone();
        if z.failing.contains(&key) {
            return Err(DnsError::Temporary(key, "SERVFAIL".into()));
        }
        match pick(&z).get(&key) {
            Some(v) if !v.is_empty() => Ok(v.clone()),
            _ => Err(DnsError::NotFound(key)),
        }
    }
}

#[async_trait::async_trait]
impl Resolver for Static {
    async fn mx(&self, domain: &str) -> Result<Vec<Mx>, DnsError> {
        self.get(domain, |z| &z.mx)
    }

    async fn ips(&self, host: &str) -> Result<Vec<IpAddr>, DnsError> {
        self.get(host, |z| &z.ips)
    }

    async fn txt(&self, name: &str) -> Result<Vec<String>, DnsError> {
        self.get(name, |z| &z.txt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_static_zone_answers_sorted_and_tells_missing_from_failing() {
        let dns = Static::new();
        dns.add_mx("Example.TEST.", 20, "b.example.test.")
            .add_mx("example.test", 10, "a.example.test")
            .add_ip("a.example.test", "192.0.2.1".parse().unwrap())
            .fail("broken.test");
        let mx = dns.mx("example.test").await.unwrap();
        assert_eq!(
            mx.iter().map(|m| m.exchange.as_str()).collect::<Vec<_>>(),
            ["a.example.test", "b.example.test"]
        );
        assert_eq!(
            dns.ips("A.example.test.").await.unwrap(),
            vec!["192.0.2.1".parse::<IpAddr>().unwrap()]
        );
        assert!(matches!(
            dns.mx("nowhere.test").await,
            Err(DnsError::NotFound(_))
        ));
        assert!(matches!(
            dns.txt("broken.test").await,
            Err(DnsError::Temporary(..))
        ));
    }
}
