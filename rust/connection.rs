//! A session's driver: the [`Connection`] that owns the socket inside its
//! reactor, and serves whatever is ready.
//!
//! The socket is readable (read, check headers, cut packets, queue events), the
//! socket is writable or the doorbell rang (gathered writes of everything
//! queued), the application caught up with a paused reader, or a deadline
//! passed (packet timeout, idle timeout, linger). It never runs application
//! code and never blocks, so a hostile or stalled peer costs its own turns and
//! nothing else.
//!
//! Deadlines judge the peer, so they stand still while the server itself is
//! behind: while the reader is paused because the application has not handled
//! what this peer sent, the peer's next bytes wait in our own socket buffer,
//! and no packet or idle timeout runs.
//!
//! A peer that half-closes (shuts down its sending side) has said everything.
//! Its session stays open until the application has handled all it sent, so
//! the answers are queued; then it closes with `ClosedByPeer`, flushing the
//! queue like a local close does (bounded by the linger).
//!
//! However the driver ends (a reason of its own, a shutdown that drops its
//! reactor, a panic), the send queue is sealed, then the socket is closed, then
//! exactly one `Disconnected` event is queued: that order is fixed by
//! `Connection`'s drop and the order of its fields.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, Read};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::clock::Tick;
use crate::config::Framing;
use crate::events::{Event, EventQueue};
use crate::frame::FrameError;
use crate::proxy_header;
use crate::reason::DisconnectReason;
use crate::recv_buffer::RecvBuffer;
use crate::send_queue::write_gathered;
use crate::session::{EVENT_OVERHEAD, SessionHandle, send_no_signal};
use crate::stats::ServiceStats;
use bytes::{Bytes, BytesMut};
use socket2::SockRef;

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

/// Why the serve loop stopped, with what a log line needs.
struct Stop {
    reason: DisconnectReason,
    // Boxed to be one word, like the farewell's.
    #[allow(clippy::box_collection)]
    detail: Option<Box<String>>,
}

impl Stop {
    fn new(reason: DisconnectReason, detail: impl Into<String>) -> Self {
        Self { reason, detail: Some(Box::new(detail.into())) }
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
        until: Tick,
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
    packet_started: Option<Tick>,
    last_received: Tick,
    /// Only with `max_packets_per_second`: boxed, so others do not pay for it.
    rate_window: Option<Box<RateWindow>>,
    phase: Phase,
    /// The deadline the reactor holds a timer entry for.
    armed: Option<Tick>,
    // Edge-triggered readiness: set by the reactor's events, cleared when
    // the socket says it would block, or (reading) when a read came back short.
    readable: bool,
    writable: bool,
    /// The peer's FIN or an error was reported: read on to the end of the
    /// stream even after a short read, since no new event will come for it.
    read_closed: bool,
    /// The armed deadline passed: check the deadlines on the next turn.
    deadline_due: bool,
    /// On the reactor's queue of sessions to serve.
    listed: bool,
    /// The application has not handled what this peer sent (its backlog is
    /// full), so the reader stopped: the peer's deadlines stand still.
    paused: bool,
    /// The peer shut down its sending side; the session closes once the
    /// application has handled everything it sent.
    peer_finished: bool,
    /// The peer has sent something. Until then, with `first_packet_timeout`,
    /// `packet_started` holds the connect time, and the deadline is
    /// `first_packet_timeout` from it.
    greeted: bool,
    farewell: Farewell,
}

impl Connection {
    pub(crate) fn new(stream: mio::net::TcpStream, handle: Arc<SessionHandle>) -> Self {
        let awaits_first_packet = handle.context.config.first_packet_timeout.is_some();
        Self {
            stream,
            recv: RecvBuffer::default(),
            in_flight: VecDeque::new(),
            packet_started: awaits_first_packet.then(Tick::now),
            last_received: Tick::now(),
            rate_window: None,
            phase: Phase::Open,
            armed: None,
            readable: false,
            writable: false,
            read_closed: false,
            deadline_due: false,
            listed: false,
            paused: false,
            peer_finished: false,
            greeted: false,
            farewell: Farewell { handle, detail: None, sealed: None, linger_expired: false },
        }
    }

    pub(crate) fn handle(&self) -> &Arc<SessionHandle> {
        &self.farewell.handle
    }

    /// Settles the reason of a connection ended from outside (its reactor is
    /// dropped): `fallback`, unless it had one already. Its drop reports it.
    pub(crate) fn seal(&mut self, fallback: DisconnectReason) {
        self.farewell.seal(fallback);
    }

