//! Untrusted text is inert in every report: the real binary on suites whose test
//! names, failure messages and output hold newlines, terminal escapes, carriage
//! returns, line separators, `]]>` and characters XML 1.0 forbids
//! (`hostile-names`), whose names are duplicated or empty (`hostile-dupes`), and
//! whose failure messages are 8 MiB long (`hostile`).

#[allow(dead_code, reason = "shared by several test crates, each using a part")]
mod common;

use std::io::BufReader;

use common::{Run, run};
use matryoshka_test_programs::{HOSTILE, HOSTILE_DUPES, HOSTILE_NAMES};

/// Test names of `hostile-names` as it declares them, in order.
const RAW_NAMES: [&str; 9] = [
    "line\nbreak",
    "esc\x1b[31mred\x1b[0m",
    "cdata ]]> <b>&amp;",
    "sneaky # TODO not really",
    "fake\nok 42 - injected",
    "cr\rnot ok 7 - injected \u{85}nel \u{2028}ls \u{202e}bidi",
    "nul\0bell\x07 nonchar\u{fffe}",
    "noisy_output",
    "ignored\x1b[8m # SKIP",
];

/// The same names as human, JUnit and `--list` output show them.
const SHOWN_NAMES: [&str; 9] = [
    r"line\nbreak",
    r"esc\u{1b}[31mred\u{1b}[0m",
    "cdata ]]> <b>&amp;",
    "sneaky # TODO not really",
    r"fake\nok 42 - injected",
    r"cr\rnot ok 7 - injected \u{85}nel \u{2028}ls \u{202e}bidi",
    r"nul\u{0}bell\u{7} nonchar\u{fffe}",
    "noisy_output",
    r"ignored\u{1b}[8m # SKIP",
];

/// Asserts that no character that could act on a terminal, split a line for some
/// reader or break XML is in `text`, newlines and tabs aside.
#[track_caller]
fn assert_inert(text: &str) {
    assert!(!text.contains('\x1b'), "an ESC reached the report:\n{text}");
    let raw = text.chars().find(|&c| {
        c != '\n'
            && c != '\t'
            && (c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202e}' | '\u{fffe}'))
    });
    assert_eq!(
        raw, None,
        "a raw control character reached the report:\n{text}"
    );
}

fn hostile_names(format: &str) -> Run {
    let r = run(&[
        "test",
        HOSTILE_NAMES,
        "-j",
        "1",
        "--nocapture",
        "--format",
        format,
    ]);
    r.expect_code(100);
    r
}

#[test]
fn human_report_shows_names_on_one_line_and_escapes_everything() {
    let r = run(&["test", HOSTILE_NAMES, "-j", "1"]);
    r.expect_code(100);
    assert_inert(&r.stdout);
    let results: Vec<&str> = r
        .stdout
        .lines()
        .filter(|l| {
            ["PASS ", "FAIL ", "SKIP "]
                .iter()
                .any(|s| l.trim_start().starts_with(s))
        })
        .collect();
    assert_eq!(results.len(), 9, "one line per test:\n{}", r.stdout);
    for (line, name) in results.iter().zip(SHOWN_NAMES) {
        assert!(
            line.contains(&format!("] L0 hostile_names::{name}")),
            "{line:?} should name {name:?}"
        );
    }
    let fail = r.line_for("FAIL", "cdata");
    assert!(
        fail.ends_with(
            r"hostile_names::cdata ]]> <b>&amp;: panic: bad \u{1b}[2J\u{1b}]0;pwned\u{7} ]]> <![CDATA[x]]> \u{0}\u{fffe}"
        ),
        "{fail}"
    );
    // The message appears once in full, with its own lines kept and escapes visible.
    r.expect_stdout(concat!(
        "--- L0 hostile_names::cdata ]]> <b>&amp; (panic) ---\n",
        r"bad \u{1b}[2J\u{1b}]0;pwned\u{7} ]]> <![CDATA[x]]> \u{0}\u{fffe}",
        "\nok 99 - injected\n  ...\nnot ok 98 - injected\n  at hostile-names/src/lib.rs:"
    ));
    r.expect_stdout(r"--- L0 hostile_names::fake\nok 42 - injected (panic) ---");
    r.expect_stdout(concat!(
        r"warn L0] log \u{1b}[5mblink\u{1b}[0m",
        "\nok 77 - injected from a log line\n--- stdout ---\n",
        r"stdout \u{1b}[2J\u{1b}]0;pwned\u{7} ]]> <![CDATA[ \u{0}\u{fffe}",
        "\n",
        r"progress 50%\rnot ok 1 - injected from stdout",
        "\n--- stderr ---\n",
        r"stderr \u{1b}[31mred\u{1b}[0m \u{9b}31m",
    ));
    r.expect_stdout("4 passed, 4 failed, 1 ignored");

    // Live output (--nocapture) is escaped the same way, one prefixed line each.
    let live = hostile_names("human");
    assert_inert(&live.stdout);
    live.expect_stdout(r"stdout L0 noisy_output | progress 50%\rnot ok 1 - injected from stdout");
    live.expect_stdout(r"  warn L0 noisy_output | log \u{1b}[5mblink\u{1b}[0m");
    live.expect_stdout("  warn L0 noisy_output | ok 77 - injected from a log line");
}

