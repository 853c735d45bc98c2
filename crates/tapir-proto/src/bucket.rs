//! A token bucket: a rate limit in bytes per second with a burst, time as an input.
//!
//! ```text
//!   take(now, bytes) ─▶ true: send it (tokens spent) | false: drop it (nothing spent)
//! ```
//! Packets over the rate are dropped, never delayed: a tunnel carries TCP,
//! which backs off on loss and only grows its queue on delay (VTun's `speed`
//! and OpenVPN's `--shaper` drop the same way). The burst is what a rate
//! lets through in [`BURST_TIME`], and never less than one 64 KiB
//! super-packet's worth, so a single write is never refused outright.

use std::time::{Duration, Instant};

/// How long a full bucket lasts at the rate.
pub const BURST_TIME: Duration = Duration::from_millis(20);
/// The smallest burst, in bytes.
pub const MIN_BURST: u64 = 64 * 1024;

/// A rate limit.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Bytes per second.
    rate: u64,
    burst: u64,
    /// Tokens in millionths of a byte, so slow rates and short intervals add up exactly.
    tokens_micro: u128,
    last: Option<Instant>,
}

impl TokenBucket {
    /// A full bucket for `bits_per_second`.
    pub fn new(bits_per_second: u64) -> Self {
        let rate = (bits_per_second / 8).max(1);
        let burst = (rate as u128 * BURST_TIME.as_micros() / 1_000_000) as u64;
        let burst = burst.max(MIN_BURST);
        Self {
            rate,
            burst,
            tokens_micro: burst as u128 * 1_000_000,
            last: None,
        }
    }

    /// The rate in bits per second.
    pub fn bits_per_second(&self) -> u64 {
        self.rate * 8
    }

    /// The burst in bytes.
    pub fn burst(&self) -> u64 {
        self.burst
    }

    fn refill(&mut self, now: Instant) {
        if let Some(last) = self.last {
            if now <= last {
                return;
            }
            let dt = now.duration_since(last).as_micros();
            let cap = self.burst as u128 * 1_000_000;
            self.tokens_micro = (self.tokens_micro + dt * self.rate as u128).min(cap);
        }
        self.last = Some(now);
    }

    /// Spends `bytes` if the bucket holds them.
    pub fn take(&mut self, now: Instant, bytes: usize) -> bool {
        self.refill(now);
        let need = bytes as u128 * 1_000_000;
        if self.tokens_micro >= need {
            self.tokens_micro -= need;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_passes_its_burst_then_refuses() {
        let now = Instant::now();
        let mut b = TokenBucket::new(80_000_000); // 10 MB/s: burst 200 kB
        assert_eq!(b.burst(), 200_000);
        assert!(b.take(now, 200_000));
        assert!(!b.take(now, 1));
        // 1 ms later: 10 kB more.
        let later = now + Duration::from_millis(1);
        assert!(b.take(later, 10_000));
        assert!(!b.take(later, 1));
    }

    #[test]
    fn a_refusal_spends_nothing() {
        let now = Instant::now();
        let mut b = TokenBucket::new(8_000_000);
        assert!(b.take(now, MIN_BURST as usize - 100));
        assert!(!b.take(now, 1000));
        assert!(b.take(now, 100));
    }

    #[test]
    fn the_long_run_rate_is_the_configured_one() {
        // 20 Mbit/s offered 1500-byte packets every 100 µs (120 Mbit/s) for 10 s.
        let start = Instant::now();
        let mut b = TokenBucket::new(20_000_000);
        let mut passed = 0u64;
        for i in 0..100_000u64 {
            if b.take(start + Duration::from_micros(100 * i), 1500) {
                passed += 1500;
            }
        }
        let bits = passed * 8;
        // 10 s at 20 Mbit/s, plus at most one burst.
        assert!(
            (199_000_000..=200_000_000 + MIN_BURST * 8).contains(&bits),
            "{bits}"
        );
    }

    #[test]
    fn tiny_rates_still_count_and_time_going_backwards_adds_nothing() {
        let now = Instant::now();
        let mut b = TokenBucket::new(8); // 1 byte per second
        assert!(b.take(now, MIN_BURST as usize));
        assert!(!b.take(now + Duration::from_millis(999), 1));
        assert!(b.take(now + Duration::from_millis(1999), 1));
        assert!(!b.take(now, 1));
    }
}
