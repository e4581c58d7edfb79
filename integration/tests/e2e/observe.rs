//! Operating the platform: the metrics move when mail flows, `mailctl trace` follows a message
//! hop by hop, and the status page (in headless Chromium) shows it.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::smtp::client::{Client, ClientSettings, Protocol};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};

use crate::support::{EPHEMERAL_CONFIG, Up, mailctl, ok, wait_for_maildir};

/// `GET path` on the admin listener (HTTP/1.0); the body.
async fn get(admin: SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    body.to_owned()
}

/// The value of one sample in Prometheus text (0 when absent): `name` with all of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

async fn send(spool: SocketAddr, to: &str, message_id: &str) -> String {
    let mut c = Client::connect(spool, &ClientSettings::new("client.test", Protocol::Smtp))
        .await
        .unwrap();
    let msg = format!("Subject: observed\r\nMessage-ID: <{message_id}>\r\n\r\nwatch me\r\n");
    let r = c
        .send("sender@remote.test", &[to.to_owned()], msg.as_bytes())
        .await
        .unwrap();
    assert!(r[0].is_positive(), "{}", r[0]);
    c.quit().await;
    r[0].text().rsplit(' ').next().unwrap().to_owned()
}

/// A failed IMAP login through the proxy.
async fn bad_login(imap: SocketAddr) {
    let s = tokio::net::TcpStream::connect(imap).await.unwrap();
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    w.write_all(b"a LOGIN alice@example.test wrong\r\n")
        .await
        .unwrap();
    line.clear();
    r.read_line(&mut line).await.unwrap();
    assert!(line.starts_with("a NO"), "{line}");
}

fn setup(d: &Path) -> Up {
    let cfg = EPHEMERAL_CONFIG.replace("[filter]\nenabled = false\n", "[filter]\nenabled = true\n");
    std::fs::write(d.join("mail.toml"), cfg).unwrap();
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
            "alice@example.test",
            "--filer",
            "filer1",
        ],
        Some("pw\n"),
    );
    Up::start(d, "mail.toml")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_and_a_trace_follows_the_message_hop_by_hop() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let up = setup(d);
    let admin = up.addr("admin", "http");
    let before = get(admin, "/metrics").await;

    let queue_id = send(
        up.addr("spool", "smtp"),
        "alice@example.test",
        "obs-1@client.test",
    )
    .await;
    wait_for_maildir(&d.join("data/filers/filer1"), "alice@example.test", 1);
    bad_login(up.addr("access", "imap")).await;

    let after = get(admin, "/metrics").await;
    let grew = |name: &str, labels: &[(&str, &str)]| {
        sample(&after, name, labels) - sample(&before, name, labels)
    };
    // Accepted from the client and again from the filter: two queue entries.
    assert_eq!(
        grew(
            "mail_messages_total",
            &[("service", "spool"), ("event", "accepted")]
        ),
        2.0,
        "{after}"
    );
    assert_eq!(
        grew(
            "mail_messages_total",
            &[("service", "filter"), ("event", "scanned")]
        ),
        1.0
    );
    assert_eq!(
        grew(
            "mail_messages_total",
            &[("service", "filer"), ("event", "stored")]
        ),
        1.0
    );
    assert!(
        grew(
            "mail_connections_total",
            &[
                ("service", "spool"),
                ("protocol", "smtp"),
                ("result", "accepted")
            ]
        ) >= 1.0
    );
    assert_eq!(
        grew(
            "mail_auth_total",
            &[("service", "access"), ("result", "failure")]
        ),
        1.0
    );
    assert!(grew("mail_delivery_seconds_count", &[("service", "spool")]) >= 2.0);
    assert!(grew("mail_fsync_seconds_count", &[("service", "queue")]) >= 2.0);
    assert!(
        after.contains("mail_delivery_seconds_bucket{"),
        "a histogram"
    );
    assert_eq!(
        sample(&after, "mail_queue_messages", &[("queue", "spool")]),
        0.0
    );
    // The spool reached filer1: its view of the filer's health.
    assert_eq!(
        sample(
            &after,
            "mail_filer_up",
            &[("service", "spool"), ("filer", "filer1")]
        ),
        1.0
    );
    assert_eq!(
        sample(&after, "mail_filer_mailboxes", &[("filer", "filer1")]),
        1.0
    );

    // The trace, by Message-ID: spool -> filter -> spool -> filer1, in order.
    let out = ok(
        d,
        &["-c", "mail.toml", "trace", "obs-1@client.test", "--json"],
        None,
    );
    let events: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let path: Vec<String> = events
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["service"].as_str().unwrap(),
                e["event"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        path,
        [
            "spool received",
            "spool delivered",
            "filter scanned",
            "spool received",
            "spool delivered",
            "filer1 stored"
        ],
        "{out}"
    );
    assert_eq!(events[0]["queue_id"], queue_id.as_str());
    assert!(
        events[0]["result"]
            .as_str()
            .unwrap()
            .starts_with("250 2.0.0")
    );
    assert!(
        events[5]["result"]
            .as_str()
            .unwrap()
            .contains("INBOX uid 1")
    );
    // By the queue id the client was given, and by address: the same message.
    for q in [queue_id.as_str(), "alice@example.test"] {
        let text = ok(d, &["-c", "mail.toml", "trace", q], None);
        assert!(text.starts_with("<obs-1@client.test>\n"), "{q}: {text}");
        assert!(text.contains("filer1   stored"), "{q}: {text}");
    }
    let unknown = mailctl(
        d,
        &["-c", "mail.toml", "trace", "nobody@nowhere.test"],
        None,
    );
    assert_eq!(unknown.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_have_a_line_per_session_and_per_message_step_and_no_password() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = EPHEMERAL_CONFIG.to_owned();
    std::fs::write(d.join("mail.toml"), cfg).unwrap();
    ok(
        d,
        &["-c", "mail.toml", "domain", "add", "example.test"],
        None,
    );
    let password = "Tr0ub4dor-and-3";
    ok(
        d,
        &[
            "-c",
            "mail.toml",
            "user",
            "add",
            "alice@example.test",
            "--filer",
            "filer1",
        ],
        Some(&format!("{password}\n")),
    );
    let log = d.join("log.jsonl");
    let up = Up::start_logging_json(d, "mail.toml", &log);
    send(
        up.addr("spool", "smtp"),
        "alice@example.test",
        "json-1@client.test",
    )
    .await;
    wait_for_maildir(&d.join("data/filers/filer1"), "alice@example.test", 1);
    // A wrong password and the right one, through the proxy.
    bad_login(up.addr("access", "imap")).await;
    let s = tokio::net::TcpStream::connect(up.addr("access", "imap"))
        .await
        .unwrap();
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    w.write_all(format!("a LOGIN alice@example.test {password}\r\nb LOGOUT\r\n").as_bytes())
        .await
        .unwrap();
    let mut rest = String::new();
    r.read_to_string(&mut rest).await.unwrap();
    assert!(rest.contains("a OK"), "{rest}");
    // The lines arrive as they are written; wait (with a deadline) for the last session's.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.matches("session ended").count() >= 4 {
            break text;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await; // polling interval
    };
    drop(up);
    let mut steps = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with("mailctl up:")) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        if v["target"] == "mail::trace" {
            steps.push(format!(
                "{} {}",
                v["fields"]["service"].as_str().unwrap(),
                v["fields"]["event"].as_str().unwrap()
            ));
        }
    }
    // Logged as each step ends: the spool logs its delivery after the filer's answer.
    steps.sort();
    assert_eq!(
        steps,
        ["filer1 stored", "spool delivered", "spool received"],
        "{text}"
    );
    assert!(text.contains("\"session ended\""), "{text}");
    assert!(!text.contains(password), "a password in the log: {text}");
    assert!(!text.contains("wrong"), "a password in the log: {text}");
}

