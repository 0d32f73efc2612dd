//! The wasmtime engine and compiling components: checks, the compile cache.
//!
//! Compiling a component is the slow part of a start, so the precompiled
//! artifact is cached on disk, keyed by the component's sha256 and the engine's
//! compatibility hash. An artifact is native code: [`secure_dir`] checks that no
//! other user can write to its folders before one is loaded. Everything a user
//! can get wrong about the file — not wasm, a core module, the wrong world — is
//! a [`LoadError`] that names it.
//! Linking with the host functions is the `suite` module's: this module knows
//! nothing of them.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use sha2::{Digest, Sha256};
use thiserror::Error;
use wasmtime::component::Component;
use wasmtime::component::types::ComponentItem;

mod cache;
mod target;

pub use cache::{
    CacheDir, CacheError, cached_component, mark_used, prune_unused, secure_dir, secure_file,
    store_component, write_atomically,
};
#[cfg(feature = "compiler")]
pub use target::engine_key;
pub use target::{ARCHES, KeyHasher, cross_engine, native_key};

/// The WIT world every suite must target, as named in error messages.
pub const WORLD: &str = "matryoshka:test/suite@0.2.0";

/// The component a level runs, kept to hand it to the next level.
#[derive(Debug)]
pub struct ComponentSource {
    /// The `.wasm` bytes.
    pub bytes: Vec<u8>,
    /// Their hex sha256.
    pub sha256: String,
    /// This level's precompiled artifact of them: (engine key, file), handed
    /// down with the bytes so levels with the same engine skip compiling.
    pub precompiled: Option<(String, PathBuf)>,
    /// The cache it came from, where artifacts for levels of other
    /// architectures are kept too ([`artifact_for`]).
    pub cache: CacheDir,
}

/// How often the epoch advances; the granularity of deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Why a component could not be loaded.
#[derive(Debug, Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The component path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Not WebAssembly at all.
    #[error("{path} is not a WebAssembly file (it does not start with \\0asm)")]
    NotWasm {
        /// The component path.
        path: PathBuf,
    },
    /// A core module, not a component.
    #[error(
        "{path} is a core WebAssembly module, not a component: build the suite for wasm32-wasip2, or wrap the module with `wasm-tools component new`"
    )]
    CoreModule {
        /// The component path.
        path: PathBuf,
    },
    /// The bytes do not validate or compile.
    #[error("{path} is not a valid component: {message}")]
    Malformed {
        /// The component path.
        path: PathBuf,
        /// What wasmtime found wrong.
        message: String,
    },
    /// A valid component that does not target the suite world.
    #[error("{path} does not target the world {WORLD}: {problem}")]
    WrongWorld {
        /// The component path.
        path: PathBuf,
        /// The missing export or unknown import.
        problem: String,
    },
    /// The compile cache cannot be trusted; nothing in it was loaded.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// A level runtime (no compiler) got no artifact of the component it can run.
    #[error(
        "cannot load {path}: this runtime has no compiler (a level runtime, built without the `compiler` feature, runs what its parent level compiled for it) and {why}; run tests with a full build (`cargo build --release -p matryoshka`), and do not set MATRYOSHKA_CROSS_COMPILE=0 above levels that run a level runtime"
    )]
    NoCompiler {
        /// The component path.
        path: PathBuf,
        /// Why there is nothing to run.
        why: String,
    },
    /// The engine itself failed.
    #[error("runtime error while loading {path}: {message}")]
    Engine {
        /// The component path.
        path: PathBuf,
        /// The error.
        message: String,
    },
}

/// How a component was obtained, for reports and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompileSource {
    /// Compiled now (and stored, if the cache is enabled).
    Compiled,
    /// Loaded from the on-disk cache.
    Cached,
}

