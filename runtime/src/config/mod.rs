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
pub use grants::{FsGrant, GrantError, Grants, Scope};
pub use limits::{InstanceLimits, NestLimits};

/// Run-wide settings of VM levels, handed down the chain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSettings {
    /// The run's accelerator policy.
    pub accel: AccelPolicy,
    /// `user@host:port` SSH hops from L0 to this level, for printed `ssh -J` commands.
    pub jump: Vec<String>,
    /// Architectures of the VM levels `--levels` boots (`--level-arch`): entry N - 1
    /// for LN; a level past the list's end is of its parent's architecture.
    pub chain_arch: Vec<String>,
    /// `--keep-failed`: a lost level's machine stays up until its level is let go,
    /// and QEMU levels get a human monitor socket beside their console.
    pub keep_failed: bool,
}

/// SSH credentials of a run. What travels down the chain: the pinned host keys,
/// the public half of the key VM levels accept, and the private key only when
/// the person running matryoshka said it may ([`SshSettings::hand_down`]).
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SshSettings {
    /// The run's private key (OpenSSH format), where this level may use it: at L0,
    /// and below only with `--hand-down-ssh-key`.
    pub private_key: Option<String>,
    /// The public line of the key VM levels accept, when only that travelled.
    pub public_key: Option<String>,
    /// Whether the private key is handed to the levels below (a key made for the
    /// chain, never a personal one).
    pub hand_down: bool,
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
            .field(
                "private_key",
                &self.private_key.as_ref().map(|_| "<redacted>"),
            )
            .field("public_key", &self.public_key)
            .field("hand_down", &self.hand_down)
            .field("known_hosts", &self.known_hosts)
            .field("remote_cache_dir", &self.remote_cache_dir)
            .field("key_path", &self.key_path)
            .finish()
    }
}

impl SshSettings {
    /// What the level below gets: everything but the private key, unless it may
    /// be handed down.
    pub fn for_child(&self) -> Self {
        Self {
            private_key: self.private_key.clone().filter(|_| self.hand_down),
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_private_key_stays_unless_it_may_be_handed_down() {
        let at_l0 = SshSettings {
            private_key: Some("PRIVATE".into()),
            known_hosts: "pinned".into(),
            ..SshSettings::default()
        };
        let child = at_l0.for_child();
        assert_eq!(child.private_key, None);
        assert_eq!(child.known_hosts, "pinned");
        let chain_key = SshSettings {
            hand_down: true,
            ..at_l0
        };
        assert_eq!(
            chain_key.for_child().private_key.as_deref(),
            Some("PRIVATE")
        );
        assert!(!format!("{chain_key:?}").contains("PRIVATE"));
    }
}
