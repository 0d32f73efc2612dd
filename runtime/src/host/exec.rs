//! The `host` interface: facts about this level, and commands run here.

use std::process::Stdio;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::HostState;
use super::bindings::matryoshka::test::host::{Host, Output};
use super::bindings::matryoshka::test::types::{Error as WitError, ErrorKind};
use crate::process;

impl Host for HostState {
    fn hostname(&mut self) -> wasmtime::Result<String> {
        Ok(self.ctx.level.hostname.clone())
    }

    fn arch(&mut self) -> wasmtime::Result<String> {
        Ok(self.ctx.level.arch.clone())
    }

    fn level(&mut self) -> wasmtime::Result<u32> {
        Ok(self.ctx.level.depth)
    }

    fn level_path(&mut self) -> wasmtime::Result<String> {
        Ok(self.ctx.level.path.clone())
    }

    fn component_sha256(&mut self) -> wasmtime::Result<String> {
        Ok(self.component.sha256.clone())
    }

    async fn exec(
        &mut self,
        argv: Vec<String>,
        stdin: Option<Vec<u8>>,
    ) -> wasmtime::Result<Result<Output, WitError>> {
        let level_path = match self.check_exec(&argv) {
            Ok(()) => self.ctx.level.path.clone(),
            Err(e) => return Ok(Err(e)),
        };
        let result =
            run_command(argv, stdin, self.ctx.limits.exec_output_bytes, &self.groups).await;
        Ok(result.map_err(|(kind, message)| WitError {
            kind,
            message: format!("{message} (at {level_path})"),
            level_path,
        }))
    }
}

impl HostState {
    /// Refuses an empty argv or a program that was not granted.
    fn check_exec(&self, argv: &[String]) -> Result<(), WitError> {
        let Some(program) = argv.first() else {
            return Err(self.error(
                ErrorKind::InvalidArgument,
                "exec needs a non-empty argv".into(),
            ));
        };
        if !self.ctx.grants.allows_exec(program) {
            return Err(self.error(
                ErrorKind::Denied,
                format!(
                    "exec of `{program}` is not granted at {}; add --grant exec={program} \
                     (or exec = [\"{program}\"] under [grants] in matryoshka.toml)",
                    self.ctx.level.path
                ),
            ));
        }
        Ok(())
    }
}

/// Runs a granted command with a cleared environment ([`process::EXEC_ENV`]) in a
/// process group of its own, added to `groups`: whatever it leaves running is
/// killed with the instance. Its output is bounded, and it is killed if the call
/// is dropped.
async fn run_command(
    argv: Vec<String>,
    stdin: Option<Vec<u8>>,
    limit: usize,
    groups: &process::Groups,
) -> Result<Output, (ErrorKind, String)> {
    let program = &argv[0];
    let mut cmd = std::process::Command::new(program);
    cmd.args(&argv[1..])
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    process::isolate(&mut cmd, process::Environment::Exec);
    let mut cmd = Command::from(cmd);
    cmd.kill_on_drop(true);
    let spawned = cmd.spawn();
    if let Ok(child) = &spawned
        && let Some(pgid) = child.id()
    {
        groups.add(pgid);
    }
    let mut child = spawned.map_err(|e| {
        let kind = if e.kind() == std::io::ErrorKind::NotFound {
            ErrorKind::NotFound
        } else {
            ErrorKind::Io
        };
        (kind, format!("cannot start `{program}`: {e}"))
    })?;
    let stdin_task = match (stdin, child.stdin.take()) {
        (Some(bytes), Some(mut pipe)) => Some(tokio::spawn(async move {
            // A command that exits without reading its input is not an error.
            let _ = pipe.write_all(&bytes).await;
        })),
        _ => None,
    };
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let (out, err, status) = tokio::join!(
        read_bounded(stdout, limit),
        read_bounded(stderr, limit),
        child.wait()
    );
    if let Some(task) = stdin_task {
        task.abort();
    }
    let io = |e: std::io::Error| (ErrorKind::Io, format!("`{program}`: {e}"));
    let status = status.map_err(io)?;
    Ok(Output {
        status: status.code(),
        stdout: out.map_err(io)?,
        stderr: err.map_err(io)?,
    })
}
async fn read_bounded(
    pipe: Option<impl AsyncRead + Unpin>,
    limit: usize,
) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let Some(pipe) = pipe else { return Ok(buf) };
    let mut pipe = pipe.take(limit as u64 + 1);
    pipe.read_to_end(&mut buf).await?;
    if buf.len() > limit {
        return Err(std::io::Error::other(format!(
            "produced more than {limit} bytes of output"
        )));
    }
    Ok(buf)
}
