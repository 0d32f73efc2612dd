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
    // Every byte value, and more than a pipe holds: the runtime must write stdin
    // while it drains stdout, and pass the bytes through unchanged.
    let input: Vec<u8> = (0..=255u8).cycle().take(200_000).collect();
    let out = host::exec_with_stdin(&["cat"], &input)?;
    assert!(
        out.success(),
        "status {:?}: {}",
        out.status,
        out.stderr_lossy()
    );
    assert_eq!(out.stdout.len(), input.len(), "bytes that came back");
    assert!(
        out.stdout == input,
        "`cat` gave back other bytes than it was fed"
    );
    Ok(())
}

fn fs_read_via_preopen() -> std::io::Result<()> {
    let text = std::fs::read_to_string("/data/hello.txt")?;
    assert_eq!(text, "hello from the host\n");
    Ok(())
}

fn fs_preopen_is_read_only() {
    // The folder is there (its file reads), so a refusal is the grant's doing.
    assert!(
        std::fs::metadata("/data/hello.txt").is_ok(),
        "/data is not preopened"
    );
    let err = std::fs::write("/data/written-by-guest.txt", b"x")
        .expect_err("a read-only preopen accepted a write");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::PermissionDenied,
        "write refused for another reason: {err}"
    );
    assert!(
        std::fs::metadata("/data/written-by-guest.txt").is_err(),
        "the refused write left a file"
    );
}

/// Writes through a read-write grant: run it with `--grant fs=DIR:/out:rw` and
/// find the file in DIR; with a read-only grant of `/out` it fails.
fn fs_write_via_rw_grant() -> std::io::Result<()> {
    let text = format!("written at {}\n", host::level_path());
    std::fs::write("/out/written-by-guest.txt", &text)?;
    assert_eq!(std::fs::read_to_string("/out/written-by-guest.txt")?, text);
    Ok(())
}

fn prints_and_logs() {
    println!("to stdout from {}", host::level_path());
    eprintln!("to stderr");
    log::warn!("a warning line");
}

fn clocks_and_random_work() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock before 1970");
    assert!(now.as_secs() > 1_600_000_000, "wall clock at {now:?}");
    // The monotonic clock advances across a sleep, and by at least the sleep.
    let start = std::time::Instant::now();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let slept = start.elapsed();
    assert!(
        slept >= std::time::Duration::from_millis(20),
        "the monotonic clock advanced {slept:?} across a 20 ms sleep"
    );
    assert!(slept.as_secs() < 5, "a 20 ms sleep took {slept:?}");
    // wasi:random gives different bytes on every draw.
    let draw = || {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).expect("wasi:random");
        bytes
    };
    let (first, second) = (draw(), draw());
    assert_ne!(
        first, second,
        "two draws of wasi:random gave the same bytes"
    );
    assert_ne!(first, [0u8; 32], "wasi:random gave only zeros");
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
        #[ignore] #[tag("fs")] fs_write_via_rw_grant,
        prints_and_logs,
        clocks_and_random_work,
        #[tag("expected-failure")] deliberately_fails,
        #[ignore] ignored_by_default,
    ],
}
