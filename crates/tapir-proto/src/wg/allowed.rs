//! Allowed IPs: longest-prefix match from an address to a peer, with
//! updates in place.
//!
//! ```text
//!   insert(10.0.0.0/24, p) ─▶ the previous owner of exactly that prefix, if any
//!   lookup(10.0.0.7)       ─▶ the value of the longest prefix that holds it
//! ```
//! One hash table per prefix length in use, longest first: a look-up costs
//! one hash probe per distinct length (typically one or two: /32 and /128
//! for road warriors, plus a few site prefixes), whatever the number of
//! peers; an insert or a removal is one probe. 10,000 peers with a /32 each
//! are one table. Tested against a linear longest-prefix model. The tables
//! hash with Fx, not SipHash: their keys are the configured prefixes, not
//! chosen by whoever sends packets, and a look-up is made twice a packet.
//! [`AllowedIps::get`] remembers its last answer until the next change: a
//! flow's packets out and its packets in (whose source is checked) name
//! the same peer address, so most look-ups are one comparison (a probe
//! of a u128 key costs about 70 instructions here).

use std::cell::Cell;
use std::net::IpAddr;

use ipnet::IpNet;
use rustc_hash::FxHashMap as HashMap;

/// One family's tables: (prefix length, masked address -> value), longest first.
#[derive(Debug, Clone)]
struct Family<T> {
    tables: Vec<(u8, HashMap<u128, T>)>,
}

impl<T> Default for Family<T> {
    fn default() -> Self {
        Self { tables: Vec::new() }
    }
}

fn mask(addr: u128, len: u8, bits: u8) -> u128 {
    if len == 0 {
        return 0;
    }
    let shift = u32::from(bits - len);
    (addr >> shift) << shift
}

impl<T> Family<T> {
    fn table(&mut self, len: u8) -> &mut HashMap<u128, T> {
        let at = match self.tables.binary_search_by(|(l, _)| len.cmp(l)) {
            Ok(i) => i,
            Err(i) => {
                self.tables.insert(i, (len, HashMap::default()));
                i
            }
        };
        &mut self.tables[at].1
    }

    fn insert(&mut self, addr: u128, len: u8, bits: u8, value: T) -> Option<T> {
        self.table(len).insert(mask(addr, len, bits), value)
    }

    fn remove(&mut self, addr: u128, len: u8, bits: u8) -> Option<T> {
        let i = self.tables.iter().position(|(l, _)| *l == len)?;
        let old = self.tables[i].1.remove(&mask(addr, len, bits));
        if self.tables[i].1.is_empty() {
            self.tables.remove(i);
        }
        old
    }

    fn lookup(&self, addr: u128, bits: u8) -> Option<&T> {
        self.tables
            .iter()
            .find_map(|(len, t)| t.get(&mask(addr, *len, bits)))
    }
}

/// Prefixes of both families, each mapped to a value (a peer index).
#[derive(Debug)]
#[repr(C)]
pub struct AllowedIps<T: Copy> {
    /// The last address [`AllowedIps::get`] looked up, and its answer;
    /// forgotten on every change. (First: a look-up reads it first.)
    last: Cell<Option<(IpAddr, Option<T>)>>,
    v4: Family<T>,
    v6: Family<T>,
}

impl<T: Copy> Default for AllowedIps<T> {
    fn default() -> Self {
        Self {
            v4: Family::default(),
            v6: Family::default(),
            last: Cell::new(None),
        }
    }
}

fn key(net: &IpNet) -> (bool, u128, u8) {
    match net {
        IpNet::V4(n) => (true, u128::from(u32::from(n.addr())), n.prefix_len()),
        IpNet::V6(n) => (false, u128::from(n.addr()), n.prefix_len()),
    }
}

