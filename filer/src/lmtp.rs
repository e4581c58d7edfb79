//! The LMTP listener (RFC 2033): deliveries from spools, one reply per recipient.
//!
//! Only peers in `trust.spool_networks` may connect. Each accepted recipient is checked against
//! the location database (it must live on *this* filer), and after DATA each gets its own
//! reply, sent only once its copy is durable in the Maildir and the index.

use std::sync::Arc;

use common::address::{Address, ParseOptions};
use common::location::{Mailbox, MailboxState};
use common::net::ConnId;
use common::smtp::Reply;
use common::smtp::server::{Command, Connection, DataEnd, Limits};
use smtp_proto::Request;
use tokio_util::sync::CancellationToken;

use crate::Filer;
use crate::store::{JUNK, StoreError};

/// Bad commands tolerated before the session is closed.
const MAX_ERRORS: u32 = 10;

/// One accepted recipient of the current transaction.
struct Rcpt {
    /// As the spool wrote it (for `Received: ... for <..>`).
    forward_path: String,
    mailbox: Mailbox,
}

/// The session state: each variant carries only what is valid in it.
enum State {
    Connected,
    Greeted {
        lhlo: String,
    },
    Mail {
        lhlo: String,
        reverse_path: String,
        size_hint: Option<u64>,
        rcpts: Vec<Rcpt>,
    },
}

/// Runs one LMTP session to its end.
pub(crate) async fn session(
    filer: Arc<Filer>,
    mut conn: Connection,
    id: ConnId,
    shutdown: CancellationToken,
) {
    let host = filer.settings.shared.hostname.clone();
    conn.reply(&Reply::ok(220, "", format!("{host} LMTP ready")));
    let mut state = State::Connected;
    let mut errors = 0u32;
    loop {
        // Shutdown ends a session between commands; a message in DATA is finished first.
        let read = tokio::select! {
            biased;
            _ = shutdown.cancelled() => None,
            r = conn.read_command() => Some(r),
        };
        let Some(read) = read else {
            conn.reply(&Reply::temp(421, "4.3.2", format!("{host} shutting down")));
            break;
        };
        let command = match read {
            Ok(c) => c,
            Err(e) => {
                if let Some(r) = e.reply() {
                    conn.reply(&r);
                }
                if e.is_fatal() || bump(&mut errors) {
                    break;
                }
                continue;
            }
        };
        let (next, reply, flow) = match command {
            Command::Request(req) => handle(&filer, &mut conn, state, req, id).await,
            Command::Unknown { .. } => (
                state,
                Reply::perm(500, "5.5.1", "command not recognized"),
                Flow::Continue,
            ),
        };
        state = next;
        if reply.is_permanent() && bump(&mut errors) {
            conn.reply(&reply);
            conn.reply(&Reply::temp(421, "4.7.0", "too many errors"));
            break;
        }
        if reply.code != 0 {
            conn.reply(&reply);
        }
        if let Flow::Close = flow {
            break;
        }
    }
    let _ = conn.flush().await;
}

/// Whether to go on after a handler.
enum Flow {
    Continue,
    Close,
}

fn bump(errors: &mut u32) -> bool {
    *errors += 1;
    *errors >= MAX_ERRORS
}

/// A reply that was already written by the handler (after DATA: one per recipient).
fn none() -> Reply {
    Reply {
        code: 0,
        enhanced: None,
        lines: Vec::new(),
    }
}

