//! `mailctl` as an operator uses it: a fresh data directory, real processes, exit codes.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{Up, fails, mailctl, ok};

#[test]
fn domain_user_alias_filer_administration() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, &["domain", "add", "Example.TEST"], None);
    fails(
        d,
        &["domain", "add", "example.test"],
        None,
        "already exists",
    );
    fails(
        d,
        &["domain", "add", "not a domain"],
        None,
        "not a valid domain",
    );
    ok(d, &["user", "add", "a@example.test"], Some("pw\n"));
    fails(
        d,
        &["user", "add", "b@unhosted.test"],
        Some("pw\n"),
        "not hosted",
    );
    fails(
        d,
        &["user", "add", "not-an-address"],
        Some("pw\n"),
        "not a valid address",
    );
    fails(
        d,
        &["user", "add", "c@example.test", "--filer", "nope"],
        Some("pw\n"),
        "unknown filer nope",
    );
    fails(
        d,
        &["user", "add", "c@example.test"],
        Some(""),
        "empty password",
    );

    let users: serde_json::Value =
        serde_json::from_str(&ok(d, &["user", "list", "--json"], None)).unwrap();
    let users = users.as_array().unwrap();
    assert_eq!(
        users.len(),
        1,
        "the refused users left nothing behind: {users:?}"
    );
    assert_eq!(users[0]["address"], "a@example.test");
    let filer = users[0]["filer"].as_str().unwrap();
    assert!(filer == "filer1" || filer == "filer2", "{filer}");

    ok(
        d,
        &["alias", "add", "postmaster@example.test", "a@example.test"],
        None,
    );
    let aliases: serde_json::Value =
        serde_json::from_str(&ok(d, &["alias", "list", "--json"], None)).unwrap();
    assert_eq!(aliases[0]["target"], "a@example.test");
    fails(
        d,
        &["domain", "remove", "example.test"],
        None,
        "remove them first",
    );

    ok(
        d,
        &[
            "filer",
            "add",
            "f9",
            "--lmtp",
            "127.0.0.1:9",
            "--imap",
            "127.0.0.1:9",
            "--pop3",
            "127.0.0.1:9",
            "--weight",
            "3",
        ],
        None,
    );
    ok(d, &["filer", "set-state", "f9", "draining"], None);
    fails(
        d,
        &["filer", "set-state", "zz", "down"],
        None,
        "unknown filer zz",
    );
    let filers: serde_json::Value =
        serde_json::from_str(&ok(d, &["filer", "list", "--json"], None)).unwrap();
    let f9 = filers
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "f9")
        .unwrap();
    assert_eq!(
        (f9["state"].as_str(), f9["weight"].as_u64()),
        (Some("draining"), Some(3))
    );

    ok(d, &["user", "passwd", "a@example.test"], Some("new\n"));
    ok(d, &["alias", "remove", "postmaster@example.test"], None);
    ok(d, &["user", "remove", "a@example.test"], None);
    ok(d, &["domain", "remove", "example.test"], None);
    assert_eq!(ok(d, &["domain", "list", "--json"], None).trim(), "[]");
}

#[test]
fn config_check_reports_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("bad.toml"),
        "[platform]\nhostname = \"a b\"\n[[filers]]\nname = \"x\"\nlmtp = \"nowhere\"\n",
    )
    .unwrap();
    let out = mailctl(d, &["--config", "bad.toml", "config", "check"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("platform.hostname") && err.contains("filers[0].lmtp"),
        "{err}"
    );
    ok(d, &["config", "check"], None);
}

#[test]
fn up_then_status_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("mail.toml"),
        "[admin]\nlisten = \"127.0.0.1:0\"\n[relay]\nenabled = false\n\n[filter]\nenabled = false\n\n[access]\nimap = \"127.0.0.1:0\"\nimaps = \"\"\npop3 = \"127.0.0.1:0\"\npop3s = \"\"\n\n[spool]\nsmtp = \"127.0.0.1:0\"\nreinject = \"127.0.0.1:0\"\n\n[[filers]]\nname = \"filer1\"\nlmtp = \"127.0.0.1:0\"\nimap = \"127.0.0.1:0\"\npop3 = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let out = mailctl(d, &["-c", "mail.toml", "status"], None);
    assert_eq!(out.status.code(), Some(3), "not running yet");
    let mut up = Command::new(env!("CARGO_BIN_EXE_mailctl"))
        .args(["-c", "mail.toml", "up"])
        .current_dir(d)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait (with a deadline) for the run file that `up` writes once it listens.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        let out = mailctl(d, &["-c", "mail.toml", "status", "--json"], None);
        if out.status.success() {
            break serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "status never reported a running platform: {out:?}"
        );
        std::thread::yield_now();
    };
    assert_eq!(status["running"], true);
    assert_eq!(status["pid"].as_u64(), Some(u64::from(up.id())));
    assert!(status["listeners"].as_array().unwrap().len() >= 3);
    let out = mailctl(d, &["-c", "mail.toml", "up"], None);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already running"));
    Command::new("kill")
        .arg(up.id().to_string())
        .status()
        .unwrap();
    assert!(up.wait().unwrap().success(), "up exits cleanly on SIGTERM");
    let out = mailctl(d, &["-c", "mail.toml", "status"], None);
    assert_eq!(out.status.code(), Some(3), "stopped");
}

