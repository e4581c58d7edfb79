//! Mailbox names on the wire (modified UTF-7, RFC 3501 §5.1.3) and the rules that keep a name
//! inside the user's mailbox.
//!
//! The hierarchy delimiter is `/`. A name is refused if it is empty, too long, has an empty
//! level (`a//b`, leading or trailing `/`), a level `.` or `..`, a NUL, CR, LF or other
//! control character, a `~` at the start, or is not canonical modified UTF-7 — whether it
//! arrives encoded or decodes to one of those. On disk a name becomes a Maildir++ directory
//! through `store::folder_dir`, which escapes everything else.

/// The hierarchy delimiter.
pub(crate) const DELIMITER: char = '/';
/// Longest folder name in bytes (decoded).
const MAX_NAME_LEN: usize = 255;
/// Deepest hierarchy.
const MAX_DEPTH: usize = 16;

use base64::Engine as _;

/// Why a name is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadName(pub(crate) &'static str);

/// Decodes a name as the client sent it (modified UTF-7) into the stored UTF-8 form, with
/// `INBOX` case-insensitive, and checks it.
pub(crate) fn decode(wire: &[u8]) -> Result<String, BadName> {
    let s = std::str::from_utf8(wire).map_err(|_| BadName("mailbox name is not valid text"))?;
    if !s.is_ascii() {
        // IMAP4rev1 names are 7-bit modified UTF-7; raw UTF-8 would need UTF8=ACCEPT.
        return Err(BadName("mailbox name must be in modified UTF-7"));
    }
    let name = if s.contains('&') {
        mutf7_decode(s)?
    } else {
        s.to_owned()
    };
    check(&name)?;
    Ok(normalize_inbox(name))
}

/// Decodes a LIST pattern; one that is not valid modified UTF-7 is matched as it is.
pub(crate) fn decode_pattern(pattern: &str) -> String {
    if pattern.contains('&') {
        mutf7_decode(pattern).unwrap_or_else(|_| pattern.to_owned())
    } else {
        pattern.to_owned()
    }
}

/// Encodes a stored name for the wire.
pub(crate) fn encode(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut pending: Vec<u16> = Vec::new();
    let flush = |out: &mut String, pending: &mut Vec<u16>| {
        if pending.is_empty() {
            return;
        }
        let bytes: Vec<u8> = pending.iter().flat_map(|u| u.to_be_bytes()).collect();
        out.push('&');
        out.push_str(&MUTF7.encode(bytes));
        out.push('-');
        pending.clear();
    };
    for c in name.chars() {
        if (' '..='~').contains(&c) {
            flush(&mut out, &mut pending);
            if c == '&' {
                out.push_str("&-");
            } else {
                out.push(c);
            }
        } else {
            let mut buf = [0u16; 2];
            pending.extend_from_slice(c.encode_utf16(&mut buf));
        }
    }
    flush(&mut out, &mut pending);
    out
}

/// The modified BASE64 of RFC 3501 §5.1.3: `,` for `/`, no padding, no stray bits.
const MUTF7: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::IMAP_MUTF7,
    base64::engine::GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::RequireNone)
        .with_decode_allow_trailing_bits(false),
);

/// Decodes modified UTF-7 strictly: only canonical encodings are accepted (what [`encode`]
/// produces), so one name has one spelling.
fn mutf7_decode(s: &str) -> Result<String, BadName> {
    const BAD: BadName = BadName("mailbox name is not valid modified UTF-7");
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp + 1..];
        let end = after.find('-').ok_or(BAD)?;
        let b64 = &after[..end];
        rest = &after[end + 1..];
        if b64.is_empty() {
            out.push('&');
            continue;
        }
        let bytes = MUTF7.decode(b64).map_err(|_| BAD)?;
        if bytes.len() % 2 != 0 {
            return Err(BAD);
        }
        let units: Vec<u16> = bytes
            .chunks_exact(2)
            .map(|p| u16::from_be_bytes([p[0], p[1]]))
            .collect();
        let decoded = String::from_utf16(&units).map_err(|_| BAD)?;
        // Printable ASCII must not be encoded, and two encoded runs must not touch.
        if decoded.chars().any(|c| (' '..='~').contains(&c))
            || rest.starts_with('&') && !rest.starts_with("&-")
        {
            return Err(BAD);
        }
        out.push_str(&decoded);
    }
    out.push_str(rest);
    if encode(&out) != s {
        return Err(BAD);
    }
    Ok(out)
}

/// `INBOX` in any case (and `inbox/...` children) is the one INBOX.
fn normalize_inbox(name: String) -> String {
    if name.eq_ignore_ascii_case("INBOX") {
        return "INBOX".to_owned();
    }
    match name.split_once(DELIMITER) {
        Some((first, rest)) if first.eq_ignore_ascii_case("INBOX") => {
            format!("INBOX{DELIMITER}{rest}")
        }
        _ => name,
    }
}

