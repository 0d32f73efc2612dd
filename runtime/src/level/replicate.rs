//! Self-replication: which runtime binary a level below gets, and its hash.
//!
//! A level of the same architecture gets this runtime itself (or the build in
//! `$MATRYOSHKA_RUNTIME_DIR/<arch>/matryoshka`, e.g. a release build driven by a
//! debug one); every copy is named `matryoshka-<sha256>` at the level, so a
//! runtime knows its own hash from its name.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use crate::engine::{CacheDir, mark_used, prune_unused, sha256_hex, write_atomically};

/// This runtime's own binary. A VM level runs it from a file its initramfs
/// unpacked and bound into the root before unlinking the original, for which the
/// kernel names the path with a ` (deleted)` suffix: the bound path is the one
/// without it.
pub fn own_exe() -> std::io::Result<std::path::PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let exe = std::env::current_exe()?;
    // Only the very file this process runs: a binary rebuilt at that path since is
    // another runtime (maybe another protocol).
    let running = std::fs::metadata("/proc/self/exe").ok();
    if let Some(bound) = exe
        .to_str()
        .and_then(|p| p.strip_suffix(" (deleted)"))
        .map(std::path::PathBuf::from)
        .filter(|p| {
            let here = std::fs::metadata(p).ok();
            matches!((&running, &here), (Some(r), Some(h)) if r.dev() == h.dev() && r.ino() == h.ino())
        })
    {
        return Ok(bound);
    }
    Ok(exe)
}

/// ` -v` or ` -vv` when this runtime logs at info or debug level, else empty: a
/// child runtime logs as much, and its stderr is relayed into this one's log.
pub fn verbosity_flag() -> &'static str {
    if tracing::enabled!(tracing::Level::DEBUG) {
        " -vv"
    } else if tracing::enabled!(tracing::Level::INFO) {
        " -v"
    } else {
        ""
    }
}

/// How a runtime is compressed for the copy to a level: what the level has
/// to unpack it with decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// zstd level 3 (`zstd -qdc` there): a quarter smaller than gzip's fastest,
    /// and unpacked five times faster.
    Zstd,
    /// gzip (`gzip -dc`, which every POSIX host and busybox has).
    Gzip,
}

impl Codec {
    /// The suffix of a compressed copy kept beside the binary (`.zst`, `.gz`).
    pub fn suffix(self) -> &'static str {
        match self {
            Self::Zstd => ".zst",
            Self::Gzip => ".gz",
        }
    }

    /// The command that unpacks standard input to standard output there.
    pub fn unpack_command(self) -> &'static str {
        match self {
            Self::Zstd => "zstd -qdc",
            Self::Gzip => "gzip -dc",
        }
    }

    /// `bytes` compressed the way this codec sends them.
    pub(crate) fn compress(self, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
        match self {
            Self::Zstd => {
                let mut enc = zstd::Encoder::new(Vec::new(), 3)?;
                // Both cores of a small machine: 28 MB in ~0.1 s.
                let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
                enc.multithread(u32::try_from(threads).unwrap_or(1))?;
                enc.include_checksum(true)?;
                enc.write_all(bytes)?;
                enc.finish()
            }
            Self::Gzip => {
                let mut enc =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                enc.write_all(bytes)?;
                enc.finish()
            }
        }
    }
}

/// A runtime binary to send: its hash, and its compressed bytes made on first
/// use (a warm hop only needs the hash).
pub struct RuntimeImage {
    /// Hex sha256 of the uncompressed binary.
    pub sha256: String,
    path: PathBuf,
    zstd: OnceLock<Result<bytes::Bytes, String>>,
    gzip: OnceLock<Result<bytes::Bytes, String>>,
}

impl RuntimeImage {
    /// The binary.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The binary compressed with `codec`: the copy kept beside it (`.zst` or
    /// `.gz`, as a level keeps what it was sent) when present, else the one this
    /// runtime made earlier and kept in its cache (`self/<sha256>.zst`), else made
    /// now (0.1–0.15 s for zstd here) and kept there for the next run.
    ///
    /// Whichever copy is sent, the level keeps the runtime only if what it
    /// unpacks hashes to [`Self::sha256`]: a copy that holds another binary is
    /// refused there, not run.
    pub fn compressed(&self, codec: Codec) -> Result<bytes::Bytes, String> {
        let cell = match codec {
            Codec::Zstd => &self.zstd,
            Codec::Gzip => &self.gzip,
        };
        cell.get_or_init(|| self.pack(codec, &CacheDir::default_location()))
            .clone()
    }

