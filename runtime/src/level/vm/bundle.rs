//! The bundle: what a VM level needs to boot levels of another architecture
//! than its own (an x86_64 L1 booting an s390x L2), handed to it as a second
//! read-only disk.
//!
//! A level's own image boots only its own architecture, and its runtime is its
//! own. The level that boots it (L0 first) puts the runtimes and images of the
//! other architectures it has into one squashfs (`runtimes/<arch>/matryoshka`,
//! `images/<arch>/{kernel,initrd,root.img}`), made once per content and kept in
//! the cache, and attaches it as the guest's second virtio disk. The level's
//! initramfs mounts it at [`IN_LEVEL`], where the runtime lookup
//! ([`crate::level::replicate::image_for`], `BUNDLE_RUNTIMES`) and the image
//! lookup ([`super::image::Image::default_dir`], `BUNDLE_IMAGES`) find them; a level with a bundle hands
//! the same disk to the levels it boots. Only blocks that are read cross a level.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::arch::Arch;
use super::image::Image;

/// Where a level's initramfs mounts the bundle disk its parent attached.
pub const IN_LEVEL: &str = "/run/matryoshka/bundle";

/// The device the bundle is at a level that has one: its second virtio disk.
const DEVICE_IN_LEVEL: &str = "/dev/vdb";

/// The bundle to attach to a level of architecture `child`, if there is one:
/// this level's own (its disk) when it has one, else one made here from the
/// runtimes and images this level has for the other architectures, kept in
/// `cache`. None for a level that cannot boot levels (s390x under TCG) or when
/// there is nothing for other architectures.
pub fn for_child(child: Arch, image_dir: Option<&Path>, cache: &Path) -> Option<PathBuf> {
    if child == Arch::S390x {
        return None;
    }
    if Path::new(crate::level::replicate::BUNDLE_RUNTIMES).is_dir() {
        return Some(PathBuf::from(DEVICE_IN_LEVEL));
    }
    let mut entries = Vec::new();
    for arch in [Arch::X86_64, Arch::S390x] {
        if arch == child {
            continue;
        }
        let Some(runtime) = std::env::var_os("MATRYOSHKA_RUNTIME_DIR")
            .map(|d| PathBuf::from(d).join(arch.name()).join("matryoshka"))
            .filter(|p| p.exists())
        else {
            continue;
        };
        let dir =
            image_dir.map_or_else(|| Image::default_dir(arch), |d| Image::folder_for(d, arch));
        let Ok(image) = Image::resolve(Some(&dir), arch) else {
            continue;
        };
        entries.push((format!("runtimes/{}/matryoshka", arch.name()), runtime));
        entries.push((format!("images/{}/kernel", arch.name()), image.kernel));
        entries.push((format!("images/{}/initrd", arch.name()), image.initrd));
        entries.push((format!("images/{}/root.img", arch.name()), image.root));
    }
    if entries.is_empty() {
        return None;
    }
    make(&entries, cache)
        .inspect_err(|e| {
            tracing::warn!(
                "no bundle for the level: it cannot boot levels of other architectures: {e}"
            );
        })
        .ok()
}

/// The squashfs of `entries` (path in the bundle, file here) in `cache`, named
/// by what went into it (each file's path, size and modification time).
fn make(entries: &[(String, PathBuf)], cache: &Path) -> Result<PathBuf, String> {
    let mut h = Sha256::new();
    for (name, file) in entries {
        let (len, mtime) =
            super::image::size_and_change(file).map_err(|e| format!("{}: {e}", file.display()))?;
        h.update(format!("{name}\0{}\0{len}\0{mtime}\n", file.display()));
    }
    let key = hex::encode(&h.finalize()[..12]);
    let dir = cache.join("bundle");
    // It holds runtimes that run at the levels: only where no other user can write.
    crate::engine::secure_dir(cache, &dir).map_err(|e| e.to_string())?;
    let out = dir.join(format!("{key}.sqfs"));
    if out.exists() {
        return Ok(out);
    }
    let started = std::time::Instant::now();
    let staging = tempfile::Builder::new()
        .prefix(".staging.")
        .tempdir_in(&dir)
        .map_err(|e| format!("cannot create a folder in {}: {e}", dir.display()))?;
    for (name, file) in entries {
        let to = staging.path().join(name);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        // Resolved: the bundle carries the files, not links to this machine's paths.
        let from = std::fs::canonicalize(file).map_err(|e| format!("{}: {e}", file.display()))?;
        if std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to)
                .map_err(|e| format!("cannot copy {} into the bundle: {e}", from.display()))?;
        }
    }
    let tmp = dir.join(format!(".{key}.sqfs.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let made = Command::new("mksquashfs")
        .arg(staging.path())
        .arg(&tmp)
        .args(["-noappend", "-quiet", "-no-progress", "-all-root"])
        .args(["-comp", "zstd"])
        .output()
        .map_err(|e| {
            format!("cannot run mksquashfs ({e}): install squashfs-tools to boot levels that boot other architectures")
        })?;
    if !made.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!(
            "mksquashfs failed: {}",
            String::from_utf8_lossy(&made.stderr).trim()
        ));
    }
    std::fs::rename(&tmp, &out).map_err(|e| format!("cannot keep {}: {e}", out.display()))?;
    tracing::info!(
        "made the bundle {} for levels that boot other architectures in {} ms",
        out.display(),
        started.elapsed().as_millis()
    );
    Ok(out)
}