async fn handle(
    filer: &Arc<Filer>,
    conn: &mut Connection,
    state: State,
    req: Request<String>,
    id: ConnId,
) -> (State, Reply, Flow) {
    let host = &filer.settings.shared.hostname;
    match (req, state) {
        (Request::Lhlo { host: client }, _) => {
            let lines = vec![
                host.clone(),
                "PIPELINING".into(),
                "ENHANCEDSTATUSCODES".into(),
                "8BITMIME".into(),
                "SMTPUTF8".into(),
                format!("SIZE {}", filer.settings.max_message_size.bytes()),
            ];
            (
                State::Greeted { lhlo: client },
                Reply::multiline(250, "", lines),
                Flow::Continue,
            )
        }
        (Request::Helo { .. } | Request::Ehlo { .. }, state) => (
            state,
            Reply::perm(500, "5.5.1", "this is LMTP: use LHLO (RFC 2033)"),
            Flow::Continue,
        ),
        (Request::Quit, _) => (
            State::Connected,
            Reply::ok(221, "2.0.0", "bye"),
            Flow::Close,
        ),
        (Request::Noop { .. }, state) => (state, Reply::ok(250, "2.0.0", "ok"), Flow::Continue),
        (Request::Rset, State::Mail { lhlo, .. } | State::Greeted { lhlo }) => (
            State::Greeted { lhlo },
            Reply::ok(250, "2.0.0", "reset"),
            Flow::Continue,
        ),
        (Request::Rset, State::Connected) => (
            State::Connected,
            Reply::ok(250, "2.0.0", "reset"),
            Flow::Continue,
        ),
        (Request::Vrfy { .. }, state) => (
            state,
            Reply::ok(252, "2.5.0", "cannot verify, but will attempt delivery"),
            Flow::Continue,
        ),
        (Request::Mail { from }, State::Greeted { lhlo }) => {
            let size_hint = (from.size > 0).then_some(from.size as u64);
            if size_hint.is_some_and(|s| s > filer.settings.max_message_size.bytes()) {
                let r = Reply::perm(552, "5.3.4", "message size exceeds the limit");
                return (State::Greeted { lhlo }, r, Flow::Continue);
            }
            let reverse_path = from.address;
            if !reverse_path.is_empty()
                && Address::parse_with(&reverse_path, ParseOptions::SMTPUTF8).is_err()
            {
                return (
                    State::Greeted { lhlo },
                    Reply::perm(553, "5.1.7", "bad sender address"),
                    Flow::Continue,
                );
            }
            let s = State::Mail {
                lhlo,
                reverse_path,
                size_hint,
                rcpts: Vec::new(),
            };
            (s, Reply::ok(250, "2.1.0", "sender ok"), Flow::Continue)
        }
        (
            Request::Mail { .. },
            State::Mail {
                lhlo,
                reverse_path,
                size_hint,
                rcpts,
            },
        ) => {
            let s = State::Mail {
                lhlo,
                reverse_path,
                size_hint,
                rcpts,
            };
            (
                s,
                Reply::perm(503, "5.5.1", "nested MAIL command"),
                Flow::Continue,
            )
        }
        (Request::Mail { .. }, State::Connected) => (
            State::Connected,
            Reply::perm(503, "5.5.1", "send LHLO first"),
            Flow::Continue,
        ),
        (
            Request::Rcpt { to },
            State::Mail {
                lhlo,
                reverse_path,
                size_hint,
                mut rcpts,
            },
        ) => {
            let reply = if rcpts.len() >= filer.settings.max_recipients {
                Reply::temp(452, "4.5.3", "too many recipients")
            } else {
                match check_recipient(filer, &to.address, size_hint).await {
                    Ok(mailbox) => {
                        rcpts.push(Rcpt {
                            forward_path: to.address,
                            mailbox,
                        });
                        Reply::ok(250, "2.1.5", "recipient ok")
                    }
                    Err(r) => r,
                }
            };
            (
                State::Mail {
                    lhlo,
                    reverse_path,
                    size_hint,
                    rcpts,
                },
                reply,
                Flow::Continue,
            )
        }
        (Request::Rcpt { .. }, state) => (
            state,
            Reply::perm(503, "5.5.1", "send MAIL first"),
            Flow::Continue,
        ),
        (
            Request::Data,
            State::Mail {
                lhlo,
                reverse_path,
                rcpts,
                ..
            },
        ) if !rcpts.is_empty() => {
            conn.reply(&Reply::ok(
                354,
                "",
                "send the message, end with <CRLF>.<CRLF>",
            ));
            let mut body = Vec::new();
            match conn.read_data(&mut body).await {
                Ok(DataEnd::Complete { .. }) => {
                    let peer = conn.peer().ip();
                    let replies =
                        deliver(filer, peer, &lhlo, &reverse_path, &rcpts, &body, id).await;
                    for r in &replies {
                        conn.reply(r);
                    }
                    (State::Greeted { lhlo }, none(), Flow::Continue)
                }
                Ok(end) => {
                    // Too big or the sink failed: one reply per recipient all the same.
                    let r = end
                        .reply()
                        .unwrap_or_else(|| Reply::temp(451, "4.3.0", "local error"));
                    for _ in &rcpts {
                        conn.reply(&r);
                    }
                    (State::Greeted { lhlo }, none(), Flow::Continue)
                }
                Err(e) => {
                    let r = e.reply().unwrap_or_else(none);
                    let flow = if e.is_fatal() {
                        Flow::Close
                    } else {
                        Flow::Continue
                    };
                    (State::Greeted { lhlo }, r, flow)
                }
            }
        }
        (
            Request::Data,
            State::Mail {
                lhlo,
                reverse_path,
                size_hint,
                rcpts,
            },
        ) => {
            let s = State::Mail {
                lhlo,
                reverse_path,
                size_hint,
                rcpts,
            };
            (
                s,
                Reply::perm(503, "5.5.1", "no valid recipients"),
                Flow::Continue,
            )
        }
        (Request::Data, state) => (
            state,
            Reply::perm(503, "5.5.1", "send MAIL first"),
            Flow::Continue,
        ),
        (Request::Bdat { .. }, state) => (
            state,
            Reply::perm(502, "5.5.1", "CHUNKING is not offered"),
            Flow::Continue,
        ),
        (Request::StartTls, state) => (
            state,
            Reply::perm(502, "5.5.1", "STARTTLS is not offered"),
            Flow::Continue,
        ),
        (Request::Auth { .. }, state) => (
            state,
            Reply::perm(502, "5.5.1", "AUTH is not offered"),
            Flow::Continue,
        ),
        (_, state) => (
            state,
            Reply::perm(502, "5.5.1", "command not implemented"),
            Flow::Continue,
        ),
    }
}

