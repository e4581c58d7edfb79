use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::location::Cached;
use crate::location::suite::directory_suite;

fn open() -> (tempfile::TempDir, Sqlite) {
    let dir = tempfile::tempdir().unwrap();
    let db = Sqlite::open(&dir.path().join("sub/location.db")).unwrap();
    (dir, db)
}

async fn fresh() -> Option<(tempfile::TempDir, Sqlite)> {
    Some(open())
}

directory_suite!(fresh);

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
async fn the_configured_location_opens_the_sqlite_backend() {
    let dir = tempfile::tempdir().unwrap();
    let location = crate::config::DatabaseLocation::Sqlite(dir.path().join("location.db"));
    let db = crate::location::Database::open(&location).await.unwrap();
    assert!(matches!(db, crate::location::Database::Sqlite(_)));
    db.add_domain("example.test").await.unwrap();
    let again = Sqlite::open(&dir.path().join("location.db")).unwrap();
    assert!(again.is_hosted_domain("example.test").await.unwrap());
}
