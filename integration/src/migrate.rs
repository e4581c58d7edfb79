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
//!    two cache TTLs (at least one TTL and 200 ms) so every service has seen it.
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
    tokio::time::sleep(settle(settings)).await;
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
    tokio::time::sleep(settle(settings)).await;
    let swept = sweep(&source, dest_store.clone(), &known)
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the last sweep of the old copy failed");
            0
        });
    // What rollback and purge need: where the old copy is, and the new copy's state now, so
    // a rollback can tell whether anything changed since.
    let d = dest_store.clone();
    let state = tokio::task::spawn_blocking(move || d.folders()).await??;
    let record = Record {
        address: address.clone(),
        from: from.clone(),
        to: to.to_owned(),
        folders: state
            .into_iter()
            .map(|f| (f.name, (f.uid_next, f.highest_modseq)))
            .collect(),
    };
    record.save(settings)?;
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

/// How long a change of the location takes to be seen everywhere: one cache TTL, and as much
/// again (at least 200 ms) for a write that was already under way.
fn settle(settings: &PlatformSettings) -> Duration {
    let ttl = settings.shared.cache_ttl;
    ttl + ttl.max(Duration::from_millis(200))
}

/// A finished migration, kept until the old copy is purged or the move rolled back, in
/// `<data_dir>/migrations/<address>.json` on the destination's host.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Record {
    /// The mailbox.
    pub address: String,
    /// The filer that keeps the old copy.
    pub from: String,
    /// The filer it moved to.
    pub to: String,
    /// The new copy's folders right after the move: name → (UIDNEXT, HIGHESTMODSEQ).
    pub folders: std::collections::BTreeMap<String, (u32, u64)>,
}

impl Record {
    fn path(settings: &PlatformSettings, address: &str) -> std::path::PathBuf {
        settings
            .shared
            .data_dir
            .join("migrations")
            .join(format!("{address}.json"))
    }

