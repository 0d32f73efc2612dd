//! The hostile suite: code a sandbox must survive. Each test must end as a
//! specific error for that test while the runtime and the other tests go on.

use std::hint::black_box;

use matryoshka_guest::host;

fn infinite_loop() {
    let mut n: u64 = 0;
    loop {
        n = black_box(n.wrapping_add(1));
    }
}

fn memory_bomb() {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut chunk = vec![0u8; 1 << 20];
        chunk[0] = black_box(1);
        hoard.push(chunk);
    }
}

fn read_etc_shadow() {
    match std::fs::read_to_string("/etc/shadow") {
        Ok(text) => panic!("read {} bytes of /etc/shadow without a grant", text.len()),
        Err(e) => panic!("reading /etc/shadow failed: {e}"),
    }
}

fn exec_without_grant() {
    let out = host::exec(&["cat", "/etc/shadow"]).expect("exec cat /etc/shadow");
    panic!("exec ran without a grant: status {:?}", out.status);
}

fn log_spam() {
    let line = "x".repeat(1023);
    for _ in 0..100 * 1024 {
        log::info!("{line}");
    }
}

fn stdout_spam() {
    let line = "y".repeat(1023);
    for _ in 0..100 * 1024 {
        println!("{line}");
    }
}

/// Bytes of the failure messages below: far more than a report keeps.
const HUGE: usize = 8 << 20;

fn huge_panic_message() {
    panic!("{}", "z".repeat(HUGE));
}

/// An error whose `Debug` is its text as is, so building the message is quick.
struct Verbatim(String);

impl std::fmt::Debug for Verbatim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn huge_error_message() -> Result<(), Verbatim> {
    Err(Verbatim("e".repeat(HUGE)))
}

fn well_behaved() {
    log::info!("still running at {}", host::level_path());
}

matryoshka_guest::suite! {
    tests: [
        infinite_loop,
        memory_bomb,
        read_etc_shadow,
        exec_without_grant,
        log_spam,
        stdout_spam,
        #[timeout_ms(60_000)] huge_panic_message,
        #[timeout_ms(60_000)] huge_error_message,
        well_behaved,
    ],
}
