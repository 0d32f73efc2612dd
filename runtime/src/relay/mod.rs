//! The relay: the same component at level N, through a chain of runtimes.
//!
//! - [`protocol`]: frames and messages.
//! - [`transport`]: byte streams to a child runtime (local process, SSH exec channel).
//! - [`connection`]: the parent side of one hop: handshake, calls, events, heartbeat.
//! - [`serve`]: the child side, `matryoshka serve --stdio`.
//!
//! Each runtime relays only to its direct children: a level's events travel up
//! one hop at a time, tagged with the level path where they happened.

pub mod connection;
pub mod protocol;
pub mod serve;
pub mod transport;

use std::time::Duration;

/// How often a parent pings a child.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);
/// Silence after which a child is declared lost.
pub const HEARTBEAT_LOST: Duration = Duration::from_secs(3);
/// Time a child has to say `Hello` after its transport is up.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a child has to load (and maybe compile) the component.
pub const READY_TIMEOUT: Duration = Duration::from_secs(300);
