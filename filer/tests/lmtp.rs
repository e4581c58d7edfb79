//! The filer's LMTP listener over real sockets, driven by transcripts and by hand.

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

struct TestFiler {
    _dir: tempfile::TempDir,
    lmtp: SocketAddr,
    root: std::path::PathBuf,
    db: Arc<Sqlite>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), filer::ServeError>>,
}

fn creds() -> Credentials {
    static C: OnceLock<Credentials> = OnceLock::new();
    C.get_or_init(|| Credentials::from_password("pw").unwrap())
        .clone()
}

async fn add(db: &Sqlite, address: &str, filer: &str, quota: u64) {
    let m = NewMailbox {
        address: address.into(),
        credentials: creds(),
        quota,
        filer: Some(filer.into()),
    };
    db.add_mailbox(m).await.unwrap();
}

async fn start(configure: impl FnOnce(&mut Shared)) -> TestFiler {
    common::testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut shared = Shared::for_tests(dir.path());
    configure(&mut shared);
    let db = Arc::new(Sqlite::open(&shared.database_path).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lmtp = listener.local_addr().unwrap();
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
        imap: None,
        pop3: None,
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
        root,
        db,
        shutdown,
        task,
    }
}

fn inbox(root: &Path, user: &str, folder: &str) -> Vec<Vec<u8>> {
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

async fn play(addr: SocketAddr, script: &str) {
    let stream = TcpStream::connect(addr).await.unwrap();
    if let Err(e) = transcript::run(script, stream).await {
        panic!("{e}");
    }
}

#[tokio::test]
async fn four_recipients_get_four_answers() {
    let f = start(|_| {}).await;
    play(f.lmtp, include_str!("transcripts/lmtp_four_recipients.txt")).await;
    let a = inbox(&f.root, "a@example.test", "");
    let b = inbox(&f.root, "b@example.test", "");
    assert_eq!((a.len(), b.len()), (1, 1));
    assert!(
        inbox(&f.root, "full@example.test", "").is_empty(),
        "nothing delivered over quota"
    );
    let text = String::from_utf8(a[0].clone()).unwrap();
    assert!(
        text.starts_with(
            "Return-Path: <sender@remote.test>\r\nReceived: from spool.test (127.0.0.1)"
        ),
        "{text}"
    );
    assert!(text.contains("for <a@example.test>;"), "{text}");
    assert!(
        text.ends_with("Subject: four recipients\r\n\r\n.a line that starts with a dot\r\n"),
        "{text}"
    );
    f.shutdown.cancel();
    f.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn protocol_errors_and_mailbox_states() {
    let f = start(|_| {}).await;
    play(f.lmtp, include_str!("transcripts/lmtp_errors.txt")).await;
    let _ = &f.db;
}

#[tokio::test]
async fn spam_flagged_mail_goes_to_junk() {
    let f = start(|_| {}).await;
    let script = "S: 220\nC: LHLO s\nS: 250-localhost\nS: 250-PIPELINING\nS: 250-ENHANCEDSTATUSCODES\nS: 250-8BITMIME\nS: 250-SMTPUTF8\nS: 250 SIZE\n\
                  C: MAIL FROM:<>\nC: RCPT TO:<a@example.test>\nC: DATA\nS: 250\nS: 250\nS: 354\n\
                  C: X-Spam-Flag: YES\nC: Subject: buy now\nC:\nC: spam\nC: .\nS: 250 2.0.0\nC: QUIT\nS: 221\n";
    play(f.lmtp, script).await;
    assert!(inbox(&f.root, "a@example.test", "").is_empty());
    let junk = inbox(&f.root, "a@example.test", ".Junk");
    assert_eq!(junk.len(), 1);
    assert!(junk[0].starts_with(b"Return-Path: <>\r\n"));
}

#[tokio::test]
async fn untrusted_peers_are_refused() {
    let f = start(|s| {
        s.spool_networks = common::net::Networks::new(vec!["192.0.2.0/24".parse().unwrap()])
    })
    .await;
    play(f.lmtp, "S: 554 5.7.1\nS: <closed>\n").await;
}

#[tokio::test]
async fn shutdown_ends_idle_sessions() {
    let f = start(|_| {}).await;
    let mut s = TcpStream::connect(f.lmtp).await.unwrap();
    transcript::run("S: 220\nC: LHLO x\nS: 250-localhost\nS: 250-PIPELINING\nS: 250-ENHANCEDSTATUSCODES\nS: 250-8BITMIME\nS: 250-SMTPUTF8\nS: 250 SIZE\n", &mut s)
        .await
        .unwrap();
    f.shutdown.cancel();
    // An idle session is told at once, not at its next command.
    transcript::run("S: 421 4.3.2\nS: <closed>\n", &mut s)
        .await
        .unwrap();
    f.task.await.unwrap().unwrap();
}
