//! TAP 13: the plan first, one `ok`/`not ok` line per test, YAML diagnostics.
//!
//! Only TAP goes to the writer; output lines appear as `# ` comments so a TAP
//! harness (meson, prove, avocado) can read the stream unchanged.

use std::io::{self, Write};

use super::{Reporter, indent};
use crate::event::{Outcome, TestEvent};

/// Writes TAP version 13.
pub struct TapReporter<W> {
    out: W,
    next: usize,
    show_output: bool,
}

impl<W: Write> TapReporter<W> {
    /// A reporter writing to `out`; `show_output` adds live output as comments.
    pub fn new(out: W, show_output: bool) -> Self {
        Self {
            out,
            next: 1,
            show_output,
        }
    }
}

impl<W: Write + Send> Reporter for TapReporter<W> {
    fn event(&mut self, event: &TestEvent) -> io::Result<()> {
        match event {
            TestEvent::RunStarted { planned, suite, .. } => {
                writeln!(self.out, "TAP version 13")?;
                writeln!(self.out, "1..{planned}")?;
                writeln!(self.out, "# suite {suite}")?;
            }
            TestEvent::Output { origin, text, .. } if self.show_output => {
                writeln!(
                    self.out,
                    "{}",
                    indent(text.trim_end(), &format!("# [{origin}] "))
                )?;
            }
            TestEvent::TestFinished { test, outcome, .. } => {
                let n = self.next;
                self.next += 1;
                let name = test.full_name();
                match outcome {
                    Outcome::Passed => writeln!(self.out, "ok {n} - {name}")?,
                    Outcome::Ignored => writeln!(self.out, "ok {n} - {name} # SKIP ignored")?,
                    Outcome::Failed(f) => {
                        writeln!(self.out, "not ok {n} - {name}")?;
                        writeln!(self.out, "  ---")?;
                        writeln!(self.out, "  kind: {}", f.kind.as_str())?;
                        writeln!(self.out, "  level: {}", test.level_path)?;
                        if let Some(at) = &f.location {
                            writeln!(self.out, "  at: {at:?}")?;
                        }
                        writeln!(self.out, "  message: |-")?;
                        writeln!(self.out, "{}", indent(&f.message, "    "))?;
                        writeln!(self.out, "  ...")?;
                    }
                }
            }
            TestEvent::RunFinished { summary, .. } => {
                writeln!(
                    self.out,
                    "# {} passed, {} failed, {} ignored",
                    summary.passed, summary.failed, summary.ignored
                )?;
            }
            _ => {}
        }
        self.out.flush()
    }
}
