//! The bounded command-line decoder: bytes in, complete lines out, never more than the limit
//! held in memory.

/// What [`LineDecoder::decode`] found in the bytes it consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineStatus {
    /// Every byte was consumed and no line is complete yet.
    NeedMore,
    /// A complete line, including its LF, is in [`LineDecoder::line`] until the next call.
    Line,
    /// The current line went over the limit. It is reported once, as soon as the limit is
    /// passed; the decoder then skips the rest of that line up to and including its LF.
    TooLong,
}

/// Splits a byte stream into lines ending in LF, each at most `max_len` bytes including the
/// line ending.
///
/// A line over the limit is never buffered whole: at most `max_len` bytes of a line are kept
/// (like Postfix's `line_length_limit`, but we answer instead of splitting the line), which keeps
/// the memory of a connection bounded whatever the peer sends. A line ending in a bare LF is a
/// line too; whether its CR was missing is for the command parser to judge.
#[derive(Debug)]
pub struct LineDecoder {
    max_len: usize,
    line: Vec<u8>,
    is_complete: bool,
    is_skipping: bool,
}

impl LineDecoder {
    /// A decoder for lines of at most `max_len` bytes, CRLF included.
    pub fn new(max_len: usize) -> Self {
        Self {
            max_len,
            line: Vec::new(),
            is_complete: false,
            is_skipping: false,
        }
    }

    /// Changes the limit; it applies from the next call of [`decode`](Self::decode).
    pub fn set_max_len(&mut self, max_len: usize) {
        self.max_len = max_len;
    }

    /// Consumes bytes from the front of `input` and returns how many it consumed with what it
    /// found. On [`LineStatus::NeedMore`] it has consumed all of `input`; otherwise it stopped
    /// right after the event, and the rest of `input` is still to be fed.
    pub fn decode(&mut self, input: &[u8]) -> (usize, LineStatus) {
        if self.is_complete {
            self.line.clear();
            self.is_complete = false;
        }
        let mut consumed = 0;
        let mut rest = input;
        if self.is_skipping {
            let Some(lf) = find_lf(rest) else {
                return (input.len(), LineStatus::NeedMore);
            };
            self.is_skipping = false;
            consumed = lf + 1;
            rest = rest.get(consumed..).unwrap_or_default();
        }
        // Bytes this line may still take, its LF included.
        let room = self.max_len.saturating_sub(self.line.len());
        match find_lf(rest) {
            Some(lf) if lf < room => {
                self.line
                    .extend_from_slice(rest.get(..=lf).unwrap_or_default());
                self.is_complete = true;
                (consumed + lf + 1, LineStatus::Line)
            }
            Some(lf) => {
                self.line.clear();
                (consumed + lf + 1, LineStatus::TooLong)
            }
            // Without its LF the line still fits: keep it and wait for more.
            None if rest.len() < room => {
                self.line.extend_from_slice(rest);
                (input.len(), LineStatus::NeedMore)
            }
            None => {
                self.line.clear();
                self.is_skipping = true;
                (input.len(), LineStatus::TooLong)
            }
        }
    }

    /// The line found by the last [`decode`](Self::decode) that returned
    /// [`LineStatus::Line`], with its line ending. Empty otherwise.
    pub fn line(&self) -> &[u8] {
        if self.is_complete { &self.line } else { &[] }
    }

    /// Bytes of an unfinished line held, or 0.
    pub fn partial_len(&self) -> usize {
        if self.is_complete { 0 } else { self.line.len() }
    }

    /// Forgets any unfinished line and any line being skipped (after STARTTLS).
    pub fn reset(&mut self) {
        self.line.clear();
        self.is_complete = false;
        self.is_skipping = false;
    }

    /// The bytes of memory held for the line (for tests of the memory bound).
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.line.capacity()
    }
}

fn find_lf(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every event with its line, for comparing whole and chunked feeding.
    fn events(max_len: usize, input: &[u8], chunk: usize) -> Vec<(LineStatus, Vec<u8>)> {
        let mut decoder = LineDecoder::new(max_len);
        let mut out = Vec::new();
        for mut piece in input.chunks(chunk.max(1)) {
            loop {
                let (n, status) = decoder.decode(piece);
                assert!(n <= piece.len());
                piece = &piece[n..];
                match status {
                    LineStatus::NeedMore => {
                        assert!(piece.is_empty(), "NeedMore must consume everything");
                        break;
                    }
                    LineStatus::Line => out.push((status, decoder.line().to_vec())),
                    LineStatus::TooLong => out.push((status, Vec::new())),
                }
                if piece.is_empty() {
                    break;
                }
            }
        }
        out
    }

    #[test]
    fn lines_at_the_limit_and_one_byte_over() {
        let at = [b"x".repeat(8), b"\r\n".to_vec()].concat(); // 10 bytes
        let over = [b"y".repeat(9), b"\r\n".to_vec()].concat(); // 11 bytes
        let input = [at.clone(), over, b"NOOP\r\n".to_vec()].concat();
        let got = events(10, &input, input.len());
        assert_eq!(
            got,
            vec![
                (LineStatus::Line, at),
                (LineStatus::TooLong, Vec::new()),
                (LineStatus::Line, b"NOOP\r\n".to_vec()),
            ]
        );
    }

    #[test]
    fn chunked_feeding_gives_the_same_events() {
        let long = b"z".repeat(100);
        let cases: Vec<Vec<u8>> = vec![
            b"EHLO a\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n".to_vec(),
            b"bare\nlf\n\r\n\n".to_vec(),
            [b"NOOP\r\n".to_vec(), long.clone(), b"\r\nQUIT\r\n".to_vec()].concat(),
            [long.clone(), long, b"\nQUIT\r\n".to_vec()].concat(),
            b"with\0nul\r\nand \xff high\r\n".to_vec(),
        ];
        for input in cases {
            let whole = events(16, &input, input.len());
            for chunk in [1, 2, 3, 7, 64] {
                assert_eq!(
                    events(16, &input, chunk),
                    whole,
                    "chunk {chunk} of {input:?}"
                );
            }
        }
    }

    #[test]
    fn a_long_line_is_reported_once_before_its_end_and_never_buffered() {
        let mut decoder = LineDecoder::new(64);
        let (n, status) = decoder.decode(&[b'a'; 1000]);
        assert_eq!((n, status), (1000, LineStatus::TooLong));
        for _ in 0..1000 {
            assert_eq!(decoder.decode(&[b'a'; 1000]), (1000, LineStatus::NeedMore));
        }
        assert!(decoder.capacity() <= 128, "held {}", decoder.capacity());
        // The rest of the long line is skipped up to its LF, and the next line comes whole.
        assert_eq!(decoder.decode(b"tail\r\nNOOP\r\n"), (12, LineStatus::Line));
        assert_eq!(decoder.line(), b"NOOP\r\n");
    }
}
