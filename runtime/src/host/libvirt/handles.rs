//! The handles an instance holds on libvirt, the counts that bound them, and
//! the cleanup of what a test made when its connection goes.

use std::sync::{Arc, Mutex};

use crate::libvirt::{Connection, Domain, DomainState};

/// The host side of a `connection` resource.
pub struct ConnectionHandle {
    pub(super) conn: Arc<Connection>,
    pub(super) uri: String,
    /// Domains made through this connection, cleaned up when it goes.
    pub(super) made: MadeList,
    pub(super) usage: Arc<Usage>,
}

/// A domain this instance defined, created or started.
pub(super) struct Made {
    pub(super) domain: Arc<Domain>,
    pub(super) name: String,
    /// Whether the test defined it (then it is undefined too), or only started it.
    pub(super) defined: bool,
}

/// The domains a connection's cleanup stops.
pub(super) type MadeList = Arc<Mutex<Vec<Made>>>;

/// The host side of a `domain` resource.
pub struct DomainHandle {
    pub(super) domain: Arc<Domain>,
    /// The cleanup list of the connection it came from.
    pub(super) made: MadeList,
    pub(super) usage: Arc<Usage>,
}

/// How many handles an instance holds.
#[derive(Default)]
pub struct Usage {
    pub(super) connections: std::sync::atomic::AtomicUsize,
    pub(super) domains: std::sync::atomic::AtomicUsize,
}

impl Usage {
    pub(super) fn take(counter: &std::sync::atomic::AtomicUsize, max: usize) -> bool {
        use std::sync::atomic::Ordering;
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    pub(super) fn give(counter: &std::sync::atomic::AtomicUsize) {
        counter.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for DomainHandle {
    fn drop(&mut self) {
        Usage::give(&self.usage.domains);
    }
}

impl Drop for ConnectionHandle {
    fn drop(&mut self) {
        Usage::give(&self.usage.connections);
        let made = std::mem::take(&mut *self.made.lock().unwrap_or_else(|e| e.into_inner()));
        for Made {
            domain,
            name,
            defined,
        } in made
        {
            leave_nothing(&domain, &name, &self.uri, defined);
        }
    }
}

/// Destroys a domain a test made or started and left running, and undefines it
/// if the test defined it and it is still defined.
fn leave_nothing(domain: &Domain, name: &str, uri: &str, defined: bool) {
    let Ok((state, _)) = domain.state() else {
        return; // gone already
    };
    if !matches!(state, DomainState::Shutoff | DomainState::NoState) {
        match domain.destroy() {
            Ok(()) => tracing::info!("destroyed the domain {name} a test left running on {uri}"),
            Err(e) => tracing::warn!("cannot destroy the domain {name} on {uri}: {e}"),
        }
    }
    if defined && domain.is_persistent().unwrap_or(false) {
        match domain.undefine() {
            Ok(()) => tracing::info!("undefined the domain {name} a test left defined on {uri}"),
            Err(e) => tracing::warn!("cannot undefine the domain {name} on {uri}: {e}"),
        }
    }
}
