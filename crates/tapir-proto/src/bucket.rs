//! Rate limits: a token bucket, and a shaper built on it, time as an input.
//!
//! ```text
//!   TokenBucket::take(now, bytes) ─▶ true: tokens spent | false: nothing spent
//!   Shaper::offer(now, packet) ─▶ Pass (send now) | Queued (copied) | Dropped (queue full)
//!   Shaper::release(now, out)  ─▶ the oldest queued packet once its tokens are there
//!   Shaper::next_release(now)  ─▶ when that will be
//! ```
//! The shaper is `tc tbf`'s model (what VTun's `speed` and OpenVPN's
//! `--shaper` approximate): packets over the rate wait in a queue of at most
//! [`MAX_DELAY`] worth of the rate, and only what overflows it is dropped. A
//! policer that dropped everything over the rate would starve the TCP
//! inside the tunnel (bursts of losses, retransmit timeouts); a bounded
//! delay lets it settle at the rate. The queue is one ring buffer, grown
//! as a backlog forms up to its cap: nothing is allocated per packet.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The longest a packet waits in a [`Shaper`]'s queue.
pub const MAX_DELAY: Duration = Duration::from_millis(100);
/// The smallest shaper queue, in bytes: two full-size packets (with their
/// lengths), so that below about 240 kbit/s, where 100 ms holds less, the
/// wait is two packets' time (a 16 KiB floor held 1.3 s of packets at
/// 100 kbit/s).
pub const MIN_QUEUE: usize = 3 * 1024;
/// The largest shaper queue, in bytes: beyond 100 ms at 640 Mbit/s, a
/// shorter delay is held (and more is dropped) rather than more memory.
pub const MAX_QUEUE: usize = 8 * 1024 * 1024;

/// How long a full bucket lasts at the rate.
pub const BURST_TIME: Duration = Duration::from_millis(20);
/// The smallest burst, in bytes (a packet larger than the burst passes on a
/// full bucket, emptying it).
pub const MIN_BURST: u64 = 16 * 1024;

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

    /// How long until the bucket holds `bytes` (zero if it does now).
    pub fn time_until(&mut self, now: Instant, bytes: usize) -> Duration {
        self.refill(now);
        let need = (bytes as u128 * 1_000_000).min(self.burst as u128 * 1_000_000);
        if self.tokens_micro >= need {
            return Duration::ZERO;
        }
        let micros = (need - self.tokens_micro).div_ceil(self.rate as u128);
        Duration::from_micros(micros.min(u64::MAX as u128) as u64)
    }

    /// Spends `bytes` if the bucket holds them (a packet larger than the
    /// burst: if the bucket is full, as [`TokenBucket::time_until`] waits).
    pub fn take(&mut self, now: Instant, bytes: usize) -> bool {
        self.refill(now);
        let need = (bytes as u128 * 1_000_000).min(self.burst as u128 * 1_000_000);
        if self.tokens_micro >= need {
            self.tokens_micro -= need;
            true
        } else {
            false
        }
    }
}

/// What became of a packet offered to a [`Shaper`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Within the rate: send it now.
    Pass,
    /// Over the rate: copied into the queue, to come out of [`Shaper::release`].
    Queued,
    /// The queue is full: drop it.
    Dropped,
}

/// A token bucket with a bounded queue in front (`tc tbf`).
#[derive(Debug, Clone)]
pub struct Shaper {
    bucket: TokenBucket,
    /// Packets, each as a 2-byte length and its bytes.
    queue: VecDeque<u8>,
    limit: usize,
}

impl Shaper {
    /// A shaper for `bits_per_second`, its queue allocated now.
    pub fn new(bits_per_second: u64) -> Self {
        let bucket = TokenBucket::new(bits_per_second);
        let limit = ((bucket.rate as u128 * MAX_DELAY.as_micros() / 1_000_000) as usize)
            .clamp(MIN_QUEUE, MAX_QUEUE);
        Self {
            bucket,
            // Grown as a backlog forms (and kept): a peer that never exceeds
            // its rate costs nothing.
            queue: VecDeque::new(),
            limit,
        }
    }

    /// The rate in bits per second.
    pub fn bits_per_second(&self) -> u64 {
        self.bucket.bits_per_second()
    }

    /// Bytes waiting (with their 2-byte lengths).
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Passes `packet` now if it is within the rate and nothing waits
    /// before it, or queues a copy, or (queue full) drops it.
    pub fn offer(&mut self, now: Instant, packet: &[u8]) -> Offer {
        if packet.len() > u16::MAX as usize {
            return Offer::Dropped;
        }
        if self.queue.is_empty() && self.bucket.take(now, packet.len()) {
            return Offer::Pass;
        }
        if self.queue.len() + 2 + packet.len() > self.limit {
            return Offer::Dropped;
        }
        self.queue.extend((packet.len() as u16).to_be_bytes());
        self.queue.extend(packet);
        Offer::Queued
    }

