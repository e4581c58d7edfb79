//! The per-mailbox index: SQLite in WAL mode with `synchronous=FULL`, because a UID shown to a
//! client (EXISTS, APPENDUID, FETCH) must never be handed out again after a crash.
//!
//! It records, per folder, UIDVALIDITY, UIDNEXT and HIGHESTMODSEQ (IMAP, RFC 3501 and
//! RFC 7162), and per message its UID, file, size, internal date, flags, modseq and a content
//! guid. Expunged UIDs are kept with the modseq of their removal, so sessions (and, later,
//! QRESYNC) can learn what vanished. UIDs and UIDVALIDITY are plain columns, so a migration can
//! copy them unchanged.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use super::{Delivered, StoreError};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS folders (
    id            INTEGER PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    dir           TEXT NOT NULL UNIQUE,
    uidvalidity   INTEGER NOT NULL,
    uidnext       INTEGER NOT NULL DEFAULT 1,
    highestmodseq INTEGER NOT NULL DEFAULT 1,
    special_use   TEXT,
    subscribed    INTEGER NOT NULL DEFAULT 1
) STRICT;
CREATE TABLE IF NOT EXISTS messages (
    folder       INTEGER NOT NULL REFERENCES folders(id),
    uid          INTEGER NOT NULL,
    file         TEXT NOT NULL UNIQUE,
    size         INTEGER NOT NULL,
    internaldate INTEGER NOT NULL,
    flags        TEXT NOT NULL DEFAULT '',
    modseq       INTEGER NOT NULL,
    guid         TEXT NOT NULL,
    PRIMARY KEY (folder, uid)
) STRICT;
CREATE INDEX IF NOT EXISTS messages_modseq ON messages(folder, modseq);
CREATE TABLE IF NOT EXISTS expunged (
    folder INTEGER NOT NULL,
    uid    INTEGER NOT NULL,
    modseq INTEGER NOT NULL,
    PRIMARY KEY (folder, uid)
) STRICT;
CREATE TABLE IF NOT EXISTS usage (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    bytes    INTEGER NOT NULL,
    messages INTEGER NOT NULL
) STRICT;
INSERT OR IGNORE INTO usage (id, bytes, messages) VALUES (1, 0, 0);
CREATE TABLE IF NOT EXISTS deliveries (
    key    TEXT PRIMARY KEY,
    folder TEXT NOT NULL,
    uid    INTEGER NOT NULL,
    at     INTEGER NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS deliveries_at ON deliveries(at);
"#;

/// A folder as the index knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FolderInfo {
    /// The IMAP name (`INBOX`, `Junk`, `Archive/2024`).
    pub name: String,
    /// Its directory relative to the mailbox (`""` for INBOX, `.Junk`).
    pub dir: String,
    /// UIDVALIDITY.
    pub uid_validity: u32,
    /// The next UID to assign.
    pub uid_next: u32,
    /// HIGHESTMODSEQ.
    pub highest_modseq: u64,
    /// The SPECIAL-USE attribute, if any.
    pub special_use: Option<String>,
    /// Whether it is subscribed.
    pub subscribed: bool,
}

/// A message as the index knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageMeta {
    /// Its UID.
    pub uid: u32,
    /// Its file, relative to the mailbox directory.
    pub file: String,
    /// Size in bytes.
    pub size: u64,
    /// Internal date, seconds since the epoch.
    pub internal_date: i64,
    /// Flags, space separated (`\Seen \Flagged`).
    pub flags: String,
    /// Its modseq.
    pub modseq: u64,
    /// Content guid (see `content_guid`).
    pub guid: String,
}

/// How STORE changes flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagOp {
    /// `FLAGS`: replace.
    Replace,
    /// `+FLAGS`: add.
    Add,
    /// `-FLAGS`: remove.
    Remove,
}

/// What changed in a folder since a modseq.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Messages added or changed (new flags), in UID order.
    pub changed: Vec<MessageMeta>,
    /// UIDs expunged.
    pub expunged: Vec<u32>,
    /// The folder's HIGHESTMODSEQ now.
    pub highest_modseq: u64,
}

