//! Envelope addresses: parsing and normalisation (RFC 5321, RFC 6531, IDNA).
//!
//! What MAIL FROM and RCPT TO carry (RFC 5321 §4.1.2 `Mailbox` / `Path`), parsed strictly and
//! normalised so that two spellings of the same mailbox compare equal:
//!
//! - the local part is kept in its canonical form: quoted only when it has to be
//!   (`"john"@x` is `john@x`, `"john doe"@x` keeps its quotes), with no needless backslashes;
//! - the domain is lowercased and, for an internationalised name, converted to its A-label
//!   (punycode) form with UTS #46; address literals (`[192.0.2.1]`, `[IPv6:2001:db8::1]`) are
//!   kept apart and written in their canonical form;
//! - [`Address::key`] is the lowercase form used as the database key. We treat local parts
//!   case-insensitively, as Postfix virtual maps and Dovecot do, although RFC 5321 §2.4 allows a
//!   host to distinguish them.
//!
//! Limits follow RFC 5321 §4.5.3.1: a local part of at most 64 octets, a domain of at most 255
//! octets and a path of at most 256 octets including the angle brackets.
//!
//! Deliberately refused, each with its own [`AddressError`]: source routes (RFC 5321 §4.1.2
//! says a server SHOULD accept and ignore them; we refuse them as relay syntax), an empty
//! quoted local part (`""@x`), control characters anywhere, and a non-ASCII local part unless the
//! client asked for SMTPUTF8 (RFC 6531). A non-ASCII domain is accepted either way, because its
//! A-label form is an exact and lossless equivalent.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use idna::uts46::{AsciiDenyList, DnsLength, Hyphens, Uts46};

/// RFC 5321 §4.5.3.1.1: the maximum total length of a local part.
pub const MAX_LOCAL_PART_LEN: usize = 64;
/// RFC 5321 §4.5.3.1.2: the maximum total length of a domain.
pub const MAX_DOMAIN_LEN: usize = 255;
/// RFC 5321 §4.5.3.1.3: the maximum length of a path, including the angle brackets.
pub const MAX_PATH_LEN: usize = 256;
/// RFC 1035 §2.3.4: the maximum length of one domain label.
pub const MAX_LABEL_LEN: usize = 63;

/// Why an address, path or domain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Nothing was given.
    #[error("empty address")]
    Empty,
    /// There is no `@` between the local part and the domain.
    #[error("missing @ between local part and domain")]
    MissingAt,
    /// The local part is empty (`@x`, `""@x`).
    #[error("empty local part")]
    EmptyLocalPart,
    /// The local part is longer than 64 octets (as written).
    #[error("local part is longer than 64 octets")]
    LocalPartTooLong,
    /// The domain is longer than 255 octets (in its A-label form).
    #[error("domain is longer than 255 octets")]
    DomainTooLong,
    /// The path, with its angle brackets, is longer than 256 octets.
    #[error("path is longer than 256 octets")]
    PathTooLong,
    /// A source route (`@a,@b:user@c`).
    #[error("source routes are not accepted")]
    SourceRoute,
    /// A quoted string that is never closed, or ends in a lone backslash.
    #[error("unbalanced quotes in local part")]
    UnbalancedQuotes,
    /// A quote that does not enclose the whole local part (`a"b"@x`, `"a"b@x`).
    #[error("a quoted string must be the whole local part")]
    MisplacedQuote,
    /// A backslash in a quoted string followed by something other than printable ASCII.
    #[error("invalid quoted pair in local part")]
    InvalidQuotedPair,
    /// A NUL octet.
    #[error("nul character in address")]
    Nul,
    /// A CR or LF.
    #[error("line break in address")]
    LineBreak,
    /// Any other control character (TAB, DEL, C1 controls).
    #[error("control character in address")]
    ControlChar,
    /// A space outside a quoted string.
    #[error("space outside quotes")]
    SpaceOutsideQuotes,
    /// A dot-atom local part with a leading, trailing or double dot.
    #[error("leading, trailing or double dot in local part")]
    InvalidDots,
    /// A character that may not appear in an unquoted local part.
    #[error("invalid character {0:?} in local part")]
    InvalidLocalChar(char),
    /// A non-ASCII local part without SMTPUTF8 (RFC 6531).
    #[error("non-ascii local part requires smtputf8")]
    Utf8NotAllowed,
    /// The domain is empty (`user@`).
    #[error("empty domain")]
    EmptyDomain,
    /// The domain has an empty label (`a..b`, `a.b.`, `.a`).
    #[error("empty label in domain")]
    EmptyLabel,
    /// A domain label is longer than 63 octets.
    #[error("domain label is longer than 63 octets")]
    LabelTooLong,
    /// A label that starts or ends with a hyphen.
    #[error("domain label starts or ends with a hyphen")]
    LabelHyphen,
    /// A character that may not appear in a domain name.
    #[error("invalid character {0:?} in domain")]
    InvalidDomainChar(char),
    /// The name fails IDNA (UTS #46) processing, or an `xn--` label does not decode.
    #[error("invalid internationalised domain name")]
    InvalidIdn,
    /// An address literal that is neither `[IPv4]` nor `[IPv6:...]`.
    #[error("invalid address literal")]
    InvalidAddressLiteral,
    /// A path that should be in angle brackets is not.
    #[error("path is not enclosed in angle brackets")]
    MissingBrackets,
}

