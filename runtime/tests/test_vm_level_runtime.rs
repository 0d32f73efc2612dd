//! The level runtime: the build without a compiler that `./x runtime` puts in
//! `target/runtimes/x86_64` for the levels below L0. Reached over SSH through real
//! sshd servers on loopback, it runs the artifact its parent compiled, hands it on
//! to the level below, and says what to do when there is none.
//!
//! Needs `$MATRYOSHKA_RUNTIME_DIR` with the level runtime (`./x vm` and `./x test`
//! build it and set it); run with the VM tier for that reason, though no VM boots.

#[allow(dead_code, reason = "shared by several test crates, each using a part")]
mod common;

use std::path::PathBuf;

use common::{Run, SshChain, assert_nothing_left, bin, runtimes_in, unique_tag};
use matryoshka_test_programs::RELAY;

/// The level runtime of this architecture in `$MATRYOSHKA_RUNTIME_DIR`.
fn level_runtime() -> PathBuf {
    let dir = std::env::var_os("MATRYOSHKA_RUNTIME_DIR").expect(
        "MATRYOSHKA_RUNTIME_DIR is not set: run `./x runtime` and point it at target/runtimes",
    );
    let path = PathBuf::from(dir)
        .join(std::env::consts::ARCH)
        .join("matryoshka");
    assert!(
        path.exists(),
        "{} is missing: run `./x runtime`",
        path.display()
    );
    path
}

/// Runs the relay suite's `reaches_every_level` through `chain`.
fn reach(chain: &SshChain, tag: &str, extra: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = bin();
    for (key, value) in env {
        cmd.env(key, value);
    }
    let out = cmd
        .env("MATRYOSHKA_TEST_TAG", tag)
        .env(
            "MATRYOSHKA_RUNTIME_DIR",
            level_runtime()
                .parent()
                .and_then(|p| p.parent())
                .expect("runtime dir"),
        )
        .args(["-v", "test", RELAY, "--env"])
        .arg(format!("MATRYOSHKA_CHAIN={}", chain.chain()))
        .args(chain.args())
        .args(extra)
        .args(["--nocapture", "--exact", "reaches_every_level"])
        .output()
        .expect("start matryoshka");
    Run::from(out)
}

#[test]
fn the_level_runtime_runs_the_artifact_its_parent_compiled_two_hops_down() {
    let runtime = level_runtime();
    let sha = matryoshka::engine::sha256_hex(&std::fs::read(&runtime).expect("read runtime"));
    let chain = SshChain::new(2);
    let tag = unique_tag("lean");
    let r = reach(&chain, &tag, &[], &[]);
    r.expect_code(0);
    r.line_for("PASS", "reaches_every_level");
    r.expect_stdout("reached L0/L1/L2");
    // Both levels got the level runtime, and neither compiled: L1 loaded the
    // artifact L0 made, L2 the one L1 handed on under the key it adopted.
    for depth in [1, 2] {
        assert_eq!(
            runtimes_in(&chain.cache(depth)),
            vec![format!("matryoshka-{sha}")],
            "L{depth}"
        );
    }
    for level in ["level=L0/L1 ", "level=L0/L1/L2 "] {
        assert!(
            r.stderr
                .lines()
                .any(|l| l.contains("component loaded (Cached)") && l.contains(level)),
            "{level}: {}",
            r.stderr
        );
    }
    assert_nothing_left(&tag, Some(&chain.caches.path().display().to_string()));
    // Again: each level has the component and its artifact, and a fresh level
    // runtime process finds the artifact's key in its cache without asking.
    let tag = unique_tag("lean");
    let r = reach(&chain, &tag, &[], &[]);
    r.expect_code(0);
    r.expect_stdout("reached L0/L1/L2");
    for level in ["level=L0/L1 ", "level=L0/L1/L2 "] {
        for wanted in ["was cached here", "component loaded (Cached)"] {
            assert!(
                r.stderr
                    .lines()
                    .any(|l| l.contains(wanted) && l.contains(level)),
                "{level} {wanted}: {}",
                r.stderr
            );
        }
    }
    assert_nothing_left(&tag, Some(&chain.caches.path().display().to_string()));
    // An artifact under another key, newer, in L1's cache (an older build's, or
    // another architecture's): skipped, since it does not load; the key that
    // does is found and adopted.
    let sha = component_sha(&r.stderr);
    let stale = chain.cache(1).join("ffffffffffffffff");
    std::fs::create_dir(&stale).expect("stale key folder");
    std::fs::write(stale.join(format!("{sha}.cwasm")), b"not an artifact").expect("plant");
    let tag = unique_tag("lean");
    let r = reach(&chain, &tag, &[], &[]);
    r.expect_code(0);
    r.expect_stdout("reached L0/L1/L2");
    assert!(
        r.stderr
            .lines()
            .any(|l| l.contains("component loaded (Cached)") && l.contains("level=L0/L1 ")),
        "{}",
        r.stderr
    );
}

/// The component's sha256 from L0's `component loaded` line.
fn component_sha(stderr: &str) -> String {
    stderr
        .lines()
        .find_map(|l| l.split("sha256=").nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| panic!("no sha256= in:\n{stderr}"))
}

#[test]
fn a_level_runtime_without_an_artifact_says_it_has_no_compiler() {
    level_runtime();
    let chain = SshChain::new(1);
    let tag = unique_tag("leanless");
    // No cache at L0, so no artifact of its own to hand down, and no compiling for
    // the level: L1 has nothing it can run.
    let r = reach(
        &chain,
        &tag,
        &["--no-cache"],
        &[("MATRYOSHKA_CROSS_COMPILE", "0")],
    );
    r.expect_code(101);
    r.expect_stdout("this runtime has no compiler");
    r.expect_stdout("no compiled artifact of it was handed down");
    r.expect_stdout("do not set MATRYOSHKA_CROSS_COMPILE=0");
    assert_nothing_left(&tag, Some(&chain.caches.path().display().to_string()));
    // L1 kept the component's bytes from the failed run, but no artifact.
    let sha = component_sha(&r.stderr);
    let kept = chain
        .cache(1)
        .join("components")
        .join(format!("{sha}.wasm"));
    assert!(kept.exists(), "{}", kept.display());
    // Without MATRYOSHKA_CROSS_COMPILE=0, L0 compiles the level's artifact though
    // it keeps none of its own; L1 asks for the component again to get it.
    let r = reach(&chain, &unique_tag("leanless"), &["--no-cache"], &[]);
    r.expect_code(0);
    r.expect_stdout("reached L0/L1");
    let l1 = |wanted: &str| {
        r.stderr
            .lines()
            .any(|l| l.contains(wanted) && l.contains("level=L0/L1 "))
    };
    assert!(!l1("was cached here"), "{}", r.stderr);
    assert!(l1("precompiled artifact: "), "{}", r.stderr);
    assert!(l1("component loaded (Cached)"), "{}", r.stderr);
}
