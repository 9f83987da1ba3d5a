//! The `dispatcher` binary's library: configuration, built-in handlers and
//! the wiring of a node, so that tests reach everything.
//!
//! # Layout
//!
//! - [`config`]: command-line flags (each also from a `DISPATCH_*` variable).
//! - [`handlers`]: the built-in handlers.
//! - [`node`]: runs a node until told to stop.

pub mod config;
pub mod handlers;
pub mod node;
