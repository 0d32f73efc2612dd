//! The image's initramfs with the runtime appended, cached per runtime hash.

use std::path::{Path, PathBuf};

/// The image's initramfs with the runtime appended as a second, uncompressed cpio
/// archive (the kernel unpacks both into one rootfs): the level finds the runtime
/// in memory at boot, with no disk to read and nothing to copy over a network.
#[derive(Debug, Clone)]
pub struct RuntimeInitrd {
    /// The combined initramfs; the level finds the runtime in it as
    /// `/matryoshka-<sha256>`.
    pub path: PathBuf,
}

impl RuntimeInitrd {
    /// The combined initramfs of `initrd` and `runtime` in `dir`, made once per
    /// runtime hash and initramfs file.
    pub fn prepare(
        initrd: &Path,
        runtime: &Path,
        sha256: &str,
        dir: &Path,
    ) -> Result<Self, String> {
        let (len, mtime) = super::image::size_and_change(initrd)
            .map_err(|e| format!("cannot stat {}: {e}", initrd.display()))?;
        let path = dir.join(format!("{sha256}-{len}-{mtime}.initrd"));
        // The runtime in it runs at the level: reuse or write it only where no other
        // user can write (the folder, made 0700, and the cache root above it).
        crate::engine::secure_dir(dir.parent().unwrap_or(dir), dir).map_err(|e| e.to_string())?;
        if crate::engine::mark_used(&path) {
            return Ok(Self { path });
        }
        let tmp = tempfile::NamedTempFile::new_in(dir)
            .map_err(|e| format!("cannot create a file in {}: {e}", dir.display()))?;
        let write = || -> std::io::Result<()> {
            let mut out = std::io::BufWriter::new(tmp.as_file());
            let mut image = std::fs::File::open(initrd)?;
            let copied = std::io::copy(&mut image, &mut out)?;
            // The kernel looks for the next archive on a 4-byte boundary.
            std::io::Write::write_all(&mut out, &[0; 4][..pad4(copied)])?;
            let mut binary = std::fs::File::open(runtime)?;
            let size = binary.metadata()?.len();
            cpio::write_file(
                &mut out,
                &format!("matryoshka-{sha256}"),
                0o755,
                size,
                &mut binary,
            )?;
            cpio::write_trailer(&mut out)?;
            std::io::Write::flush(&mut out)?;
            drop(out);
            // A file cut short by a crash must not become a cache hit.
            tmp.as_file().sync_all()
        };
        write().map_err(|e| {
            format!(
                "cannot append the runtime {} to the initramfs {}: {e}",
                runtime.display(),
                initrd.display()
            )
        })?;
        tmp.persist(&path)
            .map_err(|e| format!("cannot keep {}: {e}", path.display()))?;
        // Each build of the runtime makes a new one of ~25 MB.
        crate::engine::prune_unused(dir, &path, |name| name.ends_with(".initrd"));
        Ok(Self { path })
    }
}

fn pad4(len: u64) -> usize {
    ((4 - len % 4) % 4) as usize
}

/// The `newc` cpio format the kernel unpacks into its initial rootfs.
mod cpio {
    use std::io::{self, Read, Write};

    fn header(out: &mut impl Write, name: &str, mode: u32, size: u64, ino: u32) -> io::Result<()> {
        let namesize = name.len() + 1;
        let size = u32::try_from(size)
            .map_err(|_| io::Error::other("a file over 4 GiB does not fit a newc cpio archive"))?;
        let nlink = 1;
        write!(
            out,
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
            0, 0, 0, 0, 0, 0, 0, 0
        )?;
        out.write_all(name.as_bytes())?;
        out.write_all(&[0])?;
        out.write_all(&[0; 4][..super::pad4(110 + namesize as u64)])
    }

    /// One regular file of `size` bytes read from `data`.
    pub fn write_file(
        out: &mut impl Write,
        name: &str,
        perm: u32,
        size: u64,
        data: &mut impl Read,
    ) -> io::Result<()> {
        header(out, name, 0o100_000 | perm, size, 1)?;
        let copied = io::copy(&mut data.take(size), out)?;
        if copied != size {
            return Err(io::Error::other(format!(
                "{name} shrank while being archived ({copied} of {size} bytes)"
            )));
        }
        out.write_all(&[0; 4][..super::pad4(size)])
    }

    /// The end of an archive.
    pub fn write_trailer(out: &mut impl Write) -> io::Result<()> {
        header(out, "TRAILER!!!", 0, 0, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_is_appended_as_an_aligned_newc_archive() {
        let dir = tempfile::tempdir().expect("temp dir");
        let initrd = dir.path().join("initrd");
        let runtime = dir.path().join("runtime");
        std::fs::write(&initrd, b"gzip-bytes").expect("initrd"); // 10 bytes: padded to 12
        std::fs::write(&runtime, b"ELF!!").expect("runtime");
        let made = RuntimeInitrd::prepare(&initrd, &runtime, "ab12", &dir.path().join("cache"))
            .expect("combined");
        let bytes = std::fs::read(&made.path).expect("read");
        assert_eq!(&bytes[..12], b"gzip-bytes\0\0");
        let archive = std::str::from_utf8(&bytes[12..]).expect("ascii");
        let header = &archive[..110];
        assert!(header.starts_with("070701"), "{header}");
        let field =
            |i: usize| u32::from_str_radix(&header[6 + 8 * i..14 + 8 * i], 16).expect("hex field");
        assert_eq!(field(1), 0o100_755, "mode");
        assert_eq!(field(6), 5, "file size");
        assert_eq!(field(11), "matryoshka-ab12".len() as u32 + 1, "name size");
        // Name and NUL end at 110 + 16 = 126, padded to 128; data, padded to 4.
        assert_eq!(&archive[110..126], "matryoshka-ab12\0");
        assert_eq!(&archive[128..136], "ELF!!\0\0\0");
        assert!(archive[136..].starts_with("070701"));
        assert!(archive.contains("TRAILER!!!\0"));
        assert_eq!(archive.len() % 4, 0);
        // Made once: a second call finds it.
        let again = RuntimeInitrd::prepare(&initrd, &runtime, "ab12", &dir.path().join("cache"))
            .expect("cached");
        assert_eq!(again.path, made.path);
    }
}
