//! The platform configuration file: the shared sections from `common::config` and each
//! service's own section, validated together so that every problem is reported at once.

use std::path::Path;
use std::sync::Arc;

use common::config::{
    self, ConfigError, DatabaseFile, PlatformFile as PlatformSection, Problems, Shared, TlsFile,
    TrustFile,
};
use serde::Deserialize;

/// The whole TOML file. Every field has a default; with no file at all this is the all-in-one
/// platform on loopback with its data in `./data`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PlatformFile {
    /// `[platform]`.
    pub platform: PlatformSection,
    /// `[database]`.
    pub database: DatabaseFile,
    /// `[tls]`.
    pub tls: TlsFile,
    /// `[trust]`.
    pub trust: TrustFile,
    /// `[[filers]]`: the filers this host runs. Default: two, `filer1` and `filer2`.
    pub filers: Vec<filer::FileConfig>,
    /// `[spool]`: the inbound MX and its queue. Default: enabled, SMTP on `127.0.0.1:2525`,
    /// reinjection on `127.0.0.1:10025`.
    pub spool: spool::FileConfig,
    /// `[access]`: the IMAP/POP3 proxy. Default: enabled, IMAP on `127.0.0.1:1143` (STARTTLS)
    /// and `:1993` (TLS), POP3 on `127.0.0.1:1110` (STLS) and `:1995` (TLS).
    pub access: access::FileConfig,
    /// `[relay]`: authenticated submission and outbound delivery. Default: enabled, STARTTLS
    /// submission on `127.0.0.1:2587`, implicit TLS on `127.0.0.1:2465`.
    pub relay: relay::FileConfig,
    /// `[filter]`: the anti-spam filter between the spool and the filers. Default: enabled,
    /// on `127.0.0.1:10024`.
    pub filter: filter::FileConfig,
}

impl Default for PlatformFile {
    fn default() -> Self {
        Self {
            platform: PlatformSection::default(),
            database: DatabaseFile::default(),
            tls: TlsFile::default(),
            trust: TrustFile::default(),
            filers: vec![
                filer::FileConfig::numbered(1),
                filer::FileConfig::numbered(2),
            ],
            spool: spool::FileConfig::default(),
            access: access::FileConfig::default(),
            relay: relay::FileConfig::default(),
            filter: filter::FileConfig::default(),
        }
    }
}

/// The validated settings of a platform.
#[derive(Debug, Clone)]
pub struct PlatformSettings {
    /// What every service shares.
    pub shared: Arc<Shared>,
    /// The filers this host runs.
    pub filers: Vec<Arc<filer::Settings>>,
    /// The spool, unless `[spool] enabled = false`.
    pub spool: Option<Arc<spool::Settings>>,
    /// The access proxy, unless `[access] enabled = false`.
    pub access: Option<Arc<access::Settings>>,
    /// The relay, unless `[relay] enabled = false`.
    pub relay: Option<Arc<relay::Settings>>,
    /// The filter, unless `[filter] enabled = false`.
    pub filter: Option<Arc<filter::Settings>>,
}

impl PlatformSettings {
    /// Reads and validates a configuration file (or the defaults, with no path).
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let file: PlatformFile = config::load(path)?;
        Self::build(&file)
    }

    /// Validates a parsed file, reporting every problem with its key path.
    pub fn build(file: &PlatformFile) -> Result<Self, ConfigError> {
        let mut p = Problems::new();
        let shared = Shared::build(
            &file.platform,
            &file.database,
            &file.tls,
            &file.trust,
            &mut p,
        );
        let mut filers = Vec::new();
        for (i, f) in file.filers.iter().enumerate() {
            let key = format!("filers[{i}]");
            let s = filer::Settings::build(f, &key, &shared, &mut p);
            if file.filers[..i].iter().any(|o| o.name.trim() == s.name) {
                p.push(
                    format!("{key}.name"),
                    format!("filer {:?} is configured twice", s.name),
                );
            }
            filers.push(Arc::new(s));
        }
        let spool = spool::Settings::build(&file.spool, "spool", &shared, &mut p);
        let spool = file.spool.enabled.then(|| Arc::new(spool));
        let access = access::Settings::build(&file.access, "access", &shared, &mut p);
        let access = file.access.enabled.then(|| Arc::new(access));
        let relay = relay::Settings::build(&file.relay, "relay", &shared, &mut p);
        let relay = file.relay.enabled.then(|| Arc::new(relay));
        let filter = filter::Settings::build(&file.filter, "filter", &shared, &mut p);
        let filter = file.filter.enabled.then(|| Arc::new(filter));
        check_listen_conflicts(
            &filers,
            spool.as_deref(),
            access.as_deref(),
            relay.as_deref(),
            filter.as_deref(),
            &mut p,
        );
        p.into_result(Self {
            shared: Arc::new(shared),
            filers,
            spool,
            access,
            relay,
            filter,
        })
    }
}