fn check(name: &str) -> Result<(), BadName> {
    if name.is_empty() {
        return Err(BadName("empty mailbox name"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(BadName("mailbox name too long"));
    }
    if name.chars().any(|c| c.is_control()) {
        return Err(BadName("control characters in mailbox name"));
    }
    if name.starts_with('~') {
        return Err(BadName("mailbox name may not start with ~"));
    }
    let levels: Vec<&str> = name.split(DELIMITER).collect();
    if levels.len() > MAX_DEPTH {
        return Err(BadName("mailbox hierarchy too deep"));
    }
    for l in levels {
        if l.is_empty() {
            return Err(BadName("empty level in mailbox name"));
        }
        if l == "." || l == ".." {
            return Err(BadName("mailbox name may not contain . or .. levels"));
        }
    }
    Ok(())
}

/// Whether `name` matches a LIST pattern (`*` matches anything, `%` anything but the
/// delimiter), case-sensitively except for INBOX. Dynamic programming: O(pattern × name).
pub(crate) fn matches(pattern: &str, name: &str) -> bool {
    let name = normalize_inbox(name.to_owned());
    let pattern = if pattern.len() >= 5
        && pattern.is_char_boundary(5)
        && pattern[..5].eq_ignore_ascii_case("INBOX")
    {
        format!("INBOX{}", &pattern[5..])
    } else {
        pattern.to_owned()
    };
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // m[j]: whether p[..i] matches n[..j], row by row.
    let mut m = vec![false; n.len() + 1];
    m[0] = true;
    for &pc in &p {
        let mut next = vec![false; n.len() + 1];
        match pc {
            '*' | '%' => {
                let mut reach = false;
                for j in 0..=n.len() {
                    // A wildcard extends any earlier match; `%` stops at the delimiter.
                    if m[j] {
                        reach = true;
                    } else if j > 0 && pc == '%' && n[j - 1] == DELIMITER {
                        reach = false;
                    }
                    if j > 0 && pc == '%' && n[j - 1] == DELIMITER && !m[j] {
                        reach = false;
                    }
                    next[j] = reach;
                }
            }
            c => {
                for j in 1..=n.len() {
                    next[j] = m[j - 1] && n[j - 1] == c;
                }
            }
        }
        m = next;
    }
    m[n.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_are_refused() {
        for bad in [
            &b""[..],
            b"..",
            b"a/../b",
            b"a//b",
            b"/a",
            b"a/",
            b"~/x",
            b"~root",
            b"a\0b",
            b"a\r\nb",
            b".",
            b"a/./b",
            b"&AC4ALg-",   // decodes to ".."
            b"&AC8-x",     // decodes to "/x"
            b"&AAA-",      // decodes to NUL
            b"&Jjo",       // unterminated
            b"&!!!-",      // not base64
            b"&A-",        // stray bits
            b"&AGE-",      // encodes a printable "a"
            b"&AOQ-&AOQ-", // two runs that should be one
            b"\xff",
        ] {
            assert!(decode(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(decode(b"inbox").unwrap(), "INBOX");
        assert_eq!(decode(b"InBox/Sub").unwrap(), "INBOX/Sub");
        assert_eq!(decode(b"Entw&APw-rfe").unwrap(), "Entwürfe");
        assert_eq!(encode("Entwürfe"), "Entw&APw-rfe");
        assert_eq!(decode(b"a&-b").unwrap(), "a&b");
        assert_eq!(encode("a&b"), "a&-b");
        assert_eq!(decode(b"Archive/2024").unwrap(), "Archive/2024");
        // RFC 3501 §5.1.3's example.
        assert_eq!(
            decode(b"~peter/mail/&U,BTFw-/&ZeVnLIqe-").map_err(|e| e.0),
            Err("mailbox name may not start with ~")
        );
        assert_eq!(encode("台北/日本語"), "&U,BTFw-/&ZeVnLIqe-");
        assert_eq!(decode(b"&U,BTFw-/&ZeVnLIqe-").unwrap(), "台北/日本語");
        assert_eq!(encode("😀"), "&2D3eAA-");
        assert_eq!(decode(b"&2D3eAA-").unwrap(), "😀");
    }

    #[test]
    fn list_patterns() {
        assert!(matches("*", "a/b/c"));
        assert!(matches("%", "Sent"));
        assert!(!matches("%", "a/b"));
        assert!(matches("a/%", "a/b"));
        assert!(matches("inbox", "INBOX"));
        assert!(matches("*b", "a/b"));
        assert!(!matches("Sent", "sent"));
        assert!(matches("%/%", "a/b"));
        assert!(!matches(&"*a".repeat(40), &"b".repeat(200)), "bounded work");
    }
}
