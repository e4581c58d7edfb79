//! Crashes under load: each component runs in its own `mailctl up` process (roles) on one data
//! directory, and while SMTP and submission clients send steadily, each process in turn gets
//! SIGKILLed at a random moment and restarted. At the end every message that got a `250` is in
//! exactly one Maildir exactly once, and the queues are empty.
//!
//! Quick by default (CI); `CRASH_SOAK_ROUNDS=N` runs N rounds of kills (one per component each)
//! instead of 2 for a soak run.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use common::smtp::client::{Client, ClientSettings, Protocol};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

use crate::support::{Up, ok, reserved_port};

const USERS: [&str; 4] = [
    "ann@example.test",
    "bob@example.test",
    "cat@example.test",
    "dan@example.test",
];
const COMPONENTS: [&str; 5] = ["spool", "filter", "filer", "relay", "access"];

struct Ports {
    smtp: u16,
    reinject: u16,
    filter: u16,
    submission: u16,
    internal: u16,
    lmtp: [u16; 2],
    imap: [u16; 2],
    pop3: [u16; 2],
    proxy_imap: u16,
    proxy_pop3: u16,
}

impl Ports {
    fn reserve() -> Self {
        let mut taken = Vec::new();
        let mut next = || loop {
            let p = reserved_port();
            if !taken.contains(&p) {
                taken.push(p);
                return p;
            }
        };
        Self {
            smtp: next(),
            reinject: next(),
            filter: next(),
            submission: next(),
            internal: next(),
            lmtp: [next(), next()],
            imap: [next(), next()],
            pop3: [next(), next()],
            proxy_imap: next(),
            proxy_pop3: next(),
        }
    }

    /// One configuration for every process; `roles` picks what each runs (none: the admin
    /// commands' view of the whole platform).
    fn config(&self, roles: Option<&str>) -> String {
        let roles = roles.map_or(String::new(), |r| format!("roles = [\"{r}\"]\n"));
        let l = "127.0.0.1";
        format!(
            "{roles}[admin]\nlisten = \"127.0.0.1:0\"\n[database]\ncache_ttl = \"100ms\"\n\n\
             [spool]\nsmtp = \"{l}:{}\"\nreinject = \"{l}:{}\"\nfilter = \"{l}:{}\"\nrelay = \"{l}:{}\"\n\
             greet_delay = \"10ms\"\nretry_min = \"100ms\"\nretry_max = \"500ms\"\nmax_connections_per_ip = 200\n\n\
             [filter]\nlisten = \"{l}:{}\"\nreinject = \"{l}:{}\"\nnetwork_checks = false\n\n\
             [relay]\nsubmission = \"{l}:{}\"\nsubmissions = \"\"\ninternal = \"{l}:{}\"\n\
             hosted_route = \"{l}:{}\"\nretry_min = \"100ms\"\nretry_max = \"500ms\"\n\
             messages_per_hour = 100000\nlogin_delay = \"10ms\"\nlogin_delay_max = \"50ms\"\n\n\
             [access]\nimap = \"{l}:{}\"\nimaps = \"\"\npop3 = \"{l}:{}\"\npop3s = \"\"\n\
             login_delay = \"10ms\"\nlogin_delay_max = \"50ms\"\n\n\
             [[filers]]\nname = \"filer1\"\nlmtp = \"{l}:{}\"\nimap = \"{l}:{}\"\npop3 = \"{l}:{}\"\n\n\
             [[filers]]\nname = \"filer2\"\nlmtp = \"{l}:{}\"\nimap = \"{l}:{}\"\npop3 = \"{l}:{}\"\n",
            self.smtp,
            self.reinject,
            self.filter,
            self.internal,
            self.filter,
            self.reinject,
            self.submission,
            self.internal,
            self.smtp,
            self.proxy_imap,
            self.proxy_pop3,
            self.lmtp[0],
            self.imap[0],
            self.pop3[0],
            self.lmtp[1],
            self.imap[1],
            self.pop3[1],
        )
    }
}

/// The messages acknowledged with `250`, by token, and how many attempts did not get one.
#[derive(Default)]
struct Ledger {
    acked: Vec<u64>,
    unacked: u64,
}

