//! One submission session: read → dispatch → reply, with the error budget, the shutdown check
//! between commands, STARTTLS and AUTH. MAIL/RCPT are in `envelope.rs`, DATA in `data.rs`.

mod auth;
mod data;
mod envelope;

use std::sync::Arc;

use common::address::ReversePath;
use common::net::ConnId;
use common::sasl::Mechanism;
use common::smtp::Reply;
use common::smtp::server::{Command, Connection, Limits};
use smtp_proto::Request;
use tokio_util::sync::CancellationToken;

use crate::{Kind, Relay, Settings};

/// Whether to go on after a handler.
pub(crate) enum Flow {
    Continue,
    Close,
}

/// Where the session is in the dialogue.
pub(crate) enum State {
    /// Greeting sent; no EHLO yet (or after STARTTLS).
    Connected,
    /// EHLO done; no transaction.
    Greeted(Hello),
    /// MAIL accepted; RCPTs being collected.
    Mail { hello: Hello, tx: Transaction },
}

impl State {
    /// The state after RSET or the end of a transaction.
    fn reset(self) -> Self {
        match self {
            Self::Connected => Self::Connected,
            Self::Greeted(h) | Self::Mail { hello: h, .. } => Self::Greeted(h),
        }
    }
}

/// What the client said in EHLO/HELO.
#[derive(Debug, Clone)]
pub(crate) struct Hello {
    pub(crate) name: String,
    pub(crate) is_esmtp: bool,
}

/// One transaction being built.
pub(crate) struct Transaction {
    pub(crate) reverse_path: ReversePath,
    pub(crate) smtputf8: bool,
    /// The recipients (hosted ones in key form, remote ones as given with the domain in
    /// A-label form), without duplicates.
    pub(crate) recipients: Vec<String>,
}

/// A session's own state besides the dialogue.
pub(crate) struct Session {
    pub(crate) relay: Arc<Relay>,
    pub(crate) id: ConnId,
    /// The authenticated user (key form).
    pub(crate) user: Option<String>,
    /// A spool on the internal listener: no AUTH, no sender checks.
    pub(crate) internal: bool,
    errors: u32,
    pub(crate) auth_failures: u32,
}

/// The connection limits of a submission session.
pub(crate) fn limits(s: &Settings) -> Limits {
    Limits {
        max_line_len: 4096,
        command_timeout: s.command_timeout,
        data_timeout: s.data_timeout,
        session_timeout: std::time::Duration::from_secs(3600),
        max_message_size: s.max_message_size.bytes(),
    }
}

