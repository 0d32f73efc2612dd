//! A level's running QEMU: started in its own process group that dies with this
//! runtime, its console and logs, and how it ended (`QemuEnd`).

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::process;

/// Console lines shown when a boot fails.
const TAIL_LINES: usize = 15;

/// How long a lost level's QEMU is given to exit before it is said to run on.
const QEMU_EXIT_GRACE: Duration = Duration::from_secs(1);

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

/// How a level's QEMU ended, told from its exit status and what the guest wrote.
/// QEMU runs with `-no-reboot`, so a guest that resets (a reboot, a panic with
/// `panic=-1`, or a triple fault) makes it exit with status 0, like a power-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum QemuEnd {
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
    pub(super) fn of(status: ExitStatus, console: &str, level_log: &str) -> Self {
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

/// The files a level's QEMU writes, in the run folder.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LevelFiles {
    /// The serial console.
    pub console: PathBuf,
    /// QEMU's own stdout and stderr.
    pub qemu_log: PathBuf,
    /// The level log port: boot steps, then the runtime's stderr.
    pub level_log: PathBuf,
    /// QEMU's human monitor socket (`--keep-failed`), removed when QEMU is killed.
    pub monitor: Option<PathBuf>,
}

/// A running QEMU process of a level; killed when dropped.
#[derive(Debug)]
pub struct Qemu {
    child: Child,
    files: LevelFiles,
    status: Option<ExitStatus>,
    /// QEMU's end of the relay socket: its descriptor number in QEMU and its inode.
    relay_end: (i32, u64),
    /// Where this QEMU's writing begins in its console, level log and own log:
    /// past the end of an earlier copy's, for one restored from a snapshot.
    from: Offsets,
}

/// Byte offsets into a level's console, level log and QEMU log.
#[derive(Debug, Clone, Copy, Default)]
struct Offsets {
    console: u64,
    level_log: u64,
    qemu_log: u64,
}

impl Qemu {
    /// Starts QEMU, which inherits `guest_end` of the relay socket, `qmp_end` of
    /// its monitor's and the `incoming` state to restore under the same descriptor
    /// numbers (the argv names them).
    pub fn spawn(
        argv: &[String],
        files: LevelFiles,
        guest_end: std::os::unix::net::UnixStream,
        qmp_end: Option<std::os::unix::net::UnixStream>,
        incoming: Option<std::fs::File>,
    ) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        // A QEMU restored from a snapshot writes on after the one that booted;
        // what it says starts there.
        let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        let from = if incoming.is_some() {
            Offsets {
                console: size(&files.console),
                level_log: size(&files.level_log),
                qemu_log: size(&files.qemu_log),
            }
        } else {
            Offsets::default()
        };
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(incoming.is_some())
            .truncate(incoming.is_none())
            .open(&files.qemu_log)?;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(stderr.try_clone()?)
            .stderr(stderr);
        process::isolate(&mut cmd, process::Environment::Inherit);
        let fd = guest_end.as_raw_fd();
        let qmp_fd = qmp_end.as_ref().map(AsRawFd::as_raw_fd);
        let incoming_fd = incoming.as_ref().map(AsRawFd::as_raw_fd);
        // SAFETY: the closure only calls fcntl(2), which is async-signal-safe;
        // `guest_end`, `qmp_end` and `incoming` stay open until the spawn returned.
        unsafe {
            cmd.pre_exec(move || {
                // Only this child's copies lose close-on-exec: QEMU keeps them.
                for fd in std::iter::once(fd).chain(qmp_fd).chain(incoming_fd) {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let inode = std::fs::File::from(std::os::fd::OwnedFd::from(guest_end.try_clone()?))
            .metadata()?
            .ino();
        let child = process::spawn_from_lasting_thread(cmd)?;
        // Only QEMU holds the guest end now: when it exits, the relay sees the end.
        drop(guest_end);
        drop(qmp_end);
        drop(incoming);
        Ok(Self {
            child,
            files,
            status: None,
            relay_end: (fd, inode),
            from,
        })
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its human monitor socket, when it has one.
    pub fn monitor_path(&self) -> Option<&Path> {
        self.files.monitor.as_deref()
    }

    /// The console file.
    pub fn console_path(&self) -> &Path {
        &self.files.console
    }

    /// The level log file (boot steps, then the runtime's stderr).
    pub fn level_log_path(&self) -> &Path {
        &self.files.level_log
    }

    /// QEMU's own log file.
    pub fn qemu_log_path(&self) -> &Path {
        &self.files.qemu_log
    }

    /// Everything on the console so far (of this QEMU: a restored one's starts
    /// where the copy before it ended).
    pub fn console(&self) -> String {
        read_lossy(&self.files.console, self.from.console)
    }

    /// Everything in the level log so far (of this QEMU).
    pub fn level_log(&self) -> String {
        read_lossy(&self.files.level_log, self.from.level_log)
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

    pub(super) fn log_tail(&self) -> String {
        read_lossy(&self.files.qemu_log, self.from.qemu_log)
    }

    /// What QEMU itself said, as a suffix for error messages.
    pub(super) fn log_summary(&self) -> String {
        let log = self.log_tail();
        let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.is_empty() {
            return String::new();
        }
        let last = &lines[lines.len().saturating_sub(3)..];
        format!("; QEMU said: {}", last.join(" | "))
    }

    /// How QEMU ended, once it has.
    pub(super) fn end(&mut self) -> Option<QemuEnd> {
        let status = self.exited()?;
        Some(QemuEnd::of(status, &self.console(), &self.level_log()))
    }

    /// The exit status, once QEMU has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none()
            && let Ok(Some(status)) = self.child.try_wait()
        {
            process::untrack(self.child.id());
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
                process::status_words(status),
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
        process::kill_group(pid);
        let _ = self.child.kill();
        self.status = self.child.wait().ok();
        process::untrack(pid);
        if let Some(socket) = &self.files.monitor {
            let _ = std::fs::remove_file(socket);
        }
    }
}

fn read_lossy(path: &Path, from: u64) -> String {
    use std::io::Seek;
    let mut bytes = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path)
        && f.seek(std::io::SeekFrom::Start(from)).is_ok()
    {
        let _ = f.read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_keep_the_last_lines() {
        let text: String = (0..40).map(|i| format!("line {i}\r\n")).collect();
        let t = tail(&text);
        assert!(t.starts_with("    | line 25"), "{t}");
        assert!(t.ends_with("    | line 39"), "{t}");
        assert_eq!(tail(""), "    (nothing on the console)");
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
