//! VM levels: boot the next level from an image with QEMU and wait until it is
//! ready to be reached over SSH.
//!
//! The boot is watched on the serial console, which only this level reads:
//! - `MATRYOSHKA-BOOT` is printed by the initramfs, the first sign of life;
//! - `MATRYOSHKA-HOSTKEY <algo> <key>` is the level's fresh SSH host key, pinned from there;
//! - `MATRYOSHKA-READY level=N accel=… kvm=…` says sshd runs and how the level itself runs.
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
/// Default deadline for the ready marker.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// Where a level finds the image it was booted from (see `images/build.sh`).
pub const IMAGE_IN_LEVEL: &str = "/usr/lib/matryoshka/image";
/// Console lines shown when a boot fails.
const TAIL_LINES: usize = 15;

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
    /// Deadline for the ready marker.
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

/// A level that booted and printed its ready marker.
#[derive(Debug)]
pub struct Booted {
    /// Its QEMU process.
    pub qemu: Qemu,
    /// Host port forwarded to its SSH port, on 127.0.0.1.
    pub ssh_port: u16,
    /// Its SSH host key as printed on its console (`<algo> <base64>`).
    pub host_key: String,
    /// The accelerator it runs under.
    pub accel: Accel,
    /// Why `auto` chose that accelerator, for the run's log.
    pub accel_reason: String,
    /// How long it took from starting QEMU to the ready marker.
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
    /// The runtime to hand the level on a second disk, when there is one.
    pub runtime: Option<RuntimeDisk>,
    /// The level's SSH host key, made by this level: (OpenSSH private key,
    /// `<algo> <base64>` public key). Without one the level makes its own and
    /// prints it on the console.
    pub host_key: Option<(String, String)>,
}

/// A runtime binary as a disk image (zero-padded to whole sectors), for a level's
/// init to copy into its runtime cache before the parent connects.
#[derive(Debug, Clone)]
pub struct RuntimeDisk {
    /// The padded image.
    pub path: PathBuf,
    /// Hex sha256 of the binary.
    pub sha256: String,
    /// Size of the binary, bytes.
    pub size: u64,
}

impl RuntimeDisk {
    /// The disk for `binary` in `dir`, made once per binary hash.
    pub fn prepare(binary: &Path, sha256: &str, dir: &Path) -> Result<Self, String> {
        let size = std::fs::metadata(binary)
            .map_err(|e| format!("cannot stat {}: {e}", binary.display()))?
            .len();
        let path = dir.join(format!("{sha256}.img"));
        let padded = size.div_ceil(512) * 512;
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == padded) {
            return Ok(Self {
                path,
                sha256: sha256.to_string(),
                size,
            });
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let tmp = tempfile::NamedTempFile::new_in(dir)
            .map_err(|e| format!("cannot create a file in {}: {e}", dir.display()))?;
        std::fs::copy(binary, tmp.path())
            .and_then(|_| tmp.as_file().set_len(padded))
            .map_err(|e| format!("cannot copy {} into a disk image: {e}", binary.display()))?;
        tmp.persist(&path)
            .map_err(|e| format!("cannot keep {}: {e}", path.display()))?;
        Ok(Self {
            path,
            sha256: sha256.to_string(),
            size,
        })
    }
}

/// Boots a level and waits for its ready marker.
pub async fn boot(req: &VmRequest, plan: &BootPlan) -> Result<Booted, String> {
    let arch = match &req.arch {
        Some(a) => Arch::from_uname(a)
            .ok_or_else(|| format!("cannot boot a `{a}` level: known are x86_64 and s390x"))?,
        None => Arch::host(),
    };
    let image = Image::resolve(req.image.as_deref(), arch)?;
    std::fs::create_dir_all(&plan.run_dir)
        .map_err(|e| format!("cannot create {}: {e}", plan.run_dir.display()))?;
    let timeout = req.boot_timeout.unwrap_or(DEFAULT_BOOT_TIMEOUT);
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
    let console = plan.run_dir.join(format!("{name}.console"));
    let log = plan.run_dir.join(format!("{name}.qemu.log"));
    let key_b64 = base64_encode(plan.authorized_key.trim().as_bytes());
    // A port taken between choosing and QEMU binding it fails the start: try another.
    let mut attempt = 0;
    loop {
        attempt += 1;
        let ssh_port = free_port().map_err(Failure::Boot)?;
        let spec = MachineSpec {
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
            ]
            .into_iter()
            .chain(
                plan.runtime
                    .iter()
                    .map(|r| format!("matryoshka.runtime={}:{}", r.sha256, r.size)),
            )
            .chain(plan.host_key.iter().map(|(private, _)| {
                format!("matryoshka.hostkey={}", base64_encode(private.as_bytes()))
            }))
            .collect(),
            runtime_disk: plan.runtime.as_ref().map(|r| r.path.clone()),
            ssh_port,
            console_log: console.clone(),
            qmp_socket: None,
        };
        let argv = qemu::argv(&spec);
        tracing::info!(level = %plan.path, "booting: {}", argv.join(" "));
        let _ = std::fs::remove_file(&console);
        let started = Instant::now();
        let mut qemu = Qemu::spawn(&argv, &console, &log).map_err(|e| {
            Failure::Boot(format!(
                "cannot start {} for {}: {e}; install QEMU (Debian: qemu-system-x86 or qemu-system-misc)",
                argv[0], plan.path
            ))
        })?;
        match wait_ready(&mut qemu, plan, accel, started, timeout, probe).await {
            Err(Failure::Boot(m)) if attempt < 3 && qemu.log_tail().contains("hostfwd") => {
                tracing::info!(level = %plan.path, "port {ssh_port} was taken ({m}); trying another");
            }
            Err(e) => return Err(e),
            Ok(host_key) => {
                return Ok(Booted {
                    qemu,
                    ssh_port,
                    host_key,
                    accel,
                    accel_reason: String::new(),
                    boot_time: started.elapsed(),
                });
            }
        }
    }
}

