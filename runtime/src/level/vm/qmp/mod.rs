//! An async client for QEMU's QMP (QEMU Machine Protocol) control socket.
//!
//! [`Qmp::connect`] opens the unix socket given to QEMU as
//! `-chardev socket,id=qmp,path=PATH,server=on,wait=off -mon chardev=qmp,mode=control`,
//! reads QEMU's greeting and leaves capabilities negotiation with `qmp_capabilities`.
//! After that one reader task owns the socket's read half: it reads newline-delimited
//! JSON, hands each reply to the caller waiting for its `id`, and queues events for
//! [`Qmp::wait_event`]. One writer task owns the write half, so a caller that gives up
//! (a deadline, or its future dropped) never leaves half a command on the socket.
//! Both tasks end when the [`Qmp`] is dropped.
//!
//! What QEMU sends is bounded, so that nothing the guest under test does can make this
//! runtime's memory grow without limit: a line is at most [`MAX_LINE`] bytes (a longer
//! one closes the connection with [`QmpError::Protocol`]), and at most
//! [`MAX_QUEUED_EVENTS`] events, of at most [`MAX_QUEUED_EVENT_BYTES`] bytes together,
//! wait to be taken (the oldest is dropped first).

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;

mod lines;

use lines::{parse_greeting, qemu_error, read_line, snippet};

/// The longest line accepted from QEMU, in bytes, not counting its newline.
pub const MAX_LINE: usize = 16 * 1024 * 1024;

/// The most events kept for [`Qmp::wait_event`]; past it the oldest is dropped.
pub const MAX_QUEUED_EVENTS: usize = 1024;

/// The most bytes (as received) of events kept for [`Qmp::wait_event`] together;
/// past it the oldest are dropped, though the newest event is always kept.
pub const MAX_QUEUED_EVENT_BYTES: usize = 16 * 1024 * 1024;

/// How often [`Qmp::connect`] tries again while the socket is not there yet.
const CONNECT_RETRY: Duration = Duration::from_millis(20);

/// Commands queued for the writer task before callers wait for room.
const OUTGOING_QUEUE: usize = 64;

/// How much of a line an error message quotes.
const SNIPPET_CHARS: usize = 200;

/// A read buffer grown past this by one long line is given back after that line.
const KEPT_LINE_CAPACITY: usize = 64 * 1024;

/// Why a QMP call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be connected, read or written; the message names its path.
    #[error("QMP I/O: {0}")]
    Io(String),
    /// QEMU answered the command with an error (`{"error": {"class", "desc"}}`).
    #[error("QEMU refused the command: {class}: {desc}")]
    Qemu {
        /// QEMU's error class, e.g. `CommandNotFound` or `GenericError`.
        class: String,
        /// QEMU's description of the error.
        desc: String,
    },
    /// The deadline passed first; the message says what was awaited.
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// QEMU closed the socket (it exited).
    #[error("QEMU closed the QMP socket")]
    Closed,
    /// QEMU sent something that is not QMP; the connection is closed.
    #[error("QMP protocol error: {0}")]
    Protocol(String),
}

/// A connection to one QEMU's QMP socket.
///
/// Every method takes `&self`, so one `Qmp` (in an `Arc`) serves many tasks at once:
/// each command carries its own `id` and its caller gets the reply with that `id`,
/// whatever order QEMU answers in. Dropping it closes the socket and ends its tasks.
pub struct Qmp {
    /// State shared with the reader and writer tasks.
    shared: Arc<Shared>,
    /// Whole command lines for the writer task.
    outgoing: mpsc::Sender<Vec<u8>>,
    /// The next command's `id`.
    next_id: AtomicU64,
    /// QEMU's version from the greeting, `major.minor.micro`.
    version: String,
    /// The task that reads QMP lines.
    reader: JoinHandle<()>,
    /// The task that writes command lines.
    writer: JoinHandle<()>,
}

/// What the reader, the writer and the callers share.
struct Shared {
    /// The socket's path, as shown in messages.
    path: String,
    /// Pending replies, queued events, and whether the connection is over.
    state: Mutex<State>,
    /// Woken when an event is queued or the connection ends.
    events_changed: Notify,
}

/// The mutable part of [`Shared`].
#[derive(Default)]
struct State {
    /// Callers waiting for a reply, by the `id` of their command.
    pending: HashMap<u64, oneshot::Sender<Result<Value, QmpError>>>,
    /// Events received and not yet taken, oldest first.
    events: VecDeque<QueuedEvent>,
    /// The received size of the events in `events`, added up.
    event_bytes: usize,
    /// Whether dropping an event has been warned about.
    warned_dropped_event: bool,
    /// Why the connection ended, once it has: what every later call gets.
    closed: Option<QmpError>,
}

