//! `mailctl queue`: the spool's and the relay's queues as an operator sees them, read and
//! changed on disk while the services run. Queue ids are unique across queues (creation time
//! and random bits), so an id names its entry wherever it is.
//!
//! Every change takes the entry's lock (the running spool holds it during a delivery
//! attempt, and re-reads the envelope under it before each attempt), rewrites the envelope
//! atomically, and leaves a notice in the queue's `ctl/` directory so the running spool looks
//! at the entry again within a fraction of a second. See `common::queue` for the layout.

use std::time::Duration;

use anyhow::{Context as _, bail};
use common::queue::{Envelope, Queue, QueueId, now_millis};

use crate::config::PlatformSettings;

/// How long a change waits for a delivery attempt in progress to let go of the entry.
const LOCK_WAIT: Duration = Duration::from_secs(30);

/// What an operator does to an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Try every pending recipient now (a held entry stays held).
    Retry,
    /// Stop trying until released.
    Hold,
    /// Undo a hold and try now.
    Release,
    /// Remove the entry without a bounce.
    Delete,
}

/// Opens the queues of the services this configuration runs: `("spool", ...)`,
/// `("relay", ...)`.
pub fn open_all(settings: &PlatformSettings) -> anyhow::Result<Vec<(&'static str, Queue)>> {
    let mut out = Vec::new();
    let dirs = [
        ("spool", settings.spool.as_ref().map(|s| &s.queue_dir)),
        ("relay", settings.relay.as_ref().map(|s| &s.queue_dir)),
    ];
    for (name, dir) in dirs {
        if let Some(dir) = dir {
            let q = Queue::open(dir)
                .with_context(|| format!("opening the {name} queue in {}", dir.display()))?;
            out.push((name, q));
        }
    }
    if out.is_empty() {
        bail!("this configuration runs neither a spool nor a relay");
    }
    Ok(out)
}

/// The queue holding entry `id`.
pub fn find<'a>(queues: &'a [(&'static str, Queue)], id: &QueueId) -> anyhow::Result<&'a Queue> {
    for (_, q) in queues {
        if q.load(id)?.is_some() {
            return Ok(q);
        }
    }
    bail!("no queue entry {id}")
}

/// Parses an id typed by an operator.
pub fn parse_id(s: &str) -> anyhow::Result<QueueId> {
    s.trim().parse().map_err(anyhow::Error::msg)
}

/// Applies `change` to entry `id`. Returns the new envelope (`None` after a delete).
pub fn apply(queue: &Queue, id: &QueueId, change: Change) -> anyhow::Result<Option<Envelope>> {
    let Some(lock) = queue.lock_wait(id, LOCK_WAIT)? else {
        bail!("no queue entry {id}");
    };
    let Some(mut env) = queue.load(id)? else {
        bail!("no queue entry {id}");
    };
    let result = match change {
        Change::Delete => {
            queue.remove(id)?;
            None
        }
        Change::Retry | Change::Hold | Change::Release => {
            match change {
                Change::Hold => env.held = true,
                Change::Release => env.held = false,
                _ => {}
            }
            if change != Change::Hold {
                for r in env.recipients.iter_mut().filter(|r| r.is_pending()) {
                    r.next_try_ms = 0;
                }
            }
            queue.update(&env)?;
            Some(env)
        }
    };
    drop(lock);
    queue.notify(id)?;
    Ok(result)
}

/// One line per entry for `mailctl queue list`; each entry with the name of its queue.
pub fn format_list(entries: &[(&str, Envelope)]) -> String {
    let mut out = format!(
        "{:<5} {:<18} {:>7} {:>9}  {:<30} {:>7}  {:<10} last reply\n",
        "queue", "id", "age", "size", "from", "pending", "state"
    );
    let now = now_millis();
    for (queue, e) in entries {
        let pending = e.recipients.iter().filter(|r| r.is_pending()).count();
        let state = if e.held {
            "held".to_owned()
        } else {
            match e.next_try_ms() {
                Some(t) if t > now => format!("in {}", short(t - now)),
                Some(_) => "due".to_owned(),
                None => "done".to_owned(),
            }
        };
        let last = e
            .recipients
            .iter()
            .filter(|r| r.is_pending())
            .find_map(|r| r.last_reply.as_deref())
            .unwrap_or("");
        let from = if e.reverse_path.is_empty() {
            "<>"
        } else {
            e.reverse_path.as_str()
        };
        out.push_str(&format!(
            "{:<5} {:<18} {:>7} {:>9}  {:<30} {:>3}/{:<3}  {:<10} {}\n",
            queue,
            e.id,
            short(now.saturating_sub(e.queued_ms)),
            e.size,
            from,
            pending,
            e.recipients.len(),
            state,
            last
        ));
    }
    out
}

/// `mailctl queue show`: the envelope, each recipient, and the message's header section.
pub fn format_entry(e: &Envelope, message: &[u8]) -> String {
    let mut out = format!(
        "id:        {}\nfrom:      <{}>\norigin:    {:?}\nqueued:    {} ago\nclient:    {} ({})\nconn:      {}\nsize:      {}\nheld:      {}\n",
        e.id,
        e.reverse_path,
        e.origin,
        short(now_millis().saturating_sub(e.queued_ms)),
        e.helo,
        e.client_ip,
        e.conn,
        e.size,
        e.held
    );
    for r in &e.recipients {
        out.push_str(&format!(
            "rcpt:      <{}> {:?} ({:?}), {} attempt(s){}{}\n",
            r.address,
            r.state,
            r.deferral,
            r.attempts,
            r.original
                .as_deref()
                .map(|o| format!(", for <{o}>"))
                .unwrap_or_default(),
            r.last_reply
                .as_deref()
                .map(|l| format!(": {l}"))
                .unwrap_or_default()
        ));
    }
    let end = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(message.len(), |p| p + 2);
    out.push('\n');
    out.push_str(&String::from_utf8_lossy(
        message.get(..end).unwrap_or_default(),
    ));
    out
}

fn short(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}
