//! The QMP monitor of a level's QEMU, as the level that booted it holds it.
//!
//! With the qemu backend, QEMU gets one end of a socket pair as its monitor
//! (`-chardev socket,fd=N`): no socket file another process could connect to, no
//! path length limit. The client ([`Qmp`]) is made on first use: until then
//! QEMU's greeting and the events it sends wait in the socket. With the libvirt
//! backend, libvirt owns the monitor: commands go through
//! `virDomainQemuMonitorCommand`, and events are not available.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use super::qmp::{Qmp, QmpError};
use crate::libvirt::Domain;

/// How long QEMU has to greet, once asked.
const GREETING_DEADLINE: Duration = Duration::from_secs(10);

/// A level's QMP monitor.
pub struct QmpPort {
    inner: Inner,
}

enum Inner {
    /// This level's end of QEMU's monitor socket, connected on first use.
    Socket {
        stream: Mutex<Option<std::os::unix::net::UnixStream>>,
        client: tokio::sync::OnceCell<Arc<Qmp>>,
    },
    /// The libvirt domain running the level.
    Libvirt(Arc<Domain>),
}

impl QmpPort {
    /// The monitor behind `stream`, this level's end of QEMU's monitor socket.
    pub fn new(stream: std::os::unix::net::UnixStream) -> Self {
        Self {
            inner: Inner::Socket {
                stream: Mutex::new(Some(stream)),
                client: tokio::sync::OnceCell::new(),
            },
        }
    }

    /// The monitor of the QEMU libvirt runs `domain` with.
    pub fn libvirt(domain: Arc<Domain>) -> Self {
        Self {
            inner: Inner::Libvirt(domain),
        }
    }

    /// Runs one QMP command and returns its `return` value.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
        deadline: Duration,
    ) -> Result<Value, QmpError> {
        match &self.inner {
            Inner::Socket { .. } => {
                self.client()
                    .await?
                    .execute(command, arguments, deadline)
                    .await
            }
            Inner::Libvirt(domain) => {
                let mut request = json!({ "execute": command });
                if let Some(arguments) = arguments {
                    request["arguments"] = arguments;
                }
                let domain = domain.clone();
                let call = tokio::task::spawn_blocking(move || {
                    domain.qemu_monitor_command(&request.to_string(), false)
                });
                let reply = tokio::time::timeout(deadline, call)
                    .await
                    .map_err(|_| QmpError::Timeout(format!("libvirt's answer to {command}")))?
                    .map_err(|e| QmpError::Io(e.to_string()))?
                    .map_err(|e| QmpError::Io(e.to_string()))?;
                reply_value(&reply)
            }
        }
    }

    /// Takes the first event named `name`, waiting until `deadline`; `None` when
    /// this monitor has no events (a level libvirt runs).
    pub async fn wait_event(
        &self,
        name: &str,
        deadline: Duration,
    ) -> Option<Result<Value, QmpError>> {
        match &self.inner {
            Inner::Socket { .. } => Some(match self.client().await {
                Ok(qmp) => qmp.wait_event(name, deadline).await,
                Err(e) => Err(e),
            }),
            Inner::Libvirt(_) => None,
        }
    }

    /// The client, after QEMU's greeting and capabilities negotiation.
    async fn client(&self) -> Result<Arc<Qmp>, QmpError> {
        let Inner::Socket { stream, client } = &self.inner else {
            return Err(QmpError::Protocol("not a QMP socket".into()));
        };
        client
            .get_or_try_init(|| async {
                let stream = stream
                    .lock()
                    .map_err(|_| QmpError::Io("the QMP monitor's lock is poisoned".into()))?
                    .take()
                    .ok_or_else(|| {
                        QmpError::Io("the QMP monitor could not be opened before".into())
                    })?;
                let stream = stream
                    .set_nonblocking(true)
                    .and_then(|()| tokio::net::UnixStream::from_std(stream))
                    .map_err(|e| QmpError::Io(format!("cannot use the QMP socket: {e}")))?;
                Ok(Arc::new(Qmp::from_stream(stream, GREETING_DEADLINE).await?))
            })
            .await
            .cloned()
    }
}

/// QEMU's reply as libvirt passes it on: `{"return": …}` or `{"error": …}`.
fn reply_value(reply: &str) -> Result<Value, QmpError> {
    let value: Value = serde_json::from_str(reply)
        .map_err(|e| QmpError::Protocol(format!("libvirt passed a reply that is not JSON: {e}")))?;
    if let Some(error) = value.get("error") {
        let text = |k: &str| {
            error
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        return Err(QmpError::Qemu {
            class: text("class"),
            desc: text("desc"),
        });
    }
    value
        .get("return")
        .cloned()
        .ok_or_else(|| QmpError::Protocol(format!("a reply without `return`: {reply}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirt_replies_become_values_or_qemu_errors() {
        assert_eq!(
            reply_value(r#"{"return":{"status":"running"},"id":"libvirt-414"}"#),
            Ok(json!({"status": "running"}))
        );
        assert_eq!(
            reply_value(
                r#"{"id":"libvirt-9","error":{"class":"CommandNotFound","desc":"The command nope has not been found"}}"#
            ),
            Err(QmpError::Qemu {
                class: "CommandNotFound".into(),
                desc: "The command nope has not been found".into()
            })
        );
        assert!(reply_value("not json").is_err());
    }
}
