//! The suites written in Python, JavaScript and C (tests-wasm/lang, built by
//! `./x langs` with guest-sdk/build.sh) beside the Rust ones: the same tests with
//! the same outcomes, failures that name their file and line, and calls to the
//! same component at the levels of a local chain.

#[allow(dead_code, reason = "shared by several test crates, each using a part")]
mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::{lang_component as component, run};
use matryoshka_test_programs::BASICS;

/// The languages with an SDK under guest-sdk/, and their suites' file extension.
const LANGUAGES: &[(&str, &str)] = &[("python", "py"), ("js", "js"), ("c", "c")];

/// What every language's basics suite must report, test by test.
const EXPECTED: &[(&str, &str)] = &[
    ("hostname_is_set", "passed"),
    ("arch_is_known", "passed"),
    ("level_path_matches_level", "passed"),
    ("exec_uname_matches_arch", "passed"),
    ("exec_hostname_matches_host", "passed"),
    ("exec_feeds_stdin", "passed"),
    ("fs_read_via_preopen", "passed"),
    ("fs_preopen_is_read_only", "passed"),
    ("prints_and_logs", "passed"),
    ("clocks_and_random_work", "passed"),
    ("deliberately_fails", "failed"),
    ("ignored_by_default", "ignored"),
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The JSON events of one run.
fn events(args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["test"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--format", "json"]);
    let r = run(&all);
    assert!(
        matches!(r.code, Some(0 | 100)),
        "exit {:?}\n{}\n{}",
        r.code,
        r.stdout,
        r.stderr
    );
    r.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Test name -> status, from the `test-finished` events.
fn outcomes(events: &[serde_json::Value]) -> BTreeMap<String, String> {
    events
        .iter()
        .filter(|e| e["event"] == "test-finished")
        .map(|e| {
            (
                e["test"]["name"].as_str().expect("name").to_string(),
                e["outcome"]["status"].as_str().expect("status").to_string(),
            )
        })
        .collect()
}

fn finished<'a>(events: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    events
        .iter()
        .find(|e| e["event"] == "test-finished" && e["test"]["name"] == name)
        .unwrap_or_else(|| panic!("no test-finished event for {name}"))
}

#[test]
fn every_language_reports_the_same_outcomes() {
    let expected: BTreeMap<String, String> = EXPECTED
        .iter()
        .map(|(n, s)| (n.to_string(), s.to_string()))
        .collect();
    // The Rust suite has one more (an ignored test of a read-write grant).
    let mut rust = outcomes(&events(&[BASICS]));
    assert_eq!(
        rust.remove("fs_write_via_rw_grant").as_deref(),
        Some("ignored")
    );
    assert_eq!(rust, expected, "rust");
    for (lang, _) in LANGUAGES {
        let got = outcomes(&events(&[&component(lang, "basics")]));
        assert_eq!(got, expected, "{lang}");
    }
}

#[test]
fn a_failing_assertion_names_its_file_and_line() {
    for (lang, ext) in LANGUAGES {
        let source_name = format!("basics.{ext}");
        let source =
            std::fs::read_to_string(repo().join("tests-wasm/lang").join(lang).join(&source_name))
                .expect("source");
        // The line of the deliberate failure: the one that says what is compared.
        let line = source
            .lines()
            .position(|l| l.contains("arithmetic at"))
            .expect("the failing line")
            + 1;
        let events = events(&[&component(lang, "basics"), "--exact", "deliberately_fails"]);
        let outcome = &finished(&events, "deliberately_fails")["outcome"];
        assert_eq!(outcome["kind"], "panic", "{lang}: {outcome}");
        let message = outcome["message"].as_str().expect("message");
        assert!(message.contains("arithmetic at L0"), "{lang}: {message}");
        let location = outcome["location"].as_str().expect("location");
        assert!(
            location.starts_with(&format!("{source_name}:{line}")),
            "{lang}: failure at {location}, expected {source_name}:{line}"
        );
    }
}

#[test]
fn each_language_names_the_grant_it_was_denied() {
    for (lang, _) in LANGUAGES {
        let events = events(&[
            &component(lang, "basics"),
            "--no-config",
            "--exact",
            "exec_uname_matches_arch",
        ]);
        let outcome = &finished(&events, "exec_uname_matches_arch")["outcome"];
        assert_eq!(outcome["status"], "failed", "{lang}: {outcome}");
        let message = outcome["message"].as_str().expect("message");
        assert!(message.contains("--grant exec=uname"), "{lang}: {message}");
    }
}

#[test]
fn each_language_captures_output_and_logs_per_test() {
    for (lang, _) in LANGUAGES {
        let events = events(&[&component(lang, "basics"), "--exact", "prints_and_logs"]);
        let output = &finished(&events, "prints_and_logs")["output"];
        assert_eq!(output["stdout"], "to stdout from L0\n", "{lang}: {output}");
        let logs = output["logs"].as_array().expect("logs");
        assert!(
            logs.iter()
                .any(|l| l["level"] == "warn" && l["message"] == "a warning line"),
            "{lang}: {output}"
        );
    }
}

#[test]
fn each_language_calls_itself_through_a_local_chain() {
    for (lang, _) in LANGUAGES {
        let events = events(&[&component(lang, "relay")]);
        let got = outcomes(&events);
        let expected: BTreeMap<String, String> = [
            "calls_itself_one_level_down",
            "descends_two_levels",
            "an_unknown_remote_function_is_not_found",
        ]
        .iter()
        .map(|n| (n.to_string(), "passed".to_string()))
        .collect();
        assert_eq!(got, expected, "{lang}: {events:#?}");
    }
}

#[test]
fn python_reaches_no_network_through_the_sockets_it_imports() {
    let events = events(&[&component("python", "network")]);
    let got = outcomes(&events);
    assert_eq!(got.len(), 3, "{events:#?}");
    assert!(got.values().all(|s| s == "passed"), "{events:#?}");
}
