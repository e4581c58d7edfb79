//! The relay's configuration: the `[relay]` section.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::config::{ByteSize, Problems, Shared};
use common::throttle::ThrottleSettings;
use serde::Deserialize;

/// `[relay]` as written in the TOML file. Every field has a default.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// Whether `mailctl up` runs a relay on this host. Default: true.
    pub enabled: bool,
    /// The submission listener with STARTTLS (port 587 in production; empty disables it).
    /// Default: `127.0.0.1:2587`.
    pub submission: String,
    /// The submission listener with implicit TLS (port 465 in production, RFC 8314; empty
    /// disables it). Default: `127.0.0.1:2465`.
    pub submissions: String,
    /// The internal listener: mail for other domains from the spools (bounces, forwarding
    /// aliases), `trust.spool_networks` only, no AUTH (empty disables it). Default:
    /// `127.0.0.1:10587`.
    pub internal: String,
    /// Allow AUTH without TLS from loopback clients; only with `platform.dev_mode`, so a
    /// mail client on the developer's machine works without a certificate. Default: true.
    pub plaintext_on_loopback: bool,
    /// The queue directory. Empty: `<data_dir>/relay`.
    pub queue_dir: String,
    /// DKIM keys, one `<domain>.<selector>.key` per signing domain (see `mailctl dkim`).
    /// Empty: `<data_dir>/dkim`.
    pub dkim_dir: String,
    /// Largest message accepted (`552 5.3.4` above it). Default: `"25MiB"`.
    pub max_message_size: String,
    /// Most recipients in one message; one more is answered `452 4.5.3`. Default: 100.
    pub max_recipients: usize,
    /// Most messages one user may submit per hour; past it MAIL is answered `450 4.7.1`.
    /// Default: 500.
    pub messages_per_hour: usize,
    /// Most `Received:` headers a message may carry before it is refused as a loop.
    /// Default: 50.
    pub max_hops: usize,
    /// Refused commands after which the session is closed with `421 4.7.0`. Default: 10.
    pub max_errors: u32,
    /// Failed AUTH attempts on one connection after which it is closed. Default: 3.
    pub max_auth_failures: u32,
    /// Most concurrent sessions; one more is answered `421 4.3.2`. Default: 500.
    pub max_connections: usize,
    /// Most argon2 password verifications at once. Default: 4.
    pub argon2_concurrency: usize,
    /// Delay of the answer to the first failed AUTH from an address or for an account; it
    /// doubles with each further failure. Default: `"250ms"`.
    pub login_delay: String,
    /// The longest such delay. Default: `"15s"`.
    pub login_delay_max: String,
    /// Failures are forgotten this long after the last one. Default: `"15m"`.
    pub login_failure_window: String,
    /// Time allowed for each command. Default: `"5m"`.
    pub command_timeout: String,
    /// Time allowed for a whole message to arrive. Default: `"10m"`.
    pub data_timeout: String,
    /// How long a message may wait before its pending recipients are bounced. Default: `"5d"`.
    pub queue_lifetime: String,
    /// The first retry delay; each further retry doubles it. Default: `"1m"`.
    pub retry_min: String,
    /// The longest retry delay. Default: `"1h"`.
    pub retry_max: String,
    /// Most delivery attempts running at once. Default: 100.
    pub max_deliveries: usize,
    /// Most SMTP sessions at once to one destination domain (Postfix's
    /// `default_destination_concurrency_limit`). Default: 20.
    pub destination_concurrency: usize,
    /// Time allowed to connect to a next hop. Default: `"30s"`.
    pub connect_timeout: String,
    /// Time allowed for each SMTP command and reply to a next hop. Default: `"5m"`.
    pub smtp_timeout: String,
    /// Where mail for hosted domains goes: a spool's MX listener (`host:port`). Empty: the
    /// spool started by the same `mailctl up`. Default: empty.
    pub hosted_route: String,
    /// Routes that override DNS: a domain (or `*` for every other domain: a smarthost) to
    /// `host:port`. Default: none.
    pub routes: BTreeMap<String, String>,
    /// Use STARTTLS to next hops that offer it, without checking their certificates
    /// (opportunistic, RFC 7435). Default: true.
    pub starttls_outbound: bool,
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            submission: "127.0.0.1:2587".into(),
            submissions: "127.0.0.1:2465".into(),
            internal: "127.0.0.1:10587".into(),
            plaintext_on_loopback: true,
            queue_dir: String::new(),
            dkim_dir: String::new(),
            max_message_size: "25MiB".into(),
            max_recipients: 100,
            messages_per_hour: 500,
            max_hops: 50,
            max_errors: 10,
            max_auth_failures: 3,
            max_connections: 500,
            argon2_concurrency: 4,
            login_delay: "250ms".into(),
            login_delay_max: "15s".into(),
            login_failure_window: "15m".into(),
            command_timeout: "5m".into(),
            data_timeout: "10m".into(),
            queue_lifetime: "5d".into(),
            retry_min: "1m".into(),
            retry_max: "1h".into(),
            max_deliveries: 100,
            destination_concurrency: 20,
            connect_timeout: "30s".into(),
            smtp_timeout: "5m".into(),
            hosted_route: String::new(),
            routes: BTreeMap::new(),
            starttls_outbound: true,
        }
    }
}

