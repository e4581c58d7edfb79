//! SPF (RFC 7208), DKIM (RFC 6376) and DMARC (RFC 7489, and its tree walk from DMARCbis) checks
//! of an incoming message, and the `Authentication-Results:` field (RFC 8601) that records them.
//!
//! [`Authenticator::check`] takes the message, the client's address, HELO and MAIL FROM
//! ([`AuthInput`]) and gives one [`Verdict`] per method, the DMARC policy when DMARC fails, short
//! reason tags for the filter's scoring, and the header field to prepend ([`AuthOutcome`]).
//!
//! The work is mail-auth's ([`MessageAuthenticator`]); this module adds what a server needs
//! around it:
//!
//! - **Caches of bounded size** in front of mail-auth's DNS lookups, which also hold static
//!   records that operators (or tests) seed with [`Authenticator::add_txt`] and friends. A
//!   seeded record always wins over DNS.
//! - **Offline mode** ([`Authenticator::offline`]): a resolver without name servers, so nothing
//!   touches the network, and the seeded records act as the whole DNS. A TXT or MX name that was
//!   not seeded does not exist (NXDOMAIN): SPF `none`, no DMARC record, DKIM key `permerror`. An
//!   A/AAAA/PTR name that was not seeded is a temporary error (`temperror`), because mail-auth's
//!   SPF `exists:` takes any cached address answer, even an empty one, as "exists".
//! - **Bounds**: at most [`MAX_DKIM_SIGNATURES`] signatures are verified, and each of the three
//!   steps has a time budget ([`STEP_TIMEOUT`]), after which it is a `temperror`.
//! - **RFC 8601 words** for mail-auth's results (see [`Verdict`]), including two corrections:
//!   a DKIM body hash mismatch is `fail` (RFC 6376 §6.1.3, a PERMFAIL), where mail-auth says
//!   `neutral`; and a DMARC record with no aligned pass is `fail`, where mail-auth's header
//!   builder would say `none`.
//!
//! What it trusts: the client address, HELO and MAIL FROM as the spool saw them, and our own
//! hostname. Everything in the message and in DNS answers is peer data.
//!
//! mail-auth does its own lookups through hickory, so the platform's own DNS trait
//! (`common::dns::Resolver`) cannot stand in for it; the offline mode and the seeded records
//! are the equivalent of `common::dns::Static` here.

use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mail_auth::common::parse::TxtRecordParser as _;
use mail_auth::common::resolver::ToFqdn as _;
use mail_auth::common::verify::DomainKey;
use mail_auth::dkim::DkimError;
use mail_auth::dmarc::Dmarc;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::hickory_resolver::config::{ResolveHosts, ResolverConfig, ResolverOpts};
use mail_auth::hickory_resolver::net::NetError;
use mail_auth::hickory_resolver::proto::op::ResponseCode;
use mail_auth::spf::Spf;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DkimOutput, DkimResult, DmarcOutput, DmarcResult,
    DnsError, DnssecStatus, MX, MessageAuthenticator, Parameters, RecordSet, ResolverCache,
    SpfOutput, SpfResult, Txt,
};

/// The most DKIM signatures of one message that are looked at; the others are ignored (the
/// first ones in header order, i.e. the most recently added, are kept). Each verified signature
/// costs a key lookup and a public-key operation, and adds a line to `Authentication-Results:`.
/// Malformed signatures (reported as `neutral` without any lookup) count towards the same limit.
pub const MAX_DKIM_SIGNATURES: usize = 5;

/// How long each of SPF, DKIM and DMARC may take, DNS included; a step that runs out is a
/// `temperror`. SPF alone may make up to 10 lookups (RFC 7208 §4.6.4).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs the SPF, DKIM and DMARC checks, with caches of DNS answers and static records.
///
/// Cheap to share: put it in an `Arc` and call [`check`](Self::check) from any task.
pub struct Authenticator {
    inner: MessageAuthenticator,
    txt: DnsCache<Box<str>, Txt>,
    mx: DnsCache<Box<str>, RecordSet<MX>>,
    ipv4: DnsCache<Box<str>, RecordSet<Ipv4Addr>>,
    ipv6: DnsCache<Box<str>, RecordSet<Ipv6Addr>>,
    ptr: DnsCache<IpAddr, RecordSet<Box<str>>>,
    /// Whether the resolver has no name servers.
    is_offline: bool,
}

/// The cache's type, as mail-auth's calls spell it.
type CachedParameters<'x, P> = Parameters<
    'x,
    P,
    DnsCache<Box<str>, Txt>,
    DnsCache<Box<str>, RecordSet<MX>>,
    DnsCache<Box<str>, RecordSet<Ipv4Addr>>,
    DnsCache<Box<str>, RecordSet<Ipv6Addr>>,
    DnsCache<IpAddr, RecordSet<Box<str>>>,
>;

/// What [`Authenticator::check`] looks at.
#[derive(Clone, Copy)]
pub struct AuthInput<'a> {
    /// The whole message as received: header, blank line, body, CRLF line ends, no dot-stuffing.
    pub message: &'a [u8],
    /// The SMTP client's address; without it SPF is not checked (`none`).
    pub client_ip: Option<IpAddr>,
    /// The HELO/EHLO argument.
    pub helo: &'a str,
    /// The MAIL FROM reverse-path without angle brackets (brackets are tolerated); `""` for the
    /// null sender, for which SPF checks the HELO identity instead (RFC 7208 §2.4).
    pub mail_from: &'a str,
    /// Our host name, the `authserv-id` of `Authentication-Results:`.
    pub hostname: &'a str,
}

/// The results of [`Authenticator::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthOutcome {
    /// SPF of MAIL FROM (of HELO for the null sender); `none` without a client address, or when
    /// the identity is an address literal.
    pub spf: Verdict,
    /// The best result of the (at most [`MAX_DKIM_SIGNATURES`]) signatures: `pass` if any
    /// passes; otherwise, in this order, `temperror`, `neutral`, `permerror`, `fail`; `none`
    /// when the message is not signed.
    pub dkim: Verdict,
    /// DMARC of the RFC 5322.From domain: `pass` when SPF or DKIM passes for an aligned domain;
    /// `fail` when the domain publishes a record and nothing aligned passed; `none` without a
    /// record (or without a single From domain). `temperror` also when it would fail but an
    /// identifier that could align (same domain, or one a subdomain of the other) had a
    /// temporary error, so that a DNS hiccup defers rather than rejects.
    pub dmarc: Verdict,
    /// The policy that applies when `dmarc` is `fail` (mail-auth picks `p`, `sp` or `np` and
    /// lowers it one step for `t=y`); `None` otherwise.
    pub dmarc_policy: Option<Policy>,
    /// The complete `Authentication-Results: <hostname>; spf=…; dkim=…; dmarc=…` field, one
    /// result per folded line, ending in CRLF, ready to prepend to the message.
    pub header: String,
    /// Tags for what went wrong, in this order: `SPF_FAIL`, `SPF_SOFTFAIL`, `SPF_TEMPERROR`,
    /// `SPF_PERMERROR`; `DKIM_FAIL`, `DKIM_TEMPERROR`, `DKIM_PERMERROR` (of the best result);
    /// `DMARC_FAIL` followed by `DMARC_REJECT` or `DMARC_QUARANTINE` (none for `p=none`),
    /// `DMARC_TEMPERROR`, `DMARC_PERMERROR`. Empty when nothing failed.
    pub reasons: Vec<String>,
}

/// The result of one method, as RFC 8601 names them (`Display` writes those words).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Authenticated.
    Pass,
    /// Explicitly not authorized (SPF `-all`), a signature that does not verify, or DMARC failed.
    Fail,
    /// SPF `~all`: probably not authorized.
    SoftFail,
    /// No assertion (SPF `?all`; a DKIM signature that expired or could not be parsed).
    Neutral,
    /// Nothing to check: no record, no signature, no client address.
    None,
    /// A temporary failure, DNS usually: the same check may give a result later.
    TempError,
    /// A permanent error: a malformed or missing record, too many SPF lookups.
    PermError,
}

/// A DMARC policy (RFC 7489 §6.3 `p=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Policy {
    /// Monitoring only.
    None,
    /// Treat failing mail as suspicious.
    Quarantine,
    /// Reject failing mail.
    Reject,
}

