//! Conversation tests of `common::smtp::server::Connection`, through a small SMTP server that
//! lives only here: it records the messages it accepts and advertises PIPELINING, SIZE,
//! 8BITMIME, STARTTLS, ENHANCEDSTATUSCODES and CHUNKING.
//!
//! The transcripts in `tests/transcripts/*.txt` run against it. Besides the runner's syntax,
//! a transcript may say, in comments the runner ignores:
//! - `# messages: N` (required): how many messages the server must have accepted;
//! - `# max-message-size: N` and `# max-line-len: N`: limits for that session.
#![cfg(feature = "test-util")]

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use smtp_proto::Request;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use common::smtp::Reply;
use common::smtp::server::{Command, Connection, DataEnd, Limits};
use common::testkit::transcript::{self, Options, escape};

const HOST: &str = "test.example";

/// A message the test server accepted.
#[derive(Debug)]
struct Message {
    from: String,
    rcpts: Vec<String>,
    body: Vec<u8>,
}

/// The test server's session state; each variant holds only what is valid in it.
enum State {
    Connected,
    Greeted,
    Mail {
        from: String,
    },
    Rcpt {
        from: String,
        rcpts: Vec<String>,
    },
    /// Between BDAT chunks: the message so far and its size as sent.
    Chunking {
        from: String,
        rcpts: Vec<String>,
        body: Vec<u8>,
        size: u64,
    },
}

/// Runs one session to its end and returns the messages it accepted.
async fn session(mut conn: Connection, acceptor: Option<TlsAcceptor>) -> Vec<Message> {
    let mut messages = Vec::new();
    let mut state = State::Connected;
    conn.reply(&Reply::ok(220, "", format!("{HOST} ESMTP test")));
    loop {
        let request = match conn.read_command().await {
            Ok(Command::Request(request)) => request,
            Ok(Command::Unknown { .. }) => {
                conn.reply(&Reply::perm(500, "5.5.1", "command unrecognized"));
                continue;
            }
            Err(e) => {
                if let Some(reply) = e.reply() {
                    conn.reply(&reply);
                }
                if e.is_fatal() {
                    let _ = conn.close().await;
                    return messages;
                }
                continue;
            }
        };
        state = match (state, request) {
            (_, Request::Ehlo { .. }) => {
                conn.reply(&ehlo_reply(&conn, acceptor.is_some()));
                State::Greeted
            }
            (_, Request::Helo { .. }) => {
                conn.reply(&Reply::ok(250, "", HOST));
                State::Greeted
            }
            (State::Greeted, Request::Mail { from }) => {
                conn.reply(&Reply::ok(250, "2.1.0", "sender ok"));
                State::Mail { from: from.address }
            }
            (State::Mail { from }, Request::Rcpt { to }) => {
                conn.reply(&Reply::ok(250, "2.1.5", "recipient ok"));
                State::Rcpt {
                    from,
                    rcpts: vec![to.address],
                }
            }
            (State::Rcpt { from, mut rcpts }, Request::Rcpt { to }) => {
                conn.reply(&Reply::ok(250, "2.1.5", "recipient ok"));
                rcpts.push(to.address);
                State::Rcpt { from, rcpts }
            }
            (State::Rcpt { from, rcpts }, Request::Data) => {
                conn.reply(&Reply::ok(354, "", "end data with <CR><LF>.<CR><LF>"));
                let mut body = Vec::new();
                let Ok(end) = conn.read_data(&mut body).await else {
                    return messages;
                };
                accept(&mut conn, &mut messages, end, Message { from, rcpts, body });
                State::Greeted
            }
            (
                State::Rcpt { from, rcpts },
                Request::Bdat {
                    chunk_size,
                    is_last,
                },
            ) => {
                let chunking = State::Chunking {
                    from,
                    rcpts,
                    body: Vec::new(),
                    size: 0,
                };
                match bdat(&mut conn, &mut messages, chunking, chunk_size, is_last).await {
                    Some(state) => state,
                    None => return messages,
                }
            }
            (
                state @ State::Chunking { .. },
                Request::Bdat {
                    chunk_size,
                    is_last,
                },
            ) => match bdat(&mut conn, &mut messages, state, chunk_size, is_last).await {
                Some(state) => state,
                None => return messages,
            },
            (state, Request::Bdat { chunk_size, .. }) => {
                // RFC 3030 §2: the chunk is read even when refused, to stay in sync.
                if conn
                    .read_bdat(chunk_size as u64, &mut tokio::io::sink(), 0)
                    .await
                    .is_err()
                {
                    return messages;
                }
                conn.reply(&Reply::perm(503, "5.5.1", "bad sequence of commands"));
                state
            }
            (State::Connected, Request::Rset) => {
                conn.reply(&Reply::ok(250, "2.0.0", "ok"));
                State::Connected
            }
            (_, Request::Rset) => {
                conn.reply(&Reply::ok(250, "2.0.0", "ok"));
                State::Greeted
            }
            (state, Request::Noop { .. }) => {
                conn.reply(&Reply::ok(250, "2.0.0", "ok"));
                state
            }
            (_, Request::Quit) => {
                conn.reply(&Reply::ok(221, "2.0.0", "bye"));
                let _ = conn.close().await;
                return messages;
            }
            (_, Request::StartTls) if !conn.is_tls() && acceptor.is_some() => {
                let Some(acceptor) = acceptor.as_ref() else {
                    return messages;
                };
                conn.reply(&Reply::ok(220, "2.0.0", "ready to start TLS"));
                conn = match conn.starttls(acceptor).await {
                    Ok(conn) => conn,
                    Err(_) => return messages,
                };
                State::Connected
            }
            (state, Request::StartTls) => {
                conn.reply(&Reply::perm(
                    503,
                    "5.5.1",
                    "TLS already active or not available",
                ));
                state
            }
            (state @ (State::Connected | State::Greeted | State::Mail { .. }), Request::Data) => {
                conn.reply(&Reply::perm(503, "5.5.1", "bad sequence of commands"));
                state
            }
            (state, Request::Mail { .. } | Request::Rcpt { .. } | Request::Data) => {
                conn.reply(&Reply::perm(503, "5.5.1", "bad sequence of commands"));
                state
            }
            (state, _) => {
                conn.reply(&Reply::perm(502, "5.5.1", "command not implemented"));
                state
            }
        };
    }
}

