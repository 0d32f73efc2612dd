//! QEMU command lines for VM levels, built by pure functions from a [`MachineSpec`].
//!
//! Nothing here starts a process: the argv is data, unit-tested as data. The
//! boot, readiness wait and process registry that use it are in [`super::boot`]
//! and [`super::qemu`].
//!
//! Paths reach QEMU two ways (QEMU 7.2, `softmmu/vl.c`, `chardev/char.c`):
//! `-kernel` and `-initrd` (like `-serial file:`) are taken verbatim, and every
//! `key=value,…` option (`-drive`, `-chardev`, `-fw_cfg`) ends a value at a
//! comma unless it is doubled. [`opt_path`] doubles it; a path QEMU cannot be
//! given (not absolute, not UTF-8) is refused with its role and the reason.

use std::path::{Path, PathBuf};

use super::arch::Arch;

/// The `fw_cfg` entry that carries a level's SSH host key; the level's
/// initramfs reads it from `/sys/firmware/qemu_fw_cfg/by_name/<this>/raw`.
pub const HOST_KEY_FW_CFG: &str = "opt/org.matryoshka/hostkey";

/// The seccomp filter QEMU runs under when its binary supports `-sandbox`:
/// obsolete system calls, set*uid/gid, fork/exec and CPU affinity or scheduler
/// changes make QEMU exit at once.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Name of the virtio-serial port the level's runtime serves the relay on.
pub const RELAY_PORT: &str = "org.matryoshka.relay";
/// Name of the virtio-serial port the level writes its boot steps and its
/// runtime's stderr to. Unlike the serial console, whose every byte is a trap
/// through each level above, a port takes a whole buffer per notification.
pub const LOG_PORT: &str = "org.matryoshka.log";

/// How the guest's CPU is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// Initramfs (with the runtime appended, see [`super::initrd::RuntimeInitrd`]).
    pub initrd: PathBuf,
    /// The read-only root, handed to the guest as its first virtio disk.
    pub root: PathBuf,
    /// Whether the root is read with `O_DIRECT` (`cache=none`): not where its
    /// file system has none (a root inside a squashfs bundle).
    pub root_direct: bool,
    /// The bundle (runtimes and images of other architectures, see
    /// [`super::bundle`]), handed to the guest as its second virtio disk.
    pub bundle: Option<PathBuf>,
    /// Extra kernel command-line words (e.g. `level=2`).
    pub append: Vec<String>,
    /// Host port forwarded to the guest's SSH port, on 127.0.0.1 only.
    pub ssh_port: u16,
    /// File that receives the serial console.
    pub console_log: PathBuf,
    /// Unix socket QEMU listens on with a human monitor (HMP), when wanted.
    pub monitor: Option<PathBuf>,
    /// File descriptor, inherited by QEMU, of a connected Unix socket behind the
    /// guest's virtio-serial port [`RELAY_PORT`]: the relay's byte stream to the
    /// level's runtime. Connected before QEMU starts, so the port is open from the
    /// guest's first look at it, and no socket file or path length is involved.
    pub relay_fd: i32,
    /// File behind the guest's virtio-serial port [`LOG_PORT`]: the level's
    /// boot steps and its runtime's stderr.
    pub level_log: PathBuf,
    /// File descriptor, inherited by QEMU, of a connected Unix socket behind
    /// QEMU's QMP monitor: only the level that booted it holds the other end.
    pub qmp_fd: Option<i32>,
    /// SCSI generic nodes (`/dev/sgN`) of this level passed through to the guest
    /// on its virtio-scsi controller `scsi0`, each as target N of channel 0.
    pub scsi: Vec<PathBuf>,
    /// A file (mode 0600) holding the level's SSH host key, handed to the guest
    /// as the `fw_cfg` entry [`HOST_KEY_FW_CFG`]: never on a command line.
    pub host_key: Option<PathBuf>,
    /// Whether QEMU runs under the [`SANDBOX`] seccomp filter.
    pub sandbox: bool,
    /// File descriptor, inherited by QEMU, of a saved state of this machine
    /// (see [`super::snapshot`]) to start from instead of booting
    /// (`-incoming fd:N`).
    pub incoming_fd: Option<i32>,
    /// Whether the console and level log are appended to rather than started
    /// afresh (a machine restored from a snapshot goes on where its files end).
    pub append_files: bool,
}

