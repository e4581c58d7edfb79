//! Login throttling: failed logins slow down per client address and per account.
//!
//! Each failure is counted against the client's address (IPv6 by its /64, since one host
//! usually holds a whole /64) and against the account name it tried, whether or not that
//! account exists, so an unknown user is throttled exactly like a wrong password. The answer
//! to a failed login waits [`Throttle::failed`]'s delay: `base_delay` for the first failure,
//! doubling with each further one up to `max_delay` (the larger of the address's and the
//! account's). A count is forgotten `window` after its last failure; a good login clears its
//! account's count (not the address's, or one valid account would let a brute force from the
//! same address reset itself).
//!
//! Like Dovecot's auth penalty, the delay is applied to the answer, not as a lockout: the
//! real user of an attacked account still logs in, only slower. Protocol-neutral: the access
//! proxy (IMAP, POP3) and the relay (SMTP AUTH) share it.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Most addresses (and, separately, accounts) tracked; past it, counts older than the window
/// are dropped, and if that is not enough, every count (a flood of distinct addresses must not
/// grow memory without bound).
const MAX_ENTRIES: usize = 100_000;

/// How failures turn into delays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleSettings {
    /// Delay after the first failure; each further failure doubles it.
    pub base_delay: Duration,
    /// The longest delay.
    pub max_delay: Duration,
    /// A count is forgotten this long after its last failure.
    pub window: Duration,
}

impl Default for ThrottleSettings {
    fn default() -> Self {
        Self {
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(15),
            window: Duration::from_secs(15 * 60),
        }
    }
}

/// Failure counts per client address and per account. Shared by every session of a service.
#[derive(Debug)]
pub struct Throttle {
    settings: ThrottleSettings,
    by_ip: Mutex<HashMap<IpAddr, Entry>>,
    by_account: Mutex<HashMap<String, Entry>>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    last: Instant,
}

impl Throttle {
    /// An empty throttle.
    pub fn new(settings: ThrottleSettings) -> Self {
        Self {
            settings,
            by_ip: Mutex::new(HashMap::new()),
            by_account: Mutex::new(HashMap::new()),
        }
    }

    /// Records a failed login from `ip` for `account` (the name as the client gave it, when it
    /// gave one) and returns how long to wait before answering.
    pub fn failed(&self, ip: IpAddr, account: Option<&str>) -> Duration {
        let now = Instant::now();
        let by_ip = record(&self.by_ip, prefix(ip), now, self.settings.window);
        let by_account = account
            .map(|a| {
                record(
                    &self.by_account,
                    a.to_lowercase(),
                    now,
                    self.settings.window,
                )
            })
            .unwrap_or(0);
        self.delay(by_ip.max(by_account))
    }

    /// Records a good login: the account's count is cleared.
    pub fn succeeded(&self, account: &str) {
        let mut map = self
            .by_account
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.remove(&account.to_lowercase());
    }

    /// The failures currently counted against `ip` (for logs and tests).
    pub fn failures_from(&self, ip: IpAddr) -> u32 {
        let now = Instant::now();
        let map = self.by_ip.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(&prefix(ip))
            .filter(|e| now.duration_since(e.last) < self.settings.window)
            .map_or(0, |e| e.failures)
    }

    fn delay(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let doublings = (failures - 1).min(31);
        self.settings
            .base_delay
            .saturating_mul(1u32 << doublings)
            .min(self.settings.max_delay)
    }
}

/// Counts one failure for `key` and returns its new count.
fn record<K: Hash + Eq>(
    map: &Mutex<HashMap<K, Entry>>,
    key: K,
    now: Instant,
    window: Duration,
) -> u32 {
    let mut map = map.lock().unwrap_or_else(PoisonError::into_inner);
    if map.len() >= MAX_ENTRIES && !map.contains_key(&key) {
        map.retain(|_, e| now.duration_since(e.last) < window);
        if map.len() >= MAX_ENTRIES {
            tracing::warn!(entries = map.len(), "login throttle full; counts dropped");
            map.clear();
        }
    }
    let e = map.entry(key).or_insert(Entry {
        failures: 0,
        last: now,
    });
    if now.duration_since(e.last) >= window {
        e.failures = 0;
    }
    e.failures = e.failures.saturating_add(1);
    e.last = now;
    e.failures
}

/// The key of a client address: IPv4 as is (IPv4-mapped IPv6 too), IPv6 by its /64.
fn prefix(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle() -> Throttle {
        Throttle::new(ThrottleSettings {
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            window: Duration::from_secs(60),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn delays_grow_per_address_and_per_account_and_are_capped() {
        let t = throttle();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let ms = |d: Duration| d.as_millis();
        assert_eq!(ms(t.failed(a, Some("u@x.test"))), 100);
        assert_eq!(ms(t.failed(a, Some("v@x.test"))), 200);
        assert_eq!(ms(t.failed(a, None)), 400);
        // Another address, same account: the account's count (2) rules.
        assert_eq!(ms(t.failed(b, Some("U@X.test"))), 200);
        for _ in 0..10 {
            t.failed(a, None);
        }
        assert_eq!(ms(t.failed(a, None)), 1000, "capped");
        assert_eq!(t.failures_from(a), 14);
    }

    #[tokio::test(start_paused = true)]
    async fn counts_are_forgotten_after_the_window_and_success_clears_the_account() {
        let t = throttle();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        t.failed(a, Some("u@x.test"));
        t.failed(a, Some("u@x.test"));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(t.failures_from(a), 0);
        assert_eq!(t.failed(a, Some("u@x.test")), Duration::from_millis(100));
        t.failed(b, Some("w@x.test"));
        t.succeeded("w@x.test");
        let c: IpAddr = "192.0.2.3".parse().unwrap();
        assert_eq!(t.failed(c, Some("w@x.test")), Duration::from_millis(100));
    }

    #[test]
    fn ipv6_is_counted_by_its_64_and_mapped_v4_as_v4() {
        let t = throttle();
        t.failed("2001:db8:1:2::1".parse().unwrap(), None);
        t.failed("2001:db8:1:2:ffff::9".parse().unwrap(), None);
        assert_eq!(t.failures_from("2001:db8:1:2::77".parse().unwrap()), 2);
        assert_eq!(t.failures_from("2001:db8:1:3::1".parse().unwrap()), 0);
        t.failed("::ffff:192.0.2.9".parse().unwrap(), None);
        assert_eq!(t.failures_from("192.0.2.9".parse().unwrap()), 1);
    }
}