    fn save(&self, settings: &PlatformSettings) -> anyhow::Result<()> {
        let path = Self::path(settings, &self.address);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    fn load(settings: &PlatformSettings, address: &str) -> anyhow::Result<Self> {
        let path = Self::path(settings, address);
        let bytes = std::fs::read(&path).with_context(|| {
            format!(
                "no finished migration of {address} recorded here ({})",
                path.display()
            )
        })?;
        Ok(serde_json::from_slice(&bytes)?)
    }
}

/// The migration login to `filer`'s IMAP for `address`.
async fn source_for(
    settings: &PlatformSettings,
    db: &dyn Directory,
    filer: &str,
    address: &str,
) -> anyhow::Result<Source> {
    let Some(f) = db.filer(filer).await? else {
        bail!("filer {filer} is not in the location database");
    };
    let imap = f
        .imap
        .parse()
        .with_context(|| format!("filer {filer} has no usable imap address {:?}", f.imap))?;
    let shared = settings.shared.clone();
    let secret = tokio::task::spawn_blocking(move || shared.resolve_proxy_secret())
        .await?
        .context("reading the proxy secret")?;
    Ok(Source {
        imap,
        user: address.to_owned(),
        principal: filer::migration_principal(&settings.shared.proxy_principal),
        secret,
    })
}

/// `mailctl migrate purge ADDRESS`: empties the old copy of a finished migration. Returns the
/// number of messages removed.
pub async fn purge(
    settings: &PlatformSettings,
    db: Arc<dyn Directory>,
    address: &str,
) -> anyhow::Result<u64> {
    let address = common::address::Address::parse(address)?.key();
    let record = Record::load(settings, &address)?;
    match db.mailbox(&address).await? {
        Some(m) if m.filer == record.to => {}
        _ => bail!(
            "{address} is not on {} any more; not purging its copy on {}",
            record.to,
            record.from
        ),
    }
    let source = source_for(settings, db.as_ref(), &record.from, &address).await?;
    let removed = filer::migrate::purge(&source).await?;
    std::fs::remove_file(Record::path(settings, &address))?;
    Ok(removed)
}

/// `mailctl migrate rollback ADDRESS`: moves a migrated mailbox back to its old copy, if
/// nothing changed in the new one since the move (no message arrived, no flag changed);
/// otherwise refuses and says what changed.
pub async fn rollback(
    settings: &PlatformSettings,
    db: Arc<dyn Directory>,
    address: &str,
) -> anyhow::Result<Record> {
    let address = common::address::Address::parse(address)?.key();
    let record = Record::load(settings, &address)?;
    let Some(mailbox) = db.mailbox(&address).await? else {
        bail!("no mailbox {address}");
    };
    if mailbox.filer != record.to {
        bail!("{address} is on {}, not on {}", mailbox.filer, record.to);
    }
    let Some(dest) = settings.filers.iter().find(|f| f.name == record.to) else {
        bail!("filer {} does not run on this host", record.to);
    };
    let (root, host, addr, seed) = (
        dest.mail_root.clone(),
        settings.shared.hostname.clone(),
        address.clone(),
        mailbox.uidvalidity_seed,
    );
    let store = tokio::task::spawn_blocking(move || {
        filer::store::Store::new(root, &host).user(&addr, seed)
    })
    .await??;
    let changed = |store: Arc<filer::store::UserStore>, record: Record| async move {
        let now = tokio::task::spawn_blocking(move || store.folders()).await??;
        let mut what = Vec::new();
        for f in &now {
            match record.folders.get(&f.name) {
                Some(&(next, modseq)) if next == f.uid_next && modseq == f.highest_modseq => {}
                Some(&(next, _)) if f.uid_next > next => {
                    what.push(format!("{}: {} new message(s)", f.name, f.uid_next - next))
                }
                Some(_) => what.push(format!("{}: flags or messages changed", f.name)),
                None => what.push(format!("{}: new folder", f.name)),
            }
        }
        for name in record.folders.keys() {
            if !now.iter().any(|f| &f.name == name) {
                what.push(format!("{name}: folder deleted"));
            }
        }
        Ok::<_, anyhow::Error>(what)
    };
    let what = changed(store.clone(), record.clone()).await?;
    if !what.is_empty() {
        bail!(
            "not rolled back: {} changed since the move ({}); move it back with `mailctl migrate {address} --to {}` instead",
            address,
            what.join("; "),
            record.from
        );
    }
    db.set_mailbox_state(&address, MailboxState::Moving).await?;
    tokio::time::sleep(settle(settings)).await;
    let what = changed(store, record.clone()).await?;
    if !what.is_empty() {
        release(db.as_ref(), &address).await;
        bail!(
            "not rolled back: {} changed while holding it ({})",
            address,
            what.join("; ")
        );
    }
    db.move_mailbox(&address, &record.to, &record.from).await?;
    std::fs::remove_file(Record::path(settings, &address))?;
    Ok(record)
}

/// After an interruption: a mailbox left `moving` (on its old filer: the flip never happened)
/// goes back to `active`.
pub async fn release_if_moving(db: &dyn Directory, address: &str) {
    let Ok(a) = common::address::Address::parse(address) else {
        return;
    };
    if let Ok(Some(m)) = db.mailbox(&a.key()).await
        && m.state == MailboxState::Moving
    {
        release(db, &a.key()).await;
    }
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

/// What `mailctl filer drain` or `rebalance` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Moves {
    /// Each mailbox moved.
    pub moved: Vec<Summary>,
    /// Mailboxes that could not be moved, with why.
    pub failed: Vec<(String, String)>,
}

/// Where the next mailbox goes: the filer with the most free weight (the lowest
/// (mailboxes + 1) / weight) among those up, with a weight, running on this host, other than
/// `except`; counts are updated as moves are planned.
fn pick(counts: &mut [(String, u32, u64)], except: &str) -> Option<String> {
    let best = counts
        .iter_mut()
        .filter(|(name, weight, _)| name != except && *weight > 0)
        .min_by(|a, b| {
            let fa = (a.2 + 1) as f64 / f64::from(a.1);
            let fb = (b.2 + 1) as f64 / f64::from(b.1);
            fa.total_cmp(&fb).then_with(|| a.0.cmp(&b.0))
        })?;
    best.2 += 1;
    Some(best.0.clone())
}

/// The filers a mailbox may move to from here: up, with a weight, and configured on this host.
async fn targets(
    settings: &PlatformSettings,
    db: &dyn Directory,
) -> anyhow::Result<Vec<(String, u32, u64)>> {
    Ok(db
        .filers()
        .await?
        .into_iter()
        .filter(|u| {
            u.filer.state == common::location::FilerState::Up
                && settings.filers.iter().any(|f| f.name == u.filer.name)
        })
        .map(|u| (u.filer.name, u.filer.weight, u.mailboxes))
        .collect())
}

/// Runs the planned moves, `parallel` at a time.
async fn run_moves(
    settings: &Arc<PlatformSettings>,
    db: &Arc<dyn Directory>,
    plan: Vec<(String, String)>,
    parallel: usize,
    report: &(dyn Fn(&Result<Summary, String>) + Send + Sync),
) -> Moves {
    let mut moves = Moves::default();
    let mut set = tokio::task::JoinSet::new();
    let mut pending = plan.into_iter();
    loop {
        while set.len() < parallel.max(1) {
            let Some((address, to)) = pending.next() else {
                break;
            };
            let (settings, db) = (settings.clone(), db.clone());
            set.spawn(async move {
                let r = migrate(&settings, db, &address, &to, &|_, _| {})
                    .await
                    .map_err(|e| format!("{e:#}"));
                (address, r)
            });
        }
        let Some(joined) = set.join_next().await else {
            break;
        };
        let Ok((address, r)) = joined else { continue };
        report(&r);
        match r {
            Ok(s) => moves.moved.push(s),
            Err(e) => moves.failed.push((address, e)),
        }
    }
    moves
}

/// `mailctl filer drain`: marks `filer` draining (no new mailboxes) and moves each of its
/// mailboxes to the others by placement, `parallel` at a time.
pub async fn drain(
    settings: &Arc<PlatformSettings>,
    db: Arc<dyn Directory>,
    filer: &str,
    parallel: usize,
    report: &(dyn Fn(&Result<Summary, String>) + Send + Sync),
) -> anyhow::Result<Moves> {
    if db.filer(filer).await?.is_none() {
        bail!("no filer {filer}");
    }
    db.set_filer_state(filer, common::location::FilerState::Draining)
        .await?;
    let mut counts = targets(settings, db.as_ref()).await?;
    if !counts.iter().any(|(n, w, _)| n != filer && *w > 0) {
        bail!("no other filer that is up, weighted and runs on this host to drain {filer} into");
    }
    let mut plan = Vec::new();
    for m in db.mailboxes(None).await? {
        if m.filer != filer {
            continue;
        }
        if let Some(to) = pick(&mut counts, filer) {
            plan.push((m.address, to));
        }
    }
    Ok(run_moves(settings, &db, plan, parallel, report).await)
}

/// `mailctl filer rebalance`: moves mailboxes from the filers most above their share (by
/// weight) to those most below, until every filer is within `tolerance` (a fraction) of its
/// share, or one mailbox of it.
pub async fn rebalance(
    settings: &Arc<PlatformSettings>,
    db: Arc<dyn Directory>,
    tolerance: f64,
    parallel: usize,
    report: &(dyn Fn(&Result<Summary, String>) + Send + Sync),
) -> anyhow::Result<Moves> {
    let mut counts = targets(settings, db.as_ref()).await?;
    counts.retain(|(_, w, _)| *w > 0);
    let total: u64 = counts.iter().map(|c| c.2).sum();
    let weights: u64 = counts.iter().map(|c| u64::from(c.1)).sum();
    if weights == 0 {
        return Ok(Moves::default());
    }
    let share = |w: u32| total as f64 * f64::from(w) / weights as f64;
    let mut mailboxes: std::collections::HashMap<String, Vec<String>> = Default::default();
    for m in db.mailboxes(None).await? {
        if m.state == MailboxState::Active {
            mailboxes
                .entry(m.filer.clone())
                .or_default()
                .push(m.address);
        }
    }
    let mut plan = Vec::new();
    loop {
        let over = counts
            .iter()
            .map(|(n, w, c)| (n.clone(), *c as f64 - share(*w), share(*w)))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        let under = counts
            .iter()
            .map(|(n, w, c)| (n.clone(), share(*w) - *c as f64, share(*w)))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        let (Some((from, excess, over_share)), Some((to, deficit, under_share))) = (over, under)
        else {
            break;
        };
        let within = |gap: f64, share: f64| gap <= (tolerance * share).max(1.0);
        if from == to || (within(excess, over_share) && within(deficit, under_share)) {
            break;
        }
        // Only a move that narrows the spread (by weight), so this always ends.
        let load = |name: &str, delta: i64| {
            counts
                .iter()
                .find(|c| c.0 == name)
                .map_or(0.0, |c| (c.2 as i64 + delta) as f64 / f64::from(c.1.max(1)))
        };
        if load(&from, -1) < load(&to, 1) {
            break;
        }
        let Some(address) = mailboxes.get_mut(&from).and_then(Vec::pop) else {
            break;
        };
        for c in &mut counts {
            if c.0 == from {
                c.2 -= 1;
            } else if c.0 == to {
                c.2 += 1;
            }
        }
        plan.push((address, to));
    }
    Ok(run_moves(settings, &db, plan, parallel, report).await)
}
