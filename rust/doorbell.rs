//! How another thread tells a session's reactor that the session has work: the
//! writer role was handed to it, a close was requested, or the application
//! caught up with a paused reader.
//!
//! A flag and a key, not a waker per session: ringing sets the session's flag
//! and, only if it was clear, puts the session's key on its reactor's list and
//! wakes the reactor once for however many sessions were rung meanwhile. The
//! reactor answers (clears the flag) when it serves the session, so a burst of
//! rings costs one list entry. An idle session pays a flag, a key and a pointer.
//!
//! Whoever serves the reactor is woken: its I/O thread's task, or, while the
//! application thread serves it inline as it waits in its own epoll set, that
//! thread, through its wake descriptor.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use atomic_waker::AtomicWaker;

use crate::wake_fd::WakeFd;

/// The reactor's side: keys of the sessions rung since it last looked.
#[derive(Default)]
pub struct RingList {
    keys: Mutex<Vec<u32>>,
    /// Something was rung or arrived since the reactor last looked: its
    /// server was woken, and need not be woken again until it looks.
    pending: AtomicBool,
    /// The I/O thread's task.
    reactor: AtomicWaker,
    /// The application thread serves the reactor as it waits on `app_wake`.
    inline: AtomicBool,
    app_wake: Option<Arc<WakeFd>>,
}

impl RingList {
    /// A list whose rings wake the application thread through `app_wake`
    /// while it serves the reactor inline.
    pub fn new(app_wake: Arc<WakeFd>) -> Self {
        Self { app_wake: Some(app_wake), ..Self::default() }
    }

    fn ring(&self, key: u32) {
        self.keys.lock().unwrap_or_else(|e| e.into_inner()).push(key);
        self.wake();
    }

    /// Wakes whoever serves the reactor, once however many times it is called
    /// before they look.
    pub fn wake(&self) {
        if self.pending.swap(true, Ordering::SeqCst) {
            return;
        }
        match &self.app_wake {
            Some(app) if self.inline.load(Ordering::SeqCst) => app.signal(),
            _ => self.reactor.wake(),
        }
    }

    /// The reactor's task, before it looks at what was rung: a ring from now on
    /// wakes it again. Registers its waker first, so no ring falls between the two.
    pub fn start_looking(&self, waker: &std::task::Waker) {
        self.reactor.register(waker);
        self.pending.store(false, Ordering::SeqCst);
    }

    /// The reactor's task could not serve (the application thread does): it is
    /// woken when the application thread hands the reactor back with work.
    pub fn wait_for_reactor(&self, waker: &std::task::Waker) {
        self.reactor.register(waker);
    }

    /// The application thread serves the reactor from now on; rings wake it.
    pub fn begin_inline(&self) {
        self.inline.store(true, Ordering::SeqCst);
    }

    /// The application thread, before it looks at what was rung.
    pub fn look_inline(&self) {
        self.pending.store(false, Ordering::SeqCst);
    }

    /// The application thread hands the reactor back. Returns whether
    /// something was rung since it last looked, which the task must serve.
    pub fn end_inline(&self) -> bool {
        self.inline.store(false, Ordering::SeqCst);
        self.pending.load(Ordering::SeqCst)
    }

    /// Wakes the reactor's task (to serve what the application thread left).
    pub fn wake_task(&self) {
        self.pending.store(true, Ordering::SeqCst);
        self.reactor.wake();
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
    fn while_served_inline_a_ring_signals_the_application_thread() {
        let wake = Arc::new(WakeFd::new().unwrap());
        let list = Arc::new(RingList::new(wake.clone()));
        let bell = Doorbell::new(list.clone());
        bell.connect(5);
        list.begin_inline();
        list.look_inline();
        bell.ring();
        let mut poll =
            libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&*wake), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, no wait.
        assert_eq!(unsafe { libc::poll(&mut poll, 1, 0) }, 1, "the application thread is woken");
        assert!(list.end_inline(), "the ring is still owed when the reactor goes back to its task");
    }

    #[test]
    fn a_bell_without_a_reactor_only_keeps_the_flag() {
        let bell = Doorbell::default();
        bell.ring();
        assert!(bell.answer());
    }
}
