//! `timeline.html` in the run folder: one self-contained page (an inline SVG,
//! no script, nothing fetched) with a lane per level on one time axis: the
//! chain's boot and each level's boot steps, tests (forwarded down the lanes of
//! a chain to the level that runs them), log lines from each level, the
//! kernel's signs of trouble, holds of `--keep-failed`, and the first failure
//! marked across every lane.
//!
//! Times are this runtime's, taken as events arrive, except the hops' journals
//! (each parent's wall clock) and boot steps: those
//! are each level's own uptime (its level log), placed from the start of the
//! chain's boot (or of the first test, for a test's own guests) for L1 and
//! from its parent's `runtime started` step below.
//! Every text from a suite or a level is escaped for HTML after
//! [`text::line`](super::text::line) made it one inert line.

use std::io;
use std::path::PathBuf;
use std::time::Instant;

use super::{Reporter, result_word, text};
use crate::event::{TestEvent, TestId};
use crate::output::{CapturedOutput, LogLevel};

/// What the page shows.
#[derive(Debug, Clone, PartialEq)]
enum Mark {
    /// The chain booting, on L0's lane.
    Booting { from: f64, to: f64 },
    /// A boot step of a level, at its time.
    Boot { at: f64, what: String },
    /// A test on a lane (`forward` on the lanes it passed through).
    Test {
        from: f64,
        to: f64,
        name: String,
        result: &'static str,
        detail: String,
        forward: bool,
    },
    /// A log line from a level.
    Log { at: f64, text: String, kernel: bool },
    /// `--keep-failed` held the chain.
    Kept { at: f64 },
    /// Something crossed the hop to this level (its parent's journal).
    Relay { at: f64, text: String },
}

/// Collects the run's events with their times and writes `timeline.html`.
pub struct TimelineReporter {
    dir: PathBuf,
    started: Instant,
    /// The same moment on the wall clock, for the hops' journals.
    started_wall: std::time::SystemTime,
    boot: Option<f64>,
    marks: Vec<(String, Mark)>,
    first_failure: Option<f64>,
    first_test: Option<f64>,
    title: String,
}

/// Marks kept at most; the rest of a long run is left out (the page says so).
const MARK_LIMIT: usize = 20_000;
/// Characters of a tooltip.
const TIP_WIDTH: usize = 300;

impl TimelineReporter {
    /// A reporter writing `timeline.html` into `dir` when the run ends; times
    /// count from now.
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            started: Instant::now(),
            started_wall: std::time::SystemTime::now(),
            boot: None,
            marks: Vec::new(),
            first_failure: None,
            first_test: None,
            title: String::new(),
        }
    }

    fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn mark(&mut self, lane: &str, mark: Mark) {
        if self.marks.len() < MARK_LIMIT {
            self.marks.push((lane.to_string(), mark));
        }
    }

    fn test_marks(
        &mut self,
        test: &TestId,
        from: f64,
        to: f64,
        result: &'static str,
        detail: String,
    ) {
        // Only its first line is shown: the rest need not be kept per lane.
        let detail: String = detail
            .lines()
            .next()
            .unwrap_or_default()
            .chars()
            .take(TIP_WIDTH + 1)
            .collect();
        // A chain's test passes every level above the one that runs it.
        let mut lane = String::new();
        for part in test.level_path.split('/') {
            if !lane.is_empty() {
                lane.push('/');
            }
            lane.push_str(part);
            let forward = lane != test.level_path;
            self.mark(
                &lane.clone(),
                Mark::Test {
                    from,
                    to,
                    name: test.full_name(),
                    result,
                    detail: detail.clone(),
                    forward,
                },
            );
        }
    }

    fn log_marks(&mut self, from: f64, output: &CapturedOutput) {
        for line in &output.logs {
            let kernel = line.level == LogLevel::Warn && line.message.starts_with("kernel: ");
            self.mark(
                &line.level_path,
                Mark::Log {
                    at: from + line.at_secs,
                    text: format!("{} {}", line.level.as_str(), line.message),
                    kernel,
                },
            );
        }
    }

    /// Boot steps from the level logs in the folder (`L0-L1.log`, …).
    fn boot_marks(&mut self) {
        // A chain boots when the run starts it; a test's own guests after the
        // first test started.
        let Some(boot) = self.boot.or(self.first_test) else {
            return;
        };
        let mut depth = 1;
        // Where the parent's runtime started, on this page's clock.
        let mut anchor = boot;
        loop {
            let name = (0..=depth)
                .map(|d| format!("L{d}"))
                .collect::<Vec<_>>()
                .join("-");
            let Ok(log) = std::fs::read_to_string(self.dir.join(format!("{name}.log"))) else {
                return;
            };
            let lane = name.replace('-', "/");
            let mut next_anchor = None;
            for line in log.lines() {
                let Some(rest) = line.strip_prefix("MATRYOSHKA-STEP ") else {
                    continue;
                };
                let Some((secs, what)) = rest.split_once(' ') else {
                    continue;
                };
                let Ok(secs) = secs.parse::<f64>() else {
                    continue;
                };
                let at = anchor + secs;
                if what == "runtime started" {
                    next_anchor = Some(at);
                }
                self.mark(
                    &lane,
                    Mark::Boot {
                        at,
                        what: format!("{what} ({secs:.2} s after its kernel started)"),
                    },
                );
            }
            match next_anchor {
                Some(at) => anchor = at,
                None => return,
            }
            depth += 1;
        }
    }

    /// Calls, tests and answers that crossed each hop, from the journals in
    /// the folder (`L0-L1.relay`: written by the parent, on its wall clock).
    fn relay_marks(&mut self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let start = chrono::DateTime::<chrono::Utc>::from(self.started_wall);
        let mut journals: Vec<(String, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let level = name.strip_suffix(".relay")?;
                level
                    .starts_with("L0-")
                    .then(|| (level.replace('-', "/"), e.path()))
            })
            .collect();
        journals.sort();
        for (lane, path) in journals {
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            for line in text.lines() {
                let Some((time, what)) = line.split_once(' ') else {
                    continue;
                };
                let Ok(time) = chrono::DateTime::parse_from_rfc3339(time) else {
                    continue;
                };
                let at = (time.with_timezone(&chrono::Utc) - start).as_seconds_f64();
                self.mark(
                    &lane,
                    Mark::Relay {
                        at,
                        text: what.to_string(),
                    },
                );
            }
        }
    }

    fn write(&mut self, end: f64) -> io::Result<()> {
        self.boot_marks();
        self.relay_marks();
        let html = render(&self.title, &self.marks, self.first_failure, end);
        std::fs::create_dir_all(&self.dir)?;
        std::fs::write(self.dir.join("timeline.html"), html)
    }
}

