//! Dependency faults: a filer whose disk is full, a filter that hangs. Each time the mail waits
//! in the spool (a temporary answer, never a bounce) and arrives once the fault is gone.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::smtp::client::{Client, ClientSettings, Protocol};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

use crate::support::{EPHEMERAL_CONFIG, Up, maildir, ok, reserved_port, wait_for_maildir};

async fn send(spool: SocketAddr, to: &str, subject: &str) {
    let mut c = Client::connect(spool, &ClientSettings::new("client.test", Protocol::Smtp))
        .await
        .unwrap();
    let msg = format!("Subject: {subject}\r\nMessage-ID: <{subject}@test>\r\n\r\nbody\r\n");
    let r = c
        .send("sender@remote.test", &[to.to_owned()], msg.as_bytes())
        .await
        .unwrap();
    assert!(r[0].is_positive(), "{}", r[0]);
    c.quit().await;
}

/// Waits (with a deadline) until the queue holds an entry whose first recipient was tried and
/// deferred with a reason containing `why`; returns that reason.
fn wait_for_deferral(d: &Path, why: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = ok(d, &["-c", "mail.toml", "queue", "list", "--json"], None);
        let q: serde_json::Value = serde_json::from_str(&out).unwrap();
        let reason = q.as_array().unwrap().iter().find_map(|e| {
            let r = &e["recipients"][0];
            let reason = r["last_reply"].as_str()?;
            (r["state"] == "pending" && r["attempts"].as_u64() >= Some(1) && reason.contains(why))
                .then(|| reason.to_owned())
        });
        if let Some(r) = reason {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never deferred with {why:?}: {q:#}"
        );
        std::thread::sleep(Duration::from_millis(20)); // polling interval
    }
}

/// A small tmpfs mounted for the test, unmounted when dropped.
struct SmallDisk(PathBuf);

impl SmallDisk {
    /// Mounts a tmpfs of `size` at `dir`; `None` where this is not allowed (not root), unless
    /// `MAILPLATFORM_REQUIRE_ROOT_TESTS` is set (CI), which makes that a failure.
    fn mount(dir: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status();
        if matches!(status, Ok(s) if s.success()) {
            return Some(Self(dir.to_owned()));
        }
        assert!(
            std::env::var_os("MAILPLATFORM_REQUIRE_ROOT_TESTS").is_none(),
            "mounting a tmpfs failed, and MAILPLATFORM_REQUIRE_ROOT_TESTS is set"
        );
        eprintln!("skipped: mounting a tmpfs needs root");
        None
    }

    /// Fills the disk with one file, until no byte more fits.
    fn fill(&self) -> PathBuf {
        use std::io::Write as _;
        let p = self.0.join("filler");
        let mut f = std::fs::File::create(&p).unwrap();
        let chunk = vec![0u8; 4096];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => panic!("filling: {e}"),
            }
        }
        // Byte by byte for what is left of the last block.
        while matches!(f.write(&[0]), Ok(1)) {}
        p
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_on_a_filer_is_452_and_the_mail_waits_for_space() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Some(disk) = SmallDisk::mount(&d.join("small"), "2m") else {
        return;
    };
    let cfg = EPHEMERAL_CONFIG.replacen(
        "name = \"filer1\"\n",
        &format!(
            "name = \"filer1\"\nmail_root = \"{}\"\n",
            d.join("small").display()
        ),
        1,
    );
    std::fs::write(d.join("mail.toml"), cfg).unwrap();
    ok(
        d,
        &["-c", "mail.toml", "domain", "add", "example.test"],
        None,
    );
    let user = "alice@example.test";
    ok(
        d,
        &["-c", "mail.toml", "user", "add", user, "--filer", "filer1"],
        Some("pw\n"),
    );
    let up = Up::start(d, "mail.toml");
    let spool = up.addr("spool", "smtp");
    send(spool, user, "before").await;
    wait_for_maildir(&d.join("small"), user, 1);

    let filler = disk.fill();
    // Straight to the filer: the exact answer.
    let lmtp = up.addr("filer1", "lmtp");
    let mut c = Client::connect(lmtp, &ClientSettings::new("spool.test", Protocol::Lmtp))
        .await
        .unwrap();
    let r = c
        .send(
            "sender@remote.test",
            &[user.to_owned()],
            b"Subject: direct\r\nMessage-ID: <direct@test>\r\n\r\nno room\r\n",
        )
        .await
        .unwrap();
    assert!(r[0].to_string().starts_with("452 4.3.1 "), "{}", r[0]);
    c.quit().await;

    // Through the spool: accepted, and held while the disk is full; nothing bounces.
    send(spool, user, "while-full").await;
    let reason = wait_for_deferral(d, "452");
    assert!(reason.contains("4.3.1"), "{reason}");
    assert_eq!(maildir(&d.join("small"), user).len(), 1);

    // Space again: the retry delivers it, once.
    std::fs::remove_file(filler).unwrap();
    let msgs = wait_for_maildir(&d.join("small"), user, 2);
    assert!(msgs.iter().any(|m| m.contains("Subject: while-full")));
    assert!(!msgs.iter().any(|m| m.contains("Subject: direct")));
}

