//! The filter inside the platform: spool → filter → spool (reinjection) → filer. A spammy
//! message lands in the user's Junk, a clean one in INBOX, both with our verdict headers and
//! without the ones the sender forged; quarantine reroutes; a filter that is down holds mail
//! in the spool until it is back, and nothing is lost.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::smtp::client::{Client, ClientSettings, Protocol};

use crate::support::{EPHEMERAL_CONFIG, Up, ok, wait_for_maildir};

const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

/// The ephemeral config with the filter on, plus `extra` lines in `[filter]`.
fn filtered_config(extra: &str) -> String {
    EPHEMERAL_CONFIG.replace(
        "[filter]\nenabled = false\n",
        &format!("[filter]\nenabled = true\n{extra}"),
    )
}

fn setup(d: &Path, config: &str, users: &[&str]) {
    ok(d, &["-c", config, "domain", "add", "example.test"], None);
    for user in users {
        ok(
            d,
            &["-c", config, "user", "add", user, "--filer", "filer1"],
            Some("pw\n"),
        );
    }
}

async fn send(spool: SocketAddr, to: &str, message: &str) {
    let mut c = Client::connect(spool, &ClientSettings::new("client.test", Protocol::Smtp))
        .await
        .unwrap();
    let replies = c
        .send("sender@remote.test", &[to.to_owned()], message.as_bytes())
        .await
        .unwrap();
    assert!(replies[0].is_positive(), "{}", replies[0]);
    c.quit().await;
}

/// The messages in `user`'s `folder` (`""` for INBOX) on filer1.
fn folder(d: &Path, user: &str, folder: &str) -> Vec<String> {
    let (local, domain) = user.split_once('@').unwrap();
    let mut dir = d.join("data/filers/filer1").join(domain).join(local);
    if !folder.is_empty() {
        dir = dir.join(format!(".{folder}"));
    }
    let mut out = Vec::new();
    for sub in ["new", "cur"] {
        if let Ok(rd) = std::fs::read_dir(dir.join(sub)) {
            for e in rd.flatten() {
                out.push(String::from_utf8_lossy(&std::fs::read(e.path()).unwrap()).into_owned());
            }
        }
    }
    out
}

