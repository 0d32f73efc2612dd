//! Booting a VM level: QEMU from the image with the runtime in its initramfs,
//! watched until the level's runtime serves the relay.
//!
//! The runtime rides in the initramfs ([`RuntimeInitrd`]); the level's init starts
//! it on a virtio-serial port ([`argv::RELAY_PORT`]) whose other end is a socket
//! this level holds. The boot is watched on three channels that only this level reads:
//! - the serial console: `MATRYOSHKA-BOOT` from the initramfs, the first sign of
//!   life, and whatever the kernel says when it panics;
//! - the level log ([`argv::LOG_PORT`]): `MATRYOSHKA-STEP` lines with boot
//!   timings, `MATRYOSHKA-FAIL` when the init gives up, then the runtime's stderr;
//! - the relay socket: the runtime's first bytes (its `Hello`) mean it serves.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::accel::{choose_accel, remember, wait_for_kvm_module};
use super::arch::Arch;
use super::argv::{self, Accel, MachineSpec};
use super::image::Image;
use super::initrd::RuntimeInitrd;
use super::qemu::{LevelFiles, Qemu, QemuEnd};
use super::resources::LevelResources;
use super::sandbox;
use crate::config::AccelPolicy;
use crate::process;

/// Default deadline for a level's runtime to serve.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// What a test asks for when it boots a level; unset fields take defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmRequest {
    /// Memory, MiB [default: 60% of what this level has available, at most 4096].
    pub memory_mib: Option<u32>,
    /// Virtual CPUs [default: 2 for L1, 1 below].
    pub cpus: Option<u32>,
    /// Guest architecture [default: this level's].
    pub arch: Option<String>,
    /// Folder with `kernel`, `initrd` and `root.img` [default: see [`Image::resolve`]].
    pub image: Option<PathBuf>,
    /// Accelerator, overriding the run's policy.
    pub accel: Option<AccelPolicy>,
    /// Deadline for the level's runtime to serve.
    pub boot_timeout: Option<Duration>,
    /// What runs the level.
    pub backend: Backend,
    /// SCSI devices of this level to pass through.
    pub scsi: Vec<crate::scsi::Address>,
}

/// What runs a booted level.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Backend {
    /// QEMU started by this runtime.
    #[default]
    Qemu,
    /// A transient libvirt domain at this level.
    Libvirt,
}

/// A level that booted and whose runtime serves.
pub struct Booted {
    /// What runs it.
    pub machine: Box<dyn super::machine::Machine>,
    /// The relay's byte stream to its runtime, whose `Hello` is waiting to be read.
    pub relay: std::os::unix::net::UnixStream,
    /// Its QEMU's QMP monitor.
    pub qmp: Option<super::monitor::QmpPort>,
    /// Host port forwarded to its SSH port, on 127.0.0.1 (for people, not the relay).
    pub ssh_port: u16,
    /// The accelerator it runs under.
    pub accel: Accel,
    /// Why `auto` chose that accelerator, for the run's log.
    pub accel_reason: String,
    /// How long it took from starting QEMU to its runtime's first bytes.
    pub boot_time: Duration,
    /// How to start its QEMU again from a saved state (qemu backend only).
    pub restorable: Option<super::snapshot::Restorable>,
}

/// Everything [`boot`] needs besides the request.
#[derive(Debug, Clone)]
pub struct BootPlan {
    /// Depth of the new level.
    pub depth: u32,
    /// Level path of the new level, e.g. `L0/L1`.
    pub path: String,
    /// The run's accelerator policy.
    pub policy: AccelPolicy,
    /// Folder for consoles and QEMU logs.
    pub run_dir: PathBuf,
    /// `authorized_keys` line the new level accepts.
    pub authorized_key: String,
    /// Folder to remember the KVM probe in, when there is one.
    pub memo_dir: Option<PathBuf>,
    /// The runtime binary the level serves with, and its hex sha256.
    pub runtime: (PathBuf, String),
    /// Where initramfs images with a runtime appended are kept.
    pub initrd_cache: PathBuf,
    /// The level's SSH host key, made by this level so that the level need not
    /// make one under emulation; without one it makes its own.
    pub host_key: Option<HostKey>,
    /// SCSI devices of this level to pass through to the new level, each with its sg node.
    pub scsi: Vec<crate::scsi::Device>,
    /// The bundle disk for the new level: what it needs to boot levels of other
    /// architectures ([`super::bundle`]).
    pub bundle: Option<PathBuf>,
    /// Whether its QEMU gets a human monitor socket beside its console (`--keep-failed`).
    pub monitor: bool,
}

