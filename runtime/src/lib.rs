//! matryoshka: a test runner for nested virtualization.
//!
//! Tests are WebAssembly components (`matryoshka:test/suite`). This crate is the
//! native runtime that loads them, gives them only the host functions they were
//! granted, runs their tests and reports the results.
//!
//! Modules in dependency order: each uses only those listed before it.
//!
//! - [`output`], [`config`], [`process`]: leaves. Captured output under a
//!   budget; grants, limits and settings that travel down the chain; child
//!   processes in groups of their own.
//! - [`scsi`], [`libvirt`]: leaves over [`process`]: SCSI devices in sysfs and
//!   `scsi_debug` disks; libvirt's C library, loaded on first use.
//! - [`event`]: the one stream of events a run produces.
//! - [`wire`]: the relay protocol's frames and messages.
//! - [`engine`]: compiling components, with an on-disk cache.
//! - [`level`]: the parent side of a hop: local, SSH and VM levels.
//! - [`host`]: the imports a component sees, one file per WIT interface.
//! - [`suite`]: a component linked with the host functions.
//! - [`runner`]: plans and executes tests, emitting [`event`]s.
//! - [`serve`]: the child side of a hop, `matryoshka serve --stdio`.
//! - [`reporter`]: human, JSON lines, JUnit and TAP output of the events.
//! - [`cli`]: the command line on top.

pub mod cli;
pub mod config;
pub mod engine;
pub mod event;
pub mod host;
pub mod level;
pub mod libvirt;
pub mod output;
pub mod process;
pub mod reporter;
pub mod runner;
pub mod scsi;
pub mod serve;
pub mod suite;
pub mod wire;
