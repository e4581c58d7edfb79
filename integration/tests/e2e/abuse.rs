//! Abuse, end to end: each class of hostile client against the assembled platform (one
//! `mailctl up` per test, ephemeral ports, a temporary directory), with the exact answer and
//! the proof that nothing else changed: nothing queued or delivered, and the session (or a
//! new one) still works.
//!
//! The tests are grouped by listener: the spool's SMTP (smuggling, open-relay tricks, XFORWARD,
//! BDAT, long lines, recipient floods, mail loops), the relay's submission (AUTH), the access
//! proxy's IMAP and POP3 (literal bombs, nesting, ID spoofing, brute force), then the classes
//! that span listeners: STARTTLS command injection, authzid != authcid, slowloris and MIME
//! bombs through the whole chain.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use common::tls::Identity;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncWrite, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

use crate::support::{EPHEMERAL_CONFIG, Up, maildir, ok, wait_for_maildir};

/// Every user's password.
const PASSWORD: &str = "secret pw";
/// The config file in each test's directory.
const CONFIG: &str = "mail.toml";
/// The longest wait for any one line from a server.
const READ_DEADLINE: Duration = Duration::from_secs(10);
/// A line of ten megabytes, sent without a line ending.
const HUGE_LINE: usize = 10 * 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// The spool's SMTP listener
// ---------------------------------------------------------------------------------------------

/// SMTP smuggling (CVE-2023-51766 and friends): only CRLF.CRLF ends DATA. Each variant of a
/// bare CR/LF dot is sent inside a transaction to alice that smuggles a "second message" to
/// bob behind it. Every transaction gets exactly one `250`, the next command's reply is the
/// next one read, alice gets one message per transaction with the smuggled text inside it, and
/// bob gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_smuggling_variants_deliver_exactly_one_message_each() {
    let p = Platform::start(|_| {});
    let mut c = Conn::connect(p.addr("spool", "smtp")).await;
    assert_eq!(c.reply().await, "220 localhost ESMTP");
    c.cmd("EHLO client.test").await;
    let variants: [&[u8]; 8] = [
        b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r.\n", b"\n.\r",
    ];
    for (i, v) in variants.iter().enumerate() {
        c.send("MAIL FROM:<sender@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
            .await;
        assert!(c.reply().await.starts_with("250 2.1.0"));
        assert!(c.reply().await.starts_with("250 2.1.5"));
        assert!(c.reply().await.starts_with("354 "));
        let mut body = format!("Subject: variant {i}\r\n\r\nbefore").into_bytes();
        body.extend_from_slice(v);
        body.extend_from_slice(
            format!(
                "MAIL FROM:<evil@remote.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n\
                 Subject: smuggled {i}\r\n\r\nevil\r\n.\r\n"
            )
            .as_bytes(),
        );
        c.send(&body).await;
        let reply = c.reply().await;
        assert!(
            reply.starts_with("250 2.0.0 queued as "),
            "variant {i} {v:?}: {reply}"
        );
        // Had the smuggled commands run, their replies would be read here instead of NOOP's.
        assert_eq!(c.cmd("NOOP").await, "250 2.0.0 ok", "variant {i} {v:?}");
    }
    assert_eq!(
        c.cmd("QUIT").await,
        "221 2.0.0 localhost closing connection"
    );
    c.closed().await;

    let msgs = wait_for_maildir(&p.root("filer1"), "alice@example.test", variants.len());
    let mut subjects: Vec<String> = msgs.iter().map(|m| subject(m)).collect();
    subjects.sort();
    let want: Vec<String> = (0..variants.len())
        .map(|i| format!("variant {i}"))
        .collect();
    assert_eq!(subjects, want);
    for m in &msgs {
        let i = subject(m).trim_start_matches("variant ").to_owned();
        assert!(
            m.contains(&format!("Subject: smuggled {i}")) && m.contains("evil@remote.test"),
            "the smuggled text stays inside its message: {m}"
        );
    }
    p.wait_for_empty_queue();
    assert_eq!(p.inbox("bob@example.test"), Vec::<String>::new());
}

/// Open-relay tricks at the spool, unauthenticated: old routing syntax that a sloppier next hop
/// could route elsewhere is refused recipient by recipient, and nothing is queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_relay_tricks_are_refused_and_nothing_is_queued() {
    let p = Platform::start(|_| {});
    let mut c = Conn::connect(p.addr("spool", "smtp")).await;
    assert_eq!(c.reply().await, "220 localhost ESMTP");
    c.cmd("EHLO client.test").await;
    assert!(
        c.cmd("MAIL FROM:<spammer@remote.test>")
            .await
            .starts_with("250 2.1.0")
    );
    let denied = "554 5.7.1 relay access denied";
    // Refused by the command parser already.
    let syntax = "501 5.1.3 bad recipient address syntax";
    let tricks = [
        ("alice%other.test@example.test", denied),
        ("alice@other.test@example.test", syntax),
        ("\"alice@other.test\"@example.test", denied),
        ("@example.test:alice@other.test", denied),
        ("alice@[127.0.0.1]", syntax),
        ("alice!other.test", syntax),
        ("other.test!alice@example.test", denied),
    ];
    let mut got = Vec::new();
    for (rcpt, _) in tricks {
        got.push((rcpt, c.cmd(&format!("RCPT TO:<{rcpt}>")).await));
    }
    let want: Vec<(&str, String)> = tricks.iter().map(|(r, w)| (*r, (*w).to_owned())).collect();
    assert_eq!(got, want);
    assert_eq!(c.cmd("DATA").await, "554 5.5.1 no valid recipients");
    // Eight refusals, within the error budget of ten: the session goes on.
    assert_eq!(c.cmd("NOOP").await, "250 2.0.0 ok");
    assert_eq!(
        c.cmd("QUIT").await,
        "221 2.0.0 localhost closing connection"
    );
    c.closed().await;
    p.assert_nothing_queued_or_delivered();
}

