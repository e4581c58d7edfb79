//! The spool's configuration: the `[spool]` section.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::config::{ByteSize, Problems, Shared};
use serde::Deserialize;

/// `[spool]` as written in the TOML file. Every field has a default.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// Whether `mailctl up` runs a spool on this host. Default: true.
    pub enabled: bool,
    /// The MX listener (`address:port`; empty disables it). Default: `127.0.0.1:2525`.
    pub smtp: String,
    /// The reinjection listener for mail coming back from the filter; only
    /// `trust.spool_networks` may connect (empty disables it). Default: `127.0.0.1:10025`.
    pub reinject: String,
    /// The queue directory. Empty: `<data_dir>/spool`.
    pub queue_dir: String,
    /// Largest message accepted (`552 5.3.4` above it). Default: `"25MiB"`.
    pub max_message_size: String,
    /// Most recipients in one transaction; one more is answered `452 4.5.3`. Default: 100.
    pub max_recipients: usize,
    /// Most `Received:` headers a message may carry; at this many (ours would be one more)
    /// it is refused with `554 5.4.6` as a mail loop. Default: 50.
    pub max_hops: usize,
    /// Refused commands after which the session is closed with `421 4.7.0`. Default: 10.
    pub max_errors: u32,
    /// Most concurrent SMTP sessions; one more is answered `421 4.3.2`. Default: 1000.
    pub max_connections: usize,
    /// Most concurrent SMTP sessions from one client address; one more is answered
    /// `421 4.7.0`. Default: 50.
    pub max_connections_per_ip: usize,
    /// How long the spool waits before its greeting; a client that talks first is an early
    /// talker (a spam bot not waiting for the greeting) and is answered `554 5.5.1`. `"0s"`
    /// turns the check off. Not applied on the reinjection listener. Default: `"1s"`.
    pub greet_delay: String,
    /// Time allowed for each command. Default: `"5m"` (RFC 5321 §4.5.3.2.7).
    pub command_timeout: String,
    /// Time allowed for a whole message to arrive (DATA, or one BDAT chunk). Default: `"10m"`.
    pub data_timeout: String,
    /// How long a message may wait in the queue before its pending recipients are bounced.
    /// Recipients held by the platform (mailbox being moved, filer unreachable) never expire.
    /// Default: `"5d"`.
    pub queue_lifetime: String,
    /// The first retry delay; each further retry doubles it. Default: `"1m"`.
    pub retry_min: String,
    /// The longest retry delay. Default: `"1h"`.
    pub retry_max: String,
    /// Most delivery attempts running at once, over all filers. Default: 100.
    pub max_deliveries: usize,
    /// Most concurrent LMTP sessions to one filer. Default: 20.
    pub filer_concurrency: usize,
    /// Time allowed for each LMTP command and reply. Default: `"5m"`.
    pub lmtp_timeout: String,
    /// The content filter (`address:port`) new mail from the MX listener is handed to first;
    /// it comes back on the reinjection listener. Empty: the filter started by the same
    /// `mailctl up`, if any; otherwise mail goes to the filers unfiltered. `"none"`: never
    /// filter. Default: empty.
    pub filter: String,
    /// The relay's internal listener, for mail to other domains (bounces to remote senders,
    /// aliases that forward outside). Empty: the relay started by the same `mailctl up`, if
    /// any; otherwise such mail waits and expires. `"none"`: never. Default: empty.
    pub relay: String,
    /// Offer STARTTLS on the MX listener. Default: true.
    pub starttls: bool,
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            smtp: "127.0.0.1:2525".into(),
            reinject: "127.0.0.1:10025".into(),
            queue_dir: String::new(),
            max_message_size: "25MiB".into(),
            max_recipients: 100,
            max_hops: 50,
            max_errors: 10,
            max_connections: 1000,
            max_connections_per_ip: 50,
            greet_delay: "1s".into(),
            command_timeout: "5m".into(),
            data_timeout: "10m".into(),
            queue_lifetime: "5d".into(),
            retry_min: "1m".into(),
            retry_max: "1h".into(),
            max_deliveries: 100,
            filer_concurrency: 20,
            lmtp_timeout: "5m".into(),
            filter: String::new(),
            relay: String::new(),
            starttls: true,
        }
    }
}

/// Where the spool hands mail to another service of the platform (the filter, the relay).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRoute {
    /// Nowhere.
    None,
    /// The one of the same `mailctl up` (resolved to [`PeerRoute::At`] when it starts; with
    /// none there, like `None`).
    Local,
    /// At this address.
    At(SocketAddr),
}

impl PeerRoute {
    fn parse(value: &str, key: &str, problems: &mut Problems) -> Self {
        match value.trim() {
            "" => Self::Local,
            "none" => Self::None,
            addr => match addr.parse::<SocketAddr>() {
                Ok(a) => Self::At(a),
                Err(_) => {
                    problems.push(key, "must be address:port, \"none\" or empty");
                    Self::None
                }
            },
        }
    }

    /// The address, when there is one.
    pub fn address(self) -> Option<SocketAddr> {
        match self {
            Self::At(a) => Some(a),
            Self::None | Self::Local => None,
        }
    }
}

