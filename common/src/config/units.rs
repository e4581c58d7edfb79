//! Units written as strings in the TOML file: durations (`"30s"`, `"5d"`) and sizes (`"25MiB"`).

use std::time::Duration;

use super::Problems;

/// A size in bytes, read from `"25MiB"`, `"10MB"`, `"4096"` or a plain integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The number of bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }

    /// Parses a size. `KiB`/`MiB`/`GiB` are powers of 1024, `kB`/`MB`/`GB` of 1000.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(n) = s.parse::<u64>() {
            return Ok(Self(n));
        }
        s.parse::<bytesize::ByteSize>()
            .map(|b| Self(b.as_u64()))
            .map_err(|e| format!("not a size ({e}); write e.g. \"25MiB\""))
    }
}

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", bytesize::ByteSize::b(self.0).display().iec())
    }
}

/// Parses a duration such as `"30s"`, `"5m"`, `"2h 30m"`, `"5d"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("not a duration ({e}); write e.g. \"30s\""))
}

impl Problems {
    /// Parses a duration field, recording a problem under `key` if it is malformed or zero
    /// when `nonzero` is asked for.
    pub fn duration(&mut self, key: &str, value: &str, nonzero: bool) -> Duration {
        match parse_duration(value) {
            Ok(d) if nonzero && d.is_zero() => {
                self.push(key, "must be greater than zero");
                d
            }
            Ok(d) => d,
            Err(e) => {
                self.push(key, e);
                Duration::ZERO
            }
        }
    }

    /// Parses a size field, recording a problem under `key` if it is malformed or zero.
    pub fn size(&mut self, key: &str, value: &str) -> ByteSize {
        match ByteSize::parse(value) {
            Ok(b) if b.0 == 0 => {
                self.push(key, "must be greater than zero");
                b
            }
            Ok(b) => b,
            Err(e) => {
                self.push(key, e);
                ByteSize(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        for (s, n) in [
            ("4096", 4096),
            ("25MiB", 25 << 20),
            ("1 KiB", 1024),
            ("10MB", 10_000_000),
        ] {
            assert_eq!(ByteSize::parse(s), Ok(ByteSize(n)), "{s}");
        }
        assert!(ByteSize::parse("lots").is_err());
        assert!(ByteSize::parse("-1").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5d"), Ok(Duration::from_secs(5 * 86400)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("soon").is_err());
    }
}
