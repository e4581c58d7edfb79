//! One SMTP session from a spool: XFORWARD, MAIL, RCPT, DATA; after DATA the message is
//! scanned, rewritten and reinjected, and only the reinjection's `250` makes ours `250`.

use std::net::SocketAddr;
use std::sync::Arc;

use common::net::ConnId;
use common::smtp::Reply;
use common::smtp::client::{Client, ClientSettings, Protocol};
use common::smtp::server::{Command, Connection, DataEnd, Limits};
use smtp_proto::Request;
use tokio_util::sync::CancellationToken;

use crate::Filter;
use crate::scan::{Action, Envelope, strip_foreign_headers, verdict_headers};
use crate::settings::Settings;

/// Most recipients in one transaction.
const MAX_RECIPIENTS: usize = 1000;
/// Refused commands before the session is closed.
const MAX_ERRORS: u32 = 20;

/// The connection limits of a filter session.
pub(crate) fn limits(s: &Settings) -> Limits {
    Limits {
        max_line_len: 4096,
        command_timeout: s.timeout,
        data_timeout: s.timeout,
        session_timeout: std::time::Duration::from_secs(3600),
        max_message_size: s.max_message_size.bytes(),
    }
}

/// Runs one session to its end.
pub(crate) async fn run(
    filter: Arc<Filter>,
    mut conn: Connection,
    id: ConnId,
    shutdown: CancellationToken,
) {
    let host = filter.settings.shared.hostname.clone();
    conn.reply(&Reply::ok(220, "", format!("{host} ESMTP filter")));
    let mut greeted = false;
    let mut env: Option<Envelope> = None;
    let mut xforward = Envelope::default();
    let mut errors = 0u32;
    loop {
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
                errors += 1;
                if e.is_fatal() || errors >= MAX_ERRORS {
                    break;
                }
                continue;
            }
        };
        let reply = match command {
            Command::Unknown { verb, line } if verb == "XFORWARD" => {
                if env.is_some() {
                    Reply::perm(503, "5.5.1", "XFORWARD not allowed in a transaction")
                } else {
                    match parse_xforward(&line, &mut xforward) {
                        Ok(()) => Reply::ok(250, "2.0.0", "ok"),
                        Err(why) => Reply::perm(501, "5.5.4", why),
                    }
                }
            }
            Command::Unknown { .. } => Reply::perm(500, "5.5.1", "command not recognized"),
            Command::Request(req) => match req {
                Request::Ehlo { .. } => {
                    greeted = true;
                    env = None;
                    Reply::multiline(
                        250,
                        "",
                        vec![
                            host.clone(),
                            "PIPELINING".into(),
                            format!("SIZE {}", filter.settings.max_message_size.bytes()),
                            "8BITMIME".into(),
                            "SMTPUTF8".into(),
                            "ENHANCEDSTATUSCODES".into(),
                            "XFORWARD NAME ADDR PROTO HELO SOURCE IDENT".into(),
                        ],
                    )
                }
                Request::Helo { .. } => {
                    greeted = true;
                    env = None;
                    Reply::ok(250, "", host.clone())
                }
                Request::Mail { from } if greeted && env.is_none() => {
                    env = Some(Envelope {
                        mail_from: from.address,
                        recipients: Vec::new(),
                        ..xforward.clone()
                    });
                    Reply::ok(250, "2.1.0", "ok")
                }
                Request::Mail { .. } => Reply::perm(503, "5.5.1", "bad sequence of commands"),
                Request::Rcpt { to } => match env.as_mut() {
                    Some(e) if e.recipients.len() >= MAX_RECIPIENTS => {
                        Reply::temp(452, "4.5.3", "too many recipients")
                    }
                    Some(e) => {
                        e.recipients.push(to.address);
                        Reply::ok(250, "2.1.5", "ok")
                    }
                    None => Reply::perm(503, "5.5.1", "send MAIL first"),
                },
                Request::Data => match env.take() {
                    Some(e) if !e.recipients.is_empty() => {
                        let reply = data(&filter, &mut conn, e, id).await;
                        xforward = Envelope::default();
                        match reply {
                            Some(r) => r,
                            None => break,
                        }
                    }
                    other => {
                        env = other;
                        Reply::perm(503, "5.5.1", "send MAIL and RCPT first")
                    }
                },
                Request::Rset => {
                    env = None;
                    Reply::ok(250, "2.0.0", "ok")
                }
                Request::Noop { .. } => Reply::ok(250, "2.0.0", "ok"),
                Request::Quit => {
                    conn.reply(&Reply::ok(221, "2.0.0", "bye"));
                    break;
                }
                _ => Reply::perm(502, "5.5.1", "command not implemented"),
            },
        };
        if reply.is_permanent() {
            errors += 1;
        }
        conn.reply(&reply);
        if errors >= MAX_ERRORS {
            break;
        }
    }
    let _ = conn.close().await;
}