/// Debian's Chromium, when installed; `MAILPLATFORM_REQUIRE_CHROMIUM` (CI) makes its absence
/// a failure.
fn chromium() -> Option<&'static str> {
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        let found = std::process::Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if found {
            return Some(c);
        }
    }
    assert!(
        std::env::var_os("MAILPLATFORM_REQUIRE_CHROMIUM").is_none(),
        "no chromium, and MAILPLATFORM_REQUIRE_CHROMIUM is set"
    );
    eprintln!("skipped: no chromium");
    None
}

fn headless(browser: &str, args: &[&str]) -> std::process::Output {
    let out = std::process::Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--timeout=10000",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_services_filers_queues_and_the_last_delivery() {
    let Some(browser) = chromium() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let up = setup(d);
    send(
        up.addr("spool", "smtp"),
        "alice@example.test",
        "page-1@client.test",
    )
    .await;
    wait_for_maildir(&d.join("data/filers/filer1"), "alice@example.test", 1);
    let url = format!("http://{}/", up.addr("admin", "http"));
    let b = browser.to_owned();
    let dom = tokio::task::spawn_blocking(move || headless(&b, &["--dump-dom", &url]))
        .await
        .unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(dom.contains("<h1>Mail platform status</h1>"), "{dom}");
    assert!(
        dom.contains("page-1@client.test"),
        "the delivery is listed: {dom}"
    );
    assert!(dom.contains("<td>filer1</td>"), "{dom}");
    assert!(dom.contains("<td>spool</td>"), "{dom}");
    assert!(!dom.contains("NOT REACHABLE"), "{dom}");
    assert!(dom.contains("<svg class=\"chart\""), "{dom}");

    let shot = d.join("status.png");
    let arg = format!("--screenshot={}", shot.display());
    let url = format!("http://{}/", up.addr("admin", "http"));
    let b = browser.to_owned();
    tokio::task::spawn_blocking(move || headless(&b, &[&arg, "--window-size=1280,900", &url]))
        .await
        .unwrap();
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    assert!(
        png.len() > 10_000,
        "a page, not a blank: {} bytes",
        png.len()
    );
    // Kept for a look after the run.
    let keep = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    std::fs::write(&keep, &png).unwrap();
    eprintln!("status page screenshot: {}", keep.display());
}
