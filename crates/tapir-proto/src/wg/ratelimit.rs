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
//!
//! Past the per-address buckets, one bucket for all: [`ALL_PER_SECOND`]
//! handshakes a second at most under load, however many addresses send
//! them (a host with a whole IPv6 /48 has 65,536 /64s). A handshake costs
//! about 100 µs of X25519 on the thread that also moves the data, so the
//! data path keeps at least 90% of it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Handshake messages per second per address.
pub const PER_SECOND: u64 = 20;
/// Messages an idle address may send at once.
pub const BURST: u64 = 5;
/// Addresses tracked at most (beyond it, new addresses share one bucket until the next clean-up).
pub const MAX_SOURCES: usize = 65_536;

/// Handshake messages per second from all addresses together, under load.
pub const ALL_PER_SECOND: u64 = 1000;
/// Messages all addresses together may send at once.
pub const ALL_BURST: u64 = 100;

const COST: u64 = 1_000_000_000 / PER_SECOND;
const MAX_TOKENS: u64 = COST * BURST;
const ALL_COST: u64 = 1_000_000_000 / ALL_PER_SECOND;
const ALL_MAX_TOKENS: u64 = ALL_COST * ALL_BURST;

/// The host an address stands for, as one sender: IPv4 in IPv6 is the IPv4
/// address it is; IPv6 counts by its /64 (one host holds a whole /64), as
/// in wireguard-go.
pub fn host_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !0xffff_ffff_ffff_ffff).into()),
        },
        v4 => v4,
    }
}

/// The per-address buckets, and the one for all.
#[derive(Debug, Default)]
pub struct SourceLimiter {
    /// Tokens in nanoseconds of rate, and when they were last topped up.
    buckets: HashMap<IpAddr, (u64, Instant)>,
    last_clean: Option<Instant>,
    /// The bucket for all addresses (`None`: full).
    all: Option<(u64, Instant)>,
}

impl SourceLimiter {
    /// An empty limiter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a handshake message from `ip` may be processed now.
    pub fn allow(&mut self, now: Instant, ip: IpAddr) -> bool {
        self.check(now, ip, true)
    }

    /// [`SourceLimiter::allow`] for the response to a handshake we started:
    /// its address's bucket applies, the one for all does not (a flood from
    /// many addresses must not keep our own handshakes from finishing).
    pub fn allow_own_response(&mut self, now: Instant, ip: IpAddr) -> bool {
        self.check(now, ip, false)
    }

    fn check(&mut self, now: Instant, ip: IpAddr, all: bool) -> bool {
        if self
            .last_clean
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
        {
            self.last_clean = Some(now);
            self.buckets.retain(|_, (_, last)| {
                now.saturating_duration_since(*last) < Duration::from_secs(1)
            });
        }
        let mut ip = host_of(ip);
        // A full table does not lock newcomers out: they share one bucket.
        if self.buckets.len() >= MAX_SOURCES && !self.buckets.contains_key(&ip) {
            ip = IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED);
        }
        let (tokens, last) = self.buckets.entry(ip).or_insert((MAX_TOKENS, now));
        if !take(tokens, last, now, COST, MAX_TOKENS) {
            return false;
        }
        if !all {
            return true;
        }
        let (tokens, last) = self.all.get_or_insert((ALL_MAX_TOKENS, now));
        if take(tokens, last, now, ALL_COST, ALL_MAX_TOKENS) {
            return true;
        }
        // Refused for all: the address keeps its token for a later try.
        if let Some((tokens, _)) = self.buckets.get_mut(&ip) {
            *tokens = (*tokens + COST).min(MAX_TOKENS);
        }
        false
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

/// Tops the bucket up for the time since `last` (to `max`), then takes
/// `cost` from it if it holds that much.
fn take(tokens: &mut u64, last: &mut Instant, now: Instant, cost: u64, max: u64) -> bool {
    let elapsed = now.saturating_duration_since(*last).as_nanos() as u64;
    *last = now.max(*last);
    *tokens = tokens.saturating_add(elapsed).min(max);
    if *tokens >= cost {
        *tokens -= cost;
        true
    } else {
        false
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
    fn many_addresses_together_get_a_thousand_a_second() {
        // 20,000 addresses (a /48's /64s, say), each within its own bucket,
        // over one second: the bucket for all lets through its burst and
        // its rate, not one per address.
        let now = Instant::now();
        let mut l = SourceLimiter::new();
        let mut passed = 0;
        for i in 0..20_000u128 {
            let a = IpAddr::V6((0x2001_0db8_0001_u128 << 80 | i << 64).into());
            if l.allow(now + Duration::from_micros(i as u64 * 50), a) {
                passed += 1;
            }
        }
        let most = (ALL_BURST + ALL_PER_SECOND) as usize;
        assert!((most - 2..=most).contains(&passed), "{passed} passed");
        // Meanwhile the response to a handshake of ours still gets through.
        let peer: IpAddr = "192.0.2.7".parse().unwrap();
        let last = now + Duration::from_micros(19_999 * 50);
        assert!(!l.allow(last, peer), "the bucket for all is empty");
        assert!(l.allow_own_response(last, peer));
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
