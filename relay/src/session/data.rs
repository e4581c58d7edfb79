//! DATA: the message is read (bounded by `max_message_size`), its `From:` checked against the
//! user, `Date:` and `Message-ID:` added when missing (RFC 6409 §8), DKIM-signed when its
//! `From:` domain has a key, then queued and fsynced before `250`.
//!
//! The message is held in memory while it is checked and signed (a signature covers the whole
//! body); the session limit and `max_connections` bound what that can cost.

use common::queue::{Envelope, Incoming, Origin, Recipient, StoreError, now_millis};
use common::smtp::Reply;
use common::smtp::server::{Connection, DataEnd};
use mail_parser::{HeaderName, HeaderValue, MessageParser};

use super::{Flow, Hello, Session, State, Transaction, sanitize, written};

/// What DATA needs of the connection while it awaits other things (a `&Connection` is not
/// `Send`).
struct Client {
    peer: std::net::SocketAddr,
    tls: Option<common::smtp::server::TlsInfo>,
}

/// What the `From:` check found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FromHeader {
    /// Exactly one `From:` with one mailbox: its address.
    One(String),
    /// Why it is refused.
    Refused(&'static str),
}

/// The header facts the relay acts on.
struct Headers {
    from: FromHeader,
    received: usize,
    has_date: bool,
    has_message_id: bool,
}

fn inspect(message: &[u8]) -> Headers {
    let Some(parsed) = MessageParser::new().parse_headers(message) else {
        return Headers {
            from: FromHeader::Refused("the header section cannot be parsed"),
            received: 0,
            has_date: false,
            has_message_id: false,
        };
    };
    let count = |name: HeaderName<'_>| parsed.headers().iter().filter(|h| h.name == name).count();
    let froms: Vec<&HeaderValue<'_>> = parsed
        .headers()
        .iter()
        .filter(|h| h.name == HeaderName::From)
        .map(|h| &h.value)
        .collect();
    let from = match froms.as_slice() {
        [] => FromHeader::Refused("the message has no From header"),
        [one] => check_from(one),
        _ => FromHeader::Refused("the message has more than one From header"),
    };
    Headers {
        from,
        received: count(HeaderName::Received),
        has_date: count(HeaderName::Date) > 0,
        has_message_id: count(HeaderName::MessageId) > 0,
    }
}

/// One mailbox, with no other address hidden in its display name.
pub(crate) fn check_from(value: &HeaderValue<'_>) -> FromHeader {
    let HeaderValue::Address(mail_parser::Address::List(list)) = value else {
        return FromHeader::Refused("the From header must hold one address");
    };
    let [addr] = list.as_slice() else {
        return FromHeader::Refused("the From header must hold exactly one address");
    };
    let Some(address) = addr.address.as_deref().filter(|a| a.contains('@')) else {
        return FromHeader::Refused("the From header has no address");
    };
    if let Some(name) = addr.name.as_deref() {
        // "boss@bank.example" <user@ours>: a display name that shows another address.
        let hides_another = name
            .split(|c: char| c.is_whitespace() || "<>()\"',;:[]".contains(c))
            .filter(|t| t.contains('@'))
            .any(|t| !t.eq_ignore_ascii_case(address));
        if hides_another {
            return FromHeader::Refused("the From display name shows another address");
        }
    }
    FromHeader::One(address.to_owned())
}

impl Session {
    pub(crate) async fn handle_data(
        &mut self,
        conn: &mut Connection,
        state: State,
    ) -> (State, Reply, Flow) {
        let (hello, tx) = match state {
            State::Mail { hello, tx } if !tx.recipients.is_empty() => (hello, tx),
            State::Mail { hello, tx } => {
                return (
                    State::Mail { hello, tx },
                    Reply::perm(554, "5.5.1", "no valid recipients"),
                    Flow::Continue,
                );
            }
            state => {
                return (
                    state,
                    Reply::perm(503, "5.5.1", "send MAIL first"),
                    Flow::Continue,
                );
            }
        };
        conn.reply(&Reply::ok(354, "", "end data with <CR><LF>.<CR><LF>"));
        let mut message = Vec::new();
        let end = conn.read_data(&mut message).await;
        let reply = match end {
            Ok(DataEnd::Complete { .. }) => {
                let client = Client {
                    peer: conn.peer(),
                    tls: conn.tls().cloned(),
                };
                self.accept(&client, &hello, tx, message).await
            }
            Ok(end) => end
                .reply()
                .unwrap_or_else(|| Reply::temp(451, "4.3.0", "local error")),
            Err(e) => {
                let flow = if e.is_fatal() {
                    Flow::Close
                } else {
                    Flow::Continue
                };
                return (
                    State::Greeted(hello),
                    e.reply().unwrap_or_else(written),
                    flow,
                );
            }
        };
        (State::Greeted(hello), reply, Flow::Continue)
    }

