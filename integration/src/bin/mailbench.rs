//! `mailbench`: a load generator for LMTP delivery, SMTP to an MX, SMTP submission, IMAP and
//! POP3 sessions and idling IMAP connections, and a probe of the disk's fsync rate.
//!
//! It carries its own minimal LMTP/SMTP/IMAP/POP3 clients, so that it does not depend on the
//! code it measures. Targets must be loopback addresses unless `--allow-remote` is given. Every
//! load mode is bounded in count (`--messages`, `--sessions`, `--conns`) and in time
//! (`--max-seconds`: nothing new starts after it; what has started gets a few reply timeouts
//! more), every read waits at most `--reply-timeout`, and failures are counted, not fatal. The
//! report is text, or one JSON line with `--json` (snake_case keys; every mode has `mode` and
//! `target`). The exit status is 1 when nothing succeeded.
//!
//! # `mailbench lmtp HOST:PORT`
//!
//! ```text
//! mailbench lmtp 127.0.0.1:22024 --messages 20000 --sessions 20 --size 4096 \
//!     --rcpts-per-msg 1 --user-fmt 'user%04d@example.test' --user-count 1000 [--json]
//! ```
//!
//! Opens `--sessions` LMTP connections (RFC 2033) on one tokio runtime. Each session says LHLO
//! once and then sends messages back to back on its connection, until `--messages` have been
//! started in total or `--max-seconds` have passed:
//!
//! ```text
//! C: MAIL FROM:<bench@example.net>       ┐ one write when the server offers PIPELINING
//! C: RCPT TO:<user0042@example.test>     ┘ (RFC 2920); --rcpts-per-msg distinct random users
//! S: 250 (MAIL), then 250 for each RCPT
//! C: DATA                       S: 354
//! C: the message, dot-stuffed, then CRLF.CRLF
//! S: one reply per accepted recipient (RFC 2033 §4.2)
//! ```
//!
//! A message is `--size` bytes as stored (before dot-stuffing): RFC 5322 headers (From, To,
//! Subject, Date, Message-ID, MIME-Version, Content-Type), then body lines of at most 76
//! characters, some of which start with a dot. Recipients come from `--users FILE` (one address
//! per line) or from `--user-fmt` expanded for `--user-first ..= --user-first + --user-count - 1`.
//! After an I/O error, a timeout or a `421`, the session reconnects (at most 5 times); the message
//! in flight then counts as sent but not delivered. A `5xx` to the greeting, LHLO or AUTH ends
//! the session.
//!
//! What the figures mean:
//! - **delivered msg/s**: messages for which every recipient got a final `250`, divided by the
//!   wall time. **rcpt/s**: final `250` replies, divided by the wall time.
//! - **latency p50/p99/max**: from the moment the final `.` CRLF was written until the last
//!   per-recipient reply arrived: the server's time to store the message (and fsync it), plus a
//!   loopback round trip. Measured for every message whose DATA got its `354`.
//! - **transaction latency p50/p99**: from writing MAIL until that last reply: the whole
//!   message, envelope included.
//! - **errors**: every unexpected reply, keyed `PHASE CODE` (`MAIL`, `RCPT`, `DATA`, `EOM` for
//!   the replies after the final dot, `RSET`), and transport faults (`connect`, `io`,
//!   `timeout …`, `protocol …`, `closed 421`). The first fault's detail is printed as well.
//! - **wall**: from before the first connect until the last session has ended.
//! - **client CPU**: user+system seconds of this process (Linux `/proc/self/stat`), so that the
//!   generator's share of a shared machine can be told apart from the server's.
//!
//! # `mailbench submit HOST:PORT`
//!
//! ```text
//! MAILBENCH_PASSWORD=pw mailbench submit 127.0.0.1:2587 --user alice@example.test \
//!     --messages 20000 --sessions 10 --size 4096 --user-fmt 'rcpt%04d@sink.test' \
//!     [--starttls] [--json]
//! ```
//!
//! Authenticated submission (RFC 6409), as a mail client does it, over `--sessions`
//! connections. Each session logs in once and then sends messages back to back on its
//! connection, as in the LMTP mode (same counting, limits, reconnects and message text):
//!
//! ```text
//! S: 220 greeting
//! C: EHLO mailbench.example.net                S: 250
//!   with --starttls: C: STARTTLS  S: 220, the TLS handshake, C: EHLO  S: 250
//! C: AUTH PLAIN <base64 of NUL user NUL password>   S: 235   (RFC 4954, initial response)
//! then per message: MAIL FROM:<user> and the RCPTs (pipelined), DATA, the message, which
//! gets one reply after the final dot (RFC 5321)
//! ```
//!
//! The reverse path and the `From:` header are `--user` (or `--from`), since a relay lets a
//! user send only as themselves. The password comes from `--password` or, better (the command
//! line is visible to every user of the machine), from `MAILBENCH_PASSWORD`.
//!
//! `--starttls` runs one `openssl s_client -starttls smtp` process per session and speaks
//! through its standard input and output: it says EHLO and STARTTLS and does the handshake,
//! and mailbench then sends EHLO again (RFC 3207 §4.2) and goes on as above. So the TLS client
//! is OpenSSL's (mailbench has no TLS client of its own; the server's certificate is not
//! checked). To the server it is a STARTTLS session like any other. The processes' CPU time
//! is included in "client CPU" once they have exited (every session waits for its process
//! after QUIT).
//!
//! The figures mean what they mean for LMTP; "delivered" is the `250` after the final dot:
//! the server has taken responsibility for the message (a relay: queued it and fsynced it).
//!
//! # `mailbench smtp HOST:PORT`
//!
//! ```text
//! mailbench smtp 127.0.0.1:2525 --messages 200 --sessions 10 --size 4096 \
//!     [--per-connection K] [--maildir-root data/filers] [--json]
//! ```
//!
//! Mail to an MX (RFC 5321), as another mail server sends it: EHLO, then per message MAIL,
//! the RCPTs (`--rcpts-per-msg` random users, pipelined when offered), DATA and the message,
//! which gets one reply after the final dot; no AUTH, no TLS. Messages, recipients, counting,
//! limits and reconnects are as in the LMTP mode. With `--per-connection K` a session says QUIT
//! after K messages and connects again (0, the default, keeps the connection). "delivered"
//! (`messages_delivered`, `msgs_per_s`) is the `250` after the dot, and `lat_ms_*` the time from
//! the final dot to it; `connections` counts the connections opened (past greeting and EHLO).
//!
//! With `--maildir-root DIR`, mailbench counts the message files below DIR before sending (the
//! regular files directly inside every `new` and `cur` directory, at any depth; readdir only)
//! and, after sending, counts again every 100 ms until the count has grown by one file per
//! accepted recipient, or `--max-seconds` after the start. Reported: `delivered` (the growth),
//! `delivered_all`, `delivered_s` (from the start of sending to the count reached) and
//! `delivered_per_s`: the rate of the whole path (spool, filter, filer) into the Maildirs. Other
//! mail arriving below DIR meanwhile counts too.
//!
//! # `mailbench imap HOST:PORT`
//!
//! ```text
//! mailbench imap 127.0.0.1:1143 --sessions 1000 --concurrency 16 \
//!     --user-fmt 'user%04d@example.test' --user-count 1000 --pass-fmt 'pw-user%04d' [--json]
//! mailbench imap 127.0.0.1:1143 --noop 10000
//! ```
//!
//! `--sessions` sessions, `--concurrency` at a time, each as the next account in turn (session
//! k logs in as account k mod the number of accounts):
//!
//! ```text
//! S: * OK greeting
//! C: a1 LOGIN "user0042@example.test" "pw-user0042"      S: a1 OK
//! C: a2 SELECT INBOX                                     S: * n EXISTS … a2 OK
//! C: a3 FETCH 1:* (FLAGS UID RFC822.SIZE)                S: * i FETCH (…) … a3 OK  (skipped when n = 0)
//! C: a4 UID FETCH uid (BODY.PEEK[])                      S: * i FETCH (UID uid BODY[] {size}…) a4 OK
//!    … once for every UID, one after the other
//! C: a9 LOGOUT                                           S: * BYE, a9 OK
//! ```
//!
//! Responses are framed by their literals (`{n}` CRLF, then n octets taken by count), so
//! message text is never mistaken for responses; a `BODY[]` whose length differs from its
//! `RFC822.SIZE` fails the session. Accounts come from `--user-fmt`/`--user-count`/
//! `--user-first` with passwords from `--pass-fmt` (expanded with the same number; default
//! `pw-user%04d`), or from `--users FILE` with lines `address password`. Reported:
//! `sessions_ok`/`sessions_failed`, `messages_fetched`, `bytes_fetched` (the `BODY[]`s),
//! `sessions_per_s`, `mb_per_s` (10^6 bytes of messages per second), `msgs_per_s`,
//! `session_ms_p50/p99/max` (connect to the LOGOUT reply), errors by phase and status
//! (`LOGIN NO`, `timeout reply`, …) and the first error with the server's text.
//!
//! `--noop N` measures one logged-in connection instead (the first account): 200 NOOPs to warm
//! up, then N, one after the other; reported are their round trips (`rtt_us_p50/p90/p99/max`)
//! and rate.
//!
//! # `mailbench pop3 HOST:PORT`
//!
//! ```text
//! mailbench pop3 127.0.0.1:1110 --sessions 1000 --concurrency 16 [--json]
//! ```
//!
//! The same accounts and report as `imap`; each session (RFC 1939) is the greeting, USER, PASS,
//! STAT, UIDL (if it fails, the numbers up to STAT's count), RETR of every message (the lines
//! up to the `.` line, with dot-stuffing undone; the bytes are those lines with a CRLF each),
//! QUIT. Taking the accounts in turn keeps two sessions from wanting the same maildrop lock.
//!
//! # `mailbench idle HOST:PORT`
//!
//! ```text
//! mailbench idle 127.0.0.1:1143 --conns 1000 --ramp 32 --pid SERVER_PID [--pid …] [--select]
//! ```
//!
//! Measures what an idle IMAP client costs the server. First it sums the memory of each `--pid`
//! process and all its descendants (found through the parent pid in `/proc/*/stat`): `VmRSS`
//! from `/proc/PID/status`, and `Pss` from `/proc/PID/smaps_rollup` where readable. Then it
//! opens `--conns` connections, `--ramp` at a time, each as the next account: greeting, LOGIN,
//! SELECT INBOX with `--select`, and IDLE (RFC 2177) until the server's `+` continuation. Once
//! every connection is idling (or has failed) it measures again, and then ends each with DONE
//! and LOGOUT. Reported: `idling` and `failed`, `ramp_s` and `logins_per_s` (connections that
//! reached IDLE per second of ramp), for each tree the totals before and after and the growth
//! per idling connection in KiB, and `closed` (connections that answered DONE and LOGOUT).
//! Each connection takes a file descriptor here. mailbench cannot raise its limit on open files
//! itself (`ulimit -n` can, up to the hard limit): when `--conns` would pass the soft limit, it
//! opens as many as the limit allows (keeping 64 for itself), says so on standard error and
//! reports `nofile_capped`; a connect that still fails with EMFILE says why.
//!
//! # `mailbench fsync DIR`
//!
//! ```text
//! mailbench fsync /var/tmp/mb --threads 20 --seconds 5 [--size 4096] [--dir-fsync] [--json]
//! ```
//!
//! `--threads` threads each repeat, in their own directory below `DIR/mailbench-fsync-PID/`:
//! create a new file, write `--size` bytes, fsync, close (as the anchors' `bench_fsync.py
//! --mode newfile` does). With `--dir-fsync` the file is created in `tmp/`, renamed to `new/`
//! and then `new/` is fsync'd too: what a durable Maildir delivery does. Reported: operations
//! per second, fsync calls per second (1 or 2 per operation) and the latency of one operation
//! (p50/p99/max). With many threads the journal commits several operations at once (group
//! commit), so the rate rises while each operation's latency grows. Every file and directory
//! it made is removed at the end (`DIR` too, if it created it and it is empty).

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail, ensure};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use tokio::io::{
    AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, BufReader,
};
use tokio::net::TcpStream;
use tokio::process::Child;
use tokio::time::Instant;

#[derive(Parser)]
#[command(
    name = "mailbench",
    version,
    about = "Load generator for LMTP, SMTP, submission, IMAP, POP3 and IDLE, and a probe of the disk's fsync rate"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Deliver messages over concurrent LMTP sessions and report rate and latency.
    Lmtp(LmtpArgs),
    /// Submit messages over concurrent authenticated SMTP sessions and report rate and latency.
    Submit(SubmitArgs),
    /// Send messages to an MX over concurrent plain SMTP sessions; optionally wait until they
    /// are in the Maildirs.
    Smtp(SmtpArgs),
    /// Run IMAP sessions that read a whole INBOX, or time NOOP round trips.
    Imap(ImapArgs),
    /// Run POP3 sessions that retrieve every message.
    Pop3(Pop3Args),
    /// Keep many IMAP connections in IDLE and measure the server's memory per connection.
    Idle(IdleArgs),
    /// Measure create+write+fsync+close of new files, optionally with a directory fsync.
    Fsync(FsyncArgs),
}

#[derive(Args)]
struct LmtpArgs {
    /// The LMTP server, HOST:PORT.
    target: String,
    /// Messages to send in total (over all sessions).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    messages: u64,
    /// Concurrent sessions; each keeps its connection.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    sessions: u64,
    /// Size of each message in bytes as stored (headers and body, CRLF line ends, before
    /// dot-stuffing). At least the size of the headers.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    size: u64,
    #[command(flatten)]
    rcpts: RcptArgs,
    /// Reverse path of every message, and its From: header.
    #[arg(long, default_value = "bench@example.net")]
    from: String,
    /// Name given in LHLO (also the domain of the Message-IDs).
    #[arg(long, default_value = "mailbench.example.net")]
    lhlo: String,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args)]
struct SubmitArgs {
    /// The submission server, HOST:PORT.
    target: String,
    /// Messages to send in total (over all sessions).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    messages: u64,
    /// Concurrent sessions; each logs in once and keeps its connection.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    sessions: u64,
    /// Size of each message in bytes as stored (headers and body, CRLF line ends, before
    /// dot-stuffing). At least the size of the headers.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    size: u64,
    #[command(flatten)]
    rcpts: RcptArgs,
    /// The account to log in as (AUTH PLAIN); also the reverse path and the From: address,
    /// unless --from is given.
    #[arg(long)]
    user: String,
    /// The account's password. The environment is safer than the command line, which every
    /// user of the machine can read.
    #[arg(long, env = "MAILBENCH_PASSWORD", hide_env_values = true)]
    password: String,
    /// Reverse path of every message, and its From: header (default: --user).
    #[arg(long)]
    from: Option<String>,
    /// Name given in EHLO (also the domain of the Message-IDs).
    #[arg(long, default_value = "mailbench.example.net")]
    ehlo: String,
    /// Start TLS before AUTH (RFC 3207), through one `openssl s_client` process per session.
    #[arg(long)]
    starttls: bool,
    /// The openssl binary that --starttls runs.
    #[arg(long, default_value = "openssl")]
    openssl: PathBuf,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args)]
struct SmtpArgs {
    /// The SMTP server (an MX such as the spool), HOST:PORT.
    target: String,
    /// Messages to send in total (over all sessions).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    messages: u64,
    /// Concurrent sessions.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    sessions: u64,
    /// Messages per connection, then QUIT and a new connection; 0 keeps one connection per
    /// session for the whole run.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=100_000_000))]
    per_connection: u64,
    /// Size of each message in bytes as stored (headers and body, CRLF line ends, before
    /// dot-stuffing). At least the size of the headers.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    size: u64,
    #[command(flatten)]
    rcpts: RcptArgs,
    /// Reverse path of every message, and its From: header.
    #[arg(long, default_value = "bench@example.net")]
    from: String,
    /// Name given in EHLO (also the domain of the Message-IDs).
    #[arg(long, default_value = "mailbench.example.net")]
    ehlo: String,
    /// After sending, wait (until --max-seconds after the start) for the accepted messages to
    /// appear as files in the `new` and `cur` directories below DIR, and report the rate.
    #[arg(long, value_name = "DIR")]
    maildir_root: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
}

/// Who the messages go to: the same options for every load mode.
#[derive(Args)]
struct RcptArgs {
    /// Distinct random recipients per message.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1000))]
    rcpts_per_msg: u64,
    /// File with one recipient address per line (blank lines and `#` comments are skipped).
    #[arg(long, conflicts_with_all = ["user_fmt", "user_count", "user_first"])]
    users: Option<PathBuf>,
    /// Recipient pattern: `%d`, `%4d` or `%04d` is replaced by the user number, `%%` by `%`.
    #[arg(long, default_value = "user%04d@example.test")]
    user_fmt: String,
    /// How many users `--user-fmt` makes.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    user_count: u32,
    /// The first user number.
    #[arg(long, default_value_t = 1)]
    user_first: u32,
}

