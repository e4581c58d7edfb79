//! The check chain: each check adds scored reasons; the total decides the verdict; the
//! message is rewritten with our headers (and without the ones the internet tried to set).
//!
//! Work is bounded whatever the message: the header section is walked at most
//! `max_header_size` bytes and `max_headers` fields; content checks see at most
//! `max_scan_size` bytes; a message past `max_parts` MIME parts or `max_depth` nesting is
//! scanned on its first text part only and tagged `LIMITS_EXCEEDED`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use mail_parser::{MessageParser, PartType};

use crate::Filter;
use crate::settings::{Lists, Settings};

/// Header fields a message may carry at most once (RFC 5322 §3.6).
const SINGLETONS: [&str; 9] = [
    "from",
    "sender",
    "reply-to",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "in-reply-to",
];

/// What the spool told us about a message.
#[derive(Debug, Clone, Default)]
pub(crate) struct Envelope {
    /// MAIL FROM (empty for the null sender).
    pub(crate) mail_from: String,
    /// RCPT TO, key form.
    pub(crate) recipients: Vec<String>,
    /// The original client's address (XFORWARD ADDR).
    pub(crate) client_ip: Option<IpAddr>,
    /// The original client's HELO (XFORWARD HELO).
    pub(crate) helo: String,
    /// The spool's queue id (XFORWARD IDENT), for the logs.
    pub(crate) ident: String,
}

/// What to do with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Deliver as it is (with our headers).
    Pass,
    /// Deliver marked as spam: the filer files it into Junk.
    Tag,
    /// Deliver to the quarantine mailbox instead of the recipients.
    Quarantine,
}

/// The outcome of the chain.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// The total score.
    pub score: f64,
    /// Each reason and its score, in the order found.
    pub reasons: Vec<(String, f64)>,
    /// What to do.
    pub action: Action,
    /// The `Authentication-Results` field (complete, CRLF-terminated).
    pub auth_results: String,
}

/// The header section as the checks need it.
pub(crate) struct HeaderScan {
    /// Field names (lower case) and their count.
    pub(crate) counts: HashMap<String, usize>,
    /// Each field's (lower-case name, unfolded value), up to the limits.
    pub(crate) fields: Vec<(String, String)>,
    /// The limits were hit.
    pub(crate) truncated: bool,
}

