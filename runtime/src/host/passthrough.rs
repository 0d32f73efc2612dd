//! The `passthrough` interface: SCSI devices of this level, and `scsi_debug`
//! disks made for the levels it boots.
//!
//! Behind `--grant passthrough`. A disk is one kernel module per level, so an
//! instance holds at most one; the module is unloaded when the handle drops.

use std::sync::Arc;

use wasmtime::component::Resource;

use super::HostState;
use super::bindings::matryoshka::test::passthrough::{
    Host, HostScsiDebugDisk, ScsiAddress, ScsiDebugOptions, ScsiDevice,
};
use super::bindings::matryoshka::test::types::{Error as WitError, ErrorKind};
use crate::scsi::debug::{LoadError, Options, ScsiDebugDisk};
use crate::scsi::{Address, Device, Sysfs};

/// The host side of a `scsi-debug-disk` resource; the instance holds the disk too
/// (see `HostState`'s teardown).
pub struct ScsiDebugHandle(Arc<ScsiDebugDisk>);

impl Host for HostState {
    async fn list_scsi(&mut self) -> wasmtime::Result<Result<Vec<ScsiDevice>, WitError>> {
        if let Err(e) = self.check_passthrough() {
            return Ok(Err(e));
        }
        let listed = tokio::task::spawn_blocking(|| Sysfs::system().devices()).await?;
        Ok(match listed {
            Ok(devices) => Ok(devices.into_iter().map(to_wit).collect()),
            Err(e) => Err(self.error(
                ErrorKind::Io,
                format!("cannot list the SCSI devices in /sys/bus/scsi/devices: {e}"),
            )),
        })
    }
}

impl HostScsiDebugDisk for HostState {
    async fn create(
        &mut self,
        options: ScsiDebugOptions,
    ) -> wasmtime::Result<Result<Resource<ScsiDebugHandle>, WitError>> {
        if let Err(e) = self.check_passthrough() {
            return Ok(Err(e));
        }
        let options = match Options::new(
            options.vendor,
            options.product,
            options.revision,
            options.size_mib,
        ) {
            Ok(o) => o,
            Err(m) => return Ok(Err(self.error(ErrorKind::InvalidArgument, m))),
        };
        let made = tokio::task::spawn_blocking(move || ScsiDebugDisk::create(&options)).await?;
        match made {
            Ok(disk) => {
                let disk = Arc::new(disk);
                self.scsi_disks.push(disk.clone());
                Ok(Ok(self.table.push(ScsiDebugHandle(disk))?))
            }
            Err(e) => {
                let kind = match &e {
                    LoadError::Unsupported(_) => ErrorKind::Unsupported,
                    LoadError::Busy(_) | LoadError::TooBig(_) => ErrorKind::InvalidArgument,
                    LoadError::Failed(_) => ErrorKind::Io,
                };
                let message = format!(
                    "cannot make a scsi_debug disk at {}: {}",
                    self.ctx.level.path,
                    e.message()
                );
                Ok(Err(self.error(kind, message)))
            }
        }
    }

    async fn device(
        &mut self,
        disk: Resource<ScsiDebugHandle>,
    ) -> wasmtime::Result<Result<ScsiDevice, WitError>> {
        Ok(Ok(to_wit(self.table.get(&disk)?.0.device())))
    }

    async fn drop(&mut self, disk: Resource<ScsiDebugHandle>) -> wasmtime::Result<()> {
        let ScsiDebugHandle(disk) = self.table.delete(disk)?;
        self.scsi_disks.retain(|held| !Arc::ptr_eq(held, &disk));
        // Unloading waits for a level that still holds the disk to let go.
        tokio::task::spawn_blocking(move || drop(disk)).await?;
        Ok(())
    }
}

impl HostState {
    fn check_passthrough(&self) -> Result<(), WitError> {
        if self.ctx.grants.passthrough {
            return Ok(());
        }
        Err(self.error(
            ErrorKind::Denied,
            format!(
                "SCSI passthrough is not granted at {}; add --grant passthrough \
                 (or passthrough = true under [grants] in matryoshka.toml)",
                self.ctx.level.path
            ),
        ))
    }
}

/// An address as the WIT has it.
pub(super) fn address_from_wit(a: ScsiAddress) -> Address {
    Address {
        host: a.host,
        channel: a.channel,
        target: a.target,
        lun: a.lun,
    }
}

fn to_wit(d: Device) -> ScsiDevice {
    let node = |p: Option<std::path::PathBuf>| p.map(|p| p.display().to_string());
    ScsiDevice {
        address: ScsiAddress {
            host: d.address.host,
            channel: d.address.channel,
            target: d.address.target,
            lun: d.address.lun,
        },
        vendor: d.vendor,
        model: d.model,
        revision: d.revision,
        peripheral_type: d.peripheral_type,
        host_driver: d.host_driver,
        block_node: node(d.block_node),
        generic_node: node(d.generic_node),
        size_bytes: d.size_bytes,
    }
}
