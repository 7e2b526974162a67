//! A file descriptor other threads make readable to wake a thread that waits
//! in `epoll_wait` (or in an event loop that watches file descriptors) rather
//! than on a condition variable: a Linux eventfd.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

pub struct WakeFd {
    fd: OwnedFd,
    /// Signalled and not drained yet: a second signal, or a drain of nothing,
    /// needs no system call.
    signalled: AtomicBool,
}

impl WakeFd {
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a new descriptor we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and nothing else owns it.
        Ok(Self { fd: unsafe { OwnedFd::from_raw_fd(fd) }, signalled: AtomicBool::new(false) })
    }

    /// Makes the descriptor readable. Cheap to repeat: signals add up to one wakeup.
    pub fn signal(&self) {
        if self.signalled.swap(true, Ordering::AcqRel) {
            return;
        }
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64. A full counter (EAGAIN) is
        // already readable, which is all a signal is for.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Takes the signals so far: the descriptor is not readable until the next
    /// one. Look at the work signals announce after this, not before: a signal
    /// that comes while this reads is skipped, its work seen by that look.
    pub fn drain(&self) {
        if !self.signalled.load(Ordering::Acquire) {
            return;
        }
        // The flag was set by exactly one signal, whose write may not have
        // landed yet: it is waited for (a few instructions away, unless that
        // thread was preempted). A drain that read nothing and cleared the flag
        // would leave the descriptor readable with the flag clear, and every
        // level-triggered wait after would return at once.
        loop {
            let mut count: u64 = 0;
            // SAFETY: reads at most 8 bytes into a live u64; EAGAIN means no signal yet.
            let read = unsafe { libc::read(self.fd.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
            if read == 8 {
                break;
            }
            let error = io::Error::last_os_error();
            match error.kind() {
                io::ErrorKind::WouldBlock => std::thread::yield_now(),
                io::ErrorKind::Interrupted => {}
                _ => {
                    log::error!(target: "servercore", "wake descriptor: read failed: {error}");
                    break;
                }
            }
        }
        // Cleared only after the read: a signal that found it set and skipped
        // its write came before this, and so before the caller's look.
        self.signalled.store(false, Ordering::Release);
    }
}

impl AsRawFd for WakeFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(fd: &WakeFd) -> bool {
        let mut poll = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, no wait.
        unsafe { libc::poll(&mut poll, 1, 0) == 1 }
    }

    #[test]
    fn a_signal_makes_it_readable_until_drained() {
        let fd = WakeFd::new().unwrap();
        assert!(!readable(&fd));
        fd.signal();
        fd.signal();
        assert!(readable(&fd));
        fd.drain();
        assert!(!readable(&fd), "two signals, one drain");
    }

    /// A drain that comes between a signal's flag and its write (the signaller
    /// preempted there) must not leave the descriptor readable with the flag
    /// clear: every later drain would skip it and every level-triggered wait
    /// would return at once.
    #[test]
    fn a_drain_between_a_signals_flag_and_its_write_takes_the_write() {
        let fd = std::sync::Arc::new(WakeFd::new().unwrap());
        // The first half of `signal`: the flag...
        assert!(!fd.signalled.swap(true, Ordering::AcqRel));
        let late_write = {
            let fd = fd.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(20));
                // ...and, late, the second half: the write.
                let one: u64 = 1;
                // SAFETY: writes 8 bytes from a live u64.
                unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
            })
        };
        fd.drain();
        late_write.join().unwrap();
        fd.drain();
        assert!(!readable(&fd), "the late write was left for nobody to drain");
    }
}
