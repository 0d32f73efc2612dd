//! The child side of a hop: `matryoshka serve --stdio`.
//!
//! Speaks first (`Hello`), loads the component the parent names (from the local
//! cache, or asks for the bytes), keeps one instance of it for the life of the
//! connection, and runs `Call`s on it one at a time while answering `Ping`s.
//! A level loaded bare (a chain booted to be saved) boots its chain and serves
//! with no component until an `Attach` brings one (`attach.rs`).
//! Output of the instance and of every level below it is relayed up as `Event`s.
//! A closed stdin, a `Shutdown` or a bad frame ends the process, and with it
//! every level below.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

mod attach;
mod instance;
mod stdio;

pub use stdio::{serve_stdio, stdin_is_serial_port};

use attach::{Attached, Place, Rights};

use crate::engine::{self, CacheDir};
use crate::level::budget::ParentLink;
use crate::level::vm::{RunDir, VmContext};
use crate::level::{LevelInfo, replicate, uname};
use crate::output::{OutputSink, Stream};
use crate::runner::Chain;
use crate::wire::{
    FrameReader, FrameWriter, MAX_CALL_FRAME, MAX_FRAME, Message, READY_TIMEOUT, RemoteError,
    RemoteEvent, WireErrorKind, WireOutcome,
};

/// Time the parent has to send `Load` after this runtime's `Hello`.
const LOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// Silence from the parent after which a serving runtime exits. Long enough for
/// a parent that is itself a nested guest starved of CPU while it runs this level.
const PARENT_SILENCE: Duration = Duration::from_secs(60);

/// How `serve` was started.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Where components and compiled artifacts are cached.
    pub cache: CacheDir,
    /// Where the levels below boot their images from; `None` for the default
    /// ([`crate::level::vm::image::Image::default_dir`]).
    pub image_dir: Option<PathBuf>,
    /// The version announced in `Hello` (differs from [`crate::wire::PROTOCOL_VERSION`] only in tests).
    pub protocol_version: u32,
    /// A misbehaviour to show the parent, for tests of how a parent copes with
    /// a broken or hostile level (hidden `--inject`).
    pub inject: Option<Inject>,
}

/// Misbehaviours `serve --inject` shows its parent once it is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Inject {
    /// An event tagged with the parent's level path instead of its own.
    ForeignEvent,
    /// 256 MiB of standard output events, as fast as they can be sent.
    EventFlood,
}

