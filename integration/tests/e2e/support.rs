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
        let child = Command::new(env!("CARGO_BIN_EXE_mailctl"))
            .args(["-c", config, "up"])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let status = loop {
            let out = mailctl(dir, &["-c", config, "status", "--json"], None);
            if out.status.success() {
                let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                if s["pid"].as_u64() == Some(u64::from(child.id())) {
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
pub(crate) const EPHEMERAL_CONFIG: &str = "[database]\ncache_ttl = \"100ms\"\n\n[access]\nimap = \"127.0.0.1:0\"\nimaps = \"127.0.0.1:0\"\npop3 = \"127.0.0.1:0\"\npop3s = \"127.0.0.1:0\"\nlogin_delay = \"10ms\"\nlogin_delay_max = \"50ms\"\n\n[spool]\nsmtp = \"127.0.0.1:0\"\nreinject = \"127.0.0.1:0\"\ngreet_delay = \"50ms\"\nretry_min = \"100ms\"\nretry_max = \"500ms\"\n\n[[filers]]\nname = \"filer1\"\nlmtp = \"127.0.0.1:0\"\nimap = \"127.0.0.1:0\"\npop3 = \"127.0.0.1:0\"\n\n[[filers]]\nname = \"filer2\"\nlmtp = \"127.0.0.1:0\"\nimap = \"127.0.0.1:0\"\npop3 = \"127.0.0.1:0\"\n";

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