pub(super) struct Index {
    conn: Connection,
    path: PathBuf,
    seed: u32,
}

fn clamp_u32(v: i64) -> u32 {
    v.clamp(0, i64::from(u32::MAX)) as u32
}

const MESSAGE_COLUMNS: &str = "uid, file, size, internaldate, flags, modseq, guid";

fn message_row(r: &rusqlite::Row<'_>) -> Result<MessageMeta, rusqlite::Error> {
    Ok(MessageMeta {
        uid: clamp_u32(r.get(0)?),
        file: r.get(1)?,
        size: r.get::<_, i64>(2)?.max(0) as u64,
        internal_date: r.get(3)?,
        flags: r.get(4)?,
        modseq: r.get::<_, i64>(5)?.max(0) as u64,
        guid: r.get(6)?,
    })
}

impl Index {
    pub(super) fn open(dir: &Path, seed: u32) -> Result<Self, StoreError> {
        let path = dir.join("index.sqlite");
        let err = |source| StoreError::Index {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        let mut ix = Self {
            conn,
            path,
            seed: seed.max(1),
        };
        ix.ensure_folder("INBOX", None)?;
        Ok(ix)
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        |source| StoreError::Index {
            path: self.path.clone(),
            source,
        }
    }

    /// Runs `f` in one IMMEDIATE transaction; it commits only if `f` succeeds.
    fn write<T>(
        &mut self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError::Index {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let v = f(&tx)?;
        tx.commit().map_err(err)?;
        Ok(v)
    }

    /// The folder `name`, created (with its UIDVALIDITY) if it does not exist.
    pub(super) fn ensure_folder(
        &mut self,
        name: &str,
        special: Option<&str>,
    ) -> Result<FolderInfo, StoreError> {
        if let Some(f) = self.folder(name)? {
            return Ok(f);
        }
        self.create_folder(name, special)?;
        self.folder(name)?
            .ok_or_else(|| StoreError::NoFolder(name.to_owned()))
    }

    /// Creates a folder; [`StoreError::FolderExists`] if it exists.
    pub(super) fn create_folder(
        &mut self,
        name: &str,
        special: Option<&str>,
    ) -> Result<FolderInfo, StoreError> {
        let dir = folder_dir(name);
        let seed = i64::from(self.seed);
        let path = self.path.clone();
        self.write(|tx| {
            let err = |source| StoreError::Index {
                path: path.clone(),
                source,
            };
            let exists = tx
                .query_row("SELECT 1 FROM folders WHERE name = ?1", [name], |_| Ok(()))
                .optional()
                .map_err(err)?
                .is_some();
            if exists {
                return Err(StoreError::FolderExists(name.to_owned()));
            }
            // INBOX takes the seed from the location database; later folders take a value
            // above every one used so far, so a folder deleted and made again gets a new
            // UIDVALIDITY.
            let max: Option<i64> = tx
                .query_row("SELECT MAX(uidvalidity) FROM folders", [], |r| r.get(0))
                .map_err(err)?;
            let uv = match max {
                None => seed,
                Some(m) => (m + 1).max(super::now()).min(i64::from(u32::MAX)),
            };
            tx.execute(
                "INSERT INTO folders (name, dir, uidvalidity, special_use) VALUES (?1, ?2, ?3, ?4)",
                params![name, dir, uv, special],
            )
            .map_err(err)?;
            Ok(())
        })?;
        self.folder(name)?
            .ok_or_else(|| StoreError::NoFolder(name.to_owned()))
    }

    /// Removes a folder and its messages from the index; returns their files.
    pub(super) fn delete_folder(
        &mut self,
        name: &str,
    ) -> Result<(FolderInfo, Vec<String>), StoreError> {
        let f = self
            .folder(name)?
            .ok_or_else(|| StoreError::NoFolder(name.to_owned()))?;
        let path = self.path.clone();
        let files = self.write(|tx| {
            let err = |source| StoreError::Index { path: path.clone(), source };
            let id = folder_id(tx, name, &path)?;
            let files: Vec<(String, i64)> = tx
                .prepare("SELECT file, size FROM messages WHERE folder = ?1")
                .and_then(|mut s| s.query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
                .map_err(err)?;
            let bytes: i64 = files.iter().map(|(_, s)| s).sum();
            tx.execute(
                "UPDATE usage SET bytes = MAX(bytes - ?1, 0), messages = MAX(messages - ?2, 0) WHERE id = 1",
                params![bytes, files.len() as i64],
            )
            .map_err(err)?;
            tx.execute("DELETE FROM messages WHERE folder = ?1", [id]).map_err(err)?;
            tx.execute("DELETE FROM expunged WHERE folder = ?1", [id]).map_err(err)?;
            tx.execute("DELETE FROM folders WHERE id = ?1", [id]).map_err(err)?;
            Ok(files.into_iter().map(|(f, _)| f).collect())
        })?;
        Ok((f, files))
    }

    /// Renames a folder (and its sub-folders) in the index; returns (old dir, new dir) pairs for
    /// the caller to rename on disk.
    pub(super) fn rename_folder(
        &mut self,
        from: &str,
        to: &str,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let path = self.path.clone();
        self.write(|tx| {
            let err = |source| StoreError::Index { path: path.clone(), source };
            let exists = |n: &str| {
                tx.query_row("SELECT 1 FROM folders WHERE name = ?1", [n], |_| Ok(()))
                    .optional()
                    .map(|o| o.is_some())
                    .map_err(err)
            };
            if !exists(from)? {
                return Err(StoreError::NoFolder(from.to_owned()));
            }
            if exists(to)? {
                return Err(StoreError::FolderExists(to.to_owned()));
            }
            let children: Vec<String> = tx
                .prepare("SELECT name FROM folders WHERE name = ?1 OR substr(name, 1, length(?1) + 1) = ?1 || '/'")
                .and_then(|mut s| s.query_map([from], |r| r.get(0))?.collect())
                .map_err(err)?;
            let mut moves = Vec::new();
            for old in children {
                let new = format!("{to}{}", &old[from.len()..]);
                if exists(&new)? {
                    return Err(StoreError::FolderExists(new));
                }
                let (od, nd) = (folder_dir(&old), folder_dir(&new));
                tx.execute("UPDATE folders SET name = ?2, dir = ?3 WHERE name = ?1", params![old, new, nd])
                    .map_err(err)?;
                // Message files are stored relative to the mailbox: re-prefix them.
                tx.execute(
                    "UPDATE messages SET file = ?2 || substr(file, length(?1) + 1)
                     WHERE folder = (SELECT id FROM folders WHERE name = ?3) AND substr(file, 1, length(?1)) = ?1",
                    params![format!("{od}/"), format!("{nd}/"), new],
                )
                .map_err(err)?;
                moves.push((od, nd));
            }
            Ok(moves)
        })
    }

    /// Subscribes or unsubscribes a folder.
    pub(super) fn set_subscribed(&mut self, name: &str, on: bool) -> Result<(), StoreError> {
        let path = self.path.clone();
        self.write(|tx| {
            let n = tx
                .execute(
                    "UPDATE folders SET subscribed = ?2 WHERE name = ?1",
                    params![name, on],
                )
                .map_err(|source| StoreError::Index {
                    path: path.clone(),
                    source,
                })?;
            if n == 0 {
                Err(StoreError::NoFolder(name.to_owned()))
            } else {
                Ok(())
            }
        })
    }

    pub(super) fn folder(&self, name: &str) -> Result<Option<FolderInfo>, StoreError> {
        self.conn
            .prepare_cached(
                "SELECT name, dir, uidvalidity, uidnext, highestmodseq, special_use, subscribed
                 FROM folders WHERE name = ?1",
            )
            .and_then(|mut s| s.query_row([name], folder_row).optional())
            .map_err(self.err())
    }

    pub(super) fn folders(&self) -> Result<Vec<FolderInfo>, StoreError> {
        self.conn
            .prepare_cached(
                "SELECT name, dir, uidvalidity, uidnext, highestmodseq, special_use, subscribed
                 FROM folders ORDER BY name = 'INBOX' DESC, name",
            )
            .and_then(|mut s| s.query_map([], folder_row)?.collect())
            .map_err(self.err())
    }

    /// (messages, unseen) of a folder.
    pub(super) fn counts(&self, name: &str) -> Result<(u32, u32), StoreError> {
        self.conn
            .prepare_cached(
                "SELECT COUNT(*), COALESCE(SUM(instr(' ' || m.flags || ' ', ' \\Seen ') = 0), 0)
                 FROM messages m JOIN folders f ON f.id = m.folder WHERE f.name = ?1",
            )
            .and_then(|mut s| {
                s.query_row([name], |r| Ok((clamp_u32(r.get(0)?), clamp_u32(r.get(1)?))))
            })
            .map_err(self.err())
    }

    pub(super) fn usage(&self) -> Result<u64, StoreError> {
        self.conn
            .query_row("SELECT bytes FROM usage WHERE id = 1", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|b| b.max(0) as u64)
            .map_err(self.err())
    }

    /// Assigns the next UID and modseq of `folder` to a new message, in one transaction.
    pub(super) fn add_message(
        &mut self,
        folder: &str,
        file: &str,
        size: u64,
        internal_date: i64,
        flags: &str,
        guid: &str,
    ) -> Result<Delivered, StoreError> {
        let path = self.path.clone();
        self.write(|tx| insert_message(tx, &path, folder, file, size, internal_date, flags, guid))
    }

    /// A delivery (LMTP) of a message: like [`Index::add_message`], and its delivery key is
    /// recorded in the same transaction, so that a redelivery of the same message (a spool
    /// that did not see the first `250`) is recognised. Keys older than `forget_before` are
    /// dropped. When the key is already there (a redelivery that raced the first one),
    /// nothing is added and `Err` has the earlier delivery: the caller removes its file.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn add_delivery(
        &mut self,
        folder: &str,
        file: &str,
        size: u64,
        internal_date: i64,
        guid: &str,
        key: &str,
        forget_before: i64,
    ) -> Result<Result<Delivered, Delivered>, StoreError> {
        let path = self.path.clone();
        self.write(|tx| {
            let err = |source| StoreError::Index {
                path: path.clone(),
                source,
            };
            if let Some((_, earlier)) = earlier_delivery(tx, key, forget_before).map_err(err)? {
                return Ok(Err(earlier));
            }
            let d = insert_message(tx, &path, folder, file, size, internal_date, "", guid)?;
            tx.prepare_cached("DELETE FROM deliveries WHERE at < ?1")
                .and_then(|mut s| s.execute([forget_before]))
                .map_err(err)?;
            tx.prepare_cached(
                "INSERT OR REPLACE INTO deliveries (key, folder, uid, at) VALUES (?1, ?2, ?3, ?4)",
            )
            .and_then(|mut s| s.execute(params![key, folder, d.uid, internal_date]))
            .map_err(err)?;
            Ok(Ok(d))
        })
    }

    /// The earlier delivery with this key, made at or after `since`, if its folder still
    /// exists: (folder, its UIDVALIDITY, the UID the message got).
    pub(super) fn delivered_before(
        &mut self,
        key: &str,
        since: i64,
    ) -> Result<Option<(String, Delivered)>, StoreError> {
        let path = self.path.clone();
        earlier_delivery(&self.conn, key, since)
            .map_err(|source| StoreError::Index { path, source })
    }

    /// Inserts several messages into `folder` in one transaction (COPY/MOVE); each entry is
    /// (file, size, internal date, flags, guid). Returns the UIDVALIDITY and the new UIDs.
    pub(super) fn add_messages(
        &mut self,
        folder: &str,
        rows: &[(String, u64, i64, String, String)],
    ) -> Result<(u32, Vec<u32>), StoreError> {
        let path = self.path.clone();
        self.write(|tx| {
            let mut uids = Vec::with_capacity(rows.len());
            let mut uv = 0;
            for (file, size, date, flags, guid) in rows {
                let d = insert_message(tx, &path, folder, file, *size, *date, flags, guid)?;
                uv = d.uid_validity;
                uids.push(d.uid);
            }
            if rows.is_empty() {
                uv = tx
                    .query_row(
                        "SELECT uidvalidity FROM folders WHERE name = ?1",
                        [folder],
                        |r| r.get(0),
                    )
                    .map(clamp_u32)
                    .map_err(|source| StoreError::Index {
                        path: path.clone(),
                        source,
                    })?;
            }
            Ok((uv, uids))
        })
    }

    /// Makes folder `name` carry exactly the given UIDVALIDITY, SPECIAL-USE and subscription,
    /// and a UIDNEXT of at least `uid_next` (a migration copying a folder from another filer).
    /// A folder that exists with another UIDVALIDITY may only be changed while it is empty.
    pub(super) fn import_folder(
        &mut self,
        name: &str,
        uid_validity: u32,
        uid_next: u32,
        special: Option<&str>,
        subscribed: bool,
    ) -> Result<FolderInfo, StoreError> {
        let dir = folder_dir(name);
        let path = self.path.clone();
        self.write(|tx| {
            let err = |source| StoreError::Index {
                path: path.clone(),
                source,
            };
            let current: Option<(i64, i64)> = tx
                .query_row(
                    "SELECT id, uidvalidity FROM folders WHERE name = ?1",
                    [name],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(err)?;
            match current {
                None => {
                    tx.execute(
                        "INSERT INTO folders (name, dir, uidvalidity, uidnext, special_use, subscribed)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        params![name, dir, uid_validity, uid_next.max(1), special, subscribed],
                    )
                    .map_err(err)?;
                }
                Some((id, uv)) => {
                    if uv != i64::from(uid_validity) {
                        let count: i64 = tx
                            .query_row("SELECT COUNT(*) FROM messages WHERE folder = ?1", [id], |r| {
                                r.get(0)
                            })
                            .map_err(err)?;
                        if count > 0 {
                            return Err(StoreError::NotAllowed(
                                "the folder holds messages under another UIDVALIDITY",
                            ));
                        }
                        tx.execute("DELETE FROM expunged WHERE folder = ?1", [id])
                            .map_err(err)?;
                    }
                    tx.execute(
                        "UPDATE folders SET uidvalidity = ?2, uidnext = MAX(uidnext, ?3),
                         special_use = ?4, subscribed = ?5 WHERE id = ?1",
                        params![id, uid_validity, uid_next.max(1), special, subscribed],
                    )
                    .map_err(err)?;
                }
            }
            Ok(())
        })?;
        self.folder(name)?
            .ok_or_else(|| StoreError::NoFolder(name.to_owned()))
    }

    /// Inserts a message under the given UID (a migration), unless that UID is already there;
    /// returns whether it was inserted. UIDNEXT stays above every UID.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn import_message(
        &mut self,
        folder: &str,
        uid: u32,
        file: &str,
        size: u64,
        internal_date: i64,
        flags: &str,
        guid: &str,
    ) -> Result<bool, StoreError> {
        let path = self.path.clone();
        self.write(|tx| {
            let err = |source| StoreError::Index {
                path: path.clone(),
                source,
            };
            let id = folder_id(tx, folder, &path)?;
            let exists = tx
                .query_row(
                    "SELECT 1 FROM messages WHERE folder = ?1 AND uid = ?2",
                    params![id, uid],
                    |_| Ok(()),
                )
                .optional()
                .map_err(err)?
                .is_some();
            if exists {
                return Ok(false);
            }
            let modseq: i64 = tx
                .query_row(
                    "SELECT highestmodseq + 1 FROM folders WHERE id = ?1",
                    [id],
                    |r| r.get(0),
                )
                .map_err(err)?;
            let size_i = i64::try_from(size).unwrap_or(i64::MAX);
            tx.execute(
                "INSERT INTO messages (folder, uid, file, size, internaldate, flags, modseq, guid)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![id, uid, file, size_i, internal_date, flags, modseq, guid],
            )
            .map_err(err)?;
            tx.execute(
                "UPDATE folders SET uidnext = MAX(uidnext, ?2), highestmodseq = ?3 WHERE id = ?1",
                params![id, i64::from(uid) + 1, modseq],
            )
            .map_err(err)?;
            tx.execute(
                "UPDATE usage SET bytes = bytes + ?1, messages = messages + 1 WHERE id = 1",
                [size_i],
            )
            .map_err(err)?;
            Ok(true)
        })
    }

    /// Whether `folder` holds a message with this UID.
    pub(super) fn has_uid(&self, folder: &str, uid: u32) -> Result<bool, StoreError> {
        self.conn
            .prepare_cached(
                "SELECT 1 FROM messages WHERE folder = (SELECT id FROM folders WHERE name = ?1) AND uid = ?2",
            )
            .and_then(|mut s| s.query_row(params![folder, uid], |_| Ok(())).optional())
            .map(|o| o.is_some())
            .map_err(self.err())
    }

    pub(super) fn messages(&self, folder: &str) -> Result<Vec<MessageMeta>, StoreError> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE folder = (SELECT id FROM folders WHERE name = ?1) ORDER BY uid"
            ))
            .and_then(|mut s| s.query_map([folder], message_row)?.collect())
            .map_err(self.err())
    }

    /// Messages of `folder` changed or added after `modseq`, and UIDs expunged after it.
    pub(super) fn changes_since(&self, folder: &str, modseq: u64) -> Result<Changes, StoreError> {
        let m = i64::try_from(modseq).unwrap_or(i64::MAX);
        let err = self.err();
        let changed = self
            .conn
            .prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages
                 WHERE folder = (SELECT id FROM folders WHERE name = ?1) AND modseq > ?2 ORDER BY uid"
            ))
            .and_then(|mut s| s.query_map(params![folder, m], message_row)?.collect())
            .map_err(&err)?;
        let expunged = self
            .conn
            .prepare_cached(
                "SELECT uid FROM expunged WHERE folder = (SELECT id FROM folders WHERE name = ?1) AND modseq > ?2
                 ORDER BY uid",
            )
            .and_then(|mut s| s.query_map(params![folder, m], |r| r.get::<_, i64>(0).map(clamp_u32))?.collect())
            .map_err(&err)?;
        let highest_modseq = self.folder(folder)?.map_or(0, |f| f.highest_modseq);
        Ok(Changes {
            changed,
            expunged,
            highest_modseq,
        })
    }

    /// Changes flags of `uids` in one transaction. With `unchanged_since` (CONDSTORE), messages
    /// whose modseq is higher are left alone and returned in the second list. Messages whose
    /// flags do not change keep their modseq.
    pub(super) fn store_flags(
        &mut self,
        folder: &str,
        uids: &[u32],
        op: FlagOp,
        flags: &[String],
        unchanged_since: Option<u64>,
    ) -> Result<(Vec<MessageMeta>, Vec<u32>), StoreError> {
        let path = self.path.clone();
        self.write(|tx| {
            let err = |source| StoreError::Index { path: path.clone(), source };
            let id = folder_id(tx, folder, &path)?;
            let mut modseq: i64 = tx
                .query_row("SELECT highestmodseq FROM folders WHERE id = ?1", [id], |r| r.get(0))
                .map_err(err)?;
            let mut changed = Vec::new();
            let mut refused = Vec::new();
            {
                let mut sel = tx
                    .prepare_cached(&format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE folder = ?1 AND uid = ?2"))
                    .map_err(err)?;
                let mut upd = tx
                    .prepare_cached("UPDATE messages SET flags = ?3, modseq = ?4 WHERE folder = ?1 AND uid = ?2")
                    .map_err(err)?;
                for &uid in uids {
                    let Some(mut m) = sel.query_row(params![id, uid], message_row).optional().map_err(err)? else {
                        continue;
                    };
                    if unchanged_since.is_some_and(|u| m.modseq > u) {
                        refused.push(uid);
                        continue;
                    }
                    let new = apply_flags(&m.flags, op, flags);
                    if new == m.flags {
                        continue;
                    }
                    modseq += 1;
                    upd.execute(params![id, uid, new, modseq]).map_err(err)?;
                    m.flags = new;
                    m.modseq = modseq as u64;
                    changed.push(m);
                }
            }
            tx.execute("UPDATE folders SET highestmodseq = ?2 WHERE id = ?1", params![id, modseq]).map_err(err)?;
            Ok((changed, refused))
        })
    }

    /// Removes messages from the index in one transaction, leaving tombstones; returns their
    /// files.
    pub(super) fn remove_messages(
        &mut self,
        folder: &str,
        uids: &[u32],
    ) -> Result<Vec<String>, StoreError> {
        let path = self.path.clone();
        self.write(|tx| {
            let err = |source| StoreError::Index { path: path.clone(), source };
            let id = folder_id(tx, folder, &path)?;
            let mut modseq: i64 = tx
                .query_row("SELECT highestmodseq FROM folders WHERE id = ?1", [id], |r| r.get(0))
                .map_err(err)?;
            let mut files = Vec::new();
            {
                let mut sel =
                    tx.prepare_cached("SELECT file, size FROM messages WHERE folder = ?1 AND uid = ?2").map_err(err)?;
                let mut del = tx.prepare_cached("DELETE FROM messages WHERE folder = ?1 AND uid = ?2").map_err(err)?;
                let mut tomb = tx
                    .prepare_cached("INSERT OR REPLACE INTO expunged (folder, uid, modseq) VALUES (?1, ?2, ?3)")
                    .map_err(err)?;
                let mut upd = tx
                    .prepare_cached(
                        "UPDATE usage SET bytes = MAX(bytes - ?1, 0), messages = MAX(messages - 1, 0) WHERE id = 1",
                    )
                    .map_err(err)?;
                for uid in uids {
                    let row: Option<(String, i64)> =
                        sel.query_row(params![id, uid], |r| Ok((r.get(0)?, r.get(1)?))).optional().map_err(err)?;
                    if let Some((file, size)) = row {
                        modseq += 1;
                        del.execute(params![id, uid]).map_err(err)?;
                        tomb.execute(params![id, uid, modseq]).map_err(err)?;
                        upd.execute([size]).map_err(err)?;
                        files.push(file);
                    }
                }
            }
            tx.execute("UPDATE folders SET highestmodseq = ?2 WHERE id = ?1", params![id, modseq]).map_err(err)?;
            Ok(files)
        })
    }
}

