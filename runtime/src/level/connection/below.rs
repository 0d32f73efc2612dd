//! What a connection knows of the child and the levels below it, beyond calls:
//! the facts the child told, how a person reaches each level, the files that go
//! with them, and the console of a VM child, read on request.

use std::time::Duration;

use tokio::sync::oneshot;

use super::Connection;
use crate::level::files::{FileKind, LevelFile};
use crate::wire::{LevelAccess, Message};

/// Facts the child told about itself.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ChildInfo {
    /// Its level path.
    pub path: String,
    /// Its depth.
    pub depth: u32,
    /// Its architecture.
    pub arch: String,
    /// Its host name.
    pub hostname: String,
    /// A shell command that reaches it, for SSH and VM levels.
    pub ssh_command: Option<String>,
    /// The accelerator it runs under and why, for VM levels.
    pub accel: Option<(String, String)>,
    /// How a person reaches it from this level.
    pub access: LevelAccess,
    /// How a person reaches the levels it booted below itself before it was
    /// ready (`--levels N`), checked to lie in its subtree.
    pub below: Vec<LevelAccess>,
    /// Its console, level log and QEMU log at this level, for VM levels.
    pub files: Vec<(FileKind, std::path::PathBuf)>,
}

impl Connection {
    /// Reads a VM child's console once more now, so that what its kernel printed
    /// until now reaches the capture before the test that holds it ends.
    pub async fn read_kernel_now(&self) {
        if let Some(now) = &self.kernel_now {
            let (ack, done) = oneshot::channel();
            if now.send(ack).await.is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(2), done).await;
            }
        }
    }

    /// How a person reaches the child and the levels it booted below itself.
    pub fn access(&self) -> Vec<LevelAccess> {
        std::iter::once(self.info.access.clone())
            .chain(self.info.below.iter().cloned())
            .collect()
    }

    /// The files of the child and the levels below it that go when they go down
    /// (kernel logs, and the consoles and logs kept in temporary folders), with
    /// the child's own console and logs here when `kept_here` (below L0, where
    /// they are in a temporary folder too). Bounded by `timeout`; what does not
    /// come, or comes malformed, is left out with a warning.
    pub async fn collect(&self, kept_here: bool, timeout: Duration) -> Vec<LevelFile> {
        let mut files: Vec<LevelFile> = Vec::new();
        if kept_here {
            for (kind, path) in &self.info.files {
                if let Some(text) = crate::level::files::tail(path) {
                    files.push(LevelFile {
                        path: self.info.path.clone(),
                        kind: *kind,
                        text,
                    });
                }
            }
        }
        let answer = self
            .request(
                |id| Message::Collect { id },
                "the levels' files",
                Some(timeout),
            )
            .await;
        let below = answer.and_then(|bytes| {
            let below: Vec<LevelFile> =
                postcard::from_bytes(&bytes).map_err(|e| self.lost_error(&e.to_string()))?;
            crate::level::files::checked(below, &self.info.path)
                .map_err(|e| self.lost_error(&format!("it sent {e}")))
        });
        match below {
            Ok(below) => files.extend(below),
            Err(e) => tracing::warn!(
                "the files of {} and below were not collected: {}",
                self.info.path,
                e.message
            ),
        }
        files
    }
}
