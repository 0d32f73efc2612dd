//! VM levels: boot the next level from an image with QEMU and wait until its
//! runtime serves the relay.
//!
//! The runtime rides in the initramfs ([`RuntimeInitrd`]); the level's init starts
//! it on a virtio-serial port ([`qemu::RELAY_PORT`]) whose other end is a socket
//! this level holds. The boot is watched on three channels that only this level reads:
//! - the serial console: `MATRYOSHKA-BOOT` from the initramfs, the first sign of
//!   life, and whatever the kernel says when it panics;
//! - the level log ([`qemu::LOG_PORT`]): `MATRYOSHKA-STEP` lines with boot
//!   timings, `MATRYOSHKA-FAIL` when the init gives up, then the runtime's stderr;
//! - the relay socket: the runtime's first bytes (its `Hello`) mean it serves.
//!
//! Every QEMU process is started by one long-lived thread with `PR_SET_PDEATHSIG`
//! (so it dies with this runtime even on SIGKILL), leads its own process group,
//! is listed in a registry that [`kill_all`] empties on exit paths, and is killed
//! when its [`Qemu`] is dropped.

use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::qemu::{self, Accel, Arch, MachineSpec};

/// How long a KVM boot of L1 may stay silent before `auto` gives up on KVM
/// (four times that for each level deeper).
const KVM_PROBE: Duration = Duration::from_secs(30);
/// Default deadline for a level's runtime to serve.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// Where a level finds the image it was booted from (see `images/build.sh`).
pub const IMAGE_IN_LEVEL: &str = "/usr/lib/matryoshka/image";
/// Console lines shown when a boot fails.
const TAIL_LINES: usize = 15;

/// How long a lost level's QEMU is given to exit before it is said to run on.
const QEMU_EXIT_GRACE: Duration = Duration::from_secs(1);

/// Which accelerator VM levels use; chosen per run, applied at every level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
pub enum AccelPolicy {
    /// KVM where a guest really boots with it (probed once per machine boot), else TCG.
    #[default]
    Auto,
    /// KVM or fail.
    Kvm,
    /// TCG (software emulation) everywhere.
    Tcg,
}

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
}

/// The three files a level boots from.
#[derive(Debug, Clone)]
pub struct Image {
    /// Kernel.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: PathBuf,
    /// Read-only squashfs root, handed to the guest as `/dev/vda`.
    pub root: PathBuf,
}

impl Image {
    /// The image in `dir`; without one, the first of: `$MATRYOSHKA_IMAGE_DIR`,
    /// the image this level itself booted from ([`IMAGE_IN_LEVEL`]), and
    /// `target/images/<arch>` under the current folder (where `images/build.sh` writes).
    pub fn resolve(dir: Option<&Path>, arch: Arch) -> Result<Self, String> {
        let dir = match dir {
            Some(d) => d.to_path_buf(),
            None => std::env::var_os("MATRYOSHKA_IMAGE_DIR")
                .map(PathBuf::from)
                .or_else(|| {
                    let inside = Path::new(IMAGE_IN_LEVEL);
                    (arch == Arch::host() && inside.join("kernel").exists())
                        .then(|| inside.to_path_buf())
                })
                .unwrap_or_else(|| PathBuf::from("target/images").join(arch.name())),
        };
        let image = Self {
            kernel: dir.join("kernel"),
            initrd: dir.join("initrd"),
            root: dir.join("root.img"),
        };
        for (what, path) in [
            ("kernel", &image.kernel),
            ("initramfs", &image.initrd),
            ("root", &image.root),
        ] {
            if !path.exists() {
                return Err(format!(
                    "no {what} at {}: build the {} image with `images/build.sh` (or `./x image`), \
                     or name a folder holding kernel, initrd and root.img with --image-dir or \
                     $MATRYOSHKA_IMAGE_DIR",
                    path.display(),
                    arch.name()
                ));
            }
        }
        Ok(image)
    }
}

