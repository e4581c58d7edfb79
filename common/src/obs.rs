//! Observability the services share: Prometheus metrics through the `metrics` facade (the
//! process that runs the services installs a recorder and serves `/metrics`; without one the
//! calls cost next to nothing), and the message trace: a bounded in-memory store of what
//! happened to each message at each hop, so `mailctl trace` can answer "where is my mail?".
//!
//! Metric names (all with a `service` label):
//! - `mail_connections_total{protocol, result}`: accepted, untrusted, busy
//! - `mail_sessions_active{protocol}`
//! - `mail_auth_total{result}`: success, failure, unavailable
//! - `mail_messages_total{event}`: accepted, refused, delivered, deferred, bounced, stored,
//!   scanned, spam
//! - `mail_delivery_seconds` (histogram): one delivery attempt to the next hop
//! - `mail_fsync_seconds` (histogram): a durable write (queue entry, Maildir file)
//! - `mail_queue_messages{queue}`, `mail_queue_oldest_seconds{queue}` (gauges, at scrape)
//! - `mail_filer_up{filer}` (gauge): a filer's health as this service sees it (the proxy's
//!   circuit breaker; the spool's last connection to it)

use std::collections::VecDeque;
use std::sync::{LazyLock, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

/// Buckets of the latency histograms, in seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Events kept by a process's trace store; the oldest go first.
pub const TRACE_CAPACITY: usize = 20_000;
/// Minutes of per-minute counts kept for the status page's chart.
pub const MINUTES: usize = 60;

/// Counts a connection by its outcome at accept time.
pub fn connection(service: &'static str, protocol: &'static str, result: &'static str) {
    metrics::counter!("mail_connections_total", "service" => service, "protocol" => protocol, "result" => result)
        .increment(1);
}

/// A session in progress: counted in `mail_sessions_active` until dropped.
pub struct ActiveSession {
    gauge: metrics::Gauge,
}

impl ActiveSession {
    /// Starts counting a session.
    pub fn start(service: &'static str, protocol: &'static str) -> Self {
        let gauge =
            metrics::gauge!("mail_sessions_active", "service" => service, "protocol" => protocol);
        gauge.increment(1.0);
        Self { gauge }
    }
}

impl Drop for ActiveSession {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
    }
}

/// Counts a login: `success`, `failure` or `unavailable`.
pub fn auth(service: &'static str, result: &'static str) {
    metrics::counter!("mail_auth_total", "service" => service, "result" => result).increment(1);
}

/// Counts `n` messages (or recipients) at a hop: `accepted`, `refused`, `delivered`,
/// `deferred`, `bounced`, `stored`, `scanned`, `spam`.
pub fn messages(service: &'static str, event: &'static str, n: u64) {
    metrics::counter!("mail_messages_total", "service" => service, "event" => event).increment(n);
}

/// Records how long one delivery attempt to the next hop took.
pub fn delivery_latency(service: &'static str, seconds: f64) {
    metrics::histogram!("mail_delivery_seconds", "service" => service).record(seconds);
}

/// Records how long a durable write (write, fsync, rename, directory fsync) took.
pub fn fsync_latency(service: &'static str, seconds: f64) {
    metrics::histogram!("mail_fsync_seconds", "service" => service).record(seconds);
}

/// Publishes a filer's health as `service` sees it.
pub fn filer_health(service: &'static str, filer: &str, up: bool) {
    metrics::gauge!("mail_filer_up", "service" => service, "filer" => filer.to_owned())
        .set(if up { 1.0 } else { 0.0 });
}

/// One thing that happened to a message at one hop.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TraceEvent {
    /// When, in microseconds since the Unix epoch (the start of the step).
    pub at_us: u64,
    /// The service instance (`spool`, `filter`, `relay`, `filer1`).
    pub service: String,
    /// What happened: `received`, `delivered`, `deferred`, `bounced`, `refused`, `scanned`,
    /// `stored`.
    pub event: String,
    /// The queue entry, where the service has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_id: Option<String>,
    /// The message's `Message-ID` (without the angle brackets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// The envelope sender.
    pub from: String,
    /// The recipients this event is about.
    pub to: Vec<String>,
    /// The client it came from, or the next hop it went to.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub peer: String,
    /// The reply given or received, or a short result.
    pub result: String,
    /// How long the step took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

impl TraceEvent {
    /// Whether the event is about `q`: a queue id, a Message-ID (with or without `<>`) or an
    /// address (sender or recipient), compared without case.
    pub fn matches(&self, q: &str) -> bool {
        let q = q.trim();
        if q.is_empty() {
            return false;
        }
        let bare = q.trim_start_matches('<').trim_end_matches('>');
        self.queue_id.as_deref() == Some(q)
            || self
                .message_id
                .as_deref()
                .is_some_and(|m| m.eq_ignore_ascii_case(bare))
            || self.from.eq_ignore_ascii_case(bare)
            || self.to.iter().any(|t| t.eq_ignore_ascii_case(bare))
    }
}

/// Per-minute counts for the status page.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Minute {
    /// Minutes since the Unix epoch.
    pub minute: u64,
    /// Messages received (accepted from a client or submitted).
    pub received: u64,
    /// Deliveries into a mailbox or to a remote server.
    pub delivered: u64,
    /// Refusals and bounces.
    pub refused: u64,
}

struct Store {
    events: VecDeque<TraceEvent>,
    minutes: VecDeque<Minute>,
}

