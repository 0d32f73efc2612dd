//! What a level can give the VM levels it boots, and the check of a VM spec
//! against it before QEMU starts.

use super::arch::Arch;
use super::argv::Accel;

/// Memory a level keeps for itself and the new level's QEMU process, MiB.
pub const MEMORY_MARGIN_MIB: u64 = 256;

/// What the booting level has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LevelResources {
    /// `MemAvailable` of `/proc/meminfo`, MiB, when it could be read.
    pub available_mib: Option<u64>,
    /// CPUs this process may run on.
    pub cpus: u32,
}

impl LevelResources {
    /// This level's, read now.
    pub fn of_this_level() -> Self {
        let available_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemAvailable:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            })
            .map(|kib| kib / 1024);
        let cpus = std::thread::available_parallelism()
            .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX));
        Self {
            available_mib,
            cpus,
        }
    }

    /// Memory for a level when the spec sets none: 60% of what is available, at
    /// least 256 and at most 4096 MiB.
    pub fn default_memory_mib(&self) -> u32 {
        let available = self.available_mib.unwrap_or(4096);
        u32::try_from(available * 6 / 10)
            .unwrap_or(u32::MAX)
            .clamp(256, 4096)
    }

    /// CPUs for a level when the spec sets none: 2 for L1 (at most what this
    /// level has), 1 below, and 1 for an x86_64 level QEMU emulates (TCG). Two
    /// vCPUs in a KVM-in-TCG L2 that runs L3 locked up L1's KVM (soft lockups in
    /// L1's kernel) on the 2-core machine this was measured on; one vCPU per
    /// deeper level boots. An emulated x86_64 L1 runs the levels below on QEMU's
    /// emulation of SVM, which with two vCPUs (one host thread each) reset L2 or
    /// crashed L1 in about one chain to L3 in six; with one vCPU, 0 of 30 chains
    /// were lost (docs/benchmarks.md). An emulated s390x level runs no level
    /// below, so it keeps two.
    pub fn default_cpus(&self, depth: u32, accel: Accel, arch: Arch) -> u32 {
        if depth > 1 || (accel == Accel::Tcg && arch == Arch::X86_64) {
            1
        } else {
            self.cpus.min(2)
        }
    }
}

/// The level path of the level that boots `child` (`L0/L1` → `L0`).
pub(super) fn parent_of(child: &str) -> &str {
    child.rsplit_once('/').map_or(child, |(parent, _)| parent)
}

/// Checks `memory_mib` and `cpus` for the level `child` against what its
/// parent `have`s; the error names the `vm-spec` field, the value, the limit
/// and both levels.
pub fn check(memory_mib: u32, cpus: u32, have: &LevelResources, child: &str) -> Result<(), String> {
    let parent = parent_of(child);
    if memory_mib == 0 {
        return Err(format!(
            "vm-spec.memory-mib = 0 for {child}: a level needs memory; leave it unset for \
             60% of what {parent} has available"
        ));
    }
    if cpus == 0 {
        return Err(format!(
            "vm-spec.cpus = 0 for {child}: a level needs a CPU; leave it unset for the default"
        ));
    }
    if let Some(available) = have.available_mib {
        let limit = available.saturating_sub(MEMORY_MARGIN_MIB);
        if u64::from(memory_mib) > limit {
            return Err(format!(
                "vm-spec.memory-mib = {memory_mib} for {child} is more than {parent} can give: \
                 it has {available} MiB available and keeps {MEMORY_MARGIN_MIB} MiB for itself \
                 and QEMU, so the limit is {limit} MiB; ask for at most that, or leave \
                 memory-mib unset"
            ));
        }
    }
    if cpus > have.cpus {
        return Err(format!(
            "vm-spec.cpus = {cpus} for {child} is more than the {} CPUs {parent} has, so the \
             limit is {}; ask for at most that, or leave cpus unset",
            have.cpus, have.cpus
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

    use super::*;

    const HAVE: LevelResources = LevelResources {
        available_mib: Some(8192),
        cpus: 2,
    };

    #[rstest]
    #[case::within(4096, 2, HAVE)]
    #[case::at_the_memory_limit(8192 - 256, 1, HAVE)]
    #[case::memory_unknown(100_000, 1, LevelResources { available_mib: None, cpus: 2 })]
    fn specs_within_the_level_pass(
        #[case] memory: u32,
        #[case] cpus: u32,
        #[case] have: LevelResources,
    ) {
        check(memory, cpus, &have, "L0/L1").expect("within what L0 has");
    }

    #[rstest]
    #[case::memory_over_the_margin(
        8192 - 255,
        1,
        "L0/L1",
        "vm-spec.memory-mib = 7937 for L0/L1 is more than L0 can give: it has 8192 MiB \
         available and keeps 256 MiB for itself and QEMU, so the limit is 7936 MiB"
    )]
    #[case::memory_far_over(
        100_000_000,
        1,
        "L0/L1/L2",
        "vm-spec.memory-mib = 100000000 for L0/L1/L2 is more than L0/L1 can give"
    )]
    #[case::cpus(
        1024,
        3,
        "L0/L1",
        "vm-spec.cpus = 3 for L0/L1 is more than the 2 CPUs L0 has, so the limit is 2"
    )]
    #[case::no_memory(0, 1, "L0/L1", "vm-spec.memory-mib = 0 for L0/L1")]
    #[case::no_cpus(1024, 0, "L0/L1", "vm-spec.cpus = 0 for L0/L1")]
    fn specs_beyond_the_level_name_the_field_value_limit_and_level(
        #[case] memory: u32,
        #[case] cpus: u32,
        #[case] child: &str,
        #[case] expected: &str,
    ) {
        let err = check(memory, cpus, &HAVE, child).expect_err("refused");
        assert!(err.starts_with(expected), "{err}");
    }

    #[test]
    fn defaults_fit_the_level() {
        assert_eq!(HAVE.default_memory_mib(), 4096);
        let small = LevelResources {
            available_mib: Some(1000),
            cpus: 1,
        };
        assert_eq!(small.default_memory_mib(), 600);
        check(
            small.default_memory_mib(),
            small.default_cpus(1, Accel::Kvm, Arch::X86_64),
            &small,
            "L0/L1",
        )
        .expect("the defaults are within the level");
        assert_eq!(HAVE.default_cpus(1, Accel::Kvm, Arch::X86_64), 2);
        assert_eq!(HAVE.default_cpus(1, Accel::Tcg, Arch::X86_64), 1);
        assert_eq!(HAVE.default_cpus(1, Accel::Tcg, Arch::S390x), 2);
        assert_eq!(HAVE.default_cpus(2, Accel::Kvm, Arch::X86_64), 1);
    }
}
