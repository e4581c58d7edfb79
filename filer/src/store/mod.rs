//! The filer's mail store: one Maildir++ tree per mailbox on local disk, and beside it a
//! per-mailbox SQLite index that is the source of truth for UIDs, UIDVALIDITY, flags and
//! modseq.
//!
//! Layout: `<mail_root>/<domain>/<local>/` holds INBOX (`cur/ new/ tmp/`), one `.<Folder>/`
//! per other folder (Maildir++), and `index.sqlite`. A message file is written, fsynced and
//! linked into `cur/` (whose directory is then fsynced) *before* its index row is committed;
//! only then is a delivery acknowledged. A crash after the link but before the commit leaves
//! a file that is not in the index: it is indexed the next time the mailbox is opened
//! ([`UserStore::open`] reconciles), so nothing acknowledged is lost and no half message is
//! ever visible (half-written files only exist in `tmp/`, which readers never look at).

mod index;
mod maildir;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use index::{Changes, FlagOp, FolderInfo, MessageMeta};

/// Folders every new mailbox gets, with their SPECIAL-USE attribute (RFC 6154).
pub const DEFAULT_FOLDERS: &[(&str, &str)] = &[
    ("Drafts", "\\Drafts"),
    ("Sent", "\\Sent"),
    ("Junk", "\\Junk"),
    ("Trash", "\\Trash"),
];

/// The folder spam-tagged deliveries go to.
pub const JUNK: &str = "Junk";

/// Open mailboxes kept before unused ones are dropped.
const MAX_OPEN_MAILBOXES: usize = 4096;

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The mailbox name cannot be a safe directory name.
    #[error("invalid mailbox name {0:?}")]
    InvalidName(String),
    /// The delivery would exceed the quota.
    #[error("quota exceeded ({used} + {size} > {quota} bytes)")]
    QuotaExceeded {
        /// Bytes in use.
        used: u64,
        /// The message.
        size: u64,
        /// The quota.
        quota: u64,
    },
    /// No such folder.
    #[error("no such folder {0:?}")]
    NoFolder(String),
    /// The folder exists already.
    #[error("folder {0:?} exists")]
    FolderExists(String),
    /// The operation is not allowed on this folder (deleting INBOX).
    #[error("{0}")]
    NotAllowed(&'static str),
    /// A file or directory operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The index failed.
    #[error("index {path}: {source}")]
    Index {
        /// The index file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: rusqlite::Error,
    },
}

impl StoreError {
    /// Whether the disk (or the filesystem quota) is full: a write or the index ran out of
    /// space. A delivery refused for it gets `452 4.3.1` (RFC 3463) and is retried.
    pub fn is_disk_full(&self) -> bool {
        match self {
            Self::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            ),
            Self::Index { source, .. } => {
                source.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
            }
            _ => false,
        }
    }
}

/// What a delivery produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// The folder's UIDVALIDITY.
    pub uid_validity: u32,
    /// The message's UID.
    pub uid: u32,
}

/// All mailboxes of one filer.
pub struct Store {
    root: PathBuf,
    host: String,
    /// One slot per mailbox. Opening a mailbox holds its slot's lock, so a mailbox is opened
    /// (and reconciled) once, never while a delivery to it is running in this process.
    open: Mutex<HashMap<String, Slot>>,
}

type Slot = Arc<Mutex<Option<Arc<UserStore>>>>;

