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

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, Write};

use super::{Reporter, text};
use crate::event::{Outcome, TestEvent, TestFailure, TestId};

/// Writes TAP version 13.
pub struct TapReporter<W> {
    out: W,
    /// Test points written so far: the next one to write has this index.
    written: usize,
    /// Test points that ended before an earlier one, by index.
    pending: BTreeMap<usize, String>,
    show_output: bool,
}

impl<W: Write> TapReporter<W> {
    /// A reporter writing to `out`; `show_output` adds live output as comments.
    pub fn new(out: W, show_output: bool) -> Self {
        Self {
            out,
            written: 0,
            pending: BTreeMap::new(),
            show_output,
        }
    }
}

impl<W: Write> TapReporter<W> {
    /// Writes the test points still waiting for an earlier one that will not end
    /// (the run was stopped), in plan order: no finished result is lost.
    fn write_pending(&mut self) -> io::Result<()> {
        for (_, point) in std::mem::take(&mut self.pending) {
            self.out.write_all(point.as_bytes())?;
        }
        Ok(())
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
            TestEvent::TestFinished {
                test,
                index,
                outcome,
                attempts,
                first_failure,
                ..
            } => {
                let point =
                    test_point(*index + 1, test, outcome, *attempts, first_failure.as_ref());
                self.pending.insert(*index, point);
                // Numbers follow the plan whatever order tests end in: a harness
                // (meson's JUnit, a dashboard) names results by their number.
                while let Some(point) = self.pending.remove(&self.written) {
                    self.out.write_all(point.as_bytes())?;
                    self.written += 1;
                }
            }
            TestEvent::TestSlow { test, elapsed_secs } => {
                // A comment: harnesses show it, none counts it.
                writeln!(
                    self.out,
                    "# SLOW [> {elapsed_secs:.0}s] {}",
                    text::line(&test.full_name())
                )?;
            }
            TestEvent::LevelsKept { test, levels, .. } => {
                writeln!(
                    self.out,
                    "# KEPT the chain up after {} failed",
                    text::line(&test.full_name())
                )?;
                for level in levels {
                    writeln!(
                        self.out,
                        "#   {}: {}",
                        text::line(&level.path),
                        text::line(&level.shell)
                    )?;
                }
                self.out.flush()?;
            }
            TestEvent::RunAborted { reason, .. } => {
                self.write_pending()?;
                // Harnesses (prove, meson) end the stream here and report the reason.
                writeln!(self.out, "Bail out! {}", text::line(reason))?;
            }
            TestEvent::RunFinished { summary, .. } => {
                self.write_pending()?;
                writeln!(
                    self.out,
                    "# {} passed ({} flaky), {} failed, {} ignored",
                    summary.passed, summary.flaky, summary.failed, summary.ignored
                )?;
            }
            _ => {}
        }
        self.out.flush()
    }
}

/// The test point of test number `n`, with its YAML block.
fn test_point(
    n: usize,
    test: &TestId,
    outcome: &Outcome,
    attempts: u32,
    first_failure: Option<&TestFailure>,
) -> String {
    let full_name = test.full_name();
    let name = text::tap_description(&full_name);
    let mut out = String::new();
    // Writing to a String cannot fail.
    match outcome {
        Outcome::Passed => {
            let _ = writeln!(out, "ok {n} - {name}");
            if let Some(f) = first_failure {
                // Flaky: passed on a retry. The block is diagnostics only.
                let _ = writeln!(out, "  ---");
                let _ = writeln!(out, "  flaky: true");
                let _ = writeln!(out, "  attempts: {attempts}");
                let _ = writeln!(out, "  first_failure: {}", f.kind.as_str());
                let _ = writeln!(out, "  message: {}", text::yaml_quoted(&f.message));
                let _ = writeln!(out, "  ...");
            }
        }
        Outcome::Ignored => {
            let _ = writeln!(out, "ok {n} - {name} # SKIP ignored");
        }
        Outcome::Failed(f) => {
            let _ = writeln!(out, "not ok {n} - {name}");
            let _ = writeln!(out, "  ---");
            let _ = writeln!(out, "  kind: {}", f.kind.as_str());
            let _ = writeln!(out, "  level: {}", text::yaml_quoted(&test.level_path));
            if let Some(at) = &f.location {
                let _ = writeln!(out, "  at: {}", text::yaml_quoted(at));
            }
            let _ = writeln!(out, "  message: {}", text::yaml_quoted(&f.message));
            if attempts > 1 {
                let _ = writeln!(out, "  attempts: {attempts}");
            }
            let _ = writeln!(out, "  ...");
        }
    }
    out
}
