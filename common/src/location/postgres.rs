//! The PostgreSQL backend of the location database, for platforms over several hosts.
//!
//! Changes, and the fresh lookup a delivery makes just before it commits
//! ([`Directory::mailbox_fresh`]), go to the primary (`database.url`); the other lookups go to
//! a read replica (`database.read_url`) when one is configured, else to the primary too. Each
//! side has a small pool of `tokio-postgres` connections. The client speaks no TLS: reach the
//! server over loopback or a private network only, as with the filers' LMTP.
//!
//! Every change is one transaction that first takes a transaction-level advisory lock, so
//! changes run one at a time as SQLite's `BEGIN IMMEDIATE` makes them: the check-then-write
//! steps (placement by mailbox counts, the compare-and-set of `move_mailbox`) cannot
//! interleave. Changes are rare (operators and migrations), so a single writer costs nothing.
//! The schema is migrated at open, in one transaction under another advisory lock, so
//! processes starting at once migrate it once; `schema_version` records what ran.
//!
//! Nothing waits unbounded: making a connection, waiting for a pooled one and each lookup or
//! change have time limits, so an unreachable server gives [`LookupError::Unavailable`]
//! (callers answer 4xx) or [`ChangeError::Database`] instead of a hang.

use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;
use tokio_postgres::Row;

use super::{
    Alias, ChangeError, Credentials, Directory, DomainInfo, Filer, FilerState, FilerUsage,
    LookupError, Mailbox, MailboxState, NewMailbox, OpenError, ScramKeys, domain_of,
};
use crate::config::PostgresUrl;

/// The schema, one migration per entry; `schema_version` has a row for each that ran.
/// Text keys use the "C" collation so that ordering and comparison are bytewise, as in SQLite.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE domains (
    name     TEXT COLLATE "C" PRIMARY KEY,
    created  BIGINT NOT NULL
);
CREATE TABLE filers (
    name    TEXT COLLATE "C" PRIMARY KEY,
    lmtp    TEXT NOT NULL,
    imap    TEXT NOT NULL,
    pop3    TEXT NOT NULL,
    state   TEXT NOT NULL DEFAULT 'up' CHECK (state IN ('up', 'draining', 'down')),
    weight  BIGINT NOT NULL DEFAULT 1 CHECK (weight >= 0)
);
CREATE TABLE mailboxes (
    address          TEXT COLLATE "C" PRIMARY KEY,
    domain           TEXT COLLATE "C" NOT NULL REFERENCES domains(name),
    filer            TEXT COLLATE "C" NOT NULL REFERENCES filers(name),
    state            TEXT NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'moving', 'disabled')),
    quota            BIGINT NOT NULL DEFAULT 0 CHECK (quota >= 0),
    uidvalidity_seed BIGINT NOT NULL,
    created          BIGINT NOT NULL
);
CREATE INDEX mailboxes_filer ON mailboxes(filer);
CREATE INDEX mailboxes_domain ON mailboxes(domain);
CREATE TABLE aliases (
    address TEXT COLLATE "C" NOT NULL,
    target  TEXT COLLATE "C" NOT NULL,
    domain  TEXT COLLATE "C" NOT NULL REFERENCES domains(name),
    PRIMARY KEY (address, target)
);
CREATE INDEX aliases_domain ON aliases(domain);
CREATE TABLE credentials (
    address          TEXT COLLATE "C" PRIMARY KEY REFERENCES mailboxes(address) ON DELETE CASCADE,
    argon2           TEXT NOT NULL,
    scram_salt       BYTEA NOT NULL,
    scram_iterations BIGINT NOT NULL,
    scram_stored_key BYTEA NOT NULL,
    scram_server_key BYTEA NOT NULL,
    updated          BIGINT NOT NULL
);
"#];

/// How long making one connection may take, TCP connect and PostgreSQL start-up together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one lookup or change may take once it has a connection.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the migration at open waits for another process's migration to finish.
const MIGRATION_LOCK_TIMEOUT: &str = "60s";
/// Connections per pool (one pool for the primary, one for the replica).
const POOL_SIZE: usize = 8;
/// Advisory lock keys ("mailplat" in ASCII, then 1 and 2); advisory locks are per database.
const MIGRATION_LOCK: i64 = 0x6d61_696c_706c_0001;
const WRITE_LOCK: i64 = 0x6d61_696c_706c_0002;

