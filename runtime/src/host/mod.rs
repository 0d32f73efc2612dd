//! Host functions a test component imports, and the per-instance state behind them.
//!
//! This module owns the generated bindings of the `matryoshka:test/suite` world.
//! Each interface has its own submodule, which is the only place that knows the
//! backend of that interface. Everything the store carries for one instance —
//! WASI context, grants, limits, captured output — lives in [`HostState`].

mod exec;
mod libvirt;
mod limits;
mod log;
mod nest;
mod passthrough;
mod qmp;
mod report;

use std::sync::Arc;

use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

pub use limits::{MemoryLimitExceeded, MemoryLimiter};

pub use nest::GuestHandle;

use crate::config::{Grants, InstanceLimits, NestLimits, SshSettings};
use crate::engine::ComponentSource;
use crate::level::LevelInfo;
use crate::level::budget::LevelBudget;
use crate::level::vm::VmContext;
use crate::output::{Capture, LogLevel, Stream};
use crate::wire::{LevelSetup, WireErrorKind};

#[expect(
    missing_docs,
    reason = "generated from the WIT package, which documents every item"
)]
pub(crate) mod bindings {
    wasmtime::component::bindgen!({
        path: "../guest-sdk/wit",
        world: "suite",
        imports: {
            "matryoshka:test/host.exec": async | trappable,
            "matryoshka:test/nest.[static]guest.connect": async | trappable,
            "matryoshka:test/nest.[static]guest.boot": async | trappable,
            "matryoshka:test/nest.[method]guest.call": async | trappable,
            "matryoshka:test/qmp.execute": async | trappable,
            "matryoshka:test/qmp.wait-event": async | trappable,
            "matryoshka:test/passthrough.list-scsi": async | trappable,
            "matryoshka:test/passthrough.[static]scsi-debug-disk.create": async | trappable,
            "matryoshka:test/passthrough.[method]scsi-debug-disk.device": async | trappable,
            "matryoshka:test/passthrough.[drop]scsi-debug-disk": async | trappable,
            "matryoshka:test/libvirt.[static]connection.open": async | trappable,
            "matryoshka:test/libvirt.[method]connection.define-domain": async | trappable,
            "matryoshka:test/libvirt.[method]connection.create-domain": async | trappable,
            "matryoshka:test/libvirt.[method]connection.lookup-domain": async | trappable,
            "matryoshka:test/libvirt.[method]connection.list-domains": async | trappable,
            "matryoshka:test/libvirt.[method]connection.hypervisor": async | trappable,
            "matryoshka:test/libvirt.[method]connection.capabilities": async | trappable,
            "matryoshka:test/libvirt.[drop]connection": async | trappable,
            "matryoshka:test/libvirt.[method]domain.name": async | trappable,
            "matryoshka:test/libvirt.[method]domain.uuid": async | trappable,
            "matryoshka:test/libvirt.[method]domain.xml-desc": async | trappable,
            "matryoshka:test/libvirt.[method]domain.start": async | trappable,
            "matryoshka:test/libvirt.[method]domain.shutdown": async | trappable,
            "matryoshka:test/libvirt.[method]domain.destroy": async | trappable,
            "matryoshka:test/libvirt.[method]domain.undefine": async | trappable,
            "matryoshka:test/libvirt.[method]domain.state": async | trappable,
            "matryoshka:test/libvirt.[method]domain.attach-device": async | trappable,
            "matryoshka:test/libvirt.[method]domain.detach-device": async | trappable,
            "matryoshka:test/libvirt.[method]domain.qemu-monitor-command": async | trappable,
            "matryoshka:test/libvirt.[drop]domain": async | trappable,
            default: trappable,
        },
        exports: { default: async },
        with: {
            "matryoshka:test/nest.guest": super::GuestHandle,
            "matryoshka:test/passthrough.scsi-debug-disk": super::passthrough::ScsiDebugHandle,
            "matryoshka:test/libvirt.connection": super::libvirt::ConnectionHandle,
            "matryoshka:test/libvirt.domain": super::libvirt::DomainHandle,
        },
    });
}

