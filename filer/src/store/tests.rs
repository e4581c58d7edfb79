use std::os::unix::fs::PermissionsExt as _;

use super::*;

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::new(dir.path().join("mail"), "filer.test");
    (dir, s)
}

#[test]
fn delivery_is_indexed_with_increasing_uids() {
    let (_d, s) = store();
    let u = s.user("a@example.test", 1_700_000_000).unwrap();
    let a = u.deliver("INBOX", b"Subject: 1\r\n\r\none\r\n", 0).unwrap();
    let b = u.deliver("INBOX", b"Subject: 2\r\n\r\ntwo\r\n", 0).unwrap();
    assert_eq!((a.uid, b.uid), (1, 2));
    assert_eq!(a.uid_validity, 1_700_000_000);
    let msgs = u.messages("INBOX").unwrap();
    assert_eq!(msgs.len(), 2);
    let path = u.path_of(&msgs[0]);
    assert_eq!(std::fs::read(&path).unwrap(), b"Subject: 1\r\n\r\none\r\n");
    assert!(
        path.starts_with(s.root().join("example.test/a/cur")),
        "{}",
        path.display()
    );
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(u.usage().unwrap(), msgs.iter().map(|m| m.size).sum::<u64>());
    assert_ne!(msgs[0].guid, msgs[1].guid);
    assert!(
        std::fs::read_dir(s.root().join("example.test/a/tmp"))
            .unwrap()
            .next()
            .is_none(),
        "tmp is empty"
    );
}

#[test]
fn new_mailbox_has_the_special_folders() {
    let (_d, s) = store();
    let u = s.user("a@example.test", 7).unwrap();
    let f = u.folders().unwrap();
    let names: Vec<&str> = f.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["INBOX", "Drafts", "Junk", "Sent", "Trash"]);
    assert_eq!(f[2].special_use.as_deref(), Some("\\Junk"));
    assert!(s.root().join("example.test/a/.Junk/cur").is_dir());
    let mut uvs: Vec<u32> = f.iter().map(|f| f.uid_validity).collect();
    uvs.dedup();
    assert_eq!(uvs.len(), 5, "every folder has its own UIDVALIDITY");
}

#[test]
fn quota_is_enforced() {
    let (_d, s) = store();
    let u = s.user("a@example.test", 1).unwrap();
    u.deliver("INBOX", &[b'x'; 600], 1000).unwrap();
    let e = u.deliver("INBOX", &[b'x'; 600], 1000).unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::QuotaExceeded {
                used: 600,
                size: 600,
                quota: 1000
            }
        ),
        "{e}"
    );
    assert_eq!(
        u.messages("INBOX").unwrap().len(),
        1,
        "nothing half-delivered"
    );
    u.deliver("INBOX", &[b'x'; 600], 0).unwrap(); // 0 = unlimited
}

#[test]
fn a_file_left_unindexed_by_a_crash_is_indexed_on_open() {
    let (_d, s) = store();
    let dir = {
        let u = s.user("a@example.test", 1).unwrap();
        u.deliver("INBOX", b"first\r\n", 0).unwrap();
        u.dir().to_owned()
    };
    // A crash after the link into cur/ but before the index commit, and a half-written tmp file.
    std::fs::write(dir.join("cur/1.M1P1Q1.host,S=8:2,"), b"second\r\n").unwrap();
    std::fs::write(dir.join("tmp/2.M2P2Q2.host"), b"half").unwrap();
    let u = UserStore::open(dir.clone(), "h".into(), 1).unwrap();
    let msgs = u.messages("INBOX").unwrap();
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert_eq!(msgs[1].uid, 2);
    assert_eq!(std::fs::read(u.path_of(&msgs[1])).unwrap(), b"second\r\n");
    // Reopening again indexes nothing twice.
    let u = UserStore::open(dir, "h".into(), 1).unwrap();
    assert_eq!(u.messages("INBOX").unwrap().len(), 2);
}

