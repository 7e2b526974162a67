//! The application's end of the event queue, and what it owes the engine for
//! each event. Every consumer (the Python bindings, the benchmark floor, the
//! engine's own tests) goes through here, so the obligations are written once:
//!
//! - `Connected`: the session's handle is looked up; if the session is gone
//!   already (it closed before the application looked), the application never
//!   hears of it, and its later events are dropped with their accounting. Once
//!   the application has handled it (its own `on_connected` has run),
//!   [`Inbox::announce`]: broadcasts reach the session only from then on, so
//!   what the application sent while handling `Connected` comes first.
//! - `Packets` and `Received`: hold the session's reader back until
//!   [`Inbox::release`] says they were handled.
//! - `Disconnected`: the last event; the session is forgotten.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use rustc_hash::FxHashMap;

use crate::context::SessionContext;
use crate::events::Event;
use crate::frame::PacketRun;
use crate::reason::DisconnectReason;
use crate::registry::SessionRegistry;
use crate::session::{EVENT_OVERHEAD, SessionHandle, SessionId};
use crate::stats::ServiceStats;

/// A session the application knows, and what it keeps for it.
pub struct Known<T> {
    pub handle: Arc<SessionHandle>,
    pub state: T,
}

pub struct Inbox<T> {
    registry: Arc<SessionRegistry>,
    context: Arc<SessionContext>,
    sessions: FxHashMap<SessionId, Known<T>>,
}

/// What a simple application does with each event, for [`Inbox::deliver`].
pub trait Application {
    /// What the application keeps per session.
    type Session;
    fn connected(&mut self, handle: &Arc<SessionHandle>) -> Self::Session;
    fn packets(&mut self, session: &mut Known<Self::Session>, packets: &PacketRun);
    fn received(&mut self, _session: &mut Known<Self::Session>, _data: &Bytes) {}
    fn sent(&mut self, _session: &mut Known<Self::Session>, _nbytes: usize) {}
    fn disconnected(&mut self, session: Known<Self::Session>, reason: DisconnectReason);
}

impl<T> Inbox<T> {
    pub(crate) fn new(registry: Arc<SessionRegistry>, context: Arc<SessionContext>) -> Self {
        Self { registry, context, sessions: FxHashMap::default() }
    }

    /// Handles one event with `app`, meeting every obligation above.
    pub fn deliver<A: Application<Session = T>>(&mut self, event: Event, app: &mut A) {
        match event {
            Event::Connected { session } => {
                let Some(handle) = self.connected(session) else { return };
                let state = app.connected(&handle);
                self.admit(handle.clone(), state);
                Self::announce(&handle);
            }
            Event::Packets { session, packets } => match self.sessions.get_mut(&session) {
                Some(known) => {
                    app.packets(known, &packets);
                    Self::release(&known.handle, packets.byte_len(), 1);
                }
                None => self.discard(packets.len() as u64, packets.byte_len(), 1),
            },
            Event::Received { session, data } => match self.sessions.get_mut(&session) {
                Some(known) => {
                    app.received(known, &data);
                    Self::release(&known.handle, data.len(), 1);
                }
                None => self.discard(0, data.len(), 1),
            },
            Event::Sent { session, nbytes } => {
                if let Some(known) = self.sessions.get_mut(&session) {
                    app.sent(known, nbytes);
                }
            }
            Event::Disconnected { session, reason } => {
                if let Some(known) = self.sessions.remove(&session) {
                    app.disconnected(known, reason);
                }
            }
        }
    }

    /// `Connected`: the new session's handle, or `None` if it has closed
    /// already and the application need never hear of it.
    pub fn connected(&self, session: SessionId) -> Option<Arc<SessionHandle>> {
        self.registry.get(session)
    }

    /// Remembers a session the application is being told of.
    pub fn admit(&mut self, handle: Arc<SessionHandle>, state: T) {
        self.sessions.insert(handle.id(), Known { handle, state });
    }

    /// The application has handled `Connected`: broadcasts reach the session now.
    pub fn announce(handle: &SessionHandle) {
        handle.mark_announced();
    }

    /// The application has handled `events` received events of `bytes` in all.
    pub fn release(handle: &SessionHandle, bytes: usize, events: usize) {
        handle.release_received(bytes, events);
    }

    /// Received events of a session the application does not know (it closed
    /// before it was announced): dropped, and their accounting settled.
    pub fn discard(&self, packets: u64, bytes: usize, events: usize) {
        let stats = &self.context.stats;
        stats.pending_recv_bytes.fetch_sub(bytes + events * EVENT_OVERHEAD, Ordering::Relaxed);
        ServiceStats::add(&stats.packets_discarded, packets);
    }

    pub fn get(&self, session: SessionId) -> Option<&Known<T>> {
        self.sessions.get(&session)
    }

    /// `Disconnected`: forgets the session; returns what was kept for it.
    pub fn remove(&mut self, session: SessionId) -> Option<Known<T>> {
        self.sessions.remove(&session)
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&SessionId, &Known<T>)> {
        self.sessions.iter()
    }

    /// Forgets every session (their `Disconnected` will never be delivered:
    /// the service is gone), returning what was kept.
    pub fn clear(&mut self) -> Vec<Known<T>> {
        self.sessions.drain().map(|(_, known)| known).collect()
    }
}