fn ehlo_reply(conn: &Connection, has_tls: bool) -> Reply {
    let mut lines = vec![HOST.to_owned(), "PIPELINING".to_owned()];
    lines.push(format!("SIZE {}", conn.limits().max_message_size));
    lines.push("8BITMIME".to_owned());
    if has_tls && !conn.is_tls() {
        lines.push("STARTTLS".to_owned());
    }
    lines.push("ENHANCEDSTATUSCODES".to_owned());
    lines.push("CHUNKING".to_owned());
    Reply::multiline(250, "", lines)
}

/// Answers the end of a DATA or last BDAT transfer and records the message.
fn accept(conn: &mut Connection, messages: &mut Vec<Message>, end: DataEnd, message: Message) {
    match end.reply() {
        Some(reply) => conn.reply(&reply),
        None => {
            conn.reply(&Reply::ok(250, "2.0.0", "queued"));
            messages.push(message);
        }
    }
}

/// Reads one BDAT chunk in state `Chunking`; `None` when the connection is gone.
async fn bdat(
    conn: &mut Connection,
    messages: &mut Vec<Message>,
    state: State,
    chunk_size: usize,
    is_last: bool,
) -> Option<State> {
    let State::Chunking {
        from,
        rcpts,
        mut body,
        size,
    } = state
    else {
        return None;
    };
    let end = conn
        .read_bdat(chunk_size as u64, &mut body, size)
        .await
        .ok()?;
    match end {
        DataEnd::Complete { size } if !is_last => {
            conn.reply(&Reply::ok(
                250,
                "2.0.0",
                format!("{chunk_size} octets received"),
            ));
            Some(State::Chunking {
                from,
                rcpts,
                body,
                size,
            })
        }
        end => {
            // RFC 3030 §4.2: a failed chunk ends the transaction.
            accept(conn, messages, end, Message { from, rcpts, body });
            Some(State::Greeted)
        }
    }
}