#[test]
fn expunge_removes_rows_then_files() {
    let (_d, s) = store();
    let u = s.user("a@example.test", 1).unwrap();
    u.deliver("INBOX", b"a\r\n", 0).unwrap();
    u.deliver("INBOX", b"bb\r\n", 0).unwrap();
    let first = u.messages("INBOX").unwrap()[0].clone();
    assert_eq!(u.expunge("INBOX", &[1, 99]).unwrap(), 1);
    assert!(!u.path_of(&first).exists());
    assert_eq!(u.usage().unwrap(), 4);
    // UIDs are never reused.
    assert_eq!(u.deliver("INBOX", b"c\r\n", 0).unwrap().uid, 3);
}

#[test]
fn names_cannot_leave_the_mail_root() {
    let (_d, s) = store();
    for bad in [
        "../x@example.test",
        "a@../../etc",
        "a/b@example.test",
        ".a@example.test",
        "a@example.test/..",
        "A@example.test",
        "noat",
        "a@",
        "@example.test",
        "a@exa mple.test",
        "a\0@example.test",
    ] {
        assert!(
            matches!(s.user(bad, 1), Err(StoreError::InvalidName(_))),
            "{bad}"
        );
    }
    for (name, dir) in [
        ("INBOX", ""),
        ("Junk", ".Junk"),
        ("a/b", ".a.b"),
        ("..", ".%2E%2E"),
        ("cur", ".cur"),
        ("x\r\n", ".x%0D%0A"),
        ("~/x", ".%7E.x"),
        ("Entwürfe", ".Entw%C3%BCrfe"),
    ] {
        assert_eq!(index::folder_dir(name), dir, "{name}");
    }
}

#[test]
fn flags_copy_and_changes() {
    let (_d, s) = store();
    let u = s.user("a@example.test", 1).unwrap();
    u.deliver("INBOX", b"one\r\n", 0).unwrap();
    u.deliver("INBOX", b"two\r\n", 0).unwrap();
    let before = u.folder("INBOX").unwrap().unwrap().highest_modseq;
    let (changed, refused) = u
        .store_flags("INBOX", &[1, 2], FlagOp::Add, &["\\Seen".into()], None)
        .unwrap();
    assert_eq!((changed.len(), refused.len()), (2, 0));
    // Unchanged flags keep their modseq; CONDSTORE refuses messages changed since.
    let (again, _) = u
        .store_flags("INBOX", &[1], FlagOp::Add, &["\\SEEN".into()], None)
        .unwrap();
    assert!(again.is_empty());
    let (_, refused) = u
        .store_flags("INBOX", &[1], FlagOp::Add, &["$x".into()], Some(before))
        .unwrap();
    assert_eq!(refused, vec![1]);
    assert_eq!(u.counts("INBOX").unwrap(), (2, 0));
    let (uv, pairs) = u.copy("INBOX", &[2, 1, 9], "Trash", 0).unwrap();
    assert_eq!(uv, u.folder("Trash").unwrap().unwrap().uid_validity);
    assert_eq!(pairs, vec![(1, 1), (2, 2)]);
    let trash = u.messages("Trash").unwrap();
    assert_eq!(std::fs::read(u.path_of(&trash[1])).unwrap(), b"two\r\n");
    assert_eq!(trash[0].flags, "\\Seen");
    u.expunge("INBOX", &[1]).unwrap();
    let c = u.changes_since("INBOX", before).unwrap();
    assert_eq!(c.expunged, vec![1]);
    assert_eq!(c.changed.iter().map(|m| m.uid).collect::<Vec<_>>(), vec![2]);
    assert_eq!(
        u.usage().unwrap(),
        5 + 10,
        "a copy counts against the quota"
    );
}

