//! The SMTP/LMTP client used for every hand-off.
//!
//! One client for spool → filter, filter → spool, spool → filer (LMTP) and relay → internet.
//! What it guarantees, and why we do not use lettre or mail-send (see DESIGN.md):
//!
//! - **One result per recipient**, in the order given: the RCPT refusal for a refused
//!   recipient; for an accepted one, its own final reply after the body in LMTP (RFC 2033 §4.2),
//!   or the single DATA reply copied to each in SMTP. One refused recipient never fails the
//!   others.
//! - **Pipelining** (RFC 2920): MAIL and the RCPTs go out in one write when the server offers
//!   PIPELINING, and always in LMTP, whose servers must support it (RFC 2033 §5).
//! - **Temporary vs permanent follows the reply class** ([`HopError::is_permanent`]), never the
//!   text; connection problems are temporary.
//! - **Bounded**: every read and write has a timeout; a reply is at most [`MAX_REPLY_BYTES`]
//!   and [`MAX_REPLY_LINES`]; nothing the peer sends can panic the client.
//! - **STARTTLS** (RFC 3207) per [`TlsPolicy`]; whatever the server sent after its `220` and
//!   before the handshake is discarded, so plaintext cannot be injected into the TLS session.
//! - **Normalised, dot-stuffed bodies**: every bare LF or bare CR goes out as CRLF and a `.`
//!   at the start of a line is doubled, so no stored body can form an end-of-data marker, even
//!   at a lax server (SMTP smuggling).
//!
//! Not done here: BDAT/CHUNKING, DSN parameters (NOTIFY, ORCPT, RET, ENVID) and AUTH.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use smtp_proto::response::parser::ResponseReceiver;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tracing::debug;

use super::{EnhancedCode, Reply};

/// The most octets one reply may take on the wire, all lines included. EHLO replies are the
/// longest we expect, and they are far shorter.
pub const MAX_REPLY_BYTES: usize = 16 * 1024;
/// The most lines one reply may have.
pub const MAX_REPLY_LINES: usize = 128;
/// RFC 5321 §4.5.3.1.4: a command line is at most 512 octets including CRLF.
const MAX_COMMAND_LEN: usize = 512;
/// Bytes read from the peer at a time.
const READ_CHUNK_LEN: usize = 4096;
/// Bytes of dot-stuffed body written at a time; each write has its own `data_timeout`.
const BODY_CHUNK_LEN: usize = 64 * 1024;
/// Commands sent in one pipelined write. The replies to one batch must fit in the socket
/// buffers, or client and server could block writing to each other (RFC 2920 §3.1).
const PIPELINE_BATCH: usize = 100;

/// Which protocol to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// SMTP (RFC 5321): EHLO, falling back to HELO; one reply after DATA.
    Smtp,
    /// LMTP (RFC 2033): LHLO; one reply per accepted recipient after DATA.
    Lmtp,
}

/// What is needed to start TLS with a server.
#[derive(Debug, Clone)]
pub struct TlsClient {
    /// The rustls client configuration (trusted roots, versions).
    pub config: Arc<rustls::ClientConfig>,
    /// The name the server's certificate must match.
    pub server_name: ServerName<'static>,
}

/// Whether to use STARTTLS.
#[derive(Debug, Clone)]
pub enum TlsPolicy {
    /// Never start TLS.
    Never,
    /// Start TLS when the server offers it. If the server refuses the STARTTLS command the
    /// session goes on in plaintext (RFC 3207 §4.1); a failed handshake is an error.
    Opportunistic(TlsClient),
    /// Refuse to go on without TLS: a server that does not offer it, or refuses it, is a
    /// temporary failure (as Postfix's `encrypt` level defers).
    Required(TlsClient),
}

/// How a client connects and how long it waits.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// The name sent with EHLO/LHLO/HELO. Must be non-empty, without spaces or controls.
    pub helo_name: String,
    /// SMTP or LMTP.
    pub protocol: Protocol,
    /// Limit on establishing the TCP connection. Default 30 s.
    pub connect_timeout: Duration,
    /// Limit on each command's write and on reading each reply, the greeting and the TLS
    /// handshake included. Default 5 min (RFC 5321 §4.5.3.2).
    pub command_timeout: Duration,
    /// Limit on each body write (of up to 64 KiB) and on each reply after the final dot.
    /// Default 10 min (RFC 5321 §4.5.3.2.6).
    pub data_timeout: Duration,
    /// STARTTLS policy. Default [`TlsPolicy::Never`].
    pub tls: TlsPolicy,
}

impl ClientSettings {
    /// Settings with the default timeouts and no TLS.
    pub fn new(helo_name: impl Into<String>, protocol: Protocol) -> Self {
        Self {
            helo_name: helo_name.into(),
            protocol,
            connect_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            tls: TlsPolicy::Never,
        }
    }
}

/// What the server announced in its EHLO/LHLO reply. All false/empty after a HELO fallback.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// PIPELINING (RFC 2920).
    pub pipelining: bool,
    /// SIZE (RFC 1870): `Some(0)` when announced without a fixed limit.
    pub size: Option<u64>,
    /// 8BITMIME (RFC 6152).
    pub eight_bit_mime: bool,
    /// SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
    /// STARTTLS (RFC 3207).
    pub starttls: bool,
    /// CHUNKING (RFC 3030).
    pub chunking: bool,
    /// ENHANCEDSTATUSCODES (RFC 2034).
    pub enhanced_status_codes: bool,
    /// XFORWARD attribute names, upper-case (Postfix XFORWARD_README).
    pub xforward: Vec<String>,
    /// DSN (RFC 3461).
    pub dsn: bool,
}

impl Capabilities {
    /// Reads the keywords of an EHLO/LHLO reply; the first line is the server's greeting.
    pub fn parse(reply: &Reply) -> Self {
        let mut caps = Self::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => caps.pipelining = true,
                "SIZE" => caps.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "8BITMIME" => caps.eight_bit_mime = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "STARTTLS" => caps.starttls = true,
                "CHUNKING" => caps.chunking = true,
                "ENHANCEDSTATUSCODES" => caps.enhanced_status_codes = true,
                "DSN" => caps.dsn = true,
                "XFORWARD" => caps.xforward = words.map(str::to_ascii_uppercase).collect(),
                _ => {}
            }
        }
        caps
    }
}

/// Where in the conversation something happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Opening the TCP connection.
    Connect,
    /// Waiting for the server's greeting.
    Greeting,
    /// EHLO.
    Ehlo,
    /// HELO (after EHLO was refused).
    Helo,
    /// LHLO.
    Lhlo,
    /// The STARTTLS command.
    StartTls,
    /// The TLS handshake.
    TlsHandshake,
    /// XFORWARD.
    Xforward,
    /// MAIL FROM.
    Mail,
    /// RCPT TO.
    Rcpt,
    /// The DATA command.
    Data,
    /// Sending the message body.
    Body,
    /// The reply (or replies, in LMTP) after the final dot.
    EndOfData,
    /// RSET.
    Rset,
    /// QUIT.
    Quit,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Connect => "connect",
            Self::Greeting => "greeting",
            Self::Ehlo => "ehlo",
            Self::Helo => "helo",
            Self::Lhlo => "lhlo",
            Self::StartTls => "starttls",
            Self::TlsHandshake => "tls handshake",
            Self::Xforward => "xforward",
            Self::Mail => "mail from",
            Self::Rcpt => "rcpt to",
            Self::Data => "data",
            Self::Body => "message body",
            Self::EndOfData => "end of data",
            Self::Rset => "rset",
            Self::Quit => "quit",
        })
    }
}