/// How strictly to parse.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParseOptions {
    /// Accept a non-ASCII local part (the client gave `SMTPUTF8`, RFC 6531). Default: false.
    pub allow_utf8: bool,
}

impl ParseOptions {
    /// Options for a transaction that announced `SMTPUTF8`.
    pub const SMTPUTF8: Self = Self { allow_utf8: true };
}

/// A domain: a normalised name or an address literal.
///
/// A name is lowercased and in its ASCII (A-label) form; [`Domain::to_unicode`] gives the
/// U-label form for display. Equality and hashing use the ASCII form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Domain(DomainRepr);

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum DomainRepr {
    /// An LDH name, lowercase ASCII.
    Name(String),
    /// `[192.0.2.1]` or `[IPv6:2001:db8::1]`, kept with its canonical text.
    Literal { text: String, ip: IpAddr },
}

impl Domain {
    /// Parses a domain name (ASCII or internationalised) or an address literal.
    pub fn parse(s: &str) -> Result<Self, AddressError> {
        if s.starts_with('[') {
            parse_literal(s)
        } else {
            Self::parse_name(s)
        }
    }

    /// Parses a domain name, refusing address literals.
    pub fn parse_name(s: &str) -> Result<Self, AddressError> {
        // Bound the work before IDNA processing; the A-label form is checked exactly below.
        if s.len() > MAX_DOMAIN_LEN * 4 {
            return Err(AddressError::DomainTooLong);
        }
        if s.is_empty() {
            return Err(AddressError::EmptyDomain);
        }
        check_controls(s)?;
        for c in s.chars() {
            if c == ' ' {
                return Err(AddressError::SpaceOutsideQuotes);
            }
            if c.is_ascii() && !(c.is_ascii_alphanumeric() || c == '-' || c == '.') {
                return Err(AddressError::InvalidDomainChar(c));
            }
        }
        let ascii = if s.is_ascii() {
            // Check the structure first, so `a..b` reports an empty label rather than an
            // IDNA failure.
            let lower = s.to_ascii_lowercase();
            check_labels(&lower)?;
            if lower.split('.').any(|l| l.starts_with("xn--")) {
                to_ascii(&lower)?;
            }
            lower
        } else {
            to_ascii(s)?
        };
        check_labels(&ascii)?;
        Ok(Self(DomainRepr::Name(ascii)))
    }

