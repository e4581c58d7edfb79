//! Connection ids, trusted networks and helpers for accept loops.

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ipnet::IpNet;

/// A process-unique connection id. It goes into log spans, `Received:` headers and queue records,
/// so one message can be followed across services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId(u64);

impl ConnId {
    /// The next id of this process. Ids start at a value derived from the start time so that two
    /// runs of a service rarely reuse one.
    pub fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Self(process_seed().wrapping_add(n))
    }

    /// The raw value.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:012X}", self.0 & 0xFFFF_FFFF_FFFF)
    }
}

fn process_seed() -> u64 {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SEED.get_or_init(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        // Seconds in the high bits, the process id in the middle: unique enough across restarts.
        (now.as_secs() << 24) ^ (u64::from(std::process::id()) << 8)
    })
}

/// A set of networks that a listener trusts (reinjection, LMTP, proxy logins).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Networks(Vec<IpNet>);

impl Networks {
    /// The given networks.
    pub fn new(nets: Vec<IpNet>) -> Self {
        Self(nets)
    }

    /// Loopback only (127.0.0.0/8 and ::1).
    pub fn loopback() -> Self {
        let v4 = ipnet::Ipv4Net::new_assert(std::net::Ipv4Addr::new(127, 0, 0, 0), 8);
        let v6 = ipnet::Ipv6Net::new_assert(std::net::Ipv6Addr::LOCALHOST, 128);
        Self(vec![IpNet::V4(v4), IpNet::V6(v6)])
    }

    /// Whether `ip` lies in one of the networks. An IPv4-mapped IPv6 address is checked as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        self.0.iter().any(|n| n.contains(&ip))
    }

    /// The networks.
    pub fn as_slice(&self) -> &[IpNet] {
        &self.0
    }
}

/// Whether an `accept()` error concerns one connection or the process (too many open files)
/// and so should be retried after a pause, rather than end the listener.
pub fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::OutOfMemory
    ) || e.raw_os_error().is_some_and(|c| c == 23 || c == 24) // ENFILE, EMFILE
}

/// How long an accept loop pauses after a transient error.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_contains_127_and_mapped() {
        let n = Networks::loopback();
        assert!(n.contains("127.0.0.1".parse().unwrap()));
        assert!(n.contains("127.9.8.7".parse().unwrap()));
        assert!(n.contains("::1".parse().unwrap()));
        assert!(n.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!n.contains("192.0.2.1".parse().unwrap()));
        assert!(!n.contains("::2".parse().unwrap()));
    }

    #[test]
    fn conn_ids_differ() {
        assert_ne!(ConnId::next(), ConnId::next());
        assert_eq!(ConnId::next().to_string().len(), 12);
    }
}
