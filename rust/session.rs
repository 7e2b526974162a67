//! A session's handle: the application's side of one connection. It queues
//! packets, closes, and says how the session stands; the socket itself belongs
//! to the session's driver ([`Connection`](crate::connection::Connection)) in
//! its reactor.
//!
//! Nothing here waits for the socket or runs application code: `send` queues
//! (and, when the writer was idle, writes at once what the socket takes),
//! `close` records a reason and rings the driver.

use std::fmt;
use std::io::{self, IoSlice};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use bytes::Bytes;
use socket2::SockRef;

use crate::context::SessionContext;
use crate::doorbell::Doorbell;
use crate::events::Event;
pub use crate::events::SessionId;
use crate::reason::DisconnectReason;
use crate::send_buffer::SendBufferPool;
use crate::send_queue::{Push, SendQueue};
use crate::stats::ServiceStats;

/// Event bookkeeping per received packet run, on top of its bytes, when weighing
/// how much a session has waiting for the application.
pub(crate) const EVENT_OVERHEAD: usize = 64;

pub use crate::context::Membership;

pub struct SessionHandle {
    id: SessionId,
    peer: PeerAddr,
    /// The socket, for callers that write what they queued themselves. Valid
    /// while the queue is not finished: see [`SessionHandle::write_now`].
    fd: RawFd,
    pub(crate) queue: SendQueue,
    pub(crate) inbound: InboundBacklog,
    /// The application has handled `Connected`: broadcasts reach this session from now on.
    announced: AtomicBool,
    /// The application closed this session: what it sent after that is dropped.
    delivery_stopped: AtomicBool,
    /// The peer has sent something: a full server does not evict it for a newcomer.
    heard_from: AtomicBool,
    pub(crate) context: Arc<SessionContext>,
}

impl SessionHandle {
    pub(crate) fn new(
        id: SessionId,
        peer: SocketAddr,
        fd: RawFd,
        doorbell: Doorbell,
        context: Arc<SessionContext>,
    ) -> Self {
        let inbound = InboundBacklog::default();
        Self {
            id,
            peer: PeerAddr::from(peer),
            fd,
            queue: SendQueue::new(doorbell),
            inbound,
            announced: AtomicBool::new(false),
            delivery_stopped: AtomicBool::new(false),
            heard_from: AtomicBool::new(false),
            context,
        }
    }

    pub fn id(&self) -> SessionId {
        self.id
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer.into()
    }

    /// Open: not closing and not closed.
    pub fn is_connected(&self) -> bool {
        self.queue.is_open()
    }

    /// Joins `group`: runs `insert` (which adds the session to the group and
    /// says whether it was new) unless the session is closing or closed, and
    /// if it was new, remembers the group, so that the session leaves it when
    /// it ends. Under the service's membership lock, which the end takes too
    /// ([`leave_all`](Self::leave_all)), after the session was closed: so a
    /// session never stays behind in a group.
    pub fn join(&self, group: Weak<dyn Membership>, insert: impl FnOnce() -> bool) -> bool {
        let mut memberships = self.context.lock_memberships();
        if !self.is_connected() || !insert() {
            return false;
        }
        memberships.entry(self.id).or_default().push(group);
        true
    }

    /// Leaves `group`: runs `remove` (which takes the session out of it) and
    /// forgets the group.
    pub fn part<R>(&self, group: &Weak<dyn Membership>, remove: impl FnOnce() -> R) -> R {
        let mut memberships = self.context.lock_memberships();
        if let Some(groups) = memberships.get_mut(&self.id) {
            groups.retain(|joined| !Weak::ptr_eq(joined, group));
            if groups.is_empty() {
                memberships.remove(&self.id);
            }
        }
        remove()
    }

    /// The session has ended (it is closed, so it joins nothing after this):
    /// it leaves every group it is in.
    pub(crate) fn leave_all(&self) {
        let groups = self.context.lock_memberships().remove(&self.id).unwrap_or_default();
        for group in groups.iter().filter_map(Weak::upgrade) {
            group.forget(self.id);
        }
    }

    /// Bytes queued and not yet taken by the kernel.
    pub fn send_queue_bytes(&self) -> usize {
        self.queue.unsent_bytes()
    }

