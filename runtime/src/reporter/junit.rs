//! JUnit XML, built with `quick-junit` and written when the run finishes.
//!
//! The file is well-formed XML 1.0 whatever the suite wrote: quick-junit (through
//! quick-xml) escapes `<`, `>`, `&` and quotes, so `]]>` is harmless, and before
//! that every text from the suite goes through [`text`], which turns control
//! characters, ESC included, and the noncharacters XML forbids into visible
//! escapes instead of letting quick-junit drop them silently. Names stay on one
//! line; the `message` attribute holds at most 240 characters of the first line.
//!
//! The file validates against the schemas Jenkins reads (the xunit plugin's
//! `junit-10.xsd`, JUnit 5's `jenkins-junit.xsd`): `<testsuites>` carries only
//! name, tests, failures, errors and time; each `<testsuite>` its timestamp,
//! hostname and time. A test the infrastructure failed (a lost level) is an
//! `<error>`, a test's own failure a `<failure>`, a retried try a
//! `<flakyFailure>` or `<rerunFailure>`. A run that ends early (a signal, a
//! suite that does not load, a chain that does not boot) still writes a whole
//! file, with an `<error>` case that says why.

use std::io::{self, Write};
use std::time::Duration;

use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestRerun, TestSuite};

use super::{Reporter, text};
use crate::event::{FailureKind, Outcome, TestEvent, TestFailure, TestId};
use crate::output::CapturedOutput;

/// Characters of a failure's first line in the `message` attribute.
const MESSAGE_WIDTH: usize = 240;

/// Collects results and writes one JUnit report at the end.
pub struct JunitReporter<W> {
    out: W,
    suite: Option<TestSuite>,
    name: String,
    /// Tests in the plan, for the case that says a run ended early.
    planned: usize,
    /// The report was written.
    written: bool,
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
            planned: 0,
            written: false,
            reruns: Vec::new(),
            cases: Vec::new(),
        }
    }
}

impl<W: Write + Send> Reporter for JunitReporter<W> {
    fn event(&mut self, event: &TestEvent) -> io::Result<()> {
        match event {
            TestEvent::RunStarted {
                suite,
                level_path,
                hostname,
                planned,
                ..
            } => {
                let mut ts = new_suite(suite);
                ts.extra
                    .insert("hostname".into(), text::line(hostname).as_ref().into());
                ts.add_property(quick_junit::Property::new(
                    "level",
                    text::line(level_path).as_ref(),
                ));
                self.name = format!("matryoshka {}", text::line(suite));
                self.planned = *planned;
                self.suite = Some(ts);
            }
            TestEvent::TestRetried {
                test,
                failure,
                duration_secs,
                output,
                ..
            } => {
                let mut rerun = TestRerun::new(kind_of(failure));
                rerun.set_type(failure.kind.as_str());
                rerun.set_message(text::first_line(&failure.message, MESSAGE_WIDTH));
                // Only `message` and `type` are allowed on <flakyFailure> and
                // <rerunFailure> by junit-10.xsd: the try's time goes into its text.
                rerun.set_description(format!(
                    "{}\n(try took {duration_secs:.3} s)",
                    description(failure)
                ));
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
                    Outcome::Ignored => {
                        let mut s = TestCaseStatus::skipped();
                        s.set_message("ignored");
                        s
                    }
                    Outcome::Failed(f) => {
                        let mut s = TestCaseStatus::non_success(kind_of(f));
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
            TestEvent::RunFinished { duration_secs, .. } => {
                self.write(*duration_secs)?;
            }
            // Once written, the report stays one document.
            TestEvent::RunAborted { .. } if self.written => {}
            TestEvent::RunAborted {
                suite,
                reason,
                finished,
                duration_secs,
            } => {
                if self.suite.is_none() {
                    self.name = format!("matryoshka {}", text::line(suite));
                    self.suite = Some(new_suite(suite));
                }
                let mut status = TestCaseStatus::non_success(NonSuccessKind::Error);
                status.set_type("aborted");
                status.set_message(text::first_line(reason, MESSAGE_WIDTH));
                status.set_description(format!(
                    "{}\n{finished} of {} planned tests had finished",
                    text::block(reason),
                    self.planned
                ));
                let mut case = TestCase::new("run", status);
                case.set_classname(text::line(suite).as_ref());
                case.set_time(Duration::from_secs_f64(*duration_secs));
                self.cases.push((usize::MAX, case));
                self.write(*duration_secs)?;
            }
            _ => {}
        }
        Ok(())
    }
}

impl<W: Write> JunitReporter<W> {
    /// Writes the report once: the suite's cases in plan order.
    fn write(&mut self, duration_secs: f64) -> io::Result<()> {
        let Some(mut ts) = self.suite.take() else {
            return Ok(());
        };
        let time = Duration::from_secs_f64(duration_secs.max(0.0));
        ts.set_time(time);
        self.cases.sort_by_key(|(index, _)| *index);
        ts.add_test_cases(self.cases.drain(..).map(|(_, case)| case));
        let mut report = Report::new(self.name.as_str());
        report.set_time(time);
        report.add_test_suite(ts);
        self.written = true;
        let xml = report.to_string().map_err(io::Error::other)?;
        self.out
            .write_all(without_testsuites_skipped(&xml).as_bytes())?;
        self.out.flush()
    }
}

/// A `<testsuite>` named `suite`, stamped with the time now.
fn new_suite(suite: &str) -> TestSuite {
    let mut ts = TestSuite::new(text::line(suite).as_ref());
    ts.set_timestamp(chrono::DateTime::<chrono::Utc>::from(
        std::time::SystemTime::now(),
    ));
    ts
}

/// `<error>` for what the infrastructure failed, `<failure>` for the test's own.
fn kind_of(f: &TestFailure) -> NonSuccessKind {
    match f.kind {
        FailureKind::Infrastructure => NonSuccessKind::Error,
        _ => NonSuccessKind::Failure,
    }
}

/// `xml` without the `skipped` attribute quick-junit always writes on
/// `<testsuites>`, which the Jenkins schemas reject (quick-junit has no switch
/// for it). Only that start tag is touched: every attribute value in it is
/// escaped, so the text ` skipped="` cannot occur inside one.
fn without_testsuites_skipped(xml: &str) -> std::borrow::Cow<'_, str> {
    let Some(start) = xml.find("<testsuites") else {
        return xml.into();
    };
    let end = xml[start..].find('>').map_or(xml.len(), |e| start + e);
    let tag = &xml[start..end];
    let Some(at) = tag.find(" skipped=\"") else {
        return xml.into();
    };
    let value_end = tag[at + 10..]
        .find('"')
        .map_or(tag.len(), |e| at + 10 + e + 1);
    let mut out = String::with_capacity(xml.len());
    out.push_str(&xml[..start + at]);
    out.push_str(&xml[start + value_end..]);
    out.into()
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
