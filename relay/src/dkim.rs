//! DKIM signing (RFC 6376) for hosted domains with a key.
//!
//! Keys live in one directory (the relay's `dkim_dir`), one file per domain, named
//! `<domain>.<selector>.key`: an RSA private key in PEM, PKCS#8 (`BEGIN PRIVATE KEY`, what
//! [`generate`] writes) or PKCS#1 (`BEGIN RSA PRIVATE KEY`, what other tools often write). The
//! domain is a lower-case A-label; the selector is one DNS label without dots, so the last dot of
//! the name separates the two. Other files in the directory are ignored. Keys are signed with
//! `ring` (constant-time, and ~3x faster than the pure-Rust `rsa` crate, whose private-key
//! operations carry RUSTSEC-2023-0071); ring takes RSA keys of 2048 bits and more, so a shorter
//! key fails to load, naming its file.
//!
//! [`Signer::load`] reads every key once; [`Signer::sign`] then makes the `DKIM-Signature:` field
//! to prepend to an outgoing message: rsa-sha256, relaxed/relaxed, with a timestamp (`t=`) and no
//! expiry. [`generate`] makes a new key and the TXT record to publish for it.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use mail_auth::common::crypto::{RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter as _;
use mail_auth::dkim::generate::DkimKeyPair;
use mail_auth::dkim::{DkimSigner, Done};
use tokio_rustls::rustls::pki_types::PrivateKeyDer;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;

/// The header fields a signature covers, when present. mail-auth lists each one present in `h=`
/// (once per occurrence) and also each one absent, which "oversigns" it (RFC 6376 §5.4.2): a
/// Cc or Reply-To added on the way then breaks the signature instead of riding on it.
const SIGNED_HEADERS: [&str; 12] = [
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
];

/// The size of the keys [`generate`] makes.
const RSA_BITS: usize = 2048;

/// The DKIM keys of the hosted domains that have one, ready to sign.
pub struct Signer {
    /// By lower-case domain.
    keys: BTreeMap<String, LoadedKey>,
}

/// One domain's key.
struct LoadedKey {
    selector: String,
    path: PathBuf,
    signer: DkimSigner<RsaKey<Sha256>, Done>,
}

/// What [`Signer::keys`] tells about one loaded key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// The signing domain (`d=`), a lower-case A-label.
    pub domain: String,
    /// The selector (`s=`).
    pub selector: String,
    /// The key file.
    pub path: PathBuf,
}

impl Signer {
    /// Loads every `<domain>.<selector>.key` file of `dir`. A missing directory means no keys.
    /// A key file that cannot be read or is not an RSA private key in PEM, or two keys for one
    /// domain, is an error naming the file(s). Keys readable by group or others are loaded with
    /// a warning.
    pub fn load(dir: &Path) -> Result<Signer, DkimError> {
        let mut keys = BTreeMap::new();
        for (path, domain, selector) in key_files(dir)? {
            let key = read_key(&path)?;
            if let Some(other) = keys.get(&domain).map(|k: &LoadedKey| k.path.clone()) {
                return Err(DkimError::TwoKeys {
                    domain,
                    first: other,
                    second: path,
                });
            }
            let signer = DkimSigner::from_key(key)
                .domain(domain.clone())
                .selector(selector.clone())
                .headers(SIGNED_HEADERS);
            keys.insert(
                domain,
                LoadedKey {
                    selector,
                    path,
                    signer,
                },
            );
        }
        Ok(Signer { keys })
    }

    /// Whether no domain has a key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The domains with a key, sorted.
    pub fn domains(&self) -> Vec<String> {
        self.keys.keys().cloned().collect()
    }

    /// Every loaded key, sorted by domain.
    pub fn keys(&self) -> Vec<KeyInfo> {
        self.keys
            .iter()
            .map(|(domain, k)| KeyInfo {
                domain: domain.clone(),
                selector: k.selector.clone(),
                path: k.path.clone(),
            })
            .collect()
    }

