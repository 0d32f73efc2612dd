//! Reports as CI reads them: retries and flaky tests in every format, and
//! results numbered and listed in plan order whatever order tests end in.

#[allow(dead_code, reason = "shared by several test crates, each using a part")]
mod common;

use std::io::BufReader;

use common::{Run, run};
use matryoshka_test_programs::{BASICS, CI, HOSTILE, MANY};

/// `ci.wasm`'s `fails_once` with a fresh state folder, `--retries` and `args`.
fn fails_once(retries: &str, args: &[&str]) -> Run {
    let state = tempfile::tempdir().expect("state dir");
    let grant = format!("fs={}:/state:rw", state.path().display());
    let mut all = vec![
        "test",
        CI,
        "--ignored",
        "fails_once",
        "--grant",
        &grant,
        "--retries",
        retries,
    ];
    all.extend_from_slice(args);
    run(&all)
}

#[test]
fn without_retries_the_test_that_fails_once_fails() {
    let r = fails_once("0", &[]);
    r.expect_code(100);
    r.expect_stdout("first try fails on purpose");
    assert!(!r.stdout.contains("FLAKY"), "{}", r.stdout);
}

#[test]
fn a_test_that_passes_on_a_retry_is_flaky_in_human_output() {
    let r = fails_once("2", &[]);
    r.expect_code(0);
    let tried = r.line_for("TRY 1 FAIL", "fails_once");
    assert!(tried.contains("first try fails on purpose"), "{tried}");
    let flaky = r.line_for("FLAKY", "fails_once");
    assert!(flaky.contains("(try 2 of 3)"), "{flaky}");
    r.expect_stdout("flaky tests (passed on a retry):");
    r.expect_stdout("1 passed (1 flaky), 0 failed");
}

#[test]
fn a_test_that_passes_on_a_retry_is_flaky_in_json_lines() {
    let r = fails_once("2", &["--format", "json"]);
    r.expect_code(0);
    let events: Vec<serde_json::Value> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let retried: Vec<_> = events
        .iter()
        .filter(|e| e["event"] == "test-retried")
        .collect();
    assert_eq!(retried.len(), 1, "{}", r.stdout);
    assert_eq!(retried[0]["attempt"], 1);
    assert_eq!(retried[0]["failure"]["kind"], "panic");
    let finished = events
        .iter()
        .find(|e| e["event"] == "test-finished")
        .expect("test-finished");
    assert_eq!(finished["attempts"], 2);
    assert_eq!(finished["outcome"]["status"], "passed");
    let summary = &events.last().expect("events")["summary"];
    assert_eq!(summary["passed"], 1);
    assert_eq!(summary["flaky"], 1);
    assert_eq!(events[0]["retries"], 2);
}

