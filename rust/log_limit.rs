//! How many farewell warnings an attacker can make a server write: the first
//! few of each reason per interval, then one summary line per interval.
//!
//! Every hostile connection ends with a reason (INVALID_HEADER, RESET, ...)
//! and used to end with a warning line too, so the attacker set the log rate:
//! a flood of connect-garbage-reset connections wrote a line each, through
//! Python logging on the polling thread. Now the first [`FIRST_PER_INTERVAL`]
//! of each reason in an interval are logged as before; the rest are counted,
//! with the addresses they came from, and said in one line when the interval
//! is over ("31990 more INVALID_HEADER in the last 10 s, from 3 addresses").
//! Every disconnect is still counted in `stats()`.
//!
//! The summary is written by the next farewell after the interval, or at
//! shutdown: a quiet server owes nobody a timer.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::reason::DisconnectReason;

/// Lines per reason per interval written in full.
pub const FIRST_PER_INTERVAL: u32 = 5;

/// The interval the first lines and the summaries are counted over.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// Distinct addresses remembered per reason and interval; a summary says
/// "at least" past it.
const ADDRESSES_KEPT: usize = 1024;

#[derive(Default)]
struct Counts {
    logged: u32,
    suppressed: u64,
    addresses: HashSet<IpAddr>,
}

struct State {
    started: Instant,
    counts: Vec<Counts>,
}

pub struct FaultLog {
    state: Mutex<State>,
}

/// What to write for one warning-level farewell.
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Write this farewell's own line.
    pub log: bool,
    /// Summaries of the interval that just ended, to write first.
    pub summaries: Vec<String>,
}

impl Default for FaultLog {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl FaultLog {
    fn new(now: Instant) -> Self {
        let counts = DisconnectReason::ALL.iter().map(|_| Counts::default()).collect();
        Self { state: Mutex::new(State { started: now, counts }) }
    }

    /// A session from `address` ended for `reason`, which is worth a warning.
    pub fn admit(&self, reason: DisconnectReason, address: IpAddr, now: Instant) -> Verdict {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let summaries =
            if now.duration_since(state.started) >= INTERVAL { state.roll_over(now) } else { Vec::new() };
        let counts = &mut state.counts[usize::from(reason.code() - 1)];
        let log = counts.logged < FIRST_PER_INTERVAL;
        if log {
            counts.logged += 1;
        } else {
            counts.suppressed += 1;
            if counts.addresses.len() < ADDRESSES_KEPT {
                counts.addresses.insert(address);
            }
        }
        Verdict { log, summaries }
    }

    /// The level to write a fault from `address` at: WARNING for the first
    /// few of its reason in the interval, DEBUG for the rest. Writes the
    /// summaries of an interval that just ended first.
    pub fn level_for(&self, reason: DisconnectReason, address: IpAddr) -> log::Level {
        let verdict = self.admit(reason, address, Instant::now());
        for summary in verdict.summaries {
            log::warn!(target: "servercore", "{summary}");
        }
        if verdict.log { log::Level::Warn } else { log::Level::Debug }
    }

    /// The summaries still owed (the service is stopping).
    pub fn finish(&self, now: Instant) -> Vec<String> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).roll_over(now)
    }
}

impl State {
    fn roll_over(&mut self, now: Instant) -> Vec<String> {
        let seconds = now.duration_since(self.started).as_secs_f64();
        self.started = now;
        let mut summaries = Vec::new();
        for (reason, counts) in DisconnectReason::ALL.iter().zip(&mut self.counts) {
            if counts.suppressed > 0 {
                let addresses = counts.addresses.len();
                let at_least = if addresses >= ADDRESSES_KEPT { "at least " } else { "" };
                summaries.push(format!(
                    "{} more {reason} in the last {seconds:.0} s, from {at_least}{addresses} address{}",
                    counts.suppressed,
                    if addresses == 1 { "" } else { "es" }
                ));
            }
            *counts = Counts::default();
        }
        summaries
    }
}

/// At most one log line per period; the lines held back are counted in the next.
pub struct ThrottledLog {
    period: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl ThrottledLog {
    pub fn new(period: Duration) -> Self {
        Self { period, last: None, suppressed: 0 }
    }

    pub fn warn(&mut self, message: impl FnOnce(String) -> String) {
        let now = Instant::now();
        if self.last.is_some_and(|last| now - last < self.period) {
            self.suppressed += 1;
            return;
        }
        let suppressed = match std::mem::take(&mut self.suppressed) {
            0 => String::new(),
            n => format!(" ({n} more like this since the last report)"),
        };
        self.last = Some(now);
        log::warn!(target: "servercore", "{}", message(suppressed));
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn address(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
    }

    #[test]
    fn the_first_few_of_each_reason_are_logged_then_counted_and_summed_up_once() {
        let start = Instant::now();
        let log = FaultLog::new(start);
        let logged = (0..1000)
            .filter(|n| log.admit(DisconnectReason::InvalidHeader, address(1 + (n % 3) as u8), start).log)
            .count();
        assert_eq!(logged, FIRST_PER_INTERVAL as usize);
        assert!(
            log.admit(DisconnectReason::RateLimited, address(9), start).log,
            "another reason has its own few"
        );
        let later = start + INTERVAL;
        let verdict = log.admit(DisconnectReason::InvalidHeader, address(1), later);
        assert!(verdict.log, "a new interval logs again");
        assert_eq!(verdict.summaries, ["995 more INVALID_HEADER in the last 10 s, from 3 addresses"]);
        assert!(log.finish(later).is_empty(), "nothing suppressed since");
    }

    #[test]
    fn what_is_owed_at_shutdown_is_said_then() {
        let start = Instant::now();
        let log = FaultLog::new(start);
        for _ in 0..7 {
            log.admit(DisconnectReason::PacketTooLarge, address(1), start);
        }
        assert_eq!(
            log.finish(start + Duration::from_secs(3)),
            ["2 more PACKET_TOO_LARGE in the last 3 s, from 1 address"]
        );
    }
}
