//! libFuzzer target: the child's side of the handshake, `serve` (`cargo fuzz run child`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = matryoshka_fuzz::targets::child(data);
});
