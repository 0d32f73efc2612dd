//! Fuzz targets of the relay protocol (`matryoshka::wire`): the frame decoder,
//! the child's side of the handshake (`matryoshka serve`) and the parent's
//! (`Connection::open`).
//!
//! One input format serves two engines: libFuzzer (`cargo fuzz`, nightly; the
//! binaries in `fuzz_targets/`) and the seeded smoke run on the pinned stable
//! toolchain (`src/bin/smoke.rs`). A crash found by either replays in both.
//!
//! An input is one mode byte, then the rest:
//! - bit 0 clear: the rest is the byte stream itself (libFuzzer's own mutations
//!   of a seed corpus of valid frames work on it);
//! - bit 0 set: the rest drives [`generate`], which builds valid messages of the
//!   target's conversation, frames them and mutates the frames;
//! - bits 1-4: the largest read the stream delivers at once (0: all of it),
//!   so frames arrive split at every position;
//! - bit 5: every other read is first refused (`Pending`, woken at once).
//!
//! The targets panic on any failed check, and on any run that outlasts its
//! deadline: a panic is a finding.

pub mod generate;
pub mod targets;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use arbitrary::Unstructured;
use tokio::io::{AsyncRead, ReadBuf};

/// The stream a target reads, and how it is delivered.
#[derive(Debug, Clone)]
pub struct Input {
    /// The bytes.
    pub stream: Vec<u8>,
    /// The largest read, in bytes.
    pub chunk: usize,
    /// Whether every other read is first refused with `Pending`.
    pub stall: bool,
}

impl Input {
    /// Reads one fuzz input; `script` builds the structured streams.
    pub fn new(data: &[u8], script: fn(&mut Unstructured) -> arbitrary::Result<Vec<u8>>) -> Self {
        let Some((&mode, rest)) = data.split_first() else {
            return Self {
                stream: Vec::new(),
                chunk: usize::MAX,
                stall: false,
            };
        };
        let stream = if mode & 1 == 0 {
            rest.to_vec()
        } else {
            // A generator error means the input ran short: what was built is lost,
            // and the empty stream is a fine input too.
            script(&mut Unstructured::new(rest)).unwrap_or_default()
        };
        Self {
            stream,
            chunk: match (mode >> 1) & 0x0f {
                0 => usize::MAX,
                n => usize::from(n),
            },
            stall: mode & 0x20 != 0,
        }
    }

    /// A reader that delivers the stream as this input says.
    pub fn reader(&self) -> Chunked {
        Chunked {
            data: self.stream.clone(),
            pos: 0,
            chunk: self.chunk,
            stall: self.stall,
            stalled: false,
        }
    }

    /// The raw-mode input (mode byte 0) whose stream is `stream`: how seed
    /// corpora and reproducers are written.
    pub fn raw(stream: &[u8]) -> Vec<u8> {
        let mut data = Vec::with_capacity(stream.len() + 1);
        data.push(0);
        data.extend(stream);
        data
    }
}

/// An in-memory reader that hands out at most `chunk` bytes per read, then
/// end-of-file.
pub struct Chunked {
    data: Vec<u8>,
    pos: usize,
    chunk: usize,
    stall: bool,
    stalled: bool,
}

impl AsyncRead for Chunked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.stall {
            this.stalled = !this.stalled;
            if this.stalled {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
        let left = &this.data[this.pos..];
        let n = left.len().min(this.chunk).min(buf.remaining());
        buf.put_slice(&left[..n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}
