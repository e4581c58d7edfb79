//! `mailctl migrate`: a mailbox moves from filer1 to filer2 while a sender keeps submitting to it
//! (200 messages)
//! and an IMAP client idles on it through the proxy. Every message that got a `250` ends up in
//! the new Maildir exactly once; UIDVALIDITY, UIDs, flags and POP3 UIDLs of the old messages are
//! unchanged.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::smtp::client::{Client, ClientSettings, Protocol};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

use crate::support::{EPHEMERAL_CONFIG, Up, maildir, ok};

async fn send(spool: SocketAddr, subject: &str) -> bool {
    let Ok(mut c) =
        Client::connect(spool, &ClientSettings::new("client.test", Protocol::Smtp)).await
    else {
        return false;
    };
    let msg = format!("From: s@remote.test\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n");
    let ok = matches!(
        c.send("s@remote.test", &["a@example.test".to_owned()], msg.as_bytes()).await,
        Ok(replies) if replies[0].is_positive()
    );
    c.quit().await;
    ok
}

/// UIDVALIDITY, then UID → flags of INBOX, and the POP3 UIDL list, through the proxy.
fn snapshot(imap: SocketAddr, pop3: SocketAddr) -> (u64, BTreeMap<u64, String>, Vec<String>) {
    let script = r#"
import imaplib, json, poplib, re, sys
m = imaplib.IMAP4(sys.argv[1], int(sys.argv[2]))
m.login("a@example.test", "pw")
m.select("INBOX")
uv = int(re.search(rb"UIDVALIDITY (\d+)", m.response("UIDVALIDITY")[1][0] or b"UIDVALIDITY 0").group(1)) if m.response("UIDVALIDITY")[1][0] else 0
typ, data = m.status("INBOX", "(UIDVALIDITY)")
uv = int(re.search(rb"UIDVALIDITY (\d+)", data[0]).group(1))
typ, data = m.uid("FETCH", "1:*", "(FLAGS)")
flags = {}
for d in data:
    if not d: continue
    mm = re.search(rb"UID (\d+) FLAGS \(([^)]*)\)", d) or re.search(rb"FLAGS \(([^)]*)\) UID (\d+)", d)
    if re.search(rb"UID (\d+) FLAGS", d):
        flags[int(mm.group(1))] = mm.group(2).decode()
    else:
        flags[int(mm.group(2))] = mm.group(1).decode()
m.logout()
p = poplib.POP3(sys.argv[1], int(sys.argv[3]))
p.user("a@example.test"); p.pass_("pw")
uidl = [l.decode().split()[1] for l in p.uidl()[1]]
p.quit()
print(json.dumps({"uv": uv, "flags": flags, "uidl": uidl}))
"#;
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            script,
            &imap.ip().to_string(),
            &imap.port().to_string(),
            &pop3.port().to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let flags = v["flags"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, f)| (k.parse().unwrap(), f.as_str().unwrap().to_owned()))
        .collect();
    let uidl = v["uidl"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap().to_owned())
        .collect();
    (v["uv"].as_u64().unwrap(), flags, uidl)
}

