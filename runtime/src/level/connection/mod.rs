//! The parent side of one hop: a live connection to a child runtime.
//!
//! Opening one runs the handshake (`Hello`, `Load`, the component if the child
//! lacks it, `Ready`). Afterwards a reader task routes `Return`s to waiting
//! calls and `Event`s into the capture of the instance that owns the connection,
//! and a heartbeat task pings the child. A child that closes its stream, sends
//! garbage, or stays silent for [`HEARTBEAT_LOST`] is declared lost: every
//! waiting call fails with `level-lost` naming the level path and the cause, and
//! the transport (and with it the child process) is torn down.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

mod below;
mod calls;
mod journal;
mod snapshot;
mod watch;

pub use below::ChildInfo;
pub use snapshot::Remembered;

use crate::config::SshSettings;
use crate::engine::ComponentSource;
use crate::level::budget::LevelBudget;
use crate::level::transport::{self, Target, Transport, TransportGuard, VmFacts};
use crate::level::vm::VmContext;
use crate::level::vm::monitor::QmpPort;
use crate::output::Capture;
use crate::wire::{
    FrameReader, FrameWriter, HEARTBEAT_INTERVAL, HEARTBEAT_LOST, HELLO_TIMEOUT, LevelAccess,
    LevelSetup, Message, PROTOCOL_VERSION, READY_TIMEOUT, Reach, RemoteError, WireErrorKind,
};
use watch::{Activity, declare_lost, describe_exit, forward, handshake_frame, lock, within};

/// What a waiting call gets: the child's answer, or the cause of the loss.
pub(super) enum Answer {
    Reply(Result<Vec<u8>, RemoteError>),
    Lost(String),
}

/// How much longer than a remote test's own deadline its parent waits for the outcome.
const RUN_SLACK: Duration = Duration::from_secs(30);

/// Frames queued for a child before senders wait.
const OUT_QUEUE: usize = 64;

/// Calls with more argument bytes than this count as activity when their send ends.
const BIG_FRAME: usize = 64 << 10;

pub(super) type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Answer>>>>;

/// A connection to a child runtime that serves one instance of the component.
pub struct Connection {
    info: ChildInfo,
    out: mpsc::Sender<Message>,
    pending: Pending,
    lost: Arc<Mutex<Option<String>>>,
    next_id: AtomicU64,
    tasks: Vec<JoinHandle<()>>,
    guard: Arc<Mutex<Box<dyn TransportGuard>>>,
    /// The QMP monitor of its QEMU, for VM levels booted with the qemu backend.
    qmp: Option<Arc<QmpPort>>,
    /// The budget the child's subtree takes its levels from, and how many it holds.
    budget: Arc<LevelBudget>,
    subtree: Arc<Mutex<u32>>,
    /// Asks the console watcher of a VM child to read now.
    kernel_now: Option<crate::level::vm::kernel::ReadNow>,
    /// What crossed the hop, for the run folder.
    journal: Arc<journal::Journal>,
    /// What booting a VM child decided; kept to restore it from a snapshot.
    vm: Option<VmFacts>,
    /// Where the child's output goes.
    capture: Arc<Capture>,
    /// Whether a lost child's machine is left running (`--keep-failed`).
    keep_failed: bool,
}

/// A connection whose handshake is over, before its tasks run.
struct Parts {
    info: ChildInfo,
    reader: FrameReader<Activity<Box<dyn tokio::io::AsyncRead + Send + Unpin>>>,
    writer: FrameWriter<Box<dyn tokio::io::AsyncWrite + Send + Unpin>>,
    guard: Arc<Mutex<Box<dyn TransportGuard>>>,
    last_seen: Arc<Mutex<Instant>>,
    heartbeat_lost: Duration,
    keep_failed: bool,
    qmp: Option<Arc<QmpPort>>,
    vm: Option<VmFacts>,
    capture: Arc<Capture>,
    budget: Arc<LevelBudget>,
    subtree: Arc<Mutex<u32>>,
    journal: Arc<journal::Journal>,
}

