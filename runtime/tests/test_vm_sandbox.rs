//! VM levels against a hostile suite, with a real QEMU: what a level may reach,
//! which images it may boot, what it may ask for, what its command line shows,
//! and how deep a chain of VM boots may go.
//!
//! Needs the image (`./x image`); see `test_vm.rs` for the runtime it copies.

#[allow(dead_code, reason = "shared by several test crates, each using a part")]
mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::Run;
use common::vm::{expect_infrastructure_error, image_dir, nested, qemus_left, run_dir, vm_test};
use matryoshka_test_programs::NESTED;

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
    let mut child = vm_test(NESTED, &image_dir(), dir.path())
        .args(["-v", "--nocapture", "--ignored", "--exact"])
        .args(["sealed_level", "--grant", "exec=timeout,ssh-keyscan"])
        .arg("--env")
        .arg(format!("NESTED_PARENT_PORT={port}"))
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
    let out = vm_test(NESTED, &image_dir(), dir.path())
        .env("PATH", path)
        .args(["-v", "--levels", "1", "where_am_i"])
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

#[test]
fn an_endless_chain_of_vm_boots_stops_at_max_depth() {
    let image = image_dir();
    let dir = run_dir("max-depth");
    // The nested suite boots a level below every level it reaches, up to NESTED_LEVELS.
    let (run, took) = nested(
        dir.path(),
        &image,
        &["--env", "NESTED_LEVELS=99", "--max-depth", "1"],
    );
    eprintln!("stopped after {:.1} s", took.as_secs_f64());
    run.expect_code(100);
    run.line_for("FAIL", "nested_levels");
    run.expect_stdout(
        "cannot open L0/L1/L2: it would be level 2, deeper than --max-depth 1 allows; raise it \
         with --max-depth N",
    );
    assert!(!run.stdout.contains("L0/L1/L2 booted"), "{}", run.stdout);
    assert_eq!(qemus_left(dir.path()), Vec::<String>::new());
}