fn subjects(root: &Path) -> Vec<String> {
    let mut s: Vec<String> = maildir(root, "a@example.test")
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mailbox_moves_while_mail_arrives_and_a_client_idles() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("mail.toml"), EPHEMERAL_CONFIG).unwrap();
    ok(
        d,
        &["-c", "mail.toml", "domain", "add", "example.test"],
        None,
    );
    ok(
        d,
        &[
            "-c",
            "mail.toml",
            "user",
            "add",
            "a@example.test",
            "--filer",
            "filer1",
        ],
        Some("pw\n"),
    );
    let up = Up::start(d, "mail.toml");
    let (spool, imap, pop3) = (
        up.addr("spool", "smtp"),
        up.addr("access", "imap"),
        up.addr("access", "pop3"),
    );
    for i in 0..20 {
        assert!(send(spool, &format!("before {i:03}")).await);
    }
    crate::support::wait_for_maildir(&d.join("data/filers/filer1"), "a@example.test", 20);
    // Some flags, to see them survive.
    let flag = std::process::Command::new("python3")
        .args([
            "-c",
            "import imaplib,sys; m=imaplib.IMAP4(sys.argv[1],int(sys.argv[2])); m.login('a@example.test','pw'); m.select('INBOX'); m.uid('STORE','1:5','+FLAGS','(\\\\Seen)'); m.uid('STORE','3','+FLAGS','(\\\\Flagged $Work)'); m.logout()",
            &imap.ip().to_string(),
            &imap.port().to_string(),
        ])
        .status()
        .unwrap();
    assert!(flag.success());
    let (uv_before, flags_before, uidl_before) = snapshot(imap, pop3);
    assert_eq!(flags_before.len(), 20);

    // A client idling on the old filer, through the proxy.
    let stream = tokio::net::TcpStream::connect(imap).await.unwrap();
    let (r, mut w) = stream.into_split();
    let mut idle = BufReader::new(r);
    let mut line = String::new();
    idle.read_line(&mut line).await.unwrap();
    w.write_all(b"a LOGIN a@example.test pw\r\nb SELECT INBOX\r\nc IDLE\r\n")
        .await
        .unwrap();
    loop {
        line.clear();
        idle.read_line(&mut line).await.unwrap();
        if line.starts_with('+') {
            break;
        }
    }

    // 200 more messages while the migration runs.
    let sender = tokio::spawn(async move {
        let mut acknowledged = Vec::new();
        for i in 0..200 {
            let subject = format!("during {i:03}");
            if send(spool, &subject).await {
                acknowledged.push(subject);
            }
            tokio::time::sleep(Duration::from_millis(10)).await; // a steady trickle, not sync
        }
        acknowledged
    });
    let dd = d.to_owned();
    let migrated = tokio::task::spawn_blocking(move || {
        ok(
            &dd,
            &[
                "-c",
                "mail.toml",
                "migrate",
                "a@example.test",
                "--to",
                "filer2",
                "--json",
            ],
            None,
        )
    })
    .await
    .unwrap();
    let summary: serde_json::Value = serde_json::from_str(&migrated).unwrap();
    assert_eq!(summary["to"], "filer2");
    assert!(summary["copied"].as_u64().unwrap() >= 20, "{summary}");
    assert!(summary["moving_ms"].as_u64().unwrap() < 10_000, "{summary}");
    let acknowledged = sender.await.unwrap();
    assert!(acknowledged.len() >= 180, "{}", acknowledged.len());

    // The idling client was told and disconnected (by the old filer, through the proxy).
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            line.clear();
            if idle.read_line(&mut line).await.unwrap_or(0) == 0 {
                return true;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the IDLE connection was not ended");

    // Every acknowledged message is in the new Maildir exactly once.
    let mut want: Vec<String> = (0..20).map(|i| format!("before {i:03}")).collect();
    want.extend(acknowledged);
    want.sort();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let got = subjects(&d.join("data/filers/filer2"));
        if got.len() >= want.len() {
            assert_eq!(got, want);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {} in the new Maildir",
            got.len(),
            want.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // polling interval
    }
    // The same UIDVALIDITY, UIDs and flags for the old messages; the same UIDLs.
    let (uv_after, flags_after, uidl_after) = snapshot(imap, pop3);
    assert_eq!(uv_after, uv_before);
    for (uid, flags) in &flags_before {
        assert_eq!(flags_after.get(uid), Some(flags), "UID {uid}");
    }
    assert_eq!(&uidl_after[..20], &uidl_before[..]);
    assert_eq!(uidl_after.len(), want.len());
    // The old copy stays on filer1 until it is purged.
    assert!(maildir(&d.join("data/filers/filer1"), "a@example.test").len() >= 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_filer_moves_its_fifty_mailboxes_to_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config = format!(
        "{EPHEMERAL_CONFIG}\n[[filers]]\nname = \"filer3\"\nlmtp = \"127.0.0.1:0\"\nimap = \"127.0.0.1:0\"\npop3 = \"127.0.0.1:0\"\n"
    );
    std::fs::write(d.join("mail.toml"), config).unwrap();
    ok(
        d,
        &["-c", "mail.toml", "domain", "add", "example.test"],
        None,
    );
    let up = Up::start(d, "mail.toml");
    // Every mailbox on filer1 to start with.
    for f in ["filer2", "filer3"] {
        ok(
            d,
            &["-c", "mail.toml", "filer", "set-state", f, "draining"],
            None,
        );
    }
    let users: String = (0..50)
        .map(|i| format!("u{i:02}@example.test pw\n"))
        .collect();
    ok(d, &["-c", "mail.toml", "user", "import"], Some(&users));
    for f in ["filer2", "filer3"] {
        ok(d, &["-c", "mail.toml", "filer", "set-state", f, "up"], None);
    }
    // Two messages each, over LMTP straight into filer1.
    let lmtp = up.addr("filer1", "lmtp");
    let mut c = Client::connect(lmtp, &ClientSettings::new("test", Protocol::Lmtp))
        .await
        .unwrap();
    for n in 0..2 {
        let rcpts: Vec<String> = (0..50).map(|i| format!("u{i:02}@example.test")).collect();
        let replies = c
            .send(
                "s@remote.test",
                &rcpts,
                format!("Subject: m{n}\r\n\r\nhello\r\n").as_bytes(),
            )
            .await
            .unwrap();
        assert!(replies.iter().all(|r| r.is_positive()), "{replies:?}");
    }
    c.quit().await;

    let out = ok(
        d,
        &[
            "-c",
            "mail.toml",
            "filer",
            "drain",
            "filer1",
            "--parallel",
            "8",
            "--json",
        ],
        None,
    );
    let moves: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(moves["moved"].as_array().unwrap().len(), 50, "{moves}");
    assert!(moves["failed"].as_array().unwrap().is_empty(), "{moves}");

    let list: serde_json::Value =
        serde_json::from_str(&ok(d, &["-c", "mail.toml", "user", "list", "--json"], None)).unwrap();
    let mut per_filer = BTreeMap::new();
    for m in list.as_array().unwrap() {
        let (addr, filer) = (m["address"].as_str().unwrap(), m["filer"].as_str().unwrap());
        assert_ne!(filer, "filer1", "{addr} still on filer1");
        assert_eq!(m["state"], "active", "{addr}");
        *per_filer.entry(filer.to_owned()).or_insert(0) += 1;
        let got = maildir(&d.join("data/filers").join(filer), addr);
        assert_eq!(got.len(), 2, "{addr} on {filer}");
    }
    assert_eq!(per_filer.values().sum::<i32>(), 50);
    assert!(
        per_filer.values().all(|n| *n >= 20),
        "spread by weight: {per_filer:?}"
    );
    let filers: serde_json::Value = serde_json::from_str(&ok(
        d,
        &["-c", "mail.toml", "filer", "list", "--json"],
        None,
    ))
    .unwrap();
    let f1 = filers
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "filer1")
        .unwrap();
    assert_eq!(f1["state"], "draining");

    // filer1 back up and empty: rebalancing gives it its share (a third, within 10 %).
    ok(
        d,
        &["-c", "mail.toml", "filer", "set-state", "filer1", "up"],
        None,
    );
    let out = ok(
        d,
        &[
            "-c",
            "mail.toml",
            "filer",
            "rebalance",
            "--parallel",
            "8",
            "--json",
        ],
        None,
    );
    let moves: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(moves["failed"].as_array().unwrap().is_empty(), "{moves}");
    let filers: serde_json::Value = serde_json::from_str(&ok(
        d,
        &["-c", "mail.toml", "filer", "list", "--json"],
        None,
    ))
    .unwrap();
    for f in filers.as_array().unwrap() {
        let n = f["mailboxes"].as_u64().unwrap();
        assert!((15..=18).contains(&n), "{}: {n} mailboxes", f["name"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_migration_leaves_the_mailbox_active_and_whole_and_a_second_run_completes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("mail.toml"), EPHEMERAL_CONFIG).unwrap();
    ok(
        d,
        &["-c", "mail.toml", "domain", "add", "example.test"],
        None,
    );
    ok(
        d,
        &[
            "-c",
            "mail.toml",
            "user",
            "add",
            "a@example.test",
            "--filer",
            "filer1",
        ],
        Some("pw\n"),
    );
    let up = Up::start(d, "mail.toml");
    let lmtp = up.addr("filer1", "lmtp");
    let mut c = Client::connect(lmtp, &ClientSettings::new("test", Protocol::Lmtp))
        .await
        .unwrap();
    let body = "x".repeat(2000);
    const N: usize = 1500;
    for i in 0..N {
        let r = c
            .send(
                "s@remote.test",
                &["a@example.test".to_owned()],
                format!("Subject: m{i:04}\r\n\r\n{body}\r\n").as_bytes(),
            )
            .await
            .unwrap();
        assert!(r[0].is_positive());
    }
    c.quit().await;

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mailctl"))
        .args([
            "-c",
            "mail.toml",
            "migrate",
            "a@example.test",
            "--to",
            "filer2",
        ])
        .current_dir(d)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it in the middle of the bulk copy.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let copied = maildir(&d.join("data/filers/filer2"), "a@example.test").len();
        if copied > 10 {
            assert!(copied < N, "the copy finished before the kill");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the copy never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await; // polling interval
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let list: serde_json::Value =
        serde_json::from_str(&ok(d, &["-c", "mail.toml", "user", "list", "--json"], None)).unwrap();
    let a = &list.as_array().unwrap()[0];
    assert_eq!(
        (a["filer"].as_str(), a["state"].as_str()),
        (Some("filer1"), Some("active"))
    );
    assert_eq!(
        maildir(&d.join("data/filers/filer1"), "a@example.test").len(),
        N
    );

    let out = ok(
        d,
        &[
            "-c",
            "mail.toml",
            "migrate",
            "a@example.test",
            "--to",
            "filer2",
            "--json",
        ],
        None,
    );
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["messages"].as_u64(), Some(N as u64), "{summary}");
    let list: serde_json::Value =
        serde_json::from_str(&ok(d, &["-c", "mail.toml", "user", "list", "--json"], None)).unwrap();
    let a = &list.as_array().unwrap()[0];
    assert_eq!(
        (a["filer"].as_str(), a["state"].as_str()),
        (Some("filer2"), Some("active"))
    );
    assert_eq!(
        maildir(&d.join("data/filers/filer2"), "a@example.test").len(),
        N
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_returns_only_when_nothing_changed_and_purge_empties_the_old_copy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("mail.toml"), EPHEMERAL_CONFIG).unwrap();
    ok(
        d,
        &["-c", "mail.toml", "domain", "add", "example.test"],
        None,
    );
    ok(
        d,
        &[
            "-c",
            "mail.toml",
            "user",
            "add",
            "a@example.test",
            "--filer",
            "filer1",
        ],
        Some("pw\n"),
    );
    let up = Up::start(d, "mail.toml");
    let spool = up.addr("spool", "smtp");
    for i in 0..3 {
        assert!(send(spool, &format!("m{i}")).await);
    }
    let (f1, f2) = (d.join("data/filers/filer1"), d.join("data/filers/filer2"));
    crate::support::wait_for_maildir(&f1, "a@example.test", 3);
    let filer_of = || {
        let list: serde_json::Value =
            serde_json::from_str(&ok(d, &["-c", "mail.toml", "user", "list", "--json"], None))
                .unwrap();
        let a = &list.as_array().unwrap()[0];
        format!(
            "{} {}",
            a["filer"].as_str().unwrap(),
            a["state"].as_str().unwrap()
        )
    };
    let m = |args: &[&str]| {
        let mut all = vec!["-c", "mail.toml", "migrate"];
        all.extend_from_slice(args);
        crate::support::mailctl(d, &all, None)
    };

    assert!(m(&["a@example.test", "--to", "filer2"]).status.success());
    assert_eq!(filer_of(), "filer2 active");
    // Nothing changed since: back to filer1, whose copy was kept.
    let out = m(&["rollback", "a@example.test"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(filer_of(), "filer1 active");
    assert!(send(spool, "after rollback").await);
    crate::support::wait_for_maildir(&f1, "a@example.test", 4);

    // Again, and this time mail arrives after the move: no rollback.
    assert!(m(&["a@example.test", "--to", "filer2"]).status.success());
    assert!(send(spool, "on filer2").await);
    crate::support::wait_for_maildir(&f2, "a@example.test", 5);
    let out = m(&["rollback", "a@example.test"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("1 new message"), "{err}");
    assert_eq!(filer_of(), "filer2 active");

    // Purge empties the old copy; the mailbox itself is untouched.
    let out = m(&["purge", "a@example.test"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("4 message(s) removed"));
    assert!(maildir(&f1, "a@example.test").is_empty());
    assert_eq!(maildir(&f2, "a@example.test").len(), 5);
    let again = m(&["purge", "a@example.test"]);
    assert!(!again.status.success(), "the record is gone after a purge");
}