impl Reporter for TimelineReporter {
    fn event(&mut self, event: &TestEvent) -> io::Result<()> {
        let now = self.now();
        match event {
            TestEvent::ChainBooting { .. } => self.boot = Some(now),
            TestEvent::ChainUp { .. } => {
                let from = self.boot.unwrap_or(0.0);
                self.mark("L0", Mark::Booting { from, to: now });
            }
            TestEvent::RunStarted {
                suite, level_path, ..
            } => {
                self.title = format!("{suite} at {level_path}");
            }
            TestEvent::TestStarted { .. } => {
                self.first_test.get_or_insert(now);
            }
            TestEvent::TestRetried {
                test,
                attempt,
                failure,
                duration_secs,
                output,
            } => {
                let from = now - duration_secs;
                self.first_failure.get_or_insert(now);
                let detail = format!(
                    "try {attempt}: {}: {}",
                    failure.kind.as_str(),
                    failure.message
                );
                self.test_marks(test, from, now, "fail", detail);
                self.log_marks(from, output);
            }
            TestEvent::TestFinished {
                test,
                outcome,
                duration_secs,
                output,
                first_failure,
                ..
            } => {
                let from = now - duration_secs;
                let (result, failure) = result_word(outcome, first_failure.as_ref());
                if result == "ignored" {
                    return Ok(());
                }
                let detail = failure.map_or_else(String::new, |f| {
                    self.first_failure.get_or_insert(now);
                    format!("{}: {}", f.kind.as_str(), f.message)
                });
                self.test_marks(test, from, now, result, detail);
                self.log_marks(from, output);
            }
            TestEvent::LevelsKept { levels, .. } => {
                for level in levels {
                    self.mark(&level.path, Mark::Kept { at: now });
                }
            }
            TestEvent::RunFinished { .. } | TestEvent::RunAborted { .. } => self.write(now)?,
            _ => {}
        }
        Ok(())
    }
}

