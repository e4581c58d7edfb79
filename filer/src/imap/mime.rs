//! What FETCH needs from a stored message: ENVELOPE, BODY/BODYSTRUCTURE and the contents of
//! `BODY[section]` (RFC 3501 §6.4.5, §7.4.2).
//!
//! Everything works on the raw message as stored (CRLF line endings). The MIME part tree comes
//! from a small splitter over those bytes, shaped after Dovecot's message parser, rather than from
//! mail-parser: mail-parser decodes every part while it parses (a 25 MiB attachment is
//! base64-decoded just to learn its size), points the offsets of a base64-encoded message/rfc822
//! into its decoded copy, and RFC 2047/2231-decodes values that BODYSTRUCTURE must send as they
//! are. Here every size and line count is taken from the same raw byte range that `BODY[1.2]`
//! returns, so the two always agree. mail-parser still decodes text for SEARCH (`search.rs`).
//!
//! Strings in ENVELOPE and BODYSTRUCTURE are the header values as they are in the message: only
//! unfolded, never RFC 2047-decoded, as Dovecot sends them. A NUL byte, which IMAP strings cannot
//! carry, is sent as 0x80, as Dovecot does.
//!
//! Nothing in message data may panic: slicing goes through `get`, nesting is bounded by
//! [`MAX_DEPTH`] and the number of parts by [`MAX_PARTS`].

use std::borrow::Cow;
use std::ops::Range;

use imap_types::body::{
    BasicFields, Body, BodyStructure, Disposition, Language, Location, MultiPartExtensionData,
    SinglePartExtensionData, SpecificFields,
};
use imap_types::core::{AString, IString, Literal, NString, Vec1};
use imap_types::envelope::{Address, Envelope};
use imap_types::fetch::{Part, Section};

/// Deepest nesting of multiparts and message/rfc822 parts that is split into parts; a part below
/// it is a leaf. Bounds the recursion here and in every consumer of the tree.
const MAX_DEPTH: usize = 32;
/// Most MIME parts one message is split into (Dovecot's default limit too). Later parts stay
/// inside their parent's body.
const MAX_PARTS: usize = 10_000;

/// ENVELOPE of a message: its header fields as they are in the message, unfolded.
///
/// Sender and Reply-To default to From (RFC 3501 §7.4.2); a missing field is NIL, a present but
/// empty one `""`. Address lists keep group syntax and raw display names.
pub(crate) fn envelope(raw: &[u8]) -> Envelope<'static> {
    envelope_of(split_header(raw).0)
}

/// BODY (`extension_data == false`) or BODYSTRUCTURE (`true`) of a message.
pub(crate) fn body_structure(raw: &[u8], extension_data: bool) -> BodyStructure<'static> {
    structure(raw, &Node::parse(raw), extension_data)
}

/// Contents of `BODY[section]`; `None` is `BODY[]`, the whole message.
///
/// Part numbers follow RFC 3501 §6.4.5 the way Dovecot resolves them: part 1 of a non-multipart
/// is its body, a path continues into a message/rfc822 part's message, and `1.1` of a leaf is the
/// leaf itself. HEADER, HEADER.FIELDS[.NOT] and TEXT of a part require a message/rfc822 part;
/// MIME is the part's own header. HEADER.FIELDS[.NOT] always ends with the blank line.
///
/// Returns `None` when the part does not exist (Dovecot answers `""` then).
pub(crate) fn section<'r>(raw: &'r [u8], section: Option<&Section<'_>>) -> Option<Cow<'r, [u8]>> {
    let Some(section) = section else {
        return Some(Cow::Borrowed(raw));
    };
    let tree = Node::parse(raw);
    let bytes = |range: &Range<usize>| Cow::Borrowed(slice(raw, range));
    match section {
        Section::Part(part) => tree.find(part).map(|node| bytes(&node.body)),
        Section::Mime(part) => tree.find(part).map(|node| bytes(&node.header)),
        Section::Header(part) => tree.message(part.as_ref()).map(|m| bytes(&m.header)),
        Section::Text(part) => tree.message(part.as_ref()).map(|m| bytes(&m.body)),
        Section::HeaderFields(part, names) => {
            let m = tree.message(part.as_ref())?;
            Some(Cow::Owned(header_subset(
                slice(raw, &m.header),
                names.as_ref(),
                true,
            )))
        }
        Section::HeaderFieldsNot(part, names) => {
            let m = tree.message(part.as_ref())?;
            Some(Cow::Owned(header_subset(
                slice(raw, &m.header),
                names.as_ref(),
                false,
            )))
        }
    }
}

/// The header (up to and including the blank line that ends it) and the body of a message or
/// part. Without a blank line the whole input is header.
pub(super) fn split_header(bytes: &[u8]) -> (&[u8], &[u8]) {
    bytes.split_at(header_len(bytes))
}

/// One header field of a header block.
pub(super) struct Field<'r> {
    /// The name before the colon, without surrounding whitespace.
    pub(super) name: &'r [u8],
    /// The raw value after the colon, folding included, without the final line break.
    pub(super) value: &'r [u8],
    /// The whole field with its final line break, as `HEADER.FIELDS` sends it.
    pub(super) raw: &'r [u8],
}

/// The fields of a header block, in order, up to its blank line. A line without a colon is a
/// field with that line as its name and no value.
pub(super) fn header_fields(header: &[u8]) -> impl Iterator<Item = Field<'_>> {
    let mut pos = 0;
    std::iter::from_fn(move || {
        let rest = header.get(pos..)?;
        if rest.is_empty() || is_blank_line(rest) {
            return None;
        }
        // A field runs on over the following lines that start with whitespace (RFC 5322 §2.2.3).
        let mut end = line_end(rest, 0);
        while matches!(rest.get(end), Some(b' ' | b'\t')) {
            end = line_end(rest, end);
        }
        pos += end;
        let raw = rest.get(..end).unwrap_or_default();
        let line = trim_line_break(raw);
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let (name, value) = line.split_at(colon);
                (trim(name), value.get(1..).unwrap_or_default())
            }
            None => (trim(line), &b""[..]),
        };
        Some(Field { name, value, raw })
    })
}

/// A header value unfolded (CR and LF removed) and trimmed, as ENVELOPE and BODYSTRUCTURE carry it.
pub(super) fn unfold(value: &[u8]) -> Vec<u8> {
    trim(value)
        .iter()
        .copied()
        .filter(|&b| b != b'\r' && b != b'\n')
        .collect()
}

/// A text/* leaf part, for SEARCH to decode.
pub(super) struct TextPart<'r> {
    /// The subtype, e.g. `plain` or `html`.
    pub(super) subtype: Vec<u8>,
    /// The `charset` parameter, if any.
    pub(super) charset: Option<Vec<u8>>,
    /// The Content-Transfer-Encoding, if valid.
    pub(super) encoding: Option<Vec<u8>>,
    /// The raw (still encoded) body.
    pub(super) body: &'r [u8],
}

/// Every text/* leaf of the message, including those inside attached messages, in order.
pub(super) fn text_parts(raw: &[u8]) -> Vec<TextPart<'_>> {
    fn walk<'r>(raw: &'r [u8], node: &Node, out: &mut Vec<TextPart<'r>>) {
        match &node.kind {
            Kind::Multipart(children) => children.iter().for_each(|c| walk(raw, c, out)),
            Kind::Message(inner) => walk(raw, inner, out),
            Kind::Leaf if node.mime.media() == Media::Text => {
                let ct = node.mime.content_type.as_ref();
                out.push(TextPart {
                    subtype: ct
                        .map(|ct| ct.subtype.clone())
                        .unwrap_or_else(|| b"plain".to_vec()),
                    charset: ct
                        .and_then(|ct| param(&ct.params, b"charset"))
                        .map(<[u8]>::to_vec),
                    encoding: node.mime.encoding.clone(),
                    body: slice(raw, &node.body),
                });
            }
            Kind::Leaf => {}
        }
    }
    let mut out = Vec::new();
    walk(raw, &Node::parse(raw), &mut out);
    out
}

/// One MIME part: where its header and body are in the raw message, and what it contains.
struct Node {
    /// The part's header (the MIME header inside a multipart), with its blank line.
    header: Range<usize>,
    /// The part's body; for a message/rfc822 part the whole attached message.
    body: Range<usize>,
    mime: Mime,
    kind: Kind,
}

enum Kind {
    /// Not split further: not a multipart or message/rfc822, or below the nesting limit.
    Leaf,
    /// A multipart's parts; empty when it has no boundary or no part.
    Multipart(Vec<Node>),
    /// A message/rfc822 part's message.
    Message(Box<Node>),
}

impl Node {
    fn parse(raw: &[u8]) -> Node {
        let mut budget = MAX_PARTS;
        Node::parse_range(raw, 0..raw.len(), 0, false, &mut budget)
    }

    fn parse_range(
        raw: &[u8],
        range: Range<usize>,
        depth: usize,
        in_digest: bool,
        budget: &mut usize,
    ) -> Node {
        let header_end = range.start + header_len(slice(raw, &range));
        let header = range.start..header_end;
        let body = header_end..range.end.max(header_end);
        let mime = Mime::parse(slice(raw, &header), in_digest);
        let nested = depth < MAX_DEPTH && *budget > 0;
        let kind = match mime.media() {
            Media::Multipart if nested => {
                let digest = mime.subtype_is(b"digest");
                let children = match mime.boundary() {
                    Some(boundary) => split_multipart(raw, &body, boundary)
                        .into_iter()
                        .map_while(|part| {
                            *budget = budget.checked_sub(1)?;
                            Some(Node::parse_range(raw, part, depth + 1, digest, budget))
                        })
                        .collect(),
                    None => Vec::new(),
                };
                Kind::Multipart(children)
            }
            Media::Message if nested => {
                *budget = budget.saturating_sub(1);
                let inner = Node::parse_range(raw, body.clone(), depth + 1, false, budget);
                Kind::Message(Box::new(inner))
            }
            _ => Kind::Leaf,
        };
        Node {
            header,
            body,
            mime,
            kind,
        }
    }

