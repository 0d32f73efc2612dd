//! The level-0 runner end to end: the real binary on the real suite components.

#[allow(dead_code, reason = "shared by several test crates, each using a part")]
mod common;

use std::io::BufReader;

use common::run;
use matryoshka_test_programs::{BASICS, HOSTILE, MANY, WRONG_WORLD};

#[test]
fn basics_reports_each_test_and_a_summary() {
    let r = run(&["test", BASICS, "-j", "2"]);
    r.expect_code(100);
    for name in [
        "hostname_is_set",
        "arch_is_known",
        "level_path_matches_level",
        "exec_uname_matches_arch",
        "exec_hostname_matches_host",
        "exec_feeds_stdin",
        "fs_read_via_preopen",
        "fs_preopen_is_read_only",
        "prints_and_logs",
        "clocks_and_random_work",
    ] {
        assert!(r.line_for("PASS", name).contains("L0 basics::"));
    }
    let fail = r.line_for("FAIL", "deliberately_fails");
    assert!(
        fail.contains("panic: assertion `left == right` failed: arithmetic at L0"),
        "{fail}"
    );
    r.line_for("SKIP", "ignored_by_default");
    r.line_for("SKIP", "fs_write_via_rw_grant");
    // The failure section carries both values and the guest source location.
    r.expect_stdout("  left: 2\n right: 3");
    r.expect_stdout("  at basics/src/lib.rs:");
    assert!(
        r.stdout
            .contains("10 passed, 1 failed, 2 ignored; 0 filtered out"),
        "{}",
        r.stdout
    );
}

#[test]
fn all_pass_exit_zero_and_skip_filters() {
    let r = run(&["test", BASICS, "--skip", "deliberately"]);
    r.expect_code(0);
    assert!(
        r.stdout
            .contains("10 passed, 0 failed, 2 ignored; 1 filtered out"),
        "{}",
        r.stdout
    );
}

#[test]
fn list_names_tests_without_running_them() {
    let r = run(&["test", BASICS, "--list"]);
    r.expect_code(0);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 13, "{}", r.stdout);
    assert!(lines.contains(&"basics::hostname_is_set: test"));
    assert!(lines.contains(&"basics::ignored_by_default: test (ignored)"));
    assert!(!r.stdout.contains("PASS"));
}

#[test]
fn filters_exact_and_ignored() {
    let r = run(&["test", BASICS, "--exact", "arch_is_known"]);
    r.expect_code(0);
    assert!(
        r.stdout
            .contains("1 passed, 0 failed, 0 ignored; 12 filtered out"),
        "{}",
        r.stdout
    );

    let r = run(&["test", BASICS, "--ignored"]);
    r.expect_code(100);
    let fail = r.line_for("FAIL", "ignored_by_default");
    assert!(fail.contains("ignored tests run only with"), "{fail}");
    // Without its `/out` grant the write fails.
    r.line_for("FAIL", "fs_write_via_rw_grant");
    assert!(
        r.stdout
            .contains("0 passed, 2 failed, 0 ignored; 11 filtered out"),
        "{}",
        r.stdout
    );

    let r = run(&[
        "test",
        BASICS,
        "--include-ignored",
        "--skip",
        "deliberately",
    ]);
    r.expect_code(100);
    assert!(
        r.stdout
            .contains("10 passed, 2 failed, 0 ignored; 1 filtered out"),
        "{}",
        r.stdout
    );
}

