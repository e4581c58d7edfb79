//! The filer's LMTP listener over real sockets, driven by transcripts and by hand.

#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] functions

mod support;

use common::testkit::transcript;
use support::{inbox, play, start};
use tokio::net::TcpStream;

#[tokio::test]
async fn four_recipients_get_four_answers() {
    let f = start(|_| {}).await;
    play(f.lmtp, include_str!("transcripts/lmtp_four_recipients.txt")).await;
    let a = inbox(&f.root, "a@example.test", "");
    let b = inbox(&f.root, "b@example.test", "");
    assert_eq!((a.len(), b.len()), (1, 1));
    assert!(
        inbox(&f.root, "full@example.test", "").is_empty(),
        "nothing delivered over quota"
    );
    let text = String::from_utf8(a[0].clone()).unwrap();
    assert!(
        text.starts_with(
            "Return-Path: <sender@remote.test>\r\nReceived: from spool.test (127.0.0.1)"
        ),
        "{text}"
    );
    assert!(text.contains("for <a@example.test>;"), "{text}");
    assert!(
        text.ends_with("Subject: four recipients\r\n\r\n.a line that starts with a dot\r\n"),
        "{text}"
    );
    f.shutdown.cancel();
    f.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn protocol_errors_and_mailbox_states() {
    let f = start(|_| {}).await;
    play(f.lmtp, include_str!("transcripts/lmtp_errors.txt")).await;
    let _ = &f.db;
}

#[tokio::test]
async fn spam_flagged_mail_goes_to_junk() {
    let f = start(|_| {}).await;
    let script = "S: 220\nC: LHLO s\nS: 250-localhost\nS: 250-PIPELINING\nS: 250-ENHANCEDSTATUSCODES\nS: 250-8BITMIME\nS: 250-SMTPUTF8\nS: 250 SIZE\n\
                  C: MAIL FROM:<>\nC: RCPT TO:<a@example.test>\nC: DATA\nS: 250\nS: 250\nS: 354\n\
                  C: X-Spam-Flag: YES\nC: Subject: buy now\nC:\nC: spam\nC: .\nS: 250 2.0.0\nC: QUIT\nS: 221\n";
    play(f.lmtp, script).await;
    assert!(inbox(&f.root, "a@example.test", "").is_empty());
    let junk = inbox(&f.root, "a@example.test", ".Junk");
    assert_eq!(junk.len(), 1);
    assert!(junk[0].starts_with(b"Return-Path: <>\r\n"));
}

#[tokio::test]
async fn untrusted_peers_are_refused() {
    let f = start(|s| {
        s.spool_networks = common::net::Networks::new(vec!["192.0.2.0/24".parse().unwrap()])
    })
    .await;
    play(f.lmtp, "S: 554 5.7.1\nS: <closed>\n").await;
}

#[tokio::test]
async fn shutdown_ends_idle_sessions() {
    let f = start(|_| {}).await;
    let mut s = TcpStream::connect(f.lmtp).await.unwrap();
    transcript::run("S: 220\nC: LHLO x\nS: 250-localhost\nS: 250-PIPELINING\nS: 250-ENHANCEDSTATUSCODES\nS: 250-8BITMIME\nS: 250-SMTPUTF8\nS: 250 SIZE\n", &mut s)
        .await
        .unwrap();
    f.shutdown.cancel();
    // An idle session is told at once, not at its next command.
    transcript::run("S: 421 4.3.2\nS: <closed>\n", &mut s)
        .await
        .unwrap();
    f.task.await.unwrap().unwrap();
}