/// XFORWARD from a client outside `trust.spool_networks`: the MX listener neither offers nor
/// accepts it (a message sent after it is recorded with the real client), and the listeners
/// that would believe it (filter, reinjection, the relay's internal one, LMTP) refuse the
/// connection outright.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xforward_from_an_untrusted_client_is_not_believed() {
    let p = Platform::start(|c| {
        set(c, "trust", "spool_networks", vec!["192.0.2.0/24"]);
        set(c, "filter", "enabled", true);
    });
    let mut c = Conn::connect(p.addr("spool", "smtp")).await;
    assert_eq!(c.reply().await, "220 localhost ESMTP");
    let ehlo = c.cmd("EHLO client.test").await;
    assert!(!ehlo.contains("XFORWARD"), "{ehlo}");
    assert_eq!(
        c.cmd("XFORWARD NAME=spoofed.test ADDR=203.0.113.9 HELO=spoofed.test PROTO=ESMTP")
            .await,
        "500 5.5.1 command not recognized"
    );
    let id = c
        .send_message(
            "sender@remote.test",
            &["alice@example.test"],
            b"Subject: after xforward\r\n\r\nbody\r\n",
        )
        .await;
    assert_eq!(
        c.cmd("QUIT").await,
        "221 2.0.0 localhost closing connection"
    );
    // The spool cannot hand it on (the filter and the filers do not trust loopback here); it
    // waits in the queue, recorded with the real client.
    let q = p.queue();
    assert_eq!(q.len(), 1, "{q:#?}");
    assert_eq!(q[0]["id"], id.as_str());
    assert_eq!(q[0]["client_ip"], "127.0.0.1");
    assert_eq!(q[0]["helo"], "client.test");
    let shown = ok(p.d(), &["-c", CONFIG, "queue", "show", &id], None);
    assert!(
        shown.contains("Received: from client.test (127.0.0.1)")
            && !shown.contains("203.0.113.9")
            && !shown.contains("spoofed"),
        "{shown}"
    );

    for (service, protocol, refusal) in [
        (
            "filter",
            "smtp",
            "554 5.7.1 the filter is not available to you",
        ),
        (
            "spool",
            "reinject",
            "554 5.7.1 reinjection is not available to you",
        ),
        (
            "relay",
            "internal",
            "554 5.7.1 this listener is for the platform's spools only",
        ),
        ("filer1", "lmtp", "554 5.7.1 LMTP is not available to you"),
    ] {
        let mut c = Conn::connect(p.addr(service, protocol)).await;
        assert_eq!(c.reply().await, refusal, "{service} {protocol}");
        c.closed().await;
    }
    // Still waiting, held (never bounced) while the filter refuses the spool too.
    let q = p.queue();
    assert_eq!(q.len(), 1, "{q:#?}");
    assert_eq!(q[0]["id"], id.as_str());
    assert_eq!(q[0]["recipients"][0]["state"], "pending");
    assert_eq!(p.inbox("alice@example.test"), Vec::<String>::new());
}

/// `BDAT 99999999999999999999 LAST`: a chunk size past `u64::MAX` is a syntax error (it must
/// not wrap around to a small size, which would run the rest of the chunk as commands). The
/// transaction survives and a real chunk then delivers exactly one message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bdat_with_a_huge_size_is_refused_and_the_session_goes_on() {
    let p = Platform::start(|_| {});
    let mut c = Conn::connect(p.addr("spool", "smtp")).await;
    assert_eq!(c.reply().await, "220 localhost ESMTP");
    let ehlo = c.cmd("EHLO client.test").await;
    assert!(
        ehlo.lines().any(|l| l.get(4..) == Some("CHUNKING")),
        "{ehlo}"
    );
    assert!(
        c.cmd("MAIL FROM:<sender@remote.test>")
            .await
            .starts_with("250 2.1.0")
    );
    assert!(
        c.cmd("RCPT TO:<alice@example.test>")
            .await
            .starts_with("250 2.1.5")
    );
    assert_eq!(
        c.cmd("BDAT 99999999999999999999 LAST").await,
        "501 5.5.4 syntax: BDAT chunk-size [LAST]"
    );
    assert_eq!(c.cmd("NOOP").await, "250 2.0.0 ok");
    assert!(p.queue().is_empty());
    let msg = b"Subject: chunked\r\n\r\nNOOP\r\nQUIT\r\n";
    c.send(format!("BDAT {} LAST\r\n", msg.len())).await;
    c.send(msg).await;
    assert!(c.reply().await.starts_with("250 2.0.0 queued as "));
    assert_eq!(
        c.cmd("QUIT").await,
        "221 2.0.0 localhost closing connection"
    );
    c.closed().await;
    let got = wait_for_maildir(&p.root("filer1"), "alice@example.test", 1);
    assert!(
        got[0].ends_with("Subject: chunked\r\n\r\nNOOP\r\nQUIT\r\n"),
        "{}",
        got[0]
    );
    p.wait_for_empty_queue();
}

/// A 10 MB command line without a line ending, to the spool and to the proxy's POP3: answered
/// once as too long (`500 5.5.2`, `-ERR Line too long`) while the rest is skipped as it
/// arrives, the session goes on once the line ends, and the platform's memory does not grow by
/// the size of the line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_megabyte_line_is_cut_off_on_smtp_and_pop3() {
    let p = Platform::start(|_| {});
    let rss_before = p.settled_rss().await;

    let mut c = Conn::connect(p.addr("spool", "smtp")).await;
    assert_eq!(c.reply().await, "220 localhost ESMTP");
    c.cmd("EHLO client.test").await;
    let t = Instant::now();
    c.send("NOOP ").await;
    c.send_huge_line().await;
    assert_eq!(c.reply().await, "500 5.5.2 line too long");
    // The rest of the line is skipped up to its end, not taken as a command.
    c.send("\r\n").await;
    assert_eq!(c.cmd("NOOP").await, "250 2.0.0 ok");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert_eq!(
        c.cmd("QUIT").await,
        "221 2.0.0 localhost closing connection"
    );

    let mut c = Conn::connect(p.addr("access", "pop3")).await;
    assert_eq!(c.line().await, "+OK localhost POP3 ready");
    let t = Instant::now();
    c.send("USER ").await;
    c.send_huge_line().await;
    assert_eq!(c.line().await, "-ERR Line too long");
    c.send("\r\nUSER alice@example.test\r\n").await;
    assert_eq!(c.line().await, "+OK");
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    c.send("QUIT\r\n").await;
    assert_eq!(c.line().await, "+OK localhost Bye");
    c.closed().await;

    let growth = p.rss().saturating_sub(rss_before);
    assert!(
        growth < HUGE_LINE as u64 / 2,
        "the platform grew by {growth} bytes"
    );
    p.assert_nothing_queued_or_delivered();
}

/// 10,000 recipients in one transaction: the first `max_recipients` (100) are accepted, every
/// further one gets the temporary `452 4.5.3` (which does not count against the error budget,
/// so the session is not closed), and the message reaches each accepted mailbox exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_recipients_get_452_past_the_limit_and_deliver_once() {
    let p = Platform::start(|_| {});
    let stream = TcpStream::connect(p.addr("spool", "smtp")).await.unwrap();
    let (r, mut w) = stream.into_split();
    let mut r = Conn::new(r);
    assert_eq!(r.reply().await, "220 localhost ESMTP");
    // Pipelined; the replies are read while the commands are written.
    let writer = tokio::spawn(async move {
        let mut batch = String::from("EHLO client.test\r\nMAIL FROM:<sender@remote.test>\r\n");
        for i in 0..10_000 {
            let to = if i % 2 == 0 { "alice" } else { "bob" };
            batch.push_str(&format!("RCPT TO:<{to}@example.test>\r\n"));
        }
        w.write_all(batch.as_bytes()).await.unwrap();
        w
    });
    r.reply().await; // EHLO
    assert!(r.reply().await.starts_with("250 2.1.0"));
    let mut replies = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..10_000 {
        *replies.entry(r.reply().await).or_default() += 1;
    }
    let want: std::collections::BTreeMap<String, usize> = [
        ("250 2.1.5 recipient ok".to_owned(), 100),
        ("452 4.5.3 too many recipients".to_owned(), 9_900),
    ]
    .into();
    assert_eq!(replies, want);
    let mut w = writer.await.unwrap();
    w.write_all(b"DATA\r\n").await.unwrap();
    assert!(r.reply().await.starts_with("354 "));
    w.write_all(b"Subject: flood\r\n\r\nonce\r\n.\r\n")
        .await
        .unwrap();
    assert!(r.reply().await.starts_with("250 2.0.0 queued as "));
    w.write_all(b"QUIT\r\n").await.unwrap();
    assert_eq!(r.reply().await, "221 2.0.0 localhost closing connection");
    for (user, filer) in [
        ("alice@example.test", "filer1"),
        ("bob@example.test", "filer2"),
    ] {
        let msgs = wait_for_maildir(&p.root(filer), user, 1);
        assert_eq!(subject(&msgs[0]), "flood");
    }
    p.wait_for_empty_queue();
    // Delivered once: nothing more arrives while the queue is empty.
    assert_eq!(p.inbox("alice@example.test").len(), 1);
    assert_eq!(p.inbox("bob@example.test").len(), 1);
}

