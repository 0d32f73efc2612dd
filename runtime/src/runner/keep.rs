//! `--keep-failed`: after a test fails, the chain it ran on stays up while a
//! person looks into it; the runner prints how to reach each level and waits
//! until the [`Hold`] ends.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::Chain;
use crate::event::{KeptLevel, TestEvent, TestId};
use crate::host::LevelContext;

/// What ends a hold: a person pressing Enter, a time limit. Provided by the
/// command line, which knows the terminal.
pub trait Hold: Send + Sync {
    /// Waits until the levels may go.
    fn wait(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
    /// How the hold ends, for the message (`press Enter, or wait 60 s`).
    fn until(&self) -> String;
}

/// Holds `chain` after `test` failed (at L0, whose run folder gets the SSH
/// configuration): tells the reporters how to reach each level, then waits.
/// A chain that is down, or one held already for the loss that failed this
/// test, is not held.
pub(super) async fn hold(
    chain: &Chain,
    ctx: &LevelContext,
    hold: &Arc<dyn Hold>,
    test: &TestId,
    infrastructure: bool,
    events: &mpsc::UnboundedSender<TestEvent>,
) {
    if !chain.worth_keeping(infrastructure).await {
        return;
    }
    let levels = chain.access().await;
    let written = ctx.vms.run_dir.path().and_then(|dir| {
        // Absolute, so that the printed commands work from any folder.
        let dir = std::path::absolute(&dir).map_err(|e| e.to_string())?;
        let key = ctx
            .vms
            .key_file()
            .or_else(|| {
                ctx.ssh
                    .as_ref()
                    .and_then(|s| s.key_path.clone())
                    .map(Into::into)
            })
            .unwrap_or_else(|| dir.join("id_ed25519"));
        let key = std::path::absolute(&key).map_err(|e| e.to_string())?;
        let pinned = ctx.ssh.as_ref().map_or("", |s| s.known_hosts.as_str());
        crate::level::access::write(&dir, &levels, &key, pinned)
    });
    let (config, reached) = match written {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!("--keep-failed: {e}; not holding the chain");
            return;
        }
    };
    let _ = events.send(TestEvent::LevelsKept {
        test: test.clone(),
        levels: reached
            .into_iter()
            .map(|r| KeptLevel {
                path: r.path,
                shell: r.shell,
                monitor: r.monitor,
                note: r.note,
            })
            .collect(),
        ssh_config: config.display().to_string(),
        until: hold.until(),
    });
    hold.wait().await;
}
