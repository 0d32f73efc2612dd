//! The guest architectures a level can be: how each names itself, which QEMU
//! program, machine type, console and bus it boots with.

use std::path::Path;

/// Where the x86_64 image keeps `qemu-system-s390x`: off `$PATH`, so that
/// `libvirtd`, which probes every QEMU binary it finds there when it starts,
/// spends no time on one it never uses (see `images/build.sh`).
pub const PRIVATE_BIN: &str = "/usr/lib/matryoshka/bin";

/// Guest architectures matryoshka knows how to boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Arch {
    /// `qemu-system-x86_64`, q35, virtio-pci devices, serial console `ttyS0`.
    X86_64,
    /// `qemu-system-s390x`, s390-ccw-virtio, virtio-ccw devices, console `ttysclp0`.
    S390x,
}

impl Arch {
    /// Parses `uname -m` output.
    pub fn from_uname(machine: &str) -> Option<Self> {
        match machine {
            "x86_64" => Some(Self::X86_64),
            "s390x" => Some(Self::S390x),
            _ => None,
        }
    }

    /// The architecture of this runtime's machine.
    pub fn host() -> Self {
        if cfg!(target_arch = "s390x") {
            Self::S390x
        } else {
            Self::X86_64
        }
    }

    /// The name `uname -m` prints.
    pub fn name(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64",
            Self::S390x => "s390x",
        }
    }

    /// The QEMU binary for this architecture.
    pub fn binary(self) -> &'static str {
        match self {
            Self::X86_64 => "qemu-system-x86_64",
            Self::S390x => "qemu-system-s390x",
        }
    }

    /// The QEMU program to start: the image's own copy in [`PRIVATE_BIN`] when
    /// there is one, else [`Arch::binary`] on `$PATH`.
    pub fn program(self) -> String {
        let private = Path::new(PRIVATE_BIN).join(self.binary());
        if private.exists() {
            private.display().to_string()
        } else {
            self.binary().to_string()
        }
    }

    /// QEMU's machine type (`-machine`).
    pub fn machine(self) -> &'static str {
        match self {
            Self::X86_64 => "q35",
            Self::S390x => "s390-ccw-virtio",
        }
    }

    /// The kernel's console device.
    pub fn console(self) -> &'static str {
        match self {
            Self::X86_64 => "ttyS0",
            Self::S390x => "ttysclp0",
        }
    }

    /// Kernel command-line words that shorten this architecture's boot. On x86_64
    /// every device sits on the root PCI bus, so the kernel need not probe the
    /// other 255 (4 s of an L2 boot here, each probe trapping through the levels
    /// above); crypto self-tests took another 0.8 s. Test levels run no
    /// untrusted neighbours, and the speculation mitigations' MSR writes trap
    /// through every level above: `mitigations=off`. SCSI disks are scanned
    /// before `modprobe virtio_scsi` returns (`scsi_mod.scan=sync`), so the level's
    /// init knows when the disks passed to it are there.
    pub fn fast_boot_args(self) -> &'static [&'static str] {
        match self {
            Self::X86_64 => &[
                "pci=lastbus=0",
                "cryptomgr.notests",
                "mitigations=off",
                "scsi_mod.scan=sync",
            ],
            Self::S390x => &["cryptomgr.notests", "mitigations=off", "scsi_mod.scan=sync"],
        }
    }

    /// The suffix of virtio device names on this machine's bus (`virtio-blk-pci`).
    pub fn bus(self) -> &'static str {
        match self {
            Self::X86_64 => "pci",
            Self::S390x => "ccw",
        }
    }

    /// Whether the machine has a `fw_cfg` device to hand files to the guest
    /// (s390-ccw-virtio has none).
    pub fn has_fw_cfg(self) -> bool {
        self == Self::X86_64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arches_from_uname() {
        assert_eq!(Arch::from_uname("x86_64"), Some(Arch::X86_64));
        assert_eq!(Arch::from_uname("s390x"), Some(Arch::S390x));
        assert_eq!(Arch::from_uname("riscv64"), None);
    }
}
