//! The SQLite backend of the location database (WAL mode, one file in the data directory).
//!
//! rusqlite is blocking, so every call runs on tokio's blocking pool with a connection taken
//! from a small pool. Writers use `BEGIN IMMEDIATE`, so two concurrent placements cannot both
//! read the same counts and pick the same filer.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{
    Alias, ChangeError, Credentials, Directory, DomainInfo, Filer, FilerState, FilerUsage,
    LookupError, Mailbox, MailboxState, NewMailbox, OpenError, ScramKeys, domain_of,
};

/// The schema, one migration per entry; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE domains (
    name     TEXT PRIMARY KEY,
    created  INTEGER NOT NULL
) STRICT;
CREATE TABLE filers (
    name    TEXT PRIMARY KEY,
    lmtp    TEXT NOT NULL,
    imap    TEXT NOT NULL,
    pop3    TEXT NOT NULL,
    state   TEXT NOT NULL DEFAULT 'up' CHECK (state IN ('up', 'draining', 'down')),
    weight  INTEGER NOT NULL DEFAULT 1 CHECK (weight >= 0)
) STRICT;
CREATE TABLE mailboxes (
    address          TEXT PRIMARY KEY,
    domain           TEXT NOT NULL REFERENCES domains(name),
    filer            TEXT NOT NULL REFERENCES filers(name),
    state            TEXT NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'moving', 'disabled')),
    quota            INTEGER NOT NULL DEFAULT 0 CHECK (quota >= 0),
    uidvalidity_seed INTEGER NOT NULL,
    created          INTEGER NOT NULL
) STRICT;
CREATE INDEX mailboxes_filer ON mailboxes(filer);
CREATE INDEX mailboxes_domain ON mailboxes(domain);
CREATE TABLE aliases (
    address TEXT NOT NULL,
    target  TEXT NOT NULL,
    domain  TEXT NOT NULL REFERENCES domains(name),
    PRIMARY KEY (address, target)
) STRICT;
CREATE INDEX aliases_domain ON aliases(domain);
CREATE TABLE credentials (
    address          TEXT PRIMARY KEY REFERENCES mailboxes(address) ON DELETE CASCADE,
    argon2           TEXT NOT NULL,
    scram_salt       BLOB NOT NULL,
    scram_iterations INTEGER NOT NULL,
    scram_stored_key BLOB NOT NULL,
    scram_server_key BLOB NOT NULL,
    updated          INTEGER NOT NULL
) STRICT;
"#];

/// How long a connection waits for another writer's lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections kept open for reuse.
const MAX_IDLE_CONNECTIONS: usize = 8;

