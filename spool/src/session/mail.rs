//! MAIL FROM (RFC 5321 §4.1.1.2, RFC 1870 SIZE, RFC 6152 8BITMIME, RFC 6531 SMTPUTF8).

use common::address::{AddressError, ParseOptions, ReversePath};
use common::smtp::Reply;
use smtp_proto::{MAIL_BODY_BINARYMIME, MAIL_REQUIRETLS, MAIL_SMTPUTF8, MailFrom};

use super::state::{State, Transaction};
use super::{Flow, Session};

impl Session {
    /// Starts a transaction. The sender is only checked for syntax: anyone may send to our
    /// users.
    pub(crate) fn handle_mail(
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
            State::Mail { .. } | State::Chunking { .. } => {
                return (
                    state,
                    Reply::perm(503, "5.5.1", "nested MAIL command"),
                    Flow::Continue,
                );
            }
        };
        let refuse = |hello, reply| (State::Greeted(hello), reply, Flow::Continue);
        if from.flags & (MAIL_BODY_BINARYMIME | MAIL_REQUIRETLS) != 0 {
            // Extensions we do not announce (RFC 3030 BINARYMIME, RFC 8689 REQUIRETLS).
            return refuse(hello, Reply::perm(555, "5.5.4", "unsupported parameter"));
        }
        let max = self.spool.settings.max_message_size.bytes();
        if from.size as u64 > max {
            // RFC 1870 §6.1.
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
        let opts = if smtputf8 {
            ParseOptions::SMTPUTF8
        } else {
            ParseOptions::default()
        };
        let reverse_path = match ReversePath::parse_with(&from.address, opts) {
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
        let tx = Transaction {
            reverse_path,
            smtputf8,
            forward_paths: Vec::new(),
            recipients: Vec::new(),
        };
        (
            State::Mail { hello, tx },
            Reply::ok(250, "2.1.0", "sender ok"),
            Flow::Continue,
        )
    }
}