#[test]
fn processes_with_different_roles_share_a_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let common = "[admin]\nlisten = \"127.0.0.1:0\"\n[access]\nimap = \"127.0.0.1:0\"\nimaps = \"\"\npop3 = \"127.0.0.1:0\"\npop3s = \"\"\n\n[spool]\nsmtp = \"127.0.0.1:0\"\nreinject = \"127.0.0.1:0\"\nfilter = \"none\"\nrelay = \"none\"\n\n[[filers]]\nname = \"filer1\"\nlmtp = \"127.0.0.1:0\"\nimap = \"127.0.0.1:0\"\npop3 = \"127.0.0.1:0\"\n";
    std::fs::write(
        d.join("core.toml"),
        format!("roles = [\"spool\", \"filer\"]\n{common}"),
    )
    .unwrap();
    std::fs::write(
        d.join("proxy.toml"),
        format!("roles = [\"access\"]\n{common}"),
    )
    .unwrap();
    std::fs::write(
        d.join("spool.toml"),
        format!("roles = [\"spool\"]\n{common}"),
    )
    .unwrap();
    let core = Up::start(d, "core.toml");
    let proxy = Up::start(d, "proxy.toml");
    let services = |s: &serde_json::Value| -> Vec<String> {
        let mut v: Vec<String> = s["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["service"].as_str().unwrap().to_owned())
            .collect();
        v.sort();
        v.dedup();
        v
    };
    assert_eq!(services(&core.status), ["admin", "filer1", "spool"]);
    let out = ok(d, &["-c", "proxy.toml", "status", "--json"], None);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(services(&status), ["access", "admin", "filer1", "spool"]);
    let roles: Vec<String> = status["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            p["roles"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_str().unwrap())
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    assert_eq!(roles.len(), 2, "{status}");
    assert!(roles.contains(&"spool+filer".to_owned()) && roles.contains(&"access".to_owned()));
    // A role that already runs here is refused, whatever else the process would run.
    fails(d, &["-c", "spool.toml", "up"], None, "already running");
    // The proxy reaches the filer of the other process.
    let imap = proxy.addr("access", "imap");
    let mut s = std::net::TcpStream::connect(imap).unwrap();
    let mut greeting = [0u8; 4];
    std::io::Read::read_exact(&mut s, &mut greeting).unwrap();
    assert_eq!(&greeting, b"* OK");
    drop(core);
    let out = ok(d, &["-c", "proxy.toml", "status", "--json"], None);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        services(&status),
        ["access", "admin"],
        "a killed process's run file is skipped"
    );
}

#[test]
fn user_import_reads_address_and_password_lines() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, &["domain", "add", "example.test"], None);
    let out = ok(
        d,
        &["user", "import"],
        Some("u1@example.test pw one\n# comment\n\nu2@example.test pw2\n"),
    );
    assert!(out.contains("added 2"), "{out}");
    fails(
        d,
        &["user", "import"],
        Some("u3@example.test pw\nbad line\n"),
        "line 2",
    );
    let users: serde_json::Value =
        serde_json::from_str(&ok(d, &["user", "list", "--json"], None)).unwrap();
    let names: Vec<&str> = users
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["address"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["u1@example.test", "u2@example.test"],
        "a bad line changes nothing"
    );
}