/// The SQLite location database. Cheap to clone.
#[derive(Clone)]
pub struct Sqlite {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl Sqlite {
    /// Opens (creating if needed) and migrates the database at `path`. Blocking: call it at
    /// start-up or from `spawn_blocking`.
    pub fn open(path: &Path) -> Result<Self, OpenError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| OpenError::Dir {
                path: dir.to_owned(),
                source,
            })?;
        }
        let sq = |source| OpenError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let mut conn = connect(path).map_err(sq)?;
        // Each migration reads the version inside its own IMMEDIATE transaction, so two
        // processes opening a new database at once (`mailctl up` and `mailctl status`) run
        // each migration once: the second waits for the first and then sees it done.
        loop {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sq)?;
            let version: i64 = tx
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .map_err(sq)?;
            if version > MIGRATIONS.len() as i64 {
                return Err(OpenError::TooNew {
                    database: path.display().to_string(),
                    found: version,
                    known: MIGRATIONS.len(),
                });
            }
            let Some(sql) = MIGRATIONS.get(version.max(0) as usize) else {
                break;
            };
            tx.execute_batch(sql).map_err(sq)?;
            tx.pragma_update(None, "user_version", version.max(0) + 1)
                .map_err(sq)?;
            tx.commit().map_err(sq)?;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                idle: Mutex::new(vec![conn]),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` with a pooled connection on the blocking pool.
    async fn run<T, F>(&self, f: F) -> Result<T, rusqlite::Error>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    {
        let inner = self.inner.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let pooled = inner.idle.lock().map(|mut v| v.pop()).unwrap_or(None);
            let mut conn = match pooled {
                Some(c) => c,
                None => connect(&inner.path)?,
            };
            let out = f(&mut conn);
            if let Ok(mut idle) = inner.idle.lock()
                && idle.len() < MAX_IDLE_CONNECTIONS
            {
                idle.push(conn);
            }
            out
        })
        .await;
        joined.unwrap_or_else(|e| {
            Err(rusqlite::Error::InvalidParameterName(format!(
                "database task failed: {e}"
            )))
        })
    }

    async fn lookup<T, F>(&self, f: F) -> Result<T, LookupError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    {
        self.run(f)
            .await
            .map_err(|e| LookupError::Unavailable(e.to_string()))
    }

    async fn change<T, F>(&self, f: F) -> Result<T, ChangeError>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Transaction<'_>) -> Result<Result<T, ChangeError>, rusqlite::Error>
            + Send
            + 'static,
    {
        let r = self
            .run(move |c| {
                let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
                match f(&tx)? {
                    Ok(v) => {
                        tx.commit()?;
                        Ok(Ok(v))
                    }
                    // Dropping the transaction rolls it back: nothing half-written.
                    Err(e) => Ok(Err(e)),
                }
            })
            .await;
        match r {
            Ok(inner) => inner,
            Err(e) => Err(ChangeError::Database(e.to_string())),
        }
    }
}

fn connect(path: &Path) -> Result<Connection, rusqlite::Error> {
    let c = Connection::open(path)?;
    c.busy_timeout(BUSY_TIMEOUT)?;
    set_wal(&c)?;
    c.pragma_update(None, "synchronous", "FULL")?;
    c.pragma_update(None, "foreign_keys", "ON")?;
    Ok(c)
}

/// Switches to WAL. Switching a new file needs an exclusive lock, and while another connection
/// is switching the same file SQLite answers SQLITE_BUSY at once instead of calling the busy
/// handler; so a busy answer is retried here for up to [`BUSY_TIMEOUT`]. Without this,
/// processes opening a new database at once failed with "database is locked" now and then.
fn set_wal(c: &Connection) -> Result<(), rusqlite::Error> {
    const PAUSE: Duration = Duration::from_millis(10);
    let mut waited = Duration::ZERO;
    loop {
        match c.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy && waited < BUSY_TIMEOUT =>
            {
                std::thread::sleep(PAUSE);
                waited += PAUSE;
            }
            done => return done,
        }
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn mailbox_row(r: &rusqlite::Row<'_>) -> Result<Mailbox, rusqlite::Error> {
    let state: String = r.get(2)?;
    Ok(Mailbox {
        address: r.get(0)?,
        filer: r.get(1)?,
        state: state.parse().unwrap_or(MailboxState::Disabled),
        quota: r.get::<_, i64>(3)?.max(0) as u64,
        uidvalidity_seed: r.get::<_, i64>(4)?.clamp(1, i64::from(u32::MAX)) as u32,
    })
}

fn filer_row(r: &rusqlite::Row<'_>) -> Result<Filer, rusqlite::Error> {
    let state: String = r.get(4)?;
    Ok(Filer {
        name: r.get(0)?,
        lmtp: r.get(1)?,
        imap: r.get(2)?,
        pop3: r.get(3)?,
        state: state.parse().unwrap_or(FilerState::Down),
        weight: r.get::<_, i64>(5)?.clamp(0, i64::from(u32::MAX)) as u32,
    })
}

const MAILBOX_COLUMNS: &str = "address, filer, state, quota, uidvalidity_seed";
const FILER_COLUMNS: &str = "name, lmtp, imap, pop3, state, weight";

fn exists(tx: &rusqlite::Transaction<'_>, sql: &str, key: &str) -> Result<bool, rusqlite::Error> {
    tx.query_row(sql, [key], |_| Ok(()))
        .optional()
        .map(|o| o.is_some())
}

/// Picks the filer with the most free weight: the lowest (mailboxes + 1) / weight among filers
/// that are up with a non-zero weight; ties go to the name that sorts first. Over many
/// placements each filer gets mailboxes in proportion to its weight.
fn place(tx: &rusqlite::Transaction<'_>) -> Result<Option<String>, rusqlite::Error> {
    let mut stmt = tx.prepare(
        "SELECT f.name, f.weight, (SELECT COUNT(*) FROM mailboxes m WHERE m.filer = f.name)
         FROM filers f WHERE f.state = 'up' AND f.weight > 0 ORDER BY f.name",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    let mut best: Option<(String, i64, i64)> = None;
    for row in rows {
        let (name, weight, count) = row?;
        let better = match &best {
            None => true,
            // (count+1)/weight < (bcount+1)/bweight, without division.
            Some((_, bw, bc)) => {
                i128::from(count + 1) * i128::from(*bw) < i128::from(*bc + 1) * i128::from(weight)
            }
        };
        if better {
            best = Some((name, weight, count));
        }
    }
    Ok(best.map(|(n, _, _)| n))
}

#[async_trait::async_trait]
impl Directory for Sqlite {
    async fn is_hosted_domain(&self, domain: &str) -> Result<bool, LookupError> {
        let d = domain.to_owned();
        self.lookup(move |c| {
            c.query_row("SELECT 1 FROM domains WHERE name = ?1", [d], |_| Ok(()))
                .optional()
                .map(|o| o.is_some())
        })
        .await
    }

    async fn mailbox(&self, address: &str) -> Result<Option<Mailbox>, LookupError> {
        let a = address.to_owned();
        self.lookup(move |c| {
            c.prepare_cached(&format!(
                "SELECT {MAILBOX_COLUMNS} FROM mailboxes WHERE address = ?1"
            ))?
            .query_row([a], mailbox_row)
            .optional()
        })
        .await
    }

    async fn alias_targets(&self, address: &str) -> Result<Vec<String>, LookupError> {
        let a = address.to_owned();
        self.lookup(move |c| {
            c.prepare_cached("SELECT target FROM aliases WHERE address = ?1 ORDER BY target")?
                .query_map([a], |r| r.get(0))?
                .collect()
        })
        .await
    }

    async fn filer(&self, name: &str) -> Result<Option<Filer>, LookupError> {
        let n = name.to_owned();
        self.lookup(move |c| {
            c.prepare_cached(&format!(
                "SELECT {FILER_COLUMNS} FROM filers WHERE name = ?1"
            ))?
            .query_row([n], filer_row)
            .optional()
        })
        .await
    }

    async fn filers(&self) -> Result<Vec<FilerUsage>, LookupError> {
        self.lookup(|c| {
            c.prepare(&format!(
                "SELECT {FILER_COLUMNS}, (SELECT COUNT(*) FROM mailboxes m WHERE m.filer = filers.name)
                 FROM filers ORDER BY name"
            ))?
            .query_map([], |r| Ok(FilerUsage { filer: filer_row(r)?, mailboxes: r.get::<_, i64>(6)?.max(0) as u64 }))?
            .collect()
        })
        .await
    }

    async fn credentials(&self, address: &str) -> Result<Option<Credentials>, LookupError> {
        let a = address.to_owned();
        self.lookup(move |c| {
            c.prepare_cached(
                "SELECT argon2, scram_salt, scram_iterations, scram_stored_key, scram_server_key
                 FROM credentials WHERE address = ?1",
            )?
            .query_row([a], |r| {
                Ok(Credentials {
                    argon2: r.get(0)?,
                    scram: ScramKeys {
                        salt: r.get(1)?,
                        iterations: r.get::<_, i64>(2)?.clamp(1, i64::from(u32::MAX)) as u32,
                        stored_key: r.get(3)?,
                        server_key: r.get(4)?,
                    },
                })
            })
            .optional()
        })
        .await
    }

    async fn domains(&self) -> Result<Vec<DomainInfo>, LookupError> {
        self.lookup(|c| {
            c.prepare(
                "SELECT d.name,
                        (SELECT COUNT(*) FROM mailboxes m WHERE m.domain = d.name),
                        (SELECT COUNT(DISTINCT a.address) FROM aliases a WHERE a.domain = d.name)
                 FROM domains d ORDER BY d.name",
            )?
            .query_map([], |r| {
                Ok(DomainInfo {
                    name: r.get(0)?,
                    mailboxes: r.get::<_, i64>(1)?.max(0) as u64,
                    aliases: r.get::<_, i64>(2)?.max(0) as u64,
                })
            })?
            .collect()
        })
        .await
    }

    async fn mailboxes(&self, domain: Option<&str>) -> Result<Vec<Mailbox>, LookupError> {
        let d = domain.map(str::to_owned);
        self.lookup(move |c| {
            c.prepare(&format!(
                "SELECT {MAILBOX_COLUMNS} FROM mailboxes WHERE ?1 IS NULL OR domain = ?1 ORDER BY address"
            ))?
            .query_map([d], mailbox_row)?
            .collect()
        })
        .await
    }

    async fn aliases(&self, domain: Option<&str>) -> Result<Vec<Alias>, LookupError> {
        let d = domain.map(str::to_owned);
        self.lookup(move |c| {
            c.prepare("SELECT address, target FROM aliases WHERE ?1 IS NULL OR domain = ?1 ORDER BY address, target")?
                .query_map([d], |r| Ok(Alias { address: r.get(0)?, target: r.get(1)? }))?
                .collect()
        })
        .await
    }

    async fn add_domain(&self, domain: &str) -> Result<(), ChangeError> {
        let d = domain.to_owned();
        self.change(move |tx| {
            if exists(tx, "SELECT 1 FROM domains WHERE name = ?1", &d)? {
                return Ok(Err(ChangeError::Duplicate(format!("domain {d}"))));
            }
            tx.execute(
                "INSERT INTO domains (name, created) VALUES (?1, ?2)",
                params![d, now()],
            )?;
            Ok(Ok(()))
        })
        .await
    }

    async fn remove_domain(&self, domain: &str) -> Result<(), ChangeError> {
        let d = domain.to_owned();
        self.change(move |tx| {
            if !exists(tx, "SELECT 1 FROM domains WHERE name = ?1", &d)? {
                return Ok(Err(ChangeError::NotFound(format!("domain {d}"))));
            }
            let (m, a): (i64, i64) = tx.query_row(
                "SELECT (SELECT COUNT(*) FROM mailboxes WHERE domain = ?1),
                        (SELECT COUNT(*) FROM aliases WHERE domain = ?1)",
                [&d],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            if m > 0 || a > 0 {
                return Ok(Err(ChangeError::InUse(format!(
                    "domain {d} still has {m} mailbox(es) and {a} alias entr(ies); remove them first"
                ))));
            }
            tx.execute("DELETE FROM domains WHERE name = ?1", [&d])?;
            Ok(Ok(()))
        })
        .await
    }

    async fn add_mailbox(&self, new: NewMailbox) -> Result<Mailbox, ChangeError> {
        self.change(move |tx| {
            let Some(domain) = domain_of(&new.address).map(str::to_owned) else {
                return Ok(Err(ChangeError::Invalid(format!("{} has no domain", new.address))));
            };
            if !exists(tx, "SELECT 1 FROM domains WHERE name = ?1", &domain)? {
                return Ok(Err(ChangeError::DomainNotHosted(domain)));
            }
            if exists(tx, "SELECT 1 FROM mailboxes WHERE address = ?1", &new.address)? {
                return Ok(Err(ChangeError::Duplicate(format!("mailbox {}", new.address))));
            }
            if exists(tx, "SELECT 1 FROM aliases WHERE address = ?1", &new.address)? {
                return Ok(Err(ChangeError::Duplicate(format!("alias {}", new.address))));
            }
            let filer = match new.filer {
                Some(f) => {
                    if !exists(tx, "SELECT 1 FROM filers WHERE name = ?1", &f)? {
                        return Ok(Err(ChangeError::UnknownFiler(f)));
                    }
                    f
                }
                None => match place(tx)? {
                    Some(f) => f,
                    None => return Ok(Err(ChangeError::NoFilerAvailable)),
                },
            };
            let quota = i64::try_from(new.quota).unwrap_or(i64::MAX);
            // UIDVALIDITY seed: the creation time, so a re-created mailbox gets a larger one.
            let seed = now().clamp(1, i64::from(u32::MAX));
            tx.execute(
                "INSERT INTO mailboxes (address, domain, filer, state, quota, uidvalidity_seed, created)
                 VALUES (?1, ?2, ?3, 'active', ?4, ?5, ?6)",
                params![new.address, domain, filer, quota, seed, now()],
            )?;
            insert_credentials(tx, &new.address, &new.credentials)?;
            Ok(Ok(Mailbox {
                address: new.address,
                filer,
                state: MailboxState::Active,
                quota: new.quota,
                uidvalidity_seed: seed as u32,
            }))
        })
        .await
    }

    async fn set_credentials(&self, address: &str, c: Credentials) -> Result<(), ChangeError> {
        let a = address.to_owned();
        self.change(move |tx| {
            if !exists(tx, "SELECT 1 FROM mailboxes WHERE address = ?1", &a)? {
                return Ok(Err(ChangeError::NotFound(format!("mailbox {a}"))));
            }
            tx.execute("DELETE FROM credentials WHERE address = ?1", [&a])?;
            insert_credentials(tx, &a, &c)?;
            Ok(Ok(()))
        })
        .await
    }

    async fn set_mailbox_state(&self, address: &str, s: MailboxState) -> Result<(), ChangeError> {
        let a = address.to_owned();
        self.change(move |tx| {
            let n = tx.execute(
                "UPDATE mailboxes SET state = ?2 WHERE address = ?1",
                params![a, s.as_str()],
            )?;
            Ok(if n == 0 {
                Err(ChangeError::NotFound(format!("mailbox {a}")))
            } else {
                Ok(())
            })
        })
        .await
    }

    async fn move_mailbox(&self, address: &str, from: &str, to: &str) -> Result<(), ChangeError> {
        let (a, from, to) = (address.to_owned(), from.to_owned(), to.to_owned());
        self.change(move |tx| {
            let current: Option<(String, String)> = tx
                .query_row(
                    "SELECT filer, state FROM mailboxes WHERE address = ?1",
                    [&a],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some((filer, state)) = current else {
                return Ok(Err(ChangeError::NotFound(format!("mailbox {a}"))));
            };
            if filer != from || state != MailboxState::Moving.as_str() {
                return Ok(Err(ChangeError::Conflict(format!(
                    "mailbox {a} is {state} on {filer}, not moving on {from}"
                ))));
            }
            let known = tx
                .query_row("SELECT 1 FROM filers WHERE name = ?1", [&to], |_| Ok(()))
                .optional()?
                .is_some();
            if !known {
                return Ok(Err(ChangeError::UnknownFiler(to)));
            }
            tx.execute(
                "UPDATE mailboxes SET filer = ?2, state = ?3 WHERE address = ?1",
                params![a, to, MailboxState::Active.as_str()],
            )?;
            Ok(Ok(()))
        })
        .await
    }

    async fn set_quota(&self, address: &str, quota: u64) -> Result<(), ChangeError> {
        let a = address.to_owned();
        let q = i64::try_from(quota).unwrap_or(i64::MAX);
        self.change(move |tx| {
            let n = tx.execute(
                "UPDATE mailboxes SET quota = ?2 WHERE address = ?1",
                params![a, q],
            )?;
            Ok(if n == 0 {
                Err(ChangeError::NotFound(format!("mailbox {a}")))
            } else {
                Ok(())
            })
        })
        .await
    }

    async fn remove_mailbox(&self, address: &str) -> Result<(), ChangeError> {
        let a = address.to_owned();
        self.change(move |tx| {
            tx.execute("DELETE FROM credentials WHERE address = ?1", [&a])?;
            let n = tx.execute("DELETE FROM mailboxes WHERE address = ?1", [&a])?;
            Ok(if n == 0 {
                Err(ChangeError::NotFound(format!("mailbox {a}")))
            } else {
                Ok(())
            })
        })
        .await
    }

    async fn add_alias(&self, address: &str, target: &str) -> Result<(), ChangeError> {
        let (a, t) = (address.to_owned(), target.to_owned());
        self.change(move |tx| {
            let Some(domain) = domain_of(&a).map(str::to_owned) else {
                return Ok(Err(ChangeError::Invalid(format!("{a} has no domain"))));
            };
            if a == t {
                return Ok(Err(ChangeError::Invalid(format!(
                    "alias {a} cannot point to itself"
                ))));
            }
            if !exists(tx, "SELECT 1 FROM domains WHERE name = ?1", &domain)? {
                return Ok(Err(ChangeError::DomainNotHosted(domain)));
            }
            if exists(tx, "SELECT 1 FROM mailboxes WHERE address = ?1", &a)? {
                return Ok(Err(ChangeError::Duplicate(format!("mailbox {a}"))));
            }
            let dup = tx
                .query_row(
                    "SELECT 1 FROM aliases WHERE address = ?1 AND target = ?2",
                    [&a, &t],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            if dup {
                return Ok(Err(ChangeError::Duplicate(format!("alias {a} -> {t}"))));
            }
            tx.execute(
                "INSERT INTO aliases (address, target, domain) VALUES (?1, ?2, ?3)",
                params![a, t, domain],
            )?;
            Ok(Ok(()))
        })
        .await
    }

    async fn remove_alias(&self, address: &str, target: Option<&str>) -> Result<u64, ChangeError> {
        let (a, t) = (address.to_owned(), target.map(str::to_owned));
        self.change(move |tx| {
            let n = tx.execute(
                "DELETE FROM aliases WHERE address = ?1 AND (?2 IS NULL OR target = ?2)",
                params![a, t],
            )?;
            Ok(if n == 0 {
                Err(ChangeError::NotFound(format!("alias {a}")))
            } else {
                Ok(n as u64)
            })
        })
        .await
    }

    async fn add_filer(&self, filer: &Filer) -> Result<(), ChangeError> {
        let f = filer.clone();
        self.change(move |tx| {
            if exists(tx, "SELECT 1 FROM filers WHERE name = ?1", &f.name)? {
                return Ok(Err(ChangeError::Duplicate(format!("filer {}", f.name))));
            }
            insert_filer(tx, &f)?;
            Ok(Ok(()))
        })
        .await
    }

    async fn register_filer(&self, filer: &Filer) -> Result<(), ChangeError> {
        let f = filer.clone();
        self.change(move |tx| {
            let n = tx.execute(
                "UPDATE filers SET lmtp = ?2, imap = ?3, pop3 = ?4, weight = ?5 WHERE name = ?1",
                params![f.name, f.lmtp, f.imap, f.pop3, i64::from(f.weight)],
            )?;
            if n == 0 {
                insert_filer(tx, &f)?;
            }
            Ok(Ok(()))
        })
        .await
    }

    async fn set_filer_state(&self, name: &str, state: FilerState) -> Result<(), ChangeError> {
        let n = name.to_owned();
        self.change(move |tx| {
            let rows = tx.execute(
                "UPDATE filers SET state = ?2 WHERE name = ?1",
                params![n, state.as_str()],
            )?;
            Ok(if rows == 0 {
                Err(ChangeError::UnknownFiler(n))
            } else {
                Ok(())
            })
        })
        .await
    }
}

fn insert_filer(tx: &rusqlite::Transaction<'_>, f: &Filer) -> Result<(), rusqlite::Error> {
    tx.execute(
        "INSERT INTO filers (name, lmtp, imap, pop3, state, weight) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![f.name, f.lmtp, f.imap, f.pop3, f.state.as_str(), i64::from(f.weight)],
    )?;
    Ok(())
}

fn insert_credentials(
    tx: &rusqlite::Transaction<'_>,
    address: &str,
    c: &Credentials,
) -> Result<(), rusqlite::Error> {
    tx.execute(
        "INSERT INTO credentials (address, argon2, scram_salt, scram_iterations, scram_stored_key,
                                  scram_server_key, updated)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            address,
            c.argon2,
            c.scram.salt,
            i64::from(c.scram.iterations),
            c.scram.stored_key,
            c.scram.server_key,
            now()
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests;
