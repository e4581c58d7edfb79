use std::io::Write as _;
use std::time::Duration;

use super::*;

fn envelope(id: &QueueId, rcpts: &[&str]) -> Envelope {
    Envelope {
        id: id.clone(),
        reverse_path: "a@remote.test".into(),
        smtputf8: false,
        origin: Origin::Smtp,
        queued_ms: now_millis(),
        conn: "0123456789AB".into(),
        client_ip: "127.0.0.1".into(),
        helo: "client.test".into(),
        size: 5,
        held: false,
        recipients: rcpts
            .iter()
            .map(|r| Recipient::new((*r).into(), None))
            .collect(),
    }
}

fn queued(q: &Queue, rcpts: &[&str]) -> Envelope {
    let (id, mut f) = q.create().unwrap();
    f.write_all(b"hello").unwrap();
    let env = envelope(&id, rcpts);
    q.commit(f, &env).unwrap();
    env
}

#[test]
fn commit_load_update_remove() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path()).unwrap();
    let mut env = queued(&q, &["u@example.test"]);
    assert_eq!(q.load(&env.id).unwrap().as_ref(), Some(&env));
    assert_eq!(q.read_message(&env.id).unwrap(), b"hello");
    env.recipients[0].state = RecipientState::Delivered;
    q.update(&env).unwrap();
    assert_eq!(q.list().unwrap(), vec![env.clone()]);
    assert!(env.is_done());
    q.remove(&env.id).unwrap();
    assert!(q.load(&env.id).unwrap().is_none());
    assert!(q.list().unwrap().is_empty());
}

#[test]
fn recover_removes_what_was_never_committed() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path()).unwrap();
    let kept = queued(&q, &["u@example.test"]);
    let (uncommitted, _f) = q.create().unwrap();
    std::fs::write(dir.path().join(format!("{}.env.tmp", kept.id)), b"{").unwrap();
    let lost = QueueId::generate();
    std::fs::write(
        dir.path().join(format!("{lost}.env")),
        serde_json::to_vec(&envelope(&lost, &["x@example.test"])).unwrap(),
    )
    .unwrap();
    let q = Queue::open(dir.path()).unwrap();
    assert_eq!(q.recover().unwrap(), vec![kept.clone()]);
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            format!("{}.env", kept.id),
            format!("{}.msg", kept.id),
            "ctl".into()
        ]
    );
    assert!(!names.contains(&format!("{uncommitted}.msg")));
}

#[test]
fn one_lock_per_entry_and_notices() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path()).unwrap();
    let env = queued(&q, &["u@example.test"]);
    let lock = q.try_lock(&env.id).unwrap().unwrap();
    assert!(q.try_lock(&env.id).unwrap().is_none(), "held");
    assert!(matches!(
        q.lock_wait(&env.id, Duration::from_millis(30)),
        Err(StoreError::Locked(_))
    ));
    drop(lock);
    assert!(q.lock_wait(&env.id, Duration::ZERO).unwrap().is_some());
    assert!(
        q.try_lock(&QueueId::generate()).unwrap().is_none(),
        "no entry"
    );

    q.notify(&env.id).unwrap();
    assert_eq!(q.take_notifications().unwrap(), vec![env.id.clone()]);
    assert!(q.take_notifications().unwrap().is_empty());
}

#[test]
fn concurrent_commits_share_directory_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path()).unwrap();
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..10 {
                    queued(&q, &["u@example.test"]);
                }
            });
        }
    });
    assert_eq!(q.list().unwrap().len(), 80);
}

#[test]
fn ids_parse_only_hex_and_sort_by_age() {
    let a = QueueId::generate();
    assert_eq!(a.as_str().len(), 18);
    assert_eq!(a.as_str().parse::<QueueId>().unwrap(), a);
    for bad in ["", "../x", "G1", "a/b", &"A".repeat(33)] {
        assert!(bad.parse::<QueueId>().is_err(), "{bad}");
    }
    assert_eq!("abc".parse::<QueueId>().unwrap().as_str(), "ABC");
}

#[test]
fn backoff_doubles_up_to_the_maximum() {
    let (min, max) = (Duration::from_secs(60), Duration::from_secs(3600));
    let d: Vec<u64> = (1..9).map(|n| backoff(n, min, max).as_secs()).collect();
    assert_eq!(d, [60, 120, 240, 480, 960, 1920, 3600, 3600]);
    assert_eq!(backoff(200, min, max), max);
}

#[test]
fn a_full_disk_is_452_and_other_store_errors_451() {
    let err = |kind| super::StoreError::Io {
        path: std::path::PathBuf::from("/q"),
        source: std::io::Error::from(kind),
    };
    let full = err(std::io::ErrorKind::StorageFull).reply();
    assert_eq!(
        (full.code, full.enhanced.map(|e| e.to_string())),
        (452, Some("4.3.1".into()))
    );
    let quota = err(std::io::ErrorKind::QuotaExceeded).reply();
    assert_eq!(quota.code, 452);
    let other = err(std::io::ErrorKind::PermissionDenied).reply();
    assert_eq!(
        (other.code, other.enhanced.map(|e| e.to_string())),
        (451, Some("4.3.0".into()))
    );
}
