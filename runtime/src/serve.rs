//! The child side of a hop: `matryoshka serve --stdio`.
//!
//! Speaks first (`Hello`), loads the component the parent names (from the local
//! cache, or asks for the bytes), keeps one instance of it for the life of the
//! connection, and runs `Call`s on it one at a time while answering `Ping`s.
//! Output of the instance and of every level below it is relayed up as `Event`s.
//! A closed stdin, a `Shutdown` or a bad frame ends the process, and with it
//! every level below.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use wasmtime::Store;

use crate::engine::{self, CacheDir};
use crate::host::{HostState, LevelContext, Suite};
use crate::level::vm::{RunDir, VmContext};
use crate::level::{LevelInfo, replicate, uname};
use crate::output::{Capture, OutputSink, Stream};
use crate::runner::Chain;
use crate::suite::{self, LoadedSuite};
use crate::wire::{
    FrameReader, FrameWriter, Message, RemoteError, RemoteEvent, WireErrorKind, WireOutcome,
};

/// Silence from the parent after which a serving runtime exits. Long enough for
/// a parent that is itself a nested guest starved of CPU while it runs this level.
const PARENT_SILENCE: Duration = Duration::from_secs(60);

/// How `serve` was started.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Where components and compiled artifacts are cached.
    pub cache: CacheDir,
    /// The version announced in `Hello` (differs from [`PROTOCOL_VERSION`] only in tests).
    pub protocol_version: u32,
}

/// Serves one parent on stdin/stdout until it goes away. Returns the exit code.
pub async fn serve_stdio(opts: ServeOptions) -> u8 {
    // Pipes (a local parent, OpenSSH's exec channels) are polled directly; tokio's
    // stdin/stdout go through a blocking thread per read and write, which costs
    // tens of microseconds on every hop of every call.
    let result = match stdio_pipes() {
        Some((rx, tx)) => serve(rx, tx, opts).await,
        None => serve(tokio::io::stdin(), tokio::io::stdout(), opts).await,
    };
    crate::process::kill_all();
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("matryoshka serve: {e}");
            1
        }
    }
}

fn stdio_pipes() -> Option<(
    tokio::net::unix::pipe::Receiver,
    tokio::net::unix::pipe::Sender,
)> {
    use std::os::fd::AsFd;
    let stdin = std::io::stdin().as_fd().try_clone_to_owned().ok()?;
    let stdout = std::io::stdout().as_fd().try_clone_to_owned().ok()?;
    if is_serial_port(&stdin) {
        // A VM level's relay port (virtio-serial). Its host end is connected before
        // the guest boots; wait for that all the same, since a read with the host
        // away returns end-of-file. The port is then used in blocking mode through
        // tokio's stdio threads: polled non-blocking with epoll, its second write
        // never reached the host (seen here on Linux 6.1).
        wait_writable(&stdout);
        return None;
    }
    let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(stdin).ok()?;
    let tx = tokio::net::unix::pipe::Sender::from_owned_fd(stdout).ok()?;
    Some((rx, tx))
}

/// Whether this process's stdin is a VM level's relay port (a character device
/// other than a terminal).
pub fn stdin_is_serial_port() -> bool {
    use std::os::fd::AsFd;
    std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .is_ok_and(|fd| is_serial_port(&fd))
}

/// Whether `fd` is a character device other than a terminal.
fn is_serial_port(fd: &std::os::fd::OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileTypeExt;
    let Ok(file) = fd.try_clone().map(std::fs::File::from) else {
        return false;
    };
    // SAFETY: isatty(3) only inspects the descriptor.
    let tty = unsafe { libc::isatty(fd.as_raw_fd()) } == 1;
    !tty && file
        .metadata()
        .is_ok_and(|m| m.file_type().is_char_device())
}