/// How long a load run may take, and how it reports: the same for every load mode.
#[derive(Args)]
struct RunArgs {
    /// Stop starting new messages (sessions, connections) after this many seconds.
    #[arg(long, default_value_t = 300.0)]
    max_seconds: f64,
    /// Longest wait for one reply, in seconds.
    #[arg(long, default_value_t = 60.0)]
    reply_timeout: f64,
    /// Seed for recipients and body text (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Allow a target that is not a loopback address.
    #[arg(long)]
    allow_remote: bool,
    /// Print one JSON line instead of the text report.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct FsyncArgs {
    /// Directory to work in; a `mailbench-fsync-PID` directory is made inside and removed after.
    dir: PathBuf,
    /// Duration of the measurement.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Concurrent threads.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=256))]
    threads: u64,
    /// Bytes written to each file.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(0..=(64 << 20)))]
    size: u64,
    /// Create in tmp/, rename to new/, then fsync new/ (a durable Maildir delivery).
    #[arg(long)]
    dir_fsync: bool,
    /// Upper bound on operations over all threads.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    max_ops: u64,
    /// Print one JSON line instead of the text report.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Lmtp(args) => lmtp_main(args),
        Command::Submit(args) => submit_main(args),
        Command::Smtp(args) => smtp_main(args),
        Command::Imap(args) => imap_main(args),
        Command::Pop3(args) => pop3_main(args),
        Command::Idle(args) => idle_main(args),
        Command::Fsync(args) => fsync_main(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mailbench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// LMTP and submission load

/// At most this many reconnects per session, after a fault.
const MAX_RECONNECTS: u32 = 5;
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const QUIT_TIMEOUT: Duration = Duration::from_secs(2);
/// RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets; be lenient.
const MAX_REPLY_LINE: u64 = 4096;
/// Bound on the lines of one multi-line reply (LHLO lists a dozen).
const MAX_REPLY_LINES: usize = 100;
/// RFC 5322 §2.1.1: lines SHOULD be at most 78 characters; we write 76 plus CRLF.
const BODY_LINE_LEN: usize = 76;
const BODY_POOL_LEN: usize = 16 * 1024;

fn lmtp_main(args: LmtpArgs) -> anyhow::Result<ExitCode> {
    check_address(&args.from).context("--from")?;
    let shape = Shape {
        target: args.target,
        messages: args.messages,
        sessions: args.sessions,
        per_connection: 0,
        size: args.size,
    };
    let dialog = Dialog {
        dialect: Dialect::Lmtp,
        from: args.from,
        hello: args.lhlo,
        auth: None,
        starttls: None,
    };
    load_main(&shape, &args.rcpts, &args.run, dialog)
}

fn submit_main(args: SubmitArgs) -> anyhow::Result<ExitCode> {
    check_address(&args.user).context("--user")?;
    let from = args.from.unwrap_or_else(|| args.user.clone());
    check_address(&from).context("--from")?;
    ensure!(
        !args.password.is_empty() && !args.password.contains('\0'),
        "the password must be non-empty, without NUL"
    );
    // RFC 4616: authzid NUL authcid NUL passwd; an empty authzid means "as authcid".
    let credentials = format!("\0{}\0{}", args.user, args.password);
    let shape = Shape {
        target: args.target,
        messages: args.messages,
        sessions: args.sessions,
        per_connection: 0,
        size: args.size,
    };
    let dialog = Dialog {
        dialect: Dialect::Submission,
        from,
        hello: args.ehlo,
        auth: Some(format!("AUTH PLAIN {}", base64(credentials.as_bytes()))),
        starttls: args.starttls.then_some(args.openssl),
    };
    load_main(&shape, &args.rcpts, &args.run, dialog)
}

fn smtp_main(args: SmtpArgs) -> anyhow::Result<ExitCode> {
    check_address(&args.from).context("--from")?;
    let shape = Shape {
        target: args.target,
        messages: args.messages,
        sessions: args.sessions,
        per_connection: args.per_connection,
        size: args.size,
    };
    let dialog = Dialog {
        dialect: Dialect::Smtp,
        from: args.from,
        hello: args.ehlo,
        auth: None,
        starttls: None,
    };
    let runtime = runtime()?;
    let report = runtime.block_on(async {
        let Some(root) = args.maildir_root else {
            return run_load(&shape, &args.rcpts, &args.run, dialog).await;
        };
        check_run_args(&args.run)?;
        if !root.exists() {
            eprintln!(
                "mailbench: warning: --maildir-root {} does not exist (yet); counting from 0",
                root.display()
            );
        }
        let baseline = count_maildir_messages_async(root.clone())
            .await
            .with_context(|| format!("--maildir-root {}", root.display()))?;
        let start = Instant::now();
        let deadline = start + Duration::from_secs_f64(args.run.max_seconds);
        let mut report = run_load(&shape, &args.rcpts, &args.run, dialog).await?;
        let wanted = report.rcpts_delivered;
        report.maildir = Some(wait_for_maildir(root, baseline, wanted, start, deadline).await?);
        Ok(report)
    })?;
    print_load_report(&report, &args.run)
}

/// Runs a load and prints its report; fails (exit status 1) when no message got through.
fn load_main(
    shape: &Shape,
    rcpts: &RcptArgs,
    run: &RunArgs,
    dialog: Dialog,
) -> anyhow::Result<ExitCode> {
    let report = runtime()?.block_on(run_load(shape, rcpts, run, dialog))?;
    print_load_report(&report, run)
}

fn print_load_report(report: &LoadReport, run: &RunArgs) -> anyhow::Result<ExitCode> {
    if run.json {
        print_json(report)?;
    } else {
        report.print_text();
    }
    Ok(if report.messages_delivered > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")
}

/// The limits every load mode checks before it starts.
fn check_run_args(run: &RunArgs) -> anyhow::Result<()> {
    ensure!(
        run.max_seconds > 0.0 && run.max_seconds <= 86_400.0,
        "--max-seconds must be in (0, 86400]"
    );
    ensure!(
        run.reply_timeout > 0.0 && run.reply_timeout <= 3600.0,
        "--reply-timeout must be in (0, 3600]"
    );
    Ok(())
}

/// How much load: the options every load mode has, with its own defaults.
struct Shape {
    target: String,
    messages: u64,
    sessions: u64,
    /// Messages per connection before a new one; 0 = one connection per session.
    per_connection: u64,
    size: u64,
}

/// What differs between the protocols a load speaks.
struct Dialog {
    dialect: Dialect,
    /// Reverse path, and the address of the `From:` header.
    from: String,
    /// The name given in LHLO/EHLO.
    hello: String,
    /// The AUTH command line, credentials included (never printed).
    auth: Option<String>,
    /// STARTTLS through this `openssl` binary.
    starttls: Option<PathBuf>,
}

/// The protocol of a load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    /// LMTP (RFC 2033): LHLO; after the dot, one reply per accepted recipient.
    Lmtp,
    /// SMTP submission (RFC 6409): EHLO and AUTH; after the dot, one reply.
    Submission,
    /// SMTP to an MX (RFC 5321): EHLO, no AUTH; after the dot, one reply.
    Smtp,
}

impl Dialect {
    /// The name of the workload in reports.
    fn workload(self) -> &'static str {
        match self {
            Self::Lmtp => "lmtp",
            Self::Submission => "submit",
            Self::Smtp => "smtp",
        }
    }

    fn hello_verb(self) -> &'static str {
        match self {
            Self::Lmtp => "LHLO",
            Self::Submission | Self::Smtp => "EHLO",
        }
    }
}

async fn run_load(
    shape: &Shape,
    rcpts: &RcptArgs,
    run: &RunArgs,
    dialog: Dialog,
) -> anyhow::Result<LoadReport> {
    check_run_args(run)?;
    ensure!(
        !dialog.hello.is_empty() && dialog.hello.bytes().all(|b| b.is_ascii_graphic()),
        "the {} name must be a domain name",
        dialog.dialect.hello_verb()
    );
    let addr = resolve_target(&shape.target, run.allow_remote).await?;
    let users = load_users(rcpts)?;
    let rcpts_per_msg = usize::try_from(rcpts.rcpts_per_msg)?;
    ensure!(
        rcpts_per_msg <= users.len(),
        "--rcpts-per-msg {rcpts_per_msg} exceeds the {} users",
        users.len()
    );

    let now_ns = unix_nanos();
    let seed = run.seed.unwrap_or(now_ns ^ u64::from(std::process::id()));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(run.max_seconds);
    let reply_timeout = Duration::from_secs_f64(run.reply_timeout);
    // A session finishes the message it has started; this cuts it off if the server stalls.
    let hard_deadline = deadline + reply_timeout * 4 + CONNECT_TIMEOUT;
    let plan = Arc::new(Plan {
        addr,
        dialog,
        users,
        rcpts_per_msg,
        size: usize::try_from(shape.size)?,
        messages: shape.messages,
        per_connection: shape.per_connection,
        next: AtomicU64::new(0),
        deadline,
        reply_timeout,
        run_id: now_ns,
        body_pool: body_pool(&mut Rng::new(seed)),
    });

    let mut tasks = Vec::new();
    for id in 0..shape.sessions {
        let plan = Arc::clone(&plan);
        let mut rng = Rng::new(seed ^ (id + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let run = run_session(&plan, &mut rng, &mut tally);
            if tokio::time::timeout_at(hard_deadline, run).await.is_err() {
                tally.fault(&Fault::Timeout("session"));
            }
            tally
        }));
    }
    let mut total = Tally::default();
    for task in tasks {
        match task.await {
            Ok(tally) => total.merge(tally),
            Err(e) => total.fault(&Fault::Protocol(if e.is_panic() {
                "session panicked"
            } else {
                "session cancelled"
            })),
        }
    }
    let wall = start.elapsed();
    Ok(LoadReport::new(shape, rcpts, &plan, total, wall))
}

/// What every session shares: the settings and the counter of messages started.
struct Plan {
    addr: SocketAddr,
    dialog: Dialog,
    users: Vec<String>,
    rcpts_per_msg: usize,
    size: usize,
    messages: u64,
    /// Messages per connection before a new one; 0 = no limit.
    per_connection: u64,
    /// Messages claimed so far, by all sessions.
    next: AtomicU64,
    /// No message is started after this.
    deadline: Instant,
    reply_timeout: Duration,
    /// Makes Message-IDs unique across runs.
    run_id: u64,
    /// Printable text that body lines are cut from.
    body_pool: Vec<u8>,
}

impl Plan {
    /// The sequence number of the next message to send, or `None` when the run is over.
    fn claim(&self) -> Option<u64> {
        if Instant::now() >= self.deadline {
            return None;
        }
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        (seq < self.messages).then_some(seq)
    }

    fn is_over(&self) -> bool {
        Instant::now() >= self.deadline || self.next.load(Ordering::Relaxed) >= self.messages
    }

    /// `rcpts_per_msg` distinct users (Floyd's sampling: bounded, no retries).
    fn pick_rcpts(&self, rng: &mut Rng) -> Vec<&str> {
        let n = self.users.len();
        let mut picked: Vec<usize> = Vec::with_capacity(self.rcpts_per_msg);
        for j in n - self.rcpts_per_msg..n {
            let t = rng.below(j + 1);
            picked.push(if picked.contains(&t) { j } else { t });
        }
        picked
            .into_iter()
            .filter_map(|i| self.users.get(i).map(String::as_str))
            .collect()
    }

    /// Appends message `seq`, dot-stuffed, without the final dot.
    fn push_message(&self, out: &mut Vec<u8>, seq: u64, rcpts: &[&str], rng: &mut Rng) {
        let start = out.len();
        push_line(out, &format!("From: Mailbench <{}>", self.dialog.from));
        let mut to = String::from("To: ");
        for (i, rcpt) in rcpts.iter().enumerate() {
            if i > 0 {
                // Folded, one address per line (RFC 5322 §2.2.3).
                to.push_str(",\r\n ");
            }
            to.push('<');
            to.push_str(rcpt);
            to.push('>');
        }
        push_line(out, &to);
        push_line(
            out,
            &format!("Subject: mailbench {:016x} message {seq}", self.run_id),
        );
        push_line(out, &format!("Date: {}", rfc5322_date(SystemTime::now())));
        push_line(
            out,
            &format!(
                "Message-ID: <{:016x}.{seq}@{}>",
                self.run_id, self.dialog.hello
            ),
        );
        push_line(out, "MIME-Version: 1.0");
        push_line(out, "Content-Type: text/plain; charset=us-ascii");
        push_line(out, "");
        let body_len = self.size.saturating_sub(out.len() - start);
        self.push_body(out, body_len, rng);
    }