/// Why a hand-off failed. See [`HopError::is_permanent`] for what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum HopError {
    /// The TCP connection could not be established.
    #[error("connect failed: {0}")]
    Connect(#[source] io::Error),
    /// The peer did not answer, or did not take our bytes, in time.
    #[error("timed out at {0}")]
    Timeout(Stage),
    /// Reading or writing failed, or the peer closed the connection.
    #[error("i/o error at {stage}: {source}")]
    Io {
        /// Where.
        stage: Stage,
        /// The underlying error (`UnexpectedEof` when the peer closed).
        #[source]
        source: io::Error,
    },
    /// The peer sent something that is not a valid reply, or a reply that makes no sense here.
    #[error("protocol error at {stage}: {detail}")]
    Protocol {
        /// Where.
        stage: Stage,
        /// What was wrong.
        detail: String,
    },
    /// The greeting was not 2xx.
    #[error("greeting refused: {0}")]
    Greeting(Reply),
    /// A command that concerns the whole session or transaction was refused (EHLO, MAIL, DATA
    /// before the body, XFORWARD), or the server closed with 421 at any stage.
    #[error("{stage} refused: {reply}")]
    Rejected {
        /// Which command.
        stage: Stage,
        /// The server's reply.
        reply: Reply,
    },
    /// The TLS handshake failed.
    #[error("tls handshake failed: {0}")]
    Tls(#[source] io::Error),
    /// TLS is required but the server does not offer STARTTLS.
    #[error("tls required but starttls not offered")]
    TlsNotOffered,
    /// TLS is required but the server refused STARTTLS.
    #[error("tls required but starttls refused: {0}")]
    StartTlsRefused(Reply),
    /// The message needs an extension the server lacks (SMTPUTF8 for a non-ASCII address,
    /// RFC 6531 §3.2). Retrying cannot help, so this one is permanent without a reply.
    #[error("server does not support {0}")]
    Unsupported(&'static str),
    /// The caller passed something that cannot be sent (a path with a control character, an
    /// invalid HELO name, an empty forward path).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An earlier error left the connection in an unknown state; open a new one.
    #[error("connection unusable after an earlier error")]
    Broken,
    /// LMTP: the connection failed after some recipients got their final reply. Recipients
    /// with `Some` reply are settled (as if `send` had returned that reply); retry only the
    /// `None` ones, or they would be delivered twice.
    #[error("lost after some lmtp replies: {source}")]
    Partial {
        /// One entry per forward path, in order.
        replies: Vec<Option<Reply>>,
        /// What went wrong.
        #[source]
        source: Box<HopError>,
    },
}

impl HopError {
    /// True when retrying cannot help: the error carries a 5xx reply (or the server lacks an
    /// extension the message needs). Everything else, timeouts and connection problems
    /// included, is temporary. Never decided from reply text.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Greeting(reply) | Self::Rejected { reply, .. } => reply.is_permanent(),
            Self::Unsupported(_) => true,
            Self::Connect(_)
            | Self::Timeout(_)
            | Self::Io { .. }
            | Self::Protocol { .. }
            | Self::Tls(_)
            | Self::TlsNotOffered
            | Self::StartTlsRefused(_)
            | Self::InvalidArgument(_)
            | Self::Broken
            | Self::Partial { .. } => false,
        }
    }

    /// The server's reply behind this error, if any (for logs and DSNs).
    pub fn reply(&self) -> Option<&Reply> {
        match self {
            Self::Greeting(reply) | Self::Rejected { reply, .. } | Self::StartTlsRefused(reply) => {
                Some(reply)
            }
            Self::Partial { source, .. } => source.reply(),
            _ => None,
        }
    }
}

/// The byte stream under a client: TCP, TLS over TCP, or a duplex pipe in tests.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// One connection to an SMTP or LMTP server, past the greeting and EHLO/LHLO.
pub struct Client {
    stream: Box<dyn Stream>,
    /// Received bytes not parsed yet: at most one read's worth, because a read happens only
    /// when everything before it was parsed.
    buf: Vec<u8>,
    settings: ClientSettings,
    capabilities: Capabilities,
    is_tls: bool,
    /// Set by any I/O, timeout or protocol error: the peer's state is unknown after it.
    broken: bool,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("protocol", &self.settings.protocol)
            .field("capabilities", &self.capabilities)
            .field("is_tls", &self.is_tls)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects over TCP, reads the greeting, says EHLO/LHLO (HELO when SMTP EHLO is refused
    /// with 5xx) and starts TLS as the policy says.
    pub async fn connect(addr: SocketAddr, settings: &ClientSettings) -> Result<Self, HopError> {
        let stream = match timeout(settings.connect_timeout, TcpStream::connect(addr)).await {
            Err(_) => return Err(HopError::Timeout(Stage::Connect)),
            Ok(Err(e)) => return Err(HopError::Connect(e)),
            Ok(Ok(stream)) => stream,
        };
        // Pipelined batches are written whole, so Nagle's algorithm only adds latency; if the
        // option cannot be set the connection still works.
        let _ = stream.set_nodelay(true);
        Self::from_stream(stream, settings).await
    }

    /// Like [`Client::connect`], over a stream that is already open (tests use a duplex pipe).
    pub async fn from_stream<S>(stream: S, settings: &ClientSettings) -> Result<Self, HopError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        check_helo_name(&settings.helo_name)?;
        let mut client = Self {
            stream: Box::new(stream),
            buf: Vec::new(),
            settings: settings.clone(),
            capabilities: Capabilities::default(),
            is_tls: false,
            broken: false,
        };
        let greeting = client
            .read_reply(Stage::Greeting, settings.command_timeout)
            .await?;
        if !greeting.is_positive() {
            // RFC 5321 §3.1: after a refused greeting the client should send QUIT.
            client.abandon().await;
            return Err(HopError::Greeting(greeting));
        }
        client.hello().await?;
        let (tls, required) = match &settings.tls {
            TlsPolicy::Never => return Ok(client),
            TlsPolicy::Opportunistic(tls) => (tls, false),
            TlsPolicy::Required(tls) => (tls, true),
        };
        if !client.capabilities.starttls {
            if required {
                client.abandon().await;
                return Err(HopError::TlsNotOffered);
            }
            return Ok(client);
        }
        let reply = client.command("STARTTLS\r\n", Stage::StartTls).await?;
        if reply.is_positive() {
            client = client.start_tls(tls).await?;
            client.hello().await?;
        } else if reply.is_intermediate() {
            client.broken = true;
            return Err(unexpected(Stage::StartTls, &reply));
        } else if required {
            client.abandon().await;
            return Err(HopError::StartTlsRefused(reply));
        }
        Ok(client)
    }

    /// What the server announced (after TLS, when TLS was started).
    pub fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    /// True when the session runs over TLS.
    pub fn is_tls(&self) -> bool {
        self.is_tls
    }

    /// Sends XFORWARD (Postfix XFORWARD_README) with the attributes the server announced;
    /// others are left out, as Postfix does. Names are matched case-insensitively, values are
    /// xtext-encoded (RFC 3461 §4), and the attributes are split over several commands to keep
    /// each within 512 octets. A value too long for one command is sent as `[UNAVAILABLE]`.
    ///
    /// Returns `None` when nothing was sent (no XFORWARD, or none of the attributes announced),
    /// otherwise the last reply. A refusal is [`HopError::Rejected`].
    pub async fn xforward(&mut self, attrs: &[(&str, &str)]) -> Result<Option<Reply>, HopError> {
        let lines = xforward_lines(&self.capabilities.xforward, attrs)?;
        let mut last = None;
        for line in lines {
            let reply = self.command(&line, Stage::Xforward).await?;
            if !reply.is_positive() {
                return Err(HopError::Rejected {
                    stage: Stage::Xforward,
                    reply,
                });
            }
            last = Some(reply);
        }
        Ok(last)
    }

