//! One connection: its handle, shared with the application, and its driver,
//! the [`Connection`] that owns the socket inside its reactor.
//!
//! The driver serves whatever is ready: the socket is readable (read, check
//! headers, cut packets, queue events), the socket is writable or the doorbell
//! rang (gathered writes of everything queued), the application caught up with
//! a paused reader, or a deadline passed (packet timeout, idle timeout, linger).
//! It never runs application code and never blocks, so a hostile or stalled
//! peer costs its own turns and nothing else.
//!
//! However the driver ends (a reason of its own, a shutdown that drops its
//! reactor, a panic), the send queue is sealed, then the socket is closed, then
//! exactly one `Disconnected` event is queued: that order is fixed by
//! `Connection`'s drop and the order of its fields.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSlice, Read};
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::{Bytes, BytesMut};
use socket2::SockRef;
use tokio::time::Instant;

use crate::coalesce;
use crate::config::Framing;
use crate::dispatch::{Event, EventQueue};
use crate::doorbell::Doorbell;
use crate::frame::FrameError;
use crate::reason::DisconnectReason;
use crate::recv_buffer::RecvBuffer;
use crate::send_queue::{Push, SendQueue, write_gathered};
use crate::service::ServiceShared;
use crate::stats::ServiceStats;

/// A session's number, unique within its service, counting from 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Event bookkeeping per received packet, on top of its bytes, when weighing how
/// much a session has waiting for the application.
const EVENT_OVERHEAD: usize = 64;

/// Turns a session is served in a row before the others get theirs.
const TURNS_PER_SERVE: usize = 16;

/// Slots of the in-flight queue a session keeps once everything is written.
const IDLE_IN_FLIGHT_CAPACITY: usize = 16;

/// A write turn stops after this many bytes: a session sent to without pause
/// still reads, and yields its thread to the others.
const WRITE_TURN_BYTES: usize = 256 * 1024;

/// A read turn stops after this many bytes so one flooding peer yields its thread.
const READ_TURN_BYTES: usize = 64 * 1024;

thread_local! {
    /// Events cut by the drivers running on this thread, not yet queued for
    /// the application. Per thread, not per session: between two reads a
    /// session holds no event memory.
    static BATCH: RefCell<Vec<Event>> = const { RefCell::new(Vec::new()) };
}

fn push_event(event: Event) {
    BATCH.with_borrow_mut(|batch| batch.push(event));
}

/// Queues the events this thread's drivers have cut, in one batch. Their
/// reactor calls this after each session it serves while the application
/// waits, and after each round otherwise; a session's farewell calls it
/// before its `Disconnected`, which must come last.
pub(crate) fn queue_events(events: &EventQueue) {
    BATCH.with_borrow_mut(|batch| events.push_all(batch));
}

/// The application's side of a session: send, close, ask.
pub struct SessionHandle {
    id: SessionId,
    peer: SocketAddr,
    /// The socket, for callers that write what they queued themselves. Valid
    /// while the queue is not finished: see [`SessionHandle::write_now`].
    fd: RawFd,
    queue: SendQueue,
    inbound: InboundBacklog,
    /// `Connected` has been delivered: broadcasts reach this session from now on.
    announced: AtomicBool,
    /// The application closed this session: what it sent after that is dropped.
    delivery_stopped: AtomicBool,
    service: Arc<ServiceShared>,
}

impl SessionHandle {
    pub(crate) fn new(
        id: SessionId,
        peer: SocketAddr,
        fd: RawFd,
        doorbell: Doorbell,
        service: Arc<ServiceShared>,
    ) -> Self {
        let inbound = InboundBacklog::new(service.config.session.max_pending_recv_bytes);
        Self {
            id,
            peer,
            fd,
            queue: SendQueue::new(doorbell),
            inbound,
            announced: AtomicBool::new(false),
            delivery_stopped: AtomicBool::new(false),
            service,
        }
    }

