//! Copying a mailbox from another filer: the filer-to-filer side of online migration.
//!
//! The destination reads the source over IMAP, logged in with the migration login
//! ([`crate::migration_principal`], the proxy's secret), and writes its own store with what IMAP clients must
//! see unchanged: each folder's UIDVALIDITY and UIDNEXT, every message under its UID with its
//! flags and internal date, the SPECIAL-USE attributes and the subscriptions. A pass is
//! incremental and can be run again at any time: it copies what is missing, updates flags
//! that changed, and removes what the source expunged, so the last pass (with the mailbox held
//! still) only moves what changed since the one before. [`verify`] then compares both sides.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_imap::types::{Flag, NameAttribute};
use futures_util::TryStreamExt as _;
use sha2::{Digest as _, Sha256};
use tokio::net::TcpStream;

use crate::store::{FlagOp, StoreError, UserStore};

/// Messages fetched per `UID FETCH` while copying bodies.
const BATCH: usize = 200;
/// Limit on connecting to the source and on each of its answers.
const TIMEOUT: Duration = Duration::from_secs(60);

/// Where a mailbox is copied from.
#[derive(Clone)]
pub struct Source {
    /// The source filer's IMAP address.
    pub imap: SocketAddr,
    /// The mailbox (key form).
    pub user: String,
    /// The trusted principal: [`crate::migration_principal`] of `trust.proxy_principal`,
    /// whose login is allowed while the mailbox is `moving` (the proxy's is not).
    pub principal: String,
    /// Its secret.
    pub secret: String,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("imap", &self.imap)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Folders seen at the source.
    pub folders: usize,
    /// Messages at the source.
    pub messages: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Messages copied in this pass.
    pub copied: u64,
    /// Bytes copied in this pass.
    pub copied_bytes: u64,
    /// Messages whose flags were updated.
    pub flags_updated: u64,
    /// Messages (and folders) removed because the source no longer has them.
    pub removed: u64,
}

/// Why a copy failed. Nothing is lost: the source is only read.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The source could not be reached.
    #[error("cannot reach the source filer at {0}: {1}")]
    Connect(SocketAddr, String),
    /// The source refused or answered something unusable.
    #[error("source imap: {0}")]
    Imap(String),
    /// The source took too long.
    #[error("source imap timed out")]
    Timeout,
    /// The destination store failed.
    #[error("destination store: {0}")]
    Store(#[from] StoreError),
}

