//! The `report` interface: a guest's last word before it traps.

use super::HostState;
use super::bindings::matryoshka::test::report::Host;
use super::bindings::matryoshka::test::types::Failure;

impl Host for HostState {
    fn panicked(&mut self, failure: Failure) -> wasmtime::Result<()> {
        self.panic = Some(failure);
        Ok(())
    }
}
