//! SSH levels: copy the runtime there (once per hash), then run `serve --stdio`
//! in an exec channel.
//!
//! Host keys are pinned: the server's key must match a `known_hosts` entry the
//! run was given, never learned on first use. Authentication uses the run's key.
//!
//! Self-replication, per hop:
//! 1. one exec channel becomes the cached runtime when it is there and its cache
//!    folder is safe (owned by the login user, writable by no one else), or else
//!    probes the target: `uname -m`, the cache folder (made 0700), whether it
//!    has `zstd` and `openssl`, and the runtimes already there (`matryoshka-<sha256>`). A
//!    cache folder others can write to fails the hop: a runtime copied into it
//!    could be swapped before it starts;
//! 2. the runtime is streamed zstd-compressed (gzip where the target has no
//!    `zstd`) into a temporary file, then unpacked into another and hashed, which
//!    is renamed into place only when its sha256 is the one it was sent as (an
//!    interrupted or damaged upload leaves nothing behind); the compressed copy
//!    is kept beside it so the next hop sends it without compressing again. When
//!    the target is of this runtime's architecture the probe's own exec goes on
//!    to take it (it waits on its stdin while this side reads the report); for
//!    another architecture, a second channel does;
//! 3. another channel runs `<cache>/bin/matryoshka-<sha256> serve --stdio`.

mod known_hosts;
mod script;
mod session;

use std::sync::Arc;
use std::time::Duration;

pub use known_hosts::{SshTarget, is_pinned};

use super::replicate::{image_for, verbosity_flag};
use super::transport::Transport;
use crate::config::SshSettings;
use crate::wire::{LevelSetup, RemoteError, WireErrorKind};
use script::{PROBE_MARK, Probe, RECEIVING_MARK};
use session::{FirstAnswer, connect, exec, first_exec, start_channel};