fn imap_err(e: impl std::fmt::Display) -> MigrateError {
    MigrateError::Imap(e.to_string())
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> Result<T, MigrateError> {
    tokio::time::timeout(TIMEOUT, f)
        .await
        .map_err(|_| MigrateError::Timeout)
}

type Session = async_imap::Session<TcpStream>;

/// The trusted login: `user NUL principal NUL secret` (RFC 4616 with an authorization identity).
struct TrustedPlain(Vec<u8>);

impl async_imap::Authenticator for &TrustedPlain {
    type Response = Vec<u8>;

    fn process(&mut self, _challenge: &[u8]) -> Vec<u8> {
        self.0.clone()
    }
}

async fn connect(source: &Source) -> Result<Session, MigrateError> {
    let stream = within(TcpStream::connect(source.imap))
        .await?
        .map_err(|e| MigrateError::Connect(source.imap, e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let mut client = async_imap::Client::new(stream);
    within(client.read_response())
        .await?
        .map_err(imap_err)?
        .ok_or_else(|| MigrateError::Imap("no greeting".into()))?;
    let token = TrustedPlain(
        format!("{}\0{}\0{}", source.user, source.principal, source.secret).into_bytes(),
    );
    within(client.authenticate("PLAIN", &token))
        .await?
        .map_err(|(e, _)| imap_err(e))
}

/// One folder at the source.
#[derive(Debug, Clone)]
struct SourceFolder {
    name: String,
    special: Option<String>,
    subscribed: bool,
}

/// A message's metadata at the source.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SourceMessage {
    flags: String,
    size: u64,
    internal_date: i64,
}

fn special_use(attrs: &[NameAttribute<'_>]) -> Option<String> {
    attrs.iter().find_map(|a| {
        Some(
            match a {
                NameAttribute::All => "\\All",
                NameAttribute::Archive => "\\Archive",
                NameAttribute::Drafts => "\\Drafts",
                NameAttribute::Flagged => "\\Flagged",
                NameAttribute::Junk => "\\Junk",
                NameAttribute::Sent => "\\Sent",
                NameAttribute::Trash => "\\Trash",
                _ => return None,
            }
            .to_owned(),
        )
    })
}

/// Flags as the store keeps them: space separated, in the source's order, without `\Recent`.
fn flag_string<'a>(flags: impl Iterator<Item = Flag<'a>>) -> String {
    let words: Vec<String> = flags
        .filter_map(|f| match f {
            Flag::Seen => Some("\\Seen".to_owned()),
            Flag::Answered => Some("\\Answered".to_owned()),
            Flag::Flagged => Some("\\Flagged".to_owned()),
            Flag::Deleted => Some("\\Deleted".to_owned()),
            Flag::Draft => Some("\\Draft".to_owned()),
            Flag::Recent => None,
            Flag::MayCreate => None,
            Flag::Custom(c) => Some(c.into_owned()),
        })
        .collect();
    words.join(" ")
}

fn same_flags(a: &str, b: &str) -> bool {
    let set = |s: &str| {
        s.split_ascii_whitespace()
            .map(str::to_ascii_lowercase)
            .collect::<BTreeSet<_>>()
    };
    set(a) == set(b)
}

async fn folders(session: &mut Session) -> Result<Vec<SourceFolder>, MigrateError> {
    let subscribed: BTreeSet<String> = within(async {
        let stream = session.lsub(Some(""), Some("*")).await.map_err(imap_err)?;
        let names: Vec<_> = stream.try_collect().await.map_err(imap_err)?;
        Ok::<_, MigrateError>(names.iter().map(|n| n.name().to_owned()).collect())
    })
    .await??;
    let out = within(async {
        let stream = session.list(Some(""), Some("*")).await.map_err(imap_err)?;
        let names: Vec<_> = stream.try_collect().await.map_err(imap_err)?;
        Ok::<_, MigrateError>(
            names
                .iter()
                .filter(|n| !n.attributes().contains(&NameAttribute::NoSelect))
                .map(|n| SourceFolder {
                    name: n.name().to_owned(),
                    special: special_use(n.attributes()),
                    subscribed: subscribed.contains(n.name()),
                })
                .collect::<Vec<_>>(),
        )
    })
    .await??;
    Ok(out)
}

/// Every message of the selected folder: UID → metadata.
async fn listing(
    session: &mut Session,
    exists: u32,
) -> Result<BTreeMap<u32, SourceMessage>, MigrateError> {
    if exists == 0 {
        return Ok(BTreeMap::new());
    }
    within(async {
        let stream = session
            .uid_fetch("1:*", "(UID FLAGS INTERNALDATE RFC822.SIZE)")
            .await
            .map_err(imap_err)?;
        let fetches: Vec<_> = stream.try_collect().await.map_err(imap_err)?;
        let mut out = BTreeMap::new();
        for f in &fetches {
            let Some(uid) = f.uid else { continue };
            out.insert(
                uid,
                SourceMessage {
                    flags: flag_string(f.flags()),
                    size: u64::from(f.size.unwrap_or(0)),
                    internal_date: f.internal_date().map_or(0, |d| d.timestamp()),
                },
            );
        }
        Ok::<_, MigrateError>(out)
    })
    .await?
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, MigrateError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| MigrateError::Imap(format!("worker failed: {e}")))?
        .map_err(MigrateError::Store)
}

/// One incremental pass from `source` into `dest`; `progress` is called as messages are
/// copied.
pub async fn sync_pass(
    source: &Source,
    dest: Arc<UserStore>,
    progress: &(dyn Fn(&PassReport) + Send + Sync),
) -> Result<PassReport, MigrateError> {
    let mut session = connect(source).await?;
    let mut report = PassReport::default();
    let source_folders = folders(&mut session).await?;
    report.folders = source_folders.len();
    let names: BTreeSet<String> = source_folders.iter().map(|f| f.name.clone()).collect();
    for folder in &source_folders {
        let mailbox = within(session.examine(&folder.name))
            .await?
            .map_err(imap_err)?;
        let uid_validity = mailbox
            .uid_validity
            .ok_or_else(|| MigrateError::Imap(format!("{}: no UIDVALIDITY", folder.name)))?;
        let uid_next = mailbox.uid_next.unwrap_or(1);
        let listing = listing(&mut session, mailbox.exists).await?;
        report.messages += listing.len() as u64;
        report.bytes += listing.values().map(|m| m.size).sum::<u64>();

        let (d, name, special, sub) = (
            dest.clone(),
            folder.name.clone(),
            folder.special.clone(),
            folder.subscribed,
        );
        let here = blocking(move || {
            d.import_folder(&name, uid_validity, uid_next, special.as_deref(), sub)?;
            d.messages(&name)
        })
        .await?;
        let here: HashMap<u32, String> = here.into_iter().map(|m| (m.uid, m.flags)).collect();

        // Expunged at the source since the last pass.
        let gone: Vec<u32> = here
            .keys()
            .filter(|uid| !listing.contains_key(uid))
            .copied()
            .collect();
        if !gone.is_empty() {
            report.removed += gone.len() as u64;
            let (d, name) = (dest.clone(), folder.name.clone());
            blocking(move || d.expunge(&name, &gone)).await?;
        }
        // Flags changed at the source.
        for (uid, m) in &listing {
            if let Some(flags) = here.get(uid)
                && !same_flags(flags, &m.flags)
            {
                let (d, name, uid, flags) =
                    (dest.clone(), folder.name.clone(), *uid, m.flags.clone());
                let list: Vec<String> = flags.split_ascii_whitespace().map(str::to_owned).collect();
                blocking(move || d.store_flags(&name, &[uid], FlagOp::Replace, &list, None))
                    .await?;
                report.flags_updated += 1;
            }
        }
        // New at the source.
        let missing: Vec<u32> = listing
            .keys()
            .filter(|uid| !here.contains_key(uid))
            .copied()
            .collect();
        for chunk in missing.chunks(BATCH) {
            let set = chunk
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",");
            let fetches = within(async {
                let stream = session
                    .uid_fetch(&set, "(UID FLAGS INTERNALDATE BODY.PEEK[])")
                    .await
                    .map_err(imap_err)?;
                let v: Vec<_> = stream.try_collect().await.map_err(imap_err)?;
                Ok::<_, MigrateError>(v)
            })
            .await??;
            for f in fetches {
                let (Some(uid), Some(body)) = (f.uid, f.body()) else {
                    continue;
                };
                let flags = flag_string(f.flags());
                let date = f.internal_date().map_or(0, |d| d.timestamp());
                let (d, name, data) = (dest.clone(), folder.name.clone(), body.to_vec());
                let size = data.len() as u64;
                let stored =
                    blocking(move || d.import_message(&name, uid, &flags, date, &data)).await?;
                if stored {
                    report.copied += 1;
                    report.copied_bytes += size;
                    progress(&report);
                }
            }
        }
    }
    // Folders the source no longer has (INBOX always stays).
    let d = dest.clone();
    let here = blocking(move || d.folders()).await?;
    for f in here {
        if !names.contains(&f.name) && !f.name.eq_ignore_ascii_case("INBOX") {
            let d = dest.clone();
            let name = f.name.clone();
            blocking(move || d.delete_folder(&name)).await?;
            report.removed += 1;
        }
    }
    let _ = within(session.logout()).await;
    Ok(report)
}

