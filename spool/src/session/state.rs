//! The session state: each variant carries only what is valid in it.

use common::address::ReversePath;
use common::queue::Recipient;

use common::queue::Incoming;

/// Where the session is in the SMTP dialogue (RFC 5321 §4.1.4).
pub(crate) enum State {
    /// Greeting sent; no HELO/EHLO yet (or after STARTTLS, RFC 3207 §4.2).
    Connected,
    /// HELO/EHLO done; no transaction.
    Greeted(Hello),
    /// MAIL accepted; RCPTs being collected.
    Mail { hello: Hello, tx: Transaction },
    /// BDAT chunks arriving (RFC 3030); the message file is open.
    Chunking {
        hello: Hello,
        tx: Transaction,
        /// Boxed: the file and its write buffer are much larger than the other states.
        message: Box<Incoming>,
    },
}

impl State {
    /// The state after RSET, or after a transaction ended: greeted if the client said hello.
    pub(crate) fn reset(self) -> (Self, Option<Box<Incoming>>) {
        match self {
            Self::Connected => (Self::Connected, None),
            Self::Greeted(hello) | Self::Mail { hello, .. } => (Self::Greeted(hello), None),
            Self::Chunking { hello, message, .. } => (Self::Greeted(hello), Some(message)),
        }
    }
}

/// What the client said in HELO/EHLO.
#[derive(Debug, Clone)]
pub(crate) struct Hello {
    /// The name it gave (sanitised before it is written into a header).
    pub(crate) name: String,
    /// EHLO (true) or HELO (false).
    pub(crate) is_esmtp: bool,
}

/// One mail transaction being built.
pub(crate) struct Transaction {
    pub(crate) reverse_path: ReversePath,
    /// The client gave `SMTPUTF8` (RFC 6531).
    pub(crate) smtputf8: bool,
    /// The forward paths as the client gave them, one per accepted RCPT.
    pub(crate) forward_paths: Vec<String>,
    /// The mailboxes to deliver to, after alias expansion, without duplicates.
    pub(crate) recipients: Vec<Recipient>,
}