    /// The ASCII form: lowercase A-labels, or the literal with its brackets.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            DomainRepr::Name(s) => s,
            DomainRepr::Literal { text, .. } => text,
        }
    }

    /// The Unicode (U-label) form for display. Literals are returned unchanged.
    pub fn to_unicode(&self) -> String {
        match &self.0 {
            DomainRepr::Name(s) => {
                // The name passed UTS #46 when parsed, so this cannot fail; fall back to the
                // ASCII form rather than show replacement characters if it ever did.
                let (unicode, result) = idna::domain_to_unicode(s);
                if result.is_ok() { unicode } else { s.clone() }
            }
            DomainRepr::Literal { text, .. } => text.clone(),
        }
    }

    /// True for an address literal (`[192.0.2.1]`).
    pub fn is_literal(&self) -> bool {
        matches!(self.0, DomainRepr::Literal { .. })
    }

    /// The IP address of an address literal; `None` for a name.
    pub fn literal_ip(&self) -> Option<IpAddr> {
        match self.0 {
            DomainRepr::Literal { ip, .. } => Some(ip),
            DomainRepr::Name(_) => None,
        }
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Domain {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// An envelope address (RFC 5321 `Mailbox`): a canonical local part and a normalised domain.
///
/// Two spellings of the same mailbox (`"john"@Example.COM`, `john@example.com`) are equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address {
    /// Canonical wire form: dot-atom when possible, otherwise a minimal quoted string.
    local: String,
    /// The decoded local part: quotes removed, quoted pairs resolved.
    value: String,
    domain: Domain,
}

impl Address {
    /// Parses the inside of `<...>` as given to MAIL or RCPT, with an ASCII local part.
    pub fn parse(s: &str) -> Result<Self, AddressError> {
        Self::parse_with(s, ParseOptions::default())
    }

    /// Parses the inside of `<...>` with the given options.
    pub fn parse_with(s: &str, opts: ParseOptions) -> Result<Self, AddressError> {
        // Bound everything before looking at the content.
        if s.len().saturating_add(2) > MAX_PATH_LEN {
            return Err(AddressError::PathTooLong);
        }
        if s.is_empty() {
            return Err(AddressError::Empty);
        }
        check_controls(s)?;
        if let Some(rest) = s.strip_prefix('@') {
            return Err(if rest.contains(':') {
                AddressError::SourceRoute
            } else {
                AddressError::EmptyLocalPart
            });
        }
        let (raw_local, value, domain) = split_local(s)?;
        if raw_local.len() > MAX_LOCAL_PART_LEN {
            return Err(AddressError::LocalPartTooLong);
        }
        if value.is_empty() {
            return Err(AddressError::EmptyLocalPart);
        }
        if !opts.allow_utf8 && !value.is_ascii() {
            return Err(AddressError::Utf8NotAllowed);
        }
        let domain = Domain::parse(domain)?;
        Ok(Self {
            local: canonical_local(&value),
            value,
            domain,
        })
    }

    /// Parses `<...>`: the brackets are required and removed.
    pub fn parse_bracketed(s: &str, opts: ParseOptions) -> Result<Self, AddressError> {
        Self::parse_with(strip_brackets(s)?, opts)
    }

    /// The local part in canonical wire form (quoted only when needed).
    pub fn local_part(&self) -> &str {
        &self.local
    }

    /// The domain.
    pub fn domain(&self) -> &Domain {
        &self.domain
    }

    /// The lowercase form used as the database key for lookups: the canonical local part
    /// lowercased (Unicode-aware for SMTPUTF8) and the ASCII domain.
    ///
    /// Local parts are treated case-insensitively, as Postfix virtual maps and Dovecot do.
    pub fn key(&self) -> String {
        format!("{}@{}", self.local.to_lowercase(), self.domain)
    }

    /// True when the local part (decoded) contains `%`, `!` or `@`: old relay syntax
    /// (`user%other@hosted`, `host!user@hosted`, `"user@other"@hosted`). The spool refuses
    /// these with `554 5.7.1` even for hosted domains.
    pub fn has_routing_syntax(&self) -> bool {
        self.value.contains(['%', '!', '@'])
    }

    /// True when the address needs SMTPUTF8 to be sent (a non-ASCII local part).
    pub fn is_utf8(&self) -> bool {
        !self.local.is_ascii()
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// The argument of MAIL FROM: the null path `<>` (bounces) or an address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ReversePath {
    /// `<>`: no bounce may be sent for this message.
    Null,
    /// A sender address.
    Address(Address),
}

impl ReversePath {
    /// Parses the inside of `<...>`; `""` is the null path.
    pub fn parse(s: &str) -> Result<Self, AddressError> {
        Self::parse_with(s, ParseOptions::default())
    }

    /// Parses the inside of `<...>` with the given options; `""` is the null path.
    pub fn parse_with(s: &str, opts: ParseOptions) -> Result<Self, AddressError> {
        if s.is_empty() {
            Ok(Self::Null)
        } else {
            Address::parse_with(s, opts).map(Self::Address)
        }
    }

    /// Parses `<...>`; `<>` is the null path.
    pub fn parse_bracketed(s: &str, opts: ParseOptions) -> Result<Self, AddressError> {
        Self::parse_with(strip_brackets(s)?, opts)
    }

    /// True for `<>`.
    pub fn is_null(&self) -> bool {
        matches!(self, Self::Null)
    }

    /// The address, unless this is the null path.
    pub fn as_address(&self) -> Option<&Address> {
        match self {
            Self::Null => None,
            Self::Address(a) => Some(a),
        }
    }
}

/// The inside of the brackets: empty for the null path, so `MAIL FROM:<{path}>` is right.
impl fmt::Display for ReversePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Null => Ok(()),
            Self::Address(a) => a.fmt(f),
        }
    }
}

