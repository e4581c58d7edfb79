//! Configuration: the loader, the problem list, and the sections every service shares.
//!
//! Configuration goes through two stages. A `*File` struct mirrors the TOML (every field has a
//! default, unknown keys are refused); validation turns it into typed settings and reports
//! *every* problem with its key path, not just the first ([`Problems`]). Each service owns its
//! own section (`filer::FileConfig` → `filer::Settings`); this module owns the shared parts:
//! `[platform]`, `[database]`, `[tls]` and `[trust]`.

mod database;
mod units;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

pub use database::{DatabaseLocation, PostgresUrl};
pub use units::{ByteSize, parse_duration};

use crate::net::Networks;

/// Every problem found while validating a configuration, each with its key path.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Problems(Vec<(String, String)>);

impl Problems {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a problem at `key` (a dotted path such as `filers[1].lmtp`).
    pub fn push(&mut self, key: impl Into<String>, problem: impl Into<String>) {
        self.0.push((key.into(), problem.into()));
    }

    /// Whether nothing was found.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The problems as `(key, problem)` pairs.
    pub fn as_slice(&self) -> &[(String, String)] {
        &self.0
    }

    /// `Ok(value)` when no problem was recorded, else the problems as an error.
    pub fn into_result<T>(self, value: T) -> Result<T, ConfigError> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(ConfigError::Invalid(self))
        }
    }

    /// Parses a listen address; an empty string means "disabled" and gives `None`.
    pub fn listen(&mut self, key: &str, value: &str) -> Option<SocketAddr> {
        if value.trim().is_empty() {
            return None;
        }
        match value.trim().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.push(
                    key,
                    format!("{value:?} is not an address:port such as \"127.0.0.1:25\""),
                );
                None
            }
        }
    }

    /// Parses a list of networks (`"192.0.2.0/24"`, or a bare address for a single host).
    pub fn networks(&mut self, key: &str, values: &[String]) -> Networks {
        let mut nets = Vec::new();
        for (i, v) in values.iter().enumerate() {
            let v = v.trim();
            match v.parse::<IpNet>() {
                Ok(n) => nets.push(n),
                Err(_) => match v.parse::<std::net::IpAddr>() {
                    Ok(ip) => nets.push(IpNet::from(ip)),
                    Err(_) => self.push(format!("{key}[{i}]"), format!("{v:?} is not a network")),
                },
            }
        }
        Networks::new(nets)
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, p)) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{k}: {p}")?;
        }
        Ok(())
    }
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys or wrong types.
    #[error("{path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with the line and key.
        message: String,
    },
    /// Values failed validation; every problem is listed.
    #[error("invalid configuration:\n{0}")]
    Invalid(Problems),
}

/// Reads and deserialises a TOML configuration file. With no path, every field has its
/// default (the all-in-one platform on loopback with data in `./data`).
pub fn load<T: for<'de> Deserialize<'de> + Default>(path: Option<&Path>) -> Result<T, ConfigError> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text).map_err(|message| ConfigError::Syntax {
        path: path.to_owned(),
        message,
    })
}

/// Deserialises TOML text; the error message names the line and key.
pub fn parse<T: for<'de> Deserialize<'de>>(text: &str) -> Result<T, String> {
    toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
}

/// `[platform]`: what the whole platform shares.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PlatformFile {
    /// The host name used in greetings and `Received:` headers. Default: `"localhost"`.
    pub hostname: String,
    /// Where state lives: the SQLite database, queues, Maildirs, the dev certificate.
    /// Default: `"./data"`.
    pub data_dir: String,
    /// Development mode: a self-signed certificate is made when none is configured, and
    /// plaintext authentication is allowed on loopback listeners. Default: `true`.
    pub dev_mode: bool,
    /// How long a service waits for its sessions to finish at shutdown. Default: `"10s"`.
    pub shutdown_grace: String,
}

impl Default for PlatformFile {
    fn default() -> Self {
        Self {
            hostname: "localhost".into(),
            data_dir: "./data".into(),
            dev_mode: true,
            shutdown_grace: "10s".into(),
        }
    }
}