/// A level's SSH host key. It reaches the level as a `fw_cfg` file (where the
/// machine has one), never on a command line or in a log.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct HostKey {
    /// The private key, OpenSSH format.
    pub private_openssh: String,
    /// Its public half, `authorized_keys` format, for logs and known hosts.
    pub public_line: String,
}

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostKey")
            .field("public_line", &self.public_line)
            .finish_non_exhaustive()
    }
}

/// The host key written for QEMU to read into `fw_cfg`: a 0600 file in the run
/// folder, removed when this is dropped (once the boot is over).
pub(super) fn host_key_file(
    plan: &BootPlan,
    arch: Arch,
    name: &str,
) -> Result<Option<tempfile::NamedTempFile>, String> {
    let Some(key) = plan.host_key.as_ref().filter(|_| arch.has_fw_cfg()) else {
        return Ok(None);
    };
    // tempfile makes the file with mode 0600.
    let mut file = tempfile::Builder::new()
        .prefix(&format!("{name}.hostkey."))
        .tempfile_in(&plan.run_dir)
        .map_err(|e| {
            format!(
                "cannot create the host key file of {} in {}: {e}",
                plan.path,
                plan.run_dir.display()
            )
        })?;
    std::io::Write::write_all(&mut file, key.private_openssh.as_bytes())
        .and_then(|()| file.as_file().sync_all())
        .map_err(|e| format!("cannot write {}: {e}", file.path().display()))?;
    Ok(Some(file))
}

/// Boots a level and waits until its runtime serves.
pub async fn boot(req: &VmRequest, plan: &BootPlan) -> Result<Booted, String> {
    let arch = match &req.arch {
        Some(a) => Arch::from_uname(a)
            .ok_or_else(|| format!("cannot boot a `{a}` level: known are x86_64 and s390x"))?,
        None => Arch::host(),
    };
    let mut image = Image::resolve(req.image.as_deref(), arch)?;
    std::fs::create_dir_all(&plan.run_dir)
        .map_err(|e| format!("cannot create {}: {e}", plan.run_dir.display()))?;
    let initrd = {
        let (initrd, (binary, sha), dir) = (
            image.initrd.clone(),
            plan.runtime.clone(),
            plan.initrd_cache.clone(),
        );
        tokio::task::spawn_blocking(move || RuntimeInitrd::prepare(&initrd, &binary, &sha, &dir))
            .await
            .map_err(|e| e.to_string())??
    };
    image.initrd = initrd.path;
    let timeout = req.boot_timeout.unwrap_or(DEFAULT_BOOT_TIMEOUT);
    wait_for_kvm_module(&plan.path).await;
    if req.backend == Backend::Libvirt {
        return super::domain::boot(req, plan, &image, arch, timeout).await;
    }
    let (accel, mut reason, probe) = choose_accel(req.accel.unwrap_or(plan.policy), arch, plan)?;
    let first = start_and_wait(req, plan, &image, arch, accel, timeout, probe).await;
    match first {
        Err(Failure::KvmUnusable(why)) => {
            remember(plan, &format!("tcg: {why}"));
            tracing::warn!(level = %plan.path, "KVM does not work here ({why}); booting with TCG");
            reason = format!("auto: KVM does not work at the parent level ({why})");
            start_and_wait(req, plan, &image, arch, Accel::Tcg, timeout, false)
                .await
                .map_err(Failure::into_message)
        }
        Err(e) => Err(e.into_message()),
        Ok(booted) => {
            if probe {
                remember(plan, "kvm");
            }
            Ok(booted)
        }
    }
    .map(|mut b| {
        b.accel_reason = reason;
        b
    })
}

/// The files of the level `path` in `run_dir`; with a monitor socket when
/// `monitor` and the folder's path leaves room for one.
pub fn level_files(run_dir: &std::path::Path, path: &str, monitor: bool) -> LevelFiles {
    let name = path.replace('/', "-");
    LevelFiles {
        console: run_dir.join(format!("{name}.console")),
        qemu_log: run_dir.join(format!("{name}.qemu.log")),
        level_log: run_dir.join(format!("{name}.log")),
        // A socket path has at most 107 bytes; a longer run folder gets no monitor.
        monitor: Some(run_dir.join(format!("{name}.monitor")))
            .filter(|p| monitor && p.as_os_str().len() < 100),
    }
}

