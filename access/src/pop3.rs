//! The POP3 side before login (RFC 1939 AUTHORIZATION state): the proxy answers `CAPA`
//! (RFC 2449), `STLS` (RFC 2595), `USER`/`PASS`, `AUTH` (RFC 5034: PLAIN, LOGIN,
//! SCRAM-SHA-256, with initial responses) and `QUIT` itself; after a good login it hands the
//! connection to [`route`](crate::route).
//!
//! Lines are bounded by `common::pop3::MAX_LINE_LEN` and parsed by `common::pop3`. STLS drops
//! every byte received before the handshake, so a command pipelined behind it is never
//! answered. Failures use the RFC 2449/3206 response codes: `[AUTH]` for credentials (and for
//! a login before TLS), `[SYS/TEMP]` when the mailbox's filer cannot serve it now, `[IN-USE]`
//! when another POP3 session holds the mailbox.

use std::sync::Arc;

use base64::Engine as _;
use common::pop3::{self, ParseError, Request};
use common::sasl::{Failure, Mechanism, Step, Verdict};
use common::smtp::server::{BoxStream, LineDecoder, LineStatus};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Access;
use crate::backend::Protocol;
use crate::listener::Client;
use crate::route;

/// Bytes read at once before login.
const READ_CHUNK: usize = 8 * 1024;

/// Runs one POP3 connection: pre-login, then (after a good login) the relay to the filer.
pub(crate) async fn run(
    access: Arc<Access>,
    stream: BoxStream,
    client: Client,
    is_tls: bool,
    shutdown: CancellationToken,
) {
    let deadline = Instant::now() + access.settings.prelogin_lifetime;
    let mut s = Session {
        access,
        stream,
        client,
        is_tls,
        lines: LineDecoder::new(pop3::MAX_LINE_LEN),
        buf: vec![0; READ_CHUNK],
        pos: 0,
        len: 0,
        out: Vec::new(),
        user: None,
        bad_commands: 0,
        auth_failures: 0,
        deadline,
        shutdown: shutdown.clone(),
    };
    let greeting = format!("+OK {} POP3 ready", s.access.settings.shared.hostname);
    s.say(&greeting);
    match s.drive().await {
        Ok(Some(address)) => s.hand_off(&address, shutdown).await,
        Ok(None) => {}
        Err(e) => tracing::debug!(error = %e, "pop3 session ended"),
    }
}

struct Session {
    access: Arc<Access>,
    stream: BoxStream,
    client: Client,
    is_tls: bool,
    lines: LineDecoder,
    /// Received bytes; `pos..len` is not decoded yet (after a login: what the client
    /// pipelined behind it, forwarded to the filer).
    buf: Vec<u8>,
    pos: usize,
    len: usize,
    out: Vec<u8>,
    /// The name given with `USER`.
    user: Option<String>,
    bad_commands: u32,
    auth_failures: u32,
    deadline: Instant,
    shutdown: CancellationToken,
}

/// One line from the client, or why there is none.
enum Input {
    Line(Vec<u8>),
    TooLong,
    /// Closed, idle too long, out of time or shutting down (the reply, if any, is queued).
    End,
}

/// What to do after a command.
enum Flow {
    Continue,
    Close,
    LoggedIn(String),
}

impl Session {
    fn say(&mut self, text: &str) {
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

    /// The next line; replies are flushed only when no pipelined input is waiting.
    async fn read_line(&mut self) -> std::io::Result<Input> {
        loop {
            if self.pos < self.len {
                let pending = self.buf.get(self.pos..self.len).unwrap_or_default();
                let (n, status) = self.lines.decode(pending);
                self.pos += n;
                match status {
                    LineStatus::Line => return Ok(Input::Line(self.lines.line().to_vec())),
                    LineStatus::TooLong => return Ok(Input::TooLong),
                    LineStatus::NeedMore => {}
                }
            }
            self.flush().await?;
            let idle = self.access.settings.prelogin_timeout;
            let read = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => {
                    self.say("-ERR [SYS/TEMP] Server shutting down");
                    return Ok(Input::End);
                }
                _ = tokio::time::sleep_until(self.deadline) => {
                    self.say("-ERR Took too long to log in");
                    return Ok(Input::End);
                }
                r = tokio::time::timeout(idle, self.stream.read(&mut self.buf)) => r,
            };
            match read {
                Err(_) => {
                    self.say("-ERR Autologout; idle for too long");
                    return Ok(Input::End);
                }
                Ok(Ok(0)) => return Ok(Input::End),
                Ok(Ok(n)) => {
                    self.pos = 0;
                    self.len = n;
                }
                Ok(Err(e)) => return Err(e),
            }
        }
    }