/// Time limits; tests shorten them.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    connect: Duration,
    operation: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: CONNECT_TIMEOUT,
            operation: OPERATION_TIMEOUT,
        }
    }
}

/// The PostgreSQL location database. Cheap to clone: clones share the pools.
#[derive(Clone)]
pub struct Postgres {
    inner: Arc<Inner>,
}

struct Inner {
    /// The primary.
    write: Endpoint,
    /// The replica, or the primary again.
    read: Endpoint,
}

/// One server with its pool.
#[derive(Clone)]
struct Endpoint {
    pool: Pool,
    url: PostgresUrl,
    timeouts: Timeouts,
}

impl Postgres {
    /// Connects to the primary `write` and migrates its schema; lookups go to `read` (a
    /// replica) when given. The replica is not contacted here: while it is down, lookups fail
    /// with [`LookupError::Unavailable`]. An unreachable primary gives
    /// [`OpenError::Unavailable`] within a few seconds.
    pub async fn open(write: &PostgresUrl, read: Option<&PostgresUrl>) -> Result<Self, OpenError> {
        Self::open_with(write, read, Timeouts::default()).await
    }

    async fn open_with(
        write: &PostgresUrl,
        read: Option<&PostgresUrl>,
        timeouts: Timeouts,
    ) -> Result<Self, OpenError> {
        let write = Endpoint::new(write, timeouts)?;
        let read = match read {
            Some(url) => Endpoint::new(url, timeouts)?,
            None => write.clone(),
        };
        let mut client = write
            .client()
            .await
            .map_err(|reason| OpenError::Unavailable {
                url: write.url.to_string(),
                reason,
            })?;
        migrate(&mut client, &write.url).await?;
        Ok(Self {
            inner: Arc::new(Inner { write, read }),
        })
    }

    /// Runs a lookup on the replica (or the primary when there is none).
    async fn lookup<T>(
        &self,
        f: impl AsyncFnOnce(&Object) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, LookupError> {
        self.inner.read.lookup(f).await
    }

    /// Runs `f` in a transaction on the primary, after every earlier change. `f` returns
    /// `Ok(Err(_))` to refuse the change: the transaction is rolled back and nothing is written.
    async fn change<T>(
        &self,
        f: impl AsyncFnOnce(
            &deadpool_postgres::Transaction<'_>,
        ) -> Result<Result<T, ChangeError>, tokio_postgres::Error>,
    ) -> Result<T, ChangeError> {
        let ep = &self.inner.write;
        let mut client = ep
            .client()
            .await
            .map_err(|why| ChangeError::Database(format!("{}: {why}", ep.url)))?;
        let run = async {
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])
                .await?;
            match f(&tx).await? {
                Ok(v) => {
                    tx.commit().await?;
                    Ok(Ok(v))
                }
                Err(refused) => {
                    tx.rollback().await?;
                    Ok(Err(refused))
                }
            }
        };
        let outcome = tokio::time::timeout(ep.timeouts.operation, run).await;
        match outcome {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => Err(ChangeError::Database(ep.describe(&e))),
            Err(_) => {
                // The connection is mid-transaction: close it rather than pool it.
                drop(Object::take(client));
                Err(ChangeError::Database(format!(
                    "{}: no answer within {:?}; the change may or may not have been made, \
                     so look before trying again",
                    ep.url, ep.timeouts.operation
                )))
            }
        }
    }
}

