//! Scripted conversation tests: a transcript that reads like an RFC example, played as the
//! client against a server stream.
//!
//! ```text
//! # a comment; blank lines are ignored
//! S: 220
//! C: EHLO client.example
//! S: 250-server.example
//! S: 250 PIPELINING
//! C: MAIL FROM:<a@remote.example>
//! S: 250 2.1.0
//! R: DATA\r\n.\r\n
//! S: 554 5.5.1
//! C: QUIT
//! S: 221 2.0.0 bye
//! S: <closed>
//! ```
//!
//! - `C: text` sends `text` and CRLF (`C:` alone sends an empty line).
//! - `R: bytes` sends raw bytes with the escapes `\r`, `\n`, `\t`, `\0`, `\\` and `\xNN`, and
//!   appends nothing.
//! - Consecutive `C:` and `R:` lines are sent in one write, so they arrive pipelined.
//! - `S: 250 2.1.0 text` reads one reply, up to its final line, and matches by prefix: the code,
//!   then the enhanced code if given, then the start of the text if given (ASCII
//!   case-insensitive). The enhanced code and text are matched against the first line read.
//! - `S: 250-text` reads exactly one line, which must be a continuation line (`250-`), and
//!   matches it the same way; spell out a multi-line reply as its lines.
//! - `S: <closed>` expects the server to close the connection without sending anything more.
//!
//! Every read has a deadline ([`Options::reply_timeout`]), so a broken test fails with the line
//! that was waiting instead of hanging. After the last line, bytes already received and not
//! matched are an error too: the last expected reply proves nothing else was sent.

use std::fmt::Write as _;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;

use crate::smtp::EnhancedCode;

/// A reply line longer than this fails the test instead of growing the buffer.
const MAX_REPLY_LINE: usize = 64 * 1024;

/// Why a transcript failed. Every variant names the transcript line (1-based).
#[derive(Debug, thiserror::Error)]
pub enum TranscriptError {
    /// The transcript itself is malformed.
    #[error("line {line}: bad transcript: {message}")]
    Script {
        /// The transcript line.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// The server sent something else.
    #[error("line {line}: expected `{expected}`, received `{received}`")]
    Mismatch {
        /// The transcript line.
        line: usize,
        /// The `S:` text.
        expected: String,
        /// What arrived, escaped.
        received: String,
    },
    /// Nothing (or not a whole line) arrived in time.
    #[error(
        "line {line}: expected `{expected}`, nothing more within {timeout:?} (received `{received}`)"
    )]
    Timeout {
        /// The transcript line.
        line: usize,
        /// The `S:` text.
        expected: String,
        /// The deadline of each read.
        timeout: Duration,
        /// Bytes received for this step, escaped.
        received: String,
    },
    /// The server closed the connection early.
    #[error(
        "line {line}: expected `{expected}`, the server closed the connection (received `{received}`)"
    )]
    Closed {
        /// The transcript line.
        line: usize,
        /// The `S:` text.
        expected: String,
        /// Bytes received for this step, escaped.
        received: String,
    },
    /// The server sent more than the transcript expected.
    #[error("after the last line: unexpected `{received}`")]
    Extra {
        /// The bytes, escaped.
        received: String,
    },
    /// Reading or writing the stream failed.
    #[error("line {line}: i/o error")]
    Io {
        /// The transcript line.
        line: usize,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// How to run a transcript.
#[derive(Debug, Clone)]
pub struct Options {
    /// Deadline for each read of the server's replies (default 10 s). Under
    /// `tokio::time::pause()` this is virtual time: raise it above the server's timeouts when
    /// the transcript waits for one.
    pub reply_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            reply_timeout: Duration::from_secs(10),
        }
    }
}

/// Plays `script` against `stream` with the default [`Options`]. Pass `&mut stream` to go on
/// using the stream afterwards (say, for a TLS handshake).
pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    script: &str,
    stream: S,
) -> Result<(), TranscriptError> {
    run_with(script, stream, &Options::default()).await
}

