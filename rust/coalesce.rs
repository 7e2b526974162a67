//! Writer coalescing: while the application thread runs a batch of callbacks,
//! the sends they make do not wake each session's writer one packet at a time.
//!
//! A callback that answers 32 packets of one session with 32 sends would
//! otherwise wake that session's driver on the first send, and the driver,
//! racing the callbacks on another core, would write the answers in many small
//! writes. Inside a [`WriteBatch`] the wakeups are collected instead and given
//! when the batch ends (or every few hundred events, which bounds the latency
//! this adds), so each session gets one gathered write per batch.

use std::cell::RefCell;
use std::sync::Arc;

use crate::session::SessionHandle;

thread_local! {
    /// Writers owed a wakeup by sends made on this thread inside a batch.
    static OWED: RefCell<Option<Vec<Arc<SessionHandle>>>> = const { RefCell::new(None) };
}

/// While alive, sends made on this thread defer waking their writers until
/// [`flush`](Self::flush) or drop. Batches may nest; the outermost one owns the wakeups.
pub struct WriteBatch {
    outermost: bool,
}

impl WriteBatch {
    pub fn begin() -> Self {
        let outermost = OWED.with_borrow_mut(|owed| {
            if owed.is_some() {
                return false;
            }
            *owed = Some(Vec::new());
            true
        });
        Self { outermost }
    }

    /// Wakes every writer owed so far; the batch goes on.
    pub fn flush(&self) {
        if !self.outermost {
            return;
        }
        let owed = OWED.with_borrow_mut(|owed| owed.as_mut().map(std::mem::take).unwrap_or_default());
        for handle in owed {
            handle.wake_writer();
        }
    }
}

impl Drop for WriteBatch {
    fn drop(&mut self) {
        self.flush();
        if self.outermost {
            OWED.with_borrow_mut(|owed| *owed = None);
        }
    }
}

/// Wakes `handle`'s writer now, or at the end of the current batch if there is one.
pub(crate) fn wake_or_defer(handle: &Arc<SessionHandle>) {
    let deferred = OWED.with_borrow_mut(|owed| match owed {
        Some(owed) => {
            owed.push(handle.clone());
            true
        }
        None => false,
    });
    if !deferred {
        handle.wake_writer();
    }
}
