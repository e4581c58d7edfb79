//! The access proxy inside `mailctl up`: mail delivered through the spool is read through the
//! proxy with Python's imaplib and poplib, for users on two filers; wrong password and unknown
//! user look the same; a filer that is down gets the temporary answer at once; STARTTLS and
//! STLS drop what was pipelined before the handshake.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::tls::Identity;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncWrite, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::support::{EPHEMERAL_CONFIG, Up, ok, wait_for_maildir};

fn python(script: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn host_port(a: SocketAddr) -> [String; 2] {
    [a.ip().to_string(), a.port().to_string()]
}

/// A platform with `a@` on filer1, `b@` on filer2 and `d@` on a filer with nothing listening,
/// and one message delivered through the spool to each of `a@` and `b@`.
async fn platform(d: &Path) -> Up {
    std::fs::write(d.join("mail.toml"), EPHEMERAL_CONFIG).unwrap();
    let c = "mail.toml";
    ok(d, &["-c", c, "domain", "add", "example.test"], None);
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    ok(
        d,
        &[
            "-c", c, "filer", "add", "dead", "--lmtp", &dead, "--imap", &dead, "--pop3", &dead,
        ],
        None,
    );
    for (user, filer) in [
        ("a@example.test", "filer1"),
        ("b@example.test", "filer2"),
        ("d@example.test", "dead"),
    ] {
        ok(
            d,
            &["-c", c, "user", "add", user, "--filer", filer],
            Some("secret one\n"),
        );
    }
    let up = Up::start(d, c);
    let [h, p] = host_port(up.addr("spool", "smtp"));
    python(
        r#"
import smtplib, sys
s = smtplib.SMTP(sys.argv[1], int(sys.argv[2]), timeout=10)
for to in ["a@example.test", "b@example.test"]:
    s.sendmail("x@remote.test", [to], ("Subject: hello " + to + "\r\n\r\nbody for " + to + "\r\n").encode())
s.quit()
"#,
        &[&h, &p],
    );
    wait_for_maildir(&d.join("data/filers/filer1"), "a@example.test", 1);
    wait_for_maildir(&d.join("data/filers/filer2"), "b@example.test", 1);
    up
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imaplib_and_poplib_read_mail_through_the_proxy_on_two_filers() {
    let dir = tempfile::tempdir().unwrap();
    let up = platform(dir.path()).await;
    let [h, p] = host_port(up.addr("access", "imap"));
    let out = python(
        r#"
import imaplib, sys
host, port = sys.argv[1], int(sys.argv[2])
for user in ["a@example.test", "b@example.test"]:
    m = imaplib.IMAP4(host, port, timeout=10)
    typ, data = m.login(user, "secret one")
    assert typ == "OK", (typ, data)
    typ, data = m.select("INBOX")
    assert typ == "OK" and data == [b"1"], (typ, data)
    typ, data = m.fetch("1", "(RFC822)")
    body = data[0][1].decode()
    assert "Subject: hello " + user in body and "body for " + user in body, body
    typ, data = m.store("1", "+FLAGS", "\\Seen")
    assert typ == "OK" and b"\\Seen" in data[0], (typ, data)
    typ, data = m.fetch("1", "(FLAGS)")
    assert b"\\Seen" in data[0], data
    m.logout()
    print(user, "ok")
"#,
        &[&h, &p],
    );
    assert_eq!(out, "a@example.test ok\nb@example.test ok\n");

    let [h, p] = host_port(up.addr("access", "pop3"));
    let out = python(
        r#"
import poplib, sys
host, port = sys.argv[1], int(sys.argv[2])
for user in ["a@example.test", "b@example.test"]:
    c = poplib.POP3(host, port, timeout=10)
    c.user(user)
    c.pass_("secret one")
    n, size = c.stat()
    assert n == 1, (n, size)
    _, lines, _ = c.retr(1)
    assert b"body for " + user.encode() in lines, lines
    c.quit()
    print(user, "ok")
"#,
        &[&h, &p],
    );
    assert_eq!(out, "a@example.test ok\nb@example.test ok\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_unknown_user_get_the_same_answer() {
    let dir = tempfile::tempdir().unwrap();
    let up = platform(dir.path()).await;
    let [h, p] = host_port(up.addr("access", "imap"));
    let [_, p3] = host_port(up.addr("access", "pop3"));
    let out = python(
        r#"
import imaplib, poplib, sys
host, port, port3 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for user, pw in [("a@example.test", "wrong"), ("nobody@example.test", "secret one")]:
    m = imaplib.IMAP4(host, port, timeout=10)
    try:
        m.login(user, pw)
        print("accepted")
    except imaplib.IMAP4.error as e:
        print(e)
    c = poplib.POP3(host, port3, timeout=10)
    c.user(user)
    try:
        c.pass_(pw)
        print("accepted")
    except poplib.error_proto as e:
        print(e.args[0].decode())
"#,
        &[&h, &p, &p3],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "b'[AUTHENTICATIONFAILED] Authentication failed'",
            "-ERR [AUTH] Authentication failed",
            "b'[AUTHENTICATIONFAILED] Authentication failed'",
            "-ERR [AUTH] Authentication failed"
        ]
    );
}

/// A line reader with a deadline on each read.
struct Lines<S>(BufReader<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> Lines<S> {
    async fn line(&mut self) -> Option<String> {
        let mut l = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), self.0.read_line(&mut l))
            .await
            .expect("an answer within 10 s")
            .unwrap_or(0);
        (n > 0).then(|| l.trim_end().to_owned())
    }

    async fn send(&mut self, s: &str) {
        self.0.get_mut().write_all(s.as_bytes()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filer_that_is_down_gets_the_temporary_answer_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let up = platform(dir.path()).await;
    for _ in 0..4 {
        let mut c = Lines(BufReader::new(
            TcpStream::connect(up.addr("access", "imap")).await.unwrap(),
        ));
        assert!(c.line().await.unwrap().starts_with("* OK"));
        let t = Instant::now();
        c.send("a LOGIN d@example.test \"secret one\"\r\n").await;
        let answer = c.line().await.unwrap();
        assert!(answer.starts_with("a NO [UNAVAILABLE]"), "{answer}");
        assert!(c.line().await.unwrap().starts_with("* BYE"));
        assert_eq!(c.line().await, None, "closed");
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());

        let mut c = Lines(BufReader::new(
            TcpStream::connect(up.addr("access", "pop3")).await.unwrap(),
        ));
        assert!(c.line().await.unwrap().starts_with("+OK"));
        let t = Instant::now();
        c.send("USER d@example.test\r\nPASS secret one\r\n").await;
        assert_eq!(c.line().await.unwrap(), "+OK");
        let answer = c.line().await.unwrap();
        assert!(answer.starts_with("-ERR [SYS/TEMP]"), "{answer}");
        assert_eq!(c.line().await, None, "closed");
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }
    // `mailctl status` shows the filer down as the proxy sees it, and the others up.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = ok(dir.path(), &["-c", "mail.toml", "status", "--json"], None);
        let status: serde_json::Value = serde_json::from_str(&out).unwrap();
        let health = &status["access_health"];
        if health["dead"] == "down" {
            assert_eq!(health["filer1"], "up", "{health}");
            break;
        }
        assert!(Instant::now() < deadline, "never shown down: {health}");
        std::thread::sleep(Duration::from_millis(20)); // polling interval, not synchronisation
    }
}

/// Regression: commands pipelined behind STARTTLS/STLS in the same segment are dropped, never
/// answered after the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_and_stls_drop_commands_injected_before_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let up = platform(dir.path()).await;
    let id = Identity::dev(&dir.path().join("data/tls"), "localhost").unwrap();
    let connector = tokio_rustls::TlsConnector::from(id.trusting_client_config().unwrap());
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    for (proto, hello, inject, ok_prefix, next, next_answer) in [
        (
            "imap",
            "* OK",
            "a STARTTLS\r\nb LOGIN a@example.test \"secret one\"\r\n",
            "a OK",
            "c NOOP\r\n",
            "c OK",
        ),
        (
            "pop3",
            "+OK",
            "STLS\r\nUSER a@example.test\r\nPASS secret one\r\n",
            "+OK",
            "CAPA\r\n",
            "+OK Capability",
        ),
    ] {
        let mut c = Lines(BufReader::new(
            TcpStream::connect(up.addr("access", proto)).await.unwrap(),
        ));
        assert!(c.line().await.unwrap().starts_with(hello));
        c.send(inject).await;
        let answer = c.line().await.unwrap();
        assert!(answer.starts_with(ok_prefix), "{proto}: {answer}");
        assert!(c.0.buffer().is_empty(), "{proto}: more in clear text");
        let tls = connector
            .connect(name.clone(), c.0.into_inner())
            .await
            .unwrap();
        let mut t = Lines(BufReader::new(tls));
        t.send(next).await;
        let answer = t.line().await.unwrap();
        assert!(answer.starts_with(next_answer), "{proto}: {answer}");
    }
}
