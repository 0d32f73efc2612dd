//! libFuzzer target: the relay frame decoder (`cargo fuzz run frames`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = matryoshka_fuzz::targets::frames(data);
});