/// A level that booted and whose runtime serves.
#[derive(Debug)]
pub struct Booted {
    /// Its QEMU process.
    pub qemu: Qemu,
    /// The relay's byte stream to its runtime, whose `Hello` is waiting to be read.
    pub relay: std::os::unix::net::UnixStream,
    /// Host port forwarded to its SSH port, on 127.0.0.1 (for people, not the relay).
    pub ssh_port: u16,
    /// The accelerator it runs under.
    pub accel: Accel,
    /// Why `auto` chose that accelerator, for the run's log.
    pub accel_reason: String,
    /// How long it took from starting QEMU to its runtime's first bytes.
    pub boot_time: Duration,
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
    /// The level's SSH host key (OpenSSH private key), made by this level so that
    /// the level need not make one under emulation; without one it makes its own.
    pub host_key: Option<String>,
}

/// The image's initramfs with the runtime appended as a second, uncompressed cpio
/// archive (the kernel unpacks both into one rootfs): the level finds the runtime
/// in memory at boot, with no disk to read and nothing to copy over a network.
#[derive(Debug, Clone)]
pub struct RuntimeInitrd {
    /// The combined initramfs; the level finds the runtime in it as
    /// `/matryoshka-<sha256>`.
    pub path: PathBuf,
}

impl RuntimeInitrd {
    /// The combined initramfs of `initrd` and `runtime` in `dir`, made once per
    /// runtime hash and initramfs file.
    pub fn prepare(
        initrd: &Path,
        runtime: &Path,
        sha256: &str,
        dir: &Path,
    ) -> Result<Self, String> {
        let meta = std::fs::metadata(initrd)
            .map_err(|e| format!("cannot stat {}: {e}", initrd.display()))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let path = dir.join(format!("{sha256}-{}-{mtime}.initrd", meta.len()));
        if let Ok(file) = std::fs::File::options().append(true).open(&path) {
            // In use: not stale for `prune_stale`.
            let _ = file.set_modified(std::time::SystemTime::now());
            return Ok(Self { path });
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let tmp = tempfile::NamedTempFile::new_in(dir)
            .map_err(|e| format!("cannot create a file in {}: {e}", dir.display()))?;
        let write = || -> std::io::Result<()> {
            let mut out = std::io::BufWriter::new(tmp.as_file());
            let mut image = std::fs::File::open(initrd)?;
            let copied = std::io::copy(&mut image, &mut out)?;
            // The kernel looks for the next archive on a 4-byte boundary.
            std::io::Write::write_all(&mut out, &[0; 4][..pad4(copied)])?;
            let mut binary = std::fs::File::open(runtime)?;
            let size = binary.metadata()?.len();
            cpio::write_file(
                &mut out,
                &format!("matryoshka-{sha256}"),
                0o755,
                size,
                &mut binary,
            )?;
            cpio::write_trailer(&mut out)?;
            std::io::Write::flush(&mut out)?;
            drop(out);
            // A file cut short by a crash must not become a cache hit.
            tmp.as_file().sync_all()
        };
        write().map_err(|e| {
            format!(
                "cannot append the runtime {} to the initramfs {}: {e}",
                runtime.display(),
                initrd.display()
            )
        })?;
        tmp.persist(&path)
            .map_err(|e| format!("cannot keep {}: {e}", path.display()))?;
        prune_stale(dir, &path);
        Ok(Self { path })
    }
}

/// Removes combined initramfs files (and leftovers of interrupted writes) not used
/// for two days: each build of the runtime makes a new one of ~25 MB. A file in use
/// has its modification time renewed by [`RuntimeInitrd::prepare`].
fn prune_stale(dir: &Path, keep: &Path) {
    const STALE: Duration = Duration::from_secs(2 * 24 * 3600);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let stale = entry
            .metadata()
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE);
        let ours = path.extension().is_some_and(|e| e == "initrd")
            || entry.file_name().to_string_lossy().starts_with(".tmp");
        if path != keep && stale && ours {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn pad4(len: u64) -> usize {
    ((4 - len % 4) % 4) as usize
}

/// The `newc` cpio format the kernel unpacks into its initial rootfs.
mod cpio {
    use std::io::{self, Read, Write};

    fn header(out: &mut impl Write, name: &str, mode: u32, size: u64, ino: u32) -> io::Result<()> {
        let namesize = name.len() + 1;
        let size = u32::try_from(size)
            .map_err(|_| io::Error::other("a file over 4 GiB does not fit a newc cpio archive"))?;
        let nlink = 1;
        write!(
            out,
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
            0, 0, 0, 0, 0, 0, 0, 0
        )?;
        out.write_all(name.as_bytes())?;
        out.write_all(&[0])?;
        out.write_all(&[0; 4][..super::pad4(110 + namesize as u64)])
    }

    /// One regular file of `size` bytes read from `data`.
    pub fn write_file(
        out: &mut impl Write,
        name: &str,
        perm: u32,
        size: u64,
        data: &mut impl Read,
    ) -> io::Result<()> {
        header(out, name, 0o100_000 | perm, size, 1)?;
        let copied = io::copy(&mut data.take(size), out)?;
        if copied != size {
            return Err(io::Error::other(format!(
                "{name} shrank while being archived ({copied} of {size} bytes)"
            )));
        }
        out.write_all(&[0; 4][..super::pad4(size)])
    }

    /// The end of an archive.
    pub fn write_trailer(out: &mut impl Write) -> io::Result<()> {
        header(out, "TRAILER!!!", 0, 0, 0)
    }
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

/// The accelerator to try, why, and whether it is a probe that may fall back.
fn choose_accel(
    policy: AccelPolicy,
    arch: Arch,
    plan: &BootPlan,
) -> Result<(Accel, String, bool), String> {
    let kvm_device = arch == Arch::host()
        && std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
    match policy {
        AccelPolicy::Tcg => Ok((Accel::Tcg, "--accel tcg".into(), false)),
        AccelPolicy::Kvm if !kvm_device => Err(format!(
            "--accel kvm, but there is no usable /dev/kvm for a {} guest at the level booting {}: \
             use --accel auto or tcg",
            arch.name(),
            plan.path
        )),
        AccelPolicy::Kvm => Ok((Accel::Kvm, "--accel kvm".into(), false)),
        AccelPolicy::Auto if !kvm_device => Ok((
            Accel::Tcg,
            "auto: no usable /dev/kvm for this guest".into(),
            false,
        )),
        AccelPolicy::Auto => match recall(plan).as_deref() {
            Some("kvm") => Ok((Accel::Kvm, "auto: KVM worked before".into(), false)),
            Some(tcg) if tcg.starts_with("tcg") => Ok((
                Accel::Tcg,
                format!(
                    "auto: KVM failed here earlier ({})",
                    tcg.trim_start_matches("tcg: ")
                ),
                false,
            )),
            _ => Ok((Accel::Kvm, "auto: KVM boots here".into(), true)),
        },
    }
}

/// Where the KVM probe is remembered: one file per boot of this machine.
fn memo_file(plan: &BootPlan) -> Option<PathBuf> {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    Some(
        plan.memo_dir
            .as_ref()?
            .join("accel")
            .join(format!("{}.txt", boot_id.trim())),
    )
}

fn recall(plan: &BootPlan) -> Option<String> {
    std::fs::read_to_string(memo_file(plan)?)
        .ok()
        .map(|s| s.trim().to_string())
}

fn remember(plan: &BootPlan, what: &str) {
    if let Some(file) = memo_file(plan)
        && let Some(dir) = file.parent()
        && std::fs::create_dir_all(dir).is_ok()
    {
        let _ = std::fs::write(file, what);
    }
}

/// Memory for a level when the request sets none: 60% of what this level has available.
fn default_memory_mib() -> u32 {
    let available_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(4 << 20);
    u32::try_from(available_kib * 6 / 10 / 1024)
        .unwrap_or(u32::MAX)
        .clamp(256, 4096)
}

/// CPUs for a level when the request sets none: 2 for L1 (at most what L0 has), 1 below.
/// Two vCPUs in a KVM-in-TCG L2 that runs L3 locked up L1's KVM (soft lockups in L1's
/// kernel) on the 2-core machine this was measured on; one vCPU per deeper level boots.
fn default_cpus(depth: u32) -> u32 {
    if depth <= 1 {
        std::thread::available_parallelism()
            .map_or(1, |n| u32::try_from(n.get()).unwrap_or(2).min(2))
    } else {
        1
    }
}

/// Where a level's init says that it is still loading the KVM modules, which it
/// does while its runtime starts (see `images/x86_64/level-init`).
const KVM_PENDING: &str = "/run/matryoshka/kvm.pending";

/// Waits (at most two minutes) while this level's init still loads KVM, so that
/// the accelerator is chosen from what the level will have, not from a race.
async fn wait_for_kvm_module(path: &str) {
    let pending = Path::new(KVM_PENDING);
    if !pending.exists() {
        return;
    }
    tracing::info!(level = %path, "waiting for this level's init to load KVM");
    let deadline = Instant::now() + Duration::from_secs(120);
    while pending.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
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
    let files = LevelFiles {
        console: plan.run_dir.join(format!("{name}.console")),
        qemu_log: plan.run_dir.join(format!("{name}.qemu.log")),
        level_log: plan.run_dir.join(format!("{name}.log")),
    };
    let key_b64 = base64_encode(plan.authorized_key.trim().as_bytes());
    // A port taken between choosing and QEMU binding it fails the start: try another.
    let mut attempt = 0;
    // A guest that resets while it boots (seen now and then with KVM nested in TCG,
    // see docs/benchmarks.md) is booted once more.
    let mut resets = 0;
    loop {
        attempt += 1;
        let ssh_port = free_port().map_err(Failure::Boot)?;
        let (relay, guest_end) = std::os::unix::net::UnixStream::pair().map_err(|e| {
            Failure::Boot(format!("cannot make a socket pair for {}: {e}", plan.path))
        })?;
        let spec =
            MachineSpec {
                arch,
                accel,
                memory_mib: req.memory_mib.unwrap_or_else(default_memory_mib),
                cpus: req.cpus.unwrap_or_else(|| default_cpus(plan.depth)).max(1),
                kernel: image.kernel.clone(),
                initrd: image.initrd.clone(),
                root: image.root.clone(),
                append: [
                    format!("level={}", plan.depth),
                    format!("matryoshka.key={key_b64}"),
                    format!("matryoshka.runtime={}", plan.runtime.1),
                ]
                .into_iter()
                .chain(
                    crate::relay::transport::verbosity_flag()
                        .split_whitespace()
                        .map(|flag| format!("matryoshka.verbose={flag}")),
                )
                .chain(plan.host_key.iter().map(|private| {
                    format!("matryoshka.hostkey={}", base64_encode(private.as_bytes()))
                }))
                .collect(),
                ssh_port,
                console_log: files.console.clone(),
                relay_fd: std::os::fd::AsRawFd::as_raw_fd(&guest_end),
                level_log: files.level_log.clone(),
                qmp_socket: None,
            };
        let argv = qemu::argv(&spec);
        tracing::info!(level = %plan.path, "booting: {}", argv.join(" "));
        let _ = std::fs::remove_file(&files.console);
        let started = Instant::now();
        let mut qemu = Qemu::spawn(&argv, files.clone(), guest_end).map_err(|e| {
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
        match wait_ready(&mut qemu, &relay, plan, accel, started, timeout, probe).await {
            Err(Failure::Boot(m)) if attempt < 3 && qemu.log_tail().contains("hostfwd") => {
                tracing::info!(level = %plan.path, "port {ssh_port} was taken ({m}); trying another");
            }
            Err(Failure::Boot(m)) if resets == 0 && qemu.end() == Some(QemuEnd::SilentReset) => {
                resets += 1;
                tracing::warn!(level = %plan.path, "booting {} once more, after: {m}", plan.path);
            }
            Err(e) => return Err(e),
            Ok(()) => {
                return Ok(Booted {
                    qemu,
                    relay,
                    ssh_port,
                    accel,
                    accel_reason: String::new(),
                    boot_time: started.elapsed(),
                });
            }
        }
    }
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
            tracing::info!(
                level = %plan.path,
                "serving after {:.1} s; guest uptime at each step: {}",
                started.elapsed().as_secs_f64(),
                boot_steps(&qemu.level_log())
            );
            return Ok(());
        }
        let console = qemu.console();
        let level_log = qemu.level_log();
        if let Some(fail) = line_after(&level_log, "MATRYOSHKA-FAIL")
            .or_else(|| line_after(&console, "MATRYOSHKA-FAIL"))
        {
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
                describe(status),
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
        let silence = KVM_PROBE * 4u32.pow(plan.depth.clamp(1, 5) - 1);
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

/// Whether the runtime's first bytes are waiting on the relay socket (a closed or
/// broken socket is not: QEMU's exit is reported by the caller).
fn has_bytes(relay: &std::os::unix::net::UnixStream) -> bool {
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
fn boot_steps(console: &str) -> String {
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

fn line_after(console: &str, marker: &str) -> Option<String> {
    console.lines().find_map(|l| {
        let at = l.find(marker)?;
        Some(l[at + marker.len()..].trim().to_string())
    })
}

/// The last lines of a console, indented, without carriage returns.
pub fn tail(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty())
        .collect();
    if lines.is_empty() {
        return "    (nothing on the console)".to_string();
    }
    lines[lines.len().saturating_sub(TAIL_LINES)..]
        .iter()
        .map(|l| format!("    | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("status {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown status".to_string(),
    }
}

/// How a level's QEMU ended, told from its exit status and what the guest wrote.
/// QEMU runs with `-no-reboot`, so a guest that resets (a reboot, a panic with
/// `panic=-1`, or a triple fault) makes it exit with status 0, like a power-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QemuEnd {
    /// QEMU ended on this signal.
    Signal(i32),
    /// The level's init powered it off after its runtime ended.
    PoweredOff,
    /// The level's init failed (`MATRYOSHKA-FAIL`) and powered it off.
    InitFailed,
    /// The level's kernel panicked.
    Panicked,
    /// The level's kernel rebooted (`reboot: Restarting system`).
    Rebooted,
    /// The level's kernel powered off, not at its init's request.
    KernelPoweredOff,
    /// Status 0 with no word from the guest: a reset from below it.
    SilentReset,
    /// QEMU itself failed (non-zero status).
    Failed,
}

impl QemuEnd {
    fn of(status: ExitStatus, console: &str, level_log: &str) -> Self {
        match (status.code(), status.signal()) {
            (None, Some(signal)) => Self::Signal(signal),
            (Some(0), _) if level_log.contains("; powering off") => Self::PoweredOff,
            (Some(0), _)
                if console.contains("MATRYOSHKA-FAIL") || level_log.contains("MATRYOSHKA-FAIL") =>
            {
                Self::InitFailed
            }
            (Some(0), _) if console.contains("Kernel panic") => Self::Panicked,
            (Some(0), _) if console.contains("reboot: Restarting system") => Self::Rebooted,
            (Some(0), _) if console.contains("reboot: Power down") => Self::KernelPoweredOff,
            (Some(0), _) => Self::SilentReset,
            _ => Self::Failed,
        }
    }
}

impl std::fmt::Display for QemuEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Signal(libc::SIGABRT) => f.write_str("QEMU aborted"),
            Self::Signal(libc::SIGKILL) => f.write_str("QEMU was killed"),
            Self::Signal(_) => f.write_str("QEMU ended on that signal"),
            Self::PoweredOff => f.write_str("the level powered off after its runtime ended"),
            Self::InitFailed => f.write_str("the level's init failed and powered off"),
            Self::Panicked => f.write_str("the level's kernel panicked"),
            Self::Rebooted => f.write_str("the level's kernel rebooted"),
            Self::KernelPoweredOff => f.write_str("the level's kernel powered it off"),
            Self::SilentReset => f.write_str(
                "the guest reset without a word from its kernel or init: a triple fault or a \
                 reset from outside it (QEMU's -no-reboot turns a reset into an exit)",
            ),
            Self::Failed => f.write_str("QEMU failed; its log says why"),
        }
    }
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port on 127.0.0.1: {e}"))
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The files a level's QEMU writes, in the run folder.
#[derive(Debug, Clone)]
struct LevelFiles {
    /// The serial console.
    console: PathBuf,
    /// QEMU's own stdout and stderr.
    qemu_log: PathBuf,
    /// The level log port: boot steps, then the runtime's stderr.
    level_log: PathBuf,
}

/// A running QEMU process of a level; killed when dropped.
#[derive(Debug)]
pub struct Qemu {
    child: Child,
    files: LevelFiles,
    status: Option<ExitStatus>,
    /// QEMU's end of the relay socket: its descriptor number in QEMU and its inode.
    relay_end: (i32, u64),
}

impl Qemu {
    /// Starts QEMU, which inherits `guest_end` of the relay socket under the same
    /// descriptor number (the argv names it).
    fn spawn(
        argv: &[String],
        files: LevelFiles,
        guest_end: std::os::unix::net::UnixStream,
    ) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        let stderr = std::fs::File::create(&files.qemu_log)?;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(stderr.try_clone()?)
            .stderr(stderr)
            .process_group(0);
        let fd = guest_end.as_raw_fd();
        // SAFETY: the closure only calls prctl(2) and fcntl(2), which are
        // async-signal-safe; `guest_end` stays open until the spawn returned.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Only this child's copy loses close-on-exec: QEMU keeps the socket.
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let inode = std::fs::File::from(std::os::fd::OwnedFd::from(guest_end.try_clone()?))
            .metadata()?
            .ino();
        let child = spawner_thread(cmd)?;
        // Only QEMU holds the guest end now: when it exits, the relay sees the end.
        drop(guest_end);
        registry().insert(child.id());
        Ok(Self {
            child,
            files,
            status: None,
            relay_end: (fd, inode),
        })
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The console file.
    pub fn console_path(&self) -> &Path {
        &self.files.console
    }

    /// The level log file (boot steps, then the runtime's stderr).
    pub fn level_log_path(&self) -> &Path {
        &self.files.level_log
    }

    /// Everything on the console so far.
    pub fn console(&self) -> String {
        read_lossy(&self.files.console)
    }

    /// Everything in the level log so far.
    pub fn level_log(&self) -> String {
        read_lossy(&self.files.level_log)
    }

    /// The last lines of the console and of the level log, for error messages.
    pub fn tails(&self) -> String {
        let mut said = format!("console tail:\n{}", tail(&self.console()));
        let log = self.level_log();
        if !log.trim().is_empty() {
            said.push_str(&format!(
                "\nlevel log tail ({}):\n{}",
                self.files.level_log.display(),
                tail(&log)
            ));
        }
        said
    }

    fn log_tail(&self) -> String {
        std::fs::read_to_string(&self.files.qemu_log).unwrap_or_default()
    }

    /// What QEMU itself said, as a suffix for error messages.
    fn log_summary(&self) -> String {
        let log = self.log_tail();
        let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.is_empty() {
            return String::new();
        }
        let last = &lines[lines.len().saturating_sub(3)..];
        format!("; QEMU said: {}", last.join(" | "))
    }

    /// How QEMU ended, once it has.
    fn end(&mut self) -> Option<QemuEnd> {
        let status = self.exited()?;
        Some(QemuEnd::of(status, &self.console(), &self.level_log()))
    }

    /// The exit status, once QEMU has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none()
            && let Ok(Some(status)) = self.child.try_wait()
        {
            registry().remove(self.child.id());
            self.status = Some(status);
        }
        self.status
    }

    /// How QEMU ended and the last lines of its console and level log, for a
    /// level that was lost. A QEMU that is shutting down closes its sockets before
    /// it exits: it is given a moment to finish.
    pub fn describe_end(&mut self) -> String {
        let deadline = Instant::now() + QEMU_EXIT_GRACE;
        while self.exited().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        match self.exited() {
            Some(status) => format!(
                "its QEMU exited ({}: {}){}; {}",
                describe(status),
                QemuEnd::of(status, &self.console(), &self.level_log()),
                self.log_summary(),
                self.tails()
            ),
            None => format!(
                "its QEMU still runs and {}{}; {}",
                self.relay_end_state(),
                self.log_summary(),
                self.tails()
            ),
        }
    }

    /// Whether the running QEMU still holds its end of the relay socket: if it
    /// does, the relay's end-of-file came from a shutdown, not from QEMU closing it.
    fn relay_end_state(&self) -> String {
        let (fd, inode) = self.relay_end;
        let link = std::fs::read_link(format!("/proc/{}/fd/{fd}", self.child.id()));
        match link {
            Ok(target) if target.to_string_lossy() == format!("socket:[{inode}]") => {
                format!("still holds its end of the relay socket (fd {fd})")
            }
            Ok(target) => format!(
                "closed its end of the relay socket (its fd {fd} is now {})",
                target.display()
            ),
            Err(_) => format!("closed its end of the relay socket (fd {fd})"),
        }
    }

    /// Kills QEMU (and anything in its process group) and reaps it.
    pub fn kill(&mut self) {
        if self.status.is_some() {
            return;
        }
        let pid = self.child.id();
        if let Ok(pid) = i32::try_from(pid) {
            // SAFETY: kill(2) on the process group QEMU leads; no memory is involved.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
        let _ = self.child.kill();
        self.status = self.child.wait().ok();
        registry().remove(pid);
    }
}

fn read_lossy(path: &Path) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `cmd` from one thread that lives as long as the process: the parent-death
/// signal fires when the *thread* that forked exits, so a short-lived thread would
/// take its VMs with it.
fn spawner_thread(cmd: Command) -> std::io::Result<Child> {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("qemu-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawning a thread at start-up");
        Mutex::new(tx)
    });
    let (reply, answer) = mpsc::channel();
    tx.lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply))
        .map_err(|_| std::io::Error::other("the QEMU spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| std::io::Error::other("the QEMU spawner thread is gone"))?
}

struct Registry(Mutex<BTreeSet<u32>>);

impl Registry {
    fn insert(&self, pid: u32) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(pid);
    }
    fn remove(&self, pid: u32) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pid);
    }
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| Registry(Mutex::default()))
}

