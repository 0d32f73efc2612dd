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
use matryoshka_test_programs::{NESTED, RELAY};

fn image_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/images/x86_64");
    assert!(
        dir.join("root.img").exists(),
        "no image at {}: build it with `./x image` (images/build.sh) before the VM tests",
        dir.display()
    );
    dir
}

/// A run folder of its own, so its QEMU processes can be found by their console path.
fn run_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("vm-{name}."))
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("run dir")
}

fn nested(run_dir: &Path, image: &Path, extra: &[&str]) -> (Run, Duration) {
    let started = Instant::now();
    let out = common::bin()
        .args(["test", NESTED, "--nocapture", "--image-dir"])
        .arg(image)
        .arg("--run-dir")
        .arg(run_dir)
        .args(["--env"])
        .arg(format!("NESTED_ROOT={}", image.join("root.img").display()))
        .args(extra)
        .output()
        .expect("start matryoshka");
    (Run::from(out), started.elapsed())
}

/// QEMU processes whose command line names `run_dir`, after giving them a moment to go.
fn qemus_left(run_dir: &Path) -> Vec<String> {
    let needle = run_dir.display().to_string();
    let mut left = Vec::new();
    for _ in 0..50 {
        let out = Command::new("pgrep")
            .args(["-a", "-f", &needle])
            .output()
            .expect("pgrep");
        left = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("qemu-system"))
            .map(str::to_string)
            .collect();
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    left
}

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

#[track_caller]
fn expect_infrastructure_error(run: &Run, needles: &[&str]) {
    run.expect_code(101);
    let line = run.line_for("FAIL", "nested_levels");
    assert!(line.contains("L0 nested::nested_levels"), "{line}");
    for needle in needles {
        run.expect_stdout(needle);
    }
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

/// A boot the level refused before starting QEMU: the test fails (not the
/// infrastructure) with an error of `kind` at L0/L1.
#[track_caller]
fn expect_refusal(run: &Run, kind: &str, needles: &[&str]) {
    run.expect_code(100);
    let line = run.line_for("FAIL", "nested_levels");
    assert!(
        line.contains(&format!("error: Error: {kind} at L0/L1: ")),
        "{line}"
    );
    for needle in needles {
        run.expect_stdout(needle);
    }
}

/// An image folder whose initramfs and root are the real ones and whose kernel is `kernel`.
fn image_with_kernel(dir: &Path, kernel: &[u8]) -> PathBuf {
    let real = image_dir();
    let image = dir.join("image");
    std::fs::create_dir_all(&image).expect("image dir");
    for f in ["initrd", "root.img"] {
        std::os::unix::fs::symlink(real.join(f), image.join(f)).expect("symlink");
    }
    std::fs::write(image.join("kernel"), kernel).expect("kernel");
    image
}

#[test]
fn more_memory_than_the_level_has_is_refused_before_qemu_starts() {
    let dir = run_dir("too-much-memory");
    let (run, _) = nested(
        dir.path(),
        &image_dir(),
        &[
            "--env",
            "NESTED_LEVELS=1",
            "--env",
            "NESTED_MEMORY_MIB=100000000",
        ],
    );
    expect_refusal(
        &run,
        "invalid-argument",
        &[
            "vm-spec.memory-mib = 100000000 for L0/L1 is more than L0 can give: it has ",
            "so the limit is ",
        ],
    );
    // Refused before QEMU started: it wrote no log.
    assert!(!dir.path().join("L0-L1.qemu.log").exists());
}

#[test]
fn an_image_folder_outside_the_run_and_its_grants_is_refused() {
    let dir = run_dir("image-grant");
    let granted = dir.path().join("granted");
    let other = granted.join("other-image");
    std::fs::create_dir_all(&other).expect("image dir");
    let other = other.canonicalize().expect("canonical");
    let image_env = format!("NESTED_IMAGE={}", other.display());
    let (run, _) = nested(
        dir.path(),
        &image_dir(),
        &["--env", "NESTED_LEVELS=1", "--env", &image_env],
    );
    expect_refusal(
        &run,
        "denied",
        &[
            &format!("vm-spec.image `{}`", other.display()),
            "is neither the run's image folder",
            &format!("add --grant image={}", other.display()),
        ],
    );
    assert!(!dir.path().join("L0-L1.qemu.log").exists());
    // Granted through a parent folder, it passes the check and is booted from:
    // this empty folder has no kernel.
    let grant = format!("image={}", granted.display());
    let (run, _) = nested(
        dir.path(),
        &image_dir(),
        &[
            "--env",
            "NESTED_LEVELS=1",
            "--env",
            &image_env,
            "--grant",
            &grant,
        ],
    );
    expect_infrastructure_error(&run, &[&format!("no kernel at {}/kernel", other.display())]);
}

/// The QEMU processes whose command line names `dir`: pid and argv.
fn qemu_cmdlines(dir: &Path) -> Vec<(u32, Vec<String>)> {
    let out = Command::new("pgrep")
        .args(["-f", &dir.display().to_string()])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse::<u32>().ok())
        .filter_map(|pid| {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let argv: Vec<String> = raw
                .split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            argv.first()?.contains("qemu-system").then_some((pid, argv))
        })
        .collect()
}