/// Plays `script` against `stream`.
pub async fn run_with<S: AsyncRead + AsyncWrite + Unpin>(
    script: &str,
    mut stream: S,
    options: &Options,
) -> Result<(), TranscriptError> {
    let steps = parse(script)?;
    let mut reader = Reader {
        buf: Vec::new(),
        timeout: options.reply_timeout,
    };
    let mut pending: Vec<u8> = Vec::new();
    let mut pending_line = 0;
    for step in steps {
        match step.kind {
            Kind::Send(bytes) => {
                if pending.is_empty() {
                    pending_line = step.line;
                }
                pending.extend_from_slice(&bytes);
                continue;
            }
            Kind::Expect(_) | Kind::Closed => {}
        }
        send(&mut stream, &mut pending, pending_line).await?;
        match step.kind {
            Kind::Expect(expect) => reader.expect(&mut stream, step.line, &expect).await?,
            Kind::Closed => reader.expect_closed(&mut stream, step.line).await?,
            Kind::Send(_) => {}
        }
    }
    send(&mut stream, &mut pending, pending_line).await?;
    if !reader.buf.is_empty() {
        return Err(TranscriptError::Extra {
            received: escape(&reader.buf),
        });
    }
    Ok(())
}

/// Escapes bytes for an error message: printable ASCII as is, `\r`, `\n` and `\xNN` otherwise.
pub fn escape(bytes: &[u8]) -> String {
    let mut s = String::new();
    for &b in bytes {
        match b {
            b'\r' => s.push_str("\\r"),
            b'\n' => s.push_str("\\n"),
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(char::from(b)),
            _ => {
                let _ = write!(s, "\\x{b:02x}");
            }
        }
    }
    s
}

/// Decodes the escapes of an `R:` line.
pub fn unescape(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut utf8 = [0; 4];
            out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
            continue;
        }
        match chars.next() {
            Some('r') => out.push(b'\r'),
            Some('n') => out.push(b'\n'),
            Some('t') => out.push(b'\t'),
            Some('0') => out.push(0),
            Some('\\') => out.push(b'\\'),
            Some('x') => {
                let hex: String = chars.by_ref().take(2).collect();
                let byte = u8::from_str_radix(&hex, 16)
                    .ok()
                    .filter(|_| hex.len() == 2)
                    .ok_or_else(|| format!("bad escape \\x{hex}"))?;
                out.push(byte);
            }
            Some(other) => return Err(format!("unknown escape \\{other}")),
            None => return Err("a lone \\ at the end".into()),
        }
    }
    Ok(out)
}

struct Step {
    line: usize,
    kind: Kind,
}

enum Kind {
    Send(Vec<u8>),
    Expect(Expect),
    Closed,
}

/// One expected reply (or, with `is_continuation`, one line of it).
struct Expect {
    text: String,
    code: u16,
    is_continuation: bool,
    enhanced: Option<EnhancedCode>,
    prefix: String,
}

fn parse(script: &str) -> Result<Vec<Step>, TranscriptError> {
    let mut steps = Vec::new();
    for (i, raw) in script.lines().enumerate() {
        let line = i + 1;
        let text = raw.strip_suffix('\r').unwrap_or(raw);
        let bad = |message: String| TranscriptError::Script { line, message };
        if text.trim().is_empty() || text.starts_with('#') {
            continue;
        }
        let kind = if text == "C:" {
            Kind::Send(b"\r\n".to_vec())
        } else if let Some(rest) = text.strip_prefix("C: ") {
            Kind::Send([rest.as_bytes(), b"\r\n"].concat())
        } else if let Some(rest) = text.strip_prefix("R: ") {
            Kind::Send(unescape(rest).map_err(bad)?)
        } else if let Some(rest) = text.strip_prefix("S: ") {
            if rest.trim() == "<closed>" {
                Kind::Closed
            } else {
                Kind::Expect(parse_expect(rest).ok_or_else(|| bad(format!("bad reply `{rest}`")))?)
            }
        } else {
            return Err(bad(format!(
                "expected `C: `, `R: ` or `S: `, found `{text}`"
            )));
        };
        steps.push(Step { line, kind });
    }
    Ok(steps)
}

fn parse_expect(text: &str) -> Option<Expect> {
    let code: u16 = text
        .get(..3)?
        .parse()
        .ok()
        .filter(|c| (200..600).contains(c))?;
    let (is_continuation, rest) = match text.get(3..)? {
        "" => (false, ""),
        rest => match rest.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, rest.strip_prefix(' ')?),
        },
    };
    let (enhanced, prefix) = split_enhanced(rest);
    Some(Expect {
        text: text.to_owned(),
        code,
        is_continuation,
        enhanced,
        prefix: prefix.to_owned(),
    })
}

