//! HELO and EHLO (RFC 5321 §4.1.1.1): the extensions we offer.

use common::smtp::Reply;
use common::smtp::server::Connection;

use super::state::{Hello, State};
use super::{Flow, Listener, Session};

impl Session {
    /// HELO/EHLO: resets any transaction (RFC 5321 §4.1.4) and, for EHLO, lists the extensions.
    /// CHUNKING is offered because BDAT is handled in full (RFC 3030), including chunks that
    /// arrive outside a transaction, which are read and discarded so they never run as commands.
    pub(crate) async fn handle_ehlo(
        &mut self,
        conn: &mut Connection,
        state: State,
        name: String,
        is_esmtp: bool,
    ) -> (State, Reply, Flow) {
        let (state, message) = state.reset();
        if let Some(m) = message {
            m.discard(self.spool.runner.queue()).await;
        }
        if name.trim().is_empty() {
            return (
                state,
                Reply::perm(501, "5.5.4", "syntax: EHLO hostname"),
                Flow::Continue,
            );
        }
        let settings = &self.spool.settings;
        let host = settings.shared.hostname.clone();
        let hello = Hello { name, is_esmtp };
        if !is_esmtp {
            return (
                State::Greeted(hello),
                Reply::ok(250, "", host),
                Flow::Continue,
            );
        }
        let mut lines = vec![
            host,
            "PIPELINING".to_owned(),
            format!("SIZE {}", settings.max_message_size.bytes()),
            "8BITMIME".to_owned(),
            "SMTPUTF8".to_owned(),
            "ENHANCEDSTATUSCODES".to_owned(),
            "CHUNKING".to_owned(),
        ];
        if self.spool.tls.is_some() && self.listener == Listener::Mx && !conn.is_tls() {
            lines.push("STARTTLS".to_owned());
        }
        (
            State::Greeted(hello),
            Reply::multiline(250, "", lines),
            Flow::Continue,
        )
    }
}