/// A mail loop: a message that already carries 60 `Received:` headers (the limit is 50) is
/// refused with `554 5.4.6` at the end of DATA, nothing is queued, and the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_with_sixty_received_headers_is_refused_as_a_loop() {
    let p = Platform::start(|_| {});
    let mut c = Conn::connect(p.addr("spool", "smtp")).await;
    assert_eq!(c.reply().await, "220 localhost ESMTP");
    c.cmd("EHLO client.test").await;
    let mut msg = String::new();
    for i in 0..60 {
        msg.push_str(&format!(
            "Received: from hop{i}.test by hop{}.test; Thu, 1 Jan 2026 00:00:00 +0000\r\n",
            i + 1
        ));
    }
    msg.push_str("Subject: looping\r\n\r\nround and round\r\n");
    c.send("MAIL FROM:<sender@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        .await;
    assert!(c.reply().await.starts_with("250 2.1.0"));
    assert!(c.reply().await.starts_with("250 2.1.5"));
    assert!(c.reply().await.starts_with("354 "));
    c.send(format!("{msg}.\r\n")).await;
    assert_eq!(
        c.reply().await,
        "554 5.4.6 too many hops, mail loop detected"
    );
    assert_eq!(c.cmd("NOOP").await, "250 2.0.0 ok");
    assert_eq!(
        c.cmd("QUIT").await,
        "221 2.0.0 localhost closing connection"
    );
    p.assert_nothing_queued_or_delivered();
}

// ---------------------------------------------------------------------------------------------
// The relay's submission listener
// ---------------------------------------------------------------------------------------------

/// AUTH PLAIN at the relay with a 1 MB initial response (over the 4096-byte line limit:
/// `500 5.5.2 line too long`), with invalid base64 (`501 5.5.2`), and the same as answers to
/// the `334` challenge; the session goes on and a real login then succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_auth_with_a_huge_or_malformed_response_is_refused() {
    let p = Platform::start(|_| {});
    let mut c = Conn::connect(p.addr("relay", "submission")).await;
    assert_eq!(c.reply().await, "220 localhost ESMTP submission");
    let ehlo = c.cmd("EHLO client.test").await;
    assert!(
        ehlo.ends_with("250 AUTH SCRAM-SHA-256 PLAIN LOGIN"),
        "{ehlo}"
    );
    let huge = base64::engine::general_purpose::STANDARD.encode(vec![b'a'; 768 * 1024]);
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {huge}")).await,
        "500 5.5.2 line too long"
    );
    assert_eq!(c.cmd("NOOP").await, "250 2.0.0 ok");
    assert_eq!(
        c.cmd("AUTH PLAIN !!!not-base64!!!").await,
        "501 5.5.2 cannot decode the initial response"
    );
    assert_eq!(c.cmd("AUTH PLAIN").await, "334 ");
    assert_eq!(c.cmd(&huge).await, "500 5.5.2 line too long");
    assert_eq!(c.cmd("NOOP").await, "250 2.0.0 ok");
    assert_eq!(c.cmd("AUTH PLAIN").await, "334 ");
    assert_eq!(
        c.cmd("!!!not-base64!!!").await,
        "501 5.5.2 cannot decode the response"
    );
    // Not authenticated by any of it.
    assert_eq!(
        c.cmd("MAIL FROM:<alice@example.test>").await,
        "530 5.7.0 authentication required"
    );
    assert_eq!(
        c.cmd(&format!(
            "AUTH PLAIN {}",
            plain("", "alice@example.test", PASSWORD)
        ))
        .await,
        "235 2.7.0 authentication successful"
    );
    assert_eq!(
        c.cmd("QUIT").await,
        "221 2.0.0 localhost closing connection"
    );
    c.closed().await;
    p.assert_nothing_queued_or_delivered();
}

// ---------------------------------------------------------------------------------------------
// The access proxy's IMAP and POP3 listeners
// ---------------------------------------------------------------------------------------------

/// IMAP at the proxy before login: a literal bomb (`{100000000}`) is refused before the client
/// sends it (no `+`), a non-synchronising one closes the connection; 10,000 nested parentheses
/// (over the 8 KiB line limit) close the connection with `* BYE Line too long`, 4,000 (within
/// it) are a syntax error and the session goes on; a 10 MB line without CRLF is cut off after
/// 8 KiB. The platform's memory does not grow by the size of the line. After login, the filer
/// answers 10,000 nested parentheses with BAD too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_prelogin_literal_bombs_deep_nesting_and_endless_lines_are_bounded() {
    let p = Platform::start(|_| {});
    let imap = p.addr("access", "imap");
    let rss_before = p.settled_rss().await;

    let mut c = Conn::connect(imap).await;
    assert!(c.line().await.starts_with("* OK [CAPABILITY "));
    c.send("a LOGIN {100000000}\r\n").await;
    assert_eq!(
        c.line().await,
        "a BAD [TOOBIG] Literal larger than 8192 bytes before login"
    );
    c.send("b NOOP\r\n").await;
    assert_eq!(c.line().await, "b OK NOOP completed");
    c.send("c LOGIN {100000000+}\r\n").await;
    assert_eq!(c.line().await, "* BYE [TOOBIG] Literal too large");
    c.closed().await;

    let mut c = Conn::connect(imap).await;
    c.line().await;
    c.send(format!("a ID {}\r\n", "(".repeat(10_000))).await;
    assert_eq!(c.line().await, "* BYE Line too long");
    c.closed().await;

    let mut c = Conn::connect(imap).await;
    c.line().await;
    c.send(format!("a ID {}\r\n", "(".repeat(4_000))).await;
    assert_eq!(c.line().await, "a BAD Syntax error");
    c.send(format!("b SEARCH {}\r\n", "(".repeat(4_000))).await;
    assert_eq!(c.line().await, "b BAD Command not available before login");
    c.send("c NOOP\r\n").await;
    assert_eq!(c.line().await, "c OK NOOP completed");

    let mut c = Conn::connect(imap).await;
    c.line().await;
    let t = Instant::now();
    let mut line = b"a LOGIN ".to_vec();
    line.resize(HUGE_LINE, b'x');
    assert_eq!(c.send_until_closed(line).await, ["* BYE Line too long"]);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    let growth = p.rss().saturating_sub(rss_before);
    assert!(
        growth < HUGE_LINE as u64 / 2,
        "the platform grew by {growth} bytes"
    );
    // A client behaving normally is served as usual; after login, the filer's parser refuses
    // 10,000 nested parentheses too, and the session goes on.
    let mut c = Conn::connect(imap).await;
    c.line().await;
    c.send(format!("a LOGIN alice@example.test \"{PASSWORD}\"\r\n"))
        .await;
    assert!(c.line().await.starts_with("a OK [CAPABILITY "));
    c.send("b SELECT INBOX\r\n").await;
    assert!(
        c.until_tagged("b")
            .await
            .last()
            .unwrap()
            .starts_with("b OK ")
    );
    let (open, close) = ("(".repeat(10_000), ")".repeat(10_000));
    c.send(format!("c SEARCH {open}ALL{close}\r\n")).await;
    assert_eq!(c.line().await, "c BAD syntax error");
    c.send("d NOOP\r\n").await;
    assert_eq!(c.line().await, "d OK completed");
}