#[test]
fn junit_output_parses_with_a_junit_parser() {
    let r = run(&["test", BASICS, "--format", "junit"]);
    r.expect_code(100);
    let report = junit_parser::from_reader(BufReader::new(r.stdout.as_bytes()))
        .unwrap_or_else(|e| panic!("JUnit did not parse: {e}\n{}", r.stdout));
    assert_eq!(report.tests, 13);
    assert_eq!(report.failures, 1);
    let suite = &report.suites[0];
    // Jenkins' schemas allow `skipped` on <testsuite> only.
    assert_eq!(suite.skipped, 2);
    assert_eq!(suite.name, "basics");
    let failed = suite
        .cases
        .iter()
        .find(|c| c.original_name == "deliberately_fails")
        .expect("failing case present");
    assert_eq!(failed.classname.as_deref(), Some("L0.basics"));
    match &failed.status {
        junit_parser::TestStatus::Failure(f) => {
            assert_eq!(f.failure_type, "panic");
            assert!(f.text.contains("left: 2"), "{}", f.text);
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    let logged = suite
        .cases
        .iter()
        .find(|c| c.original_name == "prints_and_logs")
        .expect("case present");
    let out = logged.system_out.as_deref().unwrap_or_default();
    assert!(out.contains("to stdout from L0"), "{out}");
    assert!(out.contains("[warn L0] a warning line"), "{out}");
    let err = logged.system_err.as_deref().unwrap_or_default();
    assert!(err.contains("to stderr"), "{err}");
}

#[test]
fn junit_file_beside_human_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("report.xml");
    let r = run(&["test", BASICS, "--junit", path.to_str().expect("utf-8")]);
    r.expect_code(100);
    r.expect_stdout("10 passed, 1 failed");
    let file = std::fs::File::open(&path).expect("report written");
    let report = junit_parser::from_reader(BufReader::new(file)).expect("parses");
    assert_eq!(report.tests, 13);
}

#[test]
fn json_lines_carry_every_event() {
    let r = run(&["test", BASICS, "--format", "json", "--nocapture"]);
    r.expect_code(100);
    let events: Vec<serde_json::Value> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let kinds = |k: &str| events.iter().filter(|e| e["event"] == k).count();
    assert_eq!(kinds("run-started"), 1);
    assert_eq!(kinds("test-finished"), 13);
    assert_eq!(kinds("run-finished"), 1);
    let live = events
        .iter()
        .find(|e| e["event"] == "output" && e["test"]["name"] == "prints_and_logs")
        .expect("live output event");
    assert_eq!(live["test"]["level_path"], "L0");
    let failed = events
        .iter()
        .find(|e| e["event"] == "test-finished" && e["test"]["name"] == "deliberately_fails")
        .expect("finished event");
    assert_eq!(failed["outcome"]["status"], "failed");
    assert_eq!(failed["outcome"]["kind"], "panic");
    let summary = &events.last().expect("events")["summary"];
    assert_eq!(summary["passed"], 10);
    assert_eq!(summary["failed"], 1);
    assert_eq!(summary["ignored"], 2);
}

#[test]
fn tap_stream_has_a_matching_plan_and_skips() {
    let r = run(&["test", BASICS, "--format", "tap", "-j", "1"]);
    r.expect_code(100);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines[0], "TAP version 13");
    assert_eq!(lines[1], "1..13");
    let results: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("ok ") || l.starts_with("not ok "))
        .collect();
    assert_eq!(results.len(), 13, "{}", r.stdout);
    assert!(
        lines.contains(&"not ok 12 - basics::deliberately_fails"),
        "{}",
        r.stdout
    );
    assert!(
        lines
            .iter()
            .any(|l| l.ends_with("basics::ignored_by_default # SKIP ignored")),
        "{}",
        r.stdout
    );
    // Nothing but TAP on stdout: every other line is a comment or a YAML block.
    for l in &lines[2..] {
        assert!(
            l.starts_with("ok ")
                || l.starts_with("not ok ")
                || l.starts_with('#')
                || l.starts_with("  "),
            "not TAP: {l:?}"
        );
    }
    // A TAP harness such as meson wants exit 0 once the stream is complete.
    run(&["test", BASICS, "--format", "tap", "--exit-zero"]).expect_code(0);
}

