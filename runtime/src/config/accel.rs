//! The accelerator policy of VM levels, chosen per run and applied at every level.

use serde::{Deserialize, Serialize};

/// Which accelerator VM levels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
pub enum AccelPolicy {
    /// KVM where a guest really boots with it (probed once per machine boot), else TCG.
    #[default]
    Auto,
    /// KVM or fail.
    Kvm,
    /// TCG (software emulation) everywhere.
    Tcg,
}

impl AccelPolicy {
    /// Parses the names `auto`, `kvm` and `tcg`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "auto" => Some(Self::Auto),
            "kvm" => Some(Self::Kvm),
            "tcg" => Some(Self::Tcg),
            _ => None,
        }
    }
}