/// Serves one parent on the given streams.
pub async fn serve<R, W>(reader: R, writer: W, opts: ServeOptions) -> Result<(), String>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut reader = FrameReader::new(reader);
    let (out, mut out_rx) = mpsc::unbounded_channel::<Message>();
    // Serving's end is said by `closing` (sent, or dropped), not by the last sender
    // going away: the level's place, link and tasks hold senders of their own.
    let (closing, closed) = tokio::sync::oneshot::channel::<()>();
    let writer_task = tokio::spawn(async move {
        let mut writer = FrameWriter::new(writer);
        let mut closed = std::pin::pin!(closed);
        loop {
            let msg = tokio::select! {
                biased;
                _ = &mut closed => break,
                msg = out_rx.recv() => msg,
            };
            let Some(msg) = msg else { return };
            if writer.send(&msg).await.is_err() {
                return;
            }
        }
        // What was queued before the end is still sent; nothing after it.
        out_rx.close();
        while let Some(msg) = out_rx.recv().await {
            if writer.send(&msg).await.is_err() {
                return;
            }
        }
    });
    let (hostname, arch) = uname();
    let _ = out.send(Message::Hello {
        version: opts.protocol_version,
        arch: arch.clone(),
        hostname: hostname.clone(),
        runtime_sha256: replicate::own_sha_from_name(),
    });

    let load = tokio::time::timeout(LOAD_TIMEOUT, reader.next()).await;
    let (sha, setup) = match load {
        Err(_) => {
            return Err(format!(
                "the parent sent no Load within {} s",
                LOAD_TIMEOUT.as_secs()
            ));
        }
        Ok(Some(Ok(Message::Load {
            component_sha256,
            setup,
        }))) => (component_sha256, *setup),
        Ok(Some(Ok(other))) => return Err(format!("expected Load, got {}", other.name())),
        Ok(Some(Err(e))) => return Err(e.to_string()),
        Ok(None) => return Err("the parent closed the stream before Load".into()),
    };
    tracing::debug!(level = %setup.path, "Load of component {:?}", sha);
    let fatal = |message: String| RemoteError {
        kind: WireErrorKind::Internal,
        message,
        level_path: setup.path.clone(),
    };
    // Levels a test opens here are counted at L0, asked for through the parent.
    let link = {
        let out = out.clone();
        ParentLink::new(move |msg| out.send(msg).is_ok())
    };
    let place = Arc::new(Place {
        level: LevelInfo {
            depth: setup.depth,
            path: setup.path.clone(),
            hostname,
            arch,
        },
        ssh: setup.ssh.clone(),
        vms: Arc::new(VmContext::new(
            setup.vm.clone(),
            opts.image_dir.clone(),
            RunDir::Temporary(std::sync::OnceLock::new()),
            opts.cache.dir().map(PathBuf::from),
        )),
        link: link.clone(),
    });
    let attached: Arc<std::sync::OnceLock<Attached>> = Arc::default();
    // The context the chain below is booted with: the component's, or a bare one.
    let ctx = match &sha {
        None => {
            tracing::info!(level = %setup.path, "loaded bare: the component comes with an Attach");
            place.context(Rights::from(&setup), None)
        }
        Some(sha) => {
            let started = std::time::Instant::now();
            let bytes =
                match receive_component(&mut reader, &out, &opts.cache, sha, &setup.path).await? {
                    Ok(bytes) => bytes,
                    Err(message) => {
                        let _ = out.send(Message::Fatal {
                            error: fatal(message),
                        });
                        return finish(closing, writer_task).await;
                    }
                };
            let started_up =
                Attached::load(bytes, sha, &place, Rights::from(&setup), &opts.cache, &out).await;
            match started_up {
                Ok(a) => {
                    tracing::info!(
                        level = %setup.path,
                        "component loaded ({:?}) and instantiated {} ms after Load",
                        a.loaded.source,
                        started.elapsed().as_millis()
                    );
                    let ctx = a.ctx.clone();
                    let _ = attached.set(a);
                    ctx
                }
                Err(e) => {
                    let _ = out.send(Message::Fatal { error: fatal(e) });
                    return finish(closing, writer_task).await;
                }
            }
        }
    };
    // `--levels N`: the levels below this one are booted before it says Ready.
    let chain = if setup.descend > 0 {
        match Chain::boot(&ctx, None, setup.descend, Some(up_sink(&out)), false).await {
            Ok(chain) => Some(Arc::new(chain)),
            Err(error) => {
                let _ = out.send(Message::Fatal { error });
                return finish(closing, writer_task).await;
            }
        }
    } else {
        None
    };
    drop(ctx);
    let below = match &chain {
        Some(chain) => chain.access().await,
        None => Vec::new(),
    };
    let _ = out.send(Message::Ready { below });
    let injected = opts
        .inject
        .map(|inject| tokio::spawn(misbehave(inject, setup.path.clone(), out.clone())));

    // A bare level reads an `Attach` (the component) until it has one.
    let mut bare = attached.get().is_none();
    if bare {
        reader.set_limit(MAX_FRAME);
    }
    let attaching = Arc::new(std::sync::atomic::AtomicBool::new(!bare));
    let not_attached = |id: u64| Message::Return {
        id,
        result: Err(RemoteError {
            kind: WireErrorKind::Unsupported,
            message: format!(
                "no component is loaded at {} yet: its chain was booted bare and got no Attach",
                setup.path
            ),
            level_path: setup.path.clone(),
        }),
    };
    // Calls run one at a time on the instance's task; this loop keeps answering pings.
    let mut tests = Vec::new();
    loop {
        if bare && attached.get().is_some() {
            reader.set_limit(MAX_CALL_FRAME);
            bare = false;
        }
        // The parent pings every HEARTBEAT_INTERVAL; silence means it is gone.
        let Ok(next) = tokio::time::timeout(PARENT_SILENCE, reader.next()).await else {
            tracing::warn!(
                "the parent has been silent for {} s; exiting",
                PARENT_SILENCE.as_secs()
            );
            break;
        };
        match next {
            Some(Ok(Message::Call {
                id,
                function,
                args,
                deadline_ms,
            })) => match attached.get() {
                Some(a) => {
                    let _ = a.calls.send((id, function, args, deadline_ms));
                }
                None => {
                    let _ = out.send(not_attached(id));
                }
            },
            Some(Ok(Message::Run {
                id,
                name,
                deadline_ms,
            })) => {
                let timeout = Duration::from_millis(deadline_ms);
                // At the deepest level of the chain, or here.
                let runs_at = match (&chain, attached.get()) {
                    (Some(chain), _) => Ok(chain.clone()),
                    (None, Some(a)) => Err((a.loaded.clone(), a.ctx.clone())),
                    (None, None) => {
                        let _ = out.send(not_attached(id));
                        continue;
                    }
                };
                let out = out.clone();
                tests.push(tokio::spawn(async move {
                    let outcome = match runs_at {
                        Ok(chain) => chain.forward_run(&name, timeout).await,
                        Err((loaded, ctx)) => {
                            Ok(
                                crate::runner::run_here(loaded, ctx, &name, timeout, up_sink(&out))
                                    .await,
                            )
                        }
                    };
                    let result = outcome.and_then(|o| {
                        postcard::to_allocvec(&WireOutcome::from(o)).map_err(|e| RemoteError {
                            kind: WireErrorKind::Internal,
                            message: format!("cannot encode the outcome of `{name}`: {e}"),
                            level_path: String::new(),
                        })
                    });
                    let _ = out.send(Message::Return { id, result });
                }));
            }
            Some(Ok(Message::Attach { id, attachment })) => {
                if attaching.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    let _ = out.send(Message::Return {
                        id,
                        result: Err(RemoteError {
                            kind: WireErrorKind::InvalidArgument,
                            message: format!("{} already has a component", setup.path),
                            level_path: setup.path.clone(),
                        }),
                    });
                    continue;
                }
                let (out, chain, place, attached, attaching, cache) = (
                    out.clone(),
                    chain.clone(),
                    place.clone(),
                    attached.clone(),
                    attaching.clone(),
                    opts.cache.clone(),
                );
                tests.push(tokio::spawn(async move {
                    let result =
                        attach::attach(*attachment, &place, chain.as_deref(), &cache, &out).await;
                    let result = match result {
                        Ok(a) => {
                            let _ = attached.set(a);
                            Ok(Vec::new())
                        }
                        Err(e) => {
                            // It may be tried again.
                            attaching.store(false, std::sync::atomic::Ordering::SeqCst);
                            Err(e)
                        }
                    };
                    let _ = out.send(Message::Return { id, result });
                }));
            }
            Some(Ok(Message::Collect { id })) => {
                let (out, chain, path) = (out.clone(), chain.clone(), setup.path.clone());
                tests.push(tokio::spawn(async move {
                    let result = collect(&path, chain.as_deref()).await;
                    let _ = out.send(Message::Return { id, result });
                }));
            }
            Some(Ok(Message::Pause { id, paused })) => {
                let (out, chain, path) = (out.clone(), chain.clone(), setup.path.clone());
                tests.push(tokio::spawn(async move {
                    // Stopped for a save: with its init done, so that no copy
                    // restored from the save has to finish it.
                    if paused {
                        crate::level::vm::accel::wait_for_init(&path).await;
                    }
                    let result = match chain {
                        Some(chain) => chain.pause(paused).await.map(|()| Vec::new()),
                        None => Ok(Vec::new()),
                    };
                    let _ = out.send(Message::Return { id, result });
                }));
            }
            Some(Ok(Message::SetClock { id, unix_ms })) => {
                let (out, chain, path) = (out.clone(), chain.clone(), setup.path.clone());
                tests.push(tokio::spawn(async move {
                    let result = set_clock(&path, unix_ms, chain.as_deref()).await;
                    let _ = out.send(Message::Return { id, result });
                }));
            }
            Some(Ok(Message::Ping { seq })) => {
                let _ = out.send(Message::Pong { seq });
            }
            Some(Ok(Message::Cancel { id })) => {
                if let Some(a) = attached.get() {
                    let _ = a.cancel.send(id);
                }
            }
            Some(Ok(Message::Acquired { id, result })) => link.answer(id, result),
            Some(Ok(Message::Shutdown)) => break,
            None => {
                tracing::info!("the parent closed the stream; exiting");
                break;
            }
            Some(Ok(other)) => {
                tracing::warn!("unexpected {} from the parent", other.name());
                break;
            }
            Some(Err(e)) => {
                tracing::warn!("bad frame from the parent: {e}");
                break;
            }
        }
    }
    // Dropping the instance drops its guests, which shuts down every level below.
    if let Some(task) = injected {
        task.abort();
    }
    for test in tests {
        test.abort();
    }
    drop(attached);
    drop(chain);
    finish(closing, writer_task).await
}

