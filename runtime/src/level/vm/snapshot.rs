//! Snapshots of a level: the whole state of its QEMU (the guest's memory, with
//! every level booted inside it, and its devices) saved to a file through QMP,
//! and a QEMU started from that file instead of booting.
//!
//! Saving stops the guest, then migrates it (QMP `migrate`) to a Unix socket
//! this runtime listens on and copies into the file: QEMU's seccomp sandbox
//! (`spawn=deny`) forbids the `exec:` helper such a save usually goes through.
//! The guest is stopped first so that the migration is a single pass that
//! always ends, whatever the guest (or a nested guest inside it) writes.
//!
//! A restore starts QEMU with the saved machine's command line and
//! `-incoming fd:N`, N the snapshot file opened read-only; fresh socket pairs
//! carry the relay and QMP, so the relay's port is open from the restored
//! guest's first instruction, and the guest runs on from where it stopped as
//! soon as QEMU has read the state. Console, level log and QEMU log are
//! appended to.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use super::argv::{self, MachineSpec};
use super::boot::{Booted, HostKey, free_port};
use super::monitor::QmpPort;
use super::qemu::{LevelFiles, Qemu};

/// How fast QEMU may write a snapshot: QEMU's default (128 MiB/s) made the
/// ~700 MB of a booted L1 take over 5 s; a local socket takes far more.
const SAVE_BANDWIDTH: u64 = 16 << 30;

/// How often the state of a save or a restore is asked for.
const POLL: Duration = Duration::from_millis(50);

/// How long a cancelled save may take to end.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(10);

/// What it takes to start a level's QEMU again from a saved state: its machine
/// as it booted (descriptors and the host key file are made anew for each
/// restore) and its files.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Restorable {
    /// The level path, for messages.
    pub path: String,
    /// The machine as it booted, without descriptors.
    pub spec: MachineSpec,
    /// Its console, logs and monitor socket.
    pub files: LevelFiles,
    /// Its SSH host key, handed in through `fw_cfg` again (QEMU opens the file
    /// when it starts; the guest read it at boot and keeps its copy).
    pub host_key: Option<HostKey>,
    /// The SSH hops to its parent, for the printed command that reaches it.
    pub jump: Vec<String>,
}

impl Restorable {
    /// The same machine with its console, logs and monitor in `run_dir` (an
    /// absolute path: a later run's folder), with a monitor when `monitor`.
    pub fn in_folder(mut self, run_dir: &Path, monitor: bool) -> Self {
        let files = super::boot::level_files(run_dir, &self.path, monitor);
        self.spec.console_log = files.console.clone();
        self.spec.level_log = files.level_log.clone();
        self.spec.monitor = files.monitor.clone();
        self.files = files;
        self
    }
}

/// A saved level.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    /// The machine the state belongs to.
    pub machine: Restorable,
    /// The state.
    pub file: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// How long saving took, guest stopped to file written.
    pub took: Duration,
    /// The state held open ([`Snapshot::hold`]): restores read it through
    /// this, whatever happens to the file's name meanwhile.
    #[serde(skip)]
    pub held: Option<std::sync::Arc<std::fs::File>>,
}

impl Snapshot {
    /// Opens the state and keeps it open for the restores to come: another
    /// run that replaces or removes a state kept in the cache (one it found
    /// stale, say) then takes nothing from this one.
    pub fn hold(&mut self) -> Result<(), String> {
        let file = std::fs::File::open(&self.file)
            .map_err(|e| format!("cannot open {}: {e}", self.file.display()))?;
        self.held = Some(std::sync::Arc::new(file));
        Ok(())
    }

    /// A new reader of the state, at its start: through the held file when
    /// there is one (`/proc/self/fd`: its own offset), else by its name.
    fn open(&self) -> std::io::Result<std::fs::File> {
        match &self.held {
            Some(held) => std::fs::File::open(format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(held.as_ref())
            )),
            None => std::fs::File::open(&self.file),
        }
    }
}