/// A path as QEMU takes it verbatim (`-kernel`, `-initrd`): absolute and UTF-8.
fn plain_path<'a>(role: &str, path: &'a Path) -> Result<&'a str, String> {
    let text = path.to_str().ok_or_else(|| {
        format!(
            "the {role} path {} is not UTF-8 and cannot be passed to QEMU; rename it",
            path.display()
        )
    })?;
    // A relative `file=` with a colon before its first slash reads as a block
    // protocol (`nbd:…`): only absolute paths are handed over.
    if !path.is_absolute() {
        return Err(format!(
            "the {role} path {text} is not absolute; QEMU is given absolute paths only"
        ));
    }
    Ok(text)
}

/// A path as the value of a `key=value,…` option: absolute, UTF-8, each comma
/// doubled.
pub fn opt_path(role: &str, path: &Path) -> Result<String, String> {
    Ok(plain_path(role, path)?.replace(',', ",,"))
}

/// The kernel command line of `spec`'s level.
pub fn kernel_cmdline(spec: &MachineSpec) -> Result<String, String> {
    let a = spec.arch;
    // A kernel panic reboots at once, and -no-reboot turns that into QEMU exiting:
    // a panicking level is seen within a poll, not at the boot deadline.
    let mut append = vec![
        format!("console={}", a.console()),
        "quiet".to_string(),
        // Warnings too (quiet shows errors only): the parent watches the console
        // for the kernel's WARNING: lines (level/vm/kernel.rs).
        "loglevel=5".to_string(),
        "panic=-1".to_string(),
    ];
    append.extend(a.fast_boot_args().iter().map(|w| w.to_string()));
    append.extend(spec.append.iter().cloned());
    if spec.host_key.is_some() {
        if !a.has_fw_cfg() {
            return Err(format!(
                "a {} machine has no fw_cfg device to hand the level its host key",
                a.name()
            ));
        }
        append.push("matryoshka.hostkey=fw_cfg".into());
    }
    Ok(append.join(" "))
}

