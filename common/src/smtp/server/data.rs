//! The DATA decoder: dot-unstuffing, the end-of-data mark and line-ending normalisation
//! (RFC 5321 §4.1.1.4, §4.5.2).

/// What [`DataDecoder::decode`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataStatus {
    /// Every byte was consumed; the end of the message has not been seen yet.
    NeedMore,
    /// The end-of-data mark `CRLF . CRLF` was found; `consumed` bytes of the input, the mark
    /// included, belong to the message. The bytes after them are the next command.
    End {
        /// Bytes of the input consumed, up to and including the final LF of the mark.
        consumed: usize,
    },
}

/// Decodes the text of a DATA command as it arrives, in any chunking.
///
/// - Only `CRLF . CRLF` ends the message (the CRLF that ended the DATA command counts as the
///   first one, so `.CRLF` right away is an empty message). Every other variant (`LF . LF`,
///   `CRLF . LF`, `CR . CR`, `LF . CRLF`, `CR . CRLF`, `CRLF . CR`) is ordinary text. This is the
///   SMTP smuggling defence: a message can never end where a sloppier next hop would see an end.
/// - A dot at the start of a line (after a real CRLF) is removed when other text follows on the
///   line (transparency). A lone dot followed by a bare CR or LF is kept, so the text that tried
///   to smuggle is stored as it came, and can be seen.
/// - Every bare LF and bare CR becomes CRLF in the output. We deliberately store only canonical
///   CRLF lines, so the stored message can be relayed later, dot-stuffed line by line, without
///   ever carrying an ambiguous line end to the next hop. Postfix gets the same effect by
///   storing lines as records. A line after a bare line break does not count as the start of a
///   line for the two rules above.
/// - Everything else (NUL, 8-bit bytes, invalid UTF-8) passes unchanged (8BITMIME).
///
/// The decoder holds no buffer: it works on the input slice and appends runs of text to `out`.
#[derive(Debug, Clone)]
pub struct DataDecoder {
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// After a CRLF, or at the start of the message.
    LineStart,
    /// A dot at the start of a line.
    Dot,
    /// A dot and a CR at the start of a line.
    DotCr,
    /// Inside a line.
    Text,
    /// A CR that may be followed by its LF.
    Cr,
}

impl DataDecoder {
    /// A decoder at the start of a message (right after the DATA command's CRLF).
    pub fn new() -> Self {
        Self {
            state: State::LineStart,
        }
    }

    /// Decodes `input`, appending the message text to `out`. After [`DataStatus::End`] the
    /// decoder is finished; make a new one for the next message.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> DataStatus {
        let mut pos = 0;
        while let Some(rest) = input.get(pos..).filter(|r| !r.is_empty()) {
            match self.state {
                // Not a dot at the start of a line: the same as any text.
                State::LineStart if rest.first() != Some(&b'.') => self.state = State::Text,
                State::LineStart => {
                    self.state = State::Dot;
                    pos += 1;
                }
                State::Text => {
                    // The fast path: copy the run up to the next CR or LF in one go.
                    let Some(end) = rest.iter().position(|&b| b == b'\r' || b == b'\n') else {
                        out.extend_from_slice(rest);
                        return DataStatus::NeedMore;
                    };
                    let (run, tail) = rest.split_at(end);
                    out.extend_from_slice(run);
                    if tail.first() == Some(&b'\r') {
                        self.state = State::Cr;
                    } else {
                        out.extend_from_slice(b"\r\n"); // bare LF
                    }
                    pos += end + 1;
                }
                State::Cr => match rest.first() {
                    Some(b'\n') => {
                        out.extend_from_slice(b"\r\n");
                        self.state = State::LineStart;
                        pos += 1;
                    }
                    Some(b'\r') => {
                        out.extend_from_slice(b"\r\n"); // the first CR was bare
                        pos += 1;
                    }
                    _ => {
                        out.extend_from_slice(b"\r\n"); // bare CR
                        self.state = State::Text;
                    }
                },
                State::Dot => match rest.first() {
                    Some(b'\r') => {
                        self.state = State::DotCr;
                        pos += 1;
                    }
                    Some(b'\n') => {
                        out.extend_from_slice(b".\r\n"); // `CRLF . LF`: text, not the end
                        self.state = State::Text;
                        pos += 1;
                    }
                    // A stuffed dot: drop it and read what follows as text.
                    _ => self.state = State::Text,
                },
                State::DotCr => match rest.first() {
                    Some(b'\n') => return DataStatus::End { consumed: pos + 1 },
                    Some(b'\r') => {
                        out.extend_from_slice(b".\r\n"); // `CRLF . CR CR`
                        self.state = State::Cr;
                        pos += 1;
                    }
                    _ => {
                        out.extend_from_slice(b".\r\n"); // `CRLF . CR x`: text, not the end
                        self.state = State::Text;
                    }
                },
            }
        }
        DataStatus::NeedMore
    }
}

