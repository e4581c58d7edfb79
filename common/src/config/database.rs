//! `[database]`: where the mailbox-location database is, as typed settings.
//!
//! `url` names the backend: `sqlite:PATH` (or a bare path) for one SQLite file, or
//! `postgres://user:password@host:port/database` (also `postgresql://`) for a PostgreSQL
//! server, which then takes every change. `read_url`, for PostgreSQL only, names a server the
//! lookups go to instead (a read replica). URLs hold passwords, so [`PostgresUrl`] prints
//! itself with the password replaced by `***`, and so do the problems found here.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::Problems;

/// Where the location database is.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseLocation {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL server.
    Postgres {
        /// The primary: every change goes here, and so does the fresh lookup a delivery makes
        /// just before it commits.
        write: PostgresUrl,
        /// A read replica for the other lookups; `None` sends them to `write` too.
        read: Option<PostgresUrl>,
    },
}

impl DatabaseLocation {
    /// Validates `[database] url` and `read_url`, recording every problem with its key path.
    /// An empty `url` means the SQLite file `<data_dir>/location.db`.
    pub(super) fn build(
        url: &str,
        read_url: &str,
        data_dir: &Path,
        problems: &mut Problems,
    ) -> Self {
        let (url, read_url) = (url.trim(), read_url.trim());
        let location = if url.is_empty() {
            Self::Sqlite(data_dir.join("location.db"))
        } else if let Some(p) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            Self::Sqlite(PathBuf::from(p))
        } else if is_postgres(url) {
            match PostgresUrl::from_str(url) {
                Ok(write) => Self::Postgres { write, read: None },
                Err(e) => {
                    problems.push("database.url", e);
                    Self::Sqlite(PathBuf::new())
                }
            }
        } else if url.contains("://") {
            problems.push(
                "database.url",
                format!(
                    "{:?}: use sqlite:PATH or postgres://user:password@host:port/database",
                    redact(url)
                ),
            );
            Self::Sqlite(PathBuf::new())
        } else {
            Self::Sqlite(PathBuf::from(url))
        };
        if read_url.is_empty() {
            return location;
        }
        let read = if is_postgres(read_url) {
            PostgresUrl::from_str(read_url)
                .map_err(|e| problems.push("database.read_url", e))
                .ok()
        } else {
            problems.push(
                "database.read_url",
                format!(
                    "{:?} is not a postgres:// URL (a read replica of the PostgreSQL server in database.url)",
                    redact(read_url)
                ),
            );
            None
        };
        match location {
            Self::Postgres { write, .. } => Self::Postgres { write, read },
            sqlite => {
                if !url.is_empty() && is_postgres(url) {
                    // `url` itself was refused above; that problem says enough.
                } else {
                    problems.push(
                        "database.read_url",
                        "is for PostgreSQL only: set database.url to a postgres:// URL, or remove read_url",
                    );
                }
                sqlite
            }
        }
    }

    /// The SQLite file, when that is the backend.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match self {
            Self::Sqlite(p) => Some(p),
            Self::Postgres { .. } => None,
        }
    }
}

// Shown to operators (`mailctl config check`, `mailctl status`): never with a password.
impl fmt::Display for DatabaseLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite(p) => write!(f, "sqlite:{}", p.display()),
            Self::Postgres { write, read: None } => write!(f, "{write}"),
            Self::Postgres {
                write,
                read: Some(read),
            } => write!(f, "{write} (lookups: {read})"),
        }
    }
}

impl fmt::Debug for DatabaseLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite(p) => f.debug_tuple("Sqlite").field(p).finish(),
            Self::Postgres { write, read } => f
                .debug_struct("Postgres")
                .field("write", write)
                .field("read", read)
                .finish(),
        }
    }
}

/// A validated `postgres://` (or `postgresql://`) URL with its parsed connection settings.
/// `Display` and `Debug` replace its password with `***`; only [`PostgresUrl::config`] holds
/// the password.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresUrl {
    redacted: String,
    // Boxed: it is large, and locations are moved around in settings.
    config: Box<tokio_postgres::Config>,
}

impl PostgresUrl {
    /// The connection settings, password included.
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }
}

impl FromStr for PostgresUrl {
    type Err = String;

    /// Parses and checks a URL; the error names what is wrong, without the password.
    fn from_str(url: &str) -> Result<Self, String> {
        let redacted = redact(url);
        if !is_postgres(url) {
            return Err(format!("{redacted:?} is not a postgres:// URL"));
        }
        let config = tokio_postgres::Config::from_str(url).map_err(|e| {
            format!(
                "{redacted:?} is not a PostgreSQL URL such as \
                 postgres://user:password@host:5432/database ({e})"
            )
        })?;
        if config.get_hosts().is_empty() {
            return Err(format!(
                "{redacted:?} names no host: write postgres://user:password@host:5432/database"
            ));
        }
        if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
            return Err(format!(
                "{redacted:?} requires TLS (sslmode=require), which the location database \
                 client does not speak: reach the server over loopback or a private network \
                 and drop sslmode"
            ));
        }
        Ok(Self {
            redacted,
            config: Box::new(config),
        })
    }
}

