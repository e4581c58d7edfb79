//! `mailctl`: runs the platform and administers it.

use std::io::{BufRead as _, IsTerminal as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use common::config::ByteSize;
use common::location::{Directory, Filer, FilerState};
use integration::config::PlatformSettings;
use integration::{admin, platform, runfile};
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "mailctl",
    version,
    about = "Run and administer the mail platform"
)]
struct Cli {
    /// Platform configuration (TOML). Without one, the all-in-one defaults: every service on
    /// loopback, data in ./data.
    #[arg(long, short, global = true, env = "MAILCTL_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the services the configuration enables, in this process, until SIGINT or SIGTERM.
    ///
    /// All-in-one default listeners (loopback): access (the IMAP/POP3 proxy users connect to)
    /// IMAP 127.0.0.1:1143 (STARTTLS), IMAPS :1993, POP3 :1110 (STLS), POP3S :1995; spool SMTP
    /// 127.0.0.1:2525, reinjection 127.0.0.1:10025; filer1 LMTP 127.0.0.1:2401, IMAP :2143,
    /// POP3 :2110; filer2 LMTP 127.0.0.1:2402, IMAP :2144, POP3 :2111 (filers serve IMAP/POP3 to
    /// the proxy only). In dev mode the proxy allows logins without TLS from loopback clients.
    /// The admin HTTP listener (status page, /metrics, traces) is on 127.0.0.1:8025.
    Up {
        /// Log one JSON object per line (for a log shipper) instead of text.
        #[arg(long)]
        log_json: bool,
    },
    /// Show whether the platform runs, its listeners, and the database's contents.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Where a message went: asks every service of the platform (the processes on this data
    /// directory and `[admin] peers`) about a queue id, a Message-ID or an address, and prints
    /// each message's path hop by hop with times and replies.
    Trace {
        /// A queue id, a Message-ID (with or without <>) or an address.
        query: String,
        #[arg(long)]
        json: bool,
    },
    /// Hosted domains.
    #[command(subcommand)]
    Domain(DomainCmd),
    /// Mailboxes.
    #[command(subcommand)]
    User(UserCmd),
    /// Aliases.
    #[command(subcommand)]
    Alias(AliasCmd),
    /// Storage servers.
    #[command(subcommand)]
    Filer(FilerCmd),
    /// The spool's and the relay's queues (works while they run).
    #[command(subcommand)]
    Queue(QueueCmd),
    /// Configuration.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// DKIM signing keys of the relay.
    #[command(subcommand)]
    Dkim(DkimCmd),
    /// Move a mailbox to another filer while mail keeps arriving and its users stay connected
    /// (`migrate ADDRESS --to FILER`). Runs on the destination filer's host; the old copy stays
    /// until `migrate purge ADDRESS`; `migrate rollback ADDRESS` returns to it if nothing changed.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Migrate {
        #[command(subcommand)]
        action: Option<MigrateCmd>,
        /// The mailbox.
        #[arg(required = true)]
        address: Option<String>,
        /// The filer to move it to.
        #[arg(long, required = true)]
        to: Option<String>,
        /// Print the summary as JSON (no progress bar).
        #[arg(long)]
        json: bool,
    },
    /// The filter's statistical spam classifier.
    #[command(subcommand)]
    Filter(FilterCmd),
}

