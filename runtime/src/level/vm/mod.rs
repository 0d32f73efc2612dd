//! VM levels: boot QEMU from the image with the runtime in its initramfs; the
//! level's init starts that runtime on a virtio-serial port, and the relay runs
//! over the socket behind it. No network and no SSH on the relay's path: the
//! level's sshd is there for people, reached with the printed `ssh -J …` command.
//!
//! - [`context`]: what a level knows for booting levels below it (run folder, key).
//! - [`image`], [`initrd`]: the files a level boots from.
//! - [`accel`]: KVM or TCG, and why.
//! - [`resources`]: what a level can give the levels it boots.
//! - [`argv`]: QEMU's command line, built as data.
//! - [`sandbox`]: whether QEMU runs under its seccomp filter.
//! - [`qemu`]: the running QEMU and how it ended.
//! - [`boot`]: starting QEMU and waiting until the level serves.
//! - [`snapshot`], [`identity`]: saving a level, starting it again, and what
//!   a saved chain was made of.

pub mod accel;
pub mod arch;
pub mod argv;
pub mod boot;
pub mod bundle;
pub mod context;
pub mod domain;
pub mod identity;
pub mod image;
pub mod initrd;
pub mod kernel;
pub mod machine;
pub mod monitor;
pub mod qemu;
pub mod qmp;
pub mod resources;
pub mod sandbox;
pub mod snapshot;

use std::path::PathBuf;

use tokio::io::AsyncReadExt;

pub use boot::{Backend, VmRequest};
pub use context::{RunDir, VmContext};

use super::replicate;
use super::ssh::sh_quote;
use super::transport::{LineCutter, StderrTail, Transport, TransportGuard, VmFacts};
use crate::config::SshSettings;
use crate::wire::{LevelSetup, RemoteError, WireErrorKind};
use arch::Arch;
use boot::{BootPlan, HostKey};
use context::RunKey;
use image::{Image, ImageRefusal};
use machine::Machine;
use resources::LevelResources;

/// How long a level restored from a snapshot has to run again.
const RESTORE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Silence after which a VM level is declared lost.
const VM_HEARTBEAT_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// Boots the level and returns the relay's stream to its runtime, which owns the
/// QEMU process.
pub async fn open(
    req: &VmRequest,
    setup: &LevelSetup,
    own_ssh: Option<&SshSettings>,
    ctx: &VmContext,
) -> Result<Transport, RemoteError> {
    let err = |kind: WireErrorKind, message: String| RemoteError {
        kind,
        message,
        level_path: setup.path.clone(),
    };
    if let Some(why) = no_level_below(&setup.path) {
        return Err(err(WireErrorKind::Unsupported, why));
    }
    let key = ctx
        .run_key(own_ssh)
        .map_err(|m| err(WireErrorKind::Io, m))?;
    let run_dir = ctx.run_dir.path().map_err(|m| err(WireErrorKind::Io, m))?;
    let run_dir =
        std::path::absolute(&run_dir).map_err(|e| err(WireErrorKind::Io, e.to_string()))?;
    let req = checked_request(req, setup, ctx).map_err(|(kind, m)| err(kind, m))?;
    let scsi = passed_scsi(&req, setup)
        .await
        .map_err(|(kind, m)| err(kind, m))?;
    if req.backend == Backend::Libvirt && !setup.grants.libvirt.allows(domain::URI) {
        return Err(err(
            WireErrorKind::Denied,
            format!(
                "booting a level with the libvirt backend uses {} at {}, which is not granted; \
                 add --grant libvirt (or --grant libvirt={})",
                domain::URI,
                resources::parent_of(&setup.path),
                domain::URI
            ),
        ));
    }
    // The runtime for the level's architecture: this one, or a build of
    // $MATRYOSHKA_RUNTIME_DIR; it rides in the level's initramfs.
    let runtime = {
        let arch = req
            .arch
            .clone()
            .unwrap_or_else(|| std::env::consts::ARCH.to_string());
        tokio::task::spawn_blocking(move || replicate::image_for(&arch))
            .await
            .map_err(|e| err(WireErrorKind::Internal, e.to_string()))?
            .map_err(|m| err(WireErrorKind::Unsupported, m))?
    };
    // The level's host key is made here and handed in through fw_cfg: nothing
    // to generate (slowly, under TCG) there.
    let host_key = RunKey::generate().ok().and_then(|k| {
        Some(HostKey {
            private_openssh: k.private_key?,
            public_line: k.public_line,
        })
    });
    if let Some(key) = &host_key {
        tracing::info!(level = %setup.path, "host key: {}", key.public_line);
    }
    // Known only where the key reaches the level (fw_cfg); elsewhere it makes its own.
    let host_key_line = host_key
        .as_ref()
        .filter(|_| {
            req.arch
                .as_deref()
                .and_then(Arch::from_uname)
                .unwrap_or_else(Arch::host)
                .has_fw_cfg()
        })
        .map(|k| {
            // Type and key: its comment is no part of a known_hosts line.
            let words: Vec<&str> = k.public_line.split_whitespace().take(2).collect();
            words.join(" ")
        });
    // What the level needs to boot levels of other architectures.
    let bundle = {
        let arch = req
            .arch
            .as_deref()
            .and_then(Arch::from_uname)
            .unwrap_or_else(Arch::host);
        let image_dir = ctx.image_dir.clone();
        let cache = ctx.memo_dir.clone().unwrap_or_else(|| run_dir.clone());
        tokio::task::spawn_blocking(move || bundle::for_child(arch, image_dir.as_deref(), &cache))
            .await
            .map_err(|e| err(WireErrorKind::Internal, e.to_string()))?
    };
    let plan = BootPlan {
        depth: setup.depth,
        path: setup.path.clone(),
        policy: setup.vm.accel,
        run_dir: run_dir.clone(),
        authorized_key: key.public_line.clone(),
        memo_dir: ctx.memo_dir.clone(),
        runtime: (runtime.path().to_path_buf(), runtime.sha256.clone()),
        initrd_cache: ctx
            .memo_dir
            .clone()
            .unwrap_or_else(|| run_dir.clone())
            .join("vm-runtime"),
        host_key,
        scsi,
        bundle,
        monitor: setup.vm.keep_failed,
    };
    let booted = boot::boot(&req, &plan).await.map_err(|m| {
        let kind = if m.starts_with("no ") && m.contains("images/build.sh") {
            WireErrorKind::NotFound
        } else if m.contains("with the libvirt backend:") || m.contains("with libvirt:") {
            // No libvirt library or daemon, or an architecture it does not boot.
            WireErrorKind::Unsupported
        } else if m.contains("was not serving within") {
            WireErrorKind::Timeout
        } else {
            WireErrorKind::LevelLost
        };
        err(kind, m)
    })?;
    tracing::info!(
        level = %setup.path,
        "booted with {} in {:.1} s ({}); console: {}",
        booted.accel.name(),
        booted.boot_time.as_secs_f64(),
        booted.accel_reason,
        booted.machine.console_path().display()
    );
    transport_of(
        booted,
        &setup.path,
        key.public_line,
        key.path,
        &setup.vm.jump,
        host_key_line,
        0,
    )
}

