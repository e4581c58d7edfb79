//! The shared suite on a throwaway PostgreSQL cluster ([`cluster`]), and what only the
//! PostgreSQL backend has: migrations under an advisory lock, a read replica, timeouts.

mod cluster;

use futures_util::future::join_all;
use tokio::time::Instant;

use super::*;
use crate::config::DatabaseLocation;
use crate::location::Database;
use crate::location::suite::{directory_suite, filer, new_mailbox};

/// Short limits, so that the tests of unreachable servers finish quickly.
const SHORT: Timeouts = Timeouts {
    connect: Duration::from_millis(500),
    operation: Duration::from_secs(2),
};
/// Slack for a loaded machine on top of a time limit.
const SLACK: Duration = Duration::from_secs(3);

async fn fresh() -> Option<((), Postgres)> {
    let url = cluster::fresh_database().await?;
    Some(((), Postgres::open(&url, None).await.unwrap()))
}

directory_suite!(fresh);

/// A loopback port with a listener that accepts connections (the kernel does, into its
/// backlog) and never says a word, like a server that hangs; and one with nothing at all.
async fn dead_ends() -> (tokio::net::TcpListener, u16, u16) {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    (silent, silent_port, closed_port)
}

#[tokio::test]
async fn concurrent_opens_of_a_fresh_database_migrate_it_once() {
    let Some(url) = cluster::fresh_database().await else {
        return;
    };
    let opens = (0..6).map(|_| Postgres::open(&url, None));
    let dbs: Vec<Postgres> = join_all(opens)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let c = dbs[0].inner.write.client().await.unwrap();
    let versions: Vec<i64> = c
        .query("SELECT version FROM schema_version ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let expected: Vec<i64> = (1..=MIGRATIONS.len() as i64).collect();
    assert_eq!(versions, expected, "each migration ran once");
    dbs[1].add_domain("example.test").await.unwrap();
    assert!(dbs[5].is_hosted_domain("example.test").await.unwrap());
}

#[tokio::test]
async fn reopening_keeps_data_and_schema() {
    let Some(url) = cluster::fresh_database().await else {
        return;
    };
    let db = Postgres::open(&url, None).await.unwrap();
    db.add_domain("example.test").await.unwrap();
    drop(db);
    // Through the configured location, as the platform opens it.
    let location = DatabaseLocation::Postgres {
        write: url,
        read: None,
    };
    let db = Database::open(&location).await.unwrap();
    assert!(matches!(db, Database::Postgres(_)));
    assert!(db.is_hosted_domain("example.test").await.unwrap());
}

#[tokio::test]
async fn a_database_of_a_newer_version_is_refused() {
    let Some(url) = cluster::fresh_database().await else {
        return;
    };
    let db = Postgres::open(&url, None).await.unwrap();
    let c = db.inner.write.client().await.unwrap();
    c.execute(
        "INSERT INTO schema_version (version, applied) VALUES (99, 0)",
        &[],
    )
    .await
    .unwrap();
    let err = Postgres::open(&url, None).await.err().unwrap();
    assert!(matches!(err, OpenError::TooNew { found: 99, .. }), "{err}");
    let shown = err.to_string();
    assert!(
        shown.contains("run the newer version") && !shown.contains("unused-password"),
        "{shown}"
    );
}

#[tokio::test]
async fn an_unreachable_server_is_a_temporary_error_within_the_timeout() {
    // No PostgreSQL needed: these servers are the dead ends themselves.
    let (_silent, silent_port, closed_port) = dead_ends().await;
    for port in [closed_port, silent_port] {
        let url = cluster::url(port, "mail");
        let started = Instant::now();
        let err = Postgres::open_with(&url, None, SHORT).await.err().unwrap();
        let took = started.elapsed();
        assert!(err.is_temporary(), "port {port}: {err}");
        assert!(took < SHORT.connect + SLACK, "port {port}: took {took:?}");
        let shown = err.to_string();
        assert!(
            shown.contains(&format!("127.0.0.1:{port}")) && !shown.contains("unused-password"),
            "names the server without its password: {shown}"
        );
    }
}

#[tokio::test]
async fn the_default_connect_timeout_bounds_opening() {
    let (_silent, silent_port, _) = dead_ends().await;
    let started = Instant::now();
    let err = Postgres::open(&cluster::url(silent_port, "mail"), None)
        .await
        .err()
        .unwrap();
    assert!(err.is_temporary(), "{err}");
    assert!(started.elapsed() < CONNECT_TIMEOUT + SLACK, "{err}");
}

#[tokio::test]
async fn lookups_on_an_unreachable_replica_are_temporary_errors() {
    let Some(primary) = cluster::fresh_database().await else {
        return;
    };
    let (_silent, silent_port, closed_port) = dead_ends().await;
    for port in [closed_port, silent_port] {
        let replica = cluster::url(port, "mail");
        // The replica is not contacted at open: it may come up later.
        let db = Postgres::open_with(&primary, Some(&replica), SHORT)
            .await
            .unwrap();
        db.add_domain(&format!("d{port}.test")).await.unwrap();
        let started = Instant::now();
        let err = db.is_hosted_domain("example.test").await.unwrap_err();
        let took = started.elapsed();
        let LookupError::Unavailable(why) = &err;
        assert!(why.contains(&format!("127.0.0.1:{port}")), "{why}");
        assert!(!why.contains("unused-password"), "{why}");
        assert!(took < SHORT.connect + SLACK, "port {port}: took {took:?}");
        // The last check before a delivery reads the primary, which is up.
        assert_eq!(db.mailbox_fresh("a@example.test").await.unwrap(), None);
    }
}

#[tokio::test]
async fn lookups_go_to_the_replica_and_changes_to_the_primary() {
    let (Some(primary), Some(replica)) = (
        cluster::fresh_database().await,
        cluster::fresh_database().await,
    ) else {
        return;
    };
    // The "replica" is another database, so what a lookup sees shows where it went.
    let other = Postgres::open(&replica, None).await.unwrap();
    other.add_domain("replica.test").await.unwrap();
    let db = Postgres::open(&primary, Some(&replica)).await.unwrap();
    db.add_filer(&filer("f1", 1)).await.unwrap();
    db.add_domain("example.test").await.unwrap();
    db.add_mailbox(new_mailbox("a@example.test")).await.unwrap();
    assert!(db.is_hosted_domain("replica.test").await.unwrap());
    assert!(!db.is_hosted_domain("example.test").await.unwrap());
    assert_eq!(db.mailbox("a@example.test").await.unwrap(), None);
    let fresh = db.mailbox_fresh("a@example.test").await.unwrap();
    assert_eq!(fresh.map(|m| m.filer), Some("f1".to_owned()));
}
