//! The relay suites written in Python, JavaScript and C (tests-wasm/lang, built by
//! `./x langs`) at a VM level: L0 boots L1 from the guest image, copies the runtime
//! and the component there, and each test calls the same component one and two
//! levels further down inside L1.

#[allow(dead_code, reason = "shared by several test crates, each using a part")]
mod common;

use std::time::Instant;

use common::vm::{image_dir, qemus_left, run_dir, vm_test};
use common::{Run, lang_component};

/// Runs a language's relay suite at L0/L1 and checks every test passed there.
fn relay_at_l1(lang: &str) {
    let dir = run_dir(&format!("lang-{lang}"));
    let started = Instant::now();
    let out = vm_test(lang_component(lang, "relay"), &image_dir(), dir.path())
        .args(["--levels", "1"])
        .output()
        .expect("start matryoshka");
    let run = Run::from(out);
    eprintln!(
        "{lang} relay at L1: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    run.expect_code(0);
    for name in [
        "calls_itself_one_level_down",
        "descends_two_levels",
        "an_unknown_remote_function_is_not_found",
    ] {
        let line = run.line_for("PASS", name);
        assert!(line.contains(&format!("L0/L1 relay::{name}")), "{line}");
    }
    run.expect_stdout("3 passed, 0 failed");
    assert_eq!(qemus_left(dir.path()), Vec::<String>::new());
}

#[test]
fn python_calls_itself_below_a_vm_level() {
    relay_at_l1("python");
}

#[test]
fn javascript_calls_itself_below_a_vm_level() {
    relay_at_l1("js");
}

#[test]
fn c_calls_itself_below_a_vm_level() {
    relay_at_l1("c");
}