    pub fn id(&self) -> SessionId {
        self.id
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Open: not closing and not closed.
    pub fn is_connected(&self) -> bool {
        self.queue.is_open()
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
        self.service.config.max_packet_size()
    }

    /// Queues an encoded packet. Never blocks and never waits for the socket.
    /// If the writer was idle, this caller writes it: at once, or, inside a
    /// [`WriteBatch`](crate::coalesce::WriteBatch), when the batch ends (or
    /// hands it to the driver if the batch was heavy).
    pub fn send(self: &Arc<Self>, packet: Bytes) -> Push {
        let len = packet.len();
        // Counted before it is queued: the writer may take it off at once.
        let counter = &self.service.stats.send_queue_bytes;
        counter.fetch_add(len, Ordering::Relaxed);
        let (outcome, owed) =
            self.queue.push_quietly(packet, self.service.config.session.max_send_queue_bytes);
        if owed {
            coalesce::write_or_defer(self);
        }
        if outcome != Push::Queued {
            counter.fetch_sub(len, Ordering::Relaxed);
        }
        outcome
    }

    /// Queues for the driver to write, without the service-wide byte count
    /// (a broadcast adds it once for all its recipients): so a fan-out is
    /// written by many drivers in parallel, not by the broadcasting thread one
    /// session after another.
    pub(crate) fn enqueue_for_driver(&self, packet: Bytes) -> Push {
        self.queue.push(packet, self.service.config.session.max_send_queue_bytes)
    }

    /// Its reactor took the session in under `key`: rings reach it from now on.
    pub(crate) fn connect_doorbell(&self, key: u32) {
        self.queue.connect_doorbell(key);
    }

    /// Gives the write this caller owes to the driver.
    pub(crate) fn hand_over(&self) {
        self.queue.hand_over();
    }

    /// Writes what was queued on this thread instead of waking the driver: the
    /// lecture's `RegisterSend` by the caller that registered the send. Saves
    /// the driver's wakeup (a thread hop) on every answer. What the socket does
    /// not take is left to the driver, which is woken for it.
    pub(crate) fn write_now(&self) {
        // SAFETY: `write_now` runs the closure under the queue's lock, and the
        // driver finishes the queue under that lock before it closes the socket
        // (`Connection`'s drop). So while the closure runs, `fd` is open and is
        // still this session's socket, never a descriptor reused by another.
        let socket = unsafe { BorrowedFd::borrow_raw(self.fd) };
        let (bytes, packets) = self.queue.write_now(|slices| send_no_signal(SockRef::from(&socket), slices));
        if bytes > 0 {
            let stats = &self.service.stats;
            stats.send_queue_bytes.fetch_sub(bytes, Ordering::Relaxed);
            ServiceStats::add(&stats.bytes_out, bytes as u64);
            ServiceStats::add(&stats.packets_out, packets);
            if self.service.config.session.report_sent {
                self.service.events.push(Event::Sent { session: self.id, nbytes: bytes });
            }
        }
    }

    /// Closes the session from the application's side: what was queued before
    /// is flushed (bounded by the linger), later sends are refused, and input
    /// that has not been delivered yet is dropped. Idempotent; returns whether
    /// this call was the one that closed it.
    pub fn close(&self, reason: DisconnectReason) -> bool {
        self.delivery_stopped.store(true, Ordering::Release);
        self.queue.request_close(reason)
    }

    /// Whether events from the peer should still reach the application.
    pub fn delivers(&self) -> bool {
        !self.delivery_stopped.load(Ordering::Acquire)
    }

    pub fn is_announced(&self) -> bool {
        self.announced.load(Ordering::Acquire)
    }

    /// Called by the consumer when it delivers `Connected`.
    pub fn mark_announced(&self) {
        self.announced.store(true, Ordering::Release);
    }

    /// Called by the consumer after it has delivered (or dropped) `events`
    /// received events (packet runs or raw chunks) of `bytes` in all, so a
    /// paused reader can go on.
    pub fn release_received(&self, bytes: usize, events: usize) {
        let weight = bytes + events * EVENT_OVERHEAD;
        if self.inbound.release(weight) {
            // The driver's one wakeup also serves a reader that may go on.
            self.queue.wake_driver();
        }
        self.service.stats.pending_recv_bytes.fetch_sub(weight, Ordering::Relaxed);
    }
}

impl fmt::Debug for SessionHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionHandle").field("id", &self.id).field("peer", &self.peer).finish()
    }
}