    /// Signs `message` (the whole message as it will be transmitted: header, blank line, body,
    /// CRLF line ends, no dot-stuffing) for `domain` (case-insensitive, a trailing dot ignored).
    ///
    /// `None` if `domain` has no key; otherwise the complete `DKIM-Signature:` field, folded and
    /// ending in CRLF, to put in front of the message unchanged. The RSA operation takes about a
    /// millisecond: call it off the async workers.
    pub fn sign(&self, domain: &str, message: &[u8]) -> Option<Result<String, DkimError>> {
        let domain = domain.strip_suffix('.').unwrap_or(domain);
        let key = self.keys.get(&domain.to_ascii_lowercase())?;
        Some(
            key.signer
                .sign(message)
                .map(|signature| signature.to_header())
                .map_err(|source| DkimError::Sign {
                    domain: domain.to_ascii_lowercase(),
                    source,
                }),
        )
    }
}

impl fmt::Debug for Signer {
    /// Domains, selectors and files; never key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.keys
                    .iter()
                    .map(|(d, k)| (d, (k.selector.as_str(), k.path.as_path()))),
            )
            .finish()
    }
}

/// A key made by [`generate`], and the DNS record that publishes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// The private key file.
    pub path: PathBuf,
    /// The TXT record's name, `<selector>._domainkey.<domain>` (no trailing dot).
    pub record_name: String,
    /// The TXT record's value, `v=DKIM1; k=rsa; p=<base64 SubjectPublicKeyInfo>`.
    pub record_value: String,
}

impl Generated {
    /// The record as a BIND zone file line, the value split into quoted strings of at most 255
    /// characters (the limit of one DNS character-string):
    /// `<name>. IN TXT ( "v=DKIM1; k=rsa; p=…" "…" )`.
    pub fn zone_line(&self) -> String {
        let parts: Vec<String> = self
            .record_value
            .as_bytes()
            .chunks(255)
            .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
            .collect();
        format!("{}. IN TXT ( {} )", self.record_name, parts.join(" "))
    }
}

/// Makes an RSA-2048 key for `domain` with `selector` in `dir`, and returns its file and the
/// TXT record to publish.
///
/// Both names are checked (and lower-cased): the domain is dot-separated labels of letters,
/// digits and `-`; the selector one such label. Refused if `dir` already holds a key for the
/// domain, under any selector: replacing a published key would break signing until DNS follows.
/// `dir` is created (mode 0700) if missing. The file is written with mode 0600 under a temporary
/// name, synced, then linked into place, which fails rather than overwrite a file that appeared
/// meanwhile.
pub fn generate(dir: &Path, domain: &str, selector: &str) -> Result<Generated, DkimError> {
    let domain = parse_domain(domain).ok_or_else(|| DkimError::InvalidDomain(domain.to_owned()))?;
    let selector =
        parse_selector(selector).ok_or_else(|| DkimError::InvalidSelector(selector.to_owned()))?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| DkimError::Write {
            path: dir.to_owned(),
            source,
        })?;
    if let Some((path, _, _)) = key_files(dir)?.into_iter().find(|(_, d, _)| *d == domain) {
        return Err(DkimError::KeyExists { domain, path });
    }
    let pair = DkimKeyPair::generate_rsa(RSA_BITS).map_err(DkimError::Generate)?;
    let pem = pem_encode("PRIVATE KEY", &pkcs8_from_pkcs1(pair.private_key()));
    let path = dir.join(format!("{domain}.{selector}.key"));
    write_new(dir, &path, pem.as_bytes()).map_err(|e| match e {
        WriteNewError::Exists => DkimError::KeyExists {
            domain: domain.clone(),
            path: path.clone(),
        },
        WriteNewError::Io(source) => DkimError::Write {
            path: path.clone(),
            source,
        },
    })?;
    Ok(Generated {
        path,
        record_name: format!("{selector}._domainkey.{domain}"),
        record_value: format!(
            "v=DKIM1; k=rsa; p={}",
            BASE64.encode(spki_from_pkcs1(pair.public_key()))
        ),
    })
}

