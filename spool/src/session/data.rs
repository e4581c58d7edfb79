//! DATA (RFC 5321 §4.1.1.4) and BDAT (RFC 3030): the message goes into its queue file as it
//! arrives, then: hop count → envelope → fsync → `250`.

use common::queue::{Envelope, Origin, StoreError, now_millis};
use common::smtp::Reply;
use common::smtp::server::{Connection, DataEnd, ReadError};

use super::state::{Hello, State, Transaction};
use super::{Flow, Listener, Session, sanitize, written};
use common::queue::Incoming;

impl Session {
    /// DATA: 354, the message, and the final reply once it is durable.
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
            State::Chunking { .. } => {
                // RFC 3030 §2: DATA may not follow BDAT in one transaction.
                return (
                    state,
                    Reply::perm(503, "5.5.1", "BDAT transfer in progress"),
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
        let info = ConnInfo::of(conn);
        let mut message = match self.open_message(&info, &hello, &tx).await {
            Ok(m) => m,
            Err(reply) => return (State::Mail { hello, tx }, reply, Flow::Continue),
        };
        conn.reply(&Reply::ok(354, "", "end data with <CR><LF>.<CR><LF>"));
        let end = conn.read_data(&mut message).await;
        self.end_of_message(&info, hello, tx, message, end).await
    }

    /// BDAT: one chunk; the last one ends the message like the final dot of DATA. A chunk
    /// outside a transaction is still read to its end (and dropped), so its bytes can never be
    /// taken for commands.
    pub(crate) async fn handle_bdat(
        &mut self,
        conn: &mut Connection,
        state: State,
        size: usize,
        is_last: bool,
    ) -> (State, Reply, Flow) {
        let size = size as u64;
        let info = ConnInfo::of(conn);
        let (hello, tx, mut message) = match state {
            State::Chunking { hello, tx, message } => (hello, tx, message),
            State::Mail { hello, tx } if !tx.recipients.is_empty() => {
                match self.open_message(&info, &hello, &tx).await {
                    Ok(m) => (hello, tx, Box::new(m)),
                    Err(reply) => {
                        return discard_chunk(conn, State::Mail { hello, tx }, size, reply).await;
                    }
                }
            }
            state @ State::Mail { .. } => {
                let reply = Reply::perm(554, "5.5.1", "no valid recipients");
                return discard_chunk(conn, state, size, reply).await;
            }
            state => {
                let reply = Reply::perm(503, "5.5.1", "send MAIL first");
                return discard_chunk(conn, state, size, reply).await;
            }
        };
        let already = message.body_size();
        let end = conn.read_bdat(size, message.as_mut(), already).await;
        match end {
            Ok(DataEnd::Complete { size: total }) if !is_last => (
                State::Chunking { hello, tx, message },
                Reply::ok(250, "2.0.0", format!("{total} octets received")),
                Flow::Continue,
            ),
            end => self.end_of_message(&info, hello, tx, *message, end).await,
        }
    }

    /// Creates the queue file and writes our `Received:` header into it.
    async fn open_message(
        &self,
        conn: &ConnInfo,
        hello: &Hello,
        tx: &Transaction,
    ) -> Result<Incoming, Reply> {
        let queue = self.spool.runner.queue();
        let mut message = Incoming::create(queue).await.map_err(|e| e.reply())?;
        let header = self.received(conn, hello, tx, message.id());
        if let Err(e) = message.write_header(&header).await {
            message.discard(queue).await;
            return Err(StoreError::Io {
                path: queue.dir().to_owned(),
                source: e,
            }
            .reply());
        }
        Ok(message)
    }

    /// The end of DATA or of the last BDAT chunk: refuse, or commit and answer `250`.
    async fn end_of_message(
        &mut self,
        conn: &ConnInfo,
        hello: Hello,
        tx: Transaction,
        message: Incoming,
        end: Result<DataEnd, ReadError>,
    ) -> (State, Reply, Flow) {
        let queue = self.spool.runner.queue();
        let reply = match end {
            Ok(DataEnd::Complete { .. }) if message.hops() >= self.spool.settings.max_hops => {
                tracing::warn!(hops = message.hops(), "refused a looping message");
                message.discard(queue).await;
                Reply::perm(554, "5.4.6", "too many hops, mail loop detected")
            }
            Ok(DataEnd::Complete { .. }) => {
                return (
                    State::Greeted(hello.clone()),
                    self.commit(conn, hello, tx, message).await,
                    Flow::Continue,
                );
            }
            Ok(DataEnd::SinkFailed { error, .. }) => {
                message.discard(queue).await;
                StoreError::Io {
                    path: queue.dir().to_owned(),
                    source: error,
                }
                .reply()
            }
            Ok(end) => {
                message.discard(queue).await;
                end.reply()
                    .unwrap_or_else(|| Reply::temp(451, "4.3.0", "local error"))
            }
            Err(e) => {
                message.discard(queue).await;
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

    /// Writes the envelope and fsyncs; only then `250`. Tells the queue runner.
    async fn commit(
        &self,
        conn: &ConnInfo,
        hello: Hello,
        tx: Transaction,
        message: Incoming,
    ) -> Reply {
        let id = message.id().clone();
        let rcpts = tx.recipients.len();
        let message_id = message.message_id();
        let to: Vec<String> = tx.recipients.iter().map(|r| r.address.clone()).collect();
        let from = tx.reverse_path.to_string();
        let envelope = Envelope {
            id: id.clone(),
            reverse_path: tx.reverse_path.to_string(),
            smtputf8: tx.smtputf8,
            origin: match self.listener {
                Listener::Mx => Origin::Smtp,
                Listener::Reinject => Origin::Reinject,
            },
            queued_ms: now_millis(),
            conn: self.id.to_string(),
            client_ip: conn.peer.ip().to_string(),
            helo: sanitize(&hello.name),
            size: message.size(),
            held: false,
            recipients: tx.recipients,
        };
        let size = message.size();
        match message.commit(self.spool.runner.queue(), envelope).await {
            Ok(()) => {
                tracing::info!(queue_id = %id, rcpts, size, "queued");
                self.spool.runner.schedule(id.clone(), 0);
                let reply = Reply::ok(250, "2.0.0", format!("queued as {id}"));
                common::obs::messages("spool", "accepted", 1);
                common::obs::trace(common::obs::TraceEvent {
                    service: "spool".into(),
                    event: "received".into(),
                    queue_id: Some(id.to_string()),
                    message_id,
                    from,
                    to,
                    peer: conn.peer.ip().to_string(),
                    result: reply.to_string().trim_end().to_owned(),
                    ..common::obs::TraceEvent::default()
                });
                reply
            }
            Err(e) => e.reply(),
        }
    }

    /// Our trace header (RFC 5321 §4.4), with the connection and queue ids so one message can
    /// be followed through the logs of every hop.
    fn received(
        &self,
        conn: &ConnInfo,
        hello: &Hello,
        tx: &Transaction,
        id: &common::queue::QueueId,
    ) -> String {
        // RFC 3848 and RFC 6531 §4.3 protocol names.
        let protocol = match (hello.is_esmtp, conn.tls.is_some(), tx.smtputf8) {
            (false, _, _) => "SMTP",
            (true, false, false) => "ESMTP",
            (true, true, false) => "ESMTPS",
            (true, false, true) => "UTF8SMTP",
            (true, true, true) => "UTF8SMTPS",
        };
        let tls = conn
            .tls
            .as_ref()
            .map(|t| format!("\r\n\t(using {} with cipher {})", t.version, t.cipher))
            .unwrap_or_default();
        let rcpt = match tx.forward_paths.as_slice() {
            [one] => format!("\r\n\tfor <{}>", sanitize(one)),
            _ => String::new(),
        };
        let date =
            mail_parser::DateTime::from_timestamp(i64::try_from(now_millis() / 1000).unwrap_or(0))
                .to_rfc822();
        format!(
            "Received: from {helo} ({ip}){tls}\r\n\tby {host} (spool, conn {conn_id}) with {protocol} id {id}{rcpt};\r\n\t{date}\r\n",
            helo = sanitize(&hello.name),
            ip = conn.peer.ip(),
            host = self.spool.settings.shared.hostname,
            conn_id = self.id,
        )
    }
}

/// What the handlers need of the connection while they await other things (a `&Connection`
/// is not `Send`).
struct ConnInfo {
    peer: std::net::SocketAddr,
    tls: Option<common::smtp::server::TlsInfo>,
}

impl ConnInfo {
    fn of(conn: &Connection) -> Self {
        Self {
            peer: conn.peer(),
            tls: conn.tls().cloned(),
        }
    }
}

/// Reads a BDAT chunk that cannot be accepted to its end, then answers `reply`.
async fn discard_chunk(
    conn: &mut Connection,
    state: State,
    size: u64,
    reply: Reply,
) -> (State, Reply, Flow) {
    match conn.read_bdat(size, &mut tokio::io::sink(), 0).await {
        Ok(_) => (state, reply, Flow::Continue),
        Err(e) => {
            let flow = if e.is_fatal() {
                Flow::Close
            } else {
                Flow::Continue
            };
            (state, e.reply().unwrap_or_else(written), flow)
        }
    }
}