    /// The part a section's part number names (Dovecot's `imap_msgpart_find`).
    fn find(&self, part: &Part) -> Option<&Node> {
        let path = part.0.as_ref();
        let mut node = self;
        for (i, number) in path.iter().enumerate() {
            let more = i + 1 < path.len();
            node = match &node.kind {
                Kind::Multipart(children) => {
                    let index = usize::try_from(number.get()).ok()?.checked_sub(1)?;
                    children.get(index)?
                }
                // Part 1 of a non-multipart is the part itself; only a message/rfc822 part can
                // be looked into further.
                Kind::Message(_) if number.get() == 1 => node,
                Kind::Leaf if number.get() == 1 && !more => node,
                _ => return None,
            };
            if more && let Kind::Message(inner) = &node.kind {
                node = inner;
            }
        }
        Some(node)
    }

    /// The message HEADER and TEXT refer to: this one, or the message in a message/rfc822 part.
    fn message(&self, part: Option<&Part>) -> Option<&Node> {
        match part {
            None => Some(self),
            Some(part) => match &self.find(part)?.kind {
                Kind::Message(inner) => Some(inner),
                _ => None,
            },
        }
    }
}

/// The part ranges of a multipart body: the bytes between delimiter lines. The line break before
/// a delimiter belongs to the delimiter (RFC 2046 §5.1.1); preamble and epilogue belong to no part.
/// A part left open at the end runs to the end of the body.
fn split_multipart(raw: &[u8], body: &Range<usize>, boundary: &[u8]) -> Vec<Range<usize>> {
    let bytes = slice(raw, body);
    let mut parts = Vec::new();
    let mut open: Option<usize> = None;
    let mut pos = 0;
    while pos < bytes.len() {
        let end = line_end(bytes, pos);
        let line = bytes.get(pos..end).unwrap_or_default();
        if let Some(close) = delimiter(line, boundary) {
            if let Some(start) = open.take() {
                parts.push(body.start + start..body.start + strip_break_before(bytes, start, pos));
            }
            if close {
                return parts;
            }
            open = Some(end);
        }
        pos = end;
    }
    if let Some(start) = open {
        parts.push(body.start + start..body.end);
    }
    parts
}

/// `Some(is_close)` when `line` is a delimiter line of `boundary`: `--boundary` followed only by
/// whitespace, or the close delimiter `--boundary--`. Matching the whole line, not just a prefix,
/// keeps a nested multipart whose boundary extends this one's from ending it early.
fn delimiter(line: &[u8], boundary: &[u8]) -> Option<bool> {
    let rest = line.strip_prefix(b"--")?.strip_prefix(boundary)?;
    if rest.starts_with(b"--") {
        Some(true)
    } else if rest.iter().all(|b| b" \t\r\n".contains(b)) {
        Some(false)
    } else {
        None
    }
}

/// `pos` minus the CRLF (or LF) just before it, but not before `start`.
fn strip_break_before(bytes: &[u8], start: usize, pos: usize) -> usize {
    let mut end = pos;
    if end > start && bytes.get(end - 1) == Some(&b'\n') {
        end -= 1;
        if end > start && bytes.get(end - 1) == Some(&b'\r') {
            end -= 1;
        }
    }
    end
}

/// The Content-* fields of one part, as written (Dovecot's `message_part_data`). The first
/// occurrence of each field counts.
#[derive(Default)]
struct Mime {
    /// `None` when missing or unparsable: text/plain (RFC 2045 §5.2).
    content_type: Option<ContentType>,
    /// `None` when missing or not a single token: 7bit.
    encoding: Option<Vec<u8>>,
    id: Option<Vec<u8>>,
    description: Option<Vec<u8>>,
    md5: Option<Vec<u8>>,
    disposition: Option<(Vec<u8>, Vec<Param>)>,
    language: Vec<Vec<u8>>,
    location: Option<Vec<u8>>,
}

struct ContentType {
    r#type: Vec<u8>,
    subtype: Vec<u8>,
    params: Vec<Param>,
}

/// A parameter: lower-case name, raw value (quotes removed, RFC 2231 continuations joined).
type Param = (Vec<u8>, Vec<u8>);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Media {
    Text,
    Multipart,
    Message,
    Other,
}

impl Mime {
    fn parse(header: &[u8], in_digest: bool) -> Mime {
        let mut mime = Mime::default();
        let mut seen_type = false;
        let mut seen_language = false;
        for field in header_fields(header) {
            let Some(name) = strip_prefix_ignore_case(field.name, b"content-") else {
                continue;
            };
            let value = field.value;
            let lower = name.to_ascii_lowercase();
            match lower.as_slice() {
                b"type" if !seen_type => {
                    seen_type = true;
                    mime.content_type = parse_content_type(value);
                }
                b"transfer-encoding" if mime.encoding.is_none() => {
                    mime.encoding = parse_single_token(value);
                }
                b"id" if mime.id.is_none() => mime.id = Some(unfold(value)),
                b"description" if mime.description.is_none() => {
                    mime.description = Some(unfold(value));
                }
                b"md5" if mime.md5.is_none() => mime.md5 = Some(unfold(value)),
                b"location" if mime.location.is_none() => mime.location = Some(unfold(value)),
                b"disposition" if mime.disposition.is_none() => {
                    mime.disposition = parse_disposition(value);
                }
                b"language" if !seen_language => {
                    seen_language = true;
                    mime.language = parse_language(value);
                }
                _ => {}
            }
        }
        // RFC 2046 §5.1.5: in a multipart/digest the default is message/rfc822.
        if mime.content_type.is_none() && in_digest {
            mime.content_type = Some(ContentType {
                r#type: b"message".to_vec(),
                subtype: b"rfc822".to_vec(),
                params: Vec::new(),
            });
        }
        mime
    }

    fn media(&self) -> Media {
        let Some(ct) = &self.content_type else {
            return Media::Text;
        };
        if ct.r#type.eq_ignore_ascii_case(b"text") {
            Media::Text
        } else if ct.r#type.eq_ignore_ascii_case(b"multipart") {
            Media::Multipart
        } else if ct.r#type.eq_ignore_ascii_case(b"message")
            && ct.subtype.eq_ignore_ascii_case(b"rfc822")
        {
            Media::Message
        } else {
            Media::Other
        }
    }

    fn subtype_is(&self, subtype: &[u8]) -> bool {
        self.content_type
            .as_ref()
            .is_some_and(|ct| ct.subtype.eq_ignore_ascii_case(subtype))
    }

    fn boundary(&self) -> Option<&[u8]> {
        let ct = self.content_type.as_ref()?;
        param(&ct.params, b"boundary").filter(|b| !b.is_empty())
    }
}

fn param<'p>(params: &'p [Param], name: &[u8]) -> Option<&'p [u8]> {
    params
        .iter()
        .find(|(n, _)| n.as_slice() == name)
        .map(|(_, v)| v.as_slice())
}

// ---- BODY / BODYSTRUCTURE -------------------------------------------------------------------

fn structure(raw: &[u8], node: &Node, ext: bool) -> BodyStructure<'static> {
    let Kind::Multipart(children) = &node.kind else {
        return single(raw, node, ext);
    };
    let bodies: Vec<_> = children.iter().map(|c| structure(raw, c, ext)).collect();
    // A multipart without parts cannot be expressed; like Dovecot, send one empty text/plain.
    let bodies = Vec1::try_from(bodies).unwrap_or_else(|_| Vec1::from(empty_text(ext)));
    let mime = &node.mime;
    let ct = mime.content_type.as_ref();
    BodyStructure::Multi {
        bodies,
        subtype: istring(ct.map_or(b"mixed".to_vec(), |ct| ct.subtype.clone())),
        extension_data: ext.then(|| MultiPartExtensionData {
            parameter_list: params(ct.map_or(&[][..], |ct| &ct.params)),
            tail: Some(disposition_and_rest(mime)),
        }),
    }
}

fn single(raw: &[u8], node: &Node, ext: bool) -> BodyStructure<'static> {
    let mime = &node.mime;
    let body = slice(raw, &node.body);
    let lines = u32_saturating(count_lines(body));
    let ct = mime.content_type.as_ref();
    let mut parameter_list = params(ct.map_or(&[][..], |ct| &ct.params));
    let specific = match (&node.kind, mime.media()) {
        (Kind::Message(inner), _) => SpecificFields::Message {
            envelope: Box::new(envelope_of(slice(raw, &inner.header))),
            body_structure: Box::new(structure(raw, inner, ext)),
            number_of_lines: lines,
        },
        (_, Media::Text) => {
            // Dovecot (and RFC 2045 §5.2) gives text a charset when it names none.
            if ct.is_none_or(|ct| param(&ct.params, b"charset").is_none()) {
                parameter_list.push((istr("charset"), istr("us-ascii")));
            }
            SpecificFields::Text {
                subtype: istring(ct.map_or(b"plain".to_vec(), |ct| ct.subtype.clone())),
                number_of_lines: lines,
            }
        }
        // A message/rfc822 part below the nesting limit: "MESSAGE" "RFC822" would promise an
        // envelope and body that we do not send, so it goes out as an opaque blob.
        (_, Media::Message) => SpecificFields::Basic {
            r#type: istr("application"),
            subtype: istr("octet-stream"),
        },
        _ => SpecificFields::Basic {
            r#type: istring(ct.map_or(b"text".to_vec(), |ct| ct.r#type.clone())),
            subtype: istring(ct.map_or(b"plain".to_vec(), |ct| ct.subtype.clone())),
        },
    };
    BodyStructure::Single {
        body: Body {
            basic: BasicFields {
                parameter_list,
                id: nstring(mime.id.clone()),
                description: nstring(mime.description.clone()),
                content_transfer_encoding: istring(
                    mime.encoding.clone().unwrap_or_else(|| b"7bit".to_vec()),
                ),
                size: u32_saturating(body.len()),
            },
            specific,
        },
        extension_data: ext.then(|| SinglePartExtensionData {
            md5: nstring(mime.md5.clone()),
            tail: Some(disposition_and_rest(mime)),
        }),
    }
}