/// How long an SSH level has to accept the connection and authenticate.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an SSH server may leave keepalives unanswered before the session is dropped.
const PATIENCE: Duration = Duration::from_secs(15);
/// How long the probe of a target may take.
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// How long copying the runtime to a target may take.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// Connects with `ssh`'s key and pinned host keys, copies the runtime if needed,
/// and starts it serving.
pub async fn open(
    spec: &str,
    setup: &LevelSetup,
    ssh: &SshSettings,
) -> Result<Transport, RemoteError> {
    let err = |kind: WireErrorKind, message: String| RemoteError {
        kind,
        message: format!("{message} (reaching {} at ssh://{spec})", setup.path),
        level_path: setup.path.clone(),
    };
    let target = SshTarget::parse(spec).map_err(|m| err(WireErrorKind::InvalidArgument, m))?;
    let started = std::time::Instant::now();
    let (handle, quick_ack) =
        tokio::time::timeout(CONNECT_TIMEOUT, connect(&target, ssh, PATIENCE))
            .await
            .map_err(|_| {
                err(
                    WireErrorKind::Timeout,
                    format!("no SSH session within {} s", CONNECT_TIMEOUT.as_secs()),
                )
            })?
            .map_err(|m| err(WireErrorKind::Io, m))?;
    let handle = Arc::new(handle);
    let session_ms = started.elapsed().as_millis();

    let cache = ssh
        .remote_cache_dir
        .as_deref()
        .map(|d| remote_path(&d.replace("{depth}", &setup.depth.to_string())))
        .unwrap_or_else(|| "\"$HOME/.cache/matryoshka\"".into());
    // Warm path, one exec: if this runtime is already cached there (same arch, same
    // hash), the script becomes it and speaks the protocol at once. Otherwise it
    // prints a probe report: arch, cache folder, the runtimes it has.
    let own = tokio::task::spawn_blocking(|| image_for(std::env::consts::ARCH))
        .await
        .map_err(|e| err(WireErrorKind::Internal, e.to_string()))?
        .map_err(|m| err(WireErrorKind::Unsupported, m))?;
    let first = script::warm_or_probe(
        &cache,
        &own.sha256,
        std::env::consts::ARCH,
        verbosity_flag(),
    );
    let answer = tokio::time::timeout(
        EXEC_TIMEOUT,
        first_exec(&handle, &first, &setup.path, PROBE_MARK, RECEIVING_MARK),
    )
    .await
    .map_err(|_| {
        err(
            WireErrorKind::Timeout,
            format!("no answer within {} s", EXEC_TIMEOUT.as_secs()),
        )
    })?
    .map_err(|m| err(WireErrorKind::Io, m))?;
    let (report, probe_failed, receiver) = match answer {
        FirstAnswer::Serving(chan) => {
            tracing::info!(level = %setup.path, "ssh://{spec}: cached runtime started after {} ms", started.elapsed().as_millis());
            quick_ack.store(false, std::sync::atomic::Ordering::Relaxed);
            return Ok(chan.into_transport(handle, ssh_command(ssh, &target)));
        }
        FirstAnswer::Probed {
            report,
            ended,
            receiver,
        } => (report, ended, receiver),
    };
    let (arch, dir, tools, present) = match script::parse_probe(&report) {
        Probe::Ready {
            arch,
            dir,
            tools,
            present,
        } => (arch, dir, tools, present),
        Probe::Unsafe(folders) => {
            return Err(err(
                WireErrorKind::Io,
                format!(
                    "refusing the runtime cache there, another user could replace the runtime \
                     in it: {}",
                    folders.join("; ")
                ),
            ));
        }
        Probe::Garbled(what) => {
            return Err(err(
                WireErrorKind::Unsupported,
                format!("probing the target failed ({what}){probe_failed}"),
            ));
        }
    };
    let image = {
        let arch = arch.clone();
        tokio::task::spawn_blocking(move || image_for(&arch))
            .await
            .map_err(|e| err(WireErrorKind::Internal, e.to_string()))?
            .map_err(|m| err(WireErrorKind::Unsupported, m))?
    };
    let name = format!("matryoshka-{}", image.sha256);
    let remote_bin = format!("{dir}/bin/{name}");
    // The first exec takes the runtime it was written for (this architecture's)
    // when it says so; any other goes through an upload exec of its own, and the
    // first exec's stdin is closed (it keeps nothing).
    let receiver = match receiver {
        Some(receiver) if image.sha256 != own.sha256 => {
            receiver.hang_up().await;
            None
        }
        receiver => receiver,
    };
    let codec = receiver
        .as_ref()
        .and_then(|_| script::receiving(&report))
        .unwrap_or(tools.codec);
    if receiver.is_some() || !present.contains(&name) {
        let packed = {
            let image = image.clone();
            tokio::task::spawn_blocking(move || image.compressed(codec))
                .await
                .map_err(|e| err(WireErrorKind::Internal, e.to_string()))?
                .map_err(|m| err(WireErrorKind::Io, m))?
        };
        let compressed_ms = started.elapsed().as_millis();
        tracing::info!(level = %setup.path, "copying the runtime ({} bytes, {codec:?}, ready at {compressed_ms} ms) to {remote_bin}{}", packed.len(), if receiver.is_some() { " (the probe's exec takes it)" } else { "" });
        let copied = async {
            match receiver {
                Some(receiver) => receiver.feed(packed).await,
                None => {
                    let upload = script::upload(&remote_bin, &image.sha256, tools);
                    exec(&handle, &upload, Some(packed)).await
                }
            }
        };
        let (status, stdout, stderr) = tokio::time::timeout(UPLOAD_TIMEOUT, copied)
            .await
            .map_err(|_| {
                err(
                    WireErrorKind::Timeout,
                    format!(
                        "copying the runtime took over {} s",
                        UPLOAD_TIMEOUT.as_secs()
                    ),
                )
            })?
            .map_err(|m| err(WireErrorKind::Io, m))?;
        if status != Some(0) {
            return Err(err(
                WireErrorKind::Io,
                script::upload_failure(
                    status,
                    &stdout,
                    &stderr,
                    &remote_bin,
                    &image.sha256,
                    (&image.path().display().to_string(), codec),
                ),
            ));
        }
    }
    tracing::info!(
        level = %setup.path,
        "ssh://{spec}: session {session_ms} ms, probe and copy done at {} ms",
        started.elapsed().as_millis()
    );
    let serve = format!(
        "exec {}{} serve --stdio --cache-dir {}",
        sh_quote(&remote_bin),
        verbosity_flag(),
        sh_quote(&dir)
    );
    let chan = start_channel(&handle, &serve, &setup.path)
        .await
        .map_err(|m| err(WireErrorKind::Io, format!("cannot start the runtime: {m}")))?;
    quick_ack.store(false, std::sync::atomic::Ordering::Relaxed);
    Ok(chan.into_transport(handle, ssh_command(ssh, &target)))
}

/// Quotes a remote path for a POSIX shell, keeping a leading `~/` meaning `$HOME/`.
fn remote_path(path: &str) -> String {
    match path.strip_prefix("~/") {
        Some(rest) => format!("\"$HOME\"/{}", sh_quote(rest)),
        None => sh_quote(path),
    }
}

/// Quotes `s` for a POSIX shell.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn ssh_command(ssh: &SshSettings, target: &SshTarget) -> Option<String> {
    Some(match &ssh.key_path {
        Some(key) => format!(
            "ssh -i {} -p {} {}@{}",
            sh_quote(key),
            target.port,
            target.user,
            target.host
        ),
        None => format!("ssh -p {} {}@{}", target.port, target.user, target.host),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }
}
