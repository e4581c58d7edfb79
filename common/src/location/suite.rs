//! What every [`Directory`] backend must do, as one suite of tests run against each backend.
//!
//! Each test is an async fn over `&dyn Directory` on a fresh, empty database.
//! [`directory_suite!`] expands to one `#[tokio::test]` per test for a backend, given an async
//! fn that makes a fresh database (`sqlite/tests.rs`, `postgres/tests.rs`). A new test goes in
//! here and into the list in the macro, so that no backend can miss it.

use std::sync::OnceLock;

use futures_util::future::join_all;

use super::*;

/// Expands to one `#[tokio::test]` per suite test. `$fresh` is an async fn returning
/// `Option<(guard, db)>`: a fresh database and whatever must live as long as it (a temporary
/// directory), or `None` when the backend is not available here and the test is skipped.
macro_rules! directory_suite {
    ($fresh:path) => {
        $crate::location::suite::directory_suite!(@each $fresh;
            placement_follows_filer_weights,
            placement_skips_filers_that_are_not_up,
            concurrent_placements_spread_out,
            changes_are_refused_with_clear_errors,
            changes_to_missing_things_are_not_found,
            mailbox_alias_and_credentials_round_trip,
            listings_are_filtered_and_sorted_bytewise,
            register_filer_updates_addresses_and_keeps_state,
            hostile_keys_are_just_data,
            a_migration_flips_only_a_moving_mailbox_on_the_expected_filer,
            of_two_concurrent_flips_only_one_wins,
        );
    };
    (@each $fresh:path; $($name:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $name() {
            let Some((_keep, db)) = $fresh().await else {
                return;
            };
            $crate::location::suite::$name(&db).await;
        }
    )*};
}
pub(super) use directory_suite;

pub(super) fn creds() -> Credentials {
    // One hash for every test mailbox: argon2 is deliberately slow.
    static C: OnceLock<Credentials> = OnceLock::new();
    C.get_or_init(|| Credentials::from_password("pw").unwrap())
        .clone()
}

pub(super) fn filer(name: &str, weight: u32) -> Filer {
    Filer {
        name: name.into(),
        lmtp: format!("127.0.0.1:24{weight}"),
        imap: "127.0.0.1:143".into(),
        pop3: "127.0.0.1:110".into(),
        state: FilerState::Up,
        weight,
    }
}

pub(super) fn new_mailbox(address: &str) -> NewMailbox {
    NewMailbox {
        address: address.into(),
        credentials: creds(),
        quota: 0,
        filer: None,
    }
}

/// Concurrent lookups, so that a backend with a pool has connections ready and the changes
/// that follow really run at once instead of waiting, one by one, for a connection.
async fn warm_up(db: &dyn Directory) {
    for r in join_all((0..8).map(|_| db.filers())).await {
        r.unwrap();
    }
}

