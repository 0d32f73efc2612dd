//! Human output: a line per finished test, a progress bar on a terminal, and
//! the failures with their captured output at the end.
//!
//! Every text the suite produced goes through [`text`]: names and other one-line
//! fields with [`text::line`], messages and output with [`text::block`], so no
//! control character reaches the terminal raw and a name stays on its line. A
//! failure message appears once in full (in the failures section); the FAIL line
//! shows at most 240 characters of its first line.

use std::io::{self, IsTerminal, Write};

use indicatif::{ProgressBar, ProgressStyle};

use super::{Reporter, indent, log_prefix, text};
use crate::event::{Outcome, TestEvent, TestFailure, TestId};
use crate::output::{CapturedOutput, Stream};

/// Writes readable results to `out`, progress to the terminal.
pub struct HumanReporter<W> {
    out: W,
    progress: ProgressBar,
    show_output: bool,
    failures: Vec<(TestId, TestFailure, CapturedOutput)>,
    /// Tests that passed on a retry, with the first failure.
    flaky: Vec<(TestId, TestFailure)>,
    /// Tries a test gets; 0 until the run started.
    tries: u32,
    /// The run folder, named by the last line.
    folder: Option<std::path::PathBuf>,
}

impl<W: Write> HumanReporter<W> {
    /// A reporter writing to `out`; `show_output` prints output live, as it is written.
    pub fn new(out: W, show_output: bool) -> Self {
        let progress = if io::stderr().is_terminal() {
            let bar = ProgressBar::new(0);
            if let Ok(style) = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            ) {
                bar.set_style(style);
            }
            // The timer and spinner move while a long test runs.
            bar.enable_steady_tick(std::time::Duration::from_millis(200));
            bar
        } else {
            ProgressBar::hidden()
        };
        Self {
            out,
            progress,
            show_output,
            failures: Vec::new(),
            flaky: Vec::new(),
            tries: 0,
            folder: None,
        }
    }

    /// Ends the report with a line naming the run folder `dir`.
    pub fn naming_folder(mut self, dir: &std::path::Path) -> Self {
        self.folder = Some(dir.to_path_buf());
        self
    }

    fn folder_line(&mut self) -> io::Result<()> {
        if let Some(dir) = &self.folder {
            writeln!(
                self.out,
                "run folder: {} (report.json, timeline.html, a log per test, each level's files)",
                text::line(&dir.display().to_string())
            )?;
        }
        Ok(())
    }

    /// Writes a line above the progress bar: the bar is cleared, the line written
    /// and flushed, and only then the bar drawn again, so no stale copy of the bar
    /// is left between lines.
    fn line(&mut self, text: &str) -> io::Result<()> {
        let out = &mut self.out;
        self.progress.suspend(|| {
            writeln!(out, "{text}")?;
            out.flush()
        })
    }
}

