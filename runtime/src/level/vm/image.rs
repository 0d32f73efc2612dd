//! The image a VM level boots from: kernel, initramfs and read-only root.

use std::path::{Path, PathBuf};

use super::argv::Arch;

/// Where a level finds the image it was booted from (see `images/build.sh`).
pub const IMAGE_IN_LEVEL: &str = "/usr/lib/matryoshka/image";

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
    /// The image in `dir`; without one, the first of: `$MATRYOSHKA_IMAGE_DIR`,
    /// the image this level itself booted from ([`IMAGE_IN_LEVEL`]), and
    /// `target/images/<arch>` under the current folder (where `images/build.sh` writes).
    pub fn resolve(dir: Option<&Path>, arch: Arch) -> Result<Self, String> {
        let dir = match dir {
            Some(d) => d.to_path_buf(),
            None => std::env::var_os("MATRYOSHKA_IMAGE_DIR")
                .map(PathBuf::from)
                .or_else(|| {
                    let inside = Path::new(IMAGE_IN_LEVEL);
                    (arch == Arch::host() && inside.join("kernel").exists())
                        .then(|| inside.to_path_buf())
                })
                .unwrap_or_else(|| PathBuf::from("target/images").join(arch.name())),
        };
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
                    "no {what} at {}: build the {} image with `images/build.sh` (or `./x image`), \
                     or name a folder holding kernel, initrd and root.img with --image-dir or \
                     $MATRYOSHKA_IMAGE_DIR",
                    path.display(),
                    arch.name()
                ));
            }
        }
        Ok(image)
    }
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
}