/// Saves the level behind `qmp` into `file` (a name of this save's own beside
/// it until it is whole, so that runs saving the same file at once do not mix
/// their bytes). The guest is left stopped: QMP `cont` runs it on, a kill
/// throws it away. QEMU sends the state to a socket in a temporary folder of
/// its own (a short path: a Unix socket's has at most 107 bytes).
pub async fn save(
    qmp: &QmpPort,
    machine: &Restorable,
    file: &Path,
    deadline: Duration,
) -> Result<Snapshot, String> {
    let level = &machine.path;
    let started = Instant::now();
    let socket_dir = tempfile::Builder::new()
        .prefix("matryoshka-save.")
        .tempdir()
        .map_err(|e| format!("cannot save {level}: cannot make a folder for its socket: {e}"))?;
    let socket = socket_dir.path().join("state");
    let listener = tokio::net::UnixListener::bind(&socket).map_err(|e| {
        format!(
            "cannot save {level}: cannot listen on {}: {e}",
            socket.display()
        )
    })?;
    let unique = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let partial = file.with_extension(format!("partial.{}.{unique}", std::process::id()));
    // Mode 0600: the state holds the guest's memory, its keys among it.
    let out = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)
        .await
        .map_err(|e| {
            format!(
                "cannot save {level}: cannot create {}: {e}",
                partial.display()
            )
        })?;
    let mut partial_guard = RemoveOnDrop(partial.clone());
    let qmp_err = |what: &str, e: super::qmp::QmpError| format!("cannot save {level}: {what}: {e}");
    qmp.execute("stop", None, deadline)
        .await
        .map_err(|e| qmp_err("stopping it", e))?;
    qmp.execute(
        "migrate-set-parameters",
        Some(json!({ "max-bandwidth": SAVE_BANDWIDTH })),
        deadline,
    )
    .await
    .map_err(|e| qmp_err("setting the bandwidth", e))?;
    // Aborted when this function returns early: no task left waiting in
    // `accept` with the listener and the half-written file.
    let receive = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await?;
        let mut out = tokio::io::BufWriter::with_capacity(1 << 20, out);
        let bytes = tokio::io::copy(&mut stream, &mut out).await?;
        tokio::io::AsyncWriteExt::flush(&mut out).await?;
        out.into_inner().sync_all().await?;
        Ok::<u64, std::io::Error>(bytes)
    }));
    let uri = format!(
        "unix:{}",
        socket
            .to_str()
            .ok_or_else(|| format!("cannot save {level}: {} is not UTF-8", socket.display()))?
    );
    qmp.execute("migrate", Some(json!({ "uri": uri })), deadline)
        .await
        .map_err(|e| qmp_err("migrate", e))?;
    let until = started + deadline;
    loop {
        let state = qmp
            .execute("query-migrate", None, deadline)
            .await
            .map_err(|e| qmp_err("query-migrate", e))?;
        match state["status"].as_str().unwrap_or("") {
            "completed" => break,
            status @ ("failed" | "cancelled") => {
                let why = state["error-desc"].as_str().unwrap_or("no reason given");
                return Err(format!(
                    "cannot save {level}: the migration {status}: {why}"
                ));
            }
            _ if Instant::now() > until => {
                cancel(qmp).await;
                return Err(format!(
                    "cannot save {level}: the migration did not end within {:.0} s",
                    deadline.as_secs_f64()
                ));
            }
            _ => tokio::time::sleep(POLL).await,
        }
    }
    let bytes = tokio::time::timeout_at(until.into(), receive)
        .await
        .map_err(|_| format!("cannot save {level}: the state was not written within the deadline"))?
        .map_err(|e| format!("cannot save {level}: {e}"))?
        .map_err(|e| format!("cannot save {level}: writing {}: {e}", partial.display()))?;
    std::fs::rename(&partial, file).map_err(|e| {
        format!(
            "cannot save {level}: cannot rename {} to {}: {e}",
            partial.display(),
            file.display()
        )
    })?;
    partial_guard.0 = PathBuf::new();
    let took = started.elapsed();
    tracing::info!(
        level = %level,
        "saved in {:.1} s: {} ({} MiB)",
        took.as_secs_f64(),
        file.display(),
        bytes >> 20
    );
    Ok(Snapshot {
        machine: machine.clone(),
        file: file.to_path_buf(),
        bytes,
        took,
        held: None,
    })
}

/// Cancels a migration and waits (a few seconds at most) until QEMU says it
/// ended, so that the guest can run on after it.
async fn cancel(qmp: &QmpPort) {
    let _ = qmp.execute("migrate_cancel", None, CANCEL_TIMEOUT).await;
    let until = Instant::now() + CANCEL_TIMEOUT;
    while Instant::now() < until {
        match qmp.execute("query-migrate", None, CANCEL_TIMEOUT).await {
            Ok(state)
                if matches!(
                    state["status"].as_str(),
                    Some("cancelled" | "failed" | "completed")
                ) =>
            {
                return;
            }
            Ok(_) => tokio::time::sleep(POLL).await,
            Err(_) => return,
        }
    }
}

