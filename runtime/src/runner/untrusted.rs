//! What the runner does with text the suite controls before any report sees it:
//! test names are checked (non-empty, unique, bounded) and failure messages,
//! whoever wrote them, are capped and charged to the test's output budget.
//! Escaping for display is the reporters' business, not this module's.

use std::collections::HashMap;

use super::RunError;
use crate::event::Outcome;
use crate::host::TestCase;
use crate::output::{Capture, MESSAGE_FLOOR, cap_location, cap_message, cap_text};

/// Bytes a test name may have.
pub const NAME_LIMIT: usize = 4096;

/// Problems an error names before it only counts the rest.
const PROBLEMS_SHOWN: usize = 10;

/// Checks that the names of `cases` are non-empty, at most [`NAME_LIMIT`] bytes
/// and unique. Names appear escaped (Rust debug form) and cut in the error.
pub fn validate(suite: &str, cases: &[TestCase]) -> Result<(), RunError> {
    let shown = |name: &str| match name.char_indices().nth(64) {
        Some((cut, _)) => format!("{:?}…", &name[..cut]),
        None => format!("{name:?}"),
    };
    let mut problems = Vec::new();
    let mut counts: Vec<(&str, usize)> = Vec::new();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut empty = 0;
    for case in cases {
        let name = case.name.as_str();
        if name.is_empty() {
            empty += 1;
        } else if name.len() > NAME_LIMIT {
            problems.push(format!(
                "test name {} is {} bytes long",
                shown(name),
                name.len()
            ));
        } else if let Some(&i) = seen.get(name) {
            counts[i].1 += 1;
        } else {
            seen.insert(name, counts.len());
            counts.push((name, 1));
        }
    }
    for (name, n) in counts.into_iter().filter(|(_, n)| *n > 1) {
        let times = if n == 2 {
            "twice".to_string()
        } else {
            format!("{n} times")
        };
        problems.push(format!("test name {} is declared {times}", shown(name)));
    }
    match empty {
        0 => {}
        1 => problems.push("a test has an empty name".into()),
        n => problems.push(format!("{n} tests have an empty name")),
    }
    if problems.is_empty() {
        return Ok(());
    }
    if problems.len() > PROBLEMS_SHOWN {
        let more = problems.len() - PROBLEMS_SHOWN;
        problems.truncate(PROBLEMS_SHOWN);
        problems.push(format!("{more} more problems"));
    }
    Err(RunError::Malformed {
        suite: suite.to_string(),
        problems,
    })
}

/// Caps the failure message of `outcome` (whether the guest, a level below or this
/// runtime wrote it) at [`MESSAGE_LIMIT`](crate::output::MESSAGE_LIMIT) and its
/// location at [`LOCATION_LIMIT`](crate::output::LOCATION_LIMIT), and counts what
/// is kept against the test's output budget: a test that spent its budget keeps
/// only [`MESSAGE_FLOOR`] bytes of its message.
pub(super) fn keep_within_budget(outcome: Outcome, capture: &Capture) -> Outcome {
    let Outcome::Failed(mut f) = outcome else {
        return outcome;
    };
    f.message = cap_message(f.message);
    f.location = f.location.map(cap_location);
    let location = f.location.as_ref().map_or(0, String::len);
    let wanted = f.message.len() + location;
    let granted = capture.claim(wanted);
    if granted < wanted {
        let room = granted.saturating_sub(location).max(MESSAGE_FLOOR);
        f.message = cap_text(
            f.message,
            room,
            "the test's output budget was spent (raise it with --max-output)",
        );
    }
    Outcome::Failed(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::FailureKind;
    use crate::output::Stream;
    use crate::runner::failure;

    fn case(name: &str) -> TestCase {
        TestCase {
            name: name.into(),
            ignored: false,
            timeout_ms: None,
            tags: vec![],
        }
    }

    fn problems(names: &[&str]) -> Option<String> {
        let cases: Vec<TestCase> = names.iter().map(|n| case(n)).collect();
        validate("s", &cases).err().map(|e| e.to_string())
    }

    #[test]
    fn unique_names_are_valid() {
        assert_eq!(problems(&["a", "b", "a\nb", "\u{1b}"]), None);
    }

    #[test]
    fn duplicates_and_empty_names_are_named_escaped() {
        let e =
            problems(&["x", "", "esc\u{1b}\n", "x", "esc\u{1b}\n", "x", ""]).expect("malformed");
        assert_eq!(
            e,
            "the suite s is malformed: test name \"x\" is declared 3 times; \
             test name \"esc\\u{1b}\\n\" is declared twice; 2 tests have an empty name \
             (each test needs a unique, non-empty name of at most 4096 bytes)"
        );
        assert!(!e.contains('\u{1b}'));
    }

    #[test]
    fn overlong_names_are_cut_in_the_error() {
        let long = "n".repeat(NAME_LIMIT + 1);
        let e = problems(&[&long]).expect("malformed");
        assert!(
            e.contains(&format!(
                "test name \"{}\"… is 4097 bytes long",
                "n".repeat(64)
            )),
            "{e}"
        );
        assert!(e.len() < 300, "{e}");
        let many: Vec<String> = (0..30).map(|i| format!("{i}")).collect();
        let twice: Vec<&str> = many.iter().chain(&many).map(String::as_str).collect();
        let e = problems(&twice).expect("malformed");
        assert!(e.contains("; 20 more problems ("), "{e}");
    }

    fn failed(message: &str, location: Option<&str>) -> Outcome {
        Outcome::Failed(failure(
            FailureKind::Panic,
            message.to_string(),
            location.map(str::to_string),
        ))
    }

    fn message_of(outcome: &Outcome) -> &str {
        match outcome {
            Outcome::Failed(f) => &f.message,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn huge_messages_are_capped_and_charged() {
        let capture = Capture::new("L0", 1 << 20, None);
        let out = keep_within_budget(failed(&"z".repeat(8 << 20), Some("f.rs:1:2")), &capture);
        let message = message_of(&out);
        assert!(message.len() <= crate::output::MESSAGE_LIMIT);
        assert!(
            message.ends_with("of 8388608 bytes cut: a failure message is kept up to 64 KiB]"),
            "{}",
            &message[message.len() - 100..]
        );
        // What was kept was charged: less than 1 MiB - 64 KiB is left.
        assert!(capture.claim(usize::MAX) < (1 << 20) - (64 << 10) + 100);
    }

    #[test]
    fn a_spent_budget_keeps_only_the_floor_of_the_message() {
        let capture = Capture::new("L0", 4096, None);
        capture.write(Stream::Stdout, &[b'o'; 4000]).expect("fits");
        let out = keep_within_budget(failed(&"m".repeat(10_000), None), &capture);
        let message = message_of(&out);
        assert!(message.len() <= MESSAGE_FLOOR, "{}", message.len());
        assert!(
            message.ends_with("the test's output budget was spent (raise it with --max-output)]")
        );
        let small = keep_within_budget(failed("short", None), &capture);
        assert_eq!(message_of(&small), "short", "a short message is never cut");
        assert_eq!(
            keep_within_budget(Outcome::Passed, &capture),
            Outcome::Passed
        );
    }
}
