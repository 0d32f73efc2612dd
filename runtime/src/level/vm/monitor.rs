//! The QMP monitor of a level's QEMU, as the level that booted it holds it.
//!
//! QEMU gets one end of a socket pair as its monitor (`-chardev socket,fd=N`):
//! no socket file another process could connect to, no path length limit. The
//! client ([`Qmp`]) is made on first use: until then QEMU's greeting and the
//! events it sends wait in the socket.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::qmp::Qmp;

/// How long QEMU has to greet, once asked.
const GREETING_DEADLINE: Duration = Duration::from_secs(10);

/// A level's QMP monitor, connected on first use.
pub struct QmpPort {
    stream: Mutex<Option<std::os::unix::net::UnixStream>>,
    client: tokio::sync::OnceCell<Arc<Qmp>>,
}

impl QmpPort {
    /// The monitor behind `stream`, this level's end of QEMU's monitor socket.
    pub fn new(stream: std::os::unix::net::UnixStream) -> Self {
        Self {
            stream: Mutex::new(Some(stream)),
            client: tokio::sync::OnceCell::new(),
        }
    }

    /// The client, after QEMU's greeting and capabilities negotiation.
    pub async fn client(&self) -> Result<Arc<Qmp>, String> {
        self.client
            .get_or_try_init(|| async {
                let stream = self
                    .stream
                    .lock()
                    .map_err(|_| "the QMP monitor's lock is poisoned".to_string())?
                    .take()
                    .ok_or_else(|| "the QMP monitor could not be opened before".to_string())?;
                let stream = stream
                    .set_nonblocking(true)
                    .and_then(|()| tokio::net::UnixStream::from_std(stream))
                    .map_err(|e| format!("cannot use the QMP socket: {e}"))?;
                let qmp = Qmp::from_stream(stream, GREETING_DEADLINE)
                    .await
                    .map_err(|e| format!("QEMU's QMP monitor did not answer: {e}"))?;
                Ok(Arc::new(qmp))
            })
            .await
            .cloned()
    }
}
