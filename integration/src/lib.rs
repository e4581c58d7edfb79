//! The mail platform assembled: configuration of a whole platform, starting its services in one
//! process (`mailctl up`), and the administration commands behind `mailctl`.
//!
//! Services never depend on each other; this crate is the only one that knows them all.

pub mod admin;
pub mod config;
pub mod migrate;
pub mod platform;
pub mod queue;
pub mod runfile;
pub mod web;
