//! Handshake messages per source address, limited under load: a token
//! bucket per IP address, applied after the cookie (mac2) is checked and
//! before any Diffie-Hellman, as wireguard-go does.
//!
//! ```text
//!   allow(now, ip) ─▶ true: process it | false: drop it (no X25519 spent)
//! ```
//! An address can only get here with a valid cookie, which needs a reply
//! to have reached it, so spoofed sources cannot fill the table; it is
//! cleared of idle addresses every second and capped all the same.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Handshake messages per second per address.
pub const PER_SECOND: u64 = 20;
/// Messages an idle address may send at once.
pub const BURST: u64 = 5;
/// Addresses tracked at most (beyond it, new addresses share one bucket until the next clean-up).
pub const MAX_SOURCES: usize = 65_536;

const COST: u64 = 1_000_000_000 / PER_SECOND;
const MAX_TOKENS: u64 = COST * BURST;

/// The per-address buckets.
#[derive(Debug, Default)]
pub struct SourceLimiter {
    /// Tokens in nanoseconds of rate, and when they were last topped up.
    buckets: HashMap<IpAddr, (u64, Instant)>,
    last_clean: Option<Instant>,
}

impl SourceLimiter {
    /// An empty limiter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a handshake message from `ip` may be processed now.
    pub fn allow(&mut self, now: Instant, ip: IpAddr) -> bool {
        if self
            .last_clean
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
        {
            self.last_clean = Some(now);
            self.buckets.retain(|_, (_, last)| {
                now.saturating_duration_since(*last) < Duration::from_secs(1)
            });
        }
        // IPv4 in IPv6 counts as the IPv4 address it is; IPv6 counts by its
        // /64 (one host holds a whole /64), as in wireguard-go.
        let mut ip = match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6((u128::from(v6) & !0xffff_ffff_ffff_ffff).into()),
            },
            v4 => v4,
        };
        // A full table does not lock newcomers out: they share one bucket.
        if self.buckets.len() >= MAX_SOURCES && !self.buckets.contains_key(&ip) {
            ip = IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED);
        }
        match self.buckets.get_mut(&ip) {
            Some((tokens, last)) => {
                let elapsed = now.saturating_duration_since(*last).as_nanos() as u64;
                *last = now.max(*last);
                *tokens = (*tokens + elapsed).min(MAX_TOKENS);
                if *tokens >= COST {
                    *tokens -= COST;
                    true
                } else {
                    false
                }
            }
            None => {
                self.buckets.insert(ip, (MAX_TOKENS - COST, now));
                true
            }
        }
    }

    /// Addresses tracked now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no address is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_twenty_a_second_per_address() {
        let now = Instant::now();
        let mut l = SourceLimiter::new();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let passed = (0..100).filter(|_| l.allow(now, a)).count();
        assert_eq!(passed, BURST as usize);
        assert!(l.allow(now, b), "another address has its own bucket");
        // Over one second of a flood, 20 more.
        let mut more = 0;
        for ms in 1..=1000u64 {
            if l.allow(now + Duration::from_millis(ms), a) {
                more += 1;
            }
        }
        assert_eq!(more, PER_SECOND as usize);
    }

    #[test]
    fn an_ipv6_host_is_its_slash_64() {
        let now = Instant::now();
        let mut l = SourceLimiter::new();
        for i in 0..BURST {
            let a: IpAddr = format!("2001:db8:1:2::{}", i + 1).parse().unwrap();
            assert!(l.allow(now, a));
        }
        assert!(
            !l.allow(now, "2001:db8:1:2:ffff::9".parse().unwrap()),
            "same /64"
        );
        assert!(
            l.allow(now, "2001:db8:1:3::1".parse().unwrap()),
            "another /64"
        );
    }

    #[test]
    fn mapped_addresses_share_a_bucket_and_idle_ones_are_forgotten() {
        let now = Instant::now();
        let mut l = SourceLimiter::new();
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        for _ in 0..BURST {
            assert!(l.allow(now, v4));
        }
        assert!(!l.allow(now, mapped));
        assert_eq!(l.len(), 1);
        l.allow(now + Duration::from_secs(2), "192.0.2.9".parse().unwrap());
        assert_eq!(l.len(), 1, "the idle address went at the clean-up");
    }
}
