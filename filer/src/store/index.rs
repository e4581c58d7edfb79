//! The per-mailbox index: SQLite in WAL mode with `synchronous=FULL`, because a UID shown to a
//! client (EXISTS, APPENDUID, FETCH) must never be handed out again after a crash.
//!
//! It records, per folder, UIDVALIDITY, UIDNEXT and HIGHESTMODSEQ (IMAP, RFC 3501 and
//! RFC 7162), and per message its UID, file, size, internal date, flags, modseq and a content
//! guid. UIDs and UIDVALIDITY are plain columns, so a migration can copy them unchanged.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

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
CREATE TABLE IF NOT EXISTS usage (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    bytes    INTEGER NOT NULL,
    messages INTEGER NOT NULL
) STRICT;
INSERT OR IGNORE INTO usage (id, bytes, messages) VALUES (1, 0, 0);
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

pub(super) struct Index {
    conn: Connection,
    path: PathBuf,
    seed: u32,
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

    /// The folder `name`, created (with its UIDVALIDITY) if it does not exist.
    pub(super) fn ensure_folder(
        &mut self,
        name: &str,
        special: Option<&str>,
    ) -> Result<FolderInfo, StoreError> {
        if let Some(f) = self.folder(name)? {
            return Ok(f);
        }
        let dir = folder_dir(name);
        let seed = i64::from(self.seed);
        let path = self.path.clone();
        let err = move |source| StoreError::Index {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        // INBOX takes the seed from the location database; later folders take a value above
        // every one used so far, so a folder deleted and made again gets a new UIDVALIDITY.
        let max: Option<i64> = tx
            .query_row("SELECT MAX(uidvalidity) FROM folders", [], |r| r.get(0))
            .map_err(&err)?;
        let uv = match max {
            None => seed,
            Some(m) => (m + 1).max(super::now()).min(i64::from(u32::MAX)),
        };
        tx.execute(
            "INSERT OR IGNORE INTO folders (name, dir, uidvalidity, special_use) VALUES (?1, ?2, ?3, ?4)",
            params![name, dir, uv, special],
        )
        .map_err(&err)?;
        tx.commit().map_err(&err)?;
        self.folder(name)?
            .ok_or_else(|| StoreError::NoFolder(name.to_owned()))
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
        let err = move |source| StoreError::Index {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        let row: Option<(i64, i64, i64, i64)> = tx
            .query_row(
                "SELECT id, uidvalidity, uidnext, highestmodseq + 1 FROM folders WHERE name = ?1",
                [folder],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(&err)?;
        let Some((id, uv, uid, modseq)) = row else {
            return Err(StoreError::NoFolder(folder.to_owned()));
        };
        let size_i = i64::try_from(size).unwrap_or(i64::MAX);
        tx.execute(
            "INSERT INTO messages (folder, uid, file, size, internaldate, flags, modseq, guid)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![id, uid, file, size_i, internal_date, flags, modseq, guid],
        )
        .map_err(&err)?;
        tx.execute(
            "UPDATE folders SET uidnext = ?2, highestmodseq = ?3 WHERE id = ?1",
            params![id, uid + 1, modseq],
        )
        .map_err(&err)?;
        tx.execute(
            "UPDATE usage SET bytes = bytes + ?1, messages = messages + 1 WHERE id = 1",
            [size_i],
        )
        .map_err(&err)?;
        tx.commit().map_err(&err)?;
        Ok(Delivered {
            uid_validity: uv.clamp(0, i64::from(u32::MAX)) as u32,
            uid: uid.clamp(0, i64::from(u32::MAX)) as u32,
        })
    }

    pub(super) fn messages(&self, folder: &str) -> Result<Vec<MessageMeta>, StoreError> {
        self.conn
            .prepare_cached(
                "SELECT m.uid, m.file, m.size, m.internaldate, m.flags, m.modseq, m.guid
                 FROM messages m JOIN folders f ON f.id = m.folder WHERE f.name = ?1 ORDER BY m.uid",
            )
            .and_then(|mut s| {
                s.query_map([folder], |r| {
                    Ok(MessageMeta {
                        uid: r.get::<_, i64>(0)?.clamp(0, i64::from(u32::MAX)) as u32,
                        file: r.get(1)?,
                        size: r.get::<_, i64>(2)?.max(0) as u64,
                        internal_date: r.get(3)?,
                        flags: r.get(4)?,
                        modseq: r.get::<_, i64>(5)?.max(0) as u64,
                        guid: r.get(6)?,
                    })
                })?
                .collect()
            })
            .map_err(self.err())
    }

    /// Removes messages from the index in one transaction; returns their files.
    pub(super) fn remove_messages(
        &mut self,
        folder: &str,
        uids: &[u32],
    ) -> Result<Vec<String>, StoreError> {
        let path = self.path.clone();
        let err = move |source| StoreError::Index {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        let id: Option<i64> = tx
            .query_row("SELECT id FROM folders WHERE name = ?1", [folder], |r| {
                r.get(0)
            })
            .optional()
            .map_err(&err)?;
        let Some(id) = id else {
            return Err(StoreError::NoFolder(folder.to_owned()));
        };
        let mut files = Vec::new();
        {
            let mut sel = tx
                .prepare("SELECT file, size FROM messages WHERE folder = ?1 AND uid = ?2")
                .map_err(&err)?;
            let mut del = tx
                .prepare("DELETE FROM messages WHERE folder = ?1 AND uid = ?2")
                .map_err(&err)?;
            let mut upd = tx
                .prepare("UPDATE usage SET bytes = MAX(bytes - ?1, 0), messages = MAX(messages - 1, 0) WHERE id = 1")
                .map_err(&err)?;
            for uid in uids {
                let row: Option<(String, i64)> = sel
                    .query_row(params![id, uid], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
                    .map_err(&err)?;
                if let Some((file, size)) = row {
                    del.execute(params![id, uid]).map_err(&err)?;
                    upd.execute([size]).map_err(&err)?;
                    files.push(file);
                }
            }
        }
        tx.execute(
            "UPDATE folders SET highestmodseq = highestmodseq + 1 WHERE id = ?1",
            [id],
        )
        .map_err(&err)?;
        tx.commit().map_err(&err)?;
        Ok(files)
    }
}

fn folder_row(r: &rusqlite::Row<'_>) -> Result<FolderInfo, rusqlite::Error> {
    Ok(FolderInfo {
        name: r.get(0)?,
        dir: r.get(1)?,
        uid_validity: r.get::<_, i64>(2)?.clamp(0, i64::from(u32::MAX)) as u32,
        uid_next: r.get::<_, i64>(3)?.clamp(0, i64::from(u32::MAX)) as u32,
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
