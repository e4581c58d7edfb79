//! The POP3 backend (RFC 1939, CAPA RFC 2449, RESP-CODES, AUTH-RESP-CODE, SASL AUTH per
//! RFC 5034) for access proxies.
//!
//! Only peers in `trust.proxy_networks` reach it, and the only login is the proxy's
//! `AUTH PLAIN` of `user\0principal\0secret`: the filer never sees a user's password, so
//! `USER`/`PASS` are refused here. `DELE` takes effect only at `QUIT` (the UPDATE state); a
//! dropped connection deletes nothing. One session per mailbox: a second gets `-ERR [IN-USE]`.
//! UIDL values are UIDVALIDITY and UID, which migrations keep, so they never change.

use std::collections::HashSet;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use common::location::MailboxState;
use common::pop3::{self, ParseError, Request};
use common::smtp::server::{BoxStream, LineDecoder, LineStatus};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

use crate::Filer;
use crate::store::{MessageMeta, UserStore};

/// RFC 1939 §3: the autologout timer must be at least 10 minutes.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Time to log in at all, however the bytes trickle in: the proxy logs in at once, so a
/// session that takes longer is not the proxy's.
pub(crate) const PRELOGIN_LIFETIME: Duration = Duration::from_secs(10);
/// Failed logins before the connection is closed.
const MAX_AUTH_FAILURES: u32 = 3;
/// Bad commands before the connection is closed.
const MAX_ERRORS: u32 = 10;
/// Output is written once this much is queued.
const WRITE_CHUNK: usize = 64 * 1024;

/// Mailboxes with an open POP3 session on this filer.
#[derive(Default)]
pub(crate) struct Locks(Mutex<HashSet<String>>);

/// Holds a mailbox's POP3 lock until dropped (also when the connection just drops).
struct LockGuard {
    locks: Arc<Filer>,
    address: String,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Ok(mut set) = self.locks.pop3_locks.0.lock() {
            set.remove(&self.address);
        }
    }
}

fn try_lock(filer: &Arc<Filer>, address: &str) -> Option<LockGuard> {
    let mut set = filer.pop3_locks.0.lock().ok()?;
    set.insert(address.to_owned()).then(|| LockGuard {
        locks: filer.clone(),
        address: address.to_owned(),
    })
}

struct Maildrop {
    user: Arc<UserStore>,
    /// The mailbox (key form), to check it is still served here.
    address: String,
    uid_validity: u32,
    messages: Vec<MessageMeta>,
    deleted: Vec<bool>,
    _lock: LockGuard,
}

impl Maildrop {
    /// The message numbered `n` (1-based) unless it is marked deleted.
    fn get(&self, n: u32) -> Option<&MessageMeta> {
        let i = (n as usize).checked_sub(1)?;
        if *self.deleted.get(i)? {
            return None;
        }
        self.messages.get(i)
    }

    fn uidl(&self, m: &MessageMeta) -> String {
        format!("{:08x}{:08x}", self.uid_validity, m.uid)
    }
}

struct Conn {
    stream: BoxStream,
    lines: LineDecoder,
    buf: Vec<u8>,
    pos: usize,
    len: usize,
    out: Vec<u8>,
    /// Until login: when the session must have logged in.
    login_by: Option<tokio::time::Instant>,
}

enum Input {
    Line(Vec<u8>),
    TooLong,
    Closed,
}

impl Conn {
    fn new(stream: BoxStream) -> Self {
        Self {
            stream,
            lines: LineDecoder::new(pop3::MAX_LINE_LEN),
            buf: vec![0; 16 * 1024],
            pos: 0,
            len: 0,
            out: Vec::new(),
            login_by: Some(tokio::time::Instant::now() + PRELOGIN_LIFETIME),
        }
    }

    fn say(&mut self, text: &str) {
        self.out.extend_from_slice(text.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    async fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            tokio::time::timeout(IDLE_TIMEOUT, self.stream.write_all(&self.out))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "write timed out"))??;
            self.out.clear();
        }
        Ok(())
    }

    /// The next line; replies are flushed only when no pipelined input is waiting.
    async fn read_line(&mut self) -> io::Result<Input> {
        loop {
            if self.pos < self.len {
                let (n, status) = self.lines.decode(&self.buf[self.pos..self.len]);
                self.pos += n;
                match status {
                    LineStatus::Line => return Ok(Input::Line(self.lines.line().to_vec())),
                    LineStatus::TooLong => return Ok(Input::TooLong),
                    LineStatus::NeedMore => {}
                }
            }
            self.flush().await?;
            let wait = self.login_by.map_or(IDLE_TIMEOUT, |by| {
                IDLE_TIMEOUT.min(by.saturating_duration_since(tokio::time::Instant::now()))
            });
            let n = tokio::time::timeout(wait, self.stream.read(&mut self.buf))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "idle"))??;
            if n == 0 {
                return Ok(Input::Closed);
            }
            self.pos = 0;
            self.len = n;
        }
    }
}

