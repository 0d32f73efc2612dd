//! A chain's snapshot kept across runs (`--snapshot`, with a cache folder).
//!
//! The first run of a chain boots it bare (every level's runtime serving, no
//! component, no grant) and saves L1's machine, with the levels inside it,
//! into `<cache>/snapshots/<slot>/`; later runs restore it instead of booting
//! and attach their component. The slot is named after what the run asks of
//! the chain (levels, the bare setup the levels were handed, the image
//! folder); beside the state lie what the chain was made of
//! ([`identity::of_chain`]: runtimes, images, QEMU, accelerator), what its
//! parent knew of L1, and the key the levels accept (`id_ed25519`, kept so
//! that the printed `ssh` commands baked into the levels stay true). A
//! snapshot whose parts no longer match is rebuilt; one that is unreadable,
//! or fails to restore, is thrown away with a warning and the chain booted.
//!
//! The folders are made and checked like every cache folder
//! ([`crate::engine::secure_dir`]); the metadata is read
//! only once it passes [`crate::engine::secure_file`]: the state is the memory of a
//! machine this runtime talks to, and the metadata holds L1's host key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::{Chain, relay_to_tests, setup_for};
use crate::host::LevelContext;
use crate::level::connection::{Connection, Remembered};
use crate::level::vm::snapshot::Snapshot;
use crate::output::{Capture, OutputSink};
use crate::wire::RemoteError;

/// The layout of `meta.json`; another one is thrown away and saved anew.
const FORMAT: u32 = 1;