/// Blocks until `fd` can be written: a virtio-serial port is writable only while
/// its host end is connected.
fn wait_writable(fd: &std::os::fd::OwnedFd) {
    use std::os::fd::AsRawFd;
    loop {
        let mut poll = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the duration of the call.
        let n = unsafe { libc::poll(&mut poll, 1, 1000) };
        if n > 0 && poll.revents & libc::POLLOUT != 0 {
            return;
        }
        // With the host away the port reports a hang-up at once: look again soon.
        if n != 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Serves one parent on the given streams.
pub async fn serve<R, W>(reader: R, writer: W, opts: ServeOptions) -> Result<(), String>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut reader = FrameReader::new(reader);
    let (out, mut out_rx) = mpsc::unbounded_channel::<Message>();
    let writer_task = tokio::spawn(async move {
        let mut writer = FrameWriter::new(writer);
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

    let (sha, setup) = match reader.next().await {
        Some(Ok(Message::Load {
            component_sha256,
            setup,
        })) => (component_sha256, *setup),
        Some(Ok(other)) => return Err(format!("expected Load, got {other:?}")),
        Some(Err(e)) => return Err(e.to_string()),
        None => return Err("the parent closed the stream before Load".into()),
    };
    tracing::debug!(level = %setup.path, "Load of component {component}", component = sha);
    let fatal = |message: String| RemoteError {
        kind: WireErrorKind::Internal,
        message,
        level_path: setup.path.clone(),
    };
    let started = std::time::Instant::now();
    let short = sha.get(..12).unwrap_or(&sha);
    let bytes = match engine::cached_component(&opts.cache, &sha) {
        Some(bytes) => {
            tracing::info!(level = %setup.path, "component {short} was cached here");
            bytes
        }
        None => {
            let _ = out.send(Message::NeedComponent);
            let (bytes, precompiled) = match reader.next().await {
                Some(Ok(Message::Component { bytes, precompiled })) => (bytes, precompiled),
                Some(Ok(other)) => return Err(format!("expected Component, got {other:?}")),
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("the parent closed the stream before the component".into()),
            };
            let got = engine::sha256_hex(&bytes);
            if got != sha {
                let error = fatal(format!("component bytes hash to {got}, expected {sha}"));
                let _ = out.send(Message::Fatal { error });
                return finish(out, writer_task).await;
            }
            tracing::info!(
                level = %setup.path,
                "component {short} received after {} ms ({} bytes, precompiled artifact: {})",
                started.elapsed().as_millis(),
                bytes.len(),
                precompiled.as_ref().map_or("none".to_string(), |(_, a)| format!("{} bytes", a.len()))
            );
            engine::store_component(&opts.cache, &sha, &bytes);
            if let Some((key, artifact)) = precompiled {
                engine::adopt_artifact(&opts.cache, &key, &sha, &artifact);
            }
            bytes
        }
    };
    let cache = opts.cache.clone();
    let label = PathBuf::from(format!("{sha}.wasm"));
    let loaded =
        match tokio::task::spawn_blocking(move || suite::load_bytes(&label, bytes, &cache)).await {
            Ok(Ok(suite)) => suite,
            Ok(Err(e)) => {
                let _ = out.send(Message::Fatal {
                    error: fatal(e.to_string()),
                });
                return finish(out, writer_task).await;
            }
            Err(e) => return Err(format!("loading the component panicked: {e}")),
        };
    let ctx = Arc::new(LevelContext {
        level: LevelInfo {
            depth: setup.depth,
            path: setup.path.clone(),
            hostname,
            arch,
        },
        grants: setup.grants.clone(),
        limits: setup.limits.into(),
        nest: setup.nest,
        env: setup.env.clone(),
        ssh: setup.ssh.clone(),
        component: loaded.component.clone(),
        vms: VmContext::new(
            setup.vm.clone(),
            None,
            RunDir::Temporary(std::sync::OnceLock::new()),
            opts.cache.dir().map(PathBuf::from),
        ),
    });
    let loaded = Arc::new(loaded);
    let mut instance = match Instance::start(&loaded, &ctx, &out).await {
        Ok(i) => i,
        Err(e) => {
            let _ = out.send(Message::Fatal { error: fatal(e) });
            return finish(out, writer_task).await;
        }
    };
    tracing::info!(
        level = %setup.path,
        "component loaded ({:?}) and instantiated {} ms after Load",
        loaded.source,
        started.elapsed().as_millis()
    );
    // `--levels N`: the levels below this one are booted before it says Ready.
    let chain = if setup.descend > 0 {
        match Chain::boot(&ctx, setup.descend, Some(up_sink(&out))).await {
            Ok(chain) => Some(Arc::new(chain)),
            Err(error) => {
                let _ = out.send(Message::Fatal { error });
                return finish(out, writer_task).await;
            }
        }
    } else {
        None
    };
    let _ = out.send(Message::Ready);

    // Calls run one at a time on the instance task; this loop keeps answering pings.
    let (calls, mut calls_rx) = mpsc::unbounded_channel::<(u64, String, Vec<u8>, Option<u64>)>();
    let (cancel, mut cancel_rx) = mpsc::unbounded_channel::<u64>();
    let worker = {
        let out = out.clone();
        let ctx = ctx.clone();
        let loaded = loaded.clone();
        tokio::spawn(async move {
            while let Some((id, function, args, deadline)) = calls_rx.recv().await {
                let result = instance
                    .call(
                        &loaded,
                        &ctx,
                        &out,
                        &function,
                        args,
                        deadline,
                        id,
                        &mut cancel_rx,
                    )
                    .await;
                let _ = out.send(Message::Return { id, result });
            }
        })
    };
    let mut tests = Vec::new();
    loop {
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
            })) => {
                let _ = calls.send((id, function, args, deadline_ms));
            }
            Some(Ok(Message::Run {
                id,
                name,
                deadline_ms,
            })) => {
                let timeout = Duration::from_millis(deadline_ms);
                let (out, chain, loaded, ctx) =
                    (out.clone(), chain.clone(), loaded.clone(), ctx.clone());
                tests.push(tokio::spawn(async move {
                    let outcome = match chain {
                        Some(chain) => chain.forward_run(&name, timeout).await,
                        None => {
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
            Some(Ok(Message::Ping { seq })) => {
                let _ = out.send(Message::Pong { seq });
            }
            Some(Ok(Message::Cancel { id })) => {
                let _ = cancel.send(id);
            }
            Some(Ok(Message::Shutdown)) => break,
            None => {
                tracing::info!("the parent closed the stream; exiting");
                break;
            }
            Some(Ok(other)) => {
                tracing::warn!("unexpected message from the parent: {other:?}");
                break;
            }
            Some(Err(e)) => {
                tracing::warn!("bad frame from the parent: {e}");
                break;
            }
        }
    }
    // Dropping the instance drops its guests, which shuts down every level below.
    worker.abort();
    let _ = worker.await;
    for test in tests {
        test.abort();
    }
    drop(chain);
    finish(out, writer_task).await
}

async fn finish(
    out: mpsc::UnboundedSender<Message>,
    writer_task: tokio::task::JoinHandle<()>,
) -> Result<(), String> {
    drop(out);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer_task).await;
    Ok(())
}

/// The one instance a connection keeps, re-created if a call traps.
struct Instance {
    store: Store<HostState>,
    suite: Suite,
}

impl Instance {
    async fn start(
        loaded: &LoadedSuite,
        ctx: &Arc<LevelContext>,
        out: &mpsc::UnboundedSender<Message>,
    ) -> Result<Self, String> {
        let capture = Capture::forwarding(&ctx.level.path, ctx.limits.output_bytes, up_sink(out));
        let state = HostState::new(ctx.clone(), capture).map_err(|e| format!("{e:#}"))?;
        let mut store = crate::runner::new_store(&loaded.engine, state);
        let suite = loaded
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(|e| format!("cannot instantiate the component: {e:#}"))?;
        Ok(Self { store, suite })
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one call's full context, used once"
    )]
    async fn call(
        &mut self,
        loaded: &LoadedSuite,
        ctx: &Arc<LevelContext>,
        out: &mpsc::UnboundedSender<Message>,
        function: &str,
        args: Vec<u8>,
        deadline_ms: Option<u64>,
        id: u64,
        cancel: &mut mpsc::UnboundedReceiver<u64>,
    ) -> Result<Vec<u8>, RemoteError> {
        let path = ctx.level.path.clone();
        let err = |kind, message: String| RemoteError {
            kind,
            message,
            level_path: path.clone(),
        };
        self.store.data().capture().reset_budget();
        let outcome = {
            let store = &mut self.store;
            let suite = &self.suite;
            let call = suite.call_call(&mut *store, function, &args);
            let deadline = deadline_ms.map(Duration::from_millis);
            tokio::select! {
                r = async {
                    match deadline {
                        Some(d) => tokio::time::timeout(d, call).await.ok(),
                        None => Some(call.await),
                    }
                } => r.map(Some),
                () = cancelled(cancel, id) => Some(None),
            }
        };
        let mut kind = WireErrorKind::Internal;
        let trapped = match outcome {
            Some(Some(Ok(result))) => {
                // A call that failed after a level below could not be booted or was
                // lost failed for that reason: say so to the parent, whatever kind
                // the component chose.
                let lost = self.store.data().infrastructure_error().is_some();
                return result.map_err(|e| RemoteError {
                    kind: if lost {
                        WireErrorKind::LevelLost
                    } else {
                        e.kind.into()
                    },
                    message: e.message,
                    level_path: e.level_path,
                });
            }
            Some(Some(Err(trap))) => {
                let panic = self.store.data_mut().take_panic();
                match panic {
                    Some(f) => format!(
                        "`{function}` panicked at {path}: {}{}",
                        f.message,
                        f.file
                            .map(|file| format!(" ({file}:{})", f.line.unwrap_or(0)))
                            .unwrap_or_default()
                    ),
                    None => format!("`{function}` trapped at {path}: {trap:#}"),
                }
            }
            Some(None) => format!("`{function}` was cancelled at {path}"),
            None => {
                kind = WireErrorKind::Timeout;
                format!(
                    "`{function}` did not return within {} ms at {path}",
                    deadline_ms.unwrap_or_default()
                )
            }
        };
        // The instance is unusable after a trap or an abandoned call: start a new one.
        match Self::start(loaded, ctx, out).await {
            Ok(fresh) => *self = fresh,
            Err(e) => tracing::error!("cannot restart the instance: {e}"),
        }
        Err(err(
            kind,
            format!("{trapped}; the remote instance was restarted and its state is lost"),
        ))
    }
}

/// A sink that relays output (of this level or any below) to the parent as `Event`s.
fn up_sink(out: &mpsc::UnboundedSender<Message>) -> OutputSink {
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

async fn cancelled(cancel: &mut mpsc::UnboundedReceiver<u64>, id: u64) {
    while let Some(c) = cancel.recv().await {
        if c == id {
            return;
        }
    }
    std::future::pending::<()>().await;
}