/// AUTHENTICATE PLAIN at the proxy with invalid base64 (as an initial response and as the
/// answer to `+`) and with a 1 MB response; POP3 `AUTH PLAIN` likewise. None logs in, each is
/// answered exactly, and a good login then works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_authenticate_with_a_huge_or_malformed_response_is_refused() {
    let p = Platform::start(|_| {});
    let huge = base64::engine::general_purpose::STANDARD.encode(vec![b'a'; 768 * 1024]);

    let mut c = Conn::connect(p.addr("access", "imap")).await;
    c.line().await;
    c.send("a AUTHENTICATE PLAIN !!!not-base64!!!\r\n").await;
    assert_eq!(c.line().await, "a BAD Syntax error");
    c.send("b AUTHENTICATE PLAIN\r\n").await;
    assert_eq!(c.line().await, "+ ");
    c.send("!!!not-base64!!!\r\n").await;
    assert_eq!(c.line().await, "b BAD Malformed authentication data");
    c.send("c AUTHENTICATE PLAIN\r\n").await;
    assert_eq!(c.line().await, "+ ");
    let lines = c
        .send_until_closed(format!("{huge}\r\n").into_bytes())
        .await;
    assert_eq!(lines, ["* BYE Line too long"]);

    let mut c = Conn::connect(p.addr("access", "imap")).await;
    c.line().await;
    let lines = c
        .send_until_closed(format!("a AUTHENTICATE PLAIN {huge}\r\n").into_bytes())
        .await;
    assert_eq!(lines, ["* BYE Line too long"]);

    let mut c = Conn::connect(p.addr("access", "pop3")).await;
    c.line().await;
    c.send("AUTH PLAIN !!!not-base64!!!\r\n").await;
    assert_eq!(c.line().await, "-ERR [AUTH] Malformed initial response");
    c.send("AUTH PLAIN\r\n").await;
    assert_eq!(c.line().await, "+ ");
    c.send("!!!not-base64!!!\r\n").await;
    assert_eq!(c.line().await, "-ERR [AUTH] Malformed response");
    c.send("AUTH PLAIN\r\n").await;
    assert_eq!(c.line().await, "+ ");
    c.send(format!("{huge}\r\n")).await;
    assert_eq!(c.line().await, "-ERR [AUTH] Response too long");
    c.send(format!(
        "AUTH PLAIN {}\r\n",
        plain("", "alice@example.test", PASSWORD)
    ))
    .await;
    assert_eq!(c.line().await, "+OK Logged in");

    let mut c = Conn::connect(p.addr("access", "imap")).await;
    c.line().await;
    c.send(format!(
        "a AUTHENTICATE PLAIN {}\r\n",
        plain("", "alice@example.test", PASSWORD)
    ))
    .await;
    assert!(c.line().await.starts_with("a OK [CAPABILITY "));
}

/// ID spoofing: a client's `ID ("x-originating-ip" ...)` before login is answered by the proxy
/// itself and never reaches the filer, which logs the address the proxy saw; one sent after
/// login is relayed to the filer, which answers it and does not believe it either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_id_claiming_another_address_is_not_believed() {
    let p = Platform::start_logging(|_| {});
    let mut c = Conn::connect(p.addr("access", "imap")).await;
    c.line().await;
    c.send("a ID (\"x-originating-ip\" \"203.0.113.9\" \"x-originating-port\" \"4444\")\r\n")
        .await;
    assert_eq!(c.line().await, "* ID (\"name\" \"mail-platform access\")");
    assert_eq!(c.line().await, "a OK ID completed");
    c.send(format!("b LOGIN alice@example.test \"{PASSWORD}\"\r\n"))
        .await;
    assert!(c.line().await.starts_with("b OK [CAPABILITY "));
    c.send("c ID (\"x-originating-ip\" \"203.0.113.9\")\r\n")
        .await;
    assert_eq!(c.line().await, "* ID (\"name\" \"mail-platform filer\")");
    assert_eq!(c.line().await, "c OK ID completed");
    c.send("d LOGOUT\r\n").await;
    assert!(c.line().await.starts_with("* BYE"));

    // The filer logged the client's real address, as the proxy passed it.
    let log = p.wait_for_log("client address from the proxy");
    let line = log
        .lines()
        .find(|l| l.contains("client address from the proxy"))
        .unwrap();
    assert!(line.contains("client=127.0.0.1"), "{line}");
    assert!(!log.contains("203.0.113.9"), "{log}");
}

/// Brute force at the proxy: five failed logins for an existing user and five for an unknown
/// one (from two client addresses, so each series has its own throttle): the same answer, a
/// delay that doubles with each failure, and timings that do not tell the two apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brute_force_gets_growing_delays_that_do_not_reveal_which_users_exist() {
    let base = Duration::from_millis(100);
    let p = Platform::start(|c| {
        set(c, "access", "login_delay", "100ms");
        set(c, "access", "login_delay_max", "2s");
    });
    let imap = p.addr("access", "imap");
    let (mut existing, mut unknown) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        existing.push(failed_login(imap, "127.0.0.2", "alice@example.test").await);
        unknown.push(failed_login(imap, "127.0.0.3", "nobody@example.test").await);
    }
    for (i, (e, u)) in existing.iter().zip(&unknown).enumerate() {
        assert_eq!(e.0, "a NO [AUTHENTICATIONFAILED] Authentication failed");
        assert_eq!(u.0, e.0);
        // The delay doubles with each failure: 100, 200, 400, 800, 1600 ms (plus the argon2
        // verification, which both pay).
        let delay = base * (1 << i);
        assert!(e.1 >= delay && u.1 >= delay, "failure {i}: {e:?} {u:?}");
    }
    assert!(existing[4].1 > existing[0].1 && unknown[4].1 > unknown[0].1);
    let median = |v: &[(String, Duration)]| {
        let mut t: Vec<Duration> = v.iter().map(|(_, t)| *t).collect();
        t.sort();
        t[t.len() / 2]
    };
    let ratio = median(&existing).as_secs_f64() / median(&unknown).as_secs_f64();
    assert!(
        (0.5..=2.0).contains(&ratio),
        "existing {existing:?} unknown {unknown:?}"
    );
    // The real user still logs in (from a third address).
    let mut c = Conn::connect_from(imap, "127.0.0.4").await;
    c.line().await;
    c.send(format!("a LOGIN alice@example.test \"{PASSWORD}\"\r\n"))
        .await;
    assert!(c.line().await.starts_with("a OK [CAPABILITY "));
}

/// One failed IMAP LOGIN from `source` on a new connection: the answer and the time it took.
async fn failed_login(imap: SocketAddr, source: &str, user: &str) -> (String, Duration) {
    let mut c = Conn::connect_from(imap, source).await;
    c.line().await;
    let t = Instant::now();
    c.send(format!("a LOGIN {user} wrong-password\r\n")).await;
    let answer = c.line().await;
    (answer, t.elapsed())
}

