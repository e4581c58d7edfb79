//! The accept loops: connection limits (in all and per client address), the early-talker
//! check before the greeting, connection ids and spans, then a session per connection.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use common::net::{AcceptOptions, accept_loop};
use common::smtp::server::Connection;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::Spool;
use crate::session::{self, Listener};

/// How long a client that waited for the greeting is remembered (postscreen's
/// `postscreen_greet_ttl` is one day).
const GREET_PASS_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// Clients remembered at most (the table is cleared when full).
const GREET_PASS_MAX: usize = 100_000;

/// Client addresses that recently passed the early-talker test.
#[derive(Default)]
pub(crate) struct GreetPassed(Mutex<HashMap<IpAddr, tokio::time::Instant>>);

impl GreetPassed {
    fn is_fresh(&self, ip: IpAddr) -> bool {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(&ip).is_some_and(|t| t.elapsed() < GREET_PASS_TTL)
    }

    fn insert(&self, ip: IpAddr) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= GREET_PASS_MAX {
            map.clear();
        }
        map.insert(ip, tokio::time::Instant::now());
    }
}

/// Time allowed to write a refusal before closing.
const REFUSAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Accepts MX connections until `shutdown`.
pub(crate) async fn serve_mx(
    spool: Arc<Spool>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let opts = AcceptOptions {
        service: "spool",
        protocol: "smtp",
        max_connections: spool.settings.max_connections,
        busy_reply: b"421 4.3.2 too many connections, try again later\r\n",
        trusted: None,
        untrusted_reply: b"",
        shutdown_grace: spool.settings.shared.shutdown_grace,
    };
    let token = shutdown.clone();
    accept_loop(listener, opts, shutdown, move |stream, peer, id| {
        let (spool, token) = (spool.clone(), token.clone());
        async move {
            let Some(_slot) = spool
                .per_ip
                .acquire(peer.ip(), spool.settings.max_connections_per_ip)
            else {
                tracing::warn!("too many connections from this address");
                refuse(
                    stream,
                    b"421 4.7.0 too many connections from your address\r\n",
                )
                .await;
                return;
            };
            let delay = spool.settings.greet_delay;
            // Like Postfix's postscreen, a client that passed the test recently is not made
            // to wait again.
            if !delay.is_zero() && !spool.greet_passed.is_fresh(peer.ip()) {
                match talks_first(&stream, delay).await {
                    Talk::Waited => spool.greet_passed.insert(peer.ip()),
                    Talk::Gone => return,
                    Talk::TalkedFirst => {
                        tracing::warn!("early talker: the client spoke before the greeting");
                        refuse(
                            stream,
                            b"554 5.5.1 protocol error: talking before the greeting\r\n",
                        )
                        .await;
                        return;
                    }
                }
            }
            let conn = Connection::new(Box::new(stream), peer, session::limits(&spool));
            session::run(spool, conn, id, Listener::Mx, token).await;
        }
    })
    .await
}

/// Accepts reinjection connections (trusted networks only) until `shutdown`.
pub(crate) async fn serve_reinject(
    spool: Arc<Spool>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let opts = AcceptOptions {
        service: "spool",
        protocol: "reinject",
        max_connections: spool.settings.max_connections,
        busy_reply: b"421 4.3.2 too many connections, try again later\r\n",
        trusted: Some(spool.settings.shared.spool_networks.clone()),
        untrusted_reply: b"554 5.7.1 reinjection is not available to you\r\n",
        shutdown_grace: spool.settings.shared.shutdown_grace,
    };
    let token = shutdown.clone();
    accept_loop(listener, opts, shutdown, move |stream, peer, id| {
        let (spool, token) = (spool.clone(), token.clone());
        async move {
            let conn = Connection::new(Box::new(stream), peer, session::limits(&spool));
            session::run(spool, conn, id, Listener::Reinject, token).await;
        }
    })
    .await
}

enum Talk {
    Waited,
    TalkedFirst,
    Gone,
}

/// Waits `delay` for the client to stay silent, as a well-behaved client does until the
/// greeting (RFC 5321 §3.1); a bot that sends at once is an early talker (Postfix's
/// postscreen "pregreet" test).
async fn talks_first(stream: &TcpStream, delay: std::time::Duration) -> Talk {
    let mut byte = [0u8; 1];
    match tokio::time::timeout(delay, stream.peek(&mut byte)).await {
        Err(_) => Talk::Waited,
        Ok(Ok(0) | Err(_)) => Talk::Gone,
        Ok(Ok(_)) => Talk::TalkedFirst,
    }
}

/// Writes a refusal and closes. What the client already sent is read first, so the close does
/// not reset the connection before the refusal is read.
async fn refuse(mut stream: TcpStream, reply: &'static [u8]) {
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(std::time::Duration::ZERO, stream.read(&mut sink)).await;
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, async {
        stream.write_all(reply).await?;
        stream.shutdown().await
    })
    .await;
}

/// Live sessions per client address.
#[derive(Debug, Default)]
pub(crate) struct PerIp(Mutex<HashMap<IpAddr, usize>>);

/// One session's place in [`PerIp`]; given back when dropped.
pub(crate) struct IpSlot {
    map: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    /// A slot for one more session from `ip`, unless it already has `max`.
    pub(crate) fn acquire(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpSlot> {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let n = map.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            map: self.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self.map.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}