    /// Sends one message: MAIL, the RCPTs, DATA and the body. `reverse_path` and the
    /// `forward_paths` are what goes inside `<...>` (`""` for the null path).
    ///
    /// Returns one reply per forward path, in order: the RCPT refusal for a refused
    /// recipient, otherwise its final reply (LMTP) or the single DATA reply (SMTP). When no
    /// recipient is accepted the transaction is reset and no DATA is sent. A refusal of MAIL,
    /// or of DATA before the body, is [`HopError::Rejected`].
    ///
    /// `SIZE=` is added when the server announced SIZE, `BODY=8BITMIME` when the body has
    /// 8-bit octets and the server announced 8BITMIME (otherwise the body goes as it is, as
    /// Postfix does), and `SMTPUTF8` when a path is not ASCII ([`HopError::Unsupported`] if
    /// the server lacks it).
    pub async fn send(
        &mut self,
        reverse_path: &str,
        forward_paths: &[String],
        message: &[u8],
    ) -> Result<Vec<Reply>, HopError> {
        if self.broken {
            return Err(HopError::Broken);
        }
        check_path(reverse_path)?;
        for path in forward_paths {
            if path.is_empty() {
                return Err(HopError::InvalidArgument("empty forward path".into()));
            }
            check_path(path)?;
        }
        if forward_paths.is_empty() {
            return Ok(Vec::new());
        }
        let smtputf8 = !reverse_path.is_ascii() || forward_paths.iter().any(|p| !p.is_ascii());
        if smtputf8 && !self.capabilities.smtputf8 {
            return Err(HopError::Unsupported("SMTPUTF8"));
        }

        // MAIL and RCPT.
        let mut mail = format!("MAIL FROM:<{reverse_path}>");
        if self.capabilities.size.is_some() {
            mail.push_str(&format!(" SIZE={}", message.len()));
        }
        if self.capabilities.eight_bit_mime && !message.is_ascii() {
            mail.push_str(" BODY=8BITMIME");
        }
        if smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        mail.push_str("\r\n");
        let rcpts: Vec<String> = forward_paths
            .iter()
            .map(|p| format!("RCPT TO:<{p}>\r\n"))
            .collect();
        let (mail_reply, rcpt_replies) = self.envelope(mail, &rcpts).await?;
        if !mail_reply.is_positive() {
            self.reset_quietly().await;
            return Err(HopError::Rejected {
                stage: Stage::Mail,
                reply: mail_reply,
            });
        }
        let accepted: Vec<usize> = rcpt_replies
            .iter()
            .enumerate()
            .filter(|(_, reply)| reply.is_positive())
            .map(|(i, _)| i)
            .collect();
        if accepted.is_empty() {
            self.reset_quietly().await;
            return Ok(rcpt_replies);
        }

        // DATA and the body.
        let reply = self.command("DATA\r\n", Stage::Data).await?;
        if reply.code != 354 {
            if reply.is_positive() || reply.is_intermediate() {
                self.broken = true;
                return Err(unexpected(Stage::Data, &reply));
            }
            self.reset_quietly().await;
            return Err(HopError::Rejected {
                stage: Stage::Data,
                reply,
            });
        }
        self.write_body(message).await?;

        // The final reply, or one per accepted recipient in LMTP.
        let mut results: Vec<Option<Reply>> = rcpt_replies.into_iter().map(Some).collect();
        match self.settings.protocol {
            Protocol::Smtp => {
                let reply = self.final_reply().await?;
                for &i in &accepted {
                    if let Some(slot) = results.get_mut(i) {
                        *slot = Some(reply.clone());
                    }
                }
            }
            Protocol::Lmtp => {
                for (n, &i) in accepted.iter().enumerate() {
                    let reply = match self.final_reply().await {
                        Ok(reply) => reply,
                        Err(e) if n == 0 => return Err(e),
                        Err(e) => {
                            for &j in accepted.get(n..).unwrap_or_default() {
                                if let Some(slot) = results.get_mut(j) {
                                    *slot = None;
                                }
                            }
                            return Err(HopError::Partial {
                                replies: results,
                                source: Box::new(e),
                            });
                        }
                    };
                    if let Some(slot) = results.get_mut(i) {
                        *slot = Some(reply);
                    }
                }
            }
        }
        Ok(results.into_iter().flatten().collect())
    }

    /// Sends RSET and returns its reply.
    pub async fn reset(&mut self) -> Result<Reply, HopError> {
        self.command("RSET\r\n", Stage::Rset).await
    }

    /// Sends QUIT, waits (bounded) for the reply and closes the connection. Errors are ignored:
    /// the work is done either way.
    pub async fn quit(mut self) {
        if self.broken {
            return;
        }
        if let Ok(reply) = self.command("QUIT\r\n", Stage::Quit).await {
            debug!(code = reply.code, "quit");
        }
        let _ = timeout(self.settings.command_timeout, self.stream.shutdown()).await;
    }

    /// EHLO or LHLO; for SMTP, HELO when EHLO is refused with 5xx (RFC 5321 §3.2).
    async fn hello(&mut self) -> Result<(), HopError> {
        let (verb, stage) = match self.settings.protocol {
            Protocol::Smtp => ("EHLO", Stage::Ehlo),
            Protocol::Lmtp => ("LHLO", Stage::Lhlo),
        };
        let line = format!("{verb} {}\r\n", self.settings.helo_name);
        let reply = self.command(&line, stage).await?;
        if reply.is_positive() {
            self.capabilities = Capabilities::parse(&reply);
            return Ok(());
        }
        if self.settings.protocol == Protocol::Smtp && reply.is_permanent() {
            let line = format!("HELO {}\r\n", self.settings.helo_name);
            let reply = self.command(&line, Stage::Helo).await?;
            if reply.is_positive() {
                self.capabilities = Capabilities::default();
                return Ok(());
            }
            return Err(self.refused(Stage::Helo, reply));
        }
        Err(self.refused(stage, reply))
    }

    /// Replaces the plaintext stream by a TLS one. The read buffer is dropped with the old
    /// client: bytes that arrived before the handshake must never be read as replies.
    async fn start_tls(self, tls: &TlsClient) -> Result<Self, HopError> {
        let Self {
            stream, settings, ..
        } = self;
        let connector = TlsConnector::from(Arc::clone(&tls.config));
        let handshake = connector.connect(tls.server_name.clone(), stream);
        let stream = match timeout(settings.command_timeout, handshake).await {
            Err(_) => return Err(HopError::Timeout(Stage::TlsHandshake)),
            Ok(Err(e)) => return Err(HopError::Tls(e)),
            Ok(Ok(stream)) => stream,
        };
        debug!("tls started");
        Ok(Self {
            stream: Box::new(stream),
            buf: Vec::new(),
            settings,
            capabilities: Capabilities::default(),
            is_tls: true,
            broken: false,
        })
    }

    /// MAIL and the RCPTs, pipelined when possible. Returns the MAIL reply and one reply per
    /// RCPT sent; after a MAIL refusal the caller ignores the RCPT replies.
    async fn envelope(
        &mut self,
        mail: String,
        rcpts: &[String],
    ) -> Result<(Reply, Vec<Reply>), HopError> {
        let pipelining = self.capabilities.pipelining || self.settings.protocol == Protocol::Lmtp;
        let mut replies = Vec::with_capacity(rcpts.len());
        if !pipelining {
            let mail_reply = self.command(&mail, Stage::Mail).await?;
            self.check_class(Stage::Mail, &mail_reply)?;
            if !mail_reply.is_positive() {
                return Ok((mail_reply, replies));
            }
            for rcpt in rcpts {
                let reply = self.command(rcpt, Stage::Rcpt).await?;
                self.check_class(Stage::Rcpt, &reply)?;
                replies.push(reply);
            }
            return Ok((mail_reply, replies));
        }
        let mut mail_reply = None;
        let mut batch = mail.into_bytes();
        let mut chunks = rcpts.chunks(PIPELINE_BATCH);
        loop {
            let chunk = chunks.next().unwrap_or_default();
            for rcpt in chunk {
                batch.extend_from_slice(rcpt.as_bytes());
            }
            let stage = if mail_reply.is_none() {
                Stage::Mail
            } else {
                Stage::Rcpt
            };
            self.write(&batch, stage, self.settings.command_timeout)
                .await?;
            batch.clear();
            if mail_reply.is_none() {
                let reply = self
                    .read_reply(Stage::Mail, self.settings.command_timeout)
                    .await?;
                self.check_class(Stage::Mail, &reply)?;
                mail_reply = Some(reply);
            }
            for _ in chunk {
                let reply = self
                    .read_reply(Stage::Rcpt, self.settings.command_timeout)
                    .await?;
                self.check_class(Stage::Rcpt, &reply)?;
                replies.push(reply);
            }
            let mail_refused = mail_reply.as_ref().is_some_and(|r| !r.is_positive());
            if replies.len() >= rcpts.len() || mail_refused {
                break;
            }
        }
        let mail_reply = mail_reply.ok_or_else(|| HopError::Protocol {
            stage: Stage::Mail,
            detail: "no reply to mail".into(),
        })?;
        Ok((mail_reply, replies))
    }

    /// Writes the body normalised and dot-stuffed, then the end-of-data marker. Every bare LF
    /// and bare CR goes out as CRLF, so whatever bytes a stored message holds, the next hop
    /// sees only CRLF lines and can never take part of the body for its end (SMTP smuggling).
    async fn write_body(&mut self, message: &[u8]) -> Result<(), HopError> {
        let mut out = Vec::with_capacity(message.len().min(BODY_CHUNK_LEN) + 8);
        let mut at_line_start = true;
        let mut pending_cr = false;
        for &b in message {
            if pending_cr {
                pending_cr = false;
                out.extend_from_slice(b"\r\n");
                at_line_start = true;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\r' => {
                    pending_cr = true;
                    continue;
                }
                b'\n' => {
                    out.extend_from_slice(b"\r\n");
                    at_line_start = true;
                    continue;
                }
                b'.' if at_line_start => out.push(b'.'),
                _ => {}
            }
            out.push(b);
            at_line_start = false;
            if out.len() >= BODY_CHUNK_LEN {
                self.write(&out, Stage::Body, self.settings.data_timeout)
                    .await?;
                out.clear();
            }
        }
        if pending_cr || !at_line_start {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        self.write(&out, Stage::Body, self.settings.data_timeout)
            .await
    }

