//! The proxy's side towards filers: connect, read the greeting, log in with the trusted login
//! (`AUTHENTICATE PLAIN` / `AUTH PLAIN` of `user\0principal\0secret`), pass the client's
//! address (IMAP `ID`), and hand back the connection ready for the user's session.
//!
//! Nothing of the client's input is pasted into these commands: the user is the address in key
//! form the credentials check returned, inside base64; the client's address is formatted by us.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Longest line accepted from a filer during the login exchange.
const MAX_LINE: usize = 64 * 1024;

/// Which protocol to speak to the filer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    Imap,
    Pop3,
}

/// What the trusted login needs.
#[derive(Debug, Clone)]
pub(crate) struct Login<'a> {
    /// The filer's IMAP or POP3 address.
    pub(crate) addr: SocketAddr,
    /// The mailbox (key form).
    pub(crate) user: &'a str,
    /// The proxy's principal and secret.
    pub(crate) principal: &'a str,
    pub(crate) secret: &'a str,
    /// The client, for `ID`.
    pub(crate) client: SocketAddr,
    pub(crate) connect_timeout: Duration,
    pub(crate) login_timeout: Duration,
}

/// A filer connection logged in for the user.
#[derive(Debug)]
pub(crate) struct Backend {
    pub(crate) stream: TcpStream,
    /// Bytes the filer sent after its login reply (to be forwarded to the client first).
    pub(crate) leftover: Vec<u8>,
    /// The filer's capabilities from its `OK [CAPABILITY ...]` (IMAP).
    pub(crate) capabilities: Option<String>,
}

/// Why no logged-in connection could be made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BackendError {
    /// The connection failed or was cut.
    #[error("cannot reach the filer: {0}")]
    Unreachable(#[source] std::io::Error),
    /// Connect or login took too long.
    #[error("the filer did not answer in time")]
    Timeout,
    /// The filer said something unexpected (or `BYE`, or closed).
    #[error("unexpected answer from the filer: {0}")]
    Protocol(String),
    /// The filer refused the trusted login for this user (mailbox moved, not there, ...).
    #[error("the filer refused the login: {0}")]
    Refused(String),
}

impl BackendError {
    /// Whether this says something about the filer as a whole (counts for its breaker), rather
    /// than about one user.
    pub(crate) fn is_filer_failure(&self) -> bool {
        !matches!(self, Self::Refused(_))
    }
}

/// Connects and logs in.
pub(crate) async fn connect(
    protocol: Protocol,
    login: &Login<'_>,
) -> Result<Backend, BackendError> {
    let stream = tokio::time::timeout(login.connect_timeout, TcpStream::connect(login.addr))
        .await
        .map_err(|_| BackendError::Timeout)?
        .map_err(BackendError::Unreachable)?;
    let _ = stream.set_nodelay(true);
    let exchange = async move {
        match protocol {
            Protocol::Imap => imap_login(stream, login).await,
            Protocol::Pop3 => pop3_login(stream, login).await,
        }
    };
    tokio::time::timeout(login.login_timeout, exchange)
        .await
        .map_err(|_| BackendError::Timeout)?
}

fn plain_token(login: &Login<'_>) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!(
        "{}\0{}\0{}",
        login.user, login.principal, login.secret
    ))
}

async fn imap_login(mut stream: TcpStream, login: &Login<'_>) -> Result<Backend, BackendError> {
    let mut r = Lines::default();
    let greeting = r.line(&mut stream).await?;
    if !greeting.starts_with(b"* OK") {
        return Err(BackendError::Protocol(printable(&greeting)));
    }
    // ID first (RFC 2971), so the filer logs the client's address with the login.
    let commands = format!(
        "P1 ID (\"x-originating-ip\" \"{}\" \"x-originating-port\" \"{}\")\r\nP2 AUTHENTICATE PLAIN {}\r\n",
        login.client.ip(),
        login.client.port(),
        plain_token(login)
    );
    stream
        .write_all(commands.as_bytes())
        .await
        .map_err(BackendError::Unreachable)?;
    loop {
        let line = r.line(&mut stream).await?;
        if line.starts_with(b"* BYE") {
            return Err(BackendError::Protocol(printable(&line)));
        }
        if line.starts_with(b"P1 ") || line.starts_with(b"* ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix(b"P2 OK") {
            let text = String::from_utf8_lossy(rest);
            let capabilities = text
                .split_once("[CAPABILITY ")
                .and_then(|(_, c)| c.split_once(']'))
                .map(|(c, _)| c.trim().to_owned());
            return Ok(Backend {
                stream,
                leftover: r.into_rest(),
                capabilities,
            });
        }
        if line.starts_with(b"P2 NO") {
            return Err(BackendError::Refused(printable(&line)));
        }
        return Err(BackendError::Protocol(printable(&line)));
    }
}

async fn pop3_login(mut stream: TcpStream, login: &Login<'_>) -> Result<Backend, BackendError> {
    let mut r = Lines::default();
    let greeting = r.line(&mut stream).await?;
    if !greeting.starts_with(b"+OK") {
        return Err(BackendError::Protocol(printable(&greeting)));
    }
    stream
        .write_all(format!("AUTH PLAIN {}\r\n", plain_token(login)).as_bytes())
        .await
        .map_err(BackendError::Unreachable)?;
    let line = r.line(&mut stream).await?;
    if line.starts_with(b"+OK") {
        Ok(Backend {
            stream,
            leftover: r.into_rest(),
            capabilities: None,
        })
    } else if line.starts_with(b"-ERR") {
        Err(BackendError::Refused(printable(&line)))
    } else {
        Err(BackendError::Protocol(printable(&line)))
    }
}

/// A bounded line reader that keeps what follows the last line.
#[derive(Default)]
struct Lines {
    buf: Vec<u8>,
}

impl Lines {
    async fn line(&mut self, stream: &mut TcpStream) -> Result<Vec<u8>, BackendError> {
        loop {
            if let Some(lf) = self.buf.iter().position(|&b| b == b'\n') {
                let rest = self.buf.split_off(lf + 1);
                return Ok(std::mem::replace(&mut self.buf, rest));
            }
            if self.buf.len() > MAX_LINE {
                return Err(BackendError::Protocol("line too long".into()));
            }
            let mut chunk = [0u8; 4096];
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(BackendError::Unreachable)?;
            if n == 0 {
                return Err(BackendError::Protocol("connection closed".into()));
            }
            self.buf
                .extend_from_slice(chunk.get(..n).unwrap_or_default());
        }
    }

    fn into_rest(self) -> Vec<u8> {
        self.buf
    }
}

/// A filer's line for logs: printable ASCII, at most 200 characters.
fn printable(line: &[u8]) -> String {
    line.iter()
        .take(200)
        .map(|&b| {
            if (0x20..0x7f).contains(&b) {
                char::from(b)
            } else {
                ' '
            }
        })
        .collect::<String>()
        .trim_end()
        .to_owned()
}