    fn head_len(&self) -> Option<usize> {
        let hi = *self.queue.front()?;
        let lo = *self.queue.get(1)?;
        Some(usize::from(u16::from_be_bytes([hi, lo])))
    }

    /// The oldest queued packet, copied into `out` (which must hold it), if
    /// its tokens are there; returns its length.
    pub fn release(&mut self, now: Instant, out: &mut [u8]) -> Option<usize> {
        let len = self.head_len()?;
        if out.len() < len || !self.bucket.take(now, len) {
            return None;
        }
        self.queue.drain(..2);
        for (o, b) in out[..len].iter_mut().zip(self.queue.drain(..len)) {
            *o = b;
        }
        Some(len)
    }

    /// When [`Shaper::release`] will next have a packet (`None`: nothing queued).
    pub fn next_release(&mut self, now: Instant) -> Option<Instant> {
        let len = self.head_len()?;
        Some(now + self.bucket.time_until(now, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_rate_does_not_reserve_huge_memory() {
        let s = Shaper::new(1_000_000_000_000);
        assert_eq!(s.limit, MAX_QUEUE);
        assert_eq!(s.queue.capacity(), 0);
    }

    #[test]
    fn a_shaper_passes_the_burst_queues_the_rest_and_releases_it_at_the_rate() {
        let now = Instant::now();
        let mut s = Shaper::new(8_000_000); // 1 MB/s: burst 20 kB, queue 100 kB
        let p = [7u8; 1000];
        let mut passed = 0;
        let mut queued = 0;
        let mut dropped = 0;
        for _ in 0..200 {
            match s.offer(now, &p) {
                Offer::Pass => passed += 1,
                Offer::Queued => queued += 1,
                Offer::Dropped => dropped += 1,
            }
        }
        assert_eq!(passed, 20);
        assert_eq!(queued, 100_000 / 1002);
        assert_eq!(dropped, 200 - passed - queued);
        // Nothing more until tokens come back: 1000 bytes take 1 ms.
        let mut out = [0u8; 2000];
        assert_eq!(s.release(now, &mut out), None);
        let at = s.next_release(now).unwrap();
        assert!(
            at > now && at <= now + Duration::from_millis(1),
            "{:?}",
            at - now
        );
        assert_eq!(s.release(at, &mut out), Some(1000));
        assert_eq!(&out[..1000], &p[..]);
        // Draining the queue takes as long as the rate says: 98 more ms.
        let mut t = at;
        let mut n = 1;
        while let Some(next) = s.next_release(t) {
            t = next;
            if s.release(t, &mut out).is_some() {
                n += 1;
            }
        }
        assert_eq!(n, queued);
        let took = t - now;
        assert!(
            took >= Duration::from_millis(97) && took <= Duration::from_millis(101),
            "{took:?}"
        );
        // A packet offered while others wait queues behind them, even if tokens are there.
        let mut s = Shaper::new(8_000_000);
        for _ in 0..21 {
            s.offer(now, &p);
        }
        let later = now + Duration::from_secs(1);
        assert_eq!(s.offer(later, &p), Offer::Queued, "order is kept");
        assert_eq!(s.release(later, &mut out), Some(1000));
    }

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
        let burst = b.burst() as usize;
        assert!(b.take(now, burst - 100));
        assert!(!b.take(now, 1000));
        assert!(b.take(now, 100));
    }

    #[test]
    fn a_packet_larger_than_the_burst_passes_on_a_full_bucket() {
        let now = Instant::now();
        let mut b = TokenBucket::new(100_000); // 12.5 kB/s: the 16 KiB floor
        assert_eq!(b.burst(), MIN_BURST);
        assert!(b.take(now, 60_000), "a full bucket lets it through");
        assert!(!b.take(now, 1));
        // Then it waits for a full bucket again, as time_until says.
        let wait = b.time_until(now, 60_000);
        assert!(b.take(now + wait, 60_000));
    }

    #[test]
    fn at_a_slow_rate_the_queue_holds_two_full_packets() {
        // 100 kbit/s: 100 ms is 1250 bytes, less than one packet.
        let now = Instant::now();
        let mut s = Shaper::new(100_000);
        assert_eq!(s.limit, MIN_QUEUE);
        let p = [1u8; 1500];
        // The burst first (16 KiB: ten of them), then two wait, the third goes.
        let offers: Vec<Offer> = (0..13).map(|_| s.offer(now, &p)).collect();
        assert_eq!(offers.iter().filter(|o| **o == Offer::Pass).count(), 10);
        assert_eq!(
            &offers[10..],
            &[Offer::Queued, Offer::Queued, Offer::Dropped]
        );
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
            (199_000_000..=200_000_000 + b.burst() * 8).contains(&bits),
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