    /// Checks, completes, signs and queues a received message.
    async fn accept(
        &self,
        conn: &Client,
        hello: &Hello,
        tx: Transaction,
        message: Vec<u8>,
    ) -> Reply {
        let user = match (self.user.clone(), self.internal) {
            (Some(user), _) => user,
            (None, true) => String::new(),
            (None, false) => return Reply::perm(530, "5.7.0", "authentication required"),
        };
        let settings = &self.relay.settings;
        let headers = inspect(&message);
        if headers.received >= settings.max_hops {
            tracing::warn!(hops = headers.received, "refused a looping message");
            return Reply::perm(554, "5.4.6", "too many hops, mail loop detected");
        }
        if self.internal {
            // A spool's bounce or forward: queued as it is, unsigned (it is not ours).
            return self
                .queue(conn, hello, tx, "", message, String::new())
                .await;
        }
        let from = match headers.from {
            FromHeader::One(a) => a,
            FromHeader::Refused(why) => {
                tracing::warn!(user, why, "from header refused");
                return Reply::perm(553, "5.7.1", why);
            }
        };
        let from_address = match common::address::Address::parse_with(
            &from,
            common::address::ParseOptions::SMTPUTF8,
        ) {
            Ok(a) => a,
            Err(_) => return Reply::perm(553, "5.7.1", "the From address is not valid"),
        };
        match self.owns(&user, &from_address).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(user, from, "from header is not the user's");
                return Reply::perm(553, "5.7.1", format!("From address <{from}> is not yours"));
            }
            Err(e) => return super::envelope::lookup_failed(&e),
        }

        let id = common::queue::QueueId::generate();
        let host = &settings.shared.hostname;
        // RFC 6409 §8.2, §8.3: a submission server may add what the client left out.
        let mut added = String::new();
        if !headers.has_date {
            added.push_str(&format!("Date: {}\r\n", rfc822_now()));
        }
        if !headers.has_message_id {
            added.push_str(&format!("Message-ID: <{id}@{host}>\r\n"));
        }
        let mut content = Vec::with_capacity(added.len() + message.len());
        content.extend_from_slice(added.as_bytes());
        content.extend_from_slice(&message);
        drop(message);
        let domain = from_address.domain().as_str().to_ascii_lowercase();
        let signature = match self.relay.dkim.sign(&domain, &content) {
            None => String::new(),
            Some(Ok(header)) => header,
            Some(Err(e)) => {
                // Sent unsigned rather than not at all; the log says why.
                tracing::error!(domain, error = %e, "dkim signing failed");
                String::new()
            }
        };
        self.queue(conn, hello, tx, &user, content, signature).await
    }

    /// Queues the message if the user's hourly limit allows it.
    async fn queue(
        &self,
        conn: &Client,
        hello: &Hello,
        tx: Transaction,
        user: &str,
        content: Vec<u8>,
        signature: String,
    ) -> Reply {
        // The hourly limit, counted in one step with the check, so parallel sessions of one
        // user cannot go over it; given back if the message is not queued after all.
        if !user.is_empty() && !self.relay.hourly.take(user) {
            tracing::warn!(user, "hourly message limit reached");
            return Reply::temp(
                450,
                "4.7.1",
                "hourly message limit reached, try again later",
            );
        }
        let reply = self
            .write_entry(conn, hello, tx, user, content, signature)
            .await;
        if !user.is_empty() && !reply.is_positive() {
            self.relay.hourly.give_back(user);
        }
        reply
    }

    /// Writes the entry (our `Received:`, the signature, the message), fsyncs, schedules it.
    async fn write_entry(
        &self,
        conn: &Client,
        hello: &Hello,
        tx: Transaction,
        user: &str,
        content: Vec<u8>,
        signature: String,
    ) -> Reply {
        let queue = self.relay.runner.queue();
        let mut incoming = match Incoming::create(queue).await {
            Ok(m) => m,
            Err(e) => return e.reply(),
        };
        let id = incoming.id().clone();
        let received = self.received(conn, hello, &id);
        let written = async {
            use tokio::io::AsyncWriteExt as _;
            incoming.write_header(&received).await?;
            incoming.write_header(&signature).await?;
            incoming.write_all(&content).await
        }
        .await;
        if let Err(e) = written {
            incoming.discard(queue).await;
            return StoreError::Io {
                path: queue.dir().to_owned(),
                source: e,
            }
            .reply();
        }
        let rcpts = tx.recipients.len();
        let size = incoming.size();
        let message_id = incoming.message_id();
        let to = tx.recipients.clone();
        let from = tx.reverse_path.to_string();
        let envelope = Envelope {
            id: id.clone(),
            reverse_path: tx.reverse_path.to_string(),
            smtputf8: tx.smtputf8,
            origin: if self.internal {
                Origin::Reinject
            } else {
                Origin::Submission
            },
            queued_ms: now_millis(),
            conn: self.id.to_string(),
            client_ip: conn.peer.ip().to_string(),
            helo: sanitize(&hello.name),
            size,
            held: false,
            recipients: tx
                .recipients
                .into_iter()
                .map(|r| Recipient::new(r, None))
                .collect(),
        };
        match incoming.commit(queue, envelope).await {
            Ok(()) => {
                tracing::info!(queue_id = %id, user, rcpts, size, dkim = !signature.is_empty(), "queued");
                self.relay.runner.schedule(id.clone(), 0);
                let reply = Reply::ok(250, "2.0.0", format!("queued as {id}"));
                common::obs::messages("relay", "accepted", 1);
                common::obs::trace(common::obs::TraceEvent {
                    service: "relay".into(),
                    event: "received".into(),
                    queue_id: Some(id.to_string()),
                    message_id,
                    from,
                    to,
                    peer: if user.is_empty() {
                        conn.peer.ip().to_string()
                    } else {
                        format!("{} ({user})", conn.peer.ip())
                    },
                    result: reply.to_string(),
                    ..common::obs::TraceEvent::default()
                });
                reply
            }
            Err(e) => e.reply(),
        }
    }

    /// Our trace header (RFC 5321 §4.4; `ESMTPSA`, RFC 3848: authenticated over TLS).
    fn received(&self, conn: &Client, hello: &Hello, id: &common::queue::QueueId) -> String {
        let protocol = match (hello.is_esmtp, conn.tls.is_some(), self.internal) {
            (false, _, _) => "SMTP",
            (true, _, true) => "ESMTP",
            (true, false, false) => "ESMTPA",
            (true, true, false) => "ESMTPSA",
        };
        let tls = conn
            .tls
            .as_ref()
            .map(|t| format!("\r\n\t(using {} with cipher {})", t.version, t.cipher))
            .unwrap_or_default();
        format!(
            "Received: from {helo} ({ip}){tls}\r\n\tby {host} (relay, conn {conn_id}) with {protocol} id {id};\r\n\t{date}\r\n",
            helo = sanitize(&hello.name),
            ip = conn.peer.ip(),
            host = self.relay.settings.shared.hostname,
            conn_id = self.id,
            date = rfc822_now(),
        )
    }
}

