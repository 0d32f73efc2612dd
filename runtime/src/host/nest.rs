//! The `nest` interface: handles to levels below this one.
//!
//! A `guest` resource owns a relay [`Connection`]; dropping the resource shuts
//! the child runtime (and everything below it) down.

use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::Resource;

use super::HostState;
use super::bindings::matryoshka::test::nest::{Backend as WitBackend, Host, HostGuest, VmSpec};
use super::bindings::matryoshka::test::types::{Error as WitError, ErrorKind};
use crate::config::AccelPolicy;
use crate::level::Target;
use crate::level::budget::LevelBudget;
use crate::level::connection::Connection;
use crate::level::vm::{Backend, VmRequest};
use crate::output::{LogLevel, Stream};
use crate::wire::{RemoteError, WireErrorKind};

/// The host side of a `guest` resource. Dropping it closes the connection
/// (every level below goes) and gives its level back to the test's budget.
pub struct GuestHandle {
    conn: Arc<Connection>,
    _held: Held,
}

impl GuestHandle {
    /// The relay connection to that level.
    pub(super) fn connection(&self) -> &Arc<Connection> {
        &self.conn
    }
}

/// One level taken from a budget, given back when dropped.
struct Held(Arc<LevelBudget>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.release(1);
    }
}

impl Host for HostState {}

impl HostGuest for HostState {
    async fn connect(
        &mut self,
        target: String,
    ) -> wasmtime::Result<Result<Resource<GuestHandle>, WitError>> {
        match Target::parse(&target) {
            Ok(target) => self.open_level(target).await,
            Err(m) => Ok(Err(self.error(ErrorKind::InvalidArgument, m))),
        }
    }

    async fn boot(
        &mut self,
        spec: VmSpec,
    ) -> wasmtime::Result<Result<Resource<GuestHandle>, WitError>> {
        let accel = match spec.accel.as_deref().map(|a| (a, AccelPolicy::parse(a))) {
            None => None,
            Some((_, Some(policy))) => Some(policy),
            Some((other, None)) => {
                return Ok(Err(self.error(
                    ErrorKind::InvalidArgument,
                    format!("unknown accel `{other}`: expected auto, kvm or tcg"),
                )));
            }
        };
        let req = VmRequest {
            memory_mib: spec.memory_mib,
            cpus: spec.cpus,
            arch: spec.arch,
            image: spec.image.map(Into::into),
            accel,
            boot_timeout: spec.boot_timeout_ms.map(Duration::from_millis),
            backend: match spec.backend {
                None | Some(WitBackend::Qemu) => Backend::Qemu,
                Some(WitBackend::Libvirt) => Backend::Libvirt,
            },
            scsi: spec
                .scsi
                .into_iter()
                .map(super::passthrough::address_from_wit)
                .collect(),
        };
        self.open_level(Target::Vm(req)).await
    }

    async fn call(
        &mut self,
        guest: Resource<GuestHandle>,
        function: String,
        args: Vec<u8>,
        timeout_ms: Option<u64>,
    ) -> wasmtime::Result<Result<Vec<u8>, WitError>> {
        let conn = self.table.get(&guest)?.conn.clone();
        let result = conn
            .call(&function, args, timeout_ms.map(Duration::from_millis))
            .await;
        if let Err(e) = &result
            && e.kind == WireErrorKind::LevelLost
        {
            self.note_infrastructure(e);
        }
        Ok(result.map_err(from_remote))
    }

    fn level(&mut self, guest: Resource<GuestHandle>) -> wasmtime::Result<u32> {
        Ok(self.table.get(&guest)?.conn.info().depth)
    }

    fn level_path(&mut self, guest: Resource<GuestHandle>) -> wasmtime::Result<String> {
        Ok(self.table.get(&guest)?.conn.info().path.clone())
    }

    fn arch(&mut self, guest: Resource<GuestHandle>) -> wasmtime::Result<String> {
        Ok(self.table.get(&guest)?.conn.info().arch.clone())
    }