/// Received bytes the application has not consumed yet. Past the limit the
/// reader stops reading, and TCP's own window makes the peer wait.
struct InboundBacklog {
    pending: AtomicUsize,
    limit: usize,
}

impl InboundBacklog {
    fn new(limit: usize) -> Self {
        Self { pending: AtomicUsize::new(0), limit: limit.max(1) }
    }

    fn add(&self, weight: usize) {
        self.pending.fetch_add(weight, Ordering::AcqRel);
    }

    fn is_full(&self) -> bool {
        self.pending.load(Ordering::Acquire) >= self.limit
    }

    /// Returns true when this release lets a paused reader go on.
    fn release(&self, weight: usize) -> bool {
        let before = self.pending.fetch_sub(weight, Ordering::AcqRel);
        before >= self.limit && before - weight < self.limit
    }
}

/// Why the serve loop stopped, with what a log line needs.
struct Stop {
    reason: DisconnectReason,
    detail: Option<Box<str>>,
}

impl Stop {
    fn new(reason: DisconnectReason, detail: impl Into<Box<str>>) -> Self {
        Self { reason, detail: Some(detail.into()) }
    }

    fn io(error: &io::Error) -> Self {
        Self::new(DisconnectReason::Reset, error.to_string())
    }

    fn frame(error: FrameError) -> Self {
        let reason = match error {
            FrameError::SizeBelowHeader { .. } => DisconnectReason::InvalidHeader,
            FrameError::TooLarge { .. } => DisconnectReason::PacketTooLarge,
            FrameError::UnknownId { .. } => DisconnectReason::UnknownPacketId,
        };
        Self::new(reason, error.to_string())
    }
}

/// What a session's driver needs next from its reactor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Served {
    /// Nothing more to do until the socket, the doorbell or a deadline says so.
    Waiting,
    /// Used its turns with work left (a flood, a stream of sends): serve it
    /// again after the others.
    Busy,
    /// Closed: drop it, which reports the disconnect.
    Done,
}

#[derive(Clone, Copy, Debug)]
enum Phase {
    Open,
    /// Closed locally: flushing what was queued, then (once the write side is
    /// shut) waiting for the peer's FIN, until the linger runs out.
    Lingering {
        until: Instant,
        write_shut: bool,
    },
}

/// A session's driver: the socket and everything only the I/O side touches.
/// It lives in its reactor's slab and is served when its socket, its doorbell
/// or its deadline says so; it never runs application code and never blocks,
/// so a hostile or stalled peer costs its own turns and nothing else.
pub(crate) struct Connection {
    // Field order matters: `stream` is dropped, and the socket closed, before
    // `farewell` reports the disconnect.
    stream: mio::net::TcpStream,
    recv: RecvBuffer,
    /// Packets taken from the send queue and not yet fully written.
    in_flight: VecDeque<Bytes>,
    /// When the first byte of the current incomplete packet arrived.
    packet_started: Option<Instant>,
    last_received: Instant,
    /// Only with `max_packets_per_second`: boxed, so others do not pay for it.
    rate_window: Option<Box<RateWindow>>,
    phase: Phase,
    /// The deadline the reactor holds a timer entry for.
    armed: Option<Instant>,
    // Edge-triggered readiness: set by the reactor's events, cleared only when
    // the socket says it would block.
    readable: bool,
    writable: bool,
    /// The armed deadline passed: check the deadlines on the next turn.
    deadline_due: bool,
    /// On the reactor's queue of sessions to serve.
    listed: bool,
    farewell: Farewell,
}

impl Connection {
    pub(crate) fn new(stream: mio::net::TcpStream, handle: Arc<SessionHandle>) -> Self {
        Self {
            stream,
            recv: RecvBuffer::default(),
            in_flight: VecDeque::new(),
            packet_started: None,
            last_received: Instant::now(),
            rate_window: None,
            phase: Phase::Open,
            armed: None,
            readable: false,
            writable: false,
            deadline_due: false,
            listed: false,
            farewell: Farewell { handle, detail: None, sealed: None },
        }
    }

