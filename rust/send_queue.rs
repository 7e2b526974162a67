//! One session's outgoing packets: the lecture's `_sendQueue` with its
//! `_sendRegistered` flag, which here says who holds the writer role.
//!
//! `push` holds the lock only to append and to claim the role: the one caller
//! whose push finds the writer idle owes the write. It either writes itself
//! (`write_now`, the lecture's `RegisterSend` on the calling thread, which
//! saves a thread hop) or hands the role to the session's driver. The driver
//! drains everything queued in gathered writes and gives the role back only
//! when it finds the queue empty, under the same lock, so no push is ever left
//! unwritten, two writers never interleave, and no wakeup is wasted on a writer
//! that is already busy.
//!
//! The queue also holds the session's close request: a send that comes after it
//! is refused, so "queue a goodbye, then disconnect" writes exactly the goodbye.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::Mutex;

use bytes::{Buf, Bytes};

use crate::doorbell::Doorbell;
use crate::reason::DisconnectReason;

#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    /// Queued; it will be written.
    Queued,
    /// Queuing it would pass the byte limit: the session is now closing with
    /// [`DisconnectReason::SendQueueFull`] and the packet was not queued.
    Full,
    /// The session is closing or closed; the packet was not queued.
    Closed,
}

/// Who writes what is queued.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Writer {
    /// Nothing is queued or being written.
    #[default]
    Idle,
    /// The caller whose push found the writer idle owes the write: it writes
    /// itself or hands over to the driver.
    Caller,
    /// The session's driver writes; pushes only queue.
    Driver,
}

#[derive(Default)]
pub struct SendQueue {
    state: Mutex<QueueState>,
    /// Rung when the writer role was handed to the driver, a close was
    /// requested, or (through the session) the application caught up with a
    /// paused reader.
    doorbell: Doorbell,
}

#[derive(Default)]
struct QueueState {
    queued: VecDeque<Bytes>,
    /// Queued plus taken by the driver and not yet accepted by the kernel.
    unsent_bytes: usize,
    writer: Writer,
    close: Option<DisconnectReason>,
    /// The driver is gone: nothing will be written again.
    finished: bool,
    /// Unsent bytes, and the size of the packet refused, when the limit was hit.
    /// Boxed: rare, and every session pays for the field.
    overflow: Option<Box<(usize, usize)>>,
}

impl SendQueue {
    pub fn new(doorbell: Doorbell) -> Self {
        Self { state: Mutex::default(), doorbell }
    }

    /// Queues `packet` unless that would make more than `max_unsent_bytes`
    /// wait, for the driver to write: if the writer was idle, the driver gets
    /// the role and is woken. One lock per packet, which is what a broadcast
    /// pays per recipient.
    pub fn push(&self, packet: Bytes, max_unsent_bytes: usize) -> Push {
        let (outcome, owed) = self.enqueue(packet, max_unsent_bytes, Writer::Driver);
        if owed {
            self.wake_driver();
        }
        outcome
    }

    /// [`push`](Self::push) that leaves the write to the caller: returns whether
    /// the caller now holds the writer role, and so must call
    /// [`write_now`](Self::write_now) or [`hand_over`](Self::hand_over).
    pub fn push_quietly(&self, packet: Bytes, max_unsent_bytes: usize) -> (Push, bool) {
        self.enqueue(packet, max_unsent_bytes, Writer::Caller)
    }

    /// Queues, and gives an idle writer's role to `claimant`; returns whether it did.
    fn enqueue(&self, packet: Bytes, max_unsent_bytes: usize, claimant: Writer) -> (Push, bool) {
        let mut state = self.lock();
        if state.close.is_some() || state.finished {
            return (Push::Closed, false);
        }
        if state.unsent_bytes + packet.len() > max_unsent_bytes {
            state.close = Some(DisconnectReason::SendQueueFull);
            state.overflow = Some(Box::new((state.unsent_bytes, packet.len())));
            drop(state);
            self.wake_driver();
            return (Push::Full, false);
        }
        state.unsent_bytes += packet.len();
        state.queued.push_back(packet);
        let owed = state.writer == Writer::Idle;
        if owed {
            state.writer = claimant;
        }
        (Push::Queued, owed)
    }

