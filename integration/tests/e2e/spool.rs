//! The spool inside `mailctl up`: SMTP in (Python's smtplib and raw sockets), LMTP out to the
//! right filer, the queue surviving SIGKILL and filer outages, and `mailctl queue`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::smtp::client::{Client, ClientSettings, Protocol};
use common::testkit::transcript;
use tokio::net::TcpStream;

use crate::support::{EPHEMERAL_CONFIG, Up, maildir, ok, wait_for_maildir};

/// Sends one message over SMTP and returns the queue id from the `250 ... queued as ID`.
async fn send(spool: SocketAddr, to: &str, subject: &str) -> String {
    send_from(spool, "sender@remote.test", to, subject).await
}

async fn send_from(spool: SocketAddr, from: &str, to: &str, subject: &str) -> String {
    let mut c = Client::connect(spool, &ClientSettings::new("client.test", Protocol::Smtp))
        .await
        .unwrap();
    let msg =
        format!("Subject: {subject}\r\nMessage-ID: <{subject}@test>\r\n\r\nbody of {subject}\r\n");
    let replies = c
        .send(from, &[to.to_owned()], msg.as_bytes())
        .await
        .unwrap();
    assert!(replies[0].is_positive(), "{}", replies[0]);
    c.quit().await;
    replies[0].text().rsplit(' ').next().unwrap().to_owned()
}

/// `mailctl queue list --json`.
fn queue(dir: &Path, config: &str) -> Vec<serde_json::Value> {
    let out = ok(dir, &["-c", config, "queue", "list", "--json"], None);
    serde_json::from_str::<serde_json::Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// Waits (with a deadline) until `check` holds for the queue listing.
fn wait_for_queue(
    dir: &Path,
    config: &str,
    what: &str,
    check: impl Fn(&[serde_json::Value]) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let q = queue(dir, config);
        if check(&q) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "queue never {what}: {q:#?}"
        );
        std::thread::sleep(Duration::from_millis(20)); // polling interval, not synchronisation
    }
}

fn subjects(msgs: &[String]) -> Vec<String> {
    let mut s: Vec<String> = msgs
        .iter()
        .map(|m| {
            m.split("\r\nSubject: ")
                .nth(1)
                .unwrap()
                .split("\r\n")
                .next()
                .unwrap()
                .to_owned()
        })
        .collect();
    s.sort();
    s
}

