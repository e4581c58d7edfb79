//! What the proxy's tests share: a proxy on ephemeral ports over a fresh database, a fake
//! filer that speaks just enough IMAP and POP3 to check the trusted login, line transcripts,
//! TLS clients and a SCRAM-SHA-256 client.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use common::config::Shared;
use common::location::{
    Credentials, Directory, Filer, FilerState, MailboxState, NewMailbox, Sqlite,
};
use common::tls::Identity;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncWrite, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "test-proxy-secret-0123456789";
pub const PASSWORD: &str = "pencil";
pub const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
/// Deadline of each read in the tests.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

fn creds() -> Credentials {
    static C: OnceLock<Credentials> = OnceLock::new();
    C.get_or_init(|| Credentials::from_password(PASSWORD).unwrap())
        .clone()
}

/// A running proxy with its fake filer.
pub struct TestProxy {
    pub dir: tempfile::TempDir,
    pub imap: SocketAddr,
    pub imaps: SocketAddr,
    pub pop3: SocketAddr,
    pub pop3s: SocketAddr,
    pub filer: FakeFiler,
    pub db: Arc<Sqlite>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), access::ServeError>>,
}

impl TestProxy {
    /// The dev certificate the proxy presents, for TLS clients.
    pub fn client_tls(&self) -> tokio_rustls::TlsConnector {
        let id = Identity::dev(&self.dir.path().join("tls"), "localhost").unwrap();
        tokio_rustls::TlsConnector::from(id.trusting_client_config().unwrap())
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A port with nothing listening on it.
pub async fn dead_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// Starts a proxy whose settings `configure` may change. Users (password [`PASSWORD`]):
/// `a@example.test` and `b@example.test` on the fake filer `f1`, `dead@example.test` on a
/// filer with nothing listening, `moving@example.test` (moving), `off@example.test`
/// (disabled).
pub async fn start(configure: impl FnOnce(&mut access::Settings)) -> TestProxy {
    common::testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let shared = Shared::for_tests(dir.path());
    let db = Arc::new(Sqlite::open(shared.database.sqlite_path().unwrap()).unwrap());
    let filer = FakeFiler::start(SECRET).await;
    let dead = dead_port().await.to_string();
    for (name, imap, pop3) in [
        ("f1", filer.imap.to_string(), filer.pop3.to_string()),
        ("dead", dead.clone(), dead),
    ] {
        db.add_filer(&Filer {
            name: name.into(),
            lmtp: "127.0.0.1:1".into(),
            imap,
            pop3,
            state: FilerState::Up,
            weight: 1,
        })
        .await
        .unwrap();
    }
    db.add_domain("example.test").await.unwrap();
    for (user, f) in [
        ("a@example.test", "f1"),
        ("b@example.test", "f1"),
        ("moving@example.test", "f1"),
        ("off@example.test", "f1"),
        ("dead@example.test", "dead"),
    ] {
        db.add_mailbox(NewMailbox {
            address: user.into(),
            credentials: creds(),
            quota: 0,
            filer: Some(f.into()),
        })
        .await
        .unwrap();
    }
    db.set_mailbox_state("moving@example.test", MailboxState::Moving)
        .await
        .unwrap();
    db.set_mailbox_state("off@example.test", MailboxState::Disabled)
        .await
        .unwrap();
    let mut settings = access::Settings::for_tests(&shared);
    configure(&mut settings);
    let bind = || async { TcpListener::bind("127.0.0.1:0").await.unwrap() };
    let listeners = access::Listeners {
        imap: Some(bind().await),
        imaps: Some(bind().await),
        pop3: Some(bind().await),
        pop3s: Some(bind().await),
    };
    let addr = |l: &Option<TcpListener>| l.as_ref().unwrap().local_addr().unwrap();
    let (imap, imaps, pop3, pop3s) = (
        addr(&listeners.imap),
        addr(&listeners.imaps),
        addr(&listeners.pop3),
        addr(&listeners.pop3s),
    );
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(access::serve(
        Arc::new(settings),
        db.clone() as Arc<dyn Directory>,
        listeners,
        shutdown.clone(),
    ));
    TestProxy {
        dir,
        imap,
        imaps,
        pop3,
        pop3s,
        filer,
        db,
        shutdown,
        task,
    }
}

/// A filer stand-in: checks the trusted login, records every line it receives, and answers
/// each later command with `tag OK <NAME> (fake)` (IMAP) or `+OK fake <line>` (POP3).
pub struct FakeFiler {
    pub imap: SocketAddr,
    pub pop3: SocketAddr,
    pub received: Arc<Mutex<Vec<String>>>,
    pub logins: Arc<Mutex<Vec<String>>>,
}

impl FakeFiler {
    pub async fn start(secret: &str) -> Self {
        let imap_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pop3_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let f = Self {
            imap: imap_l.local_addr().unwrap(),
            pop3: pop3_l.local_addr().unwrap(),
            received: Arc::default(),
            logins: Arc::default(),
        };
        for (l, is_imap) in [(imap_l, true), (pop3_l, false)] {
            let (received, logins, secret) =
                (f.received.clone(), f.logins.clone(), secret.to_owned());
            tokio::spawn(async move {
                loop {
                    let Ok((s, _)) = l.accept().await else { return };
                    let (received, logins, secret) =
                        (received.clone(), logins.clone(), secret.clone());
                    tokio::spawn(async move {
                        let _ = fake_session(s, is_imap, &secret, &received, &logins).await;
                    });
                }
            });
        }
        f
    }

    pub fn received(&self) -> Vec<String> {
        self.received.lock().unwrap().clone()
    }

    pub fn logins(&self) -> Vec<String> {
        self.logins.lock().unwrap().clone()
    }
}

async fn fake_session(
    s: TcpStream,
    is_imap: bool,
    secret: &str,
    received: &Mutex<Vec<String>>,
    logins: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let greeting: &[u8] = if is_imap {
        b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] fake filer\r\n"
    } else {
        b"+OK fake filer\r\n"
    };
    w.write_all(greeting).await?;
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let l = line.trim_end().to_owned();
        received.lock().unwrap().push(l.clone());
        let words: Vec<&str> = l.split(' ').collect();
        let reply = if is_imap {
            let tag = words.first().copied().unwrap_or("*");
            let name = words.get(1).copied().unwrap_or("").to_ascii_uppercase();
            match name.as_str() {
                "ID" => format!("* ID NIL\r\n{tag} OK ID completed\r\n"),
                "AUTHENTICATE" => {
                    let raw = B64
                        .decode(words.get(3).copied().unwrap_or(""))
                        .unwrap_or_default();
                    let parts: Vec<&[u8]> = raw.split(|&b| b == 0).collect();
                    if parts.len() == 3 && parts[1] == b"proxy" && parts[2] == secret.as_bytes() {
                        logins
                            .lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(parts[0]).into_owned());
                        format!("{tag} OK [CAPABILITY IMAP4rev1 FAKE-FILER] logged in\r\n")
                    } else {
                        format!("{tag} NO [AUTHENTICATIONFAILED] not the proxy\r\n")
                    }
                }
                "LOGOUT" => {
                    w.write_all(format!("* BYE fake\r\n{tag} OK LOGOUT\r\n").as_bytes())
                        .await?;
                    return Ok(());
                }
                _ => format!("{tag} OK {name} (fake)\r\n"),
            }
        } else if words
            .first()
            .is_some_and(|w| w.eq_ignore_ascii_case("AUTH"))
        {
            let raw = B64
                .decode(words.get(2).copied().unwrap_or(""))
                .unwrap_or_default();
            let parts: Vec<&[u8]> = raw.split(|&b| b == 0).collect();
            if parts.len() == 3 && parts[1] == b"proxy" && parts[2] == secret.as_bytes() {
                logins
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(parts[0]).into_owned());
                "+OK maildrop ready\r\n".to_owned()
            } else {
                "-ERR [AUTH] not the proxy\r\n".to_owned()
            }
        } else if l.eq_ignore_ascii_case("QUIT") {
            w.write_all(b"+OK bye\r\n").await?;
            return Ok(());
        } else {
            format!("+OK fake {l}\r\n")
        };
        w.write_all(reply.as_bytes()).await?;
    }
}