/// `s` as one inert line, cut, escaped for HTML text and attributes.
fn html(s: &str) -> String {
    let line = text::first_line(s, TIP_WIDTH);
    let mut out = String::with_capacity(line.len());
    for c in line.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Lanes in level order: L0, L0/L1, L0/L1/L2, …
fn lanes(marks: &[(String, Mark)]) -> Vec<String> {
    let mut lanes: Vec<String> = vec!["L0".into()];
    for (lane, _) in marks {
        if !lanes.contains(lane) {
            lanes.push(lane.clone());
        }
    }
    lanes.sort_by(|a, b| (a.matches('/').count(), a).cmp(&(b.matches('/').count(), b)));
    lanes
}

const LEFT: f64 = 120.0;
const WIDTH: f64 = 1100.0;
const LANE: f64 = 70.0;
const TOP: f64 = 40.0;

/// The page.
fn render(title: &str, marks: &[(String, Mark)], failure: Option<f64>, end: f64) -> String {
    let lanes = lanes(marks);
    let end = end.max(0.001);
    let x = |t: f64| LEFT + (t.max(0.0) / end) * WIDTH;
    let height = TOP + LANE * lanes.len() as f64 + 30.0;
    let mut svg = String::new();
    // Axis with about ten ticks.
    let step = nice_step(end / 10.0);
    let mut t = 0.0;
    while t <= end + 1e-9 {
        svg.push_str(&format!(
            "<line class=\"tick\" x1=\"{0:.1}\" y1=\"{1}\" x2=\"{0:.1}\" y2=\"{2:.1}\"/>\
             <text class=\"axis\" x=\"{0:.1}\" y=\"{3}\">{4} s</text>\n",
            x(t),
            TOP - 10.0,
            height - 30.0,
            TOP - 14.0,
            trim_float(t)
        ));
        t += step;
    }
    for (i, lane) in lanes.iter().enumerate() {
        let y = TOP + LANE * i as f64;
        svg.push_str(&format!(
            "<g class=\"lane\" data-level=\"{0}\"><rect class=\"lane-bg\" x=\"0\" y=\"{1:.1}\" \
             width=\"{2:.1}\" height=\"{3:.1}\"/><text class=\"lane-name\" x=\"8\" y=\"{4:.1}\">{0}</text>\n",
            html(lane),
            y,
            LEFT + WIDTH + 20.0,
            LANE - 4.0,
            y + LANE / 2.0 + 4.0
        ));
        // Failed tests last, so a test running beside them does not hide them.
        let failed = |m: &Mark| {
            matches!(
                m,
                Mark::Test {
                    result: "fail",
                    forward: false,
                    ..
                }
            )
        };
        for pass in [false, true] {
            for (at_lane, mark) in marks {
                if at_lane == lane && failed(mark) == pass {
                    svg.push_str(&mark_svg(mark, y, &x));
                }
            }
        }
        svg.push_str("</g>\n");
    }
    if let Some(at) = failure {
        svg.push_str(&format!(
            "<line id=\"first-failure\" class=\"failure\" x1=\"{0:.1}\" y1=\"{1}\" x2=\"{0:.1}\" \
             y2=\"{2:.1}\"><title>first failure at {3:.3} s</title></line>\n",
            x(at),
            TOP - 6.0,
            height - 30.0,
            at
        ));
    }
    let left_out = if marks.len() >= MARK_LIMIT {
        format!("<p>Only the first {MARK_LIMIT} marks are drawn.</p>")
    } else {
        String::new()
    };
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\
         <title>matryoshka timeline: {title}</title>\n<style>\n{STYLE}</style></head>\n<body>\
         <h1>matryoshka timeline: {title}</h1>\n<p class=\"legend\"><span class=\"k-boot\">◆ boot step</span> \
         <span class=\"k-pass\">■ test passed</span> <span class=\"k-fail\">■ test failed</span> \
         <span class=\"k-forward\">▬ test forwarded through a level</span> <span class=\"k-log\">● log line</span> \
         <span class=\"k-kernel\">▲ kernel sign of trouble</span> <span class=\"k-kept\">▼ kept up (--keep-failed)</span> \
         <span class=\"k-relay\">▮ crossed the hop to the level (Load, calls, tests, answers)</span>; \
         hover for details. Boot steps are placed by each level's own clock, from when its parent's runtime started.</p>\n{left_out}\
         <svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w:.0}\" height=\"{height:.0}\">\n{svg}</svg>\n</body></html>\n",
        title = html(title),
        w = LEFT + WIDTH + 20.0,
    )
}