impl Default for DataDecoder {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The decoded text and the bytes left after the end mark, or `None` if no end was seen.
    fn decode(input: &[u8], chunk: usize) -> (Vec<u8>, Option<Vec<u8>>) {
        let mut decoder = DataDecoder::new();
        let mut out = Vec::new();
        let mut offset = 0;
        for piece in input.chunks(chunk.max(1)) {
            match decoder.decode(piece, &mut out) {
                DataStatus::NeedMore => offset += piece.len(),
                DataStatus::End { consumed } => {
                    assert!(consumed <= piece.len());
                    return (out, Some(input[offset + consumed..].to_vec()));
                }
            }
        }
        (out, None)
    }

    /// Input, decoded text, and the rest after the end mark (`None` when not ended).
    type Case = (&'static [u8], &'static [u8], Option<&'static [u8]>);

    #[test]
    fn table_whole_and_in_chunks() {
        // (input, decoded text, rest after the end mark or None when not ended)
        let table: &[Case] = &[
            (b".\r\n", b"", Some(b"")),
            (b"a\r\n.\r\nQUIT\r\n", b"a\r\n", Some(b"QUIT\r\n")),
            (b"..a\r\n.b\r\n..\r\n.\r\n", b".a\r\nb\r\n.\r\n", Some(b"")),
            (
                b"nul\0and\xff\xfe8bit\r\n.\r\n",
                b"nul\0and\xff\xfe8bit\r\n",
                Some(b""),
            ),
            (
                b"bare\nlf\rcr\r\r\n.\r\n",
                b"bare\r\nlf\r\ncr\r\n\r\n",
                Some(b""),
            ),
            // Smuggling variants: none ends the message; all come out as CRLF lines.
            (b"a\n.\nb", b"a\r\n.\r\nb", None),
            (b"a\r\n.\nb", b"a\r\n.\r\nb", None),
            (b"a\r.\rb", b"a\r\n.\r\nb", None),
            (b"a\n.\r\nb", b"a\r\n.\r\nb", None),
            (b"a\r.\r\nb", b"a\r\n.\r\nb", None),
            (b"a\r\n.\rb", b"a\r\n.\r\nb", None),
            (b"a\r\n.\r\rb", b"a\r\n.\r\n\r\nb", None),
            // A dot after a bare line break is text, not stuffing.
            (b"a\n..b\r\n.\r\n", b"a\r\n..b\r\n", Some(b"")),
            (b"a\r\n.\r\n.\r\n", b"a\r\n", Some(b".\r\n")),
        ];
        for &(input, text, rest) in table {
            let expected = (text.to_vec(), rest.map(<[u8]>::to_vec));
            for chunk in [input.len(), 1, 2, 3, 7, 64] {
                assert_eq!(
                    decode(input, chunk),
                    expected,
                    "input {:?} in chunks of {chunk}",
                    String::from_utf8_lossy(input)
                );
            }
        }
    }

    #[test]
    fn output_never_holds_a_bare_line_break() {
        let input: Vec<u8> = (0..4000u32)
            .map(|i| b"\r\n.ab\0"[(i * 7 % 6) as usize])
            .collect();
        let (out, _) = decode(&input, 5);
        for (i, &b) in out.iter().enumerate() {
            if b == b'\r' {
                assert_eq!(out.get(i + 1), Some(&b'\n'), "bare CR at {i}");
            }
            if b == b'\n' {
                assert_eq!(
                    i.checked_sub(1).and_then(|j| out.get(j)),
                    Some(&b'\r'),
                    "bare LF at {i}"
                );
            }
        }
    }
}