impl Endpoint {
    fn new(url: &PostgresUrl, timeouts: Timeouts) -> Result<Self, OpenError> {
        let mut config = url.config().clone();
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(timeouts.connect);
        }
        if config.get_application_name().is_none() {
            config.application_name("mailplatform");
        }
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        // Every wait of the pool is bounded, so no caller hangs on a dead server.
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(timeouts.connect))
            .wait_timeout(Some(timeouts.operation))
            .recycle_timeout(Some(timeouts.connect))
            .build()
            .map_err(|e| OpenError::Unavailable {
                url: url.to_string(),
                reason: format!("cannot make a connection pool: {e}"),
            })?;
        Ok(Self {
            pool,
            url: url.clone(),
            timeouts,
        })
    }

    /// A pooled connection, or why there is none.
    async fn client(&self) -> Result<Object, String> {
        self.pool.get().await.map_err(|e| match &e {
            deadpool_postgres::PoolError::Timeout(deadpool_postgres::TimeoutType::Create) => {
                format!("no connection within {:?}", self.timeouts.connect)
            }
            deadpool_postgres::PoolError::Timeout(_) => {
                format!("all {POOL_SIZE} connections stayed busy")
            }
            deadpool_postgres::PoolError::Backend(e) => chain(e),
            other => chain(other),
        })
    }

    async fn lookup<T>(
        &self,
        f: impl AsyncFnOnce(&Object) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, LookupError> {
        let client = self
            .client()
            .await
            .map_err(|why| LookupError::Unavailable(format!("{}: {why}", self.url)))?;
        let outcome = tokio::time::timeout(self.timeouts.operation, f(&client)).await;
        match outcome {
            Ok(r) => r.map_err(|e| LookupError::Unavailable(self.describe(&e))),
            Err(_) => {
                // A statement may still be running on it: close it rather than pool it.
                drop(Object::take(client));
                Err(LookupError::Unavailable(format!(
                    "{}: no answer within {:?}",
                    self.url, self.timeouts.operation
                )))
            }
        }
    }

    fn describe(&self, e: &tokio_postgres::Error) -> String {
        format!("{}: {}", self.url, chain(e))
    }
}

/// An error with its causes, `a: b: c` (tokio-postgres keeps the server's message in a cause).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// Brings the schema up to date in one transaction. The advisory lock makes a second process
/// wait for the first and then find nothing left to do.
async fn migrate(client: &mut Object, url: &PostgresUrl) -> Result<(), OpenError> {
    let pg = |source| OpenError::Postgres {
        url: url.to_string(),
        source,
    };
    let tx = client.transaction().await.map_err(pg)?;
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '{MIGRATION_LOCK_TIMEOUT}'"
    ))
    .await
    .map_err(pg)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_version (
             version BIGINT PRIMARY KEY,
             applied BIGINT NOT NULL
         )",
    )
    .await
    .map_err(pg)?;
    let version: i64 = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])
        .await
        .and_then(|r| r.try_get(0))
        .map_err(pg)?;
    if version > MIGRATIONS.len() as i64 {
        return Err(OpenError::TooNew {
            database: url.to_string(),
            found: version,
            known: MIGRATIONS.len(),
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        tx.batch_execute(sql).await.map_err(pg)?;
        tx.execute(
            "INSERT INTO schema_version (version, applied) VALUES ($1, $2)",
            &[&(i as i64 + 1), &now()],
        )
        .await
        .map_err(pg)?;
    }
    tx.commit().await.map_err(pg)
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn mailbox_row(r: &Row) -> Result<Mailbox, tokio_postgres::Error> {
    let state: String = r.try_get(2)?;
    Ok(Mailbox {
        address: r.try_get(0)?,
        filer: r.try_get(1)?,
        state: MailboxState::from_str(&state).unwrap_or(MailboxState::Disabled),
        quota: r.try_get::<_, i64>(3)?.max(0) as u64,
        uidvalidity_seed: r.try_get::<_, i64>(4)?.clamp(1, i64::from(u32::MAX)) as u32,
    })
}

fn filer_row(r: &Row) -> Result<Filer, tokio_postgres::Error> {
    let state: String = r.try_get(4)?;
    Ok(Filer {
        name: r.try_get(0)?,
        lmtp: r.try_get(1)?,
        imap: r.try_get(2)?,
        pop3: r.try_get(3)?,
        state: FilerState::from_str(&state).unwrap_or(FilerState::Down),
        weight: r.try_get::<_, i64>(5)?.clamp(0, i64::from(u32::MAX)) as u32,
    })
}

const MAILBOX_COLUMNS: &str = "address, filer, state, quota, uidvalidity_seed";
const FILER_COLUMNS: &str = "name, lmtp, imap, pop3, state, weight";

type Tx<'a> = deadpool_postgres::Transaction<'a>;

async fn exists(tx: &Tx<'_>, sql: &str, key: &str) -> Result<bool, tokio_postgres::Error> {
    Ok(tx.query_opt(sql, &[&key]).await?.is_some())
}

/// Picks the filer with the most free weight, exactly as the SQLite backend does: the lowest
/// (mailboxes + 1) / weight among filers that are up with a non-zero weight; ties go to the
/// name that sorts first.
async fn place(tx: &Tx<'_>) -> Result<Option<String>, tokio_postgres::Error> {
    let rows = tx
        .query(
            "SELECT f.name, f.weight, (SELECT COUNT(*) FROM mailboxes m WHERE m.filer = f.name)
             FROM filers f WHERE f.state = 'up' AND f.weight > 0 ORDER BY f.name",
            &[],
        )
        .await?;
    let mut best: Option<(String, i64, i64)> = None;
    for row in rows {
        let (name, weight, count): (String, i64, i64) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
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

async fn insert_filer(tx: &Tx<'_>, f: &Filer) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "INSERT INTO filers (name, lmtp, imap, pop3, state, weight) VALUES ($1, $2, $3, $4, $5, $6)",
        &[&f.name, &f.lmtp, &f.imap, &f.pop3, &f.state.as_str(), &i64::from(f.weight)],
    )
    .await?;
    Ok(())
}

async fn insert_credentials(
    tx: &Tx<'_>,
    address: &str,
    c: &Credentials,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "INSERT INTO credentials (address, argon2, scram_salt, scram_iterations, scram_stored_key,
                                  scram_server_key, updated)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            &address,
            &c.argon2,
            &c.scram.salt,
            &i64::from(c.scram.iterations),
            &c.scram.stored_key,
            &c.scram.server_key,
            &now(),
        ],
    )
    .await?;
    Ok(())
}