/// `("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0)`, Dovecot's EMPTY_BODY.
fn empty_text(ext: bool) -> BodyStructure<'static> {
    BodyStructure::Single {
        body: Body {
            basic: BasicFields {
                parameter_list: vec![(istr("charset"), istr("us-ascii"))],
                id: NString(None),
                description: NString(None),
                content_transfer_encoding: istr("7bit"),
                size: 0,
            },
            specific: SpecificFields::Text {
                subtype: istr("plain"),
                number_of_lines: 0,
            },
        },
        extension_data: ext.then(|| SinglePartExtensionData {
            md5: NString(None),
            tail: Some(disposition_and_rest(&Mime::default())),
        }),
    }
}

/// Disposition, language and location; always all three, so NIL is sent for missing ones as
/// Dovecot does.
fn disposition_and_rest(mime: &Mime) -> Disposition<'static> {
    Disposition {
        disposition: mime
            .disposition
            .as_ref()
            .map(|(kind, ps)| (istring(kind.clone()), params(ps))),
        tail: Some(Language {
            language: mime.language.iter().cloned().map(istring).collect(),
            tail: Some(Location {
                location: nstring(mime.location.clone()),
                extensions: Vec::new(),
            }),
        }),
    }
}

fn params(ps: &[Param]) -> Vec<(IString<'static>, IString<'static>)> {
    ps.iter()
        .map(|(n, v)| (istring(n.clone()), istring(v.clone())))
        .collect()
}

// ---- ENVELOPE -------------------------------------------------------------------------------

fn envelope_of(header: &[u8]) -> Envelope<'static> {
    const NAMES: [&[u8]; 10] = [
        b"date",
        b"subject",
        b"from",
        b"sender",
        b"reply-to",
        b"to",
        b"cc",
        b"bcc",
        b"in-reply-to",
        b"message-id",
    ];
    let mut values: [Option<&[u8]>; 10] = [None; 10];
    for field in header_fields(header) {
        if let Some(i) = NAMES
            .iter()
            .position(|n| n.eq_ignore_ascii_case(field.name))
            && let Some(slot @ None) = values.get_mut(i)
        {
            *slot = Some(field.value);
        }
    }
    let [
        date,
        subject,
        from,
        sender,
        reply_to,
        to,
        cc,
        bcc,
        in_reply_to,
        message_id,
    ] = values;
    let text = |v: Option<&[u8]>| nstring(v.map(unfold));
    let list = |v: Option<&[u8]>| v.map(addresses).unwrap_or_default();
    let from = list(from);
    let or_from = |v: Vec<Address<'static>>| if v.is_empty() { from.clone() } else { v };
    Envelope {
        date: text(date),
        subject: text(subject),
        sender: or_from(list(sender)),
        reply_to: or_from(list(reply_to)),
        from: from.clone(),
        to: list(to),
        cc: list(cc),
        bcc: list(bcc),
        in_reply_to: text(in_reply_to),
        message_id: text(message_id),
    }
}

/// A lexical token of an address header (RFC 5322 §3.2, leniently).
#[derive(Debug)]
enum Token {
    /// An atom, dot-atom, quoted string (unquoted) or domain literal; `space` if whitespace or a
    /// comment came before it.
    Word { text: Vec<u8>, space: bool },
    /// One of `< > : ; @ ,`.
    Special(u8),
    /// A comment's text, without the parentheses.
    Comment(Vec<u8>),
}

/// An address list as ENVELOPE wants it (RFC 3501 §7.4.2): one entry per mailbox; a group is
/// `(NIL NIL "name" NIL)`, its members, then `(NIL NIL NIL NIL)`. Display names stay raw (quotes
/// removed, encoded words kept). Like Dovecot, a missing local part or domain becomes
/// `MISSING_MAILBOX` / `MISSING_DOMAIN`, since a NIL host would read as group syntax.
fn addresses(value: &[u8]) -> Vec<Address<'static>> {
    let tokens = tokenize(value);
    let mut out = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        i = address_or_group(&tokens, i, false, &mut out);
    }
    out
}

/// Parses one mailbox or group starting at `i`; returns the index after it and its separator.
fn address_or_group(
    tokens: &[Token],
    i: usize,
    in_group: bool,
    out: &mut Vec<Address<'static>>,
) -> usize {
    let is_end = |t: &Token| match t {
        Token::Special(b'<' | b',' | b';') => true,
        Token::Special(b':') => !in_group,
        _ => false,
    };
    let j = tokens
        .iter()
        .skip(i)
        .position(is_end)
        .map_or(tokens.len(), |p| i + p);
    let words = tokens.get(i..j).unwrap_or_default();
    match tokens.get(j) {
        Some(Token::Special(b':')) => {
            out.push(address(None, None, Some(phrase(words)), None));
            let mut k = j + 1;
            while k < tokens.len() {
                if matches!(tokens.get(k), Some(Token::Special(b';'))) {
                    k += 1;
                    break;
                }
                k = address_or_group(tokens, k, true, out);
            }
            out.push(address(None, None, None, None));
            skip_separator(tokens, k, in_group)
        }
        Some(Token::Special(b'<')) => {
            let close = tokens
                .iter()
                .skip(j)
                .position(|t| matches!(t, Token::Special(b'>')))
                .map_or(tokens.len(), |p| j + p);
            let inner = tokens.get(j + 1..close).unwrap_or_default();
            // An obsolete source route: `<@a.example,@b.example:user@c.example>`.
            let (route, spec) = match inner.first() {
                Some(Token::Special(b'@')) => {
                    let colon = inner
                        .iter()
                        .position(|t| matches!(t, Token::Special(b':')))
                        .unwrap_or(inner.len());
                    let (route, rest) = inner.split_at(colon);
                    (Some(concat(route)), rest.get(1..).unwrap_or_default())
                }
                _ => (None, inner),
            };
            let (mailbox, host) = addr_spec(spec);
            let name = Some(phrase(words)).filter(|n| !n.is_empty());
            out.push(address(name, route, Some(mailbox), Some(host)));
            // Whatever follows the `>` up to the next separator is noise.
            let mut k = close + 1;
            while k < tokens.len() && !is_separator(tokens.get(k), in_group) {
                k += 1;
            }
            skip_separator(tokens, k, in_group)
        }
        _ => {
            if words.iter().any(|t| !matches!(t, Token::Comment(_))) {
                let (mailbox, host) = addr_spec(words);
                // `user@example.org (Full Name)`: the comment is the name, as Dovecot has it.
                let name = words.iter().rev().find_map(|t| match t {
                    Token::Comment(c) if !c.is_empty() => Some(c.clone()),
                    _ => None,
                });
                out.push(address(name, None, Some(mailbox), Some(host)));
            }
            // At a `;` inside a group, stop without consuming it: the group ends there.
            if in_group && matches!(tokens.get(j), Some(Token::Special(b';'))) {
                return j.max(i + 1);
            }
            skip_separator(tokens, j, in_group)
        }
    }
}

fn is_separator(token: Option<&Token>, in_group: bool) -> bool {
    match token {
        Some(Token::Special(b',')) => true,
        Some(Token::Special(b';')) => in_group,
        _ => false,
    }
}

/// Steps over a `,` (or a stray `;` outside a group) at `k`; a group's `;` is left for the group.
fn skip_separator(tokens: &[Token], k: usize, in_group: bool) -> usize {
    match tokens.get(k) {
        Some(Token::Special(b',')) => k + 1,
        Some(Token::Special(b';')) if !in_group => k + 1,
        _ => k,
    }
}

/// `local@domain` from the tokens of an addr-spec; the last `@` separates the two.
fn addr_spec(tokens: &[Token]) -> (Vec<u8>, Vec<u8>) {
    let at = tokens
        .iter()
        .rposition(|t| matches!(t, Token::Special(b'@')));
    let (local, domain) = match at {
        Some(at) => {
            let (local, domain) = tokens.split_at(at);
            (
                concat(local),
                Some(concat(domain.get(1..).unwrap_or_default())),
            )
        }
        None => (concat(tokens), None),
    };
    let mailbox = if local.is_empty() {
        b"MISSING_MAILBOX".to_vec()
    } else {
        local
    };
    let host = match domain {
        Some(d) if !d.is_empty() => d,
        _ => b"MISSING_DOMAIN".to_vec(),
    };
    (mailbox, host)
}

/// Words and specials run together (an addr-spec or a route), comments dropped.
fn concat(tokens: &[Token]) -> Vec<u8> {
    let mut out = Vec::new();
    for t in tokens {
        match t {
            Token::Word { text, .. } => out.extend_from_slice(text),
            Token::Special(b) => out.push(*b),
            Token::Comment(_) => {}
        }
    }
    out
}

