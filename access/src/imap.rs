//! The IMAP side before login: the proxy answers `CAPABILITY`, `NOOP`, `LOGOUT`, `STARTTLS`,
//! `ID`, `LOGIN` and `AUTHENTICATE` itself; after a good login it hands the connection to
//! [`route`](crate::route).
//!
//! The parser is internet-facing. Framing uses imap-codec's `Fragmentizer`, which bounds a
//! command's size and never lets literal bytes run as commands; a synchronising literal over
//! `max_literal` is refused before any of it is sent (the client waits for our `+`), a
//! non-synchronising one closes the connection. Only the pre-login commands are decoded at all
//! (others are refused by name, so no deep parser runs before login), and bad commands, failed
//! logins, silence and the time to log in are all bounded.
//!
//! STARTTLS (RFC 3501 §6.2.1, RFC 2595 §3.1): every byte received before the handshake is
//! discarded, so a command injected behind `STARTTLS` in the same segment is never answered.

use std::sync::Arc;

use base64::Engine as _;
use common::sasl::{Failure, Mechanism, Step, Verdict};
use common::smtp::server::BoxStream;
use imap_codec::decode::Decoder as _;
use imap_codec::fragmentizer::{FragmentInfo, Fragmentizer};
use imap_codec::{AuthenticateDataCodec, CommandCodec};
use imap_types::auth::AuthenticateData;
use imap_types::command::CommandBody;
use imap_types::core::LiteralMode;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Access;
use crate::backend::Protocol;
use crate::listener::Client;
use crate::route;

/// Longest command line (without literals) before login.
const MAX_LINE: u32 = 8 * 1024;
/// Bytes read at once before login.
const READ_CHUNK: usize = 8 * 1024;
/// The commands answered before login; any other is refused by name, unparsed.
const PRELOGIN_COMMANDS: [&str; 7] = [
    "CAPABILITY",
    "NOOP",
    "LOGOUT",
    "STARTTLS",
    "ID",
    "LOGIN",
    "AUTHENTICATE",
];

/// Runs one IMAP connection: pre-login, then (after a good login) the relay to the filer.
pub(crate) async fn run(
    access: Arc<Access>,
    stream: BoxStream,
    client: Client,
    is_tls: bool,
    shutdown: CancellationToken,
) {
    let max_literal = access.settings.max_literal;
    let mut s = Session {
        access,
        stream,
        is_tls,
        client,
        frag: new_fragmentizer(max_literal),
        backlog: Vec::new(),
        out: Vec::new(),
        mode: Mode::Command,
        bad_commands: 0,
        auth_failures: 0,
        pending: 0,
        allowance: u64::from(MAX_LINE),
    };
    let greeting = format!(
        "* OK [CAPABILITY {}] {} IMAP ready",
        s.capabilities(),
        s.access.settings.shared.hostname
    );
    s.line(&greeting);
    let end = match s.drive(&shutdown).await {
        Ok(end) => end,
        Err(e) => {
            tracing::debug!(error = %e, "imap session ended");
            return;
        }
    };
    let End::LoggedIn {
        tag,
        address,
        pipelined,
    } = end
    else {
        return;
    };
    s.hand_off(&tag, &address, &pipelined, shutdown).await;
}

fn new_fragmentizer(max_literal: u32) -> Fragmentizer {
    // A LOGIN may carry two literals (user name and password).
    Fragmentizer::new(MAX_LINE.saturating_add(max_literal.saturating_mul(2)))
}

/// What the next complete message from the client is.
enum Mode {
    Command,
    /// An answer to a SASL challenge.
    Authenticate {
        tag: String,
        exchange: Box<common::sasl::Exchange>,
    },
    /// The (empty) answer to the server's final SASL data (SCRAM's signature).
    AuthenticateFinal {
        tag: String,
        address: String,
    },
}

/// What to do after a message.
enum Flow {
    Continue,
    Close,
    StartTls,
    LoggedIn { tag: String, address: String },
}

/// How the pre-login phase ended.
enum End {
    Closed,
    LoggedIn {
        tag: String,
        address: String,
        /// What the client sent after its login command.
        pipelined: Vec<u8>,
    },
}