pub(super) async fn placement_follows_filer_weights(db: &dyn Directory) {
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

pub(super) async fn placement_skips_filers_that_are_not_up(db: &dyn Directory) {
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

/// Placements made at once must not all read the same counts and pick the same filer: after
/// each round of four at once on four equal filers, every filer has one more mailbox.
pub(super) async fn concurrent_placements_spread_out(db: &dyn Directory) {
    for f in ["f1", "f2", "f3", "f4"] {
        db.add_filer(&filer(f, 1)).await.unwrap();
    }
    db.add_domain("example.test").await.unwrap();
    for round in 0..6u64 {
        warm_up(db).await;
        let adds =
            (0..4).map(|i| db.add_mailbox(new_mailbox(&format!("u{round}.{i}@example.test"))));
        for r in join_all(adds).await {
            r.unwrap();
        }
        let counts: Vec<u64> = db
            .filers()
            .await
            .unwrap()
            .iter()
            .map(|u| u.mailboxes)
            .collect();
        assert_eq!(counts, [round + 1; 4], "round {round}");
    }
}

pub(super) async fn changes_are_refused_with_clear_errors(db: &dyn Directory) {
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

pub(super) async fn changes_to_missing_things_are_not_found(db: &dyn Directory) {
    db.add_filer(&filer("f1", 1)).await.unwrap();
    db.add_domain("example.test").await.unwrap();
    let missing = || ChangeError::NotFound("mailbox nobody@example.test".into());
    let nobody = "nobody@example.test";
    assert_eq!(db.set_quota(nobody, 1).await, Err(missing()));
    assert_eq!(
        db.set_mailbox_state(nobody, MailboxState::Disabled).await,
        Err(missing())
    );
    assert_eq!(db.set_credentials(nobody, creds()).await, Err(missing()));
    assert_eq!(db.remove_mailbox(nobody).await, Err(missing()));
    assert_eq!(
        db.remove_alias(nobody, None).await,
        Err(ChangeError::NotFound("alias nobody@example.test".into()))
    );
    assert_eq!(
        db.remove_domain("other.test").await,
        Err(ChangeError::NotFound("domain other.test".into()))
    );
    assert!(matches!(
        db.add_mailbox(new_mailbox("no-domain")).await,
        Err(ChangeError::Invalid(_))
    ));
    assert!(matches!(
        db.add_alias("a@example.test", "a@example.test").await,
        Err(ChangeError::Invalid(_))
    ));
    assert_eq!(
        db.add_alias("a@other.test", "b@example.test").await,
        Err(ChangeError::DomainNotHosted("other.test".into()))
    );
    db.add_alias("a@example.test", "b@example.test")
        .await
        .unwrap();
    assert_eq!(
        db.add_alias("a@example.test", "b@example.test").await,
        Err(ChangeError::Duplicate(
            "alias a@example.test -> b@example.test".into()
        ))
    );
    assert_eq!(
        db.add_mailbox(new_mailbox("a@example.test")).await,
        Err(ChangeError::Duplicate("alias a@example.test".into()))
    );
    assert_eq!(db.mailbox(nobody).await.unwrap(), None);
    assert_eq!(db.mailbox_fresh(nobody).await.unwrap(), None);
    assert_eq!(db.credentials(nobody).await.unwrap(), None);
    assert_eq!(db.filer("zz").await.unwrap(), None);
    assert!(db.alias_targets(nobody).await.unwrap().is_empty());
}

pub(super) async fn mailbox_alias_and_credentials_round_trip(db: &dyn Directory) {
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
    assert_eq!(
        db.mailbox_fresh("a@example.test").await.unwrap(),
        Some(m.clone())
    );
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
    db.set_credentials("a@example.test", new.clone())
        .await
        .unwrap();
    let c = db.credentials("a@example.test").await.unwrap().unwrap();
    assert_eq!(c, new, "stored as given, SCRAM keys included");
    assert!(c.verify("new pw") && !c.verify("pw"));
    db.set_mailbox_state("a@example.test", MailboxState::Moving)
        .await
        .unwrap();
    assert_eq!(
        db.mailbox("a@example.test").await.unwrap().unwrap().state,
        MailboxState::Moving
    );
    db.set_quota("a@example.test", u64::MAX).await.unwrap();
    assert_eq!(
        db.mailbox("a@example.test").await.unwrap().unwrap().quota,
        i64::MAX as u64,
        "a quota past the column's range is kept as the largest one"
    );
    let d = db.domains().await.unwrap();
    assert_eq!((d[0].mailboxes, d[0].aliases), (1, 0));
}

pub(super) async fn listings_are_filtered_and_sorted_bytewise(db: &dyn Directory) {
    db.add_filer(&filer("f1", 1)).await.unwrap();
    db.add_filer(&filer("F2", 1)).await.unwrap();
    for d in ["b.test", "a.test"] {
        db.add_domain(d).await.unwrap();
    }
    for a in ["z@a.test", "B@a.test", "_@a.test", "a@b.test"] {
        db.add_mailbox(new_mailbox(a)).await.unwrap();
    }
    for (a, t) in [
        ("list@a.test", "z@a.test"),
        ("list@a.test", "B@a.test"),
        ("Help@a.test", "x@remote.test"),
        ("all@b.test", "a@b.test"),
    ] {
        db.add_alias(a, t).await.unwrap();
    }
    let names = |m: Vec<Mailbox>| m.into_iter().map(|m| m.address).collect::<Vec<_>>();
    // Bytewise, as SQLite compares: upper case, then '_', then lower case.
    assert_eq!(
        names(db.mailboxes(Some("a.test")).await.unwrap()),
        ["B@a.test", "_@a.test", "z@a.test"]
    );
    assert_eq!(names(db.mailboxes(None).await.unwrap()).len(), 4);
    assert_eq!(names(db.mailboxes(Some("c.test")).await.unwrap()).len(), 0);
    let aliases: Vec<(String, String)> = db
        .aliases(Some("a.test"))
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.address, a.target))
        .collect();
    assert_eq!(
        aliases,
        [
            ("Help@a.test".into(), "x@remote.test".into()),
            ("list@a.test".into(), "B@a.test".into()),
            ("list@a.test".into(), "z@a.test".into()),
        ]
    );
    assert_eq!(db.aliases(None).await.unwrap().len(), 4);
    let domains: Vec<(String, u64, u64)> = db
        .domains()
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.name, d.mailboxes, d.aliases))
        .collect();
    assert_eq!(
        domains,
        [("a.test".into(), 3, 2), ("b.test".into(), 1, 1)],
        "aliases count distinct addresses"
    );
    let filers: Vec<String> = db
        .filers()
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.filer.name)
        .collect();
    assert_eq!(filers, ["F2", "f1"]);
    assert_eq!(
        db.remove_alias("list@a.test", Some("z@a.test")).await,
        Ok(1)
    );
    assert_eq!(db.alias_targets("list@a.test").await.unwrap(), ["B@a.test"]);
}

