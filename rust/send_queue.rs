//! One session's outgoing packets: the lecture's `_sendQueue` with its
//! `_sendRegistered` flag.
//!
//! `push` holds the lock only to append and to flip the flag; the one caller that
//! flips it wakes the session's writer, outside the lock. The writer then drains
//! everything queued in one gathered write, and clears the flag only when it finds
//! the queue empty, under the same lock, so no push is ever left unwritten and no
//! wakeup is wasted on a writer that is already busy.
//!
//! The queue also holds the session's close request: a send that comes after it
//! is refused, so "queue a goodbye, then disconnect" writes exactly the goodbye.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::reason::DisconnectReason;

#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    /// Queued; the writer will send it.
    Queued,
    /// Queuing it would pass the byte limit: the session is now closing with
    /// [`DisconnectReason::SendQueueFull`] and the packet was not queued.
    Full,
    /// The session is closing or closed; the packet was not queued.
    Closed,
}

#[derive(Default)]
pub struct SendQueue {
    state: Mutex<QueueState>,
    /// Wakes the session's driver: data was queued, a close was requested, or
    /// (through the session) the application caught up with a paused reader.
    wakeup: Notify,
}

#[derive(Default)]
struct QueueState {
    queued: Vec<Bytes>,
    /// Queued plus taken by the writer and not yet accepted by the kernel.
    unsent_bytes: usize,
    writer_registered: bool,
    close: Option<DisconnectReason>,
    /// The driver is gone: nothing will be written again.
    finished: bool,
    /// Unsent bytes, and the size of the packet refused, when the limit was hit.
    overflow: Option<(usize, usize)>,
}

impl SendQueue {
    /// Queues `packet` unless that would make more than `max_unsent_bytes` wait,
    /// and wakes the writer if it was idle.
    pub fn push(&self, packet: Bytes, max_unsent_bytes: usize) -> Push {
        let (outcome, wake_writer) = self.push_quietly(packet, max_unsent_bytes);
        if wake_writer {
            self.wake_writer();
        }
        outcome
    }

    /// [`push`](Self::push) that leaves waking an idle writer to the caller:
    /// returns whether [`wake_writer`](Self::wake_writer) is owed. Lets a batch
    /// of sends wake each writer once, at its end.
    pub fn push_quietly(&self, packet: Bytes, max_unsent_bytes: usize) -> (Push, bool) {
        let mut state = self.lock();
        if state.close.is_some() || state.finished {
            return (Push::Closed, false);
        }
        if state.unsent_bytes + packet.len() > max_unsent_bytes {
            state.close = Some(DisconnectReason::SendQueueFull);
            state.overflow = Some((state.unsent_bytes, packet.len()));
            drop(state);
            // A close is never deferred.
            self.wake_writer();
            return (Push::Full, false);
        }
        state.unsent_bytes += packet.len();
        state.queued.push(packet);
        let register = !std::mem::replace(&mut state.writer_registered, true);
        (Push::Queued, register)
    }

    /// Wakes the session's driver to write what is queued.
    pub fn wake_writer(&self) {
        self.wakeup.notify_one();
    }

    /// Records why the session is closing. The first reason wins; returns whether
    /// this call was the first.
    pub fn request_close(&self, reason: DisconnectReason) -> bool {
        let mut state = self.lock();
        if state.close.is_some() || state.finished {
            return false;
        }
        state.close = Some(reason);
        drop(state);
        self.wakeup.notify_one();
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
        self.lock().overflow
    }

    pub fn unsent_bytes(&self) -> usize {
        self.lock().unsent_bytes
    }

    /// Resolves when a packet was queued on an idle writer or a close was
    /// requested. A wakeup that comes while nobody waits is kept for the next call.
    pub async fn woken(&self) {
        self.wakeup.notified().await
    }

    /// The writer's side: `written` bytes left for the kernel since the last call;
    /// everything queued since is moved to `in_flight`. Returns false, and clears
    /// the registered flag, when there is nothing left to write.
    pub fn collect(&self, written: usize, in_flight: &mut VecDeque<Bytes>) -> bool {
        let mut state = self.lock();
        debug_assert!(written <= state.unsent_bytes, "wrote {written} of {} unsent", state.unsent_bytes);
        state.unsent_bytes = state.unsent_bytes.saturating_sub(written);
        in_flight.extend(state.queued.drain(..));
        if in_flight.is_empty() {
            state.writer_registered = false;
            false
        } else {
            true
        }
    }

    /// The driver is gone: refuses every later push and drops what was never
    /// written, so pooled chunks are released. Returns the bytes dropped.
    pub fn finish(&self, reason: DisconnectReason) -> usize {
        let mut state = self.lock();
        state.close.get_or_insert(reason);
        state.finished = true;
        state.queued = Vec::new();
        std::mem::take(&mut state.unsent_bytes)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        // No code path panics while holding the lock; recover rather than cascade.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(len: usize) -> Bytes {
        Bytes::from(vec![0u8; len])
    }

    #[test]
    fn the_first_push_registers_the_writer_and_later_ones_do_not() {
        let queue = SendQueue::default();
        assert_eq!(queue.push(packet(10), 100), Push::Queued);
        assert!(queue.lock().writer_registered);
        assert_eq!(queue.push(packet(10), 100), Push::Queued);
        let mut in_flight = VecDeque::new();
        assert!(queue.collect(0, &mut in_flight));
        assert_eq!(in_flight.len(), 2);
        assert_eq!(queue.unsent_bytes(), 20);
        in_flight.clear();
        assert!(!queue.collect(20, &mut in_flight));
        assert!(!queue.lock().writer_registered);
        assert_eq!(queue.unsent_bytes(), 0);
    }

    #[test]
    fn a_quiet_push_owes_a_wakeup_only_to_an_idle_writer() {
        let queue = SendQueue::default();
        assert_eq!(queue.push_quietly(packet(1), 100), (Push::Queued, true));
        assert_eq!(queue.push_quietly(packet(1), 100), (Push::Queued, false));
        let mut in_flight = VecDeque::new();
        queue.collect(0, &mut in_flight);
        in_flight.clear();
        assert!(!queue.collect(2, &mut in_flight));
        assert_eq!(queue.push_quietly(packet(1), 100), (Push::Queued, true));
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
    fn bytes_taken_by_the_writer_still_count_until_written() {
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
    fn what_was_queued_before_a_close_is_still_handed_to_the_writer() {
        let queue = SendQueue::default();
        queue.push(packet(5), 100);
        queue.request_close(DisconnectReason::ClosedLocally);
        let mut in_flight = VecDeque::new();
        assert!(queue.collect(0, &mut in_flight));
        assert_eq!(in_flight.len(), 1);
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
    }

    #[tokio::test]
    async fn a_wakeup_sent_while_nobody_waits_is_kept() {
        let queue = SendQueue::default();
        queue.push(packet(1), 100);
        tokio::time::timeout(std::time::Duration::from_secs(1), queue.woken())
            .await
            .expect("the push's wakeup was kept for the writer");
    }
}
