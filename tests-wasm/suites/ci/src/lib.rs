//! The ci suite: a small, fixed mix of outcomes for the tests of reports, retries
//! and the CI tools that read them (two pass, one fails, one is ignored), and a
//! test that fails on its first try only.

use matryoshka_guest::host;

fn adds_up() {
    assert_eq!(std::hint::black_box(2) + 2, 4);
}

fn level_is_named() {
    let path = host::level_path();
    log::info!("running at {path}");
    assert!(path.starts_with("L0"), "level path {path}");
}

fn fails_on_purpose() {
    let two = 1 + 1;
    assert_eq!(two, 3, "arithmetic at {}", host::level_path());
}

fn ignored_on_purpose() {
    panic!("ignored tests run only with --ignored or --include-ignored");
}

/// Fails on its first try and passes on the next: it leaves a mark in `/state`
/// (grant it with `--grant fs=DIR:/state:rw`, a fresh DIR per run). Ignored by
/// default: run it with `--ignored fails_once --retries 1`.
fn fails_once() -> std::io::Result<()> {
    let mark = "/state/fails_once.tried";
    if std::fs::metadata(mark).is_err() {
        std::fs::write(mark, b"tried\n")?;
        panic!("first try fails on purpose (the next one passes)");
    }
    println!("a try after the first");
    Ok(())
}

matryoshka_guest::suite! {
    tests: [
        #[tag("math")] adds_up,
        #[tag("host")] level_is_named,
        #[tag("expected-failure")] fails_on_purpose,
        #[ignore] ignored_on_purpose,
        #[ignore] #[tag("flaky")] fails_once,
    ]
}
