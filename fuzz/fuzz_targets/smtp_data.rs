//! The DATA decoder (`common::smtp::server::DataDecoder`).
//!
//! Byte 0 seeds the split positions; the rest is the text after the DATA command's CRLF.
//! Checks: the decoder ends exactly where the input first holds the end mark `CRLF . CRLF`
//! (counting the DATA command's CRLF as the first one) and never on any other input, in any
//! chunking, with the same output; the output has only CRLF line endings; and the output,
//! dot-stuffed again and terminated, decodes back to itself and ends exactly at the new
//! terminator (so nothing it carries can end a message early at the next hop).
#![no_main]

use common::smtp::server::{DataDecoder, DataStatus};
use libfuzzer_sys::fuzz_target;

/// Where the message ends in `input` by the RFC: first `\r\n.\r\n` with the DATA CRLF before it.
fn expected_end(input: &[u8]) -> Option<usize> {
    let mut framed = b"\r\n".to_vec();
    framed.extend_from_slice(input);
    framed
        .windows(5)
        .position(|w| w == b"\r\n.\r\n")
        .map(|p| p + 5 - 2)
}

/// Decodes `input` split at `cuts`; returns the output and the absolute end offset.
fn decode(input: &[u8], cuts: &[usize]) -> (Vec<u8>, Option<usize>) {
    let mut decoder = DataDecoder::new();
    let mut out = Vec::new();
    let mut offset = 0;
    let mut bounds: Vec<usize> = cuts.iter().copied().filter(|&c| c < input.len()).collect();
    bounds.push(input.len());
    bounds.sort_unstable();
    bounds.dedup();
    for end in bounds {
        if end <= offset {
            continue;
        }
        let piece = &input[offset..end];
        match decoder.decode(piece, &mut out) {
            DataStatus::NeedMore => offset = end,
            DataStatus::End { consumed } => {
                assert!(consumed >= 1 && consumed <= piece.len(), "consumed {consumed} of {}", piece.len());
                return (out, Some(offset + consumed));
            }
        }
    }
    (out, None)
}

fn stuff(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 8);
    let mut line_start = true;
    for &b in text {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n';
    }
    if !line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, input)) = data.split_first() else { return };
    // Split positions from a small LCG seeded by the first byte.
    let mut x = u32::from(seed) | 1;
    let mut cuts = Vec::new();
    let mut pos = 0usize;
    while pos < input.len() {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        pos += 1 + (x >> 16) as usize % (1 + usize::from(seed % 17));
        cuts.push(pos);
    }

    let (whole, whole_end) = decode(input, &[]);
    let (chunked, chunked_end) = decode(input, &cuts);
    let (single, single_end) = decode(input, &(1..input.len()).collect::<Vec<_>>());
    assert_eq!(whole_end, chunked_end, "end depends on chunking");
    assert_eq!(whole_end, single_end, "end depends on chunking (1-byte)");
    assert_eq!(whole, chunked, "output depends on chunking");
    assert_eq!(whole, single, "output depends on chunking (1-byte)");
    assert_eq!(whole_end, expected_end(input), "end not at the first CRLF.CRLF");

    for (i, &b) in whole.iter().enumerate() {
        if b == b'\r' {
            assert_eq!(whole.get(i + 1), Some(&b'\n'), "bare CR in output at {i}");
        }
        if b == b'\n' {
            assert!(i > 0 && whole[i - 1] == b'\r', "bare LF in output at {i}");
        }
    }
    // Output no larger than input plus one CR per line break.
    assert!(whole.len() <= 2 * input.len() + 2);

    let relayed = stuff(&whole);
    let (again, again_end) = decode(&relayed, &cuts);
    assert_eq!(again_end, Some(relayed.len()), "relayed text ends early or never");
    let mut expect = whole.clone();
    if !expect.is_empty() && !expect.ends_with(b"\r\n") {
        expect.extend_from_slice(b"\r\n");
    }
    assert_eq!(again, expect, "relayed text does not round-trip");
});
