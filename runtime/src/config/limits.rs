//! Limits of instances and of nesting, with their defaults.

use serde::{Deserialize, Serialize};

/// Limits that apply to one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceLimits {
    /// Largest size of any linear memory, in bytes.
    pub memory_bytes: usize,
    /// Bytes of log lines, stdout and stderr a test may produce.
    pub output_bytes: usize,
    /// Bytes of stdout or stderr kept from one `exec` call.
    pub exec_output_bytes: usize,
}

impl Default for InstanceLimits {
    fn default() -> Self {
        Self {
            memory_bytes: 512 << 20,
            output_bytes: 4 << 20,
            exec_output_bytes: 16 << 20,
        }
    }
}

/// How deep a chain may go and how many levels a test may hold at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NestLimits {
    /// Deepest level a test may reach (L0 is depth 0).
    pub max_depth: u32,
    /// Levels below L0 that one test may hold at once, over its whole chain.
    pub max_levels: u32,
}

impl NestLimits {
    /// Default of `--max-depth`: deeper than any chain that boots here (L3 takes
    /// 40-90 s under nested SVM on TCG), far short of exhausting a machine.
    pub const DEFAULT_MAX_DEPTH: u32 = 6;
    /// Default of `--max-levels`: each local level is a runtime process of
    /// ~20-40 MB, each VM level a QEMU of ~0.3-4 GB.
    pub const DEFAULT_MAX_LEVELS: u32 = 16;
}

impl Default for NestLimits {
    fn default() -> Self {
        Self {
            max_depth: Self::DEFAULT_MAX_DEPTH,
            max_levels: Self::DEFAULT_MAX_LEVELS,
        }
    }
}
