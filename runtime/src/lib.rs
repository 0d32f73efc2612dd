//! matryoshka: a test runner for nested virtualization.
//!
//! Tests are WebAssembly components (`matryoshka:test/suite`). This crate is the
//! native runtime that loads them, gives them only the host functions they were
//! granted, runs their tests and reports the results.
//!
//! - [`engine`] compiles (with an on-disk cache) and checks components.
//! - [`host`] implements the imports a component sees.
//! - [`grants`] decides what a component may reach.
//! - [`runner`] plans and executes tests, emitting one stream of [`event`]s.
//! - [`reporter`] turns that stream into human, JSON lines, JUnit or TAP output.
//! - [`relay`] reaches other levels and serves them: protocol, transports, `serve`.
//! - [`cli`] is the command line on top.

pub mod cli;
pub mod engine;
pub mod event;
pub mod grants;
pub mod host;
pub mod level;
pub mod relay;
pub mod reporter;
pub mod runner;
