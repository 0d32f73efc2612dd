//! A suite at L3 with a real QEMU, each test on a copy of the chain restored
//! from its snapshot: L1 under TCG, L2 and L3 under nested KVM. A test binary
//! of its own, so that cargo runs it alone (test binaries run one after
//! another): an L3 chain sharing this machine's two cores with another chain
//! boots slower and is lost more often.
//!
//! Needs the image (`./x image`).

#[allow(dead_code, reason = "shared by several test crates, each using a part")]
mod common;

use common::restored::run_on_copies;
use common::vm::run_dir;

/// The chain is booted once (with `--retries 1`, booted again if nested SVM
/// loses it), saved bare and with the component, and every test after the
/// first runs on a restored copy: the second does not find the first one's
/// mark at L3, and L3's clock was set after the restore.
#[test]
fn a_suite_runs_at_l3_each_test_on_a_restored_copy() {
    let cache = run_dir("deep-cache");
    let run = run_on_copies(3, cache.path(), "deep", &[]);
    for said in [
        "saved L0/L1 (and the levels inside it) bare in ",
        "attached the component to L0/L1/L2/L3 in ",
        "saved L0/L1 (and the levels inside it) with the component in ",
    ] {
        assert!(run.stderr.contains(said), "{said}: {}", run.stderr);
    }
}