/// The second word after `marker` on the first line holding it: the base64 of
/// an `ssh-ed25519 AAAA…` key.
fn key_after<'a>(text: &'a str, marker: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.split(marker).nth(1))
        .and_then(|rest| rest.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("no {marker:?} in:\n{text}"))
}

#[test]
fn a_level_cannot_reach_its_parent_and_its_host_key_stays_off_command_lines() {
    let dir = run_dir("sealed");
    // A listener on L0's loopback: L1 reaches it as 10.0.2.2 unless the user
    // network is restricted.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    listener.set_nonblocking(true).expect("non-blocking");
    let port = listener.local_addr().expect("address").port();
    let (stdout, stderr) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = common::bin()
        .args(["-v", "test", NESTED, "--nocapture", "--ignored", "--exact"])
        .args(["sealed_level", "--grant", "exec=timeout,ssh-keyscan"])
        .arg("--env")
        .arg(format!("NESTED_PARENT_PORT={port}"))
        .arg("--image-dir")
        .arg(image_dir())
        .arg("--run-dir")
        .arg(dir.path())
        .stdout(std::fs::File::create(&stdout).expect("stdout file"))
        .stderr(std::fs::File::create(&stderr).expect("stderr file"))
        .spawn()
        .expect("start matryoshka");
    // QEMU's command line as the machine shows it to every local user.
    let mut seen = std::collections::BTreeMap::new();
    let status = loop {
        for (pid, argv) in qemu_cmdlines(dir.path()) {
            seen.insert(pid, argv);
        }
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let run = Run {
        code: status.code(),
        stdout: std::fs::read_to_string(&stdout).expect("stdout"),
        stderr: std::fs::read_to_string(&stderr).expect("stderr"),
    };
    run.expect_code(0);
    run.line_for("PASS", "sealed_level");
    // The attempt from L1 failed, and nothing reached the listener.
    run.expect_stdout(&format!("L0/L1: connection to 10.0.2.2:{port} failed"));
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("L1 reached L0's 127.0.0.1:{port}: {other:?}"),
    }
    // The sshd behind the forwarded port presents the key L0 made for L1.
    let made = key_after(&run.stderr, "host key: ");
    let presented = key_after(&run.stdout, "sshd host key ");
    assert_eq!(presented, made, "L1's sshd does not use the key L0 made");
    // That key is on no command line and in no log: only its public half is.
    assert!(!seen.is_empty(), "no QEMU process was seen");
    // This machine's QEMU takes the seccomp filter.
    assert!(!run.stderr.contains("refused -sandbox"), "{}", run.stderr);
    for argv in seen.values() {
        let line = argv.join(" ");
        assert!(
            line.contains("restrict=on,hostfwd=tcp:127.0.0.1:"),
            "{line}"
        );
        assert!(line.contains("matryoshka.hostkey=fw_cfg"), "{line}");
        assert!(
            line.contains(" -fw_cfg name=opt/org.matryoshka/hostkey,file="),
            "{line}"
        );
        assert!(line.contains(" -sandbox on,obsolete=deny,"), "{line}");
    }
    let booting = run
        .stderr
        .lines()
        .find(|l| l.contains("booting: "))
        .unwrap_or_else(|| panic!("no `booting:` line in:\n{}", run.stderr));
    assert!(booting.contains(" -fw_cfg "), "{booting}");
    // "-----BEGIN OPENSSH" in base64, as the key was once handed over.
    let secrets = ["PRIVATE KEY", "LS0tLS1CRUdJTiBPUEVOU1NI"];
    for (what, text) in [
        (
            "QEMU's command line",
            seen.values()
                .flatten()
                .cloned()
                .collect::<Vec<_>>()
                .join(" "),
        ),
        ("stdout", run.stdout.clone()),
        ("stderr", run.stderr.clone()),
    ] {
        for secret in secrets {
            assert!(!text.contains(secret), "{secret:?} in {what}:\n{text}");
        }
    }
    // The file QEMU read the key from is gone.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("run dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".hostkey"))
        .collect();
    assert_eq!(left, Vec::<String>::new());
    assert_eq!(qemus_left(dir.path()), Vec::<String>::new());
}