/// The spool's validated settings. See [`FileConfig`] for each field's meaning and default.
#[derive(Debug, Clone)]
pub struct Settings {
    /// MX listen address.
    pub smtp: Option<SocketAddr>,
    /// Reinjection listen address.
    pub reinject: Option<SocketAddr>,
    /// The queue directory.
    pub queue_dir: PathBuf,
    /// Largest message.
    pub max_message_size: ByteSize,
    /// Most recipients per transaction.
    pub max_recipients: usize,
    /// Most `Received:` headers.
    pub max_hops: usize,
    /// Refused commands before the session is closed.
    pub max_errors: u32,
    /// Most concurrent SMTP sessions.
    pub max_connections: usize,
    /// Most concurrent SMTP sessions per client address.
    pub max_connections_per_ip: usize,
    /// Pause before the greeting (early-talker check); zero for none.
    pub greet_delay: Duration,
    /// Time for each command.
    pub command_timeout: Duration,
    /// Time for a whole message to arrive (DATA, or one BDAT chunk).
    pub data_timeout: Duration,
    /// Queue lifetime.
    pub queue_lifetime: Duration,
    /// First retry delay.
    pub retry_min: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Most delivery attempts at once.
    pub max_deliveries: usize,
    /// Most LMTP sessions per filer.
    pub filer_concurrency: usize,
    /// LMTP command/reply timeout.
    pub lmtp_timeout: Duration,
    /// Where new mail is filtered.
    pub filter: PeerRoute,
    /// Where mail for other domains goes.
    pub relay: PeerRoute,
    /// Offer STARTTLS.
    pub starttls: bool,
    /// What every service shares.
    pub shared: Shared,
}

impl Settings {
    /// Validates the section; `key` is its path (`spool`).
    pub fn build(file: &FileConfig, key: &str, shared: &Shared, problems: &mut Problems) -> Self {
        let k = |field: &str| format!("{key}.{field}");
        let queue_dir = if file.queue_dir.trim().is_empty() {
            shared.data_dir.join("spool")
        } else {
            PathBuf::from(file.queue_dir.trim())
        };
        for (field, value) in [
            ("max_recipients", file.max_recipients),
            ("max_hops", file.max_hops),
            ("max_connections", file.max_connections),
            ("max_connections_per_ip", file.max_connections_per_ip),
            ("max_deliveries", file.max_deliveries),
            ("filer_concurrency", file.filer_concurrency),
        ] {
            if value == 0 {
                problems.push(k(field), "must be greater than zero");
            }
        }
        if file.max_errors == 0 {
            problems.push(k("max_errors"), "must be greater than zero");
        }
        let filter = PeerRoute::parse(&file.filter, &k("filter"), problems);
        let relay = PeerRoute::parse(&file.relay, &k("relay"), problems);
        let retry_min = problems.duration(&k("retry_min"), &file.retry_min, true);
        let retry_max = problems.duration(&k("retry_max"), &file.retry_max, true);
        if retry_max < retry_min {
            problems.push(k("retry_max"), "must not be shorter than retry_min");
        }
        Self {
            smtp: problems.listen(&k("smtp"), &file.smtp),
            reinject: problems.listen(&k("reinject"), &file.reinject),
            queue_dir,
            max_message_size: problems.size(&k("max_message_size"), &file.max_message_size),
            max_recipients: file.max_recipients,
            max_hops: file.max_hops,
            max_errors: file.max_errors,
            max_connections: file.max_connections,
            max_connections_per_ip: file.max_connections_per_ip,
            greet_delay: problems.duration(&k("greet_delay"), &file.greet_delay, false),
            command_timeout: problems.duration(&k("command_timeout"), &file.command_timeout, true),
            data_timeout: problems.duration(&k("data_timeout"), &file.data_timeout, true),
            queue_lifetime: problems.duration(&k("queue_lifetime"), &file.queue_lifetime, true),
            retry_min,
            retry_max,
            max_deliveries: file.max_deliveries,
            filer_concurrency: file.filer_concurrency,
            lmtp_timeout: problems.duration(&k("lmtp_timeout"), &file.lmtp_timeout, true),
            filter,
            relay,
            starttls: file.starttls,
            shared: shared.clone(),
        }
    }

    /// The defaults over `shared`, with test-friendly timings: no greeting delay and retries
    /// after 100 ms to 1 s. Tests override fields with struct-update syntax.
    pub fn for_tests(shared: &Shared) -> Self {
        let mut p = Problems::new();
        let s = Self::build(&FileConfig::default(), "spool", shared, &mut p);
        Self {
            greet_delay: Duration::ZERO,
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(1),
            lmtp_timeout: Duration::from_secs(10),
            ..s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_problems_have_keys() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Shared::for_tests(dir.path());
        let mut p = Problems::new();
        let s = Settings::build(&FileConfig::default(), "spool", &shared, &mut p);
        assert!(p.is_empty(), "{p}");
        assert_eq!(s.queue_dir, dir.path().join("spool"));
        assert_eq!(s.queue_lifetime, Duration::from_secs(5 * 86400));
        let bad = FileConfig {
            smtp: "x".into(),
            max_recipients: 0,
            retry_min: "2h".into(),
            filter: "10024".into(),
            ..FileConfig::default()
        };
        let mut p = Problems::new();
        Settings::build(&bad, "spool", &shared, &mut p);
        let keys: Vec<&str> = p.as_slice().iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "spool.max_recipients",
                "spool.filter",
                "spool.retry_max",
                "spool.smtp"
            ]
        );
    }
}