#[test]
fn tap_has_one_test_point_per_test_and_no_forged_directive() {
    let r = hostile_names("tap");
    assert_inert(&r.stdout);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines[..2], ["TAP version 13", "1..9"]);
    let points: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("ok ") || l.starts_with("not ok "))
        .collect();
    assert_eq!(points.len(), 9, "the plan's count:\n{}", r.stdout);
    for (i, point) in points.iter().enumerate() {
        let n = i + 1;
        assert!(
            point.starts_with(&format!("ok {n} - "))
                || point.starts_with(&format!("not ok {n} - ")),
            "test point {n} out of order: {point:?}"
        );
        // Only the runtime's own SKIP directive may start with an unescaped `#`.
        let description = point.strip_suffix(" # SKIP ignored").unwrap_or(point);
        let unescaped = description
            .match_indices('#')
            .any(|(at, _)| !description[..at].ends_with('\\'));
        assert!(!unescaped, "a directive could be forged: {point:?}");
    }
    assert_eq!(
        points,
        [
            r"ok 1 - hostile_names::line\nbreak",
            r"ok 2 - hostile_names::esc\u{1b}[31mred\u{1b}[0m",
            "not ok 3 - hostile_names::cdata ]]> <b>&amp;",
            r"not ok 4 - hostile_names::sneaky \# TODO not really",
            r"not ok 5 - hostile_names::fake\nok 42 - injected",
            r"ok 6 - hostile_names::cr\rnot ok 7 - injected \u{85}nel \u{2028}ls \u{202e}bidi",
            r"ok 7 - hostile_names::nul\u{0}bell\u{7} nonchar\u{fffe}",
            "not ok 8 - hostile_names::noisy_output",
            r"ok 9 - hostile_names::ignored\u{1b}[8m \# SKIP # SKIP ignored",
        ]
    );
    // YAML values are one-line double-quoted scalars with YAML escapes.
    assert!(
        lines.contains(
            &r#"  message: "bad \e[2J\e]0;pwned\x07 ]]> <![CDATA[x]]> \x00\ufffe\nok 99 - injected\n  ...\nnot ok 98 - injected""#
        ),
        "{}",
        r.stdout
    );
    // Output comments cannot start a line of their own.
    assert!(lines.contains(&r"# [L0] progress 50%\rnot ok 1 - injected from stdout"));
    assert!(lines.contains(&"# [L0] ok 77 - injected from a log line"));
    let mut in_yaml = false;
    for l in &lines[2..] {
        match *l {
            "  ---" => in_yaml = true,
            "  ..." => in_yaml = false,
            l if in_yaml => {
                let (key, value) = l
                    .trim_start()
                    .split_once(": ")
                    .unwrap_or_else(|| panic!("not a YAML mapping line: {l:?}"));
                assert!(l.starts_with("  ") && key.bytes().all(|b| b.is_ascii_lowercase()));
                let quoted = value.len() >= 2 && value.starts_with('"') && value.ends_with('"');
                assert!(
                    quoted
                        || value
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-'),
                    "unquoted YAML value: {l:?}"
                );
            }
            l => assert!(
                l.starts_with("ok ") || l.starts_with("not ok ") || l.starts_with("# "),
                "not TAP: {l:?}"
            ),
        }
    }
}