/// How many chains' snapshots the cache keeps (each holds L1's memory):
/// saving one removes the least recently used beyond these.
const KEEP_SLOTS: usize = 3;

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
    /// [`Chain::restore_kept`] moves them to this run's folder.
    pub snapshot: Snapshot,
    /// What the saving run knew of L1.
    pub remembered: Remembered,
    /// When it was saved, seconds since the epoch.
    pub saved_unix: u64,
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

    /// A new file for a state: runs saving the same chain at once each write
    /// their own, and the metadata written last names the one it describes.
    fn new_state_file(&self) -> PathBuf {
        let unique = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        self.dir
            .join(format!("L1.{}.{unique}.state", std::process::id()))
    }

    /// The states in the slot.
    fn states(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "state"))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn meta_file(&self) -> PathBuf {
        self.dir.join("meta.json")
    }

    /// What the slot holds for a chain made of `made_of`.
    pub fn lookup(&self, made_of: &BTreeMap<String, String>) -> Lookup {
        let text = match crate::engine::secure_file(&self.meta_file())
            .map_err(|e| e.to_string())
            .and_then(|()| std::fs::read(self.meta_file()).map_err(|e| e.to_string()))
        {
            Ok(text) => text,
            Err(_) if !self.meta_file().exists() => return Lookup::Missing,
            Err(e) => return Lookup::Unusable(format!("{}: {e}", self.meta_file().display())),
        };
        let meta: Meta = match serde_json::from_slice(&text) {
            Ok(meta) => meta,
            Err(e) => {
                return Lookup::Unusable(format!(
                    "{} is unreadable: {e}",
                    self.meta_file().display()
                ));
            }
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
        // Its name only: the file is in this slot, wherever the cache is now.
        let Some(name) = meta.snapshot.file.file_name() else {
            return Lookup::Unusable(format!("{} names no state", self.meta_file().display()));
        };
        let state = self.dir.join(name);
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
        let _ = std::fs::File::open(self.meta_file())
            .and_then(|f| f.set_modified(std::time::SystemTime::now()));
        let mut snapshot = meta.snapshot;
        snapshot.file = state;
        Lookup::Found(Box::new(Kept {
            snapshot,
            remembered: meta.remembered,
            saved_unix: meta.saved_unix,
        }))
    }

    /// Throws the slot's snapshot away (its key stays).
    pub fn discard(&self) {
        let _ = std::fs::remove_file(self.meta_file());
        for state in self.states() {
            let _ = std::fs::remove_file(state);
        }
    }

    /// Writes the metadata of the snapshot just saved into the slot, then
    /// removes the least recently used slots beyond [`KEEP_SLOTS`].
    fn write(
        &self,
        made_of: BTreeMap<String, String>,
        snapshot: &Snapshot,
        remembered: Remembered,
    ) -> Result<(), String> {
        let meta = Meta {
            format: FORMAT,
            made_of,
            saved_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            snapshot: snapshot.clone(),
            remembered,
        };
        let text = serde_json::to_vec_pretty(&meta).map_err(|e| e.to_string())?;
        crate::engine::write_atomically(&self.meta_file(), &text)
            .map_err(|e| format!("cannot write {}: {e}", self.meta_file().display()))?;
        // The states it replaced (a run restoring one holds it open).
        for state in self.states() {
            if state != snapshot.file {
                let _ = std::fs::remove_file(state);
            }
        }
        self.prune();
        Ok(())
    }

    /// Removes the least recently used slots beyond [`KEEP_SLOTS`], this one
    /// aside.
    fn prune(&self) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        let mut others: Vec<(std::time::SystemTime, PathBuf)> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p != &self.dir)
            .map(|p| {
                let used = std::fs::metadata(p.join("meta.json"))
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                (used, p)
            })
            .collect();
        others.sort();
        let beyond = others.len().saturating_sub(KEEP_SLOTS - 1);
        for (_, dir) in others.into_iter().take(beyond) {
            tracing::info!("removing the kept snapshot {}", dir.display());
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Chain {
    /// A chain of `levels` levels below `ctx`'s (a VM first) restored from
    /// `kept`, with its console and logs in this run's folder. It holds no
    /// component: [`Chain::attach`] gives it this run's. Each test after the
    /// first gets a copy restored from the same state.
    pub async fn restore_kept(
        ctx: &LevelContext,
        levels: u32,
        sink: Option<OutputSink>,
        kept: Kept,
    ) -> Result<Self, RemoteError> {
        let Kept {
            mut snapshot,
            remembered,
            ..
        } = kept;
        let lost = |message: String| RemoteError {
            kind: crate::wire::WireErrorKind::LevelLost,
            message,
            level_path: snapshot.machine.path.clone(),
        };
        let run_dir = ctx
            .vms
            .run_dir
            .path()
            .and_then(|d| std::path::absolute(&d).map_err(|e| e.to_string()))
            .map_err(lost)?;
        snapshot.machine = snapshot
            .machine
            .clone()
            .in_folder(&run_dir, ctx.vms.settings.keep_failed);
        snapshot.machine.jump = ctx.vms.settings.jump.clone();
        let (current, relay) = relay_to_tests(sink);
        let capture = Capture::forwarding(&ctx.level.path, usize::MAX, relay.clone());
        let conn = Connection::restore_remembered(
            remembered,
            &snapshot,
            capture,
            ctx.new_budget(),
            ctx.vms.settings.keep_failed,
        )
        .await?;
        // Saved with the levels below L1 stopped: they run on first.
        conn.pause_below(false).await?;
        // Its clocks stood still since the save.
        if let Err(e) = conn.set_clock().await {
            tracing::warn!("{}", e.message);
        }
        let mut chain = Self::with(ctx, conn, relay, current, None, levels, true);
        *chain.snapshot.get_mut().unwrap_or_else(|e| e.into_inner()) = Some(snapshot);
        Ok(chain)
    }

    /// Saves a chain booted bare into `store`'s slot, made of `made_of`, for
    /// later runs (and for this run's tests after the first, unless a save
    /// holding the component replaces it). Says how long saving took and how big the state is, or
    /// why there is no snapshot and what that means for the run.
    pub async fn keep(
        &mut self,
        store: &Store,
        made_of: BTreeMap<String, String>,
    ) -> Result<String, String> {
        let remembered = match &*self.conn.get_mut() {
            Some(conn) => conn.remembered(),
            None => return Err("the chain is down".into()),
        }
        .ok_or("the chain's first level is no VM level: nothing to save")?;
        let started = Instant::now();
        let saved = self.save_into(&store.new_state_file()).await?;
        if let Err(e) = store.write(made_of, &saved, remembered) {
            let _ = std::fs::remove_file(&saved.file);
            return Ok(format!(
                "saved {} in {:.1} s ({} MiB) for this run's tests, but not kept for later \
                 runs: {e}",
                saved.machine.path,
                saved.took.as_secs_f64(),
                saved.bytes >> 20
            ));
        }
        Ok(format!(
            "saved {} (and the levels inside it) bare in {:.1} s: {} MiB, kept in {} for \
             later runs",
            saved.machine.path,
            started.elapsed().as_secs_f64(),
            saved.bytes >> 20,
            store.dir.display()
        ))
    }
}

/// What a run asks of a chain of `levels` levels below `ctx`'s level, booted
/// bare: the slot of its snapshot kept across runs is named after it.
pub fn asked(ctx: &LevelContext, levels: u32) -> serde_json::Value {
    serde_json::json!({
        "levels": levels,
        "setup": setup_for(ctx, levels, true),
        "image_dir": ctx.vms.image_dir,
    })
}

/// `--snapshot` with a cache folder: the chain of `levels` VM levels below
/// `ctx`'s level restored from its snapshot kept in `store`, else booted bare
/// and kept there, then given `ctx`'s component. With `copies` (more than one
/// test to run on it), the chain is then saved again, holding the component,
/// for this run: each test after the first gets a copy restored from that,
/// with nothing to attach. `say` tells the person running what happened (and
/// why a snapshot was not used or not kept).
pub async fn boot_kept(
    ctx: &LevelContext,
    levels: u32,
    sink: Option<OutputSink>,
    store: &Store,
    copies: bool,
    say: &(dyn Fn(String) + Send + Sync),
) -> Result<Chain, RemoteError> {
    let mut chain = restore_or_keep(ctx, levels, sink, store, say).await?;
    if copies {
        match chain.save(ctx).await {
            Ok(said) => say(said),
            Err(why) => say(format!("warning: {why}")),
        }
    }
    Ok(chain)
}

/// The chain restored from the snapshot kept in `store`, else booted bare and
/// kept there; then given `ctx`'s component.
async fn restore_or_keep(
    ctx: &LevelContext,
    levels: u32,
    sink: Option<OutputSink>,
    store: &Store,
    say: &(dyn Fn(String) + Send + Sync),
) -> Result<Chain, RemoteError> {
    let made_of = {
        let vms = ctx.vms.clone();
        tokio::task::spawn_blocking(move || crate::level::vm::identity::of_chain(&vms, levels))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
    };
    let made_of = match made_of {
        Ok(m) => Some(m),
        Err(e) => {
            say(format!(
                "warning: cannot tell what the chain is made of ({e}): it is not kept for later runs"
            ));
            None
        }
    };
    if let Some(made_of) = &made_of {
        match store.lookup(made_of) {
            Lookup::Found(kept) => {
                let started = Instant::now();
                let age = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
                    .saturating_sub(kept.saved_unix);
                match Chain::restore_kept(ctx, levels, sink.clone(), *kept).await {
                    Ok(chain) => {
                        let restored = started.elapsed();
                        chain.attach(ctx).await?;
                        say(format!(
                            "restored {} from the snapshot kept in {} (saved {} ago) in {:.1} s, \
                             the component attached in {:.1} s",
                            chain.deepest(),
                            store.dir().display(),
                            age_words(age),
                            restored.as_secs_f64(),
                            (started.elapsed() - restored).as_secs_f64()
                        ));
                        return Ok(chain);
                    }
                    Err(e) => {
                        say(format!(
                            "warning: the snapshot kept in {} did not restore ({}); booting the \
                             chain to save it again",
                            store.dir().display(),
                            e.message
                        ));
                        store.discard();
                    }
                }
            }
            Lookup::Stale(why) => {
                say(format!(
                    "the snapshot kept in {} is stale ({why}); booting the chain to save it again",
                    store.dir().display()
                ));
                store.discard();
            }
            Lookup::Unusable(why) => {
                say(format!(
                    "warning: the snapshot kept in {} is unusable ({why}); booting the chain to \
                     save it again",
                    store.dir().display()
                ));
                store.discard();
            }
            Lookup::Missing => say(format!(
                "no snapshot of this chain is kept yet: booting it bare to keep one in {}",
                store.dir().display()
            )),
        }
    }
    let mut chain = Chain::boot(ctx, None, levels, sink, true).await?;
    let kept = match made_of {
        Some(made_of) => chain.keep(store, made_of).await,
        None => chain.save(ctx).await,
    };
    match kept {
        Ok(said) => say(said),
        Err(why) => say(format!("warning: {why}")),
    }
    chain.attach(ctx).await?;
    Ok(chain)
}

/// `40 s`, `12 min`, `3 h`, `2 days`.
fn age_words(secs: u64) -> String {
    match secs {
        0..120 => format!("{secs} s"),
        120..7200 => format!("{} min", secs / 60),
        7200..172_800 => format!("{} h", secs / 3600),
        _ => format!("{} days", secs / 86_400),
    }
}