impl<W: Write + Send> Reporter for HumanReporter<W> {
    fn event(&mut self, event: &TestEvent) -> io::Result<()> {
        match event {
            TestEvent::RunStarted {
                suite,
                sha256,
                level_path,
                planned,
                filtered_out,
                jobs,
                retries,
                ..
            } => {
                self.tries = retries.saturating_add(1);
                self.progress.set_length(*planned as u64);
                let short = text::line(sha256.get(..12).unwrap_or(sha256));
                self.line(&format!(
                    "Starting {planned} tests from {} at {} \
                     (component {short}, {filtered_out} filtered out, {jobs} at a time)",
                    text::line(suite),
                    text::line(level_path)
                ))?;
            }
            TestEvent::TestSlow { test, elapsed_secs } => {
                self.line(&format!(
                    "    SLOW [>{elapsed_secs:>8.3}s] {}",
                    display_name(test)
                ))?;
            }
            TestEvent::LevelsKept {
                test,
                levels,
                until,
                ..
            } => {
                let width = levels.iter().map(|l| l.path.len()).max().unwrap_or(0);
                let mut text = format!(
                    "    KEPT the chain up after {} failed; each level is reached with:",
                    display_name(test)
                );
                for level in levels {
                    let path = text::line(&level.path);
                    text.push_str(&format!(
                        "\n      {path:>width$}  {}",
                        text::line(&level.shell)
                    ));
                    let pad = " ".repeat(width + 8);
                    if let Some(monitor) = &level.monitor {
                        text.push_str(&format!("\n{pad}monitor: {}", text::line(monitor)));
                    }
                    if let Some(note) = &level.note {
                        text.push_str(&format!("\n{pad}({})", text::line(note)));
                    }
                }
                text.push_str(&format!("\n    {}", text::line(until)));
                self.line(&text)?;
            }
            TestEvent::TestStarted { test } => {
                self.progress
                    .set_message(text::line(&test.name).into_owned());
            }
            TestEvent::Output {
                test,
                origin,
                stream,
                text: written,
            } if self.show_output => {
                let tag = match stream {
                    Stream::Stdout => "stdout".to_string(),
                    Stream::Stderr => "stderr".to_string(),
                    Stream::Log(level) => level.as_str().to_string(),
                };
                let prefix = format!(
                    "{tag:>6} {} {} | ",
                    text::line(origin),
                    text::line(&test.name)
                );
                let body = text::block(written.trim_end_matches('\n'));
                self.line(&indent(&body, &prefix))?;
            }
            TestEvent::TestRetried {
                test,
                attempt,
                failure,
                duration_secs,
                ..
            } => {
                let first = text::first_line(&failure.message, LINE_WIDTH);
                self.line(&format!(
                    "  TRY {attempt} FAIL [{duration_secs:>8.3}s] {}: {}: {first}",
                    display_name(test),
                    failure.kind.as_str()
                ))?;
            }
            TestEvent::TestFinished {
                test,
                outcome,
                duration_secs,
                output,
                attempts,
                first_failure,
                ..
            } => {
                self.progress.inc(1);
                let name = display_name(test);
                let tries = if *attempts > 1 {
                    format!(" (try {attempts} of {})", self.tries)
                } else {
                    String::new()
                };
                match outcome {
                    Outcome::Passed => match first_failure {
                        Some(failure) => {
                            self.line(&format!("   FLAKY [{duration_secs:>8.3}s] {name}{tries}"))?;
                            self.flaky.push((test.clone(), failure.clone()));
                        }
                        None => self.line(&format!("    PASS [{duration_secs:>8.3}s] {name}"))?,
                    },
                    Outcome::Ignored => {
                        self.line(&format!("    SKIP [{:>9}] {name} (ignored)", ""))?;
                    }
                    Outcome::Failed(f) => {
                        let first = text::first_line(&f.message, LINE_WIDTH);
                        self.line(&format!(
                            "    FAIL [{duration_secs:>8.3}s] {name}{tries}: {}: {first}",
                            f.kind.as_str()
                        ))?;
                        self.failures
                            .push((test.clone(), f.clone(), output.clone()));
                    }
                }
            }
            // Before the run started, the error on stderr says it all.
            TestEvent::RunAborted {
                reason,
                finished,
                duration_secs,
                ..
            } if self.tries > 0 => {
                self.progress.finish_and_clear();
                writeln!(
                    self.out,
                    "\naborted after {duration_secs:.2}s, {finished} tests finished: {}",
                    text::block(reason)
                )?;
                self.folder_line()?;
            }
            TestEvent::RunFinished {
                summary,
                duration_secs,
            } => {
                self.progress.finish_and_clear();
                if !self.failures.is_empty() {
                    writeln!(self.out, "\nfailures:")?;
                    for (test, failure, output) in &self.failures {
                        writeln!(
                            self.out,
                            "\n--- {} ({}) ---",
                            display_name(test),
                            failure.kind.as_str()
                        )?;
                        writeln!(self.out, "{}", message_head(&failure.message))?;
                        if let Some(at) = &failure.location {
                            writeln!(self.out, "  at {}", text::line(at))?;
                        }
                        let rendered = render_output(output);
                        if !rendered.is_empty() {
                            writeln!(self.out, "{rendered}")?;
                        }
                    }
                    writeln!(self.out, "\nfailed tests:")?;
                    for (test, failure, _) in &self.failures {
                        writeln!(
                            self.out,
                            "    {} ({})",
                            display_name(test),
                            failure.kind.as_str()
                        )?;
                    }
                }
                if !self.flaky.is_empty() {
                    writeln!(self.out, "\nflaky tests (passed on a retry):")?;
                    for (test, failure) in &self.flaky {
                        writeln!(
                            self.out,
                            "    {} (try 1: {}: {})",
                            display_name(test),
                            failure.kind.as_str(),
                            text::first_line(&failure.message, LINE_WIDTH)
                        )?;
                    }
                }
                let flaky = if summary.flaky > 0 {
                    format!(" ({} flaky)", summary.flaky)
                } else {
                    String::new()
                };
                writeln!(
                    self.out,
                    "\n{} passed{flaky}, {} failed, {} ignored; {} filtered out; finished in {:.2}s",
                    summary.passed,
                    summary.failed,
                    summary.ignored,
                    summary.filtered_out,
                    duration_secs
                )?;
                self.folder_line()?;
            }
            _ => {}
        }
        self.out.flush()
    }
}

