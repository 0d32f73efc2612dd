//! libFuzzer target: the parent's side of the handshake, `Connection::open`
//! against a local child that replays the input (`cargo fuzz run parent`).
#![no_main]

libfuzzer_sys::fuzz_target!(
    init: {
        if let Err(e) = matryoshka_fuzz::targets::prepare_parent() {
            panic!("cannot prepare the parent target: {e}");
        }
    },
    |data: &[u8]| {
        let _ = matryoshka_fuzz::targets::parent(data);
    }
);