    /// Runs the AUTHORIZATION state; the authenticated address once a login succeeded.
    async fn drive(&mut self) -> std::io::Result<Option<String>> {
        loop {
            let line = match self.read_line().await? {
                Input::Line(l) => l,
                Input::TooLong => {
                    self.say("-ERR Line too long");
                    if let Flow::Close = self.bad() {
                        break;
                    }
                    continue;
                }
                Input::End => break,
            };
            let flow = match pop3::parse(&line) {
                Ok(request) => {
                    tracing::debug!(?request, "pop3 command");
                    self.on_request(request).await?
                }
                Err(e) => {
                    self.say(match e {
                        ParseError::Unknown => "-ERR Unknown command",
                        ParseError::Arguments => "-ERR Syntax error in arguments",
                        ParseError::Invalid => "-ERR Invalid characters in command",
                    });
                    self.bad()
                }
            };
            match flow {
                Flow::Continue => {}
                Flow::Close => break,
                Flow::LoggedIn(address) => return Ok(Some(address)),
            }
        }
        self.flush().await?;
        Ok(None)
    }

    fn bad(&mut self) -> Flow {
        self.bad_commands += 1;
        if self.bad_commands >= self.access.settings.max_bad_commands {
            self.say("-ERR Too many bad commands");
            Flow::Close
        } else {
            Flow::Continue
        }
    }

    async fn on_request(&mut self, request: Request) -> std::io::Result<Flow> {
        Ok(match request {
            Request::Capa => {
                self.capa();
                Flow::Continue
            }
            Request::Quit => {
                let host = self.access.settings.shared.hostname.clone();
                self.say(&format!("+OK {host} Bye"));
                Flow::Close
            }
            Request::Stls if self.is_tls => {
                self.say("-ERR TLS is already active");
                self.bad()
            }
            Request::Stls => {
                self.say("+OK Begin TLS negotiation");
                self.flush().await?;
                if self.start_tls().await {
                    Flow::Continue
                } else {
                    Flow::Close
                }
            }
            Request::User(_) | Request::Pass(_) | Request::Auth { .. } if !self.login_allowed() => {
                self.say("-ERR [AUTH] Log in only after STLS");
                self.bad()
            }
            Request::User(name) => {
                self.user = Some(name);
                self.say("+OK");
                Flow::Continue
            }
            Request::Pass(password) => {
                let Some(user) = self.user.take() else {
                    self.say("-ERR USER first");
                    return Ok(self.bad());
                };
                let verdict = self
                    .access
                    .verifier
                    .check_password(&user, password.as_bytes())
                    .await;
                self.on_verdict(verdict, Some(&user)).await
            }
            Request::Auth {
                mechanism: None, ..
            } => {
                self.say("+OK");
                for m in Mechanism::ALL {
                    self.say(m.as_str());
                }
                self.say(".");
                Flow::Continue
            }
            Request::Auth {
                mechanism: Some(name),
                initial_response,
            } => {
                self.authenticate(&name, initial_response.as_deref())
                    .await?
            }
            _ => {
                self.say("-ERR Log in first");
                self.bad()
            }
        })
    }

