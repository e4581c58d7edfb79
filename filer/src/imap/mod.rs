//! The filer's IMAP backend (IMAP4rev1, RFC 3501, with the extensions it advertises), for
//! access proxies only.

mod fetch;
pub(crate) mod mime;
pub(crate) mod names;
pub(crate) mod search;
mod session;
mod wire;

pub(crate) use session::run;
