//! The image a VM level boots from: kernel, initramfs and read-only root.

use std::path::{Path, PathBuf};

use super::arch::Arch;

/// Where a level finds the image it was booted from (see `images/build.sh`).
pub const IMAGE_IN_LEVEL: &str = "/usr/lib/matryoshka/image";

/// Where a level finds the images of other architectures its parent handed it
/// (`<this>/<arch>`; see `bundle.rs`).
pub const BUNDLE_IMAGES: &str = "/run/matryoshka/bundle/images";

/// `file`'s size and time of change (nanoseconds since the epoch, 0 when the
/// file system does not say): what names an entry a cache makes from it.
pub fn size_and_change(file: &Path) -> std::io::Result<(u64, u128)> {
    let meta = std::fs::metadata(file)?;
    let changed = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok((meta.len(), changed))
}

/// The three files a level boots from.
#[derive(Debug, Clone)]
pub struct Image {
    /// Kernel.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: PathBuf,
    /// Read-only squashfs root, handed to the guest as `/dev/vda`.
    pub root: PathBuf,
}

impl Image {
    /// The folder a level boots `arch` levels from when the run names none: the
    /// first of `$MATRYOSHKA_IMAGE_DIR`, the image this level itself booted from
    /// ([`IMAGE_IN_LEVEL`]), the one its bundle carries ([`BUNDLE_IMAGES`]), and `target/images/<arch>` under the current folder
    /// (where `images/build.sh` writes).
    pub fn default_dir(arch: Arch) -> PathBuf {
        std::env::var_os("MATRYOSHKA_IMAGE_DIR")
            .map(|d| Self::folder_for(Path::new(&d), arch))
            .or_else(|| {
                let inside = Path::new(IMAGE_IN_LEVEL);
                (arch == Arch::host() && inside.join("kernel").exists())
                    .then(|| inside.to_path_buf())
            })
            .or_else(|| {
                let bundled = Path::new(BUNDLE_IMAGES).join(arch.name());
                bundled.join("kernel").exists().then_some(bundled)
            })
            .unwrap_or_else(|| PathBuf::from("target/images").join(arch.name()))
    }

    /// The image folder for `arch` that a folder the run names (`--image-dir`,
    /// `$MATRYOSHKA_IMAGE_DIR`) stands for: its subfolder named after the
    /// architecture when it has one (`target/images` holds `x86_64/` and
    /// `s390x/`); the folder itself for this level's architecture; for another,
    /// the sibling named after it when the folder is named after this level's
    /// (`target/images/x86_64` stands for `target/images/s390x` too).
    pub fn folder_for(dir: &Path, arch: Arch) -> PathBuf {
        let sub = dir.join(arch.name());
        if sub.join("kernel").exists() || arch != Arch::host() && sub.is_dir() {
            return sub;
        }
        if arch == Arch::host() {
            return dir.to_path_buf();
        }
        match (dir.file_name(), dir.parent()) {
            (Some(name), Some(parent)) if name == Arch::host().name() => parent.join(arch.name()),
            _ => sub,
        }
    }

    /// The image in `dir`, or in [`Image::default_dir`].
    pub fn resolve(dir: Option<&Path>, arch: Arch) -> Result<Self, String> {
        let dir = dir.map_or_else(|| Self::default_dir(arch), Path::to_path_buf);
        let image = Self {
            kernel: dir.join("kernel"),
            initrd: dir.join("initrd"),
            root: dir.join("root.img"),
        };
        for (what, path) in [
            ("kernel", &image.kernel),
            ("initramfs", &image.initrd),
            ("root", &image.root),
        ] {
            if !path.exists() {
                return Err(format!(
                    "no {what} at {}: build the {arch} image with `./x image {arch}` \
                     (images/build.sh {arch}), or name a folder holding kernel, initrd and \
                     root.img (or one such folder per architecture) with --image-dir or \
                     $MATRYOSHKA_IMAGE_DIR",
                    path.display(),
                    arch = arch.name()
                ));
            }
        }
        Ok(image)
    }
}