async fn mailbox_on(ep: &Endpoint, address: &str) -> Result<Option<Mailbox>, LookupError> {
    ep.lookup(async |c| {
        let stmt = c
            .prepare_cached(&format!(
                "SELECT {MAILBOX_COLUMNS} FROM mailboxes WHERE address = $1"
            ))
            .await?;
        c.query_opt(&stmt, &[&address])
            .await?
            .map(|r| mailbox_row(&r))
            .transpose()
    })
    .await
}

#[async_trait::async_trait]
impl Directory for Postgres {
    async fn is_hosted_domain(&self, domain: &str) -> Result<bool, LookupError> {
        self.lookup(async |c| {
            let stmt = c
                .prepare_cached("SELECT 1 FROM domains WHERE name = $1")
                .await?;
            Ok(c.query_opt(&stmt, &[&domain]).await?.is_some())
        })
        .await
    }

    async fn mailbox(&self, address: &str) -> Result<Option<Mailbox>, LookupError> {
        mailbox_on(&self.inner.read, address).await
    }

    async fn mailbox_fresh(&self, address: &str) -> Result<Option<Mailbox>, LookupError> {
        // The primary: a replica may not have seen a migration's `moving` yet.
        mailbox_on(&self.inner.write, address).await
    }

    async fn alias_targets(&self, address: &str) -> Result<Vec<String>, LookupError> {
        self.lookup(async |c| {
            let stmt = c
                .prepare_cached("SELECT target FROM aliases WHERE address = $1 ORDER BY target")
                .await?;
            c.query(&stmt, &[&address])
                .await?
                .iter()
                .map(|r| r.try_get(0))
                .collect()
        })
        .await
    }

    async fn filer(&self, name: &str) -> Result<Option<Filer>, LookupError> {
        self.lookup(async |c| {
            let stmt = c
                .prepare_cached(&format!(
                    "SELECT {FILER_COLUMNS} FROM filers WHERE name = $1"
                ))
                .await?;
            c.query_opt(&stmt, &[&name])
                .await?
                .map(|r| filer_row(&r))
                .transpose()
        })
        .await
    }

    async fn filers(&self) -> Result<Vec<FilerUsage>, LookupError> {
        self.lookup(async |c| {
            c.query(
                &format!(
                    "SELECT {FILER_COLUMNS},
                            (SELECT COUNT(*) FROM mailboxes m WHERE m.filer = filers.name)
                     FROM filers ORDER BY name"
                ),
                &[],
            )
            .await?
            .iter()
            .map(|r| {
                Ok(FilerUsage {
                    filer: filer_row(r)?,
                    mailboxes: r.try_get::<_, i64>(6)?.max(0) as u64,
                })
            })
            .collect()
        })
        .await
    }