/// Checks one recipient: the answer the spool needs to decide between deliver, retry
/// elsewhere, retry later and bounce.
async fn check_recipient(
    filer: &Filer,
    forward_path: &str,
    size_hint: Option<u64>,
) -> Result<Mailbox, Reply> {
    let Ok(addr) = Address::parse_with(forward_path, ParseOptions::SMTPUTF8) else {
        return Err(Reply::perm(553, "5.1.3", "bad recipient address syntax"));
    };
    let mailbox = match filer.directory.mailbox(&addr.key()).await {
        Ok(Some(m)) => m,
        Ok(None) => return Err(Reply::perm(550, "5.1.1", "no such user here")),
        Err(e) => {
            tracing::warn!(error = %e, "location lookup failed");
            return Err(Reply::temp(
                451,
                "4.3.0",
                "temporary lookup failure, try again later",
            ));
        }
    };
    if mailbox.filer != filer.settings.name {
        // A stale route: the spool looked the mailbox up before it moved.
        return Err(Reply::temp(
            451,
            "4.4.0",
            format!("mailbox is not on this filer (it is on {})", mailbox.filer),
        ));
    }
    match mailbox.state {
        MailboxState::Disabled => return Err(Reply::perm(550, "5.2.1", "mailbox disabled")),
        MailboxState::Moving => {
            return Err(Reply::temp(
                451,
                "4.2.0",
                "mailbox is being moved, try again later",
            ));
        }
        MailboxState::Active => {}
    }
    if let (Some(size), true) = (size_hint, mailbox.quota > 0) {
        let store = filer.store.clone();
        let (addr, seed) = (mailbox.address.clone(), mailbox.uidvalidity_seed);
        let usage =
            tokio::task::spawn_blocking(move || store.user(&addr, seed).and_then(|u| u.usage()))
                .await;
        if let Ok(Ok(used)) = usage
            && used + size > mailbox.quota
        {
            return Err(Reply::temp(452, "4.2.2", "mailbox full"));
        }
    }
    Ok(mailbox)
}

/// Why one recipient's delivery did not happen.
enum Refusal {
    /// Refused before writing, with this reply.
    Reply(Reply),
    /// The store failed.
    Store(StoreError),
}

/// `None` when the mailbox is still active on this filer, by a fresh (uncached) lookup;
/// otherwise the temporary reply for its recipient.
async fn still_here(filer: &Filer, address: &str) -> Option<Reply> {
    match filer.directory.mailbox_fresh(address).await {
        Ok(Some(m)) if m.filer != filer.settings.name => Some(Reply::temp(
            451,
            "4.4.0",
            format!("mailbox is not on this filer (it is on {})", m.filer),
        )),
        Ok(Some(m)) if m.state == MailboxState::Moving => Some(Reply::temp(
            451,
            "4.2.0",
            "mailbox is being moved, try again later",
        )),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(error = %e, "location lookup failed");
            Some(Reply::temp(
                451,
                "4.3.0",
                "temporary lookup failure, try again later",
            ))
        }
    }
}

