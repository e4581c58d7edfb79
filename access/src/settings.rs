//! The proxy's configuration: the `[access]` section.

use std::net::SocketAddr;
use std::time::Duration;

use common::config::{Problems, Shared};
use common::throttle::ThrottleSettings;
use serde::Deserialize;

use crate::health::BreakerSettings;

/// `[access]` as written in the TOML file. Every field has a default.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// Whether `mailctl up` runs the proxy on this host. Default: true.
    pub enabled: bool,
    /// IMAP with STARTTLS (`address:port`; empty disables it). Default: `127.0.0.1:1143`.
    pub imap: String,
    /// IMAP over implicit TLS (empty disables it). Default: `127.0.0.1:1993`.
    pub imaps: String,
    /// POP3 with STLS (empty disables it). Default: `127.0.0.1:1110`.
    pub pop3: String,
    /// POP3 over implicit TLS (empty disables it). Default: `127.0.0.1:1995`.
    pub pop3s: String,
    /// Development convenience: allow logins without TLS on listeners bound to a loopback
    /// address, from loopback clients, when `platform.dev_mode` is on. Elsewhere a login
    /// before TLS is refused (`LOGINDISABLED`, `NO [PRIVACYREQUIRED]`, POP3 `-ERR [AUTH]`).
    /// Default: true.
    pub plaintext_on_loopback: bool,
    /// Most concurrent client connections (logged in or not); one more is answered
    /// `* BYE [UNAVAILABLE]` / `-ERR [SYS/TEMP]` and closed. Default: 10000.
    pub max_connections: usize,
    /// How long a client may stay silent before logging in; then `* BYE` and close.
    /// Default: `"60s"`.
    pub prelogin_timeout: String,
    /// How long a connection may take to log in at all, however busy it keeps. Default:
    /// `"5m"`.
    pub prelogin_lifetime: String,
    /// Refused commands before login after which the connection is closed. Default: 5.
    pub max_bad_commands: u32,
    /// Failed logins on one connection after which it is closed. Default: 3.
    pub max_auth_failures: u32,
    /// Largest IMAP literal accepted before login (a bigger synchronising literal is refused
    /// before it is sent; a bigger non-synchronising one closes the connection). Default:
    /// `"8KiB"`.
    pub max_literal: String,
    /// Most argon2 password verifications at once (each takes ~19 MiB and ~50 ms of a core);
    /// further logins wait. Default: 4.
    pub argon2_concurrency: usize,
    /// Delay of the answer to the first failed login from an address or for an account; it
    /// doubles with each further failure. Default: `"250ms"`.
    pub login_delay: String,
    /// The longest such delay. Default: `"15s"`.
    pub login_delay_max: String,
    /// Failures are forgotten this long after the last one. Default: `"15m"`.
    pub login_failure_window: String,
    /// Time allowed to connect to a filer; past it the client is answered
    /// `NO [UNAVAILABLE]` / `-ERR [SYS/TEMP]`. Default: `"2s"`.
    pub filer_connect_timeout: String,
    /// Time allowed for the filer's greeting and the trusted login. Default: `"5s"`.
    pub filer_login_timeout: String,
    /// Connection failures to one filer, from this many distinct client connections within
    /// `filer_failure_window`, mark it down: logins for its mailboxes are then answered at
    /// once, without a connection attempt. Default: 3.
    pub filer_failure_threshold: u32,
    /// See `filer_failure_threshold`. Default: `"30s"`.
    pub filer_failure_window: String,
    /// How long a filer stays marked down before one login is let through as a probe; its
    /// success marks the filer up again. Default: `"5s"`.
    pub filer_cooldown: String,
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            imap: "127.0.0.1:1143".into(),
            imaps: "127.0.0.1:1993".into(),
            pop3: "127.0.0.1:1110".into(),
            pop3s: "127.0.0.1:1995".into(),
            plaintext_on_loopback: true,
            max_connections: 10_000,
            prelogin_timeout: "60s".into(),
            prelogin_lifetime: "5m".into(),
            max_bad_commands: 5,
            max_auth_failures: 3,
            max_literal: "8KiB".into(),
            argon2_concurrency: 4,
            login_delay: "250ms".into(),
            login_delay_max: "15s".into(),
            login_failure_window: "15m".into(),
            filer_connect_timeout: "2s".into(),
            filer_login_timeout: "5s".into(),
            filer_failure_threshold: 3,
            filer_failure_window: "30s".into(),
            filer_cooldown: "5s".into(),
        }
    }
}

