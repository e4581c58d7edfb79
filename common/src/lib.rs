//! What the services of the mail platform share.
//!
//! Services meet only on the wire and in the mailbox-location database; everything two of them
//! need lives here, organised by topic:
//!
//! - [`config`]: the TOML loader, the shared sections and the size/duration types.
//! - [`location`]: the mailbox-location database (domains, mailboxes, aliases, credentials,
//!   filers) behind the [`location::Directory`] trait, with SQLite and PostgreSQL backends and a
//!   TTL cache.
//! - [`address`]: parsing and normalising envelope addresses (RFC 5321, IDNA).
//! - [`smtp`]: the SMTP/LMTP protocol core on `smtp-proto`: the server connection (bounded
//!   lines, streaming DATA, replies with enhanced status codes, STARTTLS, deadlines) and one
//!   SMTP/LMTP client for every hand-off.
//! - [`tls`]: server and client TLS configuration; a self-signed certificate in dev mode.
//! - [`net`]: connection ids, trusted networks and the accept-loop helpers.
//! - [`queue`]: the durable message queue (spool and relay): message files, envelopes with
//!   per-recipient state, group commit of fsyncs, per-entry locks for operators' changes.
//! - [`sasl`]: the SASL server side (PLAIN, LOGIN, SCRAM-SHA-256 on `rsasl`), checked against
//!   the location database with argon2 off the async workers.
//! - [`throttle`]: growing delays for failed logins, per client address and per account.
//! - `testkit` (feature `test-util`): what tests of every crate share.
//!
//! `common` trusts nothing on its own: callers pass the configured trusted networks and secrets.
#![warn(missing_docs)]

pub mod address;
pub mod config;
pub mod dns;
pub mod location;
pub mod net;
pub mod obs;
pub mod pop3;
pub mod queue;
pub mod sasl;
pub mod smtp;
pub mod throttle;
pub mod tls;

#[cfg(any(test, feature = "test-util"))]
pub mod testkit;