/// A difference [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The folder.
    pub folder: String,
    /// What differs.
    pub what: String,
}

/// Compares the source and the destination, per folder: UIDVALIDITY, the UID list, flags,
/// and a content hash (SHA-256 over every message's bytes in UID order, read back from the
/// destination's files and fetched again from the source). Empty when they match.
pub async fn verify(source: &Source, dest: Arc<UserStore>) -> Result<Vec<Mismatch>, MigrateError> {
    let mut session = connect(source).await?;
    let mut out = Vec::new();
    let source_folders = folders(&mut session).await?;
    let d = dest.clone();
    let here_folders = blocking(move || d.folders()).await?;
    let here_names: BTreeSet<&str> = here_folders.iter().map(|f| f.name.as_str()).collect();
    for f in &source_folders {
        if !here_names.contains(f.name.as_str()) {
            out.push(Mismatch {
                folder: f.name.clone(),
                what: "missing at the destination".into(),
            });
        }
    }
    for folder in &source_folders {
        let Some(info) = here_folders.iter().find(|h| h.name == folder.name) else {
            continue;
        };
        let mailbox = within(session.examine(&folder.name))
            .await?
            .map_err(imap_err)?;
        let mismatch = |what: String| Mismatch {
            folder: folder.name.clone(),
            what,
        };
        if mailbox.uid_validity != Some(info.uid_validity) {
            out.push(mismatch(format!(
                "UIDVALIDITY {:?} at the source, {} here",
                mailbox.uid_validity, info.uid_validity
            )));
            continue;
        }
        let listing = listing(&mut session, mailbox.exists).await?;
        let (d, name) = (dest.clone(), folder.name.clone());
        let (here, hash_here) = blocking(move || {
            let msgs = d.messages(&name)?;
            let mut h = Sha256::new();
            for m in &msgs {
                let bytes = std::fs::read(d.path_of(m)).map_err(|e| StoreError::Io {
                    what: "reading",
                    path: d.path_of(m),
                    source: e,
                })?;
                h.update(m.uid.to_be_bytes());
                h.update(&bytes);
            }
            Ok((msgs, h.finalize().to_vec()))
        })
        .await?;
        let uids_source: Vec<u32> = listing.keys().copied().collect();
        let uids_here: Vec<u32> = here.iter().map(|m| m.uid).collect();
        if uids_source != uids_here {
            out.push(mismatch(format!(
                "UIDs differ: {} at the source, {} here",
                uids_source.len(),
                uids_here.len()
            )));
            continue;
        }
        for m in &here {
            if let Some(s) = listing.get(&m.uid)
                && !same_flags(&s.flags, &m.flags)
            {
                out.push(mismatch(format!(
                    "UID {}: flags {:?} at the source, {:?} here",
                    m.uid, s.flags, m.flags
                )));
            }
        }
        let mut h = Sha256::new();
        for chunk in uids_source.chunks(BATCH) {
            let set = chunk
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",");
            let mut fetches = within(async {
                let stream = session
                    .uid_fetch(&set, "(UID BODY.PEEK[])")
                    .await
                    .map_err(imap_err)?;
                let v: Vec<_> = stream.try_collect().await.map_err(imap_err)?;
                Ok::<_, MigrateError>(v)
            })
            .await??;
            fetches.sort_by_key(|f| f.uid);
            for f in &fetches {
                if let (Some(uid), Some(body)) = (f.uid, f.body()) {
                    h.update(uid.to_be_bytes());
                    h.update(body);
                }
            }
        }
        if h.finalize().to_vec() != hash_here {
            out.push(mismatch("content hash differs".into()));
        }
    }
    let _ = within(session.logout()).await;
    Ok(out)
}