    pub(crate) fn handle(&self) -> &SessionHandle {
        &self.farewell.handle
    }

    pub(crate) fn stream_mut(&mut self) -> &mut mio::net::TcpStream {
        &mut self.stream
    }

    /// The reactor could not take the socket in: the session ends with this.
    pub(crate) fn refuse(&mut self, error: &io::Error) {
        self.settle(Stop::new(DisconnectReason::Reset, format!("not registered for readiness: {error}")));
    }

    /// An event from the socket: what it says is ready stays ready until a
    /// read or write would block.
    pub(crate) fn note_ready(&mut self, readable: bool, writable: bool) {
        self.readable |= readable;
        self.writable |= writable;
    }

    /// The reactor's timer entry at `at` came due.
    pub(crate) fn deadline_passed(&mut self, at: Instant) -> bool {
        if self.armed != Some(at) {
            return false;
        }
        self.armed = None;
        self.deadline_due = true;
        true
    }

    /// The deadline the reactor should add a timer entry for, if it is nearer
    /// than the one it holds. A deadline that moved later (more bytes arrived)
    /// is not chased: the entry fires early and is set again, which costs one
    /// entry per timeout period, not one per read.
    pub(crate) fn deadline_to_arm(&mut self) -> Option<Instant> {
        let next = self.next_deadline()?;
        if self.armed.is_some_and(|armed| armed <= next) {
            return None;
        }
        self.armed = Some(next);
        Some(next)
    }

    /// Marks the session as queued to be served; false if it already was.
    pub(crate) fn list(&mut self) -> bool {
        !std::mem::replace(&mut self.listed, true)
    }

    pub(crate) fn unlist(&mut self) {
        self.listed = false;
    }

    /// Serves whatever is ready, up to a number of turns. `scratch` takes the
    /// bytes a closing session discards.
    pub(crate) fn serve(&mut self, scratch: &mut [u8]) -> Served {
        if let Phase::Lingering { .. } = self.phase {
            return self.serve_lingering(scratch);
        }
        match self.serve_open() {
            Ok(served) => served,
            Err(stop) => {
                if !self.settle(stop).flushes_queue() {
                    return Served::Done;
                }
                let until = Instant::now() + self.handle().service.config.session.linger;
                self.phase = Phase::Lingering { until, write_shut: false };
                self.serve_lingering(scratch)
            }
        }
    }

    fn serve_open(&mut self) -> Result<Served, Stop> {
        for _ in 0..TURNS_PER_SERVE {
            if !self.turn()? {
                return Ok(Served::Waiting);
            }
        }
        Ok(Served::Busy)
    }

    /// Serves whatever is ready: the doorbell, room to write, bytes to read, a
    /// deadline. Returns whether anything was.
    fn turn(&mut self) -> Result<bool, Stop> {
        if let Some(reason) = self.handle().queue.close_reason() {
            return Err(Stop { reason, detail: None });
        }
        let mut served = false;
        if self.handle().queue.take_wakeup() {
            self.flush()?;
            served = true;
        }
        if self.writable && !self.in_flight.is_empty() {
            self.flush()?;
            served = true;
        }
        // A paused reader leaves its bytes in the kernel: TCP pushes back.
        if self.readable && !self.handle().inbound.is_full() {
            self.read()?;
            served = true;
        }
        if std::mem::take(&mut self.deadline_due) {
            self.check_deadlines()?;
            served = true;
        }
        Ok(served)
    }

