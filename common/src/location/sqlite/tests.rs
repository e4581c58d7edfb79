use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::*;
use crate::location::Cached;

fn creds() -> Credentials {
    // One hash for every test mailbox: argon2 is deliberately slow.
    static C: OnceLock<Credentials> = OnceLock::new();
    C.get_or_init(|| Credentials::from_password("pw").unwrap())
        .clone()
}

fn filer(name: &str, weight: u32) -> Filer {
    Filer {
        name: name.into(),
        lmtp: format!("127.0.0.1:24{weight}"),
        imap: "127.0.0.1:143".into(),
        pop3: "127.0.0.1:110".into(),
        state: FilerState::Up,
        weight,
    }
}

fn new_mailbox(address: &str) -> NewMailbox {
    NewMailbox {
        address: address.into(),
        credentials: creds(),
        quota: 0,
        filer: None,
    }
}

fn open() -> (tempfile::TempDir, Sqlite) {
    let dir = tempfile::tempdir().unwrap();
    let db = Sqlite::open(&dir.path().join("sub/location.db")).unwrap();
    (dir, db)
}

#[tokio::test]
async fn placement_follows_filer_weights() {
    let (_dir, db) = open();
    for (name, w) in [("f1", 1), ("f2", 1), ("f3", 2), ("f4", 4)] {
        db.add_filer(&filer(name, w)).await.unwrap();
    }
    db.add_domain("example.test").await.unwrap();
    for i in 0..1000 {
        db.add_mailbox(new_mailbox(&format!("u{i}@example.test")))
            .await
            .unwrap();
    }
    let usage = db.filers().await.unwrap();
    let counts: Vec<(String, u64)> = usage
        .iter()
        .map(|u| (u.filer.name.clone(), u.mailboxes))
        .collect();
    for (u, share) in usage
        .iter()
        .zip([1.0 / 8.0, 1.0 / 8.0, 2.0 / 8.0, 4.0 / 8.0])
    {
        let got = u.mailboxes as f64 / 1000.0;
        assert!((got - share).abs() <= share * 0.05, "{counts:?}");
    }
}

#[tokio::test]
async fn placement_skips_filers_that_are_not_up() {
    let (_dir, db) = open();
    db.add_filer(&filer("a", 1)).await.unwrap();
    db.add_filer(&filer("b", 1)).await.unwrap();
    db.set_filer_state("a", FilerState::Draining).await.unwrap();
    db.add_domain("example.test").await.unwrap();
    for i in 0..5 {
        let m = db
            .add_mailbox(new_mailbox(&format!("u{i}@example.test")))
            .await
            .unwrap();
        assert_eq!(m.filer, "b");
    }
    db.set_filer_state("b", FilerState::Down).await.unwrap();
    assert_eq!(
        db.add_mailbox(new_mailbox("x@example.test")).await,
        Err(ChangeError::NoFilerAvailable)
    );
    assert_eq!(
        db.mailbox("x@example.test").await.unwrap(),
        None,
        "a refused change writes nothing"
    );
}

#[tokio::test]
async fn changes_are_refused_with_clear_errors() {
    let (_dir, db) = open();
    db.add_filer(&filer("f1", 1)).await.unwrap();
    assert_eq!(
        db.add_filer(&filer("f1", 1)).await,
        Err(ChangeError::Duplicate("filer f1".into()))
    );
    db.add_domain("example.test").await.unwrap();
    assert_eq!(
        db.add_domain("example.test").await,
        Err(ChangeError::Duplicate("domain example.test".into()))
    );
    assert_eq!(
        db.add_mailbox(new_mailbox("a@elsewhere.test")).await,
        Err(ChangeError::DomainNotHosted("elsewhere.test".into()))
    );
    let on_unknown = NewMailbox {
        filer: Some("nope".into()),
        ..new_mailbox("a@example.test")
    };
    assert_eq!(
        db.add_mailbox(on_unknown).await,
        Err(ChangeError::UnknownFiler("nope".into()))
    );
    db.add_mailbox(new_mailbox("a@example.test")).await.unwrap();
    assert_eq!(
        db.add_mailbox(new_mailbox("a@example.test")).await,
        Err(ChangeError::Duplicate("mailbox a@example.test".into()))
    );
    assert!(matches!(
        db.remove_domain("example.test").await,
        Err(ChangeError::InUse(_))
    ));
    assert_eq!(
        db.set_filer_state("zz", FilerState::Down).await,
        Err(ChangeError::UnknownFiler("zz".into()))
    );
    assert!(matches!(
        db.add_alias("a@example.test", "b@example.test").await,
        Err(ChangeError::Duplicate(_))
    ));
    db.remove_mailbox("a@example.test").await.unwrap();
    assert_eq!(
        db.credentials("a@example.test").await.unwrap(),
        None,
        "credentials go with the mailbox"
    );
    db.remove_domain("example.test").await.unwrap();
    assert!(db.domains().await.unwrap().is_empty());
}

