//! Tests on copies of a chain restored from its snapshot (`--levels N
//! --snapshot`): what the snapshot tests at L2 and the deep tests at L3 share.

use std::path::Path;

use super::Run;
use super::vm::{image_dir, nested, qemus_left, run_dir};

/// What `fresh_level_first` and `fresh_level_second` need: each level's `/tmp`
/// as `/scratch`, and only those two tests.
pub const FRESH_LEVEL_TESTS: [&str; 6] = [
    "--grant",
    "fs=/tmp:/scratch:rw",
    "--ignored",
    "--exact",
    "fresh_level_first",
    "fresh_level_second",
];

/// Milliseconds since the epoch, here.
fn now_ms() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i128
}

/// Runs the tests of `FRESH_LEVEL_TESTS` and the clock's at the bottom of a
/// chain of `levels` VM levels with `--snapshot`, the cache in `cache`; checks
/// that each test ran on a fresh copy and that the clocks were set after restores.
pub fn run_on_copies(levels: usize, cache: &Path, name: &str, extra: &[&str]) -> Run {
    let dir = run_dir(name);
    // --retries 1: a chain lost while booting (nested SVM under TCG, now and
    // then) is booted again.
    let (run, took) = nested(
        dir.path(),
        &image_dir(),
        &[
            &[
                "--levels",
                &levels.to_string(),
                "--snapshot",
                "--retries",
                "1",
                "--cache-dir",
            ][..],
            &[cache.to_str().expect("UTF-8")][..],
            &FRESH_LEVEL_TESTS[..],
            &["takes_ten_seconds", "prints_the_wall_clock"][..],
            extra,
        ]
        .concat(),
    );
    let ended = now_ms();
    eprintln!(
        "--levels {levels} --snapshot ({name}): {:.1} s",
        took.as_secs_f64()
    );
    // What the chain cost, for the log of the tier.
    for line in run.stderr.lines().filter(|l| {
        [
            "saved L0/L1",
            "attached the component",
            "restored L0/L1",
            " is up",
        ]
        .iter()
        .any(|s| l.contains(s))
    }) {
        eprintln!("  {line}");
    }
    run.expect_code(0);
    run.expect_stdout("4 passed, 0 failed");
    // The last test ran on a copy restored from a state saved before the
    // first (10 s and more before): its clocks were set to L0's.
    let printed: i128 = run
        .stdout
        .lines()
        .find_map(|l| l.split("wall clock: ").nth(1))
        .and_then(|ms| ms.trim().parse().ok())
        .unwrap_or_else(|| panic!("no wall clock in:\n{}", run.stdout));
    let behind = ended - printed;
    assert!(
        (-2_000..6_000).contains(&behind),
        "L{levels}'s clock was {behind} ms behind L0's at the end of the run:\n{}",
        run.stdout
    );
    let bottom = (0..=levels)
        .map(|l| format!("L{l}"))
        .collect::<Vec<_>>()
        .join("/");
    for test in ["fresh_level_first", "fresh_level_second"] {
        let line = run.line_for("PASS", test);
        assert!(line.contains(&format!("{bottom} nested::")), "{line}");
    }
    // The second test ran on a restored L1 (with its L2 inside), said so in
    // the hop's journal; the restored QEMU wrote on in the same console.
    let journal = std::fs::read_to_string(dir.path().join("L0-L1.relay")).expect("journal");
    let lines: Vec<&str> = journal.lines().collect();
    let at = |test: &str| {
        lines
            .iter()
            .position(|l| l.contains(&format!("→ test `{test}`")))
            .unwrap_or_else(|| panic!("no {test} in the journal:\n{journal}"))
    };
    let (first, second) = (at("fresh_level_first"), at("fresh_level_second"));
    assert!(
        first < second
            && lines[first..second]
                .iter()
                .any(|l| l.contains(" restored from ")),
        "no restore between the two tests in the journal:\n{journal}"
    );
    // Nothing left: no QEMU, and the run's snapshot (hundreds of MiB) went
    // with the chain.
    assert_eq!(qemus_left(dir.path()), Vec::<String>::new());
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .expect("run folder")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".snapshot") || n.ends_with(".snapshot"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    run
}