/// Reads the message, scans it, reinjects it; the reply for the spool (`None`: the connection
/// is gone).
async fn data(
    filter: &Arc<Filter>,
    conn: &mut Connection,
    env: Envelope,
    id: ConnId,
) -> Option<Reply> {
    conn.reply(&Reply::ok(354, "", "go ahead"));
    let mut message = Vec::new();
    match conn.read_data(&mut message).await {
        Ok(DataEnd::Complete { .. }) => {}
        Ok(end) => {
            return Some(
                end.reply()
                    .unwrap_or_else(|| Reply::temp(451, "4.3.0", "local error")),
            );
        }
        Err(e) => {
            if e.is_fatal() {
                return None;
            }
            return Some(
                e.reply()
                    .unwrap_or_else(|| Reply::temp(451, "4.3.0", "local error")),
            );
        }
    }
    let message: Arc<[u8]> = message.into();
    let started = tokio::time::Instant::now();
    let verdict = filter.scan(&message, &env).await;
    let s = &filter.settings;
    let mut out = verdict_headers(&verdict, s.tag_score).into_bytes();
    out.extend_from_slice(&strip_foreign_headers(&message, &s.shared.hostname));
    let recipients = match (verdict.action, &s.quarantine) {
        (Action::Quarantine, Some(q)) => vec![q.clone()],
        _ => env.recipients.clone(),
    };
    let reasons: Vec<&str> = verdict.reasons.iter().map(|(n, _)| n.as_str()).collect();
    tracing::info!(
        conn = %id,
        ident = %env.ident,
        client = ?env.client_ip,
        action = ?verdict.action,
        score = verdict.score,
        reasons = %reasons.join(","),
        "scanned"
    );
    let Some(target) = s.reinject else {
        tracing::error!("no reinjection target configured");
        return Some(Reply::temp(451, "4.3.0", "filter has nowhere to reinject"));
    };
    let reply = reinject(s, target, &env.mail_from, &recipients, &out).await;
    let took = started.elapsed();
    common::obs::messages("filter", "scanned", 1);
    if verdict.action != Action::Pass {
        common::obs::messages("filter", "spam", 1);
    }
    common::obs::trace(common::obs::TraceEvent {
        at_us: common::obs::now_us().saturating_sub(took.as_micros() as u64),
        service: "filter".into(),
        event: "scanned".into(),
        queue_id: (!env.ident.is_empty()).then(|| env.ident.clone()),
        message_id: common::obs::message_id(&message),
        from: env.mail_from.clone(),
        to: recipients.clone(),
        peer: target.to_string(),
        result: format!(
            "{:?} score {:.1} [{}]; reinjected: {reply}",
            verdict.action,
            verdict.score,
            reasons.join(",")
        ),
        duration_ms: Some(took.as_millis() as u64),
    });
    Some(reply)
}

