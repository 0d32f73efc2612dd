//! RAM-backed SCSI disks made by loading the kernel's `scsi_debug` module.
//!
//! `scsi_debug` is one module per kernel, so a level has one such disk at a
//! time. It is loaded with `modprobe` (after `sg`, so the disk gets a SCSI
//! generic node that QEMU can pass through) and unloaded when the
//! [`ScsiDebugDisk`] is dropped. Every option is checked before `modprobe`
//! runs: its values become module parameters, so a value holding a blank or
//! `=` could set another parameter.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{Device, Sysfs};
use crate::process;

/// Largest disk, MiB: it lives in the level's memory.
pub const MAX_SIZE_MIB: u32 = 1024;
/// How long the kernel has to show a loaded disk with its nodes.
const SCAN_DEADLINE: Duration = Duration::from_secs(20);
/// How long unloading is retried while something (an exiting QEMU) still holds the disk.
const UNLOAD_DEADLINE: Duration = Duration::from_secs(15);

/// What a `scsi_debug` disk says about itself, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// INQUIRY vendor, 1 to 8 characters.
    pub vendor: String,
    /// INQUIRY product, 1 to 16 characters.
    pub product: String,
    /// INQUIRY revision, 1 to 4 characters.
    pub revision: String,
    /// Size in MiB, 1 to [`MAX_SIZE_MIB`].
    pub size_mib: u32,
}

impl Options {
    /// The options with defaults filled in, or why they cannot be used.
    pub fn new(
        vendor: Option<String>,
        product: Option<String>,
        revision: Option<String>,
        size_mib: Option<u32>,
    ) -> Result<Self, String> {
        let field = |value: Option<String>, default: &str, what: &str, max: usize| {
            let value = value.unwrap_or_else(|| default.to_string());
            let ok = !value.is_empty()
                && value.len() <= max
                && value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            if ok {
                Ok(value)
            } else {
                Err(format!(
                    "the scsi_debug {what} {value:?} must be 1 to {max} characters of \
                     A-Z, a-z, 0-9, `_`, `-` or `.`"
                ))
            }
        };
        let size_mib = size_mib.unwrap_or(64);
        if !(1..=MAX_SIZE_MIB).contains(&size_mib) {
            return Err(format!(
                "a scsi_debug disk of {size_mib} MiB: the size must be 1 to {MAX_SIZE_MIB} MiB"
            ));
        }
        Ok(Self {
            vendor: field(vendor, "MATRYOSH", "vendor", 8)?,
            product: field(product, "NESTDISK", "product", 16)?,
            revision: field(revision, "0001", "revision", 4)?,
            size_mib,
        })
    }

    /// The module parameters.
    fn params(&self) -> Vec<String> {
        vec![
            "add_host=1".into(),
            "num_tgts=1".into(),
            "max_luns=1".into(),
            format!("dev_size_mb={}", self.size_mib),
            "ptype=0".into(),
            format!("inq_vendor={}", self.vendor),
            format!("inq_product={}", self.product),
            format!("inq_rev={}", self.revision),
            "delay=0".into(),
        ]
    }
}

/// Why a disk could not be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadError {
    /// This kernel cannot load modules, or has no `scsi_debug`.
    Unsupported(String),
    /// `scsi_debug` is loaded already.
    Busy(String),
    /// Not enough memory for the disk.
    TooBig(String),
    /// `modprobe` failed or the disk did not show up.
    Failed(String),
}

impl LoadError {
    /// The message.
    pub fn message(&self) -> &str {
        match self {
            Self::Unsupported(m) | Self::Busy(m) | Self::TooBig(m) | Self::Failed(m) => m,
        }
    }
}

/// A loaded `scsi_debug` disk; dropping it unloads the module.
#[derive(Debug)]
pub struct ScsiDebugDisk {
    sysfs: Sysfs,
    device: Device,
}