impl Store {
    /// A store rooted at `root`; `host` goes into unique file names.
    pub fn new(root: PathBuf, host: &str) -> Self {
        let host = host.replace(['/', ':', ','], "_");
        Self {
            root,
            host,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Opens (creating on first use) the mailbox of `address`, a key-form address from the
    /// location database. Blocking.
    pub fn user(
        &self,
        address: &str,
        uid_validity_seed: u32,
    ) -> Result<Arc<UserStore>, StoreError> {
        let dir = self.root.join(user_path(address)?);
        let slot: Slot = {
            let mut open = self
                .open
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if open.len() >= MAX_OPEN_MAILBOXES {
                // Forget mailboxes nobody uses (no session, no delivery, not being opened).
                open.retain(|_, slot| {
                    Arc::strong_count(slot) > 1
                        || slot.try_lock().map_or(true, |u| {
                            u.as_ref().is_some_and(|u| Arc::strong_count(u) > 1)
                        })
                });
            }
            open.entry(address.to_owned()).or_default().clone()
        };
        let mut guard = slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(u) = guard.as_ref() {
            return Ok(u.clone());
        }
        let user = Arc::new(UserStore::open(dir, self.host.clone(), uid_validity_seed)?);
        *guard = Some(user.clone());
        Ok(user)
    }

    /// The directory of a mailbox, whether or not it exists yet.
    pub fn user_dir(&self, address: &str) -> Result<PathBuf, StoreError> {
        Ok(self.root.join(user_path(address)?))
    }
}

/// `domain/local` for a key-form address. Only a conservative character set is accepted, so a
/// name can never reach outside the mail root (no `/`, no leading `.`, no `..`).
fn user_path(address: &str) -> Result<PathBuf, StoreError> {
    let bad = || StoreError::InvalidName(address.to_owned());
    let (local, domain) = address.rsplit_once('@').ok_or_else(bad)?;
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && !local.starts_with('.')
        && local.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'+' | b'-')
        });
    let domain_ok = !domain.is_empty()
        && domain.len() <= 255
        && domain.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    if !local_ok || !domain_ok {
        return Err(bad());
    }
    Ok(Path::new(domain).join(local))
}

/// One mailbox: its Maildir tree and its index.
pub struct UserStore {
    dir: PathBuf,
    host: String,
    index: Mutex<index::Index>,
    /// Tells every session of this mailbox that a folder changed (its name); sessions then
    /// ask the index what changed since the modseq they know.
    changes: tokio::sync::broadcast::Sender<String>,
}

impl UserStore {
    /// Opens a mailbox directory, creating the Maildir tree, the index and the default folders
    /// on first use, and indexing any message file a crash left unindexed. Blocking.
    pub fn open(dir: PathBuf, host: String, uid_validity_seed: u32) -> Result<Self, StoreError> {
        maildir::create_tree(&dir)?;
        let mut index = index::Index::open(&dir, uid_validity_seed)?;
        for (name, special) in DEFAULT_FOLDERS {
            let folder = index.ensure_folder(name, Some(special))?;
            maildir::create_tree(&dir.join(&folder.dir))?;
        }
        let (changes, _) = tokio::sync::broadcast::channel(256);
        let store = Self {
            dir,
            host,
            index: Mutex::new(index),
            changes,
        };
        store.reconcile()?;
        Ok(store)
    }

