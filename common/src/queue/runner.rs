//! The queue runner, shared by the services that queue mail (the spool, the relay): it takes
//! due entries, hands their due recipients to the service's [`Transport`], records each
//! recipient's outcome in the envelope, bounces failures (RFC 3464, queued in the same queue),
//! and removes finished entries.
//!
//! The schedule lives in memory ([`Scheduler`]); the envelope on disk is the truth. Each
//! attempt takes the entry's lock and re-reads its envelope first, so a change made by
//! `mailctl queue` (hold, release, retry, delete) is always seen; `mailctl` also leaves a
//! notice in the queue's `ctl/` directory, polled every [`CTL_POLL`], so the runner looks
//! at that entry again at once.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::address::{Address, ParseOptions};
use crate::queue::{
    Deferral, Envelope, Origin, QueueId, Recipient, RecipientState, StoreError, backoff, now_millis,
};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use super::incoming::blocking;
use super::{Queue, bounce};

/// How often the runner looks for notices from `mailctl queue`.
pub const CTL_POLL: Duration = Duration::from_millis(250);
/// The longest wait between retries of a recipient held by the platform (a mailbox being
/// moved, a filer down): short, so mail flows soon after the cause is gone.
const HELD_RETRY_MAX: Duration = Duration::from_secs(60);
/// When another process holds an entry's lock, try again after this long.
const LOCKED_RETRY: Duration = Duration::from_millis(200);
/// Rounds of "look up again and retry at once" after a filer answers `451 4.4.0`.
const MAX_STALE_ROUNDS: u32 = 3;
/// The longest the runner sleeps without looking at its schedule.
const MAX_IDLE: Duration = Duration::from_secs(60);

/// How a runner behaves; each service fills it from its own settings.
#[derive(Debug, Clone)]
pub struct RunnerSettings {
    /// The service (`spool`, `relay`), for metrics and the message trace.
    pub service: &'static str,
    /// This host's name, for bounces.
    pub hostname: String,
    /// The first retry delay; each further retry doubles it.
    pub retry_min: Duration,
    /// The longest retry delay.
    pub retry_max: Duration,
    /// How long a recipient may be retried before it is bounced (held ones never expire).
    pub queue_lifetime: Duration,
    /// Most delivery attempts running at once.
    pub max_deliveries: usize,
    /// How long running attempts may go on after shutdown.
    pub shutdown_grace: Duration,
}

/// What became of one recipient in one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The next hop took it; the reply.
    Delivered(String),
    /// Refused for good: bounce.
    Failed(String),
    /// Try again later.
    Deferred {
        /// The reply or error, for the queue listing.
        reason: String,
        /// Whether it may expire.
        deferral: Deferral,
    },
    /// The next hop says the route is stale (a filer's `451 4.4.0`, "not here any more"):
    /// look it up again and retry at once, a few rounds at most.
    Stale(String),
}

impl Outcome {
    /// A deferral that never expires: the platform itself holds the recipient.
    pub fn held(reason: String) -> Self {
        Self::Deferred {
            reason,
            deferral: Deferral::Held,
        }
    }

    /// A deferral that is retried with backoff until the queue lifetime is over.
    pub fn retry(reason: String) -> Self {
        Self::Deferred {
            reason,
            deferral: Deferral::Retry,
        }
    }
}

/// How a service delivers: the spool over LMTP to filers, the relay over SMTP to the
/// internet.
#[async_trait::async_trait]
pub trait Transport: Send + Sync {
    /// Delivers `message` to `recipients` (addresses of `envelope`'s recipients, key form)
    /// and returns one outcome per recipient, in order.
    async fn deliver(
        &self,
        envelope: &Envelope,
        recipients: &[String],
        message: Arc<[u8]>,
    ) -> Vec<Outcome>;
}

/// A queue, its schedule and its transport: what a service's sessions and its delivery loop
/// share.
pub struct Runner {
    queue: Queue,
    scheduler: Scheduler,
    settings: RunnerSettings,
    transport: Arc<dyn Transport>,
}

