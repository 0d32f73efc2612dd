//! SCSI devices of this level as sysfs shows them, and RAM disks made with the
//! kernel's `scsi_debug` module ([`debug`]).
//!
//! Nodes are found through sysfs (`/sys/bus/scsi/devices/H:C:T:L/{block,scsi_generic}`),
//! never by globbing `/dev` (`/dev/sg*` also matches `/dev/sgx_*`).
//!
//! This module is a leaf beside [`crate::process`]: it knows nothing of levels or tests.

pub mod debug;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Most devices read from sysfs in one listing.
const MAX_DEVICES: usize = 4096;
/// Most bytes read from one sysfs attribute.
const MAX_ATTRIBUTE: u64 = 4096;

/// Marker a VM level's init keeps while it loads the SCSI drivers.
pub(crate) const DRIVERS_PENDING: &str = "/run/matryoshka/scsi.pending";
/// How long the drivers may take to load.
const DRIVERS_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// Waits (blocking, bounded) until a VM level's init has loaded the SCSI drivers
/// and the disks passed to the level are scanned; at once elsewhere.
fn wait_for_drivers() {
    let started = std::time::Instant::now();
    while Path::new(DRIVERS_PENDING).exists() && started.elapsed() < DRIVERS_DEADLINE {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Where a SCSI device sits, as the kernel numbers it (`H:C:T:L`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Address {
    /// The host adapter (`hostH`).
    pub host: u32,
    /// The channel on that adapter.
    pub channel: u32,
    /// The target id.
    pub target: u32,
    /// The logical unit.
    pub lun: u32,
}

impl Address {
    /// Parses `H:C:T:L`.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split(':').map(|p| p.parse::<u32>().ok());
        let address = Self {
            host: parts.next()??,
            channel: parts.next()??,
            target: parts.next()??,
            lun: parts.next()??,
        };
        parts.next().is_none().then_some(address)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}:{}",
            self.host, self.channel, self.target, self.lun
        )
    }
}

/// What the kernel made of one SCSI device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Device {
    /// Its place.
    pub address: Address,
    /// INQUIRY vendor, trailing blanks removed.
    pub vendor: String,
    /// INQUIRY product, trailing blanks removed.
    pub model: String,
    /// INQUIRY revision, trailing blanks removed.
    pub revision: String,
    /// SCSI peripheral type (0: disk).
    pub peripheral_type: u32,
    /// The driver of its host adapter (`scsi_debug`, `virtio_scsi`).
    pub host_driver: String,
    /// Its block node, when the sd driver took it.
    pub block_node: Option<PathBuf>,
    /// Its SCSI generic node, when the sg driver took it.
    pub generic_node: Option<PathBuf>,
    /// Its size in bytes, when it is a block device.
    pub size_bytes: Option<u64>,
}

impl Device {
    /// `2:0:0:0 MATRYOSH NESTDISK (scsi_debug, /dev/sda, /dev/sg0)`: for messages.
    pub fn describe(&self) -> String {
        let mut nodes = vec![self.host_driver.clone()];
        nodes.extend(
            [&self.block_node, &self.generic_node]
                .into_iter()
                .flatten()
                .map(|p| p.display().to_string()),
        );
        format!(
            "{} {} {} ({})",
            self.address,
            self.vendor,
            self.model,
            nodes.join(", ")
        )
    }
}

/// The sysfs and `/dev` a level's devices are read from.
#[derive(Debug, Clone)]
pub struct Sysfs {
    sys: PathBuf,
    dev: PathBuf,
}

impl Sysfs {
    /// This machine's `/sys` and `/dev`, once a VM level's init has loaded the
    /// SCSI drivers (while `/run/matryoshka/scsi.pending` exists): blocks up to a
    /// minute there, returns at once elsewhere.
    pub fn system() -> Self {
        wait_for_drivers();
        Self::at("/sys", "/dev")
    }

    /// Another tree, for tests.
    pub fn at(sys: impl Into<PathBuf>, dev: impl Into<PathBuf>) -> Self {
        Self {
            sys: sys.into(),
            dev: dev.into(),
        }
    }

    /// Every SCSI device, in address order; none where the kernel has no SCSI.
    pub fn devices(&self) -> std::io::Result<Vec<Device>> {
        let dir = self.sys.join("bus/scsi/devices");
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut devices = Vec::new();
        for entry in entries.take(MAX_DEVICES * 4) {
            let name = entry?.file_name();
            // Besides `H:C:T:L` devices, there are `hostH` and `targetH:C:T` entries.
            if let Some(address) = name.to_str().and_then(Address::parse) {
                devices.push(self.read(address));
                if devices.len() == MAX_DEVICES {
                    break;
                }
            }
        }
        devices.sort_by_key(|d| d.address);
        Ok(devices)
    }

    /// The device at `address`, if the kernel has one there.
    pub fn device(&self, address: Address) -> Option<Device> {
        self.sys
            .join(format!("bus/scsi/devices/{address}"))
            .exists()
            .then(|| self.read(address))
    }

