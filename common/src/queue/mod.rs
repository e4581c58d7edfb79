//! The durable message queue, shared by the services that take responsibility for mail
//! (the spool's inbound queue, the relay's outbound one). It knows no protocol: an entry is a
//! message file and an envelope, and what a service does with them is its own business.
//!
//! # On disk
//!
//! One directory per queue:
//!
//! ```text
//! <dir>/<id>.msg       the message as it will be delivered, written once, never changed
//! <dir>/<id>.env       the envelope (JSON): reverse path, per-recipient state, attempts, next try
//! <dir>/<id>.env.tmp   an envelope being replaced (write, fsync, rename over `.env`)
//! <dir>/ctl/<id>       "look at this entry again": left by `mailctl queue` after a change
//! ```
//!
//! - **An entry exists when its `.env` exists.** A message is committed by fsyncing its
//!   `.msg`, writing and fsyncing the envelope under a temporary name, renaming it to `.env` and
//!   fsyncing the directory, in that order ([`Queue::commit`]); only then may a service answer
//!   `250`. A crash before the rename leaves a `.msg` without `.env`, removed by
//!   [`Queue::recover`] at the next start, because nobody was told it was accepted.
//! - **Directory fsyncs are shared** between concurrent commits (group commit, [`DirSync`]): a
//!   commit waits for one fsync that *started* after its rename, so it is durable, while a
//!   single fsync serves every commit that renamed before it began.
//! - **Envelope changes are atomic**: a new envelope is written beside the old one and
//!   renamed over it, so a reader (or a crash) sees the old or the new one, never a mix.
//! - **One writer per entry at a time.** Whoever changes an entry (a queue runner before an
//!   attempt, `mailctl queue retry|hold|release|delete`) first takes an exclusive `flock` on
//!   its `.msg` ([`Queue::try_lock`], [`Queue::lock_wait`]) and re-reads the envelope under it,
//!   so a change made by `mailctl` while a service runs is never overwritten by a stale copy.
//!   After a change, `mailctl` leaves a file in `ctl/` ([`Queue::notify`]); a running service
//!   polls that directory ([`Queue::take_notifications`]) and looks at the entry again at
//!   once. Without the notice it would still see the change at its next attempt, because it
//!   always re-reads the envelope under the lock.

pub mod bounce;
mod incoming;
pub mod runner;
mod store;
mod sync;

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use incoming::{Incoming, blocking};
pub use store::{EntryLock, Queue, StoreError};
pub use sync::DirSync;

/// The id of a queue entry: 18 upper-case hex digits, the time of creation in milliseconds
/// then random bits, so ids sort by age. It names the entry's files, appears in the
/// `Received:` header and in every log line about the message.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct QueueId(String);

impl QueueId {
    /// A new id (unique: the message file is created exclusively, and a clash picks another).
    pub fn generate() -> Self {
        use rand::Rng as _;
        let millis = now_millis() & 0xFFFF_FFFF_FFFF;
        let random: u32 = rand::thread_rng().r#gen::<u32>() & 0xFF_FFFF;
        Self(format!("{millis:012X}{random:06X}"))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for QueueId {
    type Err = String;

    /// Accepts 1 to 32 hex digits (upper or lower case), so an id typed by an operator can
    /// never name a path outside the queue.
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() || s.len() > 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{s:?} is not a queue id"));
        }
        Ok(Self(s.to_ascii_uppercase()))
    }
}

impl TryFrom<String> for QueueId {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<QueueId> for String {
    fn from(id: QueueId) -> Self {
        id.0
    }
}

/// Where a queued message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Received over SMTP from the internet; goes through the filter when one is configured.
    Smtp,
    /// Returned by the filter on the reinjection listener; never filtered again.
    Reinject,
    /// A delivery status notification made by this service.
    Bounce,
    /// Authenticated submission (the relay).
    Submission,
}

/// The delivery state of one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecipientState {
    /// Not delivered yet; tried again at `next_try`.
    Pending,
    /// Accepted by the next hop.
    Delivered,
    /// Refused for good (or expired); a bounce was made if the sender is not null.
    Failed,
}

/// Why a pending recipient waits, which decides whether it may expire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Deferral {
    /// Not tried yet, or the next hop answered 4xx: retried with backoff, and failed (bounced)
    /// when the queue lifetime is over.
    #[default]
    Retry,
    /// Held by the platform itself (a mailbox being moved, a filer that cannot be reached or
    /// is down): retried with backoff and never bounced for its age.
    Held,
}

/// One recipient of a queued message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    /// The address to deliver to (after alias expansion), in key form.
    pub address: String,
    /// The address as the client gave it at RCPT time, when it differs (an alias).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original: Option<String>,
    /// Its state.
    pub state: RecipientState,
    /// Why it waits (meaningful while pending).
    #[serde(default)]
    pub deferral: Deferral,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// When to try next, in milliseconds since the Unix epoch (meaningful while pending).
    pub next_try_ms: u64,
    /// The last reply or error, for operators and bounces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reply: Option<String>,
}

impl Recipient {
    /// A recipient to be tried at once.
    pub fn new(address: String, original: Option<String>) -> Self {
        Self {
            address,
            original,
            state: RecipientState::Pending,
            deferral: Deferral::Retry,
            attempts: 0,
            next_try_ms: 0,
            last_reply: None,
        }
    }

    /// Whether it still waits for delivery.
    pub fn is_pending(&self) -> bool {
        self.state == RecipientState::Pending
    }
}

/// Everything known about a queued message besides its content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The entry's id.
    pub id: QueueId,
    /// The reverse path (MAIL FROM) without brackets; empty for the null path.
    pub reverse_path: String,
    /// Whether delivery needs SMTPUTF8 (RFC 6531).
    #[serde(default)]
    pub smtputf8: bool,
    /// Where the message came from.
    pub origin: Origin,
    /// When it was queued, in milliseconds since the Unix epoch.
    pub queued_ms: u64,
    /// The connection id of the session that received it.
    pub conn: String,
    /// The client's IP address.
    pub client_ip: String,
    /// The client's HELO/EHLO name.
    pub helo: String,
    /// Size of the message file in bytes.
    pub size: u64,
    /// Held by an operator (`mailctl queue hold`): not tried until released.
    #[serde(default)]
    pub held: bool,
    /// The recipients, each with its own state.
    pub recipients: Vec<Recipient>,
}

impl Envelope {
    /// Whether every recipient is settled (delivered or failed), so the entry can go.
    pub fn is_done(&self) -> bool {
        self.recipients.iter().all(|r| !r.is_pending())
    }

    /// The earliest `next_try_ms` of a pending recipient.
    pub fn next_try_ms(&self) -> Option<u64> {
        self.recipients
            .iter()
            .filter(|r| r.is_pending())
            .map(|r| r.next_try_ms)
            .min()
    }
}

/// The delay before retry number `attempts` (1 for the first retry): `min` doubled each
/// time, at most `max`.
pub fn backoff(attempts: u32, min: Duration, max: Duration) -> Duration {
    let factor = 1u32
        .checked_shl(attempts.saturating_sub(1))
        .unwrap_or(u32::MAX);
    min.checked_mul(factor).unwrap_or(max).min(max)
}

/// Milliseconds since the Unix epoch (wall clock: queue times must survive a restart).
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests;