    /// One reply after the final dot: 2xx, 4xx or 5xx.
    async fn final_reply(&mut self) -> Result<Reply, HopError> {
        let reply = self
            .read_reply(Stage::EndOfData, self.settings.data_timeout)
            .await?;
        self.check_class(Stage::EndOfData, &reply)?;
        Ok(reply)
    }

    /// RSET after a failed transaction; its outcome does not change the caller's result.
    async fn reset_quietly(&mut self) {
        if let Err(e) = self.reset().await {
            debug!(error = %e, "rset failed");
        }
    }

    /// Best-effort QUIT without waiting for the reply, before giving up on a session.
    async fn abandon(&mut self) {
        let _ = self
            .write(b"QUIT\r\n", Stage::Quit, self.settings.command_timeout)
            .await;
    }

    /// An error for a refused session command; a refused session is not used again.
    fn refused(&mut self, stage: Stage, reply: Reply) -> HopError {
        self.broken = true;
        HopError::Rejected { stage, reply }
    }

    /// Accepts a reply where only 2xx, 4xx or 5xx make sense; a 3xx leaves the session out of
    /// step, so it is not used again.
    fn check_class(&mut self, stage: Stage, reply: &Reply) -> Result<(), HopError> {
        if reply.is_intermediate() {
            self.broken = true;
            return Err(unexpected(stage, reply));
        }
        Ok(())
    }

    /// Writes one command and reads its reply.
    async fn command(&mut self, line: &str, stage: Stage) -> Result<Reply, HopError> {
        debug!(%stage, "command");
        self.write(line.as_bytes(), stage, self.settings.command_timeout)
            .await?;
        self.read_reply(stage, self.settings.command_timeout).await
    }

    /// Writes and flushes `bytes` within `limit`.
    async fn write(&mut self, bytes: &[u8], stage: Stage, limit: Duration) -> Result<(), HopError> {
        if self.broken {
            return Err(HopError::Broken);
        }
        let stream = &mut self.stream;
        let result = timeout(limit, async {
            stream.write_all(bytes).await?;
            stream.flush().await
        })
        .await;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => {
                self.broken = true;
                Err(HopError::Io { stage, source })
            }
            Err(_) => {
                self.broken = true;
                Err(HopError::Timeout(stage))
            }
        }
    }

    /// Reads one complete reply within `limit`. A 421 (the server is closing) is returned as
    /// [`HopError::Rejected`] at any stage but the greeting.
    async fn read_reply(&mut self, stage: Stage, limit: Duration) -> Result<Reply, HopError> {
        if self.broken {
            return Err(HopError::Broken);
        }
        let result = match timeout(limit, self.read_reply_unbounded(stage)).await {
            Ok(result) => result,
            Err(_) => Err(HopError::Timeout(stage)),
        };
        match result {
            Ok(reply) => {
                debug!(%stage, code = reply.code, "reply");
                if reply.code == 421 && stage != Stage::Greeting {
                    return Err(self.refused(stage, reply));
                }
                Ok(reply)
            }
            Err(e) => {
                self.broken = true;
                Err(e)
            }
        }
    }

    /// Parses one reply from the buffer, reading more as needed. Leftover bytes stay in the
    /// buffer for the next reply (pipelining).
    async fn read_reply_unbounded(&mut self, stage: Stage) -> Result<Reply, HopError> {
        let mut parser = ResponseReceiver::default();
        let mut consumed = 0usize;
        let mut chunk = [0u8; READ_CHUNK_LEN];
        loop {
            if !self.buf.is_empty() {
                let mut bytes = self.buf.iter();
                let before = bytes.len();
                let parsed = parser.parse(&mut bytes);
                let used = before - bytes.len();
                self.buf.drain(..used);
                consumed = consumed.saturating_add(used);
                match parsed {
                    Ok(response) => {
                        return to_reply(stage, response.code, response.esc, &response.message);
                    }
                    Err(smtp_proto::Error::NeedsMoreData { .. }) => {}
                    Err(e) => {
                        return Err(HopError::Protocol {
                            stage,
                            detail: format!("bad reply: {e:?}"),
                        });
                    }
                }
                // The parser holds what it consumed; cap it before reading more.
                if consumed > MAX_REPLY_BYTES {
                    return Err(HopError::Protocol {
                        stage,
                        detail: "reply too long".into(),
                    });
                }
            }
            let n = self
                .stream
                .read(&mut chunk)
                .await
                .map_err(|source| HopError::Io { stage, source })?;
            if n == 0 {
                return Err(HopError::Io {
                    stage,
                    source: io::ErrorKind::UnexpectedEof.into(),
                });
            }
            self.buf
                .extend_from_slice(chunk.get(..n).unwrap_or_default());
        }
    }
}

/// Builds a [`Reply`] from what smtp-proto parsed: code 200 to 599, enhanced code when there
/// was one, control characters in the text replaced by spaces.
fn to_reply(stage: Stage, code: u16, esc: [u8; 3], message: &str) -> Result<Reply, HopError> {
    if !(200..600).contains(&code) {
        return Err(HopError::Protocol {
            stage,
            detail: format!("invalid reply code {code}"),
        });
    }
    let [class, subject, detail] = esc;
    let enhanced = matches!(class, 2 | 4 | 5).then(|| EnhancedCode {
        class,
        subject: subject.into(),
        detail: detail.into(),
    });
    let lines: Vec<String> = message
        .split('\n')
        .map(|line| {
            line.trim_end_matches('\r')
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect()
        })
        .collect();
    if lines.len() > MAX_REPLY_LINES {
        return Err(HopError::Protocol {
            stage,
            detail: "too many reply lines".into(),
        });
    }
    Ok(Reply {
        code,
        enhanced,
        lines,
    })
}

fn unexpected(stage: Stage, reply: &Reply) -> HopError {
    HopError::Protocol {
        stage,
        detail: format!("unexpected reply {}", reply.code),
    }
}

/// Refuses what could break the command line: control characters (CR, LF, NUL...).
fn check_path(path: &str) -> Result<(), HopError> {
    if path.chars().any(char::is_control) {
        return Err(HopError::InvalidArgument(format!(
            "control character in path {path:?}"
        )));
    }
    Ok(())
}

fn check_helo_name(name: &str) -> Result<(), HopError> {
    if name.is_empty() || name.len() > 255 || name.chars().any(|c| c.is_control() || c == ' ') {
        return Err(HopError::InvalidArgument(format!(
            "invalid helo name {name:?}"
        )));
    }
    Ok(())
}

/// The XFORWARD command lines for the attributes the server offered.
fn xforward_lines(offered: &[String], attrs: &[(&str, &str)]) -> Result<Vec<String>, HopError> {
    const VERB: &str = "XFORWARD";
    // "XFORWARD" + " " + item + CRLF must fit in one command.
    let max_item = MAX_COMMAND_LEN - VERB.len() - 1 - 2;
    let mut items = Vec::new();
    for &(name, value) in attrs {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(HopError::InvalidArgument(format!(
                "invalid xforward attribute {name:?}"
            )));
        }
        let name = name.to_ascii_uppercase();
        if !offered.contains(&name) {
            continue;
        }
        let mut item = format!("{name}={}", xtext(value));
        if item.len() > max_item {
            item = format!("{name}=[UNAVAILABLE]");
        }
        items.push(item);
    }
    let mut lines = Vec::new();
    let mut line = String::new();
    for item in items {
        if !line.is_empty() && line.len() + 1 + item.len() + 2 > MAX_COMMAND_LEN {
            line.push_str("\r\n");
            lines.push(std::mem::take(&mut line));
        }
        if line.is_empty() {
            line.push_str(VERB);
        }
        line.push(' ');
        line.push_str(&item);
    }
    if !line.is_empty() {
        line.push_str("\r\n");
        lines.push(line);
    }
    Ok(lines)
}

