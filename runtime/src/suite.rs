//! A loaded suite: a component compiled by [`crate::engine`], linked with the
//! host functions of [`crate::host`], ready to instantiate once per test.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::engine::{self, CacheDir, CompileSource, ComponentSource, LoadError};
use crate::host::{self, HostState, SuitePre};

/// A loaded suite: compiled, checked against the world, linked.
#[derive(Clone)]
pub struct LoadedSuite {
    /// The component file.
    pub path: PathBuf,
    /// Suite name: the file stem.
    pub name: String,
    /// Hex sha256 of the component bytes.
    pub sha256: String,
    /// The bytes, to hand to the next level.
    pub component: Arc<ComponentSource>,
    /// Whether compilation was skipped.
    pub source: CompileSource,
    /// Ready to instantiate, once per test.
    pub pre: SuitePre<HostState>,
    /// The engine it was compiled for.
    pub engine: wasmtime::Engine,
}

/// Loads, checks and links the component at `path`.
pub fn load(path: &Path, cache: &CacheDir) -> Result<LoadedSuite, LoadError> {
    let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    load_bytes(path, bytes, cache)
}

/// Loads, checks and links a component given as bytes; `path` names it in messages.
pub fn load_bytes(path: &Path, bytes: Vec<u8>, cache: &CacheDir) -> Result<LoadedSuite, LoadError> {
    let engine_error = |e: anyhow::Error| LoadError::Engine {
        path: path.to_path_buf(),
        message: format!("{e:#}"),
    };
    let engine = engine::engine().map_err(engine_error)?;
    let compiled = engine::compile(&engine, path, bytes, cache)?;
    let linker = host::linker(&engine).map_err(engine_error)?;
    let instance_pre =
        linker
            .instantiate_pre(&compiled.component)
            .map_err(|e| LoadError::WrongWorld {
                path: path.to_path_buf(),
                problem: engine::explain_link_error(&format!("{e:#}")),
            })?;
    let pre = SuitePre::new(instance_pre).map_err(|e| LoadError::WrongWorld {
        path: path.to_path_buf(),
        problem: format!("{e:#}"),
    })?;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "suite".into());
    Ok(LoadedSuite {
        path: path.to_path_buf(),
        name,
        sha256: compiled.sha256,
        component: Arc::new(compiled.origin),
        source: compiled.source,
        pre,
        engine,
    })
}
