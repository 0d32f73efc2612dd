//! Child processes of the runtime: how they are started, stopped and described.
//!
//! Every process the runtime starts (a command a test runs, a local child
//! runtime, a level's QEMU) leads a process group of its own and gets
//! `SIGKILL` when the thread that started it exits (`PR_SET_PDEATHSIG`), so a
//! runtime that is killed takes its children with it. Stopping one kills its
//! whole group: what it started in the background goes with it. Commands a
//! test runs get a cleared environment ([`EXEC_ENV`]).
//!
//! This module is a leaf: it knows nothing of levels, tests or the relay.

use std::collections::BTreeSet;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::ExitStatus;
use std::sync::{Mutex, OnceLock, mpsc};

/// The whole environment of a command started by the `exec` host function.
pub const EXEC_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("LANG", "C.UTF-8"),
    ("HOME", "/"),
];

/// What a started process inherits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Environment {
    /// This runtime's environment (its own child runtimes, QEMU).
    Inherit,
    /// Only [`EXEC_ENV`] (commands a test runs).
    Exec,
}

/// Makes `cmd` start in a process group of its own that receives `SIGKILL` when
/// the thread that spawns it exits, with the given environment.
pub fn isolate(cmd: &mut std::process::Command, env: Environment) {
    if env == Environment::Exec {
        cmd.env_clear().envs(EXEC_ENV.iter().copied());
    }
    cmd.process_group(0);
    // SAFETY: the closure only calls prctl(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sends `SIGKILL` to the process group `pgid` (a no-op for a group that is gone).
pub fn kill_group(pgid: u32) {
    if let Ok(pgid) = i32::try_from(pgid)
        && pgid > 1
    {
        // SAFETY: kill(2) with a negative pid signals that process group; no memory is involved.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

/// `status 1`, `signal 9 (SIGKILL)`: the exit status in a few words.
pub fn status_words(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("status {code}"),
        (None, Some(signal)) => match signal_name(signal) {
            Some(name) => format!("signal {signal} ({name})"),
            None => format!("signal {signal}"),
        },
        _ => "an unknown status".to_string(),
    }
}

/// `exited with status 1`, `was killed by signal 9 (SIGKILL)`: how a process ended.
pub fn ended(status: ExitStatus) -> String {
    match status.code() {
        Some(_) => format!("exited with {}", status_words(status)),
        None => format!("was killed by {}", status_words(status)),
    }
}

fn signal_name(signal: i32) -> Option<&'static str> {
    Some(match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => return None,
    })
}

/// Starts `cmd` (prepared with [`isolate`]) from one thread that lives as long as
/// the process, and registers its group for [`kill_all`]: the parent-death signal
/// fires when the *thread* that forked exits, so a short-lived thread would take
/// its children with it. For long-lived children such as QEMU.
pub fn spawn_from_lasting_thread(
    cmd: std::process::Command,
) -> std::io::Result<std::process::Child> {
    type Request = (
        std::process::Command,
        mpsc::Sender<std::io::Result<std::process::Child>>,
    );
    static SPAWNER: OnceLock<Result<Mutex<mpsc::Sender<Request>>, String>> = OnceLock::new();
    let tx = SPAWNER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Request>();
            std::thread::Builder::new()
                .name("matryoshka-spawner".into())
                .spawn(move || {
                    for (mut cmd, reply) in rx {
                        let _ = reply.send(cmd.spawn());
                    }
                })
                .map(|_| Mutex::new(tx))
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| std::io::Error::other(format!("cannot start the spawner thread: {e}")))?;
    let (reply, answer) = mpsc::channel();
    tx.lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply))
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    let child = answer
        .recv()
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))??;
    track(child.id());
    Ok(child)
}

fn registry() -> &'static Mutex<BTreeSet<u32>> {
    static REGISTRY: OnceLock<Mutex<BTreeSet<u32>>> = OnceLock::new();
    REGISTRY.get_or_init(Mutex::default)
}

/// Registers the process group `pgid` for [`kill_all`].
pub fn track(pgid: u32) {
    registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(pgid);
}

/// Forgets `pgid`, once its leader was reaped.
pub fn untrack(pgid: u32) {
    registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&pgid);
}

/// Kills every registered process group; for exit paths that skip destructors.
pub fn kill_all() {
    let groups = std::mem::take(&mut *registry().lock().unwrap_or_else(|e| e.into_inner()));
    for pgid in groups {
        kill_group(pgid);
    }
}

/// Process groups started for one owner (a test's instance), killed when it is dropped.
#[derive(Debug, Default)]
pub struct Groups(Mutex<Vec<u32>>);

impl Groups {
    /// Adds a group to kill with the owner.
    pub fn add(&self, pgid: u32) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(pgid);
        track(pgid);
    }

    /// Kills every group now.
    pub fn kill(&self) {
        for pgid in std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner())) {
            kill_group(pgid);
            untrack(pgid);
        }
    }
}

impl Drop for Groups {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_in_words() {
        assert_eq!(status_words(ExitStatus::from_raw(1 << 8)), "status 1");
        assert_eq!(ended(ExitStatus::from_raw(3 << 8)), "exited with status 3");
        assert_eq!(
            ended(ExitStatus::from_raw(9)),
            "was killed by signal 9 (SIGKILL)"
        );
        assert_eq!(status_words(ExitStatus::from_raw(6)), "signal 6 (SIGABRT)");
    }

    #[test]
    fn an_isolated_command_has_only_the_exec_environment_and_its_own_group() {
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", "env; echo pgid=$(ps -o pgid= -p $$)"])
            .env("MATRYOSHKA_SECRET", "leak");
        isolate(&mut cmd, Environment::Exec);
        let out = cmd.output().expect("sh runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("MATRYOSHKA_SECRET"), "{text}");
        assert!(text.contains("LANG=C.UTF-8"), "{text}");
        let own = format!("pgid={}", std::process::id());
        assert!(
            !text.contains(&own),
            "the command shares this group: {text}"
        );
    }

    #[test]
    fn killing_a_group_takes_its_background_children() {
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", "sleep 300 & echo $!"])
            .stdout(std::process::Stdio::piped());
        isolate(&mut cmd, Environment::Exec);
        let mut child = cmd.spawn().expect("sh runs");
        let pgid = child.id();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("a line");
        child.wait().expect("sh exits");
        let sleeper: i32 = line.trim().parse().expect("pid of the background sleep");
        // SAFETY: kill(2) with signal 0 only checks that the process exists.
        assert_eq!(unsafe { libc::kill(sleeper, 0) }, 0, "sleep runs");
        kill_group(pgid);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let state =
                std::fs::read_to_string(format!("/proc/{sleeper}/stat")).unwrap_or_default();
            // Gone, or a zombie waiting for init to reap it.
            if state.is_empty() || state.contains(") Z ") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "sleep survived: {state}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
