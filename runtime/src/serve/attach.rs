//! A served level's component: loaded at `Load`, or later with an `Attach`
//! when the level was loaded bare (a chain booted to be saved), and the one
//! instance that takes the parent's calls.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::instance::Instance;
use crate::config::{Grants, NestLimits, SshSettings};
use crate::engine::{self, CacheDir, ComponentSource};
use crate::host::LevelContext;
use crate::level::LevelInfo;
use crate::level::budget::{LevelBudget, ParentLink};
use crate::level::vm::VmContext;
use crate::runner::Chain;
use crate::suite::{self, LoadedSuite};
use crate::wire::{Attachment, LevelSetup, Message, RemoteError, WireErrorKind, WireLimits};

/// What a served level is, whatever component it gets: where it sits, how it
/// reaches and boots levels below, and the link its levels are counted through.
pub(super) struct Place {
    pub(super) level: LevelInfo,
    pub(super) ssh: Option<SshSettings>,
    pub(super) vms: Arc<VmContext>,
    pub(super) link: Arc<ParentLink>,
}

/// What a component may do at a level: from `Load`, or from an `Attach`.
#[derive(Clone)]
pub(super) struct Rights {
    pub(super) grants: Grants,
    pub(super) limits: WireLimits,
    pub(super) nest: NestLimits,
    pub(super) env: Vec<(String, String)>,
}

impl From<&LevelSetup> for Rights {
    fn from(setup: &LevelSetup) -> Self {
        Self {
            grants: setup.grants.clone(),
            limits: setup.limits,
            nest: setup.nest,
            env: setup.env.clone(),
        }
    }
}

impl Place {
    /// The context of this level's instances (and of the chain it boots).
    pub(super) fn context(
        &self,
        rights: Rights,
        component: Option<Arc<ComponentSource>>,
    ) -> Arc<LevelContext> {
        Arc::new(LevelContext {
            level: self.level.clone(),
            grants: rights.grants,
            limits: rights.limits.into(),
            nest: rights.nest,
            env: rights.env,
            ssh: self.ssh.clone(),
            component,
            vms: self.vms.clone(),
            parent_budget: Some(LevelBudget::via_parent(self.link.clone())),
        })
    }
}

/// A call from the parent for the instance: id, function, arguments, deadline.
pub(super) type CallJob = (u64, String, Vec<u8>, Option<u64>);

/// A level with its component: the loaded suite, the context of its
/// instances, and the one instance that runs the parent's calls one at a time.
pub(super) struct Attached {
    pub(super) loaded: Arc<LoadedSuite>,
    pub(super) ctx: Arc<LevelContext>,
    pub(super) calls: mpsc::UnboundedSender<CallJob>,
    pub(super) cancel: mpsc::UnboundedSender<u64>,
    worker: JoinHandle<()>,
}

impl Attached {
    /// Starts the instance and the task that runs calls on it.
    async fn start(
        loaded: LoadedSuite,
        ctx: Arc<LevelContext>,
        out: &mpsc::UnboundedSender<Message>,
    ) -> Result<Self, String> {
        let loaded = Arc::new(loaded);
        let mut instance = Instance::start(&loaded, &ctx, out).await?;
        let (calls, mut calls_rx) = mpsc::unbounded_channel::<CallJob>();
        let (cancel, mut cancel_rx) = mpsc::unbounded_channel::<u64>();
        let worker = {
            let (out, ctx, loaded) = (out.clone(), ctx.clone(), loaded.clone());
            tokio::spawn(async move {
                while let Some((id, function, args, deadline)) = calls_rx.recv().await {
                    let result = instance
                        .call(
                            &loaded,
                            &ctx,
                            &out,
                            &function,
                            args,
                            deadline,
                            id,
                            &mut cancel_rx,
                        )
                        .await;
                    let _ = out.send(Message::Return { id, result });
                }
            })
        };
        Ok(Self {
            loaded,
            ctx,
            calls,
            cancel,
            worker,
        })
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        // The instance goes with its task, and with it the guests it holds.
        self.worker.abort();
    }
}

impl Attached {
    /// Loads `bytes` (hashing to `sha256`, compiled or from `cache`) with
    /// `rights` at `place`, and starts its instance.
    pub(super) async fn load(
        bytes: Vec<u8>,
        sha256: &str,
        place: &Place,
        rights: Rights,
        cache: &CacheDir,
        out: &mpsc::UnboundedSender<Message>,
    ) -> Result<Self, String> {
        let cache = cache.clone();
        let label = PathBuf::from(format!("{sha256}.wasm"));
        let loaded =
            match tokio::task::spawn_blocking(move || suite::load_bytes(&label, bytes, &cache))
                .await
            {
                Ok(Ok(suite)) => suite,
                Ok(Err(e)) => return Err(e.to_string()),
                Err(e) => return Err(format!("loading the component panicked: {e}")),
            };
        let ctx = place.context(rights, Some(loaded.component.clone()));
        Self::start(loaded, ctx, out).await
    }
}

/// Gives a bare level the component an `Attach` brought: checked, kept in
/// `cache`, loaded and instantiated here, then attached to every level of
/// `chain` (booted bare below this one).
pub(super) async fn attach(
    attachment: Attachment,
    place: &Place,
    chain: Option<&Chain>,
    cache: &CacheDir,
    out: &mpsc::UnboundedSender<Message>,
) -> Result<Attached, RemoteError> {
    let path = place.level.path.clone();
    let err = |kind, message: String| RemoteError {
        kind,
        message,
        level_path: path.clone(),
    };
    let started = std::time::Instant::now();
    let Attachment {
        component_sha256: sha,
        bytes,
        precompiled,
        grants,
        limits,
        nest,
        env,
    } = attachment;
    let got = engine::sha256_hex(&bytes);
    if got != sha {
        return Err(err(
            WireErrorKind::InvalidArgument,
            format!("the attached component's bytes hash to {got}, expected {sha}"),
        ));
    }
    engine::store_component(cache, &sha, &bytes);
    if let Some((key, artifact)) = precompiled {
        engine::adopt_artifact(cache, &key, &sha, &artifact);
    }
    let rights = Rights {
        grants,
        limits,
        nest,
        env,
    };
    // Handed down while it loads here: each level of the chain passes it on
    // before it loads it, so the levels load at once, not one after another.
    let below = place.context(
        rights.clone(),
        Some(Arc::new(engine::source_of(bytes.clone(), &sha, cache))),
    );
    let attach_below = async {
        match chain {
            Some(chain) => chain.attach(&below).await,
            None => Ok(()),
        }
    };
    let (attached, below) = tokio::join!(
        Attached::load(bytes, &sha, place, rights, cache, out),
        attach_below
    );
    let attached = attached.map_err(|m| err(WireErrorKind::Internal, m))?;
    below?;
    tracing::info!(
        level = %path,
        "component {} attached here and below in {} ms",
        sha.get(..12).unwrap_or(&sha),
        started.elapsed().as_millis()
    );
    Ok(attached)
}