#[test]
fn folders_are_created_renamed_and_deleted() {
    let (_d, s) = store();
    let u = s.user("a@example.test", 1).unwrap();
    u.create_folder("Archive").unwrap();
    u.create_folder("Archive/2024").unwrap();
    assert!(matches!(
        u.create_folder("Archive"),
        Err(StoreError::FolderExists(_))
    ));
    u.append("Archive/2024", b"old\r\n", "\\Seen", 1_600_000_000, 0)
        .unwrap();
    u.rename_folder("Archive", "Old").unwrap();
    let names: Vec<String> = u.folders().unwrap().into_iter().map(|f| f.name).collect();
    assert!(
        names.contains(&"Old/2024".to_owned()) && !names.contains(&"Archive".to_owned()),
        "{names:?}"
    );
    let m = &u.messages("Old/2024").unwrap()[0];
    assert_eq!(std::fs::read(u.path_of(m)).unwrap(), b"old\r\n");
    assert_eq!(m.internal_date, 1_600_000_000);
    u.deliver("INBOX", b"x\r\n", 0).unwrap();
    u.rename_folder("INBOX", "Saved").unwrap();
    assert_eq!(u.messages("INBOX").unwrap().len(), 0);
    assert_eq!(u.messages("Saved").unwrap().len(), 1);
    assert!(matches!(
        u.delete_folder("INBOX"),
        Err(StoreError::NotAllowed(_))
    ));
    u.delete_folder("Old/2024").unwrap();
    assert!(!u.dir().join(".Old.2024").exists());
    assert_eq!(u.usage().unwrap(), 3);
}

#[test]
fn concurrent_first_deliveries_to_one_mailbox_all_succeed() {
    // Regression: two threads opening the same mailbox at once each reconciled it, and one
    // indexed a file the other had just linked but not yet committed.
    let (_d, s) = store();
    let s = std::sync::Arc::new(s);
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let s = s.clone();
            std::thread::spawn(move || {
                let u = s.user("a@example.test", 1).unwrap();
                u.deliver("INBOX", format!("message {i}\r\n").as_bytes(), 0)
                    .unwrap()
            })
        })
        .collect();
    let mut uids: Vec<u32> = threads.into_iter().map(|t| t.join().unwrap().uid).collect();
    uids.sort_unstable();
    assert_eq!(uids, (1..=16).collect::<Vec<_>>());
    let u = s.user("a@example.test", 1).unwrap();
    for m in u.messages("INBOX").unwrap() {
        assert!(u.path_of(&m).exists());
    }
}

#[test]
fn imported_folders_and_messages_keep_their_uids_flags_and_dates() {
    let (_d, s) = store();
    let u = s.user("m@example.test", 1_700_000_000).unwrap();
    // INBOX exists (made on open) with another UIDVALIDITY: it takes the source's.
    let inbox = u.import_folder("INBOX", 424_242, 10, None, true).unwrap();
    assert_eq!((inbox.uid_validity, inbox.uid_next), (424_242, 10));
    let arch = u
        .import_folder("Archive/2024", 99, 3, Some("\\Archive"), false)
        .unwrap();
    assert_eq!(
        (
            arch.uid_validity,
            arch.special_use.as_deref(),
            arch.subscribed
        ),
        (99, Some("\\Archive"), false)
    );
    assert!(
        u.import_message(
            "INBOX",
            5,
            "\\Seen",
            1_600_000_000,
            b"Subject: five\r\n\r\n5\r\n"
        )
        .unwrap()
    );
    assert!(
        u.import_message(
            "INBOX",
            9,
            "\\Flagged $Label1",
            1_600_000_100,
            b"Subject: nine\r\n\r\n9\r\n"
        )
        .unwrap()
    );
    assert!(
        u.import_message(
            "Archive/2024",
            2,
            "",
            1_500_000_000,
            b"Subject: old\r\n\r\nx\r\n"
        )
        .unwrap()
    );
    // Run again: nothing changes, nothing is written twice.
    assert!(
        !u.import_message(
            "INBOX",
            5,
            "\\Seen",
            1_600_000_000,
            b"Subject: five\r\n\r\n5\r\n"
        )
        .unwrap()
    );
    let msgs = u.messages("INBOX").unwrap();
    let got: Vec<(u32, &str, i64)> = msgs
        .iter()
        .map(|m| (m.uid, m.flags.as_str(), m.internal_date))
        .collect();
    assert_eq!(
        got,
        [
            (5, "\\Seen", 1_600_000_000),
            (9, "\\Flagged $Label1", 1_600_000_100)
        ]
    );
    assert_eq!(
        std::fs::read(u.path_of(&msgs[1])).unwrap(),
        b"Subject: nine\r\n\r\n9\r\n"
    );
    // UIDNEXT stays what the source said (10), above every UID; the next delivery takes it.
    assert_eq!(u.folder("INBOX").unwrap().unwrap().uid_next, 10);
    assert_eq!(
        u.deliver("INBOX", b"Subject: new\r\n\r\n", 0).unwrap().uid,
        10
    );
    // A folder with messages keeps its UIDVALIDITY: a different one is refused.
    assert!(u.import_folder("INBOX", 1, 1, None, true).is_err());
    let files = std::fs::read_dir(s.root().join("example.test/m/cur"))
        .unwrap()
        .count();
    assert_eq!(
        files, 3,
        "one file per message, none left by the second run"
    );
    assert_eq!(
        u.usage().unwrap(),
        u.messages("INBOX")
            .unwrap()
            .iter()
            .chain(u.messages("Archive/2024").unwrap().iter())
            .map(|m| m.size)
            .sum::<u64>()
    );
}