/// Starts the level of `facts` again from `snapshot` (see [`snapshot`]): the
/// relay to its runtime, which serves on the connection it served when saved.
pub async fn restore(
    snapshot: &snapshot::Snapshot,
    facts: &VmFacts,
) -> Result<Transport, RemoteError> {
    let path = snapshot.machine.path.clone();
    // The copy before wrote this much of the console; the kernel watcher starts after it.
    let console_from = std::fs::metadata(&snapshot.machine.files.console).map_or(0, |m| m.len());
    let booted = snapshot::restore(snapshot, RESTORE_TIMEOUT)
        .await
        .map_err(|message| RemoteError {
            kind: WireErrorKind::LevelLost,
            message,
            level_path: path.clone(),
        })?;
    transport_of(
        booted,
        &path,
        facts.public_key.clone(),
        facts.key_path.clone(),
        &snapshot.machine.jump,
        facts.host_key.clone(),
        console_from,
    )
}

/// The relay of a level that serves (booted or restored), with what its parent knows of it.
fn transport_of(
    booted: boot::Booted,
    path: &str,
    public_key: String,
    key_path: Option<String>,
    jump: &[String],
    host_key_line: Option<String>,
    console_from: u64,
) -> Result<Transport, RemoteError> {
    let err = |kind: WireErrorKind, message: String| RemoteError {
        kind,
        message,
        level_path: path.to_string(),
    };
    let relay = booted.relay;
    let relay = relay
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(relay))
        .map_err(|e| {
            err(
                WireErrorKind::Io,
                format!("cannot use the relay socket: {e}"),
            )
        })?;
    let (reader, writer) = relay.into_split();
    let console = booted.machine.console_path().to_path_buf();
    let monitor = booted.machine.monitor();
    let files = {
        use super::files::FileKind;
        let m = &booted.machine;
        vec![
            (FileKind::Console, m.console_path().to_path_buf()),
            (FileKind::LevelLog, m.level_log_path().to_path_buf()),
            (FileKind::QemuLog, m.qemu_log_path().to_path_buf()),
            // Written by the connection (level::connection::journal).
            (FileKind::Relay, m.console_path().with_extension("relay")),
        ]
    };
    let tail = StderrTail::default();
    // The boot steps were logged with the ready line: follow what comes after.
    let log_path = booted.machine.level_log_path().to_path_buf();
    let seen = std::fs::metadata(&log_path).map_or(0, |m| m.len());
    let log_pump = tokio::spawn(follow_level_log(
        log_path,
        seen,
        path.to_string(),
        tail.clone(),
    ));
    let ssh_command = Some(debug_ssh_command(
        key_path.as_deref(),
        jump,
        booted.ssh_port,
    ));
    Ok(Transport {
        reader: Box::new(reader),
        writer: Box::new(writer),
        guard: Box::new(VmGuard {
            machine: booted.machine,
            log_pump,
            tail,
        }),
        ssh_command,
        qmp: booted.qmp,
        vm: Some(VmFacts {
            accel: booted.accel.name().to_string(),
            accel_reason: booted.accel_reason,
            hop: format!("root@127.0.0.1:{}", booted.ssh_port),
            public_key,
            key_path,
            console,
            console_from,
            ssh_port: booted.ssh_port,
            host_key: host_key_line,
            monitor,
            files,
            restorable: booted.restorable.map(|mut r| {
                r.jump = jump.to_vec();
                r
            }),
        }),
        // A level running a nested guest can be starved of CPU for seconds (KVM in
        // KVM in TCG); while its QEMU lives, a longer silence is tolerated. A QEMU
        // that exits closes the relay socket, which is seen at once.
        heartbeat_grace: Some(VM_HEARTBEAT_GRACE),
    })
}

