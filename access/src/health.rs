//! The health of each filer as this proxy sees it: a circuit breaker per filer.
//!
//! - **Up** (closed): logins connect. A failure to reach the filer (connect refused or timed
//!   out, no greeting, a broken trusted-login exchange) is remembered with the client
//!   connection it happened on. Failures from `threshold` distinct connections within `window`
//!   mark the filer down. A refusal of the trusted login for one user (mailbox not there, being
//!   moved) is the user's business and never counts, so one client cannot mark a filer down for
//!   everybody.
//! - **Down** (open): logins for its mailboxes are answered `NO [UNAVAILABLE]` at once, with no
//!   connection attempt, until `cooldown` has passed.
//! - **Probing** (half-open): the next login is let through as a probe; the others are still
//!   answered at once. The probe's success marks the filer up; its failure, down for another
//!   cooldown. A probe that never reports (its client vanished) is replaced after a cooldown.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use common::net::ConnId;
use tokio::time::Instant;

/// When a filer is marked down, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Failures from this many distinct client connections mark a filer down.
    pub threshold: u32,
    /// ... within this time.
    pub window: Duration,
    /// How long a filer stays down before a probe.
    pub cooldown: Duration,
}

/// What a login may do about a filer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Connect.
    Go,
    /// Connect, as the probe of a filer that was down; report the outcome.
    Probe,
    /// The filer is known down: answer the temporary failure at once.
    Down,
}

/// A filer's state as this proxy sees it, for logs and `mailctl status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FilerHealth {
    /// Reachable as far as this proxy knows.
    Up,
    /// Marked down; logins are answered at once.
    Down,
    /// A probe login is under way.
    Probing,
}

/// Every filer's breaker. Shared by all sessions of the proxy.
#[derive(Debug)]
pub(crate) struct Health {
    settings: BreakerSettings,
    filers: Mutex<HashMap<String, Breaker>>,
    /// Woken on every change of state, so the state file can be rewritten.
    pub(crate) changed: tokio::sync::Notify,
}

#[derive(Debug)]
enum Breaker {
    Closed { failures: Vec<(Instant, ConnId)> },
    Open { until: Instant },
    HalfOpen { since: Instant },
}