/// A display name: its words joined by single spaces where the message had whitespace.
fn phrase(tokens: &[Token]) -> Vec<u8> {
    let mut out = Vec::new();
    for t in tokens {
        match t {
            Token::Word { text, space } => {
                if *space && !out.is_empty() {
                    out.push(b' ');
                }
                out.extend_from_slice(text);
            }
            Token::Special(b) => out.push(*b),
            Token::Comment(_) => {}
        }
    }
    out
}

fn address(
    name: Option<Vec<u8>>,
    adl: Option<Vec<u8>>,
    mailbox: Option<Vec<u8>>,
    host: Option<Vec<u8>>,
) -> Address<'static> {
    Address {
        name: nstring(name),
        adl: nstring(adl),
        mailbox: nstring(mailbox),
        host: nstring(host),
    }
}

fn tokenize(value: &[u8]) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut c = Cursor::new(value);
    let mut space = false;
    while let Some(b) = c.peek() {
        match b {
            b' ' | b'\t' | b'\r' | b'\n' => {
                space = true;
                c.bump();
            }
            b'(' => {
                tokens.push(Token::Comment(c.comment()));
                space = true;
            }
            b'"' => {
                tokens.push(Token::Word {
                    text: c.quoted_string(),
                    space,
                });
                space = false;
            }
            b'[' => {
                let start = c.pos;
                while let Some(b) = c.peek() {
                    c.bump();
                    if b == b']' {
                        break;
                    }
                }
                let text = value.get(start..c.pos).unwrap_or_default();
                tokens.push(Token::Word {
                    text: text
                        .iter()
                        .copied()
                        .filter(|&b| b != b'\r' && b != b'\n')
                        .collect(),
                    space,
                });
                space = false;
            }
            b'<' | b'>' | b':' | b';' | b'@' | b',' => {
                tokens.push(Token::Special(b));
                c.bump();
                space = false;
            }
            _ => {
                // An atom; a stray `)` or `]` is taken as part of one, so that every round
                // consumes at least one byte.
                let start = c.pos;
                c.bump();
                while c
                    .peek()
                    .is_some_and(|b| !b" \t\r\n()\"[<>:;@,".contains(&b))
                {
                    c.bump();
                }
                let text = value.get(start..c.pos).unwrap_or_default().to_vec();
                tokens.push(Token::Word { text, space });
                space = false;
            }
        }
    }
    tokens
}

// ---- Content-* field values (RFC 2045, RFC 2183, RFC 3282) ------------------------------------

/// A cursor over a header value, skipping comments and folding like Dovecot's rfc822-parser.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Cursor { bytes, pos: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn bump(&mut self) {
        self.pos += 1;
    }

    fn eat(&mut self, b: u8) -> bool {
        let hit = self.peek() == Some(b);
        if hit {
            self.bump();
        }
        hit
    }

    fn at_end(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    /// Skips whitespace, line breaks and (nested) comments.
    fn skip_cfws(&mut self) {
        while let Some(b) = self.peek() {
            match b {
                b' ' | b'\t' | b'\r' | b'\n' => self.bump(),
                b'(' => {
                    self.comment();
                }
                _ => return,
            }
        }
    }

    /// Reads a comment at `(`, nesting and quoted pairs included; returns its text.
    fn comment(&mut self) -> Vec<u8> {
        let mut text = Vec::new();
        let mut depth = 0usize;
        while let Some(b) = self.peek() {
            self.bump();
            match b {
                b'(' => {
                    if depth > 0 {
                        text.push(b);
                    }
                    depth += 1;
                }
                b')' => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                    text.push(b);
                }
                b'\\' => {
                    if let Some(next) = self.peek() {
                        self.bump();
                        text.push(next);
                    }
                }
                b'\r' | b'\n' => {}
                _ => text.push(b),
            }
        }
        text
    }

    /// Reads a quoted string at `"`; returns its contents unescaped and unfolded.
    fn quoted_string(&mut self) -> Vec<u8> {
        let mut text = Vec::new();
        self.bump();
        while let Some(b) = self.peek() {
            self.bump();
            match b {
                b'"' => break,
                b'\\' => {
                    if let Some(next) = self.peek() {
                        self.bump();
                        text.push(next);
                    }
                }
                b'\r' | b'\n' => {}
                _ => text.push(b),
            }
        }
        text
    }

    /// Reads an RFC 2045 token.
    fn token(&mut self) -> Option<&'a [u8]> {
        let start = self.pos;
        while self.peek().is_some_and(is_token_char) {
            self.bump();
        }
        self.bytes.get(start..self.pos).filter(|t| !t.is_empty())
    }

    /// Reads an unquoted parameter value; more lenient than a token (8-bit, `/`, `=`, `?`...).
    fn bare_value(&mut self) -> &'a [u8] {
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|b| b > b' ' && b != 0x7f && !b";\"()".contains(&b))
        {
            self.bump();
        }
        self.bytes.get(start..self.pos).unwrap_or_default()
    }
}

fn is_token_char(b: u8) -> bool {
    b > b' ' && b < 0x7f && !b"()<>@,;:\\\"/[]?=".contains(&b)
}

fn parse_content_type(value: &[u8]) -> Option<ContentType> {
    let mut c = Cursor::new(value);
    c.skip_cfws();
    let r#type = c.token()?.to_vec();
    c.skip_cfws();
    if !c.eat(b'/') {
        return None;
    }
    c.skip_cfws();
    let subtype = c.token()?.to_vec();
    Some(ContentType {
        r#type,
        subtype,
        params: parse_params(&mut c),
    })
}

fn parse_disposition(value: &[u8]) -> Option<(Vec<u8>, Vec<Param>)> {
    let mut c = Cursor::new(value);
    c.skip_cfws();
    let kind = c.token()?.to_vec();
    Some((kind, parse_params(&mut c)))
}

fn parse_language(value: &[u8]) -> Vec<Vec<u8>> {
    let mut c = Cursor::new(value);
    let mut languages = Vec::new();
    loop {
        c.skip_cfws();
        let Some(tag) = c.token() else { break };
        languages.push(tag.to_vec());
        c.skip_cfws();
        if !c.eat(b',') {
            break;
        }
    }
    languages
}

/// A field value that must be exactly one token (Content-Transfer-Encoding).
fn parse_single_token(value: &[u8]) -> Option<Vec<u8>> {
    let mut c = Cursor::new(value);
    c.skip_cfws();
    let token = c.token()?.to_vec();
    c.skip_cfws();
    c.at_end().then_some(token)
}

/// `; name=value` pairs until something that is not one.
fn parse_params(c: &mut Cursor<'_>) -> Vec<Param> {
    let mut params = Vec::new();
    loop {
        c.skip_cfws();
        if !c.eat(b';') {
            break;
        }
        c.skip_cfws();
        if c.peek() == Some(b';') {
            continue;
        }
        let Some(name) = c.token() else { break };
        c.skip_cfws();
        if !c.eat(b'=') {
            break;
        }
        c.skip_cfws();
        let value = if c.peek() == Some(b'"') {
            c.quoted_string()
        } else {
            c.bare_value().to_vec()
        };
        params.push((name.to_ascii_lowercase(), value));
    }
    join_continuations(params)
}

/// Joins RFC 2231 continuations (`name*0`, `name*1*`...) into one parameter, as Dovecot does:
/// `name` when the first section is plain, `name*` (value still `charset'lang'%xx`) when it is
/// extended. Values are not charset-decoded.
fn join_continuations(params: Vec<Param>) -> Vec<Param> {
    let mut plain = Vec::new();
    // (base name, section number, extended, value)
    let mut sections: Vec<(Vec<u8>, u32, bool, Vec<u8>)> = Vec::new();
    for (name, value) in params {
        match continuation(&name) {
            Some((base, n, extended)) => sections.push((base.to_vec(), n, extended, value)),
            None => plain.push((name, value)),
        }
    }
    sections.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    let mut joined: Vec<Param> = Vec::new();
    let mut last_base: Option<Vec<u8>> = None;
    for (base, _, extended, value) in sections {
        match joined.last_mut() {
            Some((_, v)) if last_base.as_deref() == Some(base.as_slice()) => {
                v.extend_from_slice(&value);
            }
            _ => {
                let mut name = base.clone();
                if extended {
                    name.push(b'*');
                }
                joined.push((name, value));
                last_base = Some(base);
            }
        }
    }
    plain.extend(joined);
    plain
}

/// `Some((base, section, extended))` for `base*N` and `base*N*`.
fn continuation(name: &[u8]) -> Option<(&[u8], u32, bool)> {
    let star = name.iter().position(|&b| b == b'*')?;
    let (base, rest) = name.split_at(star);
    let rest = rest.get(1..)?;
    let (digits, extended) = match rest.strip_suffix(b"*") {
        Some(digits) => (digits, true),
        None => (rest, false),
    };
    if digits.is_empty() || digits.len() > 4 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u32, |n, d| n * 10 + u32::from(d - b'0'));
    Some((base, n, extended))
}

// ---- HEADER.FIELDS --------------------------------------------------------------------------

