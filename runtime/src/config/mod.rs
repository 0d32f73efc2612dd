//! Configuration that travels down the chain: grants, limits, the accelerator
//! policy and the run's SSH and VM settings.
//!
//! A level receives these from its parent at `Load` and hands the same (never
//! more) to the levels below it. Plain data: this module is a leaf.

pub mod accel;
pub mod grants;
pub mod limits;

use serde::{Deserialize, Serialize};

pub use accel::AccelPolicy;
pub use grants::{FsGrant, GrantError, Grants};
pub use limits::{InstanceLimits, NestLimits};

/// Run-wide settings of VM levels, handed down the chain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSettings {
    /// The run's accelerator policy.
    pub accel: AccelPolicy,
    /// `user@host:port` SSH hops from L0 to this level, for printed `ssh -J` commands.
    pub jump: Vec<String>,
}

/// SSH credentials of a run, handed down so each level can reach the next.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct SshSettings {
    /// The run's private key, OpenSSH format.
    pub private_key: String,
    /// Pinned host keys, `known_hosts` format.
    pub known_hosts: String,
    /// Cache folder on SSH targets; `~/.cache/matryoshka` when absent.
    pub remote_cache_dir: Option<String>,
    /// Where the key is on the machine the run started from, for printed `ssh` commands.
    pub key_path: Option<String>,
}

impl std::fmt::Debug for SshSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshSettings")
            .field("private_key", &"<redacted>")
            .field("known_hosts", &self.known_hosts)
            .field("remote_cache_dir", &self.remote_cache_dir)
            .field("key_path", &self.key_path)
            .finish()
    }
}
