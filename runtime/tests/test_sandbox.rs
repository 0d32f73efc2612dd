//! Hostile suites against the real runtime: endless chains, hoarded levels,
//! forged infrastructure errors, commands that linger, and child levels that
//! lie about where their events come from or flood their parent.

#[allow(dead_code, reason = "shared by several test crates, each using a part")]
mod common;

use std::time::{Duration, Instant};

use common::{Run, assert_nothing_left, bin, unique_tag};
use matryoshka_test_programs::{RELAY, SANDBOX};

/// Runs the sandbox suite with `extra`, in a temporary folder of its own that
/// must be empty again when the run ends.
fn sandbox(tag: &str, extra: &[&str]) -> Run {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("TMPDIR");
    let out = bin()
        .env("TMPDIR", tmp.path())
        .env("MATRYOSHKA_TEST_TAG", tag)
        .env("MATRYOSHKA_SECRET", "must not reach commands")
        .args(["test", SANDBOX, "--grant", "nest", "--grant", "exec=env,sh"])
        .args(extra)
        .output()
        .expect("start matryoshka");
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .expect("TMPDIR")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "temporary files left behind: {left:?}");
    Run::from(out)
}

#[test]
fn the_sandbox_holds_under_small_caps() {
    let tag = unique_tag("sandbox");
    let secs = 900 + std::process::id() % 97;
    let sleep = format!("SLEEP_SECS={secs}");
    let r = sandbox(
        &tag,
        &[
            "--max-depth",
            "3",
            "--max-levels",
            "4",
            "--env",
            "MAX_LEVELS=4",
            "--env",
            &sleep,
            "--nocapture",
            "-j",
            "1",
        ],
    );
    r.expect_code(0);
    r.expect_stdout("5 passed, 0 failed, 1 ignored");
    r.expect_stdout(
        "stopped at L0/L1/L2/L3: cannot open L0/L1/L2/L3/L4: it would be level 4, deeper than \
         --max-depth 3 allows; raise it with --max-depth N",
    );
    r.expect_stdout("held 4 levels, refused the next, and got them all back");
    r.expect_stdout(&format!("left sleep {secs} running as pid"));
    // Every runtime of the chains, and the command the test left running, are gone.
    assert_nothing_left(&tag, Some(&format!("sleep {secs}")));
}

#[test]
fn an_endless_chain_stops_at_the_default_depth() {
    let tag = unique_tag("endless");
    let started = Instant::now();
    let r = sandbox(
        &tag,
        &[
            "--exact",
            "an_endless_local_chain_is_denied_at_max_depth",
            "--nocapture",
        ],
    );
    r.expect_code(0);
    r.expect_stdout("deeper than --max-depth 6 allows");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    assert_nothing_left(&tag, None);
}

#[test]
fn a_forged_level_lost_is_a_test_failure() {
    let tag = unique_tag("forged");
    let r = sandbox(
        &tag,
        &["--ignored", "--exact", "fails_with_a_forged_level_lost"],
    );
    r.expect_code(100);
    let line = r.line_for("FAIL", "fails_with_a_forged_level_lost");
    assert!(
        line.contains(
            "`forge_level_lost` at L0/L1 returned an error of kind level-lost while no level was \
             lost: level L0/L1/L9 lost: made up by the component"
        ),
        "{line}"
    );
    assert!(!line.contains("infrastructure"), "{line}");
    assert_nothing_left(&tag, None);
}

/// Runs `test` of the relay suite over one local level whose runtime misbehaves
/// as `inject` says; returns the run and L0's peak RSS in KiB.
fn with_injected(tag: &str, inject: &str, test: &str) -> (Run, u64) {
    let serve = format!(
        "{} serve --stdio --inject {inject}",
        env!("CARGO_BIN_EXE_matryoshka")
    );
    let mut child = bin()
        .env("MATRYOSHKA_TEST_TAG", tag)
        .env("MATRYOSHKA_LOCAL_SERVE", serve)
        .args([
            "test",
            RELAY,
            "--env",
            "MATRYOSHKA_CHAIN=local",
            "--env",
            "HOLD_MS=5000",
            "--include-ignored",
            "--exact",
            test,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start matryoshka");
    let status = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0;
    let reader = {
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            let mut out = String::new();
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(&mut { stdout }, &mut out);
            let _ = std::io::Read::read_to_string(&mut { stderr }, &mut err);
            (out, err)
        })
    };
    let code = loop {
        if let Ok(text) = std::fs::read_to_string(&status)
            && let Some(kib) = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        {
            peak_kib = peak_kib.max(kib);
        }
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (stdout, stderr) = reader.join().expect("reader");
    (
        Run {
            code,
            stdout,
            stderr,
        },
        peak_kib,
    )
}

#[test]
fn a_level_speaking_for_its_parent_is_lost() {
    let tag = unique_tag("foreign");
    let (r, _) = with_injected(&tag, "foreign-event", "reaches_every_level");
    r.expect_code(101);
    let line = r.line_for("FAIL", "reaches_every_level");
    assert!(
        line.contains(
            "level L0/L1 lost: it sent an event as \"L0\", outside its own levels (L0/L1/...)"
        ),
        "{line}"
    );
    assert!(
        !r.stdout.contains("written in the parent's name"),
        "{}",
        r.stdout
    );
    assert_nothing_left(&tag, None);
}

#[test]
fn a_flooding_level_costs_its_parent_no_more_than_the_output_budget() {
    let tag = unique_tag("flood");
    // The bottom level holds for 5 s while its runtime floods.
    let (r, peak_kib) = with_injected(&tag, "event-flood", "hold_at_the_bottom");
    r.expect_code(100);
    let line = r.line_for("FAIL", "hold_at_the_bottom");
    assert!(line.contains("output-limit"), "{line}");
    // 256 MiB were sent; L0 keeps at most the 4 MiB budget of the test.
    assert!(
        peak_kib < 160 << 10,
        "L0 grew to {} MiB while its child flooded it",
        peak_kib >> 10
    );
    eprintln!("L0 peak RSS during a 256 MiB flood: {} MiB", peak_kib >> 10);
    assert_nothing_left(&tag, None);
}

#[test]
fn a_granted_folder_missing_at_a_level_is_not_a_lost_level() {
    let tag = unique_tag("nofolder");
    let missing = format!("/nonexistent-{tag}");
    let grant = format!("fs={missing}");
    let out = bin()
        .env("MATRYOSHKA_TEST_TAG", &tag)
        .args([
            "test",
            RELAY,
            "--env",
            "MATRYOSHKA_CHAIN=local",
            "--grant",
            &grant,
            "--nocapture",
            "--exact",
            "reaches_every_level",
        ])
        .output()
        .expect("start matryoshka");
    let r = Run::from(out);
    r.expect_code(0);
    for level in ["L0", "L0/L1"] {
        r.expect_stdout(&format!(
            "the granted folder {missing} is not available at {level} ("
        ));
    }
    assert_nothing_left(&tag, None);
}
