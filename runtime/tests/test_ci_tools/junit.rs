//! JUnit files checked against the Jenkins xunit plugin's junit-10.xsd with xmllint.

use super::*;

/// `xmllint --schema junit-10.xsd` on `report`: passes when the report validates.
#[track_caller]
fn validates(report: &Path) {
    let xmllint = tool("/usr/bin/xmllint");
    let xsd = tool("junit-10.xsd");
    let text = std::fs::read_to_string(report)
        .unwrap_or_else(|e| panic!("no report {}: {e}", report.display()));
    let r = exec(
        Command::new(xmllint)
            .args(["--noout", "--schema"])
            .arg(&xsd)
            .arg(report),
    );
    assert!(
        r.code == Some(0) && r.stderr.contains("validates"),
        "xmllint rejects the report:\n{}\n--- report ---\n{text}",
        r.stderr
    );
}

#[test]
fn junit_of_a_run_with_a_failing_and_ignored_tests_validates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let junit = dir.path().join("report.xml");
    exec(common::bin().args(["test", CI, "--junit"]).arg(&junit)).expect_code(100);
    validates(&junit);
}

#[test]
fn junit_of_a_flaky_retried_run_validates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let junit = dir.path().join("report.xml");
    let grant = state_grant(dir.path());
    exec(
        common::bin()
            .args(["test", CI, "--ignored", "fails_once", "--grant", &grant])
            .args(["--retries", "1", "--junit"])
            .arg(&junit),
    )
    .expect_code(0);
    validates(&junit);
}

#[test]
fn junit_of_a_run_killed_by_sigterm_validates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let junit = dir.path().join("report.xml");
    // hostile's first test spins until its deadline.
    let child = common::bin()
        .args(["test", HOSTILE, "-j", "1", "--timeout", "60", "--junit"])
        .arg(&junit)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start matryoshka");
    std::thread::sleep(Duration::from_secs(2));
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success(), "kill -TERM: {killed}");
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(143), "exit code after SIGTERM");
    validates(&junit);
}

#[test]
fn junit_of_a_component_that_does_not_exist_validates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let junit = dir.path().join("report.xml");
    let missing = dir.path().join("missing.wasm");
    exec(
        common::bin()
            .arg("test")
            .arg(&missing)
            .arg("--junit")
            .arg(&junit),
    )
    .expect_code(101);
    validates(&junit);
}