fn mark_svg(mark: &Mark, y: f64, x: &dyn Fn(f64) -> f64) -> String {
    let mid = y + LANE / 2.0;
    match mark {
        Mark::Booting { from, to } => format!(
            "<rect class=\"event booting\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"8\">\
             <title>booting the chain: {:.2} s</title></rect>\n",
            x(*from),
            y + 4.0,
            (x(*to) - x(*from)).max(1.0),
            to - from
        ),
        Mark::Boot { at, what } => format!(
            "<path class=\"event boot\" d=\"M{0:.1} {1:.1} l5 5 l-5 5 l-5 -5 z\"><title>boot: {2}</title></path>\n",
            x(*at),
            y + 14.0,
            html(what)
        ),
        Mark::Test {
            from,
            to,
            name,
            result,
            detail,
            forward,
        } => {
            let (class, top, h) = if *forward {
                ("forward", mid - 2.0, 4.0)
            } else {
                (*result, mid - 9.0, 18.0)
            };
            let detail = if detail.is_empty() {
                String::new()
            } else {
                format!(" — {}", html(detail))
            };
            format!(
                "<rect class=\"event test {class}\" data-test=\"{0}\" x=\"{1:.1}\" y=\"{top:.1}\" width=\"{2:.1}\" \
                 height=\"{h}\"><title>{0}: {result} in {3:.3} s{detail}</title></rect>\n",
                html(name),
                x(*from),
                (x(*to) - x(*from)).max(2.0),
                to - from
            )
        }
        Mark::Log { at, text, kernel } => {
            if *kernel {
                format!(
                    "<path class=\"event kernel\" d=\"M{0:.1} {1:.1} l6 10 l-12 0 z\"><title>{2}</title></path>\n",
                    x(*at),
                    y + LANE - 22.0,
                    html(text)
                )
            } else {
                format!(
                    "<circle class=\"event log\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\"><title>{}</title></circle>\n",
                    x(*at),
                    y + LANE - 14.0,
                    html(text)
                )
            }
        }
        Mark::Relay { at, text } => format!(
            "<rect class=\"event relay\" x=\"{:.1}\" y=\"{:.1}\" width=\"2\" height=\"10\">\
             <title>hop: {}</title></rect>\n",
            x(*at),
            y + 2.0,
            html(text)
        ),
        Mark::Kept { at } => format!(
            "<path class=\"event kept\" d=\"M{0:.1} {1:.1} l6 -10 l-12 0 z\"><title>kept up for a person \
             (--keep-failed) from {2:.2} s</title></path>\n",
            x(*at),
            y + 14.0,
            at
        ),
    }
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    let raw = raw.max(1e-3);
    let power = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * power)
}

fn trim_float(t: f64) -> String {
    let s = format!("{t:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

const STYLE: &str = "body{font:13px sans-serif;margin:16px;color:#222}\
h1{font-size:16px}.legend span{margin-right:10px}\
.lane-bg{fill:#f6f6f6}.lane:nth-child(even) .lane-bg{fill:#ececec}\
.lane-name{font-weight:bold;font-size:12px}\
.tick{stroke:#ccc}.axis{font-size:10px;fill:#666;text-anchor:middle}\
.booting{fill:#9db4d6}.boot{fill:#3a6fb0}\
.test.pass{fill:#4caf50}.test.flaky{fill:#d4b106}.test.fail{fill:#d32f2f}.test.forward{fill:#999}\
.log{fill:#555}.kernel{fill:#ef6c00}.kept{fill:#7b1fa2}.relay{fill:#00897b}.k-relay{color:#00897b}\
.failure{stroke:#d32f2f;stroke-width:2;stroke-dasharray:4 3}\
.k-boot{color:#3a6fb0}.k-pass{color:#4caf50}.k-fail{color:#d32f2f}.k-forward{color:#999}\
.k-log{color:#555}.k-kernel{color:#ef6c00}.k-kept{color:#7b1fa2}\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_lanes_are_in_level_order() {
        let marks = vec![
            (
                "L0/L1/L2".to_string(),
                Mark::Log {
                    at: 1.0,
                    text: "<script>alert(1)</script>\u{1b}[31m\"'&".into(),
                    kernel: false,
                },
            ),
            (
                "L0/L1".to_string(),
                Mark::Test {
                    from: 0.5,
                    to: 2.0,
                    name: "s::<b>".into(),
                    result: "fail",
                    detail: "panic: x".into(),
                    forward: true,
                },
            ),
        ];
        let page = render("s at L0", &marks, Some(2.0), 3.0);
        assert!(!page.contains("<script>"), "{page}");
        assert!(!page.contains("<b>"), "{page}");
        assert!(!page.contains('\u{1b}'), "{page}");
        assert!(
            page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{page}"
        );
        let l1 = page.find("data-level=\"L0/L1\"").expect("L1 lane");
        let l2 = page.find("data-level=\"L0/L1/L2\"").expect("L2 lane");
        let l0 = page.find("data-level=\"L0\"").expect("L0 lane");
        assert!(l0 < l1 && l1 < l2);
        assert!(page.contains("id=\"first-failure\""));
        assert!(
            !page.contains("http://") || page.matches("http://").count() == 1,
            "only the SVG namespace"
        );
    }

    #[test]
    fn axis_steps_are_round() {
        assert_eq!(nice_step(0.7), 1.0);
        assert_eq!(nice_step(1.3), 2.0);
        assert_eq!(nice_step(3.1), 5.0);
        assert_eq!(nice_step(42.0), 50.0);
        assert_eq!(trim_float(2.5), "2.5");
        assert_eq!(trim_float(10.0), "10");
    }
}
