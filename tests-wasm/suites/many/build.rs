//! Generates a suite of 1000 trivial tests, for measuring per-test overhead,
//! plus the ignored `window_*` tests written in `src/lib.rs`.

use std::fmt::Write;

const COUNT: usize = 1000;

fn main() {
    let mut src = String::new();
    for i in 0..COUNT {
        writeln!(src, "fn trivial_{i:04}() {{ std::hint::black_box({i}); }}").unwrap();
    }
    src.push_str("matryoshka_guest::suite! { tests: [\n");
    for i in 0..COUNT {
        writeln!(src, "    trivial_{i:04},").unwrap();
    }
    for i in 1..=4 {
        writeln!(src, "    #[ignore] window_{i},").unwrap();
    }
    src.push_str("] }\n");
    let out = std::env::var("OUT_DIR").unwrap();
    std::fs::write(format!("{out}/tests.rs"), src).unwrap();
    println!("cargo:rerun-if-changed=build.rs");
}