/// The process-wide wasmtime engine with its epoch ticker.
pub fn engine() -> anyhow::Result<wasmtime::Engine> {
    static ENGINE: OnceLock<wasmtime::Engine> = OnceLock::new();
    if let Some(engine) = ENGINE.get() {
        return Ok(engine.clone());
    }
    #[cfg_attr(not(feature = "compiler"), allow(unused_mut))]
    let mut config = base_config();
    #[cfg(feature = "compiler")]
    target::configure(&mut config, std::env::consts::ARCH, true)?;
    let engine = wasmtime::Engine::new(&config)?;
    let engine = ENGINE.get_or_init(|| {
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("matryoshka-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .ok();
        engine
    });
    Ok(engine.clone())
}

/// The configuration of every engine, whatever it compiles for.
fn base_config() -> wasmtime::Config {
    let mut config = wasmtime::Config::new();
    config.epoch_interruption(true).wasm_component_model(true);
    #[cfg(feature = "compiler")]
    config.cranelift_opt_level(wasmtime::OptLevel::Speed);
    config
}

/// A component compiled (or taken from the cache) and checked against the world.
pub struct Compiled {
    /// The compiled component.
    pub component: Component,
    /// Whether compilation was skipped.
    pub source: CompileSource,
    /// Hex sha256 of the bytes.
    pub sha256: String,
    /// The bytes and their artifact, for the levels below.
    pub origin: ComponentSource,
}

/// What a level hands down of `bytes` (hashing to `sha256`) before it has
/// loaded them itself: with this level's artifact of them when `cache` has
/// one (a level below with the same engine then compiles nothing).
pub fn source_of(bytes: Vec<u8>, sha256: &str, cache: &CacheDir) -> ComponentSource {
    // Only from a folder and file that pass the cache's checks: it is native
    // code the level below runs.
    let precompiled = native_key().and_then(|key| {
        let dir = cache.open(&key).ok().flatten()?;
        let path = dir.join(format!("{sha256}.cwasm"));
        (path.exists() && secure_file(&path).is_ok()).then_some((key, path))
    });
    ComponentSource {
        bytes,
        sha256: sha256.to_string(),
        precompiled,
        cache: cache.clone(),
    }
}

/// Checks, compiles (or takes from `cache`) and checks the world of `bytes`;
/// `path` names the component in messages.
pub fn compile(
    engine: &wasmtime::Engine,
    path: &Path,
    bytes: Vec<u8>,
    cache: &CacheDir,
) -> Result<Compiled, LoadError> {
    check_header(path, &bytes)?;
    let sha256 = sha256_hex(&bytes);
    let (component, source) = compile_cached(engine, path, &bytes, &sha256, cache)?;
    check_world(engine, path, &component)?;
    let precompiled = native_key().and_then(|key| {
        let path = artifact_path(&key, cache, &sha256)?;
        path.exists().then_some((key, path))
    });
    Ok(Compiled {
        component,
        source,
        origin: ComponentSource {
            bytes,
            sha256: sha256.clone(),
            precompiled,
            cache: cache.clone(),
        },
        sha256,
    })
}

fn check_header(path: &Path, bytes: &[u8]) -> Result<(), LoadError> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(LoadError::NotWasm {
            path: path.to_path_buf(),
        });
    }
    // Bytes 4..8: version and layer. Core modules are 1/0, components 0xd/1.
    match bytes[4..8] {
        [1, 0, 0, 0] => Err(LoadError::CoreModule {
            path: path.to_path_buf(),
        }),
        _ => Ok(()),
    }
}

fn compile_cached(
    engine: &wasmtime::Engine,
    path: &Path,
    bytes: &[u8],
    sha256: &str,
    cache: &CacheDir,
) -> Result<(Component, CompileSource), LoadError> {
    // The folders are checked before anything in them is looked at.
    let artifact = match native_key() {
        Some(key) => cache
            .open(&key)?
            .map(|dir| dir.join(format!("{sha256}.cwasm"))),
        None => None,
    };
    let mut unusable = None;
    if let Some(artifact) = &artifact
        && artifact.exists()
    {
        secure_file(artifact)?;
        // SAFETY: the file was written by `Component::serialize` of an engine with this
        // engine's key (it is in the path: this engine's own compatibility hash, or at a
        // level without a compiler the key its parent's artifact came under), and `open`
        // and `secure_file` just checked that no other user can write to it or to any
        // folder above it up to the cache root. Deserializing checks the artifact's
        // target, settings and CPU features against this engine and this CPU.
        match unsafe { Component::deserialize_file(engine, artifact) } {
            Ok(component) => return Ok((component, CompileSource::Cached)),
            Err(e) => {
                tracing::warn!(
                    "ignoring unusable cache entry {}: {e:#}",
                    artifact.display()
                );
                unusable = Some(format!("{e:#}"));
            }
        }
    }
    compile_now(engine, path, bytes, artifact.as_deref(), unusable)
}

/// Compiles `bytes` with Cranelift and keeps the artifact at `artifact`.
#[cfg(feature = "compiler")]
fn compile_now(
    engine: &wasmtime::Engine,
    path: &Path,
    bytes: &[u8],
    artifact: Option<&Path>,
    _unusable: Option<String>,
) -> Result<(Component, CompileSource), LoadError> {
    let component = Component::new(engine, bytes).map_err(|e| LoadError::Malformed {
        path: path.to_path_buf(),
        message: format!("{e:#}"),
    })?;
    if let Some(artifact) = artifact
        && let Err(e) = store_artifact(&component, artifact)
    {
        tracing::warn!(
            "cannot cache the compiled component at {}: {e:#}",
            artifact.display()
        );
    }
    Ok((component, CompileSource::Compiled))
}