/// Runs one POP3 session to its end.
pub(crate) async fn session(filer: Arc<Filer>, stream: BoxStream, shutdown: CancellationToken) {
    let mut c = Conn::new(stream);
    let host = filer.settings.shared.hostname.clone();
    c.say(&format!("+OK {host} POP3 ready"));
    let mut drop: Option<Maildrop> = None;
    let (mut auth_failures, mut errors) = (0u32, 0u32);
    let mut watch = tokio::time::interval(crate::residency_check(&filer.settings));
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let input = tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                c.say("-ERR [SYS/TEMP] server shutting down");
                break;
            }
            _ = watch.tick(), if drop.is_some() => {
                let address = drop.as_ref().map(|d| d.address.clone()).unwrap_or_default();
                if let Some(why) = crate::not_served_here(&filer, &address, false).await {
                    // Like a dropped connection: no UPDATE state, nothing is deleted.
                    tracing::info!(why, "ending the session");
                    c.say(&format!("-ERR [SYS/TEMP] {why}"));
                    let _ = c.flush().await;
                    return;
                }
                continue;
            }
            r = c.read_line() => r,
        };
        let line = match input {
            Ok(Input::Line(l)) => l,
            Ok(Input::TooLong) => {
                c.say("-ERR line too long");
                errors += 1;
                if errors >= MAX_ERRORS {
                    break;
                }
                continue;
            }
            Ok(Input::Closed) => return, // a dropped connection deletes nothing
            Err(e) => {
                if e.kind() == io::ErrorKind::TimedOut && c.login_by.is_some() {
                    c.say("-ERR [SYS/TEMP] took too long to log in");
                } else if e.kind() == io::ErrorKind::TimedOut {
                    c.say("-ERR [SYS/TEMP] autologout: idle for too long");
                } else {
                    return;
                }
                break;
            }
        };
        let request = match pop3::parse(&line) {
            Ok(r) => r,
            Err(e) => {
                c.say(match e {
                    ParseError::Unknown => "-ERR unknown command",
                    ParseError::Arguments => "-ERR syntax error in arguments",
                    ParseError::Invalid => "-ERR invalid characters in command",
                });
                errors += 1;
                if errors >= MAX_ERRORS {
                    c.say("-ERR too many errors");
                    break;
                }
                continue;
            }
        };
        tracing::debug!(?request, "pop3 command");
        match drop.as_mut() {
            None => match request {
                Request::Capa => capa(&mut c, false),
                Request::Quit => {
                    c.say(&format!("+OK {host} bye"));
                    break;
                }
                Request::Noop => c.say("+OK"),
                Request::User(_) | Request::Pass(_) => {
                    c.say("-ERR [AUTH] plaintext login is not available here; connect through the access proxy");
                }
                Request::Stls => c.say("-ERR STLS is not available here"),
                Request::Auth {
                    mechanism: None, ..
                } => c.say("+OK\r\nPLAIN\r\n."),
                Request::Auth {
                    mechanism: Some(m),
                    initial_response,
                } => {
                    if m != "PLAIN" {
                        c.say("-ERR [AUTH] unsupported mechanism");
                        continue;
                    }
                    let response = match initial_response {
                        Some(ir) => ir.into_bytes(),
                        None => {
                            c.say("+ ");
                            match c.read_line().await {
                                Ok(Input::Line(l)) => l,
                                _ => break,
                            }
                        }
                    };
                    match login(&filer, &response).await {
                        Ok(d) => {
                            tracing::Span::current().record("user", d._lock.address.as_str());
                            tracing::info!(messages = d.messages.len(), "pop3 login");
                            c.say("+OK maildrop locked and ready");
                            drop = Some(d);
                            c.login_by = None;
                        }
                        Err(reply) => {
                            c.say(reply);
                            auth_failures += 1;
                            if auth_failures >= MAX_AUTH_FAILURES {
                                break;
                            }
                        }
                    }
                }
                _ => c.say("-ERR authenticate first"),
            },
            Some(d) => match transaction(&mut c, d, request).await {
                Ok(true) => {}
                Ok(false) => {
                    let _ = c.flush().await;
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pop3 session failed");
                    return;
                }
            },
        }
    }
    let _ = c.flush().await;
}