    /// The mailbox directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn index(&self) -> std::sync::MutexGuard<'_, index::Index> {
        // A panic while holding the lock cannot leave the index inconsistent (SQLite
        // transactions roll back), so a poisoned lock is safe to reuse.
        self.index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Delivers a message into `folder` (created if missing) durably: file written and
    /// fsynced, linked into `cur/`, directory fsynced, index row committed. Refuses with
    /// [`StoreError::QuotaExceeded`] when `quota` (bytes, 0 = unlimited) would be exceeded.
    ///
    /// Exactly once: a message with a `Message-ID` that was delivered to this mailbox in the
    /// last [`REDELIVERY_WINDOW`] with the same body (a spool retrying because it never saw
    /// the first `250`: it was killed, or the filer was, between the fsync and the reply) is
    /// not stored again; the earlier delivery is returned. Blocking.
    pub fn deliver(&self, folder: &str, data: &[u8], quota: u64) -> Result<Delivered, StoreError> {
        let key = delivery_key(data);
        let now_s = now();
        let window = REDELIVERY_WINDOW.as_secs() as i64;
        if let Some(key) = &key
            && let Some((first, d)) = self.index().delivered_before(key, now_s - window)?
        {
            tracing::info!(folder = %first, uid = d.uid, "a redelivery of a message already here: not stored twice");
            return Ok(d);
        }
        let size = data.len() as u64;
        let (folder_dir, used) = {
            let mut ix = self.index();
            let f = ix.ensure_folder(folder, None)?;
            (f.dir, ix.usage()?)
        };
        if quota > 0 && used + size > quota {
            return Err(StoreError::QuotaExceeded { used, size, quota });
        }
        let fdir = self.dir.join(&folder_dir);
        maildir::create_tree(&fdir)?;
        let started = std::time::SystemTime::now();
        let file = maildir::write_durably(&fdir, &self.host, data)?;
        if let Ok(took) = started.elapsed() {
            common::obs::fsync_latency("filer", took.as_secs_f64());
        }
        let internal_date = now_s;
        let guid = content_guid(data);
        let rel = format!(
            "{}cur/{file}",
            if folder_dir.is_empty() {
                String::new()
            } else {
                format!("{folder_dir}/")
            }
        );
        let r = match &key {
            Some(key) => match self.index().add_delivery(
                folder,
                &rel,
                size,
                internal_date,
                &guid,
                key,
                now_s - window,
            ) {
                Ok(Err(earlier)) => {
                    // The same message arrived twice at once: keep the first copy only.
                    let _ = std::fs::remove_file(self.dir.join(&rel));
                    return Ok(earlier);
                }
                other => other.map(|r| r.unwrap_or_else(|d| d)),
            },
            None => self
                .index()
                .add_message(folder, &rel, size, internal_date, "", &guid),
        };
        match r {
            Ok(d) => {
                self.notify(folder);
                Ok(d)
            }
            Err(e) => {
                // The index refused: take the file back out so it is not indexed later as a
                // message the sender was told failed (they will retry).
                let _ = std::fs::remove_file(self.dir.join(&rel));
                Err(e)
            }
        }
    }

    /// Makes folder `name` match a folder copied from another filer: its UIDVALIDITY,
    /// SPECIAL-USE and subscription, and a UIDNEXT of at least `uid_next`. Blocking.
    pub fn import_folder(
        &self,
        name: &str,
        uid_validity: u32,
        uid_next: u32,
        special: Option<&str>,
        subscribed: bool,
    ) -> Result<FolderInfo, StoreError> {
        let f = self
            .index()
            .import_folder(name, uid_validity, uid_next, special, subscribed)?;
        maildir::create_tree(&self.dir.join(&f.dir))?;
        Ok(f)
    }

    /// Stores a message copied from another filer under its own UID, flags and internal date,
    /// durably (like [`deliver`](Self::deliver)); nothing happens if that UID is already
    /// there, so a copy can be run again. Returns whether it was stored. Blocking.
    pub fn import_message(
        &self,
        folder: &str,
        uid: u32,
        flags: &str,
        internal_date: i64,
        data: &[u8],
    ) -> Result<bool, StoreError> {
        let folder_dir = {
            let ix = self.index();
            let f = ix
                .folder(folder)?
                .ok_or_else(|| StoreError::NoFolder(folder.to_owned()))?;
            if ix.has_uid(folder, uid)? {
                return Ok(false);
            }
            f.dir
        };
        let fdir = self.dir.join(&folder_dir);
        let file = maildir::write_durably(&fdir, &self.host, data)?;
        let rel = join_rel(&folder_dir, &file);
        let r = self.index().import_message(
            folder,
            uid,
            &rel,
            data.len() as u64,
            internal_date,
            flags,
            &content_guid(data),
        );
        match r {
            Ok(true) => {
                self.notify(folder);
                Ok(true)
            }
            Ok(false) => {
                let _ = std::fs::remove_file(self.dir.join(&rel));
                Ok(false)
            }
            Err(e) => {
                let _ = std::fs::remove_file(self.dir.join(&rel));
                Err(e)
            }
        }
    }