/// Removes the angle brackets of a path.
fn strip_brackets(s: &str) -> Result<&str, AddressError> {
    s.strip_prefix('<')
        .and_then(|s| s.strip_suffix('>'))
        .ok_or(AddressError::MissingBrackets)
}

/// Refuses NUL, CR, LF and every other control character, wherever it is.
fn check_controls(s: &str) -> Result<(), AddressError> {
    for c in s.chars() {
        match c {
            '\0' => return Err(AddressError::Nul),
            '\r' | '\n' => return Err(AddressError::LineBreak),
            c if c.is_control() => return Err(AddressError::ControlChar),
            _ => {}
        }
    }
    Ok(())
}

/// Splits `local@domain` into the local part as written, its decoded value and the domain.
fn split_local(s: &str) -> Result<(&str, String, &str), AddressError> {
    if let Some(quoted) = s.strip_prefix('"') {
        let (value, consumed) = parse_quoted(quoted)?;
        // `consumed` covers the content and the closing quote; both are ASCII delimited.
        let raw_len = consumed + 1;
        let raw = s.get(..raw_len).ok_or(AddressError::UnbalancedQuotes)?;
        let rest = s.get(raw_len..).unwrap_or_default();
        return match rest.strip_prefix('@') {
            Some(domain) => Ok((raw, value, domain)),
            None if rest.is_empty() => Err(AddressError::MissingAt),
            None => Err(AddressError::MisplacedQuote),
        };
    }
    let (local, domain) = match s.split_once('@') {
        Some(parts) => parts,
        None => {
            // Report a bad character before the missing @, as it is the likelier cause.
            check_dot_atom(s)?;
            return Err(AddressError::MissingAt);
        }
    };
    check_dot_atom(local)?;
    Ok((local, local.to_owned(), domain))
}

/// Parses a quoted string after its opening quote (RFC 5321 `Quoted-string`, extended by
/// RFC 6531 with UTF-8). Returns the decoded value and the number of bytes consumed, including
/// the closing quote.
fn parse_quoted(s: &str) -> Result<(String, usize), AddressError> {
    let mut value = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((value, i + 1)),
            // quoted-pairSMTP = %d92 %d32-126
            '\\' => match chars.next() {
                Some((_, p)) if (' '..='~').contains(&p) => value.push(p),
                Some(_) => return Err(AddressError::InvalidQuotedPair),
                None => return Err(AddressError::UnbalancedQuotes),
            },
            // qtextSMTP: %d32-33 / %d35-91 / %d93-126 / UTF8-non-ascii; controls are refused
            // earlier.
            c => value.push(c),
        }
    }
    Err(AddressError::UnbalancedQuotes)
}

/// Checks an unquoted local part: `Dot-string = Atom *("." Atom)`.
fn check_dot_atom(local: &str) -> Result<(), AddressError> {
    for c in local.chars() {
        match c {
            '"' => return Err(AddressError::MisplacedQuote),
            ' ' => return Err(AddressError::SpaceOutsideQuotes),
            '.' => {}
            c if is_atext(c) => {}
            c => return Err(AddressError::InvalidLocalChar(c)),
        }
    }
    if local.is_empty() {
        return Err(AddressError::EmptyLocalPart);
    }
    if local.split('.').any(str::is_empty) {
        return Err(AddressError::InvalidDots);
    }
    Ok(())
}

/// RFC 5322 `atext`, with RFC 6531 `UTF8-non-ascii`. Non-ASCII is refused later without
/// SMTPUTF8.
fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