// ---------------------------------------------------------------------------------------------
// Across listeners
// ---------------------------------------------------------------------------------------------

/// STARTTLS command injection (CVE-2011-0411 and kin): a command sent in the same write as
/// STARTTLS, before the handshake, is dropped. On the spool's MX, the relay's submission, the
/// proxy's IMAP and POP3, the first reply after the handshake answers the next command sent,
/// and the injected one (a MAIL, an AUTH, a LOGIN, a USER) left no trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_injected_behind_starttls_is_never_answered() {
    let p = Platform::start(|_| {});

    let mut c = Conn::connect(p.addr("spool", "smtp")).await;
    assert_eq!(c.reply().await, "220 localhost ESMTP");
    assert!(c.cmd("EHLO client.test").await.contains("STARTTLS"));
    c.send("STARTTLS\r\nMAIL FROM:<injected@remote.test>\r\n")
        .await;
    assert_eq!(c.reply().await, "220 2.0.0 ready to start TLS");
    let mut t = c.starttls(p.d()).await;
    assert_eq!(t.cmd("NOOP").await, "250 2.0.0 ok");
    assert_eq!(
        t.cmd("QUIT").await,
        "221 2.0.0 localhost closing connection"
    );
    t.closed().await;

    let mut c = Conn::connect(p.addr("relay", "submission")).await;
    assert_eq!(c.reply().await, "220 localhost ESMTP submission");
    assert!(c.cmd("EHLO client.test").await.contains("STARTTLS"));
    let auth = plain("", "alice@example.test", PASSWORD);
    c.send(format!("STARTTLS\r\nAUTH PLAIN {auth}\r\n")).await;
    assert_eq!(c.reply().await, "220 2.0.0 ready to start TLS");
    let mut t = c.starttls(p.d()).await;
    assert_eq!(t.cmd("NOOP").await, "250 2.0.0 ok");
    let ehlo = t.cmd("EHLO client.test").await;
    assert!(
        ehlo.ends_with("250 AUTH SCRAM-SHA-256 PLAIN LOGIN"),
        "AUTH is still offered, so not authenticated: {ehlo}"
    );
    assert_eq!(
        t.cmd("MAIL FROM:<alice@example.test>").await,
        "530 5.7.0 authentication required"
    );
    assert_eq!(
        t.cmd("QUIT").await,
        "221 2.0.0 localhost closing connection"
    );
    t.closed().await;

    let mut c = Conn::connect(p.addr("access", "imap")).await;
    assert!(c.line().await.starts_with("* OK [CAPABILITY "));
    c.send(format!(
        "a STARTTLS\r\nb LOGIN alice@example.test \"{PASSWORD}\"\r\n"
    ))
    .await;
    assert_eq!(c.line().await, "a OK Begin TLS negotiation now");
    let mut t = c.starttls(p.d()).await;
    t.send("c NOOP\r\n").await;
    assert_eq!(t.line().await, "c OK NOOP completed");
    t.send("d LOGOUT\r\n").await;
    assert_eq!(t.line().await, "* BYE Logging out");
    assert_eq!(t.line().await, "d OK LOGOUT completed");
    t.closed().await;

    let mut c = Conn::connect(p.addr("access", "pop3")).await;
    assert_eq!(c.line().await, "+OK localhost POP3 ready");
    c.send("STLS\r\nUSER alice@example.test\r\n").await;
    assert_eq!(c.line().await, "+OK Begin TLS negotiation");
    let mut t = c.starttls(p.d()).await;
    t.send(format!("PASS {PASSWORD}\r\n")).await;
    assert_eq!(t.line().await, "-ERR USER first");
    t.send("QUIT\r\n").await;
    assert_eq!(t.line().await, "+OK localhost Bye");
    t.closed().await;

    p.assert_nothing_queued_or_delivered();
}

/// authzid != authcid from a principal that is not the proxy: alice's own password with
/// authzid bob is refused at the proxy (IMAP and POP3), at the relay (`535 5.7.8`) and
/// directly at bob's filer, where only the proxy's trusted login is accepted. Alice and bob
/// still log in as themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acting_for_another_user_is_refused_everywhere() {
    let p = Platform::start(|_| {});
    let as_bob = plain("bob@example.test", "alice@example.test", PASSWORD);

    let mut c = Conn::connect(p.addr("access", "imap")).await;
    c.line().await;
    c.send(format!("a AUTHENTICATE PLAIN {as_bob}\r\n")).await;
    assert_eq!(
        c.line().await,
        "a NO [AUTHENTICATIONFAILED] Authentication failed"
    );
    c.send(format!(
        "b AUTHENTICATE PLAIN {}\r\n",
        plain("", "alice@example.test", PASSWORD)
    ))
    .await;
    assert!(c.line().await.starts_with("b OK [CAPABILITY "));
    c.send("c SELECT INBOX\r\n").await;
    let selected = c.until_tagged("c").await;
    assert!(selected.last().unwrap().starts_with("c OK"), "{selected:?}");

    let mut c = Conn::connect(p.addr("access", "pop3")).await;
    c.line().await;
    c.send(format!("AUTH PLAIN {as_bob}\r\n")).await;
    assert_eq!(c.line().await, "-ERR [AUTH] Authentication failed");

    let mut c = Conn::connect(p.addr("relay", "submission")).await;
    c.reply().await;
    c.cmd("EHLO client.test").await;
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {as_bob}")).await,
        "535 5.7.8 authentication credentials invalid"
    );
    assert_eq!(
        c.cmd(&format!(
            "AUTH PLAIN {}",
            plain("", "alice@example.test", PASSWORD)
        ))
        .await,
        "235 2.7.0 authentication successful"
    );

    // Directly at bob's filer (from loopback, inside trust.proxy_networks): a user's password,
    // with or without the proxy principal's name, is no trusted login.
    let mut c = Conn::connect(p.addr("filer2", "imap")).await;
    assert!(c.line().await.starts_with("* OK "));
    for (i, token) in [
        as_bob.clone(),
        plain("bob@example.test", "proxy", PASSWORD),
        plain("", "bob@example.test", PASSWORD),
    ]
    .iter()
    .enumerate()
    {
        c.send(format!("a{i} AUTHENTICATE PLAIN {token}\r\n")).await;
        assert_eq!(
            c.line().await,
            format!("a{i} NO [AUTHENTICATIONFAILED] authentication failed")
        );
    }
    c.send("b SELECT INBOX\r\n").await;
    assert_eq!(c.line().await, "b BAD authenticate first");

    let mut c = Conn::connect(p.addr("access", "imap")).await;
    c.line().await;
    c.send(format!("a LOGIN bob@example.test \"{PASSWORD}\"\r\n"))
        .await;
    assert!(c.line().await.starts_with("a OK [CAPABILITY "));
    p.assert_nothing_queued_or_delivered();
}