    fn hostname(&mut self, guest: Resource<GuestHandle>) -> wasmtime::Result<String> {
        Ok(self.table.get(&guest)?.conn.info().hostname.clone())
    }

    fn ssh_command(&mut self, guest: Resource<GuestHandle>) -> wasmtime::Result<Option<String>> {
        Ok(self.table.get(&guest)?.conn.info().ssh_command.clone())
    }

    fn accel(&mut self, guest: Resource<GuestHandle>) -> wasmtime::Result<Option<String>> {
        Ok(self
            .table
            .get(&guest)?
            .conn
            .info()
            .accel
            .as_ref()
            .map(|(accel, _)| accel.clone()))
    }

    fn drop(&mut self, guest: Resource<GuestHandle>) -> wasmtime::Result<()> {
        let handle = self.table.delete(guest)?;
        // Stopping a level blocks (killing and reaping QEMU, destroying a domain).
        super::blocking(move || drop(handle));
        Ok(())
    }
}

impl HostState {
    /// Reaches the next level and keeps a handle to it.
    async fn open_level(
        &mut self,
        target: Target,
    ) -> wasmtime::Result<Result<Resource<GuestHandle>, WitError>> {
        if !self.ctx.grants.nest {
            return Ok(Err(self.error(
                ErrorKind::Denied,
                format!(
                    "reaching another level is not granted at {}; add --grant nest \
                     (or nest = true under [grants] in matryoshka.toml)",
                    self.ctx.level.path
                ),
            )));
        }
        let setup = self.ctx.child_setup(0);
        let max_depth = self.ctx.nest.max_depth;
        if setup.depth > max_depth {
            return Ok(Err(self.error(
                ErrorKind::Denied,
                format!(
                    "cannot open {}: it would be level {}, deeper than --max-depth {max_depth} \
                     allows; raise it with --max-depth N",
                    setup.path, setup.depth
                ),
            )));
        }
        if let Err(e) = self.budget.acquire(&setup.path).await {
            if e.kind == WireErrorKind::LevelLost {
                self.note_infrastructure(&e);
            }
            return Ok(Err(from_remote(e)));
        }
        let held = Held(self.budget.clone());
        let component = Some(self.component.clone());
        let capture = self.capture.clone();
        let budget = self.budget.clone();
        let own_ssh = self.ctx.ssh.as_ref();
        let opened = Connection::open(
            &target,
            setup,
            component,
            capture,
            &self.ctx.vms,
            own_ssh,
            budget,
        )
        .await;
        match opened {
            Ok(conn) => {
                if let Some((accel, why)) = &conn.info().accel {
                    let line = format!("{} booted with {accel} ({why})", conn.info().path);
                    let _ = self
                        .capture
                        .write(Stream::Log(LogLevel::Info), line.as_bytes());
                }
                let handle = GuestHandle {
                    conn: Arc::new(conn),
                    _held: held,
                };
                Ok(Ok(self.table.push(handle)?))
            }
            Err(e) => {
                // A level that cannot be reached is the infrastructure's fault, not the
                // test's; the test still sees what went wrong (`not-found` for a missing
                // image, `timeout` for a boot deadline, ...).
                if !matches!(
                    e.kind,
                    WireErrorKind::Denied | WireErrorKind::InvalidArgument
                ) {
                    self.note_infrastructure(&e);
                }
                Ok(Err(from_remote(e)))
            }
        }
    }
}

impl HostState {
    /// Remembers a lost or unbootable level (here, or below: kind `level-lost`) as
    /// the cause of this test's failure, should it fail.
    fn note_infrastructure(&mut self, e: &RemoteError) {
        self.infrastructure.get_or_insert_with(|| {
            if e.message.contains(&e.level_path) {
                e.message.clone()
            } else {
                format!("{}: {}", e.level_path, e.message)
            }
        });
    }
}

fn from_remote(e: RemoteError) -> WitError {
    WitError {
        kind: e.kind.into(),
        message: e.message,
        level_path: e.level_path,
    }
}
