//! Copying a mailbox from a running filer into another store over IMAP (the filer side of
//! online migration): UIDVALIDITY, UIDs, flags, dates, folders and subscriptions survive,
//! passes are incremental, and `verify` finds any difference.

#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] functions

mod support;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use filer::migrate::{Source, sync_pass, verify};
use support::{SECRET, start};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

/// A raw IMAP client on the source filer, logged in with the trusted login.
struct Raw {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
    n: u32,
}

impl Raw {
    async fn login(addr: std::net::SocketAddr, user: &str) -> Self {
        let (r, w) = TcpStream::connect(addr).await.unwrap().into_split();
        let mut c = Self {
            r: BufReader::new(r),
            w,
            n: 0,
        };
        c.line().await;
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}\0proxy\0{SECRET}"));
        let r = c.cmd(&format!("AUTHENTICATE PLAIN {token}")).await;
        assert!(r.last().unwrap().contains("OK"), "{r:?}");
        c
    }

    async fn line(&mut self) -> String {
        let mut l = String::new();
        tokio::time::timeout(Duration::from_secs(10), self.r.read_line(&mut l))
            .await
            .unwrap()
            .unwrap();
        l
    }

    async fn cmd(&mut self, s: &str) -> Vec<String> {
        self.n += 1;
        let tag = format!("T{}", self.n);
        self.w
            .write_all(format!("{tag} {s}\r\n").as_bytes())
            .await
            .unwrap();
        let mut lines = Vec::new();
        loop {
            let l = self.line().await;
            let done = l.starts_with(&format!("{tag} "));
            lines.push(l);
            if done {
                assert!(lines.last().unwrap().contains(" OK"), "{s}: {lines:?}");
                return lines;
            }
        }
    }

    async fn append(&mut self, folder: &str, flags: &str, body: &str) {
        self.cmd(&format!(
            "APPEND {folder} ({flags}) {{{}+}}\r\n{body}",
            body.len()
        ))
        .await;
    }
}

#[tokio::test]
async fn a_mailbox_is_copied_with_its_uids_flags_and_folders_and_passes_are_incremental() {
    let f = start(|_| {}).await;
    let mut src = Raw::login(f.imap, "a@example.test").await;
    src.cmd("CREATE Archive/2024").await;
    src.cmd("UNSUBSCRIBE Trash").await;
    for i in 1..=5 {
        src.append(
            "INBOX",
            if i % 2 == 0 { "\\Seen" } else { "" },
            &format!("Subject: m{i}\r\n\r\nbody {i}\r\n"),
        )
        .await;
    }
    src.append(
        "Archive/2024",
        "\\Flagged $Work",
        "Subject: old\r\n\r\nkept\r\n",
    )
    .await;
    // A gap in the UIDs, as real mailboxes have.
    src.cmd("SELECT INBOX").await;
    src.cmd("UID STORE 3 +FLAGS.SILENT (\\Deleted)").await;
    src.cmd("EXPUNGE").await;

    let dest_dir = tempfile::tempdir().unwrap();
    let dest_store = filer::store::Store::new(dest_dir.path().join("mail"), "dest.test");
    let dest = dest_store.user("a@example.test", 7).unwrap();
    let source = Source {
        imap: f.imap,
        user: "a@example.test".into(),
        principal: "proxy".into(),
        secret: SECRET.into(),
    };
    let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = calls.clone();
    let progress = move |_: &filer::migrate::PassReport| {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    };
    let first = sync_pass(&source, dest.clone(), &progress).await.unwrap();
    assert_eq!((first.messages, first.copied), (5, 5), "{first:?}");
    assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 5);
    assert_eq!(verify(&source, dest.clone()).await.unwrap(), vec![]);
    let uids: Vec<u32> = dest
        .messages("INBOX")
        .unwrap()
        .iter()
        .map(|m| m.uid)
        .collect();
    assert_eq!(uids, [1, 2, 4, 5]);
    let arch = dest.folder("Archive/2024").unwrap().unwrap();
    assert!(arch.subscribed);
    assert!(!dest.folder("Trash").unwrap().unwrap().subscribed);
    assert_eq!(
        dest.messages("Archive/2024").unwrap()[0].flags,
        "\\Flagged $Work"
    );

    // A pass with nothing new copies nothing.
    let again = sync_pass(&source, dest.clone(), &|_| {}).await.unwrap();
    assert_eq!(
        (again.copied, again.flags_updated, again.removed),
        (0, 0, 0)
    );

    // Mail keeps arriving and the user keeps working: the next pass follows.
    src.append("INBOX", "", "Subject: m6\r\n\r\nbody 6\r\n")
        .await;
    src.cmd("SELECT INBOX").await;
    src.cmd("UID STORE 1 +FLAGS.SILENT (\\Answered)").await;
    src.cmd("UID STORE 2 +FLAGS.SILENT (\\Deleted)").await;
    src.cmd("EXPUNGE").await;
    src.cmd("DELETE Archive/2024").await;
    let next = sync_pass(&source, dest.clone(), &|_| {}).await.unwrap();
    assert_eq!(
        (next.copied, next.flags_updated, next.removed),
        (1, 1, 2),
        "{next:?}"
    );
    assert_eq!(verify(&source, dest.clone()).await.unwrap(), vec![]);
    let uids: Vec<u32> = dest
        .messages("INBOX")
        .unwrap()
        .iter()
        .map(|m| m.uid)
        .collect();
    assert_eq!(uids, [1, 4, 5, 6]);
    assert!(dest.folder("Archive/2024").unwrap().is_none());

    // Verify catches a difference.
    dest.store_flags("INBOX", &[4], filer::store::FlagOp::Replace, &[], None)
        .unwrap();
    let found = verify(&source, dest.clone()).await.unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].what.contains("UID 4: flags"), "{found:?}");
}