fn folder_id(tx: &Transaction<'_>, folder: &str, path: &Path) -> Result<i64, StoreError> {
    tx.query_row("SELECT id FROM folders WHERE name = ?1", [folder], |r| {
        r.get(0)
    })
    .optional()
    .map_err(|source| StoreError::Index {
        path: path.to_owned(),
        source,
    })?
    .ok_or_else(|| StoreError::NoFolder(folder.to_owned()))
}

fn earlier_delivery(
    conn: &Connection,
    key: &str,
    since: i64,
) -> rusqlite::Result<Option<(String, Delivered)>> {
    conn.prepare_cached(
        "SELECT d.folder, f.uidvalidity, d.uid FROM deliveries d
         JOIN folders f ON f.name = d.folder WHERE d.key = ?1 AND d.at >= ?2",
    )?
    .query_row(params![key, since], |r| {
        Ok((
            r.get::<_, String>(0)?,
            Delivered {
                uid_validity: clamp_u32(r.get(1)?),
                uid: clamp_u32(r.get(2)?),
            },
        ))
    })
    .optional()
}

#[allow(clippy::too_many_arguments)]
fn insert_message(
    tx: &Transaction<'_>,
    path: &Path,
    folder: &str,
    file: &str,
    size: u64,
    internal_date: i64,
    flags: &str,
    guid: &str,
) -> Result<Delivered, StoreError> {
    let err = |source| StoreError::Index {
        path: path.to_owned(),
        source,
    };
    let row: Option<(i64, i64, i64, i64)> = tx
        .query_row(
            "SELECT id, uidvalidity, uidnext, highestmodseq + 1 FROM folders WHERE name = ?1",
            [folder],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()
        .map_err(err)?;
    let Some((id, uv, uid, modseq)) = row else {
        return Err(StoreError::NoFolder(folder.to_owned()));
    };
    let size_i = i64::try_from(size).unwrap_or(i64::MAX);
    tx.prepare_cached(
        "INSERT INTO messages (folder, uid, file, size, internaldate, flags, modseq, guid)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .and_then(|mut s| {
        s.execute(params![
            id,
            uid,
            file,
            size_i,
            internal_date,
            flags,
            modseq,
            guid
        ])
    })
    .map_err(err)?;
    tx.prepare_cached("UPDATE folders SET uidnext = ?2, highestmodseq = ?3 WHERE id = ?1")
        .and_then(|mut s| s.execute(params![id, uid + 1, modseq]))
        .map_err(err)?;
    tx.prepare_cached("UPDATE usage SET bytes = bytes + ?1, messages = messages + 1 WHERE id = 1")
        .and_then(|mut s| s.execute([size_i]))
        .map_err(err)?;
    Ok(Delivered {
        uid_validity: clamp_u32(uv),
        uid: clamp_u32(uid),
    })
}