/// Slowloris: one byte every second, never a whole command, on every listener. Each
/// connection is closed once its time budget is spent (3 s here), with its protocol's goodbye,
/// although bytes keep arriving: the per-command deadline of SMTP and LMTP (spool MX and
/// reinjection, relay submission, filter, filer LMTP), the proxy's pre-login lifetime (its idle
/// timer alone would never fire), and the handshake deadline of the implicit-TLS listeners
/// (relay submissions, IMAPS, POP3S), which close without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_off_on_every_listener() {
    let budget = Duration::from_secs(3);
    let p = Platform::start(|c| {
        set(c, "spool", "command_timeout", "3s");
        set(c, "relay", "command_timeout", "3s");
        set(c, "filter", "enabled", true);
        set(c, "filter", "timeout", "3s");
        set(c, "filers", "lmtp_timeout", "3s");
        set(c, "access", "prelogin_lifetime", "3s");
        set(c, "access", "prelogin_timeout", "3s");
    });
    let timeout_421: &[&str] = &["421 4.4.2 timeout exceeded, closing connection"];
    let cases = [
        ("spool", "smtp", Trickle::Command, timeout_421),
        ("spool", "reinject", Trickle::Command, timeout_421),
        ("relay", "submission", Trickle::Command, timeout_421),
        ("relay", "submissions", Trickle::Handshake, &[]),
        ("filter", "smtp", Trickle::Command, timeout_421),
        ("filer1", "lmtp", Trickle::Command, timeout_421),
        (
            "access",
            "imap",
            Trickle::Command,
            &["* BYE Took too long to log in"],
        ),
        ("access", "imaps", Trickle::Handshake, &[]),
        (
            "access",
            "pop3",
            Trickle::Command,
            &["-ERR Took too long to log in"],
        ),
        ("access", "pop3s", Trickle::Handshake, &[]),
    ];
    let runs: Vec<_> = cases
        .iter()
        .map(|(service, protocol, how, _)| tokio::spawn(slowloris(p.addr(service, protocol), *how)))
        .collect();
    for ((service, protocol, _, goodbye), run) in cases.iter().zip(runs) {
        let (lines, took) = run.await.unwrap();
        assert_eq!(lines, *goodbye, "{service} {protocol}");
        assert!(
            took >= budget - Duration::from_millis(100) && took < budget + Duration::from_secs(3),
            "{service} {protocol}: closed after {took:?}"
        );
    }
}

/// Slowloris inside DATA at the spool's MX: a message that arrives at a byte a second must be
/// cut off within a bounded time, as a command is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_inside_data_is_cut_off() {
    let p = Platform::start(|c| {
        set(c, "spool", "command_timeout", "3s");
        set(c, "spool", "data_timeout", "3s");
    });
    let (lines, took) = slowloris(p.addr("spool", "smtp"), Trickle::Data).await;
    assert!(
        lines.len() == 1 && lines[0].starts_with("421 4.4.2 "),
        "{lines:?} after {took:?}"
    );
    p.assert_nothing_queued_or_delivered();
}

/// Slowloris on the filers' IMAP and POP3 listeners (which only the proxy should reach, from
/// `trust.proxy_networks`): a peer that keeps sending a byte a second before logging in must
/// be cut off within a bounded time, as on every other listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_off_on_the_filers_imap_and_pop3() {
    let p = Platform::start(|_| {});
    let runs: Vec<_> = ["imap", "pop3"]
        .iter()
        .map(|protocol| tokio::spawn(slowloris(p.addr("filer1", protocol), Trickle::Command)))
        .collect();
    for (protocol, run) in ["imap", "pop3"].iter().zip(runs) {
        let (lines, took) = run.await.unwrap();
        let goodbye = if *protocol == "imap" { "* BYE" } else { "-ERR" };
        assert!(
            lines.len() == 1 && lines[0].starts_with(goodbye),
            "filer1 {protocol}: {lines:?}"
        );
        assert!(took < SLOWLORIS_LIMIT, "filer1 {protocol}: {took:?}");
    }
}

/// How long [`slowloris`] keeps trickling before it gives up on the server.
const SLOWLORIS_LIMIT: Duration = Duration::from_secs(12);

/// What a slowloris client trickles, and where.
#[derive(Debug, Clone, Copy)]
enum Trickle {
    /// After the greeting, a command that never ends.
    Command,
    /// After the greeting, `HELO`, `MAIL`, `RCPT` and `DATA` (SMTP): a message that never ends.
    Data,
    /// Before the greeting of an implicit-TLS listener: a TLS record that never ends.
    Handshake,
}

/// Connects to `addr` and sends one byte a second (see [`Trickle`]) until the server closes
/// the connection, for at most [`SLOWLORIS_LIMIT`]. Returns what the server sent after the
/// greeting (and the replies to the `Data` commands) and the time from the connect to the close.
async fn slowloris(addr: SocketAddr, how: Trickle) -> (Vec<String>, Duration) {
    let t = Instant::now();
    let (r, mut w) = TcpStream::connect(addr).await.unwrap().into_split();
    let mut r = Conn::new(r);
    let mut bytes: &'static [u8] = b"NOOP ";
    match how {
        Trickle::Command => {
            r.line().await;
        }
        Trickle::Data => {
            r.line().await;
            w.write_all(
                b"HELO client.test\r\nMAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n",
            )
            .await
            .unwrap();
            for want in ["250 ", "250 2.1.0", "250 2.1.5", "354 "] {
                let l = r.line().await;
                assert!(l.starts_with(want), "{addr}: {l}");
            }
            bytes = b"Subject: slow\r\n\r\n";
        }
        // A handshake record of 512 bytes: the server waits for all of it.
        Trickle::Handshake => bytes = &[0x16, 0x03, 0x01, 0x02, 0x00],
    }
    let trickle = tokio::spawn(async move {
        for b in bytes.iter().chain(std::iter::repeat(&b'x')) {
            if w.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await; // the load itself: a byte a second
        }
    });
    let mut lines = Vec::new();
    let deadline = t + SLOWLORIS_LIMIT;
    loop {
        match tokio::time::timeout_at(deadline, r.read_line_or_close()).await {
            Ok(Some(l)) => lines.push(l),
            Ok(None) => break,
            Err(_) => {
                trickle.abort();
                panic!("{addr} {how:?}: still open after {SLOWLORIS_LIMIT:?}, sent {lines:?}");
            }
        }
    }
    trickle.abort();
    (lines, t.elapsed())
}

