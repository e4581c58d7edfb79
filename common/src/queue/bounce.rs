//! Delivery status notifications (RFC 3464): a `multipart/report` with a human-readable part,
//! the machine-readable `message/delivery-status` and the original message's header section
//! (`text/rfc822-headers`, RFC 6522), built with lettre's message builder.

use super::{Envelope, Recipient};
use lettre::message::header::{ContentTransferEncoding, ContentType, HeaderName, HeaderValue};
use lettre::message::{Body, Mailbox, Message, MultiPart, SinglePart};

/// Most bytes of the original header section quoted in a bounce.
const MAX_QUOTED_HEADERS: usize = 64 * 1024;

/// Why no bounce could be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build a bounce: {0}")]
pub struct BounceError(String);

/// The bounce for the `failed` recipients of `envelope`, addressed to its sender.
pub fn build(
    hostname: &str,
    envelope: &Envelope,
    failed: &[&Recipient],
    original: &[u8],
) -> Result<Vec<u8>, BounceError> {
    let err = |e: &dyn std::fmt::Display| BounceError(e.to_string());
    let daemon: Mailbox = format!("Mail Delivery System <MAILER-DAEMON@{hostname}>")
        .parse()
        .map_err(|e| err(&e))?;
    let builder = Message::builder()
        .from(daemon.clone())
        .subject("Undelivered Mail Returned to Sender")
        .date_now()
        .message_id(Some(format!("<{}.bounce@{hostname}>", envelope.id)))
        // RFC 3834 §5: automatic replies are marked, so nobody answers them automatically.
        .raw_header(HeaderValue::new(
            HeaderName::new_from_ascii_str("Auto-Submitted"),
            "auto-replied".to_owned(),
        ));
    let builder = match envelope.reverse_path.parse::<Mailbox>() {
        Ok(to) => builder.to(to),
        // An address lettre cannot write in a header (a quoted local part, say): name it
        // as it is; the SMTP envelope is ours anyway.
        Err(_) => builder
            .raw_header(HeaderValue::new(
                HeaderName::new_from_ascii_str("To"),
                format!("<{}>", envelope.reverse_path),
            ))
            .envelope(
                lettre::address::Envelope::new(
                    Some(daemon.email.clone()),
                    vec![daemon.email.clone()],
                )
                .map_err(|e| err(&e))?,
            ),
    };
    let mut report = MultiPart::mixed()
        .singlepart(SinglePart::plain(explanation(hostname, failed)))
        .singlepart(
            // RFC 3464 §2.1 and RFC 2046 §5.2: a message/* part is never encoded, so it is
            // kept to 7-bit ASCII lines.
            SinglePart::builder()
                .header(ContentType::parse("message/delivery-status").map_err(|e| err(&e))?)
                .body(
                    Body::new_with_encoding(
                        delivery_status(hostname, envelope, failed),
                        ContentTransferEncoding::SevenBit,
                    )
                    .map_err(|_| BounceError("delivery status is not 7-bit".into()))?,
                ),
        )
        .singlepart(
            SinglePart::builder()
                .header(ContentType::parse("text/rfc822-headers").map_err(|e| err(&e))?)
                .body(header_section(original)),
        );
    let content_type = ContentType::parse(&format!(
        "multipart/report; report-type=delivery-status; boundary=\"{}\"",
        report.boundary()
    ))
    .map_err(|e| err(&e))?;
    report.headers_mut().set(content_type);
    let message = builder.multipart(report).map_err(|e| err(&e))?;
    Ok(message.formatted())
}

fn explanation(hostname: &str, failed: &[&Recipient]) -> String {
    let mut text = format!(
        "This is the mail system at host {hostname}.\r\n\r\n\
         Your message could not be delivered to one or more recipients.\r\n\
         It is attached below.\r\n\r\n"
    );
    for r in failed {
        text.push_str(&format!(
            "<{}>: {}\r\n",
            r.original.as_deref().unwrap_or(&r.address),
            r.last_reply.as_deref().unwrap_or("failed")
        ));
    }
    text
}

