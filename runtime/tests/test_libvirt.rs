//! The `libvirt` interface at L0 against libvirt's in-process test driver
//! (`test:///default`: the library `libvirt0`, no daemon), and what a run says
//! when the library is missing or the URI is not granted.

#[allow(dead_code, reason = "shared by several test crates, each using a part")]
mod common;

use common::{Run, bin};
use matryoshka_test_programs::LIBVIRT;

fn libvirt(args: &[&str], env: Option<(&str, &str)>) -> Run {
    let mut cmd = bin();
    cmd.args(["test", LIBVIRT]).args(args);
    if let Some((k, v)) = env {
        cmd.env(k, v);
    }
    Run::from(cmd.output().expect("start matryoshka"))
}

#[test]
fn domains_live_and_die_through_the_test_driver() {
    let run = libvirt(&["--grant", "libvirt=test:///default"], None);
    run.expect_code(0);
    for test in [
        "test_driver_lifecycle",
        "errors_carry_libvirt_codes",
        "leftovers_are_cleaned_up",
        "existing_domains_are_left_alone",
    ] {
        assert!(
            run.line_for("PASS", test).contains("L0 libvirt::"),
            "{}",
            run.stdout
        );
    }
}

#[test]
fn a_missing_library_is_unsupported_and_names_the_package() {
    let run = libvirt(
        &["--grant", "libvirt", "--ignored", "open_test_driver"],
        Some(("MATRYOSHKA_LIBVIRT_LIBRARY", "libvirt-not-installed.so.0")),
    );
    run.expect_code(100);
    run.expect_stdout(
        "unsupported at L0: libvirt at L0: cannot load libvirt: libvirt-not-installed.so.0: \
         cannot open shared object file",
    );
    run.expect_stdout("install libvirt0 (Debian, Ubuntu) or libvirt-libs (Fedora, RHEL)");
}

#[test]
fn libvirt_is_denied_without_a_grant_for_the_uri() {
    let run = libvirt(&["--ignored", "open_test_driver"], None);
    run.expect_code(100);
    run.expect_stdout(
        "denied at L0: libvirt at `test:///default` is not granted at L0; add --grant libvirt \
         (any URI) or --grant libvirt=URI[,URI...]",
    );
    let run = libvirt(
        &[
            "--grant",
            "libvirt=qemu:///system",
            "--ignored",
            "open_test_driver",
        ],
        None,
    );
    run.expect_code(100);
    run.expect_stdout("add it with --grant libvirt=test:///default");
}