    async fn credentials(&self, address: &str) -> Result<Option<Credentials>, LookupError> {
        self.lookup(async |c| {
            let stmt = c
                .prepare_cached(
                    "SELECT argon2, scram_salt, scram_iterations, scram_stored_key, scram_server_key
                     FROM credentials WHERE address = $1",
                )
                .await?;
            let Some(r) = c.query_opt(&stmt, &[&address]).await? else {
                return Ok(None);
            };
            Ok(Some(Credentials {
                argon2: r.try_get(0)?,
                scram: ScramKeys {
                    salt: r.try_get(1)?,
                    iterations: r.try_get::<_, i64>(2)?.clamp(1, i64::from(u32::MAX)) as u32,
                    stored_key: r.try_get(3)?,
                    server_key: r.try_get(4)?,
                },
            }))
        })
        .await
    }

    async fn domains(&self) -> Result<Vec<DomainInfo>, LookupError> {
        self.lookup(async |c| {
            c.query(
                "SELECT d.name,
                        (SELECT COUNT(*) FROM mailboxes m WHERE m.domain = d.name),
                        (SELECT COUNT(DISTINCT a.address) FROM aliases a WHERE a.domain = d.name)
                 FROM domains d ORDER BY d.name",
                &[],
            )
            .await?
            .iter()
            .map(|r| {
                Ok(DomainInfo {
                    name: r.try_get(0)?,
                    mailboxes: r.try_get::<_, i64>(1)?.max(0) as u64,
                    aliases: r.try_get::<_, i64>(2)?.max(0) as u64,
                })
            })
            .collect()
        })
        .await
    }

    async fn mailboxes(&self, domain: Option<&str>) -> Result<Vec<Mailbox>, LookupError> {
        self.lookup(async |c| {
            c.query(
                &format!(
                    "SELECT {MAILBOX_COLUMNS} FROM mailboxes
                     WHERE $1::text IS NULL OR domain = $1 ORDER BY address"
                ),
                &[&domain],
            )
            .await?
            .iter()
            .map(mailbox_row)
            .collect()
        })
        .await
    }

    async fn aliases(&self, domain: Option<&str>) -> Result<Vec<Alias>, LookupError> {
        self.lookup(async |c| {
            c.query(
                "SELECT address, target FROM aliases
                 WHERE $1::text IS NULL OR domain = $1 ORDER BY address, target",
                &[&domain],
            )
            .await?
            .iter()
            .map(|r| {
                Ok(Alias {
                    address: r.try_get(0)?,
                    target: r.try_get(1)?,
                })
            })
            .collect()
        })
        .await
    }

    async fn add_domain(&self, domain: &str) -> Result<(), ChangeError> {
        self.change(async |tx| {
            if exists(tx, "SELECT 1 FROM domains WHERE name = $1", domain).await? {
                return Ok(Err(ChangeError::Duplicate(format!("domain {domain}"))));
            }
            tx.execute(
                "INSERT INTO domains (name, created) VALUES ($1, $2)",
                &[&domain, &now()],
            )
            .await?;
            Ok(Ok(()))
        })
        .await
    }

    async fn remove_domain(&self, domain: &str) -> Result<(), ChangeError> {
        self.change(async |tx| {
            if !exists(tx, "SELECT 1 FROM domains WHERE name = $1", domain).await? {
                return Ok(Err(ChangeError::NotFound(format!("domain {domain}"))));
            }
            let r = tx
                .query_one(
                    "SELECT (SELECT COUNT(*) FROM mailboxes WHERE domain = $1),
                            (SELECT COUNT(*) FROM aliases WHERE domain = $1)",
                    &[&domain],
                )
                .await?;
            let (m, a): (i64, i64) = (r.try_get(0)?, r.try_get(1)?);
            if m > 0 || a > 0 {
                return Ok(Err(ChangeError::InUse(format!(
                    "domain {domain} still has {m} mailbox(es) and {a} alias entr(ies); remove them first"
                ))));
            }
            tx.execute("DELETE FROM domains WHERE name = $1", &[&domain])
                .await?;
            Ok(Ok(()))
        })
        .await
    }