/// Why an [`Authenticator`] cannot be made or a record cannot be seeded.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The system resolver configuration cannot be read.
    #[error("cannot set up the dns resolver for spf, dkim and dmarc")]
    Resolver(#[source] NetError),
    /// A seeded TXT record is none of an SPF record, a DKIM key or a DMARC record.
    #[error(
        "{name}: not an spf record (v=spf1), dkim key (v=DKIM1, p=) or dmarc record (v=DMARC1)"
    )]
    UnknownRecord {
        /// The record's name.
        name: String,
    },
    /// A seeded TXT record does not parse.
    #[error("{name}: invalid {kind} record")]
    InvalidRecord {
        /// The record's name.
        name: String,
        /// `spf`, `dkim` or `dmarc`.
        kind: &'static str,
        /// What mail-auth said.
        #[source]
        source: mail_auth::Error,
    },
}

impl Authenticator {
    /// An authenticator that asks the name servers of the host's `/etc/resolv.conf` (through
    /// hickory, which also caches), with caches of bounded size in front: TXT
    /// [`TXT_CACHE_ENTRIES`], MX [`MX_CACHE_ENTRIES`], A and AAAA [`ADDRESS_CACHE_ENTRIES`] each,
    /// PTR [`PTR_CACHE_ENTRIES`]. An answer is kept for its TTL, at most [`MAX_CACHE_TTL`]; when
    /// a cache is full the oldest answer goes.
    pub fn system() -> Result<Self, AuthError> {
        let inner = MessageAuthenticator::new_system_conf().map_err(AuthError::Resolver)?;
        Ok(Self::with_caches(inner, false))
    }

    /// An authenticator whose resolver has no name servers: only the records seeded with
    /// [`add_txt`](Self::add_txt), [`add_ipv4`](Self::add_ipv4), [`add_ipv6`](Self::add_ipv6)
    /// and [`add_mx`](Self::add_mx) exist, and nothing touches the network.
    ///
    /// A TXT or MX name not seeded is answered "no such name" (so SPF is `none`, DMARC finds no
    /// record, a DKIM key is missing: `permerror`); an A or AAAA name not seeded is a temporary
    /// error (an SPF `a`, `mx` or `exists` mechanism that needs it is `temperror`).
    pub fn offline() -> Result<Self, AuthError> {
        let mut options = ResolverOpts::default();
        options.use_hosts_file = ResolveHosts::Never;
        let inner =
            MessageAuthenticator::new(ResolverConfig::from_name_servers(Vec::new()), options)
                .map_err(AuthError::Resolver)?;
        Ok(Self::with_caches(inner, true))
    }

    fn with_caches(inner: MessageAuthenticator, is_offline: bool) -> Self {
        let nxdomain = Txt::Error(mail_auth::Error::Dns(DnsError::RecordNotFound(
            ResponseCode::NXDomain,
        )));
        let no_mx = RecordSet {
            rrset: Arc::from(Vec::new()),
            dnssec_status: DnssecStatus::Indeterminate,
        };
        let (txt_miss, mx_miss) = if is_offline {
            (Some(nxdomain), Some(no_mx))
        } else {
            (None, None)
        };
        // Offline, nothing is ever learnt: the resolver answers nothing.
        let size = |n: usize| if is_offline { 0 } else { n };
        Self {
            inner,
            // mail-auth caches a TXT lookup's failure to parse as the type it asked for (an
            // `include:` of a DMARC record name, say) under the name, whatever type a later
            // lookup asks for: keeping only records that parsed stops such an entry from hiding
            // the name's real record.
            txt: DnsCache::new(size(TXT_CACHE_ENTRIES), txt_miss)
                .keeping(|t| !matches!(t, Txt::Error(_))),
            mx: DnsCache::new(size(MX_CACHE_ENTRIES), mx_miss),
            ipv4: DnsCache::new(size(ADDRESS_CACHE_ENTRIES), None),
            ipv6: DnsCache::new(size(ADDRESS_CACHE_ENTRIES), None),
            ptr: DnsCache::new(size(PTR_CACHE_ENTRIES), None),
            is_offline,
        }
    }

    /// Seeds the TXT record `txt` at `name` (case-insensitive, a trailing dot optional): an SPF
    /// record (`v=spf1`), a DMARC record (`v=DMARC1`, or any record under `_dmarc.`) or a DKIM
    /// key (`v=DKIM1`, a `p=` tag, or any record under `._domainkey.`). It then answers every
    /// lookup of the name, before and instead of DNS.
    ///
    /// One record per name: a later one replaces an earlier one, except that a record that is
    /// none of the three kinds never replaces one that is. A record that does not parse is
    /// seeded as that failure, as mail-auth would have cached it from DNS (so SPF on the name
    /// is `permerror`, say), and one of no known kind as "no record of the kind asked"; use
    /// [`try_add_txt`](Self::try_add_txt) to be told instead.
    pub fn add_txt(&self, name: &str, txt: &str) {
        let entry = match parse_txt(name, txt) {
            Ok(parsed) => parsed,
            Err(AuthError::InvalidRecord { source, .. }) => Txt::Error(source),
            Err(_) => Txt::Error(mail_auth::Error::Dns(DnsError::InvalidRecordType)),
        };
        let key = fqdn(name);
        if matches!(entry, Txt::Error(_))
            && self
                .txt
                .pinned(&key)
                .is_some_and(|old| !matches!(old, Txt::Error(_)))
        {
            return;
        }
        self.txt.pin(key, entry);
    }

    /// Like [`add_txt`](Self::add_txt), but a record that does not parse, or is of no known
    /// kind, is refused and seeds nothing.
    pub fn try_add_txt(&self, name: &str, txt: &str) -> Result<(), AuthError> {
        let entry = parse_txt(name, txt)?;
        self.txt.pin(fqdn(name), entry);
        Ok(())
    }

    /// Seeds an A record: `addr` is added to `name`'s addresses.
    pub fn add_ipv4(&self, name: &str, addr: Ipv4Addr) {
        self.ipv4.pin_add(fqdn(name), addr);
    }

    /// Seeds an AAAA record: `addr` is added to `name`'s addresses.
    pub fn add_ipv6(&self, name: &str, addr: Ipv6Addr) {
        self.ipv6.pin_add(fqdn(name), addr);
    }

    /// Seeds `name`'s MX records as (preference, exchange) pairs, replacing any seeded before.
    /// An empty list is a name without MX records.
    pub fn add_mx(&self, name: &str, records: Vec<(u16, String)>) {
        let mut by_preference: Vec<(u16, Vec<Box<str>>)> = Vec::new();
        for (preference, exchange) in records {
            let exchange = fqdn(&exchange);
            match by_preference.iter_mut().find(|(p, _)| *p == preference) {
                Some((_, exchanges)) => exchanges.push(exchange),
                None => by_preference.push((preference, vec![exchange])),
            }
        }
        by_preference.sort_by_key(|(p, _)| *p);
        let rrset: Arc<[MX]> = by_preference
            .into_iter()
            .map(|(preference, exchanges)| MX {
                exchanges: exchanges.into_boxed_slice(),
                preference,
            })
            .collect();
        self.mx.pin(
            fqdn(name),
            RecordSet {
                rrset,
                dnssec_status: DnssecStatus::Indeterminate,
            },
        );
    }