/// MIME bombs through the whole chain (spool, filter, spool, filer): 100,000 parts, 1,000
/// nesting levels and 100,000 addresses in `To:` are accepted, delivered within bounded time,
/// and the filer then answers FETCH BODYSTRUCTURE and ENVELOPE through the proxy without
/// hanging; a 50 MB header is over the 25 MiB limit and refused with `552 5.3.4`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mime_bombs_are_delivered_or_refused_and_fetchable_in_bounded_time() {
    let p = Platform::start(|c| {
        set(c, "filter", "enabled", true);
    });
    let parts = {
        let mut m = String::from(
            "Subject: parts\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n",
        );
        m.push_str(&"--b\r\n\r\nx\r\n".repeat(100_000));
        m.push_str("--b--\r\n");
        m
    };
    let nested = {
        let mut m = String::from("Subject: nested\r\nMIME-Version: 1.0\r\n");
        for i in 0..1_000 {
            m.push_str(&format!(
                "Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n"
            ));
        }
        m.push_str("Content-Type: text/plain\r\n\r\ndeep\r\n");
        for i in (0..1_000).rev() {
            m.push_str(&format!("--b{i}--\r\n"));
        }
        m
    };
    let addresses = {
        let to: Vec<String> = (0..100_000).map(|i| format!("r{i}@example.org")).collect();
        format!(
            "Subject: addresses\r\nTo: {}\r\n\r\nmany\r\n",
            to.join(",\r\n\t")
        )
    };
    let mut c = Conn::connect(p.addr("spool", "smtp")).await;
    assert_eq!(c.reply().await, "220 localhost ESMTP");
    c.cmd("EHLO client.test").await;
    for (i, msg) in [&parts, &nested, &addresses].iter().enumerate() {
        let t = Instant::now();
        c.send_message(
            "sender@remote.test",
            &["alice@example.test"],
            msg.as_bytes(),
        )
        .await;
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
        // One at a time, so their UIDs follow this order.
        wait_for_maildir(&p.root("filer1"), "alice@example.test", i + 1);
    }

    // 50 MB of header, folded into lines of 78: over the limit, read to its end and refused.
    let huge = {
        let mut m = String::with_capacity(51_000_000);
        m.push_str("Subject: huge header\r\nX-Huge: x");
        while m.len() < 50_000_000 {
            m.push_str("\r\n\t");
            m.push_str(&"h".repeat(76));
        }
        m.push_str("\r\n\r\nbody\r\n.\r\n");
        m
    };
    c.send("MAIL FROM:<sender@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        .await;
    c.reply().await;
    c.reply().await;
    assert!(c.reply().await.starts_with("354 "));
    let t = Instant::now();
    c.send(&huge).await;
    assert_eq!(
        c.reply().await,
        "552 5.3.4 message size exceeds fixed maximum message size"
    );
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert_eq!(c.cmd("NOOP").await, "250 2.0.0 ok");
    assert_eq!(
        c.cmd("QUIT").await,
        "221 2.0.0 localhost closing connection"
    );
    p.wait_for_empty_queue();
    for m in p.inbox("alice@example.test") {
        assert!(m.contains("\r\nX-Spam-Status: "), "filtered: {}", &m[..300]);
    }

    let mut c = Conn::connect(p.addr("access", "imap")).await;
    c.line().await;
    c.send(format!("a LOGIN alice@example.test \"{PASSWORD}\"\r\n"))
        .await;
    assert!(c.line().await.starts_with("a OK "));
    c.send("b SELECT INBOX\r\n").await;
    let selected = c.until_tagged("b").await;
    assert!(selected.contains(&"* 3 EXISTS".to_owned()), "{selected:?}");
    let t = Instant::now();
    c.send("c FETCH 1:3 (BODYSTRUCTURE)\r\n").await;
    let fetched = c.until_tagged("c").await;
    assert_eq!(fetched.last().unwrap(), "c OK FETCH completed");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    let structures: Vec<&String> = fetched
        .iter()
        .filter(|l| l.contains(" FETCH (BODYSTRUCTURE "))
        .collect();
    assert_eq!(
        structures.len(),
        3,
        "{:?}",
        &fetched[..fetched.len().min(3)]
    );
    // The filer splits a message into at most 10,000 parts (as Dovecot does); the rest stay
    // inside their parent's body.
    let leaves = structures[0].matches("(\"TEXT\" \"plain\"").count();
    assert_eq!(leaves, 10_000, "{}", &structures[0][..300]);
    let t = Instant::now();
    c.send("d FETCH 3 (ENVELOPE)\r\n").await;
    let envelope = c.until_tagged("d").await;
    assert_eq!(envelope.last().unwrap(), "d OK FETCH completed");
    assert!(
        envelope
            .iter()
            .any(|l| l.contains("\"r99999\" \"example.org\"")),
        "the last address is in the envelope"
    );
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    c.send("e LOGOUT\r\n").await;
    c.until_tagged("e").await;
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A running platform in its own directory: `example.test` with alice on filer1 and bob on
/// filer2, both with [`PASSWORD`].
struct Platform {
    dir: tempfile::TempDir,
    up: Up,
    log: Option<PathBuf>,
}

impl Platform {
    /// Starts the platform with [`EPHEMERAL_CONFIG`] changed by `edit`.
    fn start(edit: impl FnOnce(&mut toml::Table)) -> Self {
        Self::start_inner(edit, false)
    }

    /// Like [`Platform::start`], keeping the platform's log.
    fn start_logging(edit: impl FnOnce(&mut toml::Table)) -> Self {
        Self::start_inner(edit, true)
    }

    fn start_inner(edit: impl FnOnce(&mut toml::Table), logging: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut config: toml::Table = EPHEMERAL_CONFIG.parse().unwrap();
        edit(&mut config);
        std::fs::write(d.join(CONFIG), toml::to_string(&config).unwrap()).unwrap();
        ok(d, &["-c", CONFIG, "domain", "add", "example.test"], None);
        for (user, filer) in [
            ("alice@example.test", "filer1"),
            ("bob@example.test", "filer2"),
        ] {
            ok(
                d,
                &["-c", CONFIG, "user", "add", user, "--filer", filer],
                Some(&format!("{PASSWORD}\n")),
            );
        }
        let log = logging.then(|| d.join("platform.log"));
        let up = match &log {
            Some(log) => Up::start_logging(d, CONFIG, log),
            None => Up::start(d, CONFIG),
        };
        Self { dir, up, log }
    }

    fn d(&self) -> &Path {
        self.dir.path()
    }

    fn addr(&self, service: &str, protocol: &str) -> SocketAddr {
        self.up.addr(service, protocol)
    }

    /// A filer's mail root.
    fn root(&self, filer: &str) -> PathBuf {
        self.d().join("data/filers").join(filer)
    }

    /// `user`'s INBOX on its filer.
    fn inbox(&self, user: &str) -> Vec<String> {
        let filer = if user.starts_with("alice") {
            "filer1"
        } else {
            "filer2"
        };
        maildir(&self.root(filer), user)
    }

    /// `mailctl queue list --json`: the spool's and the relay's queues.
    fn queue(&self) -> Vec<serde_json::Value> {
        let out = ok(self.d(), &["-c", CONFIG, "queue", "list", "--json"], None);
        serde_json::from_str::<serde_json::Value>(&out)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    /// Waits (with a deadline) until both queues are empty.
    fn wait_for_empty_queue(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let q = self.queue();
            if q.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "the queue never emptied: {q:#?}");
            std::thread::sleep(Duration::from_millis(20)); // polling interval, not synchronisation
        }
    }

    /// Nothing is queued anywhere and neither user got mail.
    fn assert_nothing_queued_or_delivered(&self) {
        assert_eq!(self.queue(), Vec::<serde_json::Value>::new());
        for user in ["alice@example.test", "bob@example.test"] {
            assert_eq!(self.inbox(user), Vec::<String>::new(), "{user}");
        }
    }

    /// The resident memory of the `mailctl up` process, in bytes, once every service is
    /// serving: each listener with a greeting has sent it (the relay and the proxy greet only
    /// once their password verifier, with its argon2 memory, is set up).
    async fn settled_rss(&self) -> u64 {
        for (service, protocol) in [
            ("spool", "smtp"),
            ("relay", "submission"),
            ("access", "imap"),
            ("access", "pop3"),
        ] {
            Conn::connect(self.addr(service, protocol))
                .await
                .line()
                .await;
        }
        self.rss()
    }

    /// The resident memory of the `mailctl up` process, in bytes.
    fn rss(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.up.child.id())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kib * 1024
    }

    /// Waits (with a deadline) until the platform's log contains `text`; returns the log.
    fn wait_for_log(&self, text: &str) -> String {
        let path = self.log.as_ref().expect("started with start_logging");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = std::fs::read_to_string(path).unwrap_or_default();
            if log.contains(text) {
                return log;
            }
            assert!(Instant::now() < deadline, "{text:?} never logged: {log}");
            std::thread::sleep(Duration::from_millis(20)); // polling interval, not synchronisation
        }
    }
}