    /// Gives the writer role, if a caller holds it, to the driver, and wakes it.
    pub fn hand_over(&self) {
        let mut state = self.lock();
        if state.writer == Writer::Caller {
            state.writer = Writer::Driver;
        }
        drop(state);
        self.wake_driver();
    }

    /// Wakes the driver without changing who writes. A wakeup that comes while
    /// the driver is busy is kept for its next turn.
    pub fn wake_driver(&self) {
        self.doorbell.ring();
    }

    /// The driver's side: whether it was woken since it last asked.
    pub fn take_wakeup(&self) -> bool {
        self.doorbell.answer()
    }

    /// The driver's reactor took the session in under `key`.
    pub(crate) fn connect_doorbell(&self, key: u32) {
        self.doorbell.connect(key);
    }

    /// The caller holding the writer role writes what is queued, with `write`
    /// (a non-blocking gathered write), under the queue's lock so that the
    /// driver cannot close the socket meanwhile. What the socket does not take
    /// (it is full, or failed) stays queued and the role goes to the driver,
    /// which is woken for it. `written(bytes, packets)` is told what was
    /// written, still under the lock, so that whatever it reports comes before
    /// anything the driver reports after it finishes the queue. Returns bytes
    /// and packets written.
    pub fn write_now(
        &self,
        mut write: impl FnMut(&[IoSlice<'_>]) -> io::Result<usize>,
        written: impl FnOnce(usize, u64),
    ) -> (usize, u64) {
        let mut state = self.lock();
        // A close may have taken the role over since (it flushes what was queued).
        if state.writer != Writer::Caller || state.finished {
            return (0, 0);
        }
        let (mut bytes, mut packets) = (0, 0);
        while !state.queued.is_empty() {
            match write_gathered(&mut state.queued, &mut write) {
                Ok((written, completed)) => {
                    bytes += written;
                    packets += completed;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Full or failed: the driver waits for room, or meets the error.
                Err(_) => break,
            }
        }
        state.unsent_bytes -= bytes;
        let done = state.queued.is_empty();
        state.writer = if done { Writer::Idle } else { Writer::Driver };
        if bytes > 0 {
            written(bytes, packets);
        }
        drop(state);
        if !done {
            self.wake_driver();
        }
        (bytes, packets)
    }

    /// Writes `parts` (one packet or one raw chunk: at most a header and a
    /// payload) straight to the socket,
    /// before anything is copied, if nothing is queued and nobody holds the
    /// writer role; returns `None` if something is (then the caller queues as
    /// usual, so order holds). Under the lock, like
    /// [`write_now`](Self::write_now): `written(bytes, packets)` is told what
    /// the kernel took, and what it did not take is copied by `rest(skip)` (the
    /// bytes after the first `skip`) and queued for the driver, which is woken.
    pub fn write_through(
        &self,
        parts: &[&[u8]],
        mut write: impl FnMut(&[IoSlice<'_>]) -> io::Result<usize>,
        written: impl FnOnce(usize, u64),
        rest: impl FnOnce(usize) -> Bytes,
    ) -> Option<Push> {
        let mut state = self.lock();
        if state.close.is_some() || state.finished {
            return Some(Push::Closed);
        }
        if state.writer != Writer::Idle || !state.queued.is_empty() {
            return None;
        }
        let total: usize = parts.iter().map(|part| part.len()).sum();
        let mut slices = [IoSlice::new(&[]); 2];
        assert!(parts.len() <= slices.len(), "a header and a payload at most");
        for (slice, part) in slices.iter_mut().zip(parts) {
            *slice = IoSlice::new(part);
        }
        let sent = loop {
            match write(&slices[..parts.len()]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Full or failed: the driver waits for room, or meets the error.
                Err(_) => break 0,
            }
        };
        if sent > 0 {
            written(sent, u64::from(sent == total));
        }
        if sent < total {
            let tail = rest(sent);
            state.unsent_bytes += tail.len();
            state.queued.push_back(tail);
            state.writer = Writer::Driver;
            drop(state);
            self.wake_driver();
        }
        Some(Push::Queued)
    }

    /// Records why the session is closing. The first reason wins; returns whether
    /// this call was the first. The driver takes the writer role from a caller,
    /// so what was queued before the close is flushed by the close.
    pub fn request_close(&self, reason: DisconnectReason) -> bool {
        let mut state = self.lock();
        if state.close.is_some() || state.finished {
            return false;
        }
        state.close = Some(reason);
        if state.writer == Writer::Caller {
            state.writer = Writer::Driver;
        }
        drop(state);
        self.wake_driver();
        true
    }

    pub fn close_reason(&self) -> Option<DisconnectReason> {
        self.lock().close
    }

    pub fn is_open(&self) -> bool {
        let state = self.lock();
        state.close.is_none() && !state.finished
    }

    /// When a push hit the limit: the bytes unsent then and the packet refused.
    pub fn overflow(&self) -> Option<(usize, usize)> {
        self.lock().overflow.as_deref().copied()
    }

    pub fn unsent_bytes(&self) -> usize {
        self.lock().unsent_bytes
    }

    /// The driver's side: `written` bytes left for the kernel since the last
    /// call; if the driver holds (or can take) the writer role, everything
    /// queued since is moved to `in_flight`. Returns whether there is anything
    /// to write; when there is not, the role goes back to idle.
    pub fn collect(&self, written: usize, in_flight: &mut VecDeque<Bytes>) -> bool {
        let mut state = self.lock();
        debug_assert!(written <= state.unsent_bytes, "wrote {written} of {} unsent", state.unsent_bytes);
        state.unsent_bytes = state.unsent_bytes.saturating_sub(written);
        if state.writer == Writer::Caller {
            // The caller writes these itself (or hands them over soon).
            return !in_flight.is_empty();
        }
        if in_flight.is_empty() {
            std::mem::swap(in_flight, &mut state.queued);
        } else {
            in_flight.extend(state.queued.drain(..));
        }
        state.writer = if in_flight.is_empty() { Writer::Idle } else { Writer::Driver };
        !in_flight.is_empty()
    }

    /// The driver is gone: refuses every later push and drops what was never
    /// written, so pooled chunks are released. Returns the bytes dropped.
    pub fn finish(&self, reason: DisconnectReason) -> usize {
        let mut state = self.lock();
        state.close.get_or_insert(reason);
        state.finished = true;
        state.queued = VecDeque::new();
        std::mem::take(&mut state.unsent_bytes)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        // No code path panics while holding the lock; recover rather than cascade.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// At most this many slices per gathered write (Linux's `IOV_MAX` is 1024).
const MAX_WRITE_SLICES: usize = 256;

/// One gathered write of the packets at the front of `packets`; what was written
/// leaves the queue. Returns bytes written and packets completed.
pub(crate) fn write_gathered(
    packets: &mut VecDeque<Bytes>,
    write: impl FnOnce(&[IoSlice<'_>]) -> io::Result<usize>,
) -> io::Result<(usize, u64)> {
    let mut slices = [IoSlice::new(&[]); MAX_WRITE_SLICES];
    let count = packets.len().min(MAX_WRITE_SLICES);
    for (slice, packet) in slices.iter_mut().zip(packets.iter()) {
        *slice = IoSlice::new(packet);
    }
    let written = write(&slices[..count])?;
    let mut left = written;
    let mut completed = 0;
    while left > 0 {
        let front = packets.front_mut().expect("the kernel took no more than was offered");
        if front.len() <= left {
            left -= front.len();
            packets.pop_front();
            completed += 1;
        } else {
            front.advance(left);
            left = 0;
        }
    }
    Ok((written, completed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(len: usize) -> Bytes {
        Bytes::from(vec![0u8; len])
    }

    fn wire(queue: &SendQueue) -> (Vec<u8>, (usize, u64)) {
        let mut wire = Vec::new();
        let mut told = None;
        let outcome = queue.write_now(
            |slices| {
                slices.iter().for_each(|s| wire.extend_from_slice(s));
                Ok(slices.iter().map(|s| s.len()).sum())
            },
            |bytes, packets| told = Some((bytes, packets)),
        );
        assert_eq!(told.unwrap_or((0, 0)), outcome, "told what was written, nothing if nothing was");
        (wire, outcome)
    }

    #[test]
    fn the_first_push_on_an_idle_writer_owes_the_write_and_later_ones_do_not() {
        let queue = SendQueue::default();
        assert_eq!(queue.push_quietly(packet(10), 100), (Push::Queued, true));
        assert_eq!(queue.push_quietly(packet(10), 100), (Push::Queued, false));
        queue.hand_over();
        let mut in_flight = VecDeque::new();
        assert!(queue.collect(0, &mut in_flight));
        assert_eq!(in_flight.len(), 2);
        assert_eq!(queue.unsent_bytes(), 20);
        assert_eq!(queue.push_quietly(packet(10), 100), (Push::Queued, false), "the driver is writing");
        in_flight.clear();
        assert!(queue.collect(20, &mut in_flight));
        in_flight.clear();
        assert!(!queue.collect(10, &mut in_flight));
        assert_eq!(queue.unsent_bytes(), 0);
        assert_eq!(queue.push_quietly(packet(1), 100), (Push::Queued, true), "idle again");
    }

    #[test]
    fn the_caller_that_owes_the_write_can_do_it_itself() {
        let queue = SendQueue::default();
        queue.push_quietly(Bytes::from_static(b"abc"), 100);
        queue.push_quietly(Bytes::from_static(b"def"), 100);
        let (bytes, outcome) = wire(&queue);
        assert_eq!(bytes, b"abcdef");
        assert_eq!(outcome, (6, 2));
        assert_eq!(queue.unsent_bytes(), 0);
        assert_eq!(queue.push_quietly(packet(1), 100), (Push::Queued, true), "the role was given back");
    }

    #[test]
    fn a_driver_woken_meanwhile_leaves_the_callers_packets_alone() {
        let queue = SendQueue::default();
        queue.push_quietly(Bytes::from_static(b"abc"), 100);
        let mut in_flight = VecDeque::new();
        assert!(!queue.collect(0, &mut in_flight), "a stray wakeup takes nothing");
        assert!(in_flight.is_empty());
        assert_eq!(wire(&queue).0, b"abc");
    }

    #[test]
    fn what_the_caller_cannot_write_goes_to_the_driver() {
        let queue = SendQueue::default();
        queue.push_quietly(Bytes::from_static(b"abcdef"), 100);
        let mut calls = 0;
        let outcome = queue.write_now(
            |_| {
                calls += 1;
                if calls == 1 { Ok(2) } else { Err(io::ErrorKind::WouldBlock.into()) }
            },
            |_, _| {},
        );
        assert_eq!(outcome, (2, 0));
        assert_eq!(queue.unsent_bytes(), 4);
        assert_eq!(queue.push_quietly(packet(1), 100), (Push::Queued, false), "the driver writes now");
        let mut in_flight = VecDeque::new();
        assert!(queue.collect(0, &mut in_flight));
        assert_eq!(&in_flight[0][..], b"cdef");
    }

    #[test]
    fn a_close_takes_the_write_over_from_the_caller_so_the_goodbye_is_flushed() {
        let queue = SendQueue::default();
        queue.push_quietly(Bytes::from_static(b"goodbye"), 100);
        assert!(queue.request_close(DisconnectReason::ClosedLocally));
        assert_eq!(wire(&queue), (Vec::new(), (0, 0)), "the caller no longer writes");
        let mut in_flight = VecDeque::new();
        assert!(queue.collect(0, &mut in_flight));
        assert_eq!(&in_flight[0][..], b"goodbye");
    }

    #[test]
    fn an_idle_queue_writes_through_and_queues_only_what_the_socket_did_not_take() {
        let queue = SendQueue::default();
        let mut wire = Vec::new();
        let outcome = queue.write_through(
            &[b"head", b"payload"],
            |slices| {
                slices.iter().for_each(|s| wire.extend_from_slice(s));
                Ok(6)
            },
            |bytes, packets| assert_eq!((bytes, packets), (6, 0), "told of a partial write"),
            |skip| Bytes::from_static(&b"headpayload"[skip..]),
        );
        assert_eq!(outcome, Some(Push::Queued));
        assert_eq!(queue.unsent_bytes(), 5, "the 5 bytes the socket did not take");
        assert_eq!(queue.push_quietly(packet(1), 100), (Push::Queued, false), "the driver writes the rest");
        let mut in_flight = VecDeque::new();
        assert!(queue.collect(0, &mut in_flight));
        assert_eq!(&in_flight[0][..], b"yload");
    }

    #[test]
    fn a_busy_queue_does_not_write_through() {
        let queue = SendQueue::default();
        queue.push_quietly(Bytes::from_static(b"first"), 100);
        let outcome = queue.write_through(&[b"second"], |_| panic!("no write"), |_, _| {}, |_| Bytes::new());
        assert_eq!(outcome, None, "queued behind the first, in order");
    }

    #[test]
    fn write_gathered_consumes_whole_and_partial_packets() {
        let mut packets: VecDeque<Bytes> =
            [&b"ab"[..], b"cd", b"ef"].into_iter().map(Bytes::from_static).collect();
        assert_eq!(write_gathered(&mut packets, |_| Ok(3)).unwrap(), (3, 1));
        assert_eq!(packets.len(), 2);
        assert_eq!(&packets[0][..], b"d");
    }

    #[test]
    fn passing_the_byte_limit_closes_the_session_instead_of_queuing() {
        let queue = SendQueue::default();
        assert_eq!(queue.push(packet(60), 100), Push::Queued);
        assert_eq!(queue.push(packet(41), 100), Push::Full);
        assert_eq!(queue.close_reason(), Some(DisconnectReason::SendQueueFull));
        assert_eq!(queue.overflow(), Some((60, 41)));
        assert_eq!(queue.push(packet(1), 100), Push::Closed);
        assert_eq!(queue.unsent_bytes(), 60);
    }

    #[test]
    fn bytes_taken_by_the_driver_still_count_until_written() {
        let queue = SendQueue::default();
        queue.push(packet(80), 100);
        let mut in_flight = VecDeque::new();
        queue.collect(0, &mut in_flight);
        assert_eq!(queue.push(packet(30), 100), Push::Full);
    }

    #[test]
    fn the_first_close_reason_wins() {
        let queue = SendQueue::default();
        assert!(queue.request_close(DisconnectReason::ClosedLocally));
        assert!(!queue.request_close(DisconnectReason::Reset));
        assert_eq!(queue.close_reason(), Some(DisconnectReason::ClosedLocally));
        assert_eq!(queue.push(packet(1), 100), Push::Closed);
    }

    #[test]
    fn finishing_drops_everything_unsent_and_refuses_more() {
        let queue = SendQueue::default();
        queue.push(packet(5), 100);
        queue.push(packet(7), 100);
        assert_eq!(queue.finish(DisconnectReason::Reset), 12);
        assert_eq!(queue.close_reason(), Some(DisconnectReason::Reset));
        assert_eq!(queue.push(packet(1), 100), Push::Closed);
        assert_eq!(queue.unsent_bytes(), 0);
        assert!(!queue.is_open());
        assert_eq!(wire(&queue).1, (0, 0), "nobody writes to a finished session");
    }

    #[test]
    fn a_wakeup_sent_while_the_driver_is_busy_is_kept() {
        let queue = SendQueue::default();
        queue.push(packet(1), 100);
        assert!(queue.take_wakeup(), "the push's wakeup was kept for the driver");
        assert!(!queue.take_wakeup());
    }
}
