//! The proxy's POP3 side: CAPA, STLS (and its injection regression), USER/PASS and AUTH
//! (poplib, and a Rust SCRAM client), the hand-off with pipelined commands, and failing fast.

mod support;

use std::time::Duration;

use base64::Engine as _;
use support::{B64, PASSWORD, Scram, connect, python, start, tls};
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capa_and_user_pass_with_pipelined_commands() {
    let p = start(|_| {}).await;
    let mut c = connect(p.pop3).await;
    c.play(
        "S: +OK
         C: CAPA
         S: +OK Capability list follows
         S: TOP
         S: UIDL
         S: RESP-CODES
         S: AUTH-RESP-CODE
         S: PIPELINING
         S: STLS
         S: USER
         S: SASL SCRAM-SHA-256 PLAIN LOGIN
         S: IMPLEMENTATION
         S: .
         C: STAT
         S: -ERR Log in first
         R: USER a@example.test\\r\\nPASS pencil\\r\\nSTAT\\r\\nLIST\\r\\n
         S: +OK
         S: +OK Logged in
         S: +OK fake STAT
         S: +OK fake LIST
         C: QUIT
         S: +OK bye
         S: <closed>",
    )
    .await;
    assert_eq!(p.filer.logins(), ["a@example.test"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_is_refused_before_stls_where_not_allowed() {
    let p = start(|s| s.plaintext_on_loopback = false).await;
    let mut c = connect(p.pop3).await;
    c.play(
        "S: +OK
         C: CAPA
         S: +OK
         S: TOP
         S: UIDL
         S: RESP-CODES
         S: AUTH-RESP-CODE
         S: PIPELINING
         S: STLS
         S: IMPLEMENTATION
         S: .
         C: USER a@example.test
         S: -ERR [AUTH]
         C: AUTH PLAIN AGFAZXhhbXBsZS50ZXN0AHBlbmNpbA==
         S: -ERR [AUTH]
         C: STLS
         S: +OK",
    )
    .await;
    let mut t = tls(&p, c.into_inner()).await;
    t.play(
        "C: USER a@example.test
         S: +OK
         C: PASS pencil
         S: +OK Logged in",
    )
    .await;
}

/// Regression: a command pipelined behind STLS in the same segment must not be answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stls_discards_commands_pipelined_before_the_handshake() {
    let p = start(|_| {}).await;
    let mut c = connect(p.pop3).await;
    c.play(
        "S: +OK
         R: STLS\\r\\nXYZZY\\r\\n
         S: +OK Begin TLS",
    )
    .await;
    let mut t = tls(&p, c.into_inner()).await;
    t.play(
        "C: CAPA
         S: +OK Capability list follows",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_look_the_same_and_bad_commands_disconnect() {
    let p = start(|_| {}).await;
    let mut c = connect(p.pop3).await;
    c.play(
        "S: +OK
         C: USER a@example.test
         S: +OK
         C: PASS wrong
         S: -ERR [AUTH] Authentication failed
         C: USER nobody@example.test
         S: +OK
         C: PASS pencil
         S: -ERR [AUTH] Authentication failed
         C: AUTH PLAIN AG9mZkBleGFtcGxlLnRlc3QAcGVuY2ls
         S: -ERR [AUTH] Authentication failed
         S: <closed>",
    )
    .await;
    let mut c = connect(p.pop3).await;
    c.play(
        "S: +OK
         C: RETR 1
         S: -ERR
         C: PASS x
         S: -ERR USER first
         C: XYZZY
         S: -ERR Unknown
         C: AUTH CRAM-MD5
         S: -ERR Unsupported
         C: LIST
         S: -ERR
         S: -ERR Too many bad commands
         S: <closed>",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poplib_user_pass_and_sasl() {
    let p = start(|_| {}).await;
    let script = r#"
import base64, poplib, sys
host, port = sys.argv[1], int(sys.argv[2])
out = []
c = poplib.POP3(host, port, timeout=10)
assert "SASL" in c.capa(), c.capa()
c.user("a@example.test")
out.append(c.pass_("pencil").decode())
out.append(c.noop().decode())
c.quit()
c = poplib.POP3(host, port, timeout=10)
out.append(c._shortcmd("AUTH PLAIN " + base64.b64encode(b"\0b@example.test\0pencil").decode()).decode())
c.quit()
c = poplib.POP3(host, port, timeout=10)
c._putcmd("AUTH LOGIN")
out.append(c._getline()[0].decode())
c._putcmd(base64.b64encode(b"a@example.test").decode())
out.append(c._getline()[0].decode())
out.append(c._shortcmd(base64.b64encode(b"pencil").decode()).decode())
c.quit()
c = poplib.POP3(host, port, timeout=10)
c.user("a@example.test")
try:
    c.pass_("wrong")
    out.append("accepted")
except poplib.error_proto as e:
    out.append(e.args[0].decode())
print("|".join(out))
"#;
    let out = python(
        script,
        &[&p.pop3.ip().to_string(), &p.pop3.port().to_string()],
    );
    assert_eq!(
        out.trim(),
        "+OK Logged in|+OK fake NOOP|+OK Logged in|+ VXNlciBOYW1lAA==|+ UGFzc3dvcmQA|+OK Logged in|-ERR [AUTH] Authentication failed"
    );
    assert_eq!(
        p.filer.logins(),
        ["a@example.test", "b@example.test", "a@example.test"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_sha_256_over_pop3() {
    let p = start(|_| {}).await;
    let mut c = connect(p.pop3).await;
    c.play("S: +OK").await;
    let mut scram = Scram::new("a@example.test", PASSWORD);
    c.send(&format!(
        "AUTH SCRAM-SHA-256 {}\r\n",
        B64.encode(scram.first())
    ))
    .await;
    let server_first = B64
        .decode(c.line().await.strip_prefix("+ ").unwrap())
        .unwrap();
    c.send(&format!("{}\r\n", B64.encode(scram.last(&server_first))))
        .await;
    let server_final = B64
        .decode(c.line().await.strip_prefix("+ ").unwrap())
        .unwrap();
    assert!(scram.verifies(&server_final));
    c.send("\r\n").await;
    c.play(
        "S: +OK Logged in
         C: STAT
         S: +OK fake STAT",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filer_that_is_down_gets_sys_temp_at_once() {
    let p = start(|_| {}).await;
    for _ in 0..4 {
        let mut c = connect(p.pop3).await;
        c.play(
            "S: +OK
             C: USER dead@example.test",
        )
        .await;
        let t = Instant::now();
        c.play(
            "S: +OK
             C: PASS pencil
             S: -ERR [SYS/TEMP]
             S: <closed>",
        )
        .await;
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }
    let s = tokio::net::TcpStream::connect(p.pop3s).await.unwrap();
    let mut t = tls(&p, s).await;
    t.play(
        "S: +OK
         C: USER moving@example.test
         S: +OK
         C: PASS pencil
         S: -ERR [SYS/TEMP] mailbox is being moved",
    )
    .await;
}