    /// Appends `body_len` bytes of body (as stored; dot-stuffing adds to it on the wire):
    /// lines of 76 characters, the last one shorter.
    fn push_body(&self, out: &mut Vec<u8>, body_len: usize, rng: &mut Rng) {
        const FULL: usize = BODY_LINE_LEN + 2;
        let mut lens = vec![BODY_LINE_LEN; body_len / FULL];
        match body_len % FULL {
            0 => {}
            // A line of 75 and an empty one make up the odd byte (none if there is no line).
            1 => {
                if let Some(last) = lens.last_mut() {
                    *last -= 1;
                    lens.push(0);
                }
            }
            rest => lens.push(rest - 2),
        }
        for len in lens {
            let at = rng.below(self.body_pool.len() - BODY_LINE_LEN);
            let line = self.body_pool.get(at..at + len).unwrap_or_default();
            // RFC 5321 §4.5.2: a line that starts with a dot gets one more.
            if line.first() == Some(&b'.') {
                out.push(b'.');
            }
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// Runs one session: connect, then messages until the run is over; reconnects after faults
/// (at most `MAX_RECONNECTS` times), except a permanent refusal of the greeting, LHLO/EHLO or
/// AUTH, and after every `per_connection` messages.
async fn run_session(plan: &Plan, rng: &mut Rng, tally: &mut Tally) {
    let mut faults = 0;
    loop {
        if plan.is_over() {
            return;
        }
        let fault = match Connection::open(plan).await {
            Ok(mut conn) => {
                tally.connections += 1;
                match conn.send_messages(plan, rng, tally).await {
                    Ok(Flow::Close) => {
                        conn.quit().await;
                        return;
                    }
                    Ok(Flow::Continue) => {
                        conn.quit().await;
                        continue;
                    }
                    Err(fault) => fault,
                }
            }
            // A permanent refusal (a wrong password, say) would only be repeated.
            Err(fault @ Fault::Refused(_, 500..)) => {
                tally.fault(&fault);
                return;
            }
            Err(fault) => fault,
        };
        tally.fault(&fault);
        faults += 1;
        if faults > MAX_RECONNECTS {
            return;
        }
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
}

/// What a session does after a connection's messages.
enum Flow {
    /// Connect again: `per_connection` messages went over this one.
    Continue,
    /// The run is over.
    Close,
}

/// The two halves of a connection's byte stream: a TCP socket, or the pipes of an
/// `openssl s_client` process that carries the session over TLS.
type ReadHalf = Box<dyn AsyncRead + Unpin + Send>;
type WriteHalf = Box<dyn AsyncWrite + Unpin + Send>;

/// One LMTP or SMTP connection, after the greeting, LHLO/EHLO and AUTH.
struct Connection {
    reader: BufReader<ReadHalf>,
    writer: WriteHalf,
    /// The `openssl s_client` process of a STARTTLS session (killed when dropped).
    tls_helper: Option<Child>,
    pipelining: bool,
    reply_timeout: Duration,
    out: Vec<u8>,
    line: Vec<u8>,
}

impl Connection {
    async fn open(plan: &Plan) -> Result<Self, Fault> {
        let dialog = &plan.dialog;
        let (reader, writer, tls_helper): (ReadHalf, WriteHalf, _) = match &dialog.starttls {
            None => {
                let (reader, writer) = connect_tcp(plan.addr).await?;
                (reader, writer, None)
            }
            Some(openssl) => {
                let mut child =
                    spawn_starttls(openssl, plan.addr, &dialog.hello).map_err(Fault::Connect)?;
                let (Some(stdout), Some(stdin)) = (child.stdout.take(), child.stdin.take()) else {
                    return Err(Fault::Protocol("openssl without pipes"));
                };
                (Box::new(stdout), Box::new(stdin), Some(child))
            }
        };
        let mut conn = Self {
            reader: BufReader::new(reader),
            writer,
            tls_helper,
            pipelining: false,
            reply_timeout: plan.reply_timeout,
            out: Vec::with_capacity(plan.size + plan.size / 32 + 1024),
            line: Vec::with_capacity(512),
        };
        // With STARTTLS, openssl has read the greeting, said EHLO and STARTTLS, and done the
        // handshake; the session starts again with EHLO (RFC 3207 §4.2).
        if conn.tls_helper.is_none() {
            let greeting = conn.read_reply().await?;
            if greeting.code != 220 {
                return Err(Fault::Refused("greeting", greeting.code));
            }
        }
        let verb = dialog.dialect.hello_verb();
        conn.out.clear();
        push_line(&mut conn.out, &format!("{verb} {}", dialog.hello));
        conn.flush().await?;
        let hello = conn.read_reply().await?;
        if hello.code != 250 {
            return Err(Fault::Refused(verb, hello.code));
        }
        conn.pipelining = hello
            .lines
            .iter()
            .any(|l| l.eq_ignore_ascii_case("PIPELINING"));
        if let Some(auth) = &dialog.auth {
            conn.out.clear();
            push_line(&mut conn.out, auth);
            conn.flush().await?;
            let reply = conn.read_reply().await?;
            if reply.code != 235 {
                return Err(Fault::Refused("AUTH", reply.code));
            }
        }
        Ok(conn)
    }

    /// Sends messages until the run is over or `per_connection` have been sent.
    async fn send_messages(
        &mut self,
        plan: &Plan,
        rng: &mut Rng,
        tally: &mut Tally,
    ) -> Result<Flow, Fault> {
        let mut sent = 0;
        while let Some(seq) = plan.claim() {
            tally.sent += 1;
            self.transaction(plan, seq, rng, tally).await?;
            sent += 1;
            if sent == plan.per_connection {
                return Ok(Flow::Continue);
            }
        }
        Ok(Flow::Close)
    }

    /// One message: envelope, DATA, content, and the replies after it.
    async fn transaction(
        &mut self,
        plan: &Plan,
        seq: u64,
        rng: &mut Rng,
        tally: &mut Tally,
    ) -> Result<(), Fault> {
        let rcpts = plan.pick_rcpts(rng);
        let started = Instant::now();
        let accepted = self.envelope(&plan.dialog.from, &rcpts, tally).await?;
        if accepted == 0 {
            return self.reset(tally).await;
        }

        self.out.clear();
        push_line(&mut self.out, "DATA");
        self.flush().await?;
        let data = self.read_reply().await?;
        if data.code != 354 {
            tally.error("DATA", data.code);
            return self.reset(tally).await;
        }

        self.out.clear();
        plan.push_message(&mut self.out, seq, &rcpts, rng);
        self.out.extend_from_slice(b".\r\n");
        self.flush().await?;
        let end_of_data = Instant::now();
        // RFC 2033 §4.2: LMTP answers once for each recipient that RCPT accepted, in order;
        // SMTP answers once for all of them (RFC 5321 §4.1.1.4).
        let (replies, rcpts_per_reply) = match plan.dialog.dialect {
            Dialect::Lmtp => (accepted, 1),
            Dialect::Submission | Dialect::Smtp => (1, accepted as u64),
        };
        let mut delivered = 0;
        for _ in 0..replies {
            let reply = self.read_reply().await?;
            if reply.code == 250 {
                delivered += rcpts_per_reply;
            } else {
                tally.error("EOM", reply.code);
            }
        }
        tally.latencies_us.push(micros(end_of_data.elapsed()));
        tally.transactions_us.push(micros(started.elapsed()));
        tally.rcpts_delivered += delivered;
        if delivered == rcpts.len() as u64 {
            tally.messages_delivered += 1;
        }
        Ok(())
    }

    /// MAIL and the RCPTs, in one write when pipelining; returns how many RCPTs were accepted.
    async fn envelope(
        &mut self,
        from: &str,
        rcpts: &[&str],
        tally: &mut Tally,
    ) -> Result<usize, Fault> {
        self.out.clear();
        push_line(&mut self.out, &format!("MAIL FROM:<{from}>"));
        if self.pipelining {
            for rcpt in rcpts {
                push_line(&mut self.out, &format!("RCPT TO:<{rcpt}>"));
            }
        }
        self.flush().await?;
        let mail = self.read_reply().await?;
        let mail_ok = mail.is_positive();
        if !mail_ok {
            tally.error("MAIL", mail.code);
        }
        let mut accepted = 0;
        for rcpt in rcpts {
            if !self.pipelining {
                if !mail_ok {
                    break;
                }
                self.out.clear();
                push_line(&mut self.out, &format!("RCPT TO:<{rcpt}>"));
                self.flush().await?;
            }
            let reply = self.read_reply().await?;
            if reply.is_positive() {
                accepted += 1;
            } else if mail_ok {
                // After a failed MAIL, every RCPT fails too; that is one error, not several.
                tally.error("RCPT", reply.code);
            }
        }
        Ok(if mail_ok { accepted } else { 0 })
    }

    async fn reset(&mut self, tally: &mut Tally) -> Result<(), Fault> {
        self.out.clear();
        push_line(&mut self.out, "RSET");
        self.flush().await?;
        let reply = self.read_reply().await?;
        if reply.code != 250 {
            tally.error("RSET", reply.code);
        }
        Ok(())
    }

    /// Best effort: the run's figures do not depend on it.
    async fn quit(mut self) {
        self.reply_timeout = QUIT_TIMEOUT;
        self.out.clear();
        push_line(&mut self.out, "QUIT");
        if self.flush().await.is_ok() {
            let _ = self.read_reply().await;
        }
        // openssl exits when the server closes; waiting for it counts its CPU time as ours
        // (/proc/self/stat cutime, cstime). If it does not exit, dropping it kills it.
        if let Some(mut child) = self.tls_helper.take() {
            drop(self.writer);
            let _ = tokio::time::timeout(QUIT_TIMEOUT, child.wait()).await;
        }
    }

    async fn flush(&mut self) -> Result<(), Fault> {
        let write = async {
            self.writer.write_all(&self.out).await?;
            self.writer.flush().await
        };
        tokio::time::timeout(self.reply_timeout, write)
            .await
            .map_err(|_| Fault::Timeout("write"))?
            .map_err(Fault::Io)
    }

    /// Reads one reply, all its lines. A `421` ends the session.
    async fn read_reply(&mut self) -> Result<Reply, Fault> {
        let mut lines = Vec::new();
        for _ in 0..MAX_REPLY_LINES {
            self.line.clear();
            let mut bounded = (&mut self.reader).take(MAX_REPLY_LINE);
            let read = bounded.read_until(b'\n', &mut self.line);
            let n = tokio::time::timeout(self.reply_timeout, read)
                .await
                .map_err(|_| Fault::Timeout("reply"))?
                .map_err(Fault::Io)?;
            if n == 0 {
                return Err(Fault::Protocol("connection closed"));
            }
            let line = self
                .line
                .strip_suffix(b"\n")
                .ok_or(Fault::Protocol("reply line too long"))?;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let (code, last, text) = parse_reply_line(line)?;
            lines.push(text);
            if last {
                if code == 421 {
                    return Err(Fault::Closing);
                }
                return Ok(Reply { code, lines });
            }
        }
        Err(Fault::Protocol("reply has too many lines"))
    }
}

/// A server reply: its code and the text of each line.
struct Reply {
    code: u16,
    lines: Vec<String>,
}

impl Reply {
    fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }
}

/// `250-text` → (250, false, "text"); `250 text` or `250` → (250, true, "text").
fn parse_reply_line(line: &[u8]) -> Result<(u16, bool, String), Fault> {
    let bad = Fault::Protocol("malformed reply line");
    let (digits, rest) = line
        .split_at_checked(3)
        .ok_or(Fault::Protocol("short reply line"))?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return Err(bad);
    }
    let code = digits
        .iter()
        .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
    let (last, text) = match rest.split_first() {
        None => (true, &[][..]),
        Some((b' ', text)) => (true, text),
        Some((b'-', text)) => (false, text),
        Some(_) => return Err(bad),
    };
    Ok((code, last, String::from_utf8_lossy(text).into_owned()))
}

/// Starts `openssl s_client` to speak SMTP over STARTTLS with `addr`: it reads the greeting,
/// says `EHLO hello` and STARTTLS, does the handshake (without checking the certificate), and
/// then relays its standard input and output to and from the TLS session. `-quiet` also keeps
/// the connection when standard input ends; `-nocommands` stops it from taking lines that
/// start with `Q` or `R` for its own commands.
fn spawn_starttls(openssl: &Path, addr: SocketAddr, hello: &str) -> io::Result<Child> {
    tokio::process::Command::new(openssl)
        .args(["s_client", "-quiet", "-nocommands", "-starttls", "smtp"])
        .arg("-name")
        .arg(hello)
        .arg("-connect")
        .arg(addr.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
}

/// Why a session lost its connection.
#[derive(Debug)]
enum Fault {
    Connect(io::Error),
    Io(io::Error),
    Timeout(&'static str),
    Protocol(&'static str),
    /// The greeting or LHLO was not accepted.
    Refused(&'static str, u16),
    /// The server sent `421` (RFC 5321 §3.8): it is closing the connection.
    Closing,
    /// An IMAP or POP3 command failed: `NO`, `BAD` or `BYE`, or `-ERR`, with the server's text.
    Status {
        phase: &'static str,
        status: String,
        text: String,
    },
}

impl Fault {
    /// The key it is counted under.
    fn key(&self) -> String {
        match self {
            Self::Connect(_) => "connect".to_owned(),
            Self::Io(_) => "io".to_owned(),
            Self::Timeout(what) => format!("timeout {what}"),
            Self::Protocol(what) => format!("protocol {what}"),
            Self::Refused(phase, code) => format!("{phase} {code}"),
            Self::Closing => "closed 421".to_owned(),
            Self::Status { phase, status, .. } => format!("{phase} {status}"),
        }
    }

    fn detail(&self) -> String {
        match self {
            // EMFILE: this process ran out of file descriptors, not the server.
            Self::Connect(e) if e.raw_os_error() == Some(EMFILE) => format!(
                "connect: {e}: this process is at its limit of open files; raise the soft \
                 limit (`ulimit -n`, at most the hard limit) or open fewer connections"
            ),
            Self::Connect(e) => format!("connect: {e}"),
            Self::Io(e) => format!("i/o: {e}"),
            Self::Status { text, .. } => format!("{}: {text}", self.key()),
            other => other.key(),
        }
    }
}

/// Linux `EMFILE`: the process has as many open files as `RLIMIT_NOFILE` allows.
const EMFILE: i32 = 24;

/// Connects with `CONNECT_TIMEOUT`, without Nagle's delay (every command waits for a reply).
async fn connect_tcp(addr: SocketAddr) -> Result<(ReadHalf, WriteHalf), Fault> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| Fault::Timeout("connect"))?
        .map_err(Fault::Connect)?;
    stream.set_nodelay(true).map_err(Fault::Connect)?;
    let (reader, writer) = stream.into_split();
    Ok((Box::new(reader), Box::new(writer)))
}

/// Fault counts by key, and the first fault's detail.
#[derive(Default)]
struct FaultLog {
    counts: BTreeMap<String, u64>,
    first: Option<String>,
}

impl FaultLog {
    fn add(&mut self, fault: &Fault) {
        *self.counts.entry(fault.key()).or_default() += 1;
        self.first.get_or_insert_with(|| fault.detail());
    }

    fn merge(&mut self, other: Self) {
        for (key, n) in other.counts {
            *self.counts.entry(key).or_default() += n;
        }
        if self.first.is_none() {
            self.first = other.first;
        }
    }
}

/// The `errors` and `first` lines of a text report.
fn print_errors(errors: &BTreeMap<String, u64>, first: Option<&str>) {
    if errors.is_empty() {
        println!("errors     none");
    } else {
        let list: Vec<String> = errors.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        println!("errors     {}", list.join(", "));
    }
    if let Some(first) = first {
        println!("first      {first}");
    }
}

/// What one session (or, merged, the whole run) counted.
#[derive(Default)]
struct Tally {
    /// Connections opened (greeting, LHLO/EHLO and AUTH accepted).
    connections: u64,
    /// Messages for which MAIL was sent.
    sent: u64,
    /// Messages for which every recipient got a final 250.
    messages_delivered: u64,
    /// Final 250 replies after the dot.
    rcpts_delivered: u64,
    /// End of DATA to last reply, one entry per message that got to the dot.
    latencies_us: Vec<u32>,
    /// MAIL to last reply, for the same messages.
    transactions_us: Vec<u32>,
    errors: BTreeMap<String, u64>,
    first_fault: Option<String>,
}

impl Tally {
    fn error(&mut self, phase: &str, code: u16) {
        *self.errors.entry(format!("{phase} {code}")).or_default() += 1;
    }

    fn fault(&mut self, fault: &Fault) {
        *self.errors.entry(fault.key()).or_default() += 1;
        self.first_fault.get_or_insert_with(|| fault.detail());
    }

    fn merge(&mut self, other: Self) {
        self.connections += other.connections;
        self.sent += other.sent;
        self.messages_delivered += other.messages_delivered;
        self.rcpts_delivered += other.rcpts_delivered;
        self.latencies_us.extend(other.latencies_us);
        self.transactions_us.extend(other.transactions_us);
        for (key, n) in other.errors {
            *self.errors.entry(key).or_default() += n;
        }
        if self.first_fault.is_none() {
            self.first_fault = other.first_fault;
        }
    }
}

#[derive(Serialize)]
struct LoadReport {
    workload: &'static str,
    /// The same as `workload`: every mode's report has a `mode`.
    mode: &'static str,
    target: String,
    /// Submission only: whether the sessions started TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    starttls: Option<bool>,
    sessions: u64,
    /// SMTP only: messages per connection (0 = one connection per session).
    #[serde(skip_serializing_if = "Option::is_none")]
    per_connection: Option<u64>,
    /// Connections over which messages were sent.
    connections: u64,
    size: u64,
    rcpts_per_msg: u64,
    users: usize,
    messages_requested: u64,
    messages_sent: u64,
    messages_delivered: u64,
    /// Sent but not delivered: some recipient or the whole message refused, or the connection
    /// lost.
    messages_failed: u64,
    rcpts_delivered: u64,
    wall_s: f64,
    msgs_per_s: f64,
    rcpts_per_s: f64,
    lat_ms_p50: Option<f64>,
    lat_ms_p99: Option<f64>,
    lat_ms_max: Option<f64>,
    txn_ms_p50: Option<f64>,
    txn_ms_p99: Option<f64>,
    errors: BTreeMap<String, u64>,
    first_error: Option<String>,
    /// True when `--max-seconds` ended the run before `--messages` were sent.
    stopped_by_time: bool,
    client_cpu_s: Option<f64>,
    /// SMTP with `--maildir-root`: how many of the messages reached the Maildirs.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    maildir: Option<MaildirReport>,
}

impl LoadReport {
    fn new(shape: &Shape, rcpts: &RcptArgs, plan: &Plan, mut tally: Tally, wall: Duration) -> Self {
        tally.latencies_us.sort_unstable();
        tally.transactions_us.sort_unstable();
        let ms = |v: &[u32], p| percentile(v, p).map(|us| round3(f64::from(us) / 1e3));
        let wall_s = wall.as_secs_f64();
        let dialect = plan.dialog.dialect;
        Self {
            workload: dialect.workload(),
            mode: dialect.workload(),
            target: shape.target.clone(),
            starttls: (dialect == Dialect::Submission).then_some(plan.dialog.starttls.is_some()),
            sessions: shape.sessions,
            per_connection: (dialect == Dialect::Smtp).then_some(shape.per_connection),
            connections: tally.connections,
            size: shape.size,
            rcpts_per_msg: rcpts.rcpts_per_msg,
            users: plan.users.len(),
            messages_requested: shape.messages,
            messages_sent: tally.sent,
            messages_delivered: tally.messages_delivered,
            messages_failed: tally.sent - tally.messages_delivered,
            rcpts_delivered: tally.rcpts_delivered,
            wall_s: round3(wall_s),
            msgs_per_s: round1(tally.messages_delivered as f64 / wall_s),
            rcpts_per_s: round1(tally.rcpts_delivered as f64 / wall_s),
            lat_ms_p50: ms(&tally.latencies_us, 0.50),
            lat_ms_p99: ms(&tally.latencies_us, 0.99),
            lat_ms_max: ms(&tally.latencies_us, 1.0),
            txn_ms_p50: ms(&tally.transactions_us, 0.50),
            txn_ms_p99: ms(&tally.transactions_us, 0.99),
            errors: tally.errors,
            first_error: tally.first_fault,
            stopped_by_time: tally.sent < shape.messages && Instant::now() >= plan.deadline,
            client_cpu_s: process_cpu_seconds(),
            maildir: None,
        }
    }

    fn print_text(&self) {
        let tls = match self.starttls {
            Some(true) => ", STARTTLS",
            Some(false) => ", no TLS",
            None => "",
        };
        let per_connection = match self.per_connection {
            Some(0) | None => String::new(),
            Some(n) => format!(" ({n} msg per connection)"),
        };
        println!(
            "{} {}{tls}: {} sessions{per_connection}, {} connections, {} bytes/msg, {} rcpt/msg, \
             {} users",
            self.workload,
            self.target,
            self.sessions,
            self.connections,
            self.size,
            self.rcpts_per_msg,
            self.users
        );
        println!(
            "messages   {} requested, {} sent, {} delivered (every recipient 250){}",
            self.messages_requested,
            self.messages_sent,
            self.messages_delivered,
            if self.stopped_by_time {
                "; stopped by --max-seconds"
            } else {
                ""
            }
        );
        println!("recipients {} delivered", self.rcpts_delivered);
        println!(
            "rate       {} msg/s, {} rcpt/s",
            self.msgs_per_s, self.rcpts_per_s
        );
        println!(
            "latency    p50 {} ms, p99 {} ms, max {} ms (end of DATA to last reply)",
            fmt_opt(self.lat_ms_p50),
            fmt_opt(self.lat_ms_p99),
            fmt_opt(self.lat_ms_max)
        );
        println!(
            "txn        p50 {} ms, p99 {} ms (MAIL to last reply)",
            fmt_opt(self.txn_ms_p50),
            fmt_opt(self.txn_ms_p99)
        );
        if let Some(m) = &self.maildir {
            m.print_text();
        }
        print_errors(&self.errors, self.first_error.as_deref());
        println!(
            "wall       {} s; client CPU {} s",
            self.wall_s,
            fmt_opt(self.client_cpu_s)
        );
    }
}

/// Resolves HOST:PORT to its first address; refuses non-loopback ones unless allowed.
async fn resolve_target(target: &str, allow_remote: bool) -> anyhow::Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(target)
        .await
        .with_context(|| format!("cannot resolve {target}"))?
        .collect();
    let Some(&first) = addrs.first() else {
        bail!("{target} has no address");
    };
    if !allow_remote && !addrs.iter().all(|a| a.ip().is_loopback()) {
        bail!("{target} is not a loopback address (use --allow-remote to permit it)");
    }
    Ok(first)
}

/// The recipient addresses: from `--users FILE`, or `--user-fmt` expanded.
fn load_users(args: &RcptArgs) -> anyhow::Result<Vec<String>> {
    let users = if let Some(path) = &args.users {
        let text =
            fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect()
    } else {
        let last = args
            .user_first
            .checked_add(args.user_count - 1)
            .context("--user-first + --user-count is too large")?;
        (args.user_first..=last)
            .map(|n| expand_user_fmt(&args.user_fmt, n))
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    ensure!(!users.is_empty(), "no recipients");
    for user in &users {
        check_address(user)?;
    }
    Ok(users)
}

/// Replaces `%d`, `%Nd` and `%0Nd` by `n`, and `%%` by `%` (`--user-fmt`).
fn expand_user_fmt(fmt: &str, n: u32) -> anyhow::Result<String> {
    expand_fmt(fmt, n, "--user-fmt", true)
}

/// Replaces `%d`, `%Nd` and `%0Nd` by `n`, and `%%` by `%`; `option` names the pattern in
/// errors. With `require_number`, a pattern without `%d` is an error.
fn expand_fmt(fmt: &str, n: u32, option: &str, require_number: bool) -> anyhow::Result<String> {
    let mut out = String::with_capacity(fmt.len() + 8);
    let mut chars = fmt.chars();
    let mut has_number = false;
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut spec = String::new();
        let conv = loop {
            match chars.next() {
                Some(d) if d.is_ascii_digit() && spec.len() < 2 => spec.push(d),
                other => break other,
            }
        };
        match conv {
            Some('%') if spec.is_empty() => out.push('%'),
            Some('d') => {
                let width: usize = if spec.is_empty() { 0 } else { spec.parse()? };
                if spec.starts_with('0') {
                    out.push_str(&format!("{n:0width$}"));
                } else {
                    out.push_str(&format!("{n:width$}"));
                }
                has_number = true;
            }
            _ => bail!("{option} {fmt:?}: only %d, %Nd, %0Nd and %% are understood"),
        }
    }
    ensure!(has_number || !require_number, "{option} {fmt:?} has no %d");
    Ok(out)
}

/// An address we can put between `<` and `>` on a command line.
fn check_address(addr: &str) -> anyhow::Result<()> {
    ensure!(
        addr.contains('@')
            && addr.len() <= 254
            && addr
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'<' && b != b'>'),
        "{addr:?} is not a plain mail address"
    );
    Ok(())
}

/// Printable text that body lines are cut from: words, spaces, punctuation and some dots, so
/// that lines starting with a dot (and so dot-stuffing) occur.
fn body_pool(rng: &mut Rng) -> Vec<u8> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzeeeaaoiintt     ,.ABCDEFGHIJ0123456789";
    (0..BODY_POOL_LEN)
        .map(|_| {
            ALPHABET
                .get(rng.below(ALPHABET.len()))
                .copied()
                .unwrap_or(b' ')
        })
        .collect()
}

/// Base64 with padding (RFC 4648 §4), for AUTH PLAIN.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        // The chunk's bytes, big-endian, in the top 24 bits of 32.
        let bits = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | u32::from(b) << (24 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                let sextet = (bits >> (26 - 6 * i)) & 63;
                out.push(char::from(ALPHABET[sextet as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn push_line(out: &mut Vec<u8>, line: &str) {
    out.extend_from_slice(line.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// RFC 5322 §3.3 date-time in UTC: `Thu, 27 Nov 2026 07:39:18 +0000`.
fn rfc5322_date(t: SystemTime) -> String {
    const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} +0000",
        // 1970-01-01 was a Thursday.
        DAYS.get(((days + 4) % 7) as usize).unwrap_or(&"Sun"),
        MONTHS.get(month as usize - 1).unwrap_or(&"Jan"),
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 → (year, month 1..=12, day 1..=31), proleptic Gregorian
/// (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// SplitMix64: fast, and good enough to pick recipients and body text. Not for secrets.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (multiply-shift; the bias is below 2^-32 for our `n`). `n` must be > 0.
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

// ---------------------------------------------------------------------------------------------
// SMTP: waiting for the Maildirs

/// How often `--maildir-root` is counted while waiting.
const MAILDIR_POLL: Duration = Duration::from_millis(100);

/// How many of the accepted messages reached the Maildirs below `--maildir-root`.
#[derive(Serialize)]
struct MaildirReport {
    maildir_root: String,
    /// Message files below the root before sending.
    maildir_baseline: u64,
    /// Files waited for: one per recipient that got the `250` after the dot.
    delivered_wanted: u64,
    /// Growth of the file count when the wait ended.
    delivered: u64,
    /// True when `delivered` reached `delivered_wanted` before `--max-seconds`.
    delivered_all: bool,
    /// From the start of sending until the count was reached (or the wait gave up).
    delivered_s: f64,
    delivered_per_s: f64,
}

impl MaildirReport {
    fn print_text(&self) {
        println!(
            "maildirs   {} of {} delivered in {} s from the start: {} msg/s{}",
            self.delivered,
            self.delivered_wanted,
            self.delivered_s,
            self.delivered_per_s,
            if self.delivered_all {
                ""
            } else {
                "; gave up at --max-seconds"
            }
        );
    }
}

/// Counts the files below `root` every `MAILDIR_POLL` until `wanted` more than `baseline`
/// are there, or `deadline`.
async fn wait_for_maildir(
    root: PathBuf,
    baseline: u64,
    wanted: u64,
    start: Instant,
    deadline: Instant,
) -> anyhow::Result<MaildirReport> {
    loop {
        let count = count_maildir_messages_async(root.clone()).await?;
        let now = Instant::now();
        let delivered = count.saturating_sub(baseline);
        if delivered >= wanted || now >= deadline {
            let secs = (now - start).as_secs_f64();
            return Ok(MaildirReport {
                maildir_root: root.display().to_string(),
                maildir_baseline: baseline,
                delivered_wanted: wanted,
                delivered,
                delivered_all: delivered >= wanted,
                delivered_s: round3(secs),
                delivered_per_s: round1(delivered as f64 / secs),
            });
        }
        tokio::time::sleep_until((now + MAILDIR_POLL).min(deadline)).await;
    }
}

async fn count_maildir_messages_async(root: PathBuf) -> anyhow::Result<u64> {
    tokio::task::spawn_blocking(move || {
        count_maildir_messages(&root).with_context(|| format!("cannot count {}", root.display()))
    })
    .await
    .context("the counting thread failed")?
}

/// The regular files directly inside every `new` and `cur` directory at or below `root`: the
/// messages of all the Maildirs (and Maildir++ folders) there. It only reads directories: the
/// file types come from readdir (`d_type`), so no file is stat'ed on file systems that fill it
/// in. It does not follow symbolic links, nor look into `tmp`. A message moving from `new` to
/// `cur` while it counts may be counted twice or not at all. A missing `root` holds 0 (a new
/// platform makes its mail directories on the first delivery).
fn count_maildir_messages(root: &Path) -> io::Result<u64> {
    let mut count = 0;
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            // Not made yet, or a folder deleted since its parent was read.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            if !entry.file_type()?.is_dir() {
                continue;
            }
            match entry.file_name().as_encoded_bytes() {
                b"new" | b"cur" => count += count_files(&entry.path())?,
                b"tmp" => {}
                _ => dirs.push(entry.path()),
            }
        }
    }
    Ok(count)
}

/// Regular files directly inside `dir`.
fn count_files(dir: &Path) -> io::Result<u64> {
    let mut count = 0;
    for entry in fs::read_dir(dir)? {
        if entry?.file_type()?.is_file() {
            count += 1;
        }
    }
    Ok(count)
}

// ---------------------------------------------------------------------------------------------
// IMAP and POP3 sessions

#[derive(Args)]
struct ImapArgs {
    /// The IMAP server, HOST:PORT.
    target: String,
    /// Sessions in total.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    sessions: u64,
    /// Sessions at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    concurrency: u64,
    /// Instead of the sessions: log in once (as the first user) and time N NOOP round trips,
    /// after 200 warm-up ones.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    noop: Option<u64>,
    #[command(flatten)]
    login: LoginArgs,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args)]
struct Pop3Args {
    /// The POP3 server, HOST:PORT.
    target: String,
    /// Sessions in total.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    sessions: u64,
    /// Sessions at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    concurrency: u64,
    #[command(flatten)]
    login: LoginArgs,
    #[command(flatten)]
    run: RunArgs,
}

/// Who logs in: the same options for the IMAP, POP3 and IDLE modes.
#[derive(Args)]
struct LoginArgs {
    /// File with one account per line, `address password` (blank lines and `#` comments are
    /// skipped). A line with only an address gets `--pass-fmt` expanded with the line's place
    /// among the accounts (1 for the first).
    #[arg(long, conflicts_with_all = ["user_fmt", "user_count", "user_first"])]
    users: Option<PathBuf>,
    /// Login pattern: `%d`, `%4d` or `%04d` is replaced by the user number, `%%` by `%`.
    #[arg(long, default_value = "user%04d@example.test")]
    user_fmt: String,
    /// How many users `--user-fmt` makes.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    user_count: u32,
    /// The first user number.
    #[arg(long, default_value_t = 1)]
    user_first: u32,
    /// Password pattern, expanded like `--user-fmt` with the same user number; without `%d`,
    /// every account has this password. Printable ASCII.
    #[arg(long, default_value = "pw-user%04d")]
    pass_fmt: String,
    /// Log in as each user with a master (proxy) login instead of the user's password:
    /// `NAME:SECRET`, sent as SASL PLAIN with authzid = the user, authcid = NAME (IMAP
    /// `AUTHENTICATE PLAIN`, POP3 `AUTH PLAIN`). How a proxy logs in to a backend: our filers'
    /// trusted login, Dovecot's master user. The environment is safer than the command line.
    #[arg(long, env = "MAILBENCH_MASTER", hide_env_values = true)]
    master: Option<String>,
}

/// One account to log in as.
struct Account {
    user: String,
    pass: String,
    /// `NAME\0SECRET` of a master login (see `--master`).
    master: Option<(String, String)>,
}

impl Account {
    /// The SASL PLAIN initial response of a master login, if this is one.
    fn master_plain(&self) -> Option<String> {
        self.master
            .as_ref()
            .map(|(name, secret)| base64(format!("{}\0{name}\0{secret}", self.user).as_bytes()))
    }
}

/// Warm-up round trips of `imap --noop`, not measured.
const NOOP_WARMUP: u64 = 200;
/// Longest IMAP response line, and POP3 line, we accept (RFC 5322 lines are at most 998).
const MAX_SERVER_LINE: usize = 1 << 20;
/// Largest IMAP literal we accept.
const MAX_LITERAL: usize = 1 << 30;
/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 64 * 1024;

fn imap_main(args: ImapArgs) -> anyhow::Result<ExitCode> {
    if let Some(noops) = args.noop {
        let report = runtime()?.block_on(run_noops(&args, noops))?;
        if args.run.json {
            print_json(&report)?;
        } else {
            report.print_text();
        }
        return Ok(exit_code(report.noops_ok > 0));
    }
    let shape = SessionShape {
        protocol: Protocol::Imap,
        target: args.target,
        sessions: args.sessions,
        concurrency: args.concurrency,
    };
    sessions_main(&shape, &args.login, &args.run)
}

fn pop3_main(args: Pop3Args) -> anyhow::Result<ExitCode> {
    let shape = SessionShape {
        protocol: Protocol::Pop3,
        target: args.target,
        sessions: args.sessions,
        concurrency: args.concurrency,
    };
    sessions_main(&shape, &args.login, &args.run)
}

fn sessions_main(
    shape: &SessionShape,
    login: &LoginArgs,
    run: &RunArgs,
) -> anyhow::Result<ExitCode> {
    let report = runtime()?.block_on(run_sessions(shape, login, run))?;
    if run.json {
        print_json(&report)?;
    } else {
        report.print_text();
    }
    Ok(exit_code(report.sessions_ok > 0))
}

fn exit_code(success: bool) -> ExitCode {
    if success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The accounts: from `--users FILE`, or `--user-fmt` and `--pass-fmt` expanded.
fn load_accounts(args: &LoginArgs) -> anyhow::Result<Vec<Account>> {
    let accounts = if let Some(path) = &args.users {
        let text =
            fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let lines = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'));
        let mut accounts = Vec::new();
        for (n, line) in (1u32..).zip(lines) {
            let (user, pass) = match line.split_once(char::is_whitespace) {
                Some((user, pass)) => (user.to_owned(), pass.trim().to_owned()),
                None => (
                    line.to_owned(),
                    expand_fmt(&args.pass_fmt, n, "--pass-fmt", false)?,
                ),
            };
            accounts.push(Account {
                user,
                pass,
                master: None,
            });
        }
        accounts
    } else {
        let last = args
            .user_first
            .checked_add(args.user_count - 1)
            .context("--user-first + --user-count is too large")?;
        (args.user_first..=last)
            .map(|n| {
                Ok(Account {
                    user: expand_fmt(&args.user_fmt, n, "--user-fmt", true)?,
                    pass: expand_fmt(&args.pass_fmt, n, "--pass-fmt", false)?,
                    master: None,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    ensure!(!accounts.is_empty(), "no accounts");
    let mut accounts = accounts;
    if let Some(m) = &args.master {
        let (name, secret) = m.split_once(':').context("--master must be NAME:SECRET")?;
        for a in &mut accounts {
            a.master = Some((name.to_owned(), secret.to_owned()));
        }
    }
    for account in &accounts {
        ensure!(
            !account.user.is_empty() && account.user.bytes().all(|b| b.is_ascii_graphic()),
            "{:?} is not a plain login name",
            account.user
        );
        // Printable ASCII: fits an IMAP quoted string (RFC 9051 §4.3) and a POP3 argument.
        ensure!(
            !account.pass.is_empty() && account.pass.bytes().all(|b| (b' '..=b'~').contains(&b)),
            "the password of {} must be non-empty printable ASCII",
            account.user
        );
    }
    Ok(accounts)
}

/// How many sessions of which protocol.
struct SessionShape {
    protocol: Protocol,
    target: String,
    sessions: u64,
    concurrency: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Imap,
    Pop3,
}

impl Protocol {
    fn mode(self) -> &'static str {
        match self {
            Self::Imap => "imap",
            Self::Pop3 => "pop3",
        }
    }
}

/// What every worker of a session run shares.
struct SessionPlan {
    protocol: Protocol,
    addr: SocketAddr,
    accounts: Vec<Account>,
    sessions: u64,
    /// Sessions claimed so far, by all workers.
    next: AtomicU64,
    /// No session is started after this.
    deadline: Instant,
    reply_timeout: Duration,
}

impl SessionPlan {
    /// The number of the next session, or `None` when the run is over.
    fn claim(&self) -> Option<u64> {
        if Instant::now() >= self.deadline {
            return None;
        }
        let k = self.next.fetch_add(1, Ordering::Relaxed);
        (k < self.sessions).then_some(k)
    }

    /// Session `k` logs in as the accounts in turn, so that two sessions share an account only
    /// when there are more sessions at once than accounts (POP3 locks the maildrop).
    fn account(&self, k: u64) -> Option<&Account> {
        let n = self.accounts.len() as u64;
        self.accounts.get(usize::try_from(k % n).ok()?)
    }
}

/// What one session read.
#[derive(Debug, Default, PartialEq, Eq)]
struct Fetched {
    messages: u64,
    /// Message bytes: IMAP `BODY[]` literals; POP3 `RETR` lines with dot-stuffing undone and
    /// their CRLF.
    bytes: u64,
}

/// What the sessions of one worker (or, merged, of the run) counted.
#[derive(Default)]
struct SessionTally {
    ok: u64,
    failed: u64,
    messages: u64,
    bytes: u64,
    /// Connect to the reply to LOGOUT/QUIT, for each session that succeeded.
    session_us: Vec<u32>,
    faults: FaultLog,
}

impl SessionTally {
    fn merge(&mut self, other: Self) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.messages += other.messages;
        self.bytes += other.bytes;
        self.session_us.extend(other.session_us);
        self.faults.merge(other.faults);
    }
}

async fn run_sessions(
    shape: &SessionShape,
    login: &LoginArgs,
    run: &RunArgs,
) -> anyhow::Result<SessionReport> {
    check_run_args(run)?;
    let addr = resolve_target(&shape.target, run.allow_remote).await?;
    let accounts = load_accounts(login)?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(run.max_seconds);
    let reply_timeout = Duration::from_secs_f64(run.reply_timeout);
    // A session started before the deadline may finish; this cuts it off if the server stalls.
    let hard_deadline = deadline + reply_timeout * 4 + CONNECT_TIMEOUT;
    let plan = Arc::new(SessionPlan {
        protocol: shape.protocol,
        addr,
        accounts,
        sessions: shape.sessions,
        next: AtomicU64::new(0),
        deadline,
        reply_timeout,
    });
    let mut tasks = Vec::new();
    for _ in 0..shape.concurrency.min(shape.sessions) {
        let plan = Arc::clone(&plan);
        tasks.push(tokio::spawn(async move {
            let mut tally = SessionTally::default();
            while let Some(k) = plan.claim() {
                let Some(account) = plan.account(k) else {
                    break;
                };
                let started = Instant::now();
                let session = async {
                    match plan.protocol {
                        Protocol::Imap => imap_session(&plan, account).await,
                        Protocol::Pop3 => pop3_session(&plan, account).await,
                    }
                };
                match tokio::time::timeout_at(hard_deadline, session).await {
                    Ok(Ok(fetched)) => {
                        tally.ok += 1;
                        tally.messages += fetched.messages;
                        tally.bytes += fetched.bytes;
                        tally.session_us.push(micros(started.elapsed()));
                    }
                    Ok(Err(fault)) => {
                        tally.failed += 1;
                        tally.faults.add(&fault);
                    }
                    Err(_) => {
                        tally.failed += 1;
                        tally.faults.add(&Fault::Timeout("session"));
                    }
                }
            }
            tally
        }));
    }
    let mut total = SessionTally::default();
    for task in tasks {
        match task.await {
            Ok(tally) => total.merge(tally),
            Err(_) => total.faults.add(&Fault::Protocol("worker panicked")),
        }
    }
    let wall = start.elapsed();
    Ok(SessionReport::new(shape, &plan, total, wall))
}

#[derive(Serialize)]
struct SessionReport {
    mode: &'static str,
    target: String,
    sessions_requested: u64,
    concurrency: u64,
    users: usize,
    sessions_ok: u64,
    sessions_failed: u64,
    messages_fetched: u64,
    bytes_fetched: u64,
    seconds: f64,
    sessions_per_s: f64,
    /// Message bytes fetched per second, in MB (10^6 bytes).
    mb_per_s: f64,
    msgs_per_s: f64,
    session_ms_p50: Option<f64>,
    session_ms_p99: Option<f64>,
    session_ms_max: Option<f64>,
    errors: BTreeMap<String, u64>,
    first_error: Option<String>,
    /// True when `--max-seconds` ended the run before `--sessions` were started.
    stopped_by_time: bool,
    client_cpu_s: Option<f64>,
}

impl SessionReport {
    fn new(
        shape: &SessionShape,
        plan: &SessionPlan,
        mut tally: SessionTally,
        wall: Duration,
    ) -> Self {
        tally.session_us.sort_unstable();
        let ms = |p| percentile(&tally.session_us, p).map(|us| round3(f64::from(us) / 1e3));
        let secs = wall.as_secs_f64();
        let started = tally.ok + tally.failed;
        Self {
            mode: shape.protocol.mode(),
            target: shape.target.clone(),
            sessions_requested: shape.sessions,
            concurrency: shape.concurrency,
            users: plan.accounts.len(),
            sessions_ok: tally.ok,
            sessions_failed: tally.failed,
            messages_fetched: tally.messages,
            bytes_fetched: tally.bytes,
            seconds: round3(secs),
            sessions_per_s: round1(tally.ok as f64 / secs),
            mb_per_s: round3(tally.bytes as f64 / 1e6 / secs),
            msgs_per_s: round1(tally.messages as f64 / secs),
            session_ms_p50: ms(0.50),
            session_ms_p99: ms(0.99),
            session_ms_max: ms(1.0),
            stopped_by_time: started < shape.sessions,
            errors: tally.faults.counts,
            first_error: tally.faults.first,
            client_cpu_s: process_cpu_seconds(),
        }
    }

    fn print_text(&self) {
        println!(
            "{} {}: {} sessions, {} at once, {} users",
            self.mode, self.target, self.sessions_requested, self.concurrency, self.users
        );
        println!(
            "sessions   {} ok, {} failed{}",
            self.sessions_ok,
            self.sessions_failed,
            if self.stopped_by_time {
                "; stopped by --max-seconds"
            } else {
                ""
            }
        );
        println!(
            "fetched    {} messages, {} bytes",
            self.messages_fetched, self.bytes_fetched
        );
        println!(
            "rate       {} sessions/s, {} MB/s, {} msg/s",
            self.sessions_per_s, self.mb_per_s, self.msgs_per_s
        );
        println!(
            "session    p50 {} ms, p99 {} ms, max {} ms (connect to the last reply)",
            fmt_opt(self.session_ms_p50),
            fmt_opt(self.session_ms_p99),
            fmt_opt(self.session_ms_max)
        );
        print_errors(&self.errors, self.first_error.as_deref());
        println!(
            "wall       {} s; client CPU {} s",
            self.seconds,
            fmt_opt(self.client_cpu_s)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// IMAP client

/// One IMAP session: LOGIN, SELECT INBOX, the UIDs and sizes of all messages, each message's
/// text, LOGOUT.
async fn imap_session(plan: &SessionPlan, account: &Account) -> Result<Fetched, Fault> {
    let mut conn = ImapConn::connect(plan.addr, plan.reply_timeout).await?;
    conn.login(account).await?;
    let mut exists = None;
    conn.command("SELECT", "SELECT INBOX", |r| {
        exists = r.exists().or(exists);
        Ok(())
    })
    .await?;
    // `1:*` is not a valid set in an empty mailbox for some servers.
    let mut messages = Vec::new();
    if exists != Some(0) {
        conn.command("FETCH", "FETCH 1:* (FLAGS UID RFC822.SIZE)", |r| {
            if let Some(items) = parse_fetch(r).map_err(Fault::Protocol)? {
                let uid = items.uid.ok_or(Fault::Protocol("FETCH without UID"))?;
                messages.push((uid, items.rfc822_size));
            }
            Ok(())
        })
        .await?;
    }
    let mut fetched = Fetched::default();
    for (uid, size) in messages {
        let mut body = None;
        conn.command(
            "UID FETCH",
            &format!("UID FETCH {uid} (BODY.PEEK[])"),
            |r| {
                if let Some(items) = parse_fetch(r).map_err(Fault::Protocol)?
                    && items.uid == Some(uid)
                    && items.body_len.is_some()
                {
                    body = items.body_len;
                }
                Ok(())
            },
        )
        .await?;
        let len = body.ok_or(Fault::Protocol("UID FETCH returned no BODY[]"))?;
        // RFC 9051 §7.5.2: RFC822.SIZE is the number of octets of the message.
        if size.is_some_and(|size| size != len as u64) {
            return Err(Fault::Protocol("BODY[] length differs from RFC822.SIZE"));
        }
        fetched.messages += 1;
        fetched.bytes += len as u64;
    }
    conn.logout().await?;
    Ok(fetched)
}

/// `imap --noop`: round trips of NOOP on one logged-in connection.
async fn run_noops(args: &ImapArgs, noops: u64) -> anyhow::Result<NoopReport> {
    check_run_args(&args.run)?;
    let addr = resolve_target(&args.target, args.run.allow_remote).await?;
    let accounts = load_accounts(&args.login)?;
    let account = accounts.first().context("no accounts")?;
    let reply_timeout = Duration::from_secs_f64(args.run.reply_timeout);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.run.max_seconds);
    let mut faults = FaultLog::default();
    let mut rtt_us = Vec::new();
    let mut failed = 0;
    let mut measured_from = start;
    match ImapConn::connect(addr, reply_timeout).await {
        Err(fault) => faults.add(&fault),
        Ok(mut conn) => {
            let login = conn.login(account).await;
            if let Err(fault) = login {
                faults.add(&fault);
            } else {
                for n in 0..NOOP_WARMUP + noops {
                    if n == NOOP_WARMUP {
                        measured_from = Instant::now();
                    }
                    if Instant::now() >= deadline {
                        break;
                    }
                    let t0 = Instant::now();
                    match conn.command("NOOP", "NOOP", |_| Ok(())).await {
                        Ok(()) if n >= NOOP_WARMUP => rtt_us.push(micros(t0.elapsed())),
                        Ok(()) => {}
                        // NO or BAD: the connection is still good.
                        Err(fault @ Fault::Status { .. }) if fault.key() != "NOOP BYE" => {
                            failed += 1;
                            faults.add(&fault);
                        }
                        Err(fault) => {
                            failed += 1;
                            faults.add(&fault);
                            break;
                        }
                    }
                }
                let _ = conn.logout().await;
            }
        }
    }
    let secs = measured_from.elapsed().as_secs_f64();
    let ok = rtt_us.len() as u64;
    rtt_us.sort_unstable();
    let us = |p| percentile(&rtt_us, p);
    Ok(NoopReport {
        mode: "imap_noop",
        target: args.target.clone(),
        user: account.user.clone(),
        warmup: NOOP_WARMUP,
        noops_requested: noops,
        noops_ok: ok,
        noops_failed: failed,
        seconds: round3(secs),
        noops_per_s: round1(ok as f64 / secs),
        rtt_us_p50: us(0.50),
        rtt_us_p90: us(0.90),
        rtt_us_p99: us(0.99),
        rtt_us_max: us(1.0),
        stopped_by_time: ok + failed < noops && Instant::now() >= deadline,
        errors: faults.counts,
        first_error: faults.first,
        client_cpu_s: process_cpu_seconds(),
    })
}

#[derive(Serialize)]
struct NoopReport {
    mode: &'static str,
    target: String,
    user: String,
    /// NOOPs sent first and not measured.
    warmup: u64,
    noops_requested: u64,
    noops_ok: u64,
    noops_failed: u64,
    /// The measured NOOPs, back to back.
    seconds: f64,
    noops_per_s: f64,
    rtt_us_p50: Option<u32>,
    rtt_us_p90: Option<u32>,
    rtt_us_p99: Option<u32>,
    rtt_us_max: Option<u32>,
    stopped_by_time: bool,
    errors: BTreeMap<String, u64>,
    first_error: Option<String>,
    client_cpu_s: Option<f64>,
}

impl NoopReport {
    fn print_text(&self) {
        let us = |v: Option<u32>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
        println!(
            "imap NOOP {} as {}: {} NOOPs after {} warm-up",
            self.target, self.user, self.noops_requested, self.warmup
        );
        println!(
            "noops      {} ok, {} failed{}",
            self.noops_ok,
            self.noops_failed,
            if self.stopped_by_time {
                "; stopped by --max-seconds"
            } else {
                ""
            }
        );
        println!("rate       {} NOOP/s", self.noops_per_s);
        println!(
            "round trip p50 {} µs, p90 {} µs, p99 {} µs, max {} µs",
            us(self.rtt_us_p50),
            us(self.rtt_us_p90),
            us(self.rtt_us_p99),
            us(self.rtt_us_max)
        );
        print_errors(&self.errors, self.first_error.as_deref());
        println!(
            "wall       {} s; client CPU {} s",
            self.seconds,
            fmt_opt(self.client_cpu_s)
        );
    }
}

/// An IMAP connection after the greeting.
struct ImapConn {
    reader: ReadHalf,
    writer: WriteHalf,
    /// Bytes read and not yet taken by a response.
    buf: Vec<u8>,
    /// The number of the last tag used.
    tag: u32,
    reply_timeout: Duration,
}

impl ImapConn {
    /// Connects and reads the greeting (RFC 9051 §7.1.1: `* OK`, `* PREAUTH` or `* BYE`).
    async fn connect(addr: SocketAddr, reply_timeout: Duration) -> Result<Self, Fault> {
        let (reader, writer) = connect_tcp(addr).await?;
        let mut conn = Self::new(reader, writer, reply_timeout);
        let greeting = conn.read_response().await?;
        match greeting.word(1) {
            Some(b"OK" | b"PREAUTH") if greeting.word(0) == Some(b"*") => Ok(conn),
            _ => Err(greeting.fault("greeting")),
        }
    }

    fn new(reader: ReadHalf, writer: WriteHalf, reply_timeout: Duration) -> Self {
        Self {
            reader,
            writer,
            buf: Vec::with_capacity(READ_CHUNK),
            tag: 0,
            reply_timeout,
        }
    }

    async fn login(&mut self, account: &Account) -> Result<(), Fault> {
        if let Some(ir) = account.master_plain() {
            let command = format!("AUTHENTICATE PLAIN {ir}");
            return self.command("AUTHENTICATE", &command, |_| Ok(())).await;
        }
        let command = format!(
            "LOGIN {} {}",
            imap_quoted(&account.user),
            imap_quoted(&account.pass)
        );
        self.command("LOGIN", &command, |_| Ok(())).await
    }

    /// Sends `command` and reads the responses up to its tagged one, handing each untagged
    /// one to `untagged`. Fails unless the tagged status is `OK`.
    async fn command(
        &mut self,
        phase: &'static str,
        command: &str,
        mut untagged: impl FnMut(&ImapResponse) -> Result<(), Fault>,
    ) -> Result<(), Fault> {
        let tag = self.send(command).await?;
        loop {
            let response = self.read_response().await?;
            match response.word(0) {
                Some(t) if t == tag.as_bytes() => {
                    return if response.word(1) == Some(b"OK") {
                        Ok(())
                    } else {
                        Err(response.fault(phase))
                    };
                }
                Some(b"*") if response.word(1) == Some(b"BYE") => {
                    return Err(response.fault(phase));
                }
                Some(b"*") => untagged(&response)?,
                Some(b"+") => return Err(Fault::Protocol("unexpected continuation")),
                _ => return Err(Fault::Protocol("response with an unknown tag")),
            }
        }
    }

    /// LOGOUT: the server says `* BYE`, then `OK` (RFC 9051 §6.1.3), and closes.
    async fn logout(&mut self) -> Result<(), Fault> {
        let tag = self.send("LOGOUT").await?;
        let mut bye = false;
        loop {
            let response = match self.read_response().await {
                Ok(response) => response,
                // Closed right after the BYE: good enough.
                Err(Fault::Protocol("connection closed")) if bye => return Ok(()),
                Err(fault) => return Err(fault),
            };
            match response.word(0) {
                Some(t) if t == tag.as_bytes() => {
                    return if response.word(1) == Some(b"OK") {
                        Ok(())
                    } else {
                        Err(response.fault("LOGOUT"))
                    };
                }
                Some(b"*") => bye |= response.word(1) == Some(b"BYE"),
                _ => return Err(Fault::Protocol("response with an unknown tag")),
            }
        }
    }

    /// Writes `TAG command` CRLF; returns the tag.
    async fn send(&mut self, command: &str) -> Result<String, Fault> {
        self.tag += 1;
        let tag = format!("a{}", self.tag);
        self.write_line(&format!("{tag} {command}")).await?;
        Ok(tag)
    }

    async fn write_line(&mut self, line: &str) -> Result<(), Fault> {
        let mut out = Vec::with_capacity(line.len() + 2);
        push_line(&mut out, line);
        let write = async {
            self.writer.write_all(&out).await?;
            self.writer.flush().await
        };
        tokio::time::timeout(self.reply_timeout, write)
            .await
            .map_err(|_| Fault::Timeout("write"))?
            .map_err(Fault::Io)
    }

    /// Reads one whole response, its literals included; each read waits at most the reply
    /// timeout.
    async fn read_response(&mut self) -> Result<ImapResponse, Fault> {
        loop {
            if let Some((response, used)) =
                parse_imap_response(&self.buf).map_err(Fault::Protocol)?
            {
                self.buf.drain(..used);
                return Ok(response);
            }
            self.buf.reserve(READ_CHUNK);
            let read = self.reader.read_buf(&mut self.buf);
            let n = tokio::time::timeout(self.reply_timeout, read)
                .await
                .map_err(|_| Fault::Timeout("reply"))?
                .map_err(Fault::Io)?;
            if n == 0 {
                return Err(Fault::Protocol("connection closed"));
            }
        }
    }
}

/// An IMAP quoted string (RFC 9051 §4.3): `"`, with `\` before `"` and `\`.
fn imap_quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// One server response: its text and, in order, the literals within it. A literal's `{n}`
/// marker is not kept in the text before it.
#[derive(Debug, PartialEq, Eq)]
struct ImapResponse {
    parts: Vec<ImapPart>,
}

#[derive(Debug, PartialEq, Eq)]
enum ImapPart {
    Text(Vec<u8>),
    Literal(Vec<u8>),
}

impl ImapResponse {
    /// The text up to the first literal (the whole response line if there is none).
    fn head(&self) -> &[u8] {
        match self.parts.first() {
            Some(ImapPart::Text(text)) => text,
            _ => &[],
        }
    }

    /// The `i`th space-separated word of the head: 0 is the tag (`*`, `+` or a command's),
    /// 1 the status (`OK`, `NO`, `BAD`, `BYE`) or a number.
    fn word(&self, i: usize) -> Option<&[u8]> {
        self.head().split(|&b| b == b' ').nth(i)
    }

    /// `* n EXISTS` → n.
    fn exists(&self) -> Option<u32> {
        if self.word(0) != Some(b"*") || !self.word(2)?.eq_ignore_ascii_case(b"EXISTS") {
            return None;
        }
        std::str::from_utf8(self.word(1)?).ok()?.parse().ok()
    }

    /// A failed command's fault: its status and the server's text (at most 200 bytes).
    fn fault(&self, phase: &'static str) -> Fault {
        let head = self.head();
        let status = self.word(1).unwrap_or_default();
        let text = head.splitn(3, |&b| b == b' ').nth(2).unwrap_or_default();
        let text = text.get(..200).unwrap_or(text);
        Fault::Status {
            phase,
            status: String::from_utf8_lossy(status).into_owned(),
            text: String::from_utf8_lossy(text).into_owned(),
        }
    }
}

/// Frames one server response (RFC 9051 §2.2.2, §4.3): a line and, when it ends in a literal
/// `{n}` (also `{n+}` and RFC 3516's `~{n}`), the n octets after its CRLF and then the rest
/// of the response, which may hold more literals. Literal data is taken by its length and
/// never searched for line ends. Returns the response and the bytes it took, or `None` until
/// `buf` holds all of it.
fn parse_imap_response(buf: &[u8]) -> Result<Option<(ImapResponse, usize)>, &'static str> {
    let mut parts = Vec::new();
    let mut pos = 0;
    loop {
        let rest = buf.get(pos..).unwrap_or_default();
        let Some(nl) = rest
            .iter()
            .take(MAX_SERVER_LINE + 1)
            .position(|&b| b == b'\n')
        else {
            return if rest.len() > MAX_SERVER_LINE {
                Err("response line too long")
            } else {
                Ok(None)
            };
        };
        let line = rest.get(..nl).unwrap_or_default();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let after_line = pos + nl + 1;
        let Some((text, len)) = literal_suffix(line)? else {
            parts.push(ImapPart::Text(line.to_vec()));
            return Ok(Some((ImapResponse { parts }, after_line)));
        };
        if len > MAX_LITERAL {
            return Err("literal too large");
        }
        let Some(data) = buf.get(after_line..after_line + len) else {
            return Ok(None);
        };
        parts.push(ImapPart::Text(text.to_vec()));
        parts.push(ImapPart::Literal(data.to_vec()));
        pos = after_line + len;
    }
}

/// `text {12}` → (`text `, 12); also `{12+}` and `~{12}`. `None` when the line does not end
/// in a literal marker.
fn literal_suffix(line: &[u8]) -> Result<Option<(&[u8], usize)>, &'static str> {
    let Some(inner) = line.strip_suffix(b"}") else {
        return Ok(None);
    };
    let Some(open) = inner.iter().rposition(|&b| b == b'{') else {
        return Ok(None);
    };
    let (text, marker) = inner.split_at(open);
    let digits = marker.get(1..).unwrap_or_default();
    let digits = digits.strip_suffix(b"+").unwrap_or(digits);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Ok(None);
    }
    let len = std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse::<usize>().ok())
        .ok_or("literal too large")?;
    let text = text.strip_suffix(b"~").unwrap_or(text);
    Ok(Some((text, len)))
}

/// What a `FETCH` response says about one message.
#[derive(Debug, Default, PartialEq, Eq)]
struct FetchItems {
    seq: u32,
    uid: Option<u32>,
    rfc822_size: Option<u64>,
    /// The length of `BODY[…]`'s string or literal (not NIL).
    body_len: Option<usize>,
}

/// `* n FETCH (name value …)` (RFC 9051 §7.5.2) → its items; `None` for other responses.
fn parse_fetch(response: &ImapResponse) -> Result<Option<FetchItems>, &'static str> {
    if response.word(0) != Some(b"*")
        || !response
            .word(2)
            .is_some_and(|w| w.eq_ignore_ascii_case(b"FETCH"))
    {
        return Ok(None);
    }
    let tokens = tokenize(response)?;
    let mut tokens = tokens.iter();
    let bad = "malformed FETCH response";
    let seq = match (tokens.next(), tokens.next(), tokens.next(), tokens.next()) {
        (Some(Token::Atom(_)), Some(Token::Atom(n)), Some(Token::Atom(_)), Some(Token::Open)) => {
            parse_number(n).ok_or(bad)?
        }
        _ => return Err(bad),
    };
    let mut items = FetchItems {
        seq: u32::try_from(seq).map_err(|_| bad)?,
        ..FetchItems::default()
    };
    loop {
        let name = match tokens.next() {
            Some(Token::Close) => return Ok(Some(items)),
            Some(Token::Atom(name)) => name,
            _ => return Err(bad),
        };
        let value = tokens.next().ok_or(bad)?;
        match value {
            Token::Atom(v) if name.eq_ignore_ascii_case(b"UID") => {
                items.uid = Some(u32::try_from(parse_number(v).ok_or(bad)?).map_err(|_| bad)?);
            }
            Token::Atom(v) if name.eq_ignore_ascii_case(b"RFC822.SIZE") => {
                items.rfc822_size = Some(parse_number(v).ok_or(bad)?);
            }
            Token::Str(s) if starts_with_ignore_case(name, b"BODY[") => {
                items.body_len = Some(s.len());
            }
            Token::Open => skip_list(&mut tokens).ok_or(bad)?,
            Token::Close => return Err(bad),
            Token::Atom(_) | Token::Str(_) => {}
        }
    }
}

/// A token of a response: parentheses, an atom (with any `[…]` section in it, spaces
/// included, as in `BODY[HEADER.FIELDS (TO)]`), or a string (quoted or literal).
#[derive(Debug, PartialEq, Eq)]
enum Token<'a> {
    Open,
    Close,
    Atom(&'a [u8]),
    Str(std::borrow::Cow<'a, [u8]>),
}

fn tokenize(response: &ImapResponse) -> Result<Vec<Token<'_>>, &'static str> {
    let mut tokens = Vec::new();
    for part in &response.parts {
        match part {
            ImapPart::Text(text) => tokenize_text(text, &mut tokens)?,
            ImapPart::Literal(data) => tokens.push(Token::Str(std::borrow::Cow::Borrowed(data))),
        }
    }
    Ok(tokens)
}

fn tokenize_text<'a>(text: &'a [u8], tokens: &mut Vec<Token<'a>>) -> Result<(), &'static str> {
    let mut i = 0;
    while let Some(&b) = text.get(i) {
        match b {
            b' ' => i += 1,
            b'(' => {
                tokens.push(Token::Open);
                i += 1;
            }
            b')' => {
                tokens.push(Token::Close);
                i += 1;
            }
            b'"' => {
                let mut s = Vec::new();
                i += 1;
                loop {
                    match text.get(i) {
                        None => return Err("unterminated quoted string"),
                        Some(b'"') => break,
                        Some(b'\\') => {
                            s.push(*text.get(i + 1).ok_or("unterminated quoted string")?);
                            i += 2;
                        }
                        Some(&c) => {
                            s.push(c);
                            i += 1;
                        }
                    }
                }
                i += 1;
                tokens.push(Token::Str(std::borrow::Cow::Owned(s)));
            }
            _ => {
                let start = i;
                let mut depth = 0u32;
                while let Some(&c) = text.get(i) {
                    match c {
                        b'[' => depth += 1,
                        b']' => depth = depth.saturating_sub(1),
                        b' ' | b'(' | b')' if depth == 0 => break,
                        _ => {}
                    }
                    i += 1;
                }
                tokens.push(Token::Atom(text.get(start..i).unwrap_or_default()));
            }
        }
    }
    Ok(())
}

/// Skips the rest of a parenthesized list whose `(` was just taken, nested lists included.
fn skip_list<'t>(tokens: &mut impl Iterator<Item = &'t Token<'t>>) -> Option<()> {
    let mut depth = 1u32;
    while depth > 0 {
        match tokens.next()? {
            Token::Open => depth += 1,
            Token::Close => depth -= 1,
            Token::Atom(_) | Token::Str(_) => {}
        }
    }
    Some(())
}

fn parse_number(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

fn starts_with_ignore_case(s: &[u8], prefix: &[u8]) -> bool {
    s.get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
}

// ---------------------------------------------------------------------------------------------
// POP3 client

/// One POP3 session (RFC 1939): USER, PASS, STAT, UIDL, RETR of every message, QUIT.
async fn pop3_session(plan: &SessionPlan, account: &Account) -> Result<Fetched, Fault> {
    let (reader, writer) = connect_tcp(plan.addr).await?;
    let mut conn = Pop3Conn::new(reader, writer, plan.reply_timeout);
    conn.read_status("greeting").await?;
    if let Some(ir) = account.master_plain() {
        conn.command("AUTH", &format!("AUTH PLAIN {ir}")).await?;
    } else {
        conn.command("USER", &format!("USER {}", account.user))
            .await?;
        conn.command("PASS", &format!("PASS {}", account.pass))
            .await?;
    }
    let stat = conn.command("STAT", "STAT").await?;
    // `+OK nn mm`: messages and octets.
    let count = stat
        .split(|&b| b == b' ')
        .next()
        .and_then(parse_number)
        .ok_or(Fault::Protocol("malformed STAT reply"))?;
    let mut numbers = Vec::new();
    match conn.command("UIDL", "UIDL").await {
        Ok(_) => {
            conn.read_multiline(|line| {
                if let Some(n) = line.split(|&b| b == b' ').next().and_then(parse_number) {
                    numbers.push(n);
                }
            })
            .await?;
        }
        // UIDL is optional (RFC 1939 §7): then every number up to STAT's count.
        Err(Fault::Status { .. }) => numbers = (1..=count).collect(),
        Err(fault) => return Err(fault),
    }
    let mut fetched = Fetched::default();
    for n in numbers {
        conn.command("RETR", &format!("RETR {n}")).await?;
        fetched.bytes += conn.read_multiline(|_| {}).await?;
        fetched.messages += 1;
    }
    conn.command("QUIT", "QUIT").await?;
    Ok(fetched)
}

/// A POP3 connection.
struct Pop3Conn {
    reader: BufReader<ReadHalf>,
    writer: WriteHalf,
    line: Vec<u8>,
    reply_timeout: Duration,
}

impl Pop3Conn {
    fn new(reader: ReadHalf, writer: WriteHalf, reply_timeout: Duration) -> Self {
        Self {
            reader: BufReader::with_capacity(READ_CHUNK, reader),
            writer,
            line: Vec::with_capacity(1024),
            reply_timeout,
        }
    }

    /// Sends a command and reads its status line; returns the text after `+OK `.
    async fn command(&mut self, phase: &'static str, command: &str) -> Result<Vec<u8>, Fault> {
        let mut out = Vec::with_capacity(command.len() + 2);
        push_line(&mut out, command);
        let write = async {
            self.writer.write_all(&out).await?;
            self.writer.flush().await
        };
        tokio::time::timeout(self.reply_timeout, write)
            .await
            .map_err(|_| Fault::Timeout("write"))?
            .map_err(Fault::Io)?;
        self.read_status(phase).await
    }

    /// Reads a status line: `+OK text` → text; `-ERR text` → a fault.
    async fn read_status(&mut self, phase: &'static str) -> Result<Vec<u8>, Fault> {
        let line = self.read_line().await?;
        match pop3_status(line) {
            Ok(text) => Ok(text.to_vec()),
            Err(text) => Err(Fault::Status {
                phase,
                status: "-ERR".to_owned(),
                text: String::from_utf8_lossy(text.get(..200).unwrap_or(text)).into_owned(),
            }),
        }
    }

    /// Reads the lines of a multi-line response up to the `.` line (RFC 1939 §3), hands each
    /// to `each` with the dot-stuffing undone, and returns their bytes with a CRLF each.
    async fn read_multiline(&mut self, mut each: impl FnMut(&[u8])) -> Result<u64, Fault> {
        let mut bytes = 0;
        loop {
            let line = self.read_line().await?;
            match pop3_data_line(line) {
                None => return Ok(bytes),
                Some(data) => {
                    bytes += data.len() as u64 + 2;
                    each(data);
                }
            }
        }
    }

    /// Reads one line; returns it without its CRLF (or bare LF).
    async fn read_line(&mut self) -> Result<&[u8], Fault> {
        self.line.clear();
        let mut bounded = (&mut self.reader).take(MAX_SERVER_LINE as u64);
        let read = bounded.read_until(b'\n', &mut self.line);
        let n = tokio::time::timeout(self.reply_timeout, read)
            .await
            .map_err(|_| Fault::Timeout("reply"))?
            .map_err(Fault::Io)?;
        if n == 0 {
            return Err(Fault::Protocol("connection closed"));
        }
        let Some(line) = self.line.strip_suffix(b"\n") else {
            return Err(if n == MAX_SERVER_LINE {
                Fault::Protocol("line too long")
            } else {
                Fault::Protocol("connection closed")
            });
        };
        Ok(line.strip_suffix(b"\r").unwrap_or(line))
    }
}

/// `+OK text` → `Ok(text)`; anything else (`-ERR text`) → `Err` with the text after `-ERR`.
fn pop3_status(line: &[u8]) -> Result<&[u8], &[u8]> {
    match line.strip_prefix(b"+OK") {
        Some(rest) => Ok(rest.strip_prefix(b" ").unwrap_or(rest)),
        None => {
            let rest = line.strip_prefix(b"-ERR").unwrap_or(line);
            Err(rest.strip_prefix(b" ").unwrap_or(rest))
        }
    }
}

/// One line of a multi-line response, CRLF removed: `None` for the final `.`, else the line
/// with a leading dot removed (RFC 1939 §3: the server adds one to lines that start with it).
fn pop3_data_line(line: &[u8]) -> Option<&[u8]> {
    if line == b"." {
        return None;
    }
    Some(line.strip_prefix(b".").unwrap_or(line))
}

// ---------------------------------------------------------------------------------------------
// IDLE connections and server memory

#[derive(Args)]
struct IdleArgs {
    /// The IMAP server, HOST:PORT.
    target: String,
    /// Connections to open and keep in IDLE.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    conns: u64,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    ramp: u64,
    /// A server process whose memory is measured, with all its descendants (repeatable).
    #[arg(long = "pid", value_name = "PID", value_parser = clap::value_parser!(u32).range(1..))]
    pids: Vec<u32>,
    /// SELECT INBOX before IDLE, as a mail client does (default: IDLE right after LOGIN).
    #[arg(long)]
    select: bool,
    #[command(flatten)]
    login: LoginArgs,
    #[command(flatten)]
    run: RunArgs,
}

/// Descriptors this process needs besides its connections (runtime, stdio, /proc reads).
const SPARE_FILES: u64 = 64;

fn idle_main(args: IdleArgs) -> anyhow::Result<ExitCode> {
    let report = runtime()?.block_on(run_idle(&args))?;
    if args.run.json {
        print_json(&report)?;
    } else {
        report.print_text();
    }
    Ok(exit_code(report.idling > 0))
}

async fn run_idle(args: &IdleArgs) -> anyhow::Result<IdleReport> {
    check_run_args(&args.run)?;
    let addr = resolve_target(&args.target, args.run.allow_remote).await?;
    let accounts = Arc::new(load_accounts(&args.login)?);
    // mailbench cannot raise RLIMIT_NOFILE itself (no unsafe code here, and neither libc nor
    // rlimit is a dependency). It opens only as many connections as the soft limit allows,
    // keeping some descriptors for reading /proc after them, and says how to allow more.
    let nofile = nofile_limits();
    let mut conns = args.conns;
    if let Some((soft, hard)) = nofile
        && args.conns + SPARE_FILES > soft
    {
        conns = soft.saturating_sub(SPARE_FILES);
        let needed = args.conns + SPARE_FILES;
        let advice = match hard {
            Some(hard) if hard < needed => {
                format!("the hard limit is {hard}: raise it (as root) or ask for fewer connections")
            }
            _ => format!("run `ulimit -n {needed}` first"),
        };
        eprintln!(
            "mailbench: warning: --conns {} needs about {needed} open files, but the soft limit \
             is {soft}; opening {conns}; {advice}",
            args.conns
        );
    }
    let before = measure_trees(&args.pids).await?;

    let reply_timeout = Duration::from_secs_f64(args.run.reply_timeout);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.run.max_seconds);
    let open_deadline = deadline + reply_timeout * 4 + CONNECT_TIMEOUT;
    let ramp = Arc::new(tokio::sync::Semaphore::new(usize::try_from(args.ramp)?));
    let mut opening = tokio::task::JoinSet::new();
    let mut started = 0;
    for k in 0..conns {
        if Instant::now() >= deadline {
            break;
        }
        let Ok(permit) = Arc::clone(&ramp).acquire_owned().await else {
            break;
        };
        let accounts = Arc::clone(&accounts);
        let select = args.select;
        opening.spawn(async move {
            let _permit = permit;
            let n = accounts.len() as u64;
            let Some(account) = usize::try_from(k % n).ok().and_then(|i| accounts.get(i)) else {
                return Err(Fault::Protocol("no account"));
            };
            let open = open_idle(addr, account, reply_timeout, select);
            tokio::time::timeout_at(open_deadline, open)
                .await
                .unwrap_or(Err(Fault::Timeout("open")))
        });
        started += 1;
    }
    let mut idling = Vec::new();
    let mut faults = FaultLog::default();
    while let Some(joined) = opening.join_next().await {
        match joined {
            Ok(Ok(conn)) => idling.push(conn),
            Ok(Err(fault)) => faults.add(&fault),
            Err(_) => faults.add(&Fault::Protocol("task panicked")),
        }
    }
    let ramp_s = start.elapsed().as_secs_f64();
    let after = measure_trees(&args.pids).await?;
    let idle_count = idling.len() as u64;

    // DONE and LOGOUT on every connection, `--ramp` at a time.
    let mut closing = tokio::task::JoinSet::new();
    for (conn, tag) in idling {
        let Ok(permit) = Arc::clone(&ramp).acquire_owned().await else {
            break;
        };
        closing.spawn(async move {
            let _permit = permit;
            close_idle(conn, &tag).await
        });
    }
    let mut closed = 0;
    while let Some(joined) = closing.join_next().await {
        if matches!(joined, Ok(Ok(()))) {
            closed += 1;
        }
    }

    let trees = before
        .into_iter()
        .zip(after)
        .map(|((pid, before), (_, after))| TreeReport::new(pid, &before, &after, idle_count))
        .collect();
    Ok(IdleReport {
        mode: "idle",
        target: args.target.clone(),
        conns_requested: args.conns,
        ramp: args.ramp,
        select: args.select,
        users: accounts.len(),
        conns_started: started,
        idling: idle_count,
        failed: started - idle_count,
        ramp_s: round3(ramp_s),
        logins_per_s: round1(idle_count as f64 / ramp_s),
        trees,
        closed,
        nofile_capped: conns < args.conns,
        stopped_by_time: started < conns,
        errors: faults.counts,
        first_error: faults.first,
        nofile_soft: nofile.map(|(soft, _)| soft),
        seconds: round3(start.elapsed().as_secs_f64()),
        client_cpu_s: process_cpu_seconds(),
    })
}

/// Connects, logs in, SELECTs INBOX if asked, and sends IDLE (RFC 2177); returns the
/// connection and IDLE's tag once the server has answered with its `+` continuation.
async fn open_idle(
    addr: SocketAddr,
    account: &Account,
    reply_timeout: Duration,
    select: bool,
) -> Result<(ImapConn, String), Fault> {
    let mut conn = ImapConn::connect(addr, reply_timeout).await?;
    conn.login(account).await?;
    if select {
        conn.command("SELECT", "SELECT INBOX", |_| Ok(())).await?;
    }
    let tag = conn.send("IDLE").await?;
    loop {
        let response = conn.read_response().await?;
        match response.word(0) {
            Some(b"+") => return Ok((conn, tag)),
            Some(t) if t == tag.as_bytes() => return Err(response.fault("IDLE")),
            Some(b"*") if response.word(1) == Some(b"BYE") => return Err(response.fault("IDLE")),
            Some(b"*") => {}
            _ => return Err(Fault::Protocol("response with an unknown tag")),
        }
    }
}

/// Ends IDLE with DONE, waits for its tagged reply (and whatever the server reported while
/// idling), then LOGOUT.
async fn close_idle(mut conn: ImapConn, tag: &str) -> Result<(), Fault> {
    conn.write_line("DONE").await?;
    loop {
        let response = conn.read_response().await?;
        match response.word(0) {
            Some(t) if t == tag.as_bytes() => break,
            Some(b"*") if response.word(1) == Some(b"BYE") => return Err(response.fault("DONE")),
            _ => {}
        }
    }
    conn.logout().await
}

#[derive(Serialize)]
struct IdleReport {
    mode: &'static str,
    target: String,
    conns_requested: u64,
    ramp: u64,
    select: bool,
    users: usize,
    /// Connections attempted before `--max-seconds`.
    conns_started: u64,
    /// Connections that reached IDLE.
    idling: u64,
    failed: u64,
    /// From the first connect until the last connection was idling (or had failed).
    ramp_s: f64,
    logins_per_s: f64,
    trees: Vec<TreeReport>,
    /// Connections that answered DONE and LOGOUT at the end.
    closed: u64,
    /// True when the limit on open files allowed fewer connections than `--conns`.
    nofile_capped: bool,
    stopped_by_time: bool,
    errors: BTreeMap<String, u64>,
    first_error: Option<String>,
    /// This process's soft limit on open files.
    nofile_soft: Option<u64>,
    seconds: f64,
    client_cpu_s: Option<f64>,
}

impl IdleReport {
    fn print_text(&self) {
        println!(
            "idle {}: {} connections, {} at a time, {}{} users",
            self.target,
            self.conns_requested,
            self.ramp,
            if self.select { "SELECT INBOX, " } else { "" },
            self.users
        );
        println!(
            "idling     {} of {} started, {} failed{}{}",
            self.idling,
            self.conns_started,
            self.failed,
            if self.nofile_capped {
                "; fewer connections: the open files limit"
            } else {
                ""
            },
            if self.stopped_by_time {
                "; stopped by --max-seconds"
            } else {
                ""
            }
        );
        println!(
            "ramp       {} s, {} logins/s",
            self.ramp_s, self.logins_per_s
        );
        for t in &self.trees {
            println!(
                "pid {:<6} {} → {} processes; RSS {} → {} KiB ({} KiB/conn); PSS {} → {} KiB \
                 ({} KiB/conn)",
                t.pid,
                t.processes_before,
                t.processes_after,
                t.rss_kib_before,
                t.rss_kib_after,
                fmt_opt(t.rss_kib_per_conn),
                fmt_opt(t.pss_kib_before.map(|v| v as f64)),
                fmt_opt(t.pss_kib_after.map(|v| v as f64)),
                fmt_opt(t.pss_kib_per_conn)
            );
        }
        println!("closed     {} (DONE and LOGOUT answered)", self.closed);
        print_errors(&self.errors, self.first_error.as_deref());
        println!(
            "wall       {} s; client CPU {} s; open files limit {}",
            self.seconds,
            fmt_opt(self.client_cpu_s),
            fmt_opt(self.nofile_soft.map(|v| v as f64))
        );
    }
}

/// One server process tree before and after the connections.
#[derive(Serialize)]
struct TreeReport {
    pid: u32,
    processes_before: u64,
    processes_after: u64,
    rss_kib_before: u64,
    rss_kib_after: u64,
    /// Growth divided by the connections idling.
    rss_kib_per_conn: Option<f64>,
    /// `None` when some process's smaps_rollup could not be read.
    pss_kib_before: Option<u64>,
    pss_kib_after: Option<u64>,
    pss_kib_per_conn: Option<f64>,
}

impl TreeReport {
    fn new(pid: u32, before: &TreeUsage, after: &TreeUsage, conns: u64) -> Self {
        let per_conn =
            |b: u64, a: u64| (conns > 0).then(|| round1((a as f64 - b as f64) / conns as f64));
        Self {
            pid,
            processes_before: before.processes,
            processes_after: after.processes,
            rss_kib_before: before.rss_kib,
            rss_kib_after: after.rss_kib,
            rss_kib_per_conn: per_conn(before.rss_kib, after.rss_kib),
            pss_kib_before: before.pss_kib,
            pss_kib_after: after.pss_kib,
            pss_kib_per_conn: before
                .pss_kib
                .zip(after.pss_kib)
                .and_then(|(b, a)| per_conn(b, a)),
        }
    }
}

/// The memory of a process and all its descendants, in KiB.
#[derive(Debug)]
struct TreeUsage {
    processes: u64,
    /// Sum of `VmRSS` (`/proc/PID/status`): pages shared between the processes count once
    /// per process.
    rss_kib: u64,
    /// Sum of `Pss` (`/proc/PID/smaps_rollup`): shared pages divided among their users.
    pss_kib: Option<u64>,
}

async fn measure_trees(pids: &[u32]) -> anyhow::Result<Vec<(u32, TreeUsage)>> {
    let pids = pids.to_vec();
    tokio::task::spawn_blocking(move || {
        pids.into_iter()
            .map(|pid| {
                measure_tree(pid)
                    .with_context(|| format!("--pid {pid}"))
                    .map(|usage| (pid, usage))
            })
            .collect()
    })
    .await
    .context("the measuring thread failed")?
}

/// Sums the memory of `root` and its descendants (Linux `/proc`; the tree is found by the
/// parent pid in each `/proc/PID/stat`).
fn measure_tree(root: u32) -> anyhow::Result<TreeUsage> {
    let status = fs::read_to_string(format!("/proc/{root}/status"))
        .with_context(|| format!("cannot read /proc/{root}/status"))?;
    let mut parents = Vec::new();
    for entry in fs::read_dir("/proc").context("cannot read /proc")? {
        let Some(pid) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may end between readdir and read.
        if let Some(ppid) = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| parse_ppid(&stat))
        {
            parents.push((pid, ppid));
        }
    }
    let tree = descendants(root, &parents);
    let mut usage = TreeUsage {
        processes: 0,
        rss_kib: 0,
        pss_kib: Some(0),
    };
    for pid in tree {
        let status = if pid == root {
            Some(status.clone())
        } else {
            fs::read_to_string(format!("/proc/{pid}/status")).ok()
        };
        let Some(status) = status else {
            continue;
        };
        usage.processes += 1;
        // Kernel threads have no VmRSS.
        usage.rss_kib += kib_field(&status, "VmRSS:").unwrap_or(0);
        let pss = fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .ok()
            .and_then(|rollup| kib_field(&rollup, "Pss:"));
        usage.pss_kib = usage.pss_kib.zip(pss).map(|(sum, pss)| sum + pss);
    }
    Ok(usage)
}

/// `root` and every process below it, from (pid, parent pid) pairs.
fn descendants(root: u32, parents: &[(u32, u32)]) -> Vec<u32> {
    let mut tree = vec![root];
    let mut i = 0;
    while let Some(&pid) = tree.get(i) {
        for &(child, parent) in parents {
            if parent == pid && !tree.contains(&child) {
                tree.push(child);
            }
        }
        i += 1;
    }
    tree
}

/// The parent pid in `/proc/PID/stat` (proc(5): the fourth field, after the command name,
/// which may hold spaces and parentheses).
fn parse_ppid(stat: &str) -> Option<u32> {
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// `VmRSS:   1234 kB` → 1234, for the line that starts with `name`.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// This process's soft and hard limits on open files (`/proc/self/limits`); `None` for the
/// hard limit means unlimited.
fn nofile_limits() -> Option<(u64, Option<u64>)> {
    let limits = fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut fields = line.strip_prefix("Max open files")?.split_whitespace();
    let soft = fields.next()?.parse().ok()?;
    let hard = fields.next()?.parse().ok();
    Some((soft, hard))
}

// ---------------------------------------------------------------------------------------------
// fsync probe

fn fsync_main(args: &FsyncArgs) -> anyhow::Result<ExitCode> {
    let report = run_fsync(args)?;
    if args.json {
        print_json(&report)?;
    } else {
        report.print_text();
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct FsyncReport {
    workload: &'static str,
    mode: &'static str,
    dir: String,
    threads: u64,
    size: u64,
    ops: u64,
    seconds: f64,
    ops_per_s: f64,
    fsyncs_per_s: f64,
    lat_ms_p50: Option<f64>,
    lat_ms_p99: Option<f64>,
    lat_ms_max: Option<f64>,
}

impl FsyncReport {
    fn print_text(&self) {
        println!(
            "fsync {} ({}): {} threads, {} bytes/file",
            self.dir, self.mode, self.threads, self.size
        );
        println!(
            "rate       {} ops/s, {} fsyncs/s ({} ops in {} s)",
            self.ops_per_s, self.fsyncs_per_s, self.ops, self.seconds
        );
        println!(
            "latency    p50 {} ms, p99 {} ms, max {} ms (one operation)",
            fmt_opt(self.lat_ms_p50),
            fmt_opt(self.lat_ms_p99),
            fmt_opt(self.lat_ms_max)
        );
    }
}

fn run_fsync(args: &FsyncArgs) -> anyhow::Result<FsyncReport> {
    ensure!(
        args.seconds > 0.0 && args.seconds <= 3600.0,
        "--seconds must be in (0, 3600]"
    );
    let threads = usize::try_from(args.threads)?;
    let per_thread_max = (args.max_ops / args.threads).max(1);
    let created_dir = !args.dir.exists();
    fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let base = args
        .dir
        .join(format!("mailbench-fsync-{}", std::process::id()));
    fs::create_dir(&base).with_context(|| format!("cannot create {}", base.display()))?;
    let _cleanup = Cleanup {
        base: base.clone(),
        parent: created_dir.then(|| args.dir.clone()),
    };
    let mut workers = Vec::with_capacity(threads);
    for k in 0..threads {
        let dir = base.join(format!("t{k}"));
        let worker = if args.dir_fsync {
            fs::create_dir_all(dir.join("tmp"))?;
            fs::create_dir_all(dir.join("new"))?;
            Worker::Maildir { dir }
        } else {
            fs::create_dir(&dir)?;
            Worker::NewFile { dir }
        };
        workers.push(worker);
    }
    let mut rng = Rng::new(unix_nanos());
    let data: Vec<u8> = (0..args.size).map(|_| rng.next_u64() as u8).collect();

    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.seconds);
    let results: Vec<anyhow::Result<Vec<u32>>> = std::thread::scope(|s| {
        let handles: Vec<_> = workers
            .iter()
            .map(|w| s.spawn(|| w.run(&data, deadline, per_thread_max)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a worker panicked")))
            })
            .collect()
    });
    let wall = start.elapsed().as_secs_f64();
    let mut lat = Vec::new();
    for r in results {
        lat.extend(r?);
    }
    lat.sort_unstable();
    let ops = lat.len() as u64;
    let fsyncs_per_op = if args.dir_fsync { 2.0 } else { 1.0 };
    let ms = |p| percentile(&lat, p).map(|us| round3(f64::from(us) / 1e3));
    Ok(FsyncReport {
        workload: "fsync",
        mode: if args.dir_fsync {
            "newfile+rename+dirfsync"
        } else {
            "newfile"
        },
        dir: args.dir.display().to_string(),
        threads: args.threads,
        size: args.size,
        ops,
        seconds: round3(wall),
        ops_per_s: round1(ops as f64 / wall),
        fsyncs_per_s: round1(ops as f64 * fsyncs_per_op / wall),
        lat_ms_p50: ms(0.50),
        lat_ms_p99: ms(0.99),
        lat_ms_max: ms(1.0),
    })
}

/// One thread's work: its own directory, so threads do not contend on a directory lock.
enum Worker {
    /// create + write + fsync + close.
    NewFile { dir: PathBuf },
    /// create in tmp/ + write + fsync + close, rename to new/, fsync new/.
    Maildir { dir: PathBuf },
}

impl Worker {
    /// Repeats the operation until `deadline` or `max_ops`; returns each one's latency in µs.
    fn run(&self, data: &[u8], deadline: Instant, max_ops: u64) -> anyhow::Result<Vec<u32>> {
        let mut lat = Vec::new();
        for n in 0..max_ops {
            let t0 = Instant::now();
            if t0 >= deadline {
                break;
            }
            let name = format!("f{n}");
            match self {
                Self::NewFile { dir } => write_new(&dir.join(&name), data)?,
                Self::Maildir { dir } => {
                    let tmp = dir.join("tmp").join(&name);
                    let new_dir = dir.join("new");
                    write_new(&tmp, data)?;
                    fs::rename(&tmp, new_dir.join(&name))
                        .with_context(|| format!("cannot rename {}", tmp.display()))?;
                    fs::File::open(&new_dir)
                        .and_then(|d| d.sync_all())
                        .with_context(|| format!("cannot fsync {}", new_dir.display()))?;
                }
            }
            lat.push(micros(t0.elapsed()));
        }
        Ok(lat)
    }
}

/// create (must not exist) + write + fsync + close.
fn write_new(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let mut file = fs::File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(data)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Removes what `run_fsync` made, also when it fails.
struct Cleanup {
    base: PathBuf,
    /// `DIR`, when it did not exist before; removed only if empty.
    parent: Option<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.base) {
            eprintln!("mailbench: cannot remove {}: {e}", self.base.display());
        }
        if let Some(parent) = &self.parent {
            let _ = fs::remove_dir(parent);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared helpers

/// Nearest-rank percentile of sorted values; `p` in (0, 1].
fn percentile(sorted: &[u32], p: f64) -> Option<u32> {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.max(1) - 1).copied()
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn fmt_opt(x: Option<f64>) -> String {
    x.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// User+system CPU seconds of this process and its exited children so far (Linux only).
fn process_cpu_seconds() -> Option<f64> {
    let stat = fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may contain spaces; the fields after it are fixed (proc(5)).
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 2..)?
        .split_whitespace()
        .collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // Children that were waited for (the openssl processes of --starttls).
    let cutime: u64 = fields.get(13)?.parse().ok()?;
    let cstime: u64 = fields.get(14)?.parse().ok()?;
    // USER_HZ is 100 on every Linux architecture that reports through /proc.
    Some(round3((utime + stime + cutime + cstime) as f64 / 100.0))
}

fn print_json(report: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(report)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(size: usize) -> Plan {
        Plan {
            addr: SocketAddr::from(([127, 0, 0, 1], 24)),
            dialog: Dialog {
                dialect: Dialect::Lmtp,
                from: "bench@example.net".to_owned(),
                hello: "mailbench.example.net".to_owned(),
                auth: None,
                starttls: None,
            },
            users: (1..=10)
                .map(|n| expand_user_fmt("user%04d@example.test", n).unwrap())
                .collect(),
            rcpts_per_msg: 3,
            size,
            messages: 1,
            per_connection: 0,
            next: AtomicU64::new(0),
            deadline: Instant::now() + Duration::from_secs(60),
            reply_timeout: Duration::from_secs(1),
            run_id: 1,
            body_pool: body_pool(&mut Rng::new(7)),
        }
    }

    /// Undoes dot-stuffing: what the server stores.
    fn unstuff(wire: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for line in wire.split_inclusive(|&b| b == b'\n') {
            out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
        }
        out
    }

    #[test]
    fn message_has_the_requested_size_and_short_lines() {
        let mut rng = Rng::new(1);
        for size in [400, 4096, 4097, 4098, 4099, 10_000, 65_536] {
            let p = plan(size);
            for _ in 0..20 {
                let rcpts = p.pick_rcpts(&mut rng);
                let mut wire = Vec::new();
                p.push_message(&mut wire, 1, &rcpts, &mut rng);
                let stored = unstuff(&wire);
                assert!(
                    stored.len().abs_diff(size) <= 1,
                    "size {size}: {}",
                    stored.len()
                );
                assert!(stored.ends_with(b"\r\n"));
                for line in stored.split(|&b| b == b'\n') {
                    assert!(line.len() <= 77, "{:?}", String::from_utf8_lossy(line));
                }
                for line in wire.split_inclusive(|&b| b == b'\n') {
                    assert!(line.ends_with(b"\r\n") || line.is_empty());
                    assert_ne!(line, b".\r\n", "an unstuffed lone dot");
                }
            }
        }
    }

    #[test]
    fn some_lines_get_dot_stuffed() {
        let p = plan(200_000);
        let mut wire = Vec::new();
        p.push_message(&mut wire, 1, &["a@example.test"], &mut Rng::new(3));
        assert!(wire.windows(3).any(|w| w == b"\n.."));
    }

    #[test]
    fn message_headers_are_rfc5322() {
        let p = plan(1000);
        let mut wire = Vec::new();
        p.push_message(
            &mut wire,
            42,
            &["a@example.test", "b@example.test"],
            &mut Rng::new(1),
        );
        let text = String::from_utf8(wire).unwrap();
        let (head, _) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("From: Mailbench <bench@example.net>\r\n"));
        assert!(head.contains("To: <a@example.test>,\r\n <b@example.test>\r\n"));
        assert!(head.contains("\r\nMessage-ID: <0000000000000001.42@mailbench.example.net>"));
        assert!(head.contains("\r\nDate: "));
        assert!(head.contains("\r\nSubject: "));
    }

    #[test]
    fn recipients_are_distinct() {
        let mut p = plan(1000);
        p.rcpts_per_msg = 10;
        let mut rng = Rng::new(5);
        for _ in 0..100 {
            let mut r = p.pick_rcpts(&mut rng);
            assert_eq!(r.len(), 10);
            r.sort_unstable();
            r.dedup();
            assert_eq!(r.len(), 10);
        }
    }

    #[test]
    fn user_fmt_expands() {
        assert_eq!(
            expand_user_fmt("user%04d@example.test", 7).unwrap(),
            "user0007@example.test"
        );
        assert_eq!(expand_user_fmt("u%d@x", 12345).unwrap(), "u12345@x");
        assert_eq!(expand_user_fmt("u%3d%%@x", 5).unwrap(), "u  5%@x");
        assert!(expand_user_fmt("user@x", 1).is_err());
        assert!(expand_user_fmt("u%s@x", 1).is_err());
    }

    #[test]
    fn reply_lines_parse() {
        let (code, last, text) = parse_reply_line(b"250-PIPELINING").unwrap();
        assert_eq!((code, last, text.as_str()), (250, false, "PIPELINING"));
        let (code, last, text) = parse_reply_line(b"354").unwrap();
        assert_eq!((code, last, text.as_str()), (354, true, ""));
        assert!(parse_reply_line(b"25").is_err());
        assert!(parse_reply_line(b"25x ok").is_err());
        assert!(parse_reply_line(b"250/ok").is_err());
    }

    #[test]
    fn dates_are_rfc5322() {
        let t = UNIX_EPOCH + Duration::from_secs(1_795_765_158);
        assert_eq!(rfc5322_date(t), "Fri, 27 Nov 2026 07:39:18 +0000");
        assert_eq!(rfc5322_date(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 +0000");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc5322_date(leap), "Tue, 29 Feb 2000 00:00:00 +0000");
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), Some(50));
        assert_eq!(percentile(&v, 0.99), Some(99));
        assert_eq!(percentile(&v, 1.0), Some(100));
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[3], 0.01), Some(3));
    }

    #[tokio::test]
    async fn session_speaks_lmtp() {
        use tokio::io::AsyncBufReadExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut p = plan(2000);
        p.addr = listener.local_addr().unwrap();
        p.messages = 3;
        p.rcpts_per_msg = 2;
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            w.write_all(b"220 test LMTP\r\n").await.unwrap();
            let mut in_data = false;
            let mut rcpts = 0;
            let mut seen = Vec::new();
            while let Some(line) = lines.next_line().await.unwrap() {
                if in_data {
                    if line == "." {
                        in_data = false;
                        // First recipient delivered, second one deferred.
                        w.write_all(b"250 2.0.0 ok\r\n452 4.2.2 over quota\r\n")
                            .await
                            .unwrap();
                        rcpts = 0;
                    }
                    continue;
                }
                seen.push(line.clone());
                let reply: &[u8] = if line.starts_with("LHLO") {
                    b"250-test\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n"
                } else if line.starts_with("RCPT") {
                    rcpts += 1;
                    b"250 2.1.5 ok\r\n"
                } else if line == "DATA" {
                    assert_eq!(rcpts, 2);
                    in_data = true;
                    b"354 go ahead\r\n"
                } else if line == "QUIT" {
                    w.write_all(b"221 bye\r\n").await.unwrap();
                    break;
                } else {
                    b"250 2.1.0 ok\r\n"
                };
                w.write_all(reply).await.unwrap();
            }
            seen
        });
        let mut tally = Tally::default();
        run_session(&p, &mut Rng::new(9), &mut tally).await;
        let seen = server.await.unwrap();
        assert_eq!(
            seen.first().map(String::as_str),
            Some("LHLO mailbench.example.net")
        );
        assert_eq!(tally.sent, 3);
        assert_eq!(tally.messages_delivered, 0);
        assert_eq!(tally.rcpts_delivered, 3);
        assert_eq!(tally.latencies_us.len(), 3);
        assert_eq!(tally.errors.get("EOM 452"), Some(&3));
    }

    #[test]
    fn base64_matches_rfc4648() {
        // RFC 4648 §10 test vectors.
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
        assert_eq!(base64(&[0xfb, 0xff]), "+/8=");
    }

    #[tokio::test]
    async fn session_speaks_submission() {
        use tokio::io::AsyncBufReadExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut p = plan(2000);
        p.addr = listener.local_addr().unwrap();
        p.messages = 3;
        p.rcpts_per_msg = 2;
        p.dialog = Dialog {
            dialect: Dialect::Submission,
            from: "alice@example.test".to_owned(),
            hello: "mailbench.example.net".to_owned(),
            auth: Some(format!(
                "AUTH PLAIN {}",
                base64(b"\0alice@example.test\0pw")
            )),
            starttls: None,
        };
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            w.write_all(b"220 test ESMTP\r\n").await.unwrap();
            let mut in_data = false;
            let mut messages = 0;
            let mut seen = Vec::new();
            while let Some(line) = lines.next_line().await.unwrap() {
                if in_data {
                    if line.starts_with("From: ") {
                        assert_eq!(line, "From: Mailbench <alice@example.test>");
                    }
                    if line == "." {
                        in_data = false;
                        messages += 1;
                        // One reply for the whole message; the second one is refused.
                        let reply: &[u8] = if messages == 2 {
                            b"451 4.3.0 try again later\r\n"
                        } else {
                            b"250 2.0.0 queued\r\n"
                        };
                        w.write_all(reply).await.unwrap();
                    }
                    continue;
                }
                seen.push(line.clone());
                let reply: &[u8] = if line.starts_with("EHLO") {
                    b"250-test\r\n250-PIPELINING\r\n250 AUTH PLAIN\r\n"
                } else if line.starts_with("AUTH") {
                    b"235 2.7.0 ok\r\n"
                } else if line == "DATA" {
                    in_data = true;
                    b"354 go ahead\r\n"
                } else if line == "QUIT" {
                    w.write_all(b"221 bye\r\n").await.unwrap();
                    break;
                } else {
                    b"250 2.1.0 ok\r\n"
                };
                w.write_all(reply).await.unwrap();
            }
            seen
        });
        let mut tally = Tally::default();
        run_session(&p, &mut Rng::new(9), &mut tally).await;
        let seen = server.await.unwrap();
        assert_eq!(
            seen.get(..3).unwrap(),
            [
                "EHLO mailbench.example.net",
                "AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABwdw==",
                "MAIL FROM:<alice@example.test>",
            ]
        );
        assert_eq!(tally.sent, 3);
        assert_eq!(tally.messages_delivered, 2);
        assert_eq!(tally.rcpts_delivered, 4);
        assert_eq!(tally.latencies_us.len(), 3);
        assert_eq!(tally.transactions_us.len(), 3);
        assert_eq!(tally.errors.get("EOM 451"), Some(&1));
    }

