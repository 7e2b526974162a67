//! How fast one address may open connections: a token bucket per address,
//! kept by the accept loop (one task, so no lock).
//!
//! A churn flood (tens of thousands of connect-garbage-reset connections a
//! second from one machine) is survived without it, but every connection
//! costs an accept, a session and a farewell. Refusing at accept, before a
//! session exists, is the cheapest place to shed it. A player reconnects a
//! few times a minute at most; the default allows 20 a second per address,
//! with bursts of 40.
//!
//! Buckets of addresses that have been quiet for a while are dropped when
//! the map grows, so a spoofed spread of addresses cannot grow it without bound.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

/// Buckets kept before the quiet ones are swept.
const SWEEP_AT: usize = 16_384;

/// A bucket untouched this long is full again anyway: it can go.
const QUIET: Duration = Duration::from_secs(10);

struct Bucket {
    tokens: f64,
    updated: Instant,
}

pub struct AcceptRate {
    per_second: f64,
    burst: f64,
    buckets: FxHashMap<IpAddr, Bucket>,
}

impl AcceptRate {
    /// `per_second` connections a second per address, in bursts of twice that.
    pub fn new(per_second: u32) -> Self {
        let per_second = f64::from(per_second);
        Self { per_second, burst: per_second * 2.0, buckets: FxHashMap::default() }
    }

    /// Whether a connection from `address` may be accepted now.
    pub fn admit(&mut self, address: IpAddr, now: Instant) -> bool {
        if self.buckets.len() >= SWEEP_AT {
            self.buckets.retain(|_, bucket| now.duration_since(bucket.updated) < QUIET);
        }
        let (per_second, burst) = (self.per_second, self.burst);
        let bucket = self.buckets.entry(address).or_insert(Bucket { tokens: burst, updated: now });
        let refill = now.duration_since(bucket.updated).as_secs_f64() * per_second;
        bucket.tokens = (bucket.tokens + refill).min(burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
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
    fn a_burst_then_the_rate_and_each_address_on_its_own() {
        let start = Instant::now();
        let mut rate = AcceptRate::new(10);
        let admitted = (0..100).filter(|_| rate.admit(address(2), start)).count();
        assert_eq!(admitted, 20, "a burst of twice the rate");
        assert!(rate.admit(address(3), start), "another address has its own bucket");
        assert!(!rate.admit(address(2), start + Duration::from_millis(50)), "half a token back");
        assert!(rate.admit(address(2), start + Duration::from_millis(100)), "one token back");
    }

    #[test]
    fn quiet_buckets_are_swept_when_the_map_grows() {
        let start = Instant::now();
        let mut rate = AcceptRate::new(10);
        for n in 0..SWEEP_AT as u32 {
            rate.admit(IpAddr::V4(Ipv4Addr::from(n)), start);
        }
        rate.admit(address(2), start + QUIET);
        assert_eq!(rate.buckets.len(), 1);
    }
}