fn message(token: u64, from: &str, to: &str) -> String {
    format!(
        "From: <{from}>\r\nTo: <{to}>\r\nSubject: crash test {token}\r\n\
         Message-ID: <crash-{token}@client.test>\r\nX-Crash-Token: {token}\r\n\r\n\
         message {token}\r\n"
    )
}

/// One message over plain SMTP to the spool; `true` on `250`.
async fn smtp_once(spool: SocketAddr, token: u64) -> bool {
    let mut settings = ClientSettings::new("client.test", Protocol::Smtp);
    settings.connect_timeout = Duration::from_secs(2);
    settings.command_timeout = Duration::from_secs(10);
    settings.data_timeout = Duration::from_secs(10);
    let to = USERS[(token % 4) as usize];
    let from = "sender@remote.test";
    let Ok(mut c) = Client::connect(spool, &settings).await else {
        return false;
    };
    let sent = c
        .send(from, &[to.to_owned()], message(token, from, to).as_bytes())
        .await;
    let ok = matches!(&sent, Ok(r) if r.len() == 1 && r[0].is_positive());
    c.quit().await;
    ok
}

/// Reads one (possibly multi-line) reply and returns its code.
async fn reply(r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> Option<u16> {
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await.ok()? == 0 || line.len() < 4 {
            return None;
        }
        if line.as_bytes()[3] != b'-' {
            return line[..3].parse().ok();
        }
    }
}

/// One message over authenticated submission to the relay (AUTH PLAIN on loopback, dev mode);
/// `true` on `250`.
async fn submit_once(relay: SocketAddr, token: u64) -> bool {
    let run = async {
        let s = TcpStream::connect(relay).await.ok()?;
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        let from = USERS[0];
        let to = USERS[(token % 4) as usize];
        let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0{from}\0pw"));
        let steps = [
            (String::new(), 220),
            ("EHLO client.test\r\n".to_owned(), 250),
            (format!("AUTH PLAIN {plain}\r\n"), 235),
            (format!("MAIL FROM:<{from}>\r\n"), 250),
            (format!("RCPT TO:<{to}>\r\n"), 250),
            ("DATA\r\n".to_owned(), 354),
            (format!("{}.\r\n", message(token, from, to)), 250),
        ];
        for (command, want) in steps {
            w.write_all(command.as_bytes()).await.ok()?;
            if reply(&mut r).await? != want {
                return Some(false);
            }
        }
        let _ = w.write_all(b"QUIT\r\n").await;
        Some(true)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(15), run).await,
        Ok(Some(true))
    )
}

/// Every delivered copy, by token: the `X-Crash-Token` of each file in a `new/` or `cur/`
/// directory under the filers' mail roots.
fn delivered(root: &Path) -> BTreeMap<u64, u32> {
    let mut found = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        let in_maildir = matches!(
            dir.file_name().and_then(|n| n.to_str()),
            Some("new" | "cur")
        );
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if in_maildir && let Ok(bytes) = std::fs::read(&p) {
                let text = String::from_utf8_lossy(&bytes);
                if let Some(t) = text
                    .split("\r\nX-Crash-Token: ")
                    .nth(1)
                    .and_then(|rest| rest.split("\r\n").next())
                    .and_then(|t| t.trim().parse().ok())
                {
                    *found.entry(t).or_insert(0) += 1;
                }
            }
        }
    }
    found
}