/// Runs one session to its end; the greeting has not been sent.
pub(crate) async fn run(
    relay: Arc<Relay>,
    mut conn: Connection,
    id: ConnId,
    kind: Kind,
    shutdown: CancellationToken,
) {
    let host = relay.settings.shared.hostname.clone();
    let mut session = Session {
        relay,
        id,
        user: None,
        internal: kind == Kind::Internal,
        errors: 0,
        auth_failures: 0,
    };
    conn.reply(&Reply::ok(220, "", format!("{host} ESMTP submission")));
    let mut state = State::Connected;
    loop {
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
    let _ = conn.close().await;
}

impl Session {
    /// Counts a refused command; true when the budget is spent.
    fn count_error(&mut self) -> bool {
        self.errors += 1;
        self.errors >= self.relay.settings.max_errors
    }

    async fn handle(
        &mut self,
        conn: &mut Connection,
        state: State,
        req: Request<String>,
    ) -> (State, Reply, Flow) {
        let host = &self.relay.settings.shared.hostname;
        match req {
            Request::Ehlo { host: name } => self.handle_ehlo(conn, state, name, true),
            Request::Helo { host: name } => self.handle_ehlo(conn, state, name, false),
            Request::Lhlo { .. } => (
                state,
                Reply::perm(500, "5.5.1", "this is SMTP: use EHLO"),
                Flow::Continue,
            ),
            Request::Auth {
                mechanism,
                initial_response,
            } => {
                self.handle_auth(conn, state, mechanism, initial_response)
                    .await
            }
            Request::Mail { from } => self.handle_mail(state, from).await,
            Request::Rcpt { to } => self.handle_rcpt(state, to).await,
            Request::Data => self.handle_data(conn, state).await,
            Request::Bdat { chunk_size, .. } => {
                // CHUNKING is not offered; the chunk is still read to its end, so its bytes
                // can never be taken for commands.
                let reply = Reply::perm(502, "5.5.1", "CHUNKING is not offered; use DATA");
                match conn
                    .read_bdat(chunk_size as u64, &mut tokio::io::sink(), 0)
                    .await
                {
                    Ok(_) => (state.reset(), reply, Flow::Continue),
                    Err(e) => (state, e.reply().unwrap_or(reply), Flow::Close),
                }
            }
            Request::Rset => (
                state.reset(),
                Reply::ok(250, "2.0.0", "reset"),
                Flow::Continue,
            ),
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
                Reply::ok(214, "2.0.0", "see RFC 6409"),
                Flow::Continue,
            ),
            _ => (
                state,
                Reply::perm(502, "5.5.1", "command not implemented"),
                Flow::Continue,
            ),
        }
    }

    /// Whether AUTH may be used on this connection now.
    pub(crate) fn auth_allowed(&self, conn: &Connection) -> bool {
        conn.is_tls()
            || (self.relay.settings.plaintext_on_loopback && conn.peer().ip().is_loopback())
    }

    /// EHLO/HELO: resets any transaction and lists the extensions; AUTH only where it may be
    /// used, STARTTLS only before TLS.
    fn handle_ehlo(
        &mut self,
        conn: &Connection,
        state: State,
        name: String,
        is_esmtp: bool,
    ) -> (State, Reply, Flow) {
        let state = state.reset();
        if name.trim().is_empty() {
            return (
                state,
                Reply::perm(501, "5.5.4", "syntax: EHLO hostname"),
                Flow::Continue,
            );
        }
        let settings = &self.relay.settings;
        let host = settings.shared.hostname.clone();
        let hello = Hello { name, is_esmtp };
        if !is_esmtp {
            return (
                State::Greeted(hello),
                Reply::ok(250, "", host),
                Flow::Continue,
            );
        }
        let mut lines = vec![
            host,
            "PIPELINING".to_owned(),
            format!("SIZE {}", settings.max_message_size.bytes()),
            "8BITMIME".to_owned(),
            "SMTPUTF8".to_owned(),
            "ENHANCEDSTATUSCODES".to_owned(),
        ];
        if !conn.is_tls() && !self.internal {
            lines.push("STARTTLS".to_owned());
        }
        if self.auth_allowed(conn) && self.user.is_none() && !self.internal {
            let names: Vec<&str> = Mechanism::ALL.iter().map(|m| m.as_str()).collect();
            lines.push(format!("AUTH {}", names.join(" ")));
        }
        (
            State::Greeted(hello),
            Reply::multiline(250, "", lines),
            Flow::Continue,
        )
    }

    /// STARTTLS (RFC 3207): once, outside a transaction; everything learnt before is forgotten,
    /// the authentication included.
    async fn starttls(
        &mut self,
        mut conn: Connection,
        state: State,
    ) -> Option<(Connection, State)> {
        if conn.is_tls() {
            conn.reply(&Reply::perm(502, "5.5.1", "TLS is already active"));
            return Some((conn, state));
        }
        if !matches!(state, State::Greeted(_)) {
            conn.reply(&Reply::perm(
                503,
                "5.5.1",
                "send EHLO first, outside a transaction",
            ));
            return Some((conn, state));
        }
        conn.reply(&Reply::ok(220, "2.0.0", "ready to start TLS"));
        let acceptor = self.relay.tls.clone();
        match conn.starttls(&acceptor).await {
            Ok(conn) => {
                self.user = None;
                Some((conn, State::Connected))
            }
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

/// A reply already written by the handler.
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