/// The proxy's validated settings. See [`FileConfig`] for each field's meaning and default.
#[derive(Debug, Clone)]
pub struct Settings {
    /// IMAP (STARTTLS) listen address.
    pub imap: Option<SocketAddr>,
    /// IMAP implicit-TLS listen address.
    pub imaps: Option<SocketAddr>,
    /// POP3 (STLS) listen address.
    pub pop3: Option<SocketAddr>,
    /// POP3 implicit-TLS listen address.
    pub pop3s: Option<SocketAddr>,
    /// Plaintext logins on loopback listeners from loopback clients (only true when
    /// `platform.dev_mode` is on too).
    pub plaintext_on_loopback: bool,
    /// Most concurrent connections.
    pub max_connections: usize,
    /// Idle time allowed before login.
    pub prelogin_timeout: Duration,
    /// Total time allowed before login.
    pub prelogin_lifetime: Duration,
    /// Refused commands before the connection is closed.
    pub max_bad_commands: u32,
    /// Failed logins before the connection is closed.
    pub max_auth_failures: u32,
    /// Largest IMAP literal before login, in bytes.
    pub max_literal: u32,
    /// Most argon2 verifications at once.
    pub argon2_concurrency: usize,
    /// Growing delays of failed logins.
    pub throttle: ThrottleSettings,
    /// Connect timeout towards filers.
    pub filer_connect_timeout: Duration,
    /// Greeting and trusted-login timeout towards filers.
    pub filer_login_timeout: Duration,
    /// When a filer is marked down, and for how long.
    pub breaker: BreakerSettings,
    /// What every service shares.
    pub shared: Shared,
}

impl Settings {
    /// Validates the section; `key` is its path (`access`).
    pub fn build(file: &FileConfig, key: &str, shared: &Shared, problems: &mut Problems) -> Self {
        let k = |field: &str| format!("{key}.{field}");
        for (field, value) in [
            ("max_connections", file.max_connections),
            ("argon2_concurrency", file.argon2_concurrency),
        ] {
            if value == 0 {
                problems.push(k(field), "must be greater than zero");
            }
        }
        for (field, value) in [
            ("max_bad_commands", file.max_bad_commands),
            ("max_auth_failures", file.max_auth_failures),
            ("filer_failure_threshold", file.filer_failure_threshold),
        ] {
            if value == 0 {
                problems.push(k(field), "must be greater than zero");
            }
        }
        let literal = problems.size(&k("max_literal"), &file.max_literal);
        let max_literal = match u32::try_from(literal.bytes()) {
            Ok(n) if n <= MAX_LITERAL_LIMIT => n,
            _ => {
                problems.push(
                    k("max_literal"),
                    format!("must be at most {MAX_LITERAL_LIMIT} bytes before login"),
                );
                MAX_LITERAL_LIMIT
            }
        };
        let login_delay = problems.duration(&k("login_delay"), &file.login_delay, false);
        let login_delay_max =
            problems.duration(&k("login_delay_max"), &file.login_delay_max, false);
        if login_delay_max < login_delay {
            problems.push(k("login_delay_max"), "must not be shorter than login_delay");
        }
        Self {
            imap: problems.listen(&k("imap"), &file.imap),
            imaps: problems.listen(&k("imaps"), &file.imaps),
            pop3: problems.listen(&k("pop3"), &file.pop3),
            pop3s: problems.listen(&k("pop3s"), &file.pop3s),
            plaintext_on_loopback: file.plaintext_on_loopback && shared.dev_mode,
            max_connections: file.max_connections,
            prelogin_timeout: problems.duration(
                &k("prelogin_timeout"),
                &file.prelogin_timeout,
                true,
            ),
            prelogin_lifetime: problems.duration(
                &k("prelogin_lifetime"),
                &file.prelogin_lifetime,
                true,
            ),
            max_bad_commands: file.max_bad_commands,
            max_auth_failures: file.max_auth_failures,
            max_literal,
            argon2_concurrency: file.argon2_concurrency,
            throttle: ThrottleSettings {
                base_delay: login_delay,
                max_delay: login_delay_max,
                window: problems.duration(
                    &k("login_failure_window"),
                    &file.login_failure_window,
                    true,
                ),
            },
            filer_connect_timeout: problems.duration(
                &k("filer_connect_timeout"),
                &file.filer_connect_timeout,
                true,
            ),
            filer_login_timeout: problems.duration(
                &k("filer_login_timeout"),
                &file.filer_login_timeout,
                true,
            ),
            breaker: BreakerSettings {
                threshold: file.filer_failure_threshold,
                window: problems.duration(
                    &k("filer_failure_window"),
                    &file.filer_failure_window,
                    true,
                ),
                cooldown: problems.duration(&k("filer_cooldown"), &file.filer_cooldown, true),
            },
            shared: shared.clone(),
        }
    }

