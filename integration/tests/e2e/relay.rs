//! The relay inside `mailctl up`: submission with lettre's async client and Python's smtplib
//! (AUTH PLAIN and LOGIN over STARTTLS), outbound delivery to a fake remote MX through the
//! route map (one result per recipient, a DSN for the refused one), hosted recipients through
//! the spool, the submission policy (AUTH before MAIL, only over TLS, own addresses only, the
//! limits), and a remote MX that is down and comes back.

use std::path::Path;
use std::time::Duration;

use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::support::{EPHEMERAL_CONFIG, FakeMx, Up, ok, wait_for_maildir};

/// The ephemeral config with `remote.test` routed to `mx`, plus `extra` lines in `[relay]`.
fn config(d: &Path, mx: std::net::SocketAddr, extra: &str) {
    let cfg = EPHEMERAL_CONFIG.replace("[relay]\n", &format!("[relay]\n{extra}"))
        + &format!("\n[relay.routes]\n\"remote.test\" = \"{mx}\"\n");
    std::fs::write(d.join("mail.toml"), cfg).unwrap();
    ok(
        d,
        &["-c", "mail.toml", "domain", "add", "example.test"],
        None,
    );
    for (user, filer) in [
        ("alice@example.test", "filer1"),
        ("bob@example.test", "filer2"),
    ] {
        ok(
            d,
            &["-c", "mail.toml", "user", "add", user, "--filer", filer],
            Some("secret pw\n"),
        );
    }
    ok(
        d,
        &[
            "-c",
            "mail.toml",
            "alias",
            "add",
            "sales@example.test",
            "alice@example.test",
        ],
        None,
    );
}

fn lettre(port: u16, user: &str, mechanism: Mechanism) -> AsyncSmtpTransport<Tokio1Executor> {
    let tls = TlsParameters::builder("localhost".into())
        .dangerous_accept_invalid_certs(true)
        .build()
        .unwrap();
    AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(port)
        .tls(Tls::Required(tls))
        .credentials(Credentials::new(user.into(), "secret pw".into()))
        .authentication(vec![mechanism])
        .timeout(Some(Duration::from_secs(10)))
        .build()
}

fn mailbox(s: &str) -> Mailbox {
    s.parse().unwrap()
}