fn rfc822_now() -> String {
    mail_parser::DateTime::from_timestamp(i64::try_from(now_millis() / 1000).unwrap_or(0))
        .to_rfc822()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_of(headers: &str) -> FromHeader {
        inspect(format!("{headers}\r\n\r\nbody\r\n").as_bytes()).from
    }

    #[test]
    fn the_from_header_must_be_one_plain_mailbox() {
        let one = |a: &str| FromHeader::One(a.to_owned());
        let cases = [
            ("From: alice@x.test", one("alice@x.test")),
            ("From: Alice Smith <alice@x.test>", one("alice@x.test")),
            ("From: \"alice@x.test\" <alice@x.test>", one("alice@x.test")),
            (
                "Subject: hi",
                FromHeader::Refused("the message has no From header"),
            ),
            (
                "From: alice@x.test\r\nFrom: bob@x.test",
                FromHeader::Refused("the message has more than one From header"),
            ),
            (
                "From: alice@x.test, bob@x.test",
                FromHeader::Refused("the From header must hold exactly one address"),
            ),
            (
                "From: \"boss@bank.test\" <alice@x.test>",
                FromHeader::Refused("the From display name shows another address"),
            ),
            (
                "From: Boss (boss@bank.test) <alice@x.test>",
                FromHeader::Refused("the From display name shows another address"),
            ),
        ];
        for (headers, want) in cases {
            assert_eq!(from_of(headers), want, "{headers}");
        }
    }
}
