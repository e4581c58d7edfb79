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
    /// `roles = ["spool", "filter"]`: the services this host runs, out of [`ROLES`]. Absent:
    /// every service whose section is enabled (the all-in-one platform). A service runs when
    /// its role is listed and its section is not `enabled = false`.
    pub roles: Option<Vec<String>>,
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
    /// `[admin]`: the HTTP listener for `/metrics`, the message trace and the status page.
    pub admin: AdminFile,
}

/// `[admin]` as written in the file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminFile {
    /// The admin HTTP listener (`/`, `/metrics`, `/trace`, `/api/status`); `""` disables it.
    /// Default `127.0.0.1:8025`. It has no authentication: keep it on loopback or a management
    /// network.
    pub listen: String,
    /// Admin listeners of the platform's other hosts, asked by `mailctl trace`
    /// (`["10.0.0.11:8025", ...]`). The processes on this host are found by themselves.
    pub peers: Vec<String>,
}

impl Default for AdminFile {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8025".into(),
            peers: Vec::new(),
        }
    }
}

/// The validated `[admin]` section.
#[derive(Debug, Clone, Default)]
pub struct AdminSettings {
    /// Where the admin listener is bound, if anywhere.
    pub listen: Option<std::net::SocketAddr>,
    /// Other hosts' admin listeners.
    pub peers: Vec<std::net::SocketAddr>,
}

impl Default for PlatformFile {
    fn default() -> Self {
        Self {
            roles: None,
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
            admin: AdminFile::default(),
        }
    }
}

/// The roles a host can take, one per service.
pub const ROLES: [&str; 5] = ["spool", "filter", "relay", "access", "filer"];

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
    /// The roles this host runs, in the order of [`ROLES`]: those listed in `roles` (all
    /// without it) whose service is enabled.
    pub roles: Vec<String>,
    /// The admin HTTP listener.
    pub admin: AdminSettings,
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
        let runs = check_roles(file.roles.as_deref(), &mut p);
        let admin = AdminSettings {
            listen: match file.admin.listen.trim() {
                "" => None,
                l => p.listen("admin.listen", l),
            },
            peers: file
                .admin
                .peers
                .iter()
                .enumerate()
                .filter_map(|(i, a)| match a.trim().parse() {
                    Ok(a) => Some(a),
                    Err(_) => {
                        p.push(format!("admin.peers[{i}]"), "must be address:port");
                        None
                    }
                })
                .collect(),
        };
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
        if !runs("filer") {
            filers.clear();
        }
        let spool = spool::Settings::build(&file.spool, "spool", &shared, &mut p);
        let spool = (runs("spool") && file.spool.enabled).then(|| Arc::new(spool));
        let access = access::Settings::build(&file.access, "access", &shared, &mut p);
        let access = (runs("access") && file.access.enabled).then(|| Arc::new(access));
        let relay = relay::Settings::build(&file.relay, "relay", &shared, &mut p);
        let relay = (runs("relay") && file.relay.enabled).then(|| Arc::new(relay));
        let filter = filter::Settings::build(&file.filter, "filter", &shared, &mut p);
        let filter = (runs("filter") && file.filter.enabled).then(|| Arc::new(filter));
        if file.roles.is_some() {
            check_peers(
                spool.as_deref(),
                relay.as_deref(),
                filter.as_deref(),
                &mut p,
            );
        }
        check_listen_conflicts(
            admin.listen,
            &filers,
            spool.as_deref(),
            access.as_deref(),
            relay.as_deref(),
            filter.as_deref(),
            &mut p,
        );
        // What really runs: a listed role whose section is disabled does not.
        let roles = ROLES
            .iter()
            .filter(|r| match **r {
                "spool" => spool.is_some(),
                "filter" => filter.is_some(),
                "relay" => relay.is_some(),
                "access" => access.is_some(),
                _ => !filers.is_empty(),
            })
            .map(|r| (*r).to_owned())
            .collect();
        p.into_result(Self {
            shared: Arc::new(shared),
            filers,
            spool,
            access,
            relay,
            filter,
            roles,
            admin,
        })
    }
}

