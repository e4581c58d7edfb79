//! What the end-to-end tests share: running `mailctl` as an operator would.

use std::io::Write as _;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

pub(crate) fn mailctl(dir: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mailctl"))
        .args(args)
        .current_dir(dir)
        .env_remove("MAILCTL_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

pub(crate) fn ok(dir: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let out = mailctl(dir, args, stdin);
    assert!(
        out.status.success(),
        "mailctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub(crate) fn fails(dir: &Path, args: &[&str], stdin: Option<&str>, message: &str) {
    let out = mailctl(dir, args, stdin);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "mailctl {args:?} should fail");
    assert!(
        err.contains(message),
        "mailctl {args:?}: expected {message:?} in {err:?}"
    );
}

/// A running `mailctl up` in `dir` with config file `config`.
pub(crate) struct Up {
    pub(crate) child: Child,
    pub(crate) status: serde_json::Value,
}

impl Up {
    /// Starts `mailctl -c CONFIG up` and waits (with a deadline) until `status` reports it running
    /// with every listener reachable.
    pub(crate) fn start(dir: &Path, config: &str) -> Self {
        Self::start_with_log(dir, config, None, false)
    }

    /// Like [`Up::start`], with the platform's log (`info` and up, no colours) written to `log`.
    pub(crate) fn start_logging(dir: &Path, config: &str, log: &Path) -> Self {
        Self::start_with_log(dir, config, Some(log), false)
    }

    /// Like [`Up::start_logging`], with `up --log-json`.
    pub(crate) fn start_logging_json(dir: &Path, config: &str, log: &Path) -> Self {
        Self::start_with_log(dir, config, Some(log), true)
    }

    fn start_with_log(dir: &Path, config: &str, log: Option<&Path>, json: bool) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_mailctl"));
        command
            .args(["-c", config, "up"])
            .args(json.then_some("--log-json"))
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(log) = log {
            let file = std::fs::File::create(log).unwrap();
            command
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1")
                .stdout(file);
        }
        let child = command.spawn().unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let status = loop {
            let out = mailctl(dir, &["-c", config, "status", "--json"], None);
            if out.status.success() {
                let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                let mine = s["processes"].as_array().is_some_and(|ps| {
                    ps.iter()
                        .any(|p| p["pid"].as_u64() == Some(u64::from(child.id())))
                });
                if mine {
                    break s;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "status never reported a running platform: {out:?}"
            );
            std::thread::yield_now();
        };
        Self { child, status }
    }

    /// The address of `service`'s `protocol` listener.
    pub(crate) fn addr(&self, service: &str, protocol: &str) -> std::net::SocketAddr {
        let l = self.status["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["service"] == service && l["protocol"] == protocol)
            .unwrap_or_else(|| panic!("no {service} {protocol} listener in {}", self.status));
        l["address"].as_str().unwrap().parse().unwrap()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config file with every listener on an ephemeral port, two filers, a spool with test
/// timings (short greeting delay, retries within a second, a short lookup cache) and the access
/// proxy with short login delays.
pub(crate) const EPHEMERAL_CONFIG: &str = "[admin]\nlisten = \"127.0.0.1:0\"\n[database]\ncache_ttl = \"100ms\"\n\n[filter]\nenabled = false\nlisten = \"127.0.0.1:0\"\nnetwork_checks = false\n\n[relay]\nsubmission = \"127.0.0.1:0\"\nsubmissions = \"127.0.0.1:0\"\ninternal = \"127.0.0.1:0\"\nretry_min = \"100ms\"\nretry_max = \"500ms\"\nlogin_delay = \"10ms\"\nlogin_delay_max = \"50ms\"\n\n[access]\nimap = \"127.0.0.1:0\"\nimaps = \"127.0.0.1:0\"\npop3 = \"127.0.0.1:0\"\npop3s = \"127.0.0.1:0\"\nlogin_delay = \"10ms\"\nlogin_delay_max = \"50ms\"\n\n[spool]\nsmtp = \"127.0.0.1:0\"\nreinject = \"127.0.0.1:0\"\ngreet_delay = \"50ms\"\nretry_min = \"100ms\"\nretry_max = \"500ms\"\n\n[[filers]]\nname = \"filer1\"\nlmtp = \"127.0.0.1:0\"\nimap = \"127.0.0.1:0\"\npop3 = \"127.0.0.1:0\"\n\n[[filers]]\nname = \"filer2\"\nlmtp = \"127.0.0.1:0\"\nimap = \"127.0.0.1:0\"\npop3 = \"127.0.0.1:0\"\n";

/// The messages in `user`'s INBOX under a filer's mail root (`new/` and `cur/`), sorted.
pub(crate) fn maildir(root: &Path, user: &str) -> Vec<String> {
    let (local, domain) = user.split_once('@').unwrap();
    let dir = root.join(domain).join(local);
    let mut files = Vec::new();
    for sub in ["new", "cur"] {
        if let Ok(rd) = std::fs::read_dir(dir.join(sub)) {
            files.extend(rd.flatten().map(|e| e.path()));
        }
    }
    files.sort();
    files
        .into_iter()
        .map(|p| String::from_utf8_lossy(&std::fs::read(p).unwrap()).into_owned())
        .collect()
}

/// Waits (with a deadline) until `user`'s INBOX holds `n` messages, and returns them; the
/// failure says what was there.
pub(crate) fn wait_for_maildir(root: &Path, user: &str, n: usize) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let msgs = maildir(root, user);
        if msgs.len() >= n {
            assert_eq!(
                msgs.len(),
                n,
                "{user}: more messages than expected: {msgs:#?}"
            );
            return msgs;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{user}: expected {n} message(s), found {}: {msgs:#?}",
            msgs.len()
        );
        std::thread::sleep(Duration::from_millis(20)); // polling interval, not synchronisation
    }
}

/// One message a [`FakeMx`] accepted.
#[derive(Debug, Clone)]
pub(crate) struct Delivered {
    pub(crate) from: String,
    pub(crate) rcpts: Vec<String>,
    pub(crate) data: String,
}

/// A remote MX on loopback for the relay to deliver to: it refuses recipients whose local part
/// starts with `reject` (`550 5.1.1`) and records every message it accepts.
pub(crate) struct FakeMx {
    pub(crate) addr: std::net::SocketAddr,
    pub(crate) got: std::sync::Arc<std::sync::Mutex<Vec<Delivered>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeMx {
    pub(crate) async fn start(addr: &str) -> Self {
        Self::start_dropping(addr, 0).await
    }

    /// Like [`FakeMx::start`], but the first `drops` messages are read to their end and then
    /// the connection is closed without a reply (and nothing is recorded): a remote MX that
    /// crashes before its final reply.
    pub(crate) async fn start_dropping(addr: &str, drops: usize) -> Self {
        let drops = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(drops));
        use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = got.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (record, drops) = (record.clone(), drops.clone());
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut r = BufReader::new(r);
                    w.write_all(b"220 fake.mx ESMTP\r\n").await.unwrap();
                    let (mut from, mut rcpts) = (String::new(), Vec::new());
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let upper = line.to_ascii_uppercase();
                        let reply: &[u8] = if upper.starts_with("EHLO") {
                            b"250-fake.mx\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 100000000\r\n"
                        } else if upper.starts_with("MAIL FROM:") {
                            from = line[10..]
                                .split('>')
                                .next()
                                .unwrap()
                                .trim_start_matches('<')
                                .to_owned();
                            rcpts.clear();
                            b"250 2.1.0 ok\r\n"
                        } else if upper.starts_with("RCPT TO:") {
                            let rcpt = line[8..]
                                .split('>')
                                .next()
                                .unwrap()
                                .trim_start_matches('<')
                                .to_owned();
                            if rcpt.starts_with("reject") {
                                b"550 5.1.1 no such user\r\n"
                            } else {
                                rcpts.push(rcpt);
                                b"250 2.1.5 ok\r\n"
                            }
                        } else if upper.starts_with("DATA") {
                            w.write_all(b"354 go\r\n").await.unwrap();
                            let mut data = String::new();
                            loop {
                                let mut l = String::new();
                                if r.read_line(&mut l).await.unwrap_or(0) == 0 {
                                    return;
                                }
                                if l == ".\r\n" {
                                    break;
                                }
                                data.push_str(l.strip_prefix('.').unwrap_or(&l));
                            }
                            let dropping = drops
                                .fetch_update(
                                    std::sync::atomic::Ordering::SeqCst,
                                    std::sync::atomic::Ordering::SeqCst,
                                    |n| n.checked_sub(1),
                                )
                                .is_ok();
                            if dropping {
                                return;
                            }
                            record.lock().unwrap().push(Delivered {
                                from: from.clone(),
                                rcpts: std::mem::take(&mut rcpts),
                                data,
                            });
                            b"250 2.0.0 accepted\r\n"
                        } else if upper.starts_with("QUIT") {
                            let _ = w.write_all(b"221 bye\r\n").await;
                            return;
                        } else if upper.starts_with("RSET") || upper.starts_with("NOOP") {
                            b"250 ok\r\n"
                        } else {
                            b"502 5.5.1 not here\r\n"
                        };
                        w.write_all(reply).await.unwrap();
                    }
                });
            }
        });
        Self { addr, got, task }
    }

    /// Waits (with a deadline) until `n` messages arrived, and returns them.
    pub(crate) async fn wait_for(&self, n: usize) -> Vec<Delivered> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.got.lock().unwrap().clone();
            if got.len() >= n {
                assert_eq!(got.len(), n, "more messages than expected: {got:#?}");
                return got;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "expected {n} message(s) at the fake MX, got {got:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await; // polling interval, not synchronisation
        }
    }
}

impl Drop for FakeMx {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A loopback port that is free now, below the ephemeral range (Linux: 32768 and up), so no
/// other test's port-0 listener can take it before the test binds it again.
pub(crate) fn reserved_port() -> u16 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        ^ std::process::id();
    for i in 0..10_000u32 {
        let port = 20_000 + ((seed.wrapping_add(i.wrapping_mul(7919))) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below the ephemeral range");
}