fn capa(c: &mut Conn, authenticated: bool) {
    c.say("+OK capability list follows");
    for cap in ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"] {
        c.say(cap);
    }
    if !authenticated {
        c.say("SASL PLAIN");
    }
    c.say("IMPLEMENTATION mail-platform filer");
    c.say(".");
}

/// Checks the proxy's trusted login and opens the maildrop. Errors are the reply to send.
async fn login(filer: &Arc<Filer>, response: &[u8]) -> Result<Maildrop, &'static str> {
    const BAD: &str = "-ERR [AUTH] authentication failed";
    let text = std::str::from_utf8(response).map_err(|_| BAD)?.trim();
    if text == "*" {
        return Err("-ERR authentication cancelled");
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|_| BAD)?;
    let mut parts = raw.split(|&b| b == 0);
    let (Some(authz), Some(authc), Some(secret), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(BAD);
    };
    let principal = filer.settings.shared.proxy_principal.as_bytes();
    if authc != principal
        || !crate::constant_time_eq(secret, filer.proxy_secret.as_bytes())
        || authz.is_empty()
    {
        tracing::warn!("refused a login that is not the proxy's trusted login");
        return Err(BAD);
    }
    let address = String::from_utf8_lossy(authz).to_lowercase();
    let mailbox = match filer.directory.mailbox(&address).await {
        Ok(Some(m)) => m,
        Ok(None) => return Err(BAD),
        Err(_) => return Err("-ERR [SYS/TEMP] temporary failure, try again later"),
    };
    if mailbox.filer != filer.settings.name {
        return Err("-ERR [SYS/TEMP] mailbox is not on this server, try again later");
    }
    match mailbox.state {
        MailboxState::Active => {}
        MailboxState::Moving => {
            return Err("-ERR [SYS/TEMP] mailbox is being moved, try again later");
        }
        MailboxState::Disabled => return Err("-ERR [AUTH] mailbox disabled"),
    }
    let lock = try_lock(filer, &mailbox.address)
        .ok_or("-ERR [IN-USE] mailbox is locked by another session")?;
    let store = filer.store.clone();
    let address = mailbox.address.clone();
    let opened = tokio::task::spawn_blocking(move || {
        let user = store.user(&mailbox.address, mailbox.uidvalidity_seed)?;
        let uv = user
            .folders()?
            .into_iter()
            .find(|f| f.name == "INBOX")
            .map_or(0, |f| f.uid_validity);
        let messages = user.messages("INBOX")?;
        Ok::<_, crate::store::StoreError>((user, uv, messages))
    })
    .await;
    match opened {
        Ok(Ok((user, uid_validity, messages))) => {
            let deleted = vec![false; messages.len()];
            Ok(Maildrop {
                user,
                address,
                uid_validity,
                messages,
                deleted,
                _lock: lock,
            })
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot open the maildrop");
            Err("-ERR [SYS/TEMP] cannot open the mailbox, try again later")
        }
        Err(_) => Err("-ERR [SYS/TEMP] cannot open the mailbox, try again later"),
    }
}

