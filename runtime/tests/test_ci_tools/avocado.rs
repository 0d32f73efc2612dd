//! avocado 103 LTS and current: the run as one TAP test, and one avocado test per listed test (job script and recipe).

use super::*;

/// An avocado installed by `tests-ci/setup.sh`: the 103 LTS or the current one.
#[derive(Clone, Copy)]
enum Avocado {
    Lts,
    Current,
}

impl Avocado {
    fn dir(self) -> &'static str {
        match self {
            Avocado::Lts => "avocado-103",
            Avocado::Current => "avocado",
        }
    }

    fn bin(self, name: &str) -> PathBuf {
        tool(&format!("{}/bin/{name}", self.dir()))
    }
}

/// docs/ci.md's `.avocado.hint`: files named `*.tap` are TAP tests.
pub(crate) const AVOCADO_HINT: &str = "\
[kinds]
tap = *.tap

[tap]
uri = $testpath
";

/// docs/ci.md's runnables recipe from `--list` (avocado after 103).
pub(crate) const AVOCADO_RECIPE_PY: &str = r#""""An avocado runnables recipe: one exec-test per test of a matryoshka suite.

python3 recipe.py MATRYOSHKA SUITE.wasm > suite.json && avocado run suite.json
"""
import json
import subprocess
import sys

matryoshka, component = sys.argv[1:3]
listed = subprocess.run(
    [matryoshka, "test", component, "--list", "--format", "json"],
    check=True, capture_output=True, text=True,
).stdout
recipe = []
for test in map(json.loads, listed.splitlines()):
    runnable = {
        "kind": "exec-test",
        "uri": matryoshka,
        "args": ["test", component, "--exact", test["name"]],
        "identifier": f"{test['suite']}::{test['name']}",
    }
    if test["ignored"]:
        # --exact picks it but runs nothing: matryoshka exits 4 (no tests run).
        runnable["config"] = {"runner.exectest.exitcodes.skip": [4]}
    recipe.append(runnable)
json.dump(recipe, sys.stdout, indent=2)
"#;

/// docs/ci.md's job script from `--list` (avocado 103 LTS and later).
pub(crate) const AVOCADO_JOB_PY: &str = r#""""An avocado job (avocado 103 LTS and later): one exec-test per test of a matryoshka suite.