/// The server side of a duplex stream that counts the write calls that carried bytes.
struct Counted {
    inner: DuplexStream,
    writes: Arc<AtomicUsize>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.writes.fetch_add(1, Ordering::SeqCst);
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

struct Started {
    client: DuplexStream,
    server: JoinHandle<Vec<Message>>,
    writes: Arc<AtomicUsize>,
}

fn start(limits: Limits, acceptor: Option<TlsAcceptor>) -> Started {
    let (client, inner) = tokio::io::duplex(64 * 1024);
    let writes = Arc::new(AtomicUsize::new(0));
    let stream = Counted {
        inner,
        writes: writes.clone(),
    };
    let peer = std::net::SocketAddr::from(([192, 0, 2, 7], 40000));
    let conn = Connection::new(Box::new(stream), peer, limits);
    Started {
        client,
        server: tokio::spawn(session(conn, acceptor)),
        writes,
    }
}

/// Runs `script` against a fresh test server and returns what it accepted.
async fn play(script: &str, limits: Limits) -> Result<Vec<Message>, String> {
    let Started { client, server, .. } = start(limits, None);
    transcript::run(script, client)
        .await
        .map_err(|e| e.to_string())?;
    server.await.map_err(|e| e.to_string())
}

/// The `# key: value` directives of a transcript file.
fn directive(script: &str, key: &str) -> Option<u64> {
    script.lines().find_map(|line| {
        let value = line
            .strip_prefix("# ")?
            .strip_prefix(key)?
            .strip_prefix(':')?;
        value.trim().parse().ok()
    })
}

#[tokio::test]
async fn transcripts() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/transcripts");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "txt"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 6,
        "transcripts not found in {dir}: {files:?}"
    );
    let mut failures = Vec::new();
    for path in &files {
        let script = std::fs::read_to_string(path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let defaults = Limits::default();
        let limits = Limits {
            max_message_size: directive(&script, "max-message-size")
                .unwrap_or(defaults.max_message_size),
            max_line_len: directive(&script, "max-line-len")
                .map_or(defaults.max_line_len, |n| n as usize),
            ..defaults
        };
        let Some(expected) = directive(&script, "messages") else {
            failures.push(format!("{name}: no `# messages: N` line"));
            continue;
        };
        match play(&script, limits).await {
            Ok(messages) if messages.len() as u64 == expected => {}
            Ok(messages) => failures.push(format!(
                "{name}: {} messages, expected {expected}",
                messages.len()
            )),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

const EHLO: &str = "C: EHLO client.example\nS: 250-test.example\nS: 250-PIPELINING\n\
    S: 250-SIZE\nS: 250-8BITMIME\nS: 250-ENHANCEDSTATUSCODES\nS: 250 CHUNKING\n";

const ENVELOPE: &str = "C: MAIL FROM:<a@remote.example>\nS: 250 2.1.0\n\
    C: RCPT TO:<b@hosted.example>\nS: 250 2.1.5\n";

/// Case 1: a 1 MB line without CRLF. The reply comes before the line ends (so the line was
/// not buffered whole; the memory bound itself is asserted in the unit tests), and the session
/// goes on.
#[tokio::test]
async fn a_1_mb_line_without_crlf_gets_500_and_the_session_goes_on() {
    let Started {
        mut client, server, ..
    } = start(Limits::default(), None);
    transcript::run("S: 220", &mut client).await.unwrap();
    client.write_all(&vec![b'A'; 1 << 20]).await.unwrap();
    let script = "S: 500 5.5.2 line too long\n\
        R: still the same line\\r\\n\n\
        C: NOOP\nS: 250 2.0.0\nC: QUIT\nS: 221 2.0.0\nS: <closed>";
    transcript::run(script, &mut client).await.unwrap();
    assert!(server.await.unwrap().is_empty());
}

/// Case 2: none of the bare CR/LF variants around a dot ends the message, so the commands
/// after it are text of the one message, stored with CRLF line endings only.
#[tokio::test]
async fn smuggling_variants_never_end_the_message() {
    let variants: [&[u8]; 6] = [
        b"\n.\n", b"\r\n.\n", b"\r.\r", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r",
    ];
    let smuggled = "MAIL FROM:<evil@remote.example>\r\nRCPT TO:<victim@hosted.example>\r\n\
        DATA\r\nsmuggled body\r\n";
    for variant in variants {
        let body = [
            b"Subject: first\r\n\r\nbody".as_slice(),
            variant,
            smuggled.as_bytes(),
        ]
        .concat();
        let script = format!(
            "S: 220\n{EHLO}{ENVELOPE}C: DATA\nS: 354\nR: {}.\\r\\n\nS: 250 2.0.0 queued\n\
             C: QUIT\nS: 221\nS: <closed>",
            escape(&body)
        );
        let messages = play(&script, Limits::default()).await.unwrap();
        assert_eq!(messages.len(), 1, "variant {:?}", escape(variant));
        let expected = format!("Subject: first\r\n\r\nbody\r\n.\r\n{smuggled}");
        assert_eq!(escape(&messages[0].body), escape(expected.as_bytes()));
        assert_eq!(messages[0].from, "a@remote.example");
        assert_eq!(messages[0].rcpts, ["b@hosted.example"]);
    }
}

/// Case 3: `STARTTLS\r\nNOOP\r\n` in one write. The NOOP was sent in plaintext and must never be
/// answered: the first reply inside TLS is the one to the client's own EHLO, which no longer
/// offers STARTTLS.
#[tokio::test]
async fn starttls_discards_plaintext_sent_before_the_handshake() {
    let (acceptor, connector) = tls_pair().unwrap();
    let Started {
        mut client, server, ..
    } = start(Limits::default(), Some(acceptor));
    let plain = "S: 220\nC: EHLO client.example\nS: 250-test.example\nS: 250-PIPELINING\n\
        S: 250-SIZE\nS: 250-8BITMIME\nS: 250-STARTTLS\nS: 250-ENHANCEDSTATUSCODES\n\
        S: 250 CHUNKING\nR: STARTTLS\\r\\nNOOP\\r\\n\nS: 220 2.0.0";
    transcript::run(plain, &mut client).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, client).await.unwrap();
    let encrypted = format!(
        "{EHLO}{ENVELOPE}C: DATA\nS: 354\nR: secret\\r\\n.\\r\\n\nS: 250 2.0.0\n\
        C: QUIT\nS: 221 2.0.0\nS: <closed>"
    );
    transcript::run(&encrypted, &mut tls).await.unwrap();
    let messages = server.await.unwrap();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].body, b"secret\r\n");
}

