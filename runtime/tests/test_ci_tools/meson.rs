//! meson (Debian's 1.0.1 and current) reading the TAP stream: its own counts, stable subtest numbers, a filter that matches nothing.

use super::*;

/// docs/ci.md's meson.build.
pub(crate) const MESON_BUILD: &str = "\
project('ci', meson_version: '>=1.0')
matryoshka = find_program(get_option('matryoshka'))
test('ci', matryoshka,
  args: ['test', get_option('suite'), '--format', 'tap', '--exit-zero'] + get_option('filters'),
  protocol: 'tap')
";

/// docs/ci.md's meson_options.txt.
pub(crate) const MESON_OPTIONS: &str = "\
option('matryoshka', type: 'string', value: 'matryoshka', description: 'the matryoshka binary')
option('suite', type: 'string', description: 'the suite component (.wasm)')
option('filters', type: 'array', value: [], description: 'test name filters')
";

/// A meson project running `ci.wasm` with `filters`, set up with `meson`.
fn meson_project(meson: &Path, filters: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    write(&dir.path().join("meson.build"), MESON_BUILD);
    write(&dir.path().join("meson_options.txt"), MESON_OPTIONS);
    let build = dir.path().join("build");
    let mut setup = Command::new(meson);
    setup
        .current_dir(dir.path())
        .arg("setup")
        .arg(&build)
        .arg(format!("-Dmatryoshka={MATRYOSHKA}"))
        .arg(format!("-Dsuite={CI}"));
    if !filters.is_empty() {
        setup.arg(format!("-Dfilters={filters}"));
    }
    exec(&mut setup).expect_code(0);
    (dir, build)
}

/// `meson test` in `build`, two at a time (`-j` is newer than Debian's 1.0.1).
fn meson_test(meson: &Path, build: &Path) -> Run {
    exec(
        Command::new(meson)
            .args(["test", "--num-processes", "2", "-C"])
            .arg(build),
    )
}

/// The value of a `Name: N` line of meson's summary; none when meson leaves it out
/// (1.12 prints only the counts that are not zero, and Ok).
fn meson_count(r: &Run, name: &str) -> Option<u32> {
    r.stdout.lines().find_map(|l| {
        let (key, value) = l.split_once(':')?;
        (key.trim() == name).then(|| value.trim().parse().expect("a count"))
    })
}

fn meson_junit(build: &Path) -> junit_parser::TestSuites {
    let path = build.join("meson-logs/testlog.junit.xml");
    let file = std::fs::File::open(&path)
        .unwrap_or_else(|e| panic!("meson wrote no {}: {e}", path.display()));
    junit_parser::from_reader(BufReader::new(file)).expect("meson's JUnit parses")
}

fn meson_reads_each_tap_result(meson: &Path) {
    let (_dir, build) = meson_project(meson, "");
    let mut names = Vec::new();
    for _ in 0..2 {
        let r = meson_test(meson, &build);
        // The test fails (exit 1), it is not an ERROR: --exit-zero keeps the exit
        // code out of meson's verdict, and the TAP lines decide it.
        r.expect_code(1);
        let line = r
            .stdout
            .lines()
            .find(|l| l.contains(" ci ") || l.contains(" ci:ci "))
            .unwrap_or_else(|| panic!("no result line for ci:\n{}", r.stdout));
        assert!(line.contains("FAIL"), "{line}");
        assert!(line.contains("2/3 subtests passed"), "{line}");
        assert_eq!(meson_count(&r, "Ok"), Some(0), "{}", r.stdout);
        assert_eq!(meson_count(&r, "Fail"), Some(1), "{}", r.stdout);
        assert_eq!(meson_count(&r, "Skipped").unwrap_or(0), 0, "{}", r.stdout);
        let report = meson_junit(&build);
        assert_eq!(
            (
                report.tests,
                report.failures,
                report.errors,
                report.suites[0].skipped
            ),
            (5, 1, 0, 2),
            "meson's JUnit counts"
        );
        let cases: Vec<(String, &'static str)> = report.suites[0]
            .cases
            .iter()
            .map(|c| {
                let status = match c.status {
                    junit_parser::TestStatus::Success => "ok",
                    junit_parser::TestStatus::Failure(_) => "fail",
                    junit_parser::TestStatus::Skipped(_) => "skip",
                    junit_parser::TestStatus::Error(_) => "error",
                };
                (c.original_name.clone(), status)
            })
            .collect();
        names.push(cases);
    }
    let expected: Vec<(String, &str)> = [
        ("1 - ci::adds_up", "ok"),
        ("2 - ci::level_is_named", "ok"),
        ("3 - ci::fails_on_purpose", "fail"),
        ("4 - ci::ignored_on_purpose", "skip"),
        ("5 - ci::fails_once", "skip"),
    ]
    .into_iter()
    .map(|(n, s)| (n.to_string(), s))
    .collect();
    assert_eq!(names[0], expected, "meson's JUnit subtests, first run");
    assert_eq!(names[1], expected, "meson's JUnit subtests, second run");
}

fn meson_fails_a_filter_that_matches_nothing(meson: &Path) {
    let (_dir, build) = meson_project(meson, "no_such_test");
    let r = meson_test(meson, &build);
    assert_ne!(
        r.code,
        Some(0),
        "meson passed a run of no test:\n{}",
        r.stdout
    );
    let line = r
        .stdout
        .lines()
        .find(|l| l.contains(" ci ") || l.contains(" ci:ci "))
        .unwrap_or_else(|| panic!("no result line for ci:\n{}", r.stdout));
    assert!(
        line.contains("ERROR") || line.contains("FAIL"),
        "meson's verdict: {line}\n{}",
        r.stdout
    );
    assert!(!line.contains("SKIP"), "{line}");
    assert_eq!(meson_count(&r, "Ok"), Some(0), "{}", r.stdout);
    assert_eq!(meson_count(&r, "Skipped").unwrap_or(0), 0, "{}", r.stdout);
    assert_eq!(meson_count(&r, "Fail"), Some(1), "{}", r.stdout);
}

#[test]
fn meson_debian_counts_each_tap_result_with_stable_numbers() {
    meson_reads_each_tap_result(&tool("/usr/bin/meson"));
}

#[test]
fn meson_pypi_counts_each_tap_result_with_stable_numbers() {
    meson_reads_each_tap_result(&tool("meson/bin/meson"));
}

#[test]
fn meson_debian_fails_a_filter_that_matches_nothing() {
    meson_fails_a_filter_that_matches_nothing(&tool("/usr/bin/meson"));
}

#[test]
fn meson_pypi_fails_a_filter_that_matches_nothing() {
    meson_fails_a_filter_that_matches_nothing(&tool("meson/bin/meson"));
}
