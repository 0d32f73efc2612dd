//! The cache slot of a chain kept across runs (`runner/chain/kept.rs`): two
//! snapshots of L1's machine, with the levels inside it, each beside what it
//! needs to be restored in a later run.
//!
//! - `bare.json`: the chain as booted, no component, no grant (protocol 7's
//!   bare `Load`): any run that asks for the same chain can use it, attaching
//!   its component.
//! - `attached-<16 hex>.json`, up to [`KEEP_ATTACHED`]: the same chain with a
//!   component attached, named after the component's sha256 and the rights
//!   it came with: a run of the same suite with the same rights restores it
//!   and attaches nothing.
//!
//! Each names its state (`L1.<pid>.<ns>.state`, one per save, so runs saving
//! at once never mix bytes; the metadata, written last through a temporary
//! file, is the commit), what the chain was made of
//! ([`identity::of_chain`](crate::level::vm::identity::of_chain)), the
//! snapshot's machine and what L0 knew of L1. `id_ed25519` is the key the kept
//! levels accept. The folders are made and checked like every cache folder
//! ([`crate::engine::secure_dir`]), and a metadata file or state is read only
//! once it passes [`crate::engine::secure_file`]: the state is the memory of a
//! machine this runtime talks to, and the metadata holds L1's host key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::level::connection::Remembered;
use crate::level::vm::snapshot::Snapshot;

/// The layout of the metadata; another one is thrown away and saved anew.
const FORMAT: u32 = 1;

/// How many chains' slots the cache keeps (each holds up to two states of
/// L1's memory): saving one removes the least recently used beyond these.
const KEEP_SLOTS: usize = 3;

/// How many chains with a component attached a slot keeps (suites sharing
/// a chain each have their own): writing one removes the least recently used
/// beyond these.
const KEEP_ATTACHED: usize = 3;

/// A state that no metadata names is removed once it is this old (younger,
/// it may be a save whose metadata is being written).
const UNNAMED_GRACE: Duration = Duration::from_secs(120);

/// Which of a slot's snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// The chain as booted, holding no component.
    Bare,
    /// The chain with a component attached: 16 hex digits of the sha256 of
    /// what was attached (the component's sha256 and its rights).
    Attached(String),
}

impl Entry {
    /// The chain with `attachment` attached.
    pub fn attached(attachment: &str) -> Self {
        Self::Attached(crate::engine::sha256_hex(attachment.as_bytes())[..16].to_string())
    }

    fn meta_name(&self) -> String {
        match self {
            Self::Bare => "bare.json".into(),
            Self::Attached(key) => format!("attached-{key}.json"),
        }
    }

    /// `bare`, `with the component`: for messages.
    pub fn words(&self) -> &'static str {
        match self {
            Self::Bare => "bare",
            Self::Attached(_) => "with the component",
        }
    }
}

/// The metadata of a kept snapshot.
#[derive(Serialize, Deserialize)]
struct Meta {
    format: u32,
    made_of: BTreeMap<String, String>,
    saved_unix: u64,
    snapshot: Snapshot,
    remembered: Remembered,
}

/// A kept snapshot that matches this run, and what restoring it needs.
pub struct Kept {
    /// The saved state; its files are the saving run's until
    /// [`Chain::restore_kept`](super::Chain::restore_kept) moves them to this
    /// run's folder.
    pub snapshot: Snapshot,
    /// What the saving run knew of L1.
    pub remembered: Remembered,
    /// When it was saved, seconds since the epoch.
    pub saved_unix: u64,
}

impl Kept {
    /// How long ago it was saved, in seconds.
    pub fn age_secs(&self) -> u64 {
        unix_now().saturating_sub(self.saved_unix)
    }
}

/// What a slot holds for this run.
pub enum Lookup {
    /// A snapshot made of what this run would boot.
    Found(Box<Kept>),
    /// Nothing yet.
    Missing,
    /// A snapshot of an earlier chain: what changed since.
    Stale(String),
    /// A snapshot that cannot be used: why.
    Unusable(String),
}

/// The cache slot of one chain.
pub struct Store {
    root: PathBuf,
    dir: PathBuf,
}