#[test]
fn hostile_tests_each_end_with_their_own_error() {
    let r = run(&[
        "test",
        HOSTILE,
        "--timeout",
        "1",
        "--memory-limit",
        "64",
        "-j",
        "2",
    ]);
    r.expect_code(100);
    let expect = |test: &str, needle: &str| {
        let line = r.line_for("FAIL", test);
        assert!(
            line.contains(needle),
            "{test}: expected {needle:?} in {line:?}"
        );
    };
    expect("infinite_loop", "timeout: timed out after 1.0 s");
    expect(
        "memory_bomb",
        "memory-limit: memory limit exceeded: the test tried to grow a memory to 65 MiB, the limit is 64 MiB",
    );
    expect("read_etc_shadow", "panic: reading /etc/shadow failed");
    expect(
        "exec_without_grant",
        "denied at L0: exec of `cat` is not granted at L0; add --grant exec=cat",
    );
    expect("log_spam", "output-limit: output limit exceeded");
    expect("stdout_spam", "output-limit: output limit exceeded");
    expect("huge_panic_message", "panic: zzzzzzzz");
    expect("huge_error_message", "error: Error: eeeeeeee");
    r.line_for("PASS", "well_behaved");
    assert!(
        r.stdout.contains("hint: the component has no preopened directory for that path; grant one with --grant fs=PATH"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("1 passed, 8 failed, 0 ignored"),
        "{}",
        r.stdout
    );
}

#[test]
fn denied_without_grants_names_the_grant() {
    let r = run(&["test", BASICS, "--no-config", "exec_uname", "fs_read"]);
    r.expect_code(100);
    let line = r.line_for("FAIL", "exec_uname_matches_arch");
    assert!(line.contains("error: Error: denied at L0: exec of `uname` is not granted at L0; add --grant exec=uname"), "{line}");
    let line = r.line_for("FAIL", "fs_read_via_preopen");
    assert!(line.contains("No such file or directory"), "{line}");
}

#[test]
fn grants_from_the_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("hello.txt"), "hello from the host\n").expect("write");
    let fs = format!("fs={}:/data", dir.path().display());
    let r = run(&[
        "test",
        BASICS,
        "--no-config",
        "--grant",
        "exec=uname,hostname,cat",
        "--grant",
        &fs,
        "--skip",
        "deliberately",
    ]);
    r.expect_code(0);
    assert!(r.stdout.contains("10 passed, 0 failed"), "{}", r.stdout);
    assert!(
        !dir.path().join("written-by-guest.txt").exists(),
        "read-only preopen was written"
    );
}

#[test]
fn bad_grants_and_configs_are_usage_errors() {
    let r = run(&["test", BASICS, "--grant", "network=all"]);
    r.expect_code(2);
    assert_eq!(
        r.stderr.trim(),
        "error: unknown grant `network=all`: expected exec=CMD[,CMD...], fs=PATH[:GUEST_PATH][:ro|:rw], image=PATH, nest, passthrough, qmp[=CMD,...] or libvirt[=URI,...]"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("matryoshka.toml");
    std::fs::write(&config, "[grants]\nexec = [\"uname\"]\nsudo = true\n").expect("write");
    let r = run(&["test", BASICS, "--config", config.to_str().expect("utf-8")]);
    r.expect_code(2);
    assert!(r.stderr.contains("unknown field `sudo`"), "{}", r.stderr);
}

#[test]
fn bad_components_give_one_clear_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let not_wasm = dir.path().join("notes.wasm");
    std::fs::write(&not_wasm, "just text").expect("write");
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").expect("write");
    let truncated = dir.path().join("truncated.wasm");
    let basics = std::fs::read(BASICS).expect("basics");
    std::fs::write(&truncated, &basics[..basics.len() / 2]).expect("write");
    let missing = dir.path().join("missing.wasm");

    let cases = [
        (
            &not_wasm,
            "is not a WebAssembly file (it does not start with \\0asm)",
        ),
        (
            &core,
            "is a core WebAssembly module, not a component: build the suite for wasm32-wasip2",
        ),
        (&truncated, "is not a valid component:"),
        (&missing, "cannot read"),
    ];
    for (path, needle) in cases {
        let r = run(&["test", path.to_str().expect("utf-8")]);
        r.expect_code(101);
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
        assert!(r.stderr.contains(needle), "{path:?}: {}", r.stderr);
        assert!(r.stdout.is_empty());
    }

    let r = run(&["test", WRONG_WORLD]);
    r.expect_code(101);
    assert_eq!(
        r.stderr.trim(),
        format!(
            "error: {WRONG_WORLD} does not target the world matryoshka:test/suite@0.2.0: \
             missing exports `tests`, `run`, `call` (it exports `greet`)"
        )
    );
}

