//! Getting into a chain after a test failed at it (`--keep-failed`), with a real
//! QEMU, a real sshd at each level and the OpenSSH client here.
//!
//! Needs the image (`./x image`) and `ssh` on PATH.

#[allow(dead_code, reason = "shared by several test crates, each using a part")]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::vm::{Timeline, image_dir, qemus_left, run_dir, vm_test};
use matryoshka_test_programs::CI;

/// Runs `command` through `sh -c` with `stdin`, and returns its stdout, or panics
/// with its stderr when it fails or takes over 2 minutes.
fn shell(command: &str, stdin: &str) -> String {
    let mut child = Command::new("sh")
        .args(["-c", command])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sh");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let started = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("`{command}` took over 2 minutes");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "`{command}` failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `shell(command)`, tried again for up to a minute while it fails: a level's
/// sshd starts beside its runtime (niced), so it may still be starting when a
/// test fails moments after the chain came up.
fn shell_when_up(command: &str) -> String {
    let started = Instant::now();
    loop {
        let out = Command::new("sh")
            .args(["-c", command])
            .stdin(Stdio::null())
            .output()
            .expect("sh");
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "`{command}` failed for a minute ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// The command printed for `level` in a KEPT block: the rest of the line after
/// the level path (`      L0/L1/L2  ssh -F '…' L2`).
fn command_for<'a>(block: &'a [String], level: &str, monitor: bool) -> &'a str {
    let at = block
        .iter()
        .position(|l| l.trim_start().starts_with(&format!("{level}  ")))
        .unwrap_or_else(|| panic!("no line for {level} in {block:#?}"));
    if !monitor {
        return block[at].trim_start()[level.len()..].trim();
    }
    block[at + 1]
        .trim()
        .strip_prefix("monitor: ")
        .unwrap_or_else(|| panic!("no monitor line after {level} in {block:#?}"))
}

#[test]
fn a_test_failing_at_l2_keeps_the_chain_up_and_the_printed_commands_get_in() {
    let dir = run_dir("keep-failed");
    // A cache of its own: the chain is booted (bare) in this run, so the run
    // folder has every level's boot; the failing test runs on a restored copy.
    let cache = run_dir("keep-failed-cache");
    let mut child = vm_test(CI, &image_dir(), dir.path())
        .arg("--cache-dir")
        .arg(cache.path())
        // --retries 1: a chain lost while booting (nested SVM under TCG, now and
        // then) is booted again; the failing test then fails twice, held each time.
        .args([
            "--levels",
            "2",
            "--keep-failed-for",
            "60s",
            "--retries",
            "1",
        ])
        .args(["--exact", "adds_up", "fails_on_purpose"])
        // A line on stdin ends a hold once the commands were tried.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start matryoshka");
    // Lines as they come: the commands are used while matryoshka holds the chain.
    let (tx, lines) = mpsc::channel::<String>();
    let stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut block = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match lines.recv_timeout(left) {
            Ok(line) => line,
            Err(e) => {
                let _ = child.kill();
                let errors = errors.join().unwrap_or_default();
                panic!("no KEPT block ({e}); so far: {block:#?}; stderr:\n{errors}");
            }
        };
        if line.contains("KEPT the chain up") || !block.is_empty() {
            block.push(line.clone());
        }
        if line.contains("going on in") {
            break;
        }
    }
    assert!(
        block[0].contains("after L0/L1/L2 ci::fails_on_purpose failed"),
        "{block:#?}"
    );
    assert!(
        block
            .last()
            .is_some_and(|l| l.contains("going on in 1m or after a line on stdin;")),
        "{block:#?}"
    );
    // A shell at L2, through L1, with the host keys pinned.
    let l2 = command_for(&block, "L0/L1/L2", false);
    assert!(l2.starts_with("ssh -F '") && l2.ends_with(" L2"), "{l2}");
    let config = dir.path().join("ssh_config");
    let text = std::fs::read_to_string(&config).expect("ssh_config in the run folder");
    assert!(text.contains("StrictHostKeyChecking yes"), "{text}");
    assert!(!text.contains("StrictHostKeyChecking no"), "{text}");
    assert!(text.contains("ProxyJump L1"), "{text}");
    assert_eq!(shell_when_up(&format!("{l2} hostname")).trim(), "level-2");
    let l1 = command_for(&block, "L0/L1", false);
    assert_eq!(shell_when_up(&format!("{l1} hostname")).trim(), "level-1");
    // Each level's QEMU monitor: L1's here, L2's at L1.
    for level in ["L0/L1", "L0/L1/L2"] {
        let monitor = command_for(&block, level, true);
        let said = shell(monitor, "info status\n");
        assert!(said.contains("VM status: running"), "{level}: {said}");
    }
    // A host key that is not the pinned one is refused, not learnt.
    let hosts = dir.path().join("known_hosts");
    let pinned = std::fs::read_to_string(&hosts).expect("known_hosts");
    let wrong = pinned.replacen("matryoshka-L0-L1-L2 ", "matryoshka-L0-L1-L2-not ", 1);
    std::fs::write(&hosts, wrong).expect("rewrite known_hosts");
    let refused = Command::new("sh")
        .args([
            "-c",
            &format!("{} true", l2.replacen("ssh ", "ssh -o BatchMode=yes ", 1)),
        ])
        .output()
        .expect("sh");
    assert!(!refused.status.success(), "an unpinned key was accepted");
    std::fs::write(&hosts, pinned).expect("restore known_hosts");

    // A line on stdin ends the hold (and the retry's, when the chain was booted
    // again); the run goes on and ends as usual.
    let mut stdin = child.stdin.take().expect("stdin");
    let release = |stdin: &mut std::process::ChildStdin| {
        std::io::Write::write_all(stdin, b"\n").expect("write a line to matryoshka's stdin");
    };
    release(&mut stdin);
    let released = Instant::now();
    let mut next_line_after = None;
    let mut rest = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                next_line_after.get_or_insert_with(|| released.elapsed());
                if line.contains("going on in") {
                    release(&mut stdin);
                }
                rest.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!("matryoshka did not end; so far: {rest:#?}");
            }
        }
    }
    let status = child.wait().expect("wait");
    reader.join().expect("reader");
    let _ = errors.join();
    // Released, not timed out: the run went on well before the 60 s were up.
    let waited = next_line_after.expect("output after the hold");
    assert!(waited < Duration::from_secs(30), "{waited:?}: {rest:#?}");
    assert_eq!(status.code(), Some(100), "{rest:#?}");
    assert!(
        rest.iter().any(|l| l.contains("1 passed, 1 failed")),
        "{rest:#?}"
    );
    assert_eq!(qemus_left(dir.path()), Vec::<String>::new());
    // Before the chain went down, each level's kernel log came up, and so did
    // the files L1 kept of L2 (in a temporary folder, gone with L1).
    for (file, needle) in [
        ("L0-L1.dmesg", "] Linux version "),
        ("L0-L1-L2.dmesg", "] Linux version "),
        ("L0-L1-L2.console", "MATRYOSHKA-BOOT"),
        ("L0-L1-L2.log", "MATRYOSHKA-READY level=2"),
        ("L0-L1-L2.qemu.log", ""),
        // Each hop's journal: L0's of L1, and L1's of L2 brought up (L1 was
        // booted bare, so its journal of L2 names no component).
        ("L0-L1.relay", "→ attach of component "),
        ("L0-L1.relay", "→ test `fails_on_purpose` #"),
        ("L0-L1-L2.relay", "← Ready (0 levels below)"),
        ("L0-L1-L2.relay", "→ test `fails_on_purpose` #"),
    ] {
        let text = std::fs::read_to_string(dir.path().join(file))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(text.contains(needle), "{file}: {text}");
    }
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("report.json")).expect("report.json"),
    )
    .expect("JSON");
    let levels = report["levels"].as_array().expect("levels");
    assert_eq!(levels.len(), 2, "{levels:?}");
    assert_eq!(levels[1]["path"], "L0/L1/L2");
    assert_eq!(levels[1]["dmesg"], "L0-L1-L2.dmesg");
    assert_eq!(levels[1]["console"], "L0-L1-L2.console");
    assert_eq!(levels[1]["relay"], "L0-L1-L2.relay");
    assert!(
        report["ssh_config"]
            .as_str()
            .is_some_and(|c| c.ends_with("/ssh_config"))
    );
    // The timeline, rendered by a real browser: the chain's boot on L0's lane,
    // each level's boot steps (L2's from the log L1 kept), the failing test on
    // L2's lane and forwarded through L0 and L1, the failure marked, the hold.
    let timeline = Timeline::render(dir.path(), &dir.path().join("timeline.png"));
    assert!(timeline.lane("L0").contains("class=\"event booting\""));
    for level in ["L0/L1", "L0/L1/L2"] {
        let lane = timeline.lane(level);
        assert!(
            lane.contains("<title>boot: runtime started ("),
            "{level}: {lane}"
        );
        assert!(lane.contains("class=\"event kept\""), "{level}: {lane}");
        assert!(lane.contains("class=\"event relay\""), "{level}: {lane}");
    }
    let l2 = timeline.lane("L0/L1/L2");
    assert!(
        l2.contains("class=\"event test fail\" data-test=\"ci::fails_on_purpose\""),
        "{l2}"
    );
    assert!(l2.contains("class=\"event test pass\" data-test=\"ci::adds_up\""));
    assert!(
        timeline
            .lane("L0")
            .contains("class=\"event test forward\" data-test=\"ci::fails_on_purpose\"")
    );
    assert!(timeline.dom.contains("id=\"first-failure\""));
    let sockets: Vec<_> = std::fs::read_dir(dir.path())
        .expect("run folder")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".monitor"))
        .collect();
    assert!(sockets.is_empty(), "monitor sockets left: {sockets:?}");
}