/// After the flip: copies into `dest`, as new messages (new UIDs there), what the source's
/// folders hold at or above the UIDNEXT `known` had for them when the copies were verified, i.e.
/// a delivery that was being written to the old copy across the flip. Returns how many.
pub async fn sweep(
    source: &Source,
    dest: Arc<UserStore>,
    known: &HashMap<String, u32>,
) -> Result<u64, MigrateError> {
    let mut session = connect(source).await?;
    let mut swept = 0;
    for folder in folders(&mut session).await? {
        let mailbox = within(session.examine(&folder.name))
            .await?
            .map_err(imap_err)?;
        let from = known.get(&folder.name).copied().unwrap_or(1);
        if mailbox.uid_next.is_some_and(|n| n <= from) {
            continue;
        }
        let listing = listing(&mut session, mailbox.exists).await?;
        let late: Vec<u32> = listing.keys().filter(|u| **u >= from).copied().collect();
        for chunk in late.chunks(BATCH) {
            let set = chunk
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",");
            let fetches = within(async {
                let stream = session
                    .uid_fetch(&set, "(UID FLAGS INTERNALDATE BODY.PEEK[])")
                    .await
                    .map_err(imap_err)?;
                let v: Vec<_> = stream.try_collect().await.map_err(imap_err)?;
                Ok::<_, MigrateError>(v)
            })
            .await??;
            for f in fetches {
                let Some(body) = f.body() else { continue };
                let flags = flag_string(f.flags());
                let date = f.internal_date().map_or(0, |d| d.timestamp());
                let (d, name, data) = (dest.clone(), folder.name.clone(), body.to_vec());
                blocking(move || {
                    if d.folder(&name)?.is_none() {
                        d.create_folder(&name)?;
                    }
                    d.append(&name, &data, &flags, date, 0)
                })
                .await?;
                swept += 1;
            }
        }
    }
    let _ = within(session.logout()).await;
    Ok(swept)
}

/// Empties the old copy after a migration (`mailctl migrate purge`): every message expunged,
/// every folder but INBOX deleted, with the migration login. Returns how many messages went.
pub async fn purge(source: &Source) -> Result<u64, MigrateError> {
    let mut session = connect(source).await?;
    let mut removed = 0;
    let mut names: Vec<String> = folders(&mut session)
        .await?
        .into_iter()
        .map(|f| f.name)
        .collect();
    // Children before parents.
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for name in &names {
        let mailbox = within(session.select(name)).await?.map_err(imap_err)?;
        if mailbox.exists > 0 {
            removed += u64::from(mailbox.exists);
            within(async {
                let stream = session
                    .uid_store("1:*", "+FLAGS.SILENT (\\Deleted)")
                    .await
                    .map_err(imap_err)?;
                let _: Vec<_> = stream.try_collect().await.map_err(imap_err)?;
                let stream = session.expunge().await.map_err(imap_err)?;
                let _: Vec<_> = stream.try_collect().await.map_err(imap_err)?;
                Ok::<_, MigrateError>(())
            })
            .await??;
        }
        within(session.close()).await?.map_err(imap_err)?;
        if !name.eq_ignore_ascii_case("INBOX") {
            within(session.delete(name)).await?.map_err(imap_err)?;
        }
    }
    let _ = within(session.logout()).await;
    Ok(removed)
}
