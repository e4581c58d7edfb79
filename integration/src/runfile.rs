//! The run files `mailctl up` keeps in `<data_dir>/run/`, so `mailctl status` can find the
//! running platform and its listeners: `mailctl.json` for a process that runs every role,
//! `mailctl-<role>+<role>.json` for one that runs some (several processes may share a data
//! directory when their roles do not overlap).

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
    /// The roles this process runs (`spool`, `filer`, ...).
    #[serde(default)]
    pub roles: Vec<String>,
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

/// The run file's path for a process running `roles`.
pub fn path(data_dir: &Path, roles: &[String]) -> PathBuf {
    let all = crate::config::ROLES
        .iter()
        .all(|r| roles.iter().any(|x| x == r));
    let name = if all {
        "mailctl.json".to_owned()
    } else {
        format!("mailctl-{}.json", roles.join("+"))
    };
    data_dir.join("run").join(name)
}

/// Writes the run file atomically.
pub fn write(data_dir: &Path, info: &RunInfo) -> anyhow::Result<()> {
    let p = path(data_dir, &info.roles);
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir)?;
    }
    common::config::write_private(&p, &serde_json::to_vec_pretty(info)?)?;
    Ok(())
}

/// The run files of the processes alive now, ordered by process id. A run file left by a
/// killed process is skipped (and replaced when its roles start again).
pub fn read_alive(data_dir: &Path) -> anyhow::Result<Vec<RunInfo>> {
    let dir = data_dir.join("run");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut found = Vec::new();
    for e in entries {
        let name = e?.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with("mailctl") && name.ends_with(".json")) {
            continue;
        }
        let bytes = match std::fs::read(dir.join(&*name)) {
            Ok(b) => b,
            // Removed by a process stopping right now.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        };
        let mut info: RunInfo = serde_json::from_slice(&bytes)?;
        if info.roles.is_empty() {
            // Written before roles existed: every role.
            info.roles = crate::config::ROLES
                .iter()
                .map(|r| (*r).to_owned())
                .collect();
        }
        if is_alive(info.pid) {
            found.push(info);
        }
    }
    found.sort_by_key(|i| i.pid);
    Ok(found)
}

/// Removes the run file of a process running `roles` (at shutdown).
pub fn remove(data_dir: &Path, roles: &[String]) {
    let _ = std::fs::remove_file(path(data_dir, roles));
}

/// Whether a process with this id is alive.
pub fn is_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}
