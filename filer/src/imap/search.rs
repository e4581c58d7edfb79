//! SEARCH: whether one message matches a search key (RFC 3501 §6.4.4, and MODSEQ from RFC 7162).
//!
//! Keys on flags, sizes, dates and numbers are answered from the [`Candidate`]; keys on the
//! message's text load it through the caller's `load`, at most once per [`matches`] call, and
//! only when the cheaper keys of an AND/OR have not already decided. String matching is a
//! case-insensitive substring match on decoded text: RFC 2047 words in headers, and the transfer
//! encoding and charset of text parts (decoded by mail-parser), as Dovecot does without FTS.

use std::sync::Arc;

use imap_types::core::AString;
use imap_types::datetime::NaiveDate;
use imap_types::search::SearchKey;
use imap_types::sequence::{SeqOrUid, Sequence, SequenceSet};
use mail_parser::parsers::MessageStream;
use mail_parser::{HeaderValue, MessageParser, PartType};

use super::mime;

/// What SEARCH knows about a message without reading it.
pub(crate) struct Candidate<'a> {
    /// Message sequence number.
    pub(crate) seq: u32,
    pub(crate) uid: u32,
    /// RFC822.SIZE, for LARGER and SMALLER.
    pub(crate) size: u64,
    /// INTERNALDATE as Unix seconds; BEFORE, ON and SINCE compare its UTC day.
    pub(crate) internal_date: i64,
    /// Flags and keywords as IMAP spells them, e.g. `\Seen`, `$Label`; `\Recent` if recent.
    /// Compared case-insensitively.
    pub(crate) flags: &'a [String],
    /// For MODSEQ (RFC 7162).
    pub(crate) modseq: u64,
}

/// The mailbox's largest numbers, which `*` stands for in sequence sets.
pub(crate) struct Context {
    pub(crate) max_seq: u32,
    pub(crate) max_uid: u32,
}

/// Whether the message `c` matches `key`. For a command's list of keys pass
/// `SearchKey::And(criteria)`, so the message is loaded at most once for all of them.
///
/// `load` returns the raw message, and is called only when a key needs the text (see
/// [`needs_content`]), at most once. If it returns `None`, text keys do not match, and SENT*
/// fall back to the internal date.
pub(crate) fn matches(
    key: &SearchKey<'_>,
    c: &Candidate<'_>,
    ctx: &Context,
    load: &mut dyn FnMut() -> Option<Arc<[u8]>>,
) -> bool {
    let mut content = Content { load, state: None };
    eval(key, c, ctx, &mut content)
}

/// Whether evaluating `key` may need the message itself (headers, body or Date:).
pub(crate) fn needs_content(key: &SearchKey<'_>) -> bool {
    match key {
        SearchKey::And(keys) => keys.as_ref().iter().any(needs_content),
        SearchKey::Not(key) => needs_content(key),
        SearchKey::Or(a, b) => needs_content(a) || needs_content(b),
        SearchKey::Bcc(_)
        | SearchKey::Body(_)
        | SearchKey::Cc(_)
        | SearchKey::From(_)
        | SearchKey::Header(..)
        | SearchKey::SentBefore(_)
        | SearchKey::SentOn(_)
        | SearchKey::SentSince(_)
        | SearchKey::Subject(_)
        | SearchKey::Text(_)
        | SearchKey::To(_) => true,
        _ => false,
    }
}

