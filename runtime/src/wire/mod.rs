//! The relay protocol: length-delimited frames of postcard-encoded [`Message`]s.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of a
//! [`Message`]. Requests carry ids so calls, returns and events multiplex on one
//! byte stream (child process stdio, an SSH exec channel).
//!
//! The conversation: the child speaks first with [`Message::Hello`]; the parent
//! checks the version and sends [`Message::Load`]; the child asks for the
//! component bytes with [`Message::NeedComponent`] only if its cache lacks them,
//! then answers [`Message::Ready`] or [`Message::Fatal`]. After that the parent
//! sends calls and pings, the child sends returns, events and pongs.
//!
//! A chain booted to be saved (`--snapshot`) is loaded with no component: its
//! `Load` names none, and every level serves bare until an [`Message::Attach`]
//! brings the component and its rights, level after level down the chain.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use crate::config::{Grants, InstanceLimits, NestLimits, SshSettings, VmSettings};
use crate::event::{Outcome, TestFailure};
use crate::output::LogLevel;

mod access;

pub use access::{LevelAccess, Monitor, Reach, is_below, is_level_name};

/// How often a parent pings a child.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);
/// Silence after which a child is declared lost.
pub const HEARTBEAT_LOST: Duration = Duration::from_secs(3);
/// Time a child has to say `Hello` after its transport is up.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a child has to load (and maybe compile) the component.
pub const READY_TIMEOUT: Duration = Duration::from_secs(300);

/// The protocol version this runtime speaks; both ends must agree at `Hello`.
pub const PROTOCOL_VERSION: u32 = 7;

/// Largest frame accepted: the `Component` frame (a component and its
/// precompiled artifact), which only a child reads, and only before it is
/// ready; and the `Attach` frame, which a bare child reads until it has one.
pub const MAX_FRAME: usize = 256 << 20;

/// Largest frame accepted otherwise (calls, returns, events): room for a call
/// whose result carries two full `exec` outputs. A length prefix makes the
/// reader reserve that much at once, so this bounds what a peer can make a
/// level allocate.
pub const MAX_CALL_FRAME: usize = 64 << 20;

