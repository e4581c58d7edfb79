//! End-to-end tests: the platform assembled, driven through its real binaries and protocols.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] functions

mod abuse;
mod access;
mod crash;
mod faults;
mod filer;
mod filter;
mod mailctl;
mod migrate;
mod multihost;
mod observe;
mod relay;
mod spool;
mod support;