    /// Reads what the socket has (up to a turn's worth) and cuts it into events.
    fn read(&mut self) -> Result<(), Stop> {
        let mut turn = 0;
        let outcome = loop {
            let want = self.bytes_wanted().max(self.farewell.handle.service.config.session.read_size);
            let socket = SockRef::from(&self.stream);
            match self.recv.read_with(want, |buf| recv_into(socket, buf)) {
                Ok(0) => {
                    let detail = match self.recv.len() {
                        0 => None,
                        n => Some(format!("closed with {n} bytes of an incomplete packet").into()),
                    };
                    break Err(Stop { reason: DisconnectReason::ClosedByPeer, detail });
                }
                Ok(n) => {
                    turn += n;
                    ServiceStats::add(&self.handle().service.stats.bytes_in, n as u64);
                    self.last_received = Instant::now();
                    if let Err(stop) = self.cut_events() {
                        break Err(stop);
                    }
                    if turn >= READ_TURN_BYTES || self.handle().inbound.is_full() {
                        break Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    break Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(Stop::io(&e)),
            }
        };
        // Packets still on their way to the application keep the memory they
        // came in; an empty buffer need not keep any, which keeps idle sessions small.
        self.recv.release_if_empty();
        outcome
    }

    /// Bytes the packet at the front still needs, so one read can complete it.
    fn bytes_wanted(&self) -> usize {
        let unread = self.recv.unread();
        match unread.first_chunk::<2>() {
            Some(size) => usize::from(u16::from_le_bytes(*size)).saturating_sub(unread.len()),
            None => 0,
        }
    }

    /// Turns what was read into events: whole packets (or, raw, every byte).
    fn cut_events(&mut self) -> Result<(), Stop> {
        let handle = &self.farewell.handle;
        let config = &handle.service.config.session;
        let mut packets = 0u64;
        let mut weight = 0usize;
        let result = match config.framing {
            Framing::Raw => {
                let data = self.recv.take(self.recv.len());
                weight = data.len() + EVENT_OVERHEAD;
                push_event(Event::Received { session: handle.id, data });
                Ok(())
            }
            Framing::Packets => loop {
                match self.recv.next_packets(&config.frame_limits) {
                    Ok(Some(run)) => {
                        packets += run.len() as u64;
                        weight += run.byte_len() + EVENT_OVERHEAD;
                        push_event(Event::Packets { session: handle.id, packets: run });
                    }
                    Ok(None) => break Ok(()),
                    Err(error) => break Err(Stop::frame(error)),
                }
            },
        };
        handle.inbound.add(weight);
        handle.service.stats.pending_recv_bytes.fetch_add(weight, Ordering::Relaxed);
        ServiceStats::add(&handle.service.stats.packets_in, packets);
        if let Some(limit) = config.max_packets_per_second {
            let now = Instant::now();
            let window = self.rate_window.get_or_insert_with(|| Box::new(RateWindow::new(now)));
            if let Err(count) = window.count(packets, limit, now) {
                return Err(Stop::new(
                    DisconnectReason::RateLimited,
                    format!("{count} packets within one second, max_packets_per_second {limit}"),
                ));
            }
        }
        // The slowloris deadline runs from the first byte of a packet and is not
        // moved by the bytes that dribble in after it.
        if self.recv.is_empty() || config.framing == Framing::Raw {
            self.packet_started = None;
        } else if packets > 0 || self.packet_started.is_none() {
            self.packet_started = Some(Instant::now());
        }
        result
    }

    /// Writes everything queued, in gathered writes, until the queue is empty or
    /// the socket is full.
    fn flush(&mut self) -> Result<(), Stop> {
        let handle = self.farewell.handle.clone();
        // Bytes written since the queue was last told; each collect settles them.
        let mut unsettled = 0;
        let mut packets_written = 0u64;
        let mut bytes_written = 0usize;
        let result = loop {
            if !handle.queue.collect(std::mem::take(&mut unsettled), &mut self.in_flight) {
                break Ok(());
            }
            match self.write_some() {
                Ok((bytes, packets)) => {
                    unsettled = bytes;
                    bytes_written += bytes;
                    packets_written += packets;
                    if handle.service.config.session.report_sent {
                        push_event(Event::Sent { session: handle.id, nbytes: bytes });
                    }
                    if bytes_written >= WRITE_TURN_BYTES {
                        // A turn's worth: the peer's bytes (its FIN, say) and the
                        // other sessions come first; the wakeup brings us back.
                        handle.queue.collect(std::mem::take(&mut unsettled), &mut self.in_flight);
                        handle.queue.wake_driver();
                        break Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(Stop::io(&e)),
            }
        };
        if self.in_flight.is_empty() && self.in_flight.capacity() > IDLE_IN_FLIGHT_CAPACITY {
            // A burst's worth of slots is not kept for the rest of a quiet session.
            self.in_flight = VecDeque::new();
        }
        let stats = &handle.service.stats;
        stats.send_queue_bytes.fetch_sub(bytes_written, Ordering::Relaxed);
        ServiceStats::add(&stats.bytes_out, bytes_written as u64);
        ServiceStats::add(&stats.packets_out, packets_written);
        result
    }

    /// One gathered write of the packets in flight. Returns bytes written and
    /// packets completed.
    fn write_some(&mut self) -> io::Result<(usize, u64)> {
        let socket = SockRef::from(&self.stream);
        let result = write_gathered(&mut self.in_flight, |slices| send_no_signal(socket, slices));
        if result.as_ref().is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock) {
            self.writable = false;
        }
        result
    }

    fn next_deadline(&self) -> Option<Instant> {
        if let Phase::Lingering { until, .. } = self.phase {
            return Some(until);
        }
        let config = &self.farewell.handle.service.config.session;
        let packet = self.packet_started.zip(config.packet_timeout).map(|(at, limit)| at + limit);
        let idle = config.idle_timeout.map(|limit| self.last_received + limit);
        match (packet, idle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn check_deadlines(&mut self) -> Result<(), Stop> {
        let now = Instant::now();
        let config = &self.farewell.handle.service.config.session;
        if let (Some(started), Some(limit)) = (self.packet_started, config.packet_timeout) {
            if now >= started + limit {
                return Err(Stop::new(
                    DisconnectReason::PacketTimeout,
                    format!(
                        "packet incomplete after {:.1}s ({} bytes buffered), packet_timeout {:.1}s",
                        (now - started).as_secs_f64(),
                        self.recv.len(),
                        limit.as_secs_f64()
                    ),
                ));
            }
        }
        if let Some(limit) = config.idle_timeout {
            if now >= self.last_received + limit {
                return Err(Stop::new(
                    DisconnectReason::IdleTimeout,
                    format!(
                        "nothing received for {:.1}s, idle_timeout {:.1}s",
                        (now - self.last_received).as_secs_f64(),
                        limit.as_secs_f64()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Settles the reason (and the detail for the one log line); returns it.
    fn settle(&mut self, stop: Stop) -> DisconnectReason {
        let handle = &self.farewell.handle;
        // The first reason wins: a kick that came before this socket error stays a kick.
        handle.queue.request_close(stop.reason);
        let reason = handle.queue.close_reason().unwrap_or(stop.reason);
        if reason == stop.reason {
            self.farewell.detail = stop.detail;
        } else if let Some((unsent, refused)) = handle.queue.overflow() {
            self.farewell.detail = Some(
                format!(
                    "{unsent} bytes unsent and a {refused}-byte packet more would pass max_send_queue_bytes {}",
                    handle.service.config.session.max_send_queue_bytes
                )
                .into(),
            );
        }
        reason
    }

    /// A local close: flush what was queued before it, send FIN, and wait for
    /// the peer's FIN, all within the linger. Closing while the peer's bytes are
    /// still unread would make the kernel send a reset, which can destroy the
    /// goodbye the peer has not read yet.
    fn serve_lingering(&mut self, scratch: &mut [u8]) -> Served {
        let Phase::Lingering { until, mut write_shut } = self.phase else {
            unreachable!("only a closing session lingers")
        };
        self.deadline_due = false;
        if Instant::now() >= until {
            let unsent = self.handle().queue.unsent_bytes();
            if unsent > 0 {
                let linger = self.handle().service.config.session.linger;
                self.farewell.detail = Some(
                    format!("linger of {:.1}s expired with {unsent} bytes unsent", linger.as_secs_f64())
                        .into(),
                );
            }
            return Served::Done;
        }
        for _ in 0..TURNS_PER_SERVE {
            if !write_shut {
                self.handle().queue.take_wakeup();
                if self.flush().is_err() {
                    return Served::Done;
                }
                if !self.in_flight.is_empty() {
                    if self.writable {
                        continue;
                    }
                    return Served::Waiting;
                }
                if SockRef::from(&self.stream).shutdown(std::net::Shutdown::Write).is_err() {
                    return Served::Done;
                }
                write_shut = true;
                self.phase = Phase::Lingering { until, write_shut };
            }
            if !self.readable {
                return Served::Waiting;
            }
            match (&self.stream).read(scratch) {
                Ok(0) => return Served::Done,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return Served::Waiting;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Served::Done,
            }
        }
        Served::Busy
    }
}

/// One non-blocking read into the buffer's free space.
fn recv_into(socket: SockRef<'_>, buf: &mut BytesMut) -> io::Result<usize> {
    let filled = buf.len();
    let read = socket.recv(buf.spare_capacity_mut())?;
    // SAFETY: `recv` initialised the first `read` bytes of the spare capacity.
    unsafe { buf.set_len(filled + read) };
    Ok(read)
}

/// A gathered write that cannot raise SIGPIPE: `sendmsg` with `MSG_NOSIGNAL`,
/// not `writev`. A write to a reset socket comes back as EPIPE instead of a
/// signal that kills the host process when it has SIGPIPE at its default.
fn send_no_signal(socket: SockRef<'_>, slices: &[IoSlice<'_>]) -> io::Result<usize> {
    socket.send_vectored_with_flags(slices, libc::MSG_NOSIGNAL)
}

/// Reports a connection's end exactly once, when the [`Connection`] is dropped:
/// after a normal finish, a shutdown that drops its reactor, or a panic.
struct Farewell {
    handle: Arc<SessionHandle>,
    detail: Option<Box<str>>,
    /// The final reason, once the queue is sealed.
    sealed: Option<DisconnectReason>,
}

impl Farewell {
    /// Finishes the send queue: no one writes to the socket after this, so it
    /// may be closed. Settles the reason (a connection dropped by a shutdown
    /// has none of its own) and releases what was never written.
    fn seal(&mut self) -> DisconnectReason {
        if let Some(reason) = self.sealed {
            return reason;
        }
        let handle = &self.handle;
        let fallback = handle.service.registry.closed_with().unwrap_or(DisconnectReason::Reset);
        let unsent = handle.queue.finish(fallback);
        handle.service.stats.send_queue_bytes.fetch_sub(unsent, Ordering::Relaxed);
        let reason = handle.queue.close_reason().unwrap_or(fallback);
        self.sealed = Some(reason);
        reason
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Before the fields drop and the socket closes: its descriptor number
        // may go to a new connection the moment it is closed.
        self.farewell.seal();
    }
}

impl Drop for Farewell {
    fn drop(&mut self) {
        let reason = self.seal();
        let handle = &self.handle;
        let service = &handle.service;
        service.stats.count_disconnect(reason);
        service.registry.remove(handle.id);
        let detail = self.detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default();
        let level = if reason.is_fault() { log::Level::Warn } else { log::Level::Debug };
        log::log!(
            target: "servercore",
            level,
            "session {} ({}) disconnected: {}{}",
            handle.id,
            handle.peer,
            reason,
            detail
        );
        queue_events(&service.events);
        service.events.push(Event::Disconnected { session: handle.id, reason });
    }
}

/// Packets counted in fixed one-second windows, for `max_packets_per_second`.
struct RateWindow {
    started: Instant,
    packets: u64,
}

impl RateWindow {
    fn new(now: Instant) -> Self {
        Self { started: now, packets: 0 }
    }

    /// Adds `packets`; returns the window's count as an error once it passes `limit`.
    fn count(&mut self, packets: u64, limit: u32, now: Instant) -> Result<(), u64> {
        if now.duration_since(self.started) >= std::time::Duration::from_secs(1) {
            self.started = now;
            self.packets = 0;
        }
        self.packets += packets;
        if self.packets > u64::from(limit) { Err(self.packets) } else { Ok(()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a session holds lives as long as the connection: it is paid by
    /// each of ten thousand idle players.
    #[test]
    fn an_idle_session_is_small() {
        let connection = std::mem::size_of::<Connection>();
        assert!(connection <= 200, "a connection takes {connection} bytes");
        let handle = std::mem::size_of::<SessionHandle>();
        assert!(handle <= 192, "a session handle takes {handle} bytes");
    }
}
