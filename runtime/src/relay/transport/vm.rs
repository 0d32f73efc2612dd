//! VM levels as a transport: boot QEMU from the image with the runtime in its
//! initramfs (see [`crate::level::vm`]); the level's init starts that runtime on
//! a virtio-serial port, and the relay runs over the socket behind it. No network
//! and no SSH on the relay's path: the level's sshd is there for people, reached
//! with the printed `ssh -J …` command.

use std::path::PathBuf;
use std::sync::OnceLock;

use russh::keys::PrivateKey;
use tokio::io::AsyncReadExt;

use super::{StderrTail, Transport, TransportGuard, ssh};
use crate::level::vm::{self, BootPlan, Qemu, VmRequest};
use crate::relay::protocol::{LevelSetup, RemoteError, SshSettings, VmSettings, WireErrorKind};

/// Silence after which a VM level is declared lost.
const VM_HEARTBEAT_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// What a level knows for booting VM levels below it.
#[derive(Debug)]
pub struct VmContext {
    /// The run's settings, as handed to this level.
    pub settings: VmSettings,
    /// Image folder given on the command line (L0 only).
    pub image_dir: Option<PathBuf>,
    /// Where consoles and QEMU logs go.
    pub run_dir: RunDir,
    /// Where the KVM probe is remembered.
    pub memo_dir: Option<PathBuf>,
    key: OnceLock<Result<RunKey, String>>,
}

impl VmContext {
    /// A context for a level.
    pub fn new(
        settings: VmSettings,
        image_dir: Option<PathBuf>,
        run_dir: RunDir,
        memo_dir: Option<PathBuf>,
    ) -> Self {
        Self {
            settings,
            image_dir,
            run_dir,
            memo_dir,
            key: OnceLock::new(),
        }
    }

    /// The run's key: the one given with `--ssh-key` (handed down the chain), or
    /// one made for this run and written beside the consoles for printed `ssh` commands.
    fn run_key(&self, ssh: Option<&SshSettings>) -> Result<RunKey, String> {
        self.key
            .get_or_init(|| match ssh {
                Some(s) => RunKey::from_private(&s.private_key, s.key_path.clone()),
                None => {
                    let key = RunKey::generate()?;
                    let path = self.run_dir.path()?.join("id_ed25519");
                    write_private(&path, &key.private_key)?;
                    Ok(RunKey {
                        path: std::path::absolute(&path)
                            .ok()
                            .map(|p| p.display().to_string()),
                        ..key
                    })
                }
            })
            .clone()
    }
}

/// Folder for consoles and QEMU logs of the levels booted from here.
#[derive(Debug)]
pub enum RunDir {
    /// A folder that is kept (L0: `target/matryoshka/<run>`).
    Kept(PathBuf),
    /// A temporary folder, made on first use and removed with the runtime.
    Temporary(OnceLock<Result<tempfile::TempDir, String>>),
}

impl RunDir {
    /// The folder, made if needed.
    pub fn path(&self) -> Result<PathBuf, String> {
        match self {
            Self::Kept(p) => {
                std::fs::create_dir_all(p)
                    .map_err(|e| format!("cannot create {}: {e}", p.display()))?;
                Ok(p.clone())
            }
            Self::Temporary(dir) => dir
                .get_or_init(|| {
                    tempfile::Builder::new()
                        .prefix("matryoshka-run.")
                        .tempdir()
                        .map_err(|e| format!("cannot create a folder for consoles: {e}"))
                })
                .as_ref()
                .map(|d| d.path().to_path_buf())
                .map_err(Clone::clone),
        }
    }
}

/// The SSH key VM levels accept.
#[derive(Clone)]
struct RunKey {
    private_key: String,
    public_line: String,
    path: Option<String>,
}

impl std::fmt::Debug for RunKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunKey")
            .field("public_line", &self.public_line)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl RunKey {
    fn from_private(openssh: &str, path: Option<String>) -> Result<Self, String> {
        let key = PrivateKey::from_openssh(openssh)
            .map_err(|e| format!("the run's SSH key is unusable: {e}"))?;
        let public_line = key
            .public_key()
            .to_openssh()
            .map_err(|e| format!("cannot encode the run's public key: {e}"))?;
        Ok(Self {
            private_key: openssh.to_string(),
            public_line,
            path,
        })
    }

    fn generate() -> Result<Self, String> {
        let mut seed = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
            .map_err(|e| format!("cannot read /dev/urandom for the run's key: {e}"))?;
        let pair = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed);
        let mut key = PrivateKey::from(pair);
        key.set_comment("matryoshka-run");
        let private = key
            .to_openssh(russh::keys::ssh_key::LineEnding::LF)
            .map_err(|e| format!("cannot encode the run's key: {e}"))?;
        Self::from_private(&private, None)
    }
}