impl Health {
    pub(crate) fn new(settings: BreakerSettings) -> Self {
        Self {
            settings,
            filers: Mutex::new(HashMap::new()),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// Whether a login may connect to `filer` now.
    pub(crate) fn admit(&self, filer: &str) -> Admission {
        let now = Instant::now();
        let mut map = self.filers.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(b) = map.get_mut(filer) else {
            return Admission::Go;
        };
        match b {
            Breaker::Closed { .. } => Admission::Go,
            Breaker::Open { until } if now < *until => Admission::Down,
            Breaker::HalfOpen { since } if now.duration_since(*since) < self.settings.cooldown => {
                Admission::Down
            }
            Breaker::Open { .. } | Breaker::HalfOpen { .. } => {
                tracing::info!(filer, "probing a filer marked down");
                *b = Breaker::HalfOpen { since: now };
                self.changed.notify_one();
                Admission::Probe
            }
        }
    }

    /// A login reached `filer` and its trusted login worked (or was refused for the user).
    pub(crate) fn succeeded(&self, filer: &str) {
        let mut map = self.filers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(b) = map.get_mut(filer) {
            if !matches!(b, Breaker::Closed { .. }) {
                tracing::info!(filer, "filer is reachable again");
                self.changed.notify_one();
            }
            *b = Breaker::Closed {
                failures: Vec::new(),
            };
        }
    }

    /// Connection `conn` could not reach `filer`.
    pub(crate) fn failed(&self, filer: &str, conn: ConnId, admission: Admission) {
        let now = Instant::now();
        let s = self.settings;
        let mut map = self.filers.lock().unwrap_or_else(PoisonError::into_inner);
        let b = map.entry(filer.to_owned()).or_insert(Breaker::Closed {
            failures: Vec::new(),
        });
        match b {
            Breaker::Closed { failures } => {
                failures.retain(|(at, _)| now.duration_since(*at) < s.window);
                if !failures.iter().any(|(_, c)| *c == conn) {
                    failures.push((now, conn));
                }
                if failures.len() >= s.threshold as usize {
                    tracing::warn!(filer, failures = failures.len(), cooldown = ?s.cooldown, "filer marked down");
                    *b = Breaker::Open {
                        until: now + s.cooldown,
                    };
                    self.changed.notify_one();
                }
            }
            Breaker::HalfOpen { .. } if admission == Admission::Probe => {
                tracing::warn!(filer, "probe failed; filer still down");
                *b = Breaker::Open {
                    until: now + s.cooldown,
                };
                self.changed.notify_one();
            }
            // A login admitted before the filer was marked down failed too: nothing new.
            Breaker::HalfOpen { .. } | Breaker::Open { .. } => {}
        }
    }

    /// Every filer this proxy has an opinion about, with its state.
    pub(crate) fn snapshot(&self) -> Vec<(String, FilerHealth)> {
        let map = self.filers.lock().unwrap_or_else(PoisonError::into_inner);
        let mut v: Vec<(String, FilerHealth)> = map
            .iter()
            .map(|(name, b)| {
                let h = match b {
                    Breaker::Closed { .. } => FilerHealth::Up,
                    Breaker::Open { .. } => FilerHealth::Down,
                    Breaker::HalfOpen { .. } => FilerHealth::Probing,
                };
                (name.clone(), h)
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// Where a running proxy keeps its view of the filers (`<data_dir>/run/access-health.json`),
/// rewritten on every change; filers it has no entry for are up as far as it knows.
pub fn health_path(data_dir: &Path) -> PathBuf {
    data_dir.join("run").join("access-health.json")
}

/// Reads the file [`health_path`] names; no file is no opinion.
pub fn read_health(data_dir: &Path) -> std::io::Result<Vec<(String, FilerHealth)>> {
    match std::fs::read(health_path(data_dir)) {
        Ok(b) => serde_json::from_slice(&b).map_err(std::io::Error::other),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Rewrites the state file whenever a filer's state changes, until `shutdown`; then removes it.
pub(crate) async fn publish(
    health: std::sync::Arc<Health>,
    data_dir: PathBuf,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let path = health_path(&data_dir);
    loop {
        let snapshot = health.snapshot();
        for (filer, h) in &snapshot {
            common::obs::filer_health("access", filer, *h != FilerHealth::Down);
        }
        let p = path.clone();
        let written = tokio::task::spawn_blocking(move || {
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let json = serde_json::to_vec(&snapshot).map_err(std::io::Error::other)?;
            common::config::write_private(&p, &json)
        })
        .await;
        if let Ok(Err(e)) = written {
            tracing::warn!(error = %e, path = %path.display(), "cannot write the filer health file");
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = health.changed.notified() => {}
        }
    }
    let _ = std::fs::remove_file(&path);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> Health {
        Health::new(BreakerSettings {
            threshold: 3,
            window: Duration::from_secs(30),
            cooldown: Duration::from_secs(5),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn one_connection_cannot_mark_a_filer_down() {
        let h = health();
        let c = ConnId::next();
        for _ in 0..10 {
            h.failed("f1", c, Admission::Go);
        }
        assert_eq!(h.admit("f1"), Admission::Go);
        h.failed("f1", ConnId::next(), Admission::Go);
        assert_eq!(h.admit("f1"), Admission::Go);
        h.failed("f1", ConnId::next(), Admission::Go);
        assert_eq!(h.admit("f1"), Admission::Down);
        assert_eq!(
            h.admit("f2"),
            Admission::Go,
            "other filers are not affected"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failures_outside_the_window_do_not_add_up() {
        let h = health();
        h.failed("f1", ConnId::next(), Admission::Go);
        h.failed("f1", ConnId::next(), Admission::Go);
        tokio::time::advance(Duration::from_secs(31)).await;
        h.failed("f1", ConnId::next(), Admission::Go);
        assert_eq!(h.admit("f1"), Admission::Go);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_after_the_cooldown_closes_or_reopens_the_breaker() {
        let h = health();
        for _ in 0..3 {
            h.failed("f1", ConnId::next(), Admission::Go);
        }
        assert_eq!(h.admit("f1"), Admission::Down);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(h.admit("f1"), Admission::Probe);
        assert_eq!(h.admit("f1"), Admission::Down, "one probe at a time");
        assert_eq!(h.snapshot(), [("f1".to_owned(), FilerHealth::Probing)]);
        h.failed("f1", ConnId::next(), Admission::Probe);
        assert_eq!(h.admit("f1"), Admission::Down);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(h.admit("f1"), Admission::Probe);
        h.succeeded("f1");
        assert_eq!(h.admit("f1"), Admission::Go);
        assert_eq!(h.snapshot(), [("f1".to_owned(), FilerHealth::Up)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_vanished_probe_is_replaced_after_a_cooldown() {
        let h = health();
        for _ in 0..3 {
            h.failed("f1", ConnId::next(), Admission::Go);
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(h.admit("f1"), Admission::Probe);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(h.admit("f1"), Admission::Probe);
    }
}
