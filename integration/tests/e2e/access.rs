//! The access proxy inside `mailctl up`: mail delivered through the spool is read through the
//! proxy with Python's imaplib and poplib and with curl, for users on two filers; wrong password
//! and unknown user look the same; a filer that is down gets the temporary answer at once, a
//! killed filer process and one that never answers connects are given up within the connect
//! timeout and then answered at once while known down, and a restarted filer is served again;
//! STARTTLS and STLS drop what was pipelined before the handshake.

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

/// curl (its own IMAP and POP3 client, SASL PLAIN with an initial response) reads through the
/// proxy the messages delivered to users on two filers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_fetches_over_imap_and_retrieves_over_pop3_through_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let up = platform(dir.path()).await;
    let imap = up.addr("access", "imap");
    let pop3 = up.addr("access", "pop3");
    for user in ["a@example.test", "b@example.test"] {
        for url in [
            format!("imap://{imap}/INBOX;UID=1"),
            format!("pop3://{pop3}/1"),
        ] {
            let out = std::process::Command::new("curl")
                .args(["--silent", "--show-error", "--max-time", "20"])
                .args(["--user", &format!("{user}:secret one"), &url])
                .output()
                .expect("curl is installed");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "curl {url} as {user}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                text.contains(&format!("Subject: hello {user}"))
                    && text.contains(&format!("body for {user}")),
                "curl {url} as {user}: {text}"
            );
        }
        // A wrong password is refused (curl exits 67, "login denied").
        let out = std::process::Command::new("curl")
            .args(["--silent", "--max-time", "20", "--user"])
            .arg(format!("{user}:wrong"))
            .arg(format!("imap://{imap}/INBOX;UID=1"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(67), "{out:?}");
    }
}

/// Logs in `user` over IMAP (`LOGIN`) or POP3 (`USER`/`PASS`) on a new connection; returns the
/// answer to the login and the time from sending it to reading the answer. A temporary failure
/// must close the connection.
async fn timed_login(proxy: SocketAddr, pop3: bool, user: &str) -> (String, Duration) {
    let mut c = Lines(BufReader::new(TcpStream::connect(proxy).await.unwrap()));
    let greeting = c.line().await.unwrap();
    assert!(greeting.starts_with(if pop3 { "+OK" } else { "* OK" }));
    let t = Instant::now();
    let answer = if pop3 {
        c.send(&format!("USER {user}\r\nPASS secret one\r\n")).await;
        assert_eq!(c.line().await.unwrap(), "+OK");
        c.line().await.unwrap()
    } else {
        c.send(&format!("a LOGIN {user} \"secret one\"\r\n")).await;
        c.line().await.unwrap()
    };
    let elapsed = t.elapsed();
    if answer.starts_with("a NO [UNAVAILABLE]") {
        assert!(c.line().await.unwrap().starts_with("* BYE"));
    }
    if answer.starts_with("a NO") || answer.starts_with("-ERR") {
        assert_eq!(c.line().await, None, "closed after {answer}");
    }
    (answer, elapsed)
}

fn unavailable(answer: &str, pop3: bool) -> bool {
    answer.starts_with(if pop3 {
        "-ERR [SYS/TEMP]"
    } else {
        "a NO [UNAVAILABLE]"
    })
}

fn logged_in(answer: &str, pop3: bool) -> bool {
    answer.starts_with(if pop3 { "+OK Logged in" } else { "a OK" })
}

/// `filer`'s health in `mailctl status --json` (`up` when the proxy has no opinion).
fn health(dir: &Path, config: &str, filer: &str) -> String {
    let out = ok(dir, &["-c", config, "status", "--json"], None);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    status["access_health"][filer]
        .as_str()
        .unwrap_or("up")
        .to_owned()
}

/// Waits (with a deadline) until `mailctl status` shows `filer` in state `want`.
fn wait_for_health(dir: &Path, config: &str, filer: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let h = health(dir, config, filer);
        if h == want {
            return;
        }
        assert!(Instant::now() < deadline, "{filer} is {h}, never {want}");
        std::thread::sleep(Duration::from_millis(20)); // polling interval, not synchronisation
    }
}