impl Connection {
    /// Reaches `target` (with this level's `own_ssh` settings), starts a runtime
    /// there and loads the component into it, with `setup`; with no component
    /// the child (and the chain it boots) serves bare until
    /// [`Connection::attach`]. Levels the child's subtree opens later are taken
    /// from `budget`.
    pub async fn open(
        target: &Target,
        mut setup: LevelSetup,
        component: Option<Arc<ComponentSource>>,
        capture: Arc<Capture>,
        vms: &VmContext,
        own_ssh: Option<&SshSettings>,
        budget: Arc<LevelBudget>,
    ) -> Result<Self, RemoteError> {
        let path = setup.path.clone();
        let lost_err = |message: String| RemoteError {
            kind: WireErrorKind::LevelLost,
            message: format!("level {path} could not be started: {message}"),
            level_path: path.clone(),
        };
        let Transport {
            reader,
            writer,
            guard,
            ssh_command,
            vm,
            qmp,
            heartbeat_grace,
        } = transport::open(target, &setup, own_ssh, vms).await?;
        let heartbeat_lost = heartbeat_grace.unwrap_or(HEARTBEAT_LOST);
        // A VM level's hop keeps a journal beside its console.
        let journal = Arc::new(match &vm {
            Some(vm) => journal::Journal::create(&vm.console.with_extension("relay")),
            None => journal::Journal::default(),
        });
        // A VM level makes the next ones accept the run's key (it gets the public
        // half only), and is one more SSH jump for the printed commands that reach them.
        if let Some(vm) = &vm {
            let ssh = setup.ssh.take().unwrap_or_default();
            setup.ssh = Some(SshSettings {
                public_key: Some(vm.public_key.clone()),
                key_path: vm.key_path.clone(),
                ..ssh
            });
            setup.vm.jump.push(vm.hop.clone());
        }
        let guard = Arc::new(Mutex::new(guard));
        let last_seen = Arc::new(Mutex::new(Instant::now()));
        let mut reader = FrameReader::new(Activity {
            inner: reader,
            last: last_seen.clone(),
        });
        let mut writer = FrameWriter::new(writer);

        // Hello: who answered, and do we speak the same protocol?
        let hello = handshake_frame(
            &mut reader,
            &guard,
            Instant::now() + HELLO_TIMEOUT,
            format!("no Hello within {} s", HELLO_TIMEOUT.as_secs()),
            "the runtime closed its stream before Hello",
        )
        .await
        .map_err(lost_err)?;
        let (arch, hostname) = match hello {
            Message::Hello {
                version,
                arch,
                hostname,
                ..
            } if version == PROTOCOL_VERSION => {
                journal.note(&format!("← Hello from {hostname} ({arch})"));
                (arch, hostname)
            }
            Message::Hello { version, .. } => {
                return Err(RemoteError {
                    kind: WireErrorKind::Unsupported,
                    message: format!(
                        "the runtime at {path} speaks relay protocol version {version}, this one \
                         speaks {PROTOCOL_VERSION}: use the same matryoshka build at every level"
                    ),
                    level_path: path.clone(),
                });
            }
            other => return Err(lost_err(format!("expected Hello, got {}", other.name()))),
        };

        // Load: hand over the component (only if the child lacks it) and wait for Ready.
        let load = Message::Load {
            component_sha256: component.as_ref().map(|c| c.sha256.clone()),
            setup: Box::new(setup.clone()),
        };
        journal.note(&format!(
            "→ Load {} ({})",
            setup.path,
            component
                .as_ref()
                .map_or("bare: no component".into(), |c| format!(
                    "component {}",
                    c.sha256.get(..12).unwrap_or(&c.sha256)
                ))
        ));
        let sent = writer.send(&load).await;
        if let Err(what) = sent {
            return Err(lost_err(format!("{what}{}", describe_exit(&guard).await)));
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        let below = loop {
            let msg = handshake_frame(
                &mut reader,
                &guard,
                deadline,
                format!("not ready within {} s", READY_TIMEOUT.as_secs()),
                "the runtime closed its stream while loading",
            )
            .await
            .map_err(lost_err)?;
            match msg {
                Message::NeedComponent => {
                    let Some(component) = &component else {
                        return Err(lost_err(
                            "it asked for a component, though loaded bare".into(),
                        ));
                    };
                    journal.note(&format!(
                        "← NeedComponent; → Component ({} bytes)",
                        component.bytes.len()
                    ));
                    let bytes = component.bytes.clone();
                    let precompiled = precompiled_for(component, &arch).await;
                    let sent = writer
                        .send(&Message::Component { bytes, precompiled })
                        .await;
                    if let Err(what) = sent {
                        return Err(lost_err(format!("{what}{}", describe_exit(&guard).await)));
                    }
                }
                Message::Ready { below } => {
                    journal.note(&format!("← Ready ({} levels below)", below.len()));
                    if let Some(e) = below.iter().find_map(|a| a.check(&path).err()) {
                        return Err(lost_err(format!("its Ready names {e}")));
                    }
                    break below;
                }
                Message::Fatal { error } => {
                    journal.note(&format!("← Fatal: {}", error.message));
                    return Err(error);
                }
                Message::Event { level_path, .. } if !within(&setup.path, &level_path) => {
                    return Err(lost_err(format!(
                        "it sent an event as {level_path:?}, outside its own levels"
                    )));
                }
                Message::Event { level_path, event } => forward(&capture, &level_path, event),
                other => {
                    return Err(lost_err(format!(
                        "unexpected {} while loading",
                        other.name()
                    )));
                }
            }
        };

        let access = LevelAccess {
            path: setup.path.clone(),
            reach: match (target, &vm) {
                (_, Some(vm)) => Reach::Vm {
                    port: vm.ssh_port,
                    host_key: vm.host_key.clone(),
                },
                (Target::Ssh(spec), None) => match crate::level::ssh::SshTarget::parse(spec) {
                    Ok(t) => Reach::Ssh {
                        user: t.user,
                        host: t.host,
                        port: t.port,
                    },
                    Err(_) => Reach::Local,
                },
                _ => Reach::Local,
            },
            monitor: vm.as_ref().and_then(|v| v.monitor.clone()),
        };
        let files = vm.as_ref().map(|v| v.files.clone()).unwrap_or_default();
        let info = ChildInfo {
            path: setup.path.clone(),
            depth: setup.depth,
            arch,
            hostname,
            ssh_command,
            accel: vm
                .as_ref()
                .map(|v| (v.accel.clone(), v.accel_reason.clone())),
            access,
            below,
            files,
        };
        Ok(Self::start(Parts {
            info,
            reader,
            writer,
            guard,
            last_seen,
            heartbeat_lost,
            keep_failed: setup.vm.keep_failed,
            qmp: qmp.map(Arc::new),
            vm,
            capture,
            budget,
            subtree: Arc::default(),
            journal,
        }))
    }

    /// Serves a connection whose handshake is over: the reader, writer and
    /// heartbeat tasks, and the kernel watcher of a VM child.
    fn start(parts: Parts) -> Self {
        let Parts {
            info,
            mut reader,
            mut writer,
            guard,
            last_seen,
            heartbeat_lost,
            keep_failed,
            qmp,
            vm,
            capture,
            budget,
            subtree,
            journal,
        } = parts;
        // A VM level's kernel is watched from its console for as long as it is held.
        let (kernel_now, kernel_task) = match &vm {
            Some(vm) => {
                let (now, asked) = mpsc::channel(4);
                let task = tokio::spawn(crate::level::vm::kernel::watch(
                    vm.console.clone(),
                    vm.console_from,
                    info.path.clone(),
                    capture.clone(),
                    asked,
                ));
                (Some(now), Some(task))
            }
            None => (None, None),
        };
        let pending: Pending = Arc::default();
        let lost: Arc<Mutex<Option<String>>> = Arc::default();
        let claimed: Arc<AtomicBool> = Arc::default();
        // Bounded: a caller waits while the child is slow to take its frames.
        let (out, mut out_rx) = mpsc::channel::<Message>(OUT_QUEUE);

        let last_sent = Arc::new(Mutex::new(Instant::now()));
        let writer_task = {
            let last_sent = last_sent.clone();
            let lost = lost.clone();
            let pending = pending.clone();
            let guard = guard.clone();
            let claimed = claimed.clone();
            tokio::spawn(async move {
                while let Some(msg) = out_rx.recv().await {
                    let shutdown = msg == Message::Shutdown;
                    let big = match &msg {
                        Message::Call { args, .. } => args.len() > BIG_FRAME,
                        Message::Attach { .. } => true,
                        _ => false,
                    };
                    let sent = writer.send(&msg).await;
                    // A big call delays the child's pongs behind it: count the end of its send
                    // as a sign of life. Small frames (pings) prove nothing: a pipe takes them
                    // even from a stopped child.
                    if big {
                        *lock(&last_sent) = Instant::now();
                    }
                    if let Err(e) = sent {
                        let cause = format!("cannot write to it: {e}");
                        declare_lost(&lost, &pending, &guard, &claimed, keep_failed, cause).await;
                        return;
                    }
                    if shutdown {
                        return;
                    }
                }
            })
        };
        let reader_task = {
            let lost = lost.clone();
            let pending = pending.clone();
            let guard = guard.clone();
            let out = out.clone();
            let budget = budget.clone();
            let subtree = subtree.clone();
            let claimed = claimed.clone();
            let own = info.path.clone();
            let capture = capture.clone();
            tokio::spawn(async move {
                let cause = loop {
                    let msg = match reader.next().await {
                        None => break "connection closed".to_string(),
                        Some(Err(e)) => break format!("it sent a bad frame: {e}"),
                        Some(Ok(m)) => m,
                    };
                    match msg {
                        Message::Return { id, result } => {
                            if let Some(tx) = lock(&pending).remove(&id) {
                                let _ = tx.send(Answer::Reply(result));
                            }
                        }
                        Message::Event { level_path, .. } if !within(&own, &level_path) => {
                            break format!(
                                "it sent an event as {level_path:?}, outside its own levels ({own}/...)"
                            );
                        }
                        Message::Event { level_path, event } => {
                            forward(&capture, &level_path, event)
                        }
                        Message::Acquire { path, .. } if !within(&own, &path) => {
                            break format!(
                                "it asked for a level as {path:?}, outside its own levels ({own}/...)"
                            );
                        }
                        Message::Acquire { id, path } => {
                            let (budget, subtree, out, lost, claimed) = (
                                budget.clone(),
                                subtree.clone(),
                                out.clone(),
                                lost.clone(),
                                claimed.clone(),
                            );
                            tokio::spawn(async move {
                                let result = budget.acquire(&path).await;
                                if result.is_ok() {
                                    // Counted under the `lost` lock: a child lost meanwhile
                                    // gives it back at once.
                                    let lost = lock(&lost);
                                    if lost.is_some() || claimed.load(Ordering::SeqCst) {
                                        budget.release(1);
                                    } else {
                                        *lock(&subtree) += 1;
                                    }
                                    drop(lost);
                                }
                                let _ = out.send(Message::Acquired { id, result }).await;
                            });
                        }
                        Message::Release { count } => {
                            let mut held = lock(&subtree);
                            let count = count.min(*held);
                            *held -= count;
                            drop(held);
                            budget.release(count);
                        }
                        Message::Pong { .. } => {}
                        Message::Fatal { error } => break format!("it failed: {}", error.message),
                        other => break format!("unexpected {}", other.name()),
                    }
                };
                declare_lost(&lost, &pending, &guard, &claimed, keep_failed, cause).await;
                // A lost child's subtree holds nothing any more (taken under the
                // `lost` lock, like the counting of a granted `Acquire`).
                let lost = lock(&lost);
                let held = std::mem::take(&mut *lock(&subtree));
                drop(lost);
                budget.release(held);
            })
        };
        let heartbeat_task = {
            let claimed = claimed.clone();
            let lost = lost.clone();
            let pending = pending.clone();
            let guard = guard.clone();
            let out = out.clone();
            tokio::spawn(async move {
                let mut seq = 0u64;
                let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
                loop {
                    tick.tick().await;
                    if lock(&lost).is_some() {
                        return;
                    }
                    let silent = lock(&last_seen).elapsed().min(lock(&last_sent).elapsed());
                    if silent > heartbeat_lost {
                        let cause = format!(
                            "it stopped answering heartbeats for {:.1} s",
                            silent.as_secs_f64()
                        );
                        declare_lost(&lost, &pending, &guard, &claimed, keep_failed, cause).await;
                        return;
                    }
                    seq += 1;
                    // A full queue already shows the child is slow; silence decides.
                    if let Err(mpsc::error::TrySendError::Closed(_)) =
                        out.try_send(Message::Ping { seq })
                    {
                        return;
                    }
                }
            })
        };
        Self {
            info,
            out,
            pending,
            lost,
            next_id: AtomicU64::new(1),
            tasks: [writer_task, reader_task, heartbeat_task]
                .into_iter()
                .chain(kernel_task)
                .collect(),
            guard,
            qmp,
            vm,
            capture,
            budget,
            subtree,
            kernel_now,
            journal,
            keep_failed,
        }
    }

    /// What the child told about itself.
    pub fn info(&self) -> &ChildInfo {
        &self.info
    }

    /// The QMP monitor of the child's QEMU, for VM levels booted with the qemu backend.
    pub fn qmp(&self) -> Option<Arc<QmpPort>> {
        self.qmp.clone()
    }
}

/// The artifact of `component` for a child of architecture `arch`: this
/// level's, or compiled here for another architecture.
pub(super) async fn precompiled_for(
    component: &Arc<ComponentSource>,
    arch: &str,
) -> Option<(String, Vec<u8>)> {
    let (component, arch) = (component.clone(), arch.to_string());
    tokio::task::spawn_blocking(move || crate::engine::artifact_for(&component, &arch))
        .await
        .ok()
        .flatten()
}

impl Drop for Connection {
    fn drop(&mut self) {
        let _ = self.out.try_send(Message::Shutdown);
        for t in &self.tasks {
            t.abort();
        }
        lock(&self.guard).shutdown();
        // Everything the child's subtree held is gone with it.
        let held = std::mem::take(&mut *lock(&self.subtree));
        self.budget.release(held);
    }
}
