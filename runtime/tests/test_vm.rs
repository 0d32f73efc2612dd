//! VM levels with a real QEMU: the nested demo suite booting L1 → L2 (→ L3) from
//! the image `images/build.sh` made, and every way a boot can fail.
//!
//! Needs the image (`./x image`). The runtime copied into the VMs is the one in
//! `$MATRYOSHKA_RUNTIME_DIR/x86_64/matryoshka` when set (`./x test` points it at a
//! release build, a quarter of the size), else the binary under test.
//! `MATRYOSHKA_TEST_LEVELS` sets the depth of the demo (default 2).

#[allow(dead_code, reason = "shared by several test crates, each using a part")]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Run;
use common::vm::{
    Timeline, expect_infrastructure_error, image_dir, image_with_kernel, nested, qemus_left,
    run_dir, vm_test,
};
use matryoshka_test_programs::{NESTED, RELAY};

#[test]
fn nested_demo_boots_each_level_from_the_same_image() {
    let image = image_dir();
    let levels: u32 = std::env::var("MATRYOSHKA_TEST_LEVELS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let dir = run_dir("demo");
    let (run, took) = nested(
        dir.path(),
        &image,
        &["--env", &format!("NESTED_LEVELS={levels}")],
    );
    eprintln!("nested demo to L{levels}: {:.1} s", took.as_secs_f64());
    run.expect_code(0);
    assert!(
        run.line_for("PASS", "nested_levels")
            .contains("L0 nested::nested_levels"),
        "{}",
        run.stdout
    );
    // L1 runs under TCG here (KVM at L0 is broken and must have been caught) or KVM
    // where it works; from L2 down, KVM inside the level above.
    let l1 = run
        .stdout
        .lines()
        .find(|l| l.contains("L0/L1 booted with "))
        .unwrap_or_else(|| panic!("no boot line for L1:\n{}", run.stdout));
    assert!(l1.contains("with tcg") || l1.contains("with kvm"), "{l1}");
    let mut path = "L0/L1".to_string();
    for depth in 2..=levels {
        path = format!("{path}/L{depth}");
        run.expect_stdout(&format!("{path} booted with kvm"));
        run.expect_stdout(&format!("hostname level-{depth}, level={depth} accel=kvm"));
    }
    // Every level's console and level log are kept with the run.
    let console = std::fs::read_to_string(dir.path().join("L0-L1.console")).expect("L1 console");
    assert!(console.contains("MATRYOSHKA-BOOT"), "{console}");
    let log = std::fs::read_to_string(dir.path().join("L0-L1.log")).expect("L1 level log");
    assert!(log.contains("MATRYOSHKA-STEP"), "{log}");
    assert!(log.contains("MATRYOSHKA-READY level=1"), "{log}");
    assert_eq!(qemus_left(dir.path()), Vec::<String>::new());
    // The run's timeline, rendered by a real browser: a lane per level, L1's boot
    // steps, the test on L0's lane, and log lines from the deepest level.
    let timeline = Timeline::render(dir.path(), &dir.path().join("timeline.png"));
    let l0 = timeline.lane("L0");
    assert!(
        l0.contains("class=\"event test pass\" data-test=\"nested::nested_levels\""),
        "{l0}"
    );
    assert!(
        timeline
            .lane("L0/L1")
            .contains("<title>boot: runtime started (")
    );
    let mut path = "L0".to_string();
    for depth in 1..=levels {
        path = format!("{path}/L{depth}");
        assert!(
            timeline.lane(&path).contains("class=\"event log\""),
            "{path}"
        );
    }
    assert!(!timeline.dom.contains("first-failure"));
}

/// An image folder whose kernel and root are the real ones and whose initramfs is `initrd`.
fn image_with_initrd(dir: &Path, initrd: &[u8]) -> PathBuf {
    let real = image_dir();
    let image = dir.join("image");
    std::fs::create_dir_all(&image).expect("image dir");
    for f in ["kernel", "root.img"] {
        std::os::unix::fs::symlink(real.join(f), image.join(f)).expect("symlink");
    }
    std::fs::write(image.join("initrd"), initrd).expect("initrd");
    image
}

#[test]
fn a_missing_kernel_names_the_file_and_the_fix() {
    let dir = run_dir("no-kernel");
    let (run, _) = nested(
        dir.path(),
        &dir.path().join("nowhere"),
        &["--env", "NESTED_LEVELS=1"],
    );
    expect_infrastructure_error(
        &run,
        &[
            &format!("no kernel at {}/nowhere/kernel", dir.path().display()),
            "images/build.sh",
        ],
    );
    assert_eq!(qemus_left(dir.path()), Vec::<String>::new());
}

#[test]
fn a_kernel_panic_shows_the_console_and_ends_at_once() {
    let dir = run_dir("panic");
    // Not an initramfs: the kernel finds no root and panics.
    let image = image_with_initrd(dir.path(), b"this is not a cpio archive");
    let (run, took) = nested(
        dir.path(),
        &image,
        &["--env", "NESTED_LEVELS=1", "--accel", "tcg"],
    );
    expect_infrastructure_error(&run, &["kernel panicked", "Kernel panic"]);
    // Seen when QEMU exits (panic=-1, -no-reboot), long before the boot deadline.
    assert!(took < Duration::from_secs(120), "took {took:?}");
    assert_eq!(qemus_left(dir.path()), Vec::<String>::new());
}

/// The image's initramfs with its `/init` replaced by `script`, appended as a second
/// newc archive (made with `cpio`, which the image build installs).
fn initrd_with_init(dir: &Path, script: &str) -> Vec<u8> {
    let src = dir.join("init-src");
    std::fs::create_dir_all(&src).expect("init dir");
    std::fs::write(src.join("init"), script).expect("init");
    let out = Command::new("sh")
        .arg("-c")
        .arg("chmod 755 init && echo init | cpio --quiet -o -H newc -R 0:0")
        .current_dir(&src)
        .output()
        .expect("cpio");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut initrd = std::fs::read(image_dir().join("initrd")).expect("initrd");
    // The kernel reads a following archive from a 4-byte boundary.
    initrd.resize(initrd.len().next_multiple_of(4), 0);
    initrd.extend_from_slice(&out.stdout);
    initrd
}

#[test]
fn a_guest_that_resets_while_booting_is_booted_once_more() {
    let dir = run_dir("reset");
    // SysRq b resets the machine at once, as a triple fault would: no shutdown, and
    // -no-reboot turns the reset into QEMU exiting with status 0.
    let initrd = initrd_with_init(
        dir.path(),
        "#!/bin/busybox sh\n/bin/busybox mkdir -p /proc\n\
         /bin/busybox mount -t proc proc /proc\necho b >/proc/sysrq-trigger\n",
    );
    let image = image_with_initrd(dir.path(), &initrd);
    let (run, _) = nested(
        dir.path(),
        &image,
        &["--env", "NESTED_LEVELS=1", "--accel", "tcg"],
    );
    expect_infrastructure_error(
        &run,
        &[
            "L0/L1 did not boot",
            "status 0: the guest reset without a word",
        ],
    );
    assert!(
        run.stderr.contains("booting L0/L1 once more"),
        "{}",
        run.stderr
    );
    assert_eq!(qemus_left(dir.path()), Vec::<String>::new());
}

#[test]
fn not_serving_by_the_deadline_is_a_timeout_with_the_console() {
    let dir = run_dir("deadline");
    let (run, took) = nested(
        dir.path(),
        &image_dir(),
        &[
            "--env",
            "NESTED_LEVELS=1",
            "--env",
            "NESTED_BOOT_TIMEOUT_MS=1500",
            "--accel",
            "tcg",
        ],
    );
    expect_infrastructure_error(&run, &["was not serving within 1.5 s (tcg); console tail:"]);
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert_eq!(qemus_left(dir.path()), Vec::<String>::new());
}

#[test]
fn qemu_exiting_early_fails_within_two_seconds() {
    let dir = run_dir("early-exit");
    // Not a kernel: QEMU refuses to load it and exits at start-up.
    let image = image_with_kernel(dir.path(), b"this is not a kernel");
    let (run, _) = nested(
        dir.path(),
        &image,
        &["--env", "NESTED_LEVELS=1", "--accel", "tcg"],
    );
    expect_infrastructure_error(&run, &["did not boot: QEMU (", "QEMU said:"]);
    let after: f64 = run
        .stdout
        .split("exited after ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|secs| secs.parse().ok())
        .unwrap_or_else(|| panic!("no exit time in:\n{}", run.stdout));
    assert!(after < 2.0, "QEMU's exit was seen after {after} s");
    assert_eq!(qemus_left(dir.path()), Vec::<String>::new());
}

/// Starts the demo to L1 and returns once its QEMU has written to the console.
fn start_booting(dir: &Path) -> std::process::Child {
    let child = vm_test(NESTED, &image_dir(), dir)
        .args(["--env", "NESTED_LEVELS=1", "--accel", "tcg"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start matryoshka");
    let console = dir.join("L0-L1.console");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(&console).map_or(true, |m| m.len() == 0) {
        assert!(
            Instant::now() < deadline,
            "QEMU never wrote to {}",
            console.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(qemu_running(dir), "no QEMU process names {}", dir.display());
    child
}

fn qemu_running(dir: &Path) -> bool {
    let out = Command::new("pgrep")
        .args(["-a", "-f", &dir.display().to_string()])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.contains("qemu-system"))
}

#[test]
fn ctrl_c_during_a_boot_stops_the_vm() {
    let dir = run_dir("sigint");
    let mut child = start_booting(dir.path());
    // SAFETY: kill(2) on the child we started; no memory is involved.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert_eq!(qemus_left(dir.path()), Vec::<String>::new());
}

#[test]
fn a_killed_runtime_takes_its_vm_with_it() {
    let dir = run_dir("sigkill");
    let mut child = start_booting(dir.path());
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");
    // No destructor ran: the parent-death signal is what stops QEMU.
    assert_eq!(qemus_left(dir.path()), Vec::<String>::new());
}

#[test]
fn a_level_whose_runtime_dies_powers_off_and_is_reported_lost() {
    let dir = run_dir("runtime-dies");
    let out = vm_test(RELAY, &image_dir(), dir.path())
        .args(["--levels", "1", "--nocapture", "--ignored"])
        .args(["--exact", "kill_own_runtime"])
        .output()
        .expect("start matryoshka");
    let run = Run::from(out);
    run.expect_code(101);
    run.expect_stdout("killing the runtime of L0/L1");
    // The level's init saw its runtime end and powered the level off: QEMU exited,
    // and the message carries the init's last step from the level log.
    for needle in [
        "level L0/L1 lost",
        "its QEMU exited",
        "runtime exited with status 137; powering off",
    ] {
        assert!(
            run.stdout.contains(needle),
            "no {needle:?} in:\n{}",
            run.stdout
        );
    }
    // Seen as QEMU's exit, not as the 60 s of silence a level with a live QEMU is
    // given (a wall-clock bound here failed whenever this machine ran slow).
    assert!(
        !run.stdout.contains("stopped answering heartbeats"),
        "{}",
        run.stdout
    );
    assert_eq!(qemus_left(dir.path()), Vec::<String>::new());
}

/// `relay.wasm`'s kill_own_runtime at a `--levels 1` chain with `--retries 1`
/// and `extra`: both tries lose their level, the second on a new one.
fn retried_after_a_lost_level(name: &str, extra: &[&str]) -> (Run, tempfile::TempDir) {
    let dir = run_dir(name);
    let out = vm_test(RELAY, &image_dir(), dir.path())
        .args([
            "--levels",
            "1",
            "--retries",
            "1",
            "--nocapture",
            "--ignored",
        ])
        .args(extra)
        .args(["--exact", "kill_own_runtime"])
        .output()
        .expect("start matryoshka");
    let run = Run::from(out);
    // The test kills its level's runtime on every try: both tries are lost levels.
    run.expect_code(101);
    let first = run.line_for("TRY 1 FAIL", "kill_own_runtime");
    assert!(first.contains("level L0/L1 lost"), "{first}");
    let last = run.line_for("FAIL", "kill_own_runtime (try 2 of 2)");
    assert!(last.contains("level L0/L1 lost"), "{last}");
    // The second try ran at a new level, not at the dead one.
    assert_eq!(
        run.stdout
            .matches("info L0/L1 kill_own_runtime | killing the runtime of L0/L1")
            .count(),
        2,
        "{}",
        run.stdout
    );
    assert_eq!(qemus_left(dir.path()), Vec::<String>::new());
    (run, dir)
}

#[test]
fn a_retry_after_a_lost_level_gets_a_freshly_booted_chain() {
    let (run, _dir) = retried_after_a_lost_level("runtime-dies-retried", &["--no-snapshot"]);
    assert!(!run.stderr.contains("saved L0/L1"), "{}", run.stderr);
}

#[test]
fn a_retry_after_a_lost_level_gets_a_restored_copy_of_the_chain() {
    let cache = run_dir("runtime-dies-cache");
    let cache = cache.path().to_str().expect("UTF-8");
    let (run, dir) = retried_after_a_lost_level("runtime-dies-restored", &["--cache-dir", cache]);
    // Kept bare, attached; the retry's copy restored from the kept state.
    assert!(run.stderr.contains(" bare in "), "{}", run.stderr);
    let journal =
        std::fs::read_to_string(dir.path().join("L0-L1.relay")).expect("the hop's journal");
    assert!(journal.contains(" restored from "), "{journal}");
}

/// `nested.wasm`'s kernel_backtrace at a `--levels 1` chain, with `extra` arguments.
fn kernel_backtrace(name: &str, extra: &[&str]) -> Run {
    let dir = run_dir(name);
    let mut args = vec![
        "--levels",
        "1",
        "--grant",
        "exec=sh",
        "--ignored",
        "kernel_backtrace",
    ];
    args.extend_from_slice(extra);
    let (run, _) = nested(dir.path(), &image_dir(), &args);
    assert_eq!(qemus_left(dir.path()), Vec::<String>::new());
    run
}

#[test]
fn a_kernel_backtrace_at_a_level_is_reported_with_the_level_and_the_test() {
    // The test passes; what its level's kernel printed is in its output, a warning
    // from that level.
    let run = kernel_backtrace("kernel", &[]);
    run.expect_code(0);
    assert!(
        run.stdout
            .lines()
            .any(|l| l.contains("warn L0/L1 kernel_backtrace | kernel: ")
                && l.contains("Call Trace:")),
        "{}",
        run.stdout
    );
    // With --fail-on-kernel-warnings the same test fails, naming the level's line.
    let run = kernel_backtrace("kernel-strict", &["--fail-on-kernel-warnings"]);
    run.expect_code(100);
    let line = run.line_for("FAIL", "kernel_backtrace");
    assert!(
        line.contains("kernel-warning: the test passed, but a kernel showed signs of trouble"),
        "{line}"
    );
}

#[test]
fn levels_runs_each_test_at_the_deepest_level() {
    let dir = run_dir("levels");
    let (run, _) = nested(dir.path(), &image_dir(), &["--levels", "1", "where_am_i"]);
    run.expect_code(0);
    let line = run.line_for("PASS", "where_am_i");
    assert!(line.contains("L0/L1 nested::where_am_i"), "{line}");
    run.expect_stdout("running at L0/L1 on level-1 (level=1 accel=");
    assert!(run.stderr.contains("L0/L1 is up"), "{}", run.stderr);
    assert_eq!(qemus_left(dir.path()), Vec::<String>::new());
}

#[test]
fn levels_two_runs_each_test_two_levels_down_through_the_serve_side_chain() {
    let dir = run_dir("levels2");
    // Every test of the suite, the demo's included: it counts levels from where it starts.
    let (run, took) = nested(dir.path(), &image_dir(), &["--levels", "2"]);
    eprintln!("--levels 2: {:.1} s", took.as_secs_f64());
    run.expect_code(0);
    let line = run.line_for("PASS", "where_am_i");
    assert!(line.contains("L0/L1/L2 nested::where_am_i"), "{line}");
    let line = run.line_for("PASS", "nested_levels");
    assert!(line.contains("L0/L1/L2 nested::nested_levels"), "{line}");
    // L1 booted L2 before it said Ready, and relays the test's log up from L2.
    run.expect_stdout("running at L0/L1/L2 on level-2 (level=2 accel=");
    assert!(run.stderr.contains("L0/L1/L2 is up"), "{}", run.stderr);
    assert_eq!(qemus_left(dir.path()), Vec::<String>::new());
}

#[test]
fn the_accelerator_chosen_once_is_remembered() {
    let cache = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("cache");
    let kvm_opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let mut reasons = Vec::new();
    for round in ["first", "second"] {
        let dir = run_dir(&format!("accel-{round}"));
        let cache_arg = cache.path().display().to_string();
        let (run, _) = nested(
            dir.path(),
            &image_dir(),
            &["--cache-dir", &cache_arg, "--env", "NESTED_LEVELS=1"],
        );
        run.expect_code(0);
        let line = run
            .stdout
            .lines()
            .find(|l| l.contains("L0/L1 booted with "))
            .unwrap_or_else(|| panic!("no boot line for L1:\n{}", run.stdout))
            .to_string();
        reasons.push(line);
        assert_eq!(qemus_left(dir.path()), Vec::<String>::new());
    }
    let remembered: Vec<_> = std::fs::read_dir(cache.path().join("accel"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    if kvm_opens {
        // The first boot probed KVM; the second took the answer from the cache.
        assert!(
            reasons[0].contains("auto: KVM boots here")
                || reasons[0].contains("auto: KVM does not work at the parent level"),
            "{}",
            reasons[0]
        );
        assert!(
            reasons[1].contains("auto: KVM worked before")
                || reasons[1].contains("auto: KVM failed here earlier"),
            "{}",
            reasons[1]
        );
        assert_eq!(remembered.len(), 1, "{remembered:?}");
    } else {
        // Nothing to probe, nothing remembered.
        for reason in &reasons {
            assert!(reason.contains("auto: no usable /dev/kvm"), "{reason}");
        }
        assert!(remembered.is_empty(), "{remembered:?}");
    }
}
