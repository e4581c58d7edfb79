//! The spool's SMTP listener over real sockets, driven by transcripts and by hand.

mod support;

use std::time::Duration;

use common::queue::{Origin, RecipientState};
use common::testkit::transcript;
use support::{play, start};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

#[tokio::test]
async fn accepts_hosted_mailboxes_and_expands_aliases() {
    let s = start(|_| {}).await;
    play(s.smtp, include_str!("transcripts/smtp_basic.txt")).await;
    let entries = s.entries();
    assert_eq!(entries.len(), 1);
    let e = &entries[0];
    assert_eq!(e.reverse_path, "sender@remote.example");
    assert_eq!(e.origin, Origin::Smtp);
    let rcpts: Vec<(&str, Option<&str>)> = e
        .recipients
        .iter()
        .map(|r| (r.address.as_str(), r.original.as_deref()))
        .collect();
    assert_eq!(
        rcpts,
        [
            ("a@example.test", Some("A@Example.TEST")),
            ("b@example.test", Some("team@example.test"))
        ]
    );
    assert!(
        e.recipients
            .iter()
            .all(|r| r.state == RecipientState::Pending)
    );
    let msg = String::from_utf8(s.queue.read_message(&e.id).unwrap()).unwrap();
    assert!(
        msg.starts_with(
            "Received: from client.example (127.0.0.1)\r\n\tby localhost (spool, conn "
        ),
        "{msg}"
    );
    assert!(msg.contains(&format!("with ESMTP id {}", e.id)), "{msg}");
    assert!(
        msg.ends_with("\r\nSubject: hello\r\n\r\n.a line that starts with a dot\r\n"),
        "{msg}"
    );
    assert_eq!(e.size, msg.len() as u64);
    s.stop().await;
}

#[tokio::test]
async fn relay_attempts_are_refused() {
    let s = start(|_| {}).await;
    play(s.smtp, include_str!("transcripts/smtp_relay.txt")).await;
    assert!(s.entries().is_empty());
    s.stop().await;
}

#[tokio::test]
async fn sequence_errors_and_the_error_budget() {
    let s = start(|_| {}).await;
    play(s.smtp, include_str!("transcripts/smtp_sequence_errors.txt")).await;
    s.stop().await;
}

#[tokio::test]
async fn chunking() {
    let s = start(|_| {}).await;
    play(s.smtp, include_str!("transcripts/smtp_bdat.txt")).await;
    let entries = s.entries();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].reverse_path, "");
    let msg = String::from_utf8(s.queue.read_message(&entries[0].id).unwrap()).unwrap();
    assert!(
        msg.ends_with("\r\nSubject: chunks\r\n\r\nabQUIT\r\n"),
        "{msg}"
    );
    s.stop().await;
}

#[tokio::test]
async fn recipient_and_size_limits() {
    let s = start(|s| {
        s.max_recipients = 2;
        s.max_message_size = common::config::ByteSize(200);
    })
    .await;
    let body = "x".repeat(300);
    let script = format!(
        "S: 220\nC: EHLO c\nS: 250\nC: MAIL FROM:<s@remote.example> SIZE=201\nS: 552 5.3.4\n\
         C: MAIL FROM:<s@remote.example>\nS: 250\nC: RCPT TO:<a@example.test>\nS: 250\n\
         C: RCPT TO:<b@example.test>\nS: 250\nC: RCPT TO:<postmaster@example.test>\nS: 452 4.5.3\n\
         C: DATA\nS: 354\nC: {body}\nC: .\nS: 552 5.3.4\nC: QUIT\nS: 221\n"
    );
    play(s.smtp, &script).await;
    assert!(s.entries().is_empty());
    s.stop().await;
}

#[tokio::test]
async fn a_mail_loop_is_refused_by_hop_count() {
    let s = start(|_| {}).await;
    let hops = |n: usize| "C: Received: from x by y; Thu, 1 Jan 2026 00:00:00 +0000\n".repeat(n);
    let script = format!(
        "S: 220\nC: EHLO c\nS: 250\nC: MAIL FROM:<s@remote.example>\nS: 250\nC: RCPT TO:<a@example.test>\nS: 250\n\
         C: DATA\nS: 354\n{}C:\nC: body\nC: .\nS: 554 5.4.6\n\
         C: MAIL FROM:<s@remote.example>\nS: 250\nC: RCPT TO:<a@example.test>\nS: 250\n\
         C: DATA\nS: 354\n{}C:\nC: body\nC: .\nS: 250 2.0.0\nC: QUIT\nS: 221\n",
        hops(50),
        hops(49)
    );
    play(s.smtp, &script).await;
    assert_eq!(s.entries().len(), 1);
    s.stop().await;
}