    /// [`Self::compressed`] with `cache` as this runtime's cache.
    fn pack(&self, codec: Codec, cache: &CacheDir) -> Result<bytes::Bytes, String> {
        let companion = PathBuf::from(format!("{}{}", self.path.display(), codec.suffix()));
        if let Ok(kept) = std::fs::read(&companion) {
            return Ok(kept.into());
        }
        let cached = kept_copy(cache, &self.sha256, codec);
        if let Some(path) = &cached
            && let Ok(kept) = std::fs::read(path)
        {
            mark_used(path);
            return Ok(kept.into());
        }
        let bytes = std::fs::read(&self.path)
            .map_err(|e| format!("cannot read {}: {e}", self.path.display()))?;
        let packed = codec
            .compress(&bytes)
            .map(bytes::Bytes::from)
            .map_err(|e| format!("cannot compress the runtime: {e}"))?;
        if let Some(path) = cached {
            // Only a faster next run depends on it.
            let _ = write_atomically(&path, &packed);
            if let Some(dir) = path.parent() {
                prune_unused(dir, &path, |name| {
                    name.ends_with(Codec::Zstd.suffix()) || name.ends_with(Codec::Gzip.suffix())
                });
            }
        }
        Ok(packed)
    }
}

/// Where this runtime keeps the copy of the binary `sha` compressed with `codec`
/// (in `cache`'s `self/`, whose folders no other user can write to), if it
/// has a cache.
fn kept_copy(cache: &CacheDir, sha: &str, codec: Codec) -> Option<PathBuf> {
    let dir = cache.open("self").ok()??;
    Some(dir.join(format!("{sha}{}", codec.suffix())))
}

/// The sha256 of this runtime when its file name carries it (`matryoshka-<sha256>`),
/// as it does on every level it was copied to.
pub fn own_sha_from_name() -> Option<String> {
    let exe = own_exe().ok()?;
    sha_from_name(&exe)
}

fn sha_from_name(path: &std::path::Path) -> Option<String> {
    let sha = path.file_name()?.to_str()?.strip_prefix("matryoshka-")?;
    (sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit())).then(|| sha.to_string())
}

/// This runtime's own image, computed once per process.
pub fn own_image() -> Result<Arc<RuntimeImage>, String> {
    static IMAGE: OnceLock<Arc<RuntimeImage>> = OnceLock::new();
    if let Some(image) = IMAGE.get() {
        return Ok(image.clone());
    }
    let exe = own_exe().map_err(|e| format!("cannot find this runtime's binary: {e}"))?;
    let image = Arc::new(image_of(&exe)?);
    Ok(IMAGE.get_or_init(|| image).clone())
}

/// The image of the runtime binary at `path`. Its hash comes from its name when
/// it carries one, else from a hash remembered per size and mtime in the cache.
pub fn image_of(path: &std::path::Path) -> Result<RuntimeImage, String> {
    let sha256 = match sha_from_name(path) {
        Some(sha) => sha,
        None => remembered_sha(path)?,
    };
    Ok(RuntimeImage {
        sha256,
        path: path.to_path_buf(),
        zstd: OnceLock::new(),
        gzip: OnceLock::new(),
    })
}

fn remembered_sha(path: &std::path::Path) -> Result<String, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    // The memo names the binary a level below runs (`matryoshka-<sha256>` there):
    // it is read only from a folder no other user can write to.
    let memo = CacheDir::default_location()
        .open("self")
        .map_err(|e| format!("cannot remember the runtime's hash: {e}"))?
        .map(|dir| dir.join(format!("{}-{mtime}.sha256", meta.len())));
    if let Some(sha) = memo.as_ref().and_then(|m| std::fs::read_to_string(m).ok()) {
        return Ok(sha.trim().to_string());
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let sha = sha256_hex(&bytes);
    if let Some(memo) = memo {
        let _ = write_atomically(&memo, sha.as_bytes());
    }
    Ok(sha)
}

/// The runtimes of other architectures in a VM level's bundle disk (see
/// `level/vm/bundle.rs`), where `$MATRYOSHKA_RUNTIME_DIR` is not set.
pub const BUNDLE_RUNTIMES: &str = "/run/matryoshka/bundle/runtimes";