/// Applies a STORE operation to a space-separated flag list. Flags compare case-insensitively
/// (RFC 3501 §2.3.2); the result keeps the first spelling seen and a stable order.
pub(crate) fn apply_flags(current: &str, op: FlagOp, flags: &[String]) -> String {
    let mut out: Vec<&str> = match op {
        FlagOp::Replace => Vec::new(),
        _ => current.split(' ').filter(|f| !f.is_empty()).collect(),
    };
    match op {
        FlagOp::Replace | FlagOp::Add => {
            for f in flags {
                if !out.iter().any(|o| o.eq_ignore_ascii_case(f)) {
                    out.push(f);
                }
            }
        }
        FlagOp::Remove => out.retain(|o| !flags.iter().any(|f| f.eq_ignore_ascii_case(o))),
    }
    out.join(" ")
}

fn folder_row(r: &rusqlite::Row<'_>) -> Result<FolderInfo, rusqlite::Error> {
    Ok(FolderInfo {
        name: r.get(0)?,
        dir: r.get(1)?,
        uid_validity: clamp_u32(r.get(2)?),
        uid_next: clamp_u32(r.get(3)?),
        highest_modseq: r.get::<_, i64>(4)?.max(0) as u64,
        special_use: r.get(5)?,
        subscribed: r.get::<_, i64>(6)? != 0,
    })
}

/// The Maildir++ directory of a folder: `""` for INBOX, else `.` followed by the name with the
/// hierarchy separator `/` as `.`, and every byte outside `[A-Za-z0-9 _-]` as `%XX`. So no
/// folder name can produce `..`, a `/`, or collide with `cur`, `new` or `tmp`.
pub(super) fn folder_dir(name: &str) -> String {
    if name.eq_ignore_ascii_case("INBOX") {
        return String::new();
    }
    let mut out = String::from(".");
    for b in name.bytes() {
        match b {
            b'/' => out.push('.'),
            b if b.is_ascii_alphanumeric() || matches!(b, b' ' | b'_' | b'-') => {
                out.push(b as char)
            }
            b => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
