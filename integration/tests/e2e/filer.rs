//! The filer inside `mailctl up`: deliveries survive a SIGKILL right after their `250`.

use std::collections::HashMap;

use common::smtp::client::{Client, ClientSettings, Protocol};

use crate::support::{EPHEMERAL_CONFIG, Up, ok};

/// Reads every message of `user`'s INBOX over POP3 with the proxy's trusted login.
fn pop3_messages(dir: &std::path::Path, pop3: std::net::SocketAddr, user: &str) -> Vec<String> {
    let secret = std::fs::read_to_string(dir.join("data/proxy.secret")).unwrap();
    let script = r#"
import base64, poplib, sys
host, port, user, secret = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
p = poplib.POP3(host, port, timeout=10)
p._shortcmd("AUTH PLAIN " + base64.b64encode(f"{user}\0proxy\0{secret}".encode()).decode())
n, _ = p.stat()
for i in range(1, n + 1):
    _, lines, _ = p.retr(i)
    sys.stdout.write(base64.b64encode(b"\r\n".join(lines)).decode() + "\n")
p.quit()
"#;
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            script,
            &pop3.ip().to_string(),
            &pop3.port().to_string(),
            user,
            secret.trim(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use base64::Engine as _;
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            String::from_utf8(base64::engine::general_purpose::STANDARD.decode(l).unwrap()).unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_acknowledged_before_sigkill_survives() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_owned();
    std::fs::write(d.join("mail.toml"), EPHEMERAL_CONFIG).unwrap();
    ok(
        &d,
        &["-c", "mail.toml", "domain", "add", "example.test"],
        None,
    );
    ok(
        &d,
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

    let mut up = Up::start(&d, "mail.toml");
    let lmtp = up.addr("filer1", "lmtp");
    let mut client = Client::connect(lmtp, &ClientSettings::new("test.client", Protocol::Lmtp))
        .await
        .unwrap();
    let mut acknowledged = Vec::new();
    for i in 0..8 {
        let msg = format!("Subject: crash test {i}\r\nMessage-ID: <{i}@test>\r\n\r\nbody {i}\r\n");
        let replies = client
            .send(
                "sender@remote.test",
                &["a@example.test".to_owned()],
                msg.as_bytes(),
            )
            .await
            .unwrap();
        assert!(replies[0].is_positive(), "{:?}", replies[0]);
        acknowledged.push(i);
    }
    // SIGKILL right after the last 250: no shutdown, no chance to flush anything.
    up.child.kill().unwrap();
    up.child.wait().unwrap();
    drop(client);

    let up = Up::start(&d, "mail.toml");
    let messages = pop3_messages(&d, up.addr("filer1", "pop3"), "a@example.test");
    let mut seen: HashMap<usize, usize> = HashMap::new();
    for m in &messages {
        let i: usize = m
            .split("Subject: crash test ")
            .nth(1)
            .unwrap()
            .split("\r\n")
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            m.ends_with(&format!("body {i}")),
            "a complete message: {m:?}"
        );
        *seen.entry(i).or_default() += 1;
    }
    for i in acknowledged {
        assert_eq!(
            seen.get(&i),
            Some(&1),
            "message {i} acknowledged once, found {seen:?}"
        );
    }
}