/// The component `sha` named at `Load`: from `cache`, or asked of the parent
/// (`NeedComponent`). `Err` ends serving; `Ok(Err)` is said to the parent as
/// `Fatal` first.
async fn receive_component<R>(
    reader: &mut FrameReader<R>,
    out: &mpsc::UnboundedSender<Message>,
    cache: &CacheDir,
    sha: &str,
    path: &str,
) -> Result<Result<Vec<u8>, String>, String>
where
    R: AsyncRead + Unpin,
{
    let started = std::time::Instant::now();
    let short = sha.get(..12).unwrap_or(sha);
    // A level runtime (no compiler) needs the artifact too; without one kept
    // here it asks for both.
    if let Some(bytes) = engine::cached_component(cache, sha)
        && engine::can_load_cached(cache, sha)
    {
        tracing::info!(level = %path, "component {short} was cached here");
        return Ok(Ok(bytes));
    }
    let _ = out.send(Message::NeedComponent);
    reader.set_limit(MAX_FRAME);
    let sent = tokio::time::timeout(READY_TIMEOUT, reader.next()).await;
    reader.set_limit(MAX_CALL_FRAME);
    let (bytes, precompiled) = match sent {
        Err(_) => {
            return Err(format!(
                "the parent sent no component within {} s",
                READY_TIMEOUT.as_secs()
            ));
        }
        Ok(Some(Ok(Message::Component { bytes, precompiled }))) => (bytes, precompiled),
        Ok(Some(Ok(other))) => {
            return Err(format!("expected Component, got {}", other.name()));
        }
        Ok(Some(Err(e))) => return Err(e.to_string()),
        Ok(None) => {
            return Err("the parent closed the stream before the component".into());
        }
    };
    let got = engine::sha256_hex(&bytes);
    if got != sha {
        return Ok(Err(format!(
            "component bytes hash to {got}, expected {sha}"
        )));
    }
    tracing::info!(
        level = %path,
        "component {short} received after {} ms ({} bytes, precompiled artifact: {})",
        started.elapsed().as_millis(),
        bytes.len(),
        precompiled
            .as_ref()
            .map_or("none".to_string(), |(_, a)| format!("{} bytes", a.len()))
    );
    engine::store_component(cache, sha, &bytes);
    if let Some((key, artifact)) = precompiled {
        engine::adopt_artifact(cache, &key, sha, &artifact);
    }
    Ok(Ok(bytes))
}

