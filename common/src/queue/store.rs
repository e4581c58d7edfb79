//! The queue directory: files, fsyncs, locks. Every function blocks: call it from
//! `spawn_blocking` (or from a command-line tool).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::{DirSync, Envelope, QueueId};

const MSG: &str = "msg";
const ENV: &str = "env";
const CTL: &str = "ctl";

/// Why a queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing the queue directory failed.
    #[error("queue i/o error on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An envelope file could not be read as one.
    #[error("corrupt envelope {path}: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// Another process holds the entry's lock and did not let go in time.
    #[error("queue entry {0} is locked by another process")]
    Locked(QueueId),
}

impl StoreError {
    /// Whether the disk (or the quota) is full: the caller answers `452 4.3.1`.
    pub fn is_full(&self) -> bool {
        match self {
            Self::Io { source, .. } => is_full(source),
            _ => false,
        }
    }

    /// The SMTP reply when the queue cannot take a message: `452 4.3.1` for a full disk
    /// (RFC 3463), `451 4.3.0` otherwise. Logs the cause.
    pub fn reply(&self) -> crate::smtp::Reply {
        if self.is_full() {
            tracing::error!(error = %self, "queue disk full");
            crate::smtp::Reply::temp(452, "4.3.1", "insufficient system storage")
        } else {
            tracing::error!(error = %self, "queue write failed");
            crate::smtp::Reply::temp(451, "4.3.0", "local error in processing, try again later")
        }
    }

