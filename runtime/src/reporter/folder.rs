//! The run folder a person browses after a run (`target/matryoshka/<run>/`): a
//! log file per test that wrote output or failed (`tests/`, every failed try in
//! `tests/retried/`), and `report.json`, the index: the run, each test's result
//! and log, and each level's files (console, QEMU log, level log, kernel log,
//! hop journal) that the levels left in the folder.
//!
//! Text from the suite goes through [`super::text`] in the logs and through
//! the inert JSON formatter in `report.json`.

use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{Reporter, result_word, rfc3339, write_test_log};
use crate::event::{Summary, TestEvent, TestFailure, TestId};
use crate::wire::is_level_name;

/// Writes the run folder's per-test logs and `report.json`.
pub struct FolderReporter {
    dir: PathBuf,
    run: Option<RunFacts>,
    tests: Vec<TestEntry>,
    /// Logs of failed tries that ran again, by test (`suite::name`).
    tries: Vec<(String, String)>,
    ssh_config: Option<String>,
    started: std::time::SystemTime,
}

#[derive(Serialize)]
struct RunFacts {
    suite: String,
    component: String,
    sha256: String,
    level_path: String,
    hostname: String,
}

#[derive(Serialize)]
struct TestEntry {
    #[serde(skip)]
    index: usize,
    suite: String,
    name: String,
    level_path: String,
    /// `pass`, `fail`, `flaky` or `ignored`.
    result: &'static str,
    /// The failure's kind, e.g. `panic`.
    kind: Option<&'static str>,
    message: Option<String>,
    location: Option<String>,
    duration_secs: f64,
    attempts: u32,
    /// Its log file, relative to the folder, when it wrote output or failed.
    log: Option<String>,
    /// Logs of its failed tries that ran again.
    tries: Vec<String>,
}

/// The files a level left in the folder.
#[derive(Serialize, Default)]
struct LevelFiles {
    path: String,
    console: Option<String>,
    qemu_log: Option<String>,
    level_log: Option<String>,
    dmesg: Option<String>,
    relay: Option<String>,
}

#[derive(Serialize)]
struct Report<'a> {
    version: u32,
    started: String,
    duration_secs: f64,
    #[serde(flatten)]
    run: Option<&'a RunFacts>,
    summary: Option<Summary>,
    aborted: Option<&'a str>,
    tests: &'a [TestEntry],
    levels: Vec<LevelFiles>,
    ssh_config: Option<&'a str>,
}

impl FolderReporter {
    /// A reporter writing into `dir`, made when the run starts.
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            run: None,
            tests: Vec::new(),
            tries: Vec::new(),
            ssh_config: None,
            started: std::time::SystemTime::now(),
        }
    }

    fn header(test: &TestId, result: &str, failure: Option<&TestFailure>) -> String {
        let mut header = format!(
            "{} {}\nresult: {result}\n",
            test.level_path,
            test.full_name()
        );
        if let Some(f) = failure {
            header.push_str(&format!("{}: {}\n", f.kind.as_str(), f.message));
            if let Some(at) = &f.location {
                header.push_str(&format!("  at {at}\n"));
            }
        }
        header.push('\n');
        header
    }

    fn write_report(&mut self, summary: Option<Summary>, aborted: Option<&str>) -> io::Result<()> {
        self.tests.sort_by_key(|t| t.index);
        let duration = self.started.elapsed().map_or(0.0, |d| d.as_secs_f64());
        let report = Report {
            version: 1,
            started: rfc3339(self.started),
            duration_secs: duration,
            run: self.run.as_ref(),
            summary,
            aborted,
            tests: &self.tests,
            levels: level_files(&self.dir),
            ssh_config: self.ssh_config.as_deref(),
        };
        std::fs::create_dir_all(&self.dir)?;
        let path = self.dir.join("report.json");
        let partial = self.dir.join("report.json.partial");
        std::fs::write(&partial, super::json::to_line(&report)? + "\n")?;
        std::fs::rename(partial, path)
    }
}

/// The files of each level in `dir`, named `L0-L1[-L2…].<kind>` by the levels that
/// booted them; in level order.
fn level_files(dir: &Path) -> Vec<LevelFiles> {
    let mut levels: Vec<LevelFiles> = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return levels;
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    for name in names {
        let Some((level, kind)) = name.split_once('.') else {
            continue;
        };
        let is_level = level.starts_with("L0-") && level.split('-').all(is_level_name);
        if !is_level {
            continue;
        }
        let path = level.replace('-', "/");
        let at = match levels.iter().position(|l| l.path == path) {
            Some(at) => at,
            None => {
                levels.push(LevelFiles {
                    path,
                    ..LevelFiles::default()
                });
                levels.len() - 1
            }
        };
        let slot = match kind {
            "console" => &mut levels[at].console,
            "qemu.log" => &mut levels[at].qemu_log,
            "log" => &mut levels[at].level_log,
            "dmesg" => &mut levels[at].dmesg,
            "relay" => &mut levels[at].relay,
            _ => continue,
        };
        *slot = Some(name);
    }
    levels.sort_by_key(|l| l.path.len());
    levels
}

impl Reporter for FolderReporter {
    fn event(&mut self, event: &TestEvent) -> io::Result<()> {
        match event {
            TestEvent::RunStarted {
                suite,
                component,
                sha256,
                level_path,
                hostname,
                ..
            } => {
                std::fs::create_dir_all(&self.dir)?;
                self.run = Some(RunFacts {
                    suite: suite.clone(),
                    component: component.clone(),
                    sha256: sha256.clone(),
                    level_path: level_path.clone(),
                    hostname: hostname.clone(),
                });
            }
            TestEvent::TestRetried {
                test,
                attempt,
                failure,
                output,
                ..
            } => {
                let header = Self::header(test, &format!("try {attempt} failed"), Some(failure));
                let log = write_test_log(
                    &self.dir,
                    "tests/retried",
                    self.tries.len(),
                    test,
                    &header,
                    output,
                )?;
                self.tries.push((test.full_name(), log));
            }
            TestEvent::TestFinished {
                test,
                index,
                outcome,
                duration_secs,
                output,
                attempts,
                first_failure,
            } => {
                let (result, failure) = result_word(outcome, first_failure.as_ref());
                let log = if failure.is_some() || !output.is_empty() {
                    let header = Self::header(test, result, failure);
                    Some(write_test_log(
                        &self.dir, "tests", *index, test, &header, output,
                    )?)
                } else {
                    None
                };
                let full = test.full_name();
                self.tests.push(TestEntry {
                    index: *index,
                    suite: test.suite.clone(),
                    name: test.name.clone(),
                    level_path: test.level_path.clone(),
                    result,
                    kind: failure.map(|f| f.kind.as_str()),
                    message: failure.map(|f| f.message.clone()),
                    location: failure.and_then(|f| f.location.clone()),
                    duration_secs: *duration_secs,
                    attempts: *attempts,
                    log,
                    tries: self
                        .tries
                        .iter()
                        .filter(|(name, _)| *name == full)
                        .map(|(_, log)| log.clone())
                        .collect(),
                });
            }
            TestEvent::LevelsKept { ssh_config, .. } => {
                self.ssh_config = Some(ssh_config.clone());
            }
            TestEvent::RunFinished { summary, .. } => self.write_report(Some(*summary), None)?,
            TestEvent::RunAborted { reason, .. } => self.write_report(None, Some(reason))?,
            _ => {}
        }
        Ok(())
    }
}
