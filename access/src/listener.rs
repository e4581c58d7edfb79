//! The accept loops: connection limit, connection ids and spans, the TLS handshake of the
//! implicit-TLS listeners, then an IMAP or POP3 session per connection.

use std::net::SocketAddr;
use std::sync::Arc;

use common::net::{AcceptOptions, ConnId, accept_loop};
use common::smtp::server::BoxStream;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::backend::Protocol;
use crate::{Access, imap, pop3};

/// What a session knows about its client.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Client {
    pub(crate) peer: SocketAddr,
    pub(crate) conn: ConnId,
    /// Whether a login without TLS is allowed (loopback listener and client, dev mode).
    pub(crate) plaintext_ok: bool,
}

/// Accepts connections until `shutdown`.
pub(crate) async fn serve(
    access: Arc<Access>,
    listener: TcpListener,
    protocol: Protocol,
    implicit_tls: bool,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let opts = AcceptOptions {
        service: "access",
        protocol: match (protocol, implicit_tls) {
            (Protocol::Imap, false) => "imap",
            (Protocol::Imap, true) => "imaps",
            (Protocol::Pop3, false) => "pop3",
            (Protocol::Pop3, true) => "pop3s",
        },
        max_connections: access.settings.max_connections,
        busy_reply: match protocol {
            Protocol::Imap => b"* BYE [UNAVAILABLE] too many connections, try again later\r\n",
            Protocol::Pop3 => b"-ERR [SYS/TEMP] too many connections, try again later\r\n",
        },
        trusted: None,
        untrusted_reply: b"",
        shutdown_grace: access.settings.shared.shutdown_grace,
    };
    let local_is_loopback = listener.local_addr()?.ip().is_loopback();
    let token = shutdown.clone();
    accept_loop(listener, opts, shutdown, move |stream, peer, conn| {
        let (access, token) = (access.clone(), token.clone());
        async move {
            let client = Client {
                peer,
                conn,
                plaintext_ok: access.settings.plaintext_on_loopback
                    && local_is_loopback
                    && peer.ip().is_loopback(),
            };
            let Some(stream) = handshake(&access, stream, implicit_tls).await else {
                return;
            };
            match protocol {
                Protocol::Imap => imap::run(access, stream, client, implicit_tls, token).await,
                Protocol::Pop3 => pop3::run(access, stream, client, implicit_tls, token).await,
            }
        }
    })
    .await
}

/// The stream a session runs on: the TCP stream, or for implicit TLS the TLS stream once the
/// handshake finished (within the pre-login timeout).
async fn handshake(access: &Access, stream: TcpStream, implicit_tls: bool) -> Option<BoxStream> {
    if !implicit_tls {
        return Some(Box::new(stream));
    }
    let timeout = access.settings.prelogin_timeout;
    match tokio::time::timeout(timeout, access.tls.accept(stream)).await {
        Ok(Ok(tls)) => Some(Box::new(tls)),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "tls handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!("tls handshake timed out");
            None
        }
    }
}