    /// Subscribes to change notices (folder names).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.changes.subscribe()
    }

    fn notify(&self, folder: &str) {
        let _ = self.changes.send(folder.to_owned());
    }

    /// Appends a message (IMAP APPEND) with flags and an internal date, durably, like
    /// [`deliver`](Self::deliver). Blocking.
    pub fn append(
        &self,
        folder: &str,
        data: &[u8],
        flags: &str,
        internal_date: i64,
        quota: u64,
    ) -> Result<Delivered, StoreError> {
        let size = data.len() as u64;
        let (folder_dir, used) = {
            let ix = self.index();
            let f = ix
                .folder(folder)?
                .ok_or_else(|| StoreError::NoFolder(folder.to_owned()))?;
            (f.dir, ix.usage()?)
        };
        if quota > 0 && used + size > quota {
            return Err(StoreError::QuotaExceeded { used, size, quota });
        }
        let fdir = self.dir.join(&folder_dir);
        maildir::create_tree(&fdir)?;
        let file = maildir::write_durably(&fdir, &self.host, data)?;
        let rel = join_rel(&folder_dir, &file);
        match self.index().add_message(
            folder,
            &rel,
            size,
            internal_date,
            flags,
            &content_guid(data),
        ) {
            Ok(d) => {
                self.notify(folder);
                Ok(d)
            }
            Err(e) => {
                let _ = std::fs::remove_file(self.dir.join(&rel));
                Err(e)
            }
        }
    }

    /// Copies messages (by UID, in the given order) into `to`: each file is hard-linked into
    /// the target's `cur/` (so a copy costs no data), the directory fsynced, then all index rows
    /// go in one transaction. Returns the target's UIDVALIDITY and (source, new) UID pairs.
    /// Blocking.
    pub fn copy(
        &self,
        from: &str,
        uids: &[u32],
        to: &str,
        quota: u64,
    ) -> Result<(u32, Vec<(u32, u32)>), StoreError> {
        let (src, dst_dir, used) = {
            let ix = self.index();
            let dst = ix
                .folder(to)?
                .ok_or_else(|| StoreError::NoFolder(to.to_owned()))?;
            (ix.messages(from)?, dst.dir, ix.usage()?)
        };
        let wanted: std::collections::HashSet<u32> = uids.iter().copied().collect();
        let picked: Vec<&MessageMeta> = src.iter().filter(|m| wanted.contains(&m.uid)).collect();
        let size: u64 = picked.iter().map(|m| m.size).sum();
        if quota > 0 && used + size > quota {
            return Err(StoreError::QuotaExceeded { used, size, quota });
        }
        let fdir = self.dir.join(&dst_dir);
        maildir::create_tree(&fdir)?;
        let mut rows = Vec::with_capacity(picked.len());
        for m in &picked {
            let name = maildir::link_durably_later(&self.dir.join(&m.file), &fdir, &self.host)?;
            rows.push((
                join_rel(&dst_dir, &name),
                m.size,
                m.internal_date,
                m.flags.clone(),
                m.guid.clone(),
            ));
        }
        maildir::sync_dir(&fdir.join("cur"))?;
        let r = self.index().add_messages(to, &rows);
        match r {
            Ok((uv, new)) => {
                self.notify(to);
                Ok((uv, picked.iter().map(|m| m.uid).zip(new).collect()))
            }
            Err(e) => {
                for (rel, ..) in &rows {
                    let _ = std::fs::remove_file(self.dir.join(rel));
                }
                Err(e)
            }
        }
    }

    /// Changes flags (IMAP STORE). Returns the changed messages and, with `unchanged_since`,
    /// the UIDs refused because they changed since. Blocking.
    pub fn store_flags(
        &self,
        folder: &str,
        uids: &[u32],
        op: FlagOp,
        flags: &[String],
        unchanged_since: Option<u64>,
    ) -> Result<(Vec<MessageMeta>, Vec<u32>), StoreError> {
        let r = self
            .index()
            .store_flags(folder, uids, op, flags, unchanged_since)?;
        if !r.0.is_empty() {
            self.notify(folder);
        }
        Ok(r)
    }

    /// What changed in `folder` after `modseq`.
    pub fn changes_since(&self, folder: &str, modseq: u64) -> Result<Changes, StoreError> {
        self.index().changes_since(folder, modseq)
    }

    /// One folder.
    pub fn folder(&self, name: &str) -> Result<Option<FolderInfo>, StoreError> {
        self.index().folder(name)
    }

    /// (messages, unseen) of a folder.
    pub fn counts(&self, name: &str) -> Result<(u32, u32), StoreError> {
        self.index().counts(name)
    }

    /// Creates a folder (and its Maildir++ directory). Blocking.
    pub fn create_folder(&self, name: &str) -> Result<FolderInfo, StoreError> {
        let f = self.index().create_folder(name, None)?;
        maildir::create_tree(&self.dir.join(&f.dir))?;
        Ok(f)
    }

    /// Deletes a folder, its messages and its directory. INBOX cannot be deleted. Blocking.
    pub fn delete_folder(&self, name: &str) -> Result<(), StoreError> {
        if name.eq_ignore_ascii_case("INBOX") {
            return Err(StoreError::NotAllowed("INBOX cannot be deleted"));
        }
        let (f, files) = self.index().delete_folder(name)?;
        for file in files {
            let _ = std::fs::remove_file(self.dir.join(file));
        }
        let _ = std::fs::remove_dir_all(self.dir.join(&f.dir));
        self.notify(name);
        Ok(())
    }

    /// Renames a folder and its sub-folders. Renaming INBOX moves its messages into a new
    /// folder and leaves INBOX empty (RFC 3501 §6.3.5). Blocking.
    pub fn rename_folder(&self, from: &str, to: &str) -> Result<(), StoreError> {
        if from.eq_ignore_ascii_case("INBOX") {
            self.create_folder(to)?;
            let uids: Vec<u32> = self.messages("INBOX")?.iter().map(|m| m.uid).collect();
            self.copy("INBOX", &uids, to, 0)?;
            self.expunge("INBOX", &uids)?;
            return Ok(());
        }
        let moves = self.index().rename_folder(from, to)?;
        for (old, new) in moves {
            let (o, n) = (self.dir.join(&old), self.dir.join(&new));
            if o.exists() {
                std::fs::rename(&o, &n).map_err(|source| StoreError::Io {
                    what: "renaming",
                    path: o,
                    source,
                })?;
            }
        }
        maildir::sync_dir(&self.dir)?;
        self.notify(from);
        Ok(())
    }

    /// Subscribes (`on`) or unsubscribes a folder.
    pub fn set_subscribed(&self, name: &str, on: bool) -> Result<(), StoreError> {
        self.index().set_subscribed(name, on)
    }

    /// Bytes in use across all folders.
    pub fn usage(&self) -> Result<u64, StoreError> {
        self.index().usage()
    }

    /// Every folder.
    pub fn folders(&self) -> Result<Vec<FolderInfo>, StoreError> {
        self.index().folders()
    }

    /// The messages of a folder in UID order.
    pub fn messages(&self, folder: &str) -> Result<Vec<MessageMeta>, StoreError> {
        self.index().messages(folder)
    }

    /// Removes messages (by UID) from a folder: index rows first (one transaction), then the
    /// files. Blocking.
    pub fn expunge(&self, folder: &str, uids: &[u32]) -> Result<usize, StoreError> {
        let files = self.index().remove_messages(folder, uids)?;
        for f in &files {
            let _ = std::fs::remove_file(self.dir.join(f));
        }
        if !files.is_empty() {
            self.notify(folder);
        }
        Ok(files.len())
    }

    /// The full path of a message file.
    pub fn path_of(&self, meta: &MessageMeta) -> PathBuf {
        self.dir.join(&meta.file)
    }

    /// Indexes message files that are in a folder's `cur/` or `new/` but not in the index
    /// (left by a crash between link and commit), and removes stale files from `tmp/`.
    fn reconcile(&self) -> Result<(), StoreError> {
        let folders = self.folders()?;
        for f in folders {
            let fdir = self.dir.join(&f.dir);
            maildir::clean_tmp(&fdir.join("tmp"));
            let known: std::collections::HashSet<String> = self
                .messages(&f.name)?
                .into_iter()
                .map(|m| m.file)
                .collect();
            let prefix = if f.dir.is_empty() {
                String::new()
            } else {
                format!("{}/", f.dir)
            };
            for sub in ["new", "cur"] {
                for name in maildir::list(&fdir.join(sub))? {
                    let rel = format!("{prefix}{sub}/{name}");
                    if known.contains(&rel) {
                        continue;
                    }
                    let path = self.dir.join(&rel);
                    let Ok(data) = std::fs::read(&path) else {
                        continue;
                    };
                    let mtime = std::fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map_or_else(now, |d| d.as_secs() as i64);
                    tracing::info!(file = %path.display(), "indexing a message file found unindexed");
                    // Its delivery key too: the spool that delivered it may not have seen the
                    // `250` and will deliver it again.
                    let guid = content_guid(&data);
                    let size = data.len() as u64;
                    let forget_before = now() - REDELIVERY_WINDOW.as_secs() as i64;
                    match delivery_key(&data) {
                        Some(key) => {
                            let added = self.index().add_delivery(
                                &f.name,
                                &rel,
                                size,
                                mtime,
                                &guid,
                                &key,
                                forget_before,
                            )?;
                            if added.is_err() {
                                tracing::info!(file = %path.display(), "a second copy of a delivered message: removed");
                                let _ = std::fs::remove_file(&path);
                            }
                        }
                        None => {
                            self.index()
                                .add_message(&f.name, &rel, size, mtime, "", &guid)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// A message file's path relative to the mailbox directory.
fn join_rel(folder_dir: &str, name: &str) -> String {
    if folder_dir.is_empty() {
        format!("cur/{name}")
    } else {
        format!("{folder_dir}/cur/{name}")
    }
}

/// How long a delivered message is remembered, so that a redelivery of it is recognised: longer
/// than a spool's retries take after a crash.
pub const REDELIVERY_WINDOW: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// What identifies a delivery of the same message again: its `Message-ID` and a hash of its
/// body. Headers other than `Message-ID` are left out because every hop adds its own
/// (`Received:`, the filter's verdict) and a redelivery passes through them again. `None`
/// without a `Message-ID`: such messages are always stored.
pub fn delivery_key(data: &[u8]) -> Option<String> {
    use sha2::Digest as _;
    let (head, body) = match data.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => (&data[..i + 2], &data[i + 4..]),
        None => return None,
    };
    let mut id: Option<Vec<u8>> = None;
    let mut lines = head.split(|&b| b == b'\n').peekable();
    while let Some(line) = lines.next() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if !line[..colon].eq_ignore_ascii_case(b"message-id") {
            continue;
        }
        let mut value = line[colon + 1..].to_vec();
        // Folded continuation lines belong to the value.
        while let Some(next) = lines.peek() {
            if !next.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
                break;
            }
            let next = next.strip_suffix(b"\r").unwrap_or(next);
            value.extend_from_slice(next);
            lines.next();
        }
        let value: Vec<u8> = value
            .into_iter()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        if !value.is_empty() {
            id = Some(value);
        }
        break;
    }
    let id = id?;
    let mut h = sha2::Sha256::new();
    h.update((id.len() as u64).to_be_bytes());
    h.update(&id);
    h.update(body);
    Some(
        h.finalize()
            .iter()
            .take(16)
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

/// A stable content id: the first 128 bits of SHA-256, hex. Used to verify migrations and as
/// the POP3 UIDL, so it survives moves between filers.
pub fn content_guid(data: &[u8]) -> String {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(data);
    d.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
