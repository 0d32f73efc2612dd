//! The `qmp` interface: QMP commands and events of the QEMU that runs a level
//! this level booted (qemu backend).
//!
//! Behind `--grant qmp` (every command) or `--grant qmp=CMD,...`. Arguments
//! are parsed as JSON here and never spliced into text; replies are bounded by
//! the client's line limit and the instance's memory.

use std::time::Duration;

use wasmtime::component::Resource;

use super::HostState;
use super::bindings::matryoshka::test::qmp::Host;
use super::bindings::matryoshka::test::types::{Error as WitError, ErrorKind};
use super::nest::GuestHandle;
use std::sync::Arc;

use crate::level::vm::monitor::QmpPort;
use crate::level::vm::qmp::QmpError;

/// Wait for a reply when the component gives none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait a component may ask for.
const MAX_WAIT: Duration = Duration::from_secs(3600);
/// Largest arguments accepted, bytes of JSON.
const MAX_ARGUMENTS: usize = 1 << 20;

impl Host for HostState {
    async fn execute(
        &mut self,
        level: Resource<GuestHandle>,
        command: String,
        arguments: Option<String>,
        timeout_ms: Option<u64>,
    ) -> wasmtime::Result<Result<String, WitError>> {
        if !self.ctx.grants.qmp.allows(&command) {
            let how = if self.ctx.grants.qmp.any() {
                format!("add it to the granted commands with --grant qmp={command}")
            } else {
                "add --grant qmp (every command) or --grant qmp=CMD[,CMD...]".to_string()
            };
            return Ok(Err(self.error(
                ErrorKind::Denied,
                format!(
                    "the QMP command `{command}` is not granted at {}; {how}",
                    self.ctx.level.path
                ),
            )));
        }
        let arguments = match arguments.as_deref().map(parse_arguments).transpose() {
            Ok(a) => a,
            Err(m) => return Ok(Err(self.error(ErrorKind::InvalidArgument, m))),
        };
        let (qmp, path) = match self.monitor_of(&level)? {
            Ok(m) => m,
            Err(e) => return Ok(Err(e)),
        };
        let deadline = timeout_ms
            .map_or(DEFAULT_TIMEOUT, Duration::from_millis)
            .min(MAX_WAIT);
        let reply = qmp.execute(&command, arguments, deadline).await;
        Ok(reply
            .map(|v| v.to_string())
            .map_err(|e| self.qmp_error(&path, &format!("`{command}`"), e)))
    }

    async fn wait_event(
        &mut self,
        level: Resource<GuestHandle>,
        name: String,
        timeout_ms: u64,
    ) -> wasmtime::Result<Result<String, WitError>> {
        if !self.ctx.grants.qmp.any() {
            return Ok(Err(self.error(
                ErrorKind::Denied,
                format!(
                    "QMP is not granted at {}; add --grant qmp (every command) or \
                     --grant qmp=CMD[,CMD...]",
                    self.ctx.level.path
                ),
            )));
        }
        let (qmp, path) = match self.monitor_of(&level)? {
            Ok(m) => m,
            Err(e) => return Ok(Err(e)),
        };
        let wait = Duration::from_millis(timeout_ms).min(MAX_WAIT);
        let Some(event) = qmp.wait_event(&name, wait).await else {
            return Ok(Err(self.error(
                ErrorKind::Unsupported,
                format!(
                    "{path} runs as a libvirt domain: libvirt owns its QMP monitor, and its events \
                     do not reach the runtime (qmp.execute works there; wait with a query)",
                ),
            )));
        };
        Ok(event
            .map(|v| v.to_string())
            .map_err(|e| self.qmp_error(&path, &format!("the event {name}"), e)))
    }
}

impl HostState {
    /// The QMP monitor of the level behind `level`, and that level's path.
    fn monitor_of(
        &self,
        level: &Resource<GuestHandle>,
    ) -> wasmtime::Result<Result<(Arc<QmpPort>, String), WitError>> {
        let conn = self.table.get(level)?.connection();
        let path = conn.info().path.clone();
        Ok(match conn.qmp() {
            Some(qmp) => Ok((qmp, path)),
            None => Err(self.error(
                ErrorKind::Unsupported,
                format!(
                    "{path} has no QMP monitor here: only VM levels this level booted have one"
                ),
            )),
        })
    }

    fn qmp_error(&self, path: &str, what: &str, e: QmpError) -> WitError {
        let (kind, message) = match e {
            QmpError::Qemu { class, desc } => (
                ErrorKind::InvalidArgument,
                format!("QEMU of {path} refused {what}: {class}: {desc}"),
            ),
            QmpError::Timeout(m) => (
                ErrorKind::Timeout,
                format!("QEMU of {path} did not answer {what} in time: {m}"),
            ),
            QmpError::Closed => (
                ErrorKind::LevelLost,
                format!("QEMU of {path} closed its QMP monitor (it exited)"),
            ),
            QmpError::Io(m) | QmpError::Protocol(m) => {
                (ErrorKind::Io, format!("QMP of {path}, {what}: {m}"))
            }
        };
        self.error(kind, message)
    }
}

/// Command arguments: a JSON object within [`MAX_ARGUMENTS`].
fn parse_arguments(text: &str) -> Result<serde_json::Value, String> {
    if text.len() > MAX_ARGUMENTS {
        return Err(format!(
            "QMP arguments of {} bytes; at most {MAX_ARGUMENTS} are taken",
            text.len()
        ));
    }
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v @ serde_json::Value::Object(_)) => Ok(v),
        Ok(_) => Err("QMP arguments must be a JSON object".into()),
        Err(e) => Err(format!("QMP arguments are not JSON: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_must_be_a_bounded_json_object() {
        assert!(parse_arguments(r#"{"id":"disk1"}"#).is_ok());
        assert!(parse_arguments("[1]").is_err());
        assert!(parse_arguments("{").is_err());
        let big = format!(r#"{{"x":"{}"}}"#, "a".repeat(MAX_ARGUMENTS));
        assert!(parse_arguments(&big).is_err());
    }
}
