//! The basics suite: what every level must answer, plus one failing and one
//! ignored test that the runtime's own tests expect.

use matryoshka_guest::host;

const KNOWN_ARCHES: &[&str] = &["x86_64", "aarch64", "s390x", "ppc64le", "riscv64"];

fn hostname_is_set() {
    let name = host::hostname();
    log::info!("hostname is {name}");
    assert!(!name.is_empty(), "hostname is empty");
}

fn arch_is_known() {
    let arch = host::arch();
    assert!(
        KNOWN_ARCHES.contains(&arch.as_str()),
        "unexpected arch {arch}"
    );
}

fn level_path_matches_level() {
    let path = host::level_path();
    let depth = path.split('/').count() as u32;
    assert_eq!(depth, host::level() + 1, "level path {path}");
    assert!(path.starts_with("L0"), "level path {path}");
}

fn exec_uname_matches_arch() -> Result<(), host::Error> {
    let machine = host::check_output(&["uname", "-m"])?;
    assert_eq!(machine.trim(), host::arch());
    Ok(())
}

fn exec_hostname_matches_host() -> Result<(), host::Error> {
    let name = host::check_output(&["hostname"])?;
    assert_eq!(name.trim(), host::hostname());
    Ok(())
}

fn exec_feeds_stdin() -> Result<(), host::Error> {
    // `uname` ignores stdin; what matters is that stdin is accepted and closed.
    let out = host::exec_with_stdin(&["uname", "-s"], b"ignored\n")?;
    assert!(out.success(), "status {:?}", out.status);
    assert_eq!(out.stdout_lossy().trim(), "Linux");
    Ok(())
}

fn fs_read_via_preopen() -> std::io::Result<()> {
    let text = std::fs::read_to_string("/data/hello.txt")?;
    assert_eq!(text, "hello from the host\n");
    Ok(())
}

fn fs_preopen_is_read_only() {
    let err = std::fs::write("/data/written-by-guest.txt", b"x")
        .expect_err("a read-only preopen accepted a write");
    log::info!("write refused as expected: {err}");
}

fn prints_and_logs() {
    println!("to stdout from {}", host::level_path());
    eprintln!("to stderr");
    log::warn!("a warning line");
}

fn clocks_and_random_work() {
    let start = std::time::Instant::now();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock before 1970");
    assert!(now.as_secs() > 1_600_000_000);
    assert!(start.elapsed().as_secs() < 5);
}

fn deliberately_fails() {
    let two = 1 + 1;
    assert_eq!(two, 3, "arithmetic at {}", host::level_path());
}

fn ignored_by_default() {
    panic!("ignored tests run only with --ignored or --include-ignored");
}

matryoshka_guest::suite! {
    tests: [
        hostname_is_set,
        arch_is_known,
        level_path_matches_level,
        #[tag("exec")] exec_uname_matches_arch,
        #[tag("exec")] exec_hostname_matches_host,
        #[tag("exec")] exec_feeds_stdin,
        #[tag("fs")] fs_read_via_preopen,
        #[tag("fs")] fs_preopen_is_read_only,
        prints_and_logs,
        clocks_and_random_work,
        #[tag("expected-failure")] deliberately_fails,
        #[ignore] ignored_by_default,
    ],
}