    fn capa(&mut self) {
        self.say("+OK Capability list follows");
        for c in ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"] {
            self.say(c);
        }
        if !self.is_tls {
            self.say("STLS");
        }
        if self.login_allowed() {
            self.say("USER");
            let names: Vec<&str> = Mechanism::ALL.iter().map(|m| m.as_str()).collect();
            self.say(&format!("SASL {}", names.join(" ")));
        }
        self.say("IMPLEMENTATION mail-platform access");
        self.say(".");
    }

    /// `+OK` was sent: the handshake, after dropping whatever the client sent before it.
    async fn start_tls(&mut self) -> bool {
        self.pos = 0;
        self.len = 0;
        self.lines = LineDecoder::new(pop3::MAX_LINE_LEN);
        self.user = None;
        let plain = std::mem::replace(&mut self.stream, Box::new(tokio::io::empty()));
        let timeout = self.access.settings.prelogin_timeout;
        match tokio::time::timeout(timeout, self.access.tls.accept(plain)).await {
            Ok(Ok(tls)) => {
                self.stream = Box::new(tls);
                self.is_tls = true;
                true
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "stls handshake failed");
                false
            }
            Err(_) => {
                tracing::debug!("stls handshake timed out");
                false
            }
        }
    }

    /// RFC 5034: `AUTH mechanism [initial-response]`, then `+ challenge` / response lines.
    async fn authenticate(
        &mut self,
        name: &str,
        initial_response: Option<&str>,
    ) -> std::io::Result<Flow> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let Some(mechanism) = Mechanism::parse(name) else {
            self.say("-ERR Unsupported authentication mechanism");
            return Ok(self.bad());
        };
        let ir = match initial_response {
            None => None,
            Some("=") => Some(Vec::new()),
            Some(text) => match b64.decode(text) {
                Ok(raw) => Some(raw),
                Err(_) => {
                    self.say("-ERR [AUTH] Malformed initial response");
                    return Ok(self.bad());
                }
            },
        };
        let mut exchange = match self.access.verifier.start(mechanism) {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(error = %e, "cannot start a sasl exchange");
                self.say("-ERR [SYS/TEMP] Try again later");
                return Ok(Flow::Continue);
            }
        };
        let mut step = exchange.begin(ir.as_deref()).await;
        loop {
            match step {
                Step::Challenge(c) => {
                    self.say(&format!("+ {}", b64.encode(c)));
                    let Some(response) = self.sasl_response().await? else {
                        return Ok(Flow::Continue);
                    };
                    step = exchange.step(&response).await;
                }
                Step::Success {
                    address,
                    final_data: Some(data),
                } => {
                    // RFC 5034 §4: additional data with success goes in a last challenge.
                    self.say(&format!("+ {}", b64.encode(data)));
                    return Ok(match self.sasl_response().await? {
                        Some(r) if r.is_empty() => self.accepted(address),
                        Some(_) => self.on_verdict(Verdict::Rejected, None).await,
                        None => Flow::Continue,
                    });
                }
                Step::Success {
                    address,
                    final_data: None,
                } => return Ok(self.accepted(address)),
                Step::Failure(Failure::Unavailable) => {
                    return Ok(self.on_verdict(Verdict::Unavailable, None).await);
                }
                Step::Failure(Failure::Rejected | Failure::Malformed) => {
                    let claimed = exchange.claimed_user().map(str::to_owned);
                    return Ok(self.on_verdict(Verdict::Rejected, claimed.as_deref()).await);
                }
            }
        }
    }

    /// The client's answer to a challenge, decoded; `None` when it cancelled (`*`), sent
    /// garbage or went away (the reply is queued).
    async fn sasl_response(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        let line = match self.read_line().await? {
            Input::Line(l) => l,
            Input::TooLong => {
                self.say("-ERR [AUTH] Response too long");
                return Ok(None);
            }
            Input::End => return Ok(None),
        };
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\r', '\n']);
        if text == "*" {
            self.say("-ERR Authentication cancelled");
            return Ok(None);
        }
        match base64::engine::general_purpose::STANDARD.decode(text) {
            Ok(raw) => Ok(Some(raw)),
            Err(_) => {
                self.say("-ERR [AUTH] Malformed response");
                Ok(None)
            }
        }
    }

    fn accepted(&mut self, address: String) -> Flow {
        common::obs::auth("access", "success");
        self.access.throttle.succeeded(&address);
        Flow::LoggedIn(address)
    }

    async fn on_verdict(&mut self, verdict: Verdict, claimed: Option<&str>) -> Flow {
        match verdict {
            Verdict::Accepted(address) => self.accepted(address),
            Verdict::Unavailable => {
                common::obs::auth("access", "unavailable");
                self.say("-ERR [SYS/TEMP] Temporary failure, try again later");
                Flow::Continue
            }
            Verdict::Rejected => {
                // The same answer, after the same growing delay, whether the user exists.
                common::obs::auth("access", "failure");
                let delay = self.access.throttle.failed(self.client.peer.ip(), claimed);
                tracing::info!(user = claimed.unwrap_or(""), ?delay, "login failed");
                tokio::time::sleep(delay).await;
                self.say("-ERR [AUTH] Authentication failed");
                self.auth_failures += 1;
                if self.auth_failures >= self.access.settings.max_auth_failures {
                    Flow::Close
                } else {
                    Flow::Continue
                }
            }
        }
    }

    /// Logs into the filer, answers the client, and relays until either side closes.
    async fn hand_off(mut self, address: &str, shutdown: CancellationToken) {
        tracing::Span::current().record("user", address);
        let opened = route::open(
            &self.access,
            address,
            Protocol::Pop3,
            self.client.peer,
            self.client.conn,
        )
        .await;
        match opened {
            Ok(backend) => {
                self.say("+OK Logged in");
                if self.flush().await.is_err() {
                    return;
                }
                tracing::info!(tls = self.is_tls, "pop3 login");
                let pipelined = self
                    .buf
                    .get(self.pos..self.len)
                    .unwrap_or_default()
                    .to_vec();
                route::relay(self.stream, &pipelined, backend, shutdown).await;
            }
            Err(route::Unavailable::InUse) => {
                self.say("-ERR [IN-USE] Mailbox in use by another session");
                let _ = self.flush().await;
                let _ = self.stream.shutdown().await;
            }
            Err(route::Unavailable::Temporary(why)) => {
                self.say(&format!("-ERR [SYS/TEMP] {why}"));
                let _ = self.flush().await;
                let _ = self.stream.shutdown().await;
            }
        }
    }
}
