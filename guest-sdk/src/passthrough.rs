//! SCSI devices of this level, and disks passed through to the levels it boots.
//!
//! ```ignore
//! use matryoshka_guest::{host, nest::{Guest, Vm}, passthrough};
//!
//! fn disk_reaches_the_next_level() -> Result<(), host::Error> {
//!     let l1 = Guest::boot(&Vm::new())?;
//!     let vendor: String = l1.call("make_and_pass", &())?;
//!     assert_eq!(vendor, "MATRYOSH");
//!     Ok(())
//! }
//!
//! fn make_and_pass(_: ()) -> Result<String, host::Error> {
//!     let disk = passthrough::scsi_debug().vendor("MATRYOSH").size_mib(16).create()?;
//!     let l2 = Guest::boot(&Vm::new().scsi(disk.device()?.address))?;
//!     l2.call("first_disk_vendor", &())
//! }
//! ```
//!
//! Needs `--grant passthrough`. `scsi_debug` is a kernel module: a level has one
//! such disk at a time, and the machine a run starts on may have no module
//! support (then [`ScsiDebugBuilder::create`] fails with `unsupported`).

use crate::bindings::matryoshka::test::passthrough as wit;
use crate::host::Error;

pub use wit::{ScsiAddress, ScsiDevice};

/// Every SCSI device of this level, in address order.
pub fn list_scsi() -> Result<Vec<ScsiDevice>, Error> {
    wit::list_scsi().map_err(Error::from)
}

/// The options of a new `scsi_debug` disk.
pub fn scsi_debug() -> ScsiDebugBuilder {
    ScsiDebugBuilder {
        options: wit::ScsiDebugOptions {
            vendor: None,
            product: None,
            revision: None,
            size_mib: None,
        },
    }
}

/// What a `scsi_debug` disk says about itself; see [`scsi_debug`].
#[derive(Debug, Clone)]
pub struct ScsiDebugBuilder {
    options: wit::ScsiDebugOptions,
}

impl ScsiDebugBuilder {
    /// INQUIRY vendor: 1 to 8 of `A-Z a-z 0-9 _ - .` [default: `MATRYOSH`].
    pub fn vendor(mut self, vendor: &str) -> Self {
        self.options.vendor = Some(vendor.to_string());
        self
    }

    /// INQUIRY product: 1 to 16 of `A-Z a-z 0-9 _ - .` [default: `NESTDISK`].
    pub fn product(mut self, product: &str) -> Self {
        self.options.product = Some(product.to_string());
        self
    }

    /// INQUIRY revision: 1 to 4 characters [default: `0001`].
    pub fn revision(mut self, revision: &str) -> Self {
        self.options.revision = Some(revision.to_string());
        self
    }

    /// Size, 1 to 1024 MiB, held in this level's memory [default: 64].
    pub fn size_mib(mut self, mib: u32) -> Self {
        self.options.size_mib = Some(mib);
        self
    }

    /// Loads `scsi_debug` and waits for the disk; dropping the disk unloads it.
    pub fn create(self) -> Result<ScsiDebugDisk, Error> {
        let inner = wit::ScsiDebugDisk::create(&self.options).map_err(Error::from)?;
        Ok(ScsiDebugDisk { inner })
    }
}

/// A RAM-backed SCSI disk at this level. Drop it after the levels it was
/// passed to (Rust drops locals in reverse order: make the disk first).
pub struct ScsiDebugDisk {
    inner: wit::ScsiDebugDisk,
}

impl ScsiDebugDisk {
    /// The disk as the kernel sees it now: address, vendor, model, nodes.
    pub fn device(&self) -> Result<ScsiDevice, Error> {
        self.inner.device().map_err(Error::from)
    }
}

impl std::fmt::Display for ScsiAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}:{}",
            self.host, self.channel, self.target, self.lun
        )
    }
}