/// Why no VM level can be booted below this one, when none can: an s390x level
/// without KVM is emulated (QEMU's TCG), and an emulated s390x CPU has no SIE,
/// the instruction KVM runs guests with (its kernel says "kvm-s390: SIE is not
/// available"); its image carries no QEMU either.
fn no_level_below(child: &str) -> Option<String> {
    if Arch::host() != Arch::S390x || std::path::Path::new("/dev/kvm").exists() {
        return None;
    }
    Some(format!(
        "{} cannot boot {child}: it is an s390x level emulated by TCG, whose CPU has no SIE \
         (the instruction KVM runs guests with), so it has no KVM and boots no level below it; \
         make the s390x level the last of the chain",
        resources::parent_of(child)
    ))
}

/// The request with its image folder, memory and CPUs settled and checked
/// before QEMU starts: the image must be the run's or under a granted folder,
/// and memory and CPUs within what this level has.
fn checked_request(
    req: &VmRequest,
    setup: &LevelSetup,
    ctx: &VmContext,
) -> Result<VmRequest, (WireErrorKind, String)> {
    let mut req = req.clone();
    let arch = match &req.arch {
        Some(a) => Arch::from_uname(a).ok_or_else(|| {
            (
                WireErrorKind::InvalidArgument,
                format!("cannot boot a `{a}` level: known are x86_64 and s390x"),
            )
        })?,
        None => Arch::host(),
    };
    // The run's image folder: --image-dir at L0, else the default resolution
    // (at a VM level, the image it booted from).
    let run_image = ctx.image_dir.as_deref().map_or_else(
        || Image::default_dir(arch),
        |dir| Image::folder_for(dir, arch),
    );
    req.image = Some(match &req.image {
        None => run_image,
        Some(asked) => image::check_requested(asked, &run_image, &setup.grants.images, &setup.path)
            .map_err(|refusal| match refusal {
                ImageRefusal::NotFound(m) => (WireErrorKind::NotFound, m),
                ImageRefusal::Denied(m) => (WireErrorKind::Denied, m),
            })?,
    });
    // Its files are there (before the runtime for its architecture is looked for).
    Image::resolve(req.image.as_deref(), arch).map_err(|m| (WireErrorKind::NotFound, m))?;
    let have = LevelResources::of_this_level();
    let memory_mib = req.memory_mib.unwrap_or_else(|| have.default_memory_mib());
    // Unset CPUs stay unset: their default depends on the accelerator, chosen
    // at boot, and is one or two, which every level has.
    resources::check(memory_mib, req.cpus.unwrap_or(1), &have, &setup.path)
        .map_err(|m| (WireErrorKind::InvalidArgument, m))?;
    req.memory_mib = Some(memory_mib);
    Ok(req)
}

