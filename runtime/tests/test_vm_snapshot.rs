//! Chain snapshots (`--levels N --snapshot`) with a real QEMU: the chain is
//! saved once after it booted, and every test after the first runs on a copy
//! restored from that save.
//!
//! Needs the image (`./x image`).

#[allow(dead_code, reason = "shared by several test crates, each using a part")]
mod common;

use common::vm::{image_dir, nested, qemus_left, run_dir, vm_test};
use matryoshka_test_programs::NESTED;

/// What `fresh_level_first` and `fresh_level_second` need: each level's `/tmp`
/// as `/scratch`, and only those two tests.
const FRESH_LEVEL_TESTS: [&str; 6] = [
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

#[test]
fn each_test_runs_on_a_copy_of_the_chain_restored_from_its_snapshot() {
    let dir = run_dir("snapshot");
    // --retries 1: a chain lost while booting (nested SVM under TCG, now and
    // then) is booted again.
    let (run, took) = nested(
        dir.path(),
        &image_dir(),
        &[
            &["--levels", "2", "--snapshot", "--retries", "1"][..],
            &FRESH_LEVEL_TESTS[..],
            &["takes_ten_seconds", "prints_the_wall_clock"][..],
        ]
        .concat(),
    );
    let ended = now_ms();
    eprintln!("--levels 2 --snapshot: {:.1} s", took.as_secs_f64());
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
        "L2's clock was {behind} ms behind L0's at the end of the run:\n{}",
        run.stdout
    );
    for test in ["fresh_level_first", "fresh_level_second"] {
        let line = run.line_for("PASS", test);
        assert!(line.contains("L0/L1/L2 nested::"), "{line}");
    }
    assert!(
        run.stderr
            .contains("saved L0/L1 (and the levels inside it) in "),
        "{}",
        run.stderr
    );
    // The second test ran on a restored L1 (with its L2 inside), said so in
    // the hop's journal; the restored QEMU wrote on in the same console.
    let journal = std::fs::read_to_string(dir.path().join("L0-L1.relay")).expect("journal");
    assert!(
        journal.contains("saved: "),
        "{journal}\nstderr:\n{}",
        run.stderr
    );
    let restored = journal
        .lines()
        .position(|l| l.contains(" restored from "))
        .unwrap_or_else(|| panic!("no restore in the journal:\n{journal}"));
    let second = journal
        .lines()
        .position(|l| l.contains("→ test `fresh_level_second`"))
        .expect("the second test in the journal");
    assert!(restored < second, "{journal}");
    // Nothing left: no QEMU, and the snapshot (hundreds of MiB) went with the chain.
    assert_eq!(qemus_left(dir.path()), Vec::<String>::new());
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .expect("run folder")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".snapshot") || n.ends_with(".snapshot"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// The control: without `--snapshot` the two tests share the chain, and the
/// second finds the first one's mark (so the test above can fail).
#[test]
fn without_a_snapshot_the_tests_share_the_chain() {
    let dir = run_dir("shared");
    let (run, _) = nested(
        dir.path(),
        &image_dir(),
        &[&["--levels", "1"][..], &FRESH_LEVEL_TESTS[..]].concat(),
    );
    run.expect_code(100);
    run.expect_stdout("1 passed, 1 failed");
    let line = run.line_for("FAIL", "fresh_level_second");
    assert!(line.contains("L0/L1 is not fresh"), "{line}");
    assert_eq!(qemus_left(dir.path()), Vec::<String>::new());
}

/// A snapshot that cannot be restored (here: cut short while the first test
/// runs) makes the next test boot the chain again, with a warning, and the
/// run goes on.
#[test]
fn a_snapshot_that_does_not_restore_falls_back_to_a_cold_boot() {
    use std::io::BufRead;
    let dir = run_dir("corrupt");
    let mut child = vm_test(NESTED, &image_dir(), dir.path())
        .args(["--levels", "1", "--snapshot", "--ignored", "--exact"])
        .args(["takes_ten_seconds", "prints_the_wall_clock"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start matryoshka");
    let stdout = child.stdout.take().expect("stdout");
    let out = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let mut stderr = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let mut said = String::new();
    let mut line = String::new();
    while stderr.read_line(&mut line).unwrap_or(0) > 0 {
        said.push_str(&line);
        if line.starts_with("saved L0/L1") {
            break;
        }
        line.clear();
    }
    assert!(said.contains("saved L0/L1"), "{said}");
    // The first test takes 10 s: cut the state short before the second one's restore.
    let snapshot = std::fs::read_dir(dir.path())
        .expect("run folder")
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_string_lossy().starts_with(".snapshot"))
        .map(|e| e.path().join("L0-L1.snapshot"))
        .expect("the snapshot folder");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&snapshot)
        .and_then(|f| f.set_len(4096))
        .expect("cut the snapshot short");
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut stderr, &mut rest);
    let status = child.wait().expect("wait");
    let stdout = out.join().unwrap_or_default();
    assert_eq!(status.code(), Some(0), "{stdout}\n{said}{rest}");
    assert!(stdout.contains("2 passed, 0 failed"), "{stdout}");
    assert!(
        rest.contains("restoring the chain from its snapshot failed (")
            && rest.contains("booting it again"),
        "{rest}"
    );
    assert_eq!(qemus_left(dir.path()), Vec::<String>::new());
}
