//! A learning switch's MAC table, for tunnels in tap mode: which port (the
//! local tap, or a peer) each Ethernet address was last seen on.
//!
//! ```text
//!   frame from port P ─▶ learn(now, src, P) ─▶ Learned | Refused(why)      (source MAC)
//!                    ─▶ lookup(now, dst)   ─▶ Some(port) | None (flood)    (destination MAC)
//! ```
//! Rules, as a Linux bridge and tinc's switch mode have them, plus the limits
//! that keep one peer from hurting the others: an entry ages out after
//! [`MacTable::aging`] without traffic; a multicast source is refused (no
//! station has one); each port may hold at most [`MacTable::cap`] addresses,
//! and a new source beyond that takes the place of the port's oldest
//! (counted by the caller), so memory stays bounded whatever a peer sends,
//! and a flood of addresses from one port displaces only that port's own;
//! an address seen on another port moves there. Time is an input; nothing
//! here reads a clock.
//!
//! A port at its cap evicts rather than refuses: a spoke's one peer, the
//! hub, carries every address of the network, and a refusing table there
//! left a spoke that another's flood had filled unable to learn (and so to
//! take frames from) any station new to it for the aging time.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// An Ethernet address.
pub type Mac = [u8; 6];

/// How long an unused entry lives (the Linux bridge's default).
pub const DEFAULT_AGING: Duration = Duration::from_secs(300);
/// Addresses one port may hold.
pub const DEFAULT_CAP: usize = 1024;

/// Whether `mac` is a group (broadcast or multicast) address.
pub fn is_multicast(mac: &Mac) -> bool {
    mac[0] & 1 == 1
}

/// Why a source address was not learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refused {
    /// A broadcast or multicast source: no station sends from one.
    MulticastSource,
    /// The port already holds its cap of addresses.
    Cap,
    /// The address is a live one of a protected port (the local side's own
    /// stations): a peer may not take it over.
    Protected,
}

/// Where a frame goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination<P> {
    /// Known unicast: that port only.
    Port(P),
    /// Broadcast, multicast or unknown unicast: every port but the one it came from.
    Flood,
}

/// How long after a protected port's station was last heard a trusted peer
/// (one without allowed IPs: nothing it sends is filtered anyway) may not
/// take its address (see [`MacTable::learn_unless`]): a station that moved
/// to its side is relearned then, not after the aging time.
pub const PROTECTED_FOR: Duration = Duration::from_secs(10);

struct Entry<P> {
    port: P,
    seen: Instant,
}

/// The table. `P` names a port (a peer's key, or a "local" marker).
pub struct MacTable<P> {
    entries: HashMap<Mac, Entry<P>>,
    per_port: HashMap<P, usize>,
    /// Each port's addresses in the order they were learned there, oldest
    /// first (the one its cap evicts); an address gone or moved meanwhile
    /// is skipped when met, and the list compacted once it is twice the cap.
    order: HashMap<P, VecDeque<Mac>>,
    aging: Duration,
    cap: usize,
}

impl<P: Copy + Eq + Hash> MacTable<P> {
    /// An empty table with the given aging time and per-port cap.
    pub fn new(aging: Duration, cap: usize) -> Self {
        Self {
            entries: HashMap::new(),
            per_port: HashMap::new(),
            order: HashMap::new(),
            aging,
            cap,
        }
    }

    /// The aging time.
    pub fn aging(&self) -> Duration {
        self.aging
    }

    /// The per-port cap.
    pub fn cap(&self) -> usize {
        self.cap
    }

    fn live(&self, e: &Entry<P>, now: Instant) -> bool {
        now.saturating_duration_since(e.seen) < self.aging
    }

    fn release(&mut self, port: P) {
        if let Some(n) = self.per_port.get_mut(&port) {
            *n -= 1;
            if *n == 0 {
                self.per_port.remove(&port);
            }
        }
    }