/// Whether this runtime holds a `scsi_debug` disk: one per level, whichever
/// instance asks (`modprobe` of a loaded module would succeed without a new disk).
static HELD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Takes [`HELD`] for one `create`; gives it back unless the disk was made.
struct Claim(bool);

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.0 {
            HELD.store(false, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl ScsiDebugDisk {
    /// Loads `sg` and `scsi_debug` with `options` and waits until the kernel shows
    /// the disk with its block node (and sg node, where `sg` loaded). Blocking.
    pub fn create(options: &Options) -> Result<Self, LoadError> {
        let sysfs = Sysfs::system();
        if !Path::new("/proc/modules").exists() {
            return Err(LoadError::Unsupported(
                "this kernel cannot load modules (no /proc/modules), so it has no scsi_debug; \
                 make the disk at a VM level (boot one with nest; the image's kernel has \
                 scsi_debug and sg)"
                    .into(),
            ));
        }
        let busy = || {
            LoadError::Busy(
                "scsi_debug is loaded already at this level (one disk per level: drop the \
                 other disk first, or `modprobe -r scsi_debug` if something else loaded it)"
                    .into(),
            )
        };
        if HELD.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(busy());
        }
        let mut claim = Claim(false);
        if Path::new("/sys/module/scsi_debug").exists() {
            return Err(busy());
        }
        let available = available_mib();
        if let Some(have) = available
            && u64::from(options.size_mib) * 2 > have
        {
            return Err(LoadError::TooBig(format!(
                "a scsi_debug disk of {} MiB would take more than half of the {have} MiB this \
                 level has available; ask for a smaller size_mib",
                options.size_mib
            )));
        }
        load_sg();
        // --first-time: a module loaded meanwhile is an error, not a silent success.
        let mut args = vec!["--first-time".to_string(), "scsi_debug".to_string()];
        args.extend(options.params());
        modprobe(&args).map_err(|m| {
            if m.contains("not found") {
                LoadError::Unsupported(format!(
                    "{m}; this kernel has no scsi_debug module (Debian's kernels have it; \
                     boot the level from the matryoshka image)"
                ))
            } else {
                LoadError::Failed(m)
            }
        })?;
        // From here on, dropping the disk unloads the module.
        let mut disk = Self {
            sysfs,
            device: Device::default(),
        };
        let want_generic = Path::new("/sys/module/sg").exists();
        let started = Instant::now();
        loop {
            let found = disk.sysfs.devices().ok().and_then(|all| {
                all.into_iter().find(|d| {
                    d.host_driver == "scsi_debug"
                        && d.block_node.as_deref().is_some_and(Path::exists)
                        && (!want_generic || d.generic_node.as_deref().is_some_and(Path::exists))
                })
            });
            if let Some(device) = found {
                disk.device = device;
                claim.0 = true;
                return Ok(disk);
            }
            if started.elapsed() > SCAN_DEADLINE {
                return Err(LoadError::Failed(format!(
                    "scsi_debug loaded, but its disk did not show up with its nodes in sysfs \
                     and /dev within {} s",
                    SCAN_DEADLINE.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The disk as the kernel shows it now.
    pub fn device(&self) -> Device {
        self.sysfs
            .device(self.device.address)
            .unwrap_or_else(|| self.device.clone())
    }
}

impl Drop for ScsiDebugDisk {
    fn drop(&mut self) {
        let _release = Claim(false);
        let started = Instant::now();
        loop {
            match modprobe(&["-r".to_string(), "scsi_debug".to_string()]) {
                Ok(()) => return,
                // A level still using the disk (its QEMU is being killed) holds it for a moment.
                Err(m) if started.elapsed() < UNLOAD_DEADLINE => {
                    tracing::debug!("unloading scsi_debug: {m}; retrying");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(m) => {
                    tracing::warn!(
                        "scsi_debug stays loaded: {m} (something still holds its disk {})",
                        self.device.describe()
                    );
                    return;
                }
            }
        }
    }
}

/// Loads `sg`, which gives SCSI devices the generic nodes QEMU passes through;
/// it may be built in, or missing (then devices have no sg node).
pub fn load_sg() {
    if !Path::new("/sys/module/sg").exists() && Path::new("/proc/modules").exists() {
        let _ = modprobe(&["sg".to_string()]);
    }
}

/// The device at `address` once the kernel gave it an sg node (after [`load_sg`]),
/// within a few seconds; none if it did not.
pub fn wait_for_generic_node(sysfs: &Sysfs, address: super::Address) -> Option<Device> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        if let Some(device) = sysfs.device(address)
            && device.generic_node.as_deref().is_some_and(Path::exists)
        {
            return Some(device);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// MiB of memory available at this level, from `/proc/meminfo`.
fn available_mib() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Runs `modprobe ARGS` in a cleared environment and says why it failed.
fn modprobe(args: &[String]) -> Result<(), String> {
    let mut cmd = Command::new(modprobe_path());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    process::isolate(&mut cmd, process::Environment::Exec);
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run modprobe: {e}; install kmod"))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stderr: String = stderr.trim().chars().take(512).collect();
    Err(format!(
        "`modprobe {}` {}: {stderr}",
        args.join(" "),
        process::ended(out.status)
    ))
}

fn modprobe_path() -> PathBuf {
    ["/usr/sbin/modprobe", "/sbin/modprobe"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("modprobe"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_take_defaults_and_refuse_what_would_set_other_parameters() {
        let o = Options::new(None, None, None, None).expect("defaults");
        assert_eq!(
            o.params(),
            [
                "add_host=1",
                "num_tgts=1",
                "max_luns=1",
                "dev_size_mb=64",
                "ptype=0",
                "inq_vendor=MATRYOSH",
                "inq_product=NESTDISK",
                "inq_rev=0001",
                "delay=0"
            ]
        );
        let o =
            Options::new(Some("L1".into()), Some("DISK-1".into()), None, Some(8)).expect("valid");
        assert_eq!(
            (o.vendor.as_str(), o.product.as_str(), o.size_mib),
            ("L1", "DISK-1", 8)
        );
        for (vendor, product, size) in [
            ("TOO-LONG-", "P", 1),
            ("", "P", 1),
            ("V", "a dev_size_mb=9", 1),
            ("V=1", "P", 1),
            ("V", "P", 0),
            ("V", "P", MAX_SIZE_MIB + 1),
        ] {
            assert!(
                Options::new(Some(vendor.into()), Some(product.into()), None, Some(size)).is_err(),
                "{vendor:?} {product:?} {size}"
            );
        }
    }
}
