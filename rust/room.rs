//! The lecture's `GameRoom`: a group of one service's sessions to broadcast
//! to (a room, a zone, a party), kept here so that a fan-out to its members
//! costs what a server-wide broadcast costs per recipient.
//!
//! A session leaves every room it is in when it ends, before its
//! `Disconnected` is queued (its connection's farewell calls
//! [`SessionHandle::leave_all`]). A session that is closing or closed cannot
//! join. The join and the end are ordered by the service's membership lock
//! ([`SessionHandle::join`]), so no ended session stays behind in a room
//! (the lecture's stale member in `Room::Broadcast`). Lock order: the
//! memberships, then the room's members; a broadcast takes only the room's.
//!
//! Each member carries a value `T` of the application's (the bindings keep
//! the Python session object there).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use bytes::Bytes;

use crate::context::SessionContext;
use crate::registry::{BroadcastOutcome, fan_out};
use crate::session::{Membership, SessionHandle, SessionId};

pub struct Room<T> {
    inner: Arc<Members<T>>,
}

struct Members<T> {
    /// By session id: iteration in the order sessions connected.
    members: Mutex<BTreeMap<SessionId, (Arc<SessionHandle>, T)>>,
    /// The service the room belongs to, set by the first member.
    context: OnceLock<Arc<SessionContext>>,
}

/// Why a session cannot join a room.
#[derive(Debug, PartialEq, Eq)]
pub enum JoinError {
    /// The room holds another service's sessions.
    OtherService,
}

impl<T: Send + 'static> Membership for Members<T> {
    fn forget(&self, session: SessionId) {
        self.lock().remove(&session);
    }
}

impl<T> Members<T> {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<SessionId, (Arc<SessionHandle>, T)>> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Another handle on the same room (the bus fans out to it too).
impl<T> Clone for Room<T> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

impl<T: Send + 'static> Default for Room<T> {
    fn default() -> Self {
        Self { inner: Arc::new(Members { members: Mutex::default(), context: OnceLock::new() }) }
    }
}

