//! The hop to the filers: each recipient is looked up in the location database, recipients
//! are grouped by filer, and each group goes over one LMTP transaction, which gives one reply
//! per recipient (RFC 2033).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use common::location::{Directory, FilerState, MailboxState, domain_of};
use common::queue::runner::{Outcome, Transport};
use common::queue::{Deferral, Envelope, Origin};
use common::smtp::Reply;
use common::smtp::client::{Client, ClientSettings, HopError, Protocol};
use tokio::sync::Semaphore;

use crate::Settings;

/// The spool's transport: LMTP to the filers, looked up in the location database.
pub(crate) struct Filers {
    settings: Arc<Settings>,
    directory: Arc<dyn Directory>,
    limits: FilerLimits,
}

impl Filers {
    pub(crate) fn new(settings: Arc<Settings>, directory: Arc<dyn Directory>) -> Self {
        Self {
            settings,
            directory,
            limits: FilerLimits::default(),
        }
    }
}

#[async_trait::async_trait]
impl Transport for Filers {
    async fn deliver(
        &self,
        envelope: &Envelope,
        recipients: &[String],
        message: Arc<[u8]>,
    ) -> Vec<Outcome> {
        if envelope.origin == Origin::Smtp
            && let Some(filter) = self.settings.filter.address()
        {
            return to_filter(&self.settings, filter, envelope, recipients, &message).await;
        }
        deliver(
            &self.settings,
            self.directory.as_ref(),
            &self.limits,
            &envelope.reverse_path,
            recipients,
            message,
        )
        .await
    }
}

/// Where a recipient goes.
enum Route {
    /// A mailbox on this filer.
    Filer { filer: String, lmtp: SocketAddr },
    /// Another domain: through the relay.
    Remote,
}

/// Per-filer LMTP session limits, made on first use.
#[derive(Default)]
struct FilerLimits(Mutex<HashMap<String, Arc<Semaphore>>>);

impl FilerLimits {
    fn get(&self, filer: &str, permits: usize) -> Arc<Semaphore> {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.entry(filer.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(permits)))
            .clone()
    }
}

/// Delivers `message` to `recipients` (key form) and returns one outcome per recipient,
/// in order. The filers are tried concurrently, each within its session limit.
async fn deliver(
    settings: &Arc<Settings>,
    directory: &dyn Directory,
    limits: &FilerLimits,
    reverse_path: &str,
    recipients: &[String],
    message: Arc<[u8]>,
) -> Vec<Outcome> {
    let mut outcomes: Vec<Option<Outcome>> = vec![None; recipients.len()];
    let mut groups: HashMap<SocketAddr, (String, Vec<usize>)> = HashMap::new();
    let mut remote: Vec<usize> = Vec::new();
    for (i, rcpt) in recipients.iter().enumerate() {
        match route(directory, rcpt).await {
            Ok(Route::Filer { filer, lmtp }) => groups
                .entry(lmtp)
                .or_insert_with(|| (filer, Vec::new()))
                .1
                .push(i),
            Ok(Route::Remote) => remote.push(i),
            Err(o) => {
                if let Some(slot) = outcomes.get_mut(i) {
                    *slot = Some(o);
                }
            }
        }
    }
    let mut sends = tokio::task::JoinSet::new();
    if !remote.is_empty() {
        let paths: Vec<String> = remote
            .iter()
            .filter_map(|&i| recipients.get(i).cloned())
            .collect();
        let (settings, message, reverse_path) =
            (settings.clone(), message.clone(), reverse_path.to_owned());
        sends.spawn(async move {
            let results = to_relay(&settings, &reverse_path, &paths, &message).await;
            (remote, results)
        });
    }
    for (lmtp, (filer, idx)) in groups {
        let paths: Vec<String> = idx
            .iter()
            .filter_map(|&i| recipients.get(i).cloned())
            .collect();
        let sem = limits.get(&filer, settings.filer_concurrency);
        let (settings, message, reverse_path) =
            (settings.clone(), message.clone(), reverse_path.to_owned());
        sends.spawn(async move {
            let results = match sem.acquire_owned().await {
                Ok(_permit) => send(&settings, &filer, lmtp, &reverse_path, &paths, &message).await,
                Err(_) => vec![held(format!("filer {filer}: closed")); paths.len()],
            };
            (idx, results)
        });
    }
    while let Some(joined) = sends.join_next().await {
        let Ok((idx, results)) = joined else {
            continue; // a panicked send leaves its recipients "not attempted"
        };
        for (i, o) in idx.into_iter().zip(results) {
            if let Some(slot) = outcomes.get_mut(i) {
                *slot = Some(o);
            }
        }
    }
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or_else(|| held("not attempted".into())))
        .collect()
}