/// Sends the filtered message back to a spool; our answer follows its answer.
async fn reinject(
    s: &Settings,
    target: SocketAddr,
    mail_from: &str,
    recipients: &[String],
    message: &[u8],
) -> Reply {
    let mut cs = ClientSettings::new(s.shared.hostname.clone(), Protocol::Smtp);
    cs.connect_timeout = s.reinject_timeout.min(std::time::Duration::from_secs(10));
    cs.command_timeout = s.reinject_timeout;
    cs.data_timeout = s.reinject_timeout;
    let mut client = match Client::connect(target, &cs).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%target, error = %e, "reinjection unreachable");
            return Reply::temp(451, "4.3.0", "reinjection failed, try again later");
        }
    };
    let result = client.send(mail_from, recipients, message).await;
    client.quit().await;
    match result {
        Ok(replies) if replies.iter().all(Reply::is_positive) => {
            let last = replies.last().map(Reply::to_string).unwrap_or_default();
            Reply::ok(250, "2.0.0", format!("filtered; reinjected: {last}"))
        }
        Ok(replies) if replies.iter().any(Reply::is_positive) => {
            // Some recipients went in, some were refused for good: the ones in must not be
            // sent twice, so this is a success; the refusals are logged.
            for (r, reply) in recipients.iter().zip(&replies) {
                if !reply.is_positive() {
                    tracing::warn!(rcpt = %r, %reply, "reinjection refused a recipient");
                }
            }
            Reply::ok(250, "2.0.0", "filtered; reinjected in part")
        }
        Ok(replies) => {
            let first = replies.first().cloned();
            match first {
                Some(r) if replies.iter().all(Reply::is_permanent) => {
                    Reply::perm(554, "5.0.0", format!("reinjection refused: {r}"))
                }
                _ => Reply::temp(451, "4.3.0", "reinjection deferred, try again later"),
            }
        }
        Err(e) => {
            tracing::warn!(%target, error = %e, "reinjection failed");
            Reply::temp(451, "4.3.0", "reinjection failed, try again later")
        }
    }
}

/// Reads `XFORWARD name=value ...` (Postfix XFORWARD_README; values xtext-encoded) into
/// `into`. `[UNAVAILABLE]` leaves an attribute unset.
fn parse_xforward(line: &str, into: &mut Envelope) -> Result<(), &'static str> {
    let args = line.get(8..).unwrap_or("").trim();
    if args.is_empty() {
        return Err("syntax: XFORWARD attribute=value ...");
    }
    for pair in args.split_ascii_whitespace() {
        let Some((name, value)) = pair.split_once('=') else {
            return Err("syntax: XFORWARD attribute=value ...");
        };
        let value = xtext_decode(value).ok_or("bad xtext value")?;
        if value == "[UNAVAILABLE]" || value == "[TEMPUNAVAIL]" {
            continue;
        }
        match name.to_ascii_uppercase().as_str() {
            "ADDR" => {
                let v = value.strip_prefix("IPV6:").unwrap_or(&value);
                into.client_ip = v.parse().ok();
            }
            "HELO" => into.helo = value.chars().take(255).collect(),
            "IDENT" => into.ident = value.chars().take(64).collect(),
            "NAME" | "PROTO" | "SOURCE" | "PORT" => {}
            _ => return Err("unknown XFORWARD attribute"),
        }
    }
    Ok(())
}

fn xtext_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'+' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xforward_attributes_are_read() {
        let mut e = Envelope::default();
        parse_xforward(
            "XFORWARD ADDR=192.0.2.7 HELO=mx+2Eexample.test NAME=[UNAVAILABLE] IDENT=ABC",
            &mut e,
        )
        .unwrap();
        assert_eq!(e.client_ip, Some("192.0.2.7".parse().unwrap()));
        assert_eq!(e.helo, "mx.example.test");
        assert_eq!(e.ident, "ABC");
        parse_xforward("XFORWARD ADDR=IPV6:2001:db8::1", &mut e).unwrap();
        assert_eq!(e.client_ip, Some("2001:db8::1".parse().unwrap()));
        assert!(parse_xforward("XFORWARD", &mut e).is_err());
        assert!(parse_xforward("XFORWARD EVIL=1", &mut e).is_err());
        assert!(parse_xforward("XFORWARD HELO=+zz", &mut e).is_err());
    }
}