#[test]
fn a_test_that_passes_on_a_retry_is_flaky_in_junit() {
    let r = fails_once("2", &["--format", "junit"]);
    r.expect_code(0);
    let report = junit_parser::from_reader(BufReader::new(r.stdout.as_bytes()))
        .unwrap_or_else(|e| panic!("JUnit did not parse: {e}\n{}", r.stdout));
    assert_eq!((report.tests, report.failures, report.errors), (1, 0, 0));
    // Surefire's form, which Jenkins, GitLab and nextest use for a flaky test.
    let flaky = r
        .stdout
        .lines()
        .find(|l| l.contains("<flakyFailure"))
        .unwrap_or_else(|| panic!("no flakyFailure:\n{}", r.stdout));
    assert!(flaky.contains(r#"type="panic""#), "{flaky}");
    assert!(flaky.contains("first try fails on purpose"), "{flaky}");
}

#[test]
fn a_test_that_passes_on_a_retry_is_flaky_in_tap() {
    let r = fails_once("2", &["--format", "tap"]);
    r.expect_code(0);
    let lines: Vec<&str> = r.stdout.lines().collect();
    let at = lines
        .iter()
        .position(|l| *l == "ok 1 - ci::fails_once")
        .unwrap_or_else(|| panic!("no passing point:\n{}", r.stdout));
    assert_eq!(
        &lines[at + 1..at + 4],
        ["  ---", "  flaky: true", "  attempts: 2"]
    );
}

#[test]
fn a_test_that_keeps_failing_runs_once_per_try_and_fails() {
    let r = run(&[
        "test",
        CI,
        "fails_on_purpose",
        "--retries",
        "2",
        "--format",
        "json",
    ]);
    r.expect_code(100);
    let tries = r
        .stdout
        .lines()
        .filter(|l| l.contains(r#""event":"test-retried""#))
        .count();
    assert_eq!(tries, 2, "{}", r.stdout);
    let finished = r
        .stdout
        .lines()
        .find(|l| l.contains(r#""event":"test-finished""#))
        .expect("test-finished");
    let finished: serde_json::Value = serde_json::from_str(finished).expect("json");
    assert_eq!(finished["attempts"], 3);
    assert_eq!(finished["outcome"]["status"], "failed");
}

/// Test names in plan order, from `--list`.
fn planned(component: &str) -> Vec<String> {
    let r = run(&["test", component, "--list"]);
    r.expect_code(0);
    r.stdout
        .lines()
        .map(|l| {
            let l = l.strip_suffix(" (ignored)").unwrap_or(l);
            let name = l.strip_suffix(": test").expect("a test line");
            name.to_string()
        })
        .collect()
}

#[test]
fn tap_numbers_follow_the_plan_whatever_order_tests_end_in() {
    let names = planned(MANY);
    assert!(names.len() >= 100, "{}", names.len());
    let r = run(&["test", MANY, "--format", "tap", "-j", "4"]);
    r.expect_code(0);
    let points: Vec<(usize, &str)> = r
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("ok "))
        .map(|l| {
            let (n, name) = l.split_once(" - ").expect("ok N - name");
            let name = name.strip_suffix(" # SKIP ignored").unwrap_or(name);
            (n.parse().expect("number"), name)
        })
        .collect();
    assert_eq!(points.len(), names.len());
    for (i, (n, name)) in points.iter().enumerate() {
        assert_eq!(*n, i + 1, "points out of order:\n{}", r.stdout);
        assert_eq!(*name, names[i], "point {n} is not the plan's test {n}");
    }
}

#[test]
fn junit_lists_cases_in_plan_order() {
    let names = planned(MANY);
    let r = run(&["test", MANY, "--format", "junit", "-j", "4"]);
    r.expect_code(0);
    let report = junit_parser::from_reader(BufReader::new(r.stdout.as_bytes()))
        .unwrap_or_else(|e| panic!("JUnit did not parse: {e}"));
    let listed: Vec<String> = report.suites[0]
        .cases
        .iter()
        .map(|c| format!("many::{}", c.original_name))
        .collect();
    assert_eq!(listed, names);
}

#[test]
fn junit_attributes_are_the_ones_jenkins_schemas_accept() {
    let r = run(&["test", CI, "--format", "junit"]);
    r.expect_code(100);
    let testsuites = r
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("<testsuites"))
        .expect("<testsuites>");
    // junit-10.xsd allows name, time, tests, failures and errors here, nothing else.
    for attribute in ["skipped=", "disabled=", "timestamp=", "uuid="] {
        assert!(!testsuites.contains(attribute), "{testsuites}");
    }
    let testsuite = r
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("<testsuite "))
        .expect("<testsuite>");
    for attribute in ["timestamp=\"", "hostname=\"", "time=\""] {
        assert!(testsuite.contains(attribute), "{testsuite}");
    }
    r.expect_stdout(r#"<skipped message="ignored"/>"#);
}

/// Starts `args`, sends SIGTERM after `after`, and returns what it did.
fn terminated_after(args: &[&str], after: std::time::Duration) -> Run {
    let child = common::bin()
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start matryoshka");
    std::thread::sleep(after);
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -TERM: {status}");
    Run::from(child.wait_with_output().expect("wait"))
}

#[test]
fn sigterm_in_the_middle_of_a_run_leaves_a_whole_junit_file_and_bails_out_of_tap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let junit = dir.path().join("report.xml");
    let junit_arg = junit.to_str().expect("utf-8");
    // infinite_loop runs first and spins until its 60 s deadline.
    let r = terminated_after(
        &[
            "test",
            HOSTILE,
            "-j",
            "1",
            "--timeout",
            "60",
            "--format",
            "tap",
            "--junit",
            junit_arg,
        ],
        std::time::Duration::from_secs(2),
    );
    r.expect_code(143);
    assert_eq!(
        r.stdout.lines().last(),
        Some("Bail out! interrupted by SIGTERM"),
        "{}",
        r.stdout
    );
    let file = std::fs::File::open(&junit).expect("report written");
    let report = junit_parser::from_reader(BufReader::new(file)).expect("a whole JUnit file");
    assert_eq!(report.errors, 1);
    let case = &report.suites[0].cases[0];
    match &case.status {
        junit_parser::TestStatus::Error(e) => {
            assert_eq!(e.error_type, "aborted");
            assert!(e.text.contains("interrupted by SIGTERM"), "{}", e.text);
            assert!(
                e.text.contains("0 of 9 planned tests had finished"),
                "{}",
                e.text
            );
        }
        other => panic!("expected an error case, got {other:?}"),
    }
}

#[test]
fn a_suite_that_does_not_load_still_writes_a_junit_file_saying_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let junit = dir.path().join("report.xml");
    let missing = dir.path().join("missing.wasm");
    let r = run(&[
        "test",
        missing.to_str().expect("utf-8"),
        "--junit",
        junit.to_str().expect("utf-8"),
    ]);
    r.expect_code(101);
    r.expect_stderr("cannot read");
    let file = std::fs::File::open(&junit).expect("report written");
    let report = junit_parser::from_reader(BufReader::new(file)).expect("a whole JUnit file");
    assert_eq!((report.tests, report.errors), (1, 1));
    assert_eq!(report.suites[0].name, "missing");
}

#[test]
fn json_lines_carry_a_version_and_a_time_and_output_once() {
    for live in [false, true] {
        let mut args = vec!["test", CI, "--format", "json"];
        if live {
            args.push("--nocapture");
        }
        let r = run(&args);
        r.expect_code(100);
        for line in r.stdout.lines() {
            let event: serde_json::Value = serde_json::from_str(line).expect("json");
            assert_eq!(event["version"], 1, "{line}");
            let time = event["time"].as_str().expect("time");
            assert!(
                time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
                "{time}"
            );
            if live && event["event"] == "test-finished" {
                assert!(event.get("output").is_none(), "output sent twice: {line}");
            }
            if !live {
                assert_ne!(event["event"], "output", "{line}");
            }
        }
        // The log line goes out once: live with --nocapture, else in test-finished.
        assert_eq!(
            r.stdout.matches("running at L0").count(),
            1,
            "live {live}: {}",
            r.stdout
        );
    }
}

/// Names of the tests a run reported (`--format json`), in plan order.
fn reported(args: &[&str]) -> Vec<String> {
    let mut all = vec![
        "test",
        BASICS,
        "--format",
        "json",
        "--include-ignored",
        "-j",
        "1",
    ];
    all.extend_from_slice(args);
    let r = run(&all);
    assert!(
        matches!(r.code, Some(0 | 100)),
        "{}\n{}",
        r.stdout,
        r.stderr
    );
    r.stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .filter(|e| e["event"] == "test-finished")
        .map(|e| e["test"]["name"].as_str().expect("name").to_string())
        .collect()
}

#[test]
fn partitions_together_run_every_test_exactly_once() {
    let all = reported(&[]);
    for kind in ["count", "hash"] {
        let mut seen = Vec::new();
        for shard in ["1/2", "2/2"] {
            let part = reported(&["--partition", &format!("{kind}:{shard}")]);
            assert!(
                !part.is_empty() && part.len() < all.len(),
                "{kind}:{shard}: {part:?}"
            );
            seen.extend(part);
        }
        seen.sort();
        let mut expected = all.clone();
        expected.sort();
        assert_eq!(seen, expected, "{kind}");
    }
}

#[test]
fn tags_and_expressions_select_tests() {
    let exec = reported(&["--tag", "exec"]);
    assert_eq!(
        exec,
        [
            "exec_uname_matches_arch",
            "exec_hostname_matches_host",
            "exec_feeds_stdin"
        ]
    );
    let expr = reported(&[
        "-E",
        "tag(exec) and not test(stdin) or test(=prints_and_logs)",
    ]);
    assert_eq!(
        expr,
        [
            "exec_uname_matches_arch",
            "exec_hostname_matches_host",
            "prints_and_logs"
        ]
    );
    let bad = run(&["test", BASICS, "-E", "tag(exec) and"]);
    bad.expect_code(2);
    bad.expect_stderr("-E `tag(exec) and`: at character 13");
}

#[test]
fn a_filter_that_selects_nothing_fails_unless_allowed() {
    let r = run(&["test", CI, "no_such_test", "--format", "tap"]);
    r.expect_code(4);
    r.expect_stderr("no tests to run");
    assert!(
        r.stdout.starts_with("Bail out! no tests to run"),
        "{}",
        r.stdout
    );
    let warned = run(&["test", CI, "no_such_test", "--no-tests", "warn"]);
    warned.expect_code(0);
    warned.expect_stderr("warning: no tests to run");
    run(&["test", CI, "no_such_test", "--no-tests", "pass"]).expect_code(0);
}

#[test]
fn timeouts_take_units() {
    let r = run(&["test", CI, "adds_up", "--timeout", "5s"]);
    r.expect_code(0);
    let bad = run(&["test", CI, "--timeout", "5 parsecs"]);
    bad.expect_code(2);
    bad.expect_stderr("is not a duration");
}

#[test]
fn tmt_results_name_each_test_by_level_and_keep_its_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let results = dir.path().join("results.json");
    let r = run(&[
        "test",
        CI,
        "--tmt-results",
        results.to_str().expect("utf-8"),
    ]);
    r.expect_code(100);
    let text = std::fs::read_to_string(&results).expect("results.json written");
    let results: Vec<serde_json::Value> = serde_json::from_str(&text).expect("json");
    let got: Vec<(&str, &str)> = results
        .iter()
        .map(|r| {
            (
                r["name"].as_str().expect("name"),
                r["result"].as_str().expect("result"),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("/L0/ci/adds_up", "pass"),
            ("/L0/ci/level_is_named", "pass"),
            ("/L0/ci/fails_on_purpose", "fail"),
            ("/L0/ci/ignored_on_purpose", "skip"),
            ("/L0/ci/fails_once", "skip"),
        ]
    );
    let failed = &results[2];
    assert!(
        failed["note"][0]
            .as_str()
            .expect("note")
            .contains("arithmetic at L0")
    );
    let log = failed["log"][0].as_str().expect("log");
    assert!(dir.path().join(log).exists(), "{log}");
    let named = &results[1];
    let log = std::fs::read_to_string(dir.path().join(named["log"][0].as_str().expect("log")))
        .expect("log");
    assert!(log.contains("running at L0"), "{log}");
    assert!(failed["duration"].as_str().expect("duration").len() == 8);
}

/// The `matryoshka test ...` command of the docs/ci.md line that holds `needle`.
fn docs_command(needle: &str) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/ci.md");
    let docs = std::fs::read_to_string(path).expect("docs/ci.md");
    let line = docs
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in docs/ci.md"));
    let at = line
        .find("matryoshka test")
        .expect("a matryoshka test command");
    line[at..].replace("suite.wasm", CI)
}

/// Runs `command` with `sh` in `dir`, `matryoshka` on the PATH, and `env`.
fn run_shell(command: &str, dir: &std::path::Path, env: &[(&str, String)]) -> Run {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_matryoshka"));
    let path = format!(
        "{}:{}",
        bin.parent().expect("bin dir").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .current_dir(dir)
        .env("PATH", path)
        .env("MATRYOSHKA_CACHE_DIR", common::cache_dir())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("sh");
    Run::from(out)
}

/// Test names in every `junit-*.xml` of `dir`, as `suite::name`.
fn junit_cases(dir: &std::path::Path) -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        if !(file.starts_with("junit-") && file.ends_with(".xml")) {
            continue;
        }
        let reader = BufReader::new(std::fs::File::open(entry.path()).expect("open"));
        let report = junit_parser::from_reader(reader).unwrap_or_else(|e| panic!("{file}: {e}"));
        for suite in &report.suites {
            names.extend(
                suite
                    .cases
                    .iter()
                    .map(|c| format!("{}::{}", suite.name, c.original_name)),
            );
        }
    }
    names.sort();
    names
}

