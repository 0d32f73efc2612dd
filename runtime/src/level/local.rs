//! A child runtime process on this machine, talking over its stdin and stdout.
//!
//! By default the child is this same binary. `MATRYOSHKA_LOCAL_SERVE` replaces
//! the command (split on whitespace), e.g. to run the child under a debugger or
//! `strace`; it is read from the runtime's environment, never from a component.

use std::process::Stdio;

use tokio::process::{Child, Command};

use super::replicate::{own_exe, verbosity_flag};
use super::transport::{StderrTail, Transport, TransportGuard, for_each_line};
use crate::process;
use crate::wire::{LevelSetup, RemoteError, WireErrorKind};

/// Starts `matryoshka serve --stdio` as a child process.
pub fn spawn(setup: &LevelSetup) -> Result<Transport, RemoteError> {
    let err = |message: String| RemoteError {
        kind: WireErrorKind::Io,
        message,
        level_path: setup.path.clone(),
    };
    let mut cmd = match std::env::var("MATRYOSHKA_LOCAL_SERVE") {
        Ok(line) if !line.trim().is_empty() => {
            let mut words = line.split_whitespace();
            let mut cmd = std::process::Command::new(words.next().unwrap_or_default());
            cmd.args(words);
            cmd
        }
        _ => {
            let exe = own_exe()
                .map_err(|e| err(format!("cannot find this runtime's own binary: {e}")))?;
            let mut cmd = std::process::Command::new(exe);
            if let Some(flag) = verbosity_flag().split_whitespace().next() {
                cmd.arg(flag);
            }
            cmd.args(["serve", "--stdio"]);
            cmd
        }
    };
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    process::isolate(&mut cmd, process::Environment::Inherit);
    let mut cmd = Command::from(cmd);
    cmd.kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| {
        err(format!(
            "cannot start a local runtime for {}: {e}",
            setup.path
        ))
    })?;
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(err("the local runtime has no stdio pipes".into()));
    };
    // The child's own diagnostics: shown with -v, kept out of the frame stream.
    let path = setup.path.clone();
    let tail = StderrTail::default();
    let tail_writer = tail.clone();
    tokio::spawn(for_each_line(stderr, move |line| {
        tail_writer.push(&path, line)
    }));
    Ok(Transport {
        reader: Box::new(stdout),
        writer: Box::new(stdin),
        guard: Box::new(LocalGuard {
            group: child.id(),
            child,
            tail,
        }),
        ssh_command: None,
        vm: None,
        qmp: None,
        heartbeat_grace: None,
    })
}

struct LocalGuard {
    child: Child,
    group: Option<u32>,
    tail: StderrTail,
}

impl Drop for LocalGuard {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl TransportGuard for LocalGuard {
    fn shutdown(&mut self) {
        // The child leads its own process group: take the commands it started
        // with it, even though SIGKILL skips its destructors.
        // The group id is the pid at spawn time: the leader may already be reaped
        // while the commands it started still run.
        if let Some(pgid) = self.group {
            process::kill_group(pgid);
        }
        let _ = self.child.start_kill();
    }

    fn describe_exit(&mut self) -> String {
        // A child whose stream just closed may need a moment to be reapable.
        let mut exit = None;
        for _ in 0..20 {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    exit = Some(format!("its runtime {}", process::ended(status)));
                    break;
                }
                Ok(None) => std::thread::sleep(std::time::Duration::from_millis(10)),
                Err(_) => break,
            }
        }
        self.tail.explain(exit.as_deref())
    }
}
