//! A chain of VM levels booted for a run (`--levels N`), whose deepest level
//! runs every test.

use std::sync::Arc;
use std::time::Duration;

use super::failure;
use crate::event::{FailureKind, Outcome};
use crate::host::LevelContext;
use crate::level::Target;
use crate::level::connection::Connection;
use crate::level::vm::VmRequest;
use crate::output::{Capture, OutputSink};
use crate::wire::RemoteError;

/// A chain of VM levels booted for a run (`--levels N`), whose deepest level runs
/// every test. Output relayed from it goes to the capture of the running test.
pub struct Chain {
    conn: Connection,
    current: Arc<std::sync::Mutex<Option<Arc<Capture>>>>,
    deepest: String,
}

impl Chain {
    /// Boots `levels` VM levels below `ctx`'s level, each from the image the level
    /// above booted from; `sink` receives what levels below write outside tests.
    pub async fn boot(
        ctx: &LevelContext,
        levels: u32,
        sink: Option<OutputSink>,
    ) -> Result<Self, RemoteError> {
        let current: Arc<std::sync::Mutex<Option<Arc<Capture>>>> = Arc::default();
        let relay: OutputSink = {
            let current = current.clone();
            Arc::new(move |origin: &str, stream, text: &str| {
                let test = current.lock().unwrap_or_else(|e| e.into_inner()).clone();
                match (test, &sink) {
                    (Some(capture), _) => {
                        let _ = capture.write_from(origin, stream, text.as_bytes());
                    }
                    (None, Some(sink)) => sink(origin, stream, text),
                    (None, None) => {}
                }
            })
        };
        let capture = Capture::forwarding(&ctx.level.path, usize::MAX, relay);
        let setup = ctx.child_setup(levels.saturating_sub(1));
        let depth = setup.depth;
        let request = VmRequest {
            arch: (depth as usize)
                .checked_sub(1)
                .and_then(|i| ctx.vms.settings.chain_arch.get(i))
                .cloned(),
            ..VmRequest::default()
        };
        let conn = Connection::open(
            &Target::Vm(request),
            setup,
            ctx.component.clone(),
            capture,
            &ctx.vms,
            ctx.ssh.as_ref(),
            ctx.new_budget(),
        )
        .await?;
        let deepest = (depth..depth + levels.max(1))
            .fold(ctx.level.path.clone(), |path, d| format!("{path}/L{d}"));
        Ok(Self {
            conn,
            current,
            deepest,
        })
    }

    /// The level path of the deepest level.
    pub fn deepest(&self) -> String {
        self.deepest.clone()
    }

    /// Runs `name` at the deepest level for a level above, whose output goes on up.
    pub async fn forward_run(&self, name: &str, timeout: Duration) -> Result<Outcome, RemoteError> {
        self.conn.run_test(name, timeout).await
    }

    /// Runs `name` at the deepest level, its output going into `capture`.
    pub async fn run_test(&self, name: &str, timeout: Duration, capture: &Arc<Capture>) -> Outcome {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(capture.clone());
        let result = self.conn.run_test(name, timeout).await;
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
        match result {
            Ok(outcome) => outcome,
            Err(e) => Outcome::Failed(failure(FailureKind::Infrastructure, e.message, None)),
        }
    }
}
