//! QEMU command lines for VM levels, built by pure functions from a [`MachineSpec`].
//!
//! Nothing here starts a process: the argv is data, unit-tested as data. The
//! boot, readiness wait and process registry that use it are in [`super::vm`].

use std::path::PathBuf;

/// Guest architectures matryoshka knows how to boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

    fn binary(self) -> &'static str {
        match self {
            Self::X86_64 => "qemu-system-x86_64",
            Self::S390x => "qemu-system-s390x",
        }
    }

    fn machine(self) -> &'static str {
        match self {
            Self::X86_64 => "q35",
            Self::S390x => "s390-ccw-virtio",
        }
    }

    fn console(self) -> &'static str {
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
    /// through every level above: `mitigations=off`.
    fn fast_boot_args(self) -> &'static [&'static str] {
        match self {
            Self::X86_64 => &["pci=lastbus=0", "cryptomgr.notests", "mitigations=off"],
            Self::S390x => &["cryptomgr.notests", "mitigations=off"],
        }
    }

    fn bus(self) -> &'static str {
        match self {
            Self::X86_64 => "pci",
            Self::S390x => "ccw",
        }
    }
}

/// Name of the virtio-serial port the level's runtime serves the relay on.
pub const RELAY_PORT: &str = "org.matryoshka.relay";
/// Name of the virtio-serial port the level writes its boot steps and its
/// runtime's stderr to. Unlike the serial console, whose every byte is a trap
/// through each level above, a port takes a whole buffer per notification.
pub const LOG_PORT: &str = "org.matryoshka.log";

/// How the guest's CPU is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization; `-cpu host` exposes svm/vmx to the next level.
    Kvm,
    /// Software emulation; `-cpu max` still exposes svm/vmx so the next level can use KVM.
    Tcg,
}

impl Accel {
    /// The name QEMU's `-accel` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }
}

/// Everything that decides a VM level's command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineSpec {
    /// Guest architecture.
    pub arch: Arch,
    /// Accelerator.
    pub accel: Accel,
    /// Memory, MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs (with the runtime appended, see [`super::vm::RuntimeInitrd`]).
    pub initrd: PathBuf,
    /// The read-only root, handed to the guest as its first virtio disk.
    pub root: PathBuf,
    /// Extra kernel command-line words (e.g. `level=2`).
    pub append: Vec<String>,
    /// Host port forwarded to the guest's SSH port, on 127.0.0.1 only.
    pub ssh_port: u16,
    /// File that receives the serial console.
    pub console_log: PathBuf,
    /// File descriptor, inherited by QEMU, of a connected Unix socket behind the
    /// guest's virtio-serial port [`RELAY_PORT`]: the relay's byte stream to the
    /// level's runtime. Connected before QEMU starts, so the port is open from the
    /// guest's first look at it, and no socket file or path length is involved.
    pub relay_fd: i32,
    /// File behind the guest's virtio-serial port [`LOG_PORT`]: the level's
    /// boot steps and its runtime's stderr.
    pub level_log: PathBuf,
    /// QMP control socket, when the level wants one.
    pub qmp_socket: Option<PathBuf>,
}