#[tokio::test]
async fn sessions_end_when_their_mailbox_starts_moving() {
    let f = start(|s| s.cache_ttl = Duration::from_millis(100)).await;
    let mut imap = Raw::login(f.imap, "b@example.test").await;
    imap.cmd("SELECT INBOX").await;
    imap.w.write_all(b"I IDLE\r\n").await.unwrap();
    assert!(imap.line().await.starts_with('+'));
    // POP3, logged in with the trusted login.
    let (r, mut w) = TcpStream::connect(f.pop3).await.unwrap().into_split();
    let mut pop = BufReader::new(r);
    let mut l = String::new();
    pop.read_line(&mut l).await.unwrap();
    let token = base64::engine::general_purpose::STANDARD
        .encode(format!("b@example.test\0proxy\0{SECRET}"));
    w.write_all(format!("AUTH PLAIN {token}\r\n").as_bytes())
        .await
        .unwrap();
    l.clear();
    pop.read_line(&mut l).await.unwrap();
    assert!(l.starts_with("+OK"), "{l}");

    use common::location::Directory as _;
    f.db.set_mailbox_state("b@example.test", common::location::MailboxState::Moving)
        .await
        .unwrap();
    // Both sessions are told and closed within a few seconds (the check runs every 250 ms
    // here), the IDLE one without sending anything.
    let bye = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let l = imap.line().await;
            if l.starts_with("* BYE") {
                return l;
            }
        }
    })
    .await
    .expect("BYE within 5 s");
    assert!(
        bye.contains("[UNAVAILABLE]") && bye.contains("moved"),
        "{bye}"
    );
    l.clear();
    tokio::time::timeout(Duration::from_secs(5), pop.read_line(&mut l))
        .await
        .expect("POP3 told within 5 s")
        .unwrap();
    assert!(
        l.starts_with("-ERR [SYS/TEMP]") && l.contains("moved"),
        "{l}"
    );
    l.clear();
    assert_eq!(pop.read_line(&mut l).await.unwrap(), 0, "then closed");
}

#[tokio::test]
async fn only_the_migration_login_reads_a_mailbox_that_is_moving() {
    let f = start(|_| {}).await;
    let dest_dir = tempfile::tempdir().unwrap();
    let dest_store = filer::store::Store::new(dest_dir.path().join("mail"), "dest.test");
    let dest = dest_store.user("moving@example.test", 7).unwrap();
    let source = |principal: &str| Source {
        imap: f.imap,
        user: "moving@example.test".into(),
        principal: principal.into(),
        secret: SECRET.into(),
    };
    let refused = sync_pass(&source("proxy"), dest.clone(), &|_| {}).await;
    assert!(
        refused.is_err(),
        "the proxy's login is refused while moving"
    );
    let migrator = filer::migration_principal("proxy");
    sync_pass(&source(&migrator), dest.clone(), &|_| {})
        .await
        .unwrap();
    assert_eq!(verify(&source(&migrator), dest).await.unwrap(), vec![]);
}