/// Starts a QEMU from `snapshot` and waits until its guest runs again (at most
/// `deadline`). The level's runtime goes on serving the connection it served
/// when it was saved, now over the returned relay.
pub async fn restore(snapshot: &Snapshot, deadline: Duration) -> Result<Booted, String> {
    let machine = &snapshot.machine;
    let level = &machine.path;
    let started = Instant::now();
    let fail = |m: String| {
        format!(
            "cannot restore {level} from {}: {m}",
            snapshot.file.display()
        )
    };
    let state = snapshot.open().map_err(|e| fail(e.to_string()))?;
    let pair = || std::os::unix::net::UnixStream::pair().map_err(|e| fail(e.to_string()));
    let (relay, guest_end) = pair()?;
    let (qmp, qmp_end) = pair()?;
    let run_dir = machine
        .files
        .console
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    // Read by QEMU when it starts; removed when this function returns.
    let host_key = match &machine.host_key {
        Some(key) => {
            let mut file = tempfile::Builder::new()
                .prefix("restore.hostkey.")
                .tempfile_in(&run_dir)
                .map_err(|e| fail(e.to_string()))?;
            std::io::Write::write_all(&mut file, key.private_openssh.as_bytes())
                .map_err(|e| fail(e.to_string()))?;
            Some(file)
        }
        None => None,
    };
    let ssh_port = free_port().map_err(fail)?;
    let spec = MachineSpec {
        ssh_port,
        relay_fd: std::os::fd::AsRawFd::as_raw_fd(&guest_end),
        qmp_fd: Some(std::os::fd::AsRawFd::as_raw_fd(&qmp_end)),
        incoming_fd: Some(std::os::fd::AsRawFd::as_raw_fd(&state)),
        host_key: host_key.as_ref().map(|f| f.path().to_path_buf()),
        append_files: true,
        ..machine.spec.clone()
    };
    let argv = argv::argv(&spec).map_err(fail)?;
    tracing::info!(level = %level, "restoring: {}", argv.join(" "));
    if let Some(socket) = &machine.files.monitor {
        let _ = std::fs::remove_file(socket);
    }
    let mut qemu = Qemu::spawn(
        &argv,
        machine.files.clone(),
        guest_end,
        Some(qmp_end),
        Some(state),
    )
    .map_err(|e| fail(format!("cannot start {}: {e}", argv[0])))?;
    let monitor = QmpPort::new(qmp);
    // Running again once the whole state is read (QEMU starts an incoming
    // machine on its own when no -S is given).
    loop {
        if let Some(status) = qemu.exited() {
            return Err(fail(format!(
                "QEMU exited ({}){}; {}",
                crate::process::status_words(status),
                qemu.log_summary(),
                qemu.tails()
            )));
        }
        if started.elapsed() > deadline {
            qemu.kill();
            return Err(fail(format!(
                "it was not running within {:.0} s; {}",
                deadline.as_secs_f64(),
                qemu.tails()
            )));
        }
        let left = deadline.saturating_sub(started.elapsed());
        let status = monitor
            .execute("query-status", None, left)
            .await
            .map_err(|e| {
                let ended = qemu
                    .exited()
                    .map(|s| format!(" (QEMU {})", crate::process::status_words(s)))
                    .unwrap_or_default();
                fail(format!(
                    "query-status: {e}{ended}{}; {}",
                    qemu.log_summary(),
                    qemu.tails()
                ))
            })?;
        match status["status"].as_str() {
            Some("running") => break,
            Some("inmigrate") | Some("prelaunch") | Some("restore-vm") => {
                tokio::time::sleep(POLL).await;
            }
            // Saved stopped, restored stopped: run it on.
            Some("paused") => {
                monitor
                    .execute("cont", None, left)
                    .await
                    .map_err(|e| fail(format!("cont: {e}; {}", qemu.tails())))?;
            }
            other => {
                qemu.kill();
                return Err(fail(format!(
                    "QEMU reports the machine {}; {}",
                    other.unwrap_or("in no known state"),
                    qemu.tails()
                )));
            }
        }
    }
    drop(host_key);
    let boot_time = started.elapsed();
    tracing::info!(level = %level, "restored in {:.2} s", boot_time.as_secs_f64());
    Ok(Booted {
        machine: Box::new(qemu),
        relay,
        qmp: Some(monitor),
        ssh_port,
        accel: spec.accel,
        accel_reason: format!("restored from {}", snapshot.file.display()),
        boot_time,
        restorable: Some(machine.clone()),
    })
}

/// Removes a file when dropped, unless its path was emptied.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}
