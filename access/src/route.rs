//! After a good login: find the mailbox's filer, log in there, and copy bytes both ways.
//!
//! Protocol-neutral: the IMAP and POP3 sessions call [`open`] with the authenticated address,
//! answer the client, then call [`relay`].

use std::net::SocketAddr;

use common::location::{FilerState, MailboxState};
use common::net::ConnId;
use common::smtp::server::BoxStream;
use tokio::io::AsyncWriteExt as _;
use tokio_util::sync::CancellationToken;

use crate::Access;
use crate::backend::{self, Backend, BackendError, Login, Protocol};
use crate::health::Admission;

/// Buffer size of each direction of the copy, allocated per logged-in connection: small, for
/// thousands of idle connections (2 x 8 KiB each; with 32 KiB a proxied IDLE connection cost
/// ~90 KiB instead of ~40, see bench/RESULTS.md). A big FETCH moves in 8 KiB reads.
const COPY_BUFFER: usize = 8 * 1024;

/// Why the user cannot be served now; the client gets the protocol's temporary failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unavailable {
    /// Try again later; the text says why.
    Temporary(&'static str),
    /// The filer holds the mailbox locked for another POP3 session (RFC 2449 `[IN-USE]`).
    InUse,
}

/// Opens a logged-in connection to the filer of `address` (key form).
pub(crate) async fn open(
    access: &Access,
    address: &str,
    protocol: Protocol,
    client: SocketAddr,
    conn: ConnId,
) -> Result<Backend, Unavailable> {
    const TRY_LATER: Unavailable = Unavailable::Temporary("temporary failure, try again later");
    let mailbox = match access.directory.mailbox(address).await {
        Ok(Some(m)) => m,
        Ok(None) => return Err(TRY_LATER),
        Err(e) => {
            tracing::warn!(error = %e, "mailbox lookup failed");
            return Err(TRY_LATER);
        }
    };
    if mailbox.state == MailboxState::Moving {
        return Err(Unavailable::Temporary(
            "mailbox is being moved, try again shortly",
        ));
    }
    let filer = match access.directory.filer(&mailbox.filer).await {
        Ok(Some(f)) => f,
        Ok(None) => {
            tracing::warn!(filer = %mailbox.filer, "the mailbox's filer is not in the database");
            return Err(TRY_LATER);
        }
        Err(e) => {
            tracing::warn!(error = %e, "filer lookup failed");
            return Err(TRY_LATER);
        }
    };
    if filer.state == FilerState::Down {
        return Err(Unavailable::Temporary(
            "mailbox server is down for maintenance",
        ));
    }
    let target = match protocol {
        Protocol::Imap => &filer.imap,
        Protocol::Pop3 => &filer.pop3,
    };
    let Ok(addr) = target.parse::<SocketAddr>() else {
        tracing::warn!(filer = %filer.name, address = %target, "filer has no usable address for this protocol");
        return Err(TRY_LATER);
    };
    let admission = access.health.admit(&filer.name);
    if admission == Admission::Down {
        tracing::info!(filer = %filer.name, "filer known down; answered at once");
        return Err(Unavailable::Temporary(
            "mailbox server unavailable, try again later",
        ));
    }
    let login = Login {
        addr,
        user: address,
        principal: &access.settings.shared.proxy_principal,
        secret: &access.proxy_secret,
        client,
        connect_timeout: access.settings.filer_connect_timeout,
        login_timeout: access.settings.filer_login_timeout,
    };
    match backend::connect(protocol, &login).await {
        Ok(b) => {
            access.health.succeeded(&filer.name);
            Ok(b)
        }
        Err(e) => {
            tracing::warn!(filer = %filer.name, %addr, error = %e, "filer login failed");
            if e.is_filer_failure() {
                access.health.failed(&filer.name, conn, admission);
            } else {
                access.health.succeeded(&filer.name);
            }
            match e {
                BackendError::Refused(line) if line.contains("[IN-USE]") => Err(Unavailable::InUse),
                _ => Err(Unavailable::Temporary(
                    "mailbox server unavailable, try again later",
                )),
            }
        }
    }
}

/// Copies bytes both ways until either side closes (or shutdown): first what the client
/// pipelined after its login and what the filer sent after its login reply, then everything,
/// with no per-command work.
pub(crate) async fn relay(
    mut client: BoxStream,
    client_pipelined: &[u8],
    mut backend: Backend,
    shutdown: CancellationToken,
) {
    let copy = async {
        if !client_pipelined.is_empty() {
            backend.stream.write_all(client_pipelined).await?;
        }
        if !backend.leftover.is_empty() {
            client.write_all(&backend.leftover).await?;
        }
        tokio::io::copy_bidirectional_with_sizes(
            &mut client,
            &mut backend.stream,
            COPY_BUFFER,
            COPY_BUFFER,
        )
        .await
    };
    tokio::select! {
        r = copy => match r {
            Ok((up, down)) => tracing::info!(up, down, "session ended"),
            Err(e) => tracing::info!(error = %e, "session ended"),
        },
        // The filer sends its own `BYE` when it shuts down; here the proxy is going away.
        _ = shutdown.cancelled() => tracing::info!("session cut by shutdown"),
    }
}