    pub(crate) fn stream_mut(&mut self) -> &mut mio::net::TcpStream {
        &mut self.stream
    }

    /// The reactor could not take the socket in: the session ends with this.
    pub(crate) fn refuse(&mut self, error: &io::Error) {
        self.settle(Stop::new(DisconnectReason::Reset, format!("not registered for readiness: {error}")));
    }

    /// An event from the socket: what it says is ready stays ready until a
    /// read or write would block. `read_closed`: the event also says the peer
    /// closed its side (or the socket failed).
    pub(crate) fn note_ready(&mut self, readable: bool, writable: bool, read_closed: bool) {
        self.readable |= readable;
        self.writable |= writable;
        self.read_closed |= read_closed;
    }

    /// The reactor's timer entry at `at` came due.
    pub(crate) fn deadline_passed(&mut self, at: Tick) -> bool {
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
    pub(crate) fn deadline_to_arm(&mut self) -> Option<Tick> {
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
                let reason = self.settle(stop);
                if !reason.flushes_queue() {
                    return Served::Done;
                }
                let until = Tick::now().after(self.handle().context.linger_for(reason));
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
        if self.paused && !self.inbound_full() {
            self.resume();
        }
        if self.peer_finished {
            if self.handle().inbound.is_empty() {
                // Everything the peer sent is handled and the answers are queued.
                return Err(Stop { reason: DisconnectReason::ClosedByPeer, detail: None });
            }
        } else if self.readable && !self.paused {
            // A paused reader leaves its bytes in the kernel: TCP pushes back.
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
            let want = self.bytes_wanted().max(self.farewell.handle.context.config.read_size);
            let socket = SockRef::from(&self.stream);
            let mut offered = 0;
            let read = self.recv.read_with(want, |buf| {
                offered = buf.capacity() - buf.len();
                recv_into(socket, buf)
            });
            match read {
                Ok(0) => break self.finish_receiving(),
                Ok(n) => {
                    turn += n;
                    ServiceStats::add(&self.handle().context.stats.bytes_in, n as u64);
                    self.last_received = Tick::now();
                    if !self.greeted {
                        // The first bytes: from here a packet's own deadline
                        // (packet_timeout, from its first byte) takes over,
                        // and a full server no longer counts it as silent.
                        self.greeted = true;
                        self.packet_started = None;
                        self.handle().mark_heard_from();
                        if let Err(stop) = self.refuse_an_untrusted_proxy_header() {
                            break Err(stop);
                        }
                    }
                    if let Err(stop) = self.cut_events() {
                        break Err(stop);
                    }
                    if self.inbound_full() {
                        self.paused = true;
                        break Ok(());
                    }
                    if turn >= READ_TURN_BYTES {
                        break Ok(());
                    }
                    if n < offered && !self.read_closed {
                        // The socket had less than there was room for: it is
                        // drained, and what arrives next is a new event. Asking
                        // again would only hear "would block" (a system call
                        // per request saved).
                        self.readable = false;
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

    /// A trusted proxy's PROXY header is read before its connection is a
    /// session; one that reaches a session came from someone who is not
    /// trusted to name a client (and would otherwise end as INVALID_HEADER, or
    /// wait out a deadline, with no word of why).
    fn refuse_an_untrusted_proxy_header(&self) -> Result<(), Stop> {
        let handle = self.handle();
        if handle.context.config.framing == Framing::Packets
            && proxy_header::starts_with_signature(self.recv.unread())
        {
            let detail =
                format!("a PROXY protocol header, but {} is not in trusted_proxies", handle.peer().ip());
            return Err(Stop::new(DisconnectReason::ProxyHeader, detail));
        }
        Ok(())
    }

    /// The peer shut down its sending side. What it sent is on its way to the
    /// application; the session closes once that is handled (at once if it is).
    fn finish_receiving(&mut self) -> Result<(), Stop> {
        self.peer_finished = true;
        if !self.recv.is_empty() {
            // The rest of that packet can never come.
            let detail = format!("closed with {} bytes of an incomplete packet", self.recv.len());
            self.farewell.detail = Some(Box::new(detail));
        }
        if self.handle().inbound.wake_when_empty() {
            return Err(Stop { reason: DisconnectReason::ClosedByPeer, detail: self.farewell.detail.take() });
        }
        Ok(())
    }

    /// The application has not handled `max_pending_recv_bytes` of what this
    /// peer sent: the reader waits for it.
    fn inbound_full(&self) -> bool {
        let handle = self.handle();
        handle.inbound.is_full(handle.context.config.max_pending_recv_bytes)
    }

    /// The application caught up with a paused reader: the peer's clocks start
    /// again from now, as if the time the server was behind had not passed.
    fn resume(&mut self) {
        self.paused = false;
        let now = Tick::now();
        self.last_received = now;
        if self.packet_started.is_some() {
            self.packet_started = Some(now);
        }
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
        let config = &handle.context.config;
        let mut packets = 0u64;
        let mut weight = 0usize;
        let result = match config.framing {
            Framing::Raw => {
                let data = self.recv.take(self.recv.len());
                weight = data.len() + EVENT_OVERHEAD;
                push_event(Event::Received { session: handle.id(), data });
                Ok(())
            }
            Framing::Packets => loop {
                match self.recv.next_packets(&config.frame_limits) {
                    Ok(Some(run)) => {
                        packets += run.len() as u64;
                        weight += run.byte_len() + EVENT_OVERHEAD;
                        push_event(Event::Packets { session: handle.id(), packets: run });
                    }
                    Ok(None) => break Ok(()),
                    Err(error) => break Err(Stop::frame(error)),
                }
            },
        };
        handle.inbound.add(weight);
        handle.context.stats.pending_recv_bytes.fetch_add(weight, Ordering::Relaxed);
        ServiceStats::add(&handle.context.stats.packets_in, packets);
        if let Some(limit) = config.max_packets_per_second {
            let now = Tick::now();
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
            self.packet_started = Some(Tick::now());
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
                    if handle.context.config.report_sent {
                        push_event(Event::Sent { session: handle.id(), nbytes: bytes });
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
        let stats = &handle.context.stats;
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

    /// How long the packet under way may take; before the peer has sent
    /// anything, how long it may stay silent after connecting.
    fn packet_limit(&self) -> Option<std::time::Duration> {
        let config = &self.farewell.handle.context.config;
        if self.greeted { config.packet_timeout } else { config.first_packet_timeout }
    }

    fn next_deadline(&self) -> Option<Tick> {
        if let Phase::Lingering { until, .. } = self.phase {
            return Some(until);
        }
        if self.paused || self.peer_finished {
            return None;
        }
        let config = &self.farewell.handle.context.config;
        let packet = self.packet_started.zip(self.packet_limit()).map(|(at, limit)| at.after(limit));
        let idle = config.idle_timeout.map(|limit| self.last_received.after(limit));
        match (packet, idle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn check_deadlines(&mut self) -> Result<(), Stop> {
        if self.paused || self.peer_finished {
            // The peer is waiting for us, or has nothing more to send.
            return Ok(());
        }
        let now = Tick::now();
        let config = &self.farewell.handle.context.config;
        if let (Some(started), Some(limit)) = (self.packet_started, self.packet_limit())
            && now >= started.after(limit)
        {
            let waited = now.since(started).as_secs_f64();
            return Err(match self.greeted {
                true => Stop::new(
                    DisconnectReason::PacketTimeout,
                    format!(
                        "packet incomplete after {waited:.1}s ({} bytes buffered), packet_timeout {:.1}s",
                        self.recv.len(),
                        limit.as_secs_f64()
                    ),
                ),
                false => Stop::new(
                    DisconnectReason::FirstPacketTimeout,
                    format!(
                        "nothing received {waited:.1}s after connecting, first_packet_timeout {:.1}s",
                        limit.as_secs_f64()
                    ),
                ),
            });
        }
        if let Some(limit) = config.idle_timeout
            && now >= self.last_received.after(limit)
        {
            return Err(Stop::new(
                DisconnectReason::IdleTimeout,
                format!(
                    "nothing received for {:.1}s, idle_timeout {:.1}s",
                    now.since(self.last_received).as_secs_f64(),
                    limit.as_secs_f64()
                ),
            ));
        }
        Ok(())
    }

    /// Settles the reason (and the detail for the one log line); returns it.
    fn settle(&mut self, stop: Stop) -> DisconnectReason {
        let handle = &self.farewell.handle;
        // The first reason wins: a kick that came before this socket error stays a kick.
        handle.queue.request_close(stop.reason);
        let reason = handle.queue.close_reason().unwrap_or(stop.reason);
        if let Some((unsent, refused)) = handle.queue.overflow() {
            // The send that overflowed only recorded it; the figures are the detail.
            self.farewell.detail = Some(Box::new(format!(
                "{unsent} bytes unsent and a {refused}-byte packet more would pass max_send_queue_bytes {}",
                handle.context.config.max_send_queue_bytes
            )));
        } else if reason == stop.reason && stop.detail.is_some() {
            self.farewell.detail = stop.detail;
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
        if Tick::now() >= until {
            if self.handle().queue.unsent_bytes() > 0 {
                // The peer is there but did not take what was queued in time.
                self.farewell.linger_expired = true;
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
            if self.peer_finished {
                // Its FIN came first: nothing more to wait for.
                return Served::Done;
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

/// Reports a connection's end exactly once, when the [`Connection`] is dropped:
/// after a normal finish, a shutdown that drops its reactor, or a panic.
struct Farewell {
    handle: Arc<SessionHandle>,
    /// What the one log line says after the reason (a thin box: most
    /// connections never have one, and each pays for the field).
    #[allow(clippy::box_collection)]
    detail: Option<Box<String>>,
    /// The final reason, once the queue is sealed.
    sealed: Option<DisconnectReason>,
    /// A local close ran out of linger with bytes still queued: dropping them
    /// was our decision, not the peer's, so it is a warning.
    linger_expired: bool,
}

impl Farewell {
    /// Finishes the send queue: no one writes to the socket after this, so it
    /// may be closed. Settles the reason (`fallback` for a connection that
    /// has none of its own) and releases what was never written, counting it
    /// and saying so in the detail.
    fn seal(&mut self, fallback: DisconnectReason) -> DisconnectReason {
        if let Some(reason) = self.sealed {
            return reason;
        }
        let handle = &self.handle;
        let dropped = handle.queue.finish(fallback);
        let reason = handle.queue.close_reason().unwrap_or(fallback);
        let context = &handle.context;
        context.stats.send_queue_bytes.fetch_sub(dropped, Ordering::Relaxed);
        if dropped > 0 {
            ServiceStats::add(&context.stats.unsent_bytes_dropped, dropped as u64);
            let why = match self.linger_expired {
                true => format!("linger of {:.1}s expired", context.linger_for(reason).as_secs_f64()),
                false => "the connection ended first".to_owned(),
            };
            let detail = self.detail.get_or_insert_with(Box::default);
            if !detail.is_empty() {
                detail.push_str("; ");
            }
            detail.push_str(&format!("{dropped} queued bytes were never sent ({why})"));
        }
        self.sealed = Some(reason);
        reason
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Before the fields drop and the socket closes: its descriptor number
        // may go to a new connection the moment it is closed.
        self.farewell.seal(DisconnectReason::Reset);
    }
}

impl Drop for Farewell {
    fn drop(&mut self) {
        let reason = self.seal(DisconnectReason::Reset);
        let handle = &self.handle;
        // Sealed, so it can join no room again; out of every room before its
        // Disconnected is queued, so on_disconnected never finds it in one.
        handle.leave_all();
        let context = &handle.context;
        context.stats.count_disconnect(reason);
        let mut level =
            if reason.is_fault() || self.linger_expired { log::Level::Warn } else { log::Level::Debug };
        if level == log::Level::Warn {
            // An attacker must not set the log rate: the first few of each
            // reason are written, the rest summed up once per interval.
            level = context.fault_log.level_for(reason, handle.peer().ip());
        }
        let said = context.take_close_detail(handle.id());
        let detail = match (said, self.detail.as_deref()) {
            (Some(said), Some(ours)) => format!(": {said}; {ours}"),
            (Some(said), None) => format!(": {said}"),
            (None, Some(ours)) => format!(": {ours}"),
            (None, None) => String::new(),
        };
        log::log!(
            target: "servercore",
            level,
            "session {} ({}) disconnected: {reason}{detail}",
            handle.id(),
            handle.peer()
        );
        queue_events(&context.events);
        context.events.push(Event::Disconnected { session: handle.id(), reason });
    }
}

/// Packets counted in fixed one-second windows, for `max_packets_per_second`.
struct RateWindow {
    started: Tick,
    packets: u64,
}

impl RateWindow {
    fn new(now: Tick) -> Self {
        Self { started: now, packets: 0 }
    }

    /// Adds `packets`; returns the window's count as an error once it passes `limit`.
    fn count(&mut self, packets: u64, limit: u32, now: Tick) -> Result<(), u64> {
        if now.since(self.started) >= std::time::Duration::from_secs(1) {
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
    fn an_idle_connection_is_small() {
        // 152 in a release build; a debug build's mio stream keeps 12 more bytes.
        let connection = std::mem::size_of::<Connection>();
        assert!(connection <= 160, "a connection takes {connection} bytes");
    }
}