fn write_private(path: &std::path::Path, key: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(key.as_bytes()))
        .map_err(|e| format!("cannot write the run's key to {}: {e}", path.display()))
}

/// Boots the level and returns the relay's stream to its runtime, which owns the
/// QEMU process.
pub async fn open(
    req: &VmRequest,
    setup: &LevelSetup,
    ctx: &VmContext,
) -> Result<Transport, RemoteError> {
    let err = |kind: WireErrorKind, message: String| RemoteError {
        kind,
        message,
        level_path: setup.path.clone(),
    };
    let key = ctx
        .run_key(setup.ssh.as_ref())
        .map_err(|m| err(WireErrorKind::Io, m))?;
    let run_dir = ctx.run_dir.path().map_err(|m| err(WireErrorKind::Io, m))?;
    let mut req = req.clone();
    if req.image.is_none() {
        req.image.clone_from(&ctx.image_dir);
    }
    // The runtime for the level's architecture: this one, or a build of
    // $MATRYOSHKA_RUNTIME_DIR; it rides in the level's initramfs.
    let runtime = {
        let arch = req
            .arch
            .clone()
            .unwrap_or_else(|| std::env::consts::ARCH.to_string());
        tokio::task::spawn_blocking(move || ssh::image_for(&arch))
            .await
            .map_err(|e| err(WireErrorKind::Internal, e.to_string()))?
            .map_err(|m| err(WireErrorKind::Unsupported, m))?
    };
    // The level's host key is made here and handed in on its kernel command line:
    // nothing to generate (slowly, under TCG) there.
    let host_key = RunKey::generate().ok().map(|k| k.private_key);
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
    };
    let booted = vm::boot(&req, &plan).await.map_err(|m| {
        let kind = if m.starts_with("no ") && m.contains("images/build.sh") {
            WireErrorKind::NotFound
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
        booted.qemu.console_path().display()
    );
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
    let tail = StderrTail::default();
    // The boot steps were logged with the ready line: follow what comes after.
    let log_path = booted.qemu.level_log_path().to_path_buf();
    let seen = std::fs::metadata(&log_path).map_or(0, |m| m.len());
    let log_pump = tokio::spawn(follow_level_log(
        log_path,
        seen,
        setup.path.clone(),
        tail.clone(),
    ));
    let ssh_command = Some(debug_ssh_command(
        key.path.as_deref(),
        &setup.vm.jump,
        booted.ssh_port,
    ));
    Ok(Transport {
        reader: Box::new(reader),
        writer: Box::new(writer),
        guard: Box::new(VmGuard {
            qemu: booted.qemu,
            log_pump,
            tail,
        }),
        ssh_command,
        vm: Some(super::VmFacts {
            accel: booted.accel.name().to_string(),
            accel_reason: booted.accel_reason,
            hop: format!("root@127.0.0.1:{}", booted.ssh_port),
            key: key.private_key,
            key_path: key.path,
        }),
        // A level running a nested guest can be starved of CPU for seconds (KVM in
        // KVM in TCG); while its QEMU lives, a longer silence is tolerated. A QEMU
        // that exits closes the relay socket, which is seen at once.
        heartbeat_grace: Some(VM_HEARTBEAT_GRACE),
    })
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
    let mut pending = Vec::new();
    loop {
        let mut chunk = Vec::new();
        match file.read_to_end(&mut chunk).await {
            Ok(0) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
            Ok(_) => {
                pending.extend_from_slice(&chunk);
                while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let line = String::from_utf8_lossy(&line);
                    let line = line.trim_end();
                    if line.starts_with("MATRYOSHKA-") {
                        tracing::info!(level = %level, "{line}");
                    } else if !line.is_empty() {
                        tail.push(&level, line);
                    }
                }
            }
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
        cmd.push_str(&format!(" -i {}", ssh::sh_quote(key)));
    }
    cmd.push_str(" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null");
    if !jump.is_empty() {
        cmd.push_str(&format!(" -J {}", jump.join(",")));
    }
    cmd.push_str(&format!(" -p {port} root@127.0.0.1"));
    cmd
}

struct VmGuard {
    qemu: Qemu,
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
        self.qemu.kill();
    }

    fn describe_exit(&mut self) -> String {
        format!("{} ({})", self.tail.explain(None), self.qemu.describe_end())
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

    #[test]
    fn generated_keys_round_trip() {
        let key = RunKey::generate().expect("a key");
        assert!(key.public_line.starts_with("ssh-ed25519 "), "{key:?}");
        let again = RunKey::from_private(&key.private_key, None).expect("parses");
        assert_eq!(again.public_line, key.public_line);
    }
}