fn eval(key: &SearchKey<'_>, c: &Candidate<'_>, ctx: &Context, content: &mut Content<'_>) -> bool {
    let mut sub = |key: &SearchKey<'_>| eval(key, c, ctx, content);
    match key {
        // Keys that need no message text first, so that the text is only loaded when they match.
        SearchKey::And(keys) => {
            let keys = keys.as_ref();
            keys.iter().filter(|k| !needs_content(k)).all(&mut sub)
                && keys.iter().filter(|k| needs_content(k)).all(sub)
        }
        SearchKey::Or(a, b) => {
            let (a, b): (&SearchKey<'_>, &SearchKey<'_>) = (a, b);
            let (first, second) = if needs_content(a) { (b, a) } else { (a, b) };
            sub(first) || sub(second)
        }
        SearchKey::Not(key) => !sub(key),
        SearchKey::All => true,
        SearchKey::SequenceSet(set) => contains(set, c.seq, ctx.max_seq),
        SearchKey::Uid(set) => contains(set, c.uid, ctx.max_uid),

        SearchKey::Answered => has_flag(c, "\\Answered"),
        SearchKey::Deleted => has_flag(c, "\\Deleted"),
        SearchKey::Draft => has_flag(c, "\\Draft"),
        SearchKey::Flagged => has_flag(c, "\\Flagged"),
        SearchKey::Recent => has_flag(c, "\\Recent"),
        SearchKey::Seen => has_flag(c, "\\Seen"),
        SearchKey::Unanswered => !has_flag(c, "\\Answered"),
        SearchKey::Undeleted => !has_flag(c, "\\Deleted"),
        SearchKey::Undraft => !has_flag(c, "\\Draft"),
        SearchKey::Unflagged => !has_flag(c, "\\Flagged"),
        SearchKey::Unseen => !has_flag(c, "\\Seen"),
        SearchKey::New => has_flag(c, "\\Recent") && !has_flag(c, "\\Seen"),
        SearchKey::Old => !has_flag(c, "\\Recent"),
        SearchKey::Keyword(k) => has_flag(c, k.as_ref()),
        SearchKey::Unkeyword(k) => !has_flag(c, k.as_ref()),

        SearchKey::Larger(n) => c.size > u64::from(*n),
        SearchKey::Smaller(n) => c.size < u64::from(*n),

        SearchKey::Before(d) => internal_day(c) < day(d),
        SearchKey::On(d) => internal_day(c) == day(d),
        SearchKey::Since(d) => internal_day(c) >= day(d),
        SearchKey::SentBefore(d) => content.sent_day(c) < day(d),
        SearchKey::SentOn(d) => content.sent_day(c) == day(d),
        SearchKey::SentSince(d) => content.sent_day(c) >= day(d),

        SearchKey::Bcc(s) => content.header_contains(b"bcc", s),
        SearchKey::Cc(s) => content.header_contains(b"cc", s),
        SearchKey::From(s) => content.header_contains(b"from", s),
        SearchKey::To(s) => content.header_contains(b"to", s),
        SearchKey::Subject(s) => content.header_contains(b"subject", s),
        SearchKey::Header(name, s) => content.header_contains(name.as_ref(), s),
        SearchKey::Body(s) => content.body_contains(s),
        SearchKey::Text(s) => content.text_contains(s),

        // RFC 7162 §3.1.5: the message's mod-sequence is at least the given one. We keep no
        // per-flag mod-sequences, so the entry name and type (optional anyway) do not matter.
        SearchKey::ModSequence { modseq, .. } => c.modseq >= *modseq,

        // Keys of imap-types features this crate does not enable today (ext_within's
        // OLDER/YOUNGER); if one is switched on, it matches nothing until handled here.
        #[allow(unreachable_patterns)]
        _ => false,
    }
}

/// Whether `n` is in `set`, `*` standing for `largest` (RFC 3501 §9 seq-number). A range may be
/// written either way round, so `UID 100:*` matches the last message even when its UID is below
/// 100, as RFC 3501 §6.4.8 requires.
fn contains(set: &SequenceSet, n: u32, largest: u32) -> bool {
    let value = |s: &SeqOrUid| match s {
        SeqOrUid::Value(v) => v.get(),
        SeqOrUid::Asterisk => largest,
    };
    set.0.as_ref().iter().any(|sequence| match sequence {
        Sequence::Single(s) => value(s) == n,
        Sequence::Range(a, b) => {
            let (a, b) = (value(a), value(b));
            a.min(b) <= n && n <= a.max(b)
        }
    })
}

fn has_flag(c: &Candidate<'_>, flag: &str) -> bool {
    c.flags.iter().any(|f| f.eq_ignore_ascii_case(flag))
}

