//! A chain of VM levels booted for a run (`--levels N`), whose deepest level
//! runs every test.
//!
//! - [`kept`]: a chain kept across runs; [`store`]: its cache slot.

mod kept;
mod store;

pub use kept::{asked, boot_kept};
pub use store::Store;

use std::sync::Arc;
use std::time::Duration;

use super::failure;
use crate::event::{FailureKind, Outcome};
use crate::host::LevelContext;
use crate::level::Target;
use crate::level::connection::Connection;
use crate::level::vm::VmRequest;
use crate::level::vm::snapshot::Snapshot;
use crate::output::{Capture, OutputSink};
use crate::wire::{LevelAccess, RemoteError, WireErrorKind};

/// How long the levels of a chain get to send their files before they go down.
const COLLECT_TIMEOUT: Duration = Duration::from_secs(60);

/// A chain of VM levels booted for a run (`--levels N`), whose deepest level runs
/// every test. Output relayed from it goes to the capture of the running test.
pub struct Chain {
    conn: tokio::sync::RwLock<Option<Connection>>,
    relay: OutputSink,
    current: CurrentTest,
    first: Option<Target>,
    levels: u32,
    deepest: String,
    /// Whether `--keep-failed` held the chain after it lost a level (once is enough).
    kept_lost: std::sync::atomic::AtomicBool,
    /// Times it was booted again.
    renewals: std::sync::atomic::AtomicU32,
    /// `--snapshot`: the chain as booted, saved, restored for every test after
    /// the first (and for a retry after a lost level).
    snapshot: std::sync::Mutex<Option<Snapshot>>,
    /// The folder of the snapshot, removed with the chain.
    snapshot_dir: Option<tempfile::TempDir>,
    /// Whether a test ran on the levels up now.
    used: std::sync::atomic::AtomicBool,
    /// Whether it was booted bare (to be saved with no component in it): a
    /// restored copy gets the component attached.
    bare: bool,
}

impl Chain {
    /// Opens `levels` levels below `ctx`'s level: the first is `first` (an SSH
    /// host, a local child runtime) or, when `None`, a VM; the rest are VMs, each
    /// booted by the level above from the image it booted from. `sink` receives
    /// what levels below write outside tests. With `bare`, or when `ctx` has
    /// no component, the levels serve no component until [`Chain::attach`]
    /// (a chain booted to be saved: its snapshot holds no component).
    pub async fn boot(
        ctx: &LevelContext,
        first: Option<Target>,
        levels: u32,
        sink: Option<OutputSink>,
        bare: bool,
    ) -> Result<Self, RemoteError> {
        let (current, relay) = relay_to_tests(sink);
        let conn = open(ctx, first.as_ref(), levels, relay.clone(), bare).await?;
        Ok(Self::with(ctx, conn, relay, current, first, levels, bare))
    }

    /// A chain of `levels` levels below `ctx`'s level, up on `conn`.
    fn with(
        ctx: &LevelContext,
        conn: Connection,
        relay: OutputSink,
        current: CurrentTest,
        first: Option<Target>,
        levels: u32,
        bare: bool,
    ) -> Self {
        let depth = ctx.level.depth + 1;
        let deepest = (depth..depth + levels.max(1))
            .fold(ctx.level.path.clone(), |path, d| format!("{path}/L{d}"));
        Self {
            conn: tokio::sync::RwLock::new(Some(conn)),
            relay,
            current,
            first,
            levels,
            deepest,
            kept_lost: Default::default(),
            renewals: Default::default(),
            snapshot: Default::default(),
            snapshot_dir: None,
            used: Default::default(),
            bare,
        }
    }

    /// Gives the levels of a chain booted bare `ctx`'s component, with its
    /// rights (nothing to do when `ctx` has none).
    pub async fn attach(&self, ctx: &LevelContext) -> Result<(), RemoteError> {
        let Some(component) = &ctx.component else {
            return Ok(());
        };
        match &*self.conn.read().await {
            Some(conn) => self.attach_to(conn, component, ctx).await,
            None => Err(self.down()),
        }
    }

    /// Attaches `component` with `ctx`'s rights to the chain's first level `conn`.
    async fn attach_to(
        &self,
        conn: &Connection,
        component: &Arc<crate::engine::ComponentSource>,
        ctx: &LevelContext,
    ) -> Result<(), RemoteError> {
        let setup = ctx.child_setup(self.levels.saturating_sub(1));
        conn.attach(component, &setup).await
    }