/// RFC 3461 §4 xtext: printable ASCII but `+` and `=` as is, every other octet as `+XX`.
fn xtext(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::Mutex;
    use std::task::{Context, Poll, ready};

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio::io::{DuplexStream, ReadBuf};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;
    use tokio::time::Instant;

    use super::*;

    /// Long enough never to fire in a passing test.
    const TEST_DEADLINE: Duration = Duration::from_secs(10);

    /// One step of a scripted fake server.
    enum Step {
        /// Write these bytes in one write.
        Send(&'static [u8]),
        /// Write these bytes one at a time, flushing after each.
        SendBytewise(&'static [u8]),
        /// Read until this many command lines arrived; record them.
        Recv(usize),
        /// Read a DATA body up to and including `CRLF.CRLF`; record it.
        RecvData,
        /// Take the TLS handshake, dropping anything buffered.
        Tls(tokio_rustls::TlsAcceptor),
        /// Stop answering but keep the connection open.
        Hang,
        /// Write `250-x` lines until the client goes away.
        Flood,
        /// Close the connection.
        Close,
    }

    /// What the fake server received.
    #[derive(Default)]
    struct Record {
        /// Every read, as it came.
        reads: Vec<Vec<u8>>,
        /// Command lines, without CRLF.
        lines: Vec<String>,
        /// DATA bodies, exactly as received (stuffed, with the final `.CRLF`).
        bodies: Vec<Vec<u8>>,
    }

    type Shared = Arc<Mutex<Record>>;

    async fn run_script(stream: Box<dyn Stream>, script: Vec<Step>, record: Shared) {
        let mut stream = stream;
        let mut pending: Vec<u8> = Vec::new();
        for step in script {
            match step {
                Step::Send(bytes) => {
                    stream.write_all(bytes).await.unwrap();
                    stream.flush().await.unwrap();
                }
                Step::SendBytewise(bytes) => {
                    for b in bytes {
                        stream.write_all(&[*b]).await.unwrap();
                        stream.flush().await.unwrap();
                    }
                }
                Step::Recv(n) => {
                    for _ in 0..n {
                        let line = loop {
                            if let Some(i) = pending.windows(2).position(|w| w == b"\r\n") {
                                let line: Vec<u8> = pending.drain(..i + 2).collect();
                                break String::from_utf8(line[..i].to_vec()).unwrap();
                            }
                            read_more(&mut stream, &mut pending, &record).await;
                        };
                        record.lock().unwrap().lines.push(line);
                    }
                }
                Step::RecvData => {
                    let body = loop {
                        if let Some(i) = pending.windows(5).position(|w| w == b"\r\n.\r\n") {
                            break pending.drain(..i + 5).collect();
                        }
                        read_more(&mut stream, &mut pending, &record).await;
                    };
                    record.lock().unwrap().bodies.push(body);
                }
                Step::Tls(acceptor) => {
                    pending.clear();
                    stream = Box::new(acceptor.accept(stream).await.unwrap());
                }
                Step::Hang => std::future::pending::<()>().await,
                Step::Flood => {
                    while stream.write_all(b"250-xxxxxxxxxxxxxxxx\r\n").await.is_ok() {}
                    return;
                }
                Step::Close => return,
            }
        }
    }

    async fn read_more(stream: &mut Box<dyn Stream>, pending: &mut Vec<u8>, record: &Shared) {
        let mut chunk = [0u8; 65536];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "client closed early; got {:?}",
            record.lock().unwrap().lines
        );
        pending.extend_from_slice(&chunk[..n]);
        record.lock().unwrap().reads.push(chunk[..n].to_vec());
    }

    /// A fake server on 127.0.0.1:0 that takes one connection and plays `script`.
    async fn tcp_server(script: Vec<Step>) -> (SocketAddr, Shared, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let record = Shared::default();
        let rec = Arc::clone(&record);
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            stream.set_nodelay(true).unwrap();
            run_script(Box::new(stream), script, rec).await;
        });
        (addr, record, task)
    }

    /// A fake server at the other end of a duplex pipe.
    fn duplex_server(script: Vec<Step>) -> (DuplexStream, Shared, JoinHandle<()>) {
        let (client, server) = tokio::io::duplex(256 * 1024);
        let record = Shared::default();
        let rec = Arc::clone(&record);
        let task = tokio::spawn(run_script(Box::new(server), script, rec));
        (client, record, task)
    }

    /// Waits for the server to finish its script, with a deadline.
    async fn finished(task: JoinHandle<()>, record: &Shared) {
        match timeout(TEST_DEADLINE, task).await {
            Ok(result) => result.unwrap(),
            Err(_) => panic!(
                "server did not finish; received {:?}",
                record.lock().unwrap().lines
            ),
        }
    }

    /// Settings whose timeouts end a broken test quickly instead of after minutes.
    fn settings(protocol: Protocol) -> ClientSettings {
        ClientSettings {
            command_timeout: TEST_DEADLINE,
            data_timeout: TEST_DEADLINE,
            ..ClientSettings::new("spool.test", protocol)
        }
    }

    fn lmtp() -> ClientSettings {
        settings(Protocol::Lmtp)
    }

    fn smtp() -> ClientSettings {
        settings(Protocol::Smtp)
    }

    fn paths(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn codes(replies: &[Reply]) -> Vec<u16> {
        replies.iter().map(|r| r.code).collect()
    }

    const MSG: &[u8] = b"Subject: hi\r\n\r\nhello\r\n";

    #[tokio::test]
    async fn lmtp_one_reply_per_recipient_in_order_and_pipelined() {
        let (addr, record, server) = tcp_server(vec![
            Step::Send(b"220 filer.test LMTP\r\n"),
            Step::Recv(1),
            Step::Send(b"250-filer.test\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250 8BITMIME\r\n"),
            Step::Recv(5),
            Step::Send(
                b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no such user\r\n250 2.1.5 ok\r\n250 2.1.5 ok\r\n",
            ),
            Step::Recv(1),
            Step::Send(b"354 go ahead\r\n"),
            Step::RecvData,
            Step::Send(b"250 2.0.0 <a@h.test> delivered\r\n452 4.2.2 mailbox full\r\n250 2.0.0 <d@h.test> delivered\r\n"),
            Step::Recv(1),
            Step::Send(b"221 2.0.0 bye\r\n"),
        ])
        .await;
        let mut client = Client::connect(addr, &lmtp()).await.unwrap();
        assert!(client.capabilities().pipelining);
        let rcpts = paths(&["a@h.test", "nobody@h.test", "full@h.test", "d@h.test"]);
        let replies = client.send("s@r.test", &rcpts, MSG).await.unwrap();
        assert_eq!(codes(&replies), [250, 550, 452, 250]);
        assert_eq!(
            replies[1].enhanced.map(|e| e.to_string()).as_deref(),
            Some("5.1.1")
        );
        assert_eq!(replies[2].text(), "mailbox full");
        assert!(replies[2].is_transient());
        assert_eq!(replies[3].text(), "<d@h.test> delivered");
        client.quit().await;
        finished(server, &record).await;

        let rec = record.lock().unwrap();
        assert_eq!(
            rec.lines,
            [
                "LHLO spool.test",
                "MAIL FROM:<s@r.test>",
                "RCPT TO:<a@h.test>",
                "RCPT TO:<nobody@h.test>",
                "RCPT TO:<full@h.test>",
                "RCPT TO:<d@h.test>",
                "DATA",
                "QUIT",
            ]
        );
        // MAIL and every RCPT arrived in one read: one write, no waiting for replies.
        let batch = rec.reads.iter().find(|r| r.starts_with(b"MAIL")).unwrap();
        assert!(
            batch.ends_with(b"RCPT TO:<d@h.test>\r\n"),
            "{:?}",
            String::from_utf8_lossy(batch)
        );
        assert_eq!(rec.bodies, [b"Subject: hi\r\n\r\nhello\r\n.\r\n".to_vec()]);
    }

    #[tokio::test]
    async fn smtp_single_data_reply_is_copied_to_each_accepted_recipient() {
        // No PIPELINING: one command at a time.
        let (addr, record, server) = tcp_server(vec![
            Step::Send(b"220 filter.test ESMTP\r\n"),
            Step::Recv(1),
            Step::Send(b"250-filter.test\r\n250 SIZE 1000000\r\n"),
            Step::Recv(1),
            Step::Send(b"250 2.1.0 ok\r\n"),
            Step::Recv(1),
            Step::Send(b"250 2.1.5 ok\r\n"),
            Step::Recv(1),
            Step::Send(b"550 5.1.1 unknown\r\n"),
            Step::Recv(1),
            Step::Send(b"250 2.1.5 ok\r\n"),
            Step::Recv(1),
            Step::Send(b"354 go ahead\r\n"),
            Step::RecvData,
            Step::Send(b"250 2.0.0 queued as 42\r\n"),
            Step::Recv(1),
            Step::Send(b"221 bye\r\n"),
        ])
        .await;
        let mut client = Client::connect(addr, &smtp()).await.unwrap();
        let rcpts = paths(&["a@h.test", "b@h.test", "c@h.test"]);
        let replies = client.send("", &rcpts, MSG).await.unwrap();
        assert_eq!(codes(&replies), [250, 550, 250]);
        assert_eq!(replies[0].text(), "queued as 42");
        assert_eq!(replies[0], replies[2]);
        client.quit().await;
        finished(server, &record).await;
        let rec = record.lock().unwrap();
        assert_eq!(rec.lines[0], "EHLO spool.test");
        assert_eq!(rec.lines[1], format!("MAIL FROM:<> SIZE={}", MSG.len()));
    }

    #[tokio::test]
    async fn dot_stuffing_exact_bytes() {
        let rows: &[(&[u8], &[u8])] = &[
            (
                b".leading\r\nmid\r\n..two\r\n.\r\nend\r\n",
                b"..leading\r\nmid\r\n...two\r\n..\r\nend\r\n.\r\n",
            ),
            (b"no final crlf", b"no final crlf\r\n.\r\n"),
            // Bare LF and bare CR go out as CRLF, a dot after them stuffed.
            (b"a\n.\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
            (b"a\r.\rb\r\n.", b"a\r\n..\r\nb\r\n..\r\n.\r\n"),
            (b"a\r\n.\nsmuggled\r\n", b"a\r\n..\r\nsmuggled\r\n.\r\n"),
            (b"a\n.\r\nQUIT\r\n", b"a\r\n..\r\nQUIT\r\n.\r\n"),
            (b"ends in lf\n", b"ends in lf\r\n.\r\n"),
            (b"ends in cr\r", b"ends in cr\r\n.\r\n"),
            (b"\r\r\n\n", b"\r\n\r\n\r\n.\r\n"),
        ];
        let mut script = vec![
            Step::Send(b"220 x\r\n"),
            Step::Recv(1),
            Step::Send(b"250-x\r\n250 PIPELINING\r\n"),
        ];
        for _ in rows {
            script.extend([
                Step::Recv(2),
                Step::Send(b"250 ok\r\n250 ok\r\n"),
                Step::Recv(1),
                Step::Send(b"354 go\r\n"),
                Step::RecvData,
                Step::Send(b"250 ok\r\n"),
            ]);
        }
        let (addr, record, server) = tcp_server(script).await;
        let mut client = Client::connect(addr, &smtp()).await.unwrap();
        for (body, _) in rows {
            let replies = client
                .send("a@b.test", &paths(&["c@d.test"]), body)
                .await
                .unwrap();
            assert_eq!(codes(&replies), [250]);
        }
        drop(client);
        finished(server, &record).await;
        let rec = record.lock().unwrap();
        for ((body, want), got) in rows.iter().zip(&rec.bodies) {
            assert_eq!(
                String::from_utf8_lossy(got),
                String::from_utf8_lossy(want),
                "body {:?}",
                String::from_utf8_lossy(body)
            );
        }
        assert_eq!(rec.bodies.len(), rows.len());
    }

    /// Hands the client at most `n` bytes per read.
    struct Chunked<S> {
        inner: S,
        n: usize,
    }

    impl<S: AsyncRead + Unpin> AsyncRead for Chunked<S> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let mut tmp = vec![0u8; self.n.min(buf.remaining())];
            let mut small = ReadBuf::new(&mut tmp);
            ready!(Pin::new(&mut self.inner).poll_read(cx, &mut small))?;
            buf.put_slice(small.filled());
            Poll::Ready(Ok(()))
        }
    }

    impl<S: AsyncWrite + Unpin> AsyncWrite for Chunked<S> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write(cx, b)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn replies_split_across_reads_still_parse() {
        for n in [1, 2, 3, 7, 64, 4096] {
            let (stream, record, server) = duplex_server(vec![
                Step::SendBytewise(b"220-filer.test\r\n220 LMTP ready\r\n"),
                Step::Recv(1),
                Step::SendBytewise(b"250-filer.test\r\n250-PIPELINING\r\n250-SIZE 5000\r\n250 XFORWARD NAME ADDR\r\n"),
                Step::Recv(3),
                // MAIL and two RCPTs: the leftover of one read starts the next reply.
                Step::SendBytewise(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.1.5 ok\r\n"),
                Step::Recv(1),
                Step::SendBytewise(b"354 go\r\n"),
                Step::RecvData,
                Step::SendBytewise(b"250 2.0.0 ok\r\n452-4.2.2 over\r\n452-4.2.2 quota\r\n452 4.2.2 try later\r\n"),
            ]);
            let stream = Chunked { inner: stream, n };
            let mut client = Client::from_stream(stream, &lmtp()).await.unwrap();
            assert_eq!(client.capabilities().size, Some(5000));
            assert_eq!(client.capabilities().xforward, ["NAME", "ADDR"]);
            let replies = client
                .send("a@b.test", &paths(&["c@d.test", "e@d.test"]), MSG)
                .await
                .unwrap();
            assert_eq!(codes(&replies), [250, 452], "chunk {n}");
            assert_eq!(
                replies[1].lines,
                ["over", "quota", "try later"],
                "chunk {n}"
            );
            assert_eq!(
                replies[1].enhanced.map(|e| e.to_string()).as_deref(),
                Some("4.2.2")
            );
            finished(server, &record).await;
        }
    }

    #[tokio::test]
    async fn no_recipient_accepted_means_rset_and_no_data() {
        let (addr, record, server) = tcp_server(vec![
            Step::Send(b"220 x\r\n"),
            Step::Recv(1),
            Step::Send(b"250-x\r\n250 PIPELINING\r\n"),
            Step::Recv(3),
            Step::Send(b"250 ok\r\n550 5.1.1 no\r\n450 4.2.1 later\r\n"),
            Step::Recv(1),
            Step::Send(b"250 2.0.0 reset\r\n"),
            Step::Recv(1),
            Step::Send(b"221 bye\r\n"),
        ])
        .await;
        let mut client = Client::connect(addr, &smtp()).await.unwrap();
        let replies = client
            .send("a@b.test", &paths(&["x@h.test", "y@h.test"]), MSG)
            .await
            .unwrap();
        assert_eq!(codes(&replies), [550, 450]);
        client.quit().await;
        finished(server, &record).await;
        let rec = record.lock().unwrap();
        assert_eq!(rec.lines[4], "RSET");
        assert_eq!(rec.lines[5], "QUIT");
        assert!(!rec.lines.iter().any(|l| l == "DATA"));
        assert!(rec.bodies.is_empty());
    }

    #[tokio::test]
    async fn mail_refused_is_rejected_with_its_class() {
        let (addr, record, server) = tcp_server(vec![
            Step::Send(b"220 x\r\n"),
            Step::Recv(1),
            Step::Send(b"250-x\r\n250 PIPELINING\r\n"),
            Step::Recv(2),
            Step::Send(b"553 5.7.1 sender refused\r\n503 5.5.1 no mail\r\n"),
            Step::Recv(1),
            Step::Send(b"250 ok\r\n"),
        ])
        .await;
        let mut client = Client::connect(addr, &smtp()).await.unwrap();
        let err = client
            .send("a@b.test", &paths(&["x@h.test"]), MSG)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                HopError::Rejected {
                    stage: Stage::Mail,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.is_permanent());
        assert_eq!(err.reply().map(|r| r.code), Some(553));
        finished(server, &record).await;
        assert_eq!(
            record.lock().unwrap().lines.last().map(String::as_str),
            Some("RSET")
        );
    }

    #[tokio::test]
    async fn close_before_final_reply_is_temporary() {
        let (addr, record, server) = tcp_server(vec![
            Step::Send(b"220 x\r\n"),
            Step::Recv(1),
            Step::Send(b"250 x\r\n"),
            Step::Recv(1),
            Step::Send(b"250 ok\r\n"),
            Step::Recv(1),
            Step::Send(b"250 ok\r\n"),
            Step::Recv(1),
            Step::Send(b"354 go\r\n"),
            Step::RecvData,
            Step::Close,
        ])
        .await;
        let mut client = Client::connect(addr, &smtp()).await.unwrap();
        let err = client
            .send("a@b.test", &paths(&["x@h.test"]), MSG)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                HopError::Io {
                    stage: Stage::EndOfData,
                    ..
                }
            ),
            "{err}"
        );
        assert!(!err.is_permanent());
        // The connection is not used again.
        let again = client
            .send("a@b.test", &paths(&["x@h.test"]), MSG)
            .await
            .unwrap_err();
        assert!(matches!(again, HopError::Broken));
        finished(server, &record).await;
    }

    #[tokio::test]
    async fn lmtp_close_after_some_final_replies_is_partial() {
        let (stream, record, server) = duplex_server(vec![
            Step::Send(b"220 x\r\n"),
            Step::Recv(1),
            Step::Send(b"250 x\r\n"),
            Step::Recv(4),
            Step::Send(b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n250 ok\r\n"),
            Step::Recv(1),
            Step::Send(b"354 go\r\n"),
            Step::RecvData,
            Step::Send(b"250 2.0.0 delivered\r\n"),
            Step::Close,
        ]);
        let mut client = Client::from_stream(stream, &lmtp()).await.unwrap();
        let err = client
            .send(
                "a@b.test",
                &paths(&["x@h.test", "y@h.test", "z@h.test"]),
                MSG,
            )
            .await
            .unwrap_err();
        assert!(!err.is_permanent());
        let HopError::Partial { replies, source } = err else {
            panic!("{err}")
        };
        let got: Vec<Option<u16>> = replies.iter().map(|r| r.as_ref().map(|r| r.code)).collect();
        assert_eq!(got, [Some(250), Some(550), None]);
        assert!(matches!(
            *source,
            HopError::Io {
                stage: Stage::EndOfData,
                ..
            }
        ));
        finished(server, &record).await;
    }

    #[tokio::test(start_paused = true)]
    async fn silent_server_times_out_at_greeting() {
        let (stream, _record, _server) = duplex_server(vec![Step::Hang]);
        let settings = ClientSettings {
            command_timeout: Duration::from_secs(30),
            ..smtp()
        };
        let start = Instant::now();
        let err = Client::from_stream(stream, &settings).await.unwrap_err();
        assert!(matches!(err, HopError::Timeout(Stage::Greeting)), "{err}");
        assert!(!err.is_permanent());
        assert!(start.elapsed() >= Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn silent_server_times_out_after_data() {
        let (stream, _record, _server) = duplex_server(vec![
            Step::Send(b"220 x\r\n"),
            Step::Recv(1),
            Step::Send(b"250 x\r\n"),
            Step::Recv(2),
            Step::Send(b"250 ok\r\n250 ok\r\n"),
            Step::Recv(1),
            Step::Send(b"354 go\r\n"),
            Step::RecvData,
            Step::Hang,
        ]);
        let settings = ClientSettings {
            data_timeout: Duration::from_secs(600),
            ..lmtp()
        };
        let mut client = Client::from_stream(stream, &settings).await.unwrap();
        let start = Instant::now();
        let err = client
            .send("a@b.test", &paths(&["x@h.test"]), MSG)
            .await
            .unwrap_err();
        assert!(matches!(err, HopError::Timeout(Stage::EndOfData)), "{err}");
        assert!(!err.is_permanent());
        assert!(start.elapsed() >= Duration::from_secs(600));
    }

    #[tokio::test]
    async fn silent_tcp_server_times_out_for_real() {
        // A short real timeout on a server that never answers: we wait on a condition.
        let (addr, _record, _server) = tcp_server(vec![Step::Hang]).await;
        let settings = ClientSettings {
            command_timeout: Duration::from_millis(200),
            ..smtp()
        };
        let err = Client::connect(addr, &settings).await.unwrap_err();
        assert!(matches!(err, HopError::Timeout(Stage::Greeting)), "{err}");
    }

    fn tls_pair() -> (tokio_rustls::TlsAcceptor, TlsClient) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = rcgen::generate_simple_self_signed(vec!["mx.test".to_string()]).unwrap();
        let cert: CertificateDer<'static> = key.cert.der().clone();
        let pkcs8 = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.signing_key.serialize_der()));
        let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], pkcs8)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tls = TlsClient {
            config: Arc::new(client),
            server_name: ServerName::try_from("mx.test").unwrap(),
        };
        (tokio_rustls::TlsAcceptor::from(Arc::new(server)), tls)
    }

    #[tokio::test]
    async fn starttls_upgrades_and_discards_bytes_sent_before_the_handshake() {
        let (acceptor, tls) = tls_pair();
        let (stream, record, server) = duplex_server(vec![
            Step::Send(b"220 mx.test ESMTP\r\n"),
            Step::Recv(1),
            Step::Send(b"250-mx.test\r\n250-STARTTLS\r\n250 PIPELINING\r\n"),
            Step::Recv(1),
            // Injected after the 220, in the same write: it must never be read as a reply.
            Step::Send(b"220 2.0.0 ready\r\n250-injected\r\n250 XFORWARD NAME ADDR\r\n"),
            Step::Tls(acceptor),
            Step::Recv(1),
            Step::Send(b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 1000\r\n"),
            Step::Recv(2),
            Step::Send(b"250 ok\r\n250 ok\r\n"),
            Step::Recv(1),
            Step::Send(b"354 go\r\n"),
            Step::RecvData,
            Step::Send(b"250 2.0.0 over tls\r\n"),
            Step::Recv(1),
            Step::Send(b"221 bye\r\n"),
        ]);
        let settings = ClientSettings {
            tls: TlsPolicy::Opportunistic(tls),
            ..smtp()
        };
        let mut client = Client::from_stream(stream, &settings).await.unwrap();
        assert!(client.is_tls());
        let caps = client.capabilities();
        assert!(caps.xforward.is_empty(), "{caps:?}");
        assert!(!caps.starttls && caps.pipelining);
        assert_eq!(caps.size, Some(1000));
        let replies = client
            .send("a@b.test", &paths(&["c@mx.test"]), MSG)
            .await
            .unwrap();
        assert_eq!(replies[0].text(), "over tls");
        client.quit().await;
        finished(server, &record).await;
        let rec = record.lock().unwrap();
        assert_eq!(
            rec.lines[..3],
            ["EHLO spool.test", "STARTTLS", "EHLO spool.test"]
        );
    }

    #[tokio::test]
    async fn required_tls_not_offered_is_temporary() {
        let (_, tls) = tls_pair();
        let (stream, record, server) = duplex_server(vec![
            Step::Send(b"220 x\r\n"),
            Step::Recv(1),
            Step::Send(b"250-x\r\n250 PIPELINING\r\n"),
            Step::Recv(1),
        ]);
        let settings = ClientSettings {
            tls: TlsPolicy::Required(tls),
            ..smtp()
        };
        let err = Client::from_stream(stream, &settings).await.unwrap_err();
        assert!(matches!(err, HopError::TlsNotOffered), "{err}");
        assert!(!err.is_permanent());
        finished(server, &record).await;
        assert_eq!(record.lock().unwrap().lines[1], "QUIT");
    }

    #[tokio::test]
    async fn xforward_formatting() {
        let long = "h".repeat(300);
        let (stream, record, server) = duplex_server(vec![
            Step::Send(b"220 x\r\n"),
            Step::Recv(1),
            Step::Send(b"250-x\r\n250 XFORWARD NAME ADDR PROTO HELO SOURCE\r\n"),
            Step::Recv(1),
            Step::Send(b"250 2.0.0 ok\r\n"),
            Step::Recv(1),
            Step::Send(b"250 2.0.0 ok\r\n"),
            Step::Recv(1),
            Step::Send(b"250 2.0.0 ok\r\n"),
            Step::Recv(1),
            Step::Send(b"550 5.5.1 no\r\n"),
        ]);
        let mut client = Client::from_stream(stream, &smtp()).await.unwrap();
        let reply = client
            .xforward(&[
                ("NAME", "mail.example"),
                ("addr", "2001:db8::1"),
                ("PORT", "25"), // not announced: left out
                ("helo", "a b+c=d\u{e9}"),
                ("PROTO", "ESMTP"),
            ])
            .await
            .unwrap();
        assert_eq!(reply.map(|r| r.code), Some(250));
        // Too long for one command together: split in two.
        let name = "n".repeat(250);
        client
            .xforward(&[("NAME", &name), ("HELO", &long)])
            .await
            .unwrap();
        // Nothing announced: nothing sent.
        assert_eq!(client.xforward(&[("PORT", "25")]).await.unwrap(), None);
        let err = client.xforward(&[("SOURCE", "REMOTE")]).await.unwrap_err();
        assert!(matches!(
            err,
            HopError::Rejected {
                stage: Stage::Xforward,
                ..
            }
        ));
        assert!(client.xforward(&[("NAME=x", "y")]).await.is_err());
        finished(server, &record).await;
        let rec = record.lock().unwrap();
        assert_eq!(
            rec.lines[1],
            "XFORWARD NAME=mail.example ADDR=2001:db8::1 HELO=a+20b+2Bc+3Dd+C3+A9 PROTO=ESMTP"
        );
        assert_eq!(rec.lines[2], format!("XFORWARD NAME={name}"));
        assert_eq!(rec.lines[3], format!("XFORWARD HELO={long}"));
        assert_eq!(rec.lines[4], "XFORWARD SOURCE=REMOTE");
        for line in &rec.lines {
            assert!(line.len() + 2 <= MAX_COMMAND_LEN);
        }
    }

    #[test]
    fn xforward_value_too_long_is_unavailable() {
        let offered = ["HELO".to_string()];
        let lines = xforward_lines(&offered, &[("HELO", &"+".repeat(200))]).unwrap();
        assert_eq!(lines, ["XFORWARD HELO=[UNAVAILABLE]\r\n"]);
    }

    #[tokio::test]
    async fn endless_reply_is_a_protocol_error() {
        let (stream, _record, _server) = duplex_server(vec![Step::Flood]);
        let err = Client::from_stream(stream, &smtp()).await.unwrap_err();
        assert!(
            matches!(
                err,
                HopError::Protocol {
                    stage: Stage::Greeting,
                    ..
                }
            ),
            "{err}"
        );
        assert!(!err.is_permanent());
    }

    #[tokio::test]
    async fn garbage_and_odd_codes_are_protocol_errors() {
        for greeting in [
            &b"hello there\r\n"[..],
            b"199 x\r\n",
            b"600 x\r\n",
            b"2\r\n",
        ] {
            let (stream, _record, _server) = duplex_server(vec![Step::Send(greeting), Step::Hang]);
            let err = Client::from_stream(stream, &smtp()).await.unwrap_err();
            assert!(
                matches!(err, HopError::Protocol { .. }),
                "{greeting:?}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn refused_greeting_is_permanent_only_for_5xx() {
        for (greeting, permanent) in [
            (&b"554 5.7.1 go away\r\n"[..], true),
            (b"421 4.3.2 busy\r\n", false),
        ] {
            let (stream, record, server) = duplex_server(vec![Step::Send(greeting), Step::Recv(1)]);
            let err = Client::from_stream(stream, &smtp()).await.unwrap_err();
            assert!(matches!(err, HopError::Greeting(_)), "{err}");
            assert_eq!(err.is_permanent(), permanent);
            finished(server, &record).await;
            assert_eq!(record.lock().unwrap().lines, ["QUIT"]);
        }
    }

    #[tokio::test]
    async fn ehlo_refused_falls_back_to_helo() {
        let (stream, record, server) = duplex_server(vec![
            Step::Send(b"220 old\r\n"),
            Step::Recv(1),
            Step::Send(b"502 what\r\n"),
            Step::Recv(1),
            Step::Send(b"250 old\r\n"),
            Step::Recv(1),
            Step::Send(b"250 ok\r\n"),
            Step::Recv(1),
            Step::Send(b"250 ok\r\n"),
            Step::Recv(1),
            Step::Send(b"354 go\r\n"),
            Step::RecvData,
            Step::Send(b"250 ok\r\n"),
        ]);
        let mut client = Client::from_stream(stream, &smtp()).await.unwrap();
        assert_eq!(client.capabilities(), &Capabilities::default());
        let replies = client
            .send("a@b.test", &paths(&["c@d.test"]), "8bit \u{e9}".as_bytes())
            .await
            .unwrap();
        assert_eq!(codes(&replies), [250]);
        finished(server, &record).await;
        let rec = record.lock().unwrap();
        assert_eq!(
            rec.lines[..3],
            ["EHLO spool.test", "HELO spool.test", "MAIL FROM:<a@b.test>"]
        );
    }

    #[tokio::test]
    async fn mail_parameters_and_smtputf8() {
        let (stream, record, server) = duplex_server(vec![
            Step::Send(b"220 x\r\n"),
            Step::Recv(1),
            Step::Send(b"250-x\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE\r\n"),
            Step::Recv(2),
            Step::Send(b"250 ok\r\n250 ok\r\n"),
            Step::Recv(1),
            Step::Send(b"354 go\r\n"),
            Step::RecvData,
            Step::Send(b"250 ok\r\n"),
        ]);
        let mut client = Client::from_stream(stream, &smtp()).await.unwrap();
        assert_eq!(client.capabilities().size, Some(0));
        let body = "caf\u{e9}\r\n".as_bytes();
        client
            .send("a@b.test", &paths(&["j\u{f6}rg@d.test"]), body)
            .await
            .unwrap();
        finished(server, &record).await;
        let rec = record.lock().unwrap();
        assert_eq!(
            rec.lines[1],
            "MAIL FROM:<a@b.test> SIZE=7 BODY=8BITMIME SMTPUTF8"
        );
        assert_eq!(rec.lines[2], "RCPT TO:<j\u{f6}rg@d.test>");
    }

    #[tokio::test]
    async fn smtputf8_missing_is_permanent_and_bad_paths_are_refused() {
        let (stream, _record, _server) = duplex_server(vec![
            Step::Send(b"220 x\r\n"),
            Step::Recv(1),
            Step::Send(b"250 x\r\n"),
            Step::Hang,
        ]);
        let mut client = Client::from_stream(stream, &smtp()).await.unwrap();
        let err = client
            .send("a@b.test", &paths(&["j\u{f6}rg@d.test"]), MSG)
            .await
            .unwrap_err();
        assert!(matches!(err, HopError::Unsupported("SMTPUTF8")) && err.is_permanent());
        let err = client
            .send("a@b.test\r\nRSET", &paths(&["c@d.test"]), MSG)
            .await
            .unwrap_err();
        assert!(matches!(err, HopError::InvalidArgument(_)), "{err}");
        let err = client
            .send("a@b.test", &paths(&[""]), MSG)
            .await
            .unwrap_err();
        assert!(matches!(err, HopError::InvalidArgument(_)), "{err}");
        assert!(client.send("a@b.test", &[], MSG).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn closing_421_at_rcpt_is_temporary() {
        let (stream, record, server) = duplex_server(vec![
            Step::Send(b"220 x\r\n"),
            Step::Recv(1),
            Step::Send(b"250-x\r\n250 PIPELINING\r\n"),
            Step::Recv(3),
            Step::Send(b"250 ok\r\n421 4.3.2 shutting down\r\n"),
            Step::Close,
        ]);
        let mut client = Client::from_stream(stream, &smtp()).await.unwrap();
        let err = client
            .send("a@b.test", &paths(&["c@d.test", "e@d.test"]), MSG)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                HopError::Rejected {
                    stage: Stage::Rcpt,
                    ..
                }
            ),
            "{err}"
        );
        assert!(!err.is_permanent());
        finished(server, &record).await;
    }

    #[test]
    fn capabilities_parse() {
        let reply = Reply::multiline(
            250,
            "",
            [
                "mx",
                "pipelining",
                "SIZE 35882577",
                "8BITMIME",
                "SMTPUTF8",
                "STARTTLS",
                "CHUNKING",
                "ENHANCEDSTATUSCODES",
                "DSN",
                "XFORWARD name addr",
                "AUTH PLAIN",
            ]
            .map(String::from)
            .to_vec(),
        );
        let caps = Capabilities::parse(&reply);
        assert_eq!(
            caps,
            Capabilities {
                pipelining: true,
                size: Some(35_882_577),
                eight_bit_mime: true,
                smtputf8: true,
                starttls: true,
                chunking: true,
                enhanced_status_codes: true,
                xforward: vec!["NAME".into(), "ADDR".into()],
                dsn: true,
            }
        );
    }
}
