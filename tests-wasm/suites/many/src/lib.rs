//! 1000 trivial tests, for measuring the runner's per-test overhead.

include!(concat!(env!("OUT_DIR"), "/tests.rs"));
