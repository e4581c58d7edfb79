//! One connection of an SMTP or LMTP server: the I/O under a service's state machine.
//!
//! A service (spool, filer, relay, filter) owns its `enum State` and its policy; a [`Connection`]
//! owns the socket and does the part every one of them must get right:
//!
//! - **Bounded lines.** A command line longer than [`Limits::max_line_len`] is never buffered
//!   whole; it is reported once as [`ReadError::LineTooLong`] and the rest of it is skipped, so
//!   the session stays usable. Memory per connection is the read buffer plus one line.
//! - **Streaming DATA and BDAT** into any [`AsyncWrite`] sink, with the message size limit and
//!   the SMTP smuggling defence of [`DataDecoder`]. A message over the limit, or a sink that
//!   fails, is still read to its real end, so the rest of a body can never run as commands.
//! - **Pipelining (RFC 2920).** Replies are queued and written in one go when the connection
//!   is about to wait for the peer, not while pipelined commands are still buffered.
//! - **STARTTLS** discards every byte buffered before the handshake (the command injection
//!   class of CVE-2021-33515).
//! - **Deadlines.** Every command must arrive within [`Limits::command_timeout`], a whole
//!   message (DATA, or one BDAT chunk) within [`Limits::data_timeout`], and the whole session
//!   ends after [`Limits::session_timeout`]. All use `tokio::time`, so tests can pause time.
//!
//! Errors that reach the client map to their reply in one place, [`ReadError::reply`]; whether
//! to go on after an error (say, close after ten bad commands) is the service's decision.
//!
//! ```no_run
//! # use common::smtp::{Reply, server::{Command, Connection, ReadError}};
//! # async fn session(mut conn: Connection) -> Result<(), ReadError> {
//! conn.reply(&Reply::ok(220, "", "mx.example ESMTP"));
//! loop {
//!     let command = match conn.read_command().await {
//!         Ok(command) => command,
//!         Err(e) => match e.reply() {
//!             Some(reply) if !e.is_fatal() => {
//!                 conn.reply(&reply);
//!                 continue;
//!             }
//!             Some(reply) => {
//!                 conn.reply(&reply);
//!                 let _ = conn.flush().await;
//!                 return Err(e);
//!             }
//!             None => return Err(e),
//!         },
//!     };
//!     // ... the service's state machine answers `command` with `conn.reply(..)`.
//! #   let _ = command;
//! }
//! # }
//! ```

mod data;
mod line;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use smtp_proto::Request;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, timeout_at};
use tokio_rustls::TlsAcceptor;

use crate::smtp::Reply;

pub use data::{DataDecoder, DataStatus};
pub use line::{LineDecoder, LineStatus};

/// Bytes read from the socket at a time. One read buffer of this size is held per connection.
const READ_BUF_SIZE: usize = 16 * 1024;

/// Queued replies are written even while pipelined input is buffered once they reach this
/// size, so a client that pipelines without reading cannot make the server hold unbounded
/// replies.
const WRITE_HIGH_WATER: usize = 64 * 1024;

/// Longest peer-supplied text echoed in a reply.
const MAX_ECHO_LEN: usize = 64;

/// A byte stream a connection can run on: TCP, TLS over TCP, or a `tokio::io::duplex` in
/// tests.
pub trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncStream for T {}

/// A boxed [`AsyncStream`], so STARTTLS can swap the stream without making every session
/// generic.
pub type BoxStream = Box<dyn AsyncStream>;