    /// Checks SPF, DKIM and DMARC for one message. Never fails: DNS trouble is a `temperror`
    /// and a message that cannot be parsed has no signatures and no From domain.
    pub async fn check(&self, input: &AuthInput<'_>) -> AuthOutcome {
        let hostname = sanitize_hostname(input.hostname);
        let mail_from = input
            .mail_from
            .trim()
            .trim_start_matches('<')
            .trim_end_matches('>');
        let helo = input.helo.trim();

        // SPF.
        let spf = self
            .check_spf(input.client_ip, helo, mail_from, &hostname)
            .await;
        let spf_verdict = spf
            .as_ref()
            .map_or(Verdict::None, |o| spf_verdict(o.result()));
        let spf_fragment = spf_fragment(&hostname, spf.as_ref(), input.client_ip, helo, mail_from);

        // DKIM.
        let mut message = AuthenticatedMessage::parse(input.message);
        if let Some(message) = message.as_mut() {
            cap_signatures(message);
        }
        let header_from = message.as_ref().map_or("", |m| m.from());
        let dkim = match &message {
            Some(message) => tokio::time::timeout(
                STEP_TIMEOUT,
                self.inner.verify_dkim(self.parameters(message)),
            )
            .await
            .ok(),
            None => Some(Vec::new()),
        };
        let (dkim_verdict, dkim_fragment) = match &dkim {
            Some(outputs) => (
                best_dkim_verdict(outputs),
                dkim_fragment(&hostname, outputs, header_from),
            ),
            None => (
                Verdict::TempError,
                ";\r\n\tdkim=temperror (timed out)".to_owned(),
            ),
        };

        // DMARC, on the identity SPF checked.
        let spf_domain = identity_domain(mail_from, helo);
        let dmarc = match &message {
            Some(message) => {
                let no_spf = SpfOutput::default();
                let no_dkim = Vec::new();
                let params = DmarcParameters::new(
                    message,
                    dkim.as_deref().unwrap_or(&no_dkim),
                    &spf_domain,
                    spf.as_ref().unwrap_or(&no_spf),
                );
                tokio::time::timeout(
                    STEP_TIMEOUT,
                    self.inner.verify_dmarc(self.parameters(params)),
                )
                .await
                .ok()
            }
            None => Some(DmarcOutput::default()),
        };
        let (dmarc, dmarc_verdict) = match dmarc {
            Some(output) => {
                let may_pass_later =
                    may_pass_later(output.domain(), spf_verdict, &spf_domain, dkim.as_deref());
                settle_dmarc(output, may_pass_later)
            }
            None => (None, Verdict::TempError),
        };
        let dmarc_fragment = dmarc_fragment(&hostname, dmarc.as_ref());
        let dmarc_policy = match (&dmarc, dmarc_verdict) {
            (Some(output), Verdict::Fail) => Some(policy(output.policy())),
            _ => None,
        };

        let reasons = reasons(spf_verdict, dkim_verdict, dmarc_verdict, dmarc_policy);
        if !reasons.is_empty() {
            tracing::debug!(
                spf = %spf_verdict,
                dkim = %dkim_verdict,
                dmarc = %dmarc_verdict,
                reasons = ?reasons,
                "message authentication"
            );
        }
        AuthOutcome {
            spf: spf_verdict,
            dkim: dkim_verdict,
            dmarc: dmarc_verdict,
            dmarc_policy,
            header: format!(
                "Authentication-Results: {hostname}{spf_fragment}{dkim_fragment}{dmarc_fragment}\r\n"
            ),
            reasons,
        }
    }

    /// SPF of MAIL FROM, or of HELO for the null sender; `None` when it is not checked.
    async fn check_spf(
        &self,
        client_ip: Option<IpAddr>,
        helo: &str,
        mail_from: &str,
        hostname: &str,
    ) -> Option<SpfOutput> {
        let ip = client_ip?;
        let domain = identity_domain(mail_from, helo);
        // RFC 7208 §2.3: an address literal has no SPF record to check.
        if domain.starts_with('[') || domain.parse::<IpAddr>().is_ok() {
            return None;
        }
        let params = if mail_from.is_empty() {
            SpfParameters::verify_ehlo(ip, helo, hostname)
        } else {
            SpfParameters::verify_mail_from(ip, helo, hostname, mail_from)
        };
        let spf =
            tokio::time::timeout(STEP_TIMEOUT, self.inner.verify_spf(self.parameters(params)))
                .await;
        Some(spf.unwrap_or_else(|_| SpfOutput::new(domain).with_result(SpfResult::TempError)))
    }

    /// mail-auth's parameters with this authenticator's caches.
    fn parameters<P>(&self, params: P) -> CachedParameters<'_, P> {
        Parameters::new(params)
            .with_txt_cache(&self.txt)
            .with_mx_cache(&self.mx)
            .with_ipv4_cache(&self.ipv4)
            .with_ipv6_cache(&self.ipv6)
            .with_ptr_cache(&self.ptr)
    }
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("is_offline", &self.is_offline)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for AuthInput<'_> {
    /// The message by its size only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthInput")
            .field("message_len", &self.message.len())
            .field("client_ip", &self.client_ip)
            .field("helo", &self.helo)
            .field("mail_from", &self.mail_from)
            .field("hostname", &self.hostname)
            .finish()
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pass => "pass",
            Self::Fail => "fail",
            Self::SoftFail => "softfail",
            Self::Neutral => "neutral",
            Self::None => "none",
            Self::TempError => "temperror",
            Self::PermError => "permerror",
        })
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Quarantine => "quarantine",
            Self::Reject => "reject",
        })
    }
}

/// Parses a seeded TXT record into the kind its content, or else its name, says.
fn parse_txt(name: &str, txt: &str) -> Result<Txt, AuthError> {
    let value = txt.trim();
    let lower = value.to_ascii_lowercase();
    // The version tag: SPF's is the first word (RFC 7208 §4.5); DKIM's and DMARC's the first
    // tag, whitespace allowed around `=` (RFC 6376 §3.2).
    let first_tag: String = lower
        .split(';')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let name_lower = fqdn(name);
    let kind = if lower.split_whitespace().next() == Some("v=spf1") {
        "spf"
    } else if first_tag == "v=dmarc1" || name_lower.starts_with("_dmarc.") {
        "dmarc"
    } else if first_tag == "v=dkim1"
        || name_lower.contains("._domainkey.")
        || lower
            .split(';')
            .any(|tag| tag.trim_start().starts_with("p="))
    {
        "dkim"
    } else {
        return Err(AuthError::UnknownRecord {
            name: name.to_owned(),
        });
    };
    let bytes = value.as_bytes();
    let parsed = match kind {
        "spf" => Spf::parse(bytes).map(Txt::from),
        "dmarc" => Dmarc::parse(bytes).map(Txt::from),
        _ => DomainKey::parse(bytes).map(Txt::from),
    };
    parsed.map_err(|source| AuthError::InvalidRecord {
        name: name.to_owned(),
        kind,
        source,
    })
}

/// A name as mail-auth looks it up: lower case, with the trailing dot.
fn fqdn(name: &str) -> Box<str> {
    name.trim().to_fqdn().into_owned().into_boxed_str()
}

