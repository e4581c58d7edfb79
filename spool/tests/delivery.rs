//! The queue runner against a scripted LMTP filer: delivery, retry with backoff, expiry and
//! the bounce it makes.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{play, start_with_filer};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpListener;

/// What the fake filer received: (recipients, message) per transaction.
type Seen = Arc<Mutex<Vec<(Vec<String>, String)>>>;

/// An LMTP server that answers each accepted recipient with the next reply scripted for it
/// (`250 2.0.0 ok` once the script is used up) and records every message.
async fn fake_filer(mut script: HashMap<String, Vec<&'static str>>) -> (String, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen: Seen = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            w.write_all(b"220 fake LMTP\r\n").await.unwrap();
            let mut rcpts = Vec::new();
            while let Ok(Some(line)) = lines.next_line().await {
                let upper = line.to_ascii_uppercase();
                if upper.starts_with("LHLO") {
                    w.write_all(b"250-fake\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n")
                        .await
                        .unwrap();
                } else if upper.starts_with("MAIL") {
                    rcpts.clear();
                    w.write_all(b"250 2.1.0 ok\r\n").await.unwrap();
                } else if upper.starts_with("RCPT") {
                    rcpts.push(line[9..line.len() - 1].to_owned());
                    w.write_all(b"250 2.1.5 ok\r\n").await.unwrap();
                } else if upper == "DATA" {
                    w.write_all(b"354 go\r\n").await.unwrap();
                    let mut body = String::new();
                    while let Ok(Some(l)) = lines.next_line().await {
                        if l == "." {
                            break;
                        }
                        body.push_str(&l);
                        body.push('\n');
                    }
                    record.lock().unwrap().push((rcpts.clone(), body));
                    for r in &rcpts {
                        let reply = script
                            .get_mut(r)
                            .and_then(|v| (!v.is_empty()).then(|| v.remove(0)));
                        let reply = reply.unwrap_or("250 2.0.0 ok");
                        w.write_all(format!("{reply}\r\n").as_bytes())
                            .await
                            .unwrap();
                    }
                } else if upper == "QUIT" {
                    let _ = w.write_all(b"221 bye\r\n").await;
                    break;
                } else {
                    w.write_all(b"250 ok\r\n").await.unwrap();
                }
            }
        }
    });
    (addr, seen)
}

/// Waits (with a deadline) for the spool's queue to empty.
async fn wait_for_empty_queue(s: &support::TestSpool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !s.entries().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "queue: {:#?}",
            s.entries()
        );
        tokio::time::sleep(Duration::from_millis(10)).await; // polling interval
    }
}

const SEND_TO_A: &str = "S: 220\nC: EHLO c\nS: 250\nC: MAIL FROM:<b@example.test>\nS: 250\n\
    C: RCPT TO:<a@example.test>\nS: 250\nC: DATA\nS: 354\nC: Subject: test\nC:\nC: body\nC: .\nS: 250\nC: QUIT\nS: 221\n";

#[tokio::test]
async fn a_temporary_failure_is_retried_then_delivered() {
    let script = HashMap::from([("a@example.test".to_owned(), vec!["452 4.2.2 mailbox full"])]);
    let (lmtp, seen) = fake_filer(script).await;
    let s = start_with_filer(&lmtp, |s| {
        s.retry_min = Duration::from_millis(50);
        s.retry_max = Duration::from_millis(100);
    })
    .await;
    play(s.smtp, SEND_TO_A).await;
    wait_for_empty_queue(&s).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "one refusal, one delivery: {seen:#?}");
    assert!(
        seen[1].1.starts_with("Received: from c (127.0.0.1)"),
        "{}",
        seen[1].1
    );
    s.stop().await;
}

#[tokio::test]
async fn past_its_lifetime_a_message_bounces_to_its_sender() {
    let script = HashMap::from([(
        "a@example.test".to_owned(),
        vec!["452 4.2.2 mailbox full"; 100],
    )]);
    let (lmtp, seen) = fake_filer(script).await;
    let s = start_with_filer(&lmtp, |s| {
        s.queue_lifetime = Duration::from_millis(1);
        s.retry_min = Duration::from_millis(50);
    })
    .await;
    play(s.smtp, SEND_TO_A).await;
    wait_for_empty_queue(&s).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:#?}");
    let (rcpts, bounce) = &seen[1];
    assert_eq!(rcpts, &["b@example.test"]);
    for want in [
        "Final-Recipient: rfc822; a@example.test",
        "Status: 4.4.7",
        "Diagnostic-Code: smtp; 4.4.7 delivery time expired;",
        "452 4.2.2",
        "Subject: test",
    ] {
        assert!(bounce.contains(want), "{want} missing in {bounce}");
    }
    s.stop().await;
}

#[tokio::test]
async fn a_bounce_that_fails_is_not_bounced_again() {
    let script = HashMap::from([
        ("a@example.test".to_owned(), vec!["550 5.1.1 gone"]),
        ("b@example.test".to_owned(), vec!["550 5.1.1 gone too"]),
    ]);
    let (lmtp, seen) = fake_filer(script).await;
    let s = start_with_filer(&lmtp, |_| {}).await;
    play(s.smtp, SEND_TO_A).await;
    wait_for_empty_queue(&s).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen.len(),
        2,
        "the message, its bounce, and nothing more: {seen:#?}"
    );
    s.stop().await;
}
