//! The SMTP/LMTP protocol core shared by every SMTP listener and every hand-off.
//!
//! - [`Reply`]: a reply with its enhanced status code (RFC 3463), written in one place.
//! - [`server`]: one connection of an SMTP or LMTP server: bounded command lines, streaming DATA
//!   and BDAT with a size limit, pipelined replies, STARTTLS that discards what was buffered
//!   before the handshake, idle and session deadlines. The service owns the state machine.
//! - [`client`]: the one SMTP/LMTP client used for every hand-off (spool → filter → spool →
//!   filer, relay → internet): pipelining, one reply per recipient for LMTP, STARTTLS.

pub mod client;
mod reply;
pub mod server;

pub use reply::{EnhancedCode, Reply};
