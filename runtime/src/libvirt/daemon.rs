//! The libvirt daemon of a level, started on first use.
//!
//! Levels boot without a libvirt daemon (it costs seconds under TCG and most
//! tests never use it). The first `qemu:///system` connection at a level where
//! no daemon answers starts one (`libvirtd`, else `virtqemud`) in a process
//! group the runtime kills when it exits; a daemon that was already running is
//! left alone.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Error;
use crate::process;

/// Sockets a system QEMU driver answers on.
const SOCKETS: &[&str] = &["/run/libvirt/libvirt-sock", "/run/libvirt/virtqemud-sock"];
/// Daemons that serve `qemu:///system`: the monolithic one first, which clients
/// of libvirt 9 reach on `libvirt-sock` without further set-up.
const DAEMONS: &[&str] = &["/usr/sbin/libvirtd", "/usr/sbin/virtqemud"];
/// Written by the image's initramfs at every VM level the runtime boots.
const LEVEL_MARKER: &str = "/run/matryoshka/depth";
/// Where a started daemon's output goes.
const DAEMON_LOG: &str = "/var/log/libvirt/matryoshka-daemon.log";
/// How long a started daemon has to answer.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// Makes sure a daemon serves `uri` when it is the system QEMU driver: starts
/// one at this level (`level`, for messages) if none answers. Blocking.
pub fn ensure_for(uri: &str, level: &str) -> Result<(), Error> {
    if uri.trim_end_matches('/') != "qemu:///system" {
        return Ok(());
    }
    static STARTED: Mutex<bool> = Mutex::new(false);
    let mut started = STARTED.lock().unwrap_or_else(|e| e.into_inner());
    if answering() {
        return Ok(());
    }
    let Some(daemon) = DAEMONS.iter().map(Path::new).find(|p| p.exists()) else {
        // libvirt's own error says that no daemon runs; nothing to start here.
        return Ok(());
    };
    // Only at a level booted from the matryoshka image: on any other machine the
    // daemon is the machine's own (its domains, networks, autostart), not ours to start.
    if !Path::new(LEVEL_MARKER).exists() {
        return Err(Error::Unavailable(format!(
            "no libvirt daemon answers for {uri} at {level}; start it there (e.g. \
             `systemctl start libvirtd` or `virtqemud`): the runtime starts one only at VM \
             levels it booted"
        )));
    }
    if *started {
        return Err(Error::Unavailable(format!(
            "the libvirt daemon {} this runtime started at {level} stopped answering",
            daemon.display()
        )));
    }
    for dir in [
        "/run/libvirt",
        "/var/lib/libvirt",
        "/var/log/libvirt",
        "/var/cache/libvirt",
    ] {
        let _ = std::fs::create_dir_all(dir);
    }
    let log = std::fs::File::create(DAEMON_LOG)
        .map(Stdio::from)
        .map_err(|e| Error::Unavailable(format!("cannot create {DAEMON_LOG} at {level}: {e}")))?;
    let mut cmd = Command::new(daemon);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
    process::isolate(&mut cmd, process::Environment::Exec);
    let mut child = process::spawn_from_lasting_thread(cmd).map_err(|e| {
        Error::Unavailable(format!("cannot start {} at {level}: {e}", daemon.display()))
    })?;
    *started = true;
    tracing::info!(level, "started {} (pid {})", daemon.display(), child.id());
    let begun = Instant::now();
    while begun.elapsed() < START_DEADLINE {
        if answering() {
            tracing::info!(
                level,
                "{} answers after {:.1} s",
                daemon.display(),
                begun.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            process::untrack(child.id());
            *started = false;
            return Err(Error::Unavailable(format!(
                "the libvirt daemon {} {} at {level}; see {DAEMON_LOG} there",
                daemon.display(),
                process::ended(status)
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    process::kill_group(child.id());
    let _ = child.wait();
    process::untrack(child.id());
    *started = false;
    Err(Error::Unavailable(format!(
        "the libvirt daemon {} did not answer at {level} within {} s; see {DAEMON_LOG} there",
        daemon.display(),
        START_DEADLINE.as_secs()
    )))
}

/// Whether a daemon accepts connections on one of [`SOCKETS`].
fn answering() -> bool {
    SOCKETS.iter().any(|s| UnixStream::connect(s).is_ok())
}