/// A runtime without a compiler has only what its parent compiled for it.
#[cfg(not(feature = "compiler"))]
fn compile_now(
    _engine: &wasmtime::Engine,
    path: &Path,
    _bytes: &[u8],
    _artifact: Option<&Path>,
    unusable: Option<String>,
) -> Result<(Component, CompileSource), LoadError> {
    Err(LoadError::NoCompiler {
        path: path.to_path_buf(),
        why: match unusable {
            Some(e) => format!("the artifact handed down does not load here: {e}"),
            None => "no compiled artifact of it was handed down and kept in its cache".to_string(),
        },
    })
}

/// Where the precompiled artifact of the component `sha256` for the engine
/// `key` lives in `cache`.
pub fn artifact_path(key: &str, cache: &CacheDir, sha256: &str) -> Option<PathBuf> {
    Some(cache.dir()?.join(key).join(format!("{sha256}.cwasm")))
}

/// The precompiled artifact of `source` to hand a level of architecture `arch`
/// (`uname -m`): this level's own when the architecture is this one's and it
/// has one, else one compiled here for that architecture with [`cross_engine`]
/// (kept in the cache under its engine's key), so that the level, emulated
/// perhaps, skips Cranelift, and a level runtime without Cranelift can run it.
/// `None` when there is none: the level then compiles itself if it can, as it
/// does when `$MATRYOSHKA_CROSS_COMPILE` is `0`.
pub fn artifact_for(source: &ComponentSource, arch: &str) -> Option<(String, Vec<u8>)> {
    if arch == std::env::consts::ARCH
        && let Some((key, path)) = &source.precompiled
        && let Ok(bytes) = std::fs::read(path)
    {
        return Some((key.clone(), bytes));
    }
    if std::env::var_os("MATRYOSHKA_CROSS_COMPILE").is_some_and(|v| v == "0") {
        return None;
    }
    let engine = cross_engine(arch)
        .inspect_err(|e| tracing::warn!("no artifact for the {arch} level: {e:#}"))
        .ok()?;
    cross_compiled(source, arch, &engine)
}

/// The artifact of `source` made by `engine` for `arch`, from the cache or
/// compiled now and kept there.
#[cfg(feature = "compiler")]
fn cross_compiled(
    source: &ComponentSource,
    arch: &str,
    engine: &wasmtime::Engine,
) -> Option<(String, Vec<u8>)> {
    let key = engine_key(engine);
    let path = match source.cache.open(&key) {
        Ok(dir) => dir.map(|d| d.join(format!("{}.cwasm", source.sha256))),
        Err(e) => {
            tracing::warn!("not keeping the {arch} artifact: {e}");
            None
        }
    };
    if let Some(path) = &path
        && path.exists()
        && secure_file(path).is_ok()
        && let Ok(bytes) = std::fs::read(path)
    {
        tracing::info!(
            "component {} for {arch}: artifact taken from the cache",
            source.sha256.get(..12).unwrap_or(&source.sha256)
        );
        return Some((key, bytes));
    }
    let started = std::time::Instant::now();
    let bytes = engine
        .precompile_component(&source.bytes)
        .inspect_err(|e| tracing::warn!("cannot compile the component for {arch}: {e:#}"))
        .ok()?;
    tracing::info!(
        "compiled component {} for {arch} in {} ms ({} bytes)",
        source.sha256.get(..12).unwrap_or(&source.sha256),
        started.elapsed().as_millis(),
        bytes.len()
    );
    if let Some(path) = &path
        && let Err(e) = write_atomically(path, &bytes)
    {
        tracing::warn!(
            "cannot keep the {arch} artifact at {}: {e:#}",
            path.display()
        );
    }
    Some((key, bytes))
}

/// Without a compiler there is no engine for another architecture
/// ([`cross_engine`] refuses), so nothing to compile with.
#[cfg(not(feature = "compiler"))]
fn cross_compiled(
    _source: &ComponentSource,
    _arch: &str,
    _engine: &wasmtime::Engine,
) -> Option<(String, Vec<u8>)> {
    None
}

