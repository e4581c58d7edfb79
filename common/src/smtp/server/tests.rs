//! Tests of [`Connection`] on a scripted stream that hands out its input in chunks of a chosen
//! size and records every write, so chunking and reply batching are deterministic.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::ReadBuf;

use super::*;

/// A stream that reads `input` at most `chunk` bytes at a time, then EOF, and records each
/// write call separately.
struct Scripted {
    input: Vec<u8>,
    pos: usize,
    chunk: usize,
    writes: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl AsyncRead for Scripted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self
            .chunk
            .min(self.input.len() - self.pos)
            .min(buf.remaining());
        let pos = self.pos;
        buf.put_slice(&self.input[pos..pos + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Scripted {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.writes.lock().unwrap().push(buf.to_vec());
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn scripted(input: &[u8], chunk: usize, limits: Limits) -> (Connection, Arc<Mutex<Vec<Vec<u8>>>>) {
    let writes = Arc::new(Mutex::new(Vec::new()));
    let stream = Scripted {
        input: input.to_vec(),
        pos: 0,
        chunk,
        writes: writes.clone(),
    };
    let peer = SocketAddr::from(([192, 0, 2, 1], 25));
    (Connection::new(Box::new(stream), peer, limits), writes)
}

/// A minimal driver: every command, message and error as one line of text, until EOF.
async fn drive(conn: &mut Connection) -> Vec<String> {
    let mut events = Vec::new();
    let mut bdat_size = 0;
    loop {
        let event = match conn.read_command().await {
            Ok(Command::Request(Request::Data)) => {
                conn.reply(&Reply::ok(354, "", "go ahead"));
                let mut body = Vec::new();
                let end = conn.read_data(&mut body).await;
                format!("DATA {end:?} {:?}", String::from_utf8_lossy(&body))
            }
            Ok(Command::Request(Request::Bdat {
                chunk_size,
                is_last,
            })) => {
                let mut body = Vec::new();
                let end = conn
                    .read_bdat(chunk_size as u64, &mut body, bdat_size)
                    .await;
                if let Ok(DataEnd::Complete { size }) = &end {
                    bdat_size = *size;
                }
                if is_last {
                    bdat_size = 0;
                }
                conn.reply(&Reply::ok(250, "2.0.0", "chunk"));
                format!("BDAT {end:?} {:?}", String::from_utf8_lossy(&body))
            }
            Ok(command) => {
                conn.reply(&Reply::ok(250, "2.0.0", "ok"));
                format!("{command:?}")
            }
            Err(ReadError::Closed) => return events,
            Err(e) => {
                if let Some(reply) = e.reply() {
                    conn.reply(&reply);
                }
                let fatal = e.is_fatal();
                events.push(format!("error {e:?}"));
                if fatal {
                    return events;
                }
                continue;
            }
        };
        events.push(event);
    }
}

#[tokio::test]
async fn a_1_mb_line_without_crlf_is_never_buffered_and_the_session_goes_on() {
    let input = [vec![b'a'; 1 << 20], b"\r\nNOOP\r\n".to_vec()].concat();
    let limits = Limits::default();
    let (mut conn, writes) = scripted(&input, 64 * 1024, limits.clone());
    assert!(matches!(
        conn.read_command().await,
        Err(ReadError::LineTooLong)
    ));
    // Reported as soon as the limit was passed, after one read of the socket.
    assert_eq!(conn.end, READ_BUF_SIZE);
    conn.reply(&ReadError::LineTooLong.reply().unwrap());
    let command = conn.read_command().await.unwrap();
    assert!(
        matches!(command, Command::Request(Request::Noop { .. })),
        "{command:?}"
    );
    assert!(
        conn.lines.capacity() <= 2 * limits.max_line_len,
        "{}",
        conn.lines.capacity()
    );
    assert_eq!(conn.rbuf.len(), READ_BUF_SIZE);
    assert_eq!(
        writes.lock().unwrap().concat(),
        b"500 5.5.2 line too long\r\n"
    );
}

#[tokio::test]
async fn chunked_reads_give_the_same_session() {
    let input: &[u8] = b"EHLO client.example\r\nMAIL FROM:<a@example.com> SIZE=10\r\n\
        RCPT TO:<b@example.com>\r\nDATA\r\nline 1\r\n..dot\r\nbare\nlf\r\n\xff\0\r\n.\r\n\
        XFORWARD NAME=spike.example\r\nNO\rOP\r\n\xc3\x28\r\nBDAT 5\r\n12345BDAT 3 LAST\r\n\
        abcRSET\r\nMAIL FROM:<bad\r\nQUIT\r\n";
    let (mut conn, _) = scripted(input, input.len(), Limits::default());
    let whole = drive(&mut conn).await;
    let expected = [
        r#"Ehlo { host: "client.example" }"#,
        "Mail",
        "Rcpt",
        "DATA Ok(Complete { size: 28 }) \"line 1\\r\\n.dot\\r\\nbare\\r\\nlf\\r\\n\u{fffd}\\0\\r\\n\"",
        r#"Unknown { verb: "XFORWARD", line: "XFORWARD NAME=spike.example" }"#,
        "error Syntax(ControlChar)",
        "error Syntax(InvalidUtf8)",
        r#"BDAT Ok(Complete { size: 5 }) "12345""#,
        r#"BDAT Ok(Complete { size: 8 }) "abc""#,
        "Rset",
        "error Syntax(",
        "Quit",
    ];
    assert_eq!(whole.len(), expected.len(), "{whole:#?}");
    for (got, want) in whole.iter().zip(expected) {
        assert!(got.starts_with(want), "got {got}, want {want}");
    }
    for chunk in [1, 2, 3, 7, 64] {
        let (mut conn, _) = scripted(input, chunk, Limits::default());
        assert_eq!(drive(&mut conn).await, whole, "chunks of {chunk}");
    }
}

#[tokio::test]
async fn pipelined_replies_go_out_in_one_write() {
    let input = b"EHLO a.example\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n\
        RCPT TO:<c@example.com>\r\nNOOP\r\n";
    let (mut conn, writes) = scripted(input, input.len(), Limits::default());
    let events = drive(&mut conn).await;
    assert_eq!(events.len(), 5, "{events:?}");
    let writes = writes.lock().unwrap();
    assert_eq!(writes.len(), 1, "{writes:?}");
    assert_eq!(writes[0], b"250 2.0.0 ok\r\n".repeat(5));
}

#[tokio::test]
async fn replies_are_written_before_waiting_for_the_peer() {
    // One byte per read: every command ends with a read that has to wait.
    let input = b"NOOP\r\nNOOP\r\n";
    let (mut conn, writes) = scripted(input, 1, Limits::default());
    drive(&mut conn).await;
    assert_eq!(writes.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn message_over_the_limit_is_read_to_its_end() {
    let input = b"DATA\r\n0123456789\r\n0123456789\r\n.\r\nNOOP\r\nBDAT 30 LAST\r\n\
        012345678901234567890123456789NOOP\r\n";
    let limits = Limits {
        max_message_size: 20,
        ..Limits::default()
    };
    for chunk in [input.len(), 1, 7] {
        let (mut conn, _) = scripted(input, chunk, limits.clone());
        let events = drive(&mut conn).await;
        assert!(
            events[0].starts_with("DATA Ok(TooBig { size: 24 })"),
            "{events:?}"
        );
        assert!(events[1].starts_with("Noop"), "{events:?}");
        assert!(
            events[2].starts_with("BDAT Ok(TooBig { size: 30 }) \"\""),
            "{events:?}"
        );
        assert!(events[3].starts_with("Noop"), "{events:?}");
    }
}

/// A sink that fails after `ok` bytes.
struct FailingSink {
    ok: usize,
}

impl AsyncWrite for FailingSink {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.ok == 0 {
            return Poll::Ready(Err(io::Error::other("disk full")));
        }
        let n = buf.len().min(self.ok);
        self.ok -= n;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn a_failing_sink_never_lets_the_body_run_as_commands() {
    let input = b"line\r\nMAIL FROM:<evil@example.com>\r\n.\r\nQUIT\r\n";
    let (mut conn, _) = scripted(input, 3, Limits::default());
    let end = conn.read_data(&mut FailingSink { ok: 2 }).await.unwrap();
    assert!(
        matches!(end, DataEnd::SinkFailed { size: 36, .. }),
        "{end:?}"
    );
    assert_eq!(end.reply().unwrap().code, 451);
    let next = conn.read_command().await.unwrap();
    assert!(matches!(next, Command::Request(Request::Quit)), "{next:?}");
}

#[tokio::test]
async fn syntax_errors_map_to_their_replies() {
    let cases: &[(&[u8], &str)] = &[
        (b"\r\n", "500 5.5.2"),
        (b"MAIL FROM:<a b@c>\r\n", "501 5.1.7"),
        (b"MAIL FROM:<a@b\r\n", "501 5.5.4"),
        (
            b"MAIL FROM:<a@b.c> SIZE=x\r\n",
            "501 5.5.4 invalid parameter SIZE",
        ),
        // smtp-proto 0.2.5 reads this as BDAT 999.
        (b"BDAT 99999999999999999999999\r\n", "501 5.5.4"),
        (b"BDAT +5\r\n", "501 5.5.4"),
        (b"RCPT TO:<@@>\r\n", "501 5.1.3"),
        (b"MAIL FROM:<a@example.com> FOO=1\r\n", "555 5.5.4"),
        (b"EHLO\r\n", "501 5.5.4"),
        (b"NOOP \xe9\r\n", "500 5.5.2 bad UTF-8"),
        (b"NO\0OP\r\n", "500 5.5.2 control"),
    ];
    for &(line, reply) in cases {
        let (mut conn, _) = scripted(line, line.len(), Limits::default());
        let e = conn.read_command().await.unwrap_err();
        assert!(!e.is_fatal(), "{e:?}");
        let got = e.reply().unwrap().to_string();
        assert!(
            got.starts_with(reply),
            "{:?}: {got}",
            String::from_utf8_lossy(line)
        );
    }
}

#[tokio::test]
async fn auth_initial_response_is_redacted_in_debug() {
    let line = b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n";
    let (mut conn, _) = scripted(line, line.len(), Limits::default());
    let command = conn.read_command().await.unwrap();
    let shown = format!("{command:?}");
    assert!(
        shown.contains("redacted") && !shown.contains("AGFsaWNl"),
        "{shown}"
    );
}

#[tokio::test]
async fn read_line_returns_a_sasl_response() {
    let input = b"dGVzdA==\r\n*\r\n";
    let (mut conn, _) = scripted(input, 2, Limits::default());
    assert_eq!(conn.read_line().await.unwrap(), "dGVzdA==");
    assert_eq!(conn.read_line().await.unwrap(), "*");
    assert!(matches!(conn.read_line().await, Err(ReadError::Closed)));
}

#[tokio::test(start_paused = true)]
async fn idle_and_session_deadlines() {
    let (client, server) = tokio::io::duplex(1024);
    let peer = SocketAddr::from(([192, 0, 2, 1], 25));
    let limits = Limits {
        command_timeout: Duration::from_secs(300),
        session_timeout: Duration::from_secs(500),
        ..Limits::default()
    };
    let mut conn = Connection::new(Box::new(server), peer, limits);
    let started = Instant::now();
    let e = conn.read_command().await.unwrap_err();
    assert!(matches!(e, ReadError::Timeout), "{e:?}");
    assert_eq!(started.elapsed(), Duration::from_secs(300));
    assert_eq!(
        e.reply().unwrap().to_string(),
        "421 4.4.2 timeout exceeded, closing connection"
    );
    let e = conn.read_command().await.unwrap_err();
    assert!(matches!(e, ReadError::SessionExpired), "{e:?}");
    assert_eq!(started.elapsed(), Duration::from_secs(500));
    drop(client);
}

#[tokio::test(start_paused = true)]
async fn a_slow_client_cannot_stretch_one_command() {
    let (mut client, server) = tokio::io::duplex(1024);
    let peer = SocketAddr::from(([192, 0, 2, 1], 25));
    let limits = Limits {
        command_timeout: Duration::from_secs(10),
        ..Limits::default()
    };
    let mut conn = Connection::new(Box::new(server), peer, limits);
    let trickle = tokio::spawn(async move {
        for _ in 0..20 {
            client.write_all(b"x").await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        io::Result::Ok(client)
    });
    let started = Instant::now();
    assert!(matches!(conn.read_command().await, Err(ReadError::Timeout)));
    assert_eq!(started.elapsed(), Duration::from_secs(10));
    trickle.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_mail_size_too_large_to_count_is_over_any_limit() {
    // smtp-proto 0.2.5 wraps this around to a small number.
    let line = b"MAIL FROM:<a@example.com> SIZE=99999999999999999999999\r\n";
    let (mut conn, _) = scripted(line, line.len(), Limits::default());
    let Command::Request(Request::Mail { from }) = conn.read_command().await.unwrap() else {
        panic!("not a MAIL command");
    };
    assert_eq!(from.size, usize::MAX);
}

#[tokio::test]
async fn garbage_never_panics_or_hangs() {
    let pieces: [&[u8]; 14] = [
        b"\r",
        b"\n",
        b".",
        b"\r\n.\r\n",
        b"DATA\r\n",
        b"BDAT 3\r\n",
        b"BDAT 2 LAST\r\n",
        b"MAIL FROM:<a@b>",
        b"RCPT TO:<",
        b"\0",
        b"\xff\xc3",
        b"AUTH PLAIN ",
        b" ",
        b"x",
    ];
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let limits = Limits {
        max_line_len: 40,
        max_message_size: 50,
        ..Limits::default()
    };
    for round in 0..200 {
        let mut input = Vec::new();
        for _ in 0..300 {
            // xorshift64: deterministic, so a failure can be replayed.
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            input.extend_from_slice(pieces[(seed % pieces.len() as u64) as usize]);
        }
        let chunk = [1, 2, 3, 7, 64, 4096][round % 6];
        let (mut conn, _) = scripted(&input, chunk, limits.clone());
        drive(&mut conn).await;
    }
}