/// Splits `2.1.0 text` into the enhanced code and the text.
fn split_enhanced(text: &str) -> (Option<EnhancedCode>, &str) {
    let (first, rest) = text.split_once(' ').unwrap_or((text, ""));
    match EnhancedCode::parse(first) {
        Some(code) => (Some(code), rest),
        None => (None, text),
    }
}

async fn send<S: AsyncWrite + Unpin>(
    stream: &mut S,
    pending: &mut Vec<u8>,
    line: usize,
) -> Result<(), TranscriptError> {
    if pending.is_empty() {
        return Ok(());
    }
    let io = |source| TranscriptError::Io { line, source };
    stream.write_all(pending).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    pending.clear();
    Ok(())
}

/// Reply bytes received and not matched yet.
struct Reader {
    buf: Vec<u8>,
    timeout: Duration,
}

/// Outcome of waiting for one more line.
enum Next {
    Line(Vec<u8>),
    Closed,
    Timeout,
}

impl Reader {
    async fn expect<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
        line: usize,
        expect: &Expect,
    ) -> Result<(), TranscriptError> {
        let mut received = Vec::new();
        let mut first: Option<(u16, bool, String)> = None;
        loop {
            let reply_line = match self.next_line(stream, line).await? {
                Next::Line(l) => l,
                Next::Closed => {
                    received.extend_from_slice(&self.buf);
                    return Err(TranscriptError::Closed {
                        line,
                        expected: expect.text.clone(),
                        received: escape(&received),
                    });
                }
                Next::Timeout => {
                    received.extend_from_slice(&self.buf);
                    return Err(TranscriptError::Timeout {
                        line,
                        expected: expect.text.clone(),
                        timeout: self.timeout,
                        received: escape(&received),
                    });
                }
            };
            received.extend_from_slice(&reply_line);
            let mismatch = || TranscriptError::Mismatch {
                line,
                expected: expect.text.clone(),
                received: escape(&received),
            };
            let (code, is_continuation, text) =
                split_reply_line(&reply_line).ok_or_else(mismatch)?;
            if code != expect.code {
                return Err(mismatch());
            }
            if first.is_none() {
                first = Some((code, is_continuation, text));
            }
            if expect.is_continuation || !is_continuation {
                break;
            }
        }
        let (_, is_continuation, text) = first.unwrap_or_default();
        let mismatch = || TranscriptError::Mismatch {
            line,
            expected: expect.text.clone(),
            received: escape(&received),
        };
        if expect.is_continuation && !is_continuation {
            return Err(mismatch());
        }
        let (enhanced, rest) = split_enhanced(&text);
        if expect.enhanced.is_some() && expect.enhanced != enhanced {
            return Err(mismatch());
        }
        let matches_prefix = rest
            .get(..expect.prefix.len())
            .is_some_and(|start| start.eq_ignore_ascii_case(&expect.prefix));
        if !matches_prefix {
            return Err(mismatch());
        }
        Ok(())
    }

    async fn expect_closed<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
        line: usize,
    ) -> Result<(), TranscriptError> {
        let expected = "<closed>".to_owned();
        if !self.buf.is_empty() {
            return Err(TranscriptError::Mismatch {
                line,
                expected,
                received: escape(&self.buf),
            });
        }
        let mut chunk = [0; 4096];
        match timeout(self.timeout, stream.read(&mut chunk)).await {
            Ok(Ok(0)) => Ok(()),
            Ok(Ok(n)) => Err(TranscriptError::Mismatch {
                line,
                expected,
                received: escape(chunk.get(..n).unwrap_or_default()),
            }),
            // A reset after the server closed is a close too.
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
            Ok(Err(source)) => Err(TranscriptError::Io { line, source }),
            Err(_) => Err(TranscriptError::Timeout {
                line,
                expected,
                timeout: self.timeout,
                received: String::new(),
            }),
        }
    }

    /// The next line with its CRLF, reading as needed.
    async fn next_line<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
        line: usize,
    ) -> Result<Next, TranscriptError> {
        loop {
            if let Some(lf) = self.buf.iter().position(|&b| b == b'\n') {
                let rest = self.buf.split_off(lf + 1);
                return Ok(Next::Line(std::mem::replace(&mut self.buf, rest)));
            }
            if self.buf.len() > MAX_REPLY_LINE {
                return Ok(Next::Line(std::mem::take(&mut self.buf)));
            }
            let mut chunk = [0; 4096];
            match timeout(self.timeout, stream.read(&mut chunk)).await {
                Ok(Ok(0)) => return Ok(Next::Closed),
                Ok(Ok(n)) => self
                    .buf
                    .extend_from_slice(chunk.get(..n).unwrap_or_default()),
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Ok(Next::Closed);
                }
                Ok(Err(source)) => return Err(TranscriptError::Io { line, source }),
                Err(_) => return Ok(Next::Timeout),
            }
        }
    }
}

