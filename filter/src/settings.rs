//! The filter's configuration: the `[filter]` section.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::config::{ByteSize, Problems, Shared};
use serde::Deserialize;

/// The checks, by name, in their default order.
pub const CHECKS: [&str; 7] = [
    "lists",
    "headers",
    "auth",
    "dnsbl",
    "rules",
    "classifier",
    "size",
];

/// `[filter]` as written in the TOML file. Every field has a default.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// Whether `mailctl up` runs a filter on this host. Default: true.
    pub enabled: bool,
    /// The listener for spools (`trust.spool_networks` only). Default: `127.0.0.1:10024`.
    pub listen: String,
    /// A spool's reinjection listener, where filtered mail goes back. Empty: the spool of
    /// the same `mailctl up`. Default: empty.
    pub reinject: String,
    /// The checks to run, in order (any of `lists`, `headers`, `auth` (SPF, DKIM, DMARC),
    /// `dnsbl`, `rules`, `classifier`, `size`). Default: all of them.
    pub checks: Vec<String>,
    /// Score at which a message is tagged as spam (`X-Spam-Flag: YES`; the filer files it
    /// into Junk). Default: 5.0.
    pub tag_score: f64,
    /// Score at which a message is quarantined (rerouted to `quarantine`); 0 turns
    /// quarantine off. Default: 15.0.
    pub quarantine_score: f64,
    /// The mailbox quarantined mail goes to (a hosted address). Empty: quarantine off.
    pub quarantine: String,
    /// DNS block lists queried with the client address (from XFORWARD), each with its score,
    /// e.g. `{ "zen.spamhaus.org" = 5.0 }`. Default: none.
    pub dnsbl: BTreeMap<String, f64>,
    /// Use DNS for SPF, DKIM, DMARC and DNSBL. Off: those checks answer from static records
    /// only (`none`), for tests and hosts without DNS. Default: on, except in
    /// `platform.dev_mode` (a developer's machine may have no resolver, and every message
    /// would wait for DNS timeouts).
    pub network_checks: Option<bool>,
    /// Content rules, in order.
    pub rules: Vec<RuleFile>,
    /// The classifier's model file (`mailctl filter train`). Empty: `<data_dir>/filter/model.json`.
    pub model: String,
    /// Score added at the classifier's top spam probability; scaled down to 0 at 0.5 and
    /// negative (down to minus this) for ham. Default: 6.0.
    pub classifier_score: f64,
    /// Senders (address, `@domain` or `*@domain`) always passed or always tagged, for every
    /// recipient; per-domain and per-user lists are in `lists`.
    pub allow: Vec<String>,
    /// See `allow`.
    pub block: Vec<String>,
    /// Per-recipient-domain (`example.com`) or per-user (`alice@example.com`) allow and
    /// block lists.
    pub lists: BTreeMap<String, ListFile>,
    /// Largest message scanned in full; past it only the headers and the first part are.
    /// Default: `"10MiB"`.
    pub max_scan_size: String,
    /// Most MIME parts looked at. Default: 200.
    pub max_parts: usize,
    /// Deepest MIME nesting looked at. Default: 20.
    pub max_depth: usize,
    /// Most header fields. Default: 1000.
    pub max_headers: usize,
    /// Largest header section. Default: `"1MiB"`.
    pub max_header_size: String,
    /// Largest message taken from a spool. Default: `"50MiB"`.
    pub max_message_size: String,
    /// Time allowed for each command and data read. Default: `"5m"`.
    pub timeout: String,
    /// Time allowed for the reinjection. Default: `"2m"`.
    pub reinject_timeout: String,
}

/// One content rule.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    /// Its name, shown in `X-Spam-Status`.
    pub name: String,
    /// A header field name to match, or `"body"` for the message text.
    pub field: String,
    /// A regular expression (Rust `regex` syntax; `(?i)` for case-insensitive).
    pub pattern: String,
    /// Score added on a match (negative for ham signs).
    pub score: f64,
}

/// An allow/block list.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ListFile {
    /// Senders always passed.
    pub allow: Vec<String>,
    /// Senders always tagged as spam.
    pub block: Vec<String>,
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:10024".into(),
            reinject: String::new(),
            checks: CHECKS.iter().map(|s| (*s).to_owned()).collect(),
            tag_score: 5.0,
            quarantine_score: 15.0,
            quarantine: String::new(),
            dnsbl: BTreeMap::new(),
            network_checks: None,
            rules: default_rules(),
            model: String::new(),
            classifier_score: 6.0,
            allow: Vec::new(),
            block: Vec::new(),
            lists: BTreeMap::new(),
            max_scan_size: "10MiB".into(),
            max_parts: 200,
            max_depth: 20,
            max_headers: 1000,
            max_header_size: "1MiB".into(),
            max_message_size: "50MiB".into(),
            timeout: "5m".into(),
            reinject_timeout: "2m".into(),
        }
    }
}