/// The UTC day of the internal date, as days since 1970-01-01.
fn internal_day(c: &Candidate<'_>) -> i64 {
    c.internal_date.div_euclid(86_400)
}

/// A search date as days since 1970-01-01.
fn day(date: &NaiveDate) -> i64 {
    i64::from(date.as_ref().to_epoch_days())
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = i64::from((month + 9) % 12);
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The message text, loaded on first use, and what was derived from it.
struct Content<'l> {
    load: &'l mut dyn FnMut() -> Option<Arc<[u8]>>,
    /// `None` until loaded; `Some(None)` if the message could not be loaded.
    state: Option<Option<Loaded>>,
}

struct Loaded {
    raw: Arc<[u8]>,
    /// Top-level header fields: name, and value RFC 2047-decoded and lower-cased.
    headers: Option<Vec<(Vec<u8>, String)>>,
    /// The decoded, lower-cased text of every text part.
    body: Option<Vec<String>>,
    /// Day of the Date: header, if it parses.
    sent_day: Option<Option<i64>>,
}

impl Content<'_> {
    fn loaded(&mut self) -> Option<&mut Loaded> {
        if self.state.is_none() {
            let raw = (self.load)();
            self.state = Some(raw.map(|raw| Loaded {
                raw,
                headers: None,
                body: None,
                sent_day: None,
            }));
        }
        self.state.as_mut().and_then(Option::as_mut)
    }

    /// Whether a header field `name` exists whose value contains `needle`; an empty needle
    /// matches any message with that field (RFC 3501 §6.4.4 HEADER).
    fn header_contains(&mut self, name: &[u8], needle: &AString<'_>) -> bool {
        let needle = lower(needle.as_ref());
        let Some(loaded) = self.loaded() else {
            return false;
        };
        loaded
            .headers()
            .iter()
            .any(|(n, value)| n.eq_ignore_ascii_case(name) && value.contains(&needle))
    }

    fn body_contains(&mut self, needle: &AString<'_>) -> bool {
        let needle = lower(needle.as_ref());
        let Some(loaded) = self.loaded() else {
            return false;
        };
        needle.is_empty() || loaded.body().iter().any(|text| text.contains(&needle))
    }

    /// TEXT: the header (names and decoded values) or the body.
    fn text_contains(&mut self, needle: &AString<'_>) -> bool {
        let needle = lower(needle.as_ref());
        let Some(loaded) = self.loaded() else {
            return false;
        };
        needle.is_empty()
            || loaded
                .headers()
                .iter()
                .any(|(name, value)| value.contains(&needle) || lower(name).contains(&needle))
            || loaded.body().iter().any(|text| text.contains(&needle))
    }

    /// The day of the Date: header as written (its own time zone, RFC 3501 §6.4.4 SENT*), or
    /// like Dovecot the internal date's day when it is missing or does not parse.
    fn sent_day(&mut self, c: &Candidate<'_>) -> i64 {
        self.loaded()
            .and_then(Loaded::sent_day)
            .unwrap_or_else(|| internal_day(c))
    }
}

impl Loaded {
    fn headers(&mut self) -> &[(Vec<u8>, String)] {
        let raw = &self.raw;
        self.headers.get_or_insert_with(|| {
            mime::header_fields(mime::split_header(raw).0)
                .map(|f| {
                    (
                        f.name.to_vec(),
                        lower(decode_header_value(f.value).as_bytes()),
                    )
                })
                .collect()
        })
    }

    fn body(&mut self) -> &[String] {
        let raw = &self.raw;
        self.body.get_or_insert_with(|| {
            mime::text_parts(raw)
                .iter()
                .map(|part| decode_text_part(part).to_lowercase())
                .collect()
        })
    }