/// Looks a recipient up: its filer and that filer's LMTP address (or the relay, for another
/// domain), or why it cannot go now.
async fn route(directory: &dyn Directory, rcpt: &str) -> Result<Route, Outcome> {
    let mailbox = match directory.mailbox(rcpt).await {
        Ok(Some(m)) => m,
        Ok(None) => {
            // A bounce to a remote sender, or a mailbox removed since RCPT time.
            let domain = domain_of(rcpt).unwrap_or_default();
            return match directory.is_hosted_domain(domain).await {
                Ok(true) => Err(Outcome::Failed("550 5.1.1 no such mailbox".into())),
                Ok(false) => Ok(Route::Remote),
                Err(e) => Err(held(format!("location lookup failed: {e}"))),
            };
        }
        Err(e) => return Err(held(format!("location lookup failed: {e}"))),
    };
    match mailbox.state {
        MailboxState::Active => {}
        MailboxState::Moving => return Err(held("mailbox is being moved".into())),
        MailboxState::Disabled => {
            return Err(Outcome::Failed("550 5.2.1 mailbox disabled".into()));
        }
    }
    let filer = match directory.filer(&mailbox.filer).await {
        Ok(Some(f)) => f,
        Ok(None) => return Err(held(format!("unknown filer {}", mailbox.filer))),
        Err(e) => return Err(held(format!("location lookup failed: {e}"))),
    };
    if filer.state == FilerState::Down {
        return Err(held(format!("filer {} is down", filer.name)));
    }
    match filer.lmtp.parse::<SocketAddr>() {
        Ok(lmtp) => Ok(Route::Filer {
            filer: filer.name,
            lmtp,
        }),
        Err(_) => Err(held(format!(
            "filer {} has no usable lmtp address {:?}",
            filer.name, filer.lmtp
        ))),
    }
}

/// One LMTP transaction to one filer.
async fn send(
    settings: &Settings,
    filer: &str,
    lmtp: SocketAddr,
    reverse_path: &str,
    paths: &[String],
    message: &[u8],
) -> Vec<Outcome> {
    let mut client_settings = ClientSettings::new(settings.shared.hostname.clone(), Protocol::Lmtp);
    client_settings.connect_timeout = settings
        .lmtp_timeout
        .min(std::time::Duration::from_secs(30));
    client_settings.command_timeout = settings.lmtp_timeout;
    client_settings.data_timeout = settings.lmtp_timeout;
    let mut client = match Client::connect(lmtp, &client_settings).await {
        Ok(c) => {
            common::obs::filer_health("spool", filer, true);
            c
        }
        Err(e) => {
            tracing::warn!(filer, error = %e, "filer unreachable");
            common::obs::filer_health("spool", filer, false);
            return vec![held(format!("filer {filer} unreachable: {e}")); paths.len()];
        }
    };
    let result = client.send(reverse_path, paths, message).await;
    let outcomes = match result {
        Ok(replies) => replies.iter().map(classify).collect(),
        Err(HopError::Partial { replies, source }) => {
            tracing::warn!(filer, error = %source, "lmtp session lost after some replies");
            replies
                .iter()
                .map(|r| match r {
                    Some(r) => classify(r),
                    None => held(format!("filer {filer}: {source}")),
                })
                .collect()
        }
        Err(e) if e.is_permanent() => {
            let text = e.reply().map_or_else(|| e.to_string(), Reply::to_string);
            vec![Outcome::Failed(text); paths.len()]
        }
        Err(e) => {
            tracing::warn!(filer, error = %e, "lmtp transaction failed");
            vec![held(format!("filer {filer}: {e}")); paths.len()]
        }
    };
    client.quit().await;
    outcomes
}

/// Hands mail for other domains (bounces to remote senders, aliases that forward outside) to
/// the relay's internal listener. The relay is part of the platform: when it cannot be
/// reached the recipients wait (and expire with the queue lifetime, like any remote
/// delivery); a 5xx bounces.
async fn to_relay(
    settings: &Settings,
    reverse_path: &str,
    recipients: &[String],
    message: &[u8],
) -> Vec<Outcome> {
    let Some(relay) = settings.relay.address() else {
        let why = "no relay configured for other domains";
        return vec![Outcome::retry(why.into()); recipients.len()];
    };
    let mut cs = ClientSettings::new(settings.shared.hostname.clone(), Protocol::Smtp);
    cs.connect_timeout = settings
        .lmtp_timeout
        .min(std::time::Duration::from_secs(30));
    cs.command_timeout = settings.lmtp_timeout;
    cs.data_timeout = settings.lmtp_timeout;
    let mut client = match Client::connect(relay, &cs).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%relay, error = %e, "relay unreachable");
            return vec![Outcome::retry(format!("relay unreachable: {e}")); recipients.len()];
        }
    };
    let result = client.send(reverse_path, recipients, message).await;
    client.quit().await;
    match result {
        Ok(replies) => replies
            .iter()
            .map(|r| match classify(r) {
                Outcome::Delivered(t) => Outcome::Delivered(format!("relayed: {t}")),
                Outcome::Failed(t) => Outcome::Failed(t),
                Outcome::Deferred { reason, .. } | Outcome::Stale(reason) => Outcome::retry(reason),
            })
            .collect(),
        Err(e) if e.is_permanent() => {
            let text = e.reply().map_or_else(|| e.to_string(), Reply::to_string);
            vec![Outcome::Failed(text); recipients.len()]
        }
        Err(e) => vec![Outcome::retry(format!("relay: {e}")); recipients.len()],
    }
}