/// The limits of one connection. Resolved once per peer at connect, and may be changed by the
/// session (for example after AUTH) through [`Connection::limits_mut`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Longest command line in bytes, CRLF included (default 4096). RFC 5321 §4.5.3.1.4 asks
    /// for at least 512; AUTH (RFC 4954 §4) wants 12288 for its responses. A longer line is
    /// answered `500 5.5.2` and skipped.
    pub max_line_len: usize,
    /// Time for a whole command line to arrive, and for a batch of replies to be written
    /// (default 300 s, RFC 5321 §4.5.3.2.7). Measured per command, not per read, so a client
    /// sending one byte at a time gains nothing. At the limit: `421 4.4.2` and close.
    pub command_timeout: Duration,
    /// Time for a whole message to arrive after `354` (DATA), or for a whole BDAT chunk
    /// (default 600 s). Measured per transfer, not per read, so a client trickling a byte at a
    /// time cannot hold a session longer. At the limit: `421 4.4.2` and close.
    pub data_timeout: Duration,
    /// Total time a session may last, from [`Connection::new`] (default 1 h). Checked at every
    /// read; at the limit: `421 4.4.2` and close.
    pub session_timeout: Duration,
    /// Largest message in bytes, after dot-unstuffing and line-ending normalisation
    /// (default 25 MiB). A larger one is read to its end and reported as [`DataEnd::TooBig`].
    pub max_message_size: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_line_len: 4096,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            session_timeout: Duration::from_secs(3600),
            max_message_size: 25 * 1024 * 1024,
        }
    }
}

/// What was negotiated on an encrypted connection, for logs and `Received:` headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// The protocol version, such as `TLSv1_3`.
    pub version: String,
    /// The cipher suite, such as `TLS13_AES_256_GCM_SHA384`.
    pub cipher: String,
}

impl TlsInfo {
    /// What `conn` negotiated; for a service that accepted TLS itself (implicit TLS).
    pub fn from_server(conn: &rustls::ServerConnection) -> Self {
        let version = conn
            .protocol_version()
            .map(|v| format!("{v:?}"))
            .unwrap_or_default();
        let cipher = conn
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))
            .unwrap_or_default();
        Self { version, cipher }
    }
}

/// One decoded command line.
#[derive(Clone, PartialEq, Eq)]
pub enum Command {
    /// A command `smtp-proto` knows (HELO, EHLO, LHLO, MAIL, RCPT, DATA, BDAT, AUTH, ...).
    Request(Request<String>),
    /// A verb `smtp-proto` does not know (XFORWARD, XCLIENT, ...), so a service can implement it
    /// or answer `500 5.5.1`.
    Unknown {
        /// The verb in upper case.
        verb: String,
        /// The whole line without its line ending.
        line: String,
    },
}

impl fmt::Debug for Command {
    /// Redacts the AUTH initial response, so credentials never reach a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Request(Request::Auth { mechanism, .. }) => f
                .debug_struct("Auth")
                .field("mechanism", mechanism)
                .field("initial_response", &"<redacted>")
                .finish(),
            Self::Request(request) => request.fmt(f),
            Self::Unknown { verb, line } => f
                .debug_struct("Unknown")
                .field("verb", verb)
                .field("line", line)
                .finish(),
        }
    }
}

/// How a DATA or BDAT transfer ended. The whole transfer was read in every case, so the next
/// bytes are a command.
#[derive(Debug)]
pub enum DataEnd {
    /// The message (or chunk) is in the sink.
    Complete {
        /// Bytes of the message so far (for BDAT: this chunk plus `already`).
        size: u64,
    },
    /// The message went over [`Limits::max_message_size`]. The sink holds at most a prefix of
    /// it, which the caller discards.
    TooBig {
        /// Bytes of the message as sent, counted to its end.
        size: u64,
    },
    /// Writing to the sink failed; the rest was read and discarded.
    SinkFailed {
        /// Bytes of the message as sent, counted to its end.
        size: u64,
        /// The sink's error.
        error: io::Error,
    },
}

impl DataEnd {
    /// The reply for a transfer that cannot be accepted: `552 5.3.4` for a message over the
    /// limit (RFC 1870 §6.1, RFC 3463), `451 4.3.0` when the sink failed. `None` for
    /// [`DataEnd::Complete`], whose answer depends on what the service does with the message.
    pub fn reply(&self) -> Option<Reply> {
        match self {
            Self::Complete { .. } => None,
            Self::TooBig { .. } => Some(Reply::perm(
                552,
                "5.3.4",
                "message size exceeds fixed maximum message size",
            )),
            Self::SinkFailed { .. } => Some(Reply::temp(
                451,
                "4.3.0",
                "local error in processing, try again later",
            )),
        }
    }
}

