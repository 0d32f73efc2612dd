//! The one instance of the component a served connection keeps, and calls on it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use wasmtime::Store;

use super::up_sink;
use crate::host::{HostState, LevelContext, Suite};
use crate::output::Capture;
use crate::suite::LoadedSuite;
use crate::wire::{Message, RemoteError, RemoteEvent, WireErrorKind};

/// The one instance a connection keeps, re-created if a call traps.
pub(super) struct Instance {
    store: Store<HostState>,
    suite: Suite,
}

impl Instance {
    pub(super) async fn start(
        loaded: &LoadedSuite,
        ctx: &Arc<LevelContext>,
        out: &mpsc::UnboundedSender<Message>,
    ) -> Result<Self, String> {
        let capture = Capture::forwarding(&ctx.level.path, ctx.limits.output_bytes, up_sink(out));
        let state = HostState::new(ctx.clone(), capture).map_err(|e| format!("{e:#}"))?;
        let mut store = crate::runner::new_store(&loaded.engine, state);
        let suite = loaded
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(|e| format!("cannot instantiate the component: {e:#}"))?;
        Ok(Self { store, suite })
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one call's full context, used once"
    )]
    pub(super) async fn call(
        &mut self,
        loaded: &LoadedSuite,
        ctx: &Arc<LevelContext>,
        out: &mpsc::UnboundedSender<Message>,
        function: &str,
        args: Vec<u8>,
        deadline_ms: Option<u64>,
        id: u64,
        cancel: &mut mpsc::UnboundedReceiver<u64>,
    ) -> Result<Vec<u8>, RemoteError> {
        let path = ctx.level.path.clone();
        let err = |kind, message: String| RemoteError {
            kind,
            message,
            level_path: path.clone(),
        };
        self.store.data().capture().reset_budget();
        let outcome = {
            let store = &mut self.store;
            let suite = &self.suite;
            let call = suite.call_call(&mut *store, function, &args);
            let deadline = deadline_ms.map(Duration::from_millis);
            tokio::select! {
                r = async {
                    match deadline {
                        Some(d) => tokio::time::timeout(d, call).await.ok(),
                        None => Some(call.await),
                    }
                } => r.map(Some),
                () = cancelled(cancel, id) => Some(None),
            }
        };
        // Output spent here is the test's, wherever the test runs: say so before
        // the result, so the level above fails it as `output-limit`.
        if self.store.data().capture().exceeded().is_some() {
            let _ = out.send(Message::Event {
                level_path: path.clone(),
                event: RemoteEvent::OutputLimit,
            });
        }
        let mut kind = WireErrorKind::Internal;
        let trapped = match outcome {
            Some(Some(Ok(result))) => {
                // Only this runtime decides what is infrastructure: a call that failed
                // after a level below could not be booted or was lost failed for that
                // reason, whatever kind the component chose; an error the component
                // made up with kind `level-lost` is its own failure, not a lost level.
                let lost = self.store.data().infrastructure_error().is_some();
                return result.map_err(|e| {
                    let kind = WireErrorKind::from(e.kind);
                    match (lost, kind) {
                        (true, _) => RemoteError {
                            kind: WireErrorKind::LevelLost,
                            message: e.message,
                            level_path: e.level_path,
                        },
                        (false, WireErrorKind::LevelLost) => RemoteError {
                            kind: WireErrorKind::Internal,
                            message: format!(
                                "`{function}` at {path} returned an error of kind level-lost \
                                 while no level was lost: {}",
                                e.message
                            ),
                            level_path: path.to_string(),
                        },
                        (false, kind) => RemoteError {
                            kind,
                            message: e.message,
                            level_path: e.level_path,
                        },
                    }
                });
            }
            Some(Some(Err(trap))) => {
                let panic = self.store.data_mut().take_panic();
                match panic {
                    Some(f) => format!(
                        "`{function}` panicked at {path}: {}{}",
                        f.message,
                        f.file
                            .map(|file| format!(" ({file}:{})", f.line.unwrap_or(0)))
                            .unwrap_or_default()
                    ),
                    None => format!("`{function}` trapped at {path}: {trap:#}"),
                }
            }
            Some(None) => format!("`{function}` was cancelled at {path}"),
            None => {
                kind = WireErrorKind::Timeout;
                format!(
                    "`{function}` did not return within {} ms at {path}",
                    deadline_ms.unwrap_or_default()
                )
            }
        };
        // The instance is unusable after a trap or an abandoned call: start a new one.
        match Self::start(loaded, ctx, out).await {
            Ok(fresh) => *self = fresh,
            Err(e) => tracing::error!("cannot restart the instance: {e}"),
        }
        Err(err(
            kind,
            format!("{trapped}; the remote instance was restarted and its state is lost"),
        ))
    }
}

async fn cancelled(cancel: &mut mpsc::UnboundedReceiver<u64>, id: u64) {
    while let Some(c) = cancel.recv().await {
        if c == id {
            return;
        }
    }
    std::future::pending::<()>().await;
}
