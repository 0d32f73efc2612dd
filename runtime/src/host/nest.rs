//! The `nest` interface: handles to levels below this one.
//!
//! A `guest` resource owns a relay [`Connection`]; dropping the resource shuts
//! the child runtime (and everything below it) down.

use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::Resource;

use super::HostState;
use super::bindings::matryoshka::test::nest::{Host, HostGuest};
use super::bindings::matryoshka::test::types::{Error as WitError, ErrorKind};
use crate::relay::connection::Connection;
use crate::relay::protocol::{LevelSetup, RemoteError};

/// The host side of a `guest` resource.
pub struct GuestHandle {
    conn: Arc<Connection>,
}

impl Host for HostState {}

impl HostGuest for HostState {
    async fn connect(
        &mut self,
        target: String,
    ) -> wasmtime::Result<Result<Resource<GuestHandle>, WitError>> {
        if !self.ctx.grants.nest {
            return Ok(Err(self.error(
                ErrorKind::Denied,
                format!(
                    "connecting to another level is not granted at {}; add --grant nest \
                     (or nest = true under [grants] in matryoshka.toml)",
                    self.ctx.level.path
                ),
            )));
        }
        let depth = self.ctx.level.depth + 1;
        let setup = LevelSetup {
            depth,
            path: format!("{}/L{depth}", self.ctx.level.path),
            grants: self.ctx.grants.clone(),
            limits: self.ctx.limits.into(),
            env: self.ctx.env.clone(),
            ssh: self.ctx.ssh.clone(),
        };
        let component = self.ctx.component.clone();
        let capture = self.capture.clone();
        match Connection::open(&target, setup, component, capture).await {
            Ok(conn) => {
                let handle = GuestHandle {
                    conn: Arc::new(conn),
                };
                Ok(Ok(self.table.push(handle)?))
            }
            Err(e) => Ok(Err(from_remote(e))),
        }
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

    fn drop(&mut self, guest: Resource<GuestHandle>) -> wasmtime::Result<()> {
        self.table.delete(guest)?;
        Ok(())
    }
}

fn from_remote(e: RemoteError) -> WitError {
    WitError {
        kind: e.kind.into(),
        message: e.message,
        level_path: e.level_path,
    }
}