    async fn add_mailbox(&self, new: NewMailbox) -> Result<Mailbox, ChangeError> {
        self.change(async |tx| {
            let Some(domain) = domain_of(&new.address) else {
                return Ok(Err(ChangeError::Invalid(format!(
                    "{} has no domain",
                    new.address
                ))));
            };
            if !exists(tx, "SELECT 1 FROM domains WHERE name = $1", domain).await? {
                return Ok(Err(ChangeError::DomainNotHosted(domain.to_owned())));
            }
            if exists(tx, "SELECT 1 FROM mailboxes WHERE address = $1", &new.address).await? {
                return Ok(Err(ChangeError::Duplicate(format!(
                    "mailbox {}",
                    new.address
                ))));
            }
            if exists(tx, "SELECT 1 FROM aliases WHERE address = $1", &new.address).await? {
                return Ok(Err(ChangeError::Duplicate(format!("alias {}", new.address))));
            }
            let filer = match &new.filer {
                Some(f) => {
                    if !exists(tx, "SELECT 1 FROM filers WHERE name = $1", f).await? {
                        return Ok(Err(ChangeError::UnknownFiler(f.clone())));
                    }
                    f.clone()
                }
                None => match place(tx).await? {
                    Some(f) => f,
                    None => return Ok(Err(ChangeError::NoFilerAvailable)),
                },
            };
            let quota = i64::try_from(new.quota).unwrap_or(i64::MAX);
            // UIDVALIDITY seed: the creation time, so a re-created mailbox gets a larger one.
            let seed = now().clamp(1, i64::from(u32::MAX));
            tx.execute(
                "INSERT INTO mailboxes (address, domain, filer, state, quota, uidvalidity_seed, created)
                 VALUES ($1, $2, $3, 'active', $4, $5, $6)",
                &[&new.address, &domain, &filer, &quota, &seed, &now()],
            )
            .await?;
            insert_credentials(tx, &new.address, &new.credentials).await?;
            Ok(Ok(Mailbox {
                address: new.address.clone(),
                filer,
                state: MailboxState::Active,
                quota: new.quota,
                uidvalidity_seed: seed as u32,
            }))
        })
        .await
    }

    async fn set_credentials(&self, address: &str, c: Credentials) -> Result<(), ChangeError> {
        self.change(async |tx| {
            if !exists(tx, "SELECT 1 FROM mailboxes WHERE address = $1", address).await? {
                return Ok(Err(ChangeError::NotFound(format!("mailbox {address}"))));
            }
            tx.execute("DELETE FROM credentials WHERE address = $1", &[&address])
                .await?;
            insert_credentials(tx, address, &c).await?;
            Ok(Ok(()))
        })
        .await
    }

    async fn set_mailbox_state(&self, address: &str, s: MailboxState) -> Result<(), ChangeError> {
        self.change(async |tx| {
            let n = tx
                .execute(
                    "UPDATE mailboxes SET state = $2 WHERE address = $1",
                    &[&address, &s.as_str()],
                )
                .await?;
            Ok(if n == 0 {
                Err(ChangeError::NotFound(format!("mailbox {address}")))
            } else {
                Ok(())
            })
        })
        .await
    }

    async fn move_mailbox(&self, address: &str, from: &str, to: &str) -> Result<(), ChangeError> {
        self.change(async |tx| {
            let current = tx
                .query_opt(
                    "SELECT filer, state FROM mailboxes WHERE address = $1",
                    &[&address],
                )
                .await?;
            let Some(current) = current else {
                return Ok(Err(ChangeError::NotFound(format!("mailbox {address}"))));
            };
            let (filer, state): (String, String) = (current.try_get(0)?, current.try_get(1)?);
            if filer != from || state != MailboxState::Moving.as_str() {
                return Ok(Err(ChangeError::Conflict(format!(
                    "mailbox {address} is {state} on {filer}, not moving on {from}"
                ))));
            }
            if !exists(tx, "SELECT 1 FROM filers WHERE name = $1", to).await? {
                return Ok(Err(ChangeError::UnknownFiler(to.to_owned())));
            }
            tx.execute(
                "UPDATE mailboxes SET filer = $2, state = $3 WHERE address = $1",
                &[&address, &to, &MailboxState::Active.as_str()],
            )
            .await?;
            Ok(Ok(()))
        })
        .await
    }