/// Where a domain's mail goes instead of its MX.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// A host name or an IP address.
    pub host: String,
    /// The port.
    pub port: u16,
}

impl Route {
    fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Some(Self {
                host: addr.ip().to_string(),
                port: addr.port(),
            });
        }
        let (host, port) = s.rsplit_once(':')?;
        let port = port.parse().ok()?;
        let host_ok = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        host_ok.then(|| Self {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

/// The relay's validated settings. See [`FileConfig`] for each field's meaning and default.
#[derive(Debug, Clone)]
pub struct Settings {
    /// STARTTLS submission listen address.
    pub submission: Option<SocketAddr>,
    /// Implicit-TLS submission listen address.
    pub submissions: Option<SocketAddr>,
    /// Internal listen address (from the spools).
    pub internal: Option<SocketAddr>,
    /// AUTH without TLS from loopback clients (only true when `platform.dev_mode` is on too).
    pub plaintext_on_loopback: bool,
    /// The queue directory.
    pub queue_dir: PathBuf,
    /// The DKIM key directory.
    pub dkim_dir: PathBuf,
    /// Largest message.
    pub max_message_size: ByteSize,
    /// Most recipients per message.
    pub max_recipients: usize,
    /// Most messages per user per hour.
    pub messages_per_hour: usize,
    /// Most `Received:` headers.
    pub max_hops: usize,
    /// Refused commands before the session is closed.
    pub max_errors: u32,
    /// Failed AUTHs before the session is closed.
    pub max_auth_failures: u32,
    /// Most concurrent sessions.
    pub max_connections: usize,
    /// Most argon2 verifications at once.
    pub argon2_concurrency: usize,
    /// Failed-login delays.
    pub throttle: ThrottleSettings,
    /// Time for each command.
    pub command_timeout: Duration,
    /// Time for a whole message to arrive.
    pub data_timeout: Duration,
    /// Queue lifetime.
    pub queue_lifetime: Duration,
    /// First retry delay.
    pub retry_min: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Most delivery attempts at once.
    pub max_deliveries: usize,
    /// Most sessions to one destination domain.
    pub destination_concurrency: usize,
    /// Connect timeout to next hops.
    pub connect_timeout: Duration,
    /// Command/reply timeout to next hops.
    pub smtp_timeout: Duration,
    /// The spool that takes mail for hosted domains (`None`: none known; such mail waits).
    pub hosted_route: Option<Route>,
    /// Domain (lower case, or `*`) to route.
    pub routes: BTreeMap<String, Route>,
    /// Opportunistic STARTTLS to next hops.
    pub starttls_outbound: bool,
    /// What every service shares.
    pub shared: Shared,
}

impl Settings {
    /// Validates the section; `key` is its path (`relay`).
    pub fn build(file: &FileConfig, key: &str, shared: &Shared, problems: &mut Problems) -> Self {
        let k = |field: &str| format!("{key}.{field}");
        let dir = |value: &str, default: &str| {
            if value.trim().is_empty() {
                shared.data_dir.join(default)
            } else {
                PathBuf::from(value.trim())
            }
        };
        for (field, value) in [
            ("max_recipients", file.max_recipients),
            ("messages_per_hour", file.messages_per_hour),
            ("max_hops", file.max_hops),
            ("max_connections", file.max_connections),
            ("argon2_concurrency", file.argon2_concurrency),
            ("max_deliveries", file.max_deliveries),
            ("destination_concurrency", file.destination_concurrency),
        ] {
            if value == 0 {
                problems.push(k(field), "must be greater than zero");
            }
        }
        for (field, value) in [
            ("max_errors", file.max_errors),
            ("max_auth_failures", file.max_auth_failures),
        ] {
            if value == 0 {
                problems.push(k(field), "must be greater than zero");
            }
        }
        let retry_min = problems.duration(&k("retry_min"), &file.retry_min, true);
        let retry_max = problems.duration(&k("retry_max"), &file.retry_max, true);
        if retry_max < retry_min {
            problems.push(k("retry_max"), "must not be shorter than retry_min");
        }
        let hosted_route = if file.hosted_route.trim().is_empty() {
            None
        } else {
            let r = Route::parse(&file.hosted_route);
            if r.is_none() {
                problems.push(k("hosted_route"), "must be host:port");
            }
            r
        };
        let mut routes = BTreeMap::new();
        for (domain, target) in &file.routes {
            let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
            let domain_ok = domain == "*"
                || common::address::Domain::parse(&domain).is_ok_and(|d| !d.is_literal());
            match Route::parse(target) {
                Some(route) if domain_ok => {
                    routes.insert(domain, route);
                }
                Some(_) => problems.push(
                    k(&format!("routes.{domain}")),
                    "must be a domain name or \"*\"",
                ),
                None => problems.push(k(&format!("routes.{domain}")), "must be host:port"),
            }
        }
        Self {
            submission: problems.listen(&k("submission"), &file.submission),
            submissions: problems.listen(&k("submissions"), &file.submissions),
            internal: problems.listen(&k("internal"), &file.internal),
            plaintext_on_loopback: file.plaintext_on_loopback && shared.dev_mode,
            queue_dir: dir(&file.queue_dir, "relay"),
            dkim_dir: dir(&file.dkim_dir, "dkim"),
            max_message_size: problems.size(&k("max_message_size"), &file.max_message_size),
            max_recipients: file.max_recipients,
            messages_per_hour: file.messages_per_hour,
            max_hops: file.max_hops,
            max_errors: file.max_errors,
            max_auth_failures: file.max_auth_failures,
            max_connections: file.max_connections,
            argon2_concurrency: file.argon2_concurrency,
            throttle: ThrottleSettings {
                base_delay: problems.duration(&k("login_delay"), &file.login_delay, true),
                max_delay: problems.duration(&k("login_delay_max"), &file.login_delay_max, true),
                window: problems.duration(
                    &k("login_failure_window"),
                    &file.login_failure_window,
                    true,
                ),
            },
            command_timeout: problems.duration(&k("command_timeout"), &file.command_timeout, true),
            data_timeout: problems.duration(&k("data_timeout"), &file.data_timeout, true),
            queue_lifetime: problems.duration(&k("queue_lifetime"), &file.queue_lifetime, true),
            retry_min,
            retry_max,
            max_deliveries: file.max_deliveries,
            destination_concurrency: file.destination_concurrency,
            connect_timeout: problems.duration(&k("connect_timeout"), &file.connect_timeout, true),
            smtp_timeout: problems.duration(&k("smtp_timeout"), &file.smtp_timeout, true),
            hosted_route,
            routes,
            starttls_outbound: file.starttls_outbound,
            shared: shared.clone(),
        }
    }

    /// The defaults over `shared` with test-friendly timings: listeners on ephemeral loopback
    /// ports, retries after 100 ms to 1 s, short login delays. Tests override fields with
    /// struct-update syntax.
    pub fn for_tests(shared: &Shared) -> Self {
        let mut p = Problems::new();
        let s = Self::build(&FileConfig::default(), "relay", shared, &mut p);
        let port0 = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        Self {
            submission: port0,
            submissions: port0,
            internal: port0,
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(1),
            smtp_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            throttle: ThrottleSettings {
                base_delay: Duration::from_millis(5),
                max_delay: Duration::from_millis(50),
                ..s.throttle
            },
            ..s
        }
    }

    /// The configured route for `domain`: its own, else `*` (the transport puts hosted
    /// domains between the two).
    pub fn route_for(&self, domain: &str) -> Option<&Route> {
        self.routes.get(domain).or_else(|| self.routes.get("*"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_routes_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Shared::for_tests(dir.path());
        let mut p = Problems::new();
        let s = Settings::build(&FileConfig::default(), "relay", &shared, &mut p);
        assert!(p.is_empty(), "{p}");
        assert_eq!(s.queue_dir, dir.path().join("relay"));
        assert_eq!(s.dkim_dir, dir.path().join("dkim"));
        let file = FileConfig {
            routes: BTreeMap::from([
                ("Example.COM".into(), "127.0.0.1:2526".into()),
                ("*".into(), "smarthost.example.net:587".into()),
                ("bad..domain".into(), "127.0.0.1:1".into()),
                ("example.org".into(), "no-port".into()),
            ]),
            max_recipients: 0,
            ..FileConfig::default()
        };
        let mut p = Problems::new();
        let s = Settings::build(&file, "relay", &shared, &mut p);
        let keys: Vec<&str> = p.as_slice().iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "relay.max_recipients",
                "relay.routes.bad..domain",
                "relay.routes.example.org"
            ]
        );
        assert_eq!(
            s.route_for("example.com"),
            Some(&Route {
                host: "127.0.0.1".into(),
                port: 2526
            })
        );
        assert_eq!(
            s.route_for("other.test").map(|r| r.host.as_str()),
            Some("smarthost.example.net")
        );
    }
}