/// Why a level may not boot the image folder a `vm-spec` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRefusal {
    /// The folder cannot be resolved (it does not exist, say).
    NotFound(String),
    /// The folder is neither the run's image folder nor under a granted one.
    Denied(String),
}

/// Checks the folder a `vm-spec.image` names for the level `child`: allowed
/// when, resolved (symlinks and `..` followed), it is the run's image folder
/// `run_image` or lies under one of the `granted` image folders. Returns the
/// resolved folder, which the level boots from.
pub fn check_requested(
    asked: &Path,
    run_image: &Path,
    granted: &[PathBuf],
    child: &str,
) -> Result<PathBuf, ImageRefusal> {
    let resolved = asked.canonicalize().map_err(|e| {
        ImageRefusal::NotFound(format!(
            "vm-spec.image `{}` for {child} cannot be resolved: {e}",
            asked.display()
        ))
    })?;
    let run_image = run_image
        .canonicalize()
        .unwrap_or_else(|_| run_image.to_path_buf());
    let under_a_grant = granted
        .iter()
        .filter_map(|g| g.canonicalize().ok())
        .any(|g| resolved.starts_with(g));
    if resolved == run_image || under_a_grant {
        return Ok(resolved);
    }
    let shown = resolved.display();
    let resolved_note = if resolved == asked {
        String::new()
    } else {
        format!(" (resolved: {shown})")
    };
    Err(ImageRefusal::Denied(format!(
        "vm-spec.image `{}`{resolved_note} for {child} is neither the run's image folder ({}) \
         nor under a folder granted for images; add --grant image={shown} (or images = \
         [\"{shown}\"] under [grants] in matryoshka.toml)",
        asked.display(),
        run_image.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_images_name_the_file_and_the_fix() {
        let err = Image::resolve(Some(Path::new("/nonexistent/image")), Arch::X86_64)
            .expect_err("no image there");
        assert!(
            err.contains("no kernel at /nonexistent/image/kernel"),
            "{err}"
        );
        assert!(err.contains("images/build.sh"), "{err}");
    }

    #[test]
    fn only_the_run_image_or_granted_folders_may_be_booted() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = &tmp.path().canonicalize().expect("canonical");
        let run = root.join("run-image");
        let granted = root.join("granted");
        let other = root.join("other");
        for dir in [&run, &granted.join("x86_64"), &other] {
            std::fs::create_dir_all(dir).expect("mkdir");
        }
        std::os::unix::fs::symlink(&other, granted.join("escape")).expect("symlink");
        let grants = [granted.clone(), root.join("missing")];
        let check = |asked: &Path| check_requested(asked, &run, &grants, "L0/L1");
        assert_eq!(check(&run), Ok(run.clone()));
        assert_eq!(check(&granted.join("x86_64")), Ok(granted.join("x86_64")));
        assert_eq!(check(&granted.join("x86_64/..")), Ok(granted.clone()));
        // Out of the granted folder by `..` or by a symlink inside it: refused.
        for asked in [
            other.clone(),
            granted.join(".."),
            granted.join("escape"),
            run.join("..").join("other"),
        ] {
            match check(&asked) {
                Err(ImageRefusal::Denied(m)) => {
                    assert!(
                        m.contains(&format!("add --grant image={}", other.display()))
                            || m.contains(&format!("add --grant image={}", root.display())),
                        "{m}"
                    );
                    assert!(m.contains("for L0/L1"), "{m}");
                }
                other => panic!("{asked:?} was not refused: {other:?}"),
            }
        }
        match check(&root.join("missing")) {
            Err(ImageRefusal::NotFound(m)) => assert!(m.contains("cannot be resolved"), "{m}"),
            other => panic!("a missing folder is not reported as such: {other:?}"),
        }
    }
}
