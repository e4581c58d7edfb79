//! POP3 (RFC 1939, RFC 2449 CAPA, RFC 5034 AUTH) command codec: a line in, a typed request out.
//! No I/O. The filer's backend and the access proxy share it.

use std::fmt;

/// Longest command line (RFC 2449 §4: 255 octets; AUTH responses may be longer, RFC 5034 §4).
pub const MAX_LINE_LEN: usize = 8192;

/// A POP3 command.
#[derive(Clone, PartialEq, Eq)]
pub enum Request {
    /// `USER name`.
    User(String),
    /// `PASS secret` (the rest of the line, spaces included).
    Pass(String),
    /// `AUTH [mechanism [initial-response]]`.
    Auth {
        /// The mechanism, upper-cased; `None` asks for the list.
        mechanism: Option<String>,
        /// The base64 initial response (`=` for an empty one).
        initial_response: Option<String>,
    },
    /// `CAPA`.
    Capa,
    /// `STLS`.
    Stls,
    /// `STAT`.
    Stat,
    /// `LIST [msg]`.
    List(Option<u32>),
    /// `RETR msg`.
    Retr(u32),
    /// `DELE msg`.
    Dele(u32),
    /// `NOOP`.
    Noop,
    /// `RSET`.
    Rset,
    /// `TOP msg lines`.
    Top(u32, u32),
    /// `UIDL [msg]`.
    Uidl(Option<u32>),
    /// `QUIT`.
    Quit,
}

// Secrets never reach a log.
impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::User(u) => write!(f, "USER {u}"),
            Self::Pass(_) => write!(f, "PASS <redacted>"),
            Self::Auth {
                mechanism,
                initial_response,
            } => {
                write!(f, "AUTH {}", mechanism.as_deref().unwrap_or(""))?;
                if initial_response.is_some() {
                    write!(f, " <redacted>")?;
                }
                Ok(())
            }
            Self::Capa => write!(f, "CAPA"),
            Self::Stls => write!(f, "STLS"),
            Self::Stat => write!(f, "STAT"),
            Self::List(n) => write!(f, "LIST {n:?}"),
            Self::Retr(n) => write!(f, "RETR {n}"),
            Self::Dele(n) => write!(f, "DELE {n}"),
            Self::Noop => write!(f, "NOOP"),
            Self::Rset => write!(f, "RSET"),
            Self::Top(n, l) => write!(f, "TOP {n} {l}"),
            Self::Uidl(n) => write!(f, "UIDL {n:?}"),
            Self::Quit => write!(f, "QUIT"),
        }
    }
}

/// Why a line is not a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not a command we know.
    #[error("unknown command")]
    Unknown,
    /// A known command with wrong arguments.
    #[error("syntax error in arguments")]
    Arguments,
    /// The line is not text (NUL, other controls, invalid UTF-8).
    #[error("invalid characters in command")]
    Invalid,
}

/// Parses one command line (its CRLF or LF may be present).
pub fn parse(line: &[u8]) -> Result<Request, ParseError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().any(|&b| b < 0x20 && b != b'\t' || b == 0x7f) {
        return Err(ParseError::Invalid);
    }
    let line = std::str::from_utf8(line).map_err(|_| ParseError::Invalid)?;
    let (verb, rest) = match line.split_once(' ') {
        Some((v, r)) => (v, r),
        None => (line, ""),
    };
    let args: Vec<&str> = rest.split(' ').filter(|a| !a.is_empty()).collect();
    let num = |s: &str| {
        s.parse::<u32>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or(ParseError::Arguments)
    };
    let none = |r: Request| {
        if args.is_empty() {
            Ok(r)
        } else {
            Err(ParseError::Arguments)
        }
    };
    let opt_num = || match args.as_slice() {
        [] => Ok(None),
        [n] => num(n).map(Some),
        _ => Err(ParseError::Arguments),
    };
    let one_num = || match args.as_slice() {
        [n] => num(n),
        _ => Err(ParseError::Arguments),
    };
    match verb.to_ascii_uppercase().as_str() {
        "USER" => match args.as_slice() {
            [u] if u.len() <= 255 => Ok(Request::User((*u).to_owned())),
            _ => Err(ParseError::Arguments),
        },
        // RFC 1939 §7: the password is the rest of the line and may contain spaces.
        "PASS" if !rest.is_empty() => Ok(Request::Pass(rest.to_owned())),
        "PASS" => Err(ParseError::Arguments),
        "AUTH" => match args.as_slice() {
            [] => Ok(Request::Auth {
                mechanism: None,
                initial_response: None,
            }),
            [m] => Ok(Request::Auth {
                mechanism: Some(m.to_ascii_uppercase()),
                initial_response: None,
            }),
            [m, ir] => Ok(Request::Auth {
                mechanism: Some(m.to_ascii_uppercase()),
                initial_response: Some((*ir).to_owned()),
            }),
            _ => Err(ParseError::Arguments),
        },
        "CAPA" => none(Request::Capa),
        "STLS" => none(Request::Stls),
        "STAT" => none(Request::Stat),
        "LIST" => opt_num().map(Request::List),
        "RETR" => one_num().map(Request::Retr),
        "DELE" => one_num().map(Request::Dele),
        "NOOP" => none(Request::Noop),
        "RSET" => none(Request::Rset),
        "TOP" => match args.as_slice() {
            [n, l] => Ok(Request::Top(
                num(n)?,
                l.parse().map_err(|_| ParseError::Arguments)?,
            )),
            _ => Err(ParseError::Arguments),
        },
        "UIDL" => opt_num().map(Request::Uidl),
        "QUIT" => none(Request::Quit),
        _ => Err(ParseError::Unknown),
    }
}