enum Failure {
    /// KVM was only being tried, and the guest did not boot with it.
    KvmUnusable(String),
    /// The boot failed; the message says how and shows the console.
    Boot(String),
}

impl Failure {
    fn into_message(self) -> String {
        match self {
            Self::KvmUnusable(m) | Self::Boot(m) => m,
        }
    }
}

async fn start_and_wait(
    req: &VmRequest,
    plan: &BootPlan,
    image: &Image,
    arch: Arch,
    accel: Accel,
    timeout: Duration,
    probe: bool,
) -> Result<Booted, Failure> {
    let name = plan.path.replace('/', "-");
    let files = level_files(&plan.run_dir, &plan.path, plan.monitor);
    // Read by QEMU when it starts; removed when this function returns.
    let host_key = host_key_file(plan, arch, &name).map_err(Failure::Boot)?;
    let absolute = |p: &std::path::Path| {
        std::path::absolute(p).map_err(|e| Failure::Boot(format!("{}: {e}", p.display())))
    };
    // A port taken between choosing and QEMU binding it fails the start: try another.
    let mut attempt = 0;
    // Under QEMU's seccomp filter unless this binary refused it (see super::sandbox).
    let mut sandbox = sandbox::wanted(arch.binary());
    // A guest that resets while it boots (seen now and then with KVM nested in TCG,
    // see docs/benchmarks.md) is booted once more.
    let mut resets = 0;
    loop {
        attempt += 1;
        let ssh_port = free_port().map_err(Failure::Boot)?;
        let pair = || {
            std::os::unix::net::UnixStream::pair().map_err(|e| {
                Failure::Boot(format!("cannot make a socket pair for {}: {e}", plan.path))
            })
        };
        let (relay, guest_end) = pair()?;
        let (qmp, qmp_end) = pair()?;
        let mut spec =
            machine_spec(plan, image, arch, accel, req, ssh_port, &files).map_err(Failure::Boot)?;
        spec.relay_fd = std::os::fd::AsRawFd::as_raw_fd(&guest_end);
        spec.qmp_fd = Some(std::os::fd::AsRawFd::as_raw_fd(&qmp_end));
        spec.host_key = host_key.as_ref().map(|f| absolute(f.path())).transpose()?;
        spec.sandbox = sandbox;
        let argv = argv::argv(&spec)
            .map_err(|m| Failure::Boot(format!("cannot boot {}: {m}", plan.path)))?;
        tracing::info!(level = %plan.path, "booting: {}", argv.join(" "));
        let _ = std::fs::remove_file(&files.console);
        if let Some(socket) = &files.monitor {
            let _ = std::fs::remove_file(socket);
        }
        let started = Instant::now();
        let mut qemu =
            Qemu::spawn(&argv, files.clone(), guest_end, Some(qmp_end), None).map_err(|e| {
                let hint = if e.kind() == std::io::ErrorKind::NotFound {
                    "; install QEMU (Debian: qemu-system-x86 or qemu-system-misc)"
                } else {
                    ""
                };
                Failure::Boot(format!(
                    "cannot start {} for {}: {e}{hint}",
                    argv[0], plan.path
                ))
            })?;
        let ready = wait_ready(&mut qemu, &relay, plan, accel, started, timeout, probe).await;
        if ready.is_err()
            && sandbox
            && let Some(line) = sandbox::refusal(&qemu.log_tail())
        {
            sandbox::refused(arch.binary(), line);
            sandbox = false;
            continue;
        }
        match ready {
            Err(Failure::Boot(m)) if attempt < 3 && qemu.log_tail().contains("hostfwd") => {
                tracing::info!(level = %plan.path, "port {ssh_port} was taken ({m}); trying another");
            }
            Err(Failure::Boot(m)) if resets == 0 && qemu.end() == Some(QemuEnd::SilentReset) => {
                resets += 1;
                tracing::warn!(level = %plan.path, "booting {} once more, after: {m}", plan.path);
            }
            Err(e) => return Err(e),
            Ok(()) => {
                let restorable = super::snapshot::Restorable {
                    path: plan.path.clone(),
                    spec: MachineSpec {
                        relay_fd: -1,
                        qmp_fd: None,
                        host_key: None,
                        ..spec
                    },
                    files: files.clone(),
                    host_key: plan.host_key.clone().filter(|_| arch.has_fw_cfg()),
                    jump: Vec::new(),
                };
                return Ok(Booted {
                    machine: Box::new(qemu),
                    relay,
                    qmp: Some(super::monitor::QmpPort::new(qmp)),
                    ssh_port,
                    accel,
                    accel_reason: String::new(),
                    boot_time: started.elapsed(),
                    restorable: Some(restorable),
                });
            }
        }
    }
}

