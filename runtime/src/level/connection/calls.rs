//! Calls down a hop: a function of the component's `call` export, a test at
//! the deepest level of a chain, and the request/answer bookkeeping they share
//! (ids, deadlines, `Cancel`, a lost child's cause).

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::oneshot;

use std::sync::Arc;

use super::watch::{lock, lost_error};
use super::{Answer, Connection, RUN_SLACK, precompiled_for};
use crate::engine::ComponentSource;
use crate::event::Outcome;
use crate::wire::{
    Attachment, LevelSetup, Message, READY_TIMEOUT, RemoteError, WireErrorKind, WireOutcome,
};

impl Connection {
    /// Calls `function` of the component's `call` export at the child.
    pub async fn call(
        &self,
        function: &str,
        args: Vec<u8>,
        timeout: Option<Duration>,
    ) -> Result<Vec<u8>, RemoteError> {
        let what = format!("call of `{function}`");
        self.request(
            |id| Message::Call {
                id,
                function: function.to_string(),
                args,
                deadline_ms: timeout.map(|t| t.as_millis() as u64),
            },
            &what,
            timeout,
        )
        .await
    }

    /// Runs the test `name` at the deepest level of this chain, in a fresh instance.
    pub async fn run_test(&self, name: &str, timeout: Duration) -> Result<Outcome, RemoteError> {
        // The deepest level enforces the deadline; this one only outlasts it.
        let bytes = self
            .request(
                |id| Message::Run {
                    id,
                    name: name.to_string(),
                    deadline_ms: timeout.as_millis() as u64,
                },
                &format!("test `{name}`"),
                Some(timeout + RUN_SLACK),
            )
            .await?;
        postcard::from_bytes::<WireOutcome>(&bytes)
            .map(Outcome::from)
            .map_err(|e| RemoteError {
                kind: WireErrorKind::Internal,
                message: format!("the outcome of `{name}` did not decode: {e}"),
                level_path: self.info.path.clone(),
            })
    }

    /// Gives a child loaded bare (and the chain it booted) `component`, with
    /// the rights in `setup` (its grants, limits and environment; the rest is
    /// what the child was booted with).
    pub async fn attach(
        &self,
        component: &Arc<ComponentSource>,
        setup: &LevelSetup,
    ) -> Result<(), RemoteError> {
        let attachment = Box::new(Attachment {
            component_sha256: component.sha256.clone(),
            bytes: component.bytes.clone(),
            precompiled: precompiled_for(component, &self.info.arch).await,
            grants: setup.grants.clone(),
            limits: setup.limits,
            nest: setup.nest,
            env: setup.env.clone(),
        });
        let what = format!(
            "attach of component {} ({} bytes)",
            component.sha256.get(..12).unwrap_or(&component.sha256),
            component.bytes.len()
        );
        self.request(
            |id| Message::Attach { id, attachment },
            &what,
            Some(READY_TIMEOUT),
        )
        .await
        .map(|_| ())
    }

    pub(super) async fn request(
        &self,
        message: impl FnOnce(u64) -> Message,
        what: &str,
        timeout: Option<Duration>,
    ) -> Result<Vec<u8>, RemoteError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            // Checked and registered under the `lost` lock: `declare_lost` drains
            // `pending` under the same lock, so this call is either refused or answered.
            let lost = lock(&self.lost);
            if let Some(cause) = lost.clone() {
                return Err(self.lost_error(&cause));
            }
            lock(&self.pending).insert(id, tx);
        }
        self.journal.note(&format!("→ {what} #{id}"));
        let result = self.await_answer(id, rx, message, what, timeout).await;
        self.journal.note(&match &result {
            Ok(bytes) => format!("← #{id} answered ({} bytes)", bytes.len()),
            Err(e) => format!("← #{id} {:?}: {}", e.kind, e.message),
        });
        result
    }

    async fn await_answer(
        &self,
        id: u64,
        rx: oneshot::Receiver<Answer>,
        message: impl FnOnce(u64) -> Message,
        what: &str,
        timeout: Option<Duration>,
    ) -> Result<Vec<u8>, RemoteError> {
        if self.out.send(message(id)).await.is_err() {
            lock(&self.pending).remove(&id);
            let cause = lock(&self.lost)
                .clone()
                .unwrap_or_else(|| "connection closed".into());
            return Err(self.lost_error(&cause));
        }
        let answer = match timeout {
            Some(t) => match tokio::time::timeout(t, rx).await {
                Ok(answer) => answer,
                Err(_) => {
                    lock(&self.pending).remove(&id);
                    let _ = self.out.try_send(Message::Cancel { id });
                    return Err(RemoteError {
                        kind: WireErrorKind::Timeout,
                        message: format!(
                            "{what} at {} did not return within {:.1} s",
                            self.info.path,
                            t.as_secs_f64()
                        ),
                        level_path: self.info.path.clone(),
                    });
                }
            },
            None => rx.await,
        };
        match answer {
            Ok(Answer::Reply(result)) => result,
            Ok(Answer::Lost(cause)) => Err(self.lost_error(&cause)),
            Err(_) => {
                let cause = lock(&self.lost)
                    .clone()
                    .unwrap_or_else(|| "connection closed".into());
                Err(self.lost_error(&cause))
            }
        }
    }

    pub(super) fn lost_error(&self, cause: &str) -> RemoteError {
        lost_error(&self.info.path, cause)
    }
}