/// Why loading, generating or signing failed.
#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    /// The key directory exists but cannot be listed.
    #[error("cannot read the DKIM key directory {}", path.display())]
    ReadDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A key file cannot be read.
    #[error("cannot read the DKIM key {}", path.display())]
    ReadKey {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A key file holds no usable RSA private key.
    #[error("{} is not an RSA private key in PEM (PKCS#8 or PKCS#1)", path.display())]
    InvalidKey {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Two key files name the same domain.
    #[error(
        "two DKIM keys for {domain}: {} and {}; keep one",
        first.display(),
        second.display()
    )]
    TwoKeys {
        /// The domain.
        domain: String,
        /// One file.
        first: PathBuf,
        /// The other.
        second: PathBuf,
    },
    /// Not a domain name [`generate`] accepts.
    #[error("{0:?} is not a valid domain (letters, digits, '-' and '.', as an A-label)")]
    InvalidDomain(String),
    /// Not a selector [`generate`] accepts.
    #[error("{0:?} is not a valid selector (letters, digits and '-', at most 63)")]
    InvalidSelector(String),
    /// [`generate`] refused to replace a domain's key.
    #[error(
        "{domain} already has a DKIM key, {}; refusing to overwrite it (remove the file first to replace it, then publish the new record)",
        path.display()
    )]
    KeyExists {
        /// The domain.
        domain: String,
        /// The existing file.
        path: PathBuf,
    },
    /// Key generation failed.
    #[error("cannot generate an RSA key")]
    Generate(#[source] mail_auth::Error),
    /// The key directory or file cannot be written.
    #[error("cannot write {}", path.display())]
    Write {
        /// The directory or file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Signing failed.
    #[error("cannot DKIM-sign for {domain}")]
    Sign {
        /// The domain.
        domain: String,
        /// Why.
        #[source]
        source: mail_auth::Error,
    },
}

/// The key files of `dir` as (path, domain, selector), sorted by file name; empty if `dir` does
/// not exist. Names that are not `<domain>.<selector>.key` are skipped, with a warning when they
/// look like a key.
fn key_files(dir: &Path) -> Result<Vec<(PathBuf, String, String)>, DkimError> {
    let read_dir_error = |source| DkimError::ReadDir {
        path: dir.to_owned(),
        source,
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(read_dir_error(e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(read_dir_error)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if name.starts_with('.') || !name.ends_with(".key") {
            continue;
        }
        let Some((domain, selector)) = parse_file_name(name) else {
            tracing::warn!(file = %entry.path().display(), "ignored: a DKIM key file is named <domain>.<selector>.key");
            continue;
        };
        found.push((entry.path(), domain, selector));
    }
    found.sort();
    Ok(found)
}

/// Splits `<domain>.<selector>.key` (the selector has no dot).
fn parse_file_name(name: &str) -> Option<(String, String)> {
    let (domain, selector) = name.strip_suffix(".key")?.rsplit_once('.')?;
    Some((parse_domain(domain)?, parse_selector(selector)?))
}

/// Reads and parses one key file.
fn read_key(path: &Path) -> Result<RsaKey<Sha256>, DkimError> {
    let read_error = |source| DkimError::ReadKey {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_error)?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(file = %path.display(), mode = format_args!("{:o}", meta.permissions().mode() & 0o777), "DKIM key readable by others than its owner; chmod 600 it");
    }
    let pem = std::fs::read(path).map_err(read_error)?;
    let invalid = |source: Box<dyn std::error::Error + Send + Sync>| DkimError::InvalidKey {
        path: path.to_owned(),
        source,
    };
    let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| invalid(Box::new(e)))?;
    RsaKey::<Sha256>::from_key_der(der).map_err(|e| invalid(Box::new(e)))
}

/// A lower-cased domain name of at least two labels: letters, digits, `-` (not at a label's
/// ends), labels of 1 to 63 characters, 253 in all.
fn parse_domain(s: &str) -> Option<String> {
    let d = s.to_ascii_lowercase();
    (d.len() <= 253 && d.contains('.') && d.split('.').all(is_label)).then_some(d)
}

/// A lower-cased selector: one label.
fn parse_selector(s: &str) -> Option<String> {
    let s = s.to_ascii_lowercase();
    is_label(&s).then_some(s)
}

fn is_label(l: &str) -> bool {
    (1..=63).contains(&l.len())
        && !l.starts_with('-')
        && !l.ends_with('-')
        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Why [`write_new`] failed.
enum WriteNewError {
    /// The file exists.
    Exists,
    Io(std::io::Error),
}

impl From<std::io::Error> for WriteNewError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// Writes a new file `path` in `dir` (mode 0600) without ever replacing one: a temporary file,
/// synced, is hard-linked to `path` (which fails if `path` exists) and then unlinked; the
/// directory is synced last.
fn write_new(dir: &Path, path: &Path, contents: &[u8]) -> Result<(), WriteNewError> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let name = path
        .file_name()
        .map_or_else(|| "key".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.tmp-{}-{nanos}", std::process::id()));
    let result = link_from_temp(&tmp, path, contents);
    let _ = std::fs::remove_file(&tmp); // gone already when it worked
    result?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

fn link_from_temp(tmp: &Path, path: &Path, contents: &[u8]) -> Result<(), WriteNewError> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)?;
    // The mode above is filtered by the umask; make it exactly 0600.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(contents)?;
    file.sync_all()?;
    drop(file);
    match std::fs::hard_link(tmp, path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(WriteNewError::Exists);
        }
        Err(e) => return Err(e.into()),
    }
    std::fs::remove_file(tmp)?;
    Ok(())
}