/// The `message/delivery-status` body: per-message fields, then one block per recipient.
/// Every line is printable ASCII, folded to at most 76 characters (see [`line`]).
fn delivery_status(hostname: &str, envelope: &Envelope, failed: &[&Recipient]) -> String {
    let mut s = String::new();
    line(&mut s, "Reporting-MTA", &format!("dns; {hostname}"));
    line(&mut s, "X-Queue-ID", envelope.id.as_str());
    line(&mut s, "Arrival-Date", &rfc822_date(envelope.queued_ms));
    if !envelope.helo.is_empty() {
        line(
            &mut s,
            "Received-From-MTA",
            &format!("dns; {}", envelope.helo),
        );
    }
    for r in failed {
        let reply = r.last_reply.as_deref().unwrap_or("failed");
        s.push_str("\r\n");
        // RFC 6533 would carry a UTF-8 address as utf-8; we keep the part 7-bit instead.
        line(&mut s, "Final-Recipient", &format!("rfc822; {}", r.address));
        if let Some(o) = &r.original {
            line(&mut s, "Original-Recipient", &format!("rfc822; {o}"));
        }
        line(&mut s, "Action", "failed");
        line(&mut s, "Status", &status_of(reply));
        line(&mut s, "Diagnostic-Code", &format!("smtp; {reply}"));
    }
    s
}

/// Appends `name: value` as printable ASCII (anything else becomes a space), at most 500
/// characters of value, folded at spaces (RFC 5322 §2.2.3) so no line passes 76 characters.
fn line(out: &mut String, name: &str, value: &str) {
    const MAX: usize = 76;
    let value: String = value
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { ' ' })
        .take(500)
        .collect();
    let mut current = format!("{name}:");
    for word in value.split(' ').filter(|w| !w.is_empty()) {
        if current.len() + 1 + word.len() > MAX && current.trim().len() > name.len() + 1 {
            out.push_str(&current);
            out.push_str("\r\n");
            current = String::new();
        }
        current.push(' ');
        // A word longer than a line is cut: a diagnostic loses nothing that matters.
        current.push_str(word.get(..MAX - 2).unwrap_or(word));
    }
    out.push_str(&current);
    out.push_str("\r\n");
}

/// The enhanced status code inside a reply text such as `550 5.1.1 no such user`, or a
/// generic one.
fn status_of(reply: &str) -> String {
    reply
        .split_whitespace()
        .take(2)
        .find_map(crate::smtp::EnhancedCode::parse)
        .map_or_else(|| "5.0.0".to_owned(), |c| c.to_string())
}

/// The original header section, up to the empty line, bounded.
fn header_section(message: &[u8]) -> String {
    let end = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(message.len(), |p| p + 2);
    let head = message
        .get(..end.min(MAX_QUOTED_HEADERS))
        .unwrap_or_default();
    String::from_utf8_lossy(head).into_owned()
}

fn rfc822_date(ms: u64) -> String {
    mail_parser::DateTime::from_timestamp(i64::try_from(ms / 1000).unwrap_or(0)).to_rfc822()
}

#[cfg(test)]
mod tests {
    use crate::queue::{Origin, QueueId, RecipientState};

    use super::*;

    #[test]
    fn a_bounce_is_a_delivery_status_report() {
        let mut r = Recipient::new("x@example.test".into(), Some("alias@example.test".into()));
        r.state = RecipientState::Failed;
        r.last_reply = Some("550 5.2.1 mailbox disabled".into());
        let env = Envelope {
            id: QueueId::generate(),
            reverse_path: "sender@example.test".into(),
            smtputf8: false,
            origin: Origin::Smtp,
            queued_ms: 0,
            conn: "C".into(),
            client_ip: "127.0.0.1".into(),
            helo: "client.test".into(),
            size: 1,
            held: false,
            recipients: vec![r.clone()],
        };
        let original = b"Received: x\r\nSubject: hi\r\n\r\nsecret body\r\n";
        let bytes = build("mx.example.test", &env, &[&r], original).unwrap();
        let text = String::from_utf8(bytes).unwrap();
        for want in [
            "multipart/report; report-type=delivery-status",
            "To: sender@example.test",
            "Auto-Submitted: auto-replied",
            "Content-Type: message/delivery-status",
            "Final-Recipient: rfc822; x@example.test",
            "Original-Recipient: rfc822; alias@example.test",
            "Status: 5.2.1",
            "Content-Type: text/rfc822-headers",
            "Subject: hi",
        ] {
            assert!(text.contains(want), "{want} missing in {text}");
        }
        assert!(!text.contains("secret body"), "only the headers are quoted");
        let mut long = String::new();
        line(
            &mut long,
            "Diagnostic-Code",
            &format!("smtp; 452 {}", "word ".repeat(40)),
        );
        assert!(long.lines().all(|l| l.len() <= 76), "{long}");
        assert!(long.lines().skip(1).all(|l| l.starts_with(' ')), "{long}");
    }
}
