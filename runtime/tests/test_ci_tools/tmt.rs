//! tmt reading `--tmt-results`: one result per test, logs, flaky passes and a run that ran nothing.

use super::*;

/// `tmt run` of an fmf tree whose tests (name, command) run with `result: custom`, on
/// the local machine: what tmt said, its results (from the execute step's
/// results.yaml, as JSON), and the execute step's folder, which their logs are
/// relative to.
fn tmt_run(tests: &[(&str, String)]) -> (Run, Vec<serde_json::Value>, PathBuf, tempfile::TempDir) {
    let tmt = tool("tmt/bin/tmt");
    let python = tool("tmt/bin/python");
    tool("/usr/bin/rsync");
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join(".fmf")).expect("fmf tree");
    write(&tree.join(".fmf/version"), "1\n");
    for (name, command) in tests {
        write(
            &tree.join(format!("{name}.fmf")),
            &format!(
                "summary: matryoshka's ci suite, one tmt result per test\n\
                 test: {command}\n\
                 framework: shell\n\
                 result: custom\n"
            ),
        );
    }
    let workdir = dir.path().join("run");
    let r = exec(
        Command::new(&tmt)
            .current_dir(&tree)
            .args(["--allow-unsafe-behavior=provision/local", "run", "--id"])
            .arg(&workdir)
            .args(["--all", "provision", "--how", "local"]),
    );
    let execute = workdir.join("default/plan/execute");
    let yaml = execute.join("results.yaml");
    assert!(
        yaml.exists(),
        "tmt wrote no {}:\n{}",
        yaml.display(),
        both(&r)
    );
    // Read with tmt's own YAML library.
    let json = exec(
        Command::new(&python)
            .arg("-c")
            .arg(
                "import json, sys\n\
                 from ruamel.yaml import YAML\n\
                 json.dump(YAML(typ='safe').load(open(sys.argv[1])), sys.stdout, default=str)",
            )
            .arg(&yaml),
    );
    json.expect_code(0);
    let results = serde_json::from_str(&json.stdout).expect("json");
    (r, results, execute, dir)
}

/// Each result's name and verdict, in tmt's order.
fn tmt_verdicts(results: &[serde_json::Value]) -> Vec<(&str, &str)> {
    results
        .iter()
        .map(|r| {
            (
                r["name"].as_str().expect("name"),
                r["result"].as_str().expect("result"),
            )
        })
        .collect()
}

/// Every log tmt took from results.json is there, relative to the execute step.
fn tmt_logs_exist(results: &[serde_json::Value], execute: &Path) {
    for r in results {
        for log in r["log"].as_array().expect("log") {
            let log = log.as_str().expect("a log path");
            assert!(execute.join(log).exists(), "{}: no log {log}", r["name"]);
        }
    }
}

#[test]
fn tmt_reads_one_result_per_test_from_tmt_results() {
    let command = format!("{MATRYOSHKA} test {CI} --tmt-results \"$TMT_TEST_DATA/results.json\"");
    let (r, results, execute, _dir) = tmt_run(&[("ci", command)]);
    // tmt's own exit code: 1 when a test failed (2 is an error, 0 all passed).
    let out = both(&r);
    assert_eq!(r.code, Some(1), "tmt's exit code:\n{out}");
    assert!(
        out.contains("2 tests passed, 1 test failed and 2 tests skipped"),
        "tmt's summary:\n{out}"
    );
    assert_eq!(
        tmt_verdicts(&results),
        [
            ("/ci/L0/ci/adds_up", "pass"),
            ("/ci/L0/ci/level_is_named", "pass"),
            ("/ci/L0/ci/fails_on_purpose", "fail"),
            ("/ci/L0/ci/ignored_on_purpose", "skip"),
            ("/ci/L0/ci/fails_once", "skip"),
        ],
        "tmt's results"
    );
    tmt_logs_exist(&results, &execute);
    let failed = &results[2];
    assert!(
        failed["note"].to_string().contains("arithmetic at L0"),
        "tmt's note for the failed test: {}",
        failed["note"]
    );
}

#[test]
fn tmt_reads_a_flaky_pass_and_a_run_that_ran_nothing() {
    let state = tempfile::tempdir().expect("state");
    let grant = state_grant(state.path());
    let results_arg = "--tmt-results \"$TMT_TEST_DATA/results.json\"";
    let (r, results, execute, _dir) = tmt_run(&[
        (
            "flaky",
            format!(
                "{MATRYOSHKA} test {CI} --ignored fails_once --grant {grant} --retries 1 \
                 {results_arg}"
            ),
        ),
        (
            "none",
            format!("{MATRYOSHKA} test {CI} no_such_test {results_arg}"),
        ),
    ]);
    let out = both(&r);
    // tmt's own exit code: 2 when a result is an error.
    assert_eq!(r.code, Some(2), "tmt's exit code:\n{out}");
    assert!(
        out.contains("1 test passed and 1 error"),
        "tmt's summary:\n{out}"
    );
    assert_eq!(
        tmt_verdicts(&results),
        [
            ("/flaky/L0/ci/fails_once", "pass"),
            ("/none/L0/ci", "error")
        ],
        "tmt's results"
    );
    tmt_logs_exist(&results, &execute);
    assert!(
        results[0]["note"].to_string().contains("flaky"),
        "tmt's note for the flaky test: {}",
        results[0]["note"]
    );
    assert!(
        results[1]["note"].to_string().contains("no tests to run"),
        "tmt's note for the run of no test: {}",
        results[1]["note"]
    );
}