/// A few rules every installation wants; operators add their own.
fn default_rules() -> Vec<RuleFile> {
    let rule = |name: &str, field: &str, pattern: &str, score: f64| RuleFile {
        name: name.into(),
        field: field.into(),
        pattern: pattern.into(),
        score,
    };
    vec![
        // The Generic Test for Unsolicited Bulk Email: a message that must always be spam.
        rule(
            "GTUBE",
            "body",
            r"XJS\*C4JDBQADN1\.NSBN3\*2IDNEN\*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL\*C\.34X",
            1000.0,
        ),
        rule(
            "SUBJ_ALL_CAPS",
            "Subject",
            r"^[^a-z]*[A-Z]{4,}[^a-z]*[A-Z]{4,}[^a-z]*$",
            1.0,
        ),
        rule(
            "SUBJ_MONEY",
            "Subject",
            r"(?i)(\$\s?\d[\d,.]*\s*(million|billion)|lottery|you have won|claim your prize)",
            2.5,
        ),
        rule(
            "BODY_NIGERIAN",
            "body",
            r"(?i)(next of kin|beneficiary of the (fund|sum)|transfer of \$?\d+(\.\d+)? million)",
            3.0,
        ),
        rule(
            "BODY_PHARMA",
            "body",
            r"(?i)\b(viagra|cialis|levitra|xanax|valium)\b",
            2.5,
        ),
    ]
}

/// A sender pattern: a whole address, or a whole domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderPattern {
    /// `user@example.com` (compared without case).
    Address(String),
    /// `@example.com` or `*@example.com`.
    Domain(String),
}

impl SenderPattern {
    fn parse(s: &str) -> Option<Self> {
        let s = s.trim().to_ascii_lowercase();
        let domain = s.strip_prefix("*@").or_else(|| s.strip_prefix('@'));
        match domain {
            Some(d) if !d.is_empty() && !d.contains('@') => Some(Self::Domain(d.to_owned())),
            Some(_) => None,
            None if s.contains('@') => Some(Self::Address(s)),
            None => None,
        }
    }

    /// Parses a pattern (tests build lists directly).
    #[cfg(test)]
    pub(crate) fn parse_for_tests(s: &str) -> Self {
        Self::parse(s).unwrap_or(Self::Address(String::new()))
    }

    /// Whether `sender` (an address, any case) matches.
    pub fn matches(&self, sender: &str) -> bool {
        let sender = sender.to_ascii_lowercase();
        match self {
            Self::Address(a) => *a == sender,
            Self::Domain(d) => sender.rsplit_once('@').is_some_and(|(_, sd)| sd == d),
        }
    }
}

/// Allow and block patterns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lists {
    /// Always passed.
    pub allow: Vec<SenderPattern>,
    /// Always tagged.
    pub block: Vec<SenderPattern>,
}

/// A compiled content rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Its name.
    pub name: String,
    /// The header field (lower case), or `None` for the body.
    pub field: Option<String>,
    /// The pattern.
    pub pattern: regex::Regex,
    /// Its score.
    pub score: f64,
}

/// The filter's validated settings. See [`FileConfig`] for each field's meaning.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Listen address.
    pub listen: Option<SocketAddr>,
    /// Reinjection target (`None`: not known yet; the platform fills it in).
    pub reinject: Option<SocketAddr>,
    /// The checks, in order.
    pub checks: Vec<String>,
    /// Tag threshold.
    pub tag_score: f64,
    /// Quarantine threshold (0: off).
    pub quarantine_score: f64,
    /// Quarantine mailbox (key form).
    pub quarantine: Option<String>,
    /// DNSBL zones and scores.
    pub dnsbl: Vec<(String, f64)>,
    /// DNS lookups allowed.
    pub network_checks: bool,
    /// Content rules.
    pub rules: Vec<Rule>,
    /// Model file.
    pub model: PathBuf,
    /// Classifier weight.
    pub classifier_score: f64,
    /// Lists for every recipient.
    pub global: Lists,
    /// Lists per recipient domain or user (lower case keys).
    pub lists: BTreeMap<String, Lists>,
    /// Largest message scanned in full.
    pub max_scan_size: ByteSize,
    /// Most MIME parts.
    pub max_parts: usize,
    /// Deepest nesting.
    pub max_depth: usize,
    /// Most header fields.
    pub max_headers: usize,
    /// Largest header section.
    pub max_header_size: ByteSize,
    /// Largest message.
    pub max_message_size: ByteSize,
    /// Command and data timeout.
    pub timeout: Duration,
    /// Reinjection timeout.
    pub reinject_timeout: Duration,
    /// What every service shares.
    pub shared: Shared,
}

fn lists(allow: &[String], block: &[String], key: &str, problems: &mut Problems) -> Lists {
    let mut parse = |v: &[String], field: &str| {
        v.iter()
            .filter_map(|s| {
                let p = SenderPattern::parse(s);
                if p.is_none() {
                    problems.push(
                        format!("{key}.{field}"),
                        format!("{s:?} is not an address or @domain"),
                    );
                }
                p
            })
            .collect()
    };
    Lists {
        allow: parse(allow, "allow"),
        block: parse(block, "block"),
    }
}

