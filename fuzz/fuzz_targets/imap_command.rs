//! IMAP command input as the filer reads it: `imap_codec::CommandCodec` on the raw bytes, and
//! the `Fragmentizer` framing (with a small max message size, fed in chunks) followed by
//! `decode_message` on each complete message, with the filer's literal handling (refuse large
//! literals: skip a synchronising one, poison a LITERAL+ one).
//!
//! Byte 0: max message size and literal limit; byte 1: chunk size; the rest: client bytes.
#![no_main]

use imap_codec::decode::Decoder;
use imap_codec::fragmentizer::{FragmentInfo, Fragmentizer};
use imap_codec::imap_types::core::LiteralMode;
use imap_codec::CommandCodec;
use imap_codec::imap_types::IntoStatic as _;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&a, rest)) = data.split_first() else { return };
    let Some((&b, input)) = rest.split_first() else { return };

    // The codec on its own, on the whole input (as the filer's tests use it).
    let codec = CommandCodec::default();
    if let Ok((remainder, cmd)) = codec.decode(input) {
        assert!(remainder.len() < input.len(), "decoded a command from no bytes");
        let _ = cmd.into_static();
    }

    let max = 16 + u32::from(a) * 8;
    let literal_limit = u32::from(a) * 4;
    let chunk = 1 + usize::from(b % 64);
    let mut frag = Fragmentizer::new(max);
    let mut messages = 0usize;
    let mut steps = 0usize;
    for piece in input.chunks(chunk) {
        frag.enqueue_bytes(piece);
        while let Some(info) = frag.progress() {
            steps += 1;
            assert!(steps <= 2 * input.len() + 2, "fragmentizer does not progress");
            let range = info.range();
            assert!(range.start <= range.end);
            let _ = frag.fragment_bytes(info);
            if let FragmentInfo::Line { announcement: Some(ann), .. } = info {
                if ann.length > literal_limit {
                    let _ = frag.decode_tag();
                    match ann.mode {
                        LiteralMode::Sync => frag.skip_message(),
                        LiteralMode::NonSync => frag.poison_message(),
                    }
                }
            }
            if frag.is_message_complete() {
                messages += 1;
                if !frag.is_max_message_size_exceeded() {
                    assert!(
                        frag.message_bytes().len() <= max as usize,
                        "message of {} bytes kept with max {max}",
                        frag.message_bytes().len()
                    );
                }
                match frag.decode_message(&CommandCodec::default()) {
                    Ok(cmd) => {
                        let _ = cmd.into_static();
                    }
                    Err(_) => {
                        let _ = frag.decode_tag();
                    }
                }
            }
        }
    }
    assert!(messages <= input.len());
});