async fn wait_for_folder(d: &Path, user: &str, name: &str, n: usize) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let msgs = folder(d, user, name);
        if msgs.len() >= n {
            assert_eq!(msgs.len(), n, "{user}/{name}: {msgs:#?}");
            return msgs;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{user}/{name}: expected {n}, found {}",
            msgs.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // polling interval
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spam_goes_to_junk_and_clean_mail_to_the_inbox() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("mail.toml"), filtered_config("")).unwrap();
    setup(d, "mail.toml", &["alice@example.test"]);
    let up = Up::start(d, "mail.toml");
    let spool = up.addr("spool", "smtp");

    send(
        spool,
        "alice@example.test",
        "From: Bob <bob@remote.test>\r\nTo: alice@example.test\r\nSubject: lunch\r\n\
         Date: Fri, 27 Nov 2026 10:00:00 +0000\r\nMessage-ID: <lunch@remote.test>\r\n\
         X-Spam-Flag: NO\r\nX-Spam-Score: -1000\r\n\r\nShall we have lunch on Monday?\r\n",
    )
    .await;
    send(
        spool,
        "alice@example.test",
        &format!(
            "From: Winner <promo@remote.test>\r\nTo: alice@example.test\r\nSubject: you have won\r\n\
             Date: Fri, 27 Nov 2026 10:00:00 +0000\r\nMessage-ID: <win@remote.test>\r\n\r\n{GTUBE}\r\n"
        ),
    )
    .await;

    let inbox = wait_for_folder(d, "alice@example.test", "", 1).await;
    let junk = wait_for_folder(d, "alice@example.test", "Junk", 1).await;
    let clean = &inbox[0];
    assert!(clean.contains("Shall we have lunch"), "{clean}");
    assert!(clean.contains("Authentication-Results: "), "{clean}");
    assert!(clean.contains("X-Spam-Status: No, score="), "{clean}");
    assert!(
        !clean.contains("X-Spam-Flag: NO") && !clean.contains("X-Spam-Score: -1000"),
        "forged verdict headers are removed: {clean}"
    );
    let spam = &junk[0];
    assert!(spam.contains("X-Spam-Flag: YES"), "{spam}");
    assert!(spam.contains("GTUBE="), "the reason is named: {spam}");
    // Twice through the spool (MX, then reinjection): two of its Received: headers.
    assert_eq!(spam.matches("(spool, conn ").count(), 2, "{spam}");
    // Both messages are settled: nothing waits in the queue.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = ok(d, &["-c", "mail.toml", "queue", "list", "--json"], None);
        if out.trim() == "[]" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "queue: {out}");
        tokio::time::sleep(Duration::from_millis(20)).await; // polling interval
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_reroutes_to_the_quarantine_mailbox() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("mail.toml"),
        filtered_config("quarantine = \"quarantine@example.test\"\nquarantine_score = 100\n"),
    )
    .unwrap();
    setup(
        d,
        "mail.toml",
        &["alice@example.test", "quarantine@example.test"],
    );
    let up = Up::start(d, "mail.toml");
    send(
        up.addr("spool", "smtp"),
        "alice@example.test",
        &format!("From: x@remote.test\r\nSubject: test\r\n\r\n{GTUBE}\r\n"),
    )
    .await;
    let q = wait_for_folder(d, "quarantine@example.test", "Junk", 1).await;
    assert!(q[0].contains("X-Spam-Flag: YES"), "{}", q[0]);
    assert!(folder(d, "alice@example.test", "").is_empty());
    assert!(folder(d, "alice@example.test", "Junk").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_that_is_down_holds_mail_in_the_spool_until_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The filter's port: reserved, then closed; the second process will listen there.
    let port = crate::support::reserved_port();
    let a = EPHEMERAL_CONFIG.replace(
        "[spool]\n",
        &format!("[spool]\nfilter = \"127.0.0.1:{port}\"\n"),
    );
    std::fs::write(d.join("a.toml"), a).unwrap();
    setup(d, "a.toml", &["alice@example.test"]);
    let up = Up::start(d, "a.toml");
    let spool = up.addr("spool", "smtp");
    for i in 0..5 {
        send(
            spool,
            "alice@example.test",
            &format!("From: x@remote.test\r\nSubject: held {i}\r\n\r\nmessage {i}\r\n"),
        )
        .await;
    }
    // Every message waits in the spool's queue, held with the reason.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = ok(d, &["-c", "a.toml", "queue", "list", "--json"], None);
        let q: serde_json::Value = serde_json::from_str(&out).unwrap();
        let held = q
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| {
                e["recipients"][0]["deferral"] == "held"
                    && e["recipients"][0]["last_reply"]
                        .as_str()
                        .is_some_and(|r| r.contains("filter"))
            })
            .count();
        if held == 5 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "queue: {q}");
        tokio::time::sleep(Duration::from_millis(20)).await; // polling interval
    }
    assert!(folder(d, "alice@example.test", "").is_empty());

    // A second process runs only a filter, on that port, reinjecting into the first spool.
    let reinject = up.addr("spool", "reinject");
    std::fs::write(
        d.join("b.toml"),
        format!(
            "filers = []\n[admin]\nlisten = \"127.0.0.1:0\"\n[platform]\ndata_dir = \"b\"\n[database]\nurl = \"sqlite:data/location.db\"\n\
             [spool]\nenabled = false\n[access]\nenabled = false\n[relay]\nenabled = false\n\
             [filter]\nlisten = \"127.0.0.1:{port}\"\nreinject = \"{reinject}\"\nnetwork_checks = false\n"
        ),
    )
    .unwrap();
    let _b = Up::start(d, "b.toml");
    let inbox = wait_for_maildir(&d.join("data/filers/filer1"), "alice@example.test", 5);
    for m in &inbox {
        assert!(m.contains("X-Spam-Status: No"), "filtered: {m}");
    }
}
