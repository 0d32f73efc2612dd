//! Reporters turn the one [`TestEvent`] stream into output formats.
//!
//! - [`folder`]: the run folder's `report.json` and a log file per test.
//! - [`human`]: live progress and a summary, failures with their output.
//! - [`json`]: one JSON object per event per line.
//! - [`junit`]: JUnit XML, written when the run finishes.
//! - [`tap`]: TAP 13 on stdout, diagnostics as YAML blocks.
//! - [`timeline`]: the run folder's `timeline.html`, a lane per level.
//! - [`tmt`]: tmt's custom results.json, with a log file per test.

pub mod folder;
pub mod human;
pub mod json;
pub mod junit;
pub mod tap;
pub mod text;
pub mod timeline;
pub mod tmt;

use std::io;

use crate::event::TestEvent;

/// Consumes events and writes a report.
pub trait Reporter: Send {
    /// Handles one event.
    fn event(&mut self, event: &TestEvent) -> io::Result<()>;
}

/// The output formats `--format` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Live progress and a readable summary.
    Human,
    /// JSON lines, one event per line.
    Json,
    /// JUnit XML.
    Junit,
    /// Test Anything Protocol, version 13.
    Tap,
}

/// `[   0.001s  info L0/L1]`: when, how severe and where a log line was written,
/// the level path escaped to one line. The message is the caller's to escape.
pub(crate) fn log_prefix(line: &crate::output::LogLine) -> String {
    format!(
        "[{:>8.3}s {:>5} {}]",
        line.at_secs,
        line.level.as_str(),
        text::line(&line.level_path)
    )
}

/// Writes `header` and `output` (log lines, stdout, stderr, each escaped by
/// [`text::block`]) to `<dir>/<sub>/<index>-<name>.log`, the name cut to a safe
/// file name, and returns that path relative to `dir`.
pub(crate) fn write_test_log(
    dir: &std::path::Path,
    sub: &str,
    index: usize,
    test: &crate::event::TestId,
    header: &str,
    output: &crate::output::CapturedOutput,
) -> io::Result<String> {
    let safe: String = test
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(80)
        .collect();
    let relative = format!("{sub}/{index:04}-{safe}.log");
    let mut body = text::block(header).into_owned();
    for line in &output.logs {
        body.push_str(&format!(
            "{} {}\n",
            log_prefix(line),
            text::block(&line.message)
        ));
    }
    if !output.stdout.is_empty() {
        body.push_str("--- stdout ---\n");
        body.push_str(&text::block(&output.stdout));
    }
    if !output.stderr.is_empty() {
        body.push_str("\n--- stderr ---\n");
        body.push_str(&text::block(&output.stderr));
    }
    let path = dir.join(&relative);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, body)?;
    Ok(relative)
}

/// A finished test's result as one word (`pass`, `flaky`, `ignored`, `fail`),
/// with its failure.
pub(crate) fn result_word<'a>(
    outcome: &'a crate::event::Outcome,
    first_failure: Option<&crate::event::TestFailure>,
) -> (&'static str, Option<&'a crate::event::TestFailure>) {
    use crate::event::Outcome;
    match outcome {
        Outcome::Passed if first_failure.is_some() => ("flaky", None),
        Outcome::Passed => ("pass", None),
        Outcome::Ignored => ("ignored", None),
        Outcome::Failed(f) => ("fail", Some(f)),
    }
}

/// `t` in RFC 3339, UTC, to the millisecond.
pub(crate) fn rfc3339(t: std::time::SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Indents every line of `text` by `prefix`.
pub(crate) fn indent(text: &str, prefix: &str) -> String {
    text.lines()
        .map(|l| format!("{prefix}{l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