fn queue_len(dir: &Path) -> usize {
    let out = ok(dir, &["-c", "admin.toml", "queue", "list", "--json"], None);
    serde_json::from_str::<serde_json::Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_message_arrives_once_whatever_is_killed() {
    let rounds: usize = std::env::var("CRASH_SOAK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let ports = Ports::reserve();
    std::fs::write(d.join("admin.toml"), ports.config(None)).unwrap();
    for c in COMPONENTS {
        std::fs::write(d.join(format!("{c}.toml")), ports.config(Some(c))).unwrap();
    }
    let mut procs: BTreeMap<&str, Up> = BTreeMap::new();
    procs.insert("filer", Up::start(&d, "filer.toml"));
    ok(
        &d,
        &["-c", "admin.toml", "domain", "add", "example.test"],
        None,
    );
    for (i, u) in USERS.iter().enumerate() {
        let filer = if i % 2 == 0 { "filer1" } else { "filer2" };
        ok(
            &d,
            &["-c", "admin.toml", "user", "add", u, "--filer", filer],
            Some("pw\n"),
        );
    }
    for c in ["filter", "spool", "relay", "access"] {
        procs.insert(c, Up::start(&d, &format!("{c}.toml")));
    }

    // Steady load: three SMTP clients and one submission client, each sending one message
    // after another until told to stop.
    let spool: SocketAddr = ([127, 0, 0, 1], ports.smtp).into();
    let relay: SocketAddr = ([127, 0, 0, 1], ports.submission).into();
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(1));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut clients = Vec::new();
    for k in 0..4 {
        let (stop, next, ledger) = (stop.clone(), next.clone(), ledger.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let token = next.fetch_add(1, Ordering::Relaxed);
                let acked = if k == 3 {
                    submit_once(relay, token).await
                } else {
                    smtp_once(spool, token).await
                };
                {
                    let mut l = ledger.lock().unwrap();
                    if acked {
                        l.acked.push(token);
                    } else {
                        l.unacked += 1;
                    }
                }
                if !acked {
                    // A refused connection comes back at once: don't spin while a
                    // component restarts.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }

    // The killer: each component in turn, at a random moment, SIGKILL and start again.
    let mut kills: BTreeMap<&str, u32> = BTreeMap::new();
    for _ in 0..rounds {
        for c in COMPONENTS {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos();
            let pause = 200 + u64::from(nanos % 600);
            tokio::time::sleep(Duration::from_millis(pause)).await; // a random moment under load
            let mut up = procs.remove(c).unwrap();
            up.child.kill().unwrap();
            up.child.wait().unwrap();
            drop(up);
            *kills.entry(c).or_insert(0) += 1;
            let d2 = d.clone();
            let cfg = format!("{c}.toml");
            let up = tokio::task::spawn_blocking(move || Up::start(&d2, &cfg))
                .await
                .unwrap();
            procs.insert(c, up);
        }
    }
    // Some load with everything up again, then stop the clients.
    let before = ledger.lock().unwrap().acked.len();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while ledger.lock().unwrap().acked.len() < before + 20 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no mail accepted after the last restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // polling interval
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let (acked, unacked) = {
        let l = ledger.lock().unwrap();
        (l.acked.clone(), l.unacked)
    };

    // Every acknowledged message arrives; the queues drain.
    let root = d.join("data").join("filers");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let copies = loop {
        let copies = delivered(&root);
        let missing = acked.iter().filter(|t| !copies.contains_key(t)).count();
        if missing == 0 && queue_len(&d) == 0 {
            break copies;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{missing} of {} acknowledged messages never arrived; queue: {}",
            acked.len(),
            ok(&d, &["-c", "admin.toml", "queue", "list"], None)
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // polling interval
    };
    let duplicated: Vec<(u64, u32)> = copies
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(t, n)| (*t, *n))
        .collect();
    let unacked_delivered = copies.keys().filter(|t| !acked.contains(t)).count();
    eprintln!(
        "crash report: kills {kills:?}; sent {} (acknowledged {}, not acknowledged {unacked}); \
         delivered {} distinct, {unacked_delivered} of them not acknowledged; duplicated {}: {duplicated:?}",
        acked.len() as u64 + unacked,
        acked.len(),
        copies.len(),
        duplicated.len()
    );
    assert!(
        acked.len() >= 20,
        "too little load got through: {}",
        acked.len()
    );
    assert!(
        duplicated.is_empty(),
        "messages delivered more than once: {duplicated:?}"
    );
    // The proxy came back too: a login through it reaches the mail.
    let imap: SocketAddr = ([127, 0, 0, 1], ports.proxy_imap).into();
    let s = TcpStream::connect(imap).await.unwrap();
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    assert!(line.starts_with("* OK"), "{line}");
    w.write_all(format!("a LOGIN {} pw\r\nb STATUS INBOX (MESSAGES)\r\n", USERS[1]).as_bytes())
        .await
        .unwrap();
    let mut status = String::new();
    loop {
        line.clear();
        assert!(r.read_line(&mut line).await.unwrap() > 0, "closed");
        status.push_str(&line);
        if line.starts_with("b ") {
            break;
        }
    }
    assert!(status.contains("b OK"), "{status}");
    let bob = copies
        .keys()
        .filter(|t| USERS[(**t % 4) as usize] == USERS[1])
        .count();
    assert!(
        status.contains(&format!("(MESSAGES {bob})")),
        "{status} (expected {bob})"
    );
}