pub use bindings::matryoshka::test::types::{Error as WitError, ErrorKind, Failure, TestCase};
pub use bindings::{Suite, SuitePre};

/// Everything an instance at this level may know and use, shared by all its instances.
#[derive(Debug)]
pub struct LevelContext {
    /// Where this level is.
    pub level: LevelInfo,
    /// What the component may reach.
    pub grants: Grants,
    /// Limits of each instance.
    pub limits: InstanceLimits,
    /// How deep the chain may go and how many levels a test may hold.
    pub nest: NestLimits,
    /// Environment variables of the component, handed down the chain.
    pub env: Vec<(String, String)>,
    /// How to reach SSH levels below this one.
    pub ssh: Option<SshSettings>,
    /// The component, for the levels below; `None` at a bare level (a chain
    /// booted to be saved) until an `Attach` brings it, and no instance runs
    /// there before.
    pub component: Option<Arc<ComponentSource>>,
    /// How VM levels are booted from here (shared by the bare and the
    /// attached context of a level).
    pub vms: Arc<VmContext>,
    /// At a served level, the parent's count of the levels a test holds; at L0
    /// none: each instance counts its own.
    pub parent_budget: Option<Arc<LevelBudget>>,
}

impl LevelContext {
    /// The budget a new instance (or a `--levels` chain) takes its levels from.
    pub fn new_budget(&self) -> Arc<LevelBudget> {
        self.parent_budget
            .clone()
            .unwrap_or_else(|| LevelBudget::root(self.nest.max_levels))
    }

    /// What the next level below this one is told at `Load`: its place, this level's
    /// grants and limits (never more), and `descend` more VM levels to boot below it.
    pub fn child_setup(&self, descend: u32) -> LevelSetup {
        let depth = self.level.depth + 1;
        LevelSetup {
            depth,
            path: format!("{}/L{depth}", self.level.path),
            grants: self.grants.clone(),
            limits: self.limits.into(),
            nest: self.nest,
            env: self.env.clone(),
            ssh: self.ssh.as_ref().map(SshSettings::for_child),
            vm: self.vms.settings.clone(),
            descend,
        }
    }
}

/// The data of a store: everything one component instance can reach.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limiter: MemoryLimiter,
    ctx: Arc<LevelContext>,
    /// The component this instance runs (the one the levels it opens get).
    component: Arc<ComponentSource>,
    capture: Arc<Capture>,
    budget: Arc<LevelBudget>,
    /// Process groups of the commands this instance ran, killed with it.
    groups: crate::process::Groups,
    /// libvirt handles this instance holds.
    virt_usage: Arc<libvirt::Usage>,
    panic: Option<Failure>,
    /// The first level this instance could not boot or reach: a failing test
    /// that met one is reported as an infrastructure error with this cause.
    infrastructure: Option<String>,
    /// The `scsi_debug` disk this instance made, also held here so that it is
    /// unloaded only after the levels it was passed to are gone (see `Drop`).
    scsi_disks: Vec<Arc<crate::scsi::debug::ScsiDebugDisk>>,
}

impl Drop for HostState {
    /// Tears down what the instance still holds in dependency order, whatever
    /// order its handles are in: first the table (levels below: their QEMU is
    /// killed, their libvirt domains destroyed; libvirt connections: what the test
    /// made is cleaned up), then the `scsi_debug` disks, which a level's QEMU held.
    /// Both block (libvirt calls, `modprobe -r`): on a multi-thread runtime the
    /// worker is handed over to others while they run.
    fn drop(&mut self) {
        let table = std::mem::replace(&mut self.table, ResourceTable::new());
        let disks = std::mem::take(&mut self.scsi_disks);
        blocking(move || {
            drop(table);
            drop(disks);
        });
    }
}