/// Case 4: EHLO, MAIL, RCPT, RCPT, DATA in one write get their replies in order, in one write
/// of the server after its greeting.
#[tokio::test]
async fn pipelined_commands_get_their_replies_in_order_and_in_one_write() {
    let Started {
        mut client,
        server,
        writes,
    } = start(Limits::default(), None);
    transcript::run("S: 220", &mut client).await.unwrap();
    assert_eq!(writes.load(Ordering::SeqCst), 1);
    let script = "C: EHLO client.example\nC: MAIL FROM:<a@remote.example>\n\
        C: RCPT TO:<b@hosted.example>\nC: RCPT TO:<c@hosted.example>\nC: DATA\n\
        S: 250-test.example\nS: 250-PIPELINING\nS: 250-SIZE\nS: 250-8BITMIME\n\
        S: 250-ENHANCEDSTATUSCODES\nS: 250 CHUNKING\n\
        S: 250 2.1.0\nS: 250 2.1.5\nS: 250 2.1.5\nS: 354";
    transcript::run(script, &mut client).await.unwrap();
    assert_eq!(
        writes.load(Ordering::SeqCst),
        2,
        "the five replies took more than one write"
    );
    let script = "R: hi\\r\\n.\\r\\nQUIT\\r\\n\nS: 250 2.0.0\nS: 221\nS: <closed>";
    transcript::run(script, &mut client).await.unwrap();
    let messages = server.await.unwrap();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].rcpts, ["b@hosted.example", "c@hosted.example"]);
}

