//! SMTP command input: the bounded `LineDecoder` fed in arbitrary chunks, then the whole
//! public read path (`Connection::read_command`, and `read_data` / `read_bdat` after DATA /
//! BDAT) over an in-memory duplex stream with small limits.
//!
//! Input: byte 0 picks the line limit, byte 1 the chunk size; the rest is the client's bytes.
#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use common::smtp::server::{Command, Connection, LineDecoder, LineStatus, Limits};
use libfuzzer_sys::fuzz_target;
use smtp_proto::Request;
use tokio::io::AsyncWriteExt;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

fn line_decoder(max_len: usize, chunk: usize, input: &[u8]) {
    let mut decoder = LineDecoder::new(max_len);
    let mut events = 0usize;
    for mut piece in input.chunks(chunk) {
        while !piece.is_empty() {
            let (n, status) = decoder.decode(piece);
            assert!(n <= piece.len(), "consumed more than given");
            match status {
                LineStatus::NeedMore => assert_eq!(n, piece.len(), "NeedMore left bytes"),
                LineStatus::Line => {
                    let line = decoder.line();
                    assert!(n >= 1);
                    assert!(line.len() <= max_len, "line {} > limit {max_len}", line.len());
                    assert_eq!(line.last(), Some(&b'\n'), "line without LF");
                    assert!(!line[..line.len() - 1].contains(&b'\n'), "LF inside a line");
                }
                LineStatus::TooLong => {
                    assert!(decoder.line().is_empty());
                }
            }
            assert!(decoder.partial_len() < max_len.max(1), "partial over limit");
            events += 1;
            assert!(events <= input.len() + 1, "decoder does not progress");
            piece = &piece[n..];
        }
    }
}

async fn session(max_line_len: usize, input: &[u8]) {
    let (mut client, server) = tokio::io::duplex(input.len() + 64);
    client.write_all(input).await.expect("write to duplex");
    client.shutdown().await.expect("shutdown");
    // Replies are never queued, so nothing is written back; keep `client` alive anyway so a
    // write would not fail for the wrong reason.
    let limits = Limits {
        max_line_len,
        command_timeout: Duration::from_secs(5),
        data_timeout: Duration::from_secs(5),
        session_timeout: Duration::from_secs(30),
        max_message_size: 1024,
    };
    let peer: SocketAddr = "127.0.0.1:2525".parse().expect("addr");
    let mut conn = Connection::new(Box::new(server), peer, limits);
    let mut already = 0u64;
    for _ in 0..=input.len() + 1 {
        match conn.read_command().await {
            Ok(Command::Request(Request::Data)) => {
                let mut sink = tokio::io::sink();
                if let Err(e) = conn.read_data(&mut sink).await {
                    assert!(e.is_fatal() || e.reply().is_some());
                    if e.is_fatal() {
                        return;
                    }
                }
            }
            Ok(Command::Request(Request::Bdat { chunk_size, is_last })) => {
                let mut sink = Vec::new();
                match conn.read_bdat(chunk_size as u64, &mut sink, already).await {
                    Ok(end) => {
                        assert!(sink.len() as u64 <= 1024, "BDAT sink over the limit");
                        already = if is_last { 0 } else { already.saturating_add(chunk_size as u64) };
                        let _ = end.reply();
                    }
                    Err(e) if e.is_fatal() => return,
                    Err(_) => {}
                }
            }
            Ok(cmd) => {
                let _ = format!("{cmd:?}");
            }
            Err(e) => {
                let _ = e.reply();
                if e.is_fatal() {
                    return;
                }
            }
        }
    }
    panic!("read_command did not reach the end of a finite input");
}

fuzz_target!(|data: &[u8]| {
    let Some((&a, rest)) = data.split_first() else { return };
    let Some((&b, input)) = rest.split_first() else { return };
    let max_len = 8 + usize::from(a);
    let chunk = 1 + usize::from(b % 32);
    line_decoder(max_len, chunk, input);
    line_decoder(max_len, input.len().max(1), input);
    runtime().block_on(session(max_len, input));
});
