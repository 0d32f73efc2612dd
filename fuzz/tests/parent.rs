//! The parent target against real child processes. Its own `main` (no libtest
//! threads) because preparing the target sets this process's environment.

use matryoshka_fuzz::targets::{self, Reach};

fn main() {
    if let Err(e) = targets::prepare_parent() {
        panic!("cannot prepare the parent target: {e}");
    }
    let mut rng = fastrand::Rng::with_seed(3);
    let reach: Vec<Reach> = (0..120)
        .map(|_| {
            let mut data = vec![0; rng.usize(1..=1024)];
            rng.fill(&mut data);
            data[0] |= 1;
            targets::parent(&data)
        })
        .collect();
    targets::cleanup_parent();
    // The generated conversations complete the handshake and answer the call.
    assert!(reach.iter().any(|r| r.opened), "{reach:?}");
    assert!(reach.iter().any(|r| r.answered), "{reach:?}");
    println!("test parent_handshake_reaches_ready_and_a_return ... ok");
}
