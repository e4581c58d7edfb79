//! Durable Maildir file operations (the order from DESIGN.md, strace-verified in the notes).

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::StoreError;

/// Files in `tmp/` older than this are leftovers of a crash (the Maildir spec says 36 hours;
/// a delivery here never takes more than minutes).
const STALE_TMP: Duration = Duration::from_secs(3600);

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Io { what, path, source }
}

/// Creates `dir/{cur,new,tmp}` (mode 0700) if missing, fsyncing the parents it changed.
pub(super) fn create_tree(dir: &Path) -> Result<(), StoreError> {
    if dir.join("cur").is_dir() && dir.join("new").is_dir() && dir.join("tmp").is_dir() {
        return Ok(());
    }
    let mut b = fs::DirBuilder::new();
    b.recursive(true).mode(0o700);
    for sub in ["cur", "new", "tmp"] {
        b.create(dir.join(sub))
            .map_err(io("creating", &dir.join(sub)))?;
    }
    // Make the new directories durable: fsync the mailbox directory and its parent.
    for d in [Some(dir), dir.parent()].into_iter().flatten() {
        File::open(d)
            .and_then(|f| f.sync_all())
            .map_err(io("fsyncing", d))?;
    }
    Ok(())
}

/// Writes `data` to a new file in `dir/tmp` (exclusive create, 0600), fsyncs it, links it into
/// `dir/cur` under a unique name (link fails rather than replace an existing file), removes the
/// tmp name and fsyncs `dir/cur`. Returns the name in `cur/`.
pub(super) fn write_durably(dir: &Path, host: &str, data: &[u8]) -> Result<String, StoreError> {
    let base = unique_name(host);
    let tmp = dir.join("tmp").join(&base);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("creating", &tmp))?;
        f.write_all(data).map_err(io("writing", &tmp))?;
        f.sync_all().map_err(io("fsyncing", &tmp))?;
        let name = format!("{base},S={}:2,", data.len());
        let cur = dir.join("cur");
        let target = cur.join(&name);
        fs::hard_link(&tmp, &target).map_err(io("linking", &target))?;
        let _ = fs::remove_file(&tmp);
        File::open(&cur)
            .and_then(|d| d.sync_all())
            .map_err(io("fsyncing", &cur))?;
        Ok(name)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Hard-links an existing message file into `dir/cur` under a new unique name (a COPY costs no
/// data). The caller fsyncs `dir/cur` once for a batch ([`sync_dir`]).
pub(super) fn link_durably_later(src: &Path, dir: &Path, host: &str) -> Result<String, StoreError> {
    let size = fs::metadata(src).map_err(io("reading", src))?.len();
    let name = format!("{},S={size}:2,", unique_name(host));
    let target = dir.join("cur").join(&name);
    match fs::hard_link(src, &target) {
        Ok(()) => Ok(name),
        // Another filesystem: copy and fsync instead.
        Err(_) => {
            let data = fs::read(src).map_err(io("reading", src))?;
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&target)
                .map_err(io("creating", &target))?;
            f.write_all(&data).map_err(io("writing", &target))?;
            f.sync_all().map_err(io("fsyncing", &target))?;
            Ok(name)
        }
    }
}

/// fsyncs a directory.
pub(super) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsyncing", dir))
}

/// A Maildir unique name: `<secs>.M<usecs>P<pid>Q<seq>.<host>`.
fn unique_name(host: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "{}.M{}P{}Q{}.{host}",
        now.as_secs(),
        now.subsec_micros(),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// The file names in a directory (missing directory: none).
pub(super) fn list(dir: &Path) -> Result<Vec<String>, StoreError> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("listing", dir)(e)),
    };
    let mut names = Vec::new();
    for entry in rd {
        let entry = entry.map_err(io("listing", dir))?;
        if entry.file_type().map(|t| t.is_file()).unwrap_or(false)
            && let Ok(n) = entry.file_name().into_string()
        {
            names.push(n);
        }
    }
    Ok(names)
}

/// Removes files in `tmp/` older than [`STALE_TMP`].
pub(super) fn clean_tmp(tmp: &Path) {
    let Ok(rd) = fs::read_dir(tmp) else { return };
    for entry in rd.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_TMP);
        if old {
            let _ = fs::remove_file(entry.path());
        }
    }
}
