//! A chain kept across runs (`--levels N`, with a cache folder; its cache slot
//! is [`Store`]).
//!
//! A run first looks for the chain kept with its own component and rights
//! ([`Entry::Attached`], one per component and rights): restored, it serves at once. Else it restores the
//! chain kept bare ([`Entry::Bare`], no component, no grant), or boots it bare
//! and keeps it; attaches its component; and keeps that too, for its own
//! tests after the first and for the next run of the same suite. The slot is
//! named after what the run asks of the chain (levels, the bare setup the
//! levels are handed, the image folder); the key the levels accept is kept
//! in it, since each level keeps that key's path and its parent's hops in the
//! `ssh` commands it prints. A snapshot whose parts no longer match is
//! rebuilt; one that is unreadable, or fails to restore, is thrown away with
//! a warning.

use std::collections::BTreeMap;
use std::time::Instant;

use super::store::{Entry, Kept, Lookup, Store};
use super::{Chain, relay_to_tests, setup_for};
use crate::host::LevelContext;
use crate::level::connection::Connection;
use crate::output::{Capture, OutputSink};
use crate::wire::RemoteError;

/// Where a kept chain tells the person running what happened.
type Say<'a> = &'a (dyn Fn(String) + Send + Sync);

impl Chain {
    /// A chain of `levels` levels below `ctx`'s (a VM first) restored from
    /// `kept`, with its console and logs in this run's folder. When `bare`, it
    /// holds no component: [`Chain::attach`] gives it this run's. Each test
    /// after the first gets a copy restored from the same state (attached the
    /// component too, when `bare`).
    pub async fn restore_kept(
        ctx: &LevelContext,
        levels: u32,
        sink: Option<OutputSink>,
        kept: Kept,
        bare: bool,
    ) -> Result<Self, RemoteError> {
        let Kept {
            mut snapshot,
            remembered,
            ..
        } = kept;
        let path = snapshot.machine.path.clone();
        let lost = |message: String| RemoteError {
            kind: crate::wire::WireErrorKind::LevelLost,
            message,
            level_path: path.clone(),
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
        // Every copy of this run reads this file, whatever another run does
        // to the slot meanwhile.
        snapshot.hold().map_err(lost)?;
        // The initramfs QEMU loads again at each restore stays in its cache
        // as long as the chain is used.
        crate::engine::mark_used(&snapshot.machine.spec.initrd);
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
        let mut chain = Self::with(ctx, conn, relay, current, None, levels, bare);
        *chain.snapshot.get_mut().unwrap_or_else(|e| e.into_inner()) = Some(snapshot);
        Ok(chain)
    }

    /// Saves the chain into `store`'s slot as `entry`, made of `made_of`, for
    /// later runs and for this run's tests after the first. Says how long
    /// saving took and how big the state is, or why there is no snapshot and
    /// what that means for the run.
    pub async fn keep(
        &mut self,
        store: &Store,
        entry: Entry,
        made_of: BTreeMap<String, String>,
    ) -> Result<String, String> {
        let remembered = match &*self.conn.get_mut() {
            Some(conn) => conn.remembered(),
            None => return Err("the chain is down".into()),
        }
        .ok_or("the chain's first level is no VM level: nothing to save")?;
        let saved = self.save_into(&store.new_state_file()).await?;
        if matches!(entry, Entry::Attached(_)) {
            // Copies of this save hold the component already.
            self.bare = false;
        }
        let (path, took, mib) = (
            saved.machine.path.clone(),
            saved.took.as_secs_f64(),
            saved.bytes >> 20,
        );
        if let Err(e) = store.write(&entry, made_of, &saved, remembered) {
            return Ok(format!(
                "saved {path} {} in {took:.1} s ({mib} MiB) for this run's tests, but not \
                 kept for later runs: {e}",
                entry.words()
            ));
        }
        Ok(format!(
            "saved {path} (and the levels inside it) {} in {took:.1} s: {mib} MiB, kept in {} \
             for later runs",
            entry.words(),
            store.dir().display()
        ))
    }
}

/// What a run asks of a chain of `levels` levels below `ctx`'s level, booted
/// bare: the slot of its snapshots kept across runs is named after it.
pub fn asked(ctx: &LevelContext, levels: u32) -> serde_json::Value {
    serde_json::json!({
        "levels": levels,
        "setup": setup_for(ctx, levels, true),
        "image_dir": ctx.vms.image_dir,
    })
}

/// The component `ctx` attaches to a chain of `levels`, with its rights
/// (grants, limits, environment): its sha256 and theirs.
fn attachment(ctx: &LevelContext, levels: u32) -> Option<String> {
    let component = ctx.component.as_ref()?;
    let setup = setup_for(ctx, levels, false);
    let rights = serde_json::json!({
        "grants": setup.grants,
        "limits": setup.limits,
        "nest": setup.nest,
        "env": setup.env,
    });
    Some(format!(
        "{} with rights {}",
        component.sha256,
        crate::engine::sha256_hex(rights.to_string().as_bytes())
    ))
}

/// `--snapshot` with a cache folder: the chain of `levels` VM levels below
/// `ctx`'s level, serving `ctx`'s component, restored from what `store`
/// keeps or booted and kept there (see the module's text). Without knowing
/// what the chain is made of, it is booted with the component and, with
/// `copies` (more than one test to run on it), saved for this run only.
/// `say` tells the person running what happened (and why a snapshot was not
/// used or not kept).
pub async fn boot_kept(
    ctx: &LevelContext,
    levels: u32,
    sink: Option<OutputSink>,
    store: &Store,
    copies: bool,
    say: Say<'_>,
) -> Result<Chain, RemoteError> {
    let made_of = {
        let vms = ctx.vms.clone();
        tokio::task::spawn_blocking(move || crate::level::vm::identity::of_chain(&vms, levels))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
    };
    let made_of = match made_of {
        // The levels accept the key they were booted with: a chain kept with
        // another is booted again.
        Ok(mut m) => {
            if let Some(line) = ctx.vms.key_line() {
                m.insert("key".into(), line);
            }
            m
        }
        Err(e) => {
            say(format!(
                "warning: cannot tell what the chain is made of ({e}): it is not kept for later runs"
            ));
            let mut chain = Chain::boot(ctx, None, levels, sink, false).await?;
            if copies {
                match chain.save(ctx).await {
                    Ok(said) => say(said),
                    Err(why) => say(format!("warning: {why}")),
                }
            }
            return Ok(chain);
        }
    };
    let attached = attachment(ctx, levels).map(|a| {
        let mut m = made_of.clone();
        m.insert("component".into(), a.clone());
        (Entry::attached(&a), m)
    });
    if let Some((entry, attached)) = &attached
        && let Some(chain) = restore_entry(ctx, levels, &sink, store, entry, attached, say).await
    {
        return Ok(chain);
    }
    let mut chain =
        match restore_entry(ctx, levels, &sink, store, &Entry::Bare, &made_of, say).await {
            Some(chain) => match attach(&chain, ctx, say).await {
                Ok(()) => chain,
                // The kept copy is the suspect: it goes, and the chain is booted.
                Err(e) => {
                    say(format!(
                        "warning: the chain restored bare from {} did not take the component ({}); \
                     it is booted again",
                        store.dir().display(),
                        e.message
                    ));
                    drop(chain);
                    store.discard(&Entry::Bare);
                    let chain = boot_and_keep(ctx, levels, sink, store, made_of, say).await?;
                    attach(&chain, ctx, say).await?;
                    chain
                }
            },
            None => {
                let chain = boot_and_keep(ctx, levels, sink, store, made_of, say).await?;
                attach(&chain, ctx, say).await?;
                chain
            }
        };
    if let Some((entry, attached)) = attached {
        match chain.keep(store, entry, attached).await {
            Ok(said) => say(said),
            Err(why) => say(format!("warning: {why}")),
        }
    }
    Ok(chain)
}

/// Gives `chain` `ctx`'s component, saying how long it took.
async fn attach(chain: &Chain, ctx: &LevelContext, say: Say<'_>) -> Result<(), RemoteError> {
    let started = Instant::now();
    chain.attach(ctx).await?;
    say(format!(
        "attached the component to {} in {:.1} s",
        chain.deepest(),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// The chain booted bare and kept in `store` as made of `made_of`.
async fn boot_and_keep(
    ctx: &LevelContext,
    levels: u32,
    sink: Option<OutputSink>,
    store: &Store,
    made_of: BTreeMap<String, String>,
    say: Say<'_>,
) -> Result<Chain, RemoteError> {
    let mut chain = Chain::boot(ctx, None, levels, sink, true).await?;
    match chain.keep(store, Entry::Bare, made_of).await {
        Ok(said) => say(said),
        Err(why) => say(format!("warning: {why}")),
    }
    Ok(chain)
}

/// The chain restored from `store`'s `entry` when it holds one made of
/// `made_of`; `None` otherwise, after throwing away what no longer serves
/// (and saying so, but for a chain kept with another component).
async fn restore_entry(
    ctx: &LevelContext,
    levels: u32,
    sink: &Option<OutputSink>,
    store: &Store,
    entry: &Entry,
    made_of: &BTreeMap<String, String>,
    say: Say<'_>,
) -> Option<Chain> {
    let dir = store.dir().display();
    let words = entry.words();
    match store.lookup(entry, made_of) {
        Lookup::Found(kept) => {
            let started = Instant::now();
            let age = kept.age_secs();
            match Chain::restore_kept(ctx, levels, sink.clone(), *kept, *entry == Entry::Bare).await
            {
                Ok(chain) => {
                    say(format!(
                        "restored {} ({words}) from the snapshot kept in {dir} (saved {} ago) \
                         in {:.1} s",
                        chain.deepest(),
                        age_words(age),
                        started.elapsed().as_secs_f64()
                    ));
                    return Some(chain);
                }
                Err(e) => say(format!(
                    "warning: the snapshot kept {words} in {dir} did not restore ({}); it is \
                     saved again",
                    e.message
                )),
            }
        }
        Lookup::Stale(why) if matches!(entry, Entry::Attached(_)) => {
            tracing::info!("the snapshot kept {words} in {dir} is stale ({why})");
        }
        Lookup::Stale(why) => say(format!(
            "the snapshot kept {words} in {dir} is stale ({why}); booting the chain to save it \
             again"
        )),
        Lookup::Unusable(why) => say(format!(
            "warning: the snapshot kept {words} in {dir} is unusable ({why}); it is saved again"
        )),
        Lookup::Missing if *entry == Entry::Bare => say(format!(
            "no snapshot of this chain is kept yet: booting it bare to keep one in {dir}"
        )),
        Lookup::Missing => return None,
    }
    store.discard(entry);
    None
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
