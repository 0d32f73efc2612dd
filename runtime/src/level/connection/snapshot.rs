//! Saving a VM child, with every level inside it, and a fresh connection to a
//! copy restored from that state (the machine side is `level/vm/snapshot.rs`).
//! The restored child's runtime serves on the connection it served when it was
//! saved: no handshake, the same levels below it.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::below::ChildInfo;
use super::journal::Journal;
use super::watch::{Activity, lock};
use super::{Connection, Parts};
use crate::level::budget::LevelBudget;
use crate::level::transport::{Transport, VmFacts};
use crate::level::vm::snapshot::Snapshot;
use crate::output::Capture;
use crate::wire::{
    FrameReader, FrameWriter, HEARTBEAT_LOST, Message, Reach, RemoteError, WireErrorKind,
};

/// How long saving a level may take: less than the silence after which its
/// (stopped) runtime would be declared lost.
const SAVE_TIMEOUT: Duration = Duration::from_secs(45);

/// How many times a restore is tried before the chain is booted instead.
const RESTORE_TRIES: u32 = 2;

/// How long QMP commands around a save, and setting the clocks, may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long stopping the levels below a child may take: each level first
/// waits (at most 30 s) for its init to load its modules.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(120);

/// What a parent knows of a VM child it can restore from a snapshot: the
/// facts the child told, and those the parent decided when it booted it.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct Remembered {
    /// What the child told of itself (its levels below, how to reach them).
    pub info: ChildInfo,
    /// What its parent decided (accelerator, key, host key, files).
    pub facts: VmFacts,
}

impl Connection {
    /// Sets the wall clock of the child (when it is a VM level) and of the
    /// levels its chain booted to this level's: a restored level's clock
    /// stood still while its snapshot waited.
    pub async fn set_clock(&self) -> Result<(), RemoteError> {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.request(
            |id| Message::SetClock { id, unix_ms },
            "the clock",
            Some(QMP_TIMEOUT),
        )
        .await
        .map(|_| ())
    }

    /// Stops (`paused`) or runs on the VM levels the child's chain booted,
    /// not the child itself: asked of a chain's first level around its save.
    pub async fn pause_below(&self, paused: bool) -> Result<(), RemoteError> {
        self.request(
            |id| Message::Pause { id, paused },
            if paused {
                "pause below"
            } else {
                "run on below"
            },
            Some(PAUSE_TIMEOUT),
        )
        .await
        .map(|_| ())
    }

    /// Stops or runs on this child's machine (QMP `stop` / `cont`), when it
    /// is a VM level booted with the qemu backend; a no-op otherwise.
    pub async fn pause(&self, paused: bool) -> Result<(), RemoteError> {
        let Some(qmp) = &self.qmp else {
            return Ok(());
        };
        let command = if paused { "stop" } else { "cont" };
        qmp.execute(command, None, QMP_TIMEOUT)
            .await
            .map(|_| ())
            .map_err(|e| RemoteError {
                kind: WireErrorKind::Io,
                message: format!("QMP {command} of {} failed: {e}", self.info.path),
                level_path: self.info.path.clone(),
            })
    }

    /// Saves the child's machine, and with it every level it booted, into
    /// `file`. The child is left stopped: [`Connection::pause`] runs it on.
    /// Only VM children booted with the qemu backend can be saved.
    pub async fn save(&self, file: &Path) -> Result<Snapshot, RemoteError> {
        let unsupported = |why: &str| RemoteError {
            kind: WireErrorKind::Unsupported,
            message: format!("{} cannot be saved: {why}", self.info.path),
            level_path: self.info.path.clone(),
        };
        let (Some(qmp), Some(machine)) = (
            &self.qmp,
            self.vm.as_ref().and_then(|v| v.restorable.as_ref()),
        ) else {
            return Err(unsupported(
                "only a VM level booted by this runtime's QEMU (not libvirt, SSH or a local runtime)",
            ));
        };
        // A restored copy holds what the saved one held; only a subtree that
        // holds no level a test opened is saved, so the copies hold none.
        if *lock(&self.subtree) > 0 {
            return Err(unsupported(
                "tests hold levels below it (only a chain no test ran on is saved)",
            ));
        }
        self.journal.note("→ save (QMP stop, migrate)");
        let saved = crate::level::vm::snapshot::save(qmp, machine, file, SAVE_TIMEOUT).await;
        self.journal.note(&match &saved {
            Ok(s) => format!(
                "saved: {} MiB in {:.1} s",
                s.bytes >> 20,
                s.took.as_secs_f64()
            ),
            Err(e) => format!("not saved: {e}"),
        });
        saved.map_err(|message| RemoteError {
            kind: WireErrorKind::Io,
            message,
            level_path: self.info.path.clone(),
        })
    }