fn check_listen_conflicts(
    filers: &[Arc<filer::Settings>],
    spool: Option<&spool::Settings>,
    access: Option<&access::Settings>,
    relay: Option<&relay::Settings>,
    filter: Option<&filter::Settings>,
    p: &mut Problems,
) {
    let mut all = Vec::new();
    for (i, f) in filers.iter().enumerate() {
        for (what, addr) in [("lmtp", f.lmtp), ("imap", f.imap), ("pop3", f.pop3)] {
            all.push((format!("filers[{i}].{what}"), addr));
        }
    }
    if let Some(s) = spool {
        all.push(("spool.smtp".to_owned(), s.smtp));
        all.push(("spool.reinject".to_owned(), s.reinject));
    }
    if let Some(a) = access {
        for (what, addr) in a.listen_addresses() {
            all.push((format!("access.{what}"), addr));
        }
    }
    if let Some(r) = relay {
        all.push(("relay.submission".to_owned(), r.submission));
        all.push(("relay.submissions".to_owned(), r.submissions));
    }
    if let Some(f) = filter {
        all.push(("filter.listen".to_owned(), f.listen));
    }
    let mut seen: Vec<(std::net::SocketAddr, String)> = Vec::new();
    for (key, addr) in all {
        let Some(addr) = addr else { continue };
        if addr.port() != 0
            && let Some((_, other)) = seen.iter().find(|(a, _)| *a == addr)
        {
            p.push(&key, format!("{addr} is already used by {other}"));
        }
        seen.push((addr, key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_file_is_the_all_in_one_platform() {
        let s = PlatformSettings::load(None).unwrap();
        assert_eq!(s.filers.len(), 2);
        let spool = s.spool.as_ref().unwrap();
        assert_eq!(spool.smtp.unwrap().to_string(), "127.0.0.1:2525");
        assert_eq!(spool.queue_dir, std::path::PathBuf::from("./data/spool"));
        assert!(s.filers.iter().all(|f| f.lmtp.unwrap().ip().is_loopback()));
        assert_eq!(s.shared.data_dir, std::path::PathBuf::from("./data"));
        let access = s.access.as_ref().unwrap();
        assert_eq!(access.imap.unwrap().to_string(), "127.0.0.1:1143");
        assert_eq!(access.pop3s.unwrap().to_string(), "127.0.0.1:1995");
    }

    #[test]
    fn access_listeners_must_not_clash_with_others() {
        let text = "[access]\nimap = \"127.0.0.1:2525\"\nlogin_delay = \"soon\"\n";
        let file: PlatformFile = config::parse(text).unwrap();
        let err = PlatformSettings::build(&file).unwrap_err();
        let ConfigError::Invalid(p) = err else {
            panic!("{err}")
        };
        let keys: Vec<&str> = p.as_slice().iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["access.login_delay", "access.imap"]);
    }

    #[test]
    fn every_problem_is_reported_with_its_key_path() {
        let text = r#"
            [platform]
            hostname = "mx..example"
            [[filers]]
            name = "a"
            lmtp = "nonsense"
            max_message_size = "big"
            [[filers]]
            name = "a"
            imap = "127.0.0.1:2143"
        "#;
        let file: PlatformFile = config::parse(text).unwrap();
        let err = PlatformSettings::build(&file).unwrap_err();
        let ConfigError::Invalid(p) = err else {
            panic!("{err}")
        };
        let keys: Vec<&str> = p.as_slice().iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "platform.hostname",
                "filers[0].lmtp",
                "filers[0].max_message_size",
                "filers[1].name",
                "filers[1].imap",
                "filers[1].pop3"
            ]
        );
    }

    #[test]
    fn the_readme_configuration_example_is_valid() {
        let readme = include_str!("../../README.md");
        let example = readme
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .unwrap();
        let file: PlatformFile = config::parse(example).unwrap();
        assert!(file.access.enabled);
        PlatformSettings::build(&file).unwrap();
    }

    #[test]
    fn unknown_section_is_named() {
        let e = config::parse::<PlatformFile>("[filers_typo]\nx = 1\n").unwrap_err();
        assert!(e.contains("filers_typo"), "{e}");
    }
}