/// The argv (program first) that boots `spec`, or why a path in it cannot be
/// handed to QEMU.
pub fn argv(spec: &MachineSpec) -> Result<Vec<String>, String> {
    let a = spec.arch;
    let cpu = match spec.accel {
        Accel::Kvm => "host",
        Accel::Tcg => "max",
    };
    let accel = spec.accel.name();
    let append = kernel_cmdline(spec)?;
    let bus = a.bus();
    let appended = if spec.append_files { ",append=on" } else { "" };
    let mut argv: Vec<String> = vec![a.program()];
    if spec.sandbox {
        argv.extend(["-sandbox".into(), SANDBOX.into()]);
    }
    argv.extend([
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
        plain_path("kernel", &spec.kernel)?.into(),
        "-initrd".into(),
        plain_path("initramfs", &spec.initrd)?.into(),
        "-append".into(),
        append,
        // Read-only and uncached, so a root handed down level after level reads
        // the same blocks at every depth.
        "-drive".into(),
        format!(
            "file={},format=raw,if=none,id=root,readonly=on,{}",
            opt_path("root", &spec.root)?,
            if spec.root_direct {
                "cache=none,aio=native"
            } else {
                "cache=writeback"
            }
        ),
        "-device".into(),
        format!("virtio-blk-{bus},drive=root"),
    ]);
    // Second, so that the guest sees it as /dev/vdb.
    if let Some(bundle) = &spec.bundle {
        argv.extend([
            "-drive".into(),
            format!(
                "file={},format=raw,if=none,id=bundle,readonly=on",
                opt_path("bundle", bundle)?
            ),
            "-device".into(),
            format!("virtio-blk-{bus},drive=bundle"),
        ]);
    }
    argv.extend([
        // `restrict=on`: the guest reaches nothing through QEMU (slirp answers a
        // connection it does not forward with a reset and drops UDP); the
        // host-to-guest forward of the SSH port still works.
        "-netdev".into(),
        format!(
            "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{}-:22",
            spec.ssh_port
        ),
        "-device".into(),
        format!("virtio-net-{bus},netdev=net0"),
        // A chardev rather than `-serial file:` so that every path in a
        // `key=value` option follows one rule (`-serial file:` takes the rest verbatim).
        "-chardev".into(),
        format!(
            "file,id=console,path={}{appended}",
            opt_path("console", &spec.console_log)?
        ),
        "-serial".into(),
        "chardev:console".into(),
        "-device".into(),
        format!("virtio-serial-{bus}"),
        "-chardev".into(),
        format!("socket,id=relay,fd={}", spec.relay_fd),
        "-device".into(),
        format!("virtserialport,chardev=relay,name={RELAY_PORT}"),
        "-chardev".into(),
        format!(
            "file,id=log,path={}{appended}",
            opt_path("level log", &spec.level_log)?
        ),
        "-device".into(),
        format!("virtserialport,chardev=log,name={LOG_PORT}"),
    ]);
    if let Some(key) = &spec.host_key {
        argv.push("-fw_cfg".into());
        argv.push(format!(
            "name={HOST_KEY_FW_CFG},file={}",
            opt_path("host key", key)?
        ));
    }
    if let Some(socket) = &spec.monitor {
        argv.extend([
            "-chardev".into(),
            format!(
                "socket,id=hmp,path={},server=on,wait=off",
                opt_path("monitor socket", socket)?
            ),
            "-mon".into(),
            "chardev=hmp,mode=readline".into(),
        ]);
    }
    if let Some(fd) = spec.qmp_fd {
        argv.extend([
            "-chardev".into(),
            format!("socket,id=qmp,fd={fd}"),
            "-mon".into(),
            "chardev=qmp,mode=control".into(),
        ]);
    }
    // Every level has a SCSI controller: for the disks passed through to it and
    // for the ones a test hot-plugs (q35's root bus takes no PCI hot-plug).
    argv.extend(["-device".into(), format!("virtio-scsi-{bus},id=scsi0")]);
    for (i, node) in spec.scsi.iter().enumerate() {
        // As libvirt passes a SCSI hostdev: the sg node as a host_device block
        // node, and scsi-generic relaying the guest's commands to it (SG_IO runs
        // in QEMU, so this works under TCG too).
        let blockdev = serde_json::json!({
            "driver": "host_device",
            "filename": plain_path("SCSI generic node", node)?,
            "node-name": format!("pt{i}"),
            "read-only": false,
        });
        argv.extend([
            "-blockdev".into(),
            blockdev.to_string(),
            "-device".into(),
            format!(
                "scsi-generic,bus=scsi0.0,channel=0,scsi-id={i},lun=0,drive=pt{i},id=hostdev{i}"
            ),
        ]);
    }
    if let Some(fd) = spec.incoming_fd {
        argv.extend(["-incoming".into(), format!("fd:{fd}")]);
    }
    Ok(argv)
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
            root_direct: true,
            bundle: None,
            append: vec!["level=1".into()],
            ssh_port: 40022,
            console_log: "/run/L1.console".into(),
            monitor: None,
            relay_fd: 3,
            level_log: "/run/L1.log".into(),
            qmp_fd: Some(4),
            scsi: Vec::new(),
            host_key: None,
            sandbox: false,
            incoming_fd: None,
            append_files: false,
        }
    }

    #[rstest]
    #[case::x86_tcg(
        Arch::X86_64,
        Accel::Tcg,
        "qemu-system-x86_64 -nodefaults -no-reboot -no-user-config -display none -machine q35 -accel tcg -cpu max -smp 2 -m 4096M -kernel /img/kernel -initrd /img/initrd -append console=ttyS0 quiet loglevel=5 panic=-1 pci=lastbus=0 cryptomgr.notests mitigations=off scsi_mod.scan=sync level=1 -drive file=/img/root.squashfs,format=raw,if=none,id=root,readonly=on,cache=none,aio=native -device virtio-blk-pci,drive=root -netdev user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:40022-:22 -device virtio-net-pci,netdev=net0 -chardev file,id=console,path=/run/L1.console -serial chardev:console -device virtio-serial-pci -chardev socket,id=relay,fd=3 -device virtserialport,chardev=relay,name=org.matryoshka.relay -chardev file,id=log,path=/run/L1.log -device virtserialport,chardev=log,name=org.matryoshka.log -chardev socket,id=qmp,fd=4 -mon chardev=qmp,mode=control -device virtio-scsi-pci,id=scsi0"
    )]
    #[case::s390x_kvm(
        Arch::S390x,
        Accel::Kvm,
        "qemu-system-s390x -nodefaults -no-reboot -no-user-config -display none -machine s390-ccw-virtio -accel kvm -cpu host -smp 2 -m 4096M -kernel /img/kernel -initrd /img/initrd -append console=ttysclp0 quiet loglevel=5 panic=-1 cryptomgr.notests mitigations=off scsi_mod.scan=sync level=1 -drive file=/img/root.squashfs,format=raw,if=none,id=root,readonly=on,cache=none,aio=native -device virtio-blk-ccw,drive=root -netdev user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:40022-:22 -device virtio-net-ccw,netdev=net0 -chardev file,id=console,path=/run/L1.console -serial chardev:console -device virtio-serial-ccw -chardev socket,id=relay,fd=3 -device virtserialport,chardev=relay,name=org.matryoshka.relay -chardev file,id=log,path=/run/L1.log -device virtserialport,chardev=log,name=org.matryoshka.log -chardev socket,id=qmp,fd=4 -mon chardev=qmp,mode=control -device virtio-scsi-ccw,id=scsi0"
    )]
    fn command_lines(#[case] arch: Arch, #[case] accel: Accel, #[case] expected: &str) {
        assert_eq!(argv(&spec(arch, accel)).expect("argv").join(" "), expected);
    }

    #[test]
    fn a_restored_machine_reads_its_state_from_a_descriptor_and_appends_to_its_files() {
        let restored = MachineSpec {
            incoming_fd: Some(7),
            append_files: true,
            ..spec(Arch::X86_64, Accel::Tcg)
        };
        let argv = argv(&restored).expect("argv");
        let line = argv.join(" ");
        assert!(line.ends_with(" -incoming fd:7"), "{line}");
        assert!(
            line.contains("-chardev file,id=console,path=/run/L1.console,append=on "),
            "{line}"
        );
        assert!(
            line.contains("-chardev file,id=log,path=/run/L1.log,append=on "),
            "{line}"
        );
        // Everything else is the booted machine's: QEMU restores into the same devices.
        let booted = argv_of(&spec(Arch::X86_64, Accel::Tcg));
        let restored: Vec<String> = argv
            .iter()
            .map(|a| a.replace(",append=on", ""))
            .take_while(|a| a != "-incoming")
            .collect();
        assert_eq!(restored, booted);
    }

    fn argv_of(spec: &MachineSpec) -> Vec<String> {
        argv(spec).expect("argv")
    }

    fn option_after<'a>(argv: &'a [String], flag: &str, prefix: &str) -> &'a str {
        argv.windows(2)
            .find(|w| w[0] == flag && w[1].starts_with(prefix))
            .map(|w| w[1].as_str())
            .unwrap_or_else(|| panic!("no {flag} {prefix}… in {argv:?}"))
    }

    #[test]
    fn the_bundle_is_the_second_disk_and_a_root_without_direct_io_is_cached() {
        let mut s = spec(Arch::X86_64, Accel::Tcg);
        s.bundle = Some("/dev/vdb".into());
        s.root_direct = false;
        let argv = argv(&s).expect("argv").join(" ");
        assert!(
            argv.contains(
                "-drive file=/img/root.squashfs,format=raw,if=none,id=root,readonly=on,cache=writeback \
                 -device virtio-blk-pci,drive=root \
                 -drive file=/dev/vdb,format=raw,if=none,id=bundle,readonly=on \
                 -device virtio-blk-pci,drive=bundle -netdev"
            ),
            "{argv}"
        );
    }

    #[test]
    fn the_guest_network_is_restricted_and_ssh_forwarded_on_loopback_only() {
        let argv = argv(&spec(Arch::X86_64, Accel::Tcg)).expect("argv");
        let net = option_after(&argv, "-netdev", "user,");
        let words: Vec<&str> = net.split(',').collect();
        assert!(words.contains(&"restrict=on"), "{net}");
        assert!(words.contains(&"hostfwd=tcp:127.0.0.1:40022-:22"), "{net}");
    }

    #[test]
    fn paths_with_commas_and_equals_signs_are_escaped_for_qemu_options() {
        let d = "/tmp/a,b=c";
        let mut s = spec(Arch::X86_64, Accel::Tcg);
        s.kernel = format!("{d}/kernel").into();
        s.initrd = format!("{d}/initrd").into();
        s.root = format!("{d}/root.img").into();
        s.console_log = format!("{d}/L1.console").into();
        s.level_log = format!("{d}/L1.log").into();
        s.host_key = Some(format!("{d}/L1.hostkey").into());
        s.monitor = Some(format!("{d}/L1.monitor").into());
        let argv = argv(&s).expect("argv");
        // -kernel and -initrd are taken verbatim.
        assert_eq!(option_after(&argv, "-kernel", ""), "/tmp/a,b=c/kernel");
        assert_eq!(option_after(&argv, "-initrd", ""), "/tmp/a,b=c/initrd");
        // In key=value options a comma is doubled; `=` inside a value needs nothing.
        let e = "/tmp/a,,b=c";
        for (flag, expected) in [
            (
                "-drive",
                format!(
                    "file={e}/root.img,format=raw,if=none,id=root,readonly=on,cache=none,aio=native"
                ),
            ),
            ("-chardev", format!("file,id=console,path={e}/L1.console")),
            ("-chardev", format!("file,id=log,path={e}/L1.log")),
            (
                "-chardev",
                format!("socket,id=hmp,path={e}/L1.monitor,server=on,wait=off"),
            ),
            ("-mon", "chardev=hmp,mode=readline".to_string()),
            (
                "-fw_cfg",
                format!("name=opt/org.matryoshka/hostkey,file={e}/L1.hostkey"),
            ),
        ] {
            assert!(
                argv.windows(2).any(|w| w[0] == flag && w[1] == expected),
                "no {flag} {expected} in {argv:?}"
            );
        }
    }

    #[test]
    fn scsi_generic_nodes_go_to_a_virtio_scsi_controller() {
        let mut s = spec(Arch::X86_64, Accel::Tcg);
        s.scsi = vec!["/dev/sg0".into(), "/dev/sg3".into()];
        let argv = argv(&s).expect("argv");
        let tail = argv[argv.len() - 10..].join(" ");
        assert_eq!(
            tail,
            "-device virtio-scsi-pci,id=scsi0 \
             -blockdev {\"driver\":\"host_device\",\"filename\":\"/dev/sg0\",\"node-name\":\"pt0\",\"read-only\":false} \
             -device scsi-generic,bus=scsi0.0,channel=0,scsi-id=0,lun=0,drive=pt0,id=hostdev0 \
             -blockdev {\"driver\":\"host_device\",\"filename\":\"/dev/sg3\",\"node-name\":\"pt1\",\"read-only\":false} \
             -device scsi-generic,bus=scsi0.0,channel=0,scsi-id=1,lun=0,drive=pt1,id=hostdev1"
        );
        s.arch = Arch::S390x;
        let argv = super::argv(&s).expect("argv");
        assert!(
            argv.iter().any(|a| a == "virtio-scsi-ccw,id=scsi0"),
            "{argv:?}"
        );
        s.scsi = vec!["dev/sg0".into()];
        assert!(super::argv(&s).is_err());
    }

    #[rstest]
    #[case::relative_root("root", "img/root.img", "the root path img/root.img is not absolute")]
    #[case::relative_kernel(
        "kernel",
        "nbd:x/kernel",
        "the kernel path nbd:x/kernel is not absolute"
    )]
    fn paths_qemu_cannot_take_are_refused(
        #[case] role: &str,
        #[case] path: &str,
        #[case] expected: &str,
    ) {
        let mut s = spec(Arch::X86_64, Accel::Tcg);
        match role {
            "root" => s.root = path.into(),
            _ => s.kernel = path.into(),
        }
        let err = argv(&s).expect_err("refused");
        assert!(err.starts_with(expected), "{err}");
    }

    #[test]
    fn non_utf8_paths_are_refused() {
        use std::os::unix::ffi::OsStrExt;
        let mut s = spec(Arch::X86_64, Accel::Tcg);
        s.level_log = std::ffi::OsStr::from_bytes(b"/run/\xff.log").into();
        let err = argv(&s).expect_err("refused");
        assert!(
            err.contains("level log path") && err.contains("not UTF-8"),
            "{err}"
        );
    }

    #[test]
    fn the_host_key_travels_in_fw_cfg_not_on_the_command_line() {
        let mut s = spec(Arch::X86_64, Accel::Tcg);
        s.host_key = Some("/run/L1.hostkey".into());
        let argv = argv(&s).expect("argv");
        assert_eq!(
            option_after(&argv, "-fw_cfg", ""),
            "name=opt/org.matryoshka/hostkey,file=/run/L1.hostkey"
        );
        let append = option_after(&argv, "-append", "");
        assert!(append.ends_with(" matryoshka.hostkey=fw_cfg"), "{append}");
        // s390-ccw-virtio has no fw_cfg: refused rather than silently dropped.
        s.arch = Arch::S390x;
        assert!(
            super::argv(&s)
                .expect_err("no fw_cfg")
                .contains("no fw_cfg device")
        );
    }

    #[test]
    fn the_sandbox_comes_first_and_denies_the_optional_sets() {
        let mut s = spec(Arch::X86_64, Accel::Kvm);
        s.sandbox = true;
        let argv = argv(&s).expect("argv");
        assert_eq!(
            &argv[..3],
            [
                "qemu-system-x86_64",
                "-sandbox",
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
            ]
        );
    }
}