impl Store {
    /// The slot under `cache` (the cache root) for a chain asked for as
    /// `asked`, made mode 0700 and checked like every cache folder.
    pub fn open(cache: &Path, asked: &serde_json::Value) -> Result<Self, String> {
        let text = serde_json::to_string(asked).map_err(|e| e.to_string())?;
        let slot = crate::engine::sha256_hex(text.as_bytes());
        let root = cache.join("snapshots");
        let dir = root.join(&slot[..16]);
        crate::engine::secure_dir(cache, &dir).map_err(|e| e.to_string())?;
        Ok(Self { root, dir })
    }

    /// The key the kept chain's levels accept.
    pub fn key_file(&self) -> PathBuf {
        self.dir.join("id_ed25519")
    }

    /// The folder of the slot.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn meta_file(&self, entry: &Entry) -> PathBuf {
        self.dir.join(entry.meta_name())
    }

    /// A new file for a state: runs saving the same chain at once each write
    /// their own, and the metadata written last names the one it describes.
    pub fn new_state_file(&self) -> PathBuf {
        let unique = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        self.dir
            .join(format!("L1.{}.{unique}.state", std::process::id()))
    }

    /// What the slot holds as `entry` for a chain made of `made_of`.
    pub fn lookup(&self, entry: &Entry, made_of: &BTreeMap<String, String>) -> Lookup {
        let file = self.meta_file(entry);
        let meta = match self.read_meta(entry) {
            Ok(Some(meta)) => meta,
            Ok(None) => return Lookup::Missing,
            Err(e) => return Lookup::Unusable(e),
        };
        if meta.format != FORMAT {
            return Lookup::Stale(format!(
                "it was kept in layout {}, this runtime reads {FORMAT}",
                meta.format
            ));
        }
        let changed: Vec<String> = made_of
            .iter()
            .filter(|(part, now)| meta.made_of.get(*part) != Some(*now))
            .map(|(part, _)| part.clone())
            .chain(
                meta.made_of
                    .keys()
                    .filter(|part| !made_of.contains_key(*part))
                    .cloned(),
            )
            .collect();
        if !changed.is_empty() {
            return Lookup::Stale(format!("changed since: {}", changed.join(", ")));
        }
        let Some(state) = self.state_of(&meta) else {
            return Lookup::Unusable(format!("{} names no state", file.display()));
        };
        if let Err(e) = crate::engine::secure_file(&state) {
            return Lookup::Unusable(e.to_string());
        }
        match std::fs::metadata(&state) {
            Ok(m) if m.len() == meta.snapshot.bytes => {}
            Ok(m) => {
                return Lookup::Unusable(format!(
                    "{} has {} bytes, {} were saved",
                    state.display(),
                    m.len(),
                    meta.snapshot.bytes
                ));
            }
            Err(e) => return Lookup::Unusable(format!("{}: {e}", state.display())),
        }
        // Used now: the last to be pruned.
        let _ = std::fs::File::open(&file).and_then(|f| f.set_modified(SystemTime::now()));
        let mut snapshot = meta.snapshot;
        snapshot.file = state;
        Lookup::Found(Box::new(Kept {
            snapshot,
            remembered: meta.remembered,
            saved_unix: meta.saved_unix,
        }))
    }

    /// The metadata of `entry`, once its file passed the cache's checks;
    /// `None` when there is none.
    fn read_meta(&self, entry: &Entry) -> Result<Option<Meta>, String> {
        self.read_meta_file(&self.meta_file(entry))
    }

    /// The metadata in `file`, once it passed the cache's checks; `None` when
    /// there is none.
    fn read_meta_file(&self, file: &Path) -> Result<Option<Meta>, String> {
        let file = file.to_path_buf();
        if !file.exists() {
            return Ok(None);
        }
        let text = crate::engine::secure_file(&file)
            .map_err(|e| e.to_string())
            .and_then(|()| std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display())))?;
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| format!("{} is unreadable: {e}", file.display()))
    }

    /// The state `meta` names, in this slot (by its name only: wherever the
    /// cache is now).
    fn state_of(&self, meta: &Meta) -> Option<PathBuf> {
        let name = meta.snapshot.file.file_name()?;
        name.to_str()
            .is_some_and(|n| n.starts_with("L1.") && n.ends_with(".state"))
            .then(|| self.dir.join(name))
    }

    /// Throws the slot's `entry` away (its key and the other entry stay).
    pub fn discard(&self, entry: &Entry) {
        if let Ok(Some(meta)) = self.read_meta(entry)
            && let Some(state) = self.state_of(&meta)
        {
            let _ = std::fs::remove_file(state);
        }
        let _ = std::fs::remove_file(self.meta_file(entry));
    }

    /// Writes the metadata of the snapshot just saved into the slot as
    /// `entry`, then removes the states no metadata names and the least
    /// recently used slots beyond [`KEEP_SLOTS`].
    pub fn write(
        &self,
        entry: &Entry,
        made_of: BTreeMap<String, String>,
        snapshot: &Snapshot,
        remembered: Remembered,
    ) -> Result<(), String> {
        let meta = Meta {
            format: FORMAT,
            made_of,
            saved_unix: unix_now(),
            snapshot: snapshot.clone(),
            remembered,
        };
        let file = self.meta_file(entry);
        let text = serde_json::to_vec_pretty(&meta).map_err(|e| e.to_string())?;
        crate::engine::write_atomically(&file, &text)
            .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
        if matches!(entry, Entry::Attached(_)) {
            self.prune_attached();
        }
        self.remove_unnamed_states();
        self.prune();
        Ok(())
    }

    /// The metadata files of the slot.
    fn meta_files(&self) -> Vec<PathBuf> {
        meta_files(&self.dir)
    }

    /// Removes the least recently used entries with a component attached
    /// beyond [`KEEP_ATTACHED`], with their states.
    fn prune_attached(&self) {
        let mut attached: Vec<(SystemTime, PathBuf)> = self
            .meta_files()
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("attached-"))
            })
            .map(|p| (modified(&p), p))
            .collect();
        attached.sort();
        let beyond = attached.len().saturating_sub(KEEP_ATTACHED);
        for (_, file) in attached.into_iter().take(beyond) {
            if let Ok(Some(meta)) = self.read_meta_file(&file)
                && let Some(state) = self.state_of(&meta)
            {
                let _ = std::fs::remove_file(state);
            }
            let _ = std::fs::remove_file(file);
        }
    }

    /// Removes the states that no metadata names (replaced ones; a run
    /// restoring one holds it open), past [`UNNAMED_GRACE`].
    fn remove_unnamed_states(&self) {
        let named: Vec<PathBuf> = self
            .meta_files()
            .iter()
            .filter_map(|f| self.read_meta_file(f).ok().flatten())
            .filter_map(|m| self.state_of(&m))
            .collect();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for path in entries.filter_map(Result::ok).map(|e| e.path()) {
            let old = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > UNNAMED_GRACE);
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            // States, and what saves that never ended left (`….partial.<pid>.<ns>`).
            let state = name.ends_with(".state") || name.contains(".partial.");
            if state && !named.contains(&path) && old {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    /// Removes the least recently used slots beyond [`KEEP_SLOTS`], this one
    /// aside.
    fn prune(&self) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        // A slot with no metadata yet may be one a run is booting a chain
        // for: its folder's own time counts.
        let used = |dir: &Path| {
            meta_files(dir)
                .iter()
                .map(|f| modified(f))
                .chain(std::iter::once(modified(dir)))
                .max()
                .unwrap_or(SystemTime::UNIX_EPOCH)
        };
        let mut others: Vec<(SystemTime, PathBuf)> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p != &self.dir)
            .map(|p| (used(&p), p))
            .collect();
        others.sort();
        let beyond = others.len().saturating_sub(KEEP_SLOTS - 1);
        for (_, dir) in others.into_iter().take(beyond) {
            tracing::info!("removing the kept snapshots {}", dir.display());
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The metadata files (`*.json`) in the slot `dir`.
fn meta_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect()
        })
        .unwrap_or_default()
}

/// When `path` last changed (the epoch when it cannot be told).
fn modified(path: &Path) -> SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Seconds since the epoch.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