    fn sent_day(&mut self) -> Option<i64> {
        let raw = &self.raw;
        *self.sent_day.get_or_insert_with(|| {
            let field = mime::header_fields(mime::split_header(raw).0)
                .find(|f| f.name.eq_ignore_ascii_case(b"date"))?;
            let mut value = field.value.to_vec();
            value.extend_from_slice(b"\r\n");
            match MessageStream::new(&value).parse_date() {
                HeaderValue::DateTime(dt)
                    if (1..=12).contains(&dt.month) && (1..=31).contains(&dt.day) =>
                {
                    Some(days_from_civil(
                        i64::from(dt.year),
                        u32::from(dt.month),
                        u32::from(dt.day),
                    ))
                }
                _ => None,
            }
        })
    }
}

/// A header value with its RFC 2047 encoded words decoded and folding removed.
fn decode_header_value(value: &[u8]) -> String {
    let mut line = value.to_vec();
    line.extend_from_slice(b"\r\n");
    match MessageStream::new(&line).parse_unstructured() {
        HeaderValue::Text(text) => text.into_owned(),
        _ => String::from_utf8_lossy(&mime::unfold(value)).into_owned(),
    }
}

/// A text part's body decoded from its transfer encoding and charset by mail-parser. The part
/// is handed over behind a header we write from what `mime` parsed, so mail-parser sees exactly
/// one text part and never nests (or disagrees with our part tree).
fn decode_text_part(part: &mime::TextPart<'_>) -> String {
    let token = |bytes: &[u8]| -> Vec<u8> {
        bytes
            .iter()
            .copied()
            .filter(|b| b.is_ascii_alphanumeric() || b"-_.:+".contains(b))
            .collect()
    };
    let html = part.subtype.eq_ignore_ascii_case(b"html");
    let mut message = Vec::with_capacity(part.body.len() + 128);
    message.extend_from_slice(if html {
        b"Content-Type: text/html"
    } else {
        b"Content-Type: text/plain"
    });
    if let Some(charset) = &part.charset {
        message.extend_from_slice(b"; charset=\"");
        message.extend_from_slice(&token(charset));
        message.push(b'"');
    }
    if let Some(encoding) = &part.encoding {
        message.extend_from_slice(b"\r\nContent-Transfer-Encoding: ");
        message.extend_from_slice(&token(encoding));
    }
    message.extend_from_slice(b"\r\n\r\n");
    message.extend_from_slice(part.body);
    let parsed = MessageParser::default().parse(&message);
    match parsed
        .as_ref()
        .and_then(|m| m.parts.first())
        .map(|p| &p.body)
    {
        Some(PartType::Text(text)) => text.to_string(),
        Some(PartType::Html(markup)) => mail_parser::decoders::html::html_to_text(markup),
        _ => String::from_utf8_lossy(part.body).into_owned(),
    }
}

fn lower(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).to_lowercase()
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use imap_codec::CommandCodec;
    use imap_codec::decode::Decoder;
    use imap_types::command::CommandBody;
    use imap_types::core::Vec1;

    use super::*;

    /// The criteria of `SEARCH <criteria>`, parsed by imap-codec as the session will get them.
    fn key(criteria: &str) -> SearchKey<'static> {
        let command = format!("A SEARCH {criteria}\r\n");
        let (_, command) = CommandCodec::new()
            .decode_static(command.as_bytes())
            .unwrap_or_else(|e| panic!("{criteria}: {e:?}"));
        let CommandBody::Search { criteria, .. } = command.body else {
            panic!("not SEARCH");
        };
        SearchKey::And(criteria)
    }

    fn crlf(s: &str) -> Arc<[u8]> {
        Arc::from(s.replace('\n', "\r\n").into_bytes())
    }

    /// Unix seconds of a UTC date and time.
    fn at(year: i64, month: u32, day: u32, secs: i64) -> i64 {
        days_from_civil(year, month, day) * 86_400 + secs
    }

    struct Msg {
        seq: u32,
        uid: u32,
        size: u64,
        internal_date: i64,
        flags: Vec<String>,
        modseq: u64,
        raw: Option<Arc<[u8]>>,
    }

    impl Msg {
        fn new(raw: &str) -> Msg {
            let raw = crlf(raw);
            Msg {
                seq: 3,
                uid: 30,
                size: raw.len() as u64,
                internal_date: at(2024, 2, 1, 12 * 3600),
                flags: Vec::new(),
                modseq: 7,
                raw: Some(raw),
            }
        }

        fn flags(mut self, flags: &[&str]) -> Msg {
            self.flags = flags.iter().map(|f| (*f).to_owned()).collect();
            self
        }

        /// Evaluates `criteria`; returns the result and how often the message was loaded.
        fn search(&self, criteria: &str) -> (bool, usize) {
            self.search_key(&key(criteria))
        }

        fn search_key(&self, key: &SearchKey<'_>) -> (bool, usize) {
            let loads = Cell::new(0);
            let candidate = Candidate {
                seq: self.seq,
                uid: self.uid,
                size: self.size,
                internal_date: self.internal_date,
                flags: &self.flags,
                modseq: self.modseq,
            };
            let ctx = Context {
                max_seq: 10,
                max_uid: 100,
            };
            let mut load = || {
                loads.set(loads.get() + 1);
                self.raw.clone()
            };
            let hit = matches(key, &candidate, &ctx, &mut load);
            assert!(loads.get() <= 1, "loaded more than once");
            assert!(loads.get() == 0 || needs_content(key), "loaded for {key:?}");
            (hit, loads.get())
        }

        fn is(&self, criteria: &str) -> bool {
            self.search(criteria).0
        }
    }

    const PLAIN: &str = "From: =?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <juergen@example.org>
