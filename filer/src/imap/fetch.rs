//! FETCH (RFC 3501 §6.4.5), with CONDSTORE's CHANGEDSINCE and MODSEQ (RFC 7162).
//!
//! Simple items (UID, FLAGS, RFC822.SIZE, INTERNALDATE, MODSEQ) are written by hand;
//! ENVELOPE and BODYSTRUCTURE are built as imap-types values and encoded by imap-codec. Whole
//! messages larger than [`STREAM_OVER`] are streamed from their file after the rest of the
//! response line, so a big FETCH never holds a message in memory.

use std::sync::Arc;

use imap_codec::ResponseCodec;
use imap_codec::encode::Encoder as _;
use imap_types::command::FetchModifier;
use imap_types::core::{AString, Vec1};
use imap_types::fetch::{
    MacroOrMessageDataItemNames, MessageDataItem, MessageDataItemName, Section,
};
use imap_types::response::{Data, Response};
use imap_types::sequence::SequenceSet;
use tokio::io::AsyncReadExt as _;

use super::session::{Msg, Session, WRITE_CHUNK, blocking, has_flag, resolve};
use super::{mime, wire};
use crate::store::{FlagOp, StoreError};

/// Whole messages above this size are streamed from disk.
const STREAM_OVER: u64 = 1 << 20;
/// Messages rendered per trip to the blocking pool.
const BATCH: usize = 256;

/// One rendered FETCH response: everything but the closing `)` and, for a big whole message,
/// the file to stream as its literal.
struct Rendered {
    head: Vec<u8>,
    stream: Option<(std::path::PathBuf, u64, &'static str)>,
}

pub(super) async fn fetch(
    s: &mut Session,
    tag: &str,
    set: &SequenceSet,
    items: &MacroOrMessageDataItemNames<'_>,
    uid: bool,
    modifiers: &[FetchModifier],
) {
    let mut names: Vec<MessageDataItemName<'static>> = match items {
        MacroOrMessageDataItemNames::Macro(m) => m
            .expand()
            .into_iter()
            .map(imap_types::IntoStatic::into_static)
            .collect(),
        MacroOrMessageDataItemNames::MessageDataItemNames(v) => v
            .iter()
            .cloned()
            .map(imap_types::IntoStatic::into_static)
            .collect(),
    };
    if uid && !names.contains(&MessageDataItemName::Uid) {
        names.insert(0, MessageDataItemName::Uid);
    }
    let changed_since = modifiers.iter().find_map(|m| match m {
        FetchModifier::ChangedSince(v) => Some(v.get()),
        FetchModifier::Vanished => None,
    });
    if changed_since.is_some() || names.contains(&MessageDataItemName::ModSeq) {
        s.condstore = true;
    }
    let with_modseq = changed_since.is_some() || names.contains(&MessageDataItemName::ModSeq);
    let Some((user, sel)) = s.selected() else {
        return;
    };
    let sets_seen = !sel.read_only
        && names.iter().any(|n| {
            matches!(
                n,
                MessageDataItemName::BodyExt { peek: false, .. }
                    | MessageDataItemName::Rfc822
                    | MessageDataItemName::Rfc822Text
            )
        });
    let mut targets: Vec<(u32, Msg)> = resolve(sel, set, uid)
        .into_iter()
        .filter_map(|i| sel.msgs.get(i).map(|m| (i as u32 + 1, m.clone())))
        .filter(|(_, m)| changed_since.is_none_or(|c| m.modseq > c))
        .collect();
    // Reading a body sets \Seen first, so the response carries the new flags.
    if sets_seen {
        let unseen: Vec<u32> = targets
            .iter()
            .filter(|(_, m)| !has_flag(&m.flags, "\\Seen"))
            .map(|(_, m)| m.uid)
            .collect();
        if !unseen.is_empty() {
            let (store, folder) = (user.store.clone(), sel.folder.clone());
            let seen = vec!["\\Seen".to_owned()];
            if let Ok((changed, _)) =
                blocking(move || store.store_flags(&folder, &unseen, FlagOp::Add, &seen, None))
                    .await
            {
                let Some((_, sel)) = s.selected() else { return };
                for c in changed {
                    if let Ok(i) = sel.msgs.binary_search_by_key(&c.uid, |v| v.uid)
                        && let Some(v) = sel.msgs.get_mut(i)
                    {
                        v.flags = c.flags.clone();
                        v.modseq = c.modseq;
                    }
                    if let Some(t) = targets.iter_mut().find(|(_, m)| m.uid == c.uid) {
                        t.1.flags = c.flags;
                        t.1.modseq = c.modseq;
                    }
                }
                if !names.contains(&MessageDataItemName::Flags) {
                    names.push(MessageDataItemName::Flags);
                }
            }
        }
    }
    let names = Arc::new(names);
    let dir = user.store.dir().to_owned();
    for chunk in targets.chunks(BATCH) {
        let (names, dir, chunk) = (names.clone(), dir.clone(), chunk.to_vec());
        let rendered = blocking(move || {
            Ok::<_, StoreError>(
                chunk
                    .iter()
                    .map(|(seq, m)| render(*seq, m, &names, &dir, with_modseq))
                    .collect::<Vec<_>>(),
            )
        })
        .await;
        let Ok(rendered) = rendered else {
            s.line(&format!("{tag} NO [SERVERBUG] cannot read messages"));
            return;
        };
        for r in rendered {
            s.out.extend_from_slice(&r.head);
            if let Some((path, size, name)) = r.stream {
                s.out
                    .extend_from_slice(format!(" {name} {{{size}}}\r\n").as_bytes());
                if stream_file(s, &path, size).await.is_err() {
                    return;
                }
            }
            s.out.extend_from_slice(b")\r\n");
            if s.out.len() >= WRITE_CHUNK && s.flush().await.is_err() {
                return;
            }
        }
    }
    s.sync(uid).await;
    s.ok(tag, "FETCH completed");
}

