//! The lecture's `SessionManager`: every open session of a service, and the
//! broadcast over them.
//!
//! Broadcast holds the lock for the whole fan-out; sessions that arrive or leave
//! on I/O threads wait for it rather than change the set under it (the lecture's
//! crash was a session erased from the set that Broadcast was iterating). It is a
//! read-write lock, and std's is writer-preferring on Linux: a session that
//! arrives or leaves gets the lock at the end of the running broadcast, even
//! from an application that broadcasts in a tight loop. No
//! application code can run inside a broadcast: a full queue or a closed session
//! is recorded on that session and reported later, through its own events.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;
use rustc_hash::FxHashMap;
use tokio::sync::Notify;

use crate::reason::DisconnectReason;
use crate::send_queue::Push;
use crate::session::{SessionHandle, SessionId};

#[derive(Default)]
pub struct SessionRegistry {
    state: RwLock<RegistryState>,
    emptied: Notify,
}

#[derive(Default)]
struct RegistryState {
    sessions: FxHashMap<SessionId, Arc<SessionHandle>>,
    /// Open sessions per peer address, for `max_sessions_per_address`.
    per_address: FxHashMap<IpAddr, u32>,
    /// Set when the service stops: no session may join after it.
    closed_with: Option<DisconnectReason>,
}

/// What one broadcast did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BroadcastOutcome {
    /// Sessions the packet was queued on.
    pub queued: usize,
    /// Sessions whose queue was full: they are now disconnecting.
    pub overflowed: usize,
}

impl SessionRegistry {
    /// Adds a session; refused once the service is stopping.
    pub fn insert(&self, handle: Arc<SessionHandle>) -> bool {
        let mut state = self.write();
        if state.closed_with.is_some() {
            return false;
        }
        *state.per_address.entry(handle.peer().ip()).or_default() += 1;
        state.sessions.insert(handle.id(), handle);
        true
    }

    pub fn remove(&self, id: SessionId) {
        let mut state = self.write();
        if let Some(handle) = state.sessions.remove(&id) {
            let address = handle.peer().ip();
            if let Some(count) = state.per_address.get_mut(&address) {
                *count -= 1;
                if *count == 0 {
                    state.per_address.remove(&address);
                }
            }
        }
        if state.sessions.is_empty() {
            drop(state);
            self.emptied.notify_waiters();
        }
    }

    pub fn get(&self, id: SessionId) -> Option<Arc<SessionHandle>> {
        self.read().sessions.get(&id).cloned()
    }

    /// The session that has waited longest without its peer sending anything
    /// (and is not closing): what a full server gives up first.
    pub fn oldest_silent(&self) -> Option<Arc<SessionHandle>> {
        let state = self.read();
        let silent = state.sessions.values().filter(|h| !h.is_heard_from() && h.is_connected());
        silent.min_by_key(|handle| handle.id()).cloned()
    }

    /// Open sessions from `address`.
    pub fn sessions_from(&self, address: IpAddr) -> usize {
        self.read().per_address.get(&address).copied().unwrap_or(0) as usize
    }

    pub fn len(&self) -> usize {
        self.read().sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Queues one shared packet on every session the application has been told
    /// of (`Connected` delivered), except `exclude`.
    /// `unsent_bytes` is the service's gauge of queued bytes; it is raised before
    /// the packet is queued, since writers may take it off at once.
    pub fn broadcast(
        &self,
        packet: &Bytes,
        exclude: Option<SessionId>,
        unsent_bytes: &AtomicUsize,
    ) -> BroadcastOutcome {
        let state = self.read();
        let recipients =
            state.sessions.iter().filter(|(id, handle)| Some(**id) != exclude && handle.is_announced());
        fan_out(recipients.map(|(_, handle)| handle), state.sessions.len(), packet, unsent_bytes)
    }

    /// Refuses new sessions from now on and asks every open one to close.
    pub fn close_all(&self, reason: DisconnectReason) {
        let handles: Vec<Arc<SessionHandle>> = {
            let mut state = self.write();
            state.closed_with.get_or_insert(reason);
            state.sessions.values().cloned().collect()
        };
        for handle in handles {
            handle.close(reason);
        }
    }

    pub fn closed_with(&self) -> Option<DisconnectReason> {
        self.read().closed_with
    }

    /// Resolves once no session is left.
    pub async fn emptied(&self) {
        loop {
            // Created before the check, so a removal in between is not missed.
            let emptied = self.emptied.notified();
            if self.is_empty() {
                return;
            }
            emptied.await;
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, RegistryState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, RegistryState> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Queues one shared packet on each of `recipients` (at most `most` of them).
/// `unsent_bytes` is the service's gauge of queued bytes; it is raised before
/// the packet is queued, since writers may take it off at once.
pub fn fan_out<'a>(
    recipients: impl Iterator<Item = &'a Arc<SessionHandle>>,
    most: usize,
    packet: &Bytes,
    unsent_bytes: &AtomicUsize,
) -> BroadcastOutcome {
    let mut outcome = BroadcastOutcome::default();
    let most = most * packet.len();
    unsent_bytes.fetch_add(most, Ordering::Relaxed);
    for handle in recipients {
        match handle.enqueue_for_driver(packet.clone()) {
            Push::Queued => outcome.queued += 1,
            Push::Full => outcome.overflowed += 1,
            Push::Closed => {}
        }
    }
    unsent_bytes.fetch_sub(most - outcome.queued * packet.len(), Ordering::Relaxed);
    outcome
}