fn run_python(script: &str, port: u16) -> serde_json::Value {
    let out = std::process::Command::new("python3")
        .args(["-c", script, "127.0.0.1", &port.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lettre_and_smtplib_submit_and_each_recipient_gets_its_own_result() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mx = FakeMx::start("127.0.0.1:0").await;
    config(d, mx.addr, "");
    let record = ok(
        d,
        &["-c", "mail.toml", "dkim", "generate", "example.test"],
        None,
    );
    assert!(record.contains("mail._domainkey.example.test"), "{record}");
    let up = Up::start(d, "mail.toml");
    let port = up.addr("relay", "submission").port();

    // lettre, AUTH PLAIN over STARTTLS: three remote recipients, the MX refuses one.
    let msg = Message::builder()
        .from(mailbox("Alice <alice@example.test>"))
        .to(mailbox("x@remote.test"))
        .cc(mailbox("y@remote.test"))
        .bcc(mailbox("reject-me@remote.test"))
        .subject("to the internet")
        .body("hello\r\n.\r\nQUIT\r\n".to_owned())
        .unwrap();
    let reply = lettre(port, "alice@example.test", Mechanism::Plain)
        .send(msg)
        .await
        .unwrap();
    assert!(reply.is_positive());
    let got = mx.wait_for(1).await;
    let mut rcpts = got[0].rcpts.clone();
    rcpts.sort();
    assert_eq!(rcpts, ["x@remote.test", "y@remote.test"]);
    assert_eq!(got[0].from, "alice@example.test");
    let data = &got[0].data;
    assert!(
        data.contains("(relay, conn "),
        "our Received: header: {data}"
    );
    assert!(data.contains("with ESMTPSA"), "{data}");
    assert!(
        data.contains("DKIM-Signature: ") && data.contains("d=example.test"),
        "signed with the domain's key: {data}"
    );
    assert!(
        !data.contains("reject-me"),
        "Bcc is not in the header: {data}"
    );
    // The dot line in the body arrived as data, not as the end of the message.
    assert!(
        data.contains("\r\n.\r\nQUIT\r\n") || data.contains("\r\n..\r\n"),
        "{data}"
    );

    // The refused recipient: a DSN in Alice's mailbox, through the spool.
    let bounces = wait_for_maildir(&d.join("data/filers/filer1"), "alice@example.test", 1);
    assert!(bounces[0].contains("multipart/report"), "{}", bounces[0]);
    assert!(
        bounces[0].contains("Final-Recipient: rfc822; reject-me@remote.test"),
        "{}",
        bounces[0]
    );
    assert!(bounces[0].contains("550 5.1.1"), "{}", bounces[0]);

    // lettre, AUTH LOGIN, to a hosted user: through the spool to Bob's filer.
    let msg = Message::builder()
        .from(mailbox("alice@example.test"))
        .to(mailbox("bob@example.test"))
        .subject("inside")
        .body("hi bob\r\n".to_owned())
        .unwrap();
    lettre(port, "alice@example.test", Mechanism::Login)
        .send(msg)
        .await
        .unwrap();
    let inbox = wait_for_maildir(&d.join("data/filers/filer2"), "bob@example.test", 1);
    assert!(inbox[0].contains("hi bob"), "{}", inbox[0]);
    assert!(inbox[0].contains("(spool, conn "), "{}", inbox[0]);
    assert!(inbox[0].contains("(relay, conn "), "{}", inbox[0]);

    // Python's smtplib: STARTTLS, login (it picks PLAIN), an alias as the sender.
    let script = r#"
import json, smtplib, ssl, sys
s = smtplib.SMTP(sys.argv[1], int(sys.argv[2]), timeout=10)
s.starttls(context=ssl._create_unverified_context())
s.login("alice@example.test", "secret pw")
s.sendmail("sales@example.test", ["z@remote.test"],
           b"From: Sales <sales@example.test>\r\nTo: z@remote.test\r\nSubject: from smtplib\r\n\r\nbare lf\nend\r\n")
s.quit()
print(json.dumps({"ok": True}))
"#;
    run_python(script, port);
    let got = mx.wait_for(2).await;
    let last = got.iter().find(|m| m.rcpts == ["z@remote.test"]).unwrap();
    assert_eq!(last.from, "sales@example.test");
    assert!(last.data.contains("bare lf\r\nend\r\n"), "{}", last.data);
    assert!(
        last.data.contains("Message-ID: <") && last.data.contains("Date: "),
        "added: {}",
        last.data
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_submission_policy_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mx = FakeMx::start("127.0.0.1:0").await;
    config(
        d,
        mx.addr,
        "messages_per_hour = 2\nmax_recipients = 2\nmax_errors = 30\nplaintext_on_loopback = false\n",
    );
    let up = Up::start(d, "mail.toml");
    let port = up.addr("relay", "submission").port();
    let script = r#"
import base64, json, smtplib, ssl, sys
r = {}
s = smtplib.SMTP(sys.argv[1], int(sys.argv[2]), timeout=10)
s.ehlo("client.test")
r["auth_offered_before_tls"] = s.has_extn("auth")
r["auth_before_tls"] = s.docmd("AUTH PLAIN", base64.b64encode(b"\0alice@example.test\0secret pw").decode())[0]
r["mail_before_tls"] = s.docmd("MAIL FROM:<alice@example.test>")[0]
s.starttls(context=ssl._create_unverified_context())
s.ehlo("client.test")
r["auth_offered_after_tls"] = s.has_extn("auth")
r["mail_before_auth"] = s.docmd("MAIL FROM:<alice@example.test>")[0]
r["wrong_password"] = s.docmd("AUTH PLAIN", base64.b64encode(b"\0alice@example.test\0wrong").decode())[0]
r["unknown_user"] = s.docmd("AUTH PLAIN", base64.b64encode(b"\0nobody@example.test\0wrong").decode())[0]
r["bad_base64"] = s.docmd("AUTH PLAIN", "!!!")[0]
s.login("alice@example.test", "secret pw")
r["spoofed_envelope"] = s.docmd("MAIL FROM:<bob@example.test>")[0]
r["null_sender"] = s.docmd("MAIL FROM:<>")[0]
r["own"] = s.docmd("MAIL FROM:<alice@example.test>")[0]
r["rcpt1"] = s.docmd("RCPT TO:<x@remote.test>")[0]
r["rcpt2"] = s.docmd("RCPT TO:<bob@example.test>")[0]
r["rcpt3"] = s.docmd("RCPT TO:<y@remote.test>")[0]
s.rset()
s.docmd("MAIL FROM:<alice@example.test>")
r["unknown_hosted"] = s.docmd("RCPT TO:<nobody@example.test>")[0]
r["routing"] = s.docmd("RCPT TO:<x%remote.test@example.test>")[0]
s.rset()
def send(headers):
    s.docmd("MAIL FROM:<alice@example.test>")
    s.docmd("RCPT TO:<x@remote.test>")
    s.docmd("DATA")
    s.send(headers + b"\r\n\r\nbody\r\n.\r\n")
    return s.getreply()[0]
r["spoofed_from"] = send(b"From: bob@example.test\r\nSubject: spoof")
r["two_froms"] = send(b"From: alice@example.test\r\nFrom: alice@example.test\r\nSubject: two")
r["display_spoof"] = send(b"From: \"ceo@bank.test\" <alice@example.test>\r\nSubject: spoof")
r["good1"] = send(b"From: Alice <alice@example.test>\r\nSubject: one")
r["good2"] = send(b"From: sales@example.test\r\nSubject: two")
r["over_hourly_limit"] = s.docmd("MAIL FROM:<alice@example.test>")[0]
s.quit()
print(json.dumps(r))
"#;
    let r = run_python(script, port);
    let want = serde_json::json!({
        "auth_offered_before_tls": false,
        "auth_before_tls": 538,
        "mail_before_tls": 530,
        "auth_offered_after_tls": true,
        "mail_before_auth": 530,
        "wrong_password": 535,
        "unknown_user": 535,
        "bad_base64": 501,
        "spoofed_envelope": 553,
        "null_sender": 553,
        "own": 250,
        "rcpt1": 250,
        "rcpt2": 250,
        "rcpt3": 452,
        "unknown_hosted": 550,
        "routing": 553,
        "spoofed_from": 553,
        "two_froms": 553,
        "display_spoof": 553,
        "good1": 250,
        "good2": 250,
        "over_hourly_limit": 450,
    });
    assert_eq!(r, want);
    // Only the two good messages went out.
    let got = mx.wait_for(2).await;
    assert!(got.iter().all(|m| m.rcpts == ["x@remote.test"]), "{got:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_mx_that_is_down_gets_the_message_when_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A port with nothing listening: bound, then closed.
    let closed: std::net::SocketAddr = ([127, 0, 0, 1], crate::support::reserved_port()).into();
    config(d, closed, "");
    let up = Up::start(d, "mail.toml");
    let port = up.addr("relay", "submissions").port();

    // Implicit TLS (port 465 style) this time.
    let tls = TlsParameters::builder("localhost".into())
        .dangerous_accept_invalid_certs(true)
        .build()
        .unwrap();
    let client = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(port)
        .tls(Tls::Wrapper(tls))
        .credentials(Credentials::new(
            "bob@example.test".into(),
            "secret pw".into(),
        ))
        .authentication(vec![Mechanism::Plain])
        .build();
    let msg = Message::builder()
        .from(mailbox("bob@example.test"))
        .to(mailbox("far@remote.test"))
        .subject("patience")
        .body("eventually\r\n".to_owned())
        .unwrap();
    client.send(msg).await.unwrap();

    // Deferred in the relay's queue, with the reason.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = ok(d, &["-c", "mail.toml", "queue", "list", "--json"], None);
        let q: serde_json::Value = serde_json::from_str(&out).unwrap();
        let deferred = q.as_array().unwrap().iter().any(|e| {
            e["queue"] == "relay"
                && e["recipients"][0]["state"] == "pending"
                && e["recipients"][0]["attempts"].as_u64() >= Some(1)
        });
        if deferred {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never deferred: {q}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // polling interval
    }
    assert!(
        crate::support::maildir(&d.join("data/filers/filer2"), "bob@example.test").is_empty(),
        "no bounce for a temporary failure"
    );

    // The MX comes back on that port: the retry delivers.
    let mx = FakeMx::start(&closed.to_string()).await;
    let got = mx.wait_for(1).await;
    assert_eq!(got[0].rcpts, ["far@remote.test"]);
    assert!(got[0].data.contains("eventually"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = ok(d, &["-c", "mail.toml", "queue", "list", "--json"], None);
        if out.trim() == "[]" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "queue never emptied: {out}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // polling interval
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_mx_that_drops_before_its_final_reply_gets_the_message_again() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Takes the whole message twice, then closes the connection instead of answering.
    let mx = FakeMx::start_dropping("127.0.0.1:0", 2).await;
    config(d, mx.addr, "");
    let up = Up::start(d, "mail.toml");
    let client = lettre(
        up.addr("relay", "submission").port(),
        "bob@example.test",
        Mechanism::Plain,
    );
    let msg = Message::builder()
        .from(mailbox("bob@example.test"))
        .to(mailbox("far@remote.test"))
        .subject("dropped twice")
        .body("third time lucky\r\n".to_owned())
        .unwrap();
    client.send(msg).await.unwrap();
    // No reply is no delivery: the relay retries until a 250 comes, then forgets it.
    let got = mx.wait_for(1).await;
    assert_eq!(got[0].rcpts, ["far@remote.test"]);
    assert!(got[0].data.contains("third time lucky"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = ok(d, &["-c", "mail.toml", "queue", "list", "--json"], None);
        if out.trim() == "[]" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "queue never emptied: {out}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // polling interval
    }
    assert!(
        crate::support::maildir(&d.join("data/filers/filer2"), "bob@example.test").is_empty(),
        "no bounce for a dropped connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alias_that_forwards_outside_goes_out_through_the_relay() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mx = FakeMx::start("127.0.0.1:0").await;
    config(d, mx.addr, "");
    ok(
        d,
        &[
            "-c",
            "mail.toml",
            "alias",
            "add",
            "fwd@example.test",
            "someone@remote.test",
        ],
        None,
    );
    ok(
        d,
        &[
            "-c",
            "mail.toml",
            "alias",
            "add",
            "team@example.test",
            "someone@remote.test",
        ],
        None,
    );
    ok(
        d,
        &[
            "-c",
            "mail.toml",
            "alias",
            "add",
            "team@example.test",
            "bob@example.test",
        ],
        None,
    );
    let up = Up::start(d, "mail.toml");
    let spool = up.addr("spool", "smtp");
    let mut c = common::smtp::client::Client::connect(
        spool,
        &common::smtp::client::ClientSettings::new(
            "client.test",
            common::smtp::client::Protocol::Smtp,
        ),
    )
    .await
    .unwrap();
    for to in ["fwd@example.test", "team@example.test"] {
        let replies = c
            .send(
                "sender@elsewhere.test",
                &[to.to_owned()],
                format!("From: sender@elsewhere.test\r\nSubject: to {to}\r\n\r\nforward me\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
        assert!(replies[0].is_positive(), "{}", replies[0]);
    }
    c.quit().await;
    let got = mx.wait_for(2).await;
    for m in &got {
        assert_eq!(m.rcpts, ["someone@remote.test"]);
        assert_eq!(
            m.from, "sender@elsewhere.test",
            "the original sender is kept"
        );
        assert!(m.data.contains("forward me"));
        assert!(m.data.contains("(relay, conn ") && m.data.contains("(spool, conn "));
    }
    // The hosted member of the group got its copy too.
    let inbox = wait_for_maildir(&d.join("data/filers/filer2"), "bob@example.test", 1);
    assert!(inbox[0].contains("to team@example.test"), "{}", inbox[0]);
}
