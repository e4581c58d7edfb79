//! Writing IMAP response syntax by hand where it is simpler and faster than building typed
//! responses: strings, flag lists, dates.

/// Appends `s` as an IMAP string: a quoted string when it is short 7-bit text without CR, LF,
/// NUL, `"` or `\`-problems, else a literal. (Quoted strings escape `"` and `\`.)
pub(crate) fn string(out: &mut Vec<u8>, s: &[u8]) {
    let quotable = s.len() <= 1024 && s.iter().all(|&b| (0x20..0x7f).contains(&b));
    if quotable {
        out.push(b'"');
        for &b in s {
            if b == b'"' || b == b'\\' {
                out.push(b'\\');
            }
            out.push(b);
        }
        out.push(b'"');
    } else {
        literal(out, s);
    }
}

/// Appends `{n}\r\n` and the bytes.
pub(crate) fn literal(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(format!("{{{}}}\r\n", s.len()).as_bytes());
    out.extend_from_slice(s);
}

/// Appends a parenthesised flag list from a space-separated stored list.
pub(crate) fn flags(out: &mut Vec<u8>, stored: &str) {
    out.push(b'(');
    let mut first = true;
    for f in stored.split(' ').filter(|f| !f.is_empty()) {
        if !first {
            out.push(b' ');
        }
        first = false;
        out.extend_from_slice(f.as_bytes());
    }
    out.push(b')');
}

/// An INTERNALDATE: `"17-Jul-1996 02:44:25 +0000"` (UTC).
pub(crate) fn internal_date(out: &mut Vec<u8>, secs: i64) {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let t = secs.rem_euclid(86_400);
    let month = MONTHS
        .get((m as usize).saturating_sub(1))
        .copied()
        .unwrap_or("Jan");
    out.extend_from_slice(
        format!(
            "\"{d:02}-{month}-{y:04} {:02}:{:02}:{:02} +0000\"",
            t / 3600,
            (t % 3600) / 60,
            t % 60
        )
        .as_bytes(),
    );
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_quote_or_literal() {
        let mut o = Vec::new();
        string(&mut o, b"a \"b\" \\c");
        assert_eq!(o, b"\"a \\\"b\\\" \\\\c\"");
        o.clear();
        string(&mut o, b"x\r\ny");
        assert_eq!(o, b"{4}\r\nx\r\ny");
        o.clear();
        string(&mut o, "ü".as_bytes());
        assert_eq!(o, b"{2}\r\n\xc3\xbc");
    }

    #[test]
    fn dates() {
        let mut o = Vec::new();
        internal_date(&mut o, 837_571_465);
        assert_eq!(o, b"\"17-Jul-1996 02:44:25 +0000\"");
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
    }

    #[test]
    fn flag_lists() {
        let mut o = Vec::new();
        flags(&mut o, "\\Seen $Label");
        assert_eq!(o, b"(\\Seen $Label)");
    }
}
