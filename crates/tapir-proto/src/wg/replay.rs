//! The anti-replay window of received counters (RFC 6479's bitmap).

/// Counters accepted behind the highest one seen.
pub const WINDOW: u64 = 2048;
const WORDS: usize = (WINDOW / 64) as usize + 1;

/// Remembers which counters arrived, so that a replay or a too-old message
/// is refused while reordering within [`WINDOW`] is allowed.
#[derive(Debug, Clone)]
#[repr(C)]
pub struct ReplayWindow {
    /// One more than the highest counter accepted (0: none yet).
    next: u64,
    bits: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    /// An empty window.
    pub fn new() -> Self {
        Self {
            next: 0,
            bits: [0; WORDS],
        }
    }

    /// Whether `counter` would be accepted (checks only; call after the
    /// message authenticated, then [`ReplayWindow::mark`]).
    pub fn check(&self, counter: u64) -> bool {
        if counter >= self.next {
            return true;
        }
        if self.next - counter > WINDOW {
            return false;
        }
        let bit = counter % (WORDS as u64 * 64);
        self.bits[(bit / 64) as usize] & (1 << (bit % 64)) == 0
    }

    /// Records `counter`; `false` if it was a replay or too old.
    pub fn mark(&mut self, counter: u64) -> bool {
        if !self.check(counter) {
            return false;
        }
        let span = WORDS as u64 * 64;
        if counter >= self.next {
            // Clear the words the window slides over: every word after the
            // one holding the highest counter so far, up to the new one's.
            let from = self.next.saturating_sub(1) / 64;
            let to = counter / 64;
            let clear = (to - from).min(WORDS as u64);
            for i in 1..=clear {
                self.bits[((from + i) % WORDS as u64) as usize] = 0;
            }
            self.next = counter + 1;
        }
        let bit = counter % span;
        self.bits[(bit / 64) as usize] |= 1 << (bit % 64);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_reordered_replayed_and_too_old() {
        let mut w = ReplayWindow::new();
        assert!(w.mark(0));
        assert!(!w.mark(0), "replay");
        assert!(w.mark(2));
        assert!(w.mark(1), "reordered within the window");
        assert!(!w.mark(1));
        assert!(w.mark(5000));
        assert!(!w.mark(5000 - WINDOW - 1), "too old");
        assert!(w.mark(5000 - WINDOW + 1), "just inside");
        assert!(!w.mark(2), "far behind");
    }

    #[test]
    fn a_big_jump_clears_old_bits() {
        let mut w = ReplayWindow::new();
        for c in 0..100 {
            assert!(w.mark(c));
        }
        // A jump of exactly one span: the bits for 0..100 must not reappear as "seen".
        let span = WORDS as u64 * 64;
        assert!(w.mark(span + 50));
        assert!(w.mark(span + 49), "never seen, inside the window");
        assert!(!w.mark(span + 50));
        assert!(w.mark(u64::MAX - 1));
        assert!(!w.mark(u64::MAX - 1));
    }

    #[test]
    fn matches_a_simple_model() {
        // Against a set-based model, over a pseudo-random walk.
        let mut w = ReplayWindow::new();
        let mut seen = std::collections::HashSet::new();
        let mut highest: Option<u64> = None;
        let mut x: u64 = 12345;
        for _ in 0..20000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let base = highest.unwrap_or(0);
            // Mostly behind the highest (some beyond the window), some ahead.
            let c = (base + (x >> 33) % 2600).saturating_sub(2300);
            let expect = !seen.contains(&c) && highest.is_none_or(|h| c + WINDOW > h);
            assert_eq!(w.mark(c), expect, "counter {c}, highest {highest:?}");
            if expect {
                seen.insert(c);
                highest = Some(highest.map_or(c, |h| h.max(c)));
            }
        }
    }
}
