//! The `dispatcher` binary's library: configuration, built-in handlers and
//! the wiring of a node, so that tests reach everything.
//!
//! # Layout
//!
//! - [`config`]: command-line flags, `DISPATCH_*` variables and the TOML
//!   file, and the NATS connection they describe.
//! - [`credentials`]: the login to NATS (flags, files, URLs) checked before
//!   connecting, and the redaction of URLs in everything printed.
//! - [`dead`]: `dispatcher dead list|replay`.
//! - [`handlers`]: the built-in handlers.
//! - [`node`]: runs a node until told to stop.
//! - [`watch`]: live progress bars drawn from task events.
//! - [`demo`]: `dispatcher demo`.
//! - [`bench`]: `dispatcher bench`: a node's speed next to a bare NATS ceiling.

pub mod bench;
pub mod config;
pub mod credentials;
pub mod dead;
pub mod demo;
pub mod handlers;
pub mod node;
pub mod watch;
