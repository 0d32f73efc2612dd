//! Paths of the test suites under `tests-wasm/suites`, built into components
//! by this crate's build script. Tests use these constants instead of
//! hard-coding `.wasm` paths.

include!(concat!(env!("OUT_DIR"), "/suites.rs"));