python3 job.py MATRYOSHKA SUITE.wasm RESULTS_DIR, with the Python avocado is installed in.
"""
import inspect
import json
import subprocess
import sys

from avocado.core.job import Job
from avocado.core.nrunner.runnable import Runnable
from avocado.core.suite import TestSuite

matryoshka, component, results = sys.argv[1:4]
# An ignored test picked by --exact runs nothing: matryoshka exits 4 (no tests run).
SKIP = {"runner.exectest.exitcodes.skip": [4]}


def runnable(test, config):
    name = f"{test['suite']}::{test['name']}"
    args = ("exec-test", matryoshka, "test", component, "--exact", test["name"])
    config = Runnable.filter_runnable_config("exec-test", config)
    if "identifier" in inspect.signature(Runnable).parameters:  # after 103
        return Runnable(*args, config=config, identifier=name)
    made = Runnable(*args, config=config)
    made._identifier_format = name  # 103 names a runnable by this format only
    return made


listed = subprocess.run(
    [matryoshka, "test", component, "--list", "--format", "json"],
    check=True, capture_output=True, text=True,
).stdout
tests = [json.loads(line) for line in listed.splitlines()]
config = {"run.results_dir": results, "sysinfo.collect.enabled": False}
suites = [TestSuite("run", config=config, tests=[runnable(t, {}) for t in tests if not t["ignored"]])]
ignored = [runnable(t, SKIP) for t in tests if t["ignored"]]
if ignored:  # 103 gives every runnable of a suite the suite's config
    suites.append(TestSuite("ignored", config=dict(config, **SKIP), tests=ignored))
with Job(config, suites) as job:
    sys.exit(job.run())
"#;

/// What avocado's `results.json` (under `results`, its `latest` job) says: each test's
/// status by name, and the job's counts (pass, fail, skip, error).
fn avocado_results(results: &Path) -> (BTreeMap<String, String>, [u64; 4]) {
    let path = results.join("latest/results.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("avocado wrote no {}: {e}", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).expect("results.json");
    let tests = json["tests"]
        .as_array()
        .expect("tests")
        .iter()
        .map(|t| {
            (
                t["name"].as_str().expect("name").to_string(),
                t["status"].as_str().expect("status").to_string(),
            )
        })
        .collect();
    let count = |key: &str| json[key].as_u64().expect(key);
    (
        tests,
        [
            count("pass"),
            count("failures"),
            count("skip"),
            count("errors"),
        ],
    )
}

fn statuses(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(n, s)| (n.to_string(), s.to_string()))
        .collect()
}

/// Three TAP streams as avocado `tap` tests: the ci suite (one test fails), a flaky
/// run, and a filter that matches nothing (`Bail out!`).
fn avocado_reads_tap_streams(avocado: Avocado) {
    let dir = tempfile::tempdir().expect("tempdir");
    let grant = state_grant(dir.path());
    let tap = |name: &str, args: &str| {
        script(
            &dir.path().join(name),
            &format!("exec {MATRYOSHKA} test {CI} --format tap {args} \"$@\""),
        );
    };
    tap("ci.tap", "");
    tap(
        "flaky.tap",
        &format!("--ignored fails_once --grant {grant} --retries 1"),
    );
    tap("none.tap", "no_such_test");
    write(&dir.path().join(".avocado.hint"), AVOCADO_HINT);
    let results = dir.path().join("results");
    let r = exec(
        Command::new(avocado.bin("avocado"))
            .current_dir(dir.path())
            .arg("run")
            .arg("--job-results-dir")
            .arg(&results)
            .args(["--disable-sysinfo", "ci.tap", "flaky.tap", "none.tap"]),
    );
    r.expect_code(1);
    r.expect_stdout("RESULTS    : PASS 1 | ERROR 1 | FAIL 1 | SKIP 0");
    let (tests, counts) = avocado_results(&results);
    assert_eq!(
        tests,
        statuses(&[
            ("ci.tap", "FAIL"),
            ("flaky.tap", "PASS"),
            ("none.tap", "ERROR")
        ]),
        "{}",
        r.stdout
    );
    assert_eq!(counts, [1, 1, 0, 1], "pass, fail, skip, error");
}

#[test]
fn avocado_lts_reads_tap_streams() {
    avocado_reads_tap_streams(Avocado::Lts);
}

#[test]
fn avocado_current_reads_tap_streams() {
    avocado_reads_tap_streams(Avocado::Current);
}

/// The ci suite's five tests, as avocado names and judges them one by one.
fn one_result_per_test(r: &Run, results: &Path) {
    r.expect_code(1);
    r.expect_stdout("RESULTS    : PASS 2 | ERROR 0 | FAIL 1 | SKIP 2");
    let (tests, counts) = avocado_results(results);
    assert_eq!(
        tests,
        statuses(&[
            ("ci::adds_up", "PASS"),
            ("ci::level_is_named", "PASS"),
            ("ci::fails_on_purpose", "FAIL"),
            ("ci::ignored_on_purpose", "SKIP"),
            ("ci::fails_once", "SKIP"),
        ]),
        "{}",
        r.stdout
    );
    assert_eq!(counts, [2, 1, 2, 0], "pass, fail, skip, error");
}

fn avocado_job_runs_one_test_per_listed_test(avocado: Avocado) {
    let dir = tempfile::tempdir().expect("tempdir");
    let job = dir.path().join("job.py");
    write(&job, AVOCADO_JOB_PY);
    let results = dir.path().join("results");
    let r = exec(
        Command::new(avocado.bin("python"))
            .current_dir(dir.path())
            .arg(&job)
            .args([MATRYOSHKA, CI])
            .arg(&results),
    );
    one_result_per_test(&r, &results);
}

#[test]
fn avocado_lts_job_runs_one_test_per_listed_test() {
    avocado_job_runs_one_test_per_listed_test(Avocado::Lts);
}

#[test]
fn avocado_current_job_runs_one_test_per_listed_test() {
    avocado_job_runs_one_test_per_listed_test(Avocado::Current);
}

#[test]
fn avocado_current_runs_a_recipe_made_from_the_list() {
    let avocado = Avocado::Current;
    let dir = tempfile::tempdir().expect("tempdir");
    let maker = dir.path().join("recipe.py");
    write(&maker, AVOCADO_RECIPE_PY);
    let made = exec(
        Command::new(avocado.bin("python"))
            .arg(&maker)
            .args([MATRYOSHKA, CI]),
    );
    made.expect_code(0);
    let recipe = dir.path().join("ci.json");
    write(&recipe, &made.stdout);
    let results = dir.path().join("results");
    let r = exec(
        Command::new(avocado.bin("avocado"))
            .current_dir(dir.path())
            .arg("run")
            .arg("--job-results-dir")
            .arg(&results)
            .arg("--disable-sysinfo")
            .arg(&recipe),
    );
    one_result_per_test(&r, &results);
}