/// `[database]`: the mailbox-location database.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseFile {
    /// Where the database is: `sqlite:PATH` (or a bare path) for a SQLite file, or
    /// `postgres://user:password@host:port/database` (also `postgresql://`) for a PostgreSQL
    /// server, which takes every change (the primary). The PostgreSQL client speaks no TLS:
    /// reach the server over loopback or a private network. Empty:
    /// `sqlite:<data_dir>/location.db`.
    pub url: String,
    /// PostgreSQL only: a `postgres://` URL of a server the lookups go to instead of `url`
    /// (a read replica; it may lag the primary by its replication delay). Empty: lookups go
    /// to `url`.
    pub read_url: String,
    /// How long services cache hot lookups (mailbox, alias, domain, filer). Default: `"5s"`.
    pub cache_ttl: String,
}

impl Default for DatabaseFile {
    fn default() -> Self {
        Self {
            url: String::new(),
            read_url: String::new(),
            cache_ttl: "5s".into(),
        }
    }
}

/// `[tls]`: the certificate every TLS listener presents.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsFile {
    /// PEM certificate chain. Empty: in dev mode a self-signed certificate is made and kept in
    /// `<data_dir>/tls/`; otherwise TLS listeners are an error.
    pub cert: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
}

/// `[trust]`: who may use the internal ports.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TrustFile {
    /// Networks allowed to deliver over LMTP to filers and to reinject into spools.
    /// Default: loopback.
    pub spool_networks: Vec<String>,
    /// Networks from which the access proxy may use the trusted login on filers.
    /// Default: loopback.
    pub proxy_networks: Vec<String>,
    /// The SASL authentication id the proxy uses on filers. Default: `"proxy"`.
    pub proxy_principal: String,
    /// The shared secret of the trusted login. Empty: a random one is made and kept in
    /// `<data_dir>/proxy.secret` (fine for one host; set it explicitly for several).
    pub proxy_secret: String,
}

impl Default for TrustFile {
    fn default() -> Self {
        let lo = vec!["127.0.0.0/8".to_owned(), "::1/128".to_owned()];
        Self {
            spool_networks: lo.clone(),
            proxy_networks: lo,
            proxy_principal: "proxy".into(),
            proxy_secret: String::new(),
        }
    }
}

/// The validated shared settings.
#[derive(Debug, Clone)]
pub struct Shared {
    /// Host name for greetings and `Received:`.
    pub hostname: String,
    /// The data directory.
    pub data_dir: PathBuf,
    /// Development mode (see [`PlatformFile::dev_mode`]).
    pub dev_mode: bool,
    /// Grace period for sessions at shutdown.
    pub shutdown_grace: Duration,
    /// Where the location database is.
    pub database: DatabaseLocation,
    /// TTL of the lookup cache.
    pub cache_ttl: Duration,
    /// Configured certificate and key, if any.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Networks allowed on LMTP and reinjection.
    pub spool_networks: Networks,
    /// Networks allowed to use the proxy login on filers.
    pub proxy_networks: Networks,
    /// The proxy's SASL authentication id.
    pub proxy_principal: String,
    /// The configured proxy secret; `None` means "use the one kept in the data directory".
    pub proxy_secret: Option<String>,
}

impl Shared {
    /// Validates the shared sections, recording every problem in `problems`.
    pub fn build(
        platform: &PlatformFile,
        database_file: &DatabaseFile,
        tls: &TlsFile,
        trust: &TrustFile,
        problems: &mut Problems,
    ) -> Self {
        let hostname = platform.hostname.trim().to_ascii_lowercase();
        if hostname.is_empty()
            || !hostname.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
        {
            problems.push(
                "platform.hostname",
                format!("{:?} is not a host name", platform.hostname),
            );
        }
        if platform.data_dir.trim().is_empty() {
            problems.push("platform.data_dir", "must not be empty");
        }
        let data_dir = PathBuf::from(platform.data_dir.trim());
        let shutdown_grace =
            problems.duration("platform.shutdown_grace", &platform.shutdown_grace, false);
        let database = DatabaseLocation::build(
            &database_file.url,
            &database_file.read_url,
            &data_dir,
            problems,
        );
        let cache_ttl = problems.duration("database.cache_ttl", &database_file.cache_ttl, false);
        let tls = match (tls.cert.trim(), tls.key.trim()) {
            ("", "") => None,
            ("", _) => {
                problems.push("tls.cert", "a key is configured but no certificate");
                None
            }
            (_, "") => {
                problems.push("tls.key", "a certificate is configured but no key");
                None
            }
            (c, k) => Some((PathBuf::from(c), PathBuf::from(k))),
        };
        if tls.is_none() && !platform.dev_mode && tls_required_but_missing(platform) {
            problems.push("tls.cert", "required when platform.dev_mode is false");
        }
        let spool_networks = problems.networks("trust.spool_networks", &trust.spool_networks);
        let proxy_networks = problems.networks("trust.proxy_networks", &trust.proxy_networks);
        let principal = trust.proxy_principal.trim();
        if principal.is_empty() || principal.contains(['\0', '@', ' ']) {
            problems.push(
                "trust.proxy_principal",
                "must be a non-empty name without '@', spaces or NUL",
            );
        }
        let secret = trust.proxy_secret.trim();
        if !secret.is_empty() && secret.len() < 16 {
            problems.push("trust.proxy_secret", "must be at least 16 characters");
        }
        Self {
            hostname,
            data_dir,
            dev_mode: platform.dev_mode,
            shutdown_grace,
            database,
            cache_ttl,
            tls,
            spool_networks,
            proxy_networks,
            proxy_principal: principal.to_owned(),
            proxy_secret: (!secret.is_empty()).then(|| secret.to_owned()),
        }
    }