    /// Why the session is closing or closed, once it is.
    pub fn close_reason(&self) -> Option<DisconnectReason> {
        self.queue.close_reason()
    }

    /// The largest packet this service sends or accepts, header included.
    pub fn max_packet_size(&self) -> usize {
        self.context.max_packet_size()
    }

    /// The most bytes this session may have queued and unsent.
    pub fn max_send_queue_bytes(&self) -> usize {
        self.context.config.max_send_queue_bytes
    }

    /// Queues encoded bytes and, if the writer was idle, writes them on this
    /// thread at once (what the socket does not take, the driver writes later).
    /// Never blocks. Inside a batch of callbacks, use
    /// [`coalesce::send`](crate::coalesce::send) instead, which writes once per
    /// session at the end of the batch.
    pub fn send(&self, packet: Bytes) -> Push {
        let (outcome, owed) = self.queue_for_caller(packet);
        if owed {
            self.write_now();
        }
        outcome
    }

    /// Queues encoded bytes; returns whether this caller now holds the writer
    /// role and so owes the write: [`write_now`](Self::write_now) or
    /// [`hand_over`](Self::hand_over).
    pub fn queue_for_caller(&self, packet: Bytes) -> (Push, bool) {
        let len = packet.len();
        // Counted before it is queued: the writer may take it off at once.
        let counter = &self.context.stats.send_queue_bytes;
        counter.fetch_add(len, Ordering::Relaxed);
        let (outcome, owed) = self.queue.push_quietly(packet, self.context.config.max_send_queue_bytes);
        if outcome != Push::Queued {
            counter.fetch_sub(len, Ordering::Relaxed);
        }
        (outcome, owed)
    }

    /// Queues for the driver to write, without the service-wide byte count
    /// (a broadcast adds it once for all its recipients): so a fan-out is
    /// written by many drivers in parallel, not by the broadcasting thread one
    /// session after another.
    pub(crate) fn enqueue_for_driver(&self, packet: Bytes) -> Push {
        self.queue.push(packet, self.context.config.max_send_queue_bytes)
    }

    /// Its reactor took the session in under `key`: rings reach it from now on.
    pub(crate) fn connect_doorbell(&self, key: u32) {
        self.queue.connect_doorbell(key);
    }

    /// Gives the write this caller owes to the driver.
    pub fn hand_over(&self) {
        self.queue.hand_over();
    }

    /// Writes what was queued on this thread instead of waking the driver: the
    /// lecture's `RegisterSend` by the caller that registered the send. Saves
    /// the driver's wakeup (a thread hop) on every answer. What the socket does
    /// not take is left to the driver, which is woken for it.
    pub fn write_now(&self) {
        // SAFETY: `write_now` runs the closure under the queue's lock, and the
        // driver finishes the queue under that lock before it closes the socket
        // (`Connection`'s drop). So while the closure runs, `fd` is open and is
        // still this session's socket, never a descriptor reused by another.
        let socket = unsafe { BorrowedFd::borrow_raw(self.fd) };
        let context = &self.context;
        self.queue.write_now(
            |slices| send_no_signal(SockRef::from(&socket), slices),
            |bytes, packets| {
                let stats = &context.stats;
                stats.send_queue_bytes.fetch_sub(bytes, Ordering::Relaxed);
                ServiceStats::add(&stats.bytes_out, bytes as u64);
                ServiceStats::add(&stats.packets_out, packets);
                // Under the queue's lock, which the driver's farewell takes before
                // it queues `Disconnected`: the report cannot come after it.
                if context.config.report_sent {
                    context.events.push(Event::Sent { session: self.id, nbytes: bytes });
                }
            },
        );
    }