#[test]
fn the_ci_matrix_snippets_of_the_docs_run_every_test_once() {
    let mut all = planned(CI);
    all.sort();
    let github = docs_command("--partition hash:${{ matrix.shard }}/3");
    let gitlab = docs_command("--partition hash:$CI_NODE_INDEX/$CI_NODE_TOTAL");
    for (name, command, env) in [
        ("GitHub Actions", github, false),
        ("GitLab CI", gitlab, true),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        for shard in 1..=3 {
            let shard = shard.to_string();
            let (command, env) = if env {
                (
                    command.clone(),
                    vec![("CI_NODE_INDEX", shard), ("CI_NODE_TOTAL", "3".to_string())],
                )
            } else {
                (command.replace("${{ matrix.shard }}", &shard), Vec::new())
            };
            let r = run_shell(&command, dir.path(), &env);
            assert!(
                matches!(r.code, Some(0 | 100)),
                "{name}: {command}\n{}\n{}",
                r.stdout,
                r.stderr
            );
        }
        assert_eq!(junit_cases(dir.path()), all, "{name}");
    }
}

#[test]
fn sigterm_keeps_the_tap_results_of_tests_that_finished_out_of_order() {
    // infinite_loop (test 1) spins in one slot while the other eight end in the other.
    let r = terminated_after(
        &[
            "test",
            HOSTILE,
            "-j",
            "2",
            "--timeout",
            "60",
            "--format",
            "tap",
        ],
        std::time::Duration::from_secs(4),
    );
    r.expect_code(143);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(
        lines.last(),
        Some(&"Bail out! interrupted by SIGTERM"),
        "{}",
        r.stdout
    );
    assert!(
        lines.contains(&"ok 9 - hostile::well_behaved"),
        "{}",
        r.stdout
    );
    let points = lines
        .iter()
        .filter(|l| l.starts_with("ok ") || l.starts_with("not ok "))
        .count();
    assert_eq!(points, 8, "{}", r.stdout);
}

