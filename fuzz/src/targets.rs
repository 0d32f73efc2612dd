//! The three targets. Each takes one fuzz input, runs the real code on it and
//! panics on a failed check or a run past [`DEADLINE`].

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use matryoshka::config::{InstanceLimits, NestLimits, VmSettings};
use matryoshka::engine::{CacheDir, ComponentSource, sha256_hex};
use matryoshka::level::Target;
use matryoshka::level::budget::LevelBudget;
use matryoshka::level::connection::Connection;
use matryoshka::level::vm::{RunDir, VmContext};
use matryoshka::output::Capture;
use matryoshka::serve::{ServeOptions, serve};
use matryoshka::wire::{
    FrameError, FrameReader, LevelSetup, Message, PROTOCOL_VERSION, WireErrorKind, WireLimits,
};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::{Input, generate};

/// How long one input may run. Every stream ends, and with it every
/// conversation: an input still running after this is a hang.
pub const DEADLINE: Duration = Duration::from_secs(20);

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
}

fn block_on<F: Future>(future: F) -> F::Output {
    RUNTIME.with(|rt| rt.block_on(future))
}

/// Where inputs' files go: `$TMPDIR` when set, else `/dev/shm` (memory) when
/// there is one. On a disk each input's cache folder costs a journaled create
/// and delete: `child` ran 15 times slower on ext4 than on tmpfs.
fn scratch() -> PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if std::env::var_os("TMPDIR").is_none() && shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// What a `FrameReader` made of a stream: each message, or the error's text.
type Decoded = Vec<Result<Message, String>>;

/// Every frame of `reader`, up to the end of the stream or a framing error.
async fn decode_all<R: AsyncRead + Unpin>(reader: R) -> Decoded {
    let mut frames = FrameReader::new(reader);
    let mut out = Vec::new();
    while let Some(next) = frames.next().await {
        // A malformed message leaves the framing intact; a transport error does not.
        let end = matches!(next, Err(FrameError::Io(_)));
        out.push(next.map_err(|e| e.to_string()));
        if end {
            break;
        }
    }
    out
}

/// How far one input got into the code under test, for the run's statistics
/// and for tests that check the generators reach past the first frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reach {
    /// `frames`: messages decoded. `child`: frames it sent after `Hello`.
    pub messages: usize,
    /// `child`: it sent `NeedComponent`.
    pub asked: bool,
    /// `child`: it sent `Fatal` because the component's bytes did not match the hash.
    pub hash_mismatch: bool,
    /// `child`: it sent `Fatal` because the component did not load.
    pub load_failed: bool,
    /// `child`: it said `Ready` to a bare `Load`.
    pub ready: bool,
    /// `child`: answers (`Return`, `Pong`) it sent after `Ready`.
    pub answers: usize,
    /// `parent`: `Connection::open` succeeded (the child said `Ready`).
    pub opened: bool,
    /// `parent`: the call was answered by the child's `Return`.
    pub answered: bool,
}

/// The frame decoder: the stream read at once and read in the input's pieces
/// gives the same messages and errors, never more frames than 4-byte headers
/// fit, and every decoded message encodes and decodes to itself.
pub fn frames(data: &[u8]) -> Reach {
    let input = Input::new(data, generate::stream);
    block_on(async {
        let whole = decode_all(std::io::Cursor::new(input.stream.clone())).await;
        let pieces = decode_all(input.reader()).await;
        assert_eq!(
            whole, pieces,
            "the frames depend on how the bytes arrived (reads of at most {} bytes, stalls: {})",
            input.chunk, input.stall
        );
        assert!(
            whole.len() <= input.stream.len() / 4 + 1,
            "{} frames out of {} bytes",
            whole.len(),
            input.stream.len()
        );
        for msg in whole.iter().flatten() {
            let again: Result<Message, _> = postcard::from_bytes(&generate::encode(msg));
            assert_eq!(again.as_ref().ok(), Some(msg), "{again:?}");
        }
        Reach {
            messages: whole.iter().flatten().count(),
            ..Reach::default()
        }
    })
}