To: \"Team\" <team@example.org>, other@example.net
Cc: carol@example.com
Subject: =?utf-8?B?R3LDvMOfZQ==?= from the Meeting
Date: Thu, 1 Feb 2024 23:30:00 -0800
X-Custom: Some Value
X-Empty:
Message-ID: <abc@example.org>

Hello World,
see you at the café.
";

    const MULTIPART: &str = "From: a@example.org
Subject: parts
Content-Type: multipart/mixed; boundary=b

--b
Content-Type: multipart/alternative; boundary=a

--a
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: quoted-printable

Caf=C3=A9 ol=
\u{0020}lait
--a
Content-Type: text/html; charset=iso-8859-1
Content-Transfer-Encoding: base64

PHA+TWVldGluZyBpbiBN/G5jaGVuPC9wPg==
--a--
--b
Content-Type: application/pdf
Content-Transfer-Encoding: base64

c2VjcmV0IHBkZiB0ZXh0
--b
Content-Type: message/rfc822

Subject: inner

inner body words
--b--
";

    #[test]
    fn flag_keys() {
        let m = Msg::new(PLAIN).flags(&["\\Seen", "\\flagged", "$Label", "\\Recent"]);
        let table: &[(&str, bool)] = &[
            ("ALL", true),
            ("SEEN", true),
            ("UNSEEN", false),
            ("FLAGGED", true),
            ("UNFLAGGED", false),
            ("ANSWERED", false),
            ("UNANSWERED", true),
            ("DELETED", false),
            ("UNDELETED", true),
            ("DRAFT", false),
            ("UNDRAFT", true),
            ("RECENT", true),
            ("OLD", false),
            ("NEW", false),
            ("KEYWORD $label", true),
            ("KEYWORD $Other", false),
            ("UNKEYWORD $Label", false),
            ("UNKEYWORD $Other", true),
        ];
        for (criteria, expected) in table {
            assert_eq!(m.search(criteria), (*expected, 0), "{criteria}");
        }
        let m = Msg::new(PLAIN).flags(&["\\Recent"]);
        assert!(m.is("NEW") && m.is("RECENT") && !m.is("OLD"));
        let m = Msg::new(PLAIN).flags(&["\\Deleted", "\\Draft", "\\Answered"]);
        assert!(m.is("DELETED DRAFT ANSWERED OLD UNSEEN"));
    }

    #[test]
    fn size_and_modseq_keys() {
        let m = Msg::new(PLAIN);
        let size = m.size;
        assert!(m.is(&format!("LARGER {}", size - 1)));
        assert!(!m.is(&format!("LARGER {size}")));
        assert!(m.is(&format!("SMALLER {}", size + 1)));
        assert!(!m.is(&format!("SMALLER {size}")));
        assert!(m.is("MODSEQ 7"));
        assert!(m.is("MODSEQ 1"));
        assert!(!m.is("MODSEQ 8"));
        assert!(m.is("MODSEQ \"/flags/\\\\draft\" all 5"));
    }

    #[test]
    fn sequence_sets_and_uids() {
        let m = Msg::new(PLAIN); // seq 3 of 10, uid 30 of 100
        let table: &[(&str, bool)] = &[
            ("3", true),
            ("1:2", false),
            ("1:3", true),
            ("2,4,3", true),
            ("4:*", false),
            ("*", false),
            ("*:2", true),
            ("5:1", true),
            ("UID 30", true),
            ("UID 1:29,31:*", false),
            ("UID *", false),
            ("UID 29:31", true),
            ("NOT UID 30", false),
        ];
        for (criteria, expected) in table {
            assert_eq!(m.is(criteria), *expected, "{criteria}");
        }
        // `*` is the largest number: the last message matches `*` and `n:*` even when n > max.
        let last = Msg {
            seq: 10,
            uid: 100,
            ..Msg::new(PLAIN)
        };
        assert!(last.is("*") && last.is("UID *") && last.is("UID 500:*") && last.is("20:*"));
        assert!(!last.is("UID 500"));
    }

    #[test]
    fn internal_date_keys_use_the_utc_day() {
        let mut m = Msg::new(PLAIN);
        m.internal_date = at(2024, 2, 1, 86_399); // 23:59:59 UTC
        let table: &[(&str, bool)] = &[
            ("ON 1-Feb-2024", true),
            ("ON 2-Feb-2024", false),
            ("BEFORE 1-Feb-2024", false),
            ("BEFORE 2-Feb-2024", true),
            ("SINCE 1-Feb-2024", true),
            ("SINCE 2-Feb-2024", false),
            ("SINCE 31-Jan-2024 BEFORE 2-Feb-2024", true),
        ];
        for (criteria, expected) in table {
            assert_eq!(m.search(criteria), (*expected, 0), "{criteria}");
        }
        m.internal_date = at(1969, 12, 31, 0) + 1;
        assert!(m.is("ON 31-Dec-1969") && m.is("BEFORE 1-Jan-1970"));
    }

    #[test]
    fn sent_date_keys_use_the_date_header_as_written() {
        // Date: 1 Feb 2024 23:30 -0800, i.e. 2 Feb in UTC: SENT* go by the written day.
        let m = Msg::new(PLAIN);
        let table: &[(&str, bool)] = &[
            ("SENTON 1-Feb-2024", true),
            ("SENTON 2-Feb-2024", false),
            ("SENTBEFORE 1-Feb-2024", false),
            ("SENTBEFORE 2-Feb-2024", true),
            ("SENTSINCE 1-Feb-2024", true),
            ("SENTSINCE 2-Feb-2024", false),
        ];
        for (criteria, expected) in table {
            assert_eq!(m.search(criteria), (*expected, 1), "{criteria}");
        }
        // Without a usable Date: the internal date's day (5 Mar 2023 here), as Dovecot does.
        for raw in [
            "Subject: no date\n\nx\n",
            "Date: not a date at all\n\nx\n",
            "Date: 45 Foo 2024 99:99\n\nx\n",
        ] {
            let mut m = Msg::new(raw);
            m.internal_date = at(2023, 3, 5, 100);
            assert!(m.is("SENTON 5-Mar-2023"), "{raw:?}");
            assert!(!m.is("SENTSINCE 6-Mar-2023"), "{raw:?}");
        }
    }

    #[test]
    fn header_keys_match_decoded_text_case_insensitively() {
        let m = Msg::new(PLAIN);
        let table: &[(&str, bool)] = &[
            ("FROM JUERGEN@example", true),
            ("FROM example.org", true),
            ("TO team", true),
            ("TO other@example.net", true),
            ("TO carol", false),
            ("CC CAROL@", true),
            ("BCC example", false),
            ("SUBJECT meeting", true),
            ("SUBJECT \"from the\"", true),
            ("SUBJECT R3LDvMOfZQ", false),
            ("HEADER X-Custom \"some value\"", true),
            ("HEADER x-custom other", false),
            ("HEADER X-Empty \"\"", true),
            ("HEADER X-Missing \"\"", false),
            ("HEADER Message-ID abc@", true),
            ("SUBJECT \"\"", true),
            ("BCC \"\"", false),
        ];
        for (criteria, expected) in table {
            assert_eq!(m.search(criteria), (*expected, 1), "{criteria}");
        }
        let utf8 = |s: &str| AString::try_from(s.to_owned()).unwrap();
        assert!(m.search_key(&SearchKey::From(utf8("jürgen müller"))).0);
        assert!(m.search_key(&SearchKey::From(utf8("JÜRGEN"))).0);
        // Lower-casing, not full case folding: ß is not SS (Dovecot's i;unicode-casemap differs).
        assert!(!m.search_key(&SearchKey::Subject(utf8("GRÜSSE"))).0);
        assert!(m.search_key(&SearchKey::Subject(utf8("grüße from"))).0);
    }

    #[test]
    fn body_and_text_keys_decode_text_parts_only() {
        let m = Msg::new(MULTIPART);
        let table: &[(&str, bool)] = &[
            ("BODY \"au lait\"", false),
            ("BODY \"ol lait\"", true), // quoted-printable soft line break joined
            ("BODY meeting", true),     // base64 iso-8859-1 html, tags stripped
            ("BODY \"<p>\"", false),
            ("BODY secret", false), // application/pdf is not searched
            ("BODY \"inner body\"", true),
            ("BODY parts", false), // header, not body
            ("TEXT parts", true),
            ("TEXT \"inner body\"", true),
            ("TEXT subject", true), // field names are text too
            ("TEXT nowhere", false),
            ("BODY \"\"", true),
        ];
        for (criteria, expected) in table {
            assert_eq!(m.search(criteria), (*expected, 1), "{criteria}");
        }
        let utf8 = |s: &str| AString::try_from(s.to_owned()).unwrap();
        assert!(m.search_key(&SearchKey::Body(utf8("CAFÉ"))).0);
        assert!(m.search_key(&SearchKey::Body(utf8("münchen"))).0);
        assert!(Msg::new(PLAIN).search_key(&SearchKey::Text(utf8("café"))).0);
        assert!(Msg::new(PLAIN).is("BODY \"hello world\""));
    }

    #[test]
    fn not_or_and_combinations() {
        let m = Msg::new(PLAIN).flags(&["\\Seen"]);
        let table: &[(&str, bool)] = &[
            ("NOT SEEN", false),
            ("NOT NOT SEEN", true),
            ("OR SEEN FLAGGED", true),
            ("OR FLAGGED DELETED", false),
            ("OR FLAGGED NOT DELETED", true),
            ("(SEEN UNFLAGGED)", true),
            ("(SEEN FLAGGED)", false),
            ("OR (FLAGGED SEEN) (SEEN SUBJECT meeting)", true),
            ("NOT (SEEN SUBJECT nothing)", true),
            ("OR SUBJECT nothing FROM juergen", true),
            ("SEEN OR 1:2 UID 30 NOT LARGER 100000", true),
            ("3 NOT 3", false),
        ];
        for (criteria, expected) in table {
            assert_eq!(m.is(criteria), *expected, "{criteria}");
        }
    }

    #[test]
    fn message_is_loaded_only_when_needed_and_once() {
        let seen = Msg::new(PLAIN).flags(&["\\Seen"]);
        // The flag decides first: no load.
        assert_eq!(seen.search("UNSEEN BODY hello"), (false, 0));
        assert_eq!(seen.search("BODY hello UNSEEN"), (false, 0));
        assert_eq!(seen.search("OR SEEN BODY nothing"), (true, 0));
        assert_eq!(seen.search("OR BODY nothing SEEN"), (true, 0));
        // Several text keys share one load.
        assert_eq!(
            seen.search("SEEN BODY hello SUBJECT meeting FROM juergen SENTON 1-Feb-2024"),
            (true, 1)
        );
        assert_eq!(
            seen.search("OR SUBJECT nothing NOT TEXT nothing"),
            (true, 1)
        );
        for k in [
            "SEEN",
            "UID 1:*",
            "LARGER 1",
            "ON 1-Feb-2024",
            "NOT OR DRAFT 1:5",
        ] {
            assert!(!needs_content(&key(k)), "{k}");
        }
        for k in [
            "BCC x",
            "BODY x",
            "CC x",
            "FROM x",
            "HEADER a b",
            "SENTBEFORE 1-Jan-2000",
            "SENTON 1-Jan-2000",
            "SENTSINCE 1-Jan-2000",
            "SUBJECT x",
            "TEXT x",
            "TO x",
            "NOT OR SEEN TO x",
        ] {
            assert!(needs_content(&key(k)), "{k}");
        }
    }

    #[test]
    fn unloadable_message_matches_no_text_key() {
        let mut m = Msg::new(PLAIN);
        m.raw = None;
        assert_eq!(m.search("BODY \"\""), (false, 1));
        assert_eq!(m.search("NOT SUBJECT x"), (true, 1));
        assert_eq!(m.search("HEADER Subject \"\""), (false, 1));
        // SENT* fall back to the internal date (1 Feb 2024).
        assert_eq!(m.search("SENTON 1-Feb-2024 TEXT x"), (false, 1));
        assert_eq!(m.search("SENTON 1-Feb-2024"), (true, 1));
    }

    #[test]
    fn garbage_and_truncated_messages_never_panic() {
        let keys: Vec<SearchKey<'static>> = [
            "BODY x",
            "TEXT \"\"",
            "FROM a",
            "TO a",
            "CC a",
            "BCC a",
            "SUBJECT a",
            "HEADER Content-Type text",
            "SENTON 1-Feb-2024",
            "SENTSINCE 1-Feb-2024",
        ]
        .iter()
        .map(|k| key(k))
        .collect();
        let all = SearchKey::And(Vec1::try_from(keys.clone()).unwrap());
        let mut inputs: Vec<Vec<u8>> = Vec::new();
        for msg in [PLAIN, MULTIPART] {
            let raw = crlf(msg);
            inputs.extend((0..=raw.len()).map(|end| raw[..end].to_vec()));
        }
        inputs.push(b"\x00\xff\xfe=?utf-8?b?====?= \r\n\r\n=?x?q?=ZZ?=".to_vec());
        inputs.push(b"Content-Type: text/plain; charset=bogus-charset\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!notbase64".to_vec());
        inputs.push(b"Content-Type: message/rfc822\r\n\r\n".repeat(5_000));
        inputs.push(b"Date: =?utf-8?q?Mon=2C_1_Jan?= 2024\r\nSubject: =?\r\n\r\n".to_vec());
        for raw in inputs {
            let mut m = Msg::new("");
            m.raw = Some(Arc::from(raw));
            for k in keys.iter().chain([&all]) {
                let _ = m.search_key(k);
            }
        }
    }

    #[test]
    fn days_from_civil_agrees_with_imap_dates() {
        for (date, days) in [
            ("1-Jan-1970", 0),
            ("10-Sep-2005", 13036),
            ("29-Feb-2000", 11016),
            ("1-Mar-1900", -25508),
        ] {
            let SearchKey::And(keys) = key(&format!("ON {date}")) else {
                panic!()
            };
            let Some(SearchKey::On(d)) = keys.as_ref().first() else {
                panic!()
            };
            assert_eq!(day(d), days, "{date}");
        }
        assert_eq!(days_from_civil(2005, 9, 10), 13036);
        assert_eq!(days_from_civil(2000, 2, 29), 11016);
        assert_eq!(days_from_civil(1900, 3, 1), -25508);
        assert_eq!(days_from_civil(1970, 1, 1), 0);
    }
}