impl<T: Send + 'static> Room<T> {
    fn as_group(&self) -> Weak<dyn Membership> {
        let group: Arc<dyn Membership> = self.inner.clone();
        Arc::downgrade(&group)
    }

    /// Adds the session, with `value`. Returns whether it is a new member:
    /// false if it was one already or has ended (it would leave at once).
    pub fn add(&self, handle: &Arc<SessionHandle>, value: T) -> Result<bool, JoinError> {
        let context = self.inner.context.get_or_init(|| handle.context.clone());
        if !Arc::ptr_eq(context, &handle.context) {
            return Err(JoinError::OtherService);
        }
        let id = handle.id();
        let mut value = Some(value);
        Ok(handle.join(self.as_group(), || {
            let mut members = self.inner.lock();
            if members.contains_key(&id) {
                return false;
            }
            members.insert(id, (handle.clone(), value.take().expect("inserted once")));
            true
        }))
    }

    /// Takes the session out; its value if it was a member.
    pub fn remove(&self, id: SessionId) -> Option<T> {
        let handle = self.inner.lock().get(&id).map(|(handle, _)| handle.clone())?;
        handle.part(&self.as_group(), || self.inner.lock().remove(&id).map(|(_, value)| value))
    }

    /// Takes every session out.
    pub fn clear(&self) -> Vec<T> {
        let ids: Vec<SessionId> = self.inner.lock().keys().copied().collect();
        ids.into_iter().filter_map(|id| self.remove(id)).collect()
    }

    pub fn contains(&self, id: SessionId) -> bool {
        self.inner.lock().contains_key(&id)
    }

    pub fn len(&self) -> usize {
        self.inner.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The members' values, in the order their sessions connected (a snapshot).
    pub fn values<R>(&self, mut each: impl FnMut(&T) -> R) -> Vec<R> {
        self.inner.lock().values().map(|(_, value)| each(value)).collect()
    }

    /// Calls `f` on each member's value while holding the room's lock, if it
    /// is free (a garbage collector's visit, which must not wait); stops at
    /// the first error.
    pub fn try_for_each<E>(&self, mut f: impl FnMut(&T) -> Result<(), E>) -> Result<(), E> {
        let Ok(members) = self.inner.members.try_lock() else { return Ok(()) };
        members.values().try_for_each(|(_, value)| f(value))
    }

    /// The service the room belongs to, once it has had a member.
    pub fn context(&self) -> Option<&Arc<SessionContext>> {
        self.inner.context.get()
    }

    /// Queues one encoded packet on every member but `exclude`, as
    /// [`SessionRegistry::broadcast`](crate::registry::SessionRegistry::broadcast)
    /// does on every session.
    pub fn broadcast(&self, packet: &Bytes, exclude: Option<SessionId>) -> BroadcastOutcome {
        let Some(context) = self.inner.context.get() else { return BroadcastOutcome::default() };
        let members = self.inner.lock();
        let recipients =
            members.iter().filter(|(id, _)| Some(**id) != exclude).map(|(_, (handle, _))| handle);
        fan_out(recipients, members.len(), packet, &context.stats.send_queue_bytes)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use super::*;
    use crate::config::SessionConfig;
    use crate::doorbell::Doorbell;
    use crate::reason::DisconnectReason;

    fn context() -> Arc<SessionContext> {
        Arc::new(SessionContext::new(SessionConfig::default()).unwrap())
    }

    fn session(id: u64, context: &Arc<SessionContext>) -> Arc<SessionHandle> {
        let peer = SocketAddr::from((Ipv4Addr::LOCALHOST, 1000 + id as u16));
        Arc::new(SessionHandle::new(SessionId(id), peer, -1, Doorbell::default(), context.clone()))
    }

    #[test]
    fn members_are_kept_in_the_order_they_connected_and_joined_once() {
        let context = context();
        let room = Room::default();
        let (a, b) = (session(2, &context), session(1, &context));
        assert_eq!(room.add(&a, "a"), Ok(true));
        assert_eq!(room.add(&b, "b"), Ok(true));
        assert_eq!(room.add(&a, "a again"), Ok(false));
        assert_eq!(room.values(|v| *v), ["b", "a"]);
        assert!(room.contains(SessionId(2)) && room.len() == 2);
        assert_eq!(room.remove(SessionId(2)), Some("a"));
        assert_eq!(room.remove(SessionId(2)), None);
        assert_eq!(room.values(|v| *v), ["b"]);
    }

    #[test]
    fn a_session_that_ends_leaves_every_room_and_joins_none_after() {
        let context = context();
        let (lobby, match_room) = (Room::default(), Room::default());
        let player = session(1, &context);
        assert_eq!(lobby.add(&player, ()), Ok(true));
        assert_eq!(match_room.add(&player, ()), Ok(true));
        player.close(DisconnectReason::ClosedByPeer);
        player.leave_all();
        assert!(lobby.is_empty() && match_room.is_empty());
        assert_eq!(lobby.add(&player, ()), Ok(false), "an ended session joined");
        assert!(lobby.is_empty());
    }

    #[test]
    fn a_room_left_by_hand_is_not_told_again_and_a_dropped_room_is_skipped() {
        let context = context();
        let player = session(1, &context);
        let kept = Room::default();
        {
            let dropped = Room::default();
            assert_eq!(dropped.add(&player, ()), Ok(true));
        }
        assert_eq!(kept.add(&player, ()), Ok(true));
        assert_eq!(kept.remove(SessionId(1)), Some(()));
        assert_eq!(kept.add(&player, ()), Ok(true));
        player.leave_all();
        assert!(kept.is_empty());
    }

    #[test]
    fn a_room_holds_the_sessions_of_one_service() {
        let room = Room::default();
        assert_eq!(room.add(&session(1, &context()), ()), Ok(true));
        assert_eq!(room.add(&session(2, &context()), ()), Err(JoinError::OtherService));
    }
}