/// The fields of `header` whose names are (`include`) or are not in `names`, then a blank line.
fn header_subset(header: &[u8], names: &[AString<'_>], include: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for field in header_fields(header) {
        let listed = names
            .iter()
            .any(|n| n.as_ref().eq_ignore_ascii_case(field.name));
        if listed == include {
            out.extend_from_slice(field.raw);
            if !field.raw.ends_with(b"\n") {
                out.extend_from_slice(b"\r\n");
            }
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

// ---- bytes ----------------------------------------------------------------------------------

/// Length of the header: up to and including the first empty line, else everything.
fn header_len(bytes: &[u8]) -> usize {
    let mut pos = 0;
    while pos < bytes.len() {
        let end = line_end(bytes, pos);
        if is_blank_line(bytes.get(pos..end).unwrap_or_default()) {
            return end;
        }
        pos = end;
    }
    bytes.len()
}

/// Index just after the LF ending the line at `pos`, or the end of `bytes`.
fn line_end(bytes: &[u8], pos: usize) -> usize {
    bytes
        .get(pos..)
        .and_then(|rest| rest.iter().position(|&b| b == b'\n'))
        .map_or(bytes.len(), |i| pos + i + 1)
}

/// Whether `line` starts with an empty line (CRLF or a bare LF).
fn is_blank_line(line: &[u8]) -> bool {
    line.starts_with(b"\r\n") || line.starts_with(b"\n")
}

fn trim_line_break(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn trim(bytes: &[u8]) -> &[u8] {
    let ws = |b: &u8| b" \t\r\n".contains(b);
    let start = bytes.iter().position(|b| !ws(b)).unwrap_or(bytes.len());
    let end = bytes.iter().rposition(|b| !ws(b)).map_or(start, |i| i + 1);
    bytes.get(start..end).unwrap_or_default()
}

fn strip_prefix_ignore_case<'b>(bytes: &'b [u8], prefix: &[u8]) -> Option<&'b [u8]> {
    let (head, rest) = bytes.split_at_checked(prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then_some(rest)
}

fn slice<'r>(raw: &'r [u8], range: &Range<usize>) -> &'r [u8] {
    raw.get(range.clone()).unwrap_or_default()
}

/// RFC 3501 counts lines as line breaks: a last line without one does not count (as Dovecot).
fn count_lines(bytes: &[u8]) -> usize {
    bytes.iter().filter(|&&b| b == b'\n').count()
}

fn u32_saturating(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// An IMAP string of message bytes: quoted when it can be, else a literal. NUL, which no IMAP
/// string can carry, becomes 0x80 as in Dovecot.
fn istring(mut bytes: Vec<u8>) -> IString<'static> {
    for b in &mut bytes {
        if *b == 0 {
            *b = 0x80;
        }
    }
    IString::try_from(bytes).unwrap_or_else(|_| IString::from(Literal::unvalidated(&b""[..])))
}

fn istr(s: &'static str) -> IString<'static> {
    istring(s.as_bytes().to_vec())
}

fn nstring(bytes: Option<Vec<u8>>) -> NString<'static> {
    NString(bytes.map(istring))
}

#[cfg(test)]
mod tests {
    use imap_codec::decode::Decoder;
    use imap_codec::encode::Encoder;
    use imap_codec::{CommandCodec, ResponseCodec};
    use imap_types::command::CommandBody;
    use imap_types::fetch::{MacroOrMessageDataItemNames, MessageDataItem, MessageDataItemName};
    use imap_types::response::{Data, Response};

    use super::*;

    /// LF to CRLF, so test messages can be written readably.
    fn crlf(s: &str) -> Vec<u8> {
        s.replace("\r\n", "\n").replace('\n', "\r\n").into_bytes()
    }

    /// An item as it goes on the wire, without `* 1 FETCH (` and `)\r\n`.
    fn wire(item: MessageDataItem<'static>) -> String {
        let response = Response::Data(Data::Fetch {
            seq: NonZeroU32::MIN,
            items: Vec1::from(item),
        });
        let out =
            String::from_utf8_lossy(&ResponseCodec::new().encode(&response).dump()).into_owned();
        out.strip_prefix("* 1 FETCH (")
            .and_then(|s| s.strip_suffix(")\r\n"))
            .unwrap()
            .to_owned()
    }

    fn bodystructure(raw: &[u8]) -> String {
        let w = wire(MessageDataItem::BodyStructure(body_structure(raw, true)));
        w.strip_prefix("BODYSTRUCTURE ").unwrap().to_owned()
    }

    fn body(raw: &[u8]) -> String {
        let w = wire(MessageDataItem::Body(body_structure(raw, false)));
        w.strip_prefix("BODY ").unwrap().to_owned()
    }

    fn env(raw: &[u8]) -> String {
        let w = wire(MessageDataItem::Envelope(envelope(raw)));
        w.strip_prefix("ENVELOPE ").unwrap().to_owned()
    }

    /// `BODY[spec]` of `raw`, with `spec` in IMAP syntax, e.g. `1.2.HEADER.FIELDS (From)`.
    fn sec(raw: &[u8], spec: &str) -> Option<String> {
        let spec = parse_optional_section(spec);
        section(raw, spec.as_ref()).map(|b| String::from_utf8_lossy(&b).into_owned())
    }

    fn parse_section(spec: &str) -> Section<'static> {
        parse_optional_section(spec).unwrap()
    }

    fn parse_optional_section(spec: &str) -> Option<Section<'static>> {
        let command = format!("A FETCH 1 BODY[{spec}]\r\n");
        let (_, command) = CommandCodec::new()
            .decode_static(command.as_bytes())
            .unwrap();
        let CommandBody::Fetch {
            macro_or_item_names: MacroOrMessageDataItemNames::MessageDataItemNames(items),
            ..
        } = command.body
        else {
            panic!("not a FETCH");
        };
        let Some(MessageDataItemName::BodyExt { section, .. }) = items.into_iter().next() else {
            panic!("not BODY[]");
        };
        section
    }

    use std::num::NonZeroU32;

    /// Dovecot's own test message and its expected answers (src/lib-imap/test-imap-bodystructure.c),
    /// with CRLF line ends so that Dovecot's virtual sizes are our sizes.
    const DOVECOT_MSG: &str = "From: user@domain.org
Date: Sat, 24 Mar 2007 23:00:00 +0200
Mime-Version: 1.0
Content-Type: multipart/mixed; boundary=\"foo
 bar\"

Root MIME prologue

--foo bar
Content-Type: text/x-myown; charset=us-ascii; foo=\"quoted\\\"string\"
Content-ID: <foo@example.com>
Content-MD5: Q2hlY2sgSW50ZWdyaXR5IQ==
Content-Disposition: inline; foo=bar
Content-Description: hellodescription
Content-Language: en, fi, se
Content-Location: http://example.com/test.txt

hello

--foo bar
Content-Type: message/rfc822

From: sub@domain.org
To: sub-to1@domain.org, sub-to2@domain.org
Date: Sun, 12 Aug 2012 12:34:56 +0300
Subject: submsg
Content-Type: multipart/alternative; boundary=\"sub1\"

Sub MIME prologue
--sub1
Content-Type: text/html
Content-Transfer-Encoding: 8bit

<p>Hello world</p>

--sub1
Content-Type: text/plain
Content-Transfer-Encoding: ?invalid

Hello another world

--sub1--
Sub MIME epilogue

