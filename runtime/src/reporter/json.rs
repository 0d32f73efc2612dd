//! JSON lines: every event as one object on its own line.
//!
//! Text from the suite keeps its exact value: `serde_json` escapes quotes,
//! backslashes and every C0 control (newline, CR, ESC ...) inside strings, and
//! [`InertFormatter`] also writes as `\uXXXX` what JSON allows raw but a terminal
//! or line reader might act on (DEL, C1 controls such as U+009B CSI, U+2028,
//! bidirectional overrides; see [`text::is_unsafe`]). A name or message can
//! neither end its line nor reach a terminal as an escape sequence.

use std::io::{self, Write};

use serde::Serialize;
use serde_json::ser::{CompactFormatter, Formatter};

use super::{Reporter, text};
use crate::event::TestEvent;
use crate::output::CapturedOutput;

/// Compact JSON whose strings hold no character [`text::is_unsafe`] flags.
pub struct InertFormatter;

impl Formatter for InertFormatter {
    fn write_string_fragment<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut start = 0;
        for (at, c) in fragment.char_indices() {
            if text::is_unsafe(c) {
                CompactFormatter.write_string_fragment(writer, &fragment[start..at])?;
                // Every unsafe character is in the basic plane: one `\uXXXX` escape.
                write!(writer, "\\u{:04x}", u32::from(c))?;
                start = at + c.len_utf8();
            }
        }
        CompactFormatter.write_string_fragment(writer, &fragment[start..])
    }
}

/// `value` as one line of JSON, with [`InertFormatter`].
pub fn to_line(value: &impl Serialize) -> io::Result<String> {
    let mut out = Vec::new();
    value.serialize(&mut serde_json::Serializer::with_formatter(
        &mut out,
        InertFormatter,
    ))?;
    String::from_utf8(out).map_err(io::Error::other)
}

/// The version of the JSON lines format (docs/json.md): raised when a field
/// changes meaning or goes away; new events and fields keep it.
pub const FORMAT_VERSION: u32 = 1;

/// One line: the event's fields beside the format version and the wall-clock
/// time the reporter saw it.
#[derive(Serialize)]
struct Line<'a> {
    version: u32,
    /// RFC 3339 in UTC, to the millisecond.
    time: String,
    #[serde(flatten)]
    event: &'a TestEvent,
}

/// Writes each event as a JSON line.
pub struct JsonReporter<W> {
    out: W,
    live: bool,
}

impl<W: Write> JsonReporter<W> {
    /// A reporter writing to `out`; `live` says output events are sent as output
    /// happens, so `test-finished` need not carry that output a second time.
    pub fn new(out: W, live: bool) -> Self {
        Self { out, live }
    }
}

impl<W: Write + Send> Reporter for JsonReporter<W> {
    fn event(&mut self, event: &TestEvent) -> io::Result<()> {
        let without_output;
        let event = match event {
            TestEvent::TestFinished { .. } | TestEvent::TestRetried { .. } if self.live => {
                without_output = strip_output(event.clone());
                &without_output
            }
            _ => event,
        };
        let time = super::rfc3339(std::time::SystemTime::now());
        let line = Line {
            version: FORMAT_VERSION,
            time,
            event,
        };
        line.serialize(&mut serde_json::Serializer::with_formatter(
            &mut self.out,
            InertFormatter,
        ))?;
        self.out.write_all(b"\n")?;
        self.out.flush()
    }
}

/// `event` without the output it carries (an empty output is not written).
fn strip_output(mut event: TestEvent) -> TestEvent {
    if let TestEvent::TestFinished { output, .. } | TestEvent::TestRetried { output, .. } =
        &mut event
    {
        *output = CapturedOutput::default();
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{FailureKind, Outcome, TestFailure, TestId};

    #[test]
    fn hostile_text_stays_on_one_line_and_round_trips() {
        let hostile = "a\nb\r\u{1b}[31m\u{0}\"]]>\\ \u{7f}\u{9b}1m \u{2028}\u{202e}\u{fffe} é";
        let event = TestEvent::TestFinished {
            test: TestId {
                suite: "s".into(),
                name: hostile.into(),
                level_path: "L0".into(),
            },
            index: 0,
            outcome: Outcome::Failed(TestFailure {
                kind: FailureKind::Panic,
                message: hostile.into(),
                location: None,
            }),
            duration_secs: 0.0,
            output: CapturedOutput::default(),
            attempts: 1,
            first_failure: None,
        };
        let mut out = Vec::new();
        JsonReporter::new(&mut out, false)
            .event(&event)
            .expect("written");
        let line = String::from_utf8(out).expect("utf-8");
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        assert!(!line.bytes().any(|b| b < 0x20 && b != b'\n'), "{line}");
        assert!(
            !line.chars().any(|c| c != '\n' && text::is_unsafe(c)),
            "{line}"
        );
        assert!(
            line.contains(r#"\u007f\u009b1m \u2028\u202e\ufffe é"#),
            "{line}"
        );
        let value: serde_json::Value = serde_json::from_str(&line).expect("parses");
        assert_eq!(value["test"]["name"], hostile);
        assert_eq!(value["outcome"]["message"], hostile);
    }
}
