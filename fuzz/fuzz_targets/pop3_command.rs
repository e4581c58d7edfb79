//! POP3 commands (`common::pop3::parse`) line by line, and the multi-line dot-stuffing
//! (`dot_stuff` + `finish_multiline`): on CRLF-canonical text, stuffed in chunks and decoded
//! by the SMTP DATA decoder (same framing rules), the text must come back unchanged and end
//! exactly at the terminator.
//!
//! Byte 0: chunk size for the stuffing; the rest: command lines (and the body text).
#![no_main]

use common::pop3::{dot_stuff, finish_multiline, parse};
use common::smtp::server::{DataDecoder, DataStatus};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&a, input)) = data.split_first() else { return };
    let _ = parse(input);
    for line in input.split_inclusive(|&b| b == b'\n') {
        if let Ok(req) = parse(line) {
            let _ = format!("{req:?}");
        }
    }

    // Only CRLF-canonical text is a message body the filer serves.
    let canonical = input.iter().enumerate().all(|(i, &b)| match b {
        b'\r' => input.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && input[i - 1] == b'\r',
        _ => true,
    });
    let chunk = 1 + usize::from(a % 32);
    let mut stuffed = Vec::new();
    let mut at_line_start = true;
    for piece in input.chunks(chunk) {
        dot_stuff(piece, &mut at_line_start, &mut stuffed);
    }
    finish_multiline(at_line_start, &mut stuffed);
    assert!(stuffed.ends_with(b".\r\n"));
    if !canonical {
        return;
    }
    let mut decoder = DataDecoder::new();
    let mut out = Vec::new();
    match decoder.decode(&stuffed, &mut out) {
        DataStatus::End { consumed } => {
            assert_eq!(consumed, stuffed.len(), "stuffed body ends early")
        }
        DataStatus::NeedMore => panic!("stuffed body never ends"),
    }
    let mut expect = input.to_vec();
    if !expect.is_empty() && !expect.ends_with(b"\r\n") {
        expect.extend_from_slice(b"\r\n");
    }
    assert_eq!(out, expect, "dot-stuffing does not round-trip");
});