/// Polls the console until the ready marker, an early exit, or a deadline.
async fn wait_ready(
    qemu: &mut Qemu,
    plan: &BootPlan,
    accel: Accel,
    started: Instant,
    timeout: Duration,
    probe: bool,
) -> Result<String, Failure> {
    let accel_name = accel.name();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let console = qemu.console();
        if let Some(ready) = line_after(&console, "MATRYOSHKA-READY ") {
            // The key this level made and handed in is the one pinned; a level
            // given none made its own and printed it.
            let Some(key) = plan
                .host_key
                .as_ref()
                .map(|(_, public)| public.clone())
                .or_else(|| line_after(&console, "MATRYOSHKA-HOSTKEY "))
            else {
                return Err(Failure::Boot(format!(
                    "{} printed its ready marker but no host key; console: {}",
                    plan.path,
                    tail(&console)
                )));
            };
            tracing::info!(
                level = %plan.path,
                "ready after {:.1} s ({ready}); guest uptime at each step: {}",
                started.elapsed().as_secs_f64(),
                boot_steps(&console)
            );
            return Ok(key);
        }
        if let Some(fail) = line_after(&console, "MATRYOSHKA-FAIL") {
            qemu.kill();
            return Err(Failure::Boot(format!(
                "{} failed to boot: {}; console tail:\n{}",
                plan.path,
                fail.trim_start_matches(": "),
                tail(&console)
            )));
        }
        if let Some(status) = qemu.exited() {
            let why = format!(
                "QEMU ({accel_name}) exited after {:.1} s ({}){}",
                started.elapsed().as_secs_f64(),
                describe(status),
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
            let hint = if console.contains("Kernel panic") {
                " — the kernel panicked"
            } else {
                ""
            };
            return Err(Failure::Boot(format!(
                "{} did not boot: {why}{hint}; console tail:\n{}",
                plan.path,
                tail(&console)
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
                "{} printed no ready marker within {:.1} s ({accel_name}); console tail:\n{}",
                plan.path,
                timeout.as_secs_f64(),
                tail(&console)
            )));
        }
    }
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

/// A running QEMU process of a level; killed when dropped.
#[derive(Debug)]
pub struct Qemu {
    child: Child,
    console: PathBuf,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Qemu {
    fn spawn(argv: &[String], console: &Path, log: &Path) -> std::io::Result<Self> {
        let stderr = std::fs::File::create(log)?;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(stderr.try_clone()?)
            .stderr(stderr)
            .process_group(0);
        // SAFETY: the closure only calls prctl(2), which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = spawner_thread(cmd)?;
        registry().insert(child.id());
        Ok(Self {
            child,
            console: console.to_path_buf(),
            log: log.to_path_buf(),
            status: None,
        })
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The console file.
    pub fn console_path(&self) -> &Path {
        &self.console
    }

    /// Everything on the console so far.
    pub fn console(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.console) {
            let mut bytes = Vec::new();
            let _ = f.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        text
    }

    fn log_tail(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
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

    /// How QEMU ended and the console's last lines, for a level that was lost.
    pub fn describe_end(&mut self) -> String {
        match self.exited() {
            Some(status) => format!(
                "its QEMU exited ({}){}; console tail:\n{}",
                describe(status),
                self.log_summary(),
                tail(&self.console())
            ),
            None => format!(
                "its QEMU still runs; console tail:\n{}",
                tail(&self.console())
            ),
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
        let console = "[ 1.0] x\r\nMATRYOSHKA-BOOT\r\nMATRYOSHKA-HOSTKEY ssh-ed25519 AAAA\r\n\
                       MATRYOSHKA-READY level=2 accel=kvm kvm=yes\r\n";
        assert_eq!(
            line_after(console, "MATRYOSHKA-HOSTKEY ").as_deref(),
            Some("ssh-ed25519 AAAA")
        );
        assert_eq!(
            line_after(console, "MATRYOSHKA-READY ").as_deref(),
            Some("level=2 accel=kvm kvm=yes")
        );
        assert_eq!(line_after(console, "MATRYOSHKA-FAIL"), None);
    }

    #[test]
    fn boot_steps_are_listed_in_console_order() {
        let console = "MATRYOSHKA-BOOT\r\n[    3.1] noise\r\nMATRYOSHKA-STEP 3.93 init\r\n\
                       MATRYOSHKA-STEP 5.52 sshd started\r\nMATRYOSHKA-READY level=1\r\n";
        assert_eq!(boot_steps(console), "init 3.93 s, sshd started 5.52 s");
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
    fn missing_images_name_the_file_and_the_fix() {
        let err = Image::resolve(Some(Path::new("/nonexistent/image")), Arch::X86_64)
            .expect_err("no image there");
        assert!(
            err.contains("no kernel at /nonexistent/image/kernel"),
            "{err}"
        );
        assert!(err.contains("images/build.sh"), "{err}");
    }
}
