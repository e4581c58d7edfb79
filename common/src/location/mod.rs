//! The mailbox-location database: which domains are hosted, which mailboxes exist, on which
//! filer each one lives, aliases, credentials, and the filers themselves.
//!
//! Every service reads it; only `mailctl` (and, later, migrations) change it. The
//! [`Directory`] trait is the one interface, with two backends: [`Sqlite`] (one file, one
//! host) and [`Postgres`] (deployments over several hosts, with an optional read replica).
//! [`Database`] is whichever of the two the configuration names. Hot-path lookups go through
//! [`Cached`], which keeps answers for a short TTL and keeps serving slightly stale answers for
//! a short outage. A lookup failure is always *temporary* ([`LookupError`]): callers answer
//! 4xx, never a bounce.
//!
//! Addresses are passed in their key form (`common::address::Address::key`): lower case, with
//! the domain in its ASCII form. Every query binds its parameters.

mod cache;
mod credentials;
mod database;
mod postgres;
mod sqlite;
#[cfg(test)]
mod suite;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::Serialize;

pub use cache::Cached;
pub use credentials::{
    CredentialError, Credentials, MAX_PASSWORD_LEN, SCRAM_ITERATIONS, ScramKeys,
};
pub use database::Database;
pub use postgres::Postgres;
pub use sqlite::Sqlite;

/// The state of a mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MailboxState {
    /// Normal operation.
    Active,
    /// Being migrated between filers: deliveries are held, logins answered "try later".
    Moving,
    /// Refuses deliveries (`550 5.2.1`) and logins.
    Disabled,
}

/// The state of a filer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FilerState {
    /// Serving; new mailboxes may be placed here.
    Up,
    /// Serving, but no new mailboxes are placed here (it is being emptied).
    Draining,
    /// Taken out of service by the operator.
    Down,
}

macro_rules! text_enum {
    ($ty:ident { $($variant:ident = $text:literal),* $(,)? }) => {
        impl $ty {
            /// The name stored in the database and shown to operators.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),* }
            }
        }
        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s { $($text => Ok(Self::$variant),)* _ => Err(format!("unknown state {s:?}")) }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.pad(self.as_str()) }
        }
    };
}
text_enum!(MailboxState { Active = "active", Moving = "moving", Disabled = "disabled" });
text_enum!(FilerState { Up = "up", Draining = "draining", Down = "down" });

/// A mailbox and where it lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mailbox {
    /// The address in key form.
    pub address: String,
    /// The name of the filer that holds it.
    pub filer: String,
    /// Its state.
    pub state: MailboxState,
    /// Quota in bytes; 0 means unlimited.
    pub quota: u64,
    /// Seed for the UIDVALIDITY of its folders, fixed when the mailbox is created, so a
    /// mailbox that is removed and made again does not reuse UIDVALIDITY values.
    pub uidvalidity_seed: u32,
}

/// A storage server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Filer {
    /// Its unique name.
    pub name: String,
    /// LMTP address (`host:port`) spools deliver to.
    pub lmtp: String,
    /// IMAP address the access proxy connects to.
    pub imap: String,
    /// POP3 address the access proxy connects to.
    pub pop3: String,
    /// Its state.
    pub state: FilerState,
    /// Placement weight: a filer of weight 2 gets twice the mailboxes of one of weight 1.
    pub weight: u32,
}

/// A filer with the number of mailboxes it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FilerUsage {
    /// The filer.
    #[serde(flatten)]
    pub filer: Filer,
    /// How many mailboxes it holds.
    pub mailboxes: u64,
}

/// A hosted domain with its counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DomainInfo {
    /// The domain (ASCII form).
    pub name: String,
    /// Mailboxes in it.
    pub mailboxes: u64,
    /// Aliases in it.
    pub aliases: u64,
}

/// One alias: mail to `address` goes to `target`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Alias {
    /// The alias address (key form).
    pub address: String,
    /// Where its mail goes.
    pub target: String,
}

/// A mailbox to create.
#[derive(Debug, Clone)]
pub struct NewMailbox {
    /// The address in key form; its domain must be hosted.
    pub address: String,
    /// Its credentials.
    pub credentials: Credentials,
    /// Quota in bytes, 0 for unlimited.
    pub quota: u64,
    /// A filer chosen by the operator; `None` places it by weight.
    pub filer: Option<String>,
}

/// A lookup that could not be answered. Always temporary: the caller answers 4xx.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LookupError {
    /// The database could not be reached or failed.
    #[error("location database unavailable: {0}")]
    Unavailable(String),
}

/// Why a change was refused. Nothing was written.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ChangeError {
    /// The thing exists already.
    #[error("{0} already exists")]
    Duplicate(String),
    /// The thing does not exist.
    #[error("{0} does not exist")]
    NotFound(String),
    /// The address's domain is not hosted here.
    #[error("domain {0} is not hosted here")]
    DomainNotHosted(String),
    /// No such filer.
    #[error("unknown filer {0}")]
    UnknownFiler(String),
    /// No filer is up with a non-zero weight.
    #[error("no filer is available for new mailboxes (add one, or set one up)")]
    NoFilerAvailable,
    /// Removing it would leave dangling rows.
    #[error("{0}")]
    InUse(String),
    /// A value is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// The row is not in the state the change expects (another change came first).
    #[error("{0}")]
    Conflict(String),
    /// The database failed.
    #[error("location database error: {0}")]
    Database(String),
}

