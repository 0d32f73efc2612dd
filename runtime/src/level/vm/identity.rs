//! What a chain of VM levels is made of, for telling whether a snapshot of it
//! kept across runs still matches what this run would boot: the runtime of
//! each architecture in it, the images, the QEMU that runs its first level and
//! the accelerator. Each part is named, so that a snapshot that no longer
//! matches can say what changed.

use std::collections::BTreeMap;
use std::path::Path;

use super::accel;
use super::arch::Arch;
use super::context::VmContext;
use super::image::Image;
use crate::level::replicate;

/// The parts of a chain of `levels` VM levels booted from a level with `ctx`,
/// each named (`runtime x86_64`, `image x86_64`, `qemu`, `accel`).
pub fn of_chain(ctx: &VmContext, levels: u32) -> Result<BTreeMap<String, String>, String> {
    let mut parts = BTreeMap::new();
    let mut arch = Arch::host();
    let mut archs = Vec::new();
    for i in 0..levels.max(1) as usize {
        // A level's architecture is the run's choice for it, else its parent's.
        if let Some(name) = ctx.settings.chain_arch.get(i) {
            arch = Arch::from_uname(name).ok_or_else(|| {
                format!("cannot boot a `{name}` level: known are x86_64 and s390x")
            })?;
        }
        if !archs.contains(&arch) {
            archs.push(arch);
        }
    }
    for arch in &archs {
        let runtime = replicate::image_for(arch.name())?;
        parts.insert(format!("runtime {}", arch.name()), runtime.sha256.clone());
        let dir = ctx.image_dir.as_deref().map_or_else(
            || Image::default_dir(*arch),
            |dir| Image::folder_for(dir, *arch),
        );
        parts.insert(format!("image {}", arch.name()), image_files(&dir, *arch)?);
    }
    let first = archs.first().copied().unwrap_or_else(Arch::host);
    parts.insert("qemu".into(), qemu_version(first)?);
    parts.insert(
        "accel".into(),
        format!(
            "{:?}; {}",
            ctx.settings.accel,
            if accel::kvm_device(first) {
                "/dev/kvm opens"
            } else {
                "no /dev/kvm"
            }
        ),
    );
    Ok(parts)
}

/// The image in `dir` as its build left it: its stamp, and each file's size
/// and time of change.
fn image_files(dir: &Path, arch: Arch) -> Result<String, String> {
    let image = Image::resolve(Some(dir), arch)?;
    let stamp = std::fs::read_to_string(dir.join("stamp")).unwrap_or_default();
    let mut words = vec![format!("{} stamp {:?}", dir.display(), stamp.trim())];
    for file in [&image.kernel, &image.initrd, &image.root] {
        let (len, changed) =
            super::image::size_and_change(file).map_err(|e| format!("{}: {e}", file.display()))?;
        words.push(format!(
            "{} {len} bytes, changed {changed}",
            file.file_name().unwrap_or_default().to_string_lossy(),
        ));
    }
    Ok(words.join("; "))
}

/// What `qemu-system-<arch> --version` says first.
fn qemu_version(arch: Arch) -> Result<String, String> {
    let program = arch.program();
    let out = std::process::Command::new(&program)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program} --version: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().next().unwrap_or_default().trim().to_string())
}
