//! Whether a QEMU binary runs under its seccomp filter ([`argv::SANDBOX`]).
//!
//! The level's own start is the probe: QEMU 7.2 parses the filter's keys while
//! it reads its options and installs the filter (`seccomp_load`) before it
//! creates the machine, so a binary built without seccomp, a kernel without it,
//! or a key the version does not know makes QEMU exit at once with an error
//! that names `-sandbox`. The boot then starts QEMU once more without the
//! filter, and this runtime remembers not to ask that binary again. A separate
//! probe (`<qemu> -sandbox … -L help`) costs 25–150 ms at L0 but 3 s in a TCG
//! level, where every QEMU start pays for loading its libraries under emulation;
//! the start that was to happen anyway costs nothing more when the filter works.

use std::collections::BTreeMap;
use std::sync::Mutex;

#[cfg(doc)]
use super::argv;

/// Binaries that refused the filter in this runtime, and what they said.
static REFUSED: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());

/// Whether to start `binary` under the filter: yes, unless it refused it before.
pub fn wanted(binary: &str) -> bool {
    !REFUSED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains_key(binary)
}

/// Remembers that `binary` refused the filter, saying `why`.
pub fn refused(binary: &str, why: &str) {
    tracing::warn!("{binary} refused -sandbox ({why}); its levels run without it");
    REFUSED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(binary.to_string(), why.to_string());
}

/// The line of a QEMU log that says QEMU stopped at `-sandbox`, if one does:
/// QEMU prefixes an option's error with the option (`qemu-system-x86_64:
/// -sandbox on,…: failed to install seccomp syscall filter in the kernel`), and
/// a binary without seccomp says `-sandbox support is not enabled`.
pub fn refusal(qemu_log: &str) -> Option<&str> {
    qemu_log
        .lines()
        .map(str::trim)
        .find(|l| l.contains(": -sandbox ") || l.contains("-sandbox support is not enabled"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[rstest::rstest]
    // What QEMU 7.2 prints for a key it does not know and for a bad value.
    #[case("qemu-system-x86_64: -sandbox on,bogus=deny: Invalid parameter 'bogus'\n")]
    #[case("qemu-system-x86_64: -sandbox on,spawn=maybe: invalid argument for spawn\n")]
    #[case(
        "qemu-system-x86_64: -sandbox on,obsolete=deny: failed to install seccomp syscall \
         filter in the kernel\n"
    )]
    #[case("qemu-system-x86_64: -sandbox support is not enabled in this QEMU binary\n")]
    fn refusals_are_recognized(#[case] log: &str) {
        assert_eq!(refusal(log), Some(log.trim()));
    }

    #[rstest::rstest]
    #[case("")]
    #[case("qemu-system-x86_64: -accel kvm: failed to initialize kvm: Permission denied\n")]
    #[case("qemu-system-x86_64: terminating on signal 15 from pid 7 (matryoshka)\n")]
    fn other_failures_are_not_refusals(#[case] log: &str) {
        assert_eq!(refusal(log), None);
    }

    #[test]
    fn a_binary_that_refused_is_not_asked_again() {
        let binary = "/nonexistent/qemu-system-refusing";
        assert!(wanted(binary));
        refused(
            binary,
            "-sandbox support is not enabled in this QEMU binary",
        );
        assert!(!wanted(binary));
        assert!(wanted("/nonexistent/qemu-system-other"));
    }
}
