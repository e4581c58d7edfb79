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

/// What an accept loop needs besides its listener.
#[derive(Debug, Clone)]
pub struct AcceptOptions {
    /// The service, for metrics (`spool`, `filer`, ...).
    pub service: &'static str,
    /// The protocol, for logs (`lmtp`, `pop3`, ...).
    pub protocol: &'static str,
    /// Most concurrent connections; one more is sent `busy_reply` and closed.
    pub max_connections: usize,
    /// Sent to a connection over the limit (`421 4.3.2 too busy\r\n`, `* BYE ...`).
    pub busy_reply: &'static [u8],
    /// Peers allowed to connect; `None` allows everyone.
    pub trusted: Option<Networks>,
    /// Sent to a peer outside `trusted` before closing.
    pub untrusted_reply: &'static [u8],
    /// How long to wait for sessions to end after shutdown.
    pub shutdown_grace: Duration,
}

/// Accepts connections until `shutdown` is cancelled, running `handler` for each in its own
/// task inside a span with `conn`, `peer` and an empty `user` field. Connections over the
/// limit or from untrusted peers get the configured reply and are closed. After shutdown it
/// waits up to `shutdown_grace` for running sessions (each sees the same token between
/// commands).
pub async fn accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    opts: AcceptOptions,
    shutdown: tokio_util::sync::CancellationToken,
    handler: F,
) -> io::Result<()>
where
    F: Fn(tokio::net::TcpStream, std::net::SocketAddr, ConnId) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use tokio::io::AsyncWriteExt as _;
    use tracing::Instrument as _;

    let tasks = tokio_util::task::TaskTracker::new();
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(opts.max_connections));
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) if is_transient_accept_error(&e) => {
                    tracing::warn!(protocol = opts.protocol, error = %e, "accept failed; pausing");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
                Err(e) => return Err(e),
            },
        };
        let _ = stream.set_nodelay(true);
        if let Some(trusted) = &opts.trusted
            && !trusted.contains(peer.ip())
        {
            tracing::warn!(protocol = opts.protocol, %peer, "refused an untrusted peer");
            crate::obs::connection(opts.service, opts.protocol, "untrusted");
            let reply = opts.untrusted_reply;
            tasks.spawn(async move {
                let mut stream = stream;
                let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(reply)).await;
            });
            continue;
        }
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(protocol = opts.protocol, %peer, "too many connections");
            crate::obs::connection(opts.service, opts.protocol, "busy");
            let reply = opts.busy_reply;
            tasks.spawn(async move {
                let mut stream = stream;
                let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(reply)).await;
            });
            continue;
        };
        let id = ConnId::next();
        let span = tracing::info_span!("conn", proto = opts.protocol, conn = %id, %peer, user = tracing::field::Empty);
        crate::obs::connection(opts.service, opts.protocol, "accepted");
        let active = crate::obs::ActiveSession::start(opts.service, opts.protocol);
        let fut = handler(stream, peer, id);
        tasks.spawn(
            async move {
                let _permit = permit;
                let _active = active;
                let started = tokio::time::Instant::now();
                fut.await;
                // One line per session, in its span (protocol, connection, peer, user).
                tracing::info!(ms = started.elapsed().as_millis() as u64, "session ended");
            }
            .instrument(span),
        );
    }
    tasks.close();
    if tokio::time::timeout(opts.shutdown_grace, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            protocol = opts.protocol,
            "sessions still running after the shutdown grace period"
        );
    }
    Ok(())
}

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