/// The canonical wire form of a decoded local part: the dot-atom when it is one, otherwise a
/// quoted string escaping only `"` and `\`.
fn canonical_local(value: &str) -> String {
    let is_dot_atom = !value.is_empty()
        && value
            .split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(is_atext));
    if is_dot_atom {
        return value.to_owned();
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// UTS #46 ToASCII with the STD3 (LDH) rules; length and hyphens are checked by us.
fn to_ascii(s: &str) -> Result<String, AddressError> {
    Uts46::new()
        .to_ascii(
            s.as_bytes(),
            AsciiDenyList::STD3,
            Hyphens::Allow,
            DnsLength::Ignore,
        )
        .map(|cow| cow.into_owned())
        .map_err(|_| AddressError::InvalidIdn)
}

/// Checks a lowercase ASCII name: LDH labels of 1 to 63 octets, at most 255 octets in all.
fn check_labels(name: &str) -> Result<(), AddressError> {
    if name.is_empty() {
        return Err(AddressError::EmptyDomain);
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(AddressError::EmptyLabel);
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(AddressError::LabelTooLong);
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(AddressError::InvalidDomainChar(c));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(AddressError::LabelHyphen);
        }
    }
    if name.len() > MAX_DOMAIN_LEN {
        return Err(AddressError::DomainTooLong);
    }
    Ok(())
}

