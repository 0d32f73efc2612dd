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

use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestRerun, TestSuite};

use super::{Reporter, text};
use crate::event::{Outcome, TestEvent, TestFailure, TestId};
use crate::output::CapturedOutput;

/// Characters of a failure's first line in the `message` attribute.
const MESSAGE_WIDTH: usize = 240;

/// Collects results and writes one JUnit report at the end.
pub struct JunitReporter<W> {
    out: W,
    suite: Option<TestSuite>,
    name: String,
    /// Failed tries of tests still running, in the order they failed.
    reruns: Vec<(TestId, TestRerun)>,
    /// Finished tests, with their place in the plan.
    cases: Vec<(usize, TestCase)>,
}

impl<W: Write> JunitReporter<W> {
    /// A reporter writing to `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            suite: None,
            name: "matryoshka".into(),
            reruns: Vec::new(),
            cases: Vec::new(),
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
            TestEvent::TestRetried {
                test,
                failure,
                duration_secs,
                output,
                ..
            } => {
                let mut rerun = TestRerun::new(NonSuccessKind::Failure);
                rerun.set_type(failure.kind.as_str());
                rerun.set_message(text::first_line(&failure.message, MESSAGE_WIDTH));
                rerun.set_description(description(failure));
                rerun.set_time(Duration::from_secs_f64(*duration_secs));
                let (out, err) = system_out_err(output);
                if !out.is_empty() {
                    rerun.set_system_out(out);
                }
                if !err.is_empty() {
                    rerun.set_system_err(err);
                }
                self.reruns.push((test.clone(), rerun));
            }
            TestEvent::TestFinished {
                test,
                index,
                outcome,
                duration_secs,
                output,
                ..
            } => {
                let mut status = match outcome {
                    Outcome::Passed => TestCaseStatus::success(),
                    Outcome::Ignored => TestCaseStatus::skipped(),
                    Outcome::Failed(f) => {
                        let mut s = TestCaseStatus::non_success(NonSuccessKind::Failure);
                        s.set_type(f.kind.as_str());
                        s.set_message(text::first_line(&f.message, MESSAGE_WIDTH));
                        s.set_description(description(f));
                        s
                    }
                };
                let (tries, others): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reruns)
                    .into_iter()
                    .partition(|(t, _)| t == test);
                self.reruns = others;
                status.add_reruns(tries.into_iter().map(|(_, rerun)| rerun));
                let mut case = TestCase::new(text::line(&test.name).as_ref(), status);
                case.set_classname(format!(
                    "{}.{}",
                    text::line(&test.level_path),
                    text::line(&test.suite)
                ));
                case.set_time(Duration::from_secs_f64(*duration_secs));
                let (out, err) = system_out_err(output);
                if !out.is_empty() {
                    case.set_system_out(out);
                }
                if !err.is_empty() {
                    case.set_system_err(err);
                }
                self.cases.push((*index, case));
            }
            TestEvent::RunFinished { .. } => {
                let mut report = Report::new(self.name.as_str());
                if let Some(mut ts) = self.suite.take() {
                    // In plan order, whatever order tests ended in.
                    self.cases.sort_by_key(|(index, _)| *index);
                    ts.add_test_cases(self.cases.drain(..).map(|(_, case)| case));
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

/// A failure's whole message, and where it happened.
fn description(f: &TestFailure) -> String {
    let mut description = text::block(&f.message).into_owned();
    if let Some(at) = &f.location {
        description.push_str(&format!("\nat {}", text::line(at)));
    }
    description
}

/// `system-out` (stdout, then the log lines) and `system-err` of a try.
fn system_out_err(output: &CapturedOutput) -> (String, String) {
    let mut out = text::block(&output.stdout).into_owned();
    for line in &output.logs {
        out.push_str(&format!(
            "[{} {}] {}\n",
            line.level.as_str(),
            text::line(&line.level_path),
            text::block(&line.message)
        ));
    }
    (out, text::block(&output.stderr).into_owned())
}