#[derive(Subcommand)]
enum QueueCmd {
    /// List queued messages.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one message: envelope, recipients with their state, headers.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Try the pending recipients now.
    Retry {
        ids: Vec<String>,
        /// Every entry.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Stop delivery attempts until released.
    Hold {
        #[arg(required = true)]
        ids: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Release held messages and try them now.
    Release {
        #[arg(required = true)]
        ids: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Remove messages from the queue, without bounces.
    Delete {
        #[arg(required = true)]
        ids: Vec<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DomainCmd {
    /// Host a domain.
    Add { domain: String },
    /// List hosted domains.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Stop hosting a domain (refused while it has mailboxes or aliases).
    Remove { domain: String },
}

#[derive(Subcommand)]
enum UserCmd {
    /// Create a mailbox. The password is read from a prompt, or from the first line of
    /// standard input when it is not a terminal; never from the command line.
    Add {
        address: String,
        /// Quota, e.g. "1GiB"; 0 means unlimited.
        #[arg(long, default_value = "0")]
        quota: String,
        /// Place it on this filer instead of choosing by weight.
        #[arg(long)]
        filer: Option<String>,
    },
    /// Create many mailboxes: one `ADDRESS PASSWORD` per line on standard input (the password
    /// is the rest of the line). Each line is one transaction; the first error stops the import
    /// and says which line it was.
    Import {
        /// Quota for every mailbox, e.g. "1GiB"; 0 means unlimited.
        #[arg(long, default_value = "0")]
        quota: String,
    },
    /// Change a mailbox's password (read like `user add`).
    Passwd { address: String },
    /// List mailboxes.
    List {
        /// Only this domain.
        #[arg(long)]
        domain: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Remove a mailbox from the database (its mail stays on the filer).
    Remove { address: String },
}

#[derive(Subcommand)]
enum AliasCmd {
    /// Send mail for ALIAS to TARGET (an alias may have several targets).
    Add { alias: String, target: String },
    /// List aliases.
    List {
        #[arg(long)]
        domain: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Remove one target of an alias, or all of them.
    Remove {
        alias: String,
        target: Option<String>,
    },
}

#[derive(Subcommand)]
enum FilerCmd {
    /// Add a filer.
    Add {
        name: String,
        #[arg(long)]
        lmtp: String,
        #[arg(long)]
        imap: String,
        #[arg(long)]
        pop3: String,
        #[arg(long, default_value_t = 1)]
        weight: u32,
    },
    /// List filers with their mailbox counts.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Set a filer's state: up, draining (no new mailboxes) or down.
    SetState {
        name: String,
        #[arg(value_parser = ["up", "draining", "down"])]
        state: String,
    },
    /// Mark a filer draining and move every mailbox on it to the others, by placement.
    /// Runs where the other filers' mail is.
    Drain {
        name: String,
        /// Migrations at once.
        #[arg(long, default_value_t = 4)]
        parallel: usize,
        #[arg(long)]
        json: bool,
    },
    /// Move mailboxes until every filer holds its share by weight, within a tolerance.
    Rebalance {
        /// Allowed distance from a filer's share, as a fraction of it.
        #[arg(long, default_value_t = 0.1)]
        tolerance: f64,
        /// Migrations at once.
        #[arg(long, default_value_t = 4)]
        parallel: usize,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum MigrateCmd {
    /// Empty the old copy of a finished migration.
    Purge { address: String },
    /// Move a migrated mailbox back to its old copy, if nothing changed since the move.
    Rollback { address: String },
}

#[derive(Subcommand)]
enum DkimCmd {
    /// Make an RSA-2048 key for DOMAIN and print the DNS TXT record to publish. Refused when
    /// DOMAIN already has a key.
    Generate {
        domain: String,
        /// The selector: the record is published as SELECTOR._domainkey.DOMAIN.
        #[arg(long, default_value = "mail")]
        selector: String,
    },
    /// List the domains with a key, and their selectors.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum FilterCmd {
    /// Train a new model on raw messages (one file per message; directories are read
    /// recursively, hidden files skipped) and write it, replacing any model at that path.
    Train {
        /// A directory of spam (may be given several times).
        #[arg(long, required = true)]
        spam: Vec<PathBuf>,
        /// A directory of ham, wanted mail (may be given several times).
        #[arg(long, required = true)]
        ham: Vec<PathBuf>,
        /// The model file. Default: <data_dir>/filter/model.json.
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Score labelled messages with a model: false-positive and false-negative rates at each
    /// threshold, and the scoring speed.
    Eval {
        /// A directory of spam (may be given several times).
        #[arg(long, required = true)]
        spam: Vec<PathBuf>,
        /// A directory of ham (may be given several times).
        #[arg(long, required = true)]
        ham: Vec<PathBuf>,
        /// The model file. Default: <data_dir>/filter/model.json.
        #[arg(long)]
        model: Option<PathBuf>,
        /// A message is taken as spam when it scores at least this (0 to 1; may be given
        /// several times).
        #[arg(long, default_value = "0.9")]
        threshold: Vec<f64>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Validate the configuration and report every problem with its key.
    Check,
}

/// mimalloc returns large freed blocks to the system. With glibc's malloc, each argon2
/// verification's 19 MiB block stayed in a per-thread arena of the blocking pool, and a proxy that
/// had served a few thousand logins held gigabytes.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Prints a line on standard output. A closed pipe (`mailctl user list | head`) ends the
/// program quietly instead of panicking as `println!` does.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        if let Err(e) = writeln!(stdout, $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mailctl: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mailctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let settings = PlatformSettings::load(cli.config.as_deref())?;
    match cli.command {
        Command::Up { log_json } => up(settings, log_json).await,
        Command::Status { json } => status(&settings, json).await,
        Command::Trace { query, json } => trace(&settings, &query, json).await,
        Command::Config(ConfigCmd::Check) => {
            out!("configuration is valid");
            out!("data directory: {}", settings.shared.data_dir.display());
            out!("database: {}", settings.shared.database);
            for f in &settings.filers {
                out!("filer {}: mail in {}", f.name, f.mail_root.display());
            }
            if let Some(s) = &settings.spool {
                out!("spool: queue in {}", s.queue_dir.display());
            }
            if let Some(a) = &settings.access {
                let on = |addr: Option<std::net::SocketAddr>| {
                    addr.map_or_else(|| "off".to_owned(), |a| a.to_string())
                };
                out!(
                    "access: imap {}, imaps {}, pop3 {}, pop3s {}",
                    on(a.imap),
                    on(a.imaps),
                    on(a.pop3),
                    on(a.pop3s)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Domain(c) => domain(&settings, c).await,
        Command::User(c) => user(&settings, c).await,
        Command::Alias(c) => alias(&settings, c).await,
        Command::Filer(c) => filer(&settings, c).await,
        Command::Queue(c) => tokio::task::spawn_blocking(move || queue_cmd(&settings, c)).await?,
        Command::Dkim(c) => dkim(&settings, c).await,
        Command::Migrate {
            action: Some(MigrateCmd::Purge { address }),
            ..
        } => {
            let db: Arc<dyn Directory> = Arc::new(platform::open_directory(&settings).await?);
            let removed = integration::migrate::purge(&settings, db, &address).await?;
            out!("purged the old copy of {address}: {removed} message(s) removed");
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate {
            action: Some(MigrateCmd::Rollback { address }),
            ..
        } => {
            let db: Arc<dyn Directory> = Arc::new(platform::open_directory(&settings).await?);
            let r = integration::migrate::rollback(&settings, db, &address).await?;
            out!(
                "{} is back on {} (its copy on {} stays)",
                r.address,
                r.from,
                r.to
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate {
            address: Some(address),
            to: Some(to),
            json,
            ..
        } => migrate_cmd(&settings, &address, &to, json).await,
        Command::Migrate { .. } => bail!("usage: mailctl migrate ADDRESS --to FILER"),
        Command::Filter(c) => tokio::task::spawn_blocking(move || filter_cmd(&settings, c)).await?,
    }
}

async fn migrate_cmd(
    settings: &PlatformSettings,
    address: &str,
    to: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    // Past any cache: the migration reads and flips the location as it is now.
    let db: Arc<dyn Directory> = Arc::new(platform::open_directory(settings).await?);
    let bar = if json || !std::io::stderr().is_terminal() {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:>10} [{bar:30}] {pos}/{len} messages, {prefix} copied, {elapsed}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    };
    let progress = |phase: &str, r: &filer::migrate::PassReport| {
        bar.set_message(phase.to_owned());
        bar.set_length(r.messages.max(r.copied));
        bar.set_position(r.copied);
        bar.set_prefix(ByteSize(r.copied_bytes).to_string());
    };
    // Interrupted (Ctrl-C, SIGTERM) before the flip: the mailbox goes back to `active` where
    // it was, so nothing is held. (A SIGKILL leaves it `moving`; running the command again
    // resumes.)
    let result = tokio::select! {
        r = integration::migrate::migrate(settings, db.clone(), address, to, &progress) => r,
        _ = interrupted() => {
            bar.finish_and_clear();
            integration::migrate::release_if_moving(db.as_ref(), address).await;
            bail!("interrupted; {address} stays where it was, active");
        }
    };
    bar.finish_and_clear();
    let summary = result?;
    if json {
        out!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        out!(
            "moved {} from {} to {}: {} messages ({}), {} copied; moving for {:.1} s, {:.1} s in all{}",
            summary.address,
            summary.from,
            summary.to,
            summary.messages,
            ByteSize(summary.bytes),
            summary.copied,
            summary.moving_ms as f64 / 1000.0,
            summary.total_ms as f64 / 1000.0,
            if summary.swept > 0 {
                format!(
                    "; {} late message(s) swept from the old copy",
                    summary.swept
                )
            } else {
                String::new()
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Ctrl-C or SIGTERM.
async fn interrupted() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

async fn up(settings: PlatformSettings, log_json: bool) -> anyhow::Result<ExitCode> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if log_json {
        tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let data_dir = settings.shared.data_dir.clone();
    let roles = settings.roles.clone();
    for info in runfile::read_alive(&data_dir)? {
        let shared: Vec<&String> = info.roles.iter().filter(|r| roles.contains(r)).collect();
        if info.pid != std::process::id() && !shared.is_empty() {
            bail!(
                "mailctl up is already running with this data directory (pid {}, roles {})",
                info.pid,
                info.roles.join(", ")
            );
        }
    }
    let running = platform::start(settings).await?;
    for l in &running.listeners {
        tracing::info!(service = %l.service, protocol = %l.protocol, address = %l.address, "listening");
    }
    let info = runfile::RunInfo {
        pid: std::process::id(),
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        listeners: running.listeners.clone(),
        roles: roles.clone(),
    };
    runfile::write(&data_dir, &info)?;
    out!("mailctl up: running (pid {}); stop with Ctrl-C", info.pid);
    let stop = tokio_util::sync::CancellationToken::new();
    let signalled = stop.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        signalled.cancel();
    });
    let result = running.run_until(stop).await;
    runfile::remove(&data_dir, &roles);
    result.map(|()| ExitCode::SUCCESS)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers, only Ctrl-C through tokio's default.
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Opens the database for an administration command. Configured filers missing from it are
/// registered; existing ones are left alone, so a command run beside a platform on ephemeral
/// ports does not overwrite the addresses it really bound.
async fn open(settings: &PlatformSettings) -> anyhow::Result<Arc<dyn Directory>> {
    let db = platform::open_directory(settings).await?;
    let mut missing = Vec::new();
    for f in &settings.filers {
        if db.filer(&f.name).await?.is_none() {
            missing.push(f.clone());
        }
    }
    let missing = PlatformSettings {
        filers: missing,
        ..settings.clone()
    };
    platform::register_filers(&missing, &db).await?;
    Ok(Arc::new(db))
}

#[derive(Serialize)]
struct Status {
    running: bool,
    /// The first process (by id); `processes` has them all.
    pid: Option<u32>,
    started: Option<u64>,
    /// Every `mailctl up` on this data directory, with its roles.
    processes: Vec<ProcessStatus>,
    listeners: Vec<ListenerStatus>,
    database: String,
    domains: usize,
    mailboxes: u64,
    filers: Vec<common::location::FilerUsage>,
    /// Each filer's health as the running access proxy sees it (absent when none runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    access_health: Option<std::collections::BTreeMap<String, access::FilerHealth>>,
}

async fn trace(settings: &PlatformSettings, query: &str, json: bool) -> anyhow::Result<ExitCode> {
    let (events, failed) = integration::web::trace_everywhere(settings, query).await;
    for (addr, e) in &failed {
        eprintln!("mailctl trace: no answer from {addr}: {e}");
    }
    if json {
        out!("{}", serde_json::to_string_pretty(&events)?);
    } else if events.is_empty() {
        out!("nothing known about {query:?} (the services keep their recent events in memory)");
    } else {
        out!("{}", integration::web::format_trace(&events).trim_end());
    }
    Ok(if events.is_empty() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

#[derive(Serialize)]
struct ProcessStatus {
    pid: u32,
    started: u64,
    roles: Vec<String>,
}

#[derive(Serialize)]
struct ListenerStatus {
    service: String,
    protocol: String,
    address: String,
    reachable: bool,
}

async fn status(settings: &PlatformSettings, json: bool) -> anyhow::Result<ExitCode> {
    let infos = runfile::read_alive(&settings.shared.data_dir)?;
    let mut listeners = Vec::new();
    for l in infos.iter().flat_map(|i| i.listeners.iter()) {
        let reachable = match l.address.parse::<std::net::SocketAddr>() {
            Ok(a) => matches!(
                tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(a))
                    .await,
                Ok(Ok(_))
            ),
            Err(_) => false,
        };
        listeners.push(ListenerStatus {
            service: l.service.clone(),
            protocol: l.protocol.clone(),
            address: l.address.clone(),
            reachable,
        });
    }
    let db = platform::open_directory(settings).await?;
    let domains = db.domains().await?;
    let filers = db.filers().await?;
    let access_health = match (infos.first(), &settings.access) {
        (Some(_), Some(_)) => {
            let seen = access::read_health(&settings.shared.data_dir).unwrap_or_default();
            Some(
                filers
                    .iter()
                    .map(|f| {
                        let h = seen
                            .iter()
                            .find(|(n, _)| *n == f.filer.name)
                            .map_or(access::FilerHealth::Up, |(_, h)| *h);
                        (f.filer.name.clone(), h)
                    })
                    .collect(),
            )
        }
        _ => None,
    };
    let s = Status {
        running: !infos.is_empty(),
        pid: infos.first().map(|i| i.pid),
        started: infos.first().map(|i| i.started),
        processes: infos
            .iter()
            .map(|i| ProcessStatus {
                pid: i.pid,
                started: i.started,
                roles: i.roles.clone(),
            })
            .collect(),
        listeners,
        database: settings.shared.database.to_string(),
        domains: domains.len(),
        mailboxes: domains.iter().map(|d| d.mailboxes).sum(),
        filers,
        access_health,
    };
    let healthy = s.running && s.listeners.iter().all(|l| l.reachable);
    if json {
        out!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        if s.processes.is_empty() {
            out!("platform: not running");
        }
        for p in &s.processes {
            out!(
                "platform: running (pid {}, roles {})",
                p.pid,
                p.roles.join(", ")
            );
        }
        for l in &s.listeners {
            let st = if l.reachable { "ok" } else { "NOT REACHABLE" };
            out!(
                "  {:<10} {:<5} {:<22} {st}",
                l.service,
                l.protocol,
                l.address
            );
        }
        out!(
            "database: {} ({} domain(s), {} mailbox(es))",
            s.database,
            s.domains,
            s.mailboxes
        );
        out!(
            "{:<12} {:<9} {:>6} {:>9}  {:<8} lmtp",
            "filer",
            "state",
            "weight",
            "mailboxes",
            "proxy"
        );
        for f in &s.filers {
            let proxy = s
                .access_health
                .as_ref()
                .and_then(|h| h.get(&f.filer.name))
                .map_or("-".to_owned(), |h| format!("{h:?}").to_lowercase());
            out!(
                "{:<12} {:<9} {:>6} {:>9}  {:<8} {}",
                f.filer.name,
                f.filer.state,
                f.filer.weight,
                f.mailboxes,
                proxy,
                f.filer.lmtp
            );
        }
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

fn queue_cmd(settings: &PlatformSettings, cmd: QueueCmd) -> anyhow::Result<ExitCode> {
    use integration::queue::{self as q, Change};
    let queues = q::open_all(settings)?;
    let (ids, change, json) = match cmd {
        QueueCmd::List { json } => {
            let mut entries = Vec::new();
            for (name, queue) in &queues {
                entries.extend(queue.list()?.into_iter().map(|e| (*name, e)));
            }
            if json {
                let mut list = Vec::new();
                for (name, e) in &entries {
                    let mut v = serde_json::to_value(e)?;
                    if let Some(map) = v.as_object_mut() {
                        map.insert("queue".into(), (*name).into());
                    }
                    list.push(v);
                }
                out!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", q::format_list(&entries));
            }
            return Ok(ExitCode::SUCCESS);
        }
        QueueCmd::Show { id, json } => {
            let id = q::parse_id(&id)?;
            let queue = q::find(&queues, &id)?;
            let Some(env) = queue.load(&id)? else {
                bail!("no queue entry {id}");
            };
            if json {
                out!("{}", serde_json::to_string_pretty(&env)?);
            } else {
                print!("{}", q::format_entry(&env, &queue.read_message(&id)?));
            }
            return Ok(ExitCode::SUCCESS);
        }
        QueueCmd::Retry { ids, all, json } => {
            if all {
                let mut done = Vec::new();
                for (_, queue) in &queues {
                    done.extend(retry_all(queue, json)?);
                }
                if json {
                    out!("{}", serde_json::to_string_pretty(&done)?);
                }
                return Ok(ExitCode::SUCCESS);
            }
            (ids, Change::Retry, json)
        }
        QueueCmd::Hold { ids, json } => (ids, Change::Hold, json),
        QueueCmd::Release { ids, json } => (ids, Change::Release, json),
        QueueCmd::Delete { ids, json } => (ids, Change::Delete, json),
    };
    let mut done = Vec::new();
    for id in &ids {
        let id = q::parse_id(id)?;
        let env = q::apply(q::find(&queues, &id)?, &id, change)?;
        if !json {
            let verb = match change {
                Change::Retry => "will retry",
                Change::Hold => "held",
                Change::Release => "released",
                Change::Delete => "deleted",
            };
            out!("{verb} {id}");
        }
        done.push(serde_json::json!({ "id": id, "entry": env }));
    }
    if json {
        out!("{}", serde_json::to_string_pretty(&done)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// `mailctl queue retry --all`: entries delivered meanwhile are skipped, not an error.
fn retry_all(queue: &common::queue::Queue, json: bool) -> anyhow::Result<Vec<serde_json::Value>> {
    use integration::queue::{self as q, Change};
    let mut done = Vec::new();
    for e in queue.list()? {
        match q::apply(queue, &e.id, Change::Retry) {
            Ok(env) => {
                if !json {
                    out!("will retry {}", e.id);
                }
                done.push(serde_json::json!({ "id": e.id, "entry": env }));
            }
            Err(_) if queue.load(&e.id)?.is_none() => {} // finished meanwhile
            Err(err) => return Err(err),
        }
    }
    Ok(done)
}

async fn domain(settings: &PlatformSettings, cmd: DomainCmd) -> anyhow::Result<ExitCode> {
    let db = open(settings).await?;
    match cmd {
        DomainCmd::Add { domain } => out!(
            "added domain {}",
            admin::domain_add(db.as_ref(), &domain).await?
        ),
        DomainCmd::Remove { domain } => {
            out!(
                "removed domain {}",
                admin::domain_remove(db.as_ref(), &domain).await?
            )
        }
        DomainCmd::List { json } => {
            let list = db.domains().await?;
            if json {
                out!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for d in list {
                    out!(
                        "{}  ({} mailbox(es), {} alias(es))",
                        d.name,
                        d.mailboxes,
                        d.aliases
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn user(settings: &PlatformSettings, cmd: UserCmd) -> anyhow::Result<ExitCode> {
    let db = open(settings).await?;
    match cmd {
        UserCmd::Import { quota } => {
            let quota = ByteSize::parse(&quota)
                .map_err(|e| anyhow::anyhow!("--quota: {e}"))?
                .bytes();
            let lines: Vec<String> = std::io::stdin().lines().collect::<Result<_, _>>()?;
            // Check every line before changing anything.
            let mut todo = Vec::new();
            for (i, line) in lines.iter().enumerate() {
                let n = i + 1;
                let line = line.trim_end_matches('\r');
                if line.trim().is_empty() || line.starts_with('#') {
                    continue;
                }
                let Some((address, password)) = line.split_once(' ') else {
                    bail!("line {n}: expected ADDRESS PASSWORD");
                };
                let a =
                    admin::parse_mailbox_address(address).with_context(|| format!("line {n}"))?;
                todo.push((n, a.to_string(), password.to_owned()));
            }
            let mut added = 0usize;
            // Hash two at a time: argon2 is the cost.
            for chunk in todo.chunks(2) {
                let mut tasks = Vec::new();
                for (n, address, password) in chunk.iter().cloned() {
                    let db = db.clone();
                    tasks.push((
                        n,
                        tokio::spawn(async move {
                            admin::user_add(db.as_ref(), &address, password, quota, None).await
                        }),
                    ));
                }
                for (n, t) in tasks {
                    t.await?.with_context(|| format!("line {n}"))?;
                    added += 1;
                }
            }
            out!("added {added} mailbox(es)");
        }
        UserCmd::Add {
            address,
            quota,
            filer,
        } => {
            let quota = ByteSize::parse(&quota)
                .map_err(|e| anyhow::anyhow!("--quota: {e}"))?
                .bytes();
            // Validate before asking for a password.
            let a = admin::parse_mailbox_address(&address)?;
            let password = read_password()?;
            let m = admin::user_add(db.as_ref(), &a.to_string(), password, quota, filer).await?;
            out!("added {} on {}", m.address, m.filer);
        }
        UserCmd::Passwd { address } => {
            admin::parse_address(&address)?;
            let password = read_password()?;
            out!(
                "changed the password of {}",
                admin::user_passwd(db.as_ref(), &address, password).await?
            );
        }
        UserCmd::Remove { address } => {
            let key = admin::parse_address(&address)?.key();
            db.remove_mailbox(&key).await?;
            out!("removed {key} (its mail stays on the filer)");
        }
        UserCmd::List { domain, json } => {
            let d = domain.map(|d| admin::parse_domain(&d)).transpose()?;
            let list = db.mailboxes(d.as_deref()).await?;
            if json {
                out!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for m in list {
                    let quota = if m.quota == 0 {
                        "unlimited".to_owned()
                    } else {
                        ByteSize(m.quota).to_string()
                    };
                    out!(
                        "{}  filer={} state={} quota={quota}",
                        m.address,
                        m.filer,
                        m.state
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads a password: from a prompt (asked twice) on a terminal, else the first line of stdin.
fn read_password() -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    let password = if stdin.is_terminal() {
        let a = rpassword::prompt_password("Password: ")?;
        let b = rpassword::prompt_password("Again: ")?;
        if a != b {
            bail!("the passwords differ");
        }
        a
    } else {
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .context("reading the password from standard input")?;
        line.trim_end_matches(['\n', '\r']).to_owned()
    };
    if password.is_empty() {
        bail!("empty password");
    }
    Ok(password)
}

async fn alias(settings: &PlatformSettings, cmd: AliasCmd) -> anyhow::Result<ExitCode> {
    let db = open(settings).await?;
    match cmd {
        AliasCmd::Add { alias, target } => {
            let (a, t) = admin::alias_add(db.as_ref(), &alias, &target).await?;
            out!("added alias {a} -> {t}");
        }
        AliasCmd::Remove { alias, target } => {
            let a = admin::parse_address(&alias)?.key();
            let t = target
                .map(|t| admin::parse_address(&t).map(|t| t.key()))
                .transpose()?;
            let n = db.remove_alias(&a, t.as_deref()).await?;
            out!("removed {n} target(s) of {a}");
        }
        AliasCmd::List { domain, json } => {
            let d = domain.map(|d| admin::parse_domain(&d)).transpose()?;
            let list = db.aliases(d.as_deref()).await?;
            if json {
                out!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for a in list {
                    out!("{} -> {}", a.address, a.target);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What `filer drain` and `filer rebalance` do.
enum MoveOp {
    Drain(String),
    Rebalance(f64),
}

async fn moves_cmd(
    settings: &PlatformSettings,
    op: MoveOp,
    parallel: usize,
    json: bool,
) -> anyhow::Result<ExitCode> {
    // Past any cache: the migrations read and flip the location as it is now.
    let db: Arc<dyn Directory> = Arc::new(platform::open_directory(settings).await?);
    let shared = Arc::new(settings.clone());
    let report = |r: &Result<integration::migrate::Summary, String>| {
        if json {
            return;
        }
        match r {
            Ok(s) => out!(
                "moved {} from {} to {} ({} messages, moving {:.1} s)",
                s.address,
                s.from,
                s.to,
                s.messages,
                s.moving_ms as f64 / 1000.0
            ),
            Err(e) => eprintln!("mailctl: {e}"),
        }
    };
    let moves = match op {
        MoveOp::Drain(name) => {
            integration::migrate::drain(&shared, db, &name, parallel, &report).await?
        }
        MoveOp::Rebalance(tolerance) => {
            integration::migrate::rebalance(&shared, db, tolerance, parallel, &report).await?
        }
    };
    if json {
        out!("{}", serde_json::to_string_pretty(&moves)?);
    } else {
        out!("{} moved, {} failed", moves.moved.len(), moves.failed.len());
    }
    Ok(if moves.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn filer(settings: &PlatformSettings, cmd: FilerCmd) -> anyhow::Result<ExitCode> {
    let db = open(settings).await?;
    match cmd {
        FilerCmd::Drain {
            name,
            parallel,
            json,
        } => return moves_cmd(settings, MoveOp::Drain(name), parallel, json).await,
        FilerCmd::Rebalance {
            tolerance,
            parallel,
            json,
        } => return moves_cmd(settings, MoveOp::Rebalance(tolerance), parallel, json).await,
        FilerCmd::Add {
            name,
            lmtp,
            imap,
            pop3,
            weight,
        } => {
            admin::filer_add(
                db.as_ref(),
                Filer {
                    name: name.clone(),
                    lmtp,
                    imap,
                    pop3,
                    state: FilerState::Up,
                    weight,
                },
            )
            .await?;
            out!("added filer {name}");
        }
        FilerCmd::SetState { name, state } => {
            let s: FilerState = state.parse().map_err(anyhow::Error::msg)?;
            admin::filer_set_state(db.as_ref(), &name, s).await?;
            out!("filer {name} is now {s}");
        }
        FilerCmd::List { json } => {
            let list = db.filers().await?;
            if json {
                out!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                out!(
                    "{:<12} {:<9} {:>6} {:>9}  {:<22} {:<22} pop3",
                    "name",
                    "state",
                    "weight",
                    "mailboxes",
                    "lmtp",
                    "imap"
                );
                for f in list {
                    out!(
                        "{:<12} {:<9} {:>6} {:>9}  {:<22} {:<22} {}",
                        f.filer.name,
                        f.filer.state,
                        f.filer.weight,
                        f.mailboxes,
                        f.filer.lmtp,
                        f.filer.imap,
                        f.filer.pop3
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Where the relay's DKIM keys are.
fn dkim_dir(settings: &PlatformSettings) -> PathBuf {
    match &settings.relay {
        Some(r) => r.dkim_dir.clone(),
        None => settings.shared.data_dir.join("dkim"),
    }
}

async fn dkim(settings: &PlatformSettings, cmd: DkimCmd) -> anyhow::Result<ExitCode> {
    let dir = dkim_dir(settings);
    match cmd {
        DkimCmd::Generate { domain, selector } => {
            let domain = admin::parse_domain(&domain)?;
            // Keys may be made before the domain is added, so this only warns.
            match platform::open_directory(settings).await {
                Ok(db) => match db.is_hosted_domain(&domain).await {
                    Ok(true) => {}
                    Ok(false) => eprintln!(
                        "mailctl: warning: {domain} is not a hosted domain (add it with `mailctl domain add {domain}`)"
                    ),
                    Err(e) => eprintln!(
                        "mailctl: warning: cannot check whether {domain} is hosted: {e:#}"
                    ),
                },
                Err(e) => {
                    eprintln!("mailctl: warning: cannot check whether {domain} is hosted: {e:#}")
                }
            }
            let d = domain.clone();
            let g = tokio::task::spawn_blocking(move || relay::dkim::generate(&dir, &d, &selector))
                .await??;
            out!("wrote the DKIM key {}", g.path.display());
            out!(
                "publish this TXT record in the DNS zone of {domain}; until it is there, receivers cannot verify the signatures:"
            );
            out!("{}", g.zone_line());
        }
        DkimCmd::List { json } => {
            let signer =
                tokio::task::spawn_blocking(move || relay::dkim::Signer::load(&dir)).await??;
            let keys = signer.keys();
            if json {
                let list: Vec<_> = keys
                    .iter()
                    .map(|k| {
                        serde_json::json!({
                            "domain": k.domain,
                            "selector": k.selector,
                            "path": k.path.display().to_string(),
                        })
                    })
                    .collect();
                out!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for k in keys {
                    out!(
                        "{}  selector={}  {}",
                        k.domain,
                        k.selector,
                        k.path.display()
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Where `mailctl filter` reads and writes the classifier's model by default.
fn filter_model_path(settings: &PlatformSettings) -> PathBuf {
    match &settings.filter {
        Some(f) => f.model.clone(),
        None => settings.shared.data_dir.join("filter").join("model.json"),
    }
}

/// `mailctl filter eval`'s figures at one threshold.
#[derive(Serialize)]
struct FilterEvalResult {
    threshold: f64,
    /// Ham scored at or above the threshold.
    false_positives: usize,
    /// Spam scored below the threshold.
    false_negatives: usize,
    fp_rate: f64,
    fn_rate: f64,
}

fn filter_cmd(settings: &PlatformSettings, cmd: FilterCmd) -> anyhow::Result<ExitCode> {
    use filter::classifier::Model;
    match cmd {
        FilterCmd::Train {
            spam,
            ham,
            model,
            json,
        } => {
            let path = model.unwrap_or_else(|| filter_model_path(settings));
            let spam_files = message_files(&spam)?;
            let ham_files = message_files(&ham)?;
            if spam_files.is_empty() || ham_files.is_empty() {
                bail!(
                    "no messages to train on: {} spam, {} ham (both are needed)",
                    spam_files.len(),
                    ham_files.len()
                );
            }
            // Files are read as training goes; the first that cannot be read stops it.
            let failed = std::cell::RefCell::new(None);
            let read = |f: &PathBuf| match std::fs::read(f) {
                Ok(raw) => Some(raw),
                Err(e) => {
                    failed.borrow_mut().get_or_insert(
                        anyhow::Error::new(e).context(format!("reading {}", f.display())),
                    );
                    None
                }
            };
            let m = Model::train(
                spam_files.iter().map_while(read),
                ham_files.iter().map_while(read),
            );
            if let Some(e) = failed.into_inner() {
                return Err(e);
            }
            m.save(&path)?;
            if json {
                let j = serde_json::json!({
                    "spam": m.spam_count(),
                    "ham": m.ham_count(),
                    "tokens": m.token_count(),
                    "model": path.display().to_string(),
                });
                out!("{}", serde_json::to_string_pretty(&j)?);
            } else {
                out!(
                    "trained on {} spam and {} ham message(s): {} token(s)",
                    m.spam_count(),
                    m.ham_count(),
                    m.token_count()
                );
                out!("wrote the model {}", path.display());
            }
        }
        FilterCmd::Eval {
            spam,
            ham,
            model,
            threshold,
            json,
        } => {
            if let Some(t) = threshold.iter().find(|t| !(0.0..=1.0).contains(*t)) {
                bail!("--threshold {t}: not between 0 and 1");
            }
            let path = model.unwrap_or_else(|| filter_model_path(settings));
            let m = Model::load(&path)
                .context("loading the model (train one with `mailctl filter train`)")?;
            if !m.is_trained() {
                bail!("{}: the model is not trained", path.display());
            }
            // Scores of each class; only the scoring is timed, not reading the files.
            let mut scoring = Duration::ZERO;
            let mut scores = [Vec::new(), Vec::new()];
            for (dirs, class) in [(&spam, 0), (&ham, 1)] {
                for file in message_files(dirs)? {
                    let raw = std::fs::read(&file)
                        .with_context(|| format!("reading {}", file.display()))?;
                    let start = tokio::time::Instant::now();
                    let p = m.score(&raw);
                    scoring += start.elapsed();
                    scores[class].push(p);
                }
            }
            let [spam_scores, ham_scores] = scores;
            let n = spam_scores.len() + ham_scores.len();
            if n == 0 {
                bail!("no messages to score");
            }
            let rate = |k: usize, of: usize| if of == 0 { 0.0 } else { k as f64 / of as f64 };
            let results: Vec<FilterEvalResult> = threshold
                .iter()
                .map(|&t| {
                    let fp = ham_scores.iter().filter(|&&p| p >= t).count();
                    let fneg = spam_scores.iter().filter(|&&p| p < t).count();
                    FilterEvalResult {
                        threshold: t,
                        false_positives: fp,
                        false_negatives: fneg,
                        fp_rate: rate(fp, ham_scores.len()),
                        fn_rate: rate(fneg, spam_scores.len()),
                    }
                })
                .collect();
            let seconds = scoring.as_secs_f64();
            let per_s = if seconds > 0.0 {
                n as f64 / seconds
            } else {
                0.0
            };
            if json {
                let j = serde_json::json!({
                    "model": path.display().to_string(),
                    "spam": spam_scores.len(),
                    "ham": ham_scores.len(),
                    "scoring_seconds": seconds,
                    "messages_per_s": per_s,
                    "results": results,
                });
                out!("{}", serde_json::to_string_pretty(&j)?);
            } else {
                out!(
                    "model {} (trained on {} spam, {} ham)",
                    path.display(),
                    m.spam_count(),
                    m.ham_count()
                );
                out!(
                    "scored {} spam and {} ham message(s) in {seconds:.3} s ({per_s:.0} messages/s)",
                    spam_scores.len(),
                    ham_scores.len()
                );
                for r in &results {
                    out!(
                        "threshold {}: false positives {}/{} ({:.2}%), false negatives {}/{} ({:.2}%)",
                        r.threshold,
                        r.false_positives,
                        ham_scores.len(),
                        r.fp_rate * 100.0,
                        r.false_negatives,
                        spam_scores.len(),
                        r.fn_rate * 100.0
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The message files under `dirs`, recursively (following symbolic links, at most 8 levels
/// deep), hidden entries skipped, sorted by path.
fn message_files(dirs: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    fn walk(dir: &std::path::Path, depth: usize, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
        let entries =
            std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let path = entry.path();
            let meta =
                std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?;
            if meta.is_dir() {
                if depth < 8 {
                    walk(&path, depth + 1, out)?;
                }
            } else if meta.is_file() {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    for d in dirs {
        walk(d, 0, &mut files)?;
    }
    files.sort();
    Ok(files)
}