/// Appends `data` to `out` as a POP3 multi-line body (RFC 1939 §3): every line starting with
/// `.` gets another `.`; `at_line_start` carries the state across chunks, so a message can be
/// streamed. Call [`finish_multiline`] after the last chunk.
pub fn dot_stuff(data: &[u8], at_line_start: &mut bool, out: &mut Vec<u8>) {
    let mut start = 0;
    for (i, &b) in data.iter().enumerate() {
        if *at_line_start && b == b'.' {
            out.extend_from_slice(&data[start..i]);
            out.push(b'.');
            start = i;
        }
        *at_line_start = b == b'\n';
    }
    out.extend_from_slice(&data[start..]);
}

/// Ends a multi-line body: a CRLF if the data did not end with one, then `.` CRLF.
pub fn finish_multiline(at_line_start: bool, out: &mut Vec<u8>) {
    if !at_line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        let table: &[(&[u8], Result<Request, ParseError>)] = &[
            (
                b"USER a@example.test\r\n",
                Ok(Request::User("a@example.test".into())),
            ),
            (
                b"pass with spaces inside\r\n",
                Ok(Request::Pass("with spaces inside".into())),
            ),
            (b"STAT\r\n", Ok(Request::Stat)),
            (b"list\r\n", Ok(Request::List(None))),
            (b"LIST 3\r\n", Ok(Request::List(Some(3)))),
            (b"LIST 0\r\n", Err(ParseError::Arguments)),
            (b"LIST x\r\n", Err(ParseError::Arguments)),
            (b"RETR 1\n", Ok(Request::Retr(1))),
            (b"RETR\r\n", Err(ParseError::Arguments)),
            (b"TOP 2 0\r\n", Ok(Request::Top(2, 0))),
            (b"UIDL\r\n", Ok(Request::Uidl(None))),
            (
                b"AUTH plain AGEAYg==\r\n",
                Ok(Request::Auth {
                    mechanism: Some("PLAIN".into()),
                    initial_response: Some("AGEAYg==".into()),
                }),
            ),
            (
                b"AUTH\r\n",
                Ok(Request::Auth {
                    mechanism: None,
                    initial_response: None,
                }),
            ),
            (b"QUIT now\r\n", Err(ParseError::Arguments)),
            (b"XYZZY\r\n", Err(ParseError::Unknown)),
            (b"RETR \x001\r\n", Err(ParseError::Invalid)),
            (b"RETR 99999999999\r\n", Err(ParseError::Arguments)),
            (b"USER \xff\r\n", Err(ParseError::Invalid)),
        ];
        for (line, want) in table {
            assert_eq!(&parse(line), want, "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        assert_eq!(
            format!("{:?}", parse(b"PASS hunter2").unwrap()),
            "PASS <redacted>"
        );
        let auth = format!("{:?}", parse(b"AUTH PLAIN c2VjcmV0").unwrap());
        assert!(!auth.contains("c2VjcmV0"), "{auth}");
    }

    #[test]
    fn dot_stuffing_streams_across_chunks() {
        let msg = b"a\r\n.b\r\n..c\r\nd.\r\n.";
        let whole = {
            let (mut s, mut out) = (true, Vec::new());
            dot_stuff(msg, &mut s, &mut out);
            finish_multiline(s, &mut out);
            out
        };
        assert_eq!(whole, b"a\r\n..b\r\n...c\r\nd.\r\n..\r\n.\r\n");
        for n in [1, 2, 3, 7] {
            let (mut s, mut out) = (true, Vec::new());
            for chunk in msg.chunks(n) {
                dot_stuff(chunk, &mut s, &mut out);
            }
            finish_multiline(s, &mut out);
            assert_eq!(out, whole, "chunks of {n}");
        }
    }
}
