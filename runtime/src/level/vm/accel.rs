//! Choosing the accelerator of a VM level: the run's policy, `/dev/kvm`, and
//! what a KVM probe boot taught this machine earlier (remembered per boot).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::arch::Arch;
use super::argv::Accel;
use super::boot::BootPlan;
use crate::config::AccelPolicy;

/// How long a KVM boot of L1 may stay silent before `auto` gives up on KVM
/// (four times that for each level deeper).
pub(super) const KVM_PROBE: Duration = Duration::from_secs(30);

/// Whether an `arch` guest could run under KVM here: it is this level's
/// architecture and `/dev/kvm` opens.
pub(super) fn kvm_device(arch: Arch) -> bool {
    arch == Arch::host()
        && std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
}

/// The accelerator to try, why, and whether it is a probe that may fall back.
pub(super) fn choose_accel(
    policy: AccelPolicy,
    arch: Arch,
    plan: &BootPlan,
) -> Result<(Accel, String, bool), String> {
    let kvm_device = kvm_device(arch);
    match policy {
        AccelPolicy::Tcg => Ok((Accel::Tcg, "--accel tcg".into(), false)),
        AccelPolicy::Kvm if !kvm_device => Err(format!(
            "--accel kvm, but there is no usable /dev/kvm for a {} guest at the level booting {}: \
             use --accel auto or tcg",
            arch.name(),
            plan.path
        )),
        AccelPolicy::Kvm => Ok((Accel::Kvm, "--accel kvm".into(), false)),
        AccelPolicy::Auto if arch != Arch::host() => Ok((
            Accel::Tcg,
            format!(
                "auto: an {} guest on {} is emulated",
                arch.name(),
                Arch::host().name()
            ),
            false,
        )),
        AccelPolicy::Auto if !kvm_device => Ok((
            Accel::Tcg,
            "auto: no usable /dev/kvm for this guest".into(),
            false,
        )),
        AccelPolicy::Auto => match recall(plan).as_deref() {
            Some("kvm") => Ok((Accel::Kvm, "auto: KVM worked before".into(), false)),
            Some(tcg) if tcg.starts_with("tcg") => Ok((
                Accel::Tcg,
                format!(
                    "auto: KVM failed here earlier ({})",
                    tcg.trim_start_matches("tcg: ")
                ),
                false,
            )),
            _ => Ok((Accel::Kvm, "auto: KVM boots here".into(), true)),
        },
    }
}

/// Where the KVM probe is remembered: one file per boot of this machine.
fn memo_file(plan: &BootPlan) -> Option<PathBuf> {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let root = plan.memo_dir.as_ref()?;
    let dir = root.join("accel");
    // Only a hint, so a folder others can write to is skipped, not fatal.
    crate::engine::secure_dir(root, &dir)
        .inspect_err(|e| tracing::warn!("not remembering the accelerator: {e}"))
        .ok()?;
    Some(dir.join(format!("{}.txt", boot_id.trim())))
}

fn recall(plan: &BootPlan) -> Option<String> {
    std::fs::read_to_string(memo_file(plan)?)
        .ok()
        .map(|s| s.trim().to_string())
}

pub(super) fn remember(plan: &BootPlan, what: &str) {
    if let Some(file) = memo_file(plan) {
        let _ = std::fs::write(file, what);
    }
}

/// Where a level's init says that it is still loading the KVM modules, which it
/// does while its runtime starts (see `images/guest/level-init`).
const KVM_PENDING: &str = "/run/matryoshka/kvm.pending";

/// Waits (at most 30 s) while this level's init still loads modules (KVM,
/// the SCSI drivers, see `images/guest/level-init`): asked of a level about to
/// be saved, so that its restored copies do not each finish that work again
/// (and meet a level whose init is half done). Returns at once elsewhere.
pub async fn wait_for_init(path: &str) {
    let pending = [KVM_PENDING, crate::scsi::DRIVERS_PENDING];
    wait_while(&pending, Duration::from_secs(30), path, "its modules").await;
}

/// Waits (at most `limit`) while any of the marker files `pending` of this
/// level's init exists, saying once that it waits for `what`.
async fn wait_while(pending: &[&str], limit: Duration, path: &str, what: &str) {
    let waiting = || pending.iter().any(|p| Path::new(p).exists());
    if !waiting() {
        return;
    }
    tracing::info!(level = %path, "waiting for this level's init to load {what}");
    let deadline = Instant::now() + limit;
    while waiting() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (at most two minutes) while this level's init still loads KVM, so that
/// the accelerator is chosen from what the level will have, not from a race.
pub(super) async fn wait_for_kvm_module(path: &str) {
    wait_while(&[KVM_PENDING], Duration::from_secs(120), path, "KVM").await;
}
