//! The terminal side of `--keep-failed`: how a hold ends (Enter, a time limit),
//! and `matryoshka monitor SOCKET`, which the printed monitor commands run at
//! every level (the same binary is at each; images carry no socat).

use std::future::Future;
use std::io::IsTerminal;
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::{Mutex, mpsc};

use super::{EXIT_COULD_NOT_RUN, EXIT_USAGE};
use crate::runner::keep::Hold;

/// Ends a hold when a line comes on stdin (Enter at a terminal, or a line a
/// script writes into a pipe once it has looked around) or after a time limit.
pub(super) struct TerminalHold {
    limit: Option<Duration>,
    /// Whether stdin is a terminal: only then is a hold without a time limit
    /// worth waiting for, and only there does its end (Ctrl-D) let go.
    terminal: bool,
    /// A message per line, from a thread reading stdin.
    lines: Mutex<mpsc::UnboundedReceiver<()>>,
}

impl TerminalHold {
    pub(super) fn new(limit: Option<Duration>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        // A thread, not a tokio task: the runtime must not wait for it at exit.
        std::thread::spawn(move || {
            let mut line = String::new();
            while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
                // A last line without its newline is not a line yet.
                if line.ends_with('\n') && tx.send(()).is_err() {
                    return;
                }
                line.clear();
            }
        });
        Self {
            limit,
            terminal: std::io::stdin().is_terminal(),
            lines: Mutex::new(rx),
        }
    }
}

impl Hold for TerminalHold {
    fn wait(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let enter = async {
                let mut lines = self.lines.lock().await;
                // Enter pressed before the hold (while the chain booted) does not end it.
                while lines.try_recv().is_ok() {}
                // At a terminal, Ctrl-D (the end of stdin) lets go too; the end of
                // a pipe or of /dev/null does not (CI runs have no stdin).
                if lines.recv().await.is_none() && !self.terminal {
                    std::future::pending::<()>().await;
                }
            };
            match (self.limit, self.terminal) {
                (Some(limit), _) => {
                    tokio::select! {
                        () = tokio::time::sleep(limit) => {}
                        () = enter => {}
                    }
                }
                (None, true) => enter.await,
                (None, false) => {}
            }
        })
    }

    fn until(&self) -> String {
        let limit = self
            .limit
            .map(|d| humantime::format_duration(d).to_string());
        match (limit, self.terminal) {
            (Some(l), true) => format!("press Enter to go on, or wait {l}; Ctrl-C ends the run"),
            (None, true) => "press Enter to go on; Ctrl-C ends the run".into(),
            (Some(l), false) => {
                format!("going on in {l} or after a line on stdin; Ctrl-C ends the run")
            }
            (None, false) => "not waiting: stdin is not a terminal \
                              (--keep-failed-for DURATION waits without one)"
                .into(),
        }
    }
}

/// `matryoshka monitor SOCKET`: copies stdin to the socket and the socket to
/// stdout until the monitor closes it or stdin ends.
pub(super) async fn monitor(socket: &Path) -> u8 {
    let stream = match tokio::net::UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "error: cannot connect to the monitor at {}: {e} (its level is gone, or \
                 was not booted with --keep-failed)",
                socket.display()
            );
            return if e.kind() == std::io::ErrorKind::NotFound {
                EXIT_USAGE
            } else {
                EXIT_COULD_NOT_RUN
            };
        }
    };
    let (mut from, mut to) = stream.into_split();
    let send = async {
        let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut to).await;
        // The monitor answers what it was sent before it sees the end.
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut to).await;
        std::future::pending::<()>().await;
    };
    let mut stdout = tokio::io::stdout();
    let receive = tokio::io::copy(&mut from, &mut stdout);
    tokio::select! {
        () = send => 0,
        copied = receive => match copied {
            Ok(_) => 0,
            Err(e) => {
                eprintln!("error: reading the monitor: {e}");
                EXIT_COULD_NOT_RUN
            }
        },
    }
}