struct Session {
    access: Arc<Access>,
    stream: BoxStream,
    is_tls: bool,
    client: Client,
    frag: Fragmentizer,
    /// Bytes given to the fragmentizer that are not yet part of a complete message: after the
    /// login command, what the client pipelined behind it, to be forwarded to the filer.
    backlog: Vec<u8>,
    out: Vec<u8>,
    mode: Mode,
    bad_commands: u32,
    auth_failures: u32,
    /// Bytes received since the last complete fragment, and how many the next fragment may
    /// take (a line, or an accepted literal).
    pending: u64,
    allowance: u64,
}

impl Session {
    fn line(&mut self, text: &str) {
        self.out.extend_from_slice(text.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            let timeout = self.access.settings.prelogin_timeout;
            tokio::time::timeout(timeout, self.stream.write_all(&self.out))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "write timed out")
                })??;
            self.out.clear();
        }
        Ok(())
    }

    fn login_allowed(&self) -> bool {
        self.is_tls || self.client.plaintext_ok
    }

    fn capabilities(&self) -> String {
        let mut c = String::from("IMAP4rev1 SASL-IR ID");
        if !self.is_tls {
            c.push_str(" STARTTLS");
        }
        if self.login_allowed() {
            for m in Mechanism::ALL {
                c.push_str(" AUTH=");
                c.push_str(m.as_str());
            }
        } else {
            // RFC 3501 §6.2.3; SASL too is refused before TLS (nothing would protect the
            // session that follows).
            c.push_str(" LOGINDISABLED");
        }
        c
    }

    async fn drive(&mut self, shutdown: &CancellationToken) -> std::io::Result<End> {
        let settings = self.access.settings.clone();
        let deadline = Instant::now() + settings.prelogin_lifetime;
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            // 1. Handle every complete message already received.
            while let Some(info) = self.frag.progress() {
                self.pending = 0;
                self.allowance = u64::from(MAX_LINE);
                if let FragmentInfo::Line {
                    announcement: Some(a),
                    ..
                } = info
                {
                    match self.on_literal_announced(a.length, a.mode) {
                        Literal::Accepted => self.allowance += u64::from(a.length),
                        Literal::Skipped => {
                            self.consume(info.range().end);
                            if self.bad_commands >= settings.max_bad_commands {
                                self.line("* BYE Too many bad commands");
                                self.flush().await?;
                                return Ok(End::Closed);
                            }
                            continue;
                        }
                        Literal::Close => {
                            self.flush().await?;
                            return Ok(End::Closed);
                        }
                    }
                }
                if !self.frag.is_message_complete() {
                    continue;
                }
                let flow = self.on_message().await;
                self.consume(info.range().end);
                match flow {
                    Flow::Continue => {}
                    Flow::Close => {
                        self.flush().await?;
                        return Ok(End::Closed);
                    }
                    Flow::StartTls => {
                        self.flush().await?;
                        if !self.start_tls().await {
                            return Ok(End::Closed);
                        }
                    }
                    Flow::LoggedIn { tag, address } => {
                        return Ok(End::LoggedIn {
                            tag,
                            address,
                            pipelined: std::mem::take(&mut self.backlog),
                        });
                    }
                }
            }
            // 2. One write for everything queued.
            self.flush().await?;
            // 3. Wait for the client, within the idle timeout and the pre-login lifetime.
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.line("* BYE [UNAVAILABLE] Server shutting down");
                    self.flush().await?;
                    return Ok(End::Closed);
                }
                _ = tokio::time::sleep_until(deadline) => {
                    self.line("* BYE Took too long to log in");
                    self.flush().await?;
                    return Ok(End::Closed);
                }
                r = tokio::time::timeout(settings.prelogin_timeout, self.stream.read(&mut buf)) => match r {
                    Err(_) => {
                        self.line("* BYE Autologout; idle for too long");
                        self.flush().await?;
                        return Ok(End::Closed);
                    }
                    Ok(Ok(0)) => return Ok(End::Closed),
                    Ok(Ok(n)) => {
                        let bytes = buf.get(..n).unwrap_or_default();
                        // A line (or literal) that never ends must not grow without bound.
                        self.pending += n as u64;
                        if self.pending > self.allowance {
                            self.line("* BYE Line too long");
                            self.flush().await?;
                            return Ok(End::Closed);
                        }
                        self.frag.enqueue_bytes(bytes);
                        self.backlog.extend_from_slice(bytes);
                    }
                    Ok(Err(e)) => return Err(e),
                },
            }
        }
    }

    /// Forgets the first `n` bytes of the backlog: a message (or a refused line) ended there.
    fn consume(&mut self, n: usize) {
        self.backlog.drain(..n.min(self.backlog.len()));
    }

    /// The TLS handshake after `OK Begin TLS negotiation now`. Whatever the client sent before
    /// it (pipelined behind STARTTLS) is dropped unread.
    async fn start_tls(&mut self) -> bool {
        self.frag = new_fragmentizer(self.access.settings.max_literal);
        self.backlog.clear();
        self.pending = 0;
        self.allowance = u64::from(MAX_LINE);
        let plain = std::mem::replace(&mut self.stream, Box::new(tokio::io::empty()));
        let timeout = self.access.settings.prelogin_timeout;
        match tokio::time::timeout(timeout, self.access.tls.accept(plain)).await {
            Ok(Ok(tls)) => {
                self.stream = Box::new(tls);
                self.is_tls = true;
                true
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "starttls handshake failed");
                false
            }
            Err(_) => {
                tracing::debug!("starttls handshake timed out");
                false
            }
        }
    }

    /// A `{n}` at the end of a line: accept (send `+` for a synchronising literal) or refuse.
    fn on_literal_announced(&mut self, length: u32, mode: LiteralMode) -> Literal {
        let limit = self.access.settings.max_literal;
        if length <= limit {
            if mode == LiteralMode::Sync {
                self.line("+ Ready for literal data");
            }
            return Literal::Accepted;
        }
        match mode {
            // The client waits for our go-ahead, so nothing of the literal was sent: the
            // command ends here (RFC 7888 §4).
            LiteralMode::Sync => {
                let tag = self.tag();
                self.line(&format!(
                    "{tag} BAD [TOOBIG] Literal larger than {limit} bytes before login"
                ));
                self.frag.skip_message();
                self.bad_commands += 1;
                Literal::Skipped
            }
            // LITERAL+ (never advertised before login): the bytes are coming anyway.
            LiteralMode::NonSync => {
                self.line("* BYE [TOOBIG] Literal too large");
                Literal::Close
            }
        }
    }

    fn tag(&self) -> String {
        self.frag
            .decode_tag()
            .map(|t| t.inner().to_owned())
            .unwrap_or_else(|| "*".to_owned())
    }

    async fn on_message(&mut self) -> Flow {
        match std::mem::replace(&mut self.mode, Mode::Command) {
            Mode::Command => self.on_command().await,
            Mode::Authenticate { tag, mut exchange } => {
                match decode_authenticate_data(self.frag.message_bytes()) {
                    Some(Some(response)) => {
                        let step = exchange.step(&response).await;
                        self.on_step(tag, exchange, step).await
                    }
                    Some(None) => {
                        self.line(&format!("{tag} BAD Authentication cancelled"));
                        Flow::Continue
                    }
                    None => {
                        self.line(&format!("{tag} BAD Malformed authentication data"));
                        self.bad()
                    }
                }
            }
            Mode::AuthenticateFinal { tag, address } => {
                match decode_authenticate_data(self.frag.message_bytes()) {
                    Some(Some(r)) if r.is_empty() => self.accepted(tag, address),
                    Some(None) => {
                        self.line(&format!("{tag} BAD Authentication cancelled"));
                        Flow::Continue
                    }
                    _ => {
                        self.line(&format!("{tag} BAD Expected an empty response"));
                        self.bad()
                    }
                }
            }
        }
    }

    fn bad(&mut self) -> Flow {
        self.bad_commands += 1;
        if self.bad_commands >= self.access.settings.max_bad_commands {
            self.line("* BYE Too many bad commands");
            Flow::Close
        } else {
            Flow::Continue
        }
    }

    async fn on_command(&mut self) -> Flow {
        let name = command_name(self.frag.message_bytes());
        let tag = self.tag();
        if self.frag.is_max_message_size_exceeded() {
            self.line(&format!("{tag} BAD Command too long"));
            return self.bad();
        }
        if !name
            .as_deref()
            .is_some_and(|n| PRELOGIN_COMMANDS.contains(&n))
        {
            self.line(&format!("{tag} BAD Command not available before login"));
            return self.bad();
        }
        let decoded = self
            .frag
            .decode_message(&CommandCodec::default())
            .map(|c| (c.tag.inner().to_owned(), c.body));
        let (tag, body) = match decoded {
            Ok((tag, body)) => (tag, imap_types::IntoStatic::into_static(body)),
            Err(_) => {
                self.line(&format!("{tag} BAD Syntax error"));
                return self.bad();
            }
        };
        tracing::debug!(name = body.name(), "imap command");
        match body {
            CommandBody::Capability => {
                let caps = self.capabilities();
                self.line(&format!("* CAPABILITY {caps}"));
                self.line(&format!("{tag} OK CAPABILITY completed"));
                Flow::Continue
            }
            CommandBody::Noop => {
                self.line(&format!("{tag} OK NOOP completed"));
                Flow::Continue
            }
            CommandBody::Logout => {
                self.line("* BYE Logging out");
                self.line(&format!("{tag} OK LOGOUT completed"));
                Flow::Close
            }
            CommandBody::Id { .. } => {
                self.line("* ID (\"name\" \"mail-platform access\")");
                self.line(&format!("{tag} OK ID completed"));
                Flow::Continue
            }
            CommandBody::StartTLS if self.is_tls => {
                self.line(&format!("{tag} BAD TLS is already active"));
                self.bad()
            }
            CommandBody::StartTLS => {
                self.line(&format!("{tag} OK Begin TLS negotiation now"));
                Flow::StartTls
            }
            CommandBody::Login { .. } | CommandBody::Authenticate { .. }
                if !self.login_allowed() =>
            {
                self.line(&format!(
                    "{tag} NO [PRIVACYREQUIRED] Log in only after STARTTLS"
                ));
                self.bad()
            }
            CommandBody::Login { username, password } => {
                let user = String::from_utf8_lossy(username.as_ref()).into_owned();
                let verdict = self
                    .access
                    .verifier
                    .check_password(&user, password.declassify().as_ref())
                    .await;
                self.on_verdict(tag, verdict, Some(&user)).await
            }
            CommandBody::Authenticate {
                mechanism,
                initial_response,
            } => {
                let Some(mechanism) = Mechanism::parse(mechanism.as_ref()) else {
                    self.line(&format!("{tag} NO Unsupported authentication mechanism"));
                    return self.bad();
                };
                let mut exchange = match self.access.verifier.start(mechanism) {
                    Ok(x) => Box::new(x),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start a sasl exchange");
                        self.line(&format!("{tag} NO [UNAVAILABLE] Try again later"));
                        return Flow::Continue;
                    }
                };
                let ir = initial_response.map(|r| r.declassify().to_vec());
                let step = exchange.begin(ir.as_deref()).await;
                self.on_step(tag, exchange, step).await
            }
            _ => {
                self.line(&format!("{tag} BAD Command not available before login"));
                self.bad()
            }
        }
    }

    async fn on_step(
        &mut self,
        tag: String,
        exchange: Box<common::sasl::Exchange>,
        step: Step,
    ) -> Flow {
        let b64 = base64::engine::general_purpose::STANDARD;
        match step {
            Step::Challenge(c) => {
                self.line(&format!("+ {}", b64.encode(c)));
                self.mode = Mode::Authenticate { tag, exchange };
                Flow::Continue
            }
            Step::Success {
                address,
                final_data: Some(data),
            } => {
                self.line(&format!("+ {}", b64.encode(data)));
                self.mode = Mode::AuthenticateFinal { tag, address };
                Flow::Continue
            }
            Step::Success {
                address,
                final_data: None,
            } => self.accepted(tag, address),
            Step::Failure(Failure::Unavailable) => {
                self.on_verdict(tag, Verdict::Unavailable, None).await
            }
            Step::Failure(Failure::Rejected | Failure::Malformed) => {
                let claimed = exchange.claimed_user().map(str::to_owned);
                self.on_verdict(tag, Verdict::Rejected, claimed.as_deref())
                    .await
            }
        }
    }

    fn accepted(&mut self, tag: String, address: String) -> Flow {
        common::obs::auth("access", "success");
        self.access.throttle.succeeded(&address);
        Flow::LoggedIn { tag, address }
    }

    async fn on_verdict(&mut self, tag: String, verdict: Verdict, claimed: Option<&str>) -> Flow {
        match verdict {
            Verdict::Accepted(address) => self.accepted(tag, address),
            Verdict::Unavailable => {
                common::obs::auth("access", "unavailable");
                self.line(&format!(
                    "{tag} NO [UNAVAILABLE] Temporary failure, try again later"
                ));
                Flow::Continue
            }
            Verdict::Rejected => {
                // The same answer, after the same growing delay, whether the user exists.
                common::obs::auth("access", "failure");
                let delay = self.access.throttle.failed(self.client.peer.ip(), claimed);
                tracing::info!(user = claimed.unwrap_or(""), ?delay, "login failed");
                tokio::time::sleep(delay).await;
                self.line(&format!(
                    "{tag} NO [AUTHENTICATIONFAILED] Authentication failed"
                ));
                self.auth_failures += 1;
                if self.auth_failures >= self.access.settings.max_auth_failures {
                    self.line("* BYE Too many failed logins");
                    Flow::Close
                } else {
                    Flow::Continue
                }
            }
        }
    }

    /// Logs into the filer, answers the client, and relays until either side closes.
    async fn hand_off(
        mut self,
        tag: &str,
        address: &str,
        pipelined: &[u8],
        shutdown: CancellationToken,
    ) {
        tracing::Span::current().record("user", address);
        let opened = route::open(
            &self.access,
            address,
            Protocol::Imap,
            self.client.peer,
            self.client.conn,
        )
        .await;
        match opened {
            Ok(backend) => {
                let reply = match &backend.capabilities {
                    Some(caps) => format!("{tag} OK [CAPABILITY {caps}] Logged in"),
                    None => format!("{tag} OK Logged in"),
                };
                self.line(&reply);
                if self.flush().await.is_err() {
                    return;
                }
                tracing::info!(tls = self.is_tls, "imap login");
                route::relay(self.stream, pipelined, backend, shutdown).await;
            }
            Err(unavailable) => {
                let why = match unavailable {
                    route::Unavailable::Temporary(why) => why,
                    route::Unavailable::InUse => "mailbox in use, try again later",
                };
                self.line(&format!("{tag} NO [UNAVAILABLE] {why}"));
                self.line("* BYE Try again later");
                let _ = self.flush().await;
                let _ = self.stream.shutdown().await;
            }
        }
    }
}

