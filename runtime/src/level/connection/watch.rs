//! Watching a child: what counts as a sign of life, where its events may come
//! from, and how the connection is declared lost and the child described.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, ReadBuf};

use super::{Answer, Pending};
use crate::level::transport::TransportGuard;
use crate::output::{Capture, Stream};
use crate::wire::{FrameReader, Message, RemoteError, RemoteEvent, WireErrorKind};

/// Whether `path` is `own` or a level below it.
pub(super) fn within(own: &str, path: &str) -> bool {
    path.strip_prefix(own)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

pub(super) fn lost_error(path: &str, cause: &str) -> RemoteError {
    RemoteError {
        kind: WireErrorKind::LevelLost,
        message: format!("level {path} lost: {cause}"),
        level_path: path.to_string(),
    }
}

/// The next handshake frame by `deadline`, or why there is none (with how the
/// child ended, when it did).
pub(super) async fn handshake_frame<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    guard: &Arc<Mutex<Box<dyn TransportGuard>>>,
    deadline: Instant,
    too_late: String,
    closed: &str,
) -> Result<Message, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    match tokio::time::timeout(left, reader.next()).await {
        Err(_) => Err(too_late),
        Ok(None) => Err(format!("{closed}{}", describe_exit(guard).await)),
        Ok(Some(Err(e))) => Err(format!("{e}{}", describe_exit(guard).await)),
        Ok(Some(Ok(m))) => Ok(m),
    }
}

/// How the child ended, asked on a blocking thread: a guard may wait a moment
/// for a process to be reaped (a QEMU up to a second).
pub(super) async fn describe_exit(guard: &Arc<Mutex<Box<dyn TransportGuard>>>) -> String {
    let guard = guard.clone();
    tokio::task::spawn_blocking(move || lock(&guard).describe_exit())
        .await
        .unwrap_or_default()
}

/// Marks the connection lost once, fails every waiting call, tears the transport down.
pub(super) async fn declare_lost(
    lost: &Arc<Mutex<Option<String>>>,
    pending: &Pending,
    guard: &Arc<Mutex<Box<dyn TransportGuard>>>,
    claimed: &AtomicBool,
    keep: bool,
    cause: String,
) {
    // The first caller tells why; the others (writer, reader, heartbeat) only stop.
    if claimed.swap(true, Ordering::SeqCst) {
        return;
    }
    let guard = guard.clone();
    let cause = tokio::task::spawn_blocking(move || {
        let mut g = lock(&guard);
        let cause = format!("{cause}{}", g.describe_exit());
        // Kept (`--keep-failed`) until the connection is dropped, for a person to look at.
        if !keep {
            g.shutdown();
        }
        cause
    })
    .await
    .unwrap_or_else(|e| format!("the level could not be described: {e}"));
    tracing::warn!("{cause}");
    let mut slot = lock(lost);
    *slot = Some(cause.clone());
    // Drained while `lost` is still held, so no call can slip in between.
    for (_, tx) in lock(pending).drain() {
        let _ = tx.send(Answer::Lost(cause.clone()));
    }
}

pub(super) fn forward(capture: &Capture, level_path: &str, event: RemoteEvent) {
    let (stream, text) = match event {
        RemoteEvent::Log { level, message } => (Stream::Log(level), message),
        RemoteEvent::Stdout(t) => (Stream::Stdout, t),
        RemoteEvent::Stderr(t) => (Stream::Stderr, t),
        RemoteEvent::Runtime(t) => {
            tracing::debug!(level = level_path, "{t}");
            return;
        }
        RemoteEvent::OutputLimit => {
            capture.mark_exceeded();
            return;
        }
    };
    // Over budget: the level that spent it already failed its own write.
    let _ = capture.write_from(level_path, stream, text.as_bytes());
}

/// A reader that records when bytes last arrived, so a large frame in flight
/// counts as a sign of life.
pub(super) struct Activity<R> {
    pub inner: R,
    pub last: Arc<Mutex<Instant>>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Activity<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            *lock(&self.last) = Instant::now();
        }
        poll
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
