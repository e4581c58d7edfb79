//! MIME parsing. The filer's own MIME splitter and BODYSTRUCTURE builder live in the private
//! `filer::imap` module and are not reachable from outside the crate, so this target fuzzes
//! the public MIME surfaces instead: `mail_parser::MessageParser` (what the filer and filter
//! build on) walking every part, and `filter::classifier::tokens` (the filter's bounded scan).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mail_parser::{MessageParser, MimeHeaders, PartType};

fuzz_target!(|data: &[u8]| {
    if let Some(message) = MessageParser::new().parse(data) {
        for part in message.parts.iter() {
            let _ = part.content_type().map(|ct| (ct.ctype(), ct.subtype()));
            let _ = part.content_disposition();
            let _ = part.content_transfer_encoding();
            let _ = part.offset_body;
            let _ = part.offset_end;
            assert!(part.offset_header as usize <= data.len().max(part.offset_header as usize));
            match &part.body {
                PartType::Text(t) | PartType::Html(t) => {
                    let _ = t.len();
                }
                PartType::Binary(b) | PartType::InlineBinary(b) => {
                    let _ = b.len();
                }
                PartType::Message(m) => {
                    let _ = m.parts.len();
                }
                PartType::Multipart(children) => {
                    for &c in children {
                        assert!((c as usize) < message.parts.len(), "child index out of range");
                    }
                }
            }
        }
        let _ = message.subject();
        let _ = message.body_text(0);
    }
    let limits = filter::classifier::Limits::default();
    let tokens = filter::classifier::tokens(data, &limits);
    assert!(tokens.len() <= limits.max_tokens, "{} tokens over max {}", tokens.len(), limits.max_tokens);
});