impl Runner {
    /// A runner for `queue`, delivering through `transport`. Nothing is scheduled yet: see
    /// [`Runner::recover`].
    pub fn new(queue: Queue, settings: RunnerSettings, transport: Arc<dyn Transport>) -> Self {
        Self {
            queue,
            scheduler: Scheduler::default(),
            settings,
            transport,
        }
    }

    /// The queue.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Schedules entry `id` for an attempt at `at_ms` (0: now).
    pub fn schedule(&self, id: QueueId, at_ms: u64) {
        self.scheduler.schedule(id, at_ms);
    }

    /// Reads the queue after a start (or a crash), removes what was never committed, and
    /// schedules every entry not held. Returns (entries, held).
    pub async fn recover(&self) -> Result<(usize, usize), StoreError> {
        let q = self.queue.clone();
        let entries = blocking(move || q.recover()).await?;
        let held = entries.iter().filter(|e| e.held).count();
        for e in &entries {
            if !e.held {
                self.scheduler
                    .schedule(e.id.clone(), e.next_try_ms().unwrap_or(0));
            }
        }
        Ok((entries.len(), held))
    }
}

/// The in-memory schedule: which entry is due when. Shared by the sessions (new entries) and
/// the runner.
#[derive(Default)]
struct Scheduler {
    inner: Mutex<Schedule>,
    wake: Notify,
}

#[derive(Default)]
struct Schedule {
    /// Entries waiting, by due time (ms since the epoch).
    due: BTreeSet<(u64, QueueId)>,
    /// The due time of each waiting entry.
    at: HashMap<QueueId, u64>,
    /// Entries with an attempt running.
    running: HashSet<QueueId>,
    /// Requests for running entries, applied when their attempt ends.
    after_run: HashMap<QueueId, u64>,
}

impl Scheduler {
    /// Schedules (or moves) entry `id` to be tried at `at_ms`, and wakes the runner.
    fn schedule(&self, id: QueueId, at_ms: u64) {
        let mut s = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if s.running.contains(&id) {
            let slot = s.after_run.entry(id).or_insert(at_ms);
            *slot = (*slot).min(at_ms);
        } else {
            if let Some(old) = s.at.insert(id.clone(), at_ms) {
                s.due.remove(&(old, id.clone()));
            }
            s.due.insert((at_ms, id));
        }
        drop(s);
        self.wake.notify_one();
    }

    /// Takes up to `max` entries due at `now_ms`, marking them running.
    fn take_due(&self, now_ms: u64, max: usize) -> Vec<QueueId> {
        let mut s = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = Vec::new();
        while out.len() < max {
            let Some((at, _)) = s.due.first() else { break };
            if *at > now_ms {
                break;
            }
            let Some((_, id)) = s.due.pop_first() else {
                break;
            };
            s.at.remove(&id);
            s.running.insert(id.clone());
            out.push(id);
        }
        out
    }

    /// The earliest due time.
    fn next_due(&self) -> Option<u64> {
        let s = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        s.due.first().map(|(at, _)| *at)
    }

    /// An attempt ended; `next` is when the entry wants its next one (`None`: gone or held).
    fn finish(&self, id: &QueueId, next: Option<u64>) {
        let mut s = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        s.running.remove(id);
        let requested = s.after_run.remove(id);
        drop(s);
        let at = match (next, requested) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(at) = at {
            self.schedule(id.clone(), at);
        } else {
            self.wake.notify_one();
        }
    }

    /// How many entries wait or run.
    #[cfg(test)]
    fn len(&self) -> usize {
        let s = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        s.at.len() + s.running.len()
    }
}