    fn down(&self) -> RemoteError {
        RemoteError {
            kind: WireErrorKind::LevelLost,
            message: "the chain is down".into(),
            level_path: self.deepest.clone(),
        }
    }

    /// `--snapshot`: saves L1's machine, with every level inside it and the
    /// component attached, into a folder of the run folder (removed with the
    /// chain), and runs it on; each test after the first then gets a copy
    /// restored from it, with nothing to attach. Says how long saving took
    /// and how big the state is, or why there is no snapshot and what that
    /// means for the run.
    pub async fn save(&mut self, ctx: &LevelContext) -> Result<String, String> {
        let run_dir =
            ctx.vms.run_dir.path().map_err(|e| {
                format!("the chain was not saved ({e}); the tests share it as booted")
            })?;
        let dir = tempfile::Builder::new()
            .prefix(".snapshot.")
            .tempdir_in(&run_dir)
            .map_err(|e| {
                format!(
                    "the chain was not saved (cannot make a folder in {}: {e}); the tests \
                     share it as booted",
                    run_dir.display()
                )
            })?;
        let first = match self.conn.get_mut() {
            Some(conn) => conn.info().path.clone(),
            None => return Err("the chain is down".into()),
        };
        let name = format!("{}.snapshot", first.replace('/', "-"));
        let saved = self.save_into(&dir.path().join(name)).await?;
        self.snapshot_dir = Some(dir);
        // Saved holding the component: its copies need none attached.
        self.bare = false;
        Ok(format!(
            "saved {} (and the levels inside it) in {:.1} s: {} MiB; each test after the \
             first runs on a copy restored from it",
            saved.machine.path,
            saved.took.as_secs_f64(),
            saved.bytes >> 20
        ))
    }

    /// Saves L1's machine, with every level inside it (stopped first), into
    /// `file`, runs it on and sets its clocks; the tests after the first get
    /// copies restored from it. An error says why, and what it means for the run.
    async fn save_into(&mut self, file: &std::path::Path) -> Result<Snapshot, String> {
        let slot = self.conn.get_mut();
        let Some(conn) = slot.as_ref() else {
            return Err("the chain is down".into());
        };
        // L2.. stopped first: L1's vCPU is then not inside a nested guest when
        // it is saved (QEMU cannot load that state back).
        let saved = match conn.pause_below(true).await {
            Ok(()) => conn.save(file).await,
            Err(e) => Err(e),
        };
        // Stopped for the save, whether it worked or not.
        if let Err(e) = conn.pause(false).await {
            *slot = None;
            return Err(format!(
                "{}; the chain is down: the tests fail unless --retries boots it again",
                e.message
            ));
        }
        if let Err(e) = conn.pause_below(false).await {
            *slot = None;
            return Err(format!(
                "{}; the chain is down: the tests fail unless --retries boots it again",
                e.message
            ));
        }
        // Its clocks stood still while it was saved.
        if let Err(e) = conn.set_clock().await {
            tracing::warn!("{}", e.message);
        }
        let mut saved = saved.map_err(|e| {
            format!(
                "the chain was not saved ({}); the tests share it as booted",
                e.message
            )
        })?;
        if let Err(e) = saved.hold() {
            tracing::warn!("{e}; restores open the state by its name");
        }
        *self.snapshot.get_mut().unwrap_or_else(|e| e.into_inner()) = Some(saved.clone());
        Ok(saved)
    }

    /// Makes sure the next test (or try) runs on levels no test ran on, when
    /// the chain was saved: the levels as booted for the first, a copy restored
    /// from the snapshot after that. A restore that fails boots the chain again
    /// (and the tests after it share that chain).
    pub async fn fresh(&self, ctx: &LevelContext) {
        let snapshot = self
            .snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(snapshot) = snapshot else { return };
        if !self.used.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        self.restore(ctx, &snapshot).await;
    }