/// Sets `key` in `section` of a config (in every `[[filers]]` entry for `filers`).
fn set(config: &mut toml::Table, section: &str, key: &str, value: impl Into<toml::Value>) {
    let value = value.into();
    match config
        .entry(section)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
    {
        toml::Value::Table(t) => {
            t.insert(key.into(), value);
        }
        toml::Value::Array(entries) => {
            for e in entries {
                e.as_table_mut().unwrap().insert(key.into(), value.clone());
            }
        }
        other => panic!("[{section}] is {other}"),
    }
}

/// A SASL PLAIN response (RFC 4616), base64-encoded.
fn plain(authzid: &str, authcid: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{authzid}\0{authcid}\0{password}"))
}

/// The Subject of a stored message.
fn subject(msg: &str) -> String {
    msg.split("\r\nSubject: ")
        .nth(1)
        .and_then(|s| s.split("\r\n").next())
        .unwrap_or_default()
        .to_owned()
}

/// A client connection: lines and SMTP replies read with a deadline each.
struct Conn<S> {
    io: BufReader<S>,
}

impl Conn<TcpStream> {
    async fn connect(addr: SocketAddr) -> Self {
        let stream = timeout(READ_DEADLINE, TcpStream::connect(addr))
            .await
            .unwrap()
            .unwrap();
        Self::new(stream)
    }

    /// Connects from the loopback address `source`, so the proxy sees another client.
    async fn connect_from(addr: SocketAddr, source: &str) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::new(source.parse().unwrap(), 0))
            .unwrap();
        let stream = timeout(READ_DEADLINE, socket.connect(addr))
            .await
            .unwrap()
            .unwrap();
        Self::new(stream)
    }

    /// Sends `bytes` (in the background, as long as the server reads) and returns every line
    /// the server sends until it closes the connection, within [`READ_DEADLINE`].
    async fn send_until_closed(self, bytes: Vec<u8>) -> Vec<String> {
        assert!(self.io.buffer().is_empty());
        let (r, mut w) = self.io.into_inner().into_split();
        let writer = tokio::spawn(async move {
            for chunk in bytes.chunks(64 * 1024) {
                if w.write_all(chunk).await.is_err() {
                    return; // closed by the server
                }
            }
        });
        let mut r = Conn::new(r);
        let mut lines = Vec::new();
        let deadline = Instant::now() + READ_DEADLINE;
        loop {
            match tokio::time::timeout_at(deadline, r.read_line_or_close()).await {
                Ok(Some(l)) => lines.push(l),
                Ok(None) => break,
                Err(_) => panic!("not closed within {READ_DEADLINE:?}, sent {lines:?}"),
            }
        }
        writer.abort();
        lines
    }

    /// The TLS handshake after the server's go-ahead, trusting the platform's dev certificate.
    /// Nothing the server sent may be left unread: it would have come before the handshake.
    async fn starttls(self, dir: &Path) -> Conn<tokio_rustls::client::TlsStream<TcpStream>> {
        assert!(
            self.io.buffer().is_empty(),
            "more in clear text: {:?}",
            String::from_utf8_lossy(self.io.buffer())
        );
        let id = Identity::dev(&dir.join("data/tls"), "localhost").unwrap();
        let connector = tokio_rustls::TlsConnector::from(id.trusting_client_config().unwrap());
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = timeout(READ_DEADLINE, connector.connect(name, self.io.into_inner()))
            .await
            .unwrap()
            .unwrap();
        Conn::new(tls)
    }
}

impl<S: AsyncRead + Unpin> Conn<S> {
    fn new(stream: S) -> Self {
        Self {
            io: BufReader::new(stream),
        }
    }

    /// The next line without its line ending, or `None` once the server closed the connection
    /// (a reset counts as closed).
    async fn read_line_or_close(&mut self) -> Option<String> {
        let mut buf = Vec::new();
        match self.io.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) if buf.is_empty() => None,
            _ => Some(
                String::from_utf8_lossy(&buf)
                    .trim_end_matches(['\r', '\n'])
                    .to_owned(),
            ),
        }
    }

    /// The next line; fails if the server closes or says nothing within [`READ_DEADLINE`].
    async fn line(&mut self) -> String {
        timeout(READ_DEADLINE, self.read_line_or_close())
            .await
            .expect("a line within the deadline")
            .expect("a line, not the end of the connection")
    }

    /// An SMTP reply up to its last line; the lines joined with `\n`.
    async fn reply(&mut self) -> String {
        let mut lines = Vec::new();
        loop {
            let l = self.line().await;
            let last = l.as_bytes().get(3) != Some(&b'-');
            lines.push(l);
            if last {
                return lines.join("\n");
            }
        }
    }

    /// IMAP responses up to the tagged one for `tag`.
    async fn until_tagged(&mut self, tag: &str) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let l = self.line().await;
            let done = l.starts_with(&format!("{tag} "));
            lines.push(l);
            if done {
                return lines;
            }
        }
    }

    /// Expects the server to close the connection without sending anything more.
    async fn closed(&mut self) {
        let next = timeout(READ_DEADLINE, self.read_line_or_close())
            .await
            .expect("closed within the deadline");
        assert_eq!(next, None, "expected the end of the connection");
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        timeout(READ_DEADLINE, self.io.get_mut().write_all(bytes.as_ref()))
            .await
            .expect("written within the deadline")
            .unwrap();
    }

    /// Sends an SMTP command line and returns the reply.
    async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n")).await;
        self.reply().await
    }

    /// Sends [`HUGE_LINE`] bytes of `x` in 64 KiB writes.
    async fn send_huge_line(&mut self) {
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..HUGE_LINE / chunk.len() {
            self.send(&chunk).await;
        }
    }

    /// MAIL, RCPT and DATA (pipelined), the message and its end; returns the queue id.
    async fn send_message(&mut self, from: &str, to: &[&str], msg: &[u8]) -> String {
        let mut commands = format!("MAIL FROM:<{from}>\r\n");
        for t in to {
            commands.push_str(&format!("RCPT TO:<{t}>\r\n"));
        }
        commands.push_str("DATA\r\n");
        self.send(commands).await;
        let reply = self.reply().await;
        assert!(reply.starts_with("250 2.1.0"), "{reply}");
        for _ in to {
            let reply = self.reply().await;
            assert!(reply.starts_with("250 2.1.5"), "{reply}");
        }
        let reply = self.reply().await;
        assert!(reply.starts_with("354 "), "{reply}");
        self.send(msg).await;
        self.send(".\r\n").await;
        let reply = self.reply().await;
        reply
            .strip_prefix("250 2.0.0 queued as ")
            .unwrap_or_else(|| panic!("{reply}"))
            .to_owned()
    }
}