#[test]
fn a_redelivery_of_the_same_message_is_stored_once() {
    let (_d, s) = store();
    let u = s.user("a@example.test", 1_700_000_000).unwrap();
    let first = b"Received: from spool1\r\nMessage-ID: <m1@x>\r\nSubject: s\r\n\r\nbody\r\n";
    // The same message again, through other hops (other trace headers, the id folded).
    let again =
        b"Received: from spool2\r\nX-Spam-Status: No\r\nMessage-ID:\r\n <m1@x>\r\nSubject: s\r\n\r\nbody\r\n";
    let a = u.deliver("INBOX", first, 0).unwrap();
    let b = u.deliver("INBOX", again, 0).unwrap();
    assert_eq!(a, b, "the earlier delivery is returned");
    assert_eq!(u.messages("INBOX").unwrap().len(), 1);
    // Another body, or no Message-ID at all: stored.
    u.deliver("INBOX", b"Message-ID: <m1@x>\r\n\r\nother body\r\n", 0)
        .unwrap();
    u.deliver("INBOX", b"Subject: s\r\n\r\nbody\r\n", 0)
        .unwrap();
    u.deliver("INBOX", b"Subject: s\r\n\r\nbody\r\n", 0)
        .unwrap();
    assert_eq!(u.messages("INBOX").unwrap().len(), 4);
    // Filed elsewhere the first time (Junk): still recognised.
    let j = u
        .deliver("Junk", b"Message-ID: <m2@x>\r\n\r\nspam\r\n", 0)
        .unwrap();
    assert_eq!(
        u.deliver("INBOX", b"Message-ID: <m2@x>\r\n\r\nspam\r\n", 0)
            .unwrap(),
        j
    );
    assert_eq!(u.messages("INBOX").unwrap().len(), 4);
}

#[test]
fn delivery_keys_ignore_other_headers_and_need_a_message_id() {
    use crate::store::delivery_key;
    let k = delivery_key(b"Message-ID: <a@b>\r\n\r\nx").unwrap();
    assert_eq!(
        delivery_key(b"Received: x\r\nmessage-id:   <a@b> \r\n\r\nx"),
        Some(k.clone())
    );
    assert_ne!(delivery_key(b"Message-ID: <a@c>\r\n\r\nx"), Some(k.clone()));
    assert_ne!(delivery_key(b"Message-ID: <a@b>\r\n\r\ny"), Some(k));
    assert_eq!(delivery_key(b"Subject: x\r\n\r\nx"), None);
    assert_eq!(delivery_key(b"Message-ID: \r\n\r\nx"), None);
    assert_eq!(delivery_key(b"no header end"), None);
}