/// An event waiting in the queue.
struct QueuedEvent {
    /// Its `event` member.
    name: String,
    /// The whole event object.
    value: Value,
    /// The length of the line it came in.
    bytes: usize,
}

/// Removes a caller's pending entry when its `execute` ends, however it ends
/// (a reply, a deadline, or its future dropped).
struct PendingGuard<'a> {
    /// Where the entry is.
    shared: &'a Shared,
    /// The entry's command `id`.
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.id);
    }
}

impl Qmp {
    /// Connects to QEMU's QMP unix socket at `path`, reads the greeting, and negotiates
    /// `qmp_capabilities`, all within `deadline`.
    ///
    /// While the socket does not exist yet, or nothing listens on it (QEMU still
    /// starting), connecting is tried again until the deadline. The greeting must be
    /// `{"QMP": {"version": {"qemu": {"major", "minor", "micro"}}, ...}}`; anything else
    /// is a [`QmpError::Protocol`] quoting what came. QEMU serves one QMP client at a
    /// time: while another is connected the greeting does not come and this ends in
    /// [`QmpError::Timeout`].
    pub async fn connect(path: &Path, deadline: Duration) -> Result<Qmp, QmpError> {
        let until = deadline_from_now(deadline);
        let shown = path.display().to_string();
        let stream = connect_socket(path, &shown, until, deadline).await?;
        Self::negotiate(stream, shown, until, deadline).await
    }

    /// Like [`Qmp::connect`], over a stream connected already: this level's end
    /// of a socket pair whose other end QEMU got as its monitor (`-chardev
    /// socket,fd=N`).
    pub async fn from_stream(stream: UnixStream, deadline: Duration) -> Result<Qmp, QmpError> {
        let until = deadline_from_now(deadline);
        Self::negotiate(stream, "the QMP socket pair".to_string(), until, deadline).await
    }

    /// Reads the greeting on `stream` and negotiates capabilities.
    async fn negotiate(
        stream: UnixStream,
        shown: String,
        until: Instant,
        deadline: Duration,
    ) -> Result<Qmp, QmpError> {
        let (read, write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let mut line = Vec::new();
        match tokio::time::timeout_at(until, read_line(&mut reader, &mut line, &shown)).await {
            Err(_) => {
                return Err(QmpError::Timeout(format!(
                    "the QMP greeting on {shown} ({deadline:?})"
                )));
            }
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => return Err(QmpError::Closed),
            Ok(Err(e)) => return Err(e),
        }
        let version = parse_greeting(&line, &shown)?;
        tracing::debug!(socket = %shown, qemu = %version, "QMP greeting");

        let shared = Arc::new(Shared {
            path: shown,
            state: Mutex::new(State::default()),
            events_changed: Notify::new(),
        });
        let (outgoing, outgoing_rx) = mpsc::channel(OUTGOING_QUEUE);
        let writer = tokio::spawn(write_loop(write, outgoing_rx, Arc::clone(&shared)));
        let reader = tokio::spawn(read_loop(
            reader,
            line,
            Arc::clone(&shared),
            writer.abort_handle(),
        ));
        let qmp = Qmp {
            shared,
            outgoing,
            next_id: AtomicU64::new(1),
            version,
            reader,
            writer,
        };
        let left = until.saturating_duration_since(Instant::now());
        qmp.execute("qmp_capabilities", None, left).await?;
        Ok(qmp)
    }

    /// Runs one command and returns its `return` value.
    ///
    /// `arguments` is the command's JSON object of arguments, or `None`. The command is
    /// sent with a unique `id`, and the reply with that `id` is its answer: QEMU's
    /// `{"error": ...}` becomes [`QmpError::Qemu`]. Past `deadline` it gives
    /// [`QmpError::Timeout`] and forgets the command (a late reply is dropped); QEMU may
    /// still carry the command out. Dropping the future is safe: the command was either
    /// sent whole or not at all.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
        deadline: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut request = json!({ "execute": command, "id": id });
        if let (Some(arguments), Value::Object(fields)) = (arguments, &mut request) {
            fields.insert("arguments".to_string(), arguments);
        }
        let mut line = serde_json::to_vec(&request)
            .map_err(|e| QmpError::Protocol(format!("cannot encode {command}: {e}")))?;
        line.push(b'\n');

        let (reply_tx, reply_rx) = oneshot::channel();
        {
            let mut state = self.shared.lock();
            if let Some(reason) = &state.closed {
                return Err(reason.clone());
            }
            state.pending.insert(id, reply_tx);
        }
        let _pending = PendingGuard {
            shared: &self.shared,
            id,
        };
        tracing::trace!(socket = %self.shared.path, command, id, "QMP command");
        let exchange = async {
            if self.outgoing.send(line).await.is_err() {
                return Err(self.shared.closed_reason());
            }
            match reply_rx.await {
                Ok(reply) => reply,
                Err(_) => Err(self.shared.closed_reason()),
            }
        };
        match tokio::time::timeout(deadline, exchange).await {
            Ok(reply) => reply,
            Err(_) => Err(QmpError::Timeout(format!(
                "QEMU's reply to {command} on {} ({deadline:?})",
                self.shared.path
            ))),
        }
    }