    /// Replaces the chain by a copy restored from `snapshot` (a cold boot when
    /// that fails).
    async fn restore(&self, ctx: &LevelContext, snapshot: &Snapshot) {
        let mut conn = self.conn.write().await;
        let restored = async {
            let new = match conn.take() {
                Some(old) => old.restore(snapshot).await?,
                None => return Err(self.down()),
            };
            // Saved with the levels below L1 stopped: they run on first.
            new.pause_below(false).await?;
            // Its clocks stood still since the save.
            if let Err(e) = new.set_clock().await {
                tracing::warn!("{}", e.message);
            }
            // Saved bare: the copy gets the component.
            if let Some(component) = ctx.component.as_ref().filter(|_| self.bare) {
                self.attach_to(&new, component, ctx).await?;
            }
            Ok(new)
        }
        .await;
        match restored {
            Ok(new) => *conn = Some(new),
            Err(e) => {
                tracing::warn!(
                    "restoring the chain from its snapshot failed ({}); booting it again, \
                     and the tests after this one share it",
                    e.message
                );
                *self.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = None;
                // This run's own save goes; one kept in the cache is the next
                // run's to judge.
                if self
                    .snapshot_dir
                    .as_ref()
                    .is_some_and(|d| snapshot.file.starts_with(d.path()))
                {
                    let _ = std::fs::remove_file(&snapshot.file);
                }
                self.set_aside_files(ctx);
                match open(
                    ctx,
                    self.first.as_ref(),
                    self.levels,
                    self.relay.clone(),
                    false,
                )
                .await
                {
                    Ok(new) => *conn = Some(new),
                    Err(e) => tracing::warn!("booting the chain again failed: {}", e.message),
                }
            }
        }
    }

    /// Stops (`paused`) or runs on every VM level of the chain: the deepest
    /// stops first and runs on last, so that while a level is stopped none
    /// below it runs; a served level does this for its parent's save.
    pub async fn pause(&self, paused: bool) -> Result<(), RemoteError> {
        let conn = self.conn.read().await;
        let Some(conn) = &*conn else {
            return Ok(());
        };
        if paused {
            conn.pause_below(true).await?;
            conn.pause(true).await
        } else {
            conn.pause(false).await?;
            conn.pause_below(false).await
        }
    }

    /// Sets the clocks of the chain's levels to this level's.
    pub async fn set_clock(&self) -> Result<(), RemoteError> {
        match &*self.conn.read().await {
            Some(conn) => conn.set_clock().await,
            None => Ok(()),
        }
    }

    /// The level path of the deepest level.
    pub fn deepest(&self) -> String {
        self.deepest.clone()
    }

    /// Tears the chain down and boots it again, for a retry after a level was lost.
    /// The old levels are gone before the new ones boot; when booting fails, every
    /// later test fails with that error.
    pub async fn renew(&self, ctx: &LevelContext) -> Result<(), RemoteError> {
        let snapshot = self
            .snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(snapshot) = snapshot {
            // The retry runs on the restored copy.
            self.restore(ctx, &snapshot).await;
            self.used.store(false, std::sync::atomic::Ordering::SeqCst);
            self.kept_lost
                .store(false, std::sync::atomic::Ordering::SeqCst);
            return Ok(());
        }
        self.save_files(ctx).await;
        let mut conn = self.conn.write().await;
        // Dropping the connection stops L1's QEMU, and every level below with it.
        *conn = None;
        self.set_aside_files(ctx);
        self.kept_lost
            .store(false, std::sync::atomic::Ordering::SeqCst);
        *conn = Some(
            open(
                ctx,
                self.first.as_ref(),
                self.levels,
                self.relay.clone(),
                false,
            )
            .await?,
        );
        Ok(())
    }

    /// Moves the levels' files in the run folder into `chain-N/` before the
    /// chain is booted again: the new levels' files take the same names.
    fn set_aside_files(&self, ctx: &LevelContext) {
        let renewal = self
            .renewals
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        if let Ok(dir) = ctx.vms.run_dir.path() {
            set_aside(&dir, &format!("chain-{renewal}"));
        }
    }

    /// The files of the chain's levels that go when they go down (kernel logs;
    /// below L0 also the consoles and logs kept of the levels booted here, when
    /// `kept_here`).
    pub async fn collect(&self, kept_here: bool) -> Vec<crate::level::files::LevelFile> {
        match &*self.conn.read().await {
            Some(conn) => conn.collect(kept_here, COLLECT_TIMEOUT).await,
            None => Vec::new(),
        }
    }

    /// At L0: writes the files of the chain's levels into the run folder before
    /// they go down.
    pub async fn save_files(&self, ctx: &LevelContext) {
        let files = self.collect(false).await;
        if let Ok(dir) = ctx.vms.run_dir.path() {
            tokio::task::spawn_blocking(move || crate::level::files::write_all(&dir, &files))
                .await
                .ok();
        }
    }

    /// How a person reaches each level of the chain, L1 first.
    pub async fn access(&self) -> Vec<LevelAccess> {
        self.conn
            .read()
            .await
            .as_ref()
            .map(Connection::access)
            .unwrap_or_default()
    }

