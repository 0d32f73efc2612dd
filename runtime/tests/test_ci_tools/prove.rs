//! prove (TAP::Harness) reading the whole stream past the YAML blocks, flaky runs and `Bail out!`.

use super::*;

/// `prove -v --exec "MATRYOSHKA test" SUITE.wasm :: --format tap ARGS`.
fn prove(args: &[&str]) -> Run {
    exec(
        Command::new(tool("/usr/bin/prove"))
            .arg("-v")
            .arg("--exec")
            .arg(format!("{MATRYOSHKA} test"))
            .arg(CI)
            .args(["::", "--format", "tap"])
            .args(args),
    )
}

#[test]
fn prove_reads_all_five_results_past_the_yaml_block() {
    let r = prove(&[]);
    r.expect_code(1);
    let out = both(&r);
    for needle in [
        "Failed 1/5 subtests",
        "(less 2 skipped subtests: 2 okay)",
        "Tests: 5 Failed: 1",
        "Failed test:  3",
        "Non-zero exit status: 100",
        "Result: FAIL",
    ] {
        assert!(out.contains(needle), "prove did not say {needle:?}:\n{out}");
    }
    assert!(!out.contains("Parse errors"), "prove: {out}");
}

#[test]
fn prove_passes_a_flaky_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let grant = state_grant(dir.path());
    let r = prove(&[
        "--ignored",
        "fails_once",
        "--grant",
        &grant,
        "--retries",
        "1",
    ]);
    r.expect_code(0);
    let out = both(&r);
    for needle in ["All tests successful.", "Tests=1,", "Result: PASS"] {
        assert!(out.contains(needle), "prove did not say {needle:?}:\n{out}");
    }
}

#[test]
fn prove_stops_at_bail_out_with_its_reason() {
    let r = prove(&["no_such_test"]);
    assert_ne!(r.code, Some(0), "{}", both(&r));
    let out = both(&r);
    for needle in [
        "Bailout called.  Further testing stopped:  no tests to run",
        "Result: FAIL",
    ] {
        assert!(out.contains(needle), "prove did not say {needle:?}:\n{out}");
    }
}
