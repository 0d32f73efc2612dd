//! tmt's custom results (`--tmt-results $TMT_TEST_DATA/results.json`): one
//! result per test for a tmt test with `result: custom`, named
//! `/<level path>/<suite>/<test>`, with its output in a log file beside the
//! results, its duration and times, and the failure as a note.
//!
//! Outcomes map to tmt's results: passed → `pass` (a flaky pass says so in a
//! note), ignored → `skip`, a test's own failure → `fail`, the infrastructure's
//! (a lost level) → `error`; a run that ends early adds an `error` result named
//! after the suite that says why. The file is written whole when the run ends,
//! through a temporary file and a rename, so tmt never reads half of it.
//!
//! Text from the suite is inert: names go through [`text::line`] (a `/` in a
//! test's name becomes `%2F`, so it cannot add a level to the result's path),
//! notes through [`text::line`] too, log file names keep only `[A-Za-z0-9_-]`,
//! and the JSON is written with [`super::json::to_line`].

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;

use super::{Reporter, rfc3339, text};
use crate::event::{FailureKind, Outcome, TestEvent, TestId};
use crate::output::CapturedOutput;

/// One entry of results.json, as tmt reads it.
#[derive(Debug, Serialize)]
struct TmtResult {
    name: String,
    result: &'static str,
    note: Vec<String>,
    log: Vec<String>,
    duration: String,
    #[serde(rename = "start-time")]
    start_time: String,
    #[serde(rename = "end-time")]
    end_time: String,
}

/// Collects results and writes tmt's results.json when the run ends.
pub struct TmtReporter {
    path: PathBuf,
    results: Vec<(usize, TmtResult)>,
    started: HashMap<String, SystemTime>,
    level_path: String,
}

impl TmtReporter {
    /// A reporter writing `path` (usually `$TMT_TEST_DATA/results.json`) and the
    /// test logs into `logs/` beside it.
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            results: Vec::new(),
            started: HashMap::new(),
            level_path: "L0".into(),
        }
    }

    fn folder(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// Writes `output` to `logs/<index>-<name>.log` and returns its path
    /// relative to the results file, as tmt wants it.
    fn write_log(
        &self,
        index: usize,
        test: &TestId,
        output: &CapturedOutput,
    ) -> io::Result<String> {
        super::write_test_log(self.folder(), "logs", index, test, "", output)
    }

    fn write(&mut self) -> io::Result<()> {
        self.results.sort_by_key(|(index, _)| *index);
        let results: Vec<&TmtResult> = self.results.iter().map(|(_, r)| r).collect();
        let json = super::json::to_line(&results)?;
        std::fs::create_dir_all(self.folder())?;
        let temporary = self.path.with_extension("json.partial");
        std::fs::write(&temporary, json + "\n")?;
        std::fs::rename(&temporary, &self.path)
    }
}

impl Reporter for TmtReporter {
    fn event(&mut self, event: &TestEvent) -> io::Result<()> {
        match event {
            TestEvent::RunStarted { level_path, .. } => {
                self.level_path = level_path.clone();
            }
            TestEvent::TestStarted { test } => {
                self.started.insert(key(test), SystemTime::now());
            }
            TestEvent::TestFinished {
                test,
                index,
                outcome,
                output,
                attempts,
                first_failure,
                ..
            } => {
                let end = SystemTime::now();
                let start = self.started.remove(&key(test)).unwrap_or(end);
                let mut note = Vec::new();
                let result = match outcome {
                    Outcome::Passed => {
                        if let Some(first) = first_failure {
                            note.push(format!(
                                "flaky: passed on try {attempts}; try 1 failed: {}: {}",
                                first.kind.as_str(),
                                text::first_line(&first.message, 240)
                            ));
                        }
                        "pass"
                    }
                    Outcome::Ignored => {
                        note.push("ignored".into());
                        "skip"
                    }
                    Outcome::Failed(f) => {
                        note.push(format!(
                            "{}: {}",
                            f.kind.as_str(),
                            text::first_line(&f.message, 240)
                        ));
                        if let Some(at) = &f.location {
                            note.push(format!("at {}", text::line(at)));
                        }
                        if f.kind == FailureKind::Infrastructure {
                            "error"
                        } else {
                            "fail"
                        }
                    }
                };
                let log = vec![self.write_log(*index, test, output)?];
                self.results.push((
                    *index,
                    TmtResult {
                        name: result_name(&test.level_path, &test.suite, Some(&test.name)),
                        result,
                        note,
                        log,
                        duration: hh_mm_ss(end.duration_since(start).unwrap_or_default()),
                        start_time: rfc3339(start),
                        end_time: rfc3339(end),
                    },
                ));
            }
            TestEvent::RunFinished { .. } => self.write()?,
            TestEvent::RunAborted {
                suite,
                reason,
                duration_secs,
                ..
            } => {
                let end = SystemTime::now();
                let took = std::time::Duration::from_secs_f64(duration_secs.max(0.0));
                self.results.push((
                    usize::MAX,
                    TmtResult {
                        name: result_name(&self.level_path, suite, None),
                        result: "error",
                        note: vec![format!("aborted: {}", text::line(reason))],
                        log: Vec::new(),
                        duration: hh_mm_ss(took),
                        start_time: rfc3339(end - took),
                        end_time: rfc3339(end),
                    },
                ));
                self.write()?;
            }
            _ => {}
        }
        Ok(())
    }
}

fn key(test: &TestId) -> String {
    format!("{}\0{}\0{}", test.level_path, test.suite, test.name)
}

/// `/L0/L1/suite/test`: the level path's steps, then the suite and the test,
/// each escaped to one line with `%` and `/` percent-encoded.
fn result_name(level_path: &str, suite: &str, test: Option<&str>) -> String {
    let part = |s: &str| text::line(s).replace('%', "%25").replace('/', "%2F");
    let mut name = String::new();
    for step in level_path.split('/') {
        name.push('/');
        name.push_str(&part(step));
    }
    name.push('/');
    name.push_str(&part(suite));
    if let Some(test) = test {
        name.push('/');
        name.push_str(&part(test));
    }
    name
}

fn hh_mm_ss(d: std::time::Duration) -> String {
    let s = d.as_secs();
    format!("{:02}:{:02}:{:02}", s / 3600, s % 3600 / 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_paths_a_test_cannot_extend() {
        assert_eq!(
            result_name("L0/L1", "ci", Some("adds_up")),
            "/L0/L1/ci/adds_up"
        );
        assert_eq!(
            result_name("L0", "ci", Some("a/../b\n%")),
            "/L0/ci/a%2F..%2Fb\\n%25"
        );
        assert_eq!(result_name("L0", "ci", None), "/L0/ci");
    }

    #[test]
    fn durations_are_hours_minutes_seconds() {
        assert_eq!(hh_mm_ss(std::time::Duration::from_secs(3723)), "01:02:03");
        assert_eq!(hh_mm_ss(std::time::Duration::from_millis(400)), "00:00:00");
    }
}