/// Why a command line was refused. The session stays usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyntaxError {
    /// The line is not valid UTF-8 (RFC 6531 allows UTF-8, nothing else).
    #[error("command is not valid UTF-8")]
    InvalidUtf8,
    /// A NUL, a bare CR or another control character in the line.
    #[error("control character in command")]
    ControlChar,
    /// An empty line, or one `smtp-proto` could not read.
    #[error("malformed command")]
    Malformed,
    /// MAIL FROM with a malformed reverse-path.
    #[error("bad sender address syntax")]
    BadSender,
    /// RCPT TO with a malformed forward-path.
    #[error("bad recipient address syntax")]
    BadRecipient,
    /// A known verb with malformed arguments; the text is the usage.
    #[error("syntax: {0}")]
    Usage(&'static str),
    /// A known parameter with a bad value.
    #[error("invalid parameter {0}")]
    InvalidParameter(&'static str),
    /// A MAIL or RCPT parameter we do not implement.
    #[error("unsupported parameter {0}")]
    UnsupportedParameter(String),
}

/// Why [`Connection::read_command`], [`read_data`](Connection::read_data) and the other reads
/// returned no command.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The command line went over [`Limits::max_line_len`]; the rest of it is skipped by the
    /// next read. The session stays usable.
    #[error("line too long")]
    LineTooLong,
    /// The command line could not be decoded. The session stays usable.
    #[error("syntax error: {0}")]
    Syntax(#[from] SyntaxError),
    /// Nothing (or not a whole command) arrived in time.
    #[error("idle timeout")]
    Timeout,
    /// [`Limits::session_timeout`] has passed.
    #[error("session time limit reached")]
    SessionExpired,
    /// The peer closed the connection.
    #[error("connection closed by peer")]
    Closed,
    /// Reading or writing the socket failed (writes time out with `ErrorKind::TimedOut`).
    #[error("i/o error on the connection")]
    Io(#[source] io::Error),
    /// The TLS handshake failed.
    #[error("tls handshake failed")]
    Tls(#[source] io::Error),
}

impl ReadError {
    /// The reply to send before going on ([`is_fatal`](Self::is_fatal) false) or before
    /// closing (true). `None` when nothing can be sent: the connection is gone.
    pub fn reply(&self) -> Option<Reply> {
        match self {
            Self::LineTooLong => Some(Reply::perm(500, "5.5.2", "line too long")),
            Self::Syntax(e) => Some(syntax_reply(e)),
            Self::Timeout => Some(Reply::temp(
                421,
                "4.4.2",
                "timeout exceeded, closing connection",
            )),
            Self::SessionExpired => Some(Reply::temp(
                421,
                "4.4.2",
                "session time limit exceeded, closing connection",
            )),
            Self::Closed | Self::Io(_) | Self::Tls(_) => None,
        }
    }

    /// Whether the connection cannot go on: after a fatal error, send
    /// [`reply`](Self::reply) if there is one, and close.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, Self::LineTooLong | Self::Syntax(_))
    }
}

/// One connection of an SMTP or LMTP server. See the [module documentation](self).
pub struct Connection {
    stream: BoxStream,
    peer: SocketAddr,
    tls: Option<TlsInfo>,
    limits: Limits,
    started: Instant,
    /// Bytes read from the socket; `rbuf[start..end]` is not consumed yet.
    rbuf: Box<[u8]>,
    start: usize,
    end: usize,
    lines: LineDecoder,
    /// Replies queued by [`Connection::reply`], not written yet.
    wbuf: Vec<u8>,
    /// Decoded DATA text between a socket read and the sink write.
    out: Vec<u8>,
}

impl Connection {
    /// A connection on `stream` from `peer`. The session deadline starts now.
    pub fn new(stream: BoxStream, peer: SocketAddr, limits: Limits) -> Self {
        Self {
            stream,
            peer,
            tls: None,
            lines: LineDecoder::new(limits.max_line_len),
            limits,
            started: Instant::now(),
            rbuf: vec![0; READ_BUF_SIZE].into_boxed_slice(),
            start: 0,
            end: 0,
            wbuf: Vec::new(),
            out: Vec::new(),
        }
    }

    /// Marks a connection whose stream is already encrypted (implicit TLS, port 465).
    pub fn with_tls(mut self, info: TlsInfo) -> Self {
        self.tls = Some(info);
        self
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Whether the connection is encrypted (after STARTTLS, or implicit TLS).
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// What TLS negotiated, when encrypted.
    pub fn tls(&self) -> Option<&TlsInfo> {
        self.tls.as_ref()
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The limits, to change them for the rest of the session.
    pub fn limits_mut(&mut self) -> &mut Limits {
        &mut self.limits
    }

    /// Whether bytes from the peer are buffered and not yet read as a command or data. Before
    /// the greeting this means the client talked first; when the session wants to send a
    /// reply before it reads the next command, it means the client did not wait.
    pub fn has_pending_input(&self) -> bool {
        self.start < self.end || self.lines.partial_len() > 0
    }

    /// Queues a reply. Nothing is written until [`flush`](Self::flush) or the next read that
    /// has to wait for the peer, so pipelined commands get their replies in one write.
    pub fn reply(&mut self, reply: &Reply) {
        tracing::debug!(%reply, "reply");
        reply.write_to(&mut self.wbuf);
    }

    /// Writes the queued replies. Fails with `ErrorKind::TimedOut` when the peer does not take
    /// them within [`Limits::command_timeout`] (or the session deadline).
    pub async fn flush(&mut self) -> io::Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let deadline = self
            .session_deadline()
            .min(after(self.limits.command_timeout));
        let write = async {
            self.stream.write_all(&self.wbuf).await?;
            self.stream.flush().await
        };
        match timeout_at(deadline, write).await {
            Ok(result) => {
                self.wbuf.clear();
                result
            }
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "peer does not read replies",
            )),
        }
    }

    /// Writes the queued replies and closes the stream (TLS close_notify, TCP FIN).
    pub async fn close(mut self) -> io::Result<()> {
        self.flush().await?;
        let deadline = self
            .session_deadline()
            .min(after(self.limits.command_timeout));
        match timeout_at(deadline, self.stream.shutdown()).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "shutdown timed out",
            )),
        }
    }

    /// Reads the next command. Before waiting on the socket it writes the queued replies, but
    /// while more pipelined input is already buffered it does not, so the replies to a
    /// pipelined batch go out in one write (RFC 2920 §3.2).
    pub async fn read_command(&mut self) -> Result<Command, ReadError> {
        self.read_line_inner().await?;
        let command = parse_command(self.lines.line())?;
        if let Command::Request(request) = &command {
            tracing::debug!(verb = request.name(), "command");
        }
        Ok(command)
    }

    /// Reads one raw line, such as a SASL response (RFC 4954 §4), with the same limits as a
    /// command. Returns it without its line ending; it must be UTF-8 without control
    /// characters.
    pub async fn read_line(&mut self) -> Result<String, ReadError> {
        self.read_line_inner().await?;
        Ok(checked_text(self.lines.line())?.to_owned())
    }

    /// Reads a message after the caller has queued `354`: streams it into `sink`
    /// dot-unstuffed, with every line ending as CRLF (see [`DataDecoder`]), up to the
    /// `CRLF.CRLF` end, which is not written. Over [`Limits::max_message_size`] it stops
    /// writing but reads on to the real end and returns [`DataEnd::TooBig`]. The whole message
    /// must arrive within [`Limits::data_timeout`]. The sink is flushed, not shut down.
    pub async fn read_data<W>(&mut self, sink: &mut W) -> Result<DataEnd, ReadError>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        let deadline = after(self.limits.data_timeout);
        let mut decoder = DataDecoder::new();
        let mut account = Account::new(0, self.limits.max_message_size);
        loop {
            if self.start < self.end {
                self.out.clear();
                let input = self.rbuf.get(self.start..self.end).unwrap_or_default();
                let status = decoder.decode(input, &mut self.out);
                self.start = match status {
                    DataStatus::NeedMore => self.end,
                    DataStatus::End { consumed } => self.start + consumed,
                };
                account.write(&self.out, sink).await;
                if matches!(status, DataStatus::End { .. }) {
                    return Ok(account.finish(sink).await);
                }
            }
            self.check_session()?;
            self.fill(deadline).await?;
        }
    }

    /// Reads one BDAT chunk (RFC 3030) of exactly `size` bytes into `sink`, unchanged.
    /// `already` is what earlier chunks of the same message added up to; over
    /// [`Limits::max_message_size`] nothing of this chunk is written, it is read and discarded,
    /// and the result is [`DataEnd::TooBig`]. The whole chunk must arrive within
    /// [`Limits::data_timeout`]. The sink is flushed, not shut down.
    pub async fn read_bdat<W>(
        &mut self,
        size: u64,
        sink: &mut W,
        already: u64,
    ) -> Result<DataEnd, ReadError>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        let mut account = Account::new(already, self.limits.max_message_size);
        if already.saturating_add(size) > self.limits.max_message_size {
            // Known to be too big already: count it all now and write nothing.
            account.size = already.saturating_add(size);
        }
        let deadline = after(self.limits.data_timeout);
        let mut left = size;
        while left > 0 {
            if self.start < self.end {
                let available = self.end - self.start;
                let take = usize::try_from(left).map_or(available, |left| left.min(available));
                let chunk = self
                    .rbuf
                    .get(self.start..self.start + take)
                    .unwrap_or_default();
                if account.size <= account.max {
                    account.write(chunk, sink).await;
                }
                self.start += take;
                left -= take as u64;
                continue;
            }
            self.check_session()?;
            self.fill(deadline).await?;
        }
        Ok(account.finish(sink).await)
    }

    /// STARTTLS (RFC 3207). The caller has queued `220 2.0.0 Ready to start TLS`; this writes
    /// it, discards every byte the client sent before the handshake (it was sent in plaintext
    /// and must not be read as if it came over TLS), runs the handshake within
    /// [`Limits::command_timeout`] and returns the encrypted connection. The caller resets its
    /// session state (RFC 3207 §4.2) and does not offer STARTTLS again.
    pub async fn starttls(mut self, acceptor: &TlsAcceptor) -> Result<Self, ReadError> {
        self.flush().await.map_err(ReadError::Io)?;
        let discarded = self.end - self.start + self.lines.partial_len();
        if discarded > 0 {
            tracing::warn!(discarded, "discarded plaintext pipelined after STARTTLS");
        }
        self.start = 0;
        self.end = 0;
        self.lines.reset();
        let session_deadline = self.session_deadline();
        let command_deadline = after(self.limits.command_timeout);
        let Self {
            stream,
            peer,
            tls: _,
            limits,
            started,
            rbuf,
            start,
            end,
            lines,
            wbuf,
            out,
        } = self;
        let stream = match timeout_at(
            session_deadline.min(command_deadline),
            acceptor.accept(stream),
        )
        .await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(ReadError::Tls(e)),
            Err(_) if session_deadline <= command_deadline => {
                return Err(ReadError::SessionExpired);
            }
            Err(_) => return Err(ReadError::Timeout),
        };
        let info = TlsInfo::from_server(stream.get_ref().1);
        tracing::debug!(version = %info.version, cipher = %info.cipher, "tls established");
        Ok(Self {
            stream: Box::new(stream),
            peer,
            tls: Some(info),
            limits,
            started,
            rbuf,
            start,
            end,
            lines,
            wbuf,
            out,
        })
    }

    /// Reads until the line decoder has a whole line, within the command deadline.
    async fn read_line_inner(&mut self) -> Result<(), ReadError> {
        self.check_session()?;
        let deadline = after(self.limits.command_timeout);
        self.lines.set_max_len(self.limits.max_line_len);
        loop {
            if self.start < self.end {
                if self.wbuf.len() >= WRITE_HIGH_WATER {
                    self.flush().await.map_err(ReadError::Io)?;
                }
                let input = self.rbuf.get(self.start..self.end).unwrap_or_default();
                let (consumed, status) = self.lines.decode(input);
                self.start += consumed;
                match status {
                    LineStatus::Line => return Ok(()),
                    LineStatus::TooLong => return Err(ReadError::LineTooLong),
                    LineStatus::NeedMore => {}
                }
            }
            self.fill(deadline).await?;
        }
    }

    /// Writes the queued replies, then waits for more input until `deadline` (or the session
    /// deadline). Called only once the buffered input is consumed.
    async fn fill(&mut self, deadline: Instant) -> Result<(), ReadError> {
        self.flush().await.map_err(ReadError::Io)?;
        self.start = 0;
        self.end = 0;
        let session_deadline = self.session_deadline();
        match timeout_at(
            deadline.min(session_deadline),
            self.stream.read(&mut self.rbuf[..]),
        )
        .await
        {
            Ok(Ok(0)) => Err(ReadError::Closed),
            Ok(Ok(n)) => {
                self.end = n.min(self.rbuf.len());
                Ok(())
            }
            Ok(Err(e)) => Err(ReadError::Io(e)),
            Err(_) if session_deadline <= deadline => Err(ReadError::SessionExpired),
            Err(_) => Err(ReadError::Timeout),
        }
    }

    fn check_session(&self) -> Result<(), ReadError> {
        if Instant::now() >= self.session_deadline() {
            return Err(ReadError::SessionExpired);
        }
        Ok(())
    }

    fn session_deadline(&self) -> Instant {
        add(self.started, self.limits.session_timeout)
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.peer)
            .field("tls", &self.tls)
            .field("buffered", &(self.end - self.start))
            .field("queued", &self.wbuf.len())
            .finish_non_exhaustive()
    }
}

