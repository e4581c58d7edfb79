//! One SMTP session: read → decode → dispatch → reply, with the error budget, the shutdown
//! check between commands, and STARTTLS. Each verb has its own handler file.

mod data;
mod ehlo;
mod mail;
mod rcpt;
mod state;

use std::sync::Arc;

use common::net::ConnId;
use common::smtp::Reply;
use common::smtp::server::{Command, Connection, Limits};
use smtp_proto::Request;
use tokio_util::sync::CancellationToken;

use crate::Spool;
use state::State;

/// Which listener a session came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Listener {
    /// The MX: the internet.
    Mx,
    /// Reinjection from the filter (trusted networks only): routed, never filtered again.
    Reinject,
}

/// Whether to go on after a handler.
pub(crate) enum Flow {
    Continue,
    Close,
}

/// What a session knows besides its state.
pub(crate) struct Session {
    pub(crate) spool: Arc<Spool>,
    pub(crate) id: ConnId,
    pub(crate) listener: Listener,
    errors: u32,
}

/// The connection limits of an SMTP session.
pub(crate) fn limits(spool: &Spool) -> Limits {
    let s = &spool.settings;
    Limits {
        max_line_len: 4096,
        command_timeout: s.command_timeout,
        data_timeout: s.data_timeout,
        session_timeout: std::time::Duration::from_secs(3600),
        max_message_size: s.max_message_size.bytes(),
    }
}

/// Runs one SMTP session to its end; the greeting has not been sent.
pub(crate) async fn run(
    spool: Arc<Spool>,
    mut conn: Connection,
    id: ConnId,
    listener: Listener,
    shutdown: CancellationToken,
) {
    let host = spool.settings.shared.hostname.clone();
    let mut session = Session {
        spool,
        id,
        listener,
        errors: 0,
    };
    conn.reply(&Reply::ok(220, "", format!("{host} ESMTP")));
    let mut state = State::Connected;
    loop {
        // Shutdown ends a session between commands; a message in DATA is finished first.
        let read = tokio::select! {
            biased;
            _ = shutdown.cancelled() => None,
            r = conn.read_command() => Some(r),
        };
        let Some(read) = read else {
            conn.reply(&Reply::temp(421, "4.3.2", format!("{host} shutting down")));
            break;
        };
        let command = match read {
            Ok(c) => c,
            Err(e) => {
                if let Some(r) = e.reply() {
                    conn.reply(&r);
                }
                if e.is_fatal() || session.count_error() {
                    if !e.is_fatal() {
                        conn.reply(&too_many_errors());
                    }
                    break;
                }
                continue;
            }
        };
        if let Command::Request(Request::StartTls) = command {
            match session.starttls(conn, state).await {
                Some((c, s)) => {
                    conn = c;
                    state = s;
                    continue;
                }
                None => return,
            }
        }
        let (next, reply, flow) = match command {
            Command::Request(req) => session.handle(&mut conn, state, req).await,
            Command::Unknown { .. } => (
                state,
                Reply::perm(500, "5.5.1", "command not recognized"),
                Flow::Continue,
            ),
        };
        state = next;
        if reply.code != 0 {
            conn.reply(&reply);
        }
        if reply.is_permanent() && session.count_error() {
            conn.reply(&too_many_errors());
            break;
        }
        if let Flow::Close = flow {
            break;
        }
    }
    if let (_, Some(message)) = state.reset() {
        message.discard(session.spool.runner.queue()).await;
    }
    let _ = conn.close().await;
}

impl Session {
    /// Counts a refused command; true when the budget is spent and the session must end.
    fn count_error(&mut self) -> bool {
        self.errors += 1;
        self.errors >= self.spool.settings.max_errors
    }

    async fn handle(
        &mut self,
        conn: &mut Connection,
        state: State,
        req: Request<String>,
    ) -> (State, Reply, Flow) {
        let host = &self.spool.settings.shared.hostname;
        match req {
            Request::Ehlo { host: name } => self.handle_ehlo(conn, state, name, true).await,
            Request::Helo { host: name } => self.handle_ehlo(conn, state, name, false).await,
            Request::Lhlo { .. } => (
                state,
                Reply::perm(500, "5.5.1", "this is SMTP: use EHLO"),
                Flow::Continue,
            ),
            Request::Mail { from } => self.handle_mail(state, from),
            Request::Rcpt { to } => self.handle_rcpt(state, to).await,
            Request::Data => self.handle_data(conn, state).await,
            Request::Bdat {
                chunk_size,
                is_last,
            } => self.handle_bdat(conn, state, chunk_size, is_last).await,
            Request::Rset => {
                let (state, message) = state.reset();
                if let Some(m) = message {
                    m.discard(self.spool.runner.queue()).await;
                }
                (state, Reply::ok(250, "2.0.0", "reset"), Flow::Continue)
            }
            Request::Noop { .. } => (state, Reply::ok(250, "2.0.0", "ok"), Flow::Continue),
            Request::Quit => (
                state,
                Reply::ok(221, "2.0.0", format!("{host} closing connection")),
                Flow::Close,
            ),
            Request::Vrfy { .. } => (
                state,
                Reply::ok(252, "2.5.0", "cannot verify, but will attempt delivery"),
                Flow::Continue,
            ),
            Request::Expn { .. } => (
                state,
                Reply::perm(502, "5.5.1", "EXPN is not offered"),
                Flow::Continue,
            ),
            Request::Help { .. } => (
                state,
                Reply::ok(214, "2.0.0", "see RFC 5321"),
                Flow::Continue,
            ),
            Request::Auth { .. } => (
                state,
                Reply::perm(
                    502,
                    "5.5.1",
                    "AUTH is not offered here; use the submission port",
                ),
                Flow::Continue,
            ),
            Request::StartTls => (
                state,
                Reply::perm(502, "5.5.1", "STARTTLS is not offered"),
                Flow::Continue,
            ),
            _ => (
                state,
                Reply::perm(502, "5.5.1", "command not implemented"),
                Flow::Continue,
            ),
        }
    }

    /// STARTTLS (RFC 3207): only on the MX listener, only once, not inside a transaction.
    /// Returns `None` when the connection is gone.
    async fn starttls(
        &mut self,
        mut conn: Connection,
        state: State,
    ) -> Option<(Connection, State)> {
        let acceptor = match (&self.spool.tls, self.listener) {
            (Some(a), Listener::Mx) if !conn.is_tls() => a.clone(),
            _ => {
                conn.reply(&Reply::perm(502, "5.5.1", "STARTTLS is not offered"));
                return Some((conn, state));
            }
        };
        if !matches!(state, State::Greeted(_)) {
            conn.reply(&Reply::perm(
                503,
                "5.5.1",
                "send EHLO first, outside a transaction",
            ));
            return Some((conn, state));
        }
        conn.reply(&Reply::ok(220, "2.0.0", "ready to start TLS"));
        match conn.starttls(&acceptor).await {
            // RFC 3207 §4.2: forget everything learnt before, the client says EHLO again.
            Ok(conn) => Some((conn, State::Connected)),
            Err(e) => {
                tracing::info!(error = %e, "starttls failed");
                None
            }
        }
    }
}

fn too_many_errors() -> Reply {
    Reply::temp(421, "4.7.0", "too many errors, closing connection")
}

/// A reply the handler already wrote (the 354 path writes its own); nothing more to send.
pub(crate) fn written() -> Reply {
    Reply {
        code: 0,
        enhanced: None,
        lines: Vec::new(),
    }
}

/// Peer-supplied text for a header: printable ASCII only, bounded.
pub(crate) fn sanitize(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(255)
        .collect()
}