    /// Defaults with the data directory at `dir`: what tests start from.
    pub fn for_tests(dir: &Path) -> Self {
        let mut p = Problems::new();
        let platform = PlatformFile {
            data_dir: dir.display().to_string(),
            ..Default::default()
        };
        let trust = TrustFile {
            proxy_secret: "test-proxy-secret-0123456789".into(),
            ..Default::default()
        };
        Self::build(
            &platform,
            &DatabaseFile::default(),
            &TlsFile::default(),
            &trust,
            &mut p,
        )
    }

    /// The proxy secret: the configured one, or the one kept in `<data_dir>/proxy.secret`
    /// (made with 32 random bytes on first use, mode 0600).
    pub fn resolve_proxy_secret(&self) -> std::io::Result<String> {
        if let Some(s) = &self.proxy_secret {
            return Ok(s.clone());
        }
        let path = self.data_dir.join("proxy.secret");
        match std::fs::read_to_string(&path) {
            Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_owned()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        use base64::Engine as _;
        use rand::RngCore as _;
        let mut raw = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        std::fs::create_dir_all(&self.data_dir)?;
        write_private(&path, secret.as_bytes())?;
        Ok(secret)
    }
}

fn tls_required_but_missing(_platform: &PlatformFile) -> bool {
    // Every platform has internet-facing TLS listeners (STARTTLS on SMTP, IMAP, POP3).
    true
}

/// Writes a small private file (mode 0600) atomically: temporary file, fsync, rename.
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let mut p = Problems::new();
        let s = Shared::build(
            &PlatformFile::default(),
            &DatabaseFile::default(),
            &TlsFile::default(),
            &TrustFile::default(),
            &mut p,
        );
        assert!(p.is_empty(), "{p}");
        assert_eq!(
            s.database,
            DatabaseLocation::Sqlite(PathBuf::from("./data/location.db"))
        );
        assert!(s.spool_networks.contains("127.0.0.1".parse().unwrap()));
        assert_eq!(s.cache_ttl, Duration::from_secs(5));
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let mut p = Problems::new();
        let platform = PlatformFile {
            hostname: "bad host".into(),
            shutdown_grace: "soon".into(),
            dev_mode: false,
            ..Default::default()
        };
        let database = DatabaseFile {
            url: "mysql://x".into(),
            cache_ttl: "1x".into(),
            ..Default::default()
        };
        let trust = TrustFile {
            spool_networks: vec!["10.0.0.0/8".into(), "nonsense".into()],
            proxy_secret: "short".into(),
            ..Default::default()
        };
        Shared::build(&platform, &database, &TlsFile::default(), &trust, &mut p);
        let keys: Vec<&str> = p.as_slice().iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "platform.hostname",
                "platform.shutdown_grace",
                "database.url",
                "database.cache_ttl",
                "tls.cert",
                "trust.spool_networks[1]",
                "trust.proxy_secret"
            ]
        );
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let e = parse::<PlatformFile>("hostname = \"a\"\nhostnme = \"b\"\n").unwrap_err();
        assert!(e.contains("hostnme"), "{e}");
    }

    #[test]
    fn proxy_secret_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Shared::for_tests(dir.path());
        s.proxy_secret = None;
        let a = s.resolve_proxy_secret().unwrap();
        let b = s.resolve_proxy_secret().unwrap();
        assert_eq!(a, b);
        assert!(a.len() >= 40);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join("proxy.secret"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
