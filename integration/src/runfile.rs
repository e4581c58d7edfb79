//! The run file `mailctl up` keeps in `<data_dir>/run/mailctl.json`, so `mailctl status` can
//! find the running platform and its listeners.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What a running `mailctl up` publishes about itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RunInfo {
    /// The process id.
    pub pid: u32,
    /// Start time, seconds since the Unix epoch.
    pub started: u64,
    /// Every listener: (service, protocol, address).
    pub listeners: Vec<Listener>,
}

/// One bound listener.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Listener {
    /// The service instance (`filer1`, `spool`, ...).
    pub service: String,
    /// The protocol (`lmtp`, `imap`, ...).
    pub protocol: String,
    /// The bound address.
    pub address: String,
}

/// The run file's path.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("run").join("mailctl.json")
}

/// Writes the run file atomically.
pub fn write(data_dir: &Path, info: &RunInfo) -> anyhow::Result<()> {
    let p = path(data_dir);
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir)?;
    }
    common::config::write_private(&p, &serde_json::to_vec_pretty(info)?)?;
    Ok(())
}

/// Reads the run file, if there is one.
pub fn read(data_dir: &Path) -> anyhow::Result<Option<RunInfo>> {
    match std::fs::read(path(data_dir)) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b)?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Removes the run file (at shutdown).
pub fn remove(data_dir: &Path) {
    let _ = std::fs::remove_file(path(data_dir));
}

/// Whether a process with this id is alive.
pub fn is_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}