/// Why the database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The directory could not be made.
    #[error("cannot create {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// SQLite failed to open or migrate the file.
    #[error("cannot open location database {path}: {source}")]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: rusqlite::Error,
    },
    /// The database was written by a newer version of this program.
    #[error(
        "location database {database} has schema version {found}, newer than this program's \
         {known}: run the newer version"
    )]
    TooNew {
        /// The file, or the server's URL without its password.
        database: String,
        /// Its version.
        found: i64,
        /// Ours.
        known: usize,
    },
    /// The PostgreSQL server could not be reached, or did not answer in time. Temporary:
    /// trying again once it is up may succeed ([`OpenError::is_temporary`]).
    #[error(
        "location database {url} is unavailable: {reason} (is the server up and reachable? \
         check database.url)"
    )]
    Unavailable {
        /// The server's URL without its password.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The PostgreSQL server refused a statement while the schema was migrated.
    #[error("cannot migrate location database {url}")]
    Postgres {
        /// The server's URL without its password.
        url: String,
        /// The cause.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The task opening the database failed.
    #[error("the task opening the location database failed")]
    Task(#[source] tokio::task::JoinError),
}

impl OpenError {
    /// Whether trying again later may succeed (the server was unreachable), as opposed to a
    /// problem an operator must fix first.
    pub fn is_temporary(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// The mailbox-location database. Lookups are what services use on hot paths; changes are
/// what `mailctl` uses, each one a single transaction.
#[async_trait::async_trait]
pub trait Directory: Send + Sync {
    /// Whether `domain` is hosted here.
    async fn is_hosted_domain(&self, domain: &str) -> Result<bool, LookupError>;
    /// The mailbox with this address.
    async fn mailbox(&self, address: &str) -> Result<Option<Mailbox>, LookupError>;
    /// The mailbox as the database has it now, bypassing any cache: for the last check before
    /// a delivery is committed, which must see a migration's `moving` at once.
    async fn mailbox_fresh(&self, address: &str) -> Result<Option<Mailbox>, LookupError> {
        self.mailbox(address).await
    }
    /// The targets of the alias `address` (empty when it is no alias).
    async fn alias_targets(&self, address: &str) -> Result<Vec<String>, LookupError>;
    /// The filer of this name.
    async fn filer(&self, name: &str) -> Result<Option<Filer>, LookupError>;
    /// Every filer with its mailbox count.
    async fn filers(&self) -> Result<Vec<FilerUsage>, LookupError>;
    /// The credentials of a mailbox.
    async fn credentials(&self, address: &str) -> Result<Option<Credentials>, LookupError>;
    /// Every hosted domain.
    async fn domains(&self) -> Result<Vec<DomainInfo>, LookupError>;
    /// Mailboxes, of one domain or all, ordered by address.
    async fn mailboxes(&self, domain: Option<&str>) -> Result<Vec<Mailbox>, LookupError>;
    /// Aliases, of one domain or all, ordered by address.
    async fn aliases(&self, domain: Option<&str>) -> Result<Vec<Alias>, LookupError>;

    /// Hosts a new domain.
    async fn add_domain(&self, domain: &str) -> Result<(), ChangeError>;
    /// Stops hosting a domain; refused while it has mailboxes or aliases.
    async fn remove_domain(&self, domain: &str) -> Result<(), ChangeError>;
    /// Creates a mailbox, placed on the filer with the most free weight unless one is given.
    async fn add_mailbox(&self, new: NewMailbox) -> Result<Mailbox, ChangeError>;
    /// Replaces a mailbox's credentials.
    async fn set_credentials(&self, address: &str, c: Credentials) -> Result<(), ChangeError>;
    /// Sets a mailbox's state.
    async fn set_mailbox_state(&self, address: &str, s: MailboxState) -> Result<(), ChangeError>;
    /// Ends a migration: if the mailbox is `moving` and on filer `from`, puts it on filer `to`
    /// and makes it `active`, in one transaction; otherwise changes nothing and says why
    /// ([`ChangeError::Conflict`]), so two operators cannot flip a mailbox twice.
    async fn move_mailbox(&self, address: &str, from: &str, to: &str) -> Result<(), ChangeError>;
    /// Sets a mailbox's quota in bytes (0: unlimited).
    async fn set_quota(&self, address: &str, quota: u64) -> Result<(), ChangeError>;
    /// Removes a mailbox from the database (its mail stays on the filer).
    async fn remove_mailbox(&self, address: &str) -> Result<(), ChangeError>;
    /// Adds an alias `address` → `target`.
    async fn add_alias(&self, address: &str, target: &str) -> Result<(), ChangeError>;
    /// Removes one target of an alias, or all of them.
    async fn remove_alias(&self, address: &str, target: Option<&str>) -> Result<u64, ChangeError>;
    /// Adds a filer.
    async fn add_filer(&self, filer: &Filer) -> Result<(), ChangeError>;
    /// Adds a filer, or updates the addresses and weight of an existing one (its state is
    /// kept). Used by `mailctl up` for the filers its configuration runs.
    async fn register_filer(&self, filer: &Filer) -> Result<(), ChangeError>;
    /// Sets a filer's state.
    async fn set_filer_state(&self, name: &str, state: FilerState) -> Result<(), ChangeError>;
}

/// The domain part of a key-form address (after the last `@`).
pub fn domain_of(address: &str) -> Option<&str> {
    address
        .rsplit_once('@')
        .map(|(_, d)| d)
        .filter(|d| !d.is_empty())
}