    /// Writes `parts` (a header and a payload, or raw bytes) to the socket at
    /// once if nothing is queued before them, copying only what the socket
    /// does not take (as asyncio's `transport.write` does); `None` if
    /// something is queued, and the caller must queue them as usual.
    pub fn write_through(&self, parts: &[&[u8]]) -> Option<Push> {
        // SAFETY: as in `write_now`: the queue's lock is held while the
        // socket is used, and the driver finishes the queue under that lock
        // before it closes the socket.
        let socket = unsafe { BorrowedFd::borrow_raw(self.fd) };
        let context = &self.context;
        self.queue.write_through(
            parts,
            |slices| send_no_signal(SockRef::from(&socket), slices),
            |bytes, packets| {
                let stats = &context.stats;
                ServiceStats::add(&stats.bytes_out, bytes as u64);
                ServiceStats::add(&stats.packets_out, packets);
                if context.config.report_sent {
                    context.events.push(Event::Sent { session: self.id, nbytes: bytes });
                }
            },
            |mut skip| {
                // What the socket did not take: the rest of each part.
                let mut rest = [&[][..]; 2];
                for (tail, part) in rest.iter_mut().zip(parts) {
                    let from = skip.min(part.len());
                    *tail = &part[from..];
                    skip -= from;
                }
                let tail = SendBufferPool::global().copy_parts(&rest[..parts.len()]);
                context.stats.send_queue_bytes.fetch_add(tail.len(), Ordering::Relaxed);
                tail
            },
        )
    }

    /// Closes the session from the application's side: what was queued before
    /// is flushed (bounded by the linger), later sends are refused, and input
    /// that has not been delivered yet is dropped. Idempotent; returns whether
    /// this call was the one that closed it.
    pub fn close(&self, reason: DisconnectReason) -> bool {
        self.delivery_stopped.store(true, Ordering::Release);
        self.queue.request_close(reason)
    }

    /// [`close`](Self::close) for a fault the application found (a malformed
    /// packet): `detail` is said in the session's one farewell log line.
    pub fn close_with_detail(&self, reason: DisconnectReason, detail: String) -> bool {
        // Before the close: the farewell may follow at once on an I/O thread.
        self.context.put_close_detail(self.id, detail);
        let first = self.close(reason);
        if !first {
            self.context.take_close_detail(self.id);
        }
        first
    }

    /// Whether events from the peer should still reach the application.
    pub fn delivers(&self) -> bool {
        !self.delivery_stopped.load(Ordering::Acquire)
    }

    /// Whether the peer has sent anything yet.
    pub fn is_heard_from(&self) -> bool {
        self.heard_from.load(Ordering::Relaxed)
    }

    pub(crate) fn mark_heard_from(&self) {
        self.heard_from.store(true, Ordering::Relaxed);
    }

    pub fn is_announced(&self) -> bool {
        self.announced.load(Ordering::Acquire)
    }

    /// The application has handled `Connected` (game code's own `on_connected`
    /// has run): broadcasts reach the session from now on, after whatever that
    /// handling sent.
    pub(crate) fn mark_announced(&self) {
        self.announced.store(true, Ordering::Release);
    }

    /// The application has delivered (or dropped) `events` received events
    /// (packet runs or raw chunks) of `bytes` in all: a paused reader may go on.
    pub(crate) fn release_received(&self, bytes: usize, events: usize) {
        let weight = bytes + events * EVENT_OVERHEAD;
        if self.inbound.release(weight, self.context.config.max_pending_recv_bytes) {
            // The driver's one wakeup also serves a reader that may go on.
            self.queue.wake_driver();
        }
        self.context.stats.pending_recv_bytes.fetch_sub(weight, Ordering::Relaxed);
    }
}

impl fmt::Debug for SessionHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionHandle").field("id", &self.id).field("peer", &self.peer()).finish()
    }
}

/// Received bytes the application has not handled yet. Past the limit
/// (`max_pending_recv_bytes`, the same for every session of a service, so it is
/// passed in rather than kept here) the reader stops reading, and TCP's own
/// window makes the peer wait. One word: the byte count, and in its top bit
/// whether the peer finished sending, so that both change in one atomic step.
#[derive(Default)]
pub(crate) struct InboundBacklog {
    pending: AtomicUsize,
}

/// The peer has finished sending: its driver waits for the backlog to empty
/// (every answer to it queued) before it closes the session.
const WAKE_WHEN_EMPTY: usize = 1 << (usize::BITS - 1);

impl InboundBacklog {
    pub(crate) fn add(&self, weight: usize) {
        self.pending.fetch_add(weight, Ordering::AcqRel);
    }

    pub(crate) fn is_full(&self, limit: usize) -> bool {
        self.pending.load(Ordering::Acquire) & !WAKE_WHEN_EMPTY >= limit
    }

