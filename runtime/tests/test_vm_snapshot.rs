//! Chain snapshots (`--levels N --snapshot`) with a real QEMU: the chain is
//! saved once after it booted (kept across runs in the cache folder), and
//! every test after the first runs on a copy restored from a save.
//!
//! Needs the image (`./x image`).

#[allow(dead_code, reason = "shared by several test crates, each using a part")]
mod common;

use common::restored::{FRESH_LEVEL_TESTS, run_on_copies};
use common::vm::{image_dir, nested, qemus_left, run_dir, vm_test};
use matryoshka_test_programs::NESTED;

#[test]
fn each_test_runs_on_a_copy_of_the_chain_restored_from_its_snapshot() {
    let cache = run_dir("snapshot-cache");
    // The first run boots the chain bare and keeps it, attaches the component
    // and keeps that too; the tests after the first run on copies of that.
    let first = run_on_copies(2, cache.path(), "snapshot", &[]);
    for said in [
        "saved L0/L1 (and the levels inside it) bare in ",
        "attached the component to L0/L1/L2 in ",
        "saved L0/L1 (and the levels inside it) with the component in ",
    ] {
        assert!(first.stderr.contains(said), "{said}: {}", first.stderr);
    }
    // The next run of the same suite with the same rights starts from the
    // chain kept with the component, saved seconds (here) to weeks before.
    let second = run_on_copies(2, cache.path(), "snapshot-kept", &[]);
    assert!(
        second
            .stderr
            .contains("restored L0/L1/L2 (with the component) from the snapshot kept in "),
        "{}",
        second.stderr
    );
    assert!(!second.stderr.contains("saved L0/L1"), "{}", second.stderr);
    assert!(!second.stderr.contains("attached"), "{}", second.stderr);
    // Other rights (here the environment): the bare chain, attached anew.
    let third = run_on_copies(2, cache.path(), "snapshot-other", &["--env", "RUN=third"]);
    for said in [
        "restored L0/L1/L2 (bare) from the snapshot kept in ",
        "attached the component to L0/L1/L2 in ",
        "saved L0/L1 (and the levels inside it) with the component in ",
    ] {
        assert!(third.stderr.contains(said), "{said}: {}", third.stderr);
    }
    // Each rights' chain is kept beside the other's: the first ones' again.
    let fourth = run_on_copies(2, cache.path(), "snapshot-kept-again", &[]);
    assert!(
        fourth
            .stderr
            .contains("restored L0/L1/L2 (with the component) from the snapshot kept in "),
        "{}",
        fourth.stderr
    );
}

/// The control: with `--no-snapshot` the two tests share the chain, and the
/// second finds the first one's mark (so the test above can fail).
#[test]
fn without_a_snapshot_the_tests_share_the_chain() {
    let dir = run_dir("shared");
    let (run, _) = nested(
        dir.path(),
        &image_dir(),
        &[
            &["--levels", "1", "--no-snapshot"][..],
            &FRESH_LEVEL_TESTS[..],
        ]
        .concat(),
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
    // --no-cache: the snapshot of this run only, in its run folder.
    let mut child = vm_test(NESTED, &image_dir(), dir.path())
        .args([
            "--levels",
            "1",
            "--snapshot",
            "--no-cache",
            "--ignored",
            "--exact",
        ])
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

/// One test at L1 with `--snapshot`, the image in `image`, the cache in
/// `cache`: what it printed on stderr.
fn kept_run(image: &std::path::Path, cache: &std::path::Path, name: &str) -> String {
    let dir = run_dir(name);
    let (run, took) = nested(
        dir.path(),
        image,
        &[
            "--levels",
            "1",
            "--snapshot",
            "--cache-dir",
            cache.to_str().expect("UTF-8"),
            "--ignored",
            "--exact",
            "prints_the_wall_clock",
        ],
    );
    eprintln!("{name}: {:.1} s", took.as_secs_f64());
    run.expect_code(0);
    run.expect_stdout("1 passed, 0 failed");
    assert_eq!(qemus_left(dir.path()), Vec::<String>::new());
    run.stderr
}

/// A kept snapshot of a chain whose image changed since is rebuilt; one that
/// no longer loads, or was cut short, is thrown away with a warning and the
/// chain booted and kept again; the run goes on each time.
#[test]
fn a_kept_snapshot_that_changed_or_broke_is_saved_again() {
    let cache = run_dir("kept-cache");
    // An image of its own, to change.
    let image = run_dir("kept-image");
    for file in ["kernel", "initrd", "root.img", "stamp"] {
        std::fs::copy(image_dir().join(file), image.path().join(file)).expect("copy the image");
    }
    let said = kept_run(image.path(), cache.path(), "kept-first");
    assert!(
        said.contains(" bare in ") && said.contains("for later runs"),
        "{said}"
    );
    let slot = std::fs::read_dir(cache.path().join("snapshots"))
        .expect("the snapshots folder")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .next()
        .expect("a slot");
    let states = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&slot)
            .expect("the slot")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "state"))
            .collect()
    };
    // Kept bare and with the component.
    assert_eq!(states().len(), 2, "{:?}", states());

    // The image changed: the snapshot is stale.
    std::fs::File::options()
        .write(true)
        .open(image.path().join("kernel"))
        .and_then(|f| f.set_modified(std::time::SystemTime::now()))
        .expect("touch the kernel");
    let said = kept_run(image.path(), cache.path(), "kept-stale");
    assert!(
        said.contains("is stale (changed since: image x86_64)") && said.contains(" bare in "),
        "{said}"
    );

    // Their headers overwritten: QEMU loads neither.
    for state in states() {
        use std::io::Write;
        let mut f = std::fs::File::options()
            .write(true)
            .open(state)
            .expect("the state");
        f.write_all(&[0u8; 65536]).expect("overwrite the header");
    }
    let said = kept_run(image.path(), cache.path(), "kept-corrupt");
    assert!(
        said.contains("warning: the snapshot kept with the component in ")
            && said.contains("warning: the snapshot kept bare in ")
            && said.contains("did not restore (")
            && said.contains(" bare in "),
        "{said}"
    );

    // Cut short: they are not even tried.
    for state in states() {
        std::fs::File::options()
            .write(true)
            .open(state)
            .and_then(|f| f.set_len(4096))
            .expect("cut the state short");
    }
    let said = kept_run(image.path(), cache.path(), "kept-short");
    assert!(
        said.contains("is unusable (")
            && said.contains("has 4096 bytes")
            && said.contains(" bare in "),
        "{said}"
    );

    // And kept again, it restores.
    let said = kept_run(image.path(), cache.path(), "kept-again");
    assert!(
        said.contains("restored L0/L1 (with the component) from the snapshot kept in "),
        "{said}"
    );
}