    /// What this connection knows of its child that a copy restored from its
    /// snapshot, in this run or a later one, is known by again (`None` for a
    /// child that is no VM level).
    pub fn remembered(&self) -> Option<Remembered> {
        Some(Remembered {
            info: self.info.clone(),
            facts: self.vm.clone()?,
        })
    }

    /// Replaces this connection's child by a copy restored from `snapshot`
    /// (taken of this child): the old machine is killed (the levels its
    /// subtree held are given back), the new one serves where the saved one
    /// was, holding no level a test opened (see [`Connection::save`]).
    pub async fn restore(self, snapshot: &Snapshot) -> Result<Connection, RemoteError> {
        let Some(remembered) = self.remembered() else {
            return Err(RemoteError {
                kind: WireErrorKind::Unsupported,
                message: format!("{} is no VM level: nothing to restore", self.info.path),
                level_path: self.info.path.clone(),
            });
        };
        let (capture, budget, journal, keep_failed) = (
            self.capture.clone(),
            self.budget.clone(),
            self.journal.clone(),
            self.keep_failed,
        );
        drop(self);
        Self::revive(remembered, snapshot, capture, budget, journal, keep_failed).await
    }

    /// A connection to a child restored from `snapshot` in a later run than
    /// the one that saved it, known by `remembered` (read back from beside the
    /// snapshot). Its output goes to `capture`, its levels count against
    /// `budget`; its hop's journal starts beside its console.
    pub async fn restore_remembered(
        remembered: Remembered,
        snapshot: &Snapshot,
        capture: Arc<Capture>,
        budget: Arc<LevelBudget>,
        keep_failed: bool,
    ) -> Result<Connection, RemoteError> {
        let journal = Arc::new(Journal::create(
            &snapshot.machine.files.console.with_extension("relay"),
        ));
        Self::revive(remembered, snapshot, capture, budget, journal, keep_failed).await
    }

    /// A connection to a child restored from `snapshot`, known by
    /// `remembered` (kept from the connection to the child that was saved, in
    /// this run or, read back from a file, in an earlier one). Its output goes
    /// to `capture`, its levels count against `budget`, its hop is written in
    /// `journal`.
    async fn revive(
        remembered: Remembered,
        snapshot: &Snapshot,
        capture: Arc<Capture>,
        budget: Arc<LevelBudget>,
        journal: Arc<Journal>,
        keep_failed: bool,
    ) -> Result<Connection, RemoteError> {
        let Remembered { info, facts } = remembered;
        let started = Instant::now();
        // A start that fails for a passing reason (a port, memory) gets a
        // second one from the same file before the chain is booted instead. (A
        // state saved while L1 ran a nested guest never loads: `Pause` keeps
        // saves out of that.)
        let mut tries = 0;
        let transport = loop {
            tries += 1;
            match crate::level::vm::restore(snapshot, &facts).await {
                Ok(t) => break t,
                Err(e) => {
                    journal.note(&format!("not restored (try {tries}): {}", e.message));
                    if tries == RESTORE_TRIES {
                        return Err(e);
                    }
                    tracing::info!("restoring {} once more after: {}", info.path, e.message);
                }
            }
        };
        let Transport {
            reader,
            writer,
            guard,
            ssh_command,
            vm,
            qmp,
            heartbeat_grace,
        } = transport;
        journal.note(&format!(
            "restored from {} in {:.2} s",
            snapshot.file.display(),
            started.elapsed().as_secs_f64()
        ));
        let mut info = info;
        info.ssh_command = ssh_command;
        if let Some(vm) = &vm {
            info.access.reach = Reach::Vm {
                port: vm.ssh_port,
                host_key: vm.host_key.clone(),
            };
            info.access.monitor = vm.monitor.clone();
            info.files = vm.files.clone();
        }
        let last_seen = Arc::new(Mutex::new(Instant::now()));
        Ok(Connection::start(Parts {
            info,
            reader: FrameReader::new(Activity {
                inner: reader,
                last: last_seen.clone(),
            }),
            writer: FrameWriter::new(writer),
            guard: Arc::new(Mutex::new(guard)),
            last_seen,
            heartbeat_lost: heartbeat_grace.unwrap_or(HEARTBEAT_LOST),
            keep_failed,
            qmp: qmp.map(Arc::new),
            vm,
            capture,
            budget,
            subtree: Arc::default(),
            journal,
        }))
    }
}