#[test]
fn a_usage_error_leaves_an_earlier_junit_file_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let junit = dir.path().join("report.xml");
    std::fs::write(&junit, "earlier").expect("write");
    let r = run(&[
        "test",
        CI,
        "-E",
        "tag(",
        "--junit",
        junit.to_str().expect("utf-8"),
    ]);
    r.expect_code(2);
    assert_eq!(std::fs::read_to_string(&junit).expect("read"), "earlier");
}

#[test]
fn the_run_folder_has_report_json_and_a_log_per_test_that_failed_or_wrote() {
    let dir = tempfile::tempdir().expect("run dir");
    let folder = dir.path().join("run");
    let state = tempfile::tempdir().expect("state dir");
    let grant = format!("fs={}:/state:rw", state.path().display());
    let r = run(&[
        "test",
        CI,
        "--include-ignored",
        "--grant",
        &grant,
        "--retries",
        "1",
        "--run-dir",
        folder.to_str().expect("utf-8"),
    ]);
    r.expect_code(100);
    // The human report's last line names the folder.
    let last = r.stdout.trim_end().lines().last().unwrap_or_default();
    assert_eq!(
        last,
        format!(
            "run folder: {} (report.json, timeline.html, a log per test, each level's files)",
            folder.display()
        )
    );
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(folder.join("report.json")).expect("report.json"),
    )
    .expect("JSON");
    assert_eq!(report["suite"], "ci");
    assert_eq!(report["summary"]["failed"], 2);
    let tests = report["tests"].as_array().expect("tests");
    let names: Vec<&str> = tests.iter().filter_map(|t| t["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "adds_up",
            "level_is_named",
            "fails_on_purpose",
            "ignored_on_purpose",
            "fails_once"
        ]
    );
    let failed = &tests[2];
    assert_eq!(failed["result"], "fail");
    assert_eq!(failed["kind"], "panic");
    assert_eq!(failed["attempts"], 2);
    let log = failed["log"].as_str().expect("a log for the failed test");
    let text = std::fs::read_to_string(folder.join(log)).expect("its log");
    assert!(
        text.starts_with("L0 ci::fails_on_purpose\nresult: fail\npanic: assertion"),
        "{text}"
    );
    // Its first try is kept too.
    let tries = failed["tries"].as_array().expect("tries");
    assert_eq!(tries.len(), 1);
    let first = std::fs::read_to_string(folder.join(tries[0].as_str().expect("path")))
        .expect("first try's log");
    assert!(first.contains("result: try 1 failed"), "{first}");
    // A passing test that wrote nothing has no log; a flaky one is marked.
    assert_eq!(tests[0]["result"], "pass");
    assert!(tests[0]["log"].is_null());
    assert_eq!(tests[4]["result"], "flaky");
    assert!(report["levels"].as_array().is_some_and(Vec::is_empty));
}

#[test]
fn hostile_names_stay_inert_in_the_run_folder() {
    let dir = tempfile::tempdir().expect("run dir");
    let folder = dir.path().join("run");
    let r = run(&[
        "test",
        HOSTILE,
        "--skip",
        "infinite_loop",
        "--run-dir",
        folder.to_str().expect("utf-8"),
    ]);
    r.expect_code(100);
    let report = std::fs::read_to_string(folder.join("report.json")).expect("report.json");
    assert!(!report.contains('\u{1b}'), "{report}");
    assert_eq!(report.lines().count(), 1);
    for entry in std::fs::read_dir(folder.join("tests")).expect("tests/") {
        let entry = entry.expect("entry");
        let name = entry.file_name().into_string().expect("a UTF-8 file name");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
            "{name}"
        );
        let text = std::fs::read_to_string(entry.path()).expect("log");
        assert!(!text.contains('\u{1b}'), "{name}: {text}");
    }
}