#[test]
fn junit_is_well_formed_xml_and_keeps_the_escapes() {
    let r = hostile_names("junit");
    assert_inert(&r.stdout);
    let report = junit_parser::from_reader(BufReader::new(r.stdout.as_bytes()))
        .unwrap_or_else(|e| panic!("JUnit did not parse: {e}\n{}", r.stdout));
    assert_eq!(report.tests, 9);
    assert_eq!(report.failures, 4);
    assert_eq!(report.suites[0].skipped, 1);
    let cases = &report.suites[0].cases;
    let names: Vec<&str> = cases.iter().map(|c| c.original_name.as_str()).collect();
    assert_eq!(names, SHOWN_NAMES);
    // junit-parser drops entity references from element text, so the exact text is
    // checked in the XML itself, and the parsed text where no entity is involved.
    match &cases[2].status {
        junit_parser::TestStatus::Failure(f) => {
            assert_eq!(f.failure_type, "panic");
            assert_eq!(
                f.message,
                r"bad \u{1b}[2J\u{1b}]0;pwned\u{7} ]]> <![CDATA[x]]> \u{0}\u{fffe}"
            );
            assert!(
                f.text.starts_with(r"bad \u{1b}[2J\u{1b}]0;pwned\u{7} ]]"),
                "{}",
                f.text
            );
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    r.expect_stdout(concat!(
        r#"<failure message="bad \u{1b}[2J\u{1b}]0;pwned\u{7} ]]&gt; &lt;![CDATA[x]]&gt; \u{0}\u{fffe}" type="panic">"#,
        r"bad \u{1b}[2J\u{1b}]0;pwned\u{7} ]]&gt; &lt;![CDATA[x]]&gt; \u{0}\u{fffe}",
        "\nok 99 - injected\n  ...\nnot ok 98 - injected\nat hostile-names/src/lib.rs:"
    ));
    r.expect_stdout(
        r#"<testcase name="cdata ]]&gt; &lt;b&gt;&amp;amp;" classname="L0.hostile_names""#,
    );
    let noisy = &cases[7];
    let out = noisy.system_out.as_deref().unwrap_or_default();
    assert!(
        out.contains(r"progress 50%\rnot ok 1 - injected from stdout"),
        "{out}"
    );
    assert!(
        out.contains(r"[warn L0] log \u{1b}[5mblink\u{1b}[0m"),
        "{out}"
    );
    let err = noisy.system_err.as_deref().unwrap_or_default();
    assert_eq!(err.trim_end(), r"stderr \u{1b}[31mred\u{1b}[0m \u{9b}31m");
    r.expect_stdout(concat!(
        r"<system-out>stdout \u{1b}[2J\u{1b}]0;pwned\u{7} ]]&gt; &lt;![CDATA[ \u{0}\u{fffe}",
        "\n",
        r"progress 50%\rnot ok 1 - injected from stdout",
    ));

    // The file written beside human output is the same well-formed XML.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("report.xml");
    let path = path.to_str().expect("utf-8");
    run(&["test", HOSTILE_NAMES, "--junit", path]).expect_code(100);
    let xml = std::fs::read_to_string(path).expect("report written");
    assert_inert(&xml);
    let report = junit_parser::from_reader(BufReader::new(xml.as_bytes())).expect("parses");
    assert_eq!(report.tests, 9);
}

#[test]
fn json_lines_escape_and_round_trip_the_exact_text() {
    let r = hostile_names("json");
    assert_inert(&r.stdout);
    let events: Vec<serde_json::Value> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let finished: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["event"] == "test-finished")
        .collect();
    let names: Vec<&str> = finished
        .iter()
        .map(|e| e["test"]["name"].as_str().expect("a name"))
        .collect();
    assert_eq!(names, RAW_NAMES, "JSON keeps the exact names");
    assert_eq!(
        finished[2]["outcome"]["message"],
        "bad \x1b[2J\x1b]0;pwned\x07 ]]> <![CDATA[x]]> \0\u{fffe}\n\
         ok 99 - injected\n  ...\nnot ok 98 - injected"
    );
    // With --nocapture the output went out live, once, exactly as written.
    let noisy = events
        .iter()
        .find(|e| e["event"] == "output" && e["stream"] == "stderr")
        .expect("the stderr output event");
    assert_eq!(
        noisy["text"], "stderr \x1b[31mred\x1b[0m \u{9b}31m\n",
        "{noisy}"
    );
}

#[test]
fn list_shows_escaped_names_one_per_line() {
    let r = run(&["test", HOSTILE_NAMES, "--list", "--include-ignored"]);
    r.expect_code(0);
    assert_inert(&r.stdout);
    let expected: Vec<String> = SHOWN_NAMES
        .iter()
        .map(|n| {
            let ignored = if n.starts_with("ignored") {
                " (ignored)"
            } else {
                ""
            };
            format!("hostile_names::{n}: test{ignored}")
        })
        .collect();
    assert_eq!(r.stdout.lines().collect::<Vec<_>>(), expected);
}

#[test]
fn duplicate_and_empty_names_are_refused_before_anything_runs() {
    let expected = "error: the suite hostile_dupes is malformed: test name \"twice\" is declared \
                    twice; a test has an empty name (each test needs a unique, non-empty name of \
                    at most 4096 bytes)\n";
    for extra in [
        &[][..],
        &["--list"],
        &["--format", "tap"],
        &["--format", "json"],
    ] {
        let mut args = vec!["test", HOSTILE_DUPES];
        args.extend_from_slice(extra);
        let r = run(&args);
        r.expect_code(101);
        assert_eq!(r.stderr, expected, "{extra:?}");
        // Nothing ran or was listed; a machine-read stream says why it ends.
        let reason = expected
            .strip_prefix("error: ")
            .and_then(|e| e.strip_suffix('\n'))
            .expect("one error line");
        match extra.last() {
            Some(&"tap") => assert_eq!(r.stdout, format!("Bail out! {reason}\n")),
            Some(&"json") => {
                let event: serde_json::Value =
                    serde_json::from_str(r.stdout.trim_end()).expect("one JSON line");
                assert_eq!(event["event"], "run-aborted");
                assert_eq!(event["reason"], reason);
            }
            _ => assert_eq!(r.stdout, "", "{extra:?}"),
        }
    }
}

#[test]
fn an_8_mib_failure_message_makes_a_small_report_in_every_format() {
    let dir = tempfile::tempdir().expect("tempdir");
    for format in ["human", "tap", "junit", "json"] {
        let xml = dir.path().join(format!("{format}.xml"));
        let r = run(&[
            "test",
            HOSTILE,
            "huge_",
            "--memory-limit",
            "64",
            "--format",
            format,
            "--junit",
            xml.to_str().expect("utf-8"),
        ]);
        r.expect_code(100);
        for (what, report) in [
            ("stdout", r.stdout.clone()),
            (
                "--junit file",
                std::fs::read_to_string(&xml).expect("written"),
            ),
        ] {
            assert!(
                report.len() < 200_000,
                "{format} {what}: {} bytes",
                report.len()
            );
            // Each message appears once, at most 64 KiB of it (plus 240 characters of
            // its first line in a FAIL line or a JUnit `message` attribute).
            for (c, note) in [
                (
                    'z',
                    "of 8388608 bytes cut: a failure message is kept up to 64 KiB]",
                ),
                (
                    'e',
                    "of 8388615 bytes cut: a failure message is kept up to 64 KiB]",
                ),
            ] {
                let run_of = |n: usize| c.to_string().repeat(n);
                let kept = report.matches(&run_of(1000)).count();
                assert!(
                    (60..=66).contains(&kept),
                    "{format} {what}: {kept} thousand {c:?} kept"
                );
                assert!(report.contains(note), "{format} {what}: no note {note:?}");
            }
        }
    }
}

#[test]
fn a_kept_failure_message_is_charged_to_the_output_budget() {
    let r = run(&[
        "test",
        HOSTILE,
        "--exact",
        "huge_panic_message",
        "--memory-limit",
        "64",
        "--max-output",
        "10K",
    ]);
    r.expect_code(100);
    r.expect_stdout("bytes cut: the test's output budget was spent (raise it with --max-output)]");
    let kept = r.stdout.matches(&"z".repeat(1000)).count();
    assert!(
        (9..=10).contains(&kept),
        "{kept} thousand kept of a 10 KiB budget"
    );
}