/// RFC 5321 §4.1.3: `[IPv4]` or `[IPv6:...]`. General address literals (`[tag:...]`) have no
/// registered tags and are refused.
fn parse_literal(s: &str) -> Result<Domain, AddressError> {
    if s.len() > MAX_DOMAIN_LEN {
        return Err(AddressError::DomainTooLong);
    }
    check_controls(s)?;
    let inner = s
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .ok_or(AddressError::InvalidAddressLiteral)?;
    let tag_v6 = inner
        .get(..5)
        .filter(|tag| tag.eq_ignore_ascii_case("IPv6:"))
        .and_then(|_| inner.get(5..));
    let (text, ip) = match tag_v6 {
        Some(v6) => {
            let ip: Ipv6Addr = v6
                .parse()
                .map_err(|_| AddressError::InvalidAddressLiteral)?;
            (format!("[IPv6:{ip}]"), IpAddr::V6(ip))
        }
        None => {
            let ip: Ipv4Addr = inner
                .parse()
                .map_err(|_| AddressError::InvalidAddressLiteral)?;
            (format!("[{ip}]"), IpAddr::V4(ip))
        }
    };
    Ok(Domain(DomainRepr::Literal { text, ip }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use AddressError as E;

    fn utf8() -> ParseOptions {
        ParseOptions::SMTPUTF8
    }

    #[test]
    fn valid_addresses_normalise() {
        // (input, allow_utf8, Display, key)
        let rows: &[(&str, bool, &str, &str)] = &[
            (
                "user@example.com",
                false,
                "user@example.com",
                "user@example.com",
            ),
            (
                "User@Example.COM",
                false,
                "User@example.com",
                "user@example.com",
            ),
            (
                "first.last@sub.example.org",
                false,
                "first.last@sub.example.org",
                "first.last@sub.example.org",
            ),
            (
                "a+tag@x.example",
                false,
                "a+tag@x.example",
                "a+tag@x.example",
            ),
            (
                "!#$%&'*+-/=?^_`{|}~@x.example",
                false,
                "!#$%&'*+-/=?^_`{|}~@x.example",
                "!#$%&'*+-/=?^_`{|}~@x.example",
            ),
            (
                "\"john\"@x.example",
                false,
                "john@x.example",
                "john@x.example",
            ),
            (
                "\"j\\ohn\"@x.example",
                false,
                "john@x.example",
                "john@x.example",
            ),
            (
                "\"john.doe\"@x.example",
                false,
                "john.doe@x.example",
                "john.doe@x.example",
            ),
            (
                "\"john doe\"@x.example",
                false,
                "\"john doe\"@x.example",
                "\"john doe\"@x.example",
            ),
            (
                "\"John Doe\"@x.example",
                false,
                "\"John Doe\"@x.example",
                "\"john doe\"@x.example",
            ),
            (
                "\"a..b\"@x.example",
                false,
                "\"a..b\"@x.example",
                "\"a..b\"@x.example",
            ),
            (
                "\".a\"@x.example",
                false,
                "\".a\"@x.example",
                "\".a\"@x.example",
            ),
            (
                "\"a\\\"b\"@x.example",
                false,
                "\"a\\\"b\"@x.example",
                "\"a\\\"b\"@x.example",
            ),
            (
                "\"a\\\\b\"@x.example",
                false,
                "\"a\\\\b\"@x.example",
                "\"a\\\\b\"@x.example",
            ),
            (
                "\"a@b\"@x.example",
                false,
                "\"a@b\"@x.example",
                "\"a@b\"@x.example",
            ),
            (
                "\"a,b\"@x.example",
                false,
                "\"a,b\"@x.example",
                "\"a,b\"@x.example",
            ),
            (
                "\"\\ \"@x.example",
                false,
                "\" \"@x.example",
                "\" \"@x.example",
            ),
            (
                "user@bücher.example",
                false,
                "user@xn--bcher-kva.example",
                "user@xn--bcher-kva.example",
            ),
            (
                "user@BÜCHER.example",
                false,
                "user@xn--bcher-kva.example",
                "user@xn--bcher-kva.example",
            ),
            (
                "user@XN--BCHER-KVA.example",
                false,
                "user@xn--bcher-kva.example",
                "user@xn--bcher-kva.example",
            ),
            (
                "user@münchen.de",
                false,
                "user@xn--mnchen-3ya.de",
                "user@xn--mnchen-3ya.de",
            ),
            (
                "Dörte@bücher.example",
                true,
                "Dörte@xn--bcher-kva.example",
                "dörte@xn--bcher-kva.example",
            ),
            (
                "\"Dö rte\"@x.example",
                true,
                "\"Dö rte\"@x.example",
                "\"dö rte\"@x.example",
            ),
            (
                "用户@例子.广告",
                true,
                "用户@xn--fsqu00a.xn--4rr70v",
                "用户@xn--fsqu00a.xn--4rr70v",
            ),
            (
                "user@[192.0.2.1]",
                false,
                "user@[192.0.2.1]",
                "user@[192.0.2.1]",
            ),
            (
                "user@[IPv6:2001:DB8:0:0:0:0:0:1]",
                false,
                "user@[IPv6:2001:db8::1]",
                "user@[IPv6:2001:db8::1]",
            ),
            (
                "user@[ipv6:::1]",
                false,
                "user@[IPv6:::1]",
                "user@[IPv6:::1]",
            ),
            ("user@localhost", false, "user@localhost", "user@localhost"),
            (
                "user@a-b.c-d.example",
                false,
                "user@a-b.c-d.example",
                "user@a-b.c-d.example",
            ),
            (
                "user@123.example",
                false,
                "user@123.example",
                "user@123.example",
            ),
        ];
        for &(input, allow_utf8, display, key) in rows {
            let a = Address::parse_with(input, ParseOptions { allow_utf8 })
                .unwrap_or_else(|e| panic!("{input:?}: {e}"));
            assert_eq!(a.to_string(), display, "{input:?}");
            assert_eq!(a.key(), key, "{input:?}");
            // The canonical form parses back to the same address.
            let again = Address::parse_with(&a.to_string(), utf8()).unwrap();
            assert_eq!(again, a, "{input:?}");
        }
    }

    #[test]
    fn invalid_addresses_have_specific_errors() {
        let rows: &[(&str, AddressError)] = &[
            ("", E::Empty),
            ("user", E::MissingAt),
            ("user.example.com", E::MissingAt),
            ("\"user\"", E::MissingAt),
            ("@x.example", E::EmptyLocalPart),
            ("\"\"@x.example", E::EmptyLocalPart),
            ("@a,@b:user@c.example", E::SourceRoute),
            ("@a:user@c.example", E::SourceRoute),
            ("\"user@x.example", E::UnbalancedQuotes),
            ("\"user\\\"@x.example", E::UnbalancedQuotes),
            ("us\"er\"@x.example", E::MisplacedQuote),
            ("\"us\"er@x.example", E::MisplacedQuote),
            ("user\"@x.example", E::MisplacedQuote),
            ("\"a\\é\"@x.example", E::InvalidQuotedPair),
            ("us\0er@x.example", E::Nul),
            ("user@x.exa\0mple", E::Nul),
            ("user\r\n@x.example", E::LineBreak),
            ("\"us\ner\"@x.example", E::LineBreak),
            ("user@x.example\r\nRCPT TO:<a@b>", E::LineBreak),
            ("us\ter@x.example", E::ControlChar),
            ("us\x7fer@x.example", E::ControlChar),
            ("us\u{85}er@x.example", E::ControlChar),
            ("john doe@x.example", E::SpaceOutsideQuotes),
            (" user@x.example", E::SpaceOutsideQuotes),
            ("user@x .example", E::SpaceOutsideQuotes),
            (".user@x.example", E::InvalidDots),
            ("user.@x.example", E::InvalidDots),
            ("us..er@x.example", E::InvalidDots),
            ("us(er@x.example", E::InvalidLocalChar('(')),
            ("us,er@x.example", E::InvalidLocalChar(',')),
            ("us\\er@x.example", E::InvalidLocalChar('\\')),
            ("us<er@x.example", E::InvalidLocalChar('<')),
            ("usér@x.example", E::Utf8NotAllowed),
            ("\"usér\"@x.example", E::Utf8NotAllowed),
            ("user@", E::EmptyDomain),
            ("user@x..example", E::EmptyLabel),
            ("user@x.example.", E::EmptyLabel),
            ("user@.x.example", E::EmptyLabel),
            ("user@-x.example", E::LabelHyphen),
            ("user@x-.example", E::LabelHyphen),
            ("user@x_y.example", E::InvalidDomainChar('_')),
            ("user@x@y.example", E::InvalidDomainChar('@')),
            ("a@b@c.example", E::InvalidDomainChar('@')),
            ("user@xn--.example", E::LabelHyphen),
            ("user@xn--zz.example", E::InvalidIdn),
            ("user@xn--ab.example", E::InvalidIdn),
            ("user@xn--a-ecp.example", E::InvalidIdn),
            ("user@[192.0.2.300]", E::InvalidAddressLiteral),
            ("user@[192.0.2.1", E::InvalidAddressLiteral),
            ("user@[IPv6:1.2.3.4]", E::InvalidAddressLiteral),
            ("user@[x400:foo]", E::InvalidAddressLiteral),
        ];
        for (input, want) in rows {
            assert_eq!(Address::parse(input).as_ref(), Err(want), "{input:?}");
        }
    }

    #[test]
    fn local_part_limit_is_64_octets() {
        let ok = format!("{}@x.example", "a".repeat(64));
        assert_eq!(Address::parse(&ok).unwrap().local_part().len(), 64);
        let over = format!("{}@x.example", "a".repeat(65));
        assert_eq!(Address::parse(&over), Err(E::LocalPartTooLong));
        // Measured as written, quotes included.
        let quoted = format!("\"{}\"@x.example", "a".repeat(63));
        assert_eq!(Address::parse(&quoted), Err(E::LocalPartTooLong));
        // Octets, not characters: 32 two-octet characters fit, 33 do not.
        let utf8_ok = format!("{}@x.example", "é".repeat(32));
        assert!(Address::parse_with(&utf8_ok, utf8()).is_ok());
        let utf8_over = format!("{}@x.example", "é".repeat(33));
        assert_eq!(
            Address::parse_with(&utf8_over, utf8()),
            Err(E::LocalPartTooLong)
        );
    }

    /// A name of exactly `len` octets made of labels of at most 63 octets.
    fn name_of_len(len: usize) -> String {
        let mut name = String::new();
        let mut rem = len;
        loop {
            let mut n = rem.min(MAX_LABEL_LEN);
            if rem - n == 1 {
                n -= 1; // never leave room for a lone dot
            }
            name.push_str(&"a".repeat(n));
            rem -= n;
            if rem == 0 {
                return name;
            }
            name.push('.');
            rem -= 1;
        }
    }

    #[test]
    fn domain_limits_255_and_63() {
        let d255 = name_of_len(255);
        assert_eq!(Domain::parse(&d255).unwrap().as_str().len(), 255);
        let d256 = name_of_len(256);
        assert_eq!(d256.len(), 256);
        assert_eq!(Domain::parse(&d256), Err(E::DomainTooLong));

        let l63 = format!("{}.example", "a".repeat(63));
        assert!(Domain::parse(&l63).is_ok());
        let l64 = format!("{}.example", "a".repeat(64));
        assert_eq!(Domain::parse(&l64), Err(E::LabelTooLong));
        // The limit applies to the A-label form: 60 "ü" encode to more than 63 octets.
        assert_eq!(
            Domain::parse(&format!("{}.example", "ü".repeat(60))),
            Err(E::LabelTooLong)
        );
    }

    #[test]
    fn path_limit_is_256_octets_with_brackets() {
        // 254 octets inside the brackets is the most a path may hold.
        let domain = name_of_len(254 - 2);
        let ok = format!("a@{domain}");
        assert_eq!(ok.len(), 254);
        assert!(Address::parse(&ok).is_ok());
        let over = format!("ab@{domain}");
        assert_eq!(Address::parse(&over), Err(E::PathTooLong));
        assert_eq!(Address::parse(&"a".repeat(10_000)), Err(E::PathTooLong));
    }

    #[test]
    fn domains() {
        let d = Domain::parse("Bücher.Example").unwrap();
        assert_eq!(d.as_str(), "xn--bcher-kva.example");
        assert_eq!(d.to_unicode(), "bücher.example");
        assert!(!d.is_literal());
        assert_eq!(d, Domain::parse("xn--bcher-kva.EXAMPLE").unwrap());

        let lit = Domain::parse("[192.0.2.1]").unwrap();
        assert!(lit.is_literal());
        assert_eq!(lit.literal_ip(), Some("192.0.2.1".parse().unwrap()));
        assert_eq!(lit.to_unicode(), "[192.0.2.1]");
        assert_eq!(
            Domain::parse_name("[192.0.2.1]"),
            Err(E::InvalidDomainChar('['))
        );
        assert_eq!(Domain::parse("[010.0.0.1]"), Err(E::InvalidAddressLiteral));
        assert_eq!("".parse::<Domain>(), Err(E::EmptyDomain));
    }

    #[test]
    fn routing_syntax() {
        let rows = [
            ("user@x.example", false),
            ("user%other.example@x.example", true),
            ("host!user@x.example", true),
            ("\"user@other.example\"@x.example", true),
            ("\"user%other\"@x.example", true),
            ("\"user other\"@x.example", false),
        ];
        for (input, want) in rows {
            assert_eq!(
                Address::parse(input).unwrap().has_routing_syntax(),
                want,
                "{input}"
            );
        }
    }

    #[test]
    fn reverse_paths() {
        assert_eq!(ReversePath::parse(""), Ok(ReversePath::Null));
        assert_eq!(
            ReversePath::parse_bracketed("<>", ParseOptions::default()),
            Ok(ReversePath::Null)
        );
        assert!(ReversePath::Null.is_null());
        assert_eq!(ReversePath::Null.to_string(), "");
        let rp = ReversePath::parse_bracketed("<A@B.example>", ParseOptions::default()).unwrap();
        assert_eq!(rp.to_string(), "A@b.example");
        assert_eq!(
            rp.as_address().map(Address::key).as_deref(),
            Some("a@b.example")
        );
        assert_eq!(
            ReversePath::parse_bracketed("a@b.example", ParseOptions::default()),
            Err(E::MissingBrackets)
        );
        assert_eq!(
            ReversePath::parse_bracketed("<a@b.example", ParseOptions::default()),
            Err(E::MissingBrackets)
        );
        assert_eq!(ReversePath::parse("@a:b@c.example"), Err(E::SourceRoute));
        assert_eq!(
            Address::parse_bracketed("<\"john\"@X.example>", ParseOptions::default())
                .unwrap()
                .to_string(),
            "john@x.example"
        );
    }

    #[test]
    fn quoted_and_unquoted_spellings_are_equal() {
        let a = Address::parse("\"john\"@X.example").unwrap();
        let b = Address::parse("john@x.example").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.local_part(), "john");
        assert_ne!(
            Address::parse("John@x.example").unwrap(),
            b,
            "case is kept; key() folds it"
        );
        assert_eq!(Address::parse("John@x.example").unwrap().key(), b.key());
        assert!(!b.is_utf8());
        assert!(
            Address::parse_with("é@x.example", utf8())
                .unwrap()
                .is_utf8()
        );
    }
}