#[test]
fn dkim_generate_then_list() {
    use std::os::unix::fs::PermissionsExt as _;

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, &["domain", "add", "example.test"], None);
    let out = ok(d, &["dkim", "generate", "Example.TEST"], None);
    let key = d.join("data/dkim/example.test.mail.key");
    assert!(out.contains("data/dkim/example.test.mail.key"), "{out}");
    assert!(
        out.contains("mail._domainkey.example.test. IN TXT ( \"v=DKIM1; k=rsa; p="),
        "{out}"
    );
    assert!(out.contains("publish"), "{out}");
    let pem = std::fs::read(&key).unwrap();
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    for selector in ["mail", "s2"] {
        fails(
            d,
            &["dkim", "generate", "example.test", "--selector", selector],
            None,
            "already has a DKIM key",
        );
    }
    assert_eq!(std::fs::read(&key).unwrap(), pem, "the key is unchanged");

    // A domain that is not hosted gets a key, with a warning.
    let out = mailctl(
        d,
        &["dkim", "generate", "other.test", "--selector", "s2026"],
        None,
    );
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a hosted domain"), "{err}");

    let list = ok(d, &["dkim", "list"], None);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 2, "{list}");
    assert!(
        lines[0].starts_with("example.test  selector=mail"),
        "{list}"
    );
    assert!(lines[1].starts_with("other.test  selector=s2026"), "{list}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(d, &["dkim", "list", "--json"], None)).unwrap();
    assert_eq!(json[0]["domain"], "example.test");
    assert_eq!(json[1]["selector"], "s2026");
}

#[test]
fn filter_train_then_eval_separates_spam_from_ham() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let spam = |i: usize| {
        format!(
            "From: Deals <promo{i}@cheap-pills.example>\r\nTo: you@example.test\r\n\
             Subject: FREE pills now!!! offer {i}\r\nContent-Type: text/html\r\n\r\n\
             <html><body><font color=red>Buy cheap viagra and rolex replicas!</font> Click \
             <a href=\"http://pills.cheap-pills.example/buy\">here</a>: free shipping, best \
             price guaranteed.</body></html>\r\n"
        )
    };
    let ham = |i: usize| {
        format!(
            "From: Alice Smith <alice@example.org>\r\nTo: bob@example.test\r\n\
             Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nMessage-ID: <{i}@example.org>\r\n\
             Subject: Re: meeting notes {i}\r\n\r\nHi Bob, the notes from the meeting about \
             the compiler release. Could you review the patch before Thursday?\r\nAlice\r\n"
        )
    };
    for (set, range) in [("train", 0..12), ("test", 100..106)] {
        for i in range {
            for (class, text) in [("spam", spam(i)), ("ham", ham(i))] {
                let sub = d.join(set).join(class);
                std::fs::create_dir_all(&sub).unwrap();
                std::fs::write(sub.join(format!("{i}.eml")), text).unwrap();
            }
        }
    }

    // The default model path is <data_dir>/filter/model.json.
    let out = ok(
        d,
        &[
            "filter",
            "train",
            "--spam",
            "train/spam",
            "--ham",
            "train/ham",
            "--json",
        ],
        None,
    );
    let trained: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (trained["spam"].as_u64(), trained["ham"].as_u64()),
        (Some(12), Some(12))
    );
    assert!(trained["tokens"].as_u64().unwrap() > 10, "{trained}");
    assert!(d.join("data/filter/model.json").is_file(), "{out}");

    let out = ok(
        d,
        &[
            "filter",
            "eval",
            "--spam",
            "test/spam",
            "--ham",
            "test/ham",
            "--threshold",
            "0.5",
            "--threshold",
            "0.9",
            "--json",
        ],
        None,
    );
    let eval: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (eval["spam"].as_u64(), eval["ham"].as_u64()),
        (Some(6), Some(6))
    );
    assert!(eval["messages_per_s"].as_f64().unwrap() > 0.0, "{eval}");
    for r in eval["results"].as_array().unwrap() {
        assert_eq!(r["false_positives"], 0, "{eval}");
        assert_eq!(r["false_negatives"], 0, "{eval}");
    }

    // An explicit model path, and the plain-text report.
    ok(
        d,
        &[
            "filter",
            "train",
            "--spam",
            "train/spam",
            "--ham",
            "train/ham",
            "--ham",
            "test/ham",
            "--model",
            "m.json",
        ],
        None,
    );
    let out = ok(
        d,
        &[
            "filter",
            "eval",
            "--spam",
            "test/spam",
            "--ham",
            "test/ham",
            "--model",
            "m.json",
        ],
        None,
    );
    assert!(
        out.contains("scored 6 spam and 6 ham")
            && out.contains("threshold 0.9: false positives 0/6 (0.00%), false negatives 0/6"),
        "{out}"
    );

    std::fs::create_dir_all(d.join("empty")).unwrap();
    fails(
        d,
        &["filter", "train", "--spam", "train/spam", "--ham", "empty"],
        None,
        "0 ham",
    );
    fails(
        d,
        &[
            "filter",
            "eval",
            "--spam",
            "test/spam",
            "--ham",
            "test/ham",
            "--model",
            "nope.json",
        ],
        None,
        "nope.json",
    );
}
