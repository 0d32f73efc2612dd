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
    let log = std::fs::File::create("/var/log/libvirt/matryoshka-daemon.log")
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null());
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
                "the libvirt daemon {} {} at {level}; see /var/log/libvirt/matryoshka-daemon.log \
                 there",
                daemon.display(),
                process::ended(status)
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(Error::Unavailable(format!(
        "the libvirt daemon {} did not answer at {level} within {} s",
        daemon.display(),
        START_DEADLINE.as_secs()
    )))
}

/// Whether a daemon accepts connections on one of [`SOCKETS`].
fn answering() -> bool {
    SOCKETS.iter().any(|s| UnixStream::connect(s).is_ok())
}