/// A SCRAM-SHA-256 client (RFC 5802, with an initial response; IMAP `AUTHENTICATE`, POP3
/// `AUTH`) that checks the server's signature and prints the answer to the login and the
/// milliseconds from sending the client proof to that answer.
const SCRAM: &str = r#"
import base64, hashlib, hmac, os, socket, sys, time
host, port, proto, user, pw = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
s = socket.create_connection((host, port), timeout=10)
f = s.makefile("rb")
def line():
    l = f.readline()
    assert l, "closed"
    return l.decode().rstrip("\r\n")
def send(t):
    s.sendall(t.encode() + b"\r\n")
b64 = lambda b: base64.b64encode(b).decode()
line()
first_bare = "n=%s,r=%s" % (user, b64(os.urandom(18)))
command = "a AUTHENTICATE SCRAM-SHA-256 " if proto == "imap" else "AUTH SCRAM-SHA-256 "
send(command + b64(("n,," + first_bare).encode()))
l = line()
assert l.startswith("+ "), l
server_first = base64.b64decode(l[2:]).decode()
attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
salted = hashlib.pbkdf2_hmac("sha256", pw.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
client_key = hmac.digest(salted, b"Client Key", "sha256")
without_proof = "c=biws,r=" + attrs["r"]
auth_msg = ",".join([first_bare, server_first, without_proof]).encode()
signature = hmac.digest(hashlib.sha256(client_key).digest(), auth_msg, "sha256")
proof = bytes(a ^ b for a, b in zip(client_key, signature))
t = time.perf_counter()
send(b64((without_proof + ",p=" + b64(proof)).encode()))
l = line()
if l.startswith("+ "):
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    want = "v=" + b64(hmac.digest(server_key, auth_msg, "sha256"))
    assert base64.b64decode(l[2:]).decode() == want, l
    send("")
    l = line()
print("%s\t%.3f" % (l, (time.perf_counter() - t) * 1000))
"#;

/// Logs in `user` with SCRAM-SHA-256; returns the answer and the time from the client proof
/// to it (the credentials check costs a few HMACs, not an argon2 hash).
fn scram_login(proxy: SocketAddr, pop3: bool, user: &str) -> (String, Duration) {
    let [h, p] = host_port(proxy);
    let proto = if pop3 { "pop3" } else { "imap" };
    let out = python(SCRAM, &[&h, &p, proto, user, "secret one"]);
    let (answer, ms) = out.trim_end().rsplit_once('\t').unwrap();
    let took = Duration::from_secs_f64(ms.parse::<f64>().unwrap() / 1000.0);
    (answer.to_owned(), took)
}

/// Reads `user`'s one message through the proxy with imaplib and poplib.
fn read_normally(imap: SocketAddr, pop3: SocketAddr, user: &str) {
    let [h, p] = host_port(imap);
    let [_, p3] = host_port(pop3);
    let out = python(
        r#"
import imaplib, poplib, sys
host, port, port3, user = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
m = imaplib.IMAP4(host, port, timeout=10)
m.login(user, "secret one")
typ, data = m.select("INBOX")
assert typ == "OK" and data == [b"1"], (typ, data)
typ, data = m.fetch("1", "(BODY.PEEK[])")
assert ("body for " + user).encode() in data[0][1], data
m.logout()
c = poplib.POP3(host, port3, timeout=10)
c.user(user)
c.pass_("secret one")
_, lines, _ = c.retr(1)
assert ("body for " + user).encode() in lines, lines
c.quit()
print("ok")
"#,
        &[&h, &p, &p3, user],
    );
    assert_eq!(out, "ok\n");
}

/// The fault test with a real filer: process A runs the spool, the proxy and filer2; process B
/// runs filer1 on the same database (and the same proxy secret, which is per data directory
/// unless configured). B is killed: logins for filer1's user get the temporary
/// answer within the connect timeout, then (filer1 known down) in under 100 ms, while filer2's
/// user reads mail as usual. B restarts on new ports: logins work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_filer_fails_fast_without_affecting_the_other_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("a.toml"),
        "[admin]\nlisten = \"127.0.0.1:0\"\n[platform]\ndata_dir = \"a\"\n[database]\ncache_ttl = \"100ms\"\n\
         [trust]\nproxy_secret = \"shared by both processes\"\n\
         [relay]\nenabled = false\n[filter]\nenabled = false\n[access]\nimap = \"127.0.0.1:0\"\nimaps = \"\"\npop3 = \"127.0.0.1:0\"\npop3s = \"\"\n\
         login_delay = \"10ms\"\nlogin_delay_max = \"50ms\"\nfiler_failure_threshold = 3\nfiler_cooldown = \"1s\"\n\
         [spool]\nsmtp = \"127.0.0.1:0\"\nreinject = \"127.0.0.1:0\"\ngreet_delay = \"0s\"\n\
         retry_min = \"100ms\"\nretry_max = \"300ms\"\n\
         [[filers]]\nname = \"filer2\"\nlmtp = \"127.0.0.1:0\"\nimap = \"127.0.0.1:0\"\npop3 = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    std::fs::write(
        d.join("b.toml"),
        "[admin]\nlisten = \"127.0.0.1:0\"\n[platform]\ndata_dir = \"b\"\n[database]\nurl = \"sqlite:a/location.db\"\n\
         [trust]\nproxy_secret = \"shared by both processes\"\n\
         [spool]\nenabled = false\n[access]\nenabled = false\n[relay]\nenabled = false\n[filter]\nenabled = false\n\
         [[filers]]\nname = \"filer1\"\nlmtp = \"127.0.0.1:0\"\nimap = \"127.0.0.1:0\"\npop3 = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    std::fs::create_dir_all(d.join("a")).unwrap();
    ok(d, &["-c", "a.toml", "domain", "add", "example.test"], None);
    let mut b = Up::start(d, "b.toml");
    let a = Up::start(d, "a.toml");
    for (user, filer) in [("a@example.test", "filer1"), ("b@example.test", "filer2")] {
        ok(
            d,
            &["-c", "a.toml", "user", "add", user, "--filer", filer],
            Some("secret one\n"),
        );
    }
    let [h, p] = host_port(a.addr("spool", "smtp"));
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
    wait_for_maildir(&d.join("b/filers/filer1"), "a@example.test", 1);
    wait_for_maildir(&d.join("a/filers/filer2"), "b@example.test", 1);
    let (imap, pop3) = (a.addr("access", "imap"), a.addr("access", "pop3"));
    read_normally(imap, pop3, "a@example.test");
    read_normally(imap, pop3, "b@example.test");

    b.child.kill().unwrap();
    b.child.wait().unwrap();
    // Not yet known down: each login tries to connect, and is answered within the connect
    // timeout (2 s; a dead process on loopback refuses at once).
    let connect_timeout = Duration::from_secs(2);
    // Failures seen by three client connections (`filer_failure_threshold`) mark it down.
    for (i, pop3_too) in [false, true, false].into_iter().enumerate() {
        let proxy = if pop3_too { pop3 } else { imap };
        let (answer, took) = timed_login(proxy, pop3_too, "a@example.test").await;
        assert!(unavailable(&answer, pop3_too), "{answer}");
        assert!(took < connect_timeout, "login {i}: {answer} after {took:?}");
    }
    wait_for_health(d, "a.toml", "filer1", "down");
    // Known down: no connection attempt. With SCRAM-SHA-256 (a credentials check of a few
    // HMACs) the answer comes in under 100 ms; LOGIN and USER/PASS add an argon2 verification
    // (tens of ms in a debug build, more on a busy machine), so they only get the connect
    // timeout's bound. filer2's user is served meanwhile.
    for round in 0..3 {
        for pop3_too in [false, true] {
            let proxy = if pop3_too { pop3 } else { imap };
            for _ in 0..3 {
                let (answer, took) = scram_login(proxy, pop3_too, "a@example.test");
                assert!(unavailable(&answer, pop3_too), "{answer}");
                assert!(
                    took < Duration::from_millis(100),
                    "round {round}: {answer} after {took:?}"
                );
            }
            let (answer, took) = timed_login(proxy, pop3_too, "a@example.test").await;
            assert!(unavailable(&answer, pop3_too), "{answer}");
            assert!(took < connect_timeout, "{answer} after {took:?}");
            let (answer, _) = scram_login(proxy, pop3_too, "b@example.test");
            assert!(logged_in(&answer, pop3_too), "{answer}");
        }
        read_normally(imap, pop3, "b@example.test");
    }
    assert_eq!(health(d, "a.toml", "filer2"), "up");
    assert_ne!(
        health(d, "a.toml", "filer1"),
        "up",
        "down, or a probe under way"
    );

    // filer1 comes back on new ports; its address reaches the database, and after the cooldown
    // a probe login finds it.
    let _b = Up::start(d, "b.toml");
    for pop3_too in [false, true] {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (answer, _) = timed_login(
                if pop3_too { pop3 } else { imap },
                pop3_too,
                "a@example.test",
            )
            .await;
            if logged_in(&answer, pop3_too) {
                break;
            }
            assert!(unavailable(&answer, pop3_too), "{answer}");
            assert!(Instant::now() < deadline, "filer1 never usable again");
            std::thread::sleep(Duration::from_millis(50)); // polling interval, not synchronisation
        }
    }
    wait_for_health(d, "a.toml", "filer1", "up");
    read_normally(imap, pop3, "a@example.test");
    read_normally(imap, pop3, "b@example.test");
}