/// Case 6: an idle client gets `421 4.4.2` after the command timeout, then the connection
/// closes.
#[tokio::test(start_paused = true)]
async fn idle_client_gets_421_and_close() {
    let limits = Limits {
        command_timeout: Duration::from_secs(300),
        ..Limits::default()
    };
    let Started { client, server, .. } = start(limits, None);
    let started = Instant::now();
    let options = Options {
        reply_timeout: Duration::from_secs(3600),
    };
    transcript::run_with("S: 220\nS: 421 4.4.2\nS: <closed>", client, &options)
        .await
        .unwrap();
    assert_eq!(started.elapsed().as_secs(), 300);
    assert!(server.await.unwrap().is_empty());
}

/// Case 7: transparency. Stuffed dots are unstuffed, 8-bit bytes and NUL pass, a bare LF
/// and a bare CR become CRLF.
#[tokio::test]
async fn data_is_unstuffed_8bit_clean_and_crlf_normalised() {
    let script = format!(
        "S: 220\n{EHLO}{ENVELOPE}C: DATA\nS: 354\n\
         R: ..leading dot\\r\\n...two\\r\\n.\\x00nul\\r\\ncaf\\xe9 \\xff\\r\\nbare lf\\nbare cr\\rend\\r\\n.\\r\\n\n\
         S: 250 2.0.0\nC: QUIT\nS: 221\nS: <closed>"
    );
    let messages = play(&script, Limits::default()).await.unwrap();
    assert_eq!(messages.len(), 1);
    let expected: &[u8] =
        b".leading dot\r\n..two\r\n\0nul\r\ncaf\xe9 \xff\r\nbare lf\r\nbare cr\r\nend\r\n";
    assert_eq!(escape(&messages[0].body), escape(expected));
}

/// Case 9: BDAT in two chunks makes one message, bytes unchanged (no unstuffing).
#[tokio::test]
async fn bdat_chunks_make_one_message() {
    let script = format!(
        "S: 220\n{EHLO}{ENVELOPE}C: BDAT 8\nR: .a\\r\\nb\\nc\\r\nS: 250 2.0.0 8 octets\n\
         C: BDAT 7 LAST\nR: \\n.\\r\\nend\nS: 250 2.0.0 queued\nC: QUIT\nS: 221\nS: <closed>"
    );
    let messages = play(&script, Limits::default()).await.unwrap();
    assert_eq!(messages.len(), 1);
    assert_eq!(escape(&messages[0].body), escape(b".a\r\nb\nc\r\n.\r\nend"));
}

/// Builds a server acceptor with a fresh self-signed certificate for `localhost`, and a client
/// connector that trusts only it.
fn tls_pair() -> Result<(TlsAcceptor, TlsConnector), Box<dyn std::error::Error>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let cert: CertificateDer<'static> = key.cert.der().clone();
    let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.signing_key.serialize_der()));
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], private)?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert)?;
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok((
        TlsAcceptor::from(Arc::new(server)),
        TlsConnector::from(Arc::new(client)),
    ))
}