static STORE: LazyLock<Mutex<Store>> = LazyLock::new(|| {
    Mutex::new(Store {
        events: VecDeque::with_capacity(1024),
        minutes: VecDeque::with_capacity(MINUTES),
    })
});

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Keeps an event (the oldest is dropped past [`TRACE_CAPACITY`]) and logs it as one line.
pub fn trace(mut event: TraceEvent) {
    if event.at_us == 0 {
        event.at_us = now_us();
    }
    tracing::info!(
        target: "mail::trace",
        service = %event.service,
        event = %event.event,
        queue_id = event.queue_id.as_deref().unwrap_or("-"),
        message_id = event.message_id.as_deref().unwrap_or("-"),
        from = %event.from,
        to = %event.to.join(","),
        peer = %event.peer,
        result = %event.result,
        "message {}", event.event
    );
    let minute = event.at_us / 60_000_000;
    let mut s = STORE.lock().unwrap_or_else(PoisonError::into_inner);
    if s.minutes.back().is_none_or(|m| m.minute < minute) {
        if s.minutes.len() == MINUTES {
            s.minutes.pop_front();
        }
        s.minutes.push_back(Minute {
            minute,
            ..Minute::default()
        });
    }
    if let Some(m) = s.minutes.iter_mut().rev().find(|m| m.minute == minute) {
        let n = event.to.len().max(1) as u64;
        match event.event.as_str() {
            "received" => m.received += 1,
            "stored" => m.delivered += n,
            "delivered" if !event.service.starts_with("spool") => m.delivered += n,
            "refused" | "bounced" => m.refused += n,
            _ => {}
        }
    }
    if s.events.len() == TRACE_CAPACITY {
        s.events.pop_front();
    }
    s.events.push_back(event);
}

/// The kept events about `q` (see [`TraceEvent::matches`]), oldest first, at most `limit`
/// (the newest of them).
pub fn find(q: &str, limit: usize) -> Vec<TraceEvent> {
    let s = STORE.lock().unwrap_or_else(PoisonError::into_inner);
    let mut found: Vec<TraceEvent> = s
        .events
        .iter()
        .rev()
        .filter(|e| e.matches(q))
        .take(limit)
        .cloned()
        .collect();
    found.reverse();
    found
}

/// The newest `limit` events whose kind is one of `kinds` (all kinds when empty), newest
/// first.
pub fn recent(kinds: &[&str], limit: usize) -> Vec<TraceEvent> {
    let s = STORE.lock().unwrap_or_else(PoisonError::into_inner);
    s.events
        .iter()
        .rev()
        .filter(|e| kinds.is_empty() || kinds.contains(&e.event.as_str()))
        .take(limit)
        .cloned()
        .collect()
}

/// The per-minute counts of the last [`MINUTES`] minutes, oldest first.
pub fn minutes() -> Vec<Minute> {
    let s = STORE.lock().unwrap_or_else(PoisonError::into_inner);
    s.minutes.iter().copied().collect()
}

/// The `Message-ID` of a message (without `<>` and whitespace), from its header section.
pub fn message_id(data: &[u8]) -> Option<String> {
    let end = data
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(data.len().min(64 * 1024), |i| i + 2);
    let head = &data[..end];
    let mut lines = head.split(|&b| b == b'\n').peekable();
    while let Some(line) = lines.next() {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if !line[..colon].eq_ignore_ascii_case(b"message-id") {
            continue;
        }
        let mut value = line[colon + 1..].to_vec();
        while let Some(next) = lines.peek() {
            if !next.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
                break;
            }
            value.extend_from_slice(next);
            lines.next();
        }
        let v: String = String::from_utf8_lossy(&value)
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        let v = v.trim_start_matches('<').trim_end_matches('>');
        return (!v.is_empty()).then(|| v.chars().take(998).collect());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_found_unfolded_and_bare() {
        assert_eq!(
            message_id(b"Subject: x\r\nMessage-Id:\r\n <a@b>\r\n\r\nbody Message-ID: <no@no>"),
            Some("a@b".into())
        );
        assert_eq!(
            message_id(b"Subject: x\r\n\r\nMessage-ID: <no@no>\r\n"),
            None
        );
        assert_eq!(message_id(b"Message-ID: \r\n\r\n"), None);
    }

    #[test]
    fn events_are_found_by_queue_id_message_id_and_address() {
        let e = TraceEvent {
            service: "spool".into(),
            event: "received".into(),
            queue_id: Some("Q1TRACETEST".into()),
            message_id: Some("m1@trace.test".into()),
            from: "a@trace.test".into(),
            to: vec!["B@trace.test".into()],
            result: "250".into(),
            ..TraceEvent::default()
        };
        trace(e.clone());
        for q in [
            "Q1TRACETEST",
            "<m1@trace.test>",
            "m1@trace.test",
            "b@trace.test",
            "A@TRACE.TEST",
        ] {
            let found = find(q, 10);
            assert_eq!(found.len(), 1, "{q}");
            assert_eq!(found[0].queue_id, e.queue_id);
        }
        assert!(find("nobody@trace.test", 10).is_empty());
        assert!(find("", 10).is_empty());
        assert!(
            recent(&["received"], 100)
                .iter()
                .any(|r| r.queue_id == e.queue_id)
        );
        assert!(minutes().last().is_some_and(|m| m.received >= 1));
    }
}