/// The machine of a level, before the descriptors and files that differ
/// between the qemu and libvirt backends (relay, QMP, host key, sandbox).
pub(super) fn machine_spec(
    plan: &BootPlan,
    image: &Image,
    arch: Arch,
    accel: Accel,
    req: &VmRequest,
    ssh_port: u16,
    files: &LevelFiles,
) -> Result<MachineSpec, String> {
    // Memory is settled by the request's check already (the default again for a
    // request that did not go through it); CPUs left unset get their default
    // here, where the accelerator is known.
    let have = LevelResources::of_this_level();
    let memory_mib = req.memory_mib.unwrap_or_else(|| have.default_memory_mib());
    let cpus = req
        .cpus
        .unwrap_or_else(|| have.default_cpus(plan.depth, accel, arch));
    let absolute =
        |p: &std::path::Path| std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()));
    let key_b64 = base64(plan.authorized_key.trim().as_bytes());
    Ok(MachineSpec {
        arch,
        accel,
        memory_mib,
        cpus,
        kernel: absolute(&image.kernel)?,
        initrd: absolute(&image.initrd)?,
        root: absolute(&image.root)?,
        root_direct: direct_io(&image.root),
        bundle: plan.bundle.clone(),
        append: [
            format!("level={}", plan.depth),
            format!("matryoshka.key={key_b64}"),
            format!("matryoshka.runtime={}", plan.runtime.1),
        ]
        .into_iter()
        .chain(
            crate::level::replicate::verbosity_flag()
                .split_whitespace()
                .map(|flag| format!("matryoshka.verbose={flag}")),
        )
        .collect(),
        ssh_port,
        console_log: absolute(&files.console)?,
        monitor: files.monitor.as_deref().map(absolute).transpose()?,
        relay_fd: -1,
        level_log: absolute(&files.level_log)?,
        qmp_fd: None,
        scsi: plan
            .scsi
            .iter()
            .filter_map(|d| d.generic_node.clone())
            .collect(),
        host_key: None,
        sandbox: false,
        incoming_fd: None,
        append_files: false,
    })
}

/// Whether `path` opens with `O_DIRECT`: a block device or a file on most file
/// systems does, a file inside a squashfs (an image in a bundle) does not.
fn direct_io(path: &std::path::Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .is_ok()
}

/// Polls until the runtime's first bytes on the relay, an early exit, or a deadline.
async fn wait_ready(
    qemu: &mut Qemu,
    relay: &std::os::unix::net::UnixStream,
    plan: &BootPlan,
    accel: Accel,
    started: Instant,
    timeout: Duration,
    probe: bool,
) -> Result<(), Failure> {
    let accel_name = accel.name();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if has_bytes(relay) {
            note_serving(&plan.path, started, &qemu.level_log());
            return Ok(());
        }
        let console = qemu.console();
        if let Some(fail) = init_failure(&console, &qemu.level_log()) {
            qemu.kill();
            return Err(Failure::Boot(format!(
                "{} failed to boot: {}; {}",
                plan.path,
                fail.trim_start_matches(": "),
                qemu.tails()
            )));
        }
        if let Some(status) = qemu.exited() {
            let why = format!(
                "QEMU ({accel_name}) exited after {:.1} s ({}: {}){}",
                started.elapsed().as_secs_f64(),
                process::status_words(status),
                QemuEnd::of(status, &console, &qemu.level_log()),
                qemu.log_summary()
            );
            // While KVM is only being tried, an exit before the first sign of life
            // that QEMU blames on KVM means KVM does not work here; any other early
            // exit (a bad memory size, say) is the boot's own failure.
            if probe
                && !console.contains("MATRYOSHKA-BOOT")
                && qemu.log_tail().to_ascii_lowercase().contains("kvm")
            {
                return Err(Failure::KvmUnusable(why));
            }
            return Err(Failure::Boot(format!(
                "{} did not boot: {why}; {}",
                plan.path,
                qemu.tails()
            )));
        }
        let waited = started.elapsed();
        // Each level down runs several times slower (here an L3 kernel reached its
        // initramfs only after ~100 s): the silence allowed grows fourfold per depth.
        let silence = super::accel::KVM_PROBE * 4u32.pow(plan.depth.clamp(1, 5) - 1);
        if probe && waited > silence && !console.contains("MATRYOSHKA-BOOT") {
            qemu.kill();
            return Err(Failure::KvmUnusable(format!(
                "a KVM guest printed nothing for {} s",
                silence.as_secs()
            )));
        }
        if waited > timeout {
            qemu.kill();
            return Err(Failure::Boot(format!(
                "{} was not serving within {:.1} s ({accel_name}); {}",
                plan.path,
                timeout.as_secs_f64(),
                qemu.tails()
            )));
        }
    }
}