impl fmt::Display for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.redacted)
    }
}

impl fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PostgresUrl").field(&self.redacted).finish()
    }
}

fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// `url` with the password of its user info and any `password=` parameter replaced by `***`.
/// Everything up to the last `@` before the query counts as user info, so a password with a
/// stray `@` or `/` is hidden too.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (head, query) = match rest.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (rest, None),
    };
    let mut out = format!("{scheme}://");
    match head.rsplit_once('@') {
        Some((userinfo, host)) => {
            match userinfo.split_once(':') {
                Some((user, _)) => out.push_str(&format!("{user}:***@")),
                None => out.push_str(&format!("{userinfo}@")),
            }
            out.push_str(host);
        }
        None => out.push_str(head),
    }
    if let Some(query) = query {
        out.push('?');
        let params: Vec<String> = query
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => p.to_owned(),
            })
            .collect();
        out.push_str(&params.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(url: &str, read_url: &str) -> (DatabaseLocation, Vec<(String, String)>) {
        let mut p = Problems::new();
        let l = DatabaseLocation::build(url, read_url, Path::new("/data"), &mut p);
        (l, p.as_slice().to_vec())
    }

    #[test]
    fn sqlite_forms_are_still_understood() {
        for (url, path) in [
            ("", "/data/location.db"),
            ("sqlite:a/location.db", "a/location.db"),
            ("sqlite:///var/lib/loc.db", "/var/lib/loc.db"),
            ("/srv/loc.db", "/srv/loc.db"),
        ] {
            let (l, problems) = build(url, "");
            assert!(problems.is_empty(), "{url}: {problems:?}");
            assert_eq!(l, DatabaseLocation::Sqlite(PathBuf::from(path)), "{url}");
            assert_eq!(l.sqlite_path(), Some(Path::new(path)));
        }
    }

    #[test]
    fn a_postgres_url_selects_postgres_with_an_optional_replica() {
        let (l, problems) = build("postgres://mail:s3cret@db1:5433/mail", "");
        assert!(problems.is_empty(), "{problems:?}");
        let DatabaseLocation::Postgres { write, read } = &l else {
            panic!("{l:?}")
        };
        assert_eq!(write.config().get_dbname(), Some("mail"));
        assert_eq!(write.config().get_ports(), [5433]);
        assert_eq!(write.config().get_password(), Some(&b"s3cret"[..]));
        assert!(read.is_none());
        assert_eq!(l.sqlite_path(), None);

        let (l, problems) = build(
            "postgresql://mail:s3cret@db1/mail",
            "postgres://reader:other@db2/mail",
        );
        assert!(problems.is_empty(), "{problems:?}");
        let DatabaseLocation::Postgres {
            read: Some(read), ..
        } = &l
        else {
            panic!("{l:?}")
        };
        assert_eq!(read.config().get_user(), Some("reader"));
    }

    #[test]
    fn passwords_never_show() {
        let (l, _) = build(
            "postgres://mail:s3cret@db1:5432/mail?password=s3cret&application_name=x",
            "postgres://reader:an%40other@db2/mail",
        );
        let shown = format!("{l} {l:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("other"),
            "{shown}"
        );
        assert_eq!(
            l.to_string(),
            "postgres://mail:***@db1:5432/mail?password=***&application_name=x \
             (lookups: postgres://reader:***@db2/mail)"
        );
        // Nor in a problem about the URL.
        let (_, problems) = build("mysql://root:s3cret@db/mail", "");
        assert_eq!(problems[0].0, "database.url");
        assert!(!problems[0].1.contains("s3cret"), "{problems:?}");
        assert_eq!(
            redact("postgres://u:p@ss/w@rd@host/db"),
            "postgres://u:***@host/db"
        );
        assert_eq!(redact("postgres://host/db"), "postgres://host/db");
    }

    #[test]
    fn bad_combinations_are_reported_with_their_key() {
        let cases = [
            // A replica without a PostgreSQL primary.
            ("", "postgres://db2/mail", "database.read_url"),
            ("sqlite:a.db", "postgres://db2/mail", "database.read_url"),
            // A replica that is not PostgreSQL.
            ("postgres://db1/mail", "sqlite:b.db", "database.read_url"),
            (
                "postgres://db1/mail",
                "postgres://db2:notaport/mail",
                "database.read_url",
            ),
            // A primary that cannot be used.
            ("postgres://db1:notaport/mail", "", "database.url"),
            ("postgres:///mail", "", "database.url"),
            ("postgres://db1/mail?sslmode=require", "", "database.url"),
            ("mysql://db1/mail", "", "database.url"),
        ];
        for (url, read_url, key) in cases {
            let (_, problems) = build(url, read_url);
            let keys: Vec<&str> = problems.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(
                keys,
                [key],
                "url {url:?}, read_url {read_url:?}: {problems:?}"
            );
        }
        // A broken primary is reported once, not again through its replica.
        let (_, problems) = build("postgres://db1:x/mail", "postgres://db2/mail");
        assert_eq!(problems.len(), 1, "{problems:?}");
    }
}
