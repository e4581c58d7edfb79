//! `mailctl migrate ADDRESS --to FILER`: moving a mailbox to another filer while mail keeps
//! arriving and users stay connected (#9).
//!
//! It runs on the destination filer's host (the filer must be in this host's configuration:
//! its store is written here) and reads the source filer over IMAP with the migration login
//! (`<proxy principal>+migrate`, the proxy secret), through [`filer::migrate`]:
//!
//! 1. **Bulk copy** while the user is live: two passes (the second catches up with what arrived
//!    during the first).
//! 2. **Hold**: the mailbox is marked `moving`. Spools keep its deliveries in their queues, the
//!    proxy answers the temporary-failure code, the source filer ends its sessions and refuses
//!    LMTP for it (checking the database past its cache right before each write). The tool waits
//!    one cache TTL (and a second) so every service has seen it.
//! 3. **Final copy and verify** (UIDVALIDITY, the UID list, flags and a content hash per folder),
//!    up to three rounds until both sides match; otherwise the mailbox goes back to `active` on
//!    the source and the tool fails, having changed nothing the user can see.
//! 4. **Flip**: one transaction puts the mailbox on the new filer, `active`; held mail flows there.
//! 5. **Sweep**: a cache TTL later, anything that still reached the old copy (a delivery whose
//!    write was in flight across the flip) is appended to the new one as new mail.
//!
//! Interrupted before the flip (killed, source unreachable), the mailbox stays on the old filer
//! with everything in it; running the command again resumes (a `moving` mailbox bound for the
//! same filer is picked up where it was). The old copy stays until it is purged.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use common::location::{Directory, MailboxState};
use filer::migrate::{PassReport, Source, sync_pass, verify};
use serde::Serialize;

use crate::config::PlatformSettings;

/// What a migration did, for the summary and `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The mailbox.
    pub address: String,
    /// The filer it left.
    pub from: String,
    /// The filer it is on now.
    pub to: String,
    /// Messages in the mailbox at the end.
    pub messages: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Messages copied over all passes.
    pub copied: u64,
    /// How long the mailbox was `moving` (deliveries held, logins refused), in milliseconds.
    pub moving_ms: u64,
    /// The whole run, in milliseconds.
    pub total_ms: u64,
    /// Messages that reached the old copy during the flip and were appended to the new one.
    pub swept: u64,
}

/// Moves `address` to filer `to`. `progress` sees each pass's running figures.
pub async fn migrate(
    settings: &PlatformSettings,
    db: Arc<dyn Directory>,
    address: &str,
    to: &str,
    progress: &(dyn Fn(&str, &PassReport) + Send + Sync),
) -> anyhow::Result<Summary> {
    let started = tokio::time::Instant::now();
    let address = common::address::Address::parse(address)
        .with_context(|| format!("{address:?} is not an address"))?
        .key();
    let Some(mailbox) = db.mailbox(&address).await? else {
        bail!("no mailbox {address}");
    };
    let from = mailbox.filer.clone();
    match mailbox.state {
        MailboxState::Active if from == to => bail!("{address} is already on {to}"),
        MailboxState::Active | MailboxState::Moving => {}
        MailboxState::Disabled => bail!("{address} is disabled; enable it before moving it"),
    }
    let Some(dest) = settings.filers.iter().find(|f| f.name == to) else {
        bail!("filer {to} does not run on this host: run the migration where its mail is");
    };
    if db.filer(to).await?.is_none() {
        bail!("filer {to} is not in the location database");
    }
    let Some(source_filer) = db.filer(&from).await? else {
        bail!("the mailbox's filer {from} is not in the location database");
    };
    let imap = source_filer.imap.parse().with_context(|| {
        format!(
            "filer {from} has no usable imap address {:?}",
            source_filer.imap
        )
    })?;
    let shared = settings.shared.clone();
    let secret = tokio::task::spawn_blocking(move || shared.resolve_proxy_secret())
        .await?
        .context("reading the proxy secret")?;
    let source = Source {
        imap,
        user: address.clone(),
        principal: filer::migration_principal(&settings.shared.proxy_principal),
        secret,
    };
    let (root, host, addr, seed) = (
        dest.mail_root.clone(),
        settings.shared.hostname.clone(),
        address.clone(),
        mailbox.uidvalidity_seed,
    );
    let dest_store = tokio::task::spawn_blocking(move || {
        filer::store::Store::new(root, &host).user(&addr, seed)
    })
    .await?
    .context("opening the destination mailbox")?;

    let mut copied = 0;
    if mailbox.state == MailboxState::Active {
        for pass in ["copy", "catch up"] {
            let report = sync_pass(&source, dest_store.clone(), &|r| progress(pass, r)).await?;
            progress(pass, &report);
            copied += report.copied;
        }
        db.set_mailbox_state(&address, MailboxState::Moving).await?;
    }
    let moving_since = tokio::time::Instant::now();
    // Every service sees `moving` within one cache TTL; sessions on the old filer end then.
    tokio::time::sleep(settings.shared.cache_ttl + Duration::from_secs(1)).await;
    let mut last = PassReport::default();
    let mut matched = false;
    for round in 1..=3 {
        last = match sync_pass(&source, dest_store.clone(), &|r| progress("final", r)).await {
            Ok(r) => r,
            Err(e) => {
                release(db.as_ref(), &address).await;
                return Err(e).context("final copy failed; the mailbox stays where it was");
            }
        };
        copied += last.copied;
        let mismatches = match verify(&source, dest_store.clone()).await {
            Ok(m) => m,
            Err(e) => {
                release(db.as_ref(), &address).await;
                return Err(e).context("verification failed; the mailbox stays where it was");
            }
        };
        if mismatches.is_empty() {
            matched = true;
            break;
        }
        tracing::warn!(round, ?mismatches, "copies differ, copying again");
    }
    if !matched {
        release(db.as_ref(), &address).await;
        bail!("the copies still differ after three rounds; the mailbox stays on {from}");
    }
    // What the verified copy holds, folder by folder: the sweep takes anything above it.
    let d = dest_store.clone();
    let known: std::collections::HashMap<String, u32> =
        tokio::task::spawn_blocking(move || d.folders())
            .await??
            .into_iter()
            .map(|f| (f.name, f.uid_next))
            .collect();
    db.move_mailbox(&address, &from, to)
        .await
        .context("flipping the location")?;
    let moving_ms = u64::try_from(moving_since.elapsed().as_millis()).unwrap_or(u64::MAX);
    // A delivery whose write was in flight across the flip may have reached the old copy.
    tokio::time::sleep(settings.shared.cache_ttl + Duration::from_secs(1)).await;
    let swept = sweep(&source, dest_store.clone(), &known)
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the last sweep of the old copy failed");
            0
        });
    Ok(Summary {
        address,
        from,
        to: to.to_owned(),
        messages: last.messages + swept,
        bytes: last.bytes,
        copied,
        moving_ms,
        total_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        swept,
    })
}

/// Back to `active` on the old filer after a failure before the flip.
async fn release(db: &dyn Directory, address: &str) {
    if let Err(e) = db.set_mailbox_state(address, MailboxState::Active).await {
        tracing::error!(error = %e, address, "could not set the mailbox active again");
    }
}

/// Appends to the new copy, as new mail, whatever the old copy holds beyond what was copied.
async fn sweep(
    source: &Source,
    dest: Arc<filer::store::UserStore>,
    known: &std::collections::HashMap<String, u32>,
) -> anyhow::Result<u64> {
    Ok(filer::migrate::sweep(source, dest, known).await?)
}