/// The sg nodes of the SCSI devices `req` passes through, checked: the grant,
/// and each device present at this level with an sg node (`sg` is loaded for a
/// device that has none yet, e.g. a disk a parent passed through).
async fn passed_scsi(
    req: &VmRequest,
    setup: &LevelSetup,
) -> Result<Vec<crate::scsi::Device>, (WireErrorKind, String)> {
    if req.scsi.is_empty() {
        return Ok(Vec::new());
    }
    if !setup.grants.passthrough {
        return Err((
            WireErrorKind::Denied,
            "passing SCSI devices to a level is not granted; add --grant passthrough \
             (or passthrough = true under [grants] in matryoshka.toml)"
                .into(),
        ));
    }
    let wanted = req.scsi.clone();
    let depth_here = setup.depth.saturating_sub(1);
    let parent = resources::parent_of(&setup.path).to_string();
    tokio::task::spawn_blocking(move || {
        let sysfs = crate::scsi::Sysfs::system();
        let mut nodes = Vec::new();
        for address in wanted {
            let Some(mut device) = sysfs.device(address) else {
                let have: Vec<String> = sysfs
                    .devices()
                    .unwrap_or_default()
                    .iter()
                    .map(crate::scsi::Device::describe)
                    .collect();
                return Err((
                    WireErrorKind::NotFound,
                    format!(
                        "{parent} has no SCSI device {address} to pass through; it has {}",
                        if have.is_empty() {
                            "none (make one with passthrough.scsi-debug-disk)".to_string()
                        } else {
                            have.join("; ")
                        }
                    ),
                ));
            };
            // Test disks only: a scsi_debug disk, or at a VM level a disk its parent
            // passed to it; never the machine's own disks.
            let passable = device.host_driver == "scsi_debug"
                || (depth_here > 0 && device.host_driver == "virtio_scsi");
            if !passable {
                return Err((
                    WireErrorKind::Denied,
                    format!(
                        "{parent} passes scsi_debug disks{} only; {} is on a {} adapter",
                        if depth_here > 0 {
                            " and disks passed to it (virtio_scsi)"
                        } else {
                            ""
                        },
                        device.describe(),
                        device.host_driver
                    ),
                ));
            }
            if device.generic_node.is_none() {
                crate::scsi::debug::load_sg();
                device =
                    crate::scsi::debug::wait_for_generic_node(&sysfs, address).unwrap_or(device);
            }
            match &device.generic_node {
                Some(node) if node.exists() => nodes.push(device),
                _ => {
                    return Err((
                        WireErrorKind::Unsupported,
                        format!(
                            "the SCSI device {} at {parent} has no SCSI generic node to pass \
                             through: load the sg module there",
                            device.describe()
                        ),
                    ));
                }
            }
        }
        Ok(nodes)
    })
    .await
    .map_err(|e| (WireErrorKind::Internal, e.to_string()))?
}

/// Relays the lines of a level log past `from` into this runtime's log: the
/// level runtime's stderr goes into the tail shown when the level is lost, the
/// init's own `MATRYOSHKA-` lines only into the log.
async fn follow_level_log(path: PathBuf, from: u64, level: String, tail: StderrTail) {
    use tokio::io::AsyncSeekExt;
    let Ok(mut file) = tokio::fs::File::open(&path).await else {
        return;
    };
    if file.seek(std::io::SeekFrom::Start(from)).await.is_err() {
        return;
    }
    let mut lines = LineCutter::default();
    let mut chunk = vec![0u8; 8 << 10];
    loop {
        match file.read(&mut chunk).await {
            Ok(0) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
            Ok(n) => lines.push(&chunk[..n], |line| {
                let line = line.trim_end();
                if line.starts_with("MATRYOSHKA-") {
                    tracing::info!(level = %level, "{line}");
                } else if !line.is_empty() {
                    tail.push(&level, line);
                }
            }),
            Err(_) => return,
        }
    }
}

/// An `ssh` command that opens a shell at a VM level from the machine the run
/// started on, through the levels above it. Test VMs make a fresh host key at
/// every boot, so it does not check host keys.
fn debug_ssh_command(key_path: Option<&str>, jump: &[String], port: u16) -> String {
    let mut cmd = String::from("ssh");
    if let Some(key) = key_path {
        cmd.push_str(&format!(" -i {}", sh_quote(key)));
    }
    cmd.push_str(" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null");
    if !jump.is_empty() {
        cmd.push_str(&format!(" -J {}", jump.join(",")));
    }
    cmd.push_str(&format!(" -p {port} root@127.0.0.1"));
    cmd
}

struct VmGuard {
    machine: Box<dyn Machine>,
    log_pump: tokio::task::JoinHandle<()>,
    tail: StderrTail,
}

impl Drop for VmGuard {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl TransportGuard for VmGuard {
    fn shutdown(&mut self) {
        self.log_pump.abort();
        self.machine.kill();
    }

    fn describe_exit(&mut self) -> String {
        format!(
            "{} ({})",
            self.tail.explain(None),
            self.machine.describe_end()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_commands_jump_through_the_levels_above() {
        assert_eq!(
            debug_ssh_command(Some("/run/id"), &[], 40022),
            "ssh -i '/run/id' -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -p 40022 root@127.0.0.1"
        );
        assert_eq!(
            debug_ssh_command(None, &["root@127.0.0.1:40022".into()], 40100),
            "ssh -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -J root@127.0.0.1:40022 -p 40100 root@127.0.0.1"
        );
    }
}
