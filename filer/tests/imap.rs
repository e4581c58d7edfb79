//! The filer's IMAP backend: Python's imaplib end to end, IDLE pushes, path traversal and
//! literal limits over real sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] functions

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use support::{SECRET, play, start};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

fn login_line(tag: &str, user: &str) -> String {
    let token =
        base64::engine::general_purpose::STANDARD.encode(format!("{user}\0proxy\0{SECRET}"));
    format!("{tag} AUTHENTICATE PLAIN {token}\r\n")
}

/// A raw IMAP client: send lines, read until a tagged reply, with deadlines.
struct Raw {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

impl Raw {
    async fn connect(addr: std::net::SocketAddr) -> Self {
        let (r, w) = TcpStream::connect(addr).await.unwrap().into_split();
        let mut c = Self {
            r: BufReader::new(r),
            w,
        };
        let greeting = c.line().await;
        assert!(greeting.starts_with("* OK"), "{greeting}");
        c
    }

    async fn line(&mut self) -> String {
        let mut l = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), self.r.read_line(&mut l))
            .await
            .expect("reply within 10 s")
            .unwrap();
        assert!(n > 0, "connection closed");
        l
    }

    async fn send(&mut self, s: &str) {
        self.w.write_all(s.as_bytes()).await.unwrap();
    }

    /// Sends a command and returns every line up to and including its tagged reply.
    async fn cmd(&mut self, tag: &str, s: &str) -> Vec<String> {
        self.send(&format!("{tag} {s}\r\n")).await;
        self.until(tag).await
    }

    async fn until(&mut self, tag: &str) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let l = self.line().await;
            let done = l.starts_with(&format!("{tag} "));
            lines.push(l);
            if done {
                return lines;
            }
        }
    }

    async fn login(&mut self, user: &str) {
        self.send(&login_line("L", user)).await;
        let r = self.until("L").await;
        assert!(r.last().unwrap().starts_with("L OK"), "{r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imaplib_end_to_end() {
    let f = start(|_| {}).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/imap_client.py");
    let port = f.imap.port().to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args([
                script,
                "127.0.0.1",
                &port,
                "a@example.test",
                "proxy",
                SECRET,
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.trim(), "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sees_deliveries_and_other_sessions_at_once() {
    let f = start(|_| {}).await;
    let mut a = Raw::connect(f.imap).await;
    a.login("a@example.test").await;
    let sel = a.cmd("s", "SELECT INBOX").await;
    assert!(sel.iter().any(|l| l == "* 0 EXISTS\r\n"), "{sel:?}");
    a.send("i IDLE\r\n").await;
    assert_eq!(a.line().await, "+ idling\r\n");
    // A delivery over LMTP shows up in the idling session.
    play(
        f.lmtp,
        "S: 220\nC: LHLO s\nS: 250-localhost\nS: 250-PIPELINING\nS: 250-ENHANCEDSTATUSCODES\nS: 250-8BITMIME\nS: 250-SMTPUTF8\nS: 250 SIZE\n\
         C: MAIL FROM:<x@remote.test>\nC: RCPT TO:<a@example.test>\nC: DATA\nS: 250\nS: 250\nS: 354\nC: Subject: hi\nC:\nC: hello\nC: .\nS: 250 2.0.0\nC: QUIT\nS: 221\n",
    )
    .await;
    assert_eq!(a.line().await, "* 1 EXISTS\r\n");
    // A flag change in another session too.
    let mut b = Raw::connect(f.imap).await;
    b.login("a@example.test").await;
    b.cmd("s", "SELECT INBOX").await;
    let r = b.cmd("f", "STORE 1 +FLAGS (\\Flagged)").await;
    assert!(r.last().unwrap().starts_with("f OK"), "{r:?}");
    let pushed = a.line().await;
    assert!(
        pushed.starts_with("* 1 FETCH (UID 1 FLAGS (\\Flagged"),
        "{pushed}"
    );
    // And an expunge.
    b.cmd("d", "STORE 1 +FLAGS.SILENT (\\Deleted)").await;
    let pushed = a.line().await;
    assert!(pushed.contains("\\Deleted"), "{pushed}");
    b.cmd("e", "EXPUNGE").await;
    assert_eq!(a.line().await, "* 1 EXPUNGE\r\n");
    a.send("DONE\r\n").await;
    assert!(a.line().await.starts_with("i OK"));
}

fn tree(root: &Path) -> BTreeSet<String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            out.insert(p.strip_prefix(root).unwrap().display().to_string());
            if p.is_dir() {
                walk(&p, root, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailbox_names_cannot_reach_outside_the_maildir() {
    let f = start(|_| {}).await;
    let mut c = Raw::connect(f.imap).await;
    c.login("a@example.test").await;
    let user_dir = "filers/f1/example.test/a";
    let top = f._dir.path().to_owned();
    let outside = |t: &BTreeSet<String>| {
        t.iter()
            .filter(|p| !p.starts_with(user_dir))
            .cloned()
            .collect::<BTreeSet<_>>()
    };
    let before = outside(&tree(&top));
    let bad = [
        "\"..\"",
        "\"../x\"",
        "\"a/../../b\"",
        "\"~root\"",
        "\"/etc\"",
        "\"a//b\"",
        "\"&AC4ALg-\"",
        "\"&AC8-etc\"",
        "\"x&AAA-y\"",
        "\"cur/../../..\"",
        "{4+}\r\na\r\nb",
    ];
    for (i, name) in bad.iter().enumerate() {
        for verb in ["CREATE", "SELECT", "DELETE"] {
            let r = c.cmd(&format!("t{i}"), &format!("{verb} {name}")).await;
            let last = r.last().unwrap();
            assert!(
                last.contains(" NO ") || last.contains(" BAD "),
                "{verb} {name}: {r:?}"
            );
        }
        let r = c
            .cmd(&format!("r{i}"), &format!("RENAME Sent {name}"))
            .await;
        assert!(
            !r.last().unwrap().contains(" OK "),
            "RENAME to {name}: {r:?}"
        );
        let r = c
            .cmd(&format!("a{i}"), &format!("APPEND {name} {{5+}}\r\nhello"))
            .await;
        assert!(!r.last().unwrap().contains(" OK "), "APPEND {name}: {r:?}");
    }
    // A legitimate dotted name stays inside, escaped.
    let r = c.cmd("ok", "CREATE \"a.b\"").await;
    assert!(r.last().unwrap().starts_with("ok OK"), "{r:?}");
    let after = outside(&tree(&top));
    assert_eq!(before, after, "nothing appeared outside the user's Maildir");
    let inside = tree(&top.join(user_dir));
    assert!(inside.contains(".a%2Eb/cur"), "{inside:?}");
    assert!(!inside.iter().any(|p| p.contains("..")), "{inside:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_literal_is_refused_before_it_is_sent() {
    let f = start(|_| {}).await;
    let mut c = Raw::connect(f.imap).await;
    c.login("a@example.test").await;
    // The limit is 1 MiB in the test filer: a synchronising literal above it gets NO at once.
    c.send("a APPEND INBOX {2000000}\r\n").await;
    let r = c.line().await;
    assert!(r.starts_with("a NO [TOOBIG]"), "{r}");
    // The connection is still in step.
    let r = c.cmd("b", "NOOP").await;
    assert_eq!(r.last().unwrap(), "b OK completed\r\n");
    // Within the limit the server asks for the literal.
    c.send("c APPEND INBOX {7}\r\n").await;
    assert!(c.line().await.starts_with('+'));
    c.send("Hi!\r\n\r\n\r\n").await;
    let r = c.until("c").await;
    assert!(r.last().unwrap().starts_with("c OK [APPENDUID "), "{r:?}");
}

#[tokio::test]
async fn untrusted_peers_and_plain_logins_are_refused() {
    let f = start(|s| {
        s.proxy_networks = common::net::Networks::new(vec!["192.0.2.0/24".parse().unwrap()])
    })
    .await;
    let mut s = TcpStream::connect(f.imap).await.unwrap();
    let mut buf = String::new();
    let mut r = BufReader::new(&mut s);
    r.read_line(&mut buf).await.unwrap();
    assert!(buf.starts_with("* BYE [UNAVAILABLE]"), "{buf}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_line_is_cut_off() {
    let f = start(|_| {}).await;
    let mut c = Raw::connect(f.imap).await;
    c.login("a@example.test").await;
    // 1 MiB without a line end: the session ends instead of buffering it.
    let chunk = "x".repeat(64 * 1024);
    for _ in 0..16 {
        if c.w.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    assert_eq!(c.line().await, "* BYE line too long\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_and_error_paths_transcript() {
    let f = start(|_| {}).await;
    support::play_lines(f.imap, include_str!("transcripts/imap_commands.txt")).await;
}
