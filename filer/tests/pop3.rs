//! The filer's POP3 backend, driven by Python's poplib (a third-party client) and transcripts.

#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] functions

mod support;

use std::process::Command;

use support::{SECRET, play, play_lines, start};

const DELIVER_TWO: &str = "S: 220\nC: LHLO s\nS: 250-localhost\nS: 250-PIPELINING\nS: 250-ENHANCEDSTATUSCODES\nS: 250-8BITMIME\nS: 250-SMTPUTF8\nS: 250 SIZE\n\
    C: MAIL FROM:<x@remote.test>\nC: RCPT TO:<a@example.test>\nC: DATA\nS: 250\nS: 250\nS: 354\n\
    C: Subject: first\nC:\nC: line 1\nC: line 2\nC: .\nS: 250 2.0.0\n\
    C: MAIL FROM:<x@remote.test>\nC: RCPT TO:<a@example.test>\nC: DATA\nS: 250\nS: 250\nS: 354\n\
    C: Subject: second\nC:\nC: ..starts with a dot\nC: last line\nC: .\nS: 250 2.0.0\nC: QUIT\nS: 221\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poplib_session() {
    let f = start(|_| {}).await;
    play(f.lmtp, DELIVER_TWO).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/pop3_client.py");
    let port = f.pop3.port().to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args([
                script,
                "127.0.0.1",
                &port,
                "a@example.test",
                "proxy",
                SECRET,
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.trim(), "ok");
}

#[tokio::test]
async fn untrusted_network_is_refused_at_connect() {
    let f = start(|s| {
        s.proxy_networks = common::net::Networks::new(vec!["192.0.2.0/24".parse().unwrap()])
    })
    .await;
    play_lines(f.pop3, "S: -ERR [AUTH]\nS: <closed>\n").await;
}

#[tokio::test]
async fn errors_before_login() {
    let f = start(|_| {}).await;
    let script = "S: +OK\nC: STAT\nS: -ERR authenticate first\nC: BOGUS\nS: -ERR unknown command\n\
                  C: RETR x\nS: -ERR syntax\nC: AUTH LOGIN\nS: -ERR [AUTH]\nC: AUTH PLAIN\nS: + \nC: *\nS: -ERR\n\
                  C: AUTH PLAIN !!!notbase64\nS: -ERR [AUTH]\nC: QUIT\nS: +OK\nS: <closed>\n";
    play_lines(f.pop3, script).await;
}