enum Literal {
    Accepted,
    Skipped,
    Close,
}

/// The command name of a message (`tag SP name ...`), upper-cased.
fn command_name(message: &[u8]) -> Option<String> {
    let mut parts = message.splitn(3, |&b| b == b' ');
    let _tag = parts.next()?;
    let name = parts.next()?;
    let name = name
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or_default();
    std::str::from_utf8(name)
        .ok()
        .filter(|n| !n.is_empty())
        .map(str::to_ascii_uppercase)
}

/// An answer to a SASL challenge: `Some(Some(bytes))`, `Some(None)` for `*` (cancel), `None`
/// when malformed.
fn decode_authenticate_data(message: &[u8]) -> Option<Option<Vec<u8>>> {
    match AuthenticateDataCodec::default().decode(message) {
        Ok(([], AuthenticateData::Continue(r))) => Some(Some(r.declassify().to_vec())),
        Ok(([], AuthenticateData::Cancel)) => Some(None),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_names() {
        assert_eq!(
            command_name(b"a capability\r\n").as_deref(),
            Some("CAPABILITY")
        );
        assert_eq!(
            command_name(b"a1 LOGIN {3}\r\nabc x\r\n").as_deref(),
            Some("LOGIN")
        );
        assert_eq!(command_name(b"a\r\n"), None);
        assert_eq!(command_name(b"a \r\n"), None);
    }

    #[test]
    fn authenticate_data() {
        assert_eq!(
            decode_authenticate_data(b"AGEAYg==\r\n"),
            Some(Some(b"\0a\0b".to_vec()))
        );
        assert_eq!(decode_authenticate_data(b"\r\n"), Some(Some(Vec::new())));
        assert_eq!(decode_authenticate_data(b"*\r\n"), Some(None));
        assert_eq!(decode_authenticate_data(b"not base64!\r\n"), None);
    }
}