/// Delivers the message to every recipient concurrently (their fsyncs share journal commits)
/// and returns one reply per recipient, in order.
async fn deliver(
    filer: &Arc<Filer>,
    peer: std::net::IpAddr,
    lhlo: &str,
    reverse_path: &str,
    rcpts: &[Rcpt],
    body: &[u8],
    id: ConnId,
) -> Vec<Reply> {
    let junk = is_spam_flagged(body);
    let folder = if junk { JUNK } else { "INBOX" };
    let date = mail_parser::DateTime::from_timestamp(now()).to_rfc822();
    let body: Arc<[u8]> = Arc::from(body);
    let mut tasks = Vec::with_capacity(rcpts.len());
    for r in rcpts {
        // The last check before the write, past every cache: a migration that marked the
        // mailbox `moving` (or moved it away) since RCPT must not get a message here that its
        // final copy would miss. The spool retries it, and delivers it after the move.
        if let Some(reply) = still_here(filer, &r.mailbox.address).await {
            tasks.push(tokio::task::spawn_blocking(move || {
                Err(Refusal::Reply(reply))
            }));
            continue;
        }
        let header = format!(
            "Return-Path: <{reverse_path}>\r\nReceived: from {lhlo} ({peer})\r\n\tby {host} (filer {name}) with LMTP id {id}\r\n\tfor <{rcpt}>; {date}\r\n",
            lhlo = sanitize(lhlo),
            host = filer.settings.shared.hostname,
            name = filer.settings.name,
            rcpt = sanitize(&r.forward_path),
        );
        let store = filer.store.clone();
        let body = body.clone();
        let m = r.mailbox.clone();
        tasks.push(tokio::task::spawn_blocking(move || {
            let mut data = Vec::with_capacity(header.len() + body.len());
            data.extend_from_slice(header.as_bytes());
            data.extend_from_slice(&body);
            store
                .user(&m.address, m.uidvalidity_seed)
                .and_then(|u| u.deliver(folder, &data, m.quota))
                .map_err(Refusal::Store)
        }));
    }
    let mut replies = Vec::with_capacity(rcpts.len());
    for (task, r) in tasks.into_iter().zip(rcpts) {
        let reply = match task.await {
            Ok(Ok(d)) => {
                tracing::info!(rcpt = %r.mailbox.address, folder, uid = d.uid, size = body.len(), "delivered");
                common::obs::messages("filer", "stored", 1);
                common::obs::trace(common::obs::TraceEvent {
                    service: filer.settings.name.clone(),
                    event: "stored".into(),
                    message_id: common::obs::message_id(&body),
                    from: reverse_path.to_string(),
                    to: vec![r.mailbox.address.clone()],
                    result: format!("{folder} uid {}", d.uid),
                    ..common::obs::TraceEvent::default()
                });
                Reply::ok(
                    250,
                    "2.0.0",
                    format!("<{}> delivered, uid {}", r.mailbox.address, d.uid),
                )
            }
            Ok(Err(Refusal::Reply(reply))) => reply,
            Ok(Err(Refusal::Store(StoreError::QuotaExceeded { .. }))) => {
                tracing::info!(rcpt = %r.mailbox.address, "over quota");
                Reply::temp(
                    452,
                    "4.2.2",
                    format!("<{}> mailbox full", r.mailbox.address),
                )
            }
            Ok(Err(Refusal::Store(e))) if e.is_disk_full() => {
                tracing::error!(rcpt = %r.mailbox.address, error = %e, "disk full");
                Reply::temp(452, "4.3.1", "insufficient system storage, try again later")
            }
            Ok(Err(Refusal::Store(e))) => {
                tracing::error!(rcpt = %r.mailbox.address, error = %e, "delivery failed");
                Reply::temp(451, "4.3.0", "local error in processing, try again later")
            }
            Err(e) => {
                tracing::error!(rcpt = %r.mailbox.address, error = %e, "delivery task failed");
                Reply::temp(451, "4.3.0", "local error in processing, try again later")
            }
        };
        replies.push(reply);
    }
    replies
}

/// Peer-supplied text in a header: printable ASCII only, bounded.
fn sanitize(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(255)
        .collect()
}

/// Whether the header section carries `X-Spam-Flag: YES` (added by the filter chain).
fn is_spam_flagged(message: &[u8]) -> bool {
    let mut rest = message;
    loop {
        let line_end = rest
            .iter()
            .position(|&b| b == b'\n')
            .map_or(rest.len(), |p| p + 1);
        let line = &rest[..line_end];
        if line.is_empty() || line == b"\r\n" || line == b"\n" {
            return false; // end of the header section
        }
        if let Some(colon) = line.iter().position(|&b| b == b':') {
            let (name, value) = line.split_at(colon);
            if name.eq_ignore_ascii_case(b"X-Spam-Flag") {
                let v = String::from_utf8_lossy(&value[1..]);
                if v.trim().eq_ignore_ascii_case("YES") {
                    return true;
                }
            }
        }
        rest = &rest[line_end..];
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The connection limits of an LMTP session.
pub(crate) fn limits(filer: &Filer) -> Limits {
    Limits {
        max_line_len: 4096,
        command_timeout: filer.settings.lmtp_timeout,
        data_timeout: filer.settings.lmtp_timeout,
        session_timeout: std::time::Duration::from_secs(3600),
        max_message_size: filer.settings.max_message_size.bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spam_flag_is_found_in_headers_only() {
        assert!(is_spam_flagged(
            b"Subject: x\r\nX-Spam-Flag: YES\r\n\r\nbody\r\n"
        ));
        assert!(is_spam_flagged(b"x-spam-flag:yes\r\n\r\n"));
        assert!(!is_spam_flagged(b"X-Spam-Flag: NO\r\n\r\n"));
        assert!(!is_spam_flagged(b"Subject: x\r\n\r\nX-Spam-Flag: YES\r\n"));
        assert!(!is_spam_flagged(b""));
    }
}
