//! How many levels one test holds at once, counted over its whole chain.
//!
//! The count lives at L0, one [`LevelBudget::root`] per test instance (and one
//! for a `--levels` chain). A level below asks its parent before it opens a
//! level ([`LevelBudget::via_parent`] sends `Acquire` up the hop); each parent
//! passes the question on to its own budget, so every request reaches the root,
//! which grants it while fewer than `--max-levels` are held. A connection
//! remembers what its child's subtree holds and gives it all back when the child
//! goes, lost or not, so a dead subtree never keeps the count up.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::wire::{Message, RemoteError, WireErrorKind};

/// How long a level waits for its parent to answer an `Acquire`.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

/// The levels a test may still open.
pub struct LevelBudget {
    kind: Kind,
}

enum Kind {
    /// The count itself (L0).
    Root { max: u32, held: Mutex<u32> },
    /// Asks the parent level, over the relay.
    Parent(Arc<ParentLink>),
}

impl LevelBudget {
    /// A budget of `max` levels held at once, counted here.
    pub fn root(max: u32) -> Arc<Self> {
        Arc::new(Self {
            kind: Kind::Root {
                max,
                held: Mutex::new(0),
            },
        })
    }

    /// A budget kept by the parent level, reached through `link`.
    pub fn via_parent(link: Arc<ParentLink>) -> Arc<Self> {
        Arc::new(Self {
            kind: Kind::Parent(link),
        })
    }

    /// Takes one level for `path`, or says why not (kind `denied`).
    pub async fn acquire(&self, path: &str) -> Result<(), RemoteError> {
        match &self.kind {
            Kind::Root { max, held } => {
                let mut held = held.lock().unwrap_or_else(|e| e.into_inner());
                if *held >= *max {
                    return Err(RemoteError {
                        kind: WireErrorKind::Denied,
                        message: format!(
                            "cannot open {path}: the test already holds {held} levels, the most \
                             --max-levels allows ({max}); raise it with --max-levels N",
                            held = *held
                        ),
                        level_path: path.to_string(),
                    });
                }
                *held += 1;
                Ok(())
            }
            Kind::Parent(link) => link.acquire(path).await,
        }
    }

    /// Gives `count` levels back.
    pub fn release(&self, count: u32) {
        if count == 0 {
            return;
        }
        match &self.kind {
            Kind::Root { held, .. } => {
                let mut held = held.lock().unwrap_or_else(|e| e.into_inner());
                *held = held.saturating_sub(count);
            }
            Kind::Parent(link) => link.send(Message::Release { count }),
        }
    }

    /// Levels held now, when counted here.
    pub fn held(&self) -> Option<u32> {
        match &self.kind {
            Kind::Root { held, .. } => Some(*held.lock().unwrap_or_else(|e| e.into_inner())),
            Kind::Parent(_) => None,
        }
    }
}

impl std::fmt::Debug for LevelBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Root { max, .. } => f
                .debug_struct("LevelBudget")
                .field("max", max)
                .field("held", &self.held())
                .finish(),
            Kind::Parent(_) => f.write_str("LevelBudget(via the parent level)"),
        }
    }
}

type Sender = Box<dyn Fn(Message) -> bool + Send + Sync>;

/// A serving level's way up to its parent for budget questions.
pub struct ParentLink {
    send: Sender,
    pending: Mutex<HashMap<u64, oneshot::Sender<Result<(), RemoteError>>>>,
    next: AtomicU64,
}

impl ParentLink {
    /// A link that sends messages with `send` (false when the parent is gone).
    pub fn new(send: impl Fn(Message) -> bool + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(Self {
            send: Box::new(send),
            pending: Mutex::default(),
            next: AtomicU64::new(1),
        })
    }

    fn send(&self, msg: Message) {
        let _ = (self.send)(msg);
    }

    async fn acquire(&self, path: &str) -> Result<(), RemoteError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let gone = |why: &str| RemoteError {
            kind: WireErrorKind::LevelLost,
            message: format!("cannot open {path}: {why}"),
            level_path: path.to_string(),
        };
        if !(self.send)(Message::Acquire {
            id,
            path: path.to_string(),
        }) {
            self.forget(id);
            return Err(gone("the parent level is gone"));
        }
        match tokio::time::timeout(ACQUIRE_TIMEOUT, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(gone("the parent level is gone")),
            Err(_) => {
                self.forget(id);
                Err(gone(&format!(
                    "the parent level did not answer within {} s whether another level may be held",
                    ACQUIRE_TIMEOUT.as_secs()
                )))
            }
        }
    }

    fn forget(&self, id: u64) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    /// Delivers the parent's answer to the `Acquire` with `id`.
    pub fn answer(&self, id: u64, result: Result<(), RemoteError>) {
        let waiting = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        if let Some(tx) = waiting {
            let _ = tx.send(result);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_root_budget_grants_up_to_its_maximum_and_takes_levels_back() {
        let budget = LevelBudget::root(2);
        budget.acquire("L0/L1").await.expect("first");
        budget.acquire("L0/L2").await.expect("second");
        let err = budget.acquire("L0/L3").await.expect_err("third");
        assert_eq!(err.kind, WireErrorKind::Denied);
        assert!(err.message.contains("--max-levels"), "{}", err.message);
        budget.release(1);
        budget.acquire("L0/L3").await.expect("room again");
        assert_eq!(budget.held(), Some(2));
    }

    #[tokio::test]
    async fn a_parent_link_waits_for_the_answer() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let link = ParentLink::new(move |m| tx.send(m).is_ok());
        let budget = LevelBudget::via_parent(link.clone());
        let asking = tokio::spawn(async move { budget.acquire("L0/L1/L2").await });
        let Some(Message::Acquire { id, path }) = rx.recv().await else {
            panic!("no Acquire sent");
        };
        assert_eq!(path, "L0/L1/L2");
        link.answer(id, Ok(()));
        asking.await.expect("task").expect("granted");
    }
}