    /// Whether holding the chain after a failure shows a person anything new:
    /// not once it is down, and after an infrastructure failure (a lost level)
    /// only the first time until it is booted again: the tests after it fail on
    /// the same loss.
    pub async fn worth_keeping(&self, infrastructure: bool) -> bool {
        if self.conn.read().await.is_none() {
            return false;
        }
        !infrastructure
            || !self
                .kept_lost
                .swap(true, std::sync::atomic::Ordering::SeqCst)
    }

    /// Runs `name` at the deepest level for a level above, whose output goes on up.
    pub async fn forward_run(&self, name: &str, timeout: Duration) -> Result<Outcome, RemoteError> {
        match &*self.conn.read().await {
            Some(conn) => {
                let outcome = conn.run_test(name, timeout).await;
                // What L1's kernel printed during the test is the test's (deeper
                // levels' was read by their parents before they answered).
                conn.read_kernel_now().await;
                outcome
            }
            None => Err(RemoteError {
                kind: WireErrorKind::LevelLost,
                message: format!(
                    "{} is down: booting the chain again for a retry failed (the retry's \
                     failure says why)",
                    self.deepest
                ),
                level_path: self.deepest.clone(),
            }),
        }
    }

    /// Runs `name` at the deepest level, its output going into `capture`.
    pub async fn run_test(&self, name: &str, timeout: Duration, capture: &Arc<Capture>) -> Outcome {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(capture.clone());
        let result = self.forward_run(name, timeout).await;
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
        match result {
            Ok(outcome) => outcome,
            Err(e) => Outcome::Failed(failure(FailureKind::Infrastructure, e.message, None)),
        }
    }
}

/// The capture of the test running on a chain, if one is.
type CurrentTest = Arc<std::sync::Mutex<Option<Arc<Capture>>>>;

/// Where output relayed from a chain goes: to the running test's capture,
/// else to `sink`.
fn relay_to_tests(sink: Option<OutputSink>) -> (CurrentTest, OutputSink) {
    let current: CurrentTest = Arc::default();
    let relay: OutputSink = {
        let current = current.clone();
        Arc::new(move |origin: &str, stream, text: &str| {
            let test = current.lock().unwrap_or_else(|e| e.into_inner()).clone();
            match (test, &sink) {
                (Some(capture), _) => {
                    let _ = capture.write_from(origin, stream, text.as_bytes());
                }
                (None, Some(sink)) => sink(origin, stream, text),
                (None, None) => {}
            }
        })
    };
    (current, relay)
}

/// Moves the levels' files in `dir` (`L0-…`) into `dir/<sub>/`.
fn set_aside(dir: &std::path::Path, sub: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let aside = dir.join(sub);
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let is_level_file = name.to_str().is_some_and(|n| n.starts_with("L0-"))
            && entry.file_type().is_ok_and(|t| t.is_file());
        if !is_level_file {
            continue;
        }
        let moved = std::fs::create_dir_all(&aside)
            .and_then(|()| std::fs::rename(entry.path(), aside.join(&name)));
        if let Err(e) = moved {
            tracing::warn!("cannot move {} aside: {e}", entry.path().display());
        }
    }
}

/// What the chain's first level below `ctx` is handed: `ctx`'s rights and
/// `levels - 1` levels to boot below it; when `bare`, no grant and no
/// environment (what the component may do comes with it, in `attach`).
fn setup_for(ctx: &LevelContext, levels: u32, bare: bool) -> crate::wire::LevelSetup {
    let mut setup = ctx.child_setup(levels.saturating_sub(1));
    if bare {
        setup.grants = Default::default();
        setup.env = Vec::new();
    }
    setup
}

/// Opens the chain's first level below `ctx` (`first`, else a VM), which
/// boots the rest; with no component when `bare` or when `ctx` has none.
async fn open(
    ctx: &LevelContext,
    first: Option<&Target>,
    levels: u32,
    relay: OutputSink,
    bare: bool,
) -> Result<Connection, RemoteError> {
    let bare = bare || ctx.component.is_none();
    let capture = Capture::forwarding(&ctx.level.path, usize::MAX, relay);
    let setup = setup_for(ctx, levels, bare);
    let target = match first {
        Some(target) => target.clone(),
        None => Target::Vm(VmRequest {
            arch: (setup.depth as usize)
                .checked_sub(1)
                .and_then(|i| ctx.vms.settings.chain_arch.get(i))
                .cloned(),
            ..VmRequest::default()
        }),
    };
    Connection::open(
        &target,
        setup,
        ctx.component.clone().filter(|_| !bare),
        capture,
        &ctx.vms,
        ctx.ssh.as_ref(),
        ctx.new_budget(),
    )
    .await
}