/// Size accounting and sink writes for one DATA or BDAT transfer.
struct Account {
    size: u64,
    max: u64,
    error: Option<io::Error>,
}

impl Account {
    fn new(already: u64, max: u64) -> Self {
        Self {
            size: already,
            max,
            error: None,
        }
    }

    /// Counts `bytes` and writes them unless the message is already too big or the sink failed.
    async fn write<W: AsyncWrite + Unpin + ?Sized>(&mut self, bytes: &[u8], sink: &mut W) {
        self.size = self.size.saturating_add(bytes.len() as u64);
        if self.size > self.max || self.error.is_some() || bytes.is_empty() {
            return;
        }
        if let Err(e) = sink.write_all(bytes).await {
            self.error = Some(e);
        }
    }

    async fn finish<W: AsyncWrite + Unpin + ?Sized>(mut self, sink: &mut W) -> DataEnd {
        if self.size > self.max {
            return DataEnd::TooBig { size: self.size };
        }
        if self.error.is_none()
            && let Err(e) = sink.flush().await
        {
            self.error = Some(e);
        }
        match self.error {
            Some(error) => DataEnd::SinkFailed {
                size: self.size,
                error,
            },
            None => DataEnd::Complete { size: self.size },
        }
    }
}

/// Decodes one command line (with its line ending).
fn parse_command(line: &[u8]) -> Result<Command, SyntaxError> {
    let text = checked_text(line)?;
    let verb = text.split(' ').next().unwrap_or_default();
    if verb.is_empty() {
        return Err(SyntaxError::Malformed);
    }
    match Request::parse(&mut line.iter()) {
        Ok(request) => check_numbers(request.into_owned(), text).map(Command::Request),
        Err(smtp_proto::Error::UnknownCommand) => Ok(Command::Unknown {
            verb: verb.to_ascii_uppercase(),
            line: text.to_owned(),
        }),
        Err(e) => Err(syntax_error(e)),
    }
}

