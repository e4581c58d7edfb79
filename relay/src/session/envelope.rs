//! MAIL FROM and RCPT TO for an authenticated user: the sender must be theirs, the hourly
//! limit not spent; recipients anywhere, but a hosted recipient must exist.

use common::address::{Address, AddressError, ParseOptions, ReversePath};
use common::location::LookupError;
use common::smtp::Reply;
use smtp_proto::{MAIL_BODY_BINARYMIME, MAIL_REQUIRETLS, MAIL_SMTPUTF8, MailFrom, RcptTo};

use super::{Flow, Session, State, Transaction};

impl Session {
    pub(crate) async fn handle_mail(
        &mut self,
        state: State,
        from: MailFrom<String>,
    ) -> (State, Reply, Flow) {
        let hello = match state {
            State::Greeted(hello) => hello,
            State::Connected => {
                return (
                    state,
                    Reply::perm(503, "5.5.1", "send EHLO first"),
                    Flow::Continue,
                );
            }
            State::Mail { .. } => {
                return (
                    state,
                    Reply::perm(503, "5.5.1", "nested MAIL command"),
                    Flow::Continue,
                );
            }
        };
        let refuse = |hello, reply| (State::Greeted(hello), reply, Flow::Continue);
        let user = match (self.user.clone(), self.internal) {
            (Some(user), _) => user,
            (None, true) => String::new(),
            (None, false) => {
                return refuse(hello, Reply::perm(530, "5.7.0", "authentication required"));
            }
        };
        if from.flags & (MAIL_BODY_BINARYMIME | MAIL_REQUIRETLS) != 0 {
            return refuse(hello, Reply::perm(555, "5.5.4", "unsupported parameter"));
        }
        if from.size as u64 > self.relay.settings.max_message_size.bytes() {
            return refuse(
                hello,
                Reply::perm(
                    552,
                    "5.3.4",
                    "message size exceeds fixed maximum message size",
                ),
            );
        }
        let smtputf8 = from.flags & MAIL_SMTPUTF8 != 0;
        let reverse_path = match ReversePath::parse_with(&from.address, options(smtputf8)) {
            Ok(p) => p,
            Err(AddressError::Utf8NotAllowed) => {
                return refuse(
                    hello,
                    Reply::perm(553, "5.6.7", "non-ASCII address requires SMTPUTF8"),
                );
            }
            Err(e) => {
                return refuse(
                    hello,
                    Reply::perm(553, "5.1.7", format!("bad sender address: {e}")),
                );
            }
        };
        let owned = match reverse_path.as_address() {
            // A spool's bounces and forwards keep their original sender.
            _ if self.internal => Ok(true),
            None => Ok(false),
            Some(a) => self.owns(&user, a).await,
        };
        match owned {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(user, sender = %from.address, "sender address refused");
                return refuse(
                    hello,
                    Reply::perm(
                        553,
                        "5.7.1",
                        format!("sender address <{}> is not yours", from.address),
                    ),
                );
            }
            Err(e) => return refuse(hello, lookup_failed(&e)),
        }
        if !self.internal && !self.relay.hourly.allows(&user) {
            tracing::warn!(
                user,
                limit = self.relay.settings.messages_per_hour,
                "hourly message limit reached"
            );
            return refuse(
                hello,
                Reply::temp(
                    450,
                    "4.7.1",
                    "hourly message limit reached, try again later",
                ),
            );
        }
        let tx = Transaction {
            reverse_path,
            smtputf8,
            recipients: Vec::new(),
        };
        (
            State::Mail { hello, tx },
            Reply::ok(250, "2.1.0", "sender ok"),
            Flow::Continue,
        )
    }

    pub(crate) async fn handle_rcpt(
        &mut self,
        state: State,
        to: RcptTo<String>,
    ) -> (State, Reply, Flow) {
        let (hello, mut tx) = match state {
            State::Mail { hello, tx } => (hello, tx),
            state => {
                return (
                    state,
                    Reply::perm(503, "5.5.1", "send MAIL first"),
                    Flow::Continue,
                );
            }
        };
        let reply = if tx.recipients.len() >= self.relay.settings.max_recipients {
            tracing::warn!(
                user = self.user.as_deref().unwrap_or(""),
                limit = self.relay.settings.max_recipients,
                "recipient limit reached"
            );
            Reply::temp(452, "4.5.3", "too many recipients")
        } else {
            match self.check_recipient(&to.address, tx.smtputf8).await {
                Ok(rcpt) => {
                    if !tx.recipients.contains(&rcpt) {
                        tx.recipients.push(rcpt);
                    }
                    Reply::ok(250, "2.1.5", "recipient ok")
                }
                Err(reply) => reply,
            }
        };
        (State::Mail { hello, tx }, reply, Flow::Continue)
    }

    /// The recipient as it will be queued: a hosted one in key form (it must exist), a
    /// remote one with its local part as given (only the remote host may interpret it).
    async fn check_recipient(&self, forward_path: &str, smtputf8: bool) -> Result<String, Reply> {
        if forward_path.matches('@').count() > 1 {
            return Err(routing_refused());
        }
        let address = match Address::parse_with(forward_path, options(smtputf8)) {
            Ok(a) => a,
            Err(AddressError::SourceRoute) => return Err(routing_refused()),
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
        if address.has_routing_syntax() || address.domain().is_literal() {
            return Err(routing_refused());
        }
        let directory = &self.relay.directory;
        let hosted = directory
            .is_hosted_domain(address.domain().as_str())
            .await
            .map_err(|e| lookup_failed(&e))?;
        if !hosted {
            return Ok(address.to_string());
        }
        let key = address.key();
        let exists = match directory.mailbox(&key).await {
            Ok(Some(_)) => true,
            Ok(None) => !directory
                .alias_targets(&key)
                .await
                .map_err(|e| lookup_failed(&e))?
                .is_empty(),
            Err(e) => return Err(lookup_failed(&e)),
        };
        if exists {
            Ok(key)
        } else {
            Err(Reply::perm(550, "5.1.1", "no such user here"))
        }
    }

    /// Whether `address` belongs to `user`: it is the user's own address, or an alias whose
    /// targets include the user.
    pub(crate) async fn owns(&self, user: &str, address: &Address) -> Result<bool, LookupError> {
        let key = address.key();
        if key == user {
            return Ok(true);
        }
        let targets = self.relay.directory.alias_targets(&key).await?;
        Ok(targets.iter().any(|t| t == user))
    }
}

fn options(smtputf8: bool) -> ParseOptions {
    if smtputf8 {
        ParseOptions::SMTPUTF8
    } else {
        ParseOptions::default()
    }
}

/// `user%other@x`, `host!user@x`, `"user@other"@x`, source routes, address literals: old
/// routing syntax a next hop might act on.
fn routing_refused() -> Reply {
    Reply::perm(553, "5.1.3", "routing syntax is not accepted in addresses")
}

pub(crate) fn lookup_failed(e: &LookupError) -> Reply {
    tracing::warn!(error = %e, "location lookup failed");
    Reply::temp(451, "4.3.0", "temporary lookup failure, try again later")
}
