//! The `report` interface: a guest's last word before it traps.
//!
//! The failure is untrusted text: its message and file are capped here
//! ([`cap_message`], [`cap_location`]) so a guest cannot make the host hold or a
//! report print megabytes. The runner charges what is kept to the test's output
//! budget.

use super::HostState;
use super::bindings::matryoshka::test::report::Host;
use super::bindings::matryoshka::test::types::Failure;
use crate::output::{cap_location, cap_message};

impl Host for HostState {
    fn panicked(&mut self, failure: Failure) -> wasmtime::Result<()> {
        self.panic = Some(Failure {
            message: cap_message(failure.message),
            file: failure.file.map(cap_location),
            ..failure
        });
        Ok(())
    }
}
