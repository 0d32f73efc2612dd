//! Captured output of one test: log lines, stdout and stderr, under one byte budget.
//!
//! Once the budget is spent, further writes fail with [`OutputLimitExceeded`]:
//! a log call traps the instance, a stdout write returns an error to the guest.
//! Either way the runner reports the test as having exceeded its output limit.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// Severity of a captured log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// `trace`
    Trace,
    /// `debug`
    Debug,
    /// `info`
    Info,
    /// `warn`
    Warn,
    /// `error`
    Error,
}

impl LogLevel {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

/// Where a piece of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// The guest's standard output.
    Stdout,
    /// The guest's standard error.
    Stderr,
    /// A line from the `log` interface.
    Log(LogLevel),
}

/// The output budget of a test is spent.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error(
    "output limit exceeded: the test wrote more than {limit} bytes of log, stdout and stderr; the rest was dropped (raise it with --max-output)"
)]
pub struct OutputLimitExceeded {
    /// The budget, in bytes.
    pub limit: usize,
}

/// Bytes of a failure message a report keeps; the rest is cut with a note.
pub const MESSAGE_LIMIT: usize = 64 << 10;

/// Bytes of a failure message kept even when the output budget is spent, so a
/// test that filled its budget still says why it failed.
pub const MESSAGE_FLOOR: usize = 1 << 10;

/// Bytes of a failure location (`file:line:column`) a report keeps.
pub const LOCATION_LIMIT: usize = 1 << 10;

/// Cuts `text` to at most `limit` bytes at a character boundary, ending it with a
/// note that says how many bytes were cut and `why`. Text within the limit comes
/// back unchanged, so capping twice at one limit cuts once. A `limit` smaller than
/// the note leaves the note alone.
pub fn cap_text(mut text: String, limit: usize, why: &str) -> String {
    let total = text.len();
    if total <= limit {
        return text;
    }
    let note = |cut: usize| format!("\n[{cut} of {total} bytes cut: {why}]");
    // The note for the largest possible cut is the longest one.
    let room = limit.saturating_sub(note(total).len());
    let keep = text.floor_char_boundary(room);
    let note = note(total - keep);
    text.truncate(keep);
    text.push_str(&note);
    text
}

/// A failure message cut to [`MESSAGE_LIMIT`].
pub fn cap_message(message: String) -> String {
    cap_text(
        message,
        MESSAGE_LIMIT,
        "a failure message is kept up to 64 KiB",
    )
}

/// A failure location cut to [`LOCATION_LIMIT`].
pub fn cap_location(location: String) -> String {
    cap_text(location, LOCATION_LIMIT, "a location is kept up to 1 KiB")
}

/// One captured log line.
#[derive(Debug, Clone, Serialize)]
pub struct LogLine {
    /// The level that wrote it, e.g. `L0/L1/L2`.
    pub level_path: String,
    /// Severity.
    pub level: LogLevel,
    /// The text.
    pub message: String,
    /// Time since the instance started, in seconds.
    pub at_secs: f64,
}

/// What a finished test left behind.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CapturedOutput {
    /// Standard output, invalid UTF-8 replaced.
    pub stdout: String,
    /// Standard error, invalid UTF-8 replaced.
    pub stderr: String,
    /// Log lines, in order.
    pub logs: Vec<LogLine>,
}

impl CapturedOutput {
    /// True when the test wrote nothing at all.
    pub fn is_empty(&self) -> bool {
        self.stdout.is_empty() && self.stderr.is_empty() && self.logs.is_empty()
    }
}

/// Receives every piece of output as it is written, with the level path it came
/// from: for live reporting at the top, for relaying upward at other levels.
pub type OutputSink = Arc<dyn Fn(&str, Stream, &str) + Send + Sync>;

/// The capture buffer shared by the host functions and WASI stdio of one instance.
pub struct Capture {
    inner: Mutex<Inner>,
    limit: usize,
    started: Instant,
    sink: Option<OutputSink>,
    keep: bool,
    level_path: String,
}

#[derive(Default)]
struct Inner {
    used: usize,
    exceeded: Option<OutputLimitExceeded>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    logs: Vec<LogLine>,
}