/// The child's side (`serve`) reading the input as its parent: it ends once
/// the stream ends, and all it says is `Hello` with this protocol's version,
/// at most one `NeedComponent`, and at most one `Fatal`, last. Only a bare
/// `Load` gets a `Ready` (no input carries a component that loads), first,
/// and after it only answers: `Return` and `Pong`.
pub fn child(data: &[u8]) -> Reach {
    let input = Input::new(data, generate::parent_script);
    let cache = tempfile::tempdir_in(scratch()).expect("a temporary cache folder");
    let opts = ServeOptions {
        cache: CacheDir::At(cache.path().to_path_buf()),
        // No image there: a `Load` mutated to ask for levels below gets its
        // "no kernel" error at once instead of booting a real QEMU (which
        // took one CI run past the deadline).
        image_dir: Some(cache.path().to_path_buf()),
        protocol_version: PROTOCOL_VERSION,
        inject: None,
    };
    block_on(async {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let served = serve(input.reader(), theirs, opts);
        let said = async move {
            let mut ours = ours;
            let mut said = Vec::new();
            // The stream ends when serve's writer is dropped; an error ends it too.
            let _ = ours.read_to_end(&mut said).await;
            said
        };
        let Ok((result, said)) =
            tokio::time::timeout(DEADLINE, async { tokio::join!(served, said) }).await
        else {
            panic!("serve did not end within {DEADLINE:?} of a stream that ends");
        };
        let said = decode_all(std::io::Cursor::new(said)).await;
        check_child_said(&said, &result)
    })
}

fn check_child_said(said: &Decoded, result: &Result<(), String>) -> Reach {
    let context = || format!("serve returned {result:?} after saying {said:?}");
    let mut frames = said.iter();
    match frames.next() {
        Some(Ok(Message::Hello { version, .. })) if *version == PROTOCOL_VERSION => {}
        _ => panic!("the first frame is not Hello: {}", context()),
    }
    let mut reach = Reach::default();
    let mut fatal = false;
    for frame in frames {
        assert!(!fatal, "a frame after Fatal: {}", context());
        reach.messages += 1;
        match frame {
            Ok(Message::Ready { below }) if !reach.asked && !reach.ready && reach.messages == 1 => {
                assert!(
                    below.is_empty(),
                    "a bare level with no chain: {}",
                    context()
                );
                reach.ready = true;
            }
            Ok(Message::Return { .. } | Message::Pong { .. }) if reach.ready => reach.answers += 1,
            Ok(Message::NeedComponent) if !reach.asked && !reach.ready => reach.asked = true,
            Ok(Message::Fatal { error }) if !reach.ready => {
                fatal = true;
                if error.message.starts_with("component bytes hash to") {
                    reach.hash_mismatch = true;
                } else {
                    reach.load_failed = true;
                }
            }
            _ => panic!("unexpected frame {frame:?}: {}", context()),
        }
    }
    reach
}

/// Where the parent target's child finds the stream of the input.
static STREAM_FILE: OnceLock<PathBuf> = OnceLock::new();

/// The local "child runtime" of the parent target. It sends the stream and
/// exits, so the parent reads the stream and then end-of-file; a `sleep` it
/// leaves behind (in its process group, which the parent kills) keeps the
/// stdin pipe open, so the parent's writes succeed whenever they come, as they
/// do to a runtime that reads them. Without it, whether `open` read `Ready`
/// or failed writing `Load` depended on which process ran first.
const CHILD_SCRIPT: &str = "exec 3<&0\nsleep 60 >&- 2>&- &\nexec 3<&- cat STREAM\n";

