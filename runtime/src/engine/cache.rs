//! The on-disk cache: where it is, and that no other user can write to it.
//!
//! Precompiled artifacts (`<engine key>/<sha256>.cwasm`) are native code that
//! the runtime maps and runs, and the other folders under the cache root decide
//! which runtime binary a level runs (`self/`, `vm-runtime/`). Whoever can write
//! to a cache folder can therefore run code as this runtime's user. Every cache
//! folder is made mode 0700, and before anything in one is used, each folder from
//! the cache root down to it is checked like OpenSSH's `StrictModes` does: owned
//! by this process's effective uid (root included: a cache of another user is
//! that user's code) and writable by neither group nor others.

use std::fs::DirBuilder;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Where precompiled components are kept.
#[derive(Debug, Clone)]
pub enum CacheDir {
    /// Compile every time.
    Disabled,
    /// Keep artifacts under this folder.
    At(PathBuf),
}

impl CacheDir {
    /// `$MATRYOSHKA_CACHE_DIR`, `$XDG_CACHE_HOME/matryoshka` or `~/.cache/matryoshka`.
    pub fn default_location() -> Self {
        if let Some(dir) = std::env::var_os("MATRYOSHKA_CACHE_DIR") {
            return Self::At(dir.into());
        }
        if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
            return Self::At(PathBuf::from(dir).join("matryoshka"));
        }
        match std::env::var_os("HOME") {
            Some(home) => Self::At(PathBuf::from(home).join(".cache/matryoshka")),
            None => Self::Disabled,
        }
    }

    /// The folder, unless caching is disabled.
    pub fn dir(&self) -> Option<&Path> {
        match self {
            Self::At(dir) => Some(dir),
            Self::Disabled => None,
        }
    }

    /// The folder `sub` of the cache (`None` when caching is disabled), made
    /// mode 0700 if missing, once it and every folder above it up to the cache
    /// root passed [`secure_dir`].
    pub fn open(&self, sub: &str) -> Result<Option<PathBuf>, CacheError> {
        let Some(root) = self.dir() else {
            return Ok(None);
        };
        let dir = root.join(sub);
        secure_dir(root, &dir)?;
        Ok(Some(dir))
    }
}

/// Why a cache folder, or a file in one, is not used.
#[derive(Debug, Error)]
pub enum CacheError {
    /// Another user could write to it, so what it holds could be their code.
    #[error(
        "refusing the cache {what} {path}: {problem}, so another user could plant compiled code \
         there that this runtime would run; fix: {fix}"
    )]
    Unsafe {
        /// `folder` or `file`.
        what: &'static str,
        /// The folder or file.
        path: PathBuf,
        /// `mode 0777 (writable by group and others)`, `owned by uid 1000 ...`.
        problem: String,
        /// What to do about it.
        fix: String,
    },
    /// It could not be made or inspected.
    #[error("cannot use the cache folder {path}: {source}")]
    Io {
        /// The folder.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Makes `dir` (a folder under the cache root `root`, or `root` itself) with mode
/// 0700 where it is missing, and checks every folder from `root` down to `dir`:
/// each must be a folder owned by this process's effective uid and writable by
/// neither group nor others. Call it before anything in `dir` is read or run.
pub fn secure_dir(root: &Path, dir: &Path) -> Result<(), CacheError> {
    let io = |path: &Path, source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    };
    let below = dir.strip_prefix(root).map_err(|_| {
        io(
            dir,
            std::io::Error::other(format!("not inside the cache {}", root.display())),
        )
    })?;
    // The root's parents are made too (0700, like the root) when missing.
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .map_err(|e| io(root, e))?;
    check(root, "folder")?;
    let mut at = root.to_path_buf();
    for part in below.components() {
        at.push(part);
        match DirBuilder::new().mode(0o700).create(&at) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(&at, e)),
        }
        check(&at, "folder")?;
    }
    Ok(())
}