    /// Notes that `src` was seen on `port`. An address the `protected`
    /// port (the local tap's stations) was heard from within `hold` is not
    /// moved away from it: a peer sending from our own MAC would take our
    /// stations' traffic into the tunnel. `Ok(true)`: the port was at its
    /// cap, and its oldest address made room.
    pub fn learn_unless(
        &mut self,
        now: Instant,
        src: Mac,
        port: P,
        protected: P,
        hold: Duration,
    ) -> Result<bool, Refused> {
        self.learn_guarded(
            now,
            src,
            port,
            (port != protected).then_some((protected, hold)),
        )
    }

    /// Notes that `src` was seen on `port` (see [`MacTable::learn_unless`]).
    pub fn learn(&mut self, now: Instant, src: Mac, port: P) -> Result<bool, Refused> {
        self.learn_guarded(now, src, port, None)
    }

    /// Removes `port`'s oldest address still its own; whether there was one.
    fn evict_oldest(&mut self, port: P) -> bool {
        let Some(q) = self.order.get_mut(&port) else {
            return false;
        };
        while let Some(mac) = q.pop_front() {
            if self.entries.get(&mac).is_some_and(|e| e.port == port) {
                self.entries.remove(&mac);
                self.release(port);
                return true;
            }
        }
        false
    }

    /// Puts `src` last in `port`'s order, compacting it when it has grown
    /// past twice the cap with addresses gone or moved.
    fn remember(&mut self, src: Mac, port: P) {
        let q = self.order.entry(port).or_default();
        q.push_back(src);
        if q.len() > 2 * self.cap.max(1) {
            let entries = &self.entries;
            q.retain(|m| entries.get(m).is_some_and(|e| e.port == port));
        }
    }

    /// [`MacTable::learn`], refusing to move a live address of `protected`.
    /// An address seen again where it was (every frame but a station's
    /// first) is one look-up: hashing an address costs more than the rest.
    fn learn_guarded(
        &mut self,
        now: Instant,
        src: Mac,
        port: P,
        protected: Option<(P, Duration)>,
    ) -> Result<bool, Refused> {
        if is_multicast(&src) {
            return Err(Refused::MulticastSource);
        }
        let old = match self.entries.get_mut(&src) {
            Some(e) if e.port == port => {
                e.seen = now;
                return Ok(false);
            }
            Some(e)
                if protected.is_some_and(|(p, hold)| {
                    e.port == p && now.saturating_duration_since(e.seen) < hold
                }) =>
            {
                return Err(Refused::Protected);
            }
            Some(e) => Some(e.port),
            None => None,
        };
        if let Some(old) = old {
            // Moved (or expired and reappearing): it counts against the new port.
            self.entries.remove(&src);
            self.release(old);
        }
        let mut evicted = false;
        if self.count(port) >= self.cap {
            // Room from this port's own expired entries first, then from
            // its oldest live one.
            self.expire(now);
            if self.count(port) >= self.cap {
                evicted = self.evict_oldest(port);
            }
        }
        self.entries.insert(src, Entry { port, seen: now });
        *self.per_port.entry(port).or_insert(0) += 1;
        self.remember(src, port);
        Ok(evicted)
    }

    /// Where a frame to `dst` goes.
    pub fn lookup(&self, now: Instant, dst: &Mac) -> Destination<P> {
        if is_multicast(dst) {
            return Destination::Flood;
        }
        match self.entries.get(dst) {
            Some(e) if self.live(e, now) => Destination::Port(e.port),
            _ => Destination::Flood,
        }
    }

    /// Drops entries older than the aging time.
    pub fn expire(&mut self, now: Instant) {
        let aging = self.aging;
        let mut gone = Vec::new();
        self.entries.retain(|_, e| {
            let keep = now.saturating_duration_since(e.seen) < aging;
            if !keep {
                gone.push(e.port);
            }
            keep
        });
        for p in gone {
            self.release(p);
        }
    }

