//! JUnit XML, built with `quick-junit` and written when the run finishes.
//!
//! The file is well-formed XML 1.0 whatever the suite wrote: quick-junit (through
//! quick-xml) escapes `<`, `>`, `&` and quotes, so `]]>` is harmless, and before
//! that every text from the suite goes through [`text`], which turns control
//! characters, ESC included, and the noncharacters XML forbids into visible
//! escapes instead of letting quick-junit drop them silently. Names stay on one
//! line; the `message` attribute holds at most 240 characters of the first line.

use std::io::{self, Write};
use std::time::Duration;

use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestSuite};

use super::{Reporter, text};
use crate::event::{Outcome, TestEvent};

/// Characters of a failure's first line in the `message` attribute.
const MESSAGE_WIDTH: usize = 240;

/// Collects results and writes one JUnit report at the end.
pub struct JunitReporter<W> {
    out: W,
    suite: Option<TestSuite>,
    name: String,
}

impl<W: Write> JunitReporter<W> {
    /// A reporter writing to `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            suite: None,
            name: "matryoshka".into(),
        }
    }
}

impl<W: Write + Send> Reporter for JunitReporter<W> {
    fn event(&mut self, event: &TestEvent) -> io::Result<()> {
        match event {
            TestEvent::RunStarted {
                suite, level_path, ..
            } => {
                let suite = text::line(suite);
                let mut ts = TestSuite::new(suite.as_ref());
                ts.add_property(quick_junit::Property::new(
                    "level",
                    text::line(level_path).as_ref(),
                ));
                self.name = format!("matryoshka {suite}");
                self.suite = Some(ts);
            }
            TestEvent::TestFinished {
                test,
                outcome,
                duration_secs,
                output,
            } => {
                let status = match outcome {
                    Outcome::Passed => TestCaseStatus::success(),
                    Outcome::Ignored => TestCaseStatus::skipped(),
                    Outcome::Failed(f) => {
                        let mut s = TestCaseStatus::non_success(NonSuccessKind::Failure);
                        s.set_type(f.kind.as_str());
                        s.set_message(text::first_line(&f.message, MESSAGE_WIDTH));
                        let mut description = text::block(&f.message).into_owned();
                        if let Some(at) = &f.location {
                            description.push_str(&format!("\nat {}", text::line(at)));
                        }
                        s.set_description(description);
                        s
                    }
                };
                let mut case = TestCase::new(text::line(&test.name).as_ref(), status);
                case.set_classname(format!(
                    "{}.{}",
                    text::line(&test.level_path),
                    text::line(&test.suite)
                ));
                case.set_time(Duration::from_secs_f64(*duration_secs));
                let mut out = text::block(&output.stdout).into_owned();
                for line in &output.logs {
                    out.push_str(&format!(
                        "[{} {}] {}\n",
                        line.level.as_str(),
                        text::line(&line.level_path),
                        text::block(&line.message)
                    ));
                }
                if !out.is_empty() {
                    case.set_system_out(out);
                }
                if !output.stderr.is_empty() {
                    case.set_system_err(text::block(&output.stderr).as_ref());
                }
                if let Some(ts) = &mut self.suite {
                    ts.add_test_case(case);
                }
            }
            TestEvent::RunFinished { .. } => {
                let mut report = Report::new(self.name.as_str());
                if let Some(ts) = self.suite.take() {
                    report.add_test_suite(ts);
                }
                report.serialize(&mut self.out).map_err(io::Error::other)?;
                self.out.flush()?;
            }
            _ => {}
        }
        Ok(())
    }
}
