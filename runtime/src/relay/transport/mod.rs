//! Byte streams to a child runtime: the transports behind one interface.
//!
//! - `local`: a child process running `matryoshka serve --stdio` on this machine.
//! - `ssh://user@host[:port]`: an SSH exec channel (russh) to a runtime that was
//!   copied there first, unless its hash was already cached.

pub mod local;
pub mod ssh;

use tokio::io::{AsyncRead, AsyncWrite};

use super::protocol::{LevelSetup, RemoteError, WireErrorKind};

/// An open byte stream to a child runtime, and what keeps it alive.
pub struct Transport {
    /// Frames from the child.
    pub reader: Box<dyn AsyncRead + Send + Unpin>,
    /// Frames to the child.
    pub writer: Box<dyn AsyncWrite + Send + Unpin>,
    /// Owns the child process or session; tears it down when dropped.
    pub guard: Box<dyn TransportGuard>,
    /// A shell command that reaches the child's machine, when there is one.
    pub ssh_command: Option<String>,
}

/// Owns what runs a child runtime.
pub trait TransportGuard: Send {
    /// Stops the child now (idempotent).
    fn shutdown(&mut self);
    /// How the child ended, as a suffix for error messages (`" (runtime killed by signal 9)"`), or empty.
    fn describe_exit(&mut self) -> String;
}

/// Opens a transport to `target` for the level described by `setup`.
pub async fn open(target: &str, setup: &LevelSetup) -> Result<Transport, RemoteError> {
    if target == "local" {
        return local::spawn(setup);
    }
    if let Some(rest) = target.strip_prefix("ssh://") {
        return ssh::open(rest, setup).await;
    }
    Err(RemoteError {
        kind: WireErrorKind::InvalidArgument,
        message: format!("unknown target `{target}`: expected `local` or `ssh://user@host[:port]`"),
        level_path: setup.path.clone(),
    })
}

/// The last lines a child runtime wrote to its stderr, for error messages.
#[derive(Clone, Default)]
pub struct StderrTail(std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<String>>>);

impl StderrTail {
    const LINES: usize = 10;

    /// Records one line, logging it at info level for `-v`.
    pub fn push(&self, level_path: &str, line: &str) {
        tracing::info!(level = %level_path, "{line}");
        let mut lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if lines.len() == Self::LINES {
            lines.pop_front();
        }
        lines.push_back(line.to_string());
    }

    /// How a child ended, for error messages: `" (<exit>; its stderr ended with: a | b)"`,
    /// with either part left out when unknown, or empty when both are.
    pub fn explain(&self, exit: Option<&str>) -> String {
        let lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut parts: Vec<String> = exit.map(str::to_string).into_iter().collect();
        if !lines.is_empty() {
            let said: Vec<String> = lines.iter().cloned().collect();
            parts.push(format!("its stderr ended with: {}", said.join(" | ")));
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!(" ({})", parts.join("; "))
        }
    }
}