impl Capture {
    /// A buffer for output of the level `level_path` that holds at most `limit` bytes in all.
    pub fn new(level_path: &str, limit: usize, sink: Option<OutputSink>) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner::default()),
            limit,
            started: Instant::now(),
            sink,
            keep: true,
            level_path: level_path.to_string(),
        })
    }

    /// A capture that only passes output on to `sink` under the same budget,
    /// keeping nothing: for levels that relay their output upward.
    pub fn forwarding(level_path: &str, limit: usize, sink: OutputSink) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner::default()),
            limit,
            started: Instant::now(),
            sink: Some(sink),
            keep: false,
            level_path: level_path.to_string(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock only means a writer panicked; the bytes are still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends output of this level to `stream`, or fails once the budget is spent.
    pub fn write(&self, stream: Stream, bytes: &[u8]) -> Result<(), OutputLimitExceeded> {
        let origin = self.level_path.clone();
        self.write_from(&origin, stream, bytes)
    }

    /// Appends output that a level below relayed up, tagged with its level path.
    pub fn write_from(
        &self,
        origin: &str,
        stream: Stream,
        bytes: &[u8],
    ) -> Result<(), OutputLimitExceeded> {
        let mut inner = self.lock();
        if let Some(e) = &inner.exceeded {
            return Err(e.clone());
        }
        if inner.used + bytes.len() > self.limit {
            let e = OutputLimitExceeded { limit: self.limit };
            inner.exceeded = Some(e.clone());
            return Err(e);
        }
        inner.used += bytes.len();
        let text = String::from_utf8_lossy(bytes);
        if self.keep {
            let local = origin == self.level_path;
            match stream {
                Stream::Stdout | Stream::Stderr => {
                    let buf = if stream == Stream::Stdout {
                        &mut inner.stdout
                    } else {
                        &mut inner.stderr
                    };
                    if local {
                        buf.extend_from_slice(bytes);
                    } else {
                        for line in text.lines() {
                            buf.extend_from_slice(format!("[{origin}] {line}\n").as_bytes());
                        }
                    }
                }
                Stream::Log(level) => {
                    let at_secs = self.started.elapsed().as_secs_f64();
                    inner.logs.push(LogLine {
                        level_path: origin.to_string(),
                        level,
                        message: text.to_string(),
                        at_secs,
                    });
                }
            }
        }
        drop(inner);
        if let Some(sink) = &self.sink {
            sink(origin, stream, &text);
        }
        Ok(())
    }

    /// Counts up to `wanted` more bytes against the budget for text kept on the
    /// test's behalf (its failure message) and returns how many fit. Unlike a
    /// write, this never marks the budget exceeded: the test has already ended.
    pub fn claim(&self, wanted: usize) -> usize {
        let mut inner = self.lock();
        let granted = wanted.min(self.limit.saturating_sub(inner.used));
        inner.used += granted;
        granted
    }

    /// Gives the budget back, e.g. before the next call on a long-lived instance.
    pub fn reset_budget(&self) {
        let mut inner = self.lock();
        inner.used = 0;
        inner.exceeded = None;
    }

    /// Marks the budget spent: a level below spent its own share of it.
    pub fn mark_exceeded(&self) {
        let mut inner = self.lock();
        inner
            .exceeded
            .get_or_insert(OutputLimitExceeded { limit: self.limit });
    }

    /// The error, if the budget was spent.
    pub fn exceeded(&self) -> Option<OutputLimitExceeded> {
        self.lock().exceeded.clone()
    }

    /// Time since the capture (and so the test) started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Takes what was captured so far.
    pub fn take(&self) -> CapturedOutput {
        let mut inner = self.lock();
        CapturedOutput {
            stdout: String::from_utf8_lossy(&std::mem::take(&mut inner.stdout)).into_owned(),
            stderr: String::from_utf8_lossy(&std::mem::take(&mut inner.stderr)).into_owned(),
            logs: std::mem::take(&mut inner.logs),
        }
    }

    /// A WASI stdout/stderr stream that writes into this buffer.
    pub fn stream(self: &Arc<Self>, stream: Stream) -> CaptureStream {
        CaptureStream {
            capture: self.clone(),
            stream,
        }
    }
}

/// WASI standard output or error of an instance, captured.
#[derive(Clone)]
pub struct CaptureStream {
    capture: Arc<Capture>,
    stream: Stream,
}

impl IsTerminal for CaptureStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CaptureStream {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl AsyncWrite for CaptureStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(
            self.capture
                .write(self.stream, buf)
                .map(|()| buf.len())
                .map_err(std::io::Error::other),
        )
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_shared_and_sticky() {
        let c = Capture::new("L0", 10, None);
        c.write(Stream::Stdout, b"12345").expect("fits");
        c.write(Stream::Log(LogLevel::Info), b"1234").expect("fits");
        let err = c.write(Stream::Stderr, b"12").expect_err("over budget");
        assert_eq!(err.limit, 10);
        assert!(c.write(Stream::Stdout, b"").is_err(), "stays exceeded");
        let out = c.take();
        assert_eq!(out.stdout, "12345");
        assert_eq!(out.logs.len(), 1);
        assert_eq!(out.stderr, "");
    }

    #[test]
    fn claims_take_what_is_left_of_the_budget() {
        let c = Capture::new("L0", 10, None);
        c.write(Stream::Stdout, b"123456").expect("fits");
        assert_eq!(c.claim(3), 3);
        assert_eq!(c.claim(3), 1, "only one byte was left");
        assert_eq!(c.claim(3), 0);
        assert!(c.exceeded().is_none(), "a claim never fails the test");
        assert!(
            c.write(Stream::Stdout, b"x").is_err(),
            "but spends the budget"
        );
    }

    #[test]
    fn capped_text_keeps_a_prefix_and_says_how_much_was_cut() {
        let short = cap_text("short".into(), 100, "why");
        assert_eq!(short, "short");
        let long = "é".repeat(1000); // 2000 bytes, two per character
        let capped = cap_text(long.clone(), 100, "too long");
        assert!(capped.len() <= 100, "{}", capped.len());
        let (kept, note) = capped.split_once('\n').expect("a note");
        assert!(long.starts_with(kept) && !kept.is_empty());
        assert_eq!(
            note,
            format!("[{} of 2000 bytes cut: too long]", 2000 - kept.len())
        );
        assert_eq!(cap_text(capped.clone(), 100, "again"), capped, "idempotent");
        let tiny = cap_text(long, 3, "tiny");
        assert!(tiny.starts_with("\n[2000 of 2000 bytes cut"), "{tiny}");
    }

    #[test]
    fn relayed_output_is_tagged_with_its_level() {
        let c = Capture::new("L0", 1 << 10, None);
        c.write_from("L0/L1/L2", Stream::Log(LogLevel::Info), b"deep")
            .expect("fits");
        c.write_from("L0/L1", Stream::Stdout, b"a\nb\n")
            .expect("fits");
        let out = c.take();
        assert_eq!(out.logs[0].level_path, "L0/L1/L2");
        assert_eq!(out.stdout, "[L0/L1] a\n[L0/L1] b\n");
    }
}