/// Everything that crosses a hop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Child → parent, first frame: who is answering.
    Hello {
        /// [`PROTOCOL_VERSION`] of the child.
        version: u32,
        /// `uname -m` of the child's machine.
        arch: String,
        /// Host name of the child's machine.
        hostname: String,
        /// Hex sha256 of the child's runtime binary, when known.
        runtime_sha256: Option<String>,
    },
    /// Parent → child: what to run, where in the chain, with which rights.
    Load {
        /// Hex sha256 of the component; `None` for a bare level (a chain booted
        /// to be saved), which gets its component with an `Attach` later.
        component_sha256: Option<String>,
        /// Level, grants, limits and how to reach further levels.
        setup: Box<LevelSetup>,
    },
    /// Child → parent: the component is not cached here; send it.
    NeedComponent,
    /// Parent → child: the component bytes.
    Component {
        /// The `.wasm` file.
        bytes: Vec<u8>,
        /// The parent's precompiled artifact: (engine key, bytes), when it has one.
        precompiled: Option<(String, Vec<u8>)>,
    },
    /// Child → parent: the instance is up and takes calls.
    Ready {
        /// How to reach the levels the child booted below itself before it was
        /// ready (`--levels N`), deepest last; checked by the parent.
        below: Vec<LevelAccess>,
    },
    /// Parent → child: call a function of the component's `call` export.
    Call {
        /// Request id, echoed by the `Return`.
        id: u64,
        /// The function name.
        function: String,
        /// SDK-encoded arguments.
        args: Vec<u8>,
        /// Milliseconds the child may spend on the call.
        deadline_ms: Option<u64>,
    },
    /// Parent → child: run the test `name` in a fresh instance at the deepest
    /// level of the chain (`--levels N`); answered by a `Return` whose bytes are
    /// the postcard-encoded [`crate::event::Outcome`].
    Run {
        /// Request id, echoed by the `Return`.
        id: u64,
        /// The test's name.
        name: String,
        /// Milliseconds the test may take.
        deadline_ms: u64,
    },
    /// Child → parent: the result of a call.
    Return {
        /// The `Call`'s id.
        id: u64,
        /// SDK-encoded result, or an error with the level it came from.
        result: Result<Vec<u8>, RemoteError>,
    },
    /// Child → parent: output of the child or of any level below it.
    Event {
        /// Where it happened, e.g. `L0/L1/L2`.
        level_path: String,
        /// What happened.
        event: RemoteEvent,
    },
    /// Parent → child: are you there?
    Ping {
        /// Echoed by the `Pong`.
        seq: u64,
    },
    /// Child → parent: yes.
    Pong {
        /// The `Ping`'s seq.
        seq: u64,
    },
    /// Parent → child: abandon a call.
    Cancel {
        /// The `Call`'s id.
        id: u64,
    },
    /// Parent → child: send the files of the child and the levels below it that
    /// go when they go down (see `level/files.rs`); answered by a `Return`
    /// whose bytes are a postcard-encoded `Vec<LevelFile>`.
    Collect {
        /// Request id, echoed by the `Return`.
        id: u64,
    },
    /// Parent → child: drop the instance and exit.
    Shutdown,
    /// Child → parent: a test wants to hold one more level (at `path`, in the
    /// child's subtree); answered by `Acquired`. Levels are counted at L0.
    Acquire {
        /// Echoed by the `Acquired`.
        id: u64,
        /// The level that would be opened, for messages.
        path: String,
    },
    /// Parent → child: whether the `Acquire` was granted.
    Acquired {
        /// The `Acquire`'s id.
        id: u64,
        /// Granted, or why not (kind `denied`, naming the flag).
        result: Result<(), RemoteError>,
    },
    /// Child → parent: levels acquired earlier are gone.
    Release {
        /// How many.
        count: u32,
    },
    /// Either side: an error that ends the connection.
    Fatal {
        /// What went wrong.
        error: RemoteError,
    },
    /// Parent → child, around a save of the child's machine: stop (`paused`)
    /// or run on the VM levels the child's chain booted (deepest first when
    /// stopping, and last when running on), so that no level's vCPU is inside
    /// a nested guest when the child is saved; answered by a `Return` with no
    /// bytes.
    Pause {
        /// Request id, echoed by the `Return`.
        id: u64,
        /// Stop (`true`) or run on (`false`).
        paused: bool,
    },
    /// Parent → child, to a level loaded bare: load this component with these
    /// rights, here and then at every level the child's chain booted; answered
    /// by a `Return` with no bytes once the deepest has it.
    Attach {
        /// Request id, echoed by the `Return`.
        id: u64,
        /// The component and the rights it runs with.
        attachment: Box<Attachment>,
    },
    /// Parent → child, after restoring the child from a snapshot: set the
    /// wall clock (and the chain's below) to the parent's, which stood still
    /// while the snapshot waited; answered by a `Return` with no bytes.
    SetClock {
        /// Request id, echoed by the `Return`.
        id: u64,
        /// The parent's wall clock, milliseconds since the Unix epoch.
        unix_ms: u64,
    },
}

impl Message {
    /// The variant's name, for messages about an unexpected one.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Load { .. } => "Load",
            Message::NeedComponent => "NeedComponent",
            Message::Component { .. } => "Component",
            Message::Ready { .. } => "Ready",
            Message::Call { .. } => "Call",
            Message::Run { .. } => "Run",
            Message::Return { .. } => "Return",
            Message::Event { .. } => "Event",
            Message::Ping { .. } => "Ping",
            Message::Pong { .. } => "Pong",
            Message::Cancel { .. } => "Cancel",
            Message::Shutdown => "Shutdown",
            Message::Collect { .. } => "Collect",
            Message::SetClock { .. } => "SetClock",
            Message::Attach { .. } => "Attach",
            Message::Pause { .. } => "Pause",
            Message::Fatal { .. } => "Fatal",
            Message::Acquire { .. } => "Acquire",
            Message::Acquired { .. } => "Acquired",
            Message::Release { .. } => "Release",
        }
    }
}