#[tokio::test]
async fn mailbox_alias_and_credentials_round_trip() {
    let (_dir, db) = open();
    db.add_filer(&filer("f1", 1)).await.unwrap();
    db.add_domain("example.test").await.unwrap();
    let m = db
        .add_mailbox(NewMailbox {
            quota: 1 << 20,
            ..new_mailbox("a@example.test")
        })
        .await
        .unwrap();
    assert_eq!(db.mailbox("a@example.test").await.unwrap(), Some(m.clone()));
    assert_eq!(m.state, MailboxState::Active);
    assert!(m.uidvalidity_seed > 1_000_000_000);
    db.add_alias("postmaster@example.test", "a@example.test")
        .await
        .unwrap();
    db.add_alias("postmaster@example.test", "b@remote.test")
        .await
        .unwrap();
    assert_eq!(
        db.alias_targets("postmaster@example.test").await.unwrap(),
        vec!["a@example.test".to_owned(), "b@remote.test".to_owned()]
    );
    assert_eq!(
        db.remove_alias("postmaster@example.test", None).await,
        Ok(2)
    );
    assert!(
        db.credentials("a@example.test")
            .await
            .unwrap()
            .unwrap()
            .verify("pw")
    );
    let new = Credentials::from_password("new pw").unwrap();
    db.set_credentials("a@example.test", new).await.unwrap();
    let c = db.credentials("a@example.test").await.unwrap().unwrap();
    assert!(c.verify("new pw") && !c.verify("pw"));
    db.set_mailbox_state("a@example.test", MailboxState::Moving)
        .await
        .unwrap();
    assert_eq!(
        db.mailbox("a@example.test").await.unwrap().unwrap().state,
        MailboxState::Moving
    );
    let d = db.domains().await.unwrap();
    assert_eq!((d[0].mailboxes, d[0].aliases), (1, 0));
}

#[tokio::test]
async fn reopening_keeps_data_and_schema() {
    let (dir, db) = open();
    db.add_domain("example.test").await.unwrap();
    drop(db);
    let db = Sqlite::open(&dir.path().join("sub/location.db")).unwrap();
    assert!(db.is_hosted_domain("example.test").await.unwrap());
    let mode: String = db
        .run(|c| c.query_row("PRAGMA journal_mode", [], |r| r.get(0)))
        .await
        .unwrap();
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn hostile_keys_are_just_data() {
    let (_dir, db) = open();
    db.add_domain("example.test").await.unwrap();
    assert_eq!(db.mailbox("x' OR '1'='1@example.test").await.unwrap(), None);
    assert!(!db.is_hosted_domain("example.test' --").await.unwrap());
}

#[tokio::test(start_paused = true)]
async fn cache_keeps_answers_for_its_ttl() {
    let (_dir, db) = open();
    let db = Arc::new(db);
    let cached = Cached::new(db.clone(), Duration::from_secs(5));
    assert!(!cached.is_hosted_domain("example.test").await.unwrap());
    db.add_domain("example.test").await.unwrap(); // behind the cache's back
    assert!(
        !cached.is_hosted_domain("example.test").await.unwrap(),
        "negative answer cached"
    );
    tokio::time::advance(Duration::from_secs(6)).await;
    assert!(
        cached.is_hosted_domain("example.test").await.unwrap(),
        "expired after the TTL"
    );
    // A change through the cache is visible at once.
    cached.remove_domain("example.test").await.unwrap();
    assert!(!cached.is_hosted_domain("example.test").await.unwrap());
}

#[test]
fn processes_opening_a_new_database_at_once_migrate_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("location.db");
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(6));
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let (path, barrier) = (path.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                Sqlite::open(&path).map(drop)
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap().unwrap();
    }
}

#[tokio::test]
async fn a_migration_flips_only_a_moving_mailbox_on_the_expected_filer() {
    let (_dir, db) = open();
    db.add_filer(&filer("f1", 1)).await.unwrap();
    db.add_filer(&filer("f2", 2)).await.unwrap();
    db.add_domain("example.test").await.unwrap();
    let m = db
        .add_mailbox(NewMailbox {
            filer: Some("f1".into()),
            ..new_mailbox("a@example.test")
        })
        .await
        .unwrap();
    assert_eq!(m.filer, "f1");
    // Not moving yet: refused, nothing changed.
    assert!(matches!(
        db.move_mailbox("a@example.test", "f1", "f2").await,
        Err(ChangeError::Conflict(_))
    ));
    db.set_mailbox_state("a@example.test", MailboxState::Moving)
        .await
        .unwrap();
    assert!(matches!(
        db.move_mailbox("a@example.test", "f2", "f1").await,
        Err(ChangeError::Conflict(_))
    ));
    assert_eq!(
        db.move_mailbox("a@example.test", "f1", "nope").await,
        Err(ChangeError::UnknownFiler("nope".into()))
    );
    db.move_mailbox("a@example.test", "f1", "f2").await.unwrap();
    let after = db.mailbox("a@example.test").await.unwrap().unwrap();
    assert_eq!(
        (after.filer.as_str(), after.state),
        ("f2", MailboxState::Active)
    );
    // A second flip finds it active on f2 and changes nothing.
    assert!(matches!(
        db.move_mailbox("a@example.test", "f1", "f2").await,
        Err(ChangeError::Conflict(_))
    ));
    assert_eq!(
        db.move_mailbox("b@example.test", "f1", "f2").await,
        Err(ChangeError::NotFound("mailbox b@example.test".into()))
    );
}