/// Kills every QEMU this process started that is still running; for exit paths
/// that skip destructors.
pub fn kill_all() {
    let pids: Vec<u32> =
        std::mem::take(&mut *registry().0.lock().unwrap_or_else(|e| e.into_inner()))
            .into_iter()
            .collect();
    for pid in pids {
        if let Ok(pid) = i32::try_from(pid) {
            // SAFETY: kill(2) on a process group this runtime started; no memory is involved.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
    }

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

    #[test]
    fn tails_keep_the_last_lines() {
        let text: String = (0..40).map(|i| format!("line {i}\r\n")).collect();
        let t = tail(&text);
        assert!(t.starts_with("    | line 25"), "{t}");
        assert!(t.ends_with("    | line 39"), "{t}");
        assert_eq!(tail(""), "    (nothing on the console)");
    }

    #[test]
    fn the_runtime_is_appended_as_an_aligned_newc_archive() {
        let dir = tempfile::tempdir().expect("temp dir");
        let initrd = dir.path().join("initrd");
        let runtime = dir.path().join("runtime");
        std::fs::write(&initrd, b"gzip-bytes").expect("initrd"); // 10 bytes: padded to 12
        std::fs::write(&runtime, b"ELF!!").expect("runtime");
        let made = RuntimeInitrd::prepare(&initrd, &runtime, "ab12", &dir.path().join("cache"))
            .expect("combined");
        let bytes = std::fs::read(&made.path).expect("read");
        assert_eq!(&bytes[..12], b"gzip-bytes\0\0");
        let archive = std::str::from_utf8(&bytes[12..]).expect("ascii");
        let header = &archive[..110];
        assert!(header.starts_with("070701"), "{header}");
        let field =
            |i: usize| u32::from_str_radix(&header[6 + 8 * i..14 + 8 * i], 16).expect("hex field");
        assert_eq!(field(1), 0o100_755, "mode");
        assert_eq!(field(6), 5, "file size");
        assert_eq!(field(11), "matryoshka-ab12".len() as u32 + 1, "name size");
        // Name and NUL end at 110 + 16 = 126, padded to 128; data, padded to 4.
        assert_eq!(&archive[110..126], "matryoshka-ab12\0");
        assert_eq!(&archive[128..136], "ELF!!\0\0\0");
        assert!(archive[136..].starts_with("070701"));
        assert!(archive.contains("TRAILER!!!\0"));
        assert_eq!(archive.len() % 4, 0);
        // Made once: a second call finds it.
        let again = RuntimeInitrd::prepare(&initrd, &runtime, "ab12", &dir.path().join("cache"))
            .expect("cached");
        assert_eq!(again.path, made.path);
    }

    #[test]
    fn missing_images_name_the_file_and_the_fix() {
        let err = Image::resolve(Some(Path::new("/nonexistent/image")), Arch::X86_64)
            .expect_err("no image there");
        assert!(
            err.contains("no kernel at /nonexistent/image/kernel"),
            "{err}"
        );
        assert!(err.contains("images/build.sh"), "{err}");
    }

    #[rstest::rstest]
    #[case(
        0,
        "",
        "MATRYOSHKA-STEP 9.1 runtime exited with status 137; powering off",
        "powered off after its runtime ended"
    )]
    #[case(0, "MATRYOSHKA-FAIL: no root", "", "init failed")]
    #[case(0, "[ 3.2] Kernel panic - not syncing: VFS", "", "kernel panicked")]
    #[case(
        0,
        "[ 9.1] kvm [149]: vcpu0 Unhandled WRMSR",
        "MATRYOSHKA-STEP 11.4 sshd started",
        "reset without a word"
    )]
    #[case(0, "[ 5.0] reboot: Restarting system", "", "kernel rebooted")]
    #[case(0, "[ 5.0] reboot: Power down", "", "kernel powered it off")]
    #[case(1, "", "", "QEMU failed")]
    fn qemu_exits_are_told_apart(
        #[case] code: i32,
        #[case] console: &str,
        #[case] level_log: &str,
        #[case] expected: &str,
    ) {
        let status = ExitStatus::from_raw(code << 8);
        let why = QemuEnd::of(status, console, level_log).to_string();
        assert!(why.contains(expected), "{why}");
    }

    #[test]
    fn a_qemu_killed_by_a_signal_says_which() {
        let end = QemuEnd::of(ExitStatus::from_raw(9), "", "");
        assert_eq!(end, QemuEnd::Signal(9));
        assert_eq!(end.to_string(), "QEMU was killed");
    }
}