/// A filer that accepts connections but says nothing (a hung filer) until `healthy` is set;
/// then it behaves as a [`FakeFiler`] on IMAP.
pub struct SilentFiler {
    pub addr: SocketAddr,
    pub healthy: Arc<std::sync::atomic::AtomicBool>,
    pub accepted: Arc<std::sync::atomic::AtomicUsize>,
}

impl SilentFiler {
    pub async fn start() -> Self {
        use std::sync::atomic::Ordering;
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let f = Self {
            addr: l.local_addr().unwrap(),
            healthy: Arc::default(),
            accepted: Arc::default(),
        };
        let (healthy, accepted) = (f.healthy.clone(), f.accepted.clone());
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                accepted.fetch_add(1, Ordering::SeqCst);
                if healthy.load(Ordering::SeqCst) {
                    tokio::spawn(async move {
                        let (r, l) = (Mutex::default(), Mutex::default());
                        let _ = fake_session(s, true, SECRET, &r, &l).await;
                    });
                } else {
                    held.push(s);
                }
            }
        });
        f
    }
}

/// A line-based client with deadlines on every read.
pub struct Lines<S> {
    pub r: BufReader<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Lines<S> {
    pub fn new(s: S) -> Self {
        Self {
            r: BufReader::new(s),
        }
    }

    pub async fn send(&mut self, text: &str) {
        self.r.get_mut().write_all(text.as_bytes()).await.unwrap();
        self.r.get_mut().flush().await.unwrap();
    }

    /// The next line without its CRLF; panics after [`READ_TIMEOUT`] or on close.
    pub async fn line(&mut self) -> String {
        let mut l = String::new();
        let n = tokio::time::timeout(READ_TIMEOUT, self.r.read_line(&mut l))
            .await
            .expect("a line within the deadline")
            .unwrap();
        assert!(n > 0, "connection closed");
        l.trim_end_matches(['\r', '\n']).to_owned()
    }

    /// Whether the server closes the connection (within the deadline) without sending more.
    pub async fn closed(&mut self) -> bool {
        let mut l = String::new();
        match tokio::time::timeout(READ_TIMEOUT, self.r.read_line(&mut l)).await {
            Ok(Ok(0)) => true,
            Ok(Err(_)) => true,
            Ok(Ok(_)) => panic!("expected a close, got {l:?}"),
            Err(_) => false,
        }
    }

    /// Plays a transcript: `C: text` sends a line (consecutive ones in one write), `R: bytes`
    /// sends raw bytes with `\r`, `\n`, `\xNN` escapes, `S: prefix` reads one line that must
    /// start with `prefix`, `S: <closed>` expects the close.
    pub async fn play(&mut self, script: &str) {
        let mut pending = Vec::new();
        for (i, raw) in script.lines().enumerate() {
            let text = raw.trim_start();
            if text.is_empty() || text.starts_with('#') {
                continue;
            }
            if let Some(c) = text.strip_prefix("C: ") {
                pending.extend_from_slice(c.as_bytes());
                pending.extend_from_slice(b"\r\n");
                continue;
            }
            if let Some(r) = text.strip_prefix("R: ") {
                pending.extend(common::testkit::transcript::unescape(r).unwrap());
                continue;
            }
            if !pending.is_empty() {
                self.r.get_mut().write_all(&pending).await.unwrap();
                pending.clear();
            }
            let want = text
                .strip_prefix("S: ")
                .unwrap_or_else(|| panic!("line {}: bad transcript line {text:?}", i + 1));
            if want == "<closed>" {
                assert!(self.closed().await, "line {}: expected a close", i + 1);
            } else {
                let got = self.line().await;
                assert!(
                    got.starts_with(want),
                    "line {}: expected {want:?}, got {got:?}",
                    i + 1
                );
            }
        }
        if !pending.is_empty() {
            self.r.get_mut().write_all(&pending).await.unwrap();
        }
    }

    pub fn into_inner(self) -> S {
        assert!(
            self.r.buffer().is_empty(),
            "unread bytes: {:?}",
            self.r.buffer()
        );
        self.r.into_inner()
    }
}

pub async fn connect(addr: SocketAddr) -> Lines<TcpStream> {
    Lines::new(TcpStream::connect(addr).await.unwrap())
}

/// A TLS client over `stream` that trusts the proxy's dev certificate.
pub async fn tls<S: AsyncRead + AsyncWrite + Unpin>(
    proxy: &TestProxy,
    stream: S,
) -> Lines<tokio_rustls::client::TlsStream<S>> {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let s = tokio::time::timeout(READ_TIMEOUT, proxy.client_tls().connect(name, stream))
        .await
        .expect("handshake within the deadline")
        .unwrap();
    Lines::new(s)
}

/// Runs a Python script with arguments; returns its stdout, failing the test on a non-zero
/// exit with its stderr.
pub fn python(script: &str, args: &[&str]) -> String {
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

/// A SCRAM-SHA-256 client (RFC 5802, RFC 7677), independent of the server's library.
pub struct Scram {
    password: String,
    nonce: String,
    first_bare: String,
    server_signature: Vec<u8>,
}

impl Scram {
    pub fn new(user: &str, password: &str) -> Self {
        let nonce = B64.encode(rand::random::<[u8; 18]>());
        Self {
            password: password.into(),
            first_bare: format!("n={user},r={nonce}"),
            nonce,
            server_signature: Vec::new(),
        }
    }

    /// The client-first message.
    pub fn first(&self) -> Vec<u8> {
        format!("n,,{}", self.first_bare).into_bytes()
    }

    /// The client-final message for this server-first message.
    pub fn last(&mut self, server_first: &[u8]) -> Vec<u8> {
        let server_first = std::str::from_utf8(server_first).unwrap();
        let attr = |k: &str| {
            server_first
                .split(',')
                .find_map(|a| a.strip_prefix(k))
                .unwrap()
                .to_owned()
        };
        let (r, s, i) = (attr("r="), attr("s="), attr("i="));
        assert!(r.starts_with(&self.nonce));
        let salt = B64.decode(&s).unwrap();
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2::<Hmac<Sha256>>(
            self.password.as_bytes(),
            &salt,
            i.parse().unwrap(),
            &mut salted,
        )
        .unwrap();
        let hmac = |key: &[u8], msg: &[u8]| {
            let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap();
            m.update(msg);
            m.finalize().into_bytes().to_vec()
        };
        use sha2::Digest as _;
        let client_key = hmac(&salted, b"Client Key");
        let stored_key = Sha256::digest(&client_key);
        let without_proof = format!("c=biws,r={r}");
        let auth = format!("{},{server_first},{without_proof}", self.first_bare);
        let signature = hmac(&stored_key, auth.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&signature)
            .map(|(a, b)| a ^ b)
            .collect();
        self.server_signature = hmac(&hmac(&salted, b"Server Key"), auth.as_bytes());
        format!("{without_proof},p={}", B64.encode(proof)).into_bytes()
    }

    /// Whether the server-final message proves the server knows the password.
    pub fn verifies(&self, server_final: &[u8]) -> bool {
        server_final == format!("v={}", B64.encode(&self.server_signature)).as_bytes()
    }
}