/// Checks that the cached file `path` (in a folder that passed [`secure_dir`])
/// is owned by this process's effective uid and writable by no one else.
pub fn secure_file(path: &Path) -> Result<(), CacheError> {
    check(path, "file")
}

/// The effective uid of this process.
fn euid() -> u32 {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

fn check(path: &Path, what: &'static str) -> Result<(), CacheError> {
    let meta = std::fs::metadata(path).map_err(|source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let unsafe_because = |problem: String, fix: String| CacheError::Unsafe {
        what,
        path: path.to_path_buf(),
        problem,
        fix,
    };
    let another_folder = "use a folder of your own with --cache-dir (or $MATRYOSHKA_CACHE_DIR)";
    let me = euid();
    if meta.uid() != me {
        return Err(unsafe_because(
            format!(
                "owned by uid {}, not by uid {me} that this runtime runs as",
                meta.uid()
            ),
            another_folder.to_string(),
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
            (true, true) => "group and others",
            (true, false) => "its group",
            _ => "others",
        };
        let fix = match what {
            "file" => format!("`rm {}`", path.display()),
            _ => format!(
                "`chmod 700 {}` once you trust what it holds, or {another_folder}",
                path.display()
            ),
        };
        return Err(unsafe_because(
            format!("mode {mode:04o} (writable by {who})"),
            fix,
        ));
    }
    let expected = if what == "file" {
        meta.is_file()
    } else {
        meta.is_dir()
    };
    if !expected {
        return Err(CacheError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(format!("not a {what}")),
        });
    }
    Ok(())
}

/// The component `sha` from the cache's `components/` folder, if it is there
/// and its bytes still hash to `sha`. A folder that fails [`secure_dir`] is
/// not read (a warning says why): the bytes would be checked anyway, but
/// nothing is taken from a folder others can write to.
pub fn cached_component(cache: &CacheDir, sha: &str) -> Option<Vec<u8>> {
    let dir = components_dir(cache)?;
    let bytes = std::fs::read(dir.join(format!("{sha}.wasm"))).ok()?;
    (super::sha256_hex(&bytes) == sha).then_some(bytes)
}

/// Keeps the component `sha` in the cache's `components/` folder for the next
/// connection; a failure is a warning, never an error.
pub fn store_component(cache: &CacheDir, sha: &str, bytes: &[u8]) {
    let Some(dir) = components_dir(cache) else {
        return;
    };
    if let Err(e) = write_atomically(&dir.join(format!("{sha}.wasm")), bytes) {
        tracing::warn!("cannot cache the component in {}: {e:#}", dir.display());
    }
}

fn components_dir(cache: &CacheDir) -> Option<PathBuf> {
    cache
        .open("components")
        .inspect_err(|e| tracing::warn!("not using the component cache: {e}"))
        .ok()?
}

/// Writes `bytes` to `path` through a temporary file (mode 0600) beside it:
/// readers see the old file or the whole new one, never a part. A missing
/// folder is made with mode 0700; callers in the cache check it first with
/// [`secure_dir`].
pub fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().ok_or_else(|| anyhow::anyhow!("no parent"))?;
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut tmp, bytes)?;
    tmp.persist(path)?;
    Ok(())
}

/// Renews the modification time of the cache file at `path` (so
/// [`prune_unused`] keeps it); whether it is there.
pub fn mark_used(path: &Path) -> bool {
    match std::fs::File::options().append(true).open(path) {
        Ok(file) => {
            let _ = file.set_modified(std::time::SystemTime::now());
            true
        }
        Err(_) => false,
    }
}