/// The domain of the identity SPF checks (and DMARC aligns): MAIL FROM's, or HELO for the null
/// sender (or a MAIL FROM without `@`, as mail-auth does), lower case.
fn identity_domain(mail_from: &str, helo: &str) -> String {
    mail_from
        .rsplit_once('@')
        .map_or(helo, |(_, domain)| domain)
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

/// Our host name as a header-safe token (it comes from our configuration, but a CR or a `;`
/// would break the field).
fn sanitize_hostname(hostname: &str) -> String {
    let clean: String = hostname
        .chars()
        .filter(|c| c.is_ascii_graphic() && !matches!(c, ';' | '(' | ')' | '"' | '\\'))
        .collect();
    if clean.is_empty() {
        "localhost".to_owned()
    } else {
        clean
    }
}

/// Keeps at most [`MAX_DKIM_SIGNATURES`] signatures, valid ones first.
fn cap_signatures(message: &mut AuthenticatedMessage<'_>) {
    let total = message.dkim_headers.len()
        + message
            .errors
            .iter()
            .filter(|e| matches!(e.header, mail_auth::Error::Dkim(_)))
            .count();
    if total <= MAX_DKIM_SIGNATURES {
        return;
    }
    message.dkim_headers.truncate(MAX_DKIM_SIGNATURES);
    let mut room = MAX_DKIM_SIGNATURES - message.dkim_headers.len();
    message.errors.retain(|e| {
        if !matches!(e.header, mail_auth::Error::Dkim(_)) {
            true
        } else if room > 0 {
            room -= 1;
            true
        } else {
            false
        }
    });
    tracing::debug!(
        signatures = total,
        verified = MAX_DKIM_SIGNATURES,
        "too many DKIM signatures; the first ones are verified"
    );
}

/// The `;\r\n\t<method>=…` part that `results` adds after the host name.
fn fragment(hostname: &str, results: AuthenticationResults<'_>) -> String {
    let text = results.to_string();
    text.strip_prefix(hostname).unwrap_or_default().to_owned()
}

fn spf_verdict(result: SpfResult) -> Verdict {
    match result {
        SpfResult::Pass => Verdict::Pass,
        SpfResult::Fail => Verdict::Fail,
        SpfResult::SoftFail => Verdict::SoftFail,
        SpfResult::Neutral => Verdict::Neutral,
        SpfResult::TempError => Verdict::TempError,
        SpfResult::PermError => Verdict::PermError,
        SpfResult::None => Verdict::None,
    }
}

fn dkim_verdict(result: &DkimResult) -> Verdict {
    match result {
        DkimResult::Pass => Verdict::Pass,
        // RFC 6376 §6.1.3: a body hash that does not verify is a PERMFAIL, i.e. a failed
        // signature; mail-auth reports it as neutral.
        DkimResult::Neutral(mail_auth::Error::Dkim(DkimError::FailedBodyHashMatch)) => {
            Verdict::Fail
        }
        DkimResult::Neutral(_) => Verdict::Neutral,
        DkimResult::Fail(_) => Verdict::Fail,
        DkimResult::PermError(_) => Verdict::PermError,
        DkimResult::TempError(_) => Verdict::TempError,
        DkimResult::None => Verdict::None,
    }
}

/// The most favourable signature result (see [`AuthOutcome::dkim`]).
fn best_dkim_verdict(outputs: &[DkimOutput<'_>]) -> Verdict {
    const ORDER: [Verdict; 5] = [
        Verdict::Pass,
        Verdict::TempError,
        Verdict::Neutral,
        Verdict::PermError,
        Verdict::Fail,
    ];
    let verdicts: Vec<Verdict> = outputs.iter().map(|o| dkim_verdict(o.result())).collect();
    ORDER
        .into_iter()
        .find(|v| verdicts.contains(v))
        .unwrap_or(Verdict::None)
}

/// The `spf=` result; `output` is `None` when SPF was not checked.
fn spf_fragment(
    hostname: &str,
    output: Option<&SpfOutput>,
    client_ip: Option<IpAddr>,
    helo: &str,
    mail_from: &str,
) -> String {
    let results = AuthenticationResults::new(hostname);
    match (output, client_ip) {
        (Some(output), Some(ip)) if mail_from.is_empty() => {
            fragment(hostname, results.with_spf_ehlo_result(output, ip, helo))
        }
        (Some(output), Some(ip)) => fragment(
            hostname,
            results.with_spf_mailfrom_result(output, ip, mail_from, helo),
        ),
        (_, None) => ";\r\n\tspf=none (no client address)".to_owned(),
        (None, Some(_)) => ";\r\n\tspf=none (no domain to check)".to_owned(),
    }
}

/// One `dkim=` result per signature; `dkim=none` without any.
fn dkim_fragment(hostname: &str, outputs: &[DkimOutput<'_>], header_from: &str) -> String {
    if outputs.is_empty() {
        return ";\r\n\tdkim=none".to_owned();
    }
    let mut text = String::new();
    for output in outputs {
        let result = AuthenticationResults::new(hostname);
        let part = match (output.result(), output.signature()) {
            (
                DkimResult::Neutral(err @ mail_auth::Error::Dkim(DkimError::FailedBodyHashMatch)),
                Some(signature),
            ) => {
                let failed = DkimOutput::fail(err.clone()).with_signature(signature);
                fragment(hostname, result.with_dkim_result(&failed, header_from))
            }
            _ => fragment(hostname, result.with_dkim_result(output, header_from)),
        };
        text.push_str(&part);
    }
    text
}

/// The `dmarc=` result; `output` is `None` when DMARC timed out.
fn dmarc_fragment(hostname: &str, output: Option<&DmarcOutput>) -> String {
    match output {
        Some(output) if !output.domain().is_empty() => fragment(
            hostname,
            AuthenticationResults::new(hostname).with_dmarc_result(output),
        ),
        // No From domain, or several (RFC 7489 §6.6.1: not checked).
        Some(_) => ";\r\n\tdmarc=none".to_owned(),
        None => ";\r\n\tdmarc=temperror (timed out)".to_owned(),
    }
}

/// Whether a DMARC failure for `from_domain` might turn into a pass later: SPF or a DKIM
/// signature had a temporary error for a domain that could align with it.
fn may_pass_later(
    from_domain: &str,
    spf: Verdict,
    spf_domain: &str,
    dkim: Option<&[DkimOutput<'_>]>,
) -> bool {
    let Some(dkim) = dkim else {
        return true; // timed out: any signature might have passed
    };
    (spf == Verdict::TempError && could_align(spf_domain, from_domain))
        || dkim.iter().any(|o| {
            matches!(o.result(), DkimResult::TempError(_))
                && o.signature()
                    .is_some_and(|s| could_align(&s.d, from_domain))
        })
}

/// Whether two domains are the same or one is a subdomain of the other. Relaxed alignment also
/// accepts siblings under one organizational domain; that case is left out, so a temporary
/// error on an unrelated domain cannot turn a DMARC failure into a deferral.
fn could_align(a: &str, b: &str) -> bool {
    let a = a.trim_end_matches('.').to_ascii_lowercase();
    let b = b.trim_end_matches('.').to_ascii_lowercase();
    !b.is_empty() && (a == b || a.ends_with(&format!(".{b}")) || b.ends_with(&format!(".{a}")))
}

/// The DMARC verdict, and the output to write the header from (adjusted to say the same).
fn settle_dmarc(output: DmarcOutput, may_pass_later: bool) -> (Option<DmarcOutput>, Verdict) {
    let spf = output.spf_result();
    let dkim = output.dkim_result();
    let verdict = if *spf == DmarcResult::Pass || *dkim == DmarcResult::Pass {
        Verdict::Pass
    } else if matches!(spf, DmarcResult::TempError(_)) || matches!(dkim, DmarcResult::TempError(_))
    {
        Verdict::TempError
    } else if matches!(spf, DmarcResult::PermError(_)) || matches!(dkim, DmarcResult::PermError(_))
    {
        Verdict::PermError
    } else if output.dmarc_record().is_none() {
        Verdict::None
    } else if may_pass_later {
        let err = mail_auth::Error::Dns(DnsError::Resolver(
            "temporary error on an identifier that may align".to_owned(),
        ));
        return (
            Some(output.with_spf_result(DmarcResult::TempError(err))),
            Verdict::TempError,
        );
    } else if *spf == DmarcResult::None && *dkim == DmarcResult::None {
        // A record, and neither SPF nor DKIM passed: mail-auth leaves both results at none.
        return (
            Some(output.with_spf_result(DmarcResult::Fail(mail_auth::Error::NotAligned))),
            Verdict::Fail,
        );
    } else {
        Verdict::Fail
    };
    (Some(output), verdict)
}

fn policy(policy: mail_auth::dmarc::Policy) -> Policy {
    match policy {
        mail_auth::dmarc::Policy::Reject => Policy::Reject,
        mail_auth::dmarc::Policy::Quarantine => Policy::Quarantine,
        mail_auth::dmarc::Policy::None | mail_auth::dmarc::Policy::Unspecified => Policy::None,
    }
}

fn reasons(spf: Verdict, dkim: Verdict, dmarc: Verdict, policy: Option<Policy>) -> Vec<String> {
    let mut reasons = Vec::new();
    for (method, verdict) in [("SPF", spf), ("DKIM", dkim), ("DMARC", dmarc)] {
        let what = match verdict {
            Verdict::Fail => "FAIL",
            Verdict::SoftFail => "SOFTFAIL",
            Verdict::TempError => "TEMPERROR",
            Verdict::PermError => "PERMERROR",
            Verdict::Pass | Verdict::Neutral | Verdict::None => continue,
        };
        reasons.push(format!("{method}_{what}"));
    }
    match policy {
        Some(Policy::Reject) => reasons.push("DMARC_REJECT".to_owned()),
        Some(Policy::Quarantine) => reasons.push("DMARC_QUARANTINE".to_owned()),
        Some(Policy::None) | None => {}
    }
    reasons
}

/// Entries of the TXT cache of [`Authenticator::system`].
pub const TXT_CACHE_ENTRIES: usize = 4096;
/// Entries of the MX cache of [`Authenticator::system`].
pub const MX_CACHE_ENTRIES: usize = 1024;
/// Entries of each of the A and AAAA caches of [`Authenticator::system`].
pub const ADDRESS_CACHE_ENTRIES: usize = 4096;
/// Entries of the PTR cache of [`Authenticator::system`].
pub const PTR_CACHE_ENTRIES: usize = 1024;
/// The longest a DNS answer is cached, whatever its TTL.
pub const MAX_CACHE_TTL: Duration = Duration::from_secs(3600);

/// mail-auth's cache interface takes std's `Instant` (its expiry times come from hickory).
#[allow(clippy::disallowed_types)]
type StdInstant = std::time::Instant;

/// Now, on tokio's clock when there is one, as the `Instant` type mail-auth uses.
fn now() -> StdInstant {
    tokio::time::Instant::now().into_std()
}

/// A cache of DNS answers for mail-auth: pinned entries (seeded records, kept forever and
/// preferred) and learnt ones (from DNS, kept for their TTL, at most `capacity`, the oldest
/// evicted first).
struct DnsCache<K, V> {
    state: Mutex<CacheState<K, V>>,
    /// How many learnt answers are kept; 0 keeps none.
    capacity: usize,
    /// The answer to a name neither pinned nor learnt; `None` lets mail-auth ask its resolver.
    on_miss: Option<V>,
    /// Which learnt answers are worth keeping.
    keep: fn(&V) -> bool,
}

struct CacheState<K, V> {
    pinned: HashMap<K, V>,
    learnt: HashMap<K, Learnt<V>>,
    /// Learnt keys in insertion order, with the sequence number of that insertion; a key
    /// re-inserted or removed since has a stale entry here, skipped when its turn comes.
    order: VecDeque<(K, u64)>,
    next_seq: u64,
}

struct Learnt<V> {
    value: V,
    expires: StdInstant,
    seq: u64,
}

impl<K: Hash + Eq + Clone, V: Clone> DnsCache<K, V> {
    fn new(capacity: usize, on_miss: Option<V>) -> Self {
        Self {
            state: Mutex::new(CacheState {
                pinned: HashMap::new(),
                learnt: HashMap::new(),
                order: VecDeque::new(),
                next_seq: 0,
            }),
            capacity,
            on_miss,
            keep: |_| true,
        }
    }

    fn keeping(self, keep: fn(&V) -> bool) -> Self {
        Self { keep, ..self }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState<K, V>> {
        // Every critical section leaves the state consistent, so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn pin(&self, key: K, value: V) {
        let mut state = self.lock();
        state.learnt.remove(&key);
        state.pinned.insert(key, value);
    }

    fn pinned(&self, key: &K) -> Option<V> {
        self.lock().pinned.get(key).cloned()
    }

    fn get_at<Q>(&self, name: &Q, now: StdInstant) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut state = self.lock();
        if let Some(value) = state.pinned.get(name) {
            return Some(value.clone());
        }
        if let Some(entry) = state.learnt.get(name) {
            if entry.expires > now {
                return Some(entry.value.clone());
            }
            state.learnt.remove(name);
        }
        self.on_miss.clone()
    }

    fn insert_at(&self, key: K, value: V, valid_until: StdInstant, now: StdInstant) {
        let expires = valid_until.min(now + MAX_CACHE_TTL);
        if self.capacity == 0 || expires <= now || !(self.keep)(&value) {
            return;
        }
        let mut state = self.lock();
        if state.pinned.contains_key(&key) {
            return;
        }
        let CacheState {
            learnt,
            order,
            next_seq,
            ..
        } = &mut *state;
        let seq = *next_seq;
        *next_seq += 1;
        order.push_back((key.clone(), seq));
        learnt.insert(
            key,
            Learnt {
                value,
                expires,
                seq,
            },
        );
        while learnt.len() > self.capacity {
            let Some((old, old_seq)) = order.pop_front() else {
                break;
            };
            if learnt.get(&old).is_some_and(|e| e.seq == old_seq) {
                learnt.remove(&old);
            }
        }
        // Stale order entries pile up when keys are re-inserted; drop them now and then.
        if order.len() > 2 * self.capacity {
            order.retain(|(k, s)| learnt.get(k).is_some_and(|e| e.seq == *s));
        }
    }
}

impl<K: Hash + Eq + Clone, T: Clone> DnsCache<K, RecordSet<T>> {
    /// Adds `value` to the pinned set of `key`.
    fn pin_add(&self, key: K, value: T) {
        let mut state = self.lock();
        state.learnt.remove(&key);
        let mut values: Vec<T> = state
            .pinned
            .get(&key)
            .map(|set| set.rrset.to_vec())
            .unwrap_or_default();
        values.push(value);
        state.pinned.insert(
            key,
            RecordSet {
                rrset: Arc::from(values),
                dnssec_status: DnssecStatus::Indeterminate,
            },
        );
    }
}

impl<K: Hash + Eq + Clone, V: Clone> ResolverCache<K, V> for DnsCache<K, V> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get_at(name, now())
    }

    /// Forgets a learnt answer; pinned records stay.
    fn remove<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.lock().learnt.remove(name).map(|e| e.value)
    }

    fn insert(&self, key: K, value: V, valid_until: StdInstant) {
        self.insert_at(key, value, valid_until, now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use mail_auth::common::crypto::Ed25519Key;
    use mail_auth::common::headers::HeaderWriter as _;
    use mail_auth::dkim::DkimSigner;
    use mail_auth::dkim::generate::DkimKeyPair;

    const HOSTNAME: &str = "mx.ours.test";
    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
    const OTHER_CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));

    /// A message from `from`.
    fn message(from: &str) -> String {
        format!(
            concat!(
                "From: Alice <{}>\r\n",
                "To: bob@ours.test\r\n",
                "Subject: Lunch on Friday?\r\n",
                "Date: Fri, 6 Nov 2026 10:00:00 +0000\r\n",
                "Message-ID: <1@example.test>\r\n",
                "\r\n",
                "Shall we meet at noon?\r\n",
            ),
            from
        )
    }

    fn input<'a>(
        message: &'a str,
        client_ip: Option<IpAddr>,
        helo: &'a str,
        mail_from: &'a str,
    ) -> AuthInput<'a> {
        AuthInput {
            message: message.as_bytes(),
            client_ip,
            helo,
            mail_from,
            hostname: HOSTNAME,
        }
    }

    /// Signs `message` for `domain` with a new Ed25519 key, seeding its key record in `auth`;
    /// returns the signed message.
    fn sign(auth: &Authenticator, domain: &str, selector: &str, message: &str) -> String {
        let pair = DkimKeyPair::generate_ed25519().unwrap();
        auth.try_add_txt(
            &format!("{selector}._domainkey.{domain}"),
            &format!("v=DKIM1; k=ed25519; p={}", pair.encoded_public_key()),
        )
        .unwrap();
        let key = Ed25519Key::from_pkcs8_der(pair.private_key()).unwrap();
        let header = DkimSigner::from_key(key)
            .domain(domain)
            .selector(selector)
            .headers(["From", "To", "Subject", "Date", "Message-ID"])
            .sign(message.as_bytes())
            .unwrap()
            .to_header();
        format!("{header}{message}")
    }

    /// An offline authenticator with SPF for example.test's mail servers (192.0.2.0/24).
    fn example() -> Authenticator {
        let auth = Authenticator::offline().unwrap();
        auth.add_txt("example.test", "v=spf1 ip4:192.0.2.0/24 -all");
        auth.add_txt("bounce.example.test", "v=spf1 ip4:192.0.2.0/24 -all");
        auth.add_txt("soft.test", "v=spf1 ip4:192.0.2.0/24 ~all");
        auth.add_txt("unrelated.test", "v=spf1 ip4:192.0.2.0/24 -all");
        auth
    }

    #[tokio::test]
    async fn spf_pass_fail_softfail_by_client_ip() {
        let auth = example();
        let msg = message("alice@elsewhere.test");
        for (ip, mail_from, verdict, reasons) in [
            (CLIENT, "alice@example.test", Verdict::Pass, &[][..]),
            (
                OTHER_CLIENT,
                "alice@example.test",
                Verdict::Fail,
                &["SPF_FAIL"][..],
            ),
            (CLIENT, "alice@soft.test", Verdict::Pass, &[][..]),
            (
                OTHER_CLIENT,
                "alice@soft.test",
                Verdict::SoftFail,
                &["SPF_SOFTFAIL"][..],
            ),
            // Case and angle brackets do not matter.
            (CLIENT, "<Alice@EXAMPLE.test>", Verdict::Pass, &[][..]),
        ] {
            let out = auth
                .check(&input(&msg, Some(ip), "client.test", mail_from))
                .await;
            assert_eq!(out.spf, verdict, "{ip} {mail_from}");
            assert_eq!(out.reasons, reasons, "{ip} {mail_from}");
            assert!(
                out.header.contains(&format!("\tspf={verdict} (")),
                "{}",
                out.header
            );
        }
    }

    #[tokio::test]
    async fn spf_none_without_a_record_or_a_client_address() {
        let auth = example();
        let msg = message("alice@elsewhere.test");
        // Offline, a name that was not seeded has no records: none, as NXDOMAIN would be.
        let out = auth
            .check(&input(&msg, Some(CLIENT), "client.test", "a@nospf.test"))
            .await;
        assert_eq!(out.spf, Verdict::None);
        assert!(out.reasons.is_empty(), "{:?}", out.reasons);
        assert!(out.header.contains("\tspf=none ("), "{}", out.header);

        // A TXT record that is not SPF is no SPF record either.
        auth.add_txt("verified.test", "site-verification=abc");
        let out = auth
            .check(&input(&msg, Some(CLIENT), "client.test", "a@verified.test"))
            .await;
        assert_eq!(out.spf, Verdict::None);

        // No client address: not checked.
        let out = auth
            .check(&input(&msg, None, "client.test", "a@example.test"))
            .await;
        assert_eq!(out.spf, Verdict::None);
        assert!(
            out.header.contains("\tspf=none (no client address)"),
            "{}",
            out.header
        );

        // An address literal as HELO for the null sender: nothing to check.
        let out = auth
            .check(&input(&msg, Some(CLIENT), "[192.0.2.7]", ""))
            .await;
        assert_eq!(out.spf, Verdict::None);
    }

    #[tokio::test]
    async fn spf_checks_helo_for_the_null_sender() {
        let auth = example();
        auth.add_txt("mx.example.test", "v=spf1 ip4:192.0.2.7 -all");
        let msg = message("mailer-daemon@mx.example.test");
        let out = auth
            .check(&input(&msg, Some(CLIENT), "mx.example.test", ""))
            .await;
        assert_eq!(out.spf, Verdict::Pass);
        assert!(
            out.header.contains("smtp.helo=mx.example.test"),
            "{}",
            out.header
        );
        let out = auth
            .check(&input(&msg, Some(OTHER_CLIENT), "mx.example.test", ""))
            .await;
        assert_eq!(out.spf, Verdict::Fail);
        // The same HELO with a sender: MAIL FROM is what counts.
        let out = auth
            .check(&input(
                &msg,
                Some(OTHER_CLIENT),
                "mx.example.test",
                "a@nospf.test",
            ))
            .await;
        assert_eq!(out.spf, Verdict::None);
    }

    #[tokio::test]
    async fn spf_address_lookups_offline_need_seeded_records() {
        let auth = Authenticator::offline().unwrap();
        auth.add_txt("a.test", "v=spf1 a:host.a.test -all");
        auth.add_txt("mx.test", "v=spf1 mx -all");
        auth.add_txt("inc.test", "v=spf1 include:a.test -all");
        let msg = message("x@a.test");
        let check = |mail_from: &'static str| {
            let msg = msg.clone();
            let auth = &auth;
            async move {
                auth.check(&input(&msg, Some(CLIENT), "client.test", mail_from))
                    .await
            }
        };

        // An A lookup that was not seeded is a temporary error offline.
        let out = check("x@a.test").await;
        assert_eq!(out.spf, Verdict::TempError);
        assert_eq!(out.reasons, ["SPF_TEMPERROR"]);
        assert!(out.header.contains("\tspf=temperror ("), "{}", out.header);

        auth.add_ipv4("host.a.test", Ipv4Addr::new(203, 0, 113, 1));
        assert_eq!(check("x@a.test").await.spf, Verdict::Fail);
        auth.add_ipv4("host.a.test", Ipv4Addr::new(192, 0, 2, 7));
        assert_eq!(check("x@a.test").await.spf, Verdict::Pass);
        assert_eq!(check("x@inc.test").await.spf, Verdict::Pass);

        // MX: a name without seeded MX records has none; the exchanges' addresses count.
        assert_eq!(check("x@mx.test").await.spf, Verdict::Fail);
        auth.add_mx(
            "mx.test",
            vec![(20, "mx2.mx.test".into()), (10, "MX1.mx.test.".into())],
        );
        assert_eq!(check("x@mx.test").await.spf, Verdict::TempError);
        auth.add_ipv4("mx1.mx.test", Ipv4Addr::new(203, 0, 113, 9));
        auth.add_ipv6("mx1.mx.test", "2001:db8::25".parse().unwrap());
        auth.add_ipv4("mx2.mx.test", Ipv4Addr::new(192, 0, 2, 7));
        assert_eq!(check("x@mx.test").await.spf, Verdict::Pass);
    }

    #[tokio::test]
    async fn dkim_signed_message_passes() {
        let auth = Authenticator::offline().unwrap();
        let signed = sign(&auth, "example.test", "s1", &message("alice@example.test"));
        let out = auth
            .check(&input(&signed, None, "client.test", "alice@example.test"))
            .await;
        assert_eq!(out.dkim, Verdict::Pass);
        assert!(
            out.header
                .contains("\tdkim=pass header.d=example.test header.s=s1 header.b="),
            "{}",
            out.header
        );
        // Relaxed canonicalization: re-folding a signed field still verifies.
        let refolded = signed.replace("Lunch on Friday?", "Lunch on\r\n  Friday?");
        let out = auth.check(&input(&refolded, None, "client.test", "")).await;
        assert_eq!(out.dkim, Verdict::Pass);
    }

    #[tokio::test]
    async fn dkim_fails_when_the_body_changes() {
        let auth = Authenticator::offline().unwrap();
        let signed = sign(&auth, "example.test", "s1", &message("alice@example.test"));
        let tampered = signed.replace("at noon", "at one");
        assert_ne!(tampered, signed);
        let out = auth.check(&input(&tampered, None, "client.test", "")).await;
        assert_eq!(out.dkim, Verdict::Fail);
        assert_eq!(out.reasons, ["DKIM_FAIL"]);
        // mail-auth says neutral; RFC 6376 §6.1.3 makes it a failed signature.
        assert!(
            out.header
                .contains("\tdkim=fail (body hash did not verify) header.d=example.test"),
            "{}",
            out.header
        );
    }

    #[tokio::test]
    async fn dkim_fails_when_a_signed_header_changes() {
        let auth = Authenticator::offline().unwrap();
        let signed = sign(&auth, "example.test", "s1", &message("alice@example.test"));
        for tampered in [
            signed.replace("Subject: Lunch", "Subject: Dinner"),
            signed.replace("From: Alice", "From: Mallory"),
        ] {
            assert_ne!(tampered, signed);
            let out = auth.check(&input(&tampered, None, "client.test", "")).await;
            assert_eq!(out.dkim, Verdict::Fail, "{tampered}");
            assert_eq!(out.reasons, ["DKIM_FAIL"]);
            assert!(out.header.contains("\tdkim=fail ("), "{}", out.header);
        }
        // An unsigned header field may change.
        let added = signed.replacen("\r\n\r\n", "\r\nX-Note: hi\r\n\r\n", 1);
        let out = auth.check(&input(&added, None, "client.test", "")).await;
        assert_eq!(out.dkim, Verdict::Pass);
    }

    #[tokio::test]
    async fn dkim_missing_key_is_permerror_and_any_pass_wins() {
        let auth = Authenticator::offline().unwrap();
        let msg = message("alice@example.test");
        let signed = sign(&auth, "example.test", "s1", &msg);
        // Signed again by a domain whose key is not published.
        let other = Authenticator::offline().unwrap();
        let twice = sign(&other, "nokey.test", "s2", &signed);

        let out = auth.check(&input(&twice, None, "client.test", "")).await;
        assert_eq!(out.dkim, Verdict::Pass);
        assert!(
            out.header.contains("\tdkim=pass header.d=example.test"),
            "{}",
            out.header
        );
        assert!(
            out.header
                .contains("\tdkim=permerror (dns record not found) header.d=nokey.test"),
            "{}",
            out.header
        );

        let only_missing = sign(&other, "nokey.test", "s2", &msg);
        let out = auth
            .check(&input(&only_missing, None, "client.test", ""))
            .await;
        assert_eq!(out.dkim, Verdict::PermError);
        assert_eq!(out.reasons, ["DKIM_PERMERROR"]);

        let out = auth.check(&input(&msg, None, "client.test", "")).await;
        assert_eq!(out.dkim, Verdict::None);
        assert!(out.header.contains("\tdkim=none"), "{}", out.header);
    }

    #[tokio::test]
    async fn dkim_verifies_at_most_five_signatures() {
        let auth = Authenticator::offline().unwrap();
        // The passing signature is the first one added, so the last in header order.
        let mut signed = sign(
            &auth,
            "example.test",
            "good",
            &message("alice@example.test"),
        );
        let other = Authenticator::offline().unwrap();
        for n in 0..MAX_DKIM_SIGNATURES {
            signed = sign(&other, &format!("n{n}.test"), "s", &signed);
        }
        let out = auth.check(&input(&signed, None, "client.test", "")).await;
        assert_eq!(out.header.matches("\tdkim=").count(), MAX_DKIM_SIGNATURES);
        assert!(
            !out.header.contains("header.d=example.test"),
            "{}",
            out.header
        );
        assert_eq!(out.dkim, Verdict::PermError);

        // Malformed signatures count too, and never crowd out good ones.
        let mut signed = sign(
            &auth,
            "example.test",
            "good",
            &message("alice@example.test"),
        );
        for _ in 0..20 {
            // mail-auth reports this one as neutral (unsupported version) ...
            signed = format!(
                "DKIM-Signature: v=2; a=rsa-sha256; d=x.test; s=s; h=from; bh=AA==; b=AA==\r\n{signed}"
            );
            // ... and leaves this one out (missing parameters).
            signed = format!("DKIM-Signature: v=1; garbage\r\n{signed}");
        }
        let out = auth.check(&input(&signed, None, "client.test", "")).await;
        assert_eq!(out.header.matches("\tdkim=").count(), MAX_DKIM_SIGNATURES);
        assert_eq!(
            out.header.matches("\tdkim=neutral (").count(),
            4,
            "{}",
            out.header
        );
        assert_eq!(out.dkim, Verdict::Pass);
    }

    /// An authenticator for example.test: SPF, and DMARC with `dmarc` (`p=reject` etc.).
    fn dmarc_example(dmarc: &str) -> Authenticator {
        let auth = example();
        auth.try_add_txt("_dmarc.example.test", dmarc).unwrap();
        auth
    }

    #[tokio::test]
    async fn dmarc_passes_with_spf_aligned_by_a_subdomain() {
        let auth = dmarc_example("v=DMARC1; p=reject");
        let msg = message("alice@example.test");
        for mail_from in ["bounce@example.test", "bounce@bounce.example.test"] {
            let out = auth
                .check(&input(&msg, Some(CLIENT), "client.test", mail_from))
                .await;
            assert_eq!(out.spf, Verdict::Pass, "{mail_from}");
            assert_eq!(out.dkim, Verdict::None);
            assert_eq!(out.dmarc, Verdict::Pass, "{mail_from}: {}", out.header);
            assert_eq!(out.dmarc_policy, None);
            assert!(out.reasons.is_empty(), "{:?}", out.reasons);
        }

        // Strict SPF alignment wants the very domain.
        let auth = dmarc_example("v=DMARC1; p=reject; aspf=s");
        let out = auth
            .check(&input(
                &msg,
                Some(CLIENT),
                "client.test",
                "b@bounce.example.test",
            ))
            .await;
        assert_eq!(out.spf, Verdict::Pass);
        assert_eq!(out.dmarc, Verdict::Fail);
        assert_eq!(out.dmarc_policy, Some(Policy::Reject));
    }

    #[tokio::test]
    async fn dmarc_passes_with_aligned_dkim_alone() {
        let auth = dmarc_example("v=DMARC1; p=reject");
        let signed = sign(&auth, "example.test", "s1", &message("alice@example.test"));
        // SPF fails (wrong client), no client at all, or is for an unrelated domain.
        for (ip, mail_from) in [
            (Some(OTHER_CLIENT), "alice@example.test"),
            (None, "alice@example.test"),
            (Some(CLIENT), "x@unrelated.test"),
            (Some(CLIENT), ""),
        ] {
            let out = auth
                .check(&input(&signed, ip, "client.test", mail_from))
                .await;
            assert_eq!(out.dkim, Verdict::Pass);
            assert_eq!(
                out.dmarc,
                Verdict::Pass,
                "{ip:?} {mail_from}: {}",
                out.header
            );
            assert!(!out.reasons.iter().any(|r| r.starts_with("DMARC")));
        }

        // A DKIM signature of a subdomain aligns (relaxed); an unrelated one does not.
        let sub = sign(
            &auth,
            "news.example.test",
            "s1",
            &message("alice@example.test"),
        );
        let out = auth.check(&input(&sub, None, "client.test", "")).await;
        assert_eq!(out.dmarc, Verdict::Pass, "{}", out.header);
        let elsewhere = sign(
            &auth,
            "unrelated.test",
            "s1",
            &message("alice@example.test"),
        );
        let out = auth
            .check(&input(&elsewhere, None, "client.test", ""))
            .await;
        assert_eq!(out.dkim, Verdict::Pass);
        assert_eq!(out.dmarc, Verdict::Fail);
        assert_eq!(out.reasons, ["DMARC_FAIL", "DMARC_REJECT"]);
    }

    #[tokio::test]
    async fn dmarc_fails_with_the_published_policy_when_nothing_aligns() {
        let msg = message("alice@example.test");
        for (record, policy, reasons) in [
            (
                "v=DMARC1; p=reject",
                Policy::Reject,
                &["DMARC_FAIL", "DMARC_REJECT"][..],
            ),
            (
                "v=DMARC1; p=quarantine; rua=mailto:d@example.test",
                Policy::Quarantine,
                &["DMARC_FAIL", "DMARC_QUARANTINE"][..],
            ),
            ("v=DMARC1; p=none", Policy::None, &["DMARC_FAIL"][..]),
            // Test mode lowers the policy one step.
            (
                "v=DMARC1; p=reject; t=y",
                Policy::Quarantine,
                &["DMARC_FAIL", "DMARC_QUARANTINE"][..],
            ),
        ] {
            let auth = dmarc_example(record);
            // SPF passes, but for a domain that does not align; no DKIM.
            let out = auth
                .check(&input(
                    &msg,
                    Some(CLIENT),
                    "client.test",
                    "x@unrelated.test",
                ))
                .await;
            assert_eq!(out.spf, Verdict::Pass);
            assert_eq!(out.dmarc, Verdict::Fail, "{record}");
            assert_eq!(out.dmarc_policy, Some(policy), "{record}");
            assert_eq!(out.reasons, reasons, "{record}");
            assert!(
                out.header.contains(&format!(
                    "\tdmarc=fail (policy not aligned) header.from=example.test policy.dmarc={policy}"
                )),
                "{}",
                out.header
            );
        }

        // SPF fails for the From domain itself and there is no DKIM: the same.
        let auth = dmarc_example("v=DMARC1; p=reject");
        let out = auth
            .check(&input(
                &msg,
                Some(OTHER_CLIENT),
                "client.test",
                "a@example.test",
            ))
            .await;
        assert_eq!(out.dmarc, Verdict::Fail);
        assert_eq!(out.reasons, ["SPF_FAIL", "DMARC_FAIL", "DMARC_REJECT"]);
    }

    #[tokio::test]
    async fn dmarc_none_without_a_record_or_a_from_domain() {
        let auth = example();
        let msg = message("alice@example.test");
        let out = auth
            .check(&input(
                &msg,
                Some(OTHER_CLIENT),
                "client.test",
                "a@example.test",
            ))
            .await;
        assert_eq!(out.dmarc, Verdict::None);
        assert_eq!(out.dmarc_policy, None);
        assert_eq!(out.reasons, ["SPF_FAIL"]);
        assert!(
            out.header.contains("\tdmarc=none header.from=example.test"),
            "{}",
            out.header
        );

        // Not a message at all.
        let out = auth
            .check(&input("", Some(CLIENT), "client.test", "a@example.test"))
            .await;
        assert_eq!(
            (out.spf, out.dkim, out.dmarc),
            (Verdict::Pass, Verdict::None, Verdict::None)
        );
        assert!(
            out.header.ends_with("\tdkim=none;\r\n\tdmarc=none\r\n"),
            "{}",
            out.header
        );
    }

    #[tokio::test]
    async fn dmarc_temperror_when_an_aligned_identifier_has_a_temporary_error() {
        let auth = dmarc_example("v=DMARC1; p=reject");
        auth.add_txt("tmp.example.test", "v=spf1 a:unseeded.example.test -all");
        let msg = message("alice@example.test");
        let out = auth
            .check(&input(
                &msg,
                Some(CLIENT),
                "client.test",
                "a@tmp.example.test",
            ))
            .await;
        assert_eq!(out.spf, Verdict::TempError);
        assert_eq!(out.dmarc, Verdict::TempError, "{}", out.header);
        assert_eq!(out.dmarc_policy, None);
        assert_eq!(out.reasons, ["SPF_TEMPERROR", "DMARC_TEMPERROR"]);
        assert!(out.header.contains("\tdmarc=temperror ("), "{}", out.header);

        // A temporary error for an unrelated domain does not defer the failure.
        auth.add_txt("tmp.test", "v=spf1 a:unseeded.test -all");
        let out = auth
            .check(&input(&msg, Some(CLIENT), "client.test", "a@tmp.test"))
            .await;
        assert_eq!(out.spf, Verdict::TempError);
        assert_eq!(out.dmarc, Verdict::Fail);
        assert_eq!(out.dmarc_policy, Some(Policy::Reject));
    }

    #[tokio::test]
    async fn authentication_results_header_in_the_passing_case() {
        let auth = dmarc_example("v=DMARC1; p=reject");
        let signed = sign(&auth, "example.test", "s1", &message("alice@example.test"));
        let out = auth
            .check(&input(
                &signed,
                Some(CLIENT),
                "client.test",
                "alice@example.test",
            ))
            .await;
        assert_eq!(
            (out.spf, out.dkim, out.dmarc),
            (Verdict::Pass, Verdict::Pass, Verdict::Pass)
        );
        assert!(out.reasons.is_empty());
        assert_eq!(out.dmarc_policy, None);
        let h = &out.header;
        assert!(
            h.starts_with("Authentication-Results: mx.ours.test;\r\n\tspf=pass ("),
            "{h}"
        );
        assert!(
            h.contains(concat!(
                "\tspf=pass (mx.ours.test: domain of alice@example.test designates 192.0.2.7 ",
                "as permitted sender) smtp.mailfrom=alice@example.test;\r\n"
            )),
            "{h}"
        );
        assert!(
            h.contains("\tdkim=pass header.d=example.test header.s=s1 header.b="),
            "{h}"
        );
        assert!(
            h.ends_with(";\r\n\tdmarc=pass header.from=example.test policy.dmarc=reject\r\n"),
            "{h}"
        );
        // One result per folded line, CRLF only, and the field parses back.
        assert_eq!(h.matches("\r\n").count(), 4, "{h}");
        assert_eq!(h.matches('\n').count(), 4, "{h}");
        assert!(h.lines().skip(1).all(|l| l.starts_with('\t')), "{h}");
        let prepended = format!("{h}{signed}");
        let parsed = mail_parser::MessageParser::default()
            .parse(prepended.as_bytes())
            .unwrap();
        let value = parsed.header_raw("Authentication-Results").unwrap();
        assert!(value.trim_start().starts_with("mx.ours.test;"), "{value}");
        // Prepending it does not break the signature.
        let out = auth
            .check(&input(
                &prepended,
                Some(CLIENT),
                "client.test",
                "alice@example.test",
            ))
            .await;
        assert_eq!(out.dkim, Verdict::Pass);

        // A hostname that would break the field is cleaned.
        let mut bad = input(&signed, Some(CLIENT), "client.test", "alice@example.test");
        bad.hostname = "mx.ours.test\r\nX-Evil: 1;";
        let out = auth.check(&bad).await;
        assert!(
            out.header
                .starts_with("Authentication-Results: mx.ours.testX-Evil:1;\r\n"),
            "{}",
            out.header
        );
    }

    #[tokio::test]
    async fn seeded_txt_records_are_parsed_by_kind() {
        let auth = Authenticator::offline().unwrap();
        for (name, txt) in [
            ("spf.test", "v=spf1 -all"),
            ("SPF2.Test.", "  v=spf1 ip4:192.0.2.0/24 ~all  "),
            ("_dmarc.d.test", "v=DMARC1; p=none"),
            ("_dmarc.e.test", "v = DMARC1 ; p=quarantine"),
            ("x.test", "v=DMARC1; p=reject"),
            (
                "z.test",
                "k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=",
            ),
            (
                "s._domainkey.k.test",
                "k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=",
            ),
        ] {
            auth.try_add_txt(name, txt).unwrap();
        }
        let key = |name: &str| auth.txt.pinned(&fqdn(name));
        assert!(matches!(key("spf.test"), Some(Txt::Spf(_))));
        assert!(matches!(key("spf2.test"), Some(Txt::Spf(_))));
        assert!(matches!(key("_dmarc.d.test"), Some(Txt::Dmarc(_))));
        assert!(matches!(key("_dmarc.e.test"), Some(Txt::Dmarc(_))));
        assert!(matches!(key("x.test"), Some(Txt::Dmarc(_))));
        assert!(matches!(key("z.test"), Some(Txt::DomainKey(_))));
        assert!(matches!(
            key("s._domainkey.k.test"),
            Some(Txt::DomainKey(_))
        ));

        // Refused by try_add_txt, seeded as the failure by add_txt.
        let e = auth.try_add_txt("y.test", "hello world").unwrap_err();
        assert!(matches!(e, AuthError::UnknownRecord { .. }), "{e}");
        let e = auth
            .try_add_txt("y.test", "v=spf1 ip4:nonsense -all")
            .unwrap_err();
        assert!(
            matches!(e, AuthError::InvalidRecord { kind: "spf", .. }),
            "{e}"
        );
        assert!(e.to_string().contains("y.test"), "{e}");
        assert!(key("y.test").is_none());
        auth.add_txt("y.test", "v=spf1 ip4:nonsense -all");
        assert!(matches!(
            key("y.test"),
            Some(Txt::Error(mail_auth::Error::ParseError))
        ));
        let msg = message("a@y.test");
        let out = auth
            .check(&input(&msg, Some(CLIENT), "client.test", "a@y.test"))
            .await;
        assert_eq!(out.spf, Verdict::PermError);
        assert_eq!(out.reasons, ["SPF_PERMERROR"]);

        // A record of no known kind does not replace one that is.
        auth.add_txt("spf.test", "site-verification=xyz");
        assert!(matches!(key("spf.test"), Some(Txt::Spf(_))));
    }

    #[test]
    fn cache_keeps_answers_for_their_ttl_and_evicts_the_oldest() {
        let cache: DnsCache<Box<str>, u32> = DnsCache::new(2, None);
        let t0 = now();
        let secs = |n| t0 + Duration::from_secs(n);
        cache.insert_at("a.".into(), 1, secs(10), t0);
        assert_eq!(cache.get_at("a.", secs(9)), Some(1));
        assert_eq!(cache.get_at("a.", secs(10)), None, "expired");
        // Already expired, or past the longest TTL.
        cache.insert_at("b.".into(), 2, t0, t0);
        assert_eq!(cache.get_at("b.", t0), None);
        cache.insert_at("b.".into(), 2, secs(1_000_000), t0);
        assert_eq!(cache.get_at("b.", secs(3599)), Some(2));
        assert_eq!(cache.get_at("b.", secs(3600)), None);

        // At capacity, the oldest answer goes; pinned records never do and always win.
        cache.insert_at("c.".into(), 3, secs(100), t0);
        cache.insert_at("d.".into(), 4, secs(100), t0);
        cache.insert_at("e.".into(), 5, secs(100), t0);
        assert_eq!(cache.get_at("c.", t0), None);
        assert_eq!(cache.get_at("d.", t0), Some(4));
        assert_eq!(cache.get_at("e.", t0), Some(5));
        cache.pin("d.".into(), 40);
        cache.insert_at("d.".into(), 400, secs(100), t0);
        assert_eq!(cache.get_at("d.", t0), Some(40));
        for n in 0..100 {
            cache.insert_at("f.".into(), n, secs(100), t0);
        }
        assert_eq!(cache.get_at("f.", t0), Some(99));
        assert_eq!(cache.get_at("d.", t0), Some(40));
        let state = cache.lock();
        assert!(state.learnt.len() <= 2);
        assert!(state.order.len() <= 4, "{}", state.order.len());
        drop(state);
        assert_eq!(cache.remove("f."), Some(99));
        assert_eq!(cache.get_at("f.", t0), None);

        // What a miss answers, and what is not kept.
        let offline: DnsCache<Box<str>, u32> = DnsCache::new(0, Some(7));
        offline.insert_at("a.".into(), 1, secs(10), t0);
        assert_eq!(offline.get_at("a.", t0), Some(7));
        let picky: DnsCache<Box<str>, u32> = DnsCache::new(10, None).keeping(|v| *v != 0);
        picky.insert_at("a.".into(), 0, secs(10), t0);
        assert_eq!(picky.get_at("a.", t0), None);
    }

    #[test]
    fn verdicts_and_policies_display_as_rfc_8601_words() {
        let words: Vec<String> = [
            Verdict::Pass,
            Verdict::Fail,
            Verdict::SoftFail,
            Verdict::Neutral,
            Verdict::None,
            Verdict::TempError,
            Verdict::PermError,
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        assert_eq!(
            words,
            [
                "pass",
                "fail",
                "softfail",
                "neutral",
                "none",
                "temperror",
                "permerror"
            ]
        );
        assert_eq!(Policy::Quarantine.to_string(), "quarantine");
    }

    #[test]
    fn authenticator_is_send_and_sync_and_check_is_send() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>(_: &T) {}
        send_sync::<Authenticator>();
        let auth = Authenticator::offline().unwrap();
        let msg = message("a@example.test");
        let input = input(&msg, None, "client.test", "");
        send(&auth.check(&input));
    }

    #[tokio::test]
    async fn system_resolver_builds_where_there_is_a_resolv_conf() {
        if std::path::Path::new("/etc/resolv.conf").exists() {
            let auth = Authenticator::system().unwrap();
            assert!(!auth.is_offline);
        }
    }
}