/// A filer whose host does not answer connects (its listen queue is full, so the kernel drops
/// the SYNs, as a firewall or a dead host would): the first logins wait for the connect timeout
/// and no longer, then the filer is known down and logins are answered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filer_that_never_answers_connects_costs_the_connect_timeout_until_known_down() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let connect_timeout = Duration::from_millis(500);
    std::fs::write(
        d.join("mail.toml"),
        EPHEMERAL_CONFIG.replace(
            "[access]\n",
            "[access]\nfiler_connect_timeout = \"500ms\"\nfiler_failure_threshold = 3\nfiler_cooldown = \"60s\"\n",
        ),
    )
    .unwrap();
    // Backlog 0: one queued connection fills it; later SYNs are dropped.
    let silent = tokio::net::TcpSocket::new_v4().unwrap();
    silent.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let silent = silent.listen(0).unwrap();
    let addr = silent.local_addr().unwrap();
    let _queued = TcpStream::connect(addr).await.unwrap();
    let blocked = tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await;
    assert!(
        blocked.is_err(),
        "the kernel should drop SYNs to a full listen queue (net.ipv4.tcp_abort_on_overflow = 0)"
    );
    let c = "mail.toml";
    ok(d, &["-c", c, "domain", "add", "example.test"], None);
    let a = addr.to_string();
    ok(
        d,
        &[
            "-c", c, "filer", "add", "silent", "--lmtp", &a, "--imap", &a, "--pop3", &a,
        ],
        None,
    );
    ok(
        d,
        &[
            "-c",
            c,
            "user",
            "add",
            "s@example.test",
            "--filer",
            "silent",
        ],
        Some("secret one\n"),
    );
    let up = Up::start(d, c);
    let (imap, pop3) = (up.addr("access", "imap"), up.addr("access", "pop3"));
    // Failures seen by three client connections (`filer_failure_threshold`) mark it down.
    for (i, pop3_too) in [false, true, false].into_iter().enumerate() {
        let proxy = if pop3_too { pop3 } else { imap };
        let (answer, took) = timed_login(proxy, pop3_too, "s@example.test").await;
        assert!(unavailable(&answer, pop3_too), "{answer}");
        // The connect timeout, plus the argon2 verification before it.
        assert!(
            took >= connect_timeout && took < connect_timeout + Duration::from_secs(1),
            "login {i}: {answer} after {took:?}"
        );
    }
    wait_for_health(d, c, "silent", "down");
    for pop3_too in [false, true] {
        let proxy = if pop3_too { pop3 } else { imap };
        for _ in 0..3 {
            let (answer, took) = scram_login(proxy, pop3_too, "s@example.test");
            assert!(unavailable(&answer, pop3_too), "{answer}");
            assert!(took < Duration::from_millis(100), "{answer} after {took:?}");
        }
        let (answer, took) = timed_login(proxy, pop3_too, "s@example.test").await;
        assert!(unavailable(&answer, pop3_too), "{answer}");
        assert!(took < connect_timeout, "{answer} after {took:?}");
    }
}