/// A filter that reads each message to its end and then never answers.
async fn hanging_filter(addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut r = BufReader::new(r);
                let _ = w.write_all(b"220 hanging filter\r\n").await;
                let mut line = String::new();
                let mut in_data = false;
                loop {
                    line.clear();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if in_data {
                        if line == ".\r\n" {
                            // The whole message is here; the answer never comes.
                            std::future::pending::<()>().await;
                        }
                        continue;
                    }
                    let upper = line.to_ascii_uppercase();
                    let reply: &[u8] = if upper.starts_with("EHLO") {
                        b"250-hanging\r\n250-XFORWARD NAME ADDR PROTO HELO SOURCE IDENT\r\n250 8BITMIME\r\n"
                    } else if upper.starts_with("DATA") {
                        in_data = true;
                        b"354 go on\r\n"
                    } else {
                        b"250 ok\r\n"
                    };
                    let _ = w.write_all(reply).await;
                }
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_that_hangs_times_out_and_the_mail_waits_for_a_working_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = reserved_port();
    let filter: SocketAddr = ([127, 0, 0, 1], port).into();
    let cfg = EPHEMERAL_CONFIG.replacen(
        "[spool]\n",
        &format!("[spool]\nfilter = \"{filter}\"\nlmtp_timeout = \"1s\"\n"),
        1,
    );
    std::fs::write(d.join("mail.toml"), &cfg).unwrap();
    ok(
        d,
        &["-c", "mail.toml", "domain", "add", "example.test"],
        None,
    );
    let user = "bob@example.test";
    ok(
        d,
        &["-c", "mail.toml", "user", "add", user, "--filer", "filer2"],
        Some("pw\n"),
    );
    let hang = hanging_filter(filter).await;
    let up = Up::start(d, "mail.toml");
    send(up.addr("spool", "smtp"), user, "patient").await;
    let reason = wait_for_deferral(d, "");
    assert!(
        reason.to_ascii_lowercase().contains("time"),
        "a timeout: {reason}"
    );
    let root = d.join("data/filers/filer2");
    assert!(
        maildir(&root, user).is_empty(),
        "nothing got past the filter"
    );

    // The hanging filter is replaced by a real one on its address (its own process): the
    // retry goes through it and back into the spool, and the mail arrives once.
    hang.abort();
    let _ = hang.await;
    let reinject = up.addr("spool", "reinject");
    let filter_cfg = format!(
        "roles = [\"filter\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n[filter]\nlisten = \"{filter}\"\nreinject = \"{reinject}\"\nnetwork_checks = false\n"
    );
    std::fs::write(d.join("filter.toml"), filter_cfg).unwrap();
    let _filter = Up::start(d, "filter.toml");
    let msgs = wait_for_maildir(&root, user, 1);
    assert!(msgs[0].contains("Subject: patient"), "{}", msgs[0]);
    assert!(msgs[0].contains("X-Spam-Status"), "filtered: {}", msgs[0]);
}