/// Walks the header section, at most `max_fields` fields and `max_bytes` bytes.
pub(crate) fn scan_headers(message: &[u8], max_fields: usize, max_bytes: usize) -> HeaderScan {
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut fields: Vec<(String, String)> = Vec::new();
    let mut pos = 0;
    let mut truncated = false;
    while pos < message.len() {
        if pos >= max_bytes || fields.len() >= max_fields {
            truncated = true;
            break;
        }
        let end = message[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(message.len(), |i| pos + i + 1);
        let line = &message[pos..end];
        let content = trim_eol(line);
        if content.is_empty() {
            break;
        }
        if content.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            if let Some((_, v)) = fields.last_mut()
                && v.len() < 16 * 1024
            {
                v.push(' ');
                v.push_str(String::from_utf8_lossy(content).trim());
            }
        } else if let Some(colon) = content.iter().position(|&b| b == b':') {
            let name = String::from_utf8_lossy(&content[..colon])
                .trim()
                .to_ascii_lowercase();
            let value = String::from_utf8_lossy(&content[colon + 1..])
                .trim()
                .to_owned();
            *counts.entry(name.clone()).or_default() += 1;
            fields.push((name, value));
        }
        pos = end;
    }
    HeaderScan {
        counts,
        fields,
        truncated,
    }
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The message without header fields named `X-Spam-*` (the internet may not set our
/// verdict) and without `Authentication-Results` claiming to be ours (RFC 8601 §5).
pub(crate) fn strip_foreign_headers(message: &[u8], hostname: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 512);
    let mut pos = 0;
    let mut dropping = false;
    let ours = format!("authentication-results: {}", hostname.to_ascii_lowercase());
    while pos < message.len() {
        let end = message[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(message.len(), |i| pos + i + 1);
        let line = &message[pos..end];
        let content = trim_eol(line);
        if content.is_empty() {
            out.extend_from_slice(&message[pos..]);
            return out;
        }
        let continuation = content.first().is_some_and(|b| *b == b' ' || *b == b'\t');
        if !continuation {
            let lower =
                String::from_utf8_lossy(&content[..content.len().min(256)]).to_ascii_lowercase();
            dropping = lower.starts_with("x-spam-")
                || (lower.starts_with("authentication-results:")
                    && lower
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                        .trim_end_matches(';')
                        .starts_with(ours.trim_end_matches(';')));
        }
        if !dropping {
            out.extend_from_slice(line);
        }
        pos = end;
    }
    out
}

impl Filter {
    /// Runs the configured checks over `message`.
    pub(crate) async fn scan(self: &Arc<Self>, message: &Arc<[u8]>, env: &Envelope) -> Verdict {
        let s = &self.settings;
        let mut reasons: Vec<(String, f64)> = Vec::new();
        let mut auth_results = String::new();
        let mut listed: Option<bool> = None;
        let mut content_done = false;
        for check in &s.checks {
            match check.as_str() {
                "lists" => {
                    listed = list_verdict(s, env, message);
                    match listed {
                        Some(true) => reasons.push(("ALLOWLISTED".into(), -100.0)),
                        Some(false) => reasons.push(("BLOCKLISTED".into(), 100.0)),
                        None => {}
                    }
                }
                "auth" => {
                    let (header, found) = self.authenticate(message, env).await;
                    auth_results = header;
                    reasons.extend(found);
                }
                "dnsbl" => reasons.extend(self.dnsbl(env).await),
                "headers" | "rules" | "classifier" | "size" if !content_done => {
                    // The CPU-bound checks run together off the async workers.
                    content_done = true;
                    let (filter, message) = (self.clone(), message.clone());
                    let found =
                        tokio::task::spawn_blocking(move || filter.content_checks(&message))
                            .await
                            .unwrap_or_default();
                    reasons.extend(found);
                }
                _ => {}
            }
        }
        if auth_results.is_empty() {
            auth_results = format!("Authentication-Results: {}; none\r\n", s.shared.hostname);
        }
        let score = (reasons.iter().map(|(_, v)| v).sum::<f64>() * 100.0).round() / 100.0;
        let action = if listed == Some(true) {
            Action::Pass
        } else if s.quarantine.is_some() && s.quarantine_score > 0.0 && score >= s.quarantine_score
        {
            Action::Quarantine
        } else if score >= s.tag_score {
            Action::Tag
        } else {
            Action::Pass
        };
        Verdict {
            score,
            reasons,
            action,
            auth_results,
        }
    }

    /// Header sanity, content rules, the classifier and the size marker: what reads the
    /// message itself.
    pub(crate) fn content_checks(&self, message: &[u8]) -> Vec<(String, f64)> {
        let s = &self.settings;
        let mut reasons = Vec::new();
        let headers = scan_headers(message, s.max_headers, s.max_header_size.bytes() as usize);
        let wants = |name: &str| s.checks.iter().any(|c| c == name);
        if headers.truncated {
            reasons.push(("HEADER_LIMITS_EXCEEDED".into(), 1.0));
        }
        let scan_len = message
            .len()
            .min(usize::try_from(s.max_scan_size.bytes()).unwrap_or(usize::MAX));
        let scanned = &message[..scan_len];
        let parsed = MessageParser::new().parse(scanned);
        let mut limited = scan_len < message.len();
        if let Some(p) = &parsed
            && (p.parts.len() > s.max_parts || depth(p) > s.max_depth)
        {
            limited = true;
        }
        if wants("size") && limited {
            reasons.push(("LIMITS_EXCEEDED".into(), 1.0));
        }
        if wants("headers") {
            header_checks(&headers, parsed.as_ref(), &mut reasons);
        }
        if wants("rules") {
            let text = body_text(parsed.as_ref(), limited, scan_len);
            for rule in &s.rules {
                let hit = match &rule.field {
                    Some(field) => headers
                        .fields
                        .iter()
                        .any(|(n, v)| n == field && rule.pattern.is_match(&decode_words(v))),
                    None => rule.pattern.is_match(&text),
                };
                if hit {
                    reasons.push((rule.name.clone(), rule.score));
                }
            }
        }
        if wants("classifier")
            && let Some(model) = self.model.get()
        {
            let p = model.score(if limited { scanned } else { message });
            let weight = s.classifier_score;
            let value = ((p - 0.5) * 2.0 * weight * 100.0).round() / 100.0;
            let name = if p >= 0.99 {
                "BAYES_99"
            } else if p >= 0.9 {
                "BAYES_90"
            } else if p >= 0.5 {
                "BAYES_50"
            } else if p >= 0.1 {
                "BAYES_10"
            } else {
                "BAYES_00"
            };
            reasons.push((name.into(), value));
        }
        reasons
    }

    /// DNSBL lookups of the client address (RFC 5782): listed when the name resolves.
    async fn dnsbl(&self, env: &Envelope) -> Vec<(String, f64)> {
        let Some(ip) = env.client_ip else {
            return Vec::new();
        };
        if ip.is_loopback() || !self.settings.network_checks {
            return Vec::new();
        }
        let reversed = match ip {
            IpAddr::V4(v4) => {
                let o = v4.octets();
                format!("{}.{}.{}.{}", o[3], o[2], o[1], o[0])
            }
            IpAddr::V6(v6) => {
                let mut s = String::new();
                for byte in v6.octets().iter().rev() {
                    let _ = write!(s, "{:x}.{:x}.", byte & 0xf, byte >> 4);
                }
                s.trim_end_matches('.').to_owned()
            }
        };
        let mut out = Vec::new();
        for (zone, score) in &self.settings.dnsbl {
            let name = format!("{reversed}.{zone}");
            if let Ok(ips) = self.dns.ips(&name).await
                && ips
                    .iter()
                    .any(|a| matches!(a, IpAddr::V4(v) if v.octets()[0] == 127))
            {
                out.push((format!("DNSBL_{}", zone.to_ascii_uppercase()), *score));
            }
        }
        out
    }
}

/// Allow (`Some(true)`) or block (`Some(false)`) from the global lists and those of every
/// recipient's domain and address; `None` when no list speaks, or when recipients' lists
/// disagree (the message goes through the other checks then). An allow wins over a block in
/// the same scope. The sender is the envelope sender and the `From:` address.
fn list_verdict(s: &Settings, env: &Envelope, message: &[u8]) -> Option<bool> {
    let headers = scan_headers(message, 200, 64 * 1024);
    let mut senders = vec![env.mail_from.to_ascii_lowercase()];
    if let Some((_, v)) = headers.fields.iter().find(|(n, _)| n == "from")
        && let Some(addr) = v
            .rsplit('<')
            .next()
            .map(|a| a.trim_end_matches('>').trim().to_ascii_lowercase())
        && addr.contains('@')
    {
        senders.push(addr);
    }
    senders.retain(|x| !x.is_empty());
    let judge = |l: &Lists| -> Option<bool> {
        if senders.iter().any(|x| l.allow.iter().any(|p| p.matches(x))) {
            Some(true)
        } else if senders.iter().any(|x| l.block.iter().any(|p| p.matches(x))) {
            Some(false)
        } else {
            None
        }
    };
    let mut verdicts = Vec::new();
    for rcpt in &env.recipients {
        let domain = rcpt.rsplit_once('@').map(|(_, d)| d).unwrap_or_default();
        let v = s
            .lists
            .get(rcpt.as_str())
            .and_then(judge)
            .or_else(|| s.lists.get(domain).and_then(judge))
            .or_else(|| judge(&s.global));
        verdicts.push(v);
    }
    match verdicts.split_first() {
        Some((first, rest)) if rest.iter().all(|v| v == first) => *first,
        _ => None,
    }
}

fn header_checks(
    h: &HeaderScan,
    parsed: Option<&mail_parser::Message<'_>>,
    reasons: &mut Vec<(String, f64)>,
) {
    if !h.counts.contains_key("from") {
        reasons.push(("MISSING_FROM".into(), 2.0));
    }
    if !h.counts.contains_key("date") {
        reasons.push(("MISSING_DATE".into(), 1.0));
    }
    if !h.counts.contains_key("message-id") {
        reasons.push(("MISSING_MID".into(), 0.5));
    }
    for name in SINGLETONS {
        if h.counts.get(name).is_some_and(|n| *n > 1) {
            reasons.push((
                format!("DUP_{}", name.to_ascii_uppercase().replace('-', "_")),
                2.0,
            ));
        }
    }
    match parsed {
        None => reasons.push(("MIME_UNPARSABLE".into(), 2.0)),
        Some(p) => {
            let declared_multipart = h.fields.iter().any(|(n, v)| {
                n == "content-type" && v.to_ascii_lowercase().starts_with("multipart/")
            });
            let has_boundary = h
                .fields
                .iter()
                .any(|(n, v)| n == "content-type" && v.to_ascii_lowercase().contains("boundary="));
            if declared_multipart && (!has_boundary || p.parts.len() < 2) {
                reasons.push(("MIME_BROKEN".into(), 1.5));
            }
        }
    }
}

/// The deepest multipart nesting, walking at most the parts there are.
fn depth(m: &mail_parser::Message<'_>) -> usize {
    let mut max = 0;
    let mut stack = vec![(0u32, 0usize)];
    let mut visited = 0;
    while let Some((id, d)) = stack.pop() {
        visited += 1;
        if visited > m.parts.len() + 1 {
            break;
        }
        max = max.max(d);
        if let Some(PartType::Multipart(children)) = m.parts.get(id as usize).map(|p| &p.body) {
            for c in children {
                if *c != id {
                    stack.push((*c, d + 1));
                }
            }
        }
    }
    max
}

/// The text the body rules see: text parts (HTML with tags removed), bounded; only the
/// first when the limits were hit.
fn body_text(parsed: Option<&mail_parser::Message<'_>>, limited: bool, max: usize) -> String {
    let Some(m) = parsed else {
        return String::new();
    };
    let mut out = String::new();
    let take = if limited { 1 } else { usize::MAX };
    for i in 0..m.text_body.len().min(take) {
        if let Some(t) = m.body_text(i) {
            out.push_str(&t);
            out.push('\n');
        }
        if out.len() >= max {
            break;
        }
    }
    out
}

/// A header value with RFC 2047 encoded words decoded (for rules on `Subject:`).
fn decode_words(v: &str) -> String {
    if !v.contains("=?") {
        return v.to_owned();
    }
    let raw = format!("Subject: {v}\r\n\r\n");
    MessageParser::new()
        .parse_headers(raw.as_bytes())
        .and_then(|m| m.subject().map(str::to_owned))
        .unwrap_or_else(|| v.to_owned())
}

/// Our header fields for a verdict, CRLF-terminated, to go on top of the message.
pub(crate) fn verdict_headers(v: &Verdict, tag_score: f64) -> String {
    let mut out = v.auth_results.clone();
    let spam = v.action != Action::Pass;
    if spam {
        out.push_str("X-Spam-Flag: YES\r\n");
    }
    // `+ 0.0` turns a negative zero into zero, so no "-0.00" is shown.
    let _ = write!(out, "X-Spam-Score: {:.2}\r\n", v.score + 0.0);
    let tests: Vec<String> = v
        .reasons
        .iter()
        .map(|(n, s)| format!("{n}={:.2}", s + 0.0))
        .collect();
    let status = format!(
        "X-Spam-Status: {}, score={:.2} required={:.2} tests={}",
        if spam { "Yes" } else { "No" },
        v.score + 0.0,
        tag_score,
        if tests.is_empty() {
            "none".to_owned()
        } else {
            tests.join(",")
        }
    );
    out.push_str(&fold(&status));
    out
}

/// Folds a header line at commas to stay under 78 characters where it can.
fn fold(line: &str) -> String {
    let mut out = String::new();
    let mut current = 0;
    for (i, piece) in line.split_inclusive(',').enumerate() {
        if i > 0 && current + piece.len() > 76 {
            out.push_str("\r\n\t");
            current = 1;
        }
        out.push_str(piece);
        current += piece.len();
    }
    out.push_str("\r\n");
    out
}

impl Filter {
    /// SPF, DKIM and DMARC: the `Authentication-Results` field and the scored reasons.
    async fn authenticate(&self, message: &[u8], env: &Envelope) -> (String, Vec<(String, f64)>) {
        let input = crate::auth::AuthInput {
            message,
            client_ip: env.client_ip,
            helo: &env.helo,
            mail_from: &env.mail_from,
            hostname: &self.settings.shared.hostname,
        };
        let outcome = self.auth.check(&input).await;
        let mut reasons: Vec<(String, f64)> = outcome
            .reasons
            .iter()
            .map(|r| (r.clone(), auth_score(r)))
            .collect();
        if outcome.dkim == crate::auth::Verdict::Pass {
            reasons.push(("DKIM_VALID".into(), -0.1));
        }
        if outcome.dmarc == crate::auth::Verdict::Pass {
            reasons.push(("DMARC_PASS".into(), -0.5));
        }
        (outcome.header, reasons)
    }
}

/// The score of an authentication reason.
fn auth_score(reason: &str) -> f64 {
    match reason {
        "SPF_FAIL" => 2.0,
        "SPF_SOFTFAIL" => 0.7,
        "DKIM_FAIL" => 1.0,
        "DMARC_FAIL" => 1.5,
        "DMARC_QUARANTINE" => 2.5,
        "DMARC_REJECT" => 4.0,
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_walked_within_limits() {
        let msg = b"From: a@x.test\r\nSubject: one\r\n two\r\nSubject: again\r\n\r\nbody\r\n";
        let h = scan_headers(msg, 100, 1 << 20);
        assert_eq!(h.counts["subject"], 2);
        assert_eq!(h.fields[1], ("subject".into(), "one two".into()));
        assert!(!h.truncated);
        let h = scan_headers(msg, 1, 1 << 20);
        assert!(h.truncated);
        let big = format!("X-Big: {}\r\n\r\n", "a".repeat(5 << 20));
        let h = scan_headers(big.as_bytes(), 100, 1 << 20);
        assert!(h.truncated || h.fields.len() == 1);
    }

    #[test]
    fn foreign_verdicts_are_stripped() {
        let msg = b"X-Spam-Flag: NO\r\nX-SPAM-Score: -100\r\n\tcontinued\r\nAuthentication-Results: mx.ours.test; spf=pass\r\nAuthentication-Results: other.test; spf=fail\r\nSubject: hi\r\n\r\nX-Spam-Flag: body stays\r\n";
        let out = strip_foreign_headers(msg, "mx.ours.test");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Authentication-Results: other.test; spf=fail\r\nSubject: hi\r\n\r\nX-Spam-Flag: body stays\r\n"
        );
    }

    #[test]
    fn status_header_is_folded() {
        let v = Verdict {
            score: 7.5,
            reasons: (0..10)
                .map(|i| (format!("REASON_NUMBER_{i}"), 0.75))
                .collect(),
            action: Action::Tag,
            auth_results: "Authentication-Results: h; none\r\n".into(),
        };
        let h = verdict_headers(&v, 5.0);
        let zero = Verdict {
            score: -0.0,
            reasons: vec![("BAYES_50".into(), -0.0)],
            action: Action::Pass,
            auth_results: String::new(),
        };
        let z = verdict_headers(&zero, 5.0);
        assert!(!z.contains("-0.00"), "{z}");
        assert!(h.contains("X-Spam-Flag: YES\r\n"));
        assert!(h.contains("X-Spam-Score: 7.50\r\n"));
        for line in h.split("\r\n") {
            assert!(line.len() <= 100, "{line}");
        }
    }

    fn filter(settings: impl FnOnce(&mut Settings)) -> (Arc<Filter>, Arc<common::dns::Static>) {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Settings::for_tests(&common::config::Shared::for_tests(dir.path()));
        s.network_checks = true;
        settings(&mut s);
        let dns = Arc::new(common::dns::Static::new());
        let f = Filter {
            model: crate::ModelSlot::new(s.model.clone()),
            settings: Arc::new(s),
            dns: dns.clone(),
            auth: crate::auth::Authenticator::offline().unwrap(),
        };
        (Arc::new(f), dns)
    }

    fn names(v: &Verdict) -> Vec<&str> {
        v.reasons.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[tokio::test]
    async fn the_chain_adds_up_dnsbl_spf_headers_and_rules() {
        let (f, dns) = filter(|s| s.dnsbl = vec![("bl.test".into(), 3.0)]);
        dns.add_ip("7.2.0.192.bl.test", "127.0.0.2".parse().unwrap());
        f.auth
            .add_txt("remote.test", "v=spf1 ip4:198.51.100.0/24 -all");
        let env = Envelope {
            mail_from: "x@remote.test".into(),
            recipients: vec!["a@example.test".into()],
            client_ip: Some("192.0.2.7".parse().unwrap()),
            helo: "mx.remote.test".into(),
            ident: "Q1".into(),
        };
        let msg: Arc<[u8]> = Arc::from(
            &b"From: x@remote.test\r\nSubject: hi\r\nSubject: again\r\n\r\nbuy viagra now\r\n"[..],
        );
        let v = f.scan(&msg, &env).await;
        let n = names(&v);
        for want in [
            "DNSBL_BL.TEST",
            "SPF_FAIL",
            "DUP_SUBJECT",
            "MISSING_DATE",
            "BODY_PHARMA",
        ] {
            assert!(n.contains(&want), "{want} in {n:?}");
        }
        assert!(v.score >= 5.0 && v.action == Action::Tag, "{v:?}");
        assert!(v.auth_results.contains("spf=fail"), "{}", v.auth_results);

        // The same message from an address that is not listed, with SPF passing: clean.
        let env = Envelope {
            client_ip: Some("198.51.100.9".parse().unwrap()),
            ..env
        };
        let msg: Arc<[u8]> = Arc::from(
            &b"From: x@remote.test\r\nDate: Fri, 27 Nov 2026 10:00:00 +0000\r\nMessage-ID: <a@b>\r\nSubject: hi\r\n\r\nhello\r\n"[..],
        );
        let v = f.scan(&msg, &env).await;
        assert_eq!(v.action, Action::Pass, "{v:?}");
        assert!(v.reasons.is_empty() || v.score < 1.0, "{v:?}");
        assert!(v.auth_results.contains("spf=pass"), "{}", v.auth_results);
    }

    #[tokio::test]
    async fn allow_and_block_lists_per_user_domain_and_global() {
        let pattern = |p: &str| crate::settings::SenderPattern::parse_for_tests(p);
        let (f, _) = filter(|s| {
            s.global.block = vec![pattern("@spam.test")];
            s.lists.insert(
                "example.test".into(),
                Lists {
                    allow: vec![pattern("friend@spam.test")],
                    block: vec![],
                },
            );
            s.lists.insert(
                "boss@example.test".into(),
                Lists {
                    allow: vec![],
                    block: vec![pattern("@partner.test")],
                },
            );
        });
        let env = |from: &str, to: &str| Envelope {
            mail_from: from.into(),
            recipients: vec![to.into()],
            ..Envelope::default()
        };
        let msg: Arc<[u8]> = Arc::from(&b"Subject: x\r\n\r\nhello\r\n"[..]);
        let v = f.scan(&msg, &env("any@spam.test", "a@example.test")).await;
        assert!(
            names(&v).contains(&"BLOCKLISTED") && v.action == Action::Tag,
            "{v:?}"
        );
        let v = f
            .scan(&msg, &env("friend@spam.test", "a@example.test"))
            .await;
        assert!(
            names(&v).contains(&"ALLOWLISTED") && v.action == Action::Pass,
            "{v:?}"
        );
        let v = f
            .scan(&msg, &env("x@partner.test", "boss@example.test"))
            .await;
        assert!(names(&v).contains(&"BLOCKLISTED"), "{v:?}");
        let v = f.scan(&msg, &env("x@partner.test", "a@example.test")).await;
        assert!(!names(&v).contains(&"BLOCKLISTED"), "{v:?}");
    }

    #[tokio::test]
    async fn mime_bombs_are_scanned_within_bounds() {
        let (f, _) = filter(|s| s.network_checks = false);
        let env = Envelope::default();
        let mut many =
            String::from("Subject: parts\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n");
        for i in 0..100_000 {
            many.push_str(&format!(
                "--b\r\nContent-Type: text/plain\r\n\r\npart {i}\r\n"
            ));
        }
        many.push_str("--b--\r\n");
        let mut nested = String::from("Subject: nested\r\n");
        for i in 0..1000 {
            nested.push_str(&format!(
                "Content-Type: multipart/mixed; boundary=n{i}\r\n\r\n--n{i}\r\n"
            ));
        }
        nested.push_str("Content-Type: text/plain\r\n\r\ndeep\r\n");
        let addresses = format!(
            "To: {}\r\nSubject: many\r\n\r\nhi\r\n",
            (0..100_000)
                .map(|i| format!("u{i}@x.test"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let header = format!(
            "X-Huge: {}\r\nSubject: big\r\n\r\nhi\r\n",
            "a".repeat(50 << 20)
        );
        for (what, msg) in [
            ("parts", many),
            ("nesting", nested),
            ("addresses", addresses),
            ("header", header),
        ] {
            let msg: Arc<[u8]> = Arc::from(msg.into_bytes());
            let started = tokio::time::Instant::now();
            let v = f.scan(&msg, &env).await;
            let took = started.elapsed();
            assert!(
                took < std::time::Duration::from_secs(10),
                "{what}: {took:?}"
            );
            if what != "addresses" {
                assert!(
                    names(&v).iter().any(|n| n.contains("LIMITS_EXCEEDED")),
                    "{what}: {:?}",
                    names(&v)
                );
            }
        }
    }
}