    /// Takes the first event named `name` received since connecting and not taken yet,
    /// or waits for one until `deadline`; returns the whole event object
    /// (`{"event", "data", "timestamp"}`; QEMU leaves out `data` for events without).
    ///
    /// Events of other names stay queued. Queued events can still be taken after QEMU
    /// closed the socket (a `SHUTDOWN` just before it exits, for one); past them, a
    /// closed connection gives its error at once.
    pub async fn wait_event(&self, name: &str, deadline: Duration) -> Result<Value, QmpError> {
        let until = deadline_from_now(deadline);
        loop {
            let changed = self.shared.events_changed.notified();
            tokio::pin!(changed);
            // Registered before looking, so an event queued after the look still wakes us.
            changed.as_mut().enable();
            {
                let mut state = self.shared.lock();
                if let Some(at) = state.events.iter().position(|e| e.name == name)
                    && let Some(event) = state.events.remove(at)
                {
                    state.event_bytes -= event.bytes;
                    return Ok(event.value);
                }
                if let Some(reason) = &state.closed {
                    return Err(reason.clone());
                }
            }
            if tokio::time::timeout_at(until, changed).await.is_err() {
                return Err(QmpError::Timeout(format!(
                    "QMP event {name} on {} ({deadline:?})",
                    self.shared.path
                )));
            }
        }
    }

    /// QEMU's version from the greeting, `major.minor.micro`, e.g. `"7.2.19"`.
    pub fn qemu_version(&self) -> &str {
        &self.version
    }

    /// How many callers wait for a reply.
    #[cfg(test)]
    fn pending_len(&self) -> usize {
        self.shared.lock().pending.len()
    }