/// The image to send to a level of architecture `arch`: the build in
/// `$MATRYOSHKA_RUNTIME_DIR/<arch>/matryoshka` when there is one (e.g. a release
/// build, small to copy, driven by a debug build at L0), else this runtime itself
/// when the architecture matches.
pub fn image_for(arch: &str) -> Result<Arc<RuntimeImage>, String> {
    static CHOSEN: OnceLock<Mutex<std::collections::HashMap<String, Arc<RuntimeImage>>>> =
        OnceLock::new();
    let chosen = CHOSEN.get_or_init(Mutex::default);
    if let Some(image) = chosen.lock().unwrap_or_else(|e| e.into_inner()).get(arch) {
        return Ok(image.clone());
    }
    let dir = std::env::var_os("MATRYOSHKA_RUNTIME_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            let bundle = std::path::Path::new(BUNDLE_RUNTIMES);
            bundle.is_dir().then(|| bundle.to_path_buf())
        });
    let candidate = dir.as_ref().map(|d| d.join(arch).join("matryoshka"));
    let image = match candidate {
        Some(path) if path.exists() => Arc::new(image_of(&path)?),
        _ if arch == std::env::consts::ARCH => own_image()?,
        _ => {
            return Err(format!(
                "the level is {arch} but this runtime is {}, and no {arch} runtime was found{}: build \
             one with `./x runtime {arch}` in matryoshka's source tree (it sets \
             $MATRYOSHKA_RUNTIME_DIR=target/runtimes for its commands), or `cargo build --release \
             --target {arch}-unknown-linux-gnu -p matryoshka` put at $MATRYOSHKA_RUNTIME_DIR/{arch}/matryoshka",
                std::env::consts::ARCH,
                candidate
                    .map(|p| format!(" at {}", p.display()))
                    .unwrap_or_else(|| " ($MATRYOSHKA_RUNTIME_DIR is not set)".into())
            ));
        }
    };
    chosen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(arch.to_string(), image.clone());
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(path: &std::path::Path, sha256: &str) -> RuntimeImage {
        RuntimeImage {
            sha256: sha256.into(),
            path: path.to_path_buf(),
            zstd: OnceLock::new(),
            gzip: OnceLock::new(),
        }
    }

    #[test]
    fn the_compressed_copy_is_kept_in_the_cache_and_old_ones_go() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cache = CacheDir::At(tmp.path().join("cache"));
        let bin = tmp.path().join("matryoshka");
        std::fs::write(&bin, b"the runtime, version one").expect("write");
        // A copy of another build, unused for three days, and an unrelated file.
        let self_dir = cache.open("self").expect("open").expect("a cache");
        let old = self_dir.join(format!("{}.zst", "0".repeat(64)));
        std::fs::write(&old, b"old").expect("write");
        let file = std::fs::File::options()
            .append(true)
            .open(&old)
            .expect("open");
        let three_days = std::time::Duration::from_secs(3 * 24 * 3600);
        file.set_modified(std::time::SystemTime::now() - three_days)
            .expect("age it");
        std::fs::write(self_dir.join("12-34.sha256"), b"memo").expect("write");

        let packed = image(&bin, &"a".repeat(64))
            .pack(Codec::Zstd, &cache)
            .expect("pack");
        assert_eq!(
            zstd::decode_all(&packed[..]).expect("unpack"),
            b"the runtime, version one"
        );
        let kept = self_dir.join(format!("{}.zst", "a".repeat(64)));
        assert_eq!(std::fs::read(&kept).expect("kept"), &packed[..]);
        assert!(!old.exists(), "the unused copy of another build stays");
        assert!(self_dir.join("12-34.sha256").exists());
        // The next run sends the kept copy, not a new one made from the binary.
        std::fs::write(&kept, b"kept").expect("write");
        let again = image(&bin, &"a".repeat(64))
            .pack(Codec::Zstd, &cache)
            .expect("pack");
        assert_eq!(&again[..], b"kept");
        // Without a cache it is made each time.
        let uncached = image(&bin, &"a".repeat(64))
            .pack(Codec::Gzip, &CacheDir::Disabled)
            .expect("pack");
        assert!(!uncached.is_empty());
        assert!(!self_dir.join(format!("{}.gz", "a".repeat(64))).exists());
    }
}