/// Hands a new message to the content filter over SMTP, with XFORWARD so it judges the real
/// client. The filter answers only after the filtered message was reinjected (and is queued
/// again here as a new entry), so its `250` settles these recipients. The filter is part of
/// the platform: when it cannot be reached, or answers 4xx, the recipients are held (retried,
/// never expired); a 5xx bounces.
async fn to_filter(
    settings: &Settings,
    filter: SocketAddr,
    envelope: &Envelope,
    recipients: &[String],
    message: &[u8],
) -> Vec<Outcome> {
    let mut cs = ClientSettings::new(settings.shared.hostname.clone(), Protocol::Smtp);
    cs.connect_timeout = settings
        .lmtp_timeout
        .min(std::time::Duration::from_secs(30));
    cs.command_timeout = settings.lmtp_timeout;
    cs.data_timeout = settings.lmtp_timeout;
    let mut client = match Client::connect(filter, &cs).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%filter, error = %e, "filter unreachable");
            return vec![held(format!("filter unreachable: {e}")); recipients.len()];
        }
    };
    let ident = envelope.id.to_string();
    let attrs = [
        ("ADDR", envelope.client_ip.as_str()),
        ("HELO", envelope.helo.as_str()),
        ("PROTO", "ESMTP"),
        ("SOURCE", "REMOTE"),
        ("IDENT", ident.as_str()),
    ];
    let result = match client.xforward(&attrs).await {
        Ok(_) => {
            client
                .send(&envelope.reverse_path, recipients, message)
                .await
        }
        Err(e) => Err(e),
    };
    client.quit().await;
    match result {
        Ok(replies) => replies
            .iter()
            .map(|r| match classify(r) {
                Outcome::Delivered(t) => Outcome::Delivered(format!("filtered: {t}")),
                Outcome::Failed(t) => Outcome::Failed(t),
                // The filter's own troubles: hold, never expire.
                Outcome::Deferred { reason, .. } | Outcome::Stale(reason) => held(reason),
            })
            .collect(),
        Err(e) if e.is_permanent() => {
            let text = e.reply().map_or_else(|| e.to_string(), Reply::to_string);
            vec![Outcome::Failed(text); recipients.len()]
        }
        Err(e) => {
            tracing::warn!(%filter, error = %e, "filter hand-off failed");
            vec![held(format!("filter: {e}")); recipients.len()]
        }
    }
}

/// What one LMTP reply means for its recipient. Temporary vs permanent follows the reply
/// class; the enhanced code only picks among temporary ones.
fn classify(reply: &Reply) -> Outcome {
    let text = reply.to_string();
    if reply.is_positive() {
        return Outcome::Delivered(text);
    }
    if reply.is_permanent() {
        return Outcome::Failed(text);
    }
    match reply.enhanced.map(|e| (e.subject, e.detail)) {
        // The filer's "mailbox is not on this filer" (stale route).
        Some((4, 0)) => Outcome::Stale(text),
        // The filer's "mailbox is being moved".
        Some((2, 0)) => Outcome::Deferred {
            reason: text,
            deferral: Deferral::Held,
        },
        _ => Outcome::Deferred {
            reason: text,
            deferral: Deferral::Retry,
        },
    }
}

fn held(reason: String) -> Outcome {
    Outcome::held(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_classified_by_class_then_enhanced_code() {
        let cases = [
            (Reply::ok(250, "2.0.0", "ok"), "delivered"),
            (Reply::perm(550, "5.1.1", "no"), "failed"),
            (Reply::temp(451, "4.4.0", "elsewhere"), "stale"),
            (Reply::temp(451, "4.2.0", "moving"), "held"),
            (Reply::temp(452, "4.2.2", "full"), "retry"),
            (Reply::temp(421, "", "bye"), "retry"),
        ];
        for (reply, want) in cases {
            let got = match classify(&reply) {
                Outcome::Delivered(_) => "delivered",
                Outcome::Failed(_) => "failed",
                Outcome::Stale(_) => "stale",
                Outcome::Deferred {
                    deferral: Deferral::Held,
                    ..
                } => "held",
                Outcome::Deferred { .. } => "retry",
            };
            assert_eq!(got, want, "{reply}");
        }
    }
}