impl<T: Copy> AllowedIps<T> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `net` (host bits ignored) to `value`; returns the value it had.
    pub fn insert(&mut self, net: &IpNet, value: T) -> Option<T> {
        self.last.set(None);
        match key(net) {
            (true, a, l) => self.v4.insert(a, l, 32, value),
            (false, a, l) => self.v6.insert(a, l, 128, value),
        }
    }

    /// Unmaps exactly `net`; returns its value.
    pub fn remove(&mut self, net: &IpNet) -> Option<T> {
        self.last.set(None);
        match key(net) {
            (true, a, l) => self.v4.remove(a, l, 32),
            (false, a, l) => self.v6.remove(a, l, 128),
        }
    }

    /// The value of the longest prefix holding `ip`.
    pub fn lookup(&self, ip: IpAddr) -> Option<&T> {
        match ip {
            IpAddr::V4(a) => self.v4.lookup(u128::from(u32::from(a)), 32),
            IpAddr::V6(a) => self.v6.lookup(u128::from(a), 128),
        }
    }

    /// The value of exactly `net` (host bits ignored), for tests that
    /// compare two tables prefix by prefix.
    #[cfg(test)]
    pub(crate) fn exact(&self, net: &IpNet) -> Option<T> {
        let (family, addr, len, bits) = match key(net) {
            (true, a, l) => (&self.v4, a, l, 32),
            (false, a, l) => (&self.v6, a, l, 128),
        };
        let at = mask(addr, len, bits);
        family
            .tables
            .iter()
            .find(|(l, _)| *l == len)
            .and_then(|(_, t)| t.get(&at).copied())
    }

    /// Empties the table.
    pub fn clear(&mut self) {
        self.last.set(None);
        self.v4.tables.clear();
        self.v6.tables.clear();
    }

    /// How many prefixes are mapped.
    pub fn len(&self) -> usize {
        [&self.v4, &self.v6]
            .iter()
            .flat_map(|f| f.tables.iter())
            .map(|(_, t)| t.len())
            .sum()
    }

    /// Whether nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// [`AllowedIps::lookup`], answered from memory when `ip` is the
    /// address looked up last.
    #[inline]
    pub fn get(&self, ip: IpAddr) -> Option<T> {
        if let Some((last, value)) = self.last.get() {
            if last == ip {
                return value;
            }
        }
        let value = self.lookup(ip).copied();
        self.last.set(Some((ip, value)));
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// The model: every prefix in a list, the longest match wins.
    fn linear(model: &[(IpNet, usize)], ip: IpAddr) -> Option<usize> {
        model
            .iter()
            .filter(|(n, _)| n.contains(&ip))
            .max_by_key(|(n, _)| n.prefix_len())
            .map(|(_, v)| *v)
    }

    #[test]
    fn longest_prefix_wins_in_both_families() {
        let mut t = AllowedIps::new();
        t.insert(&"0.0.0.0/0".parse().unwrap(), 0);
        t.insert(&"10.0.0.0/8".parse().unwrap(), 1);
        t.insert(&"10.1.0.0/16".parse().unwrap(), 2);
        t.insert(&"10.1.2.3/32".parse().unwrap(), 3);
        t.insert(&"fd00::/64".parse().unwrap(), 4);
        fn at(t: &AllowedIps<i32>, s: &str) -> Option<i32> {
            t.lookup(s.parse().unwrap()).copied()
        }
        assert_eq!(at(&t, "10.1.2.3"), Some(3));
        assert_eq!(at(&t, "10.1.2.4"), Some(2));
        assert_eq!(at(&t, "10.2.0.1"), Some(1));
        assert_eq!(at(&t, "192.0.2.1"), Some(0));
        assert_eq!(at(&t, "fd00::1"), Some(4));
        assert_eq!(at(&t, "fd01::1"), None, "no ::/0");
        // Host bits are ignored; removal is exact.
        assert_eq!(t.insert(&"10.1.9.9/16".parse().unwrap(), 5), Some(2));
        assert_eq!(t.remove(&"10.1.0.0/16".parse().unwrap()), Some(5));
        assert_eq!(at(&t, "10.1.2.4"), Some(1));
        assert_eq!(t.len(), 4);
    }

    #[test]
    fn agrees_with_the_linear_model_under_random_updates() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let mut t = AllowedIps::new();
        let mut model: Vec<(IpNet, usize)> = Vec::new();
        let mut last: Option<IpAddr> = None;
        for step in 0..3000 {
            // Addresses from a small space so that prefixes overlap.
            let v4 = rng.next() % 3 != 0;
            let net: IpNet = if v4 {
                let a = std::net::Ipv4Addr::from(0x0a00_0000 | (rng.next() as u32 & 0x0000_0fff));
                IpNet::new(a.into(), (rng.next() % 33) as u8)
                    .unwrap()
                    .trunc()
            } else {
                let a =
                    std::net::Ipv6Addr::from((0xfd00u128 << 112) | u128::from(rng.next() as u16));
                IpNet::new(a.into(), (rng.next() % 129) as u8)
                    .unwrap()
                    .trunc()
            };
            if rng.next() % 4 == 0 {
                let expected = model
                    .iter()
                    .position(|(n, _)| *n == net)
                    .map(|i| model.remove(i).1);
                assert_eq!(t.remove(&net), expected);
            } else {
                let expected = model
                    .iter()
                    .position(|(n, _)| *n == net)
                    .map(|i| model.remove(i).1);
                assert_eq!(t.insert(&net, step), expected);
                model.push((net, step));
            }
            // The address looked up last, again after the change: a
            // remembered answer must not outlive it.
            if let Some(ip) = last {
                assert_eq!(t.get(ip), linear(&model, ip), "step {step}, {ip} again");
            }
            for _ in 0..5 {
                let ip: IpAddr = if rng.next() % 3 != 0 {
                    std::net::Ipv4Addr::from(0x0a00_0000 | (rng.next() as u32 & 0x0000_0fff)).into()
                } else {
                    std::net::Ipv6Addr::from((0xfd00u128 << 112) | u128::from(rng.next() as u16))
                        .into()
                };
                assert_eq!(
                    t.lookup(ip).copied(),
                    linear(&model, ip),
                    "step {step}, {ip}"
                );
                assert_eq!(t.get(ip), linear(&model, ip), "step {step}, {ip}");
                assert_eq!(t.get(ip), linear(&model, ip), "step {step}, {ip} twice");
                last = Some(ip);
            }
            assert_eq!(t.len(), model.len());
        }
    }
}