/// The files of this level and the levels below that go when they go down: its
/// kernel log when it is a VM level (its relay is a serial port), and what its
/// chain collects.
async fn collect(path: &str, chain: Option<&Chain>) -> Result<Vec<u8>, RemoteError> {
    use crate::level::files::{FileKind, LevelFile, own_kernel_log};
    let mut files = Vec::new();
    if stdio::stdin_is_serial_port()
        && let Ok(Some(text)) = tokio::task::spawn_blocking(own_kernel_log).await
    {
        files.push(LevelFile {
            path: path.to_string(),
            kind: FileKind::Dmesg,
            text,
        });
    }
    if let Some(chain) = chain {
        files.extend(chain.collect(true).await);
    }
    postcard::to_allocvec(&files).map_err(|e| RemoteError {
        kind: WireErrorKind::Internal,
        message: format!("cannot encode the levels' files: {e}"),
        level_path: path.to_string(),
    })
}

/// Sets this level's wall clock to `unix_ms` (its parent's), when it is a VM
/// level (its relay is a serial port: the machine is the run's own, restored
/// from a snapshot), then the chain's below. Any other level's clock belongs
/// to its machine and stays as it is.
async fn set_clock(
    path: &str,
    unix_ms: u64,
    chain: Option<&Chain>,
) -> Result<Vec<u8>, RemoteError> {
    if stdio::stdin_is_serial_port() {
        let before = std::time::SystemTime::now();
        set_wall_clock(unix_ms).map_err(|message| RemoteError {
            kind: WireErrorKind::Io,
            message: format!("cannot set the clock of {path}: {message}"),
            level_path: path.to_string(),
        })?;
        let was = before
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i128);
        tracing::info!(level = %path, "clock set {} ms forward", unix_ms as i128 - was);
    }
    if let Some(chain) = chain {
        chain.set_clock().await?;
    }
    Ok(Vec::new())
}