    /// When [`MacTable::expire`] next forgets an address (none: the
    /// table is empty). A walk over the addresses.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.entries.values().map(|e| e.seen + self.aging).min()
    }

    /// Forgets every address of `port` (a removed peer).
    pub fn forget_port(&mut self, port: P) {
        self.entries.retain(|_, e| e.port != port);
        self.per_port.remove(&port);
        self.order.remove(&port);
    }

    /// Addresses held by `port` (including ones not yet expired by [`MacTable::expire`]).
    pub fn count(&self, port: P) -> usize {
        self.per_port.get(&port).copied().unwrap_or(0)
    }

    /// The live addresses of `port`, sorted.
    pub fn macs(&self, now: Instant, port: P) -> Vec<Mac> {
        let mut v: Vec<Mac> = self
            .entries
            .iter()
            .filter(|(_, e)| e.port == port && self.live(e, now))
            .map(|(m, _)| *m)
            .collect();
        v.sort_unstable();
        v
    }

    /// Entries in the whole table.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Mac = [2, 0, 0, 0, 0, 0xa];
    const B: Mac = [2, 0, 0, 0, 0, 0xb];
    const BCAST: Mac = [0xff; 6];
    const V6_MCAST: Mac = [0x33, 0x33, 0, 0, 0, 1];

    fn table() -> (MacTable<u8>, Instant) {
        (MacTable::new(Duration::from_secs(300), 2), Instant::now())
    }

    #[test]
    fn unknown_broadcast_and_multicast_flood_known_unicast_does_not() {
        let (mut t, now) = table();
        assert_eq!(t.lookup(now, &A), Destination::Flood);
        t.learn(now, A, 1).unwrap();
        assert_eq!(t.lookup(now, &A), Destination::Port(1));
        assert_eq!(t.lookup(now, &BCAST), Destination::Flood);
        assert_eq!(t.lookup(now, &V6_MCAST), Destination::Flood);
    }

    #[test]
    fn multicast_sources_are_refused() {
        let (mut t, now) = table();
        assert_eq!(t.learn(now, BCAST, 1), Err(Refused::MulticastSource));
        assert_eq!(t.learn(now, V6_MCAST, 1), Err(Refused::MulticastSource));
        assert!(t.is_empty());
    }

    #[test]
    fn entries_age_out_and_are_refreshed_by_traffic() {
        let (mut t, now) = table();
        assert_eq!(t.next_expiry(), None, "nothing to age");
        t.learn(now, A, 1).unwrap();
        assert_eq!(t.next_expiry(), Some(now + Duration::from_secs(300)));
        let later = now + Duration::from_secs(200);
        t.learn(now + Duration::from_secs(100), B, 2).unwrap();
        t.learn(later, A, 1).unwrap();
        assert_eq!(
            t.next_expiry(),
            Some(now + Duration::from_secs(400)),
            "B's, the older now"
        );
        // 300 s after the first sighting but only 100 s after the second: alive.
        assert_eq!(
            t.lookup(now + Duration::from_secs(300), &A),
            Destination::Port(1)
        );
        let gone = later + Duration::from_secs(300);
        assert_eq!(t.lookup(gone, &A), Destination::Flood);
        t.expire(gone);
        assert!(t.is_empty());
        assert_eq!(t.count(1), 0);
    }

    #[test]
    fn at_its_cap_a_port_displaces_its_own_oldest_and_no_other_ports() {
        let (mut t, now) = table();
        assert_eq!(t.learn(now, A, 1), Ok(false));
        assert_eq!(t.learn(now, B, 1), Ok(false));
        // Known addresses of a full port refresh, displacing nothing.
        assert_eq!(t.learn(now, A, 1), Ok(false));
        let (c, d) = ([2, 0, 0, 0, 0, 0xc], [2, 0, 0, 0, 0, 0xd]);
        t.learn(now, d, 2).unwrap();
        // A new one takes the place of port 1's oldest, A.
        assert_eq!(t.learn(now, c, 1), Ok(true));
        assert_eq!(t.count(1), 2);
        assert_eq!(t.lookup(now, &A), Destination::Flood);
        assert_eq!(t.lookup(now, &c), Destination::Port(1));
        // Port 2 is not touched by port 1's churn.
        for i in 0..20 {
            t.learn(now, [2, 1, 0, 0, 0, i], 1).unwrap();
        }
        assert_eq!((t.count(1), t.count(2)), (2, 1));
        assert_eq!(t.lookup(now, &d), Destination::Port(2));
        // Expired entries make room before live ones are displaced.
        let later = now + Duration::from_secs(301);
        assert_eq!(t.learn(later, A, 1), Ok(false));
        assert_eq!(t.count(1), 1);
    }

    #[test]
    fn an_address_that_moves_is_relearned_on_its_new_port() {
        let (mut t, now) = table();
        t.learn(now, A, 1).unwrap();
        t.learn(now, A, 2).unwrap();
        assert_eq!(t.lookup(now, &A), Destination::Port(2));
        assert_eq!((t.count(1), t.count(2)), (0, 1));
        // A move into a full port displaces that port's oldest.
        t.learn(now, B, 3).unwrap();
        t.learn(now, [2, 0, 0, 0, 0, 0xc], 3).unwrap();
        assert_eq!(t.learn(now, A, 3), Ok(true));
        assert_eq!(t.lookup(now, &A), Destination::Port(3));
        assert_eq!(t.lookup(now, &B), Destination::Flood);
        assert_eq!((t.count(2), t.count(3)), (0, 2));
    }

    #[test]
    fn a_protected_ports_live_addresses_cannot_be_taken() {
        let (mut t, now) = table();
        t.learn(now, A, 0).unwrap();
        let aging = Duration::from_secs(300);
        assert_eq!(
            t.learn_unless(now, A, 1, 0, PROTECTED_FOR),
            Err(Refused::Protected)
        );
        assert_eq!(t.lookup(now, &A), Destination::Port(0));
        // Heard again locally: still its.
        let soon = now + PROTECTED_FOR - Duration::from_secs(1);
        t.learn(soon, A, 0).unwrap();
        let later = soon + PROTECTED_FOR - Duration::from_secs(1);
        assert_eq!(
            t.learn_unless(later, A, 1, 0, PROTECTED_FOR),
            Err(Refused::Protected)
        );
        // Quiet for the hold: a port held to the aging time still may not
        // take it, one held to PROTECTED_FOR may (it moved there).
        let moved = later + Duration::from_secs(2);
        assert_eq!(
            t.learn_unless(moved, A, 1, 0, aging),
            Err(Refused::Protected)
        );
        t.learn_unless(moved, A, 1, 0, PROTECTED_FOR).unwrap();
        assert_eq!(t.lookup(moved, &A), Destination::Port(1));
    }

    #[test]
    fn forgetting_a_port_drops_its_addresses() {
        let (mut t, now) = table();
        t.learn(now, A, 1).unwrap();
        t.learn(now, B, 2).unwrap();
        t.forget_port(1);
        assert_eq!(t.lookup(now, &A), Destination::Flood);
        assert_eq!(t.macs(now, 2), vec![B]);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn ten_thousand_random_sources_stay_within_the_cap() {
        let mut t = MacTable::new(DEFAULT_AGING, DEFAULT_CAP);
        let now = Instant::now();
        let mut x: u64 = 0x1234_5678;
        let mut evicted = 0;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x.to_le_bytes();
            let mac = [b[0] & 0xfe, b[1], b[2], b[3], b[4], b[5]];
            if t.learn(now, mac, 7u8).unwrap() {
                evicted += 1;
            }
        }
        assert_eq!(t.count(7), DEFAULT_CAP);
        assert_eq!(t.len(), DEFAULT_CAP);
        assert_eq!(evicted, 10_000 - DEFAULT_CAP);
        // The order kept for eviction stays bounded too.
        assert!(t.order[&7].len() <= 2 * DEFAULT_CAP);
    }
}
