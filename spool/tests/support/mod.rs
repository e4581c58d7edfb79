//! What the spool's tests share: a spool on ephemeral ports over a fresh database and queue.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::config::Shared;
use common::location::{
    Credentials, Directory, Filer, FilerState, MailboxState, NewMailbox, Sqlite,
};
use common::queue::{Envelope, Queue};
use common::testkit::transcript;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub struct TestSpool {
    pub dir: tempfile::TempDir,
    pub smtp: SocketAddr,
    pub reinject: SocketAddr,
    pub db: Arc<Sqlite>,
    pub queue: Queue,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), spool::ServeError>>,
}

fn creds() -> Credentials {
    static C: OnceLock<Credentials> = OnceLock::new();
    C.get_or_init(|| Credentials::from_password("pw").unwrap())
        .clone()
}

pub async fn add(db: &Sqlite, address: &str) {
    let m = NewMailbox {
        address: address.into(),
        credentials: creds(),
        quota: 0,
        filer: Some("f1".into()),
    };
    db.add_mailbox(m).await.unwrap();
}

/// A spool whose only filer `f1` listens nowhere (deliveries wait) unless `f1_lmtp` is
/// given, with `example.test` hosting
/// `a`, `b`, `disabled`, the aliases `postmaster` → `a`, `team` → `a`, `b`, `postmaster`, and
/// an alias loop `loop1` ↔ `loop2`.
pub async fn start(configure: impl FnOnce(&mut spool::Settings)) -> TestSpool {
    start_with_filer("127.0.0.1:9", configure).await
}

pub async fn start_with_filer(
    f1_lmtp: &str,
    configure: impl FnOnce(&mut spool::Settings),
) -> TestSpool {
    common::testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let shared = Shared::for_tests(dir.path());
    let db = Arc::new(Sqlite::open(shared.database.sqlite_path().unwrap()).unwrap());
    let f = Filer {
        name: "f1".into(),
        lmtp: f1_lmtp.into(),
        imap: String::new(),
        pop3: String::new(),
        state: FilerState::Up,
        weight: 1,
    };
    db.add_filer(&f).await.unwrap();
    db.add_domain("example.test").await.unwrap();
    for a in ["a@example.test", "b@example.test", "disabled@example.test"] {
        add(&db, a).await;
    }
    db.set_mailbox_state("disabled@example.test", MailboxState::Disabled)
        .await
        .unwrap();
    for (alias, target) in [
        ("postmaster@example.test", "a@example.test"),
        ("team@example.test", "a@example.test"),
        ("team@example.test", "b@example.test"),
        ("team@example.test", "postmaster@example.test"),
        ("loop1@example.test", "loop2@example.test"),
        ("loop2@example.test", "loop1@example.test"),
    ] {
        db.add_alias(alias, target).await.unwrap();
    }
    let mut settings = spool::Settings::for_tests(&shared);
    settings.retry_min = Duration::from_secs(3600); // session tests: nothing is retried
    settings.retry_max = Duration::from_secs(3600);
    configure(&mut settings);
    let smtp_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let reinject_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (smtp, reinject) = (
        smtp_l.local_addr().unwrap(),
        reinject_l.local_addr().unwrap(),
    );
    let queue = Queue::open(&settings.queue_dir).unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(spool::serve(
        Arc::new(settings),
        db.clone() as Arc<dyn Directory>,
        spool::Listeners {
            smtp: Some(smtp_l),
            reinject: Some(reinject_l),
        },
        shutdown.clone(),
    ));
    TestSpool {
        dir,
        smtp,
        reinject,
        db,
        queue,
        shutdown,
        task,
    }
}

impl TestSpool {
    /// Every queued envelope.
    pub fn entries(&self) -> Vec<Envelope> {
        self.queue.list().unwrap()
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

pub async fn play(addr: SocketAddr, script: &str) {
    let stream = TcpStream::connect(addr).await.unwrap();
    if let Err(e) = transcript::run(script, stream).await {
        panic!("{e}");
    }
}
