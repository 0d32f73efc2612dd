//! TAP 13: the plan first, one `ok`/`not ok` line per test, YAML diagnostics.
//!
//! Only TAP goes to the writer; output lines appear as `# ` comments so a TAP
//! harness (meson, prove, avocado) can read the stream unchanged.
//!
//! Nothing the suite wrote can add or change a TAP line: a test name is escaped
//! with [`text::tap_description`] (a newline, carriage return or other line
//! breaker becomes a visible escape, `#` becomes `\#` so no `# TODO` or `# SKIP`
//! directive can be forged), comments and YAML values are escaped to one line
//! each, and YAML values are double-quoted scalars that TAP::Parser's YAMLish
//! reader and full YAML parsers both read.

use std::io::{self, Write};

use super::{Reporter, text};
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
                writeln!(self.out, "# suite {}", text::line(suite))?;
            }
            TestEvent::Output {
                origin,
                text: written,
                ..
            } if self.show_output => {
                let origin = text::line(origin);
                for l in written.trim_end().lines() {
                    writeln!(self.out, "# [{origin}] {}", text::line(l))?;
                }
            }
            TestEvent::TestFinished { test, outcome, .. } => {
                let n = self.next;
                self.next += 1;
                let full_name = test.full_name();
                let name = text::tap_description(&full_name);
                match outcome {
                    Outcome::Passed => writeln!(self.out, "ok {n} - {name}")?,
                    Outcome::Ignored => writeln!(self.out, "ok {n} - {name} # SKIP ignored")?,
                    Outcome::Failed(f) => {
                        writeln!(self.out, "not ok {n} - {name}")?;
                        writeln!(self.out, "  ---")?;
                        writeln!(self.out, "  kind: {}", f.kind.as_str())?;
                        writeln!(self.out, "  level: {}", text::yaml_quoted(&test.level_path))?;
                        if let Some(at) = &f.location {
                            writeln!(self.out, "  at: {}", text::yaml_quoted(at))?;
                        }
                        writeln!(self.out, "  message: {}", text::yaml_quoted(&f.message))?;
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