/// Makes local levels of this process run [`CHILD_SCRIPT`] on the stream file
/// the parent target writes, and writes to a child that is gone fail with
/// `EPIPE`. Call it once, first thing in `main` (before any thread starts): it
/// sets `MATRYOSHKA_LOCAL_SERVE` in this process's environment and ignores
/// `SIGPIPE`.
pub fn prepare_parent() -> std::io::Result<()> {
    let dir = scratch().join(format!("matryoshka-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("stream");
    std::fs::write(&file, b"")?;
    let script = dir.join("child.sh");
    let command = format!("sh {}", script.display());
    if command.split_whitespace().count() != 2 {
        return Err(std::io::Error::other(format!(
            "the temporary folder {} has white space in its path",
            dir.display()
        )));
    }
    std::fs::write(
        &script,
        CHILD_SCRIPT.replace("STREAM", &file.display().to_string()),
    )?;
    // SAFETY: called before any other thread of this process runs, as documented.
    unsafe { std::env::set_var("MATRYOSHKA_LOCAL_SERVE", command) };
    // As in the runtime's binary, whose Rust `main` ignores SIGPIPE; a libFuzzer
    // binary has no Rust `main`.
    // SAFETY: SIG_IGN installs no handler code.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let _ = STREAM_FILE.set(file);
    Ok(())
}

/// Removes what [`prepare_parent`] made.
pub fn cleanup_parent() {
    if let Some(dir) = STREAM_FILE.get().and_then(|f| f.parent()) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The parent's side (`Connection::open`, then one call) talking to a real
/// local child process that sends the input's stream and exits: both end once
/// the stream ends, whatever it holds.
pub fn parent(data: &[u8]) -> Reach {
    let file = STREAM_FILE
        .get()
        .expect("prepare_parent() is called before the parent target");
    let input = Input::new(data, generate::child_script);
    // Replaced, not rewritten: a child of the previous input may still have the
    // old file open.
    let next = file.with_extension("next");
    std::fs::write(&next, &input.stream).expect("the stream file is writable");
    std::fs::rename(&next, file).expect("the stream file is writable");

    let bytes = b"\0asm\x0d\0\x01\0".to_vec();
    let component = Arc::new(ComponentSource {
        sha256: sha256_hex(&bytes),
        bytes,
        precompiled: None,
        cache: CacheDir::Disabled,
    });
    let setup = LevelSetup {
        depth: 1,
        path: "L0/L1".into(),
        grants: Default::default(),
        limits: WireLimits::from(InstanceLimits::default()),
        nest: Default::default(),
        env: Vec::new(),
        ssh: None,
        vm: VmSettings::default(),
        descend: 0,
    };
    let capture = Capture::new("L0", 1 << 16, None);
    let vms = VmContext::new(
        VmSettings::default(),
        None,
        RunDir::Temporary(OnceLock::new()),
        None,
    );
    block_on(async {
        let opened = tokio::time::timeout(
            DEADLINE,
            Connection::open(
                &Target::Local,
                setup,
                Some(component),
                capture,
                &vms,
                None,
                LevelBudget::root(NestLimits::DEFAULT_MAX_LEVELS),
            ),
        )
        .await
        .unwrap_or_else(|_| panic!("Connection::open did not end within {DEADLINE:?}"));
        let mut reach = Reach::default();
        if let Ok(connection) = opened {
            reach.opened = true;
            let call = connection.call("whoami", Vec::new(), Some(DEADLINE / 2));
            let Ok(answer) = tokio::time::timeout(DEADLINE, call).await else {
                panic!("a call did not end within {DEADLINE:?} though its deadline is shorter");
            };
            reach.answered = match answer {
                Ok(_) => true,
                Err(e) => e.kind != WireErrorKind::LevelLost,
            };
        }
        reach
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Structured inputs from seeded random bytes, as the smoke run makes them.
    fn inputs(seed: u64, count: usize) -> impl Iterator<Item = Vec<u8>> {
        let mut rng = fastrand::Rng::with_seed(seed);
        (0..count).map(move |_| {
            let mut data = vec![0; rng.usize(1..=1024)];
            rng.fill(&mut data);
            data[0] |= 1;
            data
        })
    }

    #[test]
    fn frames_decode_generated_streams() {
        let decoded: usize = inputs(1, 500).map(|d| frames(&d).messages).sum();
        assert!(decoded > 500, "only {decoded} messages decoded");
    }

    /// The generated conversations take `serve` past `Load` to each of its
    /// answers: asking for the component, refusing bytes of the wrong hash,
    /// and failing to load bytes of the right one; and a bare `Load` to
    /// `Ready` and answers after it.
    #[test]
    fn child_handshake_reaches_every_answer() {
        let reach: Vec<Reach> = inputs(2, 150).map(|d| child(&d)).collect();
        assert!(reach.iter().any(|r| r.asked), "{reach:?}");
        assert!(reach.iter().any(|r| r.hash_mismatch), "{reach:?}");
        assert!(reach.iter().any(|r| r.load_failed), "{reach:?}");
        assert!(reach.iter().any(|r| r.ready), "{reach:?}");
        assert!(reach.iter().any(|r| r.answers > 0), "{reach:?}");
    }

    /// A stream that stops inside a frame's header ends the child's handshake.
    #[test]
    fn child_ends_on_a_cut_frame() {
        let reach = child(&Input::raw(&[0, 0, 1]));
        assert_eq!(reach, Reach::default());
    }
}
