//! JUnit XML, built with `quick-junit` and written when the run finishes.

use std::io::{self, Write};
use std::time::Duration;

use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestSuite};

use super::Reporter;
use crate::event::{Outcome, TestEvent};

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
                let mut ts = TestSuite::new(suite.as_str());
                ts.add_property(quick_junit::Property::new("level", level_path.as_str()));
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
                        let first = f.message.lines().next().unwrap_or("");
                        s.set_message(first);
                        let mut description = f.message.clone();
                        if let Some(at) = &f.location {
                            description.push_str(&format!("\nat {at}"));
                        }
                        s.set_description(description);
                        s
                    }
                };
                let mut case = TestCase::new(test.name.as_str(), status);
                case.set_classname(format!("{}.{}", test.level_path, test.suite));
                case.set_time(Duration::from_secs_f64(*duration_secs));
                let mut out = output.stdout.clone();
                for line in &output.logs {
                    out.push_str(&format!(
                        "[{} {}] {}\n",
                        line.level.as_str(),
                        line.level_path,
                        line.message
                    ));
                }
                if !out.is_empty() {
                    case.set_system_out(out);
                }
                if !output.stderr.is_empty() {
                    case.set_system_err(output.stderr.as_str());
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