fn setup(d: &Path, config: &str, users: &[(&str, &str)]) {
    ok(d, &["-c", config, "domain", "add", "example.test"], None);
    for (user, filer) in users {
        ok(
            d,
            &["-c", config, "user", "add", user, "--filer", filer],
            Some("pw\n"),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtplib_to_two_filers_unknown_users_and_relay_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("mail.toml"), EPHEMERAL_CONFIG).unwrap();
    setup(
        d,
        "mail.toml",
        &[("a@example.test", "filer1"), ("b@example.test", "filer2")],
    );
    let up = Up::start(d, "mail.toml");
    let spool = up.addr("spool", "smtp");
    let script = r#"
import json, smtplib, sys
s = smtplib.SMTP(sys.argv[1], int(sys.argv[2]), timeout=10)
s.ehlo("client.test")
refused = s.sendmail("sender@remote.test", ["a@example.test", "b@example.test", "nobody@example.test"],
                     b"Subject: two filers\r\n\r\nhello from smtplib\r\n")
relay = {}
for rcpt in ["victim@remote.test", "victim%remote.test@example.test", "remote.test!victim@example.test",
             "@example.test:victim@remote.test", "@example.test,@x.test:victim@remote.test",
             '"victim@remote.test"@example.test', "a@[127.0.0.1]"]:
    s.mail("spammer@remote.test")
    relay[rcpt] = s.docmd("RCPT TO:<%s>" % rcpt)[0]
    s.rset()
s.quit()
print(json.dumps({"refused": {k: v[0] for k, v in refused.items()}, "relay": relay}))
"#;
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            script,
            &spool.ip().to_string(),
            &spool.port().to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        result["refused"],
        serde_json::json!({"nobody@example.test": 550})
    );
    for (rcpt, code) in result["relay"].as_object().unwrap() {
        // The address literal is refused by the command parser already (501).
        let want = if rcpt.contains('[') { 501 } else { 554 };
        assert_eq!(code.as_u64(), Some(want), "{rcpt}");
    }
    let a = wait_for_maildir(&d.join("data/filers/filer1"), "a@example.test", 1);
    let b = wait_for_maildir(&d.join("data/filers/filer2"), "b@example.test", 1);
    for m in a.iter().chain(&b) {
        assert!(m.contains("hello from smtplib"), "{m}");
        assert!(
            m.contains("(spool, conn "),
            "the spool's Received: header: {m}"
        );
    }
    assert!(maildir(&d.join("data/filers/filer2"), "a@example.test").is_empty());
    wait_for_queue(d, "mail.toml", "emptied", |q| q.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_smtp_smuggling_variant_delivers_exactly_one_message() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("mail.toml"), EPHEMERAL_CONFIG).unwrap();
    setup(d, "mail.toml", &[("a@example.test", "filer1")]);
    let up = Up::start(d, "mail.toml");
    let spool = up.addr("spool", "smtp");
    let variants = [r"\n.\n", r"\r\n.\n", r"\r.\r", r"\n.\r\n"];
    for (i, v) in variants.iter().enumerate() {
        let script = format!(
            "S: 220\nC: EHLO client.test\nS: 250\nC: MAIL FROM:<sender@remote.test>\nS: 250\n\
             C: RCPT TO:<a@example.test>\nS: 250\nC: DATA\nS: 354\n\
             R: Subject: variant {i}\\r\\n\\r\\nbefore{v}MAIL FROM:<evil@remote.test>\\r\\nRCPT TO:<a@example.test>\\r\\nDATA\\r\\nSubject: smuggled\\r\\n\\r\\nevil\\r\\n.\\r\\n\n\
             S: 250 2.0.0\nC: QUIT\nS: 221\n"
        );
        let stream = TcpStream::connect(spool).await.unwrap();
        transcript::run(&script, stream)
            .await
            .unwrap_or_else(|e| panic!("variant {v}: {e}"));
    }
    wait_for_queue(d, "mail.toml", "emptied", |q| q.is_empty());
    let msgs = wait_for_maildir(&d.join("data/filers/filer1"), "a@example.test", 4);
    assert_eq!(
        subjects(&msgs),
        ["variant 0", "variant 1", "variant 2", "variant 3"]
    );
    for m in &msgs {
        assert!(m.contains("Subject: smuggled"), "kept as text inside: {m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_waits_for_a_filer_that_is_down_and_arrives_once_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Process A runs the spool and filer1; process B runs filer2 on the same database.
    std::fs::write(
        d.join("a.toml"),
        "[admin]\nlisten = \"127.0.0.1:0\"\n[platform]\ndata_dir = \"a\"\n[database]\ncache_ttl = \"100ms\"\n[access]\nenabled = false\n[relay]\nenabled = false\n[filter]\nenabled = false\n\
         [spool]\nsmtp = \"127.0.0.1:0\"\nreinject = \"127.0.0.1:0\"\ngreet_delay = \"0s\"\nretry_min = \"100ms\"\nretry_max = \"300ms\"\n\
         [[filers]]\nname = \"filer1\"\nlmtp = \"127.0.0.1:0\"\nimap = \"127.0.0.1:0\"\npop3 = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    std::fs::write(
        d.join("b.toml"),
        "[admin]\nlisten = \"127.0.0.1:0\"\n[platform]\ndata_dir = \"b\"\n[database]\nurl = \"sqlite:a/location.db\"\n[spool]\nenabled = false\n[access]\nenabled = false\n[relay]\nenabled = false\n[filter]\nenabled = false\n\
         [[filers]]\nname = \"filer2\"\nlmtp = \"127.0.0.1:0\"\nimap = \"127.0.0.1:0\"\npop3 = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    std::fs::create_dir_all(d.join("a")).unwrap();
    ok(d, &["-c", "a.toml", "domain", "add", "example.test"], None);
    ok(
        d,
        &[
            "-c",
            "b.toml",
            "user",
            "add",
            "b@example.test",
            "--filer",
            "filer2",
        ],
        Some("pw\n"),
    );
    let root = d.join("b/filers/filer2");

    let a = Up::start(d, "a.toml");
    let spool = a.addr("spool", "smtp");
    let mut b = Up::start(d, "b.toml");
    send(spool, "b@example.test", "before the outage").await;
    wait_for_maildir(&root, "b@example.test", 1);
    // Kill filer2 only once the spool has its reply: a filer killed between writing the
    // Maildir and answering makes a duplicate, by design (LMTP cannot do better).
    wait_for_queue(d, "a.toml", "emptied", |q| q.is_empty());

    b.child.kill().unwrap();
    b.child.wait().unwrap();
    let id = send(spool, "b@example.test", "during the outage").await;
    wait_for_queue(d, "a.toml", "retried the waiting message", |q| {
        q.iter()
            .any(|e| e["id"] == id.as_str() && e["recipients"][0]["attempts"].as_u64() >= Some(2))
    });
    assert_eq!(maildir(&root, "b@example.test").len(), 1);

    let _b = Up::start(d, "b.toml"); // filer2 is back, on a new port
    wait_for_queue(d, "a.toml", "emptied", |q| q.is_empty());
    let msgs = wait_for_maildir(&root, "b@example.test", 2);
    assert_eq!(subjects(&msgs), ["before the outage", "during the outage"]);
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_mail_survives_sigkill_and_mailctl_queue_controls_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("mail.toml"), EPHEMERAL_CONFIG).unwrap();
    setup(d, "mail.toml", &[("a@example.test", "filer1")]);
    let root = d.join("data/filers/filer1");
    ok(
        d,
        &["-c", "mail.toml", "filer", "set-state", "filer1", "down"],
        None,
    );

    let mut up = Up::start(d, "mail.toml");
    let spool = up.addr("spool", "smtp");
    let kept = send(spool, "a@example.test", "kept").await;
    let held = send(spool, "a@example.test", "held").await;
    let deleted = send(spool, "a@example.test", "deleted").await;
    ok(d, &["-c", "mail.toml", "queue", "hold", &held], None);
    ok(d, &["-c", "mail.toml", "queue", "delete", &deleted], None);
    let q = queue(d, "mail.toml");
    let ids: Vec<&str> = q.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [kept.as_str(), held.as_str()], "{q:#?}");
    assert_eq!(q[1]["held"], true);
    let shown = ok(d, &["-c", "mail.toml", "queue", "show", &kept], None);
    assert!(
        shown.contains("filer filer1 is down") && shown.contains("Subject: kept"),
        "{shown}"
    );

    // SIGKILL: no shutdown, nothing flushed; the acknowledged messages are on disk.
    up.child.kill().unwrap();
    up.child.wait().unwrap();
    ok(
        d,
        &["-c", "mail.toml", "filer", "set-state", "filer1", "up"],
        None,
    );
    let _up = Up::start(d, "mail.toml");
    ok(d, &["-c", "mail.toml", "queue", "retry", "--all"], None);
    let msgs = wait_for_maildir(&root, "a@example.test", 1);
    assert_eq!(subjects(&msgs), ["kept"]);
    // The filer has it; the spool removes the entry once it has read the filer's reply.
    wait_for_queue(d, "mail.toml", "down to the held entry", |q| q.len() == 1);
    let q = queue(d, "mail.toml");
    assert_eq!(
        (q[0]["id"].as_str(), &q[0]["held"]),
        (Some(held.as_str()), &serde_json::json!(true))
    );

    ok(d, &["-c", "mail.toml", "queue", "release", &held], None);
    wait_for_queue(d, "mail.toml", "emptied", |q| q.is_empty());
    let msgs = wait_for_maildir(&root, "a@example.test", 2);
    assert_eq!(subjects(&msgs), ["held", "kept"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_bounces_to_a_hosted_sender() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("mail.toml"), EPHEMERAL_CONFIG).unwrap();
    setup(
        d,
        "mail.toml",
        &[("a@example.test", "filer1"), ("b@example.test", "filer2")],
    );
    ok(
        d,
        &["-c", "mail.toml", "filer", "set-state", "filer2", "down"],
        None,
    );
    let up = Up::start(d, "mail.toml");
    let spool = up.addr("spool", "smtp");
    let id = send_from(spool, "a@example.test", "b@example.test", "to be bounced").await;
    // Accepted while b existed; b is removed before the filer comes back: 550 5.1.1 at delivery.
    ok(
        d,
        &["-c", "mail.toml", "user", "remove", "b@example.test"],
        None,
    );
    ok(
        d,
        &["-c", "mail.toml", "filer", "set-state", "filer2", "up"],
        None,
    );
    // Retry now; the runner's own retry may have settled the entry already.
    let out = crate::support::mailctl(d, &["-c", "mail.toml", "queue", "retry", &id], None);
    assert!(
        out.status.success() || String::from_utf8_lossy(&out.stderr).contains("no queue entry"),
        "{out:?}"
    );
    let msgs = wait_for_maildir(&d.join("data/filers/filer1"), "a@example.test", 1);
    let bounce = &msgs[0];
    for want in [
        "Return-Path: <>",
        "Mail Delivery System\" <MAILER-DAEMON@localhost>",
        "multipart/report; report-type=delivery-status",
        "Final-Recipient: rfc822; b@example.test",
        "Status: 5.1.1",
        "Subject: to be bounced",
    ] {
        assert!(bounce.contains(want), "{want} missing in {bounce}");
    }
    wait_for_queue(d, "mail.toml", "emptied", |q| q.is_empty());
}
