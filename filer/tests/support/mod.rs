//! What the filer's integration tests share: a filer on ephemeral ports over a fresh
//! database and mail root.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use common::config::{ByteSize, Shared};
use common::location::{
    Credentials, Directory, Filer, FilerState, MailboxState, NewMailbox, Sqlite,
};
use common::testkit::transcript;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "test-proxy-secret-0123456789";

pub struct TestFiler {
    pub _dir: tempfile::TempDir,
    pub lmtp: SocketAddr,
    pub pop3: SocketAddr,
    pub imap: SocketAddr,
    pub root: std::path::PathBuf,
    pub db: Arc<Sqlite>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), filer::ServeError>>,
}

fn creds() -> Credentials {
    static C: OnceLock<Credentials> = OnceLock::new();
    C.get_or_init(|| Credentials::from_password("pw").unwrap())
        .clone()
}

pub async fn add(db: &Sqlite, address: &str, filer: &str, quota: u64) {
    let m = NewMailbox {
        address: address.into(),
        credentials: creds(),
        quota,
        filer: Some(filer.into()),
    };
    db.add_mailbox(m).await.unwrap();
}

pub async fn start(configure: impl FnOnce(&mut Shared)) -> TestFiler {
    common::testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut shared = Shared::for_tests(dir.path());
    configure(&mut shared);
    let db = Arc::new(Sqlite::open(shared.database.sqlite_path().unwrap()).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lmtp = listener.local_addr().unwrap();
    let pop3_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let pop3 = pop3_listener.local_addr().unwrap();
    let imap_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let imap = imap_listener.local_addr().unwrap();
    for name in ["f1", "f2"] {
        let f = Filer {
            name: name.into(),
            lmtp: lmtp.to_string(),
            imap: String::new(),
            pop3: String::new(),
            state: FilerState::Up,
            weight: 1,
        };
        db.add_filer(&f).await.unwrap();
    }
    db.add_domain("example.test").await.unwrap();
    add(&db, "a@example.test", "f1", 0).await;
    add(&db, "b@example.test", "f1", 0).await;
    add(&db, "full@example.test", "f1", 10).await;
    add(&db, "disabled@example.test", "f1", 0).await;
    db.set_mailbox_state("disabled@example.test", MailboxState::Disabled)
        .await
        .unwrap();
    add(&db, "moving@example.test", "f1", 0).await;
    db.set_mailbox_state("moving@example.test", MailboxState::Moving)
        .await
        .unwrap();
    add(&db, "elsewhere@example.test", "f2", 0).await;
    let mut file = filer::FileConfig::numbered(1);
    file.name = "f1".into();
    let mut p = common::config::Problems::new();
    let mut settings = filer::Settings::build(&file, "filers[0]", &shared, &mut p);
    assert!(p.is_empty(), "{p}");
    settings.max_message_size = ByteSize(1 << 20);
    let root = settings.mail_root.clone();
    let shutdown = CancellationToken::new();
    let listeners = filer::Listeners {
        lmtp: Some(listener),
        imap: Some(imap_listener),
        pop3: Some(pop3_listener),
    };
    let task = tokio::spawn(filer::serve(
        Arc::new(settings),
        db.clone(),
        listeners,
        shutdown.clone(),
    ));
    TestFiler {
        _dir: dir,
        lmtp,
        pop3,
        imap,
        root,
        db,
        shutdown,
        task,
    }
}

pub fn inbox(root: &Path, user: &str, folder: &str) -> Vec<Vec<u8>> {
    let (local, domain) = user.split_once('@').unwrap();
    let dir = root.join(domain).join(local).join(folder).join("cur");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files
        .into_iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect()
}

pub async fn play(addr: SocketAddr, script: &str) {
    let stream = TcpStream::connect(addr).await.unwrap();
    if let Err(e) = transcript::run(script, stream).await {
        panic!("{e}");
    }
}

/// Plays a line-protocol script (POP3): `C: text` sends a line, `S: prefix` reads one line and
/// matches its start, `S: <closed>` expects EOF. Every read has a deadline.
pub async fn play_lines(addr: SocketAddr, script: &str) {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
    let stream = TcpStream::connect(addr).await.unwrap();
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    for (i, line) in script.lines().enumerate() {
        let n = i + 1;
        if let Some(c) = line.strip_prefix("C: ").or(line.strip_prefix("C:")) {
            w.write_all(format!("{c}\r\n").as_bytes()).await.unwrap();
        } else if let Some(expect) = line.strip_prefix("S: ") {
            let mut got = String::new();
            let read =
                tokio::time::timeout(std::time::Duration::from_secs(10), r.read_line(&mut got))
                    .await;
            let read = read
                .unwrap_or_else(|_| panic!("line {n}: no reply within 10 s, expected {expect:?}"));
            let len = read.unwrap_or(0);
            if expect == "<closed>" {
                assert_eq!(
                    len, 0,
                    "line {n}: expected the connection to close, got {got:?}"
                );
            } else {
                assert!(
                    got.starts_with(expect),
                    "line {n}: expected {expect:?}, got {got:?}"
                );
            }
        }
    }
}