    /// The driver's side of a half-close: from now on the release that empties
    /// the backlog wakes it. Returns whether the backlog is empty already.
    pub(crate) fn wake_when_empty(&self) -> bool {
        self.pending.fetch_or(WAKE_WHEN_EMPTY, Ordering::SeqCst) & !WAKE_WHEN_EMPTY == 0
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pending.load(Ordering::SeqCst) & !WAKE_WHEN_EMPTY == 0
    }

    /// Returns true when this release lets a paused reader go on, or empties
    /// the backlog of a peer that finished sending.
    fn release(&self, weight: usize, limit: usize) -> bool {
        let before = self.pending.fetch_sub(weight, Ordering::SeqCst);
        let finished = before & WAKE_WHEN_EMPTY != 0;
        let before = before & !WAKE_WHEN_EMPTY;
        let after = before - weight;
        (before >= limit && after < limit) || (after == 0 && finished)
    }
}

/// A peer's address in 24 bytes (`SocketAddr` takes 32): the address, the
/// port, and an IPv6 scope id. An IPv6 flow label is not kept.
#[derive(Clone, Copy)]
struct PeerAddr {
    ip: [u8; 16],
    scope_id: u32,
    port: u16,
    v6: bool,
}

impl From<SocketAddr> for PeerAddr {
    fn from(addr: SocketAddr) -> Self {
        match addr {
            SocketAddr::V4(v4) => {
                let mut ip = [0; 16];
                ip[..4].copy_from_slice(&v4.ip().octets());
                Self { ip, scope_id: 0, port: v4.port(), v6: false }
            }
            SocketAddr::V6(v6) => {
                Self { ip: v6.ip().octets(), scope_id: v6.scope_id(), port: v6.port(), v6: true }
            }
        }
    }
}

impl From<PeerAddr> for SocketAddr {
    fn from(peer: PeerAddr) -> Self {
        if peer.v6 {
            SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(peer.ip), peer.port, 0, peer.scope_id))
        } else {
            let [a, b, c, d, ..] = peer.ip;
            SocketAddr::new(IpAddr::V4(Ipv4Addr::new(a, b, c, d)), peer.port)
        }
    }
}

/// A gathered write that cannot raise SIGPIPE: `sendmsg` with `MSG_NOSIGNAL`,
/// not `writev`. A write to a reset socket comes back as EPIPE instead of a
/// signal that kills the host process when it has SIGPIPE at its default.
pub(crate) fn send_no_signal(socket: SockRef<'_>, slices: &[IoSlice<'_>]) -> io::Result<usize> {
    socket.send_vectored_with_flags(slices, libc::MSG_NOSIGNAL)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a session holds lives as long as the connection: it is paid by
    /// each of ten thousand idle players.
    #[test]
    fn an_idle_session_handle_is_small() {
        let handle = std::mem::size_of::<SessionHandle>();
        assert!(handle <= 136, "a session handle takes {handle} bytes");
    }

    #[test]
    fn the_release_that_empties_a_finished_peers_backlog_wakes_its_driver() {
        let backlog = InboundBacklog::default();
        backlog.add(100);
        backlog.add(50);
        assert!(!backlog.release(50, 1000), "not empty, not finished");
        assert!(!backlog.wake_when_empty(), "100 still pending");
        assert!(backlog.release(100, 1000), "the last release wakes the driver");
    }

    #[test]
    fn a_peer_address_keeps_what_a_socket_address_says_but_the_flow_label() {
        for text in ["127.0.0.1:7777", "[::1]:443", "[fe80::1%3]:80", "203.0.113.9:51234"] {
            let addr: SocketAddr = text.parse().unwrap();
            assert_eq!(SocketAddr::from(PeerAddr::from(addr)), addr, "{text}");
        }
    }

    #[test]
    fn a_release_below_the_limit_wakes_a_paused_reader_once() {
        let backlog = InboundBacklog::default();
        backlog.add(150);
        assert!(backlog.is_full(100));
        assert!(!backlog.release(20, 100), "still at or over the limit");
        assert!(backlog.release(40, 100), "crossed below the limit");
        assert!(!backlog.release(10, 100), "already below");
    }
}
