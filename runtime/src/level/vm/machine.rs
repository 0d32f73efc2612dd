//! What runs a booted level: the QEMU this runtime started ([`Qemu`]) or a
//! libvirt domain ([`super::domain::DomainMachine`]). The level's guard knows
//! it only through this trait.

use std::path::Path;

use super::qemu::Qemu;
use crate::wire::Monitor;

/// A running level's machine.
pub trait Machine: Send {
    /// The serial console file.
    fn console_path(&self) -> &Path;
    /// The level log file (boot steps, then the runtime's stderr).
    fn level_log_path(&self) -> &Path;
    /// QEMU's own log.
    fn qemu_log_path(&self) -> &Path;
    /// Stops the machine now (idempotent).
    fn kill(&mut self);
    /// How the machine ended, with the tails of its console and level log.
    fn describe_end(&mut self) -> String;
    /// Its QEMU's human monitor, when a person can reach it.
    fn monitor(&self) -> Option<Monitor>;
}

impl Machine for Qemu {
    fn console_path(&self) -> &Path {
        Qemu::console_path(self)
    }

    fn level_log_path(&self) -> &Path {
        Qemu::level_log_path(self)
    }

    fn qemu_log_path(&self) -> &Path {
        Qemu::qemu_log_path(self)
    }

    fn kill(&mut self) {
        Qemu::kill(self);
    }

    fn describe_end(&mut self) -> String {
        Qemu::describe_end(self)
    }

    fn monitor(&self) -> Option<Monitor> {
        let path = self.monitor_path()?.to_str()?.to_string();
        // A binary replaced since it started (a cache refreshed in place) reads as
        // `PATH (deleted)`: the file now at PATH is the same runtime.
        let exe = std::env::current_exe().ok()?;
        let exe = exe.to_str()?;
        let runtime = exe.strip_suffix(" (deleted)").unwrap_or(exe).to_string();
        Some(Monitor::Socket { runtime, path })
    }
}
