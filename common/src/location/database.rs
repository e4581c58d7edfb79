//! [`Database`]: the location database on whichever backend the configuration names.

use super::{
    Alias, ChangeError, Credentials, Directory, DomainInfo, Filer, FilerState, FilerUsage,
    LookupError, Mailbox, MailboxState, NewMailbox, OpenError, Postgres, Sqlite,
};
use crate::config::DatabaseLocation;

/// The location database on either backend. Cheap to clone.
#[derive(Clone)]
pub enum Database {
    /// One SQLite file.
    Sqlite(Sqlite),
    /// A PostgreSQL server, with an optional read replica.
    Postgres(Postgres),
}

impl Database {
    /// Opens (and migrates) the database at `location`: the SQLite file on the blocking pool,
    /// or a PostgreSQL server over the network, whose unreachability is
    /// [`OpenError::is_temporary`].
    pub async fn open(location: &DatabaseLocation) -> Result<Self, OpenError> {
        match location {
            DatabaseLocation::Sqlite(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || Sqlite::open(&path))
                    .await
                    .map_err(OpenError::Task)?
                    .map(Self::Sqlite)
            }
            DatabaseLocation::Postgres { write, read } => Postgres::open(write, read.as_ref())
                .await
                .map(Self::Postgres),
        }
    }

    fn backend(&self) -> &dyn Directory {
        match self {
            Self::Sqlite(db) => db,
            Self::Postgres(db) => db,
        }
    }
}

#[async_trait::async_trait]
impl Directory for Database {
    async fn is_hosted_domain(&self, domain: &str) -> Result<bool, LookupError> {
        self.backend().is_hosted_domain(domain).await
    }
    async fn mailbox(&self, address: &str) -> Result<Option<Mailbox>, LookupError> {
        self.backend().mailbox(address).await
    }
    async fn mailbox_fresh(&self, address: &str) -> Result<Option<Mailbox>, LookupError> {
        self.backend().mailbox_fresh(address).await
    }
    async fn alias_targets(&self, address: &str) -> Result<Vec<String>, LookupError> {
        self.backend().alias_targets(address).await
    }
    async fn filer(&self, name: &str) -> Result<Option<Filer>, LookupError> {
        self.backend().filer(name).await
    }
    async fn filers(&self) -> Result<Vec<FilerUsage>, LookupError> {
        self.backend().filers().await
    }
    async fn credentials(&self, address: &str) -> Result<Option<Credentials>, LookupError> {
        self.backend().credentials(address).await
    }
    async fn domains(&self) -> Result<Vec<DomainInfo>, LookupError> {
        self.backend().domains().await
    }
    async fn mailboxes(&self, domain: Option<&str>) -> Result<Vec<Mailbox>, LookupError> {
        self.backend().mailboxes(domain).await
    }
    async fn aliases(&self, domain: Option<&str>) -> Result<Vec<Alias>, LookupError> {
        self.backend().aliases(domain).await
    }
    async fn add_domain(&self, domain: &str) -> Result<(), ChangeError> {
        self.backend().add_domain(domain).await
    }
    async fn remove_domain(&self, domain: &str) -> Result<(), ChangeError> {
        self.backend().remove_domain(domain).await
    }
    async fn add_mailbox(&self, new: NewMailbox) -> Result<Mailbox, ChangeError> {
        self.backend().add_mailbox(new).await
    }
    async fn set_credentials(&self, address: &str, c: Credentials) -> Result<(), ChangeError> {
        self.backend().set_credentials(address, c).await
    }
    async fn set_mailbox_state(&self, address: &str, s: MailboxState) -> Result<(), ChangeError> {
        self.backend().set_mailbox_state(address, s).await
    }
    async fn move_mailbox(&self, address: &str, from: &str, to: &str) -> Result<(), ChangeError> {
        self.backend().move_mailbox(address, from, to).await
    }
    async fn set_quota(&self, address: &str, quota: u64) -> Result<(), ChangeError> {
        self.backend().set_quota(address, quota).await
    }
    async fn remove_mailbox(&self, address: &str) -> Result<(), ChangeError> {
        self.backend().remove_mailbox(address).await
    }
    async fn add_alias(&self, address: &str, target: &str) -> Result<(), ChangeError> {
        self.backend().add_alias(address, target).await
    }
    async fn remove_alias(&self, address: &str, target: Option<&str>) -> Result<u64, ChangeError> {
        self.backend().remove_alias(address, target).await
    }
    async fn add_filer(&self, filer: &Filer) -> Result<(), ChangeError> {
        self.backend().add_filer(filer).await
    }
    async fn register_filer(&self, filer: &Filer) -> Result<(), ChangeError> {
        self.backend().register_filer(filer).await
    }
    async fn set_filer_state(&self, name: &str, state: FilerState) -> Result<(), ChangeError> {
        self.backend().set_filer_state(name, state).await
    }
}