    /// How many events are queued, and their bytes together.
    #[cfg(test)]
    fn queued_events(&self) -> (usize, usize) {
        let state = self.shared.lock();
        (state.events.len(), state.event_bytes)
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("socket", &self.shared.path)
            .field("qemu", &self.version)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// The state, even if a thread panicked holding it (every change to it is whole).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why the connection ended; [`QmpError::Closed`] if it has not been said.
    fn closed_reason(&self) -> QmpError {
        self.lock().closed.clone().unwrap_or(QmpError::Closed)
    }

    /// Ends the connection for `reason`: every waiting and later caller gets it.
    fn close(&self, reason: QmpError) {
        let pending = {
            let mut state = self.lock();
            if state.closed.is_some() {
                return;
            }
            state.closed = Some(reason.clone());
            std::mem::take(&mut state.pending)
        };
        tracing::debug!(socket = %self.path, %reason, "QMP connection ended");
        for (_, caller) in pending {
            let _ = caller.send(Err(reason.clone()));
        }
        self.events_changed.notify_waiters();
    }

    /// Handles one line from QEMU: a reply goes to its caller, an event to the queue.
    /// An error means the line is not QMP and the connection must end.
    fn dispatch(&self, line: &[u8]) -> Result<(), QmpError> {
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let message: Value = serde_json::from_slice(line).map_err(|e| {
            QmpError::Protocol(format!(
                "{}: a line that is not JSON ({e}): {}",
                self.path,
                snippet(line)
            ))
        })?;
        let Value::Object(mut fields) = message else {
            return Err(QmpError::Protocol(format!(
                "{}: a line that is not a JSON object: {}",
                self.path,
                snippet(line)
            )));
        };
        if let Some(name) = fields.get("event") {
            let Some(name) = name.as_str().map(str::to_string) else {
                return Err(QmpError::Protocol(format!(
                    "{}: an event whose name is not a string: {}",
                    self.path,
                    snippet(line)
                )));
            };
            self.queue_event(name, Value::Object(fields), line.len());
            return Ok(());
        }
        let reply = if let Some(value) = fields.remove("return") {
            Ok(value)
        } else if let Some(error) = fields.get("error") {
            Err(qemu_error(error).unwrap_or_else(|| {
                QmpError::Protocol(format!(
                    "{}: an error reply without a class and a desc: {}",
                    self.path,
                    snippet(line)
                ))
            }))
        } else {
            return Err(QmpError::Protocol(format!(
                "{}: a line that is neither a reply nor an event: {}",
                self.path,
                snippet(line)
            )));
        };
        let Some(id) = fields.get("id").and_then(Value::as_u64) else {
            tracing::warn!(socket = %self.path, line = %snippet(line), "QMP reply without an id of ours; dropped");
            return Ok(());
        };
        let caller = self.lock().pending.remove(&id);
        match caller {
            Some(caller) => {
                let _ = caller.send(reply);
            }
            None => {
                tracing::debug!(socket = %self.path, id, "QMP reply no caller waits for (timed out); dropped");
            }
        }
        Ok(())
    }

    /// Queues an event, dropping the oldest past the bounds.
    fn queue_event(&self, name: String, value: Value, bytes: usize) {
        {
            let mut state = self.lock();
            while !state.events.is_empty()
                && (state.events.len() >= MAX_QUEUED_EVENTS
                    || state.event_bytes + bytes > MAX_QUEUED_EVENT_BYTES)
            {
                if let Some(dropped) = state.events.pop_front() {
                    state.event_bytes -= dropped.bytes;
                    if !state.warned_dropped_event {
                        state.warned_dropped_event = true;
                        tracing::warn!(
                            socket = %self.path,
                            event = %dropped.name,
                            "QMP events are not being taken: dropping the oldest past {MAX_QUEUED_EVENTS} events or {MAX_QUEUED_EVENT_BYTES} bytes (warned once)"
                        );
                    }
                }
            }
            state.event_bytes += bytes;
            state.events.push_back(QueuedEvent { name, value, bytes });
        }
        self.events_changed.notify_waiters();
    }
}

/// Connects to the unix socket, trying again while it is absent or unserved.
async fn connect_socket(
    path: &Path,
    shown: &str,
    until: Instant,
    deadline: Duration,
) -> Result<UnixStream, QmpError> {
    loop {
        let attempt = tokio::time::timeout_at(until, UnixStream::connect(path)).await;
        let error = match attempt {
            Err(_) => {
                return Err(QmpError::Timeout(format!(
                    "a connection to the QMP socket {shown} ({deadline:?})"
                )));
            }
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => e,
        };
        let not_yet = matches!(
            error.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
        );
        if !not_yet {
            return Err(QmpError::Io(format!(
                "cannot connect to the QMP socket {shown}: {error}"
            )));
        }
        if Instant::now() + CONNECT_RETRY > until {
            return Err(QmpError::Io(format!(
                "cannot connect to the QMP socket {shown} within {deadline:?}: {error}"
            )));
        }
        tokio::time::sleep(CONNECT_RETRY).await;
    }
}

/// The reader task: reads lines until the socket ends or speaks something not QMP,
/// then closes the connection (ending the writer too, so the socket is shut).
async fn read_loop(
    mut reader: BufReader<OwnedReadHalf>,
    mut line: Vec<u8>,
    shared: Arc<Shared>,
    writer: AbortHandle,
) {
    let reason = loop {
        match read_line(&mut reader, &mut line, &shared.path).await {
            Ok(true) => {
                if let Err(e) = shared.dispatch(&line) {
                    break e;
                }
                if line.capacity() > KEPT_LINE_CAPACITY {
                    line = Vec::new();
                }
            }
            Ok(false) => break QmpError::Closed,
            Err(e) => break e,
        }
    };
    writer.abort();
    shared.close(reason);
}

/// The writer task: writes whole command lines until the `Qmp` is gone or a write fails.
async fn write_loop(
    mut write: OwnedWriteHalf,
    mut outgoing: mpsc::Receiver<Vec<u8>>,
    shared: Arc<Shared>,
) {
    while let Some(line) = outgoing.recv().await {
        if let Err(e) = write.write_all(&line).await {
            let reason = match e.kind() {
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                    QmpError::Closed
                }
                _ => QmpError::Io(format!("cannot write the QMP socket {}: {e}", shared.path)),
            };
            shared.close(reason);
            return;
        }
    }
}

/// `now + deadline`, or a day from now for a deadline too far to add.
fn deadline_from_now(deadline: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(deadline)
        .unwrap_or_else(|| now + Duration::from_secs(86_400))
}

#[cfg(test)]
mod tests;
