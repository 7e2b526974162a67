//! Instants in 8 bytes: milliseconds since the process first asked this clock
//! the time. A `std` (and tokio) `Instant` takes 16 bytes, and a connection
//! keeps four of them, for each of ten thousand idle players; the deadlines
//! they serve (packet, idle, linger) are seconds long, so a millisecond is
//! precision enough.

use std::num::NonZeroU64;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::Instant;

/// A point in time, to the millisecond (rounded down).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tick(NonZeroU64);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Tick {
    pub fn now() -> Self {
        Self::from_instant(Instant::now())
    }

    /// The tick `instant` falls in.
    pub fn from_instant(instant: Instant) -> Self {
        let millis = instant.saturating_duration_since(epoch()).as_millis();
        // +1: zero is the niche that makes `Option<Tick>` 8 bytes too.
        Self(NonZeroU64::MIN.saturating_add(u64::try_from(millis).unwrap_or(u64::MAX - 1)))
    }

    /// The first instant of this tick: a timer set to it fires when `Tick::now()`
    /// has reached this tick, never a little before.
    pub fn to_instant(self) -> Instant {
        epoch() + Duration::from_millis(self.0.get() - 1)
    }

    /// The tick `duration` later (rounded up to whole milliseconds, so a
    /// deadline is never early).
    pub fn after(self, duration: Duration) -> Self {
        let millis = duration.as_nanos().div_ceil(1_000_000);
        Self(self.0.saturating_add(u64::try_from(millis).unwrap_or(u64::MAX)))
    }

    /// How long after `earlier` this is (zero if it is not after it).
    pub fn since(self, earlier: Tick) -> Duration {
        Duration::from_millis(self.0.get().saturating_sub(earlier.0.get()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tick_and_an_optional_tick_take_eight_bytes() {
        assert_eq!(std::mem::size_of::<Tick>(), 8);
        assert_eq!(std::mem::size_of::<Option<Tick>>(), 8);
    }

    #[test]
    fn a_deadline_is_never_early() {
        let start = Tick::now();
        let deadline = start.after(Duration::from_micros(1500));
        assert_eq!(deadline.since(start), Duration::from_millis(2), "rounded up");
        let fires = deadline.to_instant();
        assert!(Tick::from_instant(fires) >= deadline, "a timer set to it finds the deadline reached");
    }

    #[test]
    fn ticks_order_like_the_instants_they_came_from() {
        let a = Tick::from_instant(Instant::now());
        let b = Tick::from_instant(Instant::now() + Duration::from_millis(5));
        assert!(a < b);
        assert!(b.since(a) >= Duration::from_millis(4));
        assert_eq!(a.since(b), Duration::ZERO);
    }
}