/// Where a level sits and what it may do; sent down with `Load`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LevelSetup {
    /// Depth of the child.
    pub depth: u32,
    /// Level path of the child, e.g. `L0/L1`.
    pub path: String,
    /// The parent's grants, unchanged: a level never has more.
    pub grants: Grants,
    /// The parent's instance limits.
    pub limits: WireLimits,
    /// How deep the chain may go and how many levels a test may hold.
    pub nest: NestLimits,
    /// Environment of the component.
    pub env: Vec<(String, String)>,
    /// How the child reaches levels below it.
    pub ssh: Option<SshSettings>,
    /// How the child boots VM levels below it.
    pub vm: VmSettings,
    /// VM levels the child boots below itself before it is ready, each from the
    /// image it booted from (`--levels N` at L0 sends N - 1).
    pub descend: u32,
}

/// What an `Attach` brings a bare level: the component, and the rights a
/// `Load` would have carried (the rest of a level's setup is the one it was
/// booted with).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attachment {
    /// Hex sha256 of `bytes`, checked by the child.
    pub component_sha256: String,
    /// The `.wasm` file.
    pub bytes: Vec<u8>,
    /// The parent's precompiled artifact: (engine key, bytes), when it has one
    /// for the child's architecture.
    pub precompiled: Option<(String, Vec<u8>)>,
    /// The grants of the run.
    pub grants: Grants,
    /// The instance limits of the run.
    pub limits: WireLimits,
    /// How deep the chain may go and how many levels a test may hold.
    pub nest: NestLimits,
    /// Environment of the component.
    pub env: Vec<(String, String)>,
}

/// How a test run at another level ended (`Outcome`, in a form postcard can carry).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WireOutcome {
    /// It passed.
    Passed,
    /// It failed.
    Failed(TestFailure),
}

impl From<Outcome> for WireOutcome {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Passed | Outcome::Ignored => Self::Passed,
            Outcome::Failed(f) => Self::Failed(f),
        }
    }
}

impl From<WireOutcome> for Outcome {
    fn from(o: WireOutcome) -> Self {
        match o {
            WireOutcome::Passed => Self::Passed,
            WireOutcome::Failed(f) => Self::Failed(f),
        }
    }
}

/// [`InstanceLimits`] on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireLimits {
    /// Largest linear memory, bytes.
    pub memory_bytes: u64,
    /// Output budget, bytes.
    pub output_bytes: u64,
    /// Output kept per `exec`, bytes.
    pub exec_output_bytes: u64,
}

impl From<InstanceLimits> for WireLimits {
    fn from(l: InstanceLimits) -> Self {
        Self {
            memory_bytes: l.memory_bytes as u64,
            output_bytes: l.output_bytes as u64,
            exec_output_bytes: l.exec_output_bytes as u64,
        }
    }
}

impl From<WireLimits> for InstanceLimits {
    fn from(l: WireLimits) -> Self {
        let clamp = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        Self {
            memory_bytes: clamp(l.memory_bytes),
            output_bytes: clamp(l.output_bytes),
            exec_output_bytes: clamp(l.exec_output_bytes),
        }
    }
}

/// An error that crossed a hop, with the level it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Error)]
#[error("{kind:?} at {level_path}: {message}")]
pub struct RemoteError {
    /// The category.
    pub kind: WireErrorKind,
    /// What went wrong and what to do next.
    pub message: String,
    /// Where it happened.
    pub level_path: String,
}

/// The WIT `error-kind` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[expect(missing_docs, reason = "mirrors the WIT error-kind, documented there")]
pub enum WireErrorKind {
    Denied,
    Timeout,
    Io,
    NotFound,
    InvalidArgument,
    LevelLost,
    Unsupported,
    Internal,
}

/// Output that travels up the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemoteEvent {
    /// A `log` line of the component.
    Log {
        /// Severity.
        level: LogLevel,
        /// Text.
        message: String,
    },
    /// Standard output of the component.
    Stdout(String),
    /// Standard error of the component.
    Stderr(String),
    /// A diagnostic line of the runtime itself.
    Runtime(String),
    /// The level spent its output budget during a call: the test it serves has
    /// exceeded its output limit, wherever the output was written.
    OutputLimit,
}