/// smtp-proto 0.2.5 wraps a number past `usize::MAX` around (`BDAT 99999999999999999999999`
/// reads as `BDAT 999`), which would make the rest of a chunk run as commands. We check the
/// digits ourselves: a BDAT size must be exact, and a MAIL `SIZE=` too large to count is over
/// any limit.
fn check_numbers(request: Request<String>, text: &str) -> Result<Request<String>, SyntaxError> {
    match request {
        Request::Bdat { chunk_size, .. } => {
            let arg = text.split_ascii_whitespace().nth(1).unwrap_or_default();
            if exact_number(arg) != u64::try_from(chunk_size).ok() {
                return Err(SyntaxError::Usage("BDAT chunk-size [LAST]"));
            }
            Ok(request)
        }
        Request::Mail { mut from } => {
            let overflows = text.split_ascii_whitespace().any(|param| {
                param
                    .get(..5)
                    .is_some_and(|key| key.eq_ignore_ascii_case("SIZE="))
                    && exact_number(param.get(5..).unwrap_or_default()).is_none()
            });
            if overflows {
                from.size = usize::MAX;
            }
            Ok(Request::Mail { from })
        }
        request => Ok(request),
    }
}

/// A decimal number of digits only, if it fits in a `u64`.
fn exact_number(digits: &str) -> Option<u64> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The line without its line ending, if it is UTF-8 without control characters. A bare CR
/// inside a command would be skipped by the parser (`NO\rOP` reads as NOOP), so it is refused
/// like NUL.
fn checked_text(line: &[u8]) -> Result<&str, SyntaxError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let text = std::str::from_utf8(line).map_err(|_| SyntaxError::InvalidUtf8)?;
    if text.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(SyntaxError::ControlChar);
    }
    Ok(text)
}