#[test]
fn a_qemu_that_refuses_the_sandbox_boots_the_level_without_it() {
    let dir = run_dir("no-sandbox");
    // A QEMU built without seccomp, as far as -sandbox goes: the real one otherwise.
    let real = Command::new("sh")
        .args(["-c", "command -v qemu-system-x86_64"])
        .output()
        .expect("sh");
    let real = String::from_utf8_lossy(&real.stdout).trim().to_string();
    assert!(!real.is_empty(), "no qemu-system-x86_64 on PATH");
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    let wrapper = bin.join("qemu-system-x86_64");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \" $* \" in *\" -sandbox \"*)\n\
             echo \"qemu-system-x86_64: -sandbox support is not enabled in this QEMU binary\" >&2\n\
             exit 1 ;;\nesac\nexec {real} \"$@\"\n"
        ),
    )
    .expect("wrapper");
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = common::bin()
        .env("PATH", path)
        .args(["-v", "test", NESTED, "--levels", "1", "where_am_i"])
        .arg("--image-dir")
        .arg(image_dir())
        .arg("--run-dir")
        .arg(dir.path())
        .output()
        .expect("start matryoshka");
    let run = Run::from(out);
    run.expect_code(0);
    assert!(
        run.line_for("PASS", "where_am_i")
            .contains("L0/L1 nested::where_am_i")
    );
    assert!(
        run.stderr
            .contains("refused -sandbox (qemu-system-x86_64: -sandbox support is not enabled"),
        "{}",
        run.stderr
    );
    // Started once with the filter, which it refused, then without.
    let boots: Vec<bool> = run
        .stderr
        .lines()
        .filter(|l| l.contains("booting: "))
        .map(|l| l.contains(" -sandbox "))
        .collect();
    assert_eq!(boots.first(), Some(&true), "{}", run.stderr);
    assert_eq!(boots.last(), Some(&false), "{}", run.stderr);
    assert_eq!(qemus_left(dir.path()), Vec::<String>::new());
}

/// Starts the demo to L1 and returns once its QEMU has written to the console.
fn start_booting(dir: &Path) -> std::process::Child {
    let child = common::bin()
        .args(["test", NESTED, "--env", "NESTED_LEVELS=1", "--accel", "tcg"])
        .arg("--image-dir")
        .arg(image_dir())
        .arg("--run-dir")
        .arg(dir)
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
    let started = Instant::now();
    let out = common::bin()
        .args(["test", RELAY, "--levels", "1", "--nocapture", "--ignored"])
        .args(["--exact", "kill_own_runtime", "--image-dir"])
        .arg(image_dir())
        .arg("--run-dir")
        .arg(dir.path())
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
    // Well within the 60 s a silent level with a live QEMU would be given.
    assert!(
        started.elapsed() < Duration::from_secs(45),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(qemus_left(dir.path()), Vec::<String>::new());
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