/// Puts an artifact precompiled by a parent level into `cache`, so loading the
/// component skips Cranelift. Loading checks it like any cached artifact (and
/// compiles after all if this machine's CPU lacks a feature it uses, where this
/// runtime has a compiler). Nothing is written to a cache folder that fails
/// [`secure_dir`]: loading then says why.
pub fn adopt_artifact(cache: &CacheDir, key: &str, sha256: &str, bytes: &[u8]) {
    if let Err(why) = target::adopt_key(key) {
        let then = if cfg!(feature = "compiler") {
            "compiling here"
        } else {
            "not kept (this runtime has no compiler)"
        };
        tracing::info!("{why}: {then}");
        return;
    }
    let dir = match cache.open(key) {
        Ok(Some(dir)) => dir,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!("not keeping the precompiled component: {e}");
            return;
        }
    };
    let path = dir.join(format!("{sha256}.cwasm"));
    if let Err(e) = write_atomically(&path, bytes) {
        tracing::warn!(
            "cannot keep the precompiled component at {}: {e:#}",
            path.display()
        );
    }
}

/// Whether this runtime can load the component `sha256` with what `cache`
/// holds, so a level that has its bytes need not ask its parent for them again:
/// always with a compiler; without one, when an artifact of it is kept under
/// this process's engine key, or (before one was adopted) under a key folder
/// whose artifact passes the cache's checks and deserializes here, newest
/// first; that key is then adopted. An artifact of an older build or of
/// another architecture in the same cache is skipped, not adopted.
pub fn can_load_cached(cache: &CacheDir, sha256: &str) -> bool {
    #[cfg(feature = "compiler")]
    {
        let _ = (cache, sha256);
        true
    }
    #[cfg(not(feature = "compiler"))]
    {
        if let Some(key) = native_key() {
            return artifact_path(&key, cache, sha256).is_some_and(|p| p.exists());
        }
        let (Ok(engine), Some(entries)) = (
            engine(),
            cache.dir().and_then(|root| std::fs::read_dir(root).ok()),
        ) else {
            return false;
        };
        let name = format!("{sha256}.cwasm");
        let mut found: Vec<(std::time::SystemTime, String)> = entries
            .flatten()
            .filter_map(|entry| {
                let key = entry.file_name().into_string().ok()?;
                if !target::is_key(&key) {
                    return None;
                }
                let changed = entry.path().join(&name).metadata().ok()?.modified().ok()?;
                Some((changed, key))
            })
            .collect();
        found.sort_by(|a, b| b.cmp(a));
        found.into_iter().any(|(_, key)| {
            let Ok(Some(dir)) = cache.open(&key) else {
                return false;
            };
            let path = dir.join(&name);
            // SAFETY: `open` and `secure_file` checked that no other user can write
            // to the file or to any folder above it up to the cache root, as for
            // every artifact this runtime loads; deserializing checks its target,
            // settings and CPU features against this engine and this CPU.
            secure_file(&path).is_ok()
                && unsafe { Component::deserialize_file(&engine, &path) }.is_ok()
                && target::adopt_key(&key).is_ok()
        })
    }
}

#[cfg(feature = "compiler")]
fn store_artifact(component: &Component, artifact: &Path) -> anyhow::Result<()> {
    write_atomically(artifact, &component.serialize()?)
}

fn check_world(
    engine: &wasmtime::Engine,
    path: &Path,
    component: &Component,
) -> Result<(), LoadError> {
    let ty = component.component_type();
    let exports: Vec<(String, bool)> = ty
        .exports(engine)
        .map(|(name, item)| {
            (
                name.to_string(),
                matches!(item.ty, ComponentItem::ComponentFunc(_)),
            )
        })
        .collect();
    let missing: Vec<&str> = ["tests", "run", "call"]
        .into_iter()
        .filter(|want| {
            !exports
                .iter()
                .any(|(name, is_func)| name == want && *is_func)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let found = if exports.is_empty() {
        "it exports nothing".to_string()
    } else {
        format!(
            "it exports {}",
            exports
                .iter()
                .map(|(n, _)| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    Err(LoadError::WrongWorld {
        path: path.to_path_buf(),
        problem: format!(
            "missing export{} {} ({found})",
            if missing.len() == 1 { "" } else { "s" },
            missing
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })
}

/// Rewords wasmtime's link error for a user who does not know the linker.
pub fn explain_link_error(message: &str) -> String {
    if let Some(rest) = message.split("component imports ").nth(1) {
        let what = rest.split(", but").next().unwrap_or(rest).trim();
        return format!("it imports {what}, which matryoshka does not provide");
    }
    message.to_string()
}

/// Hex sha256 of a file, as the cache and the relay name components.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}