/// `level_path suite::name`, escaped to stay on one line.
fn display_name(test: &TestId) -> String {
    format!(
        "{} {}",
        text::line(&test.level_path),
        text::line(&test.full_name())
    )
}

/// Lines of each stream shown for a test; earlier ones are counted, not shown.
const TAIL_LINES: usize = 20;
/// Characters shown of one line.
const LINE_WIDTH: usize = 240;

fn render_output(output: &CapturedOutput) -> String {
    let mut parts = Vec::new();
    if !output.logs.is_empty() {
        let lines: Vec<String> = output
            .logs
            .iter()
            .map(|l| format!("{} {}", log_prefix(l), l.message))
            .collect();
        parts.push(format!("--- log ---\n{}", tail(&lines.join("\n"))));
    }
    if !output.stdout.is_empty() {
        parts.push(format!("--- stdout ---\n{}", tail(&output.stdout)));
    }
    if !output.stderr.is_empty() {
        parts.push(format!("--- stderr ---\n{}", tail(&output.stderr)));
    }
    parts.join("\n")
}

/// Lines of a failure message shown; the run folder's log has all of it.
const MESSAGE_LINES: usize = 40;

/// The first [`MESSAGE_LINES`] lines of a failure message, escaped.
fn message_head(message: &str) -> String {
    let lines: Vec<&str> = message.lines().collect();
    if lines.len() <= MESSAGE_LINES {
        return text::block(message).into_owned();
    }
    format!(
        "{}\n({} more lines; the test's log in the run folder has all)",
        text::block(&lines[..MESSAGE_LINES].join("\n")),
        lines.len() - MESSAGE_LINES
    )
}

/// The last [`TAIL_LINES`] lines of `output`, each cut at [`LINE_WIDTH`] and escaped.
fn tail(output: &str) -> String {
    let lines: Vec<String> = output
        .trim_end()
        .lines()
        .map(|l| match l.char_indices().nth(LINE_WIDTH) {
            Some((cut, _)) => format!("{}…", text::block(&l[..cut])),
            None => text::block(l).into_owned(),
        })
        .collect();
    if lines.len() <= TAIL_LINES {
        return lines.join("\n");
    }
    let skipped = lines.len() - TAIL_LINES;
    format!(
        "({skipped} earlier lines not shown; the test's log in the run folder has all)\n{}",
        lines[skipped..].join("\n")
    )
}