    fn io(path: &Path) -> impl FnOnce(io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Whether an I/O error means "no space left" (ENOSPC or EDQUOT).
pub(crate) fn is_full(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// A queue directory. Cheap to clone; clones share the group commit.
#[derive(Debug, Clone)]
pub struct Queue {
    dir: PathBuf,
    sync: Arc<DirSync>,
}

/// The exclusive lock on one entry; released when dropped.
#[derive(Debug)]
pub struct EntryLock {
    file: File,
    id: QueueId,
}

impl EntryLock {
    /// The locked entry.
    pub fn id(&self) -> &QueueId {
        &self.id
    }
}

impl Drop for EntryLock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

impl Queue {
    /// Opens the queue in `dir`, creating it (mode 0700) if needed. Nothing is cleaned: see
    /// [`Queue::recover`].
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        for d in [dir.to_owned(), dir.join(CTL)] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .map_err(StoreError::io(&d))?;
        }
        Ok(Self {
            dir: dir.to_owned(),
            sync: Arc::new(DirSync::new(dir.to_owned())),
        })
    }

    /// The queue directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// At service start, before anything is written: removes what a crash left half-done
    /// (temporary envelopes, message files that were never committed) and returns every
    /// entry. Only the service that owns the queue may call it, and only before it accepts
    /// mail, since a message being received has no envelope yet.
    pub fn recover(&self) -> Result<Vec<Envelope>, StoreError> {
        let mut removed = 0usize;
        for name in self.names()? {
            let path = self.dir.join(&name);
            // A message without envelope was never acknowledged; nor was an envelope whose
            // message did not survive (the directory fsync of its commit never finished).
            let orphan = if name.ends_with(".env.tmp") {
                true
            } else if let Some(stem) = name.strip_suffix(".msg") {
                !self.dir.join(format!("{stem}.{ENV}")).exists()
            } else if let Some(stem) = name.strip_suffix(".env") {
                !self.dir.join(format!("{stem}.{MSG}")).exists()
            } else {
                false
            };
            if orphan {
                fs::remove_file(&path).map_err(StoreError::io(&path))?;
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(removed, "removed uncommitted queue files");
            self.sync_dir()?;
        }
        self.list()
    }

    /// Every entry, oldest first. A corrupt envelope is logged and skipped.
    pub fn list(&self) -> Result<Vec<Envelope>, StoreError> {
        let mut ids: Vec<QueueId> = self
            .names()?
            .iter()
            .filter_map(|n| n.strip_suffix(".env"))
            .filter_map(|stem| stem.parse().ok())
            .collect();
        ids.sort();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            match self.load(&id) {
                Ok(Some(env)) => out.push(env),
                Ok(None) => {} // removed meanwhile
                Err(e) => tracing::error!(queue_id = %id, error = %e, "skipping a queue entry"),
            }
        }
        Ok(out)
    }

    /// Creates the message file of a new entry, exclusively, mode 0600. Write the message into
    /// it, then [`commit`](Self::commit) it or [`discard`](Self::discard) it.
    pub fn create(&self) -> Result<(QueueId, File), StoreError> {
        loop {
            let id = QueueId::generate();
            let path = self.msg_path(&id);
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(f) => return Ok((id, f)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(StoreError::io(&path)(e)),
            }
        }
    }

    /// Makes a new entry durable: fsyncs the message file, writes the envelope and fsyncs the
    /// directory (shared with concurrent commits). Only after this returns `Ok` may the
    /// message be acknowledged. On error the message file is removed.
    pub fn commit(&self, message: File, envelope: &Envelope) -> Result<(), StoreError> {
        let path = self.msg_path(&envelope.id);
        let result = message
            .sync_all()
            .map_err(StoreError::io(&path))
            .and_then(|()| self.write_envelope(envelope))
            .and_then(|()| self.sync_dir());
        if result.is_err() {
            let _ = fs::remove_file(self.env_path(&envelope.id));
            let _ = fs::remove_file(&path);
        }
        result
    }

    /// Removes the message file of an entry that was never committed.
    pub fn discard(&self, id: &QueueId) {
        let _ = fs::remove_file(self.msg_path(id));
    }

    /// The envelope of an entry; `None` when there is no such entry.
    pub fn load(&self, id: &QueueId) -> Result<Option<Envelope>, StoreError> {
        let path = self.env_path(id);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io(&path)(e)),
        };
        let env: Envelope = serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if env.id != *id {
            return Err(StoreError::Corrupt {
                path,
                message: format!("holds the envelope of {}", env.id),
            });
        }
        Ok(Some(env))
    }

    /// The message of an entry.
    pub fn read_message(&self, id: &QueueId) -> Result<Vec<u8>, StoreError> {
        let path = self.msg_path(id);
        fs::read(&path).map_err(StoreError::io(&path))
    }

    /// Replaces an entry's envelope atomically and durably. The caller holds its lock.
    pub fn update(&self, envelope: &Envelope) -> Result<(), StoreError> {
        self.write_envelope(envelope)?;
        self.sync_dir()
    }

    /// Removes an entry durably: the envelope first (so the entry is gone at once), then
    /// the message. The caller holds its lock.
    pub fn remove(&self, id: &QueueId) -> Result<(), StoreError> {
        for path in [self.env_path(id), self.msg_path(id)] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io(&path)(e)),
            }
        }
        self.sync_dir()
    }

    /// Takes the entry's exclusive lock if nobody holds it. `Ok(None)`: someone does, or the
    /// entry is gone.
    pub fn try_lock(&self, id: &QueueId) -> Result<Option<EntryLock>, StoreError> {
        let path = self.msg_path(id);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io(&path)(e)),
        };
        match file.try_lock() {
            Ok(()) => Ok(Some(EntryLock {
                file,
                id: id.clone(),
            })),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(StoreError::io(&path)(e)),
        }
    }

    /// Takes the entry's lock, waiting up to `wait` for its holder (a delivery attempt in
    /// progress). `Ok(None)` when there is no such entry.
    pub fn lock_wait(&self, id: &QueueId, wait: Duration) -> Result<Option<EntryLock>, StoreError> {
        // std::time::Instant is disallowed in this workspace; count polls instead.
        const POLL: Duration = Duration::from_millis(20);
        let mut left = wait;
        loop {
            if !self.msg_path(id).exists() {
                return Ok(None);
            }
            if let Some(lock) = self.try_lock(id)? {
                return Ok(Some(lock));
            }
            if left.is_zero() {
                return Err(StoreError::Locked(id.clone()));
            }
            std::thread::sleep(POLL.min(left));
            left = left.saturating_sub(POLL);
        }
    }

    /// Leaves a notice that entry `id` changed, for a running service to look at it again.
    pub fn notify(&self, id: &QueueId) -> Result<(), StoreError> {
        let path = self.dir.join(CTL).join(id.as_str());
        File::create(&path).map(drop).map_err(StoreError::io(&path))
    }

    /// Takes (and removes) the notices left by [`notify`](Self::notify).
    pub fn take_notifications(&self) -> Result<Vec<QueueId>, StoreError> {
        let dir = self.dir.join(CTL);
        let mut ids = Vec::new();
        for entry in fs::read_dir(&dir).map_err(StoreError::io(&dir))? {
            let entry = entry.map_err(StoreError::io(&dir))?;
            let _ = fs::remove_file(entry.path());
            if let Some(id) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    fn write_envelope(&self, envelope: &Envelope) -> Result<(), StoreError> {
        let tmp = self.dir.join(format!("{}.{ENV}.tmp", envelope.id));
        let json = serde_json::to_vec(envelope).map_err(|e| StoreError::Corrupt {
            path: tmp.clone(),
            message: e.to_string(),
        })?;
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::io(&tmp)(e));
        }
        let path = self.env_path(&envelope.id);
        fs::rename(&tmp, &path).map_err(StoreError::io(&path))
    }

    fn sync_dir(&self) -> Result<(), StoreError> {
        self.sync.sync().map_err(StoreError::io(&self.dir))
    }

    fn names(&self) -> Result<Vec<String>, StoreError> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(StoreError::io(&self.dir))? {
            let entry = entry.map_err(StoreError::io(&self.dir))?;
            if let Ok(name) = entry.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn msg_path(&self, id: &QueueId) -> PathBuf {
        self.dir.join(format!("{id}.{MSG}"))
    }

    fn env_path(&self, id: &QueueId) -> PathBuf {
        self.dir.join(format!("{id}.{ENV}"))
    }
}