#[test]
fn compiled_component_is_cached() {
    let cache = tempfile::tempdir().expect("tempdir");
    let cold = common::bin()
        .env("MATRYOSHKA_CACHE_DIR", cache.path())
        .args(["-v", "test", BASICS, "--list"])
        .output()
        .expect("run");
    let cold = common::Run::from(cold);
    cold.expect_code(0);
    assert!(cold.stderr.contains("source=Compiled"), "{}", cold.stderr);
    let warm = common::bin()
        .env("MATRYOSHKA_CACHE_DIR", cache.path())
        .args(["-v", "test", BASICS, "--list"])
        .output()
        .expect("run");
    let warm = common::Run::from(warm);
    warm.expect_code(0);
    assert!(warm.stderr.contains("source=Cached"), "{}", warm.stderr);
    assert_eq!(cold.stdout, warm.stdout);
}

#[test]
fn a_thousand_tests_pass() {
    let r = run(&["test", MANY, "-j", "2"]);
    r.expect_code(0);
    r.expect_stdout("1000 passed, 0 failed, 4 ignored");
}

/// The most of the `window_*` tests of MANY that ran at once with `-j jobs`,
/// from the wall-clock windows (`window START_NS END_NS`) each one printed.
fn most_at_once(jobs: &str) -> usize {
    let r = run(&["test", MANY, "--ignored", "-j", jobs, "--format", "json"]);
    r.expect_code(0);
    let windows: Vec<(u128, u128)> = r
        .stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{e}: {l}"))
        })
        .filter(|e| e["event"] == "test-finished")
        .map(|e| {
            let out = e["output"]["stdout"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let mut fields = out.split_whitespace().skip(1).map(str::parse::<u128>);
            match (fields.next(), fields.next()) {
                (Some(Ok(start)), Some(Ok(end))) => (start, end),
                _ => panic!("no window in {e}"),
            }
        })
        .collect();
    assert_eq!(windows.len(), 4, "{}", r.stdout);
    // At most as many ran at once as there are windows holding some window's start.
    windows
        .iter()
        .map(|(at, _)| windows.iter().filter(|(s, e)| s <= at && at < e).count())
        .max()
        .unwrap_or(0)
}

#[test]
fn jobs_is_how_many_tests_run_at_once() {
    assert_eq!(most_at_once("1"), 1, "-j 1 ran tests at once");
    assert_eq!(most_at_once("2"), 2, "-j 2 did not run two tests at once");
    assert_eq!(most_at_once("4"), 4, "-j 4 did not run four tests at once");
}

#[test]
fn a_rw_grant_writes_to_the_host_and_a_read_only_one_does_not() {
    for (mode, code) in [(":rw", 0), ("", 100), (":ro", 100)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let grant = format!("fs={}:/out{mode}", dir.path().display());
        let r = run(&[
            "test",
            BASICS,
            "--no-config",
            "--grant",
            &grant,
            "--ignored",
            "--exact",
            "fs_write_via_rw_grant",
        ]);
        r.expect_code(code);
        let written = dir.path().join("written-by-guest.txt");
        if code == 0 {
            r.line_for("PASS", "fs_write_via_rw_grant");
            let text = std::fs::read_to_string(&written).expect("the file written through /out");
            assert_eq!(text, "written at L0\n");
        } else {
            let line = r.line_for("FAIL", "fs_write_via_rw_grant");
            assert!(line.contains("PermissionDenied"), "{grant}: {line}");
            assert!(!written.exists(), "{grant} let the guest write");
        }
    }
}

