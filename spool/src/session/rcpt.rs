//! RCPT TO (RFC 5321 §4.1.1.3): only hosted mailboxes, aliases expanded, relay syntax refused.

use std::collections::HashSet;

use common::address::{Address, AddressError, ParseOptions};
use common::location::MailboxState;
use common::queue::Recipient;
use common::smtp::Reply;
use smtp_proto::RcptTo;

use super::state::State;
use super::{Flow, Session};

/// How deep aliases may point to aliases.
const MAX_ALIAS_DEPTH: usize = 8;
/// Most addresses looked at while expanding one recipient (bounds a fan-out bomb).
const MAX_EXPANSION: usize = 1000;

impl Session {
    /// Adds a recipient to the transaction, or refuses it with the reason.
    pub(crate) async fn handle_rcpt(
        &mut self,
        state: State,
        to: RcptTo<String>,
    ) -> (State, Reply, Flow) {
        let (hello, mut tx) = match state {
            State::Mail { hello, tx } => (hello, tx),
            State::Chunking { .. } => {
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
        let reply = if tx.forward_paths.len() >= self.spool.settings.max_recipients {
            // RFC 5321 §4.5.3.1.8: a temporary failure, so the client sends the rest later.
            Reply::temp(452, "4.5.3", "too many recipients")
        } else {
            match self.check_recipient(&to.address, tx.smtputf8).await {
                Ok(mailboxes) => {
                    for m in mailboxes {
                        if !tx.recipients.iter().any(|r| r.address == m) {
                            let original = (m != to.address).then(|| to.address.clone());
                            tx.recipients.push(Recipient::new(m, original));
                        }
                    }
                    tx.forward_paths.push(to.address);
                    Reply::ok(250, "2.1.5", "recipient ok")
                }
                Err(reply) => {
                    common::obs::messages("spool", "refused", 1);
                    common::obs::trace(common::obs::TraceEvent {
                        service: "spool".into(),
                        event: "refused".into(),
                        from: tx.reverse_path.to_string(),
                        to: vec![to.address.clone()],
                        peer: self.id.to_string(),
                        result: reply.to_string().trim_end().to_owned(),
                        ..common::obs::TraceEvent::default()
                    });
                    reply
                }
            }
        };
        (State::Mail { hello, tx }, reply, Flow::Continue)
    }

    /// The hosted mailboxes (key form) that `forward_path` delivers to.
    async fn check_recipient(
        &self,
        forward_path: &str,
        smtputf8: bool,
    ) -> Result<Vec<String>, Reply> {
        let opts = if smtputf8 {
            ParseOptions::SMTPUTF8
        } else {
            ParseOptions::default()
        };
        // smtp-proto drops the quotes of a quoted local part and a source route: a second `@`
        // can only come from `"user@other"@hosted`.
        if forward_path.matches('@').count() > 1 {
            return Err(relay_denied());
        }
        let address = match Address::parse_with(forward_path, opts) {
            Ok(a) => a,
            Err(AddressError::SourceRoute) => return Err(relay_denied()),
            Err(AddressError::Utf8NotAllowed) => {
                return Err(Reply::perm(
                    553,
                    "5.6.7",
                    "non-ASCII address requires SMTPUTF8",
                ));
            }
            Err(e) => {
                return Err(Reply::perm(
                    501,
                    "5.1.3",
                    format!("bad recipient address: {e}"),
                ));
            }
        };
        // `user%other@hosted`, `host!user@hosted`, `"user@other"@hosted`, `user@[192.0.2.1]`:
        // old relay syntax that a sloppier next hop might route elsewhere.
        if address.has_routing_syntax() || address.domain().is_literal() {
            return Err(relay_denied());
        }
        let directory = &self.spool.directory;
        match directory.is_hosted_domain(address.domain().as_str()).await {
            Ok(true) => {}
            Ok(false) => return Err(relay_denied()),
            Err(e) => return Err(lookup_failed(&e)),
        }
        self.expand(address.key()).await
    }

    /// Follows aliases to mailboxes. A disabled or unknown address given by the client is
    /// refused; a dangling or disabled alias target is skipped with a warning, as long as the
    /// alias reaches at least one mailbox.
    async fn expand(&self, key: String) -> Result<Vec<String>, Reply> {
        let directory = &self.spool.directory;
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut stack = vec![(key.clone(), 0usize)];
        while let Some((address, depth)) = stack.pop() {
            if !seen.insert(address.clone()) {
                continue;
            }
            if seen.len() > MAX_EXPANSION {
                tracing::warn!(rcpt = %key, "alias expansion too large; truncated");
                break;
            }
            match directory.mailbox(&address).await {
                Err(e) => return Err(lookup_failed(&e)),
                Ok(Some(m)) if m.state == MailboxState::Disabled => {
                    if depth == 0 {
                        return Err(Reply::perm(550, "5.2.1", "mailbox disabled"));
                    }
                    tracing::warn!(alias = %key, target = %address, "alias target disabled");
                }
                Ok(Some(m)) => out.push(m.address),
                Ok(None) => {
                    let targets = directory
                        .alias_targets(&address)
                        .await
                        .map_err(|e| lookup_failed(&e))?;
                    if targets.is_empty() && depth > 0 {
                        let domain = common::location::domain_of(&address).unwrap_or_default();
                        let hosted = directory
                            .is_hosted_domain(domain)
                            .await
                            .map_err(|e| lookup_failed(&e))?;
                        if !hosted && self.spool.settings.relay.address().is_some() {
                            // Forwarded outside, through the relay.
                            out.push(address);
                            continue;
                        }
                        tracing::warn!(alias = %key, target = %address, "alias target is no hosted mailbox");
                    }
                    if depth >= MAX_ALIAS_DEPTH && !targets.is_empty() {
                        tracing::warn!(alias = %key, "aliases nested too deep");
                        continue;
                    }
                    for t in targets.into_iter().rev() {
                        stack.push((t, depth + 1));
                    }
                }
            }
        }
        if out.is_empty() {
            return Err(Reply::perm(550, "5.1.1", "no such user here"));
        }
        Ok(out)
    }
}

fn relay_denied() -> Reply {
    Reply::perm(554, "5.7.1", "relay access denied")
}

fn lookup_failed(e: &common::location::LookupError) -> Reply {
    tracing::warn!(error = %e, "location lookup failed");
    Reply::temp(451, "4.3.0", "temporary lookup failure, try again later")
}