--foo bar--
Root MIME epilogue
";

    const DOVECOT_BODYSTRUCTURE: &str = "((\"text\" \"x-myown\" (\"charset\" \"us-ascii\" \"foo\" \"quoted\\\"string\") \"<foo@example.com>\" \"hellodescription\" \"7bit\" 7 1 \"Q2hlY2sgSW50ZWdyaXR5IQ==\" (\"inline\" (\"foo\" \"bar\")) (\"en\" \"fi\" \"se\") \"http://example.com/test.txt\")(\"message\" \"rfc822\" NIL NIL NIL \"7bit\" 412 (\"Sun, 12 Aug 2012 12:34:56 +0300\" \"submsg\" ((NIL NIL \"sub\" \"domain.org\")) ((NIL NIL \"sub\" \"domain.org\")) ((NIL NIL \"sub\" \"domain.org\")) ((NIL NIL \"sub-to1\" \"domain.org\")(NIL NIL \"sub-to2\" \"domain.org\")) NIL NIL NIL NIL) ((\"text\" \"html\" (\"charset\" \"us-ascii\") NIL NIL \"8bit\" 20 1 NIL NIL NIL NIL)(\"text\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 21 1 NIL NIL NIL NIL) \"alternative\" (\"boundary\" \"sub1\") NIL NIL NIL) 21 NIL NIL NIL NIL) \"mixed\" (\"boundary\" \"foo bar\") NIL NIL NIL)";

    const DOVECOT_BODY: &str = "((\"text\" \"x-myown\" (\"charset\" \"us-ascii\" \"foo\" \"quoted\\\"string\") \"<foo@example.com>\" \"hellodescription\" \"7bit\" 7 1)(\"message\" \"rfc822\" NIL NIL NIL \"7bit\" 412 (\"Sun, 12 Aug 2012 12:34:56 +0300\" \"submsg\" ((NIL NIL \"sub\" \"domain.org\")) ((NIL NIL \"sub\" \"domain.org\")) ((NIL NIL \"sub\" \"domain.org\")) ((NIL NIL \"sub-to1\" \"domain.org\")(NIL NIL \"sub-to2\" \"domain.org\")) NIL NIL NIL NIL) ((\"text\" \"html\" (\"charset\" \"us-ascii\") NIL NIL \"8bit\" 20 1)(\"text\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 21 1) \"alternative\") 21) \"mixed\")";

    /// imap-codec writes the fixed type names in upper case, Dovecot in lower case (both legal).
    fn dovecot_case(ours: &str) -> String {
        ours.replace("(\"TEXT\" ", "(\"text\" ")
            .replace("(\"MESSAGE\" \"RFC822\" ", "(\"message\" \"rfc822\" ")
    }

    #[test]
    fn matches_dovecot_bodystructure_and_body() {
        let raw = crlf(DOVECOT_MSG);
        assert_eq!(dovecot_case(&bodystructure(&raw)), DOVECOT_BODYSTRUCTURE);
        assert_eq!(dovecot_case(&body(&raw)), DOVECOT_BODY);
    }

    #[test]
    fn dovecot_message_sections() {
        let raw = crlf(DOVECOT_MSG);
        assert_eq!(sec(&raw, "1").unwrap(), "hello\r\n");
        assert!(
            sec(&raw, "1.MIME")
                .unwrap()
                .starts_with("Content-Type: text/x-myown;")
        );
        assert!(sec(&raw, "1.MIME").unwrap().ends_with("test.txt\r\n\r\n"));
        // Part 2 is the attached message: its size is what BODYSTRUCTURE said.
        let two = sec(&raw, "2").unwrap();
        assert_eq!(two.len(), 412);
        assert!(two.starts_with("From: sub@domain.org\r\n"));
        assert!(two.ends_with("Sub MIME epilogue\r\n"));
        assert_eq!(
            sec(&raw, "2.MIME").unwrap(),
            "Content-Type: message/rfc822\r\n\r\n"
        );
        assert!(
            sec(&raw, "2.HEADER")
                .unwrap()
                .starts_with("From: sub@domain.org\r\nTo:")
        );
        assert!(
            sec(&raw, "2.TEXT")
                .unwrap()
                .starts_with("Sub MIME prologue\r\n--sub1\r\n")
        );
        assert_eq!(sec(&raw, "2.1").unwrap(), "<p>Hello world</p>\r\n");
        assert_eq!(sec(&raw, "2.2").unwrap(), "Hello another world\r\n");
        assert_eq!(
            sec(&raw, "2.2.MIME").unwrap(),
            "Content-Type: text/plain\r\nContent-Transfer-Encoding: ?invalid\r\n\r\n"
        );
        assert_eq!(
            sec(&raw, "2.HEADER.FIELDS (SUBJECT date)").unwrap(),
            "Date: Sun, 12 Aug 2012 12:34:56 +0300\r\nSubject: submsg\r\n\r\n"
        );
        assert_eq!(sec(&raw, "2.3"), None);
        assert_eq!(sec(&raw, "3"), None);
        assert_eq!(
            sec(&raw, "1.HEADER"),
            None,
            "part 1 is not a message/rfc822"
        );
        assert_eq!(sec(&raw, "1.TEXT"), None);
        assert_eq!(sec(&raw, "1.2"), None);
        // Dovecot: a path may repeat `.1` on a leaf.
        assert_eq!(sec(&raw, "1.1").unwrap(), "hello\r\n");
        // The folded Content-Type stays folded in HEADER.FIELDS.
        assert_eq!(
            sec(&raw, "HEADER.FIELDS (Content-Type)").unwrap(),
            "Content-Type: multipart/mixed; boundary=\"foo\r\n bar\"\r\n\r\n"
        );
        assert_eq!(sec(&raw, "").unwrap().as_bytes(), raw.as_slice());
        assert!(
            sec(&raw, "TEXT")
                .unwrap()
                .starts_with("Root MIME prologue\r\n")
        );
    }

    /// RFC 3501 §7.4.2's ENVELOPE example, byte for byte.
    #[test]
    fn rfc3501_envelope_example() {
        let raw = crlf(
            "Date: Wed, 17 Jul 1996 02:23:25 -0700 (PDT)
From: Terry Gray <gray@cac.washington.edu>
Subject: IMAP4rev1 WG mtg summary and minutes
To: imap@cac.washington.edu
cc: minutes@CNRI.Reston.VA.US,
 John Klensin <KLENSIN@MIT.EDU>
Message-Id: <B27397-0100000@cac.washington.edu>
MIME-Version: 1.0
Content-Type: TEXT/PLAIN; CHARSET=US-ASCII

Hello
",
        );
        assert_eq!(
            env(&raw),
            "(\"Wed, 17 Jul 1996 02:23:25 -0700 (PDT)\" \"IMAP4rev1 WG mtg summary and minutes\" \
             ((\"Terry Gray\" NIL \"gray\" \"cac.washington.edu\")) \
             ((\"Terry Gray\" NIL \"gray\" \"cac.washington.edu\")) \
             ((\"Terry Gray\" NIL \"gray\" \"cac.washington.edu\")) \
             ((NIL NIL \"imap\" \"cac.washington.edu\")) \
             ((NIL NIL \"minutes\" \"CNRI.Reston.VA.US\")(\"John Klensin\" NIL \"KLENSIN\" \"MIT.EDU\")) \
             NIL NIL \"<B27397-0100000@cac.washington.edu>\")"
        );
        // Parameter names are lower-cased, values and type names kept.
        assert_eq!(
            body(&raw),
            "(\"TEXT\" \"PLAIN\" (\"charset\" \"US-ASCII\") NIL NIL \"7bit\" 7 1)"
        );
    }

    #[test]
    fn simple_text_message() {
        let raw = crlf(
            "From: a@example.org
To: b@example.org
Subject: hi
Date: Mon, 1 Jan 2024 10:00:00 +0000

line one
line two
",
        );
        assert_eq!(
            bodystructure(&raw),
            "(\"TEXT\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 20 2 NIL NIL NIL NIL)"
        );
        assert_eq!(sec(&raw, "1").unwrap(), "line one\r\nline two\r\n");
        assert_eq!(sec(&raw, "TEXT").unwrap(), "line one\r\nline two\r\n");
        assert_eq!(sec(&raw, "1.MIME"), sec(&raw, "HEADER"));
        assert_eq!(sec(&raw, "2"), None);
        assert_eq!(sec(&raw, "1.2"), None);
        let header = sec(&raw, "HEADER").unwrap();
        assert!(header.starts_with("From: a@example.org\r\n"));
        assert!(header.ends_with("+0000\r\n\r\n"));
        assert_eq!(header.matches("\r\n").count(), 5);
        assert_eq!(
            sec(&raw, "HEADER.FIELDS (subject FROM x-missing)").unwrap(),
            "From: a@example.org\r\nSubject: hi\r\n\r\n"
        );
        assert_eq!(
            sec(&raw, "HEADER.FIELDS.NOT (subject FROM)").unwrap(),
            "To: b@example.org\r\nDate: Mon, 1 Jan 2024 10:00:00 +0000\r\n\r\n"
        );
        assert_eq!(sec(&raw, "HEADER.FIELDS (X-None)").unwrap(), "\r\n");
        assert_eq!(
            env(&raw),
            "(\"Mon, 1 Jan 2024 10:00:00 +0000\" \"hi\" ((NIL NIL \"a\" \"example.org\")) \
             ((NIL NIL \"a\" \"example.org\")) ((NIL NIL \"a\" \"example.org\")) \
             ((NIL NIL \"b\" \"example.org\")) NIL NIL NIL NIL)"
        );
    }

    const ALTERNATIVE: &str = "From: a@example.org
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary=\"alt\"

--alt
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: quoted-printable

Gr=C3=BC=C3=9Fe
--alt
Content-Type: text/html; charset=utf-8

<p>Gr&uuml;&szlig;e</p>
--alt--
";

    #[test]
    fn multipart_alternative() {
        let raw = crlf(ALTERNATIVE);
        assert_eq!(
            body(&raw),
            "((\"TEXT\" \"plain\" (\"charset\" \"utf-8\") NIL NIL \"quoted-printable\" 15 0)\
             (\"TEXT\" \"html\" (\"charset\" \"utf-8\") NIL NIL \"7bit\" 23 0) \"alternative\")"
        );
        assert_eq!(
            bodystructure(&raw),
            "((\"TEXT\" \"plain\" (\"charset\" \"utf-8\") NIL NIL \"quoted-printable\" 15 0 NIL NIL NIL NIL)\
             (\"TEXT\" \"html\" (\"charset\" \"utf-8\") NIL NIL \"7bit\" 23 0 NIL NIL NIL NIL) \
             \"alternative\" (\"boundary\" \"alt\") NIL NIL NIL)"
        );
        assert_eq!(sec(&raw, "1").unwrap(), "Gr=C3=BC=C3=9Fe");
        assert_eq!(sec(&raw, "2").unwrap(), "<p>Gr&uuml;&szlig;e</p>");
        assert_eq!(
            sec(&raw, "2.MIME").unwrap(),
            "Content-Type: text/html; charset=utf-8\r\n\r\n"
        );
        assert_eq!(sec(&raw, "3"), None);
        assert_eq!(sec(&raw, "1.HEADER"), None);
        let parts = text_parts(&raw);
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].subtype, b"plain");
        assert_eq!(parts[0].charset.as_deref(), Some(&b"utf-8"[..]));
        assert_eq!(parts[0].encoding.as_deref(), Some(&b"quoted-printable"[..]));
        assert_eq!(parts[1].subtype, b"html");
    }

    const MIXED: &str = "From: =?utf-8?q?J=C3=BCrgen?= <j@example.org>
To: \"Doe, Jane\" <jane@example.org>, team: x@example.org, \"y\" <y@example.org>;, undisclosed-recipients:;
Subject: =?utf-8?B?R3LDvMOfZQ==?= and more
Message-ID: <m1@example.org>
Content-Type: multipart/mixed; boundary=outer

--outer
Content-Type: text/plain

See attachments.
--outer
Content-Type: application/pdf; name*0=\"long \"; name*1=\"name.pdf\"
Content-Transfer-Encoding: base64
Content-Disposition: attachment;
 filename*=utf-8''%E2%82%AC.pdf

JVBERi0xLjQK
AAAA
--outer
Content-Type: message/rfc822
Content-Description: forwarded

From: inner@example.org
Subject: inner
Content-Type: multipart/mixed; boundary=\"outer-inner\"