/// The argv (program first) that boots `spec`.
pub fn argv(spec: &MachineSpec) -> Vec<String> {
    let a = spec.arch;
    let cpu = match spec.accel {
        Accel::Kvm => "host",
        Accel::Tcg => "max",
    };
    let accel = spec.accel.name();
    // A kernel panic reboots at once, and -no-reboot turns that into QEMU exiting:
    // a panicking level is seen within a poll, not at the boot deadline.
    let mut append = vec![
        format!("console={}", a.console()),
        "quiet".to_string(),
        "panic=-1".to_string(),
    ];
    append.extend(a.fast_boot_args().iter().map(|w| w.to_string()));
    append.extend(spec.append.iter().cloned());
    let bus = a.bus();
    let mut argv: Vec<String> = vec![
        a.binary().to_string(),
        "-nodefaults".into(),
        "-no-reboot".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-machine".into(),
        a.machine().into(),
        "-accel".into(),
        accel.into(),
        "-cpu".into(),
        cpu.into(),
        "-smp".into(),
        spec.cpus.to_string(),
        "-m".into(),
        format!("{}M", spec.memory_mib),
        "-kernel".into(),
        spec.kernel.display().to_string(),
        "-initrd".into(),
        spec.initrd.display().to_string(),
        "-append".into(),
        append.join(" "),
        // Read-only and uncached, so a root handed down level after level reads
        // the same blocks at every depth.
        "-drive".into(),
        format!(
            "file={},format=raw,if=none,id=root,readonly=on,cache=none,aio=native",
            spec.root.display()
        ),
        "-device".into(),
        format!("virtio-blk-{bus},drive=root"),
    ];
    argv.extend([
        "-netdev".into(),
        format!("user,id=net0,hostfwd=tcp:127.0.0.1:{}-:22", spec.ssh_port),
        "-device".into(),
        format!("virtio-net-{bus},netdev=net0"),
        "-serial".into(),
        format!("file:{}", spec.console_log.display()),
        "-device".into(),
        format!("virtio-serial-{bus}"),
        "-chardev".into(),
        format!("socket,id=relay,fd={}", spec.relay_fd),
        "-device".into(),
        format!("virtserialport,chardev=relay,name={RELAY_PORT}"),
        "-chardev".into(),
        format!("file,id=log,path={}", spec.level_log.display()),
        "-device".into(),
        format!("virtserialport,chardev=log,name={LOG_PORT}"),
    ]);
    if let Some(qmp) = &spec.qmp_socket {
        argv.push("-qmp".into());
        argv.push(format!("unix:{},server=on,wait=off", qmp.display()));
    }
    argv
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

    use super::*;

    fn spec(arch: Arch, accel: Accel) -> MachineSpec {
        MachineSpec {
            arch,
            accel,
            memory_mib: 4096,
            cpus: 2,
            kernel: "/img/kernel".into(),
            initrd: "/img/initrd".into(),
            root: "/img/root.squashfs".into(),
            append: vec!["level=1".into()],
            ssh_port: 40022,
            console_log: "/run/L1.console".into(),
            relay_fd: 3,
            level_log: "/run/L1.log".into(),
            qmp_socket: Some("/run/L1.qmp".into()),
        }
    }

    #[rstest]
    #[case::x86_tcg(
        Arch::X86_64,
        Accel::Tcg,
        "qemu-system-x86_64 -nodefaults -no-reboot -no-user-config -display none -machine q35 -accel tcg -cpu max -smp 2 -m 4096M -kernel /img/kernel -initrd /img/initrd -append console=ttyS0 quiet panic=-1 pci=lastbus=0 cryptomgr.notests mitigations=off level=1 -drive file=/img/root.squashfs,format=raw,if=none,id=root,readonly=on,cache=none,aio=native -device virtio-blk-pci,drive=root -netdev user,id=net0,hostfwd=tcp:127.0.0.1:40022-:22 -device virtio-net-pci,netdev=net0 -serial file:/run/L1.console -device virtio-serial-pci -chardev socket,id=relay,fd=3 -device virtserialport,chardev=relay,name=org.matryoshka.relay -chardev file,id=log,path=/run/L1.log -device virtserialport,chardev=log,name=org.matryoshka.log -qmp unix:/run/L1.qmp,server=on,wait=off"
    )]
    #[case::s390x_kvm(
        Arch::S390x,
        Accel::Kvm,
        "qemu-system-s390x -nodefaults -no-reboot -no-user-config -display none -machine s390-ccw-virtio -accel kvm -cpu host -smp 2 -m 4096M -kernel /img/kernel -initrd /img/initrd -append console=ttysclp0 quiet panic=-1 cryptomgr.notests mitigations=off level=1 -drive file=/img/root.squashfs,format=raw,if=none,id=root,readonly=on,cache=none,aio=native -device virtio-blk-ccw,drive=root -netdev user,id=net0,hostfwd=tcp:127.0.0.1:40022-:22 -device virtio-net-ccw,netdev=net0 -serial file:/run/L1.console -device virtio-serial-ccw -chardev socket,id=relay,fd=3 -device virtserialport,chardev=relay,name=org.matryoshka.relay -chardev file,id=log,path=/run/L1.log -device virtserialport,chardev=log,name=org.matryoshka.log -qmp unix:/run/L1.qmp,server=on,wait=off"
    )]
    fn command_lines(#[case] arch: Arch, #[case] accel: Accel, #[case] expected: &str) {
        assert_eq!(argv(&spec(arch, accel)).join(" "), expected);
    }

    #[test]
    fn ssh_is_forwarded_on_loopback_only() {
        let argv = argv(&spec(Arch::X86_64, Accel::Tcg));
        let net = argv
            .iter()
            .find(|a| a.starts_with("user,"))
            .expect("netdev");
        assert!(net.contains("hostfwd=tcp:127.0.0.1:40022-:22"), "{net}");
    }

    #[test]
    fn arches_from_uname() {
        assert_eq!(Arch::from_uname("x86_64"), Some(Arch::X86_64));
        assert_eq!(Arch::from_uname("s390x"), Some(Arch::S390x));
        assert_eq!(Arch::from_uname("riscv64"), None);
    }
}