/// A frame that could not be read.
#[derive(Debug, Error)]
pub enum FrameError {
    /// The byte stream failed or framing was violated (e.g. a frame over [`MAX_FRAME`]).
    #[error("transport error: {0}")]
    Io(#[from] std::io::Error),
    /// The frame is not a message of this protocol.
    #[error("malformed frame ({len} bytes): {source}")]
    Decode {
        /// Length of the bad frame.
        len: usize,
        /// The decoder's complaint.
        #[source]
        source: postcard::Error,
    },
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

/// Reads messages from a byte stream.
pub struct FrameReader<R> {
    inner: FramedRead<R, LengthDelimitedCodec>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps `reader`, accepting frames of up to [`MAX_CALL_FRAME`] bytes.
    pub fn new(reader: R) -> Self {
        let mut codec = codec();
        codec.set_max_frame_length(MAX_CALL_FRAME);
        Self {
            inner: FramedRead::new(reader, codec),
        }
    }

    /// Accepts frames of up to `max` bytes from now on.
    pub fn set_limit(&mut self, max: usize) {
        self.inner.decoder_mut().set_max_frame_length(max);
    }

    /// The next message; `None` at a clean end of stream.
    pub async fn next(&mut self) -> Option<Result<Message, FrameError>> {
        let frame: BytesMut = match self.inner.next().await? {
            Ok(f) => f,
            Err(e) => return Some(Err(e.into())),
        };
        Some(
            postcard::from_bytes(&frame).map_err(|source| FrameError::Decode {
                len: frame.len(),
                source,
            }),
        )
    }
}

/// Writes messages to a byte stream.
pub struct FrameWriter<W> {
    inner: FramedWrite<W, LengthDelimitedCodec>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Wraps `writer`.
    pub fn new(writer: W) -> Self {
        Self {
            inner: FramedWrite::new(writer, codec()),
        }
    }

    /// Encodes and sends one message, flushing it.
    pub async fn send(&mut self, msg: &Message) -> std::io::Result<()> {
        let bytes = postcard::to_allocvec(msg).map_err(std::io::Error::other)?;
        self.inner.send(Bytes::from(bytes)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn round_trip(msgs: &[Message]) -> Vec<Message> {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut w = FrameWriter::new(a);
        for m in msgs {
            w.send(m).await.expect("send");
        }
        drop(w);
        let mut r = FrameReader::new(b);
        let mut out = Vec::new();
        while let Some(m) = r.next().await {
            out.push(m.expect("decode"));
        }
        out
    }

    #[tokio::test]
    async fn messages_round_trip() {
        let msgs = vec![
            Message::Hello {
                version: PROTOCOL_VERSION,
                arch: "x86_64".into(),
                hostname: "h".into(),
                runtime_sha256: None,
            },
            Message::Call {
                id: 7,
                function: "f".into(),
                args: vec![1, 2, 3],
                deadline_ms: Some(5),
            },
            Message::Return {
                id: 7,
                result: Err(RemoteError {
                    kind: WireErrorKind::LevelLost,
                    message: "gone".into(),
                    level_path: "L0/L1".into(),
                }),
            },
            Message::Event {
                level_path: "L0/L1/L2".into(),
                event: RemoteEvent::Log {
                    level: LogLevel::Info,
                    message: "hi".into(),
                },
            },
        ];
        assert_eq!(round_trip(&msgs).await, msgs);
    }

    #[tokio::test]
    async fn frames_over_the_limit_are_refused_before_they_are_read() {
        use tokio::io::AsyncWriteExt;
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let claimed = u32::try_from(MAX_CALL_FRAME + 1).expect("fits");
        a.write_all(&claimed.to_be_bytes()).await.expect("write");
        let mut r = FrameReader::new(b);
        let first = r.next().await.expect("an answer");
        assert!(
            first
                .as_ref()
                .is_err_and(|e| e.to_string().contains("frame size too big")),
            "{first:?}"
        );
    }

    #[tokio::test]
    async fn garbage_is_an_error_not_a_panic() {
        use tokio::io::AsyncWriteExt;
        let (mut a, b) = tokio::io::duplex(1 << 16);
        a.write_all(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff])
            .await
            .expect("write");
        a.write_all(&[0xff, 0xff, 0xff, 0xff, 1])
            .await
            .expect("write");
        drop(a);
        let mut r = FrameReader::new(b);
        let first = r.next().await.expect("a frame");
        assert!(
            matches!(first, Err(FrameError::Decode { len: 4, .. })),
            "{first:?}"
        );
        let second = r.next().await.expect("a frame");
        assert!(
            second
                .as_ref()
                .is_err_and(|e| e.to_string().contains("frame size too big")),
            "{second:?}"
        );
    }
}