/// Splits `250-text\r\n` into its code, whether it is a continuation line, and its text.
/// `None` unless the line is a well-formed reply line ending in CRLF.
fn split_reply_line(line: &[u8]) -> Option<(u16, bool, String)> {
    let line = std::str::from_utf8(line.strip_suffix(b"\r\n")?).ok()?;
    let code: u16 = line.get(..3)?.parse().ok()?;
    let is_continuation = match line.get(3..4) {
        None => return Some((code, false, String::new())),
        Some("-") => true,
        Some(" ") => false,
        Some(_) => return None,
    };
    Some((
        code,
        is_continuation,
        line.get(4..).unwrap_or_default().to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays `script` against a fake server that sends `server` and then closes, and returns
    /// what the client sent (or the runner's error).
    async fn play(script: &str, server: &[u8]) -> Result<Vec<u8>, TranscriptError> {
        let (client, mut peer) = tokio::io::duplex(64 * 1024);
        peer.write_all(server).await.unwrap();
        let fake = tokio::spawn(async move {
            peer.shutdown().await.unwrap();
            let mut sent = Vec::new();
            peer.read_to_end(&mut sent).await.unwrap();
            sent
        });
        let result = run(script, client).await;
        let sent = fake.await.unwrap();
        result.map(|()| sent)
    }

    #[tokio::test]
    async fn matches_code_enhanced_code_text_and_multiline() {
        let script = "# comment\n\nS: 220\nC: EHLO a\nR: X\\r\\n\\x00\nS: 250-srv\nS: 250 SIZE\n\
            S: 250 2.1.0 sender OK\nS: 550 5.1.1\nS: 250\nS: <closed>\n";
        let server = b"220 srv ESMTP\r\n250-srv\r\n250 size 10\r\n250 2.1.0 Sender ok\r\n\
            550 5.1.1 no\r\n250-a\r\n250-b\r\n250 c\r\n";
        assert_eq!(play(script, server).await.unwrap(), b"EHLO a\r\nX\r\n\0");
    }

    #[tokio::test]
    async fn reports_the_failing_line_and_what_arrived() {
        let cases: &[(&str, &[u8], &str)] = &[
            (
                "S: 220\nS: 250 2.1.0",
                b"220 x\r\n250 2.1.5 ok\r\n",
                "line 2: expected `250 2.1.0`, received `250 2.1.5 ok\\r\\n`",
            ),
            ("S: 220 welcome", b"220 x\r\n", "line 1:"),
            ("S: 250-x", b"250 x\r\n", "line 1:"),
            ("S: 221", b"", "line 1: expected `221`, the server closed"),
            (
                "S: 221",
                b"221 bye\r\n250 more\r\n",
                "after the last line: unexpected `250 more\\r\\n`",
            ),
            ("S: 221\nS: <closed>", b"221 bye\r\n250 more\r\n", "line 2:"),
            ("S: 221", b"221 bye\n", "line 1:"),
            ("X: 1", b"", "line 1: bad transcript"),
            ("R: \\q", b"", "line 1: bad transcript"),
        ];
        for &(script, server, want) in cases {
            let e = play(script, server).await.unwrap_err().to_string();
            assert!(e.starts_with(want), "{script:?}: {e}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_server_fails_the_test_instead_of_hanging() {
        let (client, _server) = tokio::io::duplex(1024);
        let e = run("S: 220", client).await.unwrap_err();
        assert!(matches!(e, TranscriptError::Timeout { line: 1, .. }), "{e}");
    }

    #[test]
    fn escapes_round_trip() {
        let bytes = b"a\r\n\\\x00\xff";
        assert_eq!(unescape(&escape(bytes)).unwrap(), bytes);
    }
}
