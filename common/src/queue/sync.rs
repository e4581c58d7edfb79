//! Group commit of directory fsyncs.

use std::path::PathBuf;
use std::sync::{Condvar, Mutex, PoisonError};

/// Shares directory fsyncs between concurrent committers.
///
/// Each caller of [`DirSync::sync`] has made a change in the directory (a rename, an unlink)
/// and needs it durable. It takes a ticket; it returns once an fsync that *started* after the
/// ticket was taken has finished. Only one fsync runs at a time; everyone who arrives while it
/// runs is served by the next one, so under load one fsync covers many commits. Blocking: call
/// it from `spawn_blocking` or a dedicated thread.
#[derive(Debug)]
pub struct DirSync {
    dir: PathBuf,
    state: Mutex<SyncState>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct SyncState {
    /// Tickets handed out.
    requested: u64,
    /// Every ticket up to this one is durable.
    synced: u64,
    /// An fsync is running.
    is_running: bool,
}

impl DirSync {
    /// Group commit for the directory `dir`.
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            state: Mutex::new(SyncState::default()),
            done: Condvar::new(),
        }
    }

    /// Returns once every change made in the directory before this call is durable.
    pub fn sync(&self) -> std::io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.requested += 1;
        let ticket = state.requested;
        loop {
            if state.synced >= ticket {
                return Ok(());
            }
            if !state.is_running {
                // Our turn: this fsync starts now, after every ticket handed out so far.
                state.is_running = true;
                let target = state.requested;
                drop(state);
                let result = std::fs::File::open(&self.dir).and_then(|d| d.sync_all());
                let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                s.is_running = false;
                if result.is_ok() {
                    s.synced = s.synced.max(target);
                }
                self.done.notify_all();
                return result;
            }
            state = self
                .done
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}
