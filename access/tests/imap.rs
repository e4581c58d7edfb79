//! The proxy's IMAP side: pre-login transcripts, limits, STARTTLS, SASL (imaplib for PLAIN and
//! LOGIN, a Rust client for SCRAM-SHA-256), the hand-off to a (fake) filer with pipelined
//! input, and failing fast when the filer is down.

mod support;

use std::time::Duration;

use base64::Engine as _;
use common::location::{Directory, Filer, FilerState, NewMailbox};
use support::{B64, FakeFiler, PASSWORD, Scram, SilentFiler, connect, python, start, tls};
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prelogin_commands_are_answered_by_the_proxy() {
    let p = start(|_| {}).await;
    let mut c = connect(p.imap).await;
    c.play(
        "S: * OK [CAPABILITY IMAP4rev1 SASL-IR ID STARTTLS AUTH=SCRAM-SHA-256 AUTH=PLAIN AUTH=LOGIN]
         C: a CAPABILITY
         S: * CAPABILITY IMAP4rev1 SASL-IR ID STARTTLS AUTH=SCRAM-SHA-256 AUTH=PLAIN AUTH=LOGIN
         S: a OK CAPABILITY completed
         C: b NOOP
         S: b OK NOOP
         C: c ID (\"name\" \"test\")
         S: * ID (\"name\" \"mail-platform access\")
         S: c OK ID
         C: d LOGOUT
         S: * BYE
         S: d OK LOGOUT
         S: <closed>",
    )
    .await;
    assert!(p.filer.received().is_empty(), "nothing reached the filer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_login_is_refused_where_the_listener_does_not_allow_it() {
    let p = start(|s| s.plaintext_on_loopback = false).await;
    let mut c = connect(p.imap).await;
    c.play(
        "S: * OK [CAPABILITY IMAP4rev1 SASL-IR ID STARTTLS LOGINDISABLED]
         C: a LOGIN a@example.test pencil
         S: a NO [PRIVACYREQUIRED]
         C: b AUTHENTICATE PLAIN AGFAZXhhbXBsZS50ZXN0AHBlbmNpbA==
         S: b NO [PRIVACYREQUIRED]
         C: c STARTTLS
         S: c OK",
    )
    .await;
    let mut t = tls(&p, c.into_inner()).await;
    t.play(
        "C: d CAPABILITY
         S: * CAPABILITY IMAP4rev1 SASL-IR ID AUTH=SCRAM-SHA-256 AUTH=PLAIN AUTH=LOGIN
         S: d OK
         C: e LOGIN a@example.test pencil
         S: e OK [CAPABILITY IMAP4rev1 FAKE-FILER] Logged in
         C: f NOOP
         S: f OK NOOP (fake)",
    )
    .await;
    // Implicit TLS allows logins at once.
    let s = tokio::net::TcpStream::connect(p.imaps).await.unwrap();
    let mut t = tls(&p, s).await;
    t.play(
        "S: * OK [CAPABILITY IMAP4rev1 SASL-IR ID AUTH=SCRAM-SHA-256 AUTH=PLAIN AUTH=LOGIN]
         C: a LOGIN b@example.test pencil
         S: a OK [CAPABILITY IMAP4rev1 FAKE-FILER] Logged in",
    )
    .await;
    assert_eq!(p.filer.logins(), ["a@example.test", "b@example.test"]);
}

/// Regression: a command pipelined behind STARTTLS in the same segment must not be answered
/// (it was sent in clear and could be injected by a man in the middle).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_discards_commands_pipelined_before_the_handshake() {
    let p = start(|_| {}).await;
    let mut c = connect(p.imap).await;
    c.play(
        "S: * OK
         R: a STARTTLS\\r\\nb NOOP\\r\\n
         S: a OK Begin TLS",
    )
    .await;
    let mut t = tls(&p, c.into_inner()).await;
    t.play(
        "C: c NOOP
         S: c OK NOOP completed",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_commands_disconnect_and_unparsed_commands_are_refused_by_name() {
    let p = start(|_| {}).await;
    let mut c = connect(p.imap).await;
    c.play(
        "S: * OK
         C: a SELECT INBOX
         S: a BAD Command not available before login
         C: b FETCH 1:* (BODY[])
         S: b BAD Command not available before login
         C: c LOGIN
         S: c BAD Syntax error
         C: nonsense
         S: * BAD
         C: e XYZZY
         S: e BAD
         S: * BYE Too many bad commands
         S: <closed>",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn literals_are_bounded_before_login() {
    let p = start(|_| {}).await;
    let mut c = connect(p.imap).await;
    // Within the limit: the go-ahead, then the literal is taken as the user name.
    c.play(
        "S: * OK
         C: a LOGIN {14}
         S: + Ready
         C: a@example.test pencil
         S: a OK [CAPABILITY IMAP4rev1 FAKE-FILER] Logged in",
    )
    .await;
    // Over the limit: refused before the client sends it; the connection goes on.
    let mut c = connect(p.imap).await;
    c.play(
        "S: * OK
         C: a LOGIN {9000}
         S: a BAD [TOOBIG]
         C: b NOOP
         S: b OK",
    )
    .await;
    // A non-synchronising literal over the limit closes the connection.
    let mut c = connect(p.imap).await;
    c.play(
        "S: * OK
         C: a LOGIN {100000+}
         S: * BYE [TOOBIG]
         S: <closed>",
    )
    .await;
    // A line that never ends is cut off.
    let mut c = connect(p.imap).await;
    c.play("S: * OK").await;
    c.send(&format!("a NOOP {}", "x".repeat(20_000))).await;
    c.play(
        "S: * BYE Line too long
         S: <closed>",
    )
    .await;
}

/// Bytes the client pipelines behind its login reach the filer, after the trusted login and
/// the `ID` with the client's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_hands_over_to_the_filer_with_pipelined_commands() {
    let p = start(|_| {}).await;
    let mut c = connect(p.imap).await;
    c.play(
        "S: * OK
         R: a LOGIN \"A@Example.test\" pencil\\r\\nb SELECT INBOX\\r\\nc NOOP\\r\\n
         S: a OK [CAPABILITY IMAP4rev1 FAKE-FILER] Logged in
         S: b OK SELECT (fake)
         S: c OK NOOP (fake)
         C: d LOGOUT
         S: * BYE fake
         S: d OK LOGOUT
         S: <closed>",
    )
    .await;
    let got = p.filer.received();
    assert!(
        got[0].starts_with("P1 ID (\"x-originating-ip\" \"127.0.0.1\" \"x-originating-port\" \""),
        "{got:?}"
    );
    assert!(got[1].starts_with("P2 AUTHENTICATE PLAIN "), "{got:?}");
    assert_eq!(&got[2..], ["b SELECT INBOX", "c NOOP", "d LOGOUT"]);
    assert_eq!(p.filer.logins(), ["a@example.test"]);
}

/// Wrong password, unknown user and disabled mailbox get one answer; a few failures close the
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_look_the_same_and_disconnect() {
    let p = start(|_| {}).await;
    let mut c = connect(p.imap).await;
    c.play(
        "S: * OK
         C: a LOGIN a@example.test wrong
         S: a NO [AUTHENTICATIONFAILED] Authentication failed
         C: b LOGIN nobody@example.test pencil
         S: b NO [AUTHENTICATIONFAILED] Authentication failed
         C: c LOGIN off@example.test pencil
         S: c NO [AUTHENTICATIONFAILED] Authentication failed
         S: * BYE Too many failed logins
         S: <closed>",
    )
    .await;
    assert!(p.filer.logins().is_empty());
}

/// A user name carrying a quote, CRLF and a command cannot inject anything into the filer
/// session: the proxy logs in there with SASL (base64), and such a name is no address anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_name_with_crlf_and_quotes_injects_nothing() {
    let p = start(|_| {}).await;
    let user = "a@example.test\"\r\nx LOGOUT";
    let mut c = connect(p.imap).await;
    c.play("S: * OK").await;
    c.send(&format!("a LOGIN {{{}}}\r\n", user.len())).await;
    assert!(c.line().await.starts_with("+ "));
    c.send(&format!("{user} pencil\r\n")).await;
    c.play(
        "S: a NO [AUTHENTICATIONFAILED]
         C: b LOGIN {15}
         S: +
         C: a@example.test\" pencil
         S: b NO [AUTHENTICATIONFAILED]",
    )
    .await;
    assert!(p.filer.received().is_empty(), "{:?}", p.filer.received());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imaplib_plain_login_and_authenticate_login() {
    let p = start(|_| {}).await;
    let script = r#"
import imaplib, sys
host, port = sys.argv[1], int(sys.argv[2])
out = []
m = imaplib.IMAP4(host, port, timeout=10)
assert "AUTH=PLAIN" in m.capabilities and "AUTH=SCRAM-SHA-256" in m.capabilities, m.capabilities
typ, data = m.authenticate("PLAIN", lambda _: b"\0a@example.test\0pencil")
out.append(typ)
out.append(m.noop()[0])
m.logout()
m = imaplib.IMAP4(host, port, timeout=10)
out.append(m.login("b@example.test", "pencil")[0])
m.logout()
m = imaplib.IMAP4(host, port, timeout=10)
answers = iter([b"a@example.test", b"pencil"])
out.append(m.authenticate("LOGIN", lambda _: next(answers))[0])
m.logout()
m = imaplib.IMAP4(host, port, timeout=10)
try:
    m.authenticate("PLAIN", lambda _: b"\0a@example.test\0wrong")
    out.append("accepted")
except imaplib.IMAP4.error as e:
    out.append(str(e))
print(" ".join(out))
"#;
    let out = python(
        script,
        &[&p.imap.ip().to_string(), &p.imap.port().to_string()],
    );
    assert_eq!(
        out.trim(),
        "OK OK OK OK [AUTHENTICATIONFAILED] Authentication failed"
    );
    assert_eq!(
        p.filer.logins(),
        ["a@example.test", "b@example.test", "a@example.test"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_sha_256_with_and_without_initial_response() {
    let p = start(|_| {}).await;
    for (password, sasl_ir) in [(PASSWORD, true), (PASSWORD, false), ("wrong", true)] {
        let mut c = connect(p.imap).await;
        c.play("S: * OK").await;
        let mut scram = Scram::new("a@example.test", password);
        if sasl_ir {
            c.send(&format!(
                "a AUTHENTICATE SCRAM-SHA-256 {}\r\n",
                B64.encode(scram.first())
            ))
            .await;
        } else {
            c.send("a AUTHENTICATE SCRAM-SHA-256\r\n").await;
            assert_eq!(c.line().await, "+ ");
            c.send(&format!("{}\r\n", B64.encode(scram.first()))).await;
        }
        let server_first = c.line().await;
        let server_first = B64
            .decode(server_first.strip_prefix("+ ").unwrap())
            .unwrap();
        c.send(&format!("{}\r\n", B64.encode(scram.last(&server_first))))
            .await;
        let answer = c.line().await;
        if password == PASSWORD {
            let server_final = B64.decode(answer.strip_prefix("+ ").unwrap()).unwrap();
            assert!(scram.verifies(&server_final), "the server knows the key");
            c.send("\r\n").await;
            assert_eq!(
                c.line().await,
                "a OK [CAPABILITY IMAP4rev1 FAKE-FILER] Logged in"
            );
        } else {
            assert_eq!(answer, "a NO [AUTHENTICATIONFAILED] Authentication failed");
        }
    }
    assert_eq!(p.filer.logins(), ["a@example.test", "a@example.test"]);
}

/// The filer cannot be reached: `NO [UNAVAILABLE]` at once and the connection closes; once
/// several connections saw it fail, the answer comes without a connection attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filer_that_is_down_gets_unavailable_at_once() {
    let p = start(|_| {}).await;
    for _ in 0..4 {
        let mut c = connect(p.imap).await;
        c.play("S: * OK").await;
        let t = Instant::now();
        c.play(
            "C: a LOGIN dead@example.test pencil
             S: a NO [UNAVAILABLE]
             S: * BYE
             S: <closed>",
        )
        .await;
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }
    // Users on other filers are not affected; a mailbox being moved gets the same answer.
    let mut c = connect(p.imap).await;
    c.play(
        "S: * OK
         C: a LOGIN a@example.test pencil
         S: a OK [CAPABILITY",
    )
    .await;
    let mut c = connect(p.imap).await;
    c.play(
        "S: * OK
         C: a LOGIN moving@example.test pencil
         S: a NO [UNAVAILABLE] mailbox is being moved
         S: * BYE
         S: <closed>",
    )
    .await;
}

/// A filer refusing the trusted login (a wrong secret, say) is a temporary failure for the
/// user, and does not mark the filer down for everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filer_refusing_the_trusted_login_fails_fast_without_marking_it_down() {
    let p = start(|_| {}).await;
    let refusing = FakeFiler::start("another-secret-0123456789").await;
    p.db.add_filer(&Filer {
        name: "refusing".into(),
        lmtp: "127.0.0.1:1".into(),
        imap: refusing.imap.to_string(),
        pop3: refusing.pop3.to_string(),
        state: FilerState::Up,
        weight: 1,
    })
    .await
    .unwrap();
    p.db.add_mailbox(NewMailbox {
        address: "r@example.test".into(),
        credentials: common::location::Credentials::from_password(PASSWORD).unwrap(),
        quota: 0,
        filer: Some("refusing".into()),
    })
    .await
    .unwrap();
    for _ in 0..5 {
        let mut c = connect(p.imap).await;
        c.play(
            "S: * OK
             C: a LOGIN r@example.test pencil
             S: a NO [UNAVAILABLE]
             S: * BYE
             S: <closed>",
        )
        .await;
    }
    // Still tried every time: five connections reached the refusing filer.
    let attempts = refusing
        .received()
        .iter()
        .filter(|l| l.starts_with("P2 AUTHENTICATE"))
        .count();
    assert_eq!(attempts, 5);
}

/// A hung filer costs the login timeout until several connections saw it fail; then the answer
/// is immediate, with no connection attempt, and once the filer is back a probe after the
/// cooldown lets logins through again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_circuit_breaker_answers_at_once_and_probes_after_the_cooldown() {
    use std::sync::atomic::Ordering;
    let p = start(|s| {
        s.filer_login_timeout = Duration::from_millis(300);
        s.breaker.cooldown = Duration::from_millis(500);
    })
    .await;
    let hung = SilentFiler::start().await;
    p.db.add_filer(&Filer {
        name: "hung".into(),
        lmtp: "127.0.0.1:1".into(),
        imap: hung.addr.to_string(),
        pop3: hung.addr.to_string(),
        state: FilerState::Up,
        weight: 1,
    })
    .await
    .unwrap();
    p.db.add_mailbox(NewMailbox {
        address: "h@example.test".into(),
        credentials: common::location::Credentials::from_password(PASSWORD).unwrap(),
        quota: 0,
        filer: Some("hung".into()),
    })
    .await
    .unwrap();
    let login = |expect: &'static str| {
        let addr = p.imap;
        async move {
            let mut c = connect(addr).await;
            c.play("S: * OK").await;
            let t = Instant::now();
            c.play(&format!("C: a LOGIN h@example.test pencil\nS: {expect}"))
                .await;
            t.elapsed()
        }
    };
    // The login itself (argon2) takes a while; the filer's share is the 300 ms timeout.
    for _ in 0..3 {
        let took = login("a NO [UNAVAILABLE]").await;
        assert!(took >= Duration::from_millis(300), "{took:?}");
    }
    assert_eq!(hung.accepted.load(Ordering::SeqCst), 3);
    let took = login("a NO [UNAVAILABLE]").await;
    assert_eq!(
        hung.accepted.load(Ordering::SeqCst),
        3,
        "no connection attempt"
    );
    assert!(took < Duration::from_millis(300), "{took:?}");
    // The filer comes back: after the cooldown, a probe goes through and logins work again.
    hung.healthy.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = connect(p.imap).await;
        c.play("S: * OK\nC: a LOGIN h@example.test pencil").await;
        let answer = c.line().await;
        if answer.starts_with("a OK [CAPABILITY IMAP4rev1 FAKE-FILER]") {
            break;
        }
        assert!(answer.starts_with("a NO [UNAVAILABLE]"), "{answer}");
        assert!(Instant::now() < deadline, "the filer never came back");
    }
    assert!(hung.accepted.load(Ordering::SeqCst) >= 4);
}
