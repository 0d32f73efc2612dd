//! The `log` interface: log lines captured per test, bounded in volume.

use super::HostState;
use super::bindings::matryoshka::test::log::{Host, Level};
use crate::output::{LogLevel, Stream};

impl Host for HostState {
    fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        let level = match level {
            Level::Trace => LogLevel::Trace,
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
        };
        self.capture
            .write(Stream::Log(level), message.as_bytes())
            .map_err(wasmtime::Error::new)
    }
}