/// Checks the names in `roles` and returns whether a role runs on this host.
fn check_roles(roles: Option<&[String]>, p: &mut Problems) -> impl Fn(&str) -> bool + use<> {
    let mut listed = Vec::new();
    match roles {
        None => listed.extend(ROLES.iter().map(|r| (*r).to_owned())),
        Some(roles) => {
            if roles.is_empty() {
                p.push(
                    "roles",
                    "lists no role; name at least one of spool, filter, relay, access, filer",
                );
            }
            for (i, r) in roles.iter().enumerate() {
                let r = r.trim().to_ascii_lowercase();
                if !ROLES.contains(&r.as_str()) {
                    p.push(
                        format!("roles[{i}]"),
                        format!(
                            "unknown role {r:?}; the roles are spool, filter, relay, access, filer"
                        ),
                    );
                } else if listed.contains(&r) {
                    p.push(format!("roles[{i}]"), format!("role {r:?} is listed twice"));
                } else {
                    listed.push(r);
                }
            }
        }
    }
    move |role| listed.iter().any(|r| r == role)
}

/// On a host that runs only some roles, a service whose peer runs elsewhere needs the peer's
/// address: "the one started here" would silently mean nowhere.
fn check_peers(
    spool: Option<&spool::Settings>,
    relay: Option<&relay::Settings>,
    filter: Option<&filter::Settings>,
    p: &mut Problems,
) {
    if let Some(s) = spool {
        if s.filter == spool::PeerRoute::Local && filter.is_none() {
            p.push(
                "spool.filter",
                "the filter does not run on this host (roles): give its address, or \"none\"",
            );
        }
        if s.relay == spool::PeerRoute::Local && relay.is_none() {
            p.push(
                "spool.relay",
                "the relay does not run on this host (roles): give its internal address, or \"none\"",
            );
        }
    }
    if let Some(r) = relay
        && r.hosted_route.is_none()
        && spool.is_none()
    {
        p.push(
            "relay.hosted_route",
            "the spool does not run on this host (roles): give a spool's address (host:port)",
        );
    }
    if let Some(f) = filter
        && f.reinject.is_none()
        && spool.is_none()
    {
        p.push(
            "filter.reinject",
            "the spool does not run on this host (roles): give a spool's reinjection address",
        );
    }
}

fn check_listen_conflicts(
    admin: Option<std::net::SocketAddr>,
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
    all.push(("admin.listen".to_owned(), admin));
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
    fn roles_choose_the_services_of_a_host() {
        let text = r#"
            roles = ["spool"]
            [spool]
            filter = "192.0.2.20:10024"
            relay = "192.0.2.30:10587"
        "#;
        let s = PlatformSettings::build(&config::parse(text).unwrap()).unwrap();
        assert!(s.spool.is_some());
        assert!(s.filter.is_none() && s.relay.is_none() && s.access.is_none());
        assert!(s.filers.is_empty());

        let text = "roles = [\"filer\", \"access\"]\n[relay]\nenabled = true\n";
        let s = PlatformSettings::build(&config::parse(text).unwrap()).unwrap();
        assert_eq!(s.filers.len(), 2);
        assert!(s.access.is_some() && s.relay.is_none() && s.spool.is_none());

        // No roles: everything enabled runs.
        let s = PlatformSettings::build(&config::parse("").unwrap()).unwrap();
        assert!(s.spool.is_some() && s.filter.is_some() && s.relay.is_some());
    }

    #[test]
    fn roles_are_checked_and_peers_elsewhere_need_addresses() {
        let problems = |text: &str| -> Vec<String> {
            let file: PlatformFile = config::parse(text).unwrap();
            match PlatformSettings::build(&file) {
                Ok(_) => Vec::new(),
                Err(ConfigError::Invalid(p)) => {
                    p.as_slice().iter().map(|(k, _)| k.clone()).collect()
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(
            problems("roles = [\"spool\", \"mx\", \"spool\"]\n"),
            ["roles[1]", "roles[2]", "spool.filter", "spool.relay"]
        );
        assert_eq!(problems("roles = []\n"), ["roles"]);
        assert_eq!(
            problems("roles = [\"relay\", \"filter\"]\n"),
            ["relay.hosted_route", "filter.reinject"]
        );
        let ok = "roles = [\"relay\", \"filter\"]\n[relay]\nhosted_route = \"192.0.2.11:25\"\n\
                  [filter]\nreinject = \"192.0.2.11:10025\"\n";
        assert_eq!(problems(ok), Vec::<String>::new());
        // "none" is an answer too.
        let ok = "roles = [\"spool\"]\n[spool]\nfilter = \"none\"\nrelay = \"none\"\n";
        assert_eq!(problems(ok), Vec::<String>::new());
    }

    #[test]
    fn unknown_section_is_named() {
        let e = config::parse::<PlatformFile>("[filers_typo]\nx = 1\n").unwrap_err();
        assert!(e.contains("filers_typo"), "{e}");
    }
}