pub(super) async fn register_filer_updates_addresses_and_keeps_state(db: &dyn Directory) {
    db.register_filer(&filer("f1", 1)).await.unwrap();
    assert_eq!(db.filer("f1").await.unwrap(), Some(filer("f1", 1)));
    db.set_filer_state("f1", FilerState::Draining)
        .await
        .unwrap();
    let moved = Filer {
        lmtp: "127.0.0.7:24".into(),
        imap: "127.0.0.7:143".into(),
        pop3: "127.0.0.7:110".into(),
        weight: 5,
        ..filer("f1", 1)
    };
    db.register_filer(&moved).await.unwrap();
    assert_eq!(
        db.filer("f1").await.unwrap(),
        Some(Filer {
            state: FilerState::Draining,
            ..moved
        })
    );
}

pub(super) async fn hostile_keys_are_just_data(db: &dyn Directory) {
    db.add_domain("example.test").await.unwrap();
    assert_eq!(db.mailbox("x' OR '1'='1@example.test").await.unwrap(), None);
    assert!(!db.is_hosted_domain("example.test' --").await.unwrap());
    assert!(db.is_hosted_domain("example.test").await.unwrap());
}

pub(super) async fn a_migration_flips_only_a_moving_mailbox_on_the_expected_filer(
    db: &dyn Directory,
) {
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

/// Two operators finishing the same migration at once: one flip, one clear refusal.
pub(super) async fn of_two_concurrent_flips_only_one_wins(db: &dyn Directory) {
    for f in ["f1", "f2", "f3"] {
        db.add_filer(&filer(f, 1)).await.unwrap();
    }
    db.add_domain("example.test").await.unwrap();
    for round in 0..5 {
        let a = format!("u{round}@example.test");
        db.add_mailbox(NewMailbox {
            filer: Some("f1".into()),
            ..new_mailbox(&a)
        })
        .await
        .unwrap();
        db.set_mailbox_state(&a, MailboxState::Moving)
            .await
            .unwrap();
        warm_up(db).await;
        let (to_f2, to_f3) = tokio::join!(
            db.move_mailbox(&a, "f1", "f2"),
            db.move_mailbox(&a, "f1", "f3")
        );
        let won = match (&to_f2, &to_f3) {
            (Ok(()), Err(ChangeError::Conflict(_))) => "f2",
            (Err(ChangeError::Conflict(_)), Ok(())) => "f3",
            other => panic!("round {round}: {other:?}"),
        };
        let m = db.mailbox(&a).await.unwrap().unwrap();
        assert_eq!((m.filer.as_str(), m.state), (won, MailboxState::Active));
    }
}