/// Runs the queue until `shutdown`; running attempts are given the shutdown grace period.
pub async fn run(spool: Arc<Runner>, shutdown: CancellationToken) {
    let permits = Arc::new(Semaphore::new(spool.settings.max_deliveries));
    let tasks = TaskTracker::new();
    let mut ctl = tokio::time::interval(CTL_POLL);
    ctl.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let now = now_millis();
        let free = permits.available_permits();
        for id in spool.scheduler.take_due(now, free) {
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                spool.scheduler.finish(&id, Some(now));
                break;
            };
            let s = spool.clone();
            let span = tracing::info_span!("delivery", queue_id = %id);
            tasks.spawn(
                async move {
                    let next = attempt(&s, &id).await;
                    drop(permit);
                    s.scheduler.finish(&id, next);
                }
                .instrument(span),
            );
        }
        let wait = match spool.scheduler.next_due() {
            Some(_) if permits.available_permits() == 0 => MAX_IDLE,
            Some(at) => Duration::from_millis(at.saturating_sub(now_millis())).min(MAX_IDLE),
            None => MAX_IDLE,
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = spool.scheduler.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = ctl.tick() => take_notices(&spool).await,
        }
    }
    tasks.close();
    if tokio::time::timeout(spool.settings.shutdown_grace, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("deliveries still running after the shutdown grace period");
    }
}