/// Removes the files in the cache folder `dir` that `ours` claims by name (and
/// leftovers of interrupted writes) not used for two days, except `keep`: each
/// build of the runtime leaves such files of megabytes behind. A file in use has
/// its modification time renewed with [`mark_used`].
pub fn prune_unused(dir: &Path, keep: &Path, ours: impl Fn(&str) -> bool) {
    const UNUSED: std::time::Duration = std::time::Duration::from_secs(2 * 24 * 3600);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let unused = entry
            .metadata()
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > UNUSED);
        let name = entry.file_name().to_string_lossy().into_owned();
        if path != keep && unused && (ours(&name) || name.starts_with(".tmp")) {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// The uid of `nobody`, whom the tests hand folders to.
    const NOBODY: u32 = 65534;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    fn chown_nobody(path: &Path) {
        std::os::unix::fs::chown(path, Some(NOBODY), None).expect("chown to nobody");
    }

    #[test]
    fn missing_folders_are_made_0700() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("new/cache");
        let dir = root.join("key/sub");
        secure_dir(&root, &dir).expect("made");
        for made in [tmp.path().join("new"), root.clone(), root.join("key"), dir] {
            let mode = std::fs::metadata(&made).expect("stat").mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", made.display());
        }
    }

    #[test]
    fn a_folder_others_can_write_is_refused_naming_it_and_the_fix() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("cache");
        let dir = root.join("key");
        secure_dir(&root, &dir).expect("made");
        chmod(&dir, 0o777);
        let e = secure_dir(&root, &dir)
            .expect_err("0777 is refused")
            .to_string();
        assert!(
            e.contains(&format!(
                "refusing the cache folder {}: mode 0777 (writable by group and others)",
                dir.display()
            )),
            "{e}"
        );
        assert!(e.contains(&format!("`chmod 700 {}`", dir.display())), "{e}");
        // Group-writable alone is refused as well, and so is the root.
        chmod(&dir, 0o770);
        let e = secure_dir(&root, &dir).expect_err("0770").to_string();
        assert!(e.contains("mode 0770 (writable by its group)"), "{e}");
        chmod(&dir, 0o700);
        chmod(&root, 0o702);
        let e = secure_dir(&root, &dir).expect_err("root 0702").to_string();
        assert!(
            e.contains(&format!(
                "folder {}: mode 0702 (writable by others)",
                root.display()
            )),
            "{e}"
        );
        chmod(&root, 0o755);
        secure_dir(&root, &dir).expect("0755 and 0700 are fine");
    }

    #[test]
    fn a_folder_of_another_user_is_refused_even_for_root() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("cache");
        let dir = root.join("key");
        secure_dir(&root, &dir).expect("made");
        // Root can use any folder, and would still run another user's code from it.
        chown_nobody(&dir);
        let e = secure_dir(&root, &dir)
            .expect_err("nobody's folder")
            .to_string();
        assert!(
            e.contains(&format!(
                "refusing the cache folder {}: owned by uid {NOBODY}, not by uid {}",
                dir.display(),
                euid()
            )),
            "{e}"
        );
        assert!(e.contains("--cache-dir"), "{e}");
    }

    #[test]
    fn a_cached_file_others_can_write_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let file = tmp.path().join("a.cwasm");
        write_atomically(&file, b"x").expect("write");
        assert_eq!(
            std::fs::metadata(&file).expect("stat").mode() & 0o777,
            0o600
        );
        secure_file(&file).expect("ours, 0600");
        chmod(&file, 0o666);
        let e = secure_file(&file).expect_err("0666").to_string();
        assert!(e.contains("cache file"), "{e}");
        assert!(e.contains("mode 0666"), "{e}");
        chmod(&file, 0o600);
        chown_nobody(&file);
        let e = secure_file(&file).expect_err("nobody's").to_string();
        assert!(e.contains(&format!("owned by uid {NOBODY}")), "{e}");
    }

    #[test]
    fn the_component_cache_is_not_read_from_an_unsafe_folder() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cache = CacheDir::At(tmp.path().join("cache"));
        let sha = super::super::sha256_hex(b"bytes");
        store_component(&cache, &sha, b"bytes");
        assert_eq!(
            cached_component(&cache, &sha).as_deref(),
            Some(&b"bytes"[..])
        );
        chmod(&tmp.path().join("cache/components"), 0o777);
        assert_eq!(cached_component(&cache, &sha), None);
    }
}
