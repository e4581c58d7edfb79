//! Per-user sending limits: messages per hour, over a sliding window.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// The window of the hourly limit.
const WINDOW: Duration = Duration::from_secs(3600);
/// Users tracked before the idle ones are dropped (bounds memory under any load).
const MAX_USERS: usize = 100_000;

/// Messages each user sent in the last hour.
pub(crate) struct Hourly {
    per_hour: usize,
    sent: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl Hourly {
    pub(crate) fn new(per_hour: usize) -> Self {
        Self {
            per_hour,
            sent: Mutex::default(),
        }
    }

    /// Whether `user` may send one more message now.
    pub(crate) fn allows(&self, user: &str) -> bool {
        let mut sent = self.sent.lock().unwrap_or_else(PoisonError::into_inner);
        match sent.get_mut(user) {
            Some(times) => {
                prune(times, Instant::now());
                times.len() < self.per_hour
            }
            None => true,
        }
    }

    /// Counts one message of `user` if the limit allows it, in one step (so parallel sessions
    /// of one user cannot overshoot); false when it does not.
    pub(crate) fn take(&self, user: &str) -> bool {
        let now = Instant::now();
        let mut sent = self.sent.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(times) = sent.get_mut(user) {
            prune(times, now);
            if times.len() >= self.per_hour {
                return false;
            }
        }
        drop(sent);
        self.record(user);
        true
    }

    /// Gives back a message counted by [`Hourly::take`] that was not queued after all.
    pub(crate) fn give_back(&self, user: &str) {
        let mut sent = self.sent.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(times) = sent.get_mut(user) {
            times.pop_back();
        }
    }

    /// Counts one message of `user`.
    fn record(&self, user: &str) {
        let now = Instant::now();
        let mut sent = self.sent.lock().unwrap_or_else(PoisonError::into_inner);
        if sent.len() >= MAX_USERS && !sent.contains_key(user) {
            sent.retain(|_, times| {
                prune(times, now);
                !times.is_empty()
            });
        }
        let times = sent.entry(user.to_owned()).or_default();
        prune(times, now);
        times.push_back(now);
        // Only the last `per_hour` times matter.
        while times.len() > self.per_hour {
            times.pop_front();
        }
    }
}

fn prune(times: &mut VecDeque<Instant>, now: Instant) {
    while times
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) >= WINDOW)
    {
        times.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_limit_trips_at_the_count_and_frees_after_an_hour() {
        let h = Hourly::new(3);
        for _ in 0..3 {
            assert!(h.allows("a@x.test"));
            assert!(h.take("a@x.test"));
        }
        assert!(!h.allows("a@x.test"));
        assert!(!h.take("a@x.test"), "a fourth is refused, not counted");
        h.give_back("a@x.test");
        assert!(h.take("a@x.test"), "a message given back frees its slot");
        assert!(h.allows("b@x.test"), "per user");
        tokio::time::advance(Duration::from_secs(3599)).await;
        assert!(!h.allows("a@x.test"));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(h.allows("a@x.test"));
    }
}