#[tokio::test]
async fn early_talkers_are_refused_before_the_greeting() {
    let s = start(|s| s.greet_delay = Duration::from_millis(300)).await;
    play(s.smtp, "C: EHLO hasty.example\nS: 554 5.5.1\nS: <closed>\n").await;
    play(s.smtp, "S: 220\nC: QUIT\nS: 221\n").await;
    // Having waited once, this address is not made to wait again (postscreen's cache): a
    // client that now speaks at once is served.
    play(s.smtp, "C: NOOP\nS: 220\nS: 250\nC: QUIT\nS: 221\n").await;
    s.stop().await;
}

#[tokio::test]
async fn connections_per_client_address_are_limited() {
    let s = start(|s| s.max_connections_per_ip = 2).await;
    let mut first = TcpStream::connect(s.smtp).await.unwrap();
    transcript::run("S: 220\n", &mut first).await.unwrap();
    let mut second = TcpStream::connect(s.smtp).await.unwrap();
    transcript::run("S: 220\n", &mut second).await.unwrap();
    play(s.smtp, "S: 421 4.7.0\nS: <closed>\n").await;
    drop(first);
    // The slot comes back when the first session ends; wait for it with a deadline.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = TcpStream::connect(s.smtp).await.unwrap();
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).await.unwrap();
        if &buf == b"220 l" {
            c.write_all(b"QUIT\r\n").await.unwrap();
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot never came back"
        );
        tokio::task::yield_now().await;
    }
    drop(second);
    s.stop().await;
}

#[tokio::test]
async fn reinjection_is_for_trusted_networks_and_marks_the_origin() {
    let s = start(|s| {
        s.shared.spool_networks = common::net::Networks::new(vec!["127.0.0.1/32".parse().unwrap()])
    })
    .await;
    play(
        s.reinject,
        "S: 220\nC: EHLO filter\nS: 250\nC: MAIL FROM:<s@remote.example>\nS: 250\n\
         C: RCPT TO:<a@example.test>\nS: 250\nC: DATA\nS: 354\nC: Subject: x\nC:\nC: y\nC: .\nS: 250 2.0.0\nC: QUIT\nS: 221\n",
    )
    .await;
    assert_eq!(s.entries()[0].origin, Origin::Reinject);
    s.stop().await;

    let s = start(|s| {
        s.shared.spool_networks = common::net::Networks::new(vec!["192.0.2.0/24".parse().unwrap()])
    })
    .await;
    play(s.reinject, "S: 554 5.7.1\nS: <closed>\n").await;
    s.stop().await;
}

#[tokio::test]
async fn starttls_resets_the_session_and_is_offered_once() {
    let s = start(|_| {}).await;
    let mut tcp = TcpStream::connect(s.smtp).await.unwrap();
    // Pipelined plaintext after STARTTLS must be discarded, never run inside TLS.
    transcript::run(
        "S: 220\nC: EHLO c\nS: 250\nR: STARTTLS\\r\\nMAIL FROM:<injected@remote.example>\\r\\n\nS: 220 2.0.0\n",
        &mut tcp,
    )
    .await
    .unwrap();
    let id = common::tls::Identity::dev(&s.dir.path().join("tls"), "localhost").unwrap();
    let connector = tokio_rustls::TlsConnector::from(id.trusting_client_config().unwrap());
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    transcript::run(
        "C: RCPT TO:<a@example.test>\nS: 503 5.5.1\nC: EHLO c\nS: 250-localhost\nS: 250-PIPELINING\nS: 250-SIZE\nS: 250-8BITMIME\nS: 250-SMTPUTF8\nS: 250-ENHANCEDSTATUSCODES\nS: 250 CHUNKING\n\
         C: MAIL FROM:<s@remote.example>\nS: 250\nC: RCPT TO:<a@example.test>\nS: 250\nC: DATA\nS: 354\nC: x\nC: .\nS: 250\nC: QUIT\nS: 221\n",
        tls,
    )
    .await
    .unwrap();
    let e = &s.entries()[0];
    let msg = String::from_utf8(s.queue.read_message(&e.id).unwrap()).unwrap();
    assert!(msg.contains("with ESMTPS id"), "{msg}");
    s.stop().await;
}