/// Logs that a level serves, with the guest's uptime at each boot step.
pub(super) fn note_serving(path: &str, started: Instant, level_log: &str) {
    tracing::info!(
        level = %path,
        "serving after {:.1} s; guest uptime at each step: {}",
        started.elapsed().as_secs_f64(),
        boot_steps(level_log)
    );
}

/// The `MATRYOSHKA-FAIL` line of a level's init, from its level log or console.
pub(super) fn init_failure(console: &str, level_log: &str) -> Option<String> {
    line_after(level_log, "MATRYOSHKA-FAIL").or_else(|| line_after(console, "MATRYOSHKA-FAIL"))
}

/// Whether the runtime's first bytes are waiting on the relay socket (a closed or
/// broken socket is not: QEMU's exit is reported by the caller).
pub(super) fn has_bytes(relay: &std::os::unix::net::UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut byte = 0u8;
    // SAFETY: recv(2) peeks at most one byte into `byte`, which outlives the call.
    let n = unsafe {
        libc::recv(
            relay.as_raw_fd(),
            (&raw mut byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n > 0
}

/// The `MATRYOSHKA-STEP <uptime> <step>` lines of a console as `step 1.23 s, …`.
pub(super) fn boot_steps(console: &str) -> String {
    const STEP: &str = "MATRYOSHKA-STEP ";
    let steps: Vec<String> = console
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find(STEP)? + STEP.len()..];
            let (uptime, step) = rest.trim().split_once(' ')?;
            Some(format!("{step} {uptime} s"))
        })
        .collect();
    if steps.is_empty() {
        "none printed".into()
    } else {
        steps.join(", ")
    }
}

pub(super) fn line_after(console: &str, marker: &str) -> Option<String> {
    console.lines().find_map(|l| {
        let at = l.find(marker)?;
        Some(l[at + marker.len()..].trim().to_string())
    })
}

pub(super) fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port on 127.0.0.1: {e}"))
}

pub(super) fn base64(bytes: &[u8]) -> String {
    use base64ct::Encoding;
    base64ct::Base64::encode_string(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_found_in_noisy_consoles() {
        let console = "[ 1.0] x\r\nMATRYOSHKA-BOOT\r\nMATRYOSHKA-FAIL: no root\r\n\
                       MATRYOSHKA-READY level=2 accel=kvm kvm=yes\r\n";
        assert_eq!(
            line_after(console, "MATRYOSHKA-FAIL").as_deref(),
            Some(": no root")
        );
        assert_eq!(
            line_after(console, "MATRYOSHKA-READY ").as_deref(),
            Some("level=2 accel=kvm kvm=yes")
        );
        assert_eq!(line_after(console, "MATRYOSHKA-STEP"), None);
    }

    #[test]
    fn boot_steps_are_listed_in_console_order() {
        let console = "MATRYOSHKA-BOOT\r\n[    3.1] noise\r\nMATRYOSHKA-STEP 3.93 init\r\n\
                       MATRYOSHKA-STEP 5.52 runtime started\r\nMATRYOSHKA-READY level=1\r\n";
        assert_eq!(boot_steps(console), "init 3.93 s, runtime started 5.52 s");
        assert_eq!(boot_steps("MATRYOSHKA-BOOT\n"), "none printed");
    }
}