/// Sends exactly `size` bytes of the file (padding with spaces if it shrank, so the literal
/// length announced stays true).
async fn stream_file(s: &mut Session, path: &std::path::Path, size: u64) -> std::io::Result<()> {
    s.flush().await?;
    let mut left = size;
    if let Ok(mut f) = tokio::fs::File::open(path).await {
        let mut buf = vec![0u8; 256 * 1024];
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = f.read(&mut buf[..want]).await?;
            if n == 0 {
                break;
            }
            for b in &mut buf[..n] {
                if *b == 0 {
                    *b = 0x80;
                }
            }
            s.out.extend_from_slice(&buf[..n]);
            left -= n as u64;
            s.flush().await?;
        }
    }
    s.out
        .resize(s.out.len() + usize::try_from(left).unwrap_or(0), b' ');
    Ok(())
}

fn render(
    seq: u32,
    m: &Msg,
    names: &[MessageDataItemName<'_>],
    dir: &std::path::Path,
    with_modseq: bool,
) -> Rendered {
    let mut head = format!("* {seq} FETCH (").into_bytes();
    let mut first = true;
    let mut sep = |h: &mut Vec<u8>| {
        if !first {
            h.push(b' ');
        }
        first = false;
    };
    let path = dir.join(&m.file);
    let mut content: Option<Vec<u8>> = None;
    let load = |content: &mut Option<Vec<u8>>| -> Vec<u8> {
        if content.is_none() {
            *content = Some(std::fs::read(&path).unwrap_or_default());
        }
        content.clone().unwrap_or_default()
    };
    let mut stream = None;
    let mut modseq_done = false;
    for n in names {
        match n {
            MessageDataItemName::Uid => {
                sep(&mut head);
                head.extend_from_slice(format!("UID {}", m.uid).as_bytes());
            }
            MessageDataItemName::Flags => {
                sep(&mut head);
                head.extend_from_slice(b"FLAGS ");
                wire::flags(&mut head, &m.flags);
            }
            MessageDataItemName::Rfc822Size => {
                sep(&mut head);
                head.extend_from_slice(format!("RFC822.SIZE {}", m.size).as_bytes());
            }
            MessageDataItemName::InternalDate => {
                sep(&mut head);
                head.extend_from_slice(b"INTERNALDATE ");
                wire::internal_date(&mut head, m.internal_date);
            }
            MessageDataItemName::ModSeq => {
                sep(&mut head);
                head.extend_from_slice(format!("MODSEQ ({})", m.modseq).as_bytes());
                modseq_done = true;
            }
            MessageDataItemName::Envelope => {
                let raw = load(&mut content);
                sep(&mut head);
                head.extend_from_slice(&encode_item(MessageDataItem::Envelope(mime::envelope(
                    &raw,
                ))));
            }
            MessageDataItemName::BodyStructure => {
                let raw = load(&mut content);
                sep(&mut head);
                head.extend_from_slice(&encode_item(MessageDataItem::BodyStructure(
                    mime::body_structure(&raw, true),
                )));
            }
            MessageDataItemName::Body => {
                let raw = load(&mut content);
                sep(&mut head);
                head.extend_from_slice(&encode_item(MessageDataItem::Body(mime::body_structure(
                    &raw, false,
                ))));
            }
            MessageDataItemName::Rfc822
            | MessageDataItemName::BodyExt {
                section: None,
                partial: None,
                ..
            } if m.size > STREAM_OVER && content.is_none() && stream.is_none() => {
                let name = if matches!(n, MessageDataItemName::Rfc822) {
                    "RFC822"
                } else {
                    "BODY[]"
                };
                stream = Some((path.clone(), m.size, name));
            }
            MessageDataItemName::Rfc822 => {
                let raw = load(&mut content);
                sep(&mut head);
                head.extend_from_slice(b"RFC822 ");
                literal(&mut head, &raw);
            }
            MessageDataItemName::Rfc822Header => {
                let raw = load(&mut content);
                sep(&mut head);
                head.extend_from_slice(b"RFC822.HEADER ");
                let part = mime::section(&raw, Some(&Section::Header(None)))
                    .map(|c| c.into_owned())
                    .unwrap_or_default();
                literal(&mut head, &part);
            }
            MessageDataItemName::Rfc822Text => {
                let raw = load(&mut content);
                sep(&mut head);
                head.extend_from_slice(b"RFC822.TEXT ");
                let part = mime::section(&raw, Some(&Section::Text(None)))
                    .map(|c| c.into_owned())
                    .unwrap_or_default();
                literal(&mut head, &part);
            }
            MessageDataItemName::BodyExt {
                section, partial, ..
            } => {
                let raw = load(&mut content);
                sep(&mut head);
                head.extend_from_slice(b"BODY[");
                if let Some(sec) = section {
                    section_spec(&mut head, sec);
                }
                head.push(b']');
                let data = mime::section(&raw, section.as_ref())
                    .map(|c| c.into_owned())
                    .unwrap_or_default();
                match partial {
                    Some((start, len)) => {
                        head.extend_from_slice(format!("<{start}> ").as_bytes());
                        let start = (*start as usize).min(data.len());
                        let end = start.saturating_add(len.get() as usize).min(data.len());
                        literal(&mut head, data.get(start..end).unwrap_or_default());
                    }
                    None => {
                        head.push(b' ');
                        literal(&mut head, &data);
                    }
                }
            }
            // BINARY is not advertised; anything else the codec knows is ignored.
            _ => {}
        }
    }
    if with_modseq && !modseq_done {
        sep(&mut head);
        head.extend_from_slice(format!("MODSEQ ({})", m.modseq).as_bytes());
    }
    Rendered { head, stream }
}

/// A literal with NUL bytes replaced (IMAP4rev1 literals are CHAR8, without NUL; Dovecot does
/// the same).
fn literal(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(format!("{{{}}}\r\n", data.len()).as_bytes());
    out.extend(data.iter().map(|&b| if b == 0 { 0x80 } else { b }));
}

/// `1.2.HEADER.FIELDS (FROM TO)` and the like.
fn section_spec(out: &mut Vec<u8>, s: &Section<'_>) {
    let part = |out: &mut Vec<u8>, p: &imap_types::fetch::Part, dot: bool| {
        let nums: Vec<String> = p.0.as_ref().iter().map(|n| n.to_string()).collect();
        out.extend_from_slice(nums.join(".").as_bytes());
        if dot {
            out.push(b'.');
        }
    };
    let fields = |out: &mut Vec<u8>, names: &Vec1<AString<'_>>| {
        out.extend_from_slice(b" (");
        for (i, n) in names.as_ref().iter().enumerate() {
            if i > 0 {
                out.push(b' ');
            }
            let b: &[u8] = n.as_ref();
            if !b.is_empty()
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_')
            {
                out.extend_from_slice(b);
            } else {
                wire::string(out, b);
            }
        }
        out.push(b')');
    };
    match s {
        Section::Part(p) => part(out, p, false),
        Section::Header(p) => {
            if let Some(p) = p {
                part(out, p, true);
            }
            out.extend_from_slice(b"HEADER");
        }
        Section::HeaderFields(p, names) => {
            if let Some(p) = p {
                part(out, p, true);
            }
            out.extend_from_slice(b"HEADER.FIELDS");
            fields(out, names);
        }
        Section::HeaderFieldsNot(p, names) => {
            if let Some(p) = p {
                part(out, p, true);
            }
            out.extend_from_slice(b"HEADER.FIELDS.NOT");
            fields(out, names);
        }
        Section::Text(p) => {
            if let Some(p) = p {
                part(out, p, true);
            }
            out.extend_from_slice(b"TEXT");
        }
        Section::Mime(p) => {
            part(out, p, true);
            out.extend_from_slice(b"MIME");
        }
    }
}

/// Encodes one FETCH item with imap-codec: the bytes between `* 1 FETCH (` and `)\r\n`.
fn encode_item(item: MessageDataItem<'static>) -> Vec<u8> {
    let Some(seq) = std::num::NonZeroU32::new(1) else {
        return Vec::new();
    };
    let resp = Response::Data(Data::Fetch {
        seq,
        items: Vec1::from(item),
    });
    let bytes = ResponseCodec::default().encode(&resp).dump();
    const PREFIX: &[u8] = b"* 1 FETCH (";
    const SUFFIX: &[u8] = b")\r\n";
    if bytes.starts_with(PREFIX) && bytes.ends_with(SUFFIX) {
        bytes[PREFIX.len()..bytes.len() - SUFFIX.len()].to_vec()
    } else {
        Vec::new()
    }
}