--outer-inner
Content-Type: text/plain

inner text
--outer-inner
Content-Type: image/png
Content-ID: <img1>

PNG
--outer-inner--
--outer--
";

    #[test]
    fn multipart_mixed_with_attachment_and_nested_message() {
        let raw = crlf(MIXED);
        assert_eq!(
            bodystructure(&raw),
            "((\"TEXT\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 16 0 NIL NIL NIL NIL)\
             (\"application\" \"pdf\" (\"name\" \"long name.pdf\") NIL NIL \"base64\" 18 NIL \
             (\"attachment\" (\"filename*\" \"utf-8''%E2%82%AC.pdf\")) NIL NIL)\
             (\"MESSAGE\" \"RFC822\" NIL NIL \"forwarded\" \"7bit\" 235 \
             (NIL \"inner\" ((NIL NIL \"inner\" \"example.org\")) ((NIL NIL \"inner\" \"example.org\")) \
             ((NIL NIL \"inner\" \"example.org\")) NIL NIL NIL NIL NIL) \
             ((\"TEXT\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 10 0 NIL NIL NIL NIL)\
             (\"image\" \"png\" NIL \"<img1>\" NIL \"7bit\" 3 NIL NIL NIL NIL) \"mixed\" \
             (\"boundary\" \"outer-inner\") NIL NIL NIL) 13 NIL NIL NIL NIL) \"mixed\" \
             (\"boundary\" \"outer\") NIL NIL NIL)"
        );
        assert_eq!(sec(&raw, "2").unwrap(), "JVBERi0xLjQK\r\nAAAA");
        assert_eq!(sec(&raw, "2.HEADER"), None);
        assert!(
            sec(&raw, "3")
                .unwrap()
                .starts_with("From: inner@example.org\r\n")
        );
        assert!(sec(&raw, "3").unwrap().ends_with("--outer-inner--"));
        assert!(
            sec(&raw, "3.HEADER")
                .unwrap()
                .ends_with("boundary=\"outer-inner\"\r\n\r\n")
        );
        assert!(
            sec(&raw, "3.TEXT")
                .unwrap()
                .starts_with("--outer-inner\r\n")
        );
        assert_eq!(sec(&raw, "3.1").unwrap(), "inner text");
        assert_eq!(sec(&raw, "3.2").unwrap(), "PNG");
        assert_eq!(
            sec(&raw, "3.2.MIME").unwrap(),
            "Content-Type: image/png\r\nContent-ID: <img1>\r\n\r\n"
        );
        assert_eq!(sec(&raw, "3.3"), None);
        assert_eq!(sec(&raw, "3.1.HEADER"), None);
        assert_eq!(
            sec(&raw, "3.HEADER.FIELDS.NOT (Content-Type)").unwrap(),
            "From: inner@example.org\r\nSubject: inner\r\n\r\n"
        );
        assert_eq!(
            text_parts(&raw).len(),
            2,
            "the plain part and the inner plain part"
        );
    }

    #[test]
    fn envelope_keeps_encoded_words_groups_and_raw_names() {
        let raw = crlf(MIXED);
        assert_eq!(
            env(&raw),
            "(NIL \"=?utf-8?B?R3LDvMOfZQ==?= and more\" \
             ((\"=?utf-8?q?J=C3=BCrgen?=\" NIL \"j\" \"example.org\")) \
             ((\"=?utf-8?q?J=C3=BCrgen?=\" NIL \"j\" \"example.org\")) \
             ((\"=?utf-8?q?J=C3=BCrgen?=\" NIL \"j\" \"example.org\")) \
             ((\"Doe, Jane\" NIL \"jane\" \"example.org\")(NIL NIL \"team\" NIL)\
             (NIL NIL \"x\" \"example.org\")(\"y\" NIL \"y\" \"example.org\")(NIL NIL NIL NIL)\
             (NIL NIL \"undisclosed-recipients\" NIL)(NIL NIL NIL NIL)) \
             NIL NIL NIL \"<m1@example.org>\")"
        );
    }

    #[test]
    fn address_edge_cases() {
        let cases: &[(&str, &str)] = &[
            ("a@b.c", "((NIL NIL \"a\" \"b.c\"))"),
            (
                "a@b.c (Comment Name)",
                "((\"Comment Name\" NIL \"a\" \"b.c\"))",
            ),
            (
                "John Q. Public <jqp@x.org>",
                "((\"John Q. Public\" NIL \"jqp\" \"x.org\"))",
            ),
            (
                "<@r1.org,@r2.org:u@h.org>",
                "((NIL \"@r1.org,@r2.org\" \"u\" \"h.org\"))",
            ),
            ("nodomain", "((NIL NIL \"nodomain\" \"MISSING_DOMAIN\"))"),
            ("\"q \\\" x\"@h.org", "((NIL NIL \"q \\\" x\" \"h.org\"))"),
            ("<>", "((NIL NIL \"MISSING_MAILBOX\" \"MISSING_DOMAIN\"))"),
            (",, a@b ,", "((NIL NIL \"a\" \"b\"))"),
            ("a@[1.2.3.4]", "((NIL NIL \"a\" \"[1.2.3.4]\"))"),
            ("g: ;", "((NIL NIL \"g\" NIL)(NIL NIL NIL NIL))"),
            (
                "g: a@b",
                "((NIL NIL \"g\" NIL)(NIL NIL \"a\" \"b\")(NIL NIL NIL NIL))",
            ),
            (
                "\"unterminated <a@b>",
                "((NIL NIL \"unterminated <a@b>\" \"MISSING_DOMAIN\"))",
            ),
            ("x <a@b", "((\"x\" NIL \"a\" \"b\"))"),
            ("", "NIL"),
            ("   ", "NIL"),
            ("(just a comment)", "NIL"),
            // Regression: a stray `)` once made the tokenizer loop without consuming input.
            ("a) b@c", "((NIL NIL \"a)b\" \"c\"))"),
            ("x@y)", "((NIL NIL \"x\" \"y)\"))"),
        ];
        for (value, expected) in cases {
            let raw = crlf(&format!("To: {value}\n\n"));
            let e = env(&raw);
            let to = e.split(") ").find(|_| true).map(|_| ());
            let _ = to;
            // The To list is the fourth list in the envelope: easier to build it alone.
            let list = addresses(value.as_bytes());
            let got = if list.is_empty() {
                "NIL".to_owned()
            } else {
                let env = Envelope {
                    date: NString(None),
                    subject: NString(None),
                    from: list,
                    sender: Vec::new(),
                    reply_to: Vec::new(),
                    to: Vec::new(),
                    cc: Vec::new(),
                    bcc: Vec::new(),
                    in_reply_to: NString(None),
                    message_id: NString(None),
                };
                let w = wire(MessageDataItem::Envelope(env));
                w.strip_prefix("ENVELOPE (NIL NIL ")
                    .and_then(|s| s.strip_suffix(" NIL NIL NIL NIL NIL NIL NIL)"))
                    .unwrap()
                    .to_owned()
            };
            assert_eq!(&got, expected, "address list {value:?}");
        }
    }

    #[test]
    fn envelope_strings_are_raw_unfolded_and_nil_when_missing() {
        let raw = crlf("Subject: folded\n\tsubject  \nIn-Reply-To: <x@y>\nDate:\n\nbody\n");
        assert_eq!(
            env(&raw),
            "(\"\" \"folded\tsubject\" NIL NIL NIL NIL NIL NIL \"<x@y>\" NIL)"
        );
        // 8-bit stays 8-bit (a literal), NUL becomes 0x80.
        let raw = b"Subject: caf\xc3\xa9 \x00x\r\n\r\n";
        let envelope = envelope(raw);
        assert_eq!(
            envelope.subject.0.map(|s| s.into_inner().into_owned()),
            Some(b"caf\xc3\xa9 \x80x".to_vec())
        );
        assert_eq!(env(b""), "(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)");
    }

    #[test]
    fn defaults_without_content_type_and_headers_only() {
        // No header at all: all of it is header, the body is empty.
        assert_eq!(
            bodystructure(b"Subject: only\r\n"),
            "(\"TEXT\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 0 0 NIL NIL NIL NIL)"
        );
        assert_eq!(sec(b"Subject: only\r\n", "TEXT").unwrap(), "");
        assert_eq!(
            sec(b"Subject: only\r\n", "HEADER").unwrap(),
            "Subject: only\r\n"
        );
        // A header without a final line break still gets one in HEADER.FIELDS.
        assert_eq!(
            sec(b"Subject: x", "HEADER.FIELDS (Subject)").unwrap(),
            "Subject: x\r\n\r\n"
        );
        // Empty message and a message that is only a body.
        assert_eq!(
            body(b""),
            "(\"TEXT\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 0 0)"
        );
        assert_eq!(sec(b"\r\nbody\r\n", "1").unwrap(), "body\r\n");
        // A last line without CRLF is not counted as a line.
        assert_eq!(
            body(b"\r\nno newline"),
            "(\"TEXT\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 10 0)"
        );
        // Unparsable Content-Type and Content-Transfer-Encoding fall back to the defaults.
        assert_eq!(
            body(b"Content-Type: text\r\nContent-Transfer-Encoding: 8 bit\r\n\r\nx\r\n"),
            "(\"TEXT\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 3 1)"
        );
        // Comments and odd spacing in Content-Type.
        assert_eq!(
            body(b"Content-Type: (c) image / gif (x) ; name = a.gif\r\n\r\nGIF"),
            "(\"image\" \"gif\" (\"name\" \"a.gif\") NIL NIL \"7bit\" 3)"
        );
    }

    #[test]
    fn broken_multiparts() {
        // No boundary parameter: Dovecot's single empty text/plain.
        let raw = b"Content-Type: multipart/mixed\r\n\r\nno parts\r\n";
        assert_eq!(
            bodystructure(raw),
            "((\"TEXT\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 0 0 NIL NIL NIL NIL) \
             \"mixed\" NIL NIL NIL NIL)"
        );
        assert_eq!(sec(raw, "1"), None);
        // A boundary that never appears.
        let raw = b"Content-Type: multipart/mixed; boundary=b\r\n\r\nno parts\r\n";
        assert_eq!(
            body(raw),
            "((\"TEXT\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 0 0) \"mixed\")"
        );
        // No close delimiter: the last part runs to the end.
        let raw = crlf("Content-Type: multipart/mixed; boundary=b\n\n--b\n\none\n--b\n\ntwo\n");
        assert_eq!(sec(&raw, "1").unwrap(), "one");
        assert_eq!(sec(&raw, "2").unwrap(), "two\r\n");
        // A part that is empty, and one without a blank line after its header.
        let raw = crlf(
            "Content-Type: multipart/mixed; boundary=b\n\n--b\n--b\nContent-Type: text/html\n--b--\n",
        );
        assert_eq!(
            body(&raw),
            "((\"TEXT\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 0 0)\
             (\"TEXT\" \"html\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 0 0) \"mixed\")"
        );
        assert_eq!(sec(&raw, "2.MIME").unwrap(), "Content-Type: text/html");
        // A nested boundary that extends the outer one does not end the outer part.
        let raw = crlf(
            "Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: multipart/alternative; boundary=b2\n\n--b2\n\nx\n--b2--\n--b\n\ny\n--b--\n",
        );
        assert_eq!(
            body(&raw),
            "(((\"TEXT\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 1 0) \"alternative\")\
             (\"TEXT\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 1 0) \"mixed\")"
        );
        assert_eq!(sec(&raw, "1.1").unwrap(), "x");
        assert_eq!(sec(&raw, "2").unwrap(), "y");
    }

    #[test]
    fn digest_parts_default_to_message_rfc822() {
        let raw = crlf(
            "Content-Type: multipart/digest; boundary=d\n\n--d\n\nSubject: one\n\nbody one\n--d--\n",
        );
        assert_eq!(
            body(&raw),
            "((\"MESSAGE\" \"RFC822\" NIL NIL NIL \"7bit\" 24 (NIL \"one\" NIL NIL NIL NIL NIL NIL NIL NIL) \
             (\"TEXT\" \"plain\" (\"charset\" \"us-ascii\") NIL NIL \"7bit\" 8 0) 2) \"digest\")"
        );
        assert_eq!(sec(&raw, "1.1").unwrap(), "body one");
        assert_eq!(sec(&raw, "1.HEADER").unwrap(), "Subject: one\r\n\r\n");
    }

    /// Deterministic pseudo-random bytes (no extra dev-dependency).
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                // Mostly MIME-ish bytes so the parser gets deep into its paths.
                let pick = (x >> 33) as usize;
                let alphabet = b"-\r\n:;=\"()<>@,\\ \tab\x00\xff/*0";
                alphabet[pick % alphabet.len()]
            })
            .collect()
    }

    const SECTIONS: &[&str] = &[
        "",
        "1",
        "2",
        "3",
        "1.1",
        "2.1",
        "3.1",
        "3.2",
        "3.2.1",
        "HEADER",
        "TEXT",
        "1.MIME",
        "3.MIME",
        "3.HEADER",
        "3.TEXT",
        "3.1.MIME",
        "HEADER.FIELDS (From Subject)",
        "3.HEADER.FIELDS.NOT (From)",
    ];

    fn exercise(raw: &[u8]) {
        thread_local! {
            static PARSED: Vec<Option<Section<'static>>> =
                SECTIONS.iter().map(|s| parse_optional_section(s)).collect();
        }
        let _ = envelope(raw);
        let _ = bodystructure(raw);
        let _ = body(raw);
        let _ = text_parts(raw);
        PARSED.with(|specs| {
            for spec in specs {
                match section(raw, spec.as_ref()) {
                    // Everything but HEADER.FIELDS[.NOT] is a piece of the message itself.
                    Some(Cow::Borrowed(bytes)) => {
                        let inside = raw.as_ptr_range();
                        assert!(bytes.is_empty() || inside.contains(&bytes.as_ptr()));
                        assert!(bytes.len() <= raw.len());
                    }
                    Some(Cow::Owned(_)) => assert!(matches!(
                        spec,
                        Some(Section::HeaderFields(..) | Section::HeaderFieldsNot(..))
                    )),
                    None => {}
                }
            }
        });
    }

    #[test]
    fn truncated_and_garbage_input_never_panics() {
        for msg in [DOVECOT_MSG, ALTERNATIVE, MIXED] {
            let raw = crlf(msg);
            for end in 0..=raw.len() {
                exercise(&raw[..end]);
            }
            // Bare LF and lost CRs as well.
            let lf = msg.as_bytes();
            for end in (0..=lf.len()).step_by(7) {
                exercise(&lf[..end]);
            }
        }
        for seed in 0..300 {
            exercise(&noise(seed, 400));
            let mut raw = crlf(MIXED);
            let n = noise(seed, 40);
            let at = (seed as usize * 37) % raw.len();
            raw.splice(at..at, n);
            exercise(&raw);
        }
    }

    /// Every part's BODYSTRUCTURE size is the length of its `BODY[part]`.
    #[test]
    fn sizes_agree_with_sections() {
        fn check(raw: &[u8], bs: &BodyStructure<'_>, path: &str) {
            let child = |i: usize| {
                if path.is_empty() {
                    i.to_string()
                } else {
                    format!("{path}.{i}")
                }
            };
            match bs {
                BodyStructure::Multi { bodies, .. } => {
                    for (i, b) in bodies.as_ref().iter().enumerate() {
                        check(raw, b, &child(i + 1));
                    }
                }
                BodyStructure::Single { body, .. } => {
                    let part = if path.is_empty() { "1" } else { path };
                    let bytes = section(raw, Some(&parse_section(part))).unwrap();
                    assert_eq!(bytes.len(), body.basic.size as usize, "BODY[{part}]");
                    if let SpecificFields::Message { body_structure, .. } = &body.specific {
                        match &**body_structure {
                            BodyStructure::Multi { .. } => check(raw, body_structure, part),
                            single => check(raw, single, &format!("{part}.1")),
                        }
                    }
                }
            }
        }
        for msg in [DOVECOT_MSG, ALTERNATIVE, MIXED] {
            let raw = crlf(msg);
            check(&raw, &body_structure(&raw, true), "");
        }
        let raw = crlf("Content-Type: message/rfc822\n\nSubject: x\n\nbody\n");
        check(&raw, &body_structure(&raw, false), "");
        assert_eq!(sec(&raw, "1.1").unwrap(), "body\r\n");
    }

    #[test]
    fn nesting_bomb_is_bounded() {
        // 20 000 nested multiparts and 20 000 nested message/rfc822 parts.
        let mut raw = Vec::new();
        for i in 0..20_000 {
            raw.extend_from_slice(
                format!("Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n")
                    .as_bytes(),
            );
        }
        raw.extend_from_slice(b"\r\nleaf\r\n");
        exercise(&raw);
        let structure = bodystructure(&raw);
        assert_eq!(
            structure.matches("\"mixed\"").count(),
            MAX_DEPTH + 1,
            "{structure}"
        );

        let raw = b"Content-Type: message/rfc822\r\n\r\n".repeat(20_000);
        exercise(&raw);
        let structure = body(&raw);
        assert_eq!(structure.matches("\"RFC822\"").count(), MAX_DEPTH);
        assert!(structure.contains("\"application\" \"octet-stream\""));
        // The deepest reachable part is still addressable, one deeper is not.
        let path = vec!["1"; MAX_DEPTH + 1].join(".");
        assert!(sec(&raw, &path).is_some());
    }

    #[test]
    fn part_count_is_bounded() {
        let mut raw = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n".to_vec();
        raw.extend_from_slice(&b"--b\r\n\r\nx\r\n".repeat(MAX_PARTS + 500));
        raw.extend_from_slice(b"--b--\r\n");
        let tree = Node::parse(&raw);
        let Kind::Multipart(parts) = &tree.kind else {
            panic!()
        };
        assert_eq!(parts.len(), MAX_PARTS);
        assert!(sec(&raw, &MAX_PARTS.to_string()).is_some());
        assert!(sec(&raw, &(MAX_PARTS + 1).to_string()).is_none());
    }

    #[test]
    fn rfc2231_continuations_are_joined() {
        let params = join_continuations(vec![
            (b"name*1".to_vec(), b"b".to_vec()),
            (b"x".to_vec(), b"1".to_vec()),
            (b"name*0".to_vec(), b"a".to_vec()),
            (b"title*0*".to_vec(), b"us-ascii'en'%41".to_vec()),
            (b"title*1".to_vec(), b"B".to_vec()),
            (b"only*".to_vec(), b"utf-8''%41".to_vec()),
            (b"bad*x".to_vec(), b"1".to_vec()),
        ]);
        assert_eq!(
            params,
            vec![
                (b"x".to_vec(), b"1".to_vec()),
                (b"only*".to_vec(), b"utf-8''%41".to_vec()),
                (b"bad*x".to_vec(), b"1".to_vec()),
                (b"name".to_vec(), b"ab".to_vec()),
                (b"title*".to_vec(), b"us-ascii'en'%41B".to_vec()),
            ]
        );
    }
}
