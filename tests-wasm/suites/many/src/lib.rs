//! 1000 trivial tests, for measuring the runner's per-test overhead, and four
//! ignored `window_*` tests that show how many tests run at once.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Sleeps 1 s and prints the wall-clock window it ran in as
/// `window START_NS END_NS`; how many windows of one run overlap is how many
/// tests ran at once.
fn window() {
    let now = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock before 1970")
            .as_nanos()
    };
    let start = now();
    std::thread::sleep(Duration::from_secs(1));
    println!("window {start} {}", now());
}

fn window_1() {
    window();
}

fn window_2() {
    window();
}

fn window_3() {
    window();
}

fn window_4() {
    window();
}

include!(concat!(env!("OUT_DIR"), "/tests.rs"));