fn syntax_error(e: smtp_proto::Error) -> SyntaxError {
    use smtp_proto::Error as E;
    match e {
        E::InvalidSenderAddress => SyntaxError::BadSender,
        E::InvalidRecipientAddress => SyntaxError::BadRecipient,
        E::SyntaxError { syntax } => SyntaxError::Usage(syntax),
        E::InvalidParameter { param } => SyntaxError::InvalidParameter(param),
        E::UnsupportedParameter { param } => {
            SyntaxError::UnsupportedParameter(param.chars().take(MAX_ECHO_LEN).collect())
        }
        E::NeedsMoreData { .. }
        | E::UnknownCommand
        | E::ResponseTooLong
        | E::InvalidResponse { .. } => SyntaxError::Malformed,
    }
}

/// RFC 5321 §4.2.2 (basic codes) and RFC 3463 (enhanced codes), as Postfix answers them.
fn syntax_reply(e: &SyntaxError) -> Reply {
    match e {
        SyntaxError::InvalidUtf8 => Reply::perm(500, "5.5.2", "bad UTF-8 syntax"),
        SyntaxError::ControlChar => Reply::perm(500, "5.5.2", "control character in command"),
        SyntaxError::Malformed => Reply::perm(500, "5.5.2", "syntax error"),
        SyntaxError::BadSender => Reply::perm(501, "5.1.7", "bad sender address syntax"),
        SyntaxError::BadRecipient => Reply::perm(501, "5.1.3", "bad recipient address syntax"),
        SyntaxError::Usage(usage) => Reply::perm(501, "5.5.4", format!("syntax: {usage}")),
        SyntaxError::InvalidParameter(p) => {
            Reply::perm(501, "5.5.4", format!("invalid parameter {p}"))
        }
        // RFC 5321 §4.1.1.11: 555 for MAIL/RCPT parameters not recognised.
        SyntaxError::UnsupportedParameter(p) => {
            Reply::perm(555, "5.5.4", format!("unsupported parameter {p}"))
        }
    }
}

/// `Instant::now() + d`, saturating far in the future instead of overflowing.
fn after(d: Duration) -> Instant {
    add(Instant::now(), d)
}

fn add(at: Instant, d: Duration) -> Instant {
    // About 30 years, as tokio uses for "never".
    const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);
    at.checked_add(d.min(FAR)).unwrap_or(at)
}

#[cfg(test)]
mod tests;
