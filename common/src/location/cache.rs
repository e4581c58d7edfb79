//! A short-TTL cache in front of a [`Directory`] for the lookups on hot paths.
//!
//! A busy spool or proxy must not contend on the database for every RCPT or login. Answers
//! (negative ones too) are kept for `ttl`. When the database fails, an answer younger than
//! `stale_ttl` is served instead, so a short outage costs nothing; without one the caller
//! gets [`LookupError`] and answers with a temporary failure. Changes go straight through and
//! drop the whole cache, so an operator sees the effect of their own change at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::{
    Alias, ChangeError, Credentials, Directory, DomainInfo, Filer, FilerState, FilerUsage,
    LookupError, Mailbox, MailboxState, NewMailbox,
};

/// Entries per table before the table is cleared (bounds memory under a dictionary attack).
const MAX_ENTRIES: usize = 100_000;

/// A caching [`Directory`].
pub struct Cached {
    inner: Arc<dyn Directory>,
    ttl: Duration,
    stale_ttl: Duration,
    domains: Table<bool>,
    mailboxes: Table<Option<Mailbox>>,
    aliases: Table<Vec<String>>,
    filers: Table<Option<Filer>>,
}

struct Table<V>(Mutex<HashMap<String, (Instant, V)>>);

impl<V: Clone> Table<V> {
    fn new() -> Self {
        Self(Mutex::new(HashMap::new()))
    }

    fn get(&self, key: &str, max_age: Duration) -> Option<V> {
        let map = self.0.lock().ok()?;
        map.get(key)
            .filter(|(at, _)| at.elapsed() < max_age)
            .map(|(_, v)| v.clone())
    }

    fn put(&self, key: &str, v: V) {
        if let Ok(mut map) = self.0.lock() {
            if map.len() >= MAX_ENTRIES {
                map.clear();
            }
            map.insert(key.to_owned(), (Instant::now(), v));
        }
    }

    fn clear(&self) {
        if let Ok(mut map) = self.0.lock() {
            map.clear();
        }
    }
}

impl Cached {
    /// Caches `inner` for `ttl`; stale answers are served for up to twelve times that during
    /// an outage.
    pub fn new(inner: Arc<dyn Directory>, ttl: Duration) -> Self {
        Self {
            inner,
            ttl,
            stale_ttl: ttl * 12,
            domains: Table::new(),
            mailboxes: Table::new(),
            aliases: Table::new(),
            filers: Table::new(),
        }
    }

    fn invalidate(&self) {
        self.domains.clear();
        self.mailboxes.clear();
        self.aliases.clear();
        self.filers.clear();
    }

    async fn cached<V: Clone>(
        &self,
        table: &Table<V>,
        key: &str,
        fetch: impl std::future::Future<Output = Result<V, LookupError>>,
    ) -> Result<V, LookupError> {
        if self.ttl.is_zero() {
            return fetch.await;
        }
        if let Some(v) = table.get(key, self.ttl) {
            return Ok(v);
        }
        match fetch.await {
            Ok(v) => {
                table.put(key, v.clone());
                Ok(v)
            }
            Err(e) => table.get(key, self.stale_ttl).ok_or(e),
        }
    }

    async fn changed<T>(&self, r: Result<T, ChangeError>) -> Result<T, ChangeError> {
        self.invalidate();
        r
    }
}

#[async_trait::async_trait]
impl Directory for Cached {
    async fn is_hosted_domain(&self, domain: &str) -> Result<bool, LookupError> {
        self.cached(&self.domains, domain, self.inner.is_hosted_domain(domain))
            .await
    }
    async fn mailbox(&self, address: &str) -> Result<Option<Mailbox>, LookupError> {
        self.cached(&self.mailboxes, address, self.inner.mailbox(address))
            .await
    }
    async fn mailbox_fresh(&self, address: &str) -> Result<Option<Mailbox>, LookupError> {
        self.inner.mailbox_fresh(address).await
    }
    async fn alias_targets(&self, address: &str) -> Result<Vec<String>, LookupError> {
        self.cached(&self.aliases, address, self.inner.alias_targets(address))
            .await
    }
    async fn filer(&self, name: &str) -> Result<Option<Filer>, LookupError> {
        self.cached(&self.filers, name, self.inner.filer(name))
            .await
    }
    async fn filers(&self) -> Result<Vec<FilerUsage>, LookupError> {
        self.inner.filers().await
    }
    async fn credentials(&self, address: &str) -> Result<Option<Credentials>, LookupError> {
        // Not cached: a changed password must take effect at once.
        self.inner.credentials(address).await
    }
    async fn domains(&self) -> Result<Vec<DomainInfo>, LookupError> {
        self.inner.domains().await
    }
    async fn mailboxes(&self, domain: Option<&str>) -> Result<Vec<Mailbox>, LookupError> {
        self.inner.mailboxes(domain).await
    }
    async fn aliases(&self, domain: Option<&str>) -> Result<Vec<Alias>, LookupError> {
        self.inner.aliases(domain).await
    }
    async fn add_domain(&self, domain: &str) -> Result<(), ChangeError> {
        let r = self.inner.add_domain(domain).await;
        self.changed(r).await
    }
    async fn remove_domain(&self, domain: &str) -> Result<(), ChangeError> {
        let r = self.inner.remove_domain(domain).await;
        self.changed(r).await
    }
    async fn add_mailbox(&self, new: NewMailbox) -> Result<Mailbox, ChangeError> {
        let r = self.inner.add_mailbox(new).await;
        self.changed(r).await
    }
    async fn set_credentials(&self, address: &str, c: Credentials) -> Result<(), ChangeError> {
        let r = self.inner.set_credentials(address, c).await;
        self.changed(r).await
    }
    async fn set_mailbox_state(&self, address: &str, s: MailboxState) -> Result<(), ChangeError> {
        let r = self.inner.set_mailbox_state(address, s).await;
        self.changed(r).await
    }
    async fn move_mailbox(&self, address: &str, from: &str, to: &str) -> Result<(), ChangeError> {
        let r = self.inner.move_mailbox(address, from, to).await;
        self.changed(r).await
    }
    async fn set_quota(&self, address: &str, quota: u64) -> Result<(), ChangeError> {
        let r = self.inner.set_quota(address, quota).await;
        self.changed(r).await
    }
    async fn remove_mailbox(&self, address: &str) -> Result<(), ChangeError> {
        let r = self.inner.remove_mailbox(address).await;
        self.changed(r).await
    }
    async fn add_alias(&self, address: &str, target: &str) -> Result<(), ChangeError> {
        let r = self.inner.add_alias(address, target).await;
        self.changed(r).await
    }
    async fn remove_alias(&self, address: &str, target: Option<&str>) -> Result<u64, ChangeError> {
        let r = self.inner.remove_alias(address, target).await;
        self.changed(r).await
    }
    async fn add_filer(&self, filer: &Filer) -> Result<(), ChangeError> {
        let r = self.inner.add_filer(filer).await;
        self.changed(r).await
    }
    async fn register_filer(&self, filer: &Filer) -> Result<(), ChangeError> {
        let r = self.inner.register_filer(filer).await;
        self.changed(r).await
    }
    async fn set_filer_state(&self, name: &str, state: FilerState) -> Result<(), ChangeError> {
        let r = self.inner.set_filer_state(name, state).await;
        self.changed(r).await
    }
}