/// Schedules the entries `mailctl queue` changed.
async fn take_notices(spool: &Arc<Runner>) {
    let q = spool.queue.clone();
    match blocking(move || q.take_notifications()).await {
        Ok(ids) => {
            for id in ids {
                tracing::info!(queue_id = %id, "entry changed by an operator");
                spool.scheduler.schedule(id, 0);
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read queue notices"),
    }
}

/// One attempt at an entry. Returns when to try it next, `None` when it is finished, held
/// or gone.
async fn attempt(spool: &Arc<Runner>, id: &QueueId) -> Option<u64> {
    match try_attempt(spool, id).await {
        Ok(next) => next,
        Err(e) => {
            tracing::error!(error = %e, "queue entry could not be processed");
            Some(now_millis() + millis(spool.settings.retry_min))
        }
    }
}

async fn try_attempt(spool: &Arc<Runner>, id: &QueueId) -> Result<Option<u64>, StoreError> {
    let settings = &spool.settings;
    // Lock the entry and read its envelope under the lock: an operator may have changed it.
    let (q, i) = (spool.queue.clone(), id.clone());
    let locked = blocking(move || match q.try_lock(&i)? {
        Some(lock) => Ok(Some((lock, q.load(&i)?))),
        None => Ok(None),
    })
    .await?;
    let (lock, mut env) = match locked {
        Some((lock, Some(env))) => (lock, env),
        Some((_, None)) => return Ok(None),
        None => {
            let (q, i) = (spool.queue.clone(), id.clone());
            let exists = blocking(move || q.load(&i)).await?.is_some();
            return Ok(exists.then(|| now_millis() + millis(LOCKED_RETRY)));
        }
    };
    if env.held {
        tracing::info!("held by an operator");
        return Ok(None);
    }
    let now = now_millis();
    let was_pending: Vec<usize> = env
        .recipients
        .iter()
        .enumerate()
        .filter(|(_, r)| r.is_pending())
        .map(|(i, _)| i)
        .collect();
    let due: Vec<usize> = env
        .recipients
        .iter()
        .enumerate()
        .filter(|(_, r)| r.is_pending() && r.next_try_ms <= now)
        .map(|(i, _)| i)
        .collect();
    let mut message: Option<Arc<[u8]>> = None;
    if !due.is_empty() {
        let (q, i) = (spool.queue.clone(), id.clone());
        let bytes: Arc<[u8]> = blocking(move || q.read_message(&i)).await?.into();
        message = Some(bytes.clone());
        deliver_due(spool, &mut env, due, bytes).await;
    }
    let failed = expire_and_collect_failed(settings, &mut env, &was_pending, now_millis());
    if !failed.is_empty() {
        let message = match message {
            Some(m) => m,
            None => {
                let (q, i) = (spool.queue.clone(), id.clone());
                blocking(move || q.read_message(&i)).await?.into()
            }
        };
        // Queued before the envelope records the failure: a crash in between makes a
        // second bounce, never none.
        bounce(spool, &env, &failed, &message).await?;
    }
    let q = spool.queue.clone();
    let next = if env.is_done() {
        let i = id.clone();
        blocking(move || q.remove(&i)).await?;
        tracing::info!("done, removed from the queue");
        None
    } else {
        let next = env.next_try_ms();
        blocking(move || q.update(&env)).await?;
        next
    };
    drop(lock);
    Ok(next)
}

/// Delivers the due recipients; a stale route (`451 4.4.0`) is looked up again and retried at
/// once, a few rounds at most.
async fn deliver_due(
    spool: &Arc<Runner>,
    env: &mut Envelope,
    mut todo: Vec<usize>,
    message: Arc<[u8]>,
) {
    let settings = &spool.settings;
    let now = now_millis();
    for round in 1..=MAX_STALE_ROUNDS {
        let addrs: Vec<String> = todo
            .iter()
            .filter_map(|&i| env.recipients.get(i).map(|r| r.address.clone()))
            .collect();
        let started = tokio::time::Instant::now();
        let outcomes = spool.transport.deliver(env, &addrs, message.clone()).await;
        let took = started.elapsed();
        crate::obs::delivery_latency(settings.service, took.as_secs_f64());
        let message_id = crate::obs::message_id(&message);
        let mut stale = Vec::new();
        for (&i, outcome) in todo.iter().zip(outcomes) {
            if let Some(r) = env.recipients.get(i) {
                trace_outcome(
                    settings.service,
                    env,
                    &r.address,
                    &outcome,
                    &message_id,
                    took,
                );
            }
            let Some(r) = env.recipients.get_mut(i) else {
                continue;
            };
            match outcome {
                Outcome::Stale(reason) if round < MAX_STALE_ROUNDS => {
                    tracing::info!(rcpt = %r.address, %reason, "stale route, looking up again");
                    stale.push(i);
                }
                Outcome::Stale(reason) => apply(
                    settings,
                    r,
                    Outcome::Deferred {
                        reason,
                        deferral: Deferral::Held,
                    },
                    now,
                ),
                outcome => apply(settings, r, outcome, now),
            }
        }
        if stale.is_empty() {
            break;
        }
        todo = stale;
    }
}

/// Counts an outcome and keeps it in the message trace.
fn trace_outcome(
    service: &'static str,
    env: &Envelope,
    rcpt: &str,
    outcome: &Outcome,
    message_id: &Option<String>,
    took: Duration,
) {
    let (event, result) = match outcome {
        Outcome::Delivered(r) => ("delivered", r),
        Outcome::Failed(r) => ("bounced", r),
        Outcome::Deferred { reason, .. } | Outcome::Stale(reason) => ("deferred", reason),
    };
    crate::obs::messages(service, event, 1);
    crate::obs::trace(crate::obs::TraceEvent {
        // When the attempt started, so a trace reads in the order the hops were taken.
        at_us: crate::obs::now_us().saturating_sub(took.as_micros() as u64),
        service: service.to_owned(),
        event: event.to_owned(),
        queue_id: Some(env.id.to_string()),
        message_id: message_id.clone(),
        from: env.reverse_path.clone(),
        to: vec![rcpt.to_owned()],
        result: result.clone(),
        duration_ms: Some(took.as_millis() as u64),
        ..crate::obs::TraceEvent::default()
    });
}

/// Records one outcome in the recipient.
fn apply(settings: &RunnerSettings, r: &mut Recipient, outcome: Outcome, now: u64) {
    r.attempts += 1;
    match outcome {
        Outcome::Delivered(reply) => {
            tracing::info!(rcpt = %r.address, %reply, "delivered");
            r.state = RecipientState::Delivered;
            r.last_reply = Some(reply);
        }
        Outcome::Failed(reply) => {
            tracing::info!(rcpt = %r.address, %reply, "failed");
            r.state = RecipientState::Failed;
            r.last_reply = Some(reply);
        }
        Outcome::Deferred { reason, deferral } => defer(settings, r, reason, deferral, now),
        Outcome::Stale(reason) => defer(settings, r, reason, Deferral::Held, now),
    }
}

fn defer(
    settings: &RunnerSettings,
    r: &mut Recipient,
    reason: String,
    deferral: Deferral,
    now: u64,
) {
    let max = match deferral {
        Deferral::Held => settings.retry_max.min(HELD_RETRY_MAX),
        Deferral::Retry => settings.retry_max,
    };
    let delay = backoff(r.attempts, settings.retry_min, max.max(settings.retry_min));
    tracing::info!(rcpt = %r.address, %reason, delay_ms = millis(delay), "deferred");
    r.deferral = deferral;
    r.next_try_ms = now + millis(delay);
    r.last_reply = Some(reason);
}

/// Fails the pending recipients past the queue lifetime (those held by the platform never
/// expire), and returns the recipients that failed in this attempt.
fn expire_and_collect_failed(
    settings: &RunnerSettings,
    env: &mut Envelope,
    was_pending: &[usize],
    now: u64,
) -> Vec<usize> {
    let expired = now
        >= env
            .queued_ms
            .saturating_add(millis(settings.queue_lifetime));
    for r in &mut env.recipients {
        if expired && r.is_pending() && r.deferral == Deferral::Retry {
            let last = r.last_reply.take().unwrap_or_else(|| "never tried".into());
            tracing::info!(rcpt = %r.address, "expired");
            r.state = RecipientState::Failed;
            r.last_reply = Some(format!("4.4.7 delivery time expired; last error: {last}"));
        }
    }
    was_pending
        .iter()
        .copied()
        .filter(|&i| {
            env.recipients
                .get(i)
                .is_some_and(|r| r.state == RecipientState::Failed)
        })
        .collect()
}

/// Queues a bounce for the `failed` recipients to the sender, unless the sender is null or
/// the message is itself a bounce (RFC 5321 §6.1, §4.5.5: no bounce loops). The bounce is
/// routed like any message by the service's transport.
async fn bounce(
    spool: &Arc<Runner>,
    env: &Envelope,
    failed: &[usize],
    message: &[u8],
) -> Result<(), StoreError> {
    if env.reverse_path.is_empty() || env.origin == Origin::Bounce {
        return Ok(());
    }
    let Ok(sender) = Address::parse_with(&env.reverse_path, ParseOptions::SMTPUTF8) else {
        tracing::warn!(sender = %env.reverse_path, "cannot bounce to an unparsable sender");
        return Ok(());
    };
    let failed: Vec<&Recipient> = failed
        .iter()
        .filter_map(|&i| env.recipients.get(i))
        .collect();
    let hostname = &spool.settings.hostname;
    let bytes = match bounce::build(hostname, env, &failed, message) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "no bounce sent");
            return Ok(());
        }
    };
    let q = spool.queue.clone();
    let template = Envelope {
        id: env.id.clone(),
        reverse_path: String::new(),
        smtputf8: sender.is_utf8(),
        origin: Origin::Bounce,
        queued_ms: now_millis(),
        conn: env.conn.clone(),
        client_ip: String::new(),
        helo: String::new(),
        size: bytes.len() as u64,
        held: false,
        recipients: vec![Recipient::new(sender.key(), None)],
    };
    let id = blocking(move || {
        let (id, mut file) = q.create()?;
        let envelope = Envelope {
            id: id.clone(),
            ..template
        };
        if let Err(e) = file.write_all(&bytes) {
            q.discard(&id);
            return Err(StoreError::Io {
                path: q.dir().to_owned(),
                source: e,
            });
        }
        q.commit(file, &envelope)?;
        Ok(id)
    })
    .await?;
    tracing::info!(bounce = %id, rcpts = failed.len(), "bounce queued");
    spool.scheduler.schedule(id, 0);
    Ok(())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_hands_out_due_entries_once() {
        let s = Scheduler::default();
        let (a, b) = (QueueId::generate(), QueueId::generate());
        s.schedule(a.clone(), 10);
        s.schedule(b.clone(), 50);
        s.schedule(a.clone(), 5); // moved earlier
        assert_eq!(s.take_due(20, 10), vec![a.clone()]);
        assert_eq!(s.next_due(), Some(50));
        s.schedule(a.clone(), 0); // while running: kept for later
        assert!(s.take_due(20, 10).is_empty());
        s.finish(&a, Some(100));
        assert_eq!(
            s.take_due(20, 10),
            vec![a.clone()],
            "the earlier request wins"
        );
        s.finish(&a, None);
        assert_eq!(s.take_due(1000, 1), vec![b.clone()]);
        s.finish(&b, None);
        assert_eq!(s.len(), 0);
    }
}
