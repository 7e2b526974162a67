//! How another thread tells a session's reactor that the session has work: the
//! writer role was handed to it, a close was requested, or the application
//! caught up with a paused reader.
//!
//! A flag and a key, not a waker per session: ringing sets the session's flag
//! and, only if it was clear, puts the session's key on its reactor's list and
//! wakes the reactor once for however many sessions were rung meanwhile. The
//! reactor answers (clears the flag) when it serves the session, so a burst of
//! rings costs one list entry. An idle session pays a flag, a key and a pointer.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use atomic_waker::AtomicWaker;

/// The reactor's side: keys of the sessions rung since it last looked.
#[derive(Default)]
pub struct RingList {
    keys: Mutex<Vec<u32>>,
    /// Something was rung or arrived since the reactor last looked: the
    /// reactor's waker was woken, and need not be woken again until it looks.
    pending: AtomicBool,
    reactor: AtomicWaker,
}

impl RingList {
    fn ring(&self, key: u32) {
        self.keys.lock().unwrap_or_else(|e| e.into_inner()).push(key);
        self.wake();
    }

    /// Wakes the reactor, once however many times it is called before the
    /// reactor looks.
    pub fn wake(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            self.reactor.wake();
        }
    }

    /// The reactor, before it looks at what was rung: a ring from now on wakes
    /// it again. Registers its waker first, so no ring falls between the two.
    pub fn start_looking(&self, waker: &std::task::Waker) {
        self.reactor.register(waker);
        self.pending.store(false, Ordering::SeqCst);
    }

    /// Moves the keys rung so far into `into` (which the caller has emptied).
    pub fn take(&self, into: &mut Vec<u32>) {
        std::mem::swap(&mut *self.keys.lock().unwrap_or_else(|e| e.into_inner()), into);
    }
}

/// The session's side, held by its send queue.
pub struct Doorbell {
    rung: AtomicBool,
    /// The session's key in its reactor, once the reactor has taken it in.
    key: AtomicU32,
    list: Option<Arc<RingList>>,
}

/// No key yet: the reactor has not taken the session in.
const NO_KEY: u32 = u32::MAX;

impl Default for Doorbell {
    /// A bell on no reactor: ringing only sets the flag.
    fn default() -> Self {
        Self { rung: AtomicBool::new(false), key: AtomicU32::new(NO_KEY), list: None }
    }
}

impl Doorbell {
    pub fn new(list: Arc<RingList>) -> Self {
        Self { rung: AtomicBool::new(false), key: AtomicU32::new(NO_KEY), list: Some(list) }
    }

    /// Tells the reactor the session has work. A ring before the reactor took
    /// the session in is kept in the flag: the reactor serves every session it
    /// takes in once, and answers the flag then.
    pub fn ring(&self) {
        // SeqCst pairs with `connect`: either the reactor sees the flag when
        // it first serves the session, or this sees the key and lists it.
        if self.rung.swap(true, Ordering::SeqCst) {
            return;
        }
        let key = self.key.load(Ordering::SeqCst);
        if let (Some(list), true) = (&self.list, key != NO_KEY) {
            list.ring(key);
        }
    }

    /// The reactor's answer: whether the bell was rung since the last answer.
    pub fn answer(&self) -> bool {
        self.rung.swap(false, Ordering::SeqCst)
    }

    /// The reactor took the session in under `key`; it serves it next.
    pub fn connect(&self, key: u32) {
        debug_assert_ne!(key, NO_KEY);
        self.key.store(key, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_before_the_reactor_took_the_session_in_is_kept_in_the_flag() {
        let list = Arc::new(RingList::default());
        let bell = Doorbell::new(list.clone());
        bell.ring();
        let mut keys = Vec::new();
        list.take(&mut keys);
        assert!(keys.is_empty(), "no key to list yet");
        bell.connect(7);
        assert!(bell.answer(), "the reactor finds the ring when it first serves the session");
        assert!(!bell.answer());
    }

    #[test]
    fn rings_until_the_reactor_answers_list_the_session_once() {
        let list = Arc::new(RingList::default());
        let bell = Doorbell::new(list.clone());
        bell.connect(3);
        bell.ring();
        bell.ring();
        bell.ring();
        let mut keys = Vec::new();
        list.take(&mut keys);
        assert_eq!(keys, [3]);
        assert!(bell.answer());
        bell.ring();
        keys.clear();
        list.take(&mut keys);
        assert_eq!(keys, [3], "rung again after the answer");
    }

    #[test]
    fn a_bell_without_a_reactor_only_keeps_the_flag() {
        let bell = Doorbell::default();
        bell.ring();
        assert!(bell.answer());
    }
}
