//! The memory limit of an instance.

use thiserror::Error;

/// A linear memory tried to grow past the configured limit.
#[derive(Debug, Error)]
#[error(
    "memory limit exceeded: the test tried to grow a memory to {desired_mib} MiB, the limit is {limit_mib} MiB (raise it with --memory-limit)"
)]
pub struct MemoryLimitExceeded {
    /// What the guest asked for, in MiB.
    pub desired_mib: usize,
    /// The configured limit, in MiB.
    pub limit_mib: usize,
}

/// A `ResourceLimiter` that traps, with a typed error, when a memory grows past a limit.
#[derive(Debug)]
pub struct MemoryLimiter {
    limit: usize,
    peak: usize,
}

impl MemoryLimiter {
    /// A limiter that allows each linear memory up to `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self { limit, peak: 0 }
    }

    /// The largest memory size granted so far, in bytes.
    pub fn peak(&self) -> usize {
        self.peak
    }
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            return Err(MemoryLimitExceeded {
                desired_mib: desired.div_ceil(1 << 20),
                limit_mib: self.limit >> 20,
            }
            .into());
        }
        self.peak = self.peak.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}