/// `AlgorithmIdentifier { rsaEncryption (1.2.840.113549.1.1.1), NULL }`, DER.
const RSA_ALGORITHM: [u8; 15] = [
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
];

/// Wraps a PKCS#1 `RSAPrivateKey` into a PKCS#8 `PrivateKeyInfo` (RFC 5208).
fn pkcs8_from_pkcs1(pkcs1: &[u8]) -> Vec<u8> {
    let mut content = vec![0x02, 0x01, 0x00]; // version 0
    content.extend_from_slice(&RSA_ALGORITHM);
    content.extend(der(0x04, pkcs1)); // OCTET STRING
    der(0x30, &content)
}

/// Wraps a PKCS#1 `RSAPublicKey` into a `SubjectPublicKeyInfo` (RFC 5280), the form DKIM's
/// `p=` expects.
fn spki_from_pkcs1(pkcs1: &[u8]) -> Vec<u8> {
    let mut bits = vec![0x00]; // no unused bits
    bits.extend_from_slice(pkcs1);
    let mut content = RSA_ALGORITHM.to_vec();
    content.extend(der(0x03, &bits)); // BIT STRING
    der(0x30, &content)
}

/// One DER tag-length-value.
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8); // < 0x80 checked
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8); // at most 8
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// PEM with 64-character lines (RFC 7468).
fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = BASE64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::HashMap;
    use std::sync::Mutex;

    use mail_auth::common::parse::TxtRecordParser as _;
    use mail_auth::common::verify::DomainKey;
    use mail_auth::hickory_resolver::config::{ResolverConfig, ResolverOpts};
    use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator, Parameters, Txt};

    /// A 2048-bit key's SubjectPublicKeyInfo starts like this in base64: SEQUENCE, the
    /// rsaEncryption identifier, BIT STRING, then the RSAPublicKey SEQUENCE and its modulus.
    const SPKI_2048_PREFIX: &str = "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA";

    const MESSAGE: &str = concat!(
        "From: Alice <alice@example.test>\r\n",
        "To: bob@remote.test\r\n",
        "Subject: Lunch   on\r\n",
        "  Friday?\r\n",
        "Date: Fri, 6 Nov 2026 10:00:00 +0000\r\n",
        "Message-ID: <1@example.test>\r\n",
        "X-Mailer: test\r\n",
        "\r\n",
        "Shall we meet at noon?\r\n",
        "\r\n",
        "Alice\r\n",
    );

    /// A TXT cache holding the test's records, so verification never asks DNS.
    struct Records(Mutex<HashMap<Box<str>, Txt>>);

    #[allow(clippy::disallowed_types)] // mail-auth's trait takes std's Instant
    impl mail_auth::ResolverCache<Box<str>, Txt> for Records {
        fn get<Q>(&self, name: &Q) -> Option<Txt>
        where
            Box<str>: std::borrow::Borrow<Q>,
            Q: std::hash::Hash + Eq + ?Sized,
        {
            self.0.lock().unwrap().get(name).cloned()
        }

        fn remove<Q>(&self, name: &Q) -> Option<Txt>
        where
            Box<str>: std::borrow::Borrow<Q>,
            Q: std::hash::Hash + Eq + ?Sized,
        {
            self.0.lock().unwrap().remove(name)
        }

        fn insert(&self, key: Box<str>, value: Txt, _: std::time::Instant) {
            self.0.lock().unwrap().insert(key, value);
        }
    }

    /// Verifies the DKIM signature(s) of `message` with mail-auth, the key record `name` having
    /// `value`. The resolver has no name servers, so a lookup the cache misses fails.
    async fn verify(name: &str, value: &str, message: &[u8]) -> Vec<DkimResult> {
        let records = Records(Mutex::new(HashMap::new()));
        records.0.lock().unwrap().insert(
            format!("{name}.").into(),
            DomainKey::parse(value.as_bytes()).unwrap().into(),
        );
        let authenticator = MessageAuthenticator::new(
            ResolverConfig::from_name_servers(Vec::new()),
            ResolverOpts::default(),
        )
        .unwrap();
        let parsed = AuthenticatedMessage::parse(message).unwrap();
        authenticator
            .verify_dkim(Parameters::new(&parsed).with_txt_cache(&records))
            .await
            .iter()
            .map(|o| o.result().clone())
            .collect()
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn generated_key_signs_and_the_signature_verifies() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("dkim");
        let g = generate(&dir, "Example.TEST", "mail").unwrap();

        assert_eq!(g.path, dir.join("example.test.mail.key"));
        assert_eq!(mode(&g.path), 0o600);
        assert_eq!(mode(&dir), 0o700);
        let pem = std::fs::read_to_string(&g.path).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
        assert_eq!(g.record_name, "mail._domainkey.example.test");
        let p = g.record_value.strip_prefix("v=DKIM1; k=rsa; p=").unwrap();
        assert!(p.starts_with(SPKI_2048_PREFIX), "{p}");
        let zone = g.zone_line();
        assert!(
            zone.starts_with("mail._domainkey.example.test. IN TXT ( \"v=DKIM1; k=rsa; p=MIIB"),
            "{zone}"
        );
        let unquoted: String = zone
            .split('"')
            .skip(1)
            .step_by(2)
            .inspect(|s| assert!(s.len() <= 255))
            .collect();
        assert_eq!(unquoted, g.record_value);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary file left"
        );

        // A second key for the domain is refused, under any selector, and changes nothing.
        for selector in ["mail", "other"] {
            let e = generate(&dir, "example.test", selector).unwrap_err();
            assert!(matches!(e, DkimError::KeyExists { .. }), "{e}");
            assert!(e.to_string().contains("example.test.mail.key"), "{e}");
        }
        assert_eq!(std::fs::read_to_string(&g.path).unwrap(), pem);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);

        let signer = Signer::load(&dir).unwrap();
        assert!(!signer.is_empty());
        assert_eq!(signer.domains(), ["example.test"]);
        assert_eq!(signer.keys()[0].selector, "mail");
        assert!(!format!("{signer:?}").contains("BEGIN"));

        let header = signer
            .sign("example.test", MESSAGE.as_bytes())
            .unwrap()
            .unwrap();
        assert!(
            header.starts_with(
                "DKIM-Signature: v=1; a=rsa-sha256; s=mail; d=example.test; c=relaxed/relaxed;"
            ),
            "{header}"
        );
        assert!(header.ends_with(";\r\n"), "{header}");
        assert!(header.lines().all(|l| l.len() <= 78), "folded: {header:?}");
        let unfolded = header.replace("\r\n\t", " ");
        assert!(unfolded.contains(" t="), "{header}");
        let h = unfolded
            .split("; ")
            .find_map(|t| t.trim().strip_prefix("h="))
            .unwrap();
        for name in ["From", "To", "Subject", "Date", "Message-ID"] {
            assert!(h.split(':').any(|n| n == name), "{name} in {h}");
        }
        assert!(!h.contains("X-Mailer"), "{h}");

        let signed = format!("{header}{MESSAGE}");
        assert_eq!(
            verify(&g.record_name, &g.record_value, signed.as_bytes()).await,
            [DkimResult::Pass]
        );
        // Relaxed canonicalization: whitespace changes in signed fields still verify.
        let respaced = signed.replace("Lunch   on\r\n  Friday?", "Lunch on Friday?");
        assert_eq!(
            verify(&g.record_name, &g.record_value, respaced.as_bytes()).await,
            [DkimResult::Pass]
        );

        // A changed body: the body hash differs (mail-auth reports that as neutral).
        let tampered = signed.replace("at noon", "at one");
        assert_ne!(tampered, signed);
        assert_eq!(
            verify(&g.record_name, &g.record_value, tampered.as_bytes()).await,
            [DkimResult::Neutral(mail_auth::Error::Dkim(
                mail_auth::dkim::DkimError::FailedBodyHashMatch
            ))]
        );
        // A changed signed field, or an added one it oversigns: the RSA signature fails.
        for tampered in [
            signed.replace("Lunch", "Dinner"),
            signed.replace("Message-ID: <1@", "Message-ID: <2@"),
            signed.replacen("\r\n\r\n", "\r\nCc: eve@evil.test\r\n\r\n", 1),
        ] {
            assert_ne!(tampered, signed);
            let r = verify(&g.record_name, &g.record_value, tampered.as_bytes()).await;
            assert!(matches!(r[..], [DkimResult::Fail(_)]), "{r:?}\n{tampered}");
        }

        // Another key's record does not verify it either.
        let other = generate(&tmp.path().join("other"), "example.test", "mail").unwrap();
        let r = verify(&g.record_name, &other.record_value, signed.as_bytes()).await;
        assert!(matches!(r[..], [DkimResult::Fail(_)]), "{r:?}");
    }

    #[test]
    fn sign_is_none_without_a_key_and_names_are_case_insensitive() {
        let tmp = tempfile::tempdir().unwrap();
        write_pkcs1_key(tmp.path(), "example.test.s1.key");
        let signer = Signer::load(tmp.path()).unwrap();
        assert!(signer.sign("other.test", MESSAGE.as_bytes()).is_none());
        assert!(
            signer
                .sign("sub.example.test", MESSAGE.as_bytes())
                .is_none()
        );
        let header = signer
            .sign("Example.Test.", MESSAGE.as_bytes())
            .unwrap()
            .unwrap();
        assert!(header.contains("s=s1; d=example.test;"), "{header}");
    }

    #[tokio::test]
    async fn pkcs1_keys_load_too() {
        let tmp = tempfile::tempdir().unwrap();
        let record = write_pkcs1_key(tmp.path(), "example.test.legacy.key");
        let signer = Signer::load(tmp.path()).unwrap();
        let header = signer
            .sign("example.test", MESSAGE.as_bytes())
            .unwrap()
            .unwrap();
        let signed = format!("{header}{MESSAGE}");
        assert_eq!(
            verify("legacy._domainkey.example.test", &record, signed.as_bytes()).await,
            [DkimResult::Pass]
        );
    }

    /// Writes a 2048-bit key (ring signs with nothing shorter) as PKCS#1 PEM; returns its
    /// record value.
    fn write_pkcs1_key(dir: &Path, name: &str) -> String {
        let pair = DkimKeyPair::generate_rsa(2048).unwrap();
        std::fs::write(
            dir.join(name),
            pem_encode("RSA PRIVATE KEY", pair.private_key()),
        )
        .unwrap();
        format!(
            "v=DKIM1; k=rsa; p={}",
            BASE64.encode(spki_from_pkcs1(pair.public_key()))
        )
    }

    #[test]
    fn missing_directory_is_no_keys_and_other_files_are_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        let signer = Signer::load(&tmp.path().join("nope")).unwrap();
        assert!(signer.is_empty());
        assert!(signer.domains().is_empty());
        for name in [
            "README",
            "example.test.mail.key.bak",
            ".example.test.mail.key.tmp-1-2",
            "nodots.key",
            "bad_domain.test.mail.key",
        ] {
            std::fs::write(tmp.path().join(name), "garbage").unwrap();
        }
        assert!(Signer::load(tmp.path()).unwrap().is_empty());
    }

    #[test]
    fn a_bad_key_file_fails_loading_and_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("example.test.mail.key");
        std::fs::write(
            &path,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = Signer::load(tmp.path()).unwrap_err();
        assert!(matches!(e, DkimError::InvalidKey { .. }), "{e:?}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        std::fs::write(&path, "not pem at all").unwrap();
        let e = Signer::load(tmp.path()).unwrap_err();
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }

    #[test]
    fn two_keys_for_a_domain_fail_loading() {
        let tmp = tempfile::tempdir().unwrap();
        write_pkcs1_key(tmp.path(), "example.test.a.key");
        write_pkcs1_key(tmp.path(), "example.test.b.key");
        let e = Signer::load(tmp.path()).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("example.test.a.key") && s.contains("example.test.b.key"),
            "{s}"
        );
    }

    #[test]
    fn names_are_checked_before_anything_is_written() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("dkim");
        for domain in [
            "",
            "localhost",
            "../etc.test",
            "a/b.test",
            "a..b.test",
            ".example.test",
            "-a.test",
            "bücher.test",
            "a b.test",
        ] {
            let e = generate(&dir, domain, "mail").unwrap_err();
            assert!(matches!(e, DkimError::InvalidDomain(_)), "{domain}: {e}");
        }
        for selector in ["", "a.b", "../x", "a/b", "-x", "a_b", &"x".repeat(64)] {
            let e = generate(&dir, "example.test", selector).unwrap_err();
            assert!(
                matches!(e, DkimError::InvalidSelector(_)),
                "{selector}: {e}"
            );
        }
        assert!(!dir.exists());
    }

    #[test]
    fn zone_line_splits_long_values() {
        let g = Generated {
            path: PathBuf::new(),
            record_name: "s._domainkey.example.test".into(),
            record_value: "x".repeat(600),
        };
        assert_eq!(
            g.zone_line(),
            format!(
                "s._domainkey.example.test. IN TXT ( \"{}\" \"{}\" \"{}\" )",
                "x".repeat(255),
                "x".repeat(255),
                "x".repeat(90)
            )
        );
    }

    #[test]
    fn der_lengths() {
        assert_eq!(der(0x04, &[1, 2]), [0x04, 2, 1, 2]);
        assert_eq!(&der(0x04, &[0; 0x80])[..3], [0x04, 0x81, 0x80]);
        assert_eq!(&der(0x04, &[0; 0x1234])[..4], [0x04, 0x82, 0x12, 0x34]);
    }

    #[test]
    fn signer_is_send_and_sync() {
        fn check<T: Send + Sync + fmt::Debug>() {}
        check::<Signer>();
    }
}