    fn read(&self, address: Address) -> Device {
        let dir = self.sys.join(format!("bus/scsi/devices/{address}"));
        let block = first_entry(&dir.join("block"));
        let size_bytes = block.as_ref().and_then(|name| {
            attribute(&self.sys.join("class/block").join(name).join("size"))
                .and_then(|s| s.parse::<u64>().ok())
                .map(|sectors| sectors.saturating_mul(512))
        });
        Device {
            address,
            vendor: attribute(&dir.join("vendor")).unwrap_or_default(),
            model: attribute(&dir.join("model")).unwrap_or_default(),
            revision: attribute(&dir.join("rev")).unwrap_or_default(),
            peripheral_type: attribute(&dir.join("type"))
                .and_then(|t| t.parse().ok())
                .unwrap_or(u32::MAX),
            host_driver: attribute(
                &self
                    .sys
                    .join(format!("class/scsi_host/host{}/proc_name", address.host)),
            )
            .unwrap_or_default(),
            block_node: block.map(|name| self.dev.join(name)),
            generic_node: first_entry(&dir.join("scsi_generic")).map(|name| self.dev.join(name)),
            size_bytes,
        }
    }
}

/// A sysfs attribute, trimmed; none when it cannot be read.
fn attribute(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(MAX_ATTRIBUTE)
        .read_to_string(&mut text)
        .ok()?;
    Some(text.trim().to_string())
}

/// The first name in a folder, in name order (`block/sda`, `scsi_generic/sg0`).
fn first_entry(dir: &Path) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .take(64)
        .collect();
    names.sort();
    names.into_iter().next()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Makes the sysfs entries of one device under `sys`.
    pub(crate) fn fake_device(
        sys: &Path,
        address: &str,
        driver: &str,
        vendor: &str,
        block: Option<&str>,
        generic: Option<&str>,
    ) {
        let dir = sys.join("bus/scsi/devices").join(address);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("vendor"), format!("{vendor:<8}\n")).expect("write");
        std::fs::write(dir.join("model"), "NESTDISK        \n").expect("write");
        std::fs::write(dir.join("rev"), "0001\n").expect("write");
        std::fs::write(dir.join("type"), "0\n").expect("write");
        let host = address.split(':').next().expect("host");
        let host_dir = sys.join(format!("class/scsi_host/host{host}"));
        std::fs::create_dir_all(&host_dir).expect("mkdir");
        std::fs::write(host_dir.join("proc_name"), format!("{driver}\n")).expect("write");
        if let Some(b) = block {
            std::fs::create_dir_all(dir.join("block").join(b)).expect("mkdir");
            let class = sys.join("class/block").join(b);
            std::fs::create_dir_all(&class).expect("mkdir");
            std::fs::write(class.join("size"), "131072\n").expect("write");
        }
        if let Some(g) = generic {
            std::fs::create_dir_all(dir.join("scsi_generic").join(g)).expect("mkdir");
        }
    }

    #[test]
    fn addresses_parse_and_print() {
        let a = Address::parse("2:0:1:3").expect("address");
        assert_eq!((a.host, a.channel, a.target, a.lun), (2, 0, 1, 3));
        assert_eq!(a.to_string(), "2:0:1:3");
        for bad in ["host2", "target2:0:0", "1:2:3", "1:2:3:4:5", "a:0:0:0", ""] {
            assert_eq!(Address::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn devices_are_read_from_sysfs_in_address_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sys = dir.path().join("sys");
        fake_device(&sys, "3:0:0:0", "virtio_scsi", "QEMU", Some("sdb"), None);
        fake_device(
            &sys,
            "2:0:0:0",
            "scsi_debug",
            "MATRYOSH",
            Some("sda"),
            Some("sg0"),
        );
        std::fs::create_dir_all(sys.join("bus/scsi/devices/host2")).expect("mkdir");
        std::fs::create_dir_all(sys.join("bus/scsi/devices/target2:0:0")).expect("mkdir");
        let fs = Sysfs::at(&sys, "/dev");
        let devices = fs.devices().expect("devices");
        assert_eq!(devices.len(), 2);
        let d = &devices[0];
        assert_eq!(d.address.to_string(), "2:0:0:0");
        assert_eq!(
            (d.vendor.as_str(), d.model.as_str()),
            ("MATRYOSH", "NESTDISK")
        );
        assert_eq!(d.revision, "0001");
        assert_eq!(d.host_driver, "scsi_debug");
        assert_eq!(d.block_node.as_deref(), Some(Path::new("/dev/sda")));
        assert_eq!(d.generic_node.as_deref(), Some(Path::new("/dev/sg0")));
        assert_eq!(d.size_bytes, Some(64 << 20));
        assert_eq!(
            d.describe(),
            "2:0:0:0 MATRYOSH NESTDISK (scsi_debug, /dev/sda, /dev/sg0)"
        );
        assert_eq!(devices[1].generic_node, None);
        assert_eq!(devices[1].host_driver, "virtio_scsi");
        assert!(
            fs.device(Address::parse("3:0:0:0").expect("address"))
                .is_some()
        );
        assert!(
            fs.device(Address::parse("9:0:0:0").expect("address"))
                .is_none()
        );
    }

    #[test]
    fn a_kernel_without_scsi_has_no_devices() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            Sysfs::at(dir.path(), "/dev").devices().expect("devices"),
            vec![]
        );
    }
}