/// Runs `f`, which blocks, without stalling the async tasks of this thread's
/// runtime where it can (`block_in_place` on a multi-thread runtime).
pub(crate) fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

impl HostState {
    /// State for one instance: WASI with only the granted preopens, captured stdio.
    pub fn new(ctx: Arc<LevelContext>, capture: Arc<Capture>) -> anyhow::Result<Self> {
        let Some(component) = ctx.component.clone() else {
            anyhow::bail!(
                "no component is loaded at {} yet (its chain was booted bare)",
                ctx.level.path
            );
        };
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(capture.stream(Stream::Stdout))
            .stderr(capture.stream(Stream::Stderr))
            .envs(&ctx.env)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        for fs in &ctx.grants.fs {
            let perms = if fs.writable {
                FsPerms::ReadWrite
            } else {
                FsPerms::ReadOnly
            };
            // A granted folder missing at this level is not a lost level: the
            // test is told, and its own opens under that path fail as not found.
            if let Err(e) = wasi.preopened_dir(&fs.host, &fs.guest, perms) {
                let note = format!(
                    "the granted folder {} is not available at {} ({e:#}); {} is not mounted \
                     for the component",
                    fs.host.display(),
                    ctx.level.path,
                    fs.guest
                );
                let _ = capture.write(Stream::Log(LogLevel::Warn), note.as_bytes());
            }
        }
        Ok(Self {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limiter: MemoryLimiter::new(ctx.limits.memory_bytes),
            budget: ctx.new_budget(),
            groups: crate::process::Groups::default(),
            virt_usage: Arc::default(),
            ctx,
            component,
            capture,
            panic: None,
            infrastructure: None,
            scsi_disks: Vec::new(),
        })
    }

    /// The failure the guest reported just before it trapped, if any.
    pub fn take_panic(&mut self) -> Option<Failure> {
        self.panic.take()
    }

    /// Why a level could not be booted or reached, if that happened in this instance.
    pub fn infrastructure_error(&self) -> Option<&str> {
        self.infrastructure.as_deref()
    }

    /// Whether any directory is preopened for the guest.
    pub fn has_fs_grants(&self) -> bool {
        !self.ctx.grants.fs.is_empty()
    }

    /// The capture buffer of this instance.
    pub fn capture(&self) -> &Arc<Capture> {
        &self.capture
    }

    fn error(&self, kind: ErrorKind, message: String) -> WitError {
        WitError {
            kind,
            message,
            level_path: self.ctx.level.path.clone(),
        }
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl bindings::matryoshka::test::types::Host for HostState {}

/// A linker with WASI and every matryoshka interface.
pub fn linker(engine: &wasmtime::Engine) -> anyhow::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    bindings::Suite::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)?;
    Ok(linker)
}

impl From<ErrorKind> for WireErrorKind {
    fn from(k: ErrorKind) -> Self {
        match k {
            ErrorKind::Denied => Self::Denied,
            ErrorKind::Timeout => Self::Timeout,
            ErrorKind::Io => Self::Io,
            ErrorKind::NotFound => Self::NotFound,
            ErrorKind::InvalidArgument => Self::InvalidArgument,
            ErrorKind::LevelLost => Self::LevelLost,
            ErrorKind::Unsupported => Self::Unsupported,
            ErrorKind::Internal => Self::Internal,
        }
    }
}

impl From<WireErrorKind> for ErrorKind {
    fn from(k: WireErrorKind) -> Self {
        match k {
            WireErrorKind::Denied => Self::Denied,
            WireErrorKind::Timeout => Self::Timeout,
            WireErrorKind::Io => Self::Io,
            WireErrorKind::NotFound => Self::NotFound,
            WireErrorKind::InvalidArgument => Self::InvalidArgument,
            WireErrorKind::LevelLost => Self::LevelLost,
            WireErrorKind::Unsupported => Self::Unsupported,
            WireErrorKind::Internal => Self::Internal,
        }
    }
}