    async fn set_quota(&self, address: &str, quota: u64) -> Result<(), ChangeError> {
        let q = i64::try_from(quota).unwrap_or(i64::MAX);
        self.change(async |tx| {
            let n = tx
                .execute(
                    "UPDATE mailboxes SET quota = $2 WHERE address = $1",
                    &[&address, &q],
                )
                .await?;
            Ok(if n == 0 {
                Err(ChangeError::NotFound(format!("mailbox {address}")))
            } else {
                Ok(())
            })
        })
        .await
    }

    async fn remove_mailbox(&self, address: &str) -> Result<(), ChangeError> {
        self.change(async |tx| {
            tx.execute("DELETE FROM credentials WHERE address = $1", &[&address])
                .await?;
            let n = tx
                .execute("DELETE FROM mailboxes WHERE address = $1", &[&address])
                .await?;
            Ok(if n == 0 {
                Err(ChangeError::NotFound(format!("mailbox {address}")))
            } else {
                Ok(())
            })
        })
        .await
    }

    async fn add_alias(&self, address: &str, target: &str) -> Result<(), ChangeError> {
        self.change(async |tx| {
            let Some(domain) = domain_of(address) else {
                return Ok(Err(ChangeError::Invalid(format!(
                    "{address} has no domain"
                ))));
            };
            if address == target {
                return Ok(Err(ChangeError::Invalid(format!(
                    "alias {address} cannot point to itself"
                ))));
            }
            if !exists(tx, "SELECT 1 FROM domains WHERE name = $1", domain).await? {
                return Ok(Err(ChangeError::DomainNotHosted(domain.to_owned())));
            }
            if exists(tx, "SELECT 1 FROM mailboxes WHERE address = $1", address).await? {
                return Ok(Err(ChangeError::Duplicate(format!("mailbox {address}"))));
            }
            let dup = tx
                .query_opt(
                    "SELECT 1 FROM aliases WHERE address = $1 AND target = $2",
                    &[&address, &target],
                )
                .await?
                .is_some();
            if dup {
                return Ok(Err(ChangeError::Duplicate(format!(
                    "alias {address} -> {target}"
                ))));
            }
            tx.execute(
                "INSERT INTO aliases (address, target, domain) VALUES ($1, $2, $3)",
                &[&address, &target, &domain],
            )
            .await?;
            Ok(Ok(()))
        })
        .await
    }

    async fn remove_alias(&self, address: &str, target: Option<&str>) -> Result<u64, ChangeError> {
        self.change(async |tx| {
            let n = tx
                .execute(
                    "DELETE FROM aliases WHERE address = $1 AND ($2::text IS NULL OR target = $2)",
                    &[&address, &target],
                )
                .await?;
            Ok(if n == 0 {
                Err(ChangeError::NotFound(format!("alias {address}")))
            } else {
                Ok(n)
            })
        })
        .await
    }

    async fn add_filer(&self, filer: &Filer) -> Result<(), ChangeError> {
        self.change(async |tx| {
            if exists(tx, "SELECT 1 FROM filers WHERE name = $1", &filer.name).await? {
                return Ok(Err(ChangeError::Duplicate(format!("filer {}", filer.name))));
            }
            insert_filer(tx, filer).await?;
            Ok(Ok(()))
        })
        .await
    }

    async fn register_filer(&self, filer: &Filer) -> Result<(), ChangeError> {
        self.change(async |tx| {
            let f = filer;
            let n = tx
                .execute(
                    "UPDATE filers SET lmtp = $2, imap = $3, pop3 = $4, weight = $5 WHERE name = $1",
                    &[&f.name, &f.lmtp, &f.imap, &f.pop3, &i64::from(f.weight)],
                )
                .await?;
            if n == 0 {
                insert_filer(tx, f).await?;
            }
            Ok(Ok(()))
        })
        .await
    }

    async fn set_filer_state(&self, name: &str, state: FilerState) -> Result<(), ChangeError> {
        self.change(async |tx| {
            let rows = tx
                .execute(
                    "UPDATE filers SET state = $2 WHERE name = $1",
                    &[&name, &state.as_str()],
                )
                .await?;
            Ok(if rows == 0 {
                Err(ChangeError::UnknownFiler(name.to_owned()))
            } else {
                Ok(())
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests;
