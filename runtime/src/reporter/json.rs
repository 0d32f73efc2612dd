//! JSON lines: every event as one object on its own line.

use std::io::{self, Write};

use super::Reporter;
use crate::event::TestEvent;

/// Writes each event as a JSON line.
pub struct JsonReporter<W> {
    out: W,
}

impl<W: Write> JsonReporter<W> {
    /// A reporter writing to `out`.
    pub fn new(out: W) -> Self {
        Self { out }
    }
}

impl<W: Write + Send> Reporter for JsonReporter<W> {
    fn event(&mut self, event: &TestEvent) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, event)?;
        self.out.write_all(b"\n")?;
        self.out.flush()
    }
}