    #[test]
    fn fsync_probe_cleans_up() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("mb");
        for dir_fsync in [false, true] {
            let args = FsyncArgs {
                dir: dir.clone(),
                seconds: 0.2,
                threads: 2,
                size: 4096,
                dir_fsync,
                max_ops: 20,
                json: false,
            };
            let report = run_fsync(&args).unwrap();
            assert!(report.ops > 0 && report.ops <= 20);
            assert!(!dir.exists(), "left {}", dir.display());
        }
    }

    // --- SMTP to an MX

    /// A fake MX: any number of connections, one reply after each message's dot.
    async fn fake_smtp(listener: tokio::net::TcpListener) -> (u64, u64) {
        let mut connections = 0;
        let mut messages = 0;
        while let Ok(Ok((stream, _))) =
            tokio::time::timeout(Duration::from_millis(500), listener.accept()).await
        {
            connections += 1;
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            w.write_all(b"220 mx ESMTP\r\n").await.unwrap();
            let mut in_data = false;
            while let Some(line) = lines.next_line().await.unwrap() {
                if in_data {
                    if line == "." {
                        in_data = false;
                        messages += 1;
                        w.write_all(b"250 2.0.0 queued\r\n").await.unwrap();
                    }
                    continue;
                }
                assert!(!line.starts_with("AUTH"), "no AUTH to an MX");
                let reply: &[u8] = if line.starts_with("EHLO") {
                    b"250-mx\r\n250 PIPELINING\r\n"
                } else if line == "DATA" {
                    in_data = true;
                    b"354 go ahead\r\n"
                } else if line == "QUIT" {
                    w.write_all(b"221 bye\r\n").await.unwrap();
                    break;
                } else {
                    b"250 ok\r\n"
                };
                w.write_all(reply).await.unwrap();
            }
        }
        (connections, messages)
    }

    #[tokio::test]
    async fn smtp_reconnects_after_per_connection_messages() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut p = plan(1000);
        p.addr = listener.local_addr().unwrap();
        p.dialog.dialect = Dialect::Smtp;
        p.messages = 5;
        p.rcpts_per_msg = 2;
        p.per_connection = 2;
        let server = tokio::spawn(fake_smtp(listener));
        let mut tally = Tally::default();
        run_session(&p, &mut Rng::new(9), &mut tally).await;
        assert_eq!(server.await.unwrap(), (3, 5));
        assert_eq!(tally.connections, 3);
        assert_eq!(tally.sent, 5);
        assert_eq!(tally.messages_delivered, 5);
        assert_eq!(tally.rcpts_delivered, 10);
        assert!(tally.errors.is_empty(), "{:?}", tally.errors);
    }

    #[test]
    fn maildir_count_takes_new_and_cur_at_any_depth() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let touch = |path: &str, files: usize| {
            let dir = root.join(path);
            fs::create_dir_all(&dir).unwrap();
            for i in 0..files {
                fs::write(dir.join(format!("{i}.host:2,")), b"x").unwrap();
            }
        };
        assert_eq!(count_maildir_messages(root).unwrap(), 0);
        touch("filer1/ab/alice/Maildir/new", 3);
        touch("filer1/ab/alice/Maildir/cur", 2);
        touch("filer1/ab/alice/Maildir/tmp", 4); // not delivered yet
        touch("filer1/ab/alice/Maildir/.Junk/new", 1);
        touch("filer1/cd/bob/Maildir/cur", 5);
        touch("filer1/cd/bob/Maildir/cur/sub", 7); // not directly inside cur
        touch("filer2/other", 6); // not a Maildir
        assert_eq!(count_maildir_messages(root).unwrap(), 11);
        // A directory entry in new/ is not a message.
        fs::create_dir(root.join("filer1/ab/alice/Maildir/new/dir")).unwrap();
        assert_eq!(count_maildir_messages(root).unwrap(), 11);
        assert_eq!(count_maildir_messages(&root.join("missing")).unwrap(), 0);
        fs::write(root.join("file"), b"x").unwrap();
        assert!(count_maildir_messages(&root.join("file")).is_err());
    }

    #[tokio::test]
    async fn maildir_wait_ends_when_the_count_is_reached_or_at_the_deadline() {
        let tmp = tempfile::tempdir().unwrap();
        let new = tmp.path().join("u/Maildir/new");
        fs::create_dir_all(&new).unwrap();
        fs::write(new.join("old"), b"x").unwrap();
        let baseline = count_maildir_messages(tmp.path()).unwrap();
        assert_eq!(baseline, 1);
        let start = Instant::now();
        let writer = {
            let new = new.clone();
            tokio::spawn(async move {
                for i in 0..3 {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    fs::write(new.join(format!("m{i}")), b"x").unwrap();
                }
            })
        };
        let deadline = start + Duration::from_secs(10);
        let report = wait_for_maildir(tmp.path().to_owned(), baseline, 3, start, deadline)
            .await
            .unwrap();
        writer.await.unwrap();
        assert!(report.delivered_all);
        assert_eq!(report.delivered, 3);
        assert!(report.delivered_s < 5.0);
        // Waiting for more than will come ends at the deadline.
        let start = Instant::now();
        let deadline = start + Duration::from_millis(250);
        let report = wait_for_maildir(tmp.path().to_owned(), baseline, 4, start, deadline)
            .await
            .unwrap();
        assert!(!report.delivered_all);
        assert_eq!(report.delivered, 3);
        assert!(report.delivered_s >= 0.25);
    }

    // --- accounts

    fn login_args() -> LoginArgs {
        LoginArgs {
            users: None,
            user_fmt: "user%04d@example.test".to_owned(),
            user_count: 3,
            user_first: 1,
            pass_fmt: "pw-user%04d".to_owned(),
            master: None,
        }
    }

    #[test]
    fn a_master_login_is_sasl_plain_for_the_user() {
        let mut args = login_args();
        assert!(load_accounts(&args).unwrap()[0].master_plain().is_none());
        args.master = Some("proxy:se:cret".to_owned());
        let a = load_accounts(&args).unwrap();
        // "user0001@example.test\0proxy\0se:cret"
        assert_eq!(
            a[0].master_plain().unwrap(),
            base64(b"user0001@example.test\0proxy\0se:cret")
        );
        args.master = Some("no-colon".to_owned());
        assert!(load_accounts(&args).is_err());
    }

    fn run_args() -> RunArgs {
        RunArgs {
            max_seconds: 20.0,
            reply_timeout: 5.0,
            seed: None,
            allow_remote: false,
            json: false,
        }
    }

    #[test]
    fn pass_fmt_expands_with_the_user_number() {
        let mut args = login_args();
        args.user_first = 41;
        let accounts = load_accounts(&args).unwrap();
        let pairs: Vec<(&str, &str)> = accounts
            .iter()
            .map(|a| (a.user.as_str(), a.pass.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("user0041@example.test", "pw-user0041"),
                ("user0042@example.test", "pw-user0042"),
                ("user0043@example.test", "pw-user0043"),
            ]
        );
        // Without %d: one password for everyone.
        args.pass_fmt = "secret 100%%".to_owned();
        let accounts = load_accounts(&args).unwrap();
        assert!(accounts.iter().all(|a| a.pass == "secret 100%"));
        assert_eq!(expand_fmt("p%3d", 7, "--pass-fmt", false).unwrap(), "p  7");
        assert!(expand_fmt("p%s", 7, "--pass-fmt", false).is_err());
        args.pass_fmt = "p\u{e9}%d".to_owned();
        assert!(load_accounts(&args).is_err(), "not ASCII");
    }

    #[test]
    fn users_file_lines_may_carry_passwords() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("users");
        fs::write(
            &file,
            "# accounts\n\na@example.test  two words\n\nb@example.test\nc@example.test x\n",
        )
        .unwrap();
        let mut args = login_args();
        args.users = Some(file);
        args.pass_fmt = "pw%d".to_owned();
        let accounts = load_accounts(&args).unwrap();
        let pairs: Vec<(&str, &str)> = accounts
            .iter()
            .map(|a| (a.user.as_str(), a.pass.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("a@example.test", "two words"),
                ("b@example.test", "pw2"),
                ("c@example.test", "x"),
            ]
        );
    }

    #[test]
    fn imap_strings_are_quoted() {
        assert_eq!(imap_quoted("pw-user0001"), "\"pw-user0001\"");
        assert_eq!(imap_quoted(r#"a"b\c d"#), r#""a\"b\\c d""#);
    }

    // --- IMAP framing and FETCH

    /// Frames every response in `wire`, feeding it `chunk` bytes at a time as a socket would.
    fn frame_all(wire: &[u8], chunk: usize) -> Vec<ImapResponse> {
        let mut buf = Vec::new();
        let mut out = Vec::new();
        for piece in wire.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some((response, used)) = parse_imap_response(&buf).unwrap() {
                buf.drain(..used);
                out.push(response);
            }
        }
        assert!(
            buf.is_empty(),
            "left over: {:?}",
            String::from_utf8_lossy(&buf)
        );
        out
    }

    fn text(s: &str) -> ImapPart {
        ImapPart::Text(s.as_bytes().to_vec())
    }

    fn literal(s: &str) -> ImapPart {
        ImapPart::Literal(s.as_bytes().to_vec())
    }

    #[test]
    fn imap_literals_are_taken_by_length() {
        // The literal holds what would look like responses if it were read as lines.
        let body = "Subject: x\r\n\r\n* 3 FETCH (UID 1)\r\na1 OK fooled\r\n)\r\n{5}\r\n";
        let wire = format!(
            "* 1 FETCH (UID 7 BODY[] {{{}}}\r\n{body})\r\n\
             * 2 FETCH (BODY[HEADER] {{0}}\r\n BODY[TEXT] ~{{3}}\r\nabc UID 9)\r\n\
             * OK [ALERT] text with {{braces}}\r\n\
             a1 OK done\r\n",
            body.len()
        );
        let want = vec![
            ImapResponse {
                parts: vec![text("* 1 FETCH (UID 7 BODY[] "), literal(body), text(")")],
            },
            ImapResponse {
                parts: vec![
                    text("* 2 FETCH (BODY[HEADER] "),
                    literal(""),
                    text(" BODY[TEXT] "),
                    literal("abc"),
                    text(" UID 9)"),
                ],
            },
            ImapResponse {
                parts: vec![text("* OK [ALERT] text with {braces}")],
            },
            ImapResponse {
                parts: vec![text("a1 OK done")],
            },
        ];
        for chunk in [wire.len(), 1, 2, 3, 7, 64] {
            assert_eq!(frame_all(wire.as_bytes(), chunk), want, "chunks of {chunk}");
        }
    }

    #[test]
    fn imap_framing_waits_for_the_whole_response_and_bounds_it() {
        assert_eq!(
            parse_imap_response(b"* 1 FETCH (BODY[] {10}\r\n12345").unwrap(),
            None
        );
        assert_eq!(
            parse_imap_response(b"* 1 FETCH (BODY[] {10}\r\n").unwrap(),
            None
        );
        assert_eq!(parse_imap_response(b"* OK no line end").unwrap(), None);
        // Bare LF ends a line too.
        let (r, used) = parse_imap_response(b"* OK x\n* OK y\r\n").unwrap().unwrap();
        assert_eq!((r.parts, used), (vec![text("* OK x")], 7));
        let long = vec![b'x'; MAX_SERVER_LINE + 1];
        assert!(parse_imap_response(&long).is_err());
        let at_limit = [vec![b'x'; MAX_SERVER_LINE], b"\n".to_vec()].concat();
        assert!(parse_imap_response(&at_limit).unwrap().is_some());
        assert!(parse_imap_response(b"* 1 FETCH (BODY[] {2000000000}\r\n").is_err());
        assert!(parse_imap_response(b"* 1 FETCH (BODY[] {99999999999999999999999}\r\n").is_err());
    }

    fn response(wire: &str) -> ImapResponse {
        let (r, used) = parse_imap_response(wire.as_bytes()).unwrap().unwrap();
        assert_eq!(used, wire.len());
        r
    }

    #[test]
    fn fetch_items_parse() {
        let r = response("* 12 FETCH (FLAGS (\\Seen $Label (x)) UID 345 RFC822.SIZE 4096)\r\n");
        assert_eq!(
            parse_fetch(&r).unwrap(),
            Some(FetchItems {
                seq: 12,
                uid: Some(345),
                rfc822_size: Some(4096),
                body_len: None,
            })
        );
        let r = response("* 1 FETCH (UID 7 BODY[] {5}\r\na\r\nb) FLAGS ())\r\n");
        let items = parse_fetch(&r).unwrap().unwrap();
        assert_eq!((items.uid, items.body_len), (Some(7), Some(5)));
        let r = response("* 2 fetch (body[] \"he said \\\"hi\\\"\" uid 9)\r\n");
        let items = parse_fetch(&r).unwrap().unwrap();
        assert_eq!((items.uid, items.body_len), (Some(9), Some(12)));
        let r = response("* 3 FETCH (BODY[HEADER.FIELDS (TO)] {4}\r\nTo:\n UID 1 BODY[] NIL)\r\n");
        let items = parse_fetch(&r).unwrap().unwrap();
        // The first BODY[…] is a section, counted; NIL is not a body.
        assert_eq!((items.uid, items.body_len), (Some(1), Some(4)));
        for other in [
            "* 4 EXISTS\r\n",
            "a1 OK FETCH done\r\n",
            "* OK [UIDNEXT 5] x\r\n",
        ] {
            assert_eq!(parse_fetch(&response(other)).unwrap(), None, "{other}");
        }
        for bad in [
            "* 1 FETCH UID 7\r\n",
            "* x FETCH (UID 7)\r\n",
            "* 1 FETCH (UID seven)\r\n",
            "* 1 FETCH (UID 7\r\n",
            "* 1 FETCH (FLAGS (\\Seen)\r\n",
            "* 1 FETCH (BODY[] \"open)\r\n",
        ] {
            assert!(parse_fetch(&response(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn imap_status_faults_carry_the_text() {
        let r = response("a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n");
        let fault = r.fault("LOGIN");
        assert_eq!(fault.key(), "LOGIN NO");
        assert_eq!(
            fault.detail(),
            "LOGIN NO: [AUTHENTICATIONFAILED] Authentication failed."
        );
        assert_eq!(response("* 3 EXISTS\r\n").exists(), Some(3));
        assert_eq!(response("* 3 RECENT\r\n").exists(), None);
    }

    // --- POP3

    #[test]
    fn pop3_lines_parse() {
        assert_eq!(pop3_status(b"+OK 2 320"), Ok(&b"2 320"[..]));
        assert_eq!(pop3_status(b"+OK"), Ok(&b""[..]));
        assert_eq!(
            pop3_status(b"-ERR [IN-USE] locked"),
            Err(&b"[IN-USE] locked"[..])
        );
        assert_eq!(pop3_status(b"garbage"), Err(&b"garbage"[..]));
        assert_eq!(pop3_data_line(b"."), None);
        assert_eq!(pop3_data_line(b".."), Some(&b"."[..]));
        assert_eq!(pop3_data_line(b"..x"), Some(&b".x"[..]));
        assert_eq!(pop3_data_line(b"x.y"), Some(&b"x.y"[..]));
        assert_eq!(pop3_data_line(b""), Some(&b""[..]));
    }

    #[tokio::test]
    async fn pop3_multiline_unstuffs_and_stops_at_the_dot_line() {
        let wire: &[u8] = b"+OK message follows\r\nSubject: a\r\n\r\n..leading dot\r\n.\r\n\
            ...\r\nlast\n.\r\n+OK next\r\n";
        for chunk in [1, 2, 3, 7, 64] {
            let (client, mut server) = tokio::io::duplex(chunk);
            let feeder = tokio::spawn(async move {
                for piece in wire.chunks(chunk) {
                    server.write_all(piece).await.unwrap();
                }
                server
            });
            let (r, w) = tokio::io::split(client);
            let mut conn = Pop3Conn::new(Box::new(r), Box::new(w), Duration::from_secs(5));
            assert_eq!(conn.read_status("RETR").await.unwrap(), b"message follows");
            let mut lines = Vec::new();
            let bytes = conn
                .read_multiline(|l| lines.push(String::from_utf8_lossy(l).into_owned()))
                .await
                .unwrap();
            assert_eq!(lines, ["Subject: a", "", ".leading dot"]);
            assert_eq!(bytes, 12 + 2 + 14);
            let mut lines = Vec::new();
            let bytes = conn
                .read_multiline(|l| lines.push(String::from_utf8_lossy(l).into_owned()))
                .await
                .unwrap();
            assert_eq!(lines, ["..", "last"]);
            assert_eq!(bytes, 4 + 6);
            assert_eq!(conn.read_status("QUIT").await.unwrap(), b"next");
            drop(feeder.await.unwrap());
        }
    }

    // --- fake servers for the IMAP, POP3 and IDLE modes

    /// The messages of every fake mailbox: the first goes as a literal holding what looks
    /// like responses, the second as a quoted string with escapes.
    const MESSAGE_1: &str = "Subject: x\r\n\r\n* 3 FETCH (UID 1)\r\na5 OK fooled\r\n)\r\n";
    const MESSAGE_2: &str = "he said \"hi\"";

    /// A fake IMAP server: LOGIN (user0001… with pw-user0001…), SELECT, FETCH, UID FETCH,
    /// NOOP, IDLE/DONE, LOGOUT.
    async fn fake_imap(listener: tokio::net::TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut lines = BufReader::new(r).lines();
                w.write_all(b"* OK fake IMAP ready\r\n").await.unwrap();
                let mut idle_tag = None;
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(tag) = idle_tag.take() {
                        assert_eq!(line, "DONE");
                        w.write_all(format!("* 4 EXISTS\r\n{tag} OK IDLE done\r\n").as_bytes())
                            .await
                            .unwrap();
                        continue;
                    }
                    let (tag, command) = line.split_once(' ').unwrap();
                    let reply = if let Some(args) = command.strip_prefix("LOGIN ") {
                        let n = args.get(5..9).unwrap();
                        if args == format!("\"user{n}@example.test\" \"pw-user{n}\"") {
                            "* CAPABILITY IMAP4rev1 IDLE\r\nTAG OK logged in\r\n".to_owned()
                        } else {
                            "TAG NO [AUTHENTICATIONFAILED] Authentication failed.\r\n".to_owned()
                        }
                    } else if command == "SELECT INBOX" {
                        "* 2 EXISTS\r\n* OK [UIDVALIDITY 1] ok\r\nTAG OK [READ-WRITE] done\r\n"
                            .to_owned()
                    } else if command == "FETCH 1:* (FLAGS UID RFC822.SIZE)" {
                        format!(
                            "* 1 FETCH (FLAGS (\\Seen) UID 7 RFC822.SIZE {})\r\n\
                             * 2 FETCH (UID 9 FLAGS () RFC822.SIZE {})\r\nTAG OK done\r\n",
                            MESSAGE_1.len(),
                            MESSAGE_2.len()
                        )
                    } else if command == "UID FETCH 7 (BODY.PEEK[])" {
                        format!(
                            "* 1 FETCH (UID 7 BODY[] {{{}}}\r\n{MESSAGE_1})\r\nTAG OK done\r\n",
                            MESSAGE_1.len()
                        )
                    } else if command == "UID FETCH 9 (BODY.PEEK[])" {
                        // An unsolicited FETCH for another message first.
                        "* 1 FETCH (FLAGS (\\Seen))\r\n\
                         * 2 FETCH (UID 9 BODY[] \"he said \\\"hi\\\"\")\r\nTAG OK done\r\n"
                            .to_owned()
                    } else if command == "NOOP" {
                        "TAG OK NOOP done\r\n".to_owned()
                    } else if command == "IDLE" {
                        idle_tag = Some(tag.to_owned());
                        "+ idling\r\n".to_owned()
                    } else if command == "LOGOUT" {
                        let bye = format!("* BYE logging out\r\n{tag} OK done\r\n");
                        w.write_all(bye.as_bytes()).await.unwrap();
                        return;
                    } else {
                        format!("TAG BAD unexpected {command}\r\n")
                    };
                    w.write_all(reply.replace("TAG", tag).as_bytes())
                        .await
                        .unwrap();
                }
            });
        }
    }

    /// A fake POP3 server with the same two messages for everyone.
    async fn fake_pop3(listener: tokio::net::TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut lines = BufReader::new(r).lines();
                w.write_all(b"+OK fake POP3\r\n").await.unwrap();
                while let Ok(Some(line)) = lines.next_line().await {
                    let reply: &[u8] = match line.as_str() {
                        "USER user0001@example.test" | "USER user0002@example.test" => b"+OK\r\n",
                        "PASS pw-user0001" | "PASS pw-user0002" => b"+OK logged in\r\n",
                        "STAT" => b"+OK 2 40\r\n",
                        "UIDL" => b"+OK\r\n1 a.1\r\n2 a.2\r\n.\r\n",
                        // "Subject: x" CRLF CRLF ".dot" CRLF: 20 bytes.
                        "RETR 1" => b"+OK\r\nSubject: x\r\n\r\n..dot\r\n.\r\n",
                        // "." CRLF "x" CRLF: 6 bytes.
                        "RETR 2" => b"+OK\r\n..\r\nx\r\n.\r\n",
                        "QUIT" => {
                            w.write_all(b"+OK bye\r\n").await.unwrap();
                            return;
                        }
                        _ => b"-ERR [AUTH] no\r\n",
                    };
                    w.write_all(reply).await.unwrap();
                }
            });
        }
    }

    async fn fake_server(
        serve: fn(tokio::net::TcpListener) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap().to_string();
        tokio::spawn(serve(listener));
        target
    }

    #[tokio::test]
    async fn imap_sessions_read_every_message() {
        let target = fake_server(|l| Box::pin(fake_imap(l))).await;
        let shape = SessionShape {
            protocol: Protocol::Imap,
            target,
            sessions: 5,
            concurrency: 2,
        };
        let report = run_sessions(&shape, &login_args(), &run_args())
            .await
            .unwrap();
        assert_eq!(report.errors, BTreeMap::new(), "{:?}", report.first_error);
        assert_eq!((report.sessions_ok, report.sessions_failed), (5, 0));
        assert_eq!(report.messages_fetched, 10);
        assert_eq!(
            report.bytes_fetched,
            5 * (MESSAGE_1.len() + MESSAGE_2.len()) as u64
        );
        assert!(report.session_ms_p99.is_some());

        // Wrong passwords: counted, with the server's text.
        let mut login = login_args();
        login.pass_fmt = "wrong%d".to_owned();
        let report = run_sessions(&shape, &login, &run_args()).await.unwrap();
        assert_eq!((report.sessions_ok, report.sessions_failed), (0, 5));
        assert_eq!(report.errors.get("LOGIN NO"), Some(&5));
        assert_eq!(
            report.first_error.as_deref(),
            Some("LOGIN NO: [AUTHENTICATIONFAILED] Authentication failed.")
        );
    }

    #[tokio::test]
    async fn imap_noop_times_round_trips() {
        let target = fake_server(|l| Box::pin(fake_imap(l))).await;
        let cli = Cli::try_parse_from(["mailbench", "imap", &target, "--noop", "50"]).unwrap();
        let Command::Imap(args) = cli.command else {
            panic!("not imap");
        };
        let report = run_noops(&args, 50).await.unwrap();
        assert_eq!((report.noops_ok, report.noops_failed), (50, 0));
        assert!(report.rtt_us_p50 <= report.rtt_us_p90);
        assert!(report.rtt_us_p90 <= report.rtt_us_p99);
        assert_eq!(report.user, "user0001@example.test");
    }

    #[tokio::test]
    async fn pop3_sessions_retrieve_every_message() {
        let target = fake_server(|l| Box::pin(fake_pop3(l))).await;
        let mut login = login_args();
        login.user_count = 2;
        let shape = SessionShape {
            protocol: Protocol::Pop3,
            target,
            sessions: 4,
            concurrency: 2,
        };
        let report = run_sessions(&shape, &login, &run_args()).await.unwrap();
        assert_eq!(report.errors, BTreeMap::new(), "{:?}", report.first_error);
        assert_eq!((report.sessions_ok, report.messages_fetched), (4, 8));
        assert_eq!(report.bytes_fetched, 4 * (20 + 6));
    }

    #[tokio::test]
    async fn idle_connections_are_opened_measured_and_closed() {
        let target = fake_server(|l| Box::pin(fake_imap(l))).await;
        let pid = std::process::id().to_string();
        let cli = Cli::try_parse_from([
            "mailbench",
            "idle",
            &target,
            "--conns",
            "7",
            "--ramp",
            "3",
            "--pid",
            &pid,
            "--select",
            "--user-count",
            "3",
        ])
        .unwrap();
        let Command::Idle(args) = cli.command else {
            panic!("not idle");
        };
        let report = run_idle(&args).await.unwrap();
        assert_eq!(report.errors, BTreeMap::new(), "{:?}", report.first_error);
        assert_eq!((report.idling, report.failed, report.closed), (7, 0, 7));
        let [tree] = report.trees.as_slice() else {
            panic!("one tree");
        };
        assert!(tree.processes_before >= 1 && tree.rss_kib_after > 0);
        assert!(tree.rss_kib_per_conn.is_some());
    }

    // --- /proc

    #[test]
    fn proc_fields_parse() {
        let stat = "1234 (a (weird) name) S 77 1234 1234 0 -1 4194560 1 0";
        assert_eq!(parse_ppid(stat), Some(77));
        assert_eq!(parse_ppid("garbage"), None);
        let status = "Name:\tx\nVmHWM:\t  900 kB\nVmRSS:\t  812 kB\nRssAnon:\t 1 kB\n";
        assert_eq!(kib_field(status, "VmRSS:"), Some(812));
        let rollup = "Rss:   10 kB\nPss:   7 kB\nPss_Anon:   3 kB\n";
        assert_eq!(kib_field(rollup, "Pss:"), Some(7));
        assert_eq!(kib_field(rollup, "Swap:"), None);
        let tree = descendants(1, &[(2, 1), (3, 2), (4, 9), (5, 1), (1, 0)]);
        assert_eq!(tree, [1, 2, 5, 3]);
    }

    #[test]
    fn own_process_tree_is_measured() {
        let usage = measure_tree(std::process::id()).unwrap();
        assert!(usage.processes >= 1);
        assert!(usage.rss_kib > 0);
        assert!(measure_tree(u32::MAX).is_err());
        assert!(nofile_limits().is_some_and(|(soft, _)| soft > 0));
    }
}