impl Settings {
    /// Validates the section; `key` is its path (`filter`).
    pub fn build(file: &FileConfig, key: &str, shared: &Shared, problems: &mut Problems) -> Self {
        let k = |field: &str| format!("{key}.{field}");
        for c in &file.checks {
            if !CHECKS.contains(&c.as_str()) {
                problems.push(
                    k("checks"),
                    format!("unknown check {c:?} (known: {})", CHECKS.join(", ")),
                );
            }
        }
        if file.tag_score.is_nan() || file.tag_score <= 0.0 {
            problems.push(k("tag_score"), "must be greater than zero");
        }
        if file.quarantine_score != 0.0 && file.quarantine_score < file.tag_score {
            problems.push(
                k("quarantine_score"),
                "must be 0 (off) or at least tag_score",
            );
        }
        let quarantine = match file.quarantine.trim() {
            "" => None,
            q => match common::address::Address::parse(q) {
                Ok(a) => Some(a.key()),
                Err(e) => {
                    problems.push(k("quarantine"), e.to_string());
                    None
                }
            },
        };
        let mut rules = Vec::new();
        for (i, r) in file.rules.iter().enumerate() {
            match regex::RegexBuilder::new(&r.pattern)
                .size_limit(1 << 20)
                .build()
            {
                Ok(pattern) => rules.push(Rule {
                    name: r.name.clone(),
                    field: (!r.field.eq_ignore_ascii_case("body"))
                        .then(|| r.field.to_ascii_lowercase()),
                    pattern,
                    score: r.score,
                }),
                Err(e) => problems.push(format!("{key}.rules[{i}].pattern"), e.to_string()),
            }
        }
        let mut per = BTreeMap::new();
        for (who, l) in &file.lists {
            let who = who.trim().to_ascii_lowercase();
            let lk = format!("{key}.lists.{who}");
            per.insert(who, lists(&l.allow, &l.block, &lk, problems));
        }
        for (field, value) in [
            ("max_parts", file.max_parts),
            ("max_depth", file.max_depth),
            ("max_headers", file.max_headers),
        ] {
            if value == 0 {
                problems.push(k(field), "must be greater than zero");
            }
        }
        let reinject = match file.reinject.trim() {
            "" => None,
            r => problems.listen(&k("reinject"), r),
        };
        Self {
            listen: problems.listen(&k("listen"), &file.listen),
            reinject,
            checks: file.checks.clone(),
            tag_score: file.tag_score,
            quarantine_score: file.quarantine_score,
            quarantine,
            dnsbl: file
                .dnsbl
                .iter()
                .map(|(z, s)| (z.trim().trim_end_matches('.').to_ascii_lowercase(), *s))
                .collect(),
            network_checks: file.network_checks.unwrap_or(!shared.dev_mode),
            rules,
            model: if file.model.trim().is_empty() {
                shared.data_dir.join("filter").join("model.json")
            } else {
                PathBuf::from(file.model.trim())
            },
            classifier_score: file.classifier_score,
            global: lists(&file.allow, &file.block, key, problems),
            lists: per,
            max_scan_size: problems.size(&k("max_scan_size"), &file.max_scan_size),
            max_parts: file.max_parts,
            max_depth: file.max_depth,
            max_headers: file.max_headers,
            max_header_size: problems.size(&k("max_header_size"), &file.max_header_size),
            max_message_size: problems.size(&k("max_message_size"), &file.max_message_size),
            timeout: problems.duration(&k("timeout"), &file.timeout, true),
            reinject_timeout: problems.duration(
                &k("reinject_timeout"),
                &file.reinject_timeout,
                true,
            ),
            shared: shared.clone(),
        }
    }

    /// The defaults over `shared` for tests: listener on an ephemeral loopback port, no
    /// network checks.
    pub fn for_tests(shared: &Shared) -> Self {
        let mut p = Problems::new();
        let s = Self::build(&FileConfig::default(), "filter", shared, &mut p);
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            network_checks: false,
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
        let s = Settings::build(&FileConfig::default(), "filter", &shared, &mut p);
        assert!(p.is_empty(), "{p}");
        assert_eq!(s.rules.len(), 5);
        let bad = FileConfig {
            checks: vec!["auth".into(), "magic".into()],
            rules: vec![RuleFile {
                name: "x".into(),
                field: "body".into(),
                pattern: "(".into(),
                score: 1.0,
            }],
            allow: vec!["not an address".into()],
            quarantine_score: 1.0,
            ..FileConfig::default()
        };
        let mut p = Problems::new();
        Settings::build(&bad, "filter", &shared, &mut p);
        let keys: Vec<&str> = p.as_slice().iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "filter.checks",
                "filter.quarantine_score",
                "filter.rules[0].pattern",
                "filter.allow"
            ]
        );
    }

    #[test]
    fn sender_patterns() {
        let d = SenderPattern::parse("*@Example.COM").unwrap();
        assert!(d.matches("x@example.com"));
        assert!(!d.matches("x@sub.example.com"));
        let a = SenderPattern::parse("boss@x.test").unwrap();
        assert!(a.matches("BOSS@x.test"));
        assert!(SenderPattern::parse("@").is_none());
        assert!(SenderPattern::parse("plain").is_none());
    }
}