/// `clock_settime(CLOCK_REALTIME)`.
fn set_wall_clock(unix_ms: u64) -> Result<(), String> {
    let time = libc::timespec {
        tv_sec: (unix_ms / 1000) as libc::time_t,
        tv_nsec: ((unix_ms % 1000) * 1_000_000) as libc::c_long,
    };
    // SAFETY: `time` is a valid timespec that outlives the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &time) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().to_string())
    }
}

/// Shows the parent the misbehaviour `inject`.
async fn misbehave(inject: Inject, path: String, out: mpsc::UnboundedSender<Message>) {
    match inject {
        Inject::ForeignEvent => {
            let parent = path.rsplit_once('/').map_or("L0", |(p, _)| p).to_string();
            let _ = out.send(Message::Event {
                level_path: parent,
                event: RemoteEvent::Stdout("written in the parent's name\n".into()),
            });
        }
        Inject::EventFlood => {
            let chunk = "f".repeat(64 << 10);
            for _ in 0..4096 {
                let sent = out.send(Message::Event {
                    level_path: path.clone(),
                    event: RemoteEvent::Stdout(chunk.clone()),
                });
                if sent.is_err() {
                    return;
                }
                tokio::task::yield_now().await;
            }
        }
    }
}

/// Ends serving: the writer task sends what is queued and ends (senders still
/// held elsewhere can add no more); waits for it at most 2 s.
async fn finish(
    closing: tokio::sync::oneshot::Sender<()>,
    writer_task: tokio::task::JoinHandle<()>,
) -> Result<(), String> {
    let _ = closing.send(());
    let _ = tokio::time::timeout(Duration::from_secs(2), writer_task).await;
    Ok(())
}

/// A sink that relays output (of this level or any below) to the parent as `Event`s.
pub(crate) fn up_sink(out: &mpsc::UnboundedSender<Message>) -> OutputSink {
    let out = out.clone();
    Arc::new(move |origin: &str, stream, text: &str| {
        let event = match stream {
            Stream::Stdout => RemoteEvent::Stdout(text.to_string()),
            Stream::Stderr => RemoteEvent::Stderr(text.to_string()),
            Stream::Log(level) => RemoteEvent::Log {
                level,
                message: text.to_string(),
            },
        };
        let _ = out.send(Message::Event {
            level_path: origin.to_string(),
            event,
        });
    })
}
