//! The filer's configuration: one `[[filers]]` entry per filer a host runs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::config::{ByteSize, Problems, Shared};
use serde::Deserialize;

/// One `[[filers]]` entry as written in the TOML file.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// The filer's unique name, as in the location database. Default: `"filer1"`.
    pub name: String,
    /// LMTP listener for spools (`address:port`; empty disables it). Default: `127.0.0.1:2401`.
    pub lmtp: String,
    /// IMAP listener for access proxies. Default: `127.0.0.1:2143`.
    pub imap: String,
    /// POP3 listener for access proxies. Default: `127.0.0.1:2110`.
    pub pop3: String,
    /// Placement weight (see `mailctl filer list`). Default: 1.
    pub weight: u32,
    /// Where the Maildirs live. Empty: `<data_dir>/filers/<name>`.
    pub mail_root: String,
    /// Largest message accepted over LMTP. Default: `"50MiB"`.
    pub max_message_size: String,
    /// Most recipients in one LMTP transaction. Default: 1000.
    pub max_recipients: usize,
    /// Idle time allowed between LMTP commands. Default: `"5m"`.
    pub lmtp_timeout: String,
}

impl Default for FileConfig {
    fn default() -> Self {
        Self::numbered(1)
    }
}

impl FileConfig {
    /// The default entry for the `n`-th filer of an all-in-one platform: `filer<n>` on ports
    /// 2400+n (LMTP), 2142+n (IMAP) and 2109+n (POP3).
    pub fn numbered(n: u16) -> Self {
        Self {
            name: format!("filer{n}"),
            lmtp: format!("127.0.0.1:{}", 2400 + n),
            imap: format!("127.0.0.1:{}", 2142 + n),
            pop3: format!("127.0.0.1:{}", 2109 + n),
            weight: 1,
            mail_root: String::new(),
            max_message_size: "50MiB".into(),
            max_recipients: 1000,
            lmtp_timeout: "5m".into(),
        }
    }
}

/// A filer's validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Its name.
    pub name: String,
    /// LMTP listen address.
    pub lmtp: Option<SocketAddr>,
    /// IMAP listen address.
    pub imap: Option<SocketAddr>,
    /// POP3 listen address.
    pub pop3: Option<SocketAddr>,
    /// Placement weight.
    pub weight: u32,
    /// Root of the Maildirs.
    pub mail_root: PathBuf,
    /// Largest message over LMTP.
    pub max_message_size: ByteSize,
    /// Most recipients per LMTP transaction.
    pub max_recipients: usize,
    /// Idle time between LMTP commands.
    pub lmtp_timeout: Duration,
    /// What every service shares.
    pub shared: Shared,
}

impl Settings {
    /// Validates one entry; `key` is its path (`filers[0]`).
    pub fn build(file: &FileConfig, key: &str, shared: &Shared, problems: &mut Problems) -> Self {
        let name = file.name.trim();
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            problems.push(
                format!("{key}.name"),
                "must be 1-64 characters of letters, digits, '-', '_', '.'",
            );
        }
        let mail_root = if file.mail_root.trim().is_empty() {
            shared.data_dir.join("filers").join(name)
        } else {
            PathBuf::from(file.mail_root.trim())
        };
        if file.max_recipients == 0 {
            problems.push(format!("{key}.max_recipients"), "must be greater than zero");
        }
        Self {
            name: name.to_owned(),
            lmtp: problems.listen(&format!("{key}.lmtp"), &file.lmtp),
            imap: problems.listen(&format!("{key}.imap"), &file.imap),
            pop3: problems.listen(&format!("{key}.pop3"), &file.pop3),
            weight: file.weight,
            mail_root,
            max_message_size: problems
                .size(&format!("{key}.max_message_size"), &file.max_message_size),
            max_recipients: file.max_recipients,
            lmtp_timeout: problems.duration(
                &format!("{key}.lmtp_timeout"),
                &file.lmtp_timeout,
                true,
            ),
            shared: shared.clone(),
        }
    }
}
