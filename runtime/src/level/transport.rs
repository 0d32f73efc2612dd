//! Byte streams to a child runtime: the transports behind one interface.
//!
//! - `local`: a child process running `matryoshka serve --stdio` on this machine.
//! - `ssh://user@host[:port]`: an SSH exec channel (russh) to a runtime that was
//!   copied there first, unless its hash was already cached.
//! - a VM booted by this level from an image (`vm`), whose runtime serves on a
//!   virtio-serial port behind a socket this level holds.

use tokio::io::{AsyncRead, AsyncWrite};

use super::vm::{VmContext, VmRequest};
use super::{local, ssh, vm};
use crate::config::SshSettings;
use crate::wire::{LevelSetup, RemoteError, WireErrorKind};

/// Where the next level is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A child runtime process on this machine.
    Local,
    /// `user@host[:port]`, reached over SSH.
    Ssh(String),
    /// A VM this level boots.
    Vm(VmRequest),
}

impl Target {
    /// Parses `local` or `ssh://user@host[:port]`.
    pub fn parse(target: &str) -> Result<Self, String> {
        if target == "local" {
            return Ok(Self::Local);
        }
        if let Some(rest) = target.strip_prefix("ssh://") {
            return Ok(Self::Ssh(rest.to_string()));
        }
        Err(format!(
            "unknown target `{target}`: expected `local` or `ssh://user@host[:port]`"
        ))
    }
}

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
    /// What booting it decided, for VM levels.
    pub vm: Option<VmFacts>,
    /// The QMP monitor of its QEMU, for VM levels booted with the qemu backend.
    pub qmp: Option<super::vm::monitor::QmpPort>,
    /// Silence after which the child is declared lost, when not the default
    /// [`HEARTBEAT_LOST`](crate::wire::HEARTBEAT_LOST).
    pub heartbeat_grace: Option<std::time::Duration>,
}

/// Facts of a VM level that its parent decided.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct VmFacts {
    /// The accelerator it runs under (`kvm`, `tcg`).
    pub accel: String,
    /// Why that accelerator.
    pub accel_reason: String,
    /// `root@127.0.0.1:port`: the SSH hop to it from its parent.
    pub hop: String,
    /// The public line of the run's key, which it accepts.
    pub public_key: String,
    /// Where that key is at L0, when it is in a file.
    pub key_path: Option<String>,
    /// The file its serial console goes to, watched for the kernel's signs of trouble.
    pub console: std::path::PathBuf,
    /// Where its lines begin in that file: past an earlier copy's, when it was
    /// restored from a snapshot.
    pub console_from: u64,
    /// Port on its parent's 127.0.0.1 forwarded to its sshd.
    pub ssh_port: u16,
    /// Its SSH host key's public line, when its parent made the key.
    pub host_key: Option<String>,
    /// Its QEMU's human monitor, when a person can reach it.
    pub monitor: Option<crate::wire::Monitor>,
    /// Its console, level log and QEMU log, here.
    pub files: Vec<(super::files::FileKind, std::path::PathBuf)>,
    /// How its QEMU starts again from a saved state (qemu backend only).
    pub restorable: Option<super::vm::snapshot::Restorable>,
}

/// Owns what runs a child runtime.
pub trait TransportGuard: Send {
    /// Stops the child now (idempotent).
    fn shutdown(&mut self);
    /// How the child ended, as a suffix for error messages (`" (runtime killed by signal 9)"`), or empty.
    fn describe_exit(&mut self) -> String;
}

/// Opens a transport to `target` for the level described by `setup`.
/// `own_ssh` is this level's SSH settings (with the private key where it may be
/// used); `setup.ssh` is what the child gets.
pub async fn open(
    target: &Target,
    setup: &LevelSetup,
    own_ssh: Option<&SshSettings>,
    vms: &VmContext,
) -> Result<Transport, RemoteError> {
    match target {
        Target::Local => local::spawn(setup),
        Target::Ssh(spec) => {
            let Some(ssh) = own_ssh else {
                return Err(RemoteError {
                    kind: WireErrorKind::InvalidArgument,
                    message: format!(
                        "no SSH key and pinned host keys for this run: pass --ssh-key FILE and \
                         --ssh-known-hosts FILE (reaching {} at ssh://{spec})",
                        setup.path
                    ),
                    level_path: setup.path.clone(),
                });
            };
            ssh::open(spec, setup, ssh).await
        }
        Target::Vm(req) => vm::open(req, setup, own_ssh, vms).await,
    }
}

/// Longest line kept from a child's stderr or a level log; the rest of a longer
/// line is dropped (a child cannot grow its parent's memory with one endless line).
pub const MAX_LINE: usize = 8 << 10;

/// Splits bytes into lines as they come, each cut to [`MAX_LINE`] bytes.
#[derive(Default)]
pub struct LineCutter {
    line: Vec<u8>,
}

impl LineCutter {
    /// Takes `bytes` and hands each line they complete (without its newline,
    /// invalid UTF-8 replaced) to `each`.
    pub fn push(&mut self, bytes: &[u8], mut each: impl FnMut(&str)) {
        for piece in bytes.split_inclusive(|&b| b == b'\n') {
            let (text, ends) = match piece.strip_suffix(b"\n") {
                Some(text) => (text, true),
                None => (piece, false),
            };
            let room = MAX_LINE.saturating_sub(self.line.len());
            self.line.extend_from_slice(&text[..text.len().min(room)]);
            if ends {
                each(&String::from_utf8_lossy(&self.line));
                self.line.clear();
            }
        }
    }

    /// Hands a last line without a newline to `each`.
    pub fn finish(self, mut each: impl FnMut(&str)) {
        if !self.line.is_empty() {
            each(&String::from_utf8_lossy(&self.line));
        }
    }
}

/// Reads `reader` to its end and hands each line (without its newline, cut to
/// [`MAX_LINE`] bytes, invalid UTF-8 replaced) to `each`.
pub async fn for_each_line(reader: impl AsyncRead + Unpin, mut each: impl FnMut(&str)) {
    use tokio::io::AsyncReadExt;
    let mut reader = reader;
    let mut lines = LineCutter::default();
    let mut chunk = vec![0u8; 8 << 10];
    loop {
        match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => lines.push(&chunk[..n], &mut each),
        }
    }
    lines.finish(each);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_cut_at_the_limit() {
        let mut input = b"short\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_LINE * 3));
        input.extend_from_slice(b"\nlast");
        let mut seen = Vec::new();
        for_each_line(&input[..], |l| seen.push(l.to_string())).await;
        assert_eq!(
            seen.len(),
            3,
            "{:?}",
            seen.iter().map(String::len).collect::<Vec<_>>()
        );
        assert_eq!(seen[0], "short");
        assert_eq!(seen[1].len(), MAX_LINE);
        assert_eq!(seen[2], "last");
    }
}