/// Runs `matryoshka test BASICS --list` with the compile cache at `cache`.
fn list_with_cache(cache: &std::path::Path) -> common::Run {
    let cache = cache.to_str().expect("utf-8 path");
    run(&["test", BASICS, "--list", "--cache-dir", cache])
}

fn chmod(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

#[test]
fn a_cache_others_can_write_to_is_refused_before_an_artifact_in_it_is_loaded() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("cache");
    list_with_cache(&root).expect_code(0);
    // The one artifact the run stored: <root>/<engine key>/<sha256>.cwasm.
    let keys: Vec<_> = std::fs::read_dir(&root)
        .expect("cache root")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n != "components"))
        .collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let key = &keys[0];
    let artifacts: Vec<_> = std::fs::read_dir(key)
        .expect("key folder")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(artifacts.len(), 1, "{artifacts:?}");
    let artifact = &artifacts[0];
    assert!(
        artifact.to_string_lossy().ends_with(".cwasm"),
        "{artifact:?}"
    );
    for made in [&root, key] {
        let mode = std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(made).expect("stat"));
        assert_eq!(mode & 0o777, 0o700, "{}", made.display());
    }
    // Planted where the next run would load it.
    std::fs::write(artifact, b"not an artifact").expect("plant");

    let refused = |r: &common::Run, dir: &std::path::Path, problem: &str| {
        r.expect_code(101);
        assert!(
            r.stderr.contains(&format!(
                "error: refusing the cache folder {}: {problem}",
                dir.display()
            )),
            "{}",
            r.stderr
        );
        assert!(
            !r.stderr.contains("ignoring unusable cache entry"),
            "{}",
            r.stderr
        );
        assert!(r.stdout.is_empty(), "{}", r.stdout);
    };
    chmod(&root, 0o777);
    let r = list_with_cache(&root);
    refused(&r, &root, "mode 0777 (writable by group and others)");
    assert!(
        r.stderr
            .contains(&format!("fix: `chmod 700 {}`", root.display())),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("--cache-dir"), "{}", r.stderr);

    // Every folder from the root down to the artifact's is checked.
    chmod(&root, 0o700);
    chmod(key, 0o770);
    refused(
        &list_with_cache(&root),
        key,
        "mode 0770 (writable by its group)",
    );
    chmod(key, 0o700);
    std::os::unix::fs::chown(key, Some(65534), None).expect("chown to nobody (tests run as root)");
    refused(
        &list_with_cache(&root),
        key,
        "owned by uid 65534, not by uid 0 that this runtime runs as",
    );

    // Control: with the folders safe again, the planted file is the artifact the
    // run tries (and fails) to load before it compiles afresh.
    std::os::unix::fs::chown(key, Some(0), None).expect("chown back");
    let r = list_with_cache(&root);
    r.expect_code(0);
    assert!(
        r.stderr.contains(&format!(
            "ignoring unusable cache entry {}",
            artifact.display()
        )),
        "{}",
        r.stderr
    );
}

#[test]
fn keep_failed_or_snapshot_without_a_chain_is_a_usage_error() {
    // --keep-failed keeps a chain up; --snapshot saves a VM chain (none of an
    // SSH or local L1).
    let keep = "error: --keep-failed keeps the chain of --levels N or --target up";
    let snapshot = "error: --snapshot saves the VM chain of --levels N";
    for (flags, needle) in [
        (&["--keep-failed"][..], keep),
        (&["--keep-failed-for", "10s"], keep),
        (&["--snapshot"], snapshot),
        (&["--snapshot", "--target", "local"], snapshot),
    ] {
        let mut args = vec!["test", BASICS];
        args.extend_from_slice(flags);
        let r = run(&args);
        r.expect_code(2);
        assert!(r.stderr.contains(needle), "{flags:?}: {}", r.stderr);
    }
    // A monitor socket that is not there says so.
    let r = run(&["monitor", "/nonexistent/L0-L1.monitor"]);
    r.expect_code(2);
    assert!(
        r.stderr
            .contains("cannot connect to the monitor at /nonexistent/L0-L1.monitor"),
        "{}",
        r.stderr
    );
}
