//! SMTP replies with enhanced status codes.

use std::fmt;

/// An enhanced status code (RFC 3463), such as `5.1.1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EnhancedCode {
    /// Class: 2 success, 4 persistent transient failure, 5 permanent failure.
    pub class: u8,
    /// Subject.
    pub subject: u16,
    /// Detail.
    pub detail: u16,
}

impl EnhancedCode {
    /// Parses `"5.1.1"`. Returns `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.split('.');
        let class: u8 = it.next()?.parse().ok()?;
        let subject: u16 = it.next()?.parse().ok()?;
        let detail: u16 = it.next()?.parse().ok()?;
        if it.next().is_some() || !matches!(class, 2 | 4 | 5) || subject > 999 || detail > 999 {
            return None;
        }
        Some(Self {
            class,
            subject,
            detail,
        })
    }
}

impl fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// One SMTP reply: a three-digit code, an optional enhanced status code and one or more lines
/// of text. Whether a failure is temporary or permanent follows the code, never the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The basic reply code (RFC 5321 §4.2).
    pub code: u16,
    /// The enhanced status code, when there is one.
    pub enhanced: Option<EnhancedCode>,
    /// The text lines, without codes or CRLF. At least one (possibly empty) line.
    pub lines: Vec<String>,
}

impl Reply {
    /// A reply with one line of text. `enhanced` is a code such as `"2.1.0"`; an empty or
    /// malformed string means none.
    pub fn new(code: u16, enhanced: &str, text: impl Into<String>) -> Self {
        Self {
            code,
            enhanced: EnhancedCode::parse(enhanced),
            lines: vec![text.into()],
        }
    }

    /// A 2xx/3xx reply.
    pub fn ok(code: u16, enhanced: &str, text: impl Into<String>) -> Self {
        Self::new(code, enhanced, text)
    }

    /// A temporary failure (4xx).
    pub fn temp(code: u16, enhanced: &str, text: impl Into<String>) -> Self {
        Self::new(code, enhanced, text)
    }

    /// A permanent failure (5xx).
    pub fn perm(code: u16, enhanced: &str, text: impl Into<String>) -> Self {
        Self::new(code, enhanced, text)
    }

    /// A reply with several lines (EHLO).
    pub fn multiline(code: u16, enhanced: &str, lines: Vec<String>) -> Self {
        let lines = if lines.is_empty() {
            vec![String::new()]
        } else {
            lines
        };
        Self {
            code,
            enhanced: EnhancedCode::parse(enhanced),
            lines,
        }
    }

    /// 2xx.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// 3xx (354 go ahead, 334 SASL challenge).
    pub fn is_intermediate(&self) -> bool {
        (300..400).contains(&self.code)
    }

    /// 4xx: try again later.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// 5xx: do not try again.
    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }

    /// The text lines joined with spaces (for logs and DSNs).
    pub fn text(&self) -> String {
        self.lines.join(" ")
    }

    /// Appends the wire form (`250-first\r\n250 last\r\n`) to `out`. CR and LF inside a line
    /// are replaced by spaces so a reply can never smuggle a second one.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let last = self.lines.len().saturating_sub(1);
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            out.extend_from_slice(format!("{}{}", self.code, sep).as_bytes());
            if let Some(e) = self.enhanced {
                out.extend_from_slice(format!("{e} ").as_bytes());
            }
            out.extend(
                line.bytes()
                    .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
            );
            out.extend_from_slice(b"\r\n");
        }
    }

    /// The wire form as a new buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.write_to(&mut v);
        v
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some(e) = self.enhanced {
            write!(f, " {e}")?;
        }
        write!(f, " {}", self.text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_single_and_multi_line() {
        assert_eq!(
            Reply::perm(550, "5.1.1", "no such user").to_bytes(),
            b"550 5.1.1 no such user\r\n"
        );
        let r = Reply::multiline(
            250,
            "",
            vec!["host".into(), "PIPELINING".into(), "SIZE 10".into()],
        );
        assert_eq!(
            r.to_bytes(),
            b"250-host\r\n250-PIPELINING\r\n250 SIZE 10\r\n"
        );
    }

    #[test]
    fn crlf_inside_text_cannot_make_a_second_reply() {
        let r = Reply::perm(550, "5.1.1", "a\r\n250 ok");
        assert_eq!(r.to_bytes(), b"550 5.1.1 a  250 ok\r\n");
    }

    #[test]
    fn enhanced_code_parse() {
        assert_eq!(
            EnhancedCode::parse("4.3.0")
                .map(|e| e.to_string())
                .as_deref(),
            Some("4.3.0")
        );
        for bad in ["", "3.1.1", "5.1", "5.1.1.1", "5.x.1", "5.1000.1"] {
            assert_eq!(EnhancedCode::parse(bad), None, "{bad}");
        }
        assert!(Reply::temp(451, "4.3.0", "x").is_transient());
        assert!(Reply::perm(554, "5.7.1", "x").is_permanent());
    }
}