    /// The defaults over `shared` with test-friendly values: every listener on port 0, login
    /// delays of a few milliseconds. Tests override fields with struct-update syntax.
    pub fn for_tests(shared: &Shared) -> Self {
        let mut p = Problems::new();
        let s = Self::build(&FileConfig::default(), "access", shared, &mut p);
        let port0: Option<SocketAddr> = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        Self {
            imap: port0,
            imaps: port0,
            pop3: port0,
            pop3s: port0,
            throttle: ThrottleSettings {
                base_delay: Duration::from_millis(5),
                max_delay: Duration::from_millis(50),
                ..s.throttle
            },
            ..s
        }
    }

    /// Every listen address the settings enable, with its protocol name.
    pub fn listen_addresses(&self) -> [(&'static str, Option<SocketAddr>); 4] {
        [
            ("imap", self.imap),
            ("imaps", self.imaps),
            ("pop3", self.pop3),
            ("pop3s", self.pop3s),
        ]
    }
}

/// The largest literal that may be allowed before login.
const MAX_LITERAL_LIMIT: u32 = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_problems_have_keys() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Shared::for_tests(dir.path());
        let mut p = Problems::new();
        let s = Settings::build(&FileConfig::default(), "access", &shared, &mut p);
        assert!(p.is_empty(), "{p}");
        assert_eq!(s.imap, Some("127.0.0.1:1143".parse().unwrap()));
        assert_eq!(s.filer_connect_timeout, Duration::from_secs(2));
        assert_eq!(s.max_literal, 8192);
        assert!(s.plaintext_on_loopback, "dev mode");
        let bad = FileConfig {
            imaps: "nowhere".into(),
            max_bad_commands: 0,
            max_literal: "1GiB".into(),
            login_delay: "1m".into(),
            filer_cooldown: "0s".into(),
            ..FileConfig::default()
        };
        let mut p = Problems::new();
        Settings::build(&bad, "access", &shared, &mut p);
        let keys: Vec<&str> = p.as_slice().iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "access.max_bad_commands",
                "access.max_literal",
                "access.login_delay_max",
                "access.imaps",
                "access.filer_cooldown"
            ]
        );
    }

    #[test]
    fn plaintext_needs_dev_mode() {
        let dir = tempfile::tempdir().unwrap();
        let mut shared = Shared::for_tests(dir.path());
        shared.dev_mode = false;
        let mut p = Problems::new();
        let s = Settings::build(&FileConfig::default(), "access", &shared, &mut p);
        assert!(!s.plaintext_on_loopback);
    }
}