/// One command in the TRANSACTION state. `Ok(false)` ends the session.
async fn transaction(c: &mut Conn, d: &mut Maildrop, request: Request) -> io::Result<bool> {
    const NO_SUCH: &str = "-ERR no such message";
    match request {
        Request::Capa => capa(c, true),
        Request::Noop => c.say("+OK"),
        Request::Stat => {
            let (n, size) = live(d).fold((0u64, 0u64), |(n, s), (_, m)| (n + 1, s + m.size));
            c.say(&format!("+OK {n} {size}"));
        }
        Request::List(None) => {
            c.say("+OK scan listing follows");
            let lines: Vec<String> = live(d).map(|(n, m)| format!("{n} {}", m.size)).collect();
            for l in lines {
                c.say(&l);
            }
            c.say(".");
        }
        Request::List(Some(n)) => match d.get(n) {
            Some(m) => c.say(&format!("+OK {n} {}", m.size)),
            None => c.say(NO_SUCH),
        },
        Request::Uidl(None) => {
            c.say("+OK unique-id listing follows");
            let lines: Vec<String> = live(d).map(|(n, m)| format!("{n} {}", d.uidl(m))).collect();
            for l in lines {
                c.say(&l);
            }
            c.say(".");
        }
        Request::Uidl(Some(n)) => match d.get(n) {
            Some(m) => {
                let u = d.uidl(m);
                c.say(&format!("+OK {n} {u}"));
            }
            None => c.say(NO_SUCH),
        },
        Request::Retr(n) => match d.get(n).cloned() {
            Some(m) => {
                let path = d.user.path_of(&m);
                c.say(&format!("+OK {} octets", m.size));
                send_message(c, &path, None).await?;
            }
            None => c.say(NO_SUCH),
        },
        Request::Top(n, lines) => match d.get(n).cloned() {
            Some(m) => {
                let path = d.user.path_of(&m);
                c.say("+OK top of message follows");
                send_message(c, &path, Some(lines)).await?;
            }
            None => c.say(NO_SUCH),
        },
        Request::Dele(n) => match d.get(n).is_some() {
            true => {
                if let Some(flag) = d.deleted.get_mut(n as usize - 1) {
                    *flag = true;
                }
                c.say(&format!("+OK message {n} deleted"));
            }
            false => c.say(NO_SUCH),
        },
        Request::Rset => {
            d.deleted.iter_mut().for_each(|f| *f = false);
            c.say("+OK");
        }
        Request::Quit => {
            // The UPDATE state (RFC 1939 §6): only now are deleted messages removed.
            let uids: Vec<u32> = d
                .messages
                .iter()
                .zip(&d.deleted)
                .filter(|(_, del)| **del)
                .map(|(m, _)| m.uid)
                .collect();
            let user = d.user.clone();
            let removed = tokio::task::spawn_blocking(move || user.expunge("INBOX", &uids)).await;
            match removed {
                Ok(Ok(n)) => {
                    tracing::info!(deleted = n, "pop3 update");
                    c.say("+OK bye");
                }
                _ => c.say("-ERR [SYS/TEMP] some deleted messages not removed"),
            }
            return Ok(false);
        }
        Request::User(_) | Request::Pass(_) | Request::Auth { .. } => {
            c.say("-ERR already authenticated")
        }
        Request::Stls => c.say("-ERR STLS is not available here"),
    }
    Ok(true)
}

fn live(d: &Maildrop) -> impl Iterator<Item = (usize, &MessageMeta)> {
    d.messages
        .iter()
        .zip(&d.deleted)
        .enumerate()
        .filter(|(_, (_, del))| !**del)
        .map(|(i, (m, _))| (i + 1, m))
}

/// Streams a message file, dot-stuffed; with `top`, only the headers, the blank line and that
/// many body lines.
async fn send_message(c: &mut Conn, path: &std::path::Path, top: Option<u32>) -> io::Result<()> {
    let mut file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) => {
            // The index lists it but the file is gone: end the listing cleanly.
            tracing::error!(file = %path.display(), error = %e, "message file missing");
            pop3::finish_multiline(true, &mut c.out);
            return Ok(());
        }
    };
    let mut at_line_start = true;
    let mut chunk = vec![0u8; 64 * 1024];
    // For TOP: whether the header section has ended and how many body lines may still go.
    let mut in_body = false;
    let mut body_lines_left = top.unwrap_or(0);
    let mut line_len = 0usize;
    'read: loop {
        let n = file.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        let data = &chunk[..n];
        match top {
            None => pop3::dot_stuff(data, &mut at_line_start, &mut c.out),
            Some(_) => {
                let mut end = data.len();
                let mut done = false;
                for (i, &b) in data.iter().enumerate() {
                    if b == b'\n' {
                        if in_body {
                            body_lines_left = body_lines_left.saturating_sub(1);
                        } else if line_len <= 1 {
                            in_body = true; // the blank line ending the headers
                        }
                        line_len = 0;
                        if in_body && body_lines_left == 0 {
                            end = i + 1;
                            done = true;
                            break;
                        }
                    } else {
                        line_len += 1;
                    }
                }
                pop3::dot_stuff(&data[..end], &mut at_line_start, &mut c.out);
                if done {
                    break 'read;
                }
            }
        }
        if c.out.len() >= WRITE_CHUNK {
            c.flush().await?;
        }
    }
    pop3::finish_multiline(at_line_start, &mut c.out);
    Ok(())
}
