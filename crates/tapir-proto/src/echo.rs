//! The echo responder: the classic "icmpecho" program's logic, in place.
//!
//! ```text
//!   tun (IP):        IPv4 ICMP echo request  ─▶ echo reply     (addresses swapped, TTL 64)
//!                    IPv6 ICMPv6 echo request ─▶ echo reply     (hop limit 64, ext. headers dropped)
//!   tap (Ethernet):  the above, to our MAC   ─▶ reply from our MAC
//!                    ARP who-has SERVED      ─▶ ARP reply, SERVED is-at our MAC
//!                    NS for SERVED           ─▶ NA (solicited, override, with our MAC)
//! ```
//!
//! A reply is the request rewritten in its own buffer: identifier, sequence
//! number and payload are never touched, and checksums are updated
//! incrementally (RFC 1624) where only a word changed. Fragments, other
//! protocols and malformed packets are counted and ignored; no input panics
//! (see the `echo` fuzz target).
//!
//! Which destinations are served: in tun mode, every unicast address routed
//! into the device except the host's own (as the classic program does); in
//! tap mode, every address of the configured subnets except the host's own;
//! in both, for IPv4, never a subnet's network or broadcast address (a reply
//! must come from an address of the replier's own, RFC 1122 §3.2.2.6).
//! `only` narrows either. A duplicate address detection probe is never
//! answered: on a tap it is the host (or a guest on its bridge) taking an
//! address for itself, which echo gives up (see [`Responder::set_subnets`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use tapir_wire::checksum;

/// What the device carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// IP packets (tun).
    Ip,
    /// Ethernet frames (tap).
    Ethernet,
}

/// The hop limit (TTL) of every echo reply.
pub const REPLY_HOP_LIMIT: u8 = 64;

/// The smallest buffer `handle` needs: an Ethernet + IPv6 neighbour
/// advertisement with its link-layer option (14 + 40 + 32 bytes).
pub const MIN_BUFFER: usize = 86;

/// Why a packet got no reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// Addressed to the host itself, to a multicast or broadcast address, to
    /// another MAC, or outside what `only` allows.
    NotForUs,
    /// An IPv4 or IPv6 fragment: echo requests are answered whole only.
    Fragment,
    /// Well-formed, but not something we answer (other ICMP types, UDP, MLD,
    /// router solicitations, unknown ethertypes and protocols).
    NotEcho,
    /// Too short, bad lengths, wrong version, bad header fields.
    Malformed,
    /// A header or ICMP checksum does not verify.
    BadChecksum,
}

/// What to do with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Write `buf[..len]` back to the device.
    Reply(usize),
    /// Nothing to send.
    Ignored(Ignored),
}

/// Counters, one per outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Packets handled.
    pub received: u64,
    /// Echo replies (IPv4 and IPv6).
    pub echo_replies: u64,
    /// ARP replies.
    pub arp_replies: u64,
    /// Neighbour advertisements.
    pub nd_replies: u64,
    /// See [`Ignored::NotForUs`].
    pub not_for_us: u64,
    /// See [`Ignored::Fragment`].
    pub fragments: u64,
    /// See [`Ignored::NotEcho`].
    pub not_echo: u64,
    /// See [`Ignored::Malformed`].
    pub malformed: u64,
    /// See [`Ignored::BadChecksum`].
    pub bad_checksum: u64,
}

/// Which addresses the responder answers for, and as whom.
#[derive(Debug, Clone)]
pub struct Config {
    /// tun or tap.
    pub link: Link,
    /// Our MAC address (tap mode).
    pub mac: [u8; 6],
    /// The host's subnets: the addresses configured on the device, with
    /// their prefixes. The host's own addresses are never answered; in tap
    /// mode only addresses inside these subnets are.
    pub subnets: Vec<IpNet>,
    /// If not empty, answer only for these addresses.
    pub only: Vec<IpAddr>,
}

/// The responder: a config and its counters.
#[derive(Debug, Clone)]
pub struct Responder {
    config: Config,
    stats: Stats,
}

const ETH_LEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
const ICMPV6_NS: u8 = 135;
const ICMPV6_NA: u8 = 136;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn v6(b: &[u8], at: usize) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    Ipv6Addr::from(a)
}

fn v4(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

impl Responder {
    /// A responder with zeroed counters.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            stats: Stats::default(),
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The host's addresses now (they change while echo runs: one the host
    /// takes is no longer served).
    pub fn set_subnets(&mut self, subnets: Vec<IpNet>) {
        self.config.subnets = subnets;
    }

    /// Whether `addr` is an IPv4 subnet's network or broadcast address.
    fn subnet_edge(&self, addr: IpAddr) -> bool {
        self.config.subnets.iter().any(|n| {
            matches!(n, IpNet::V4(v) if v.prefix_len() < 31
                && (addr == IpAddr::V4(v.network()) || addr == IpAddr::V4(v.broadcast())))
        })
    }

    /// Whether we answer for `addr`.
    pub fn serves(&self, addr: IpAddr) -> bool {
        let c = &self.config;
        // `only` narrows, never widens.
        self.never_served(addr).is_none() && (c.only.is_empty() || c.only.contains(&addr))
    }

    /// Why `addr` is never answered for, whatever `only` says (`None`: it
    /// may be).
    pub fn never_served(&self, addr: IpAddr) -> Option<&'static str> {
        let c = &self.config;
        let broadcast = matches!(addr, IpAddr::V4(a) if a.is_broadcast());
        if addr.is_multicast() || addr.is_unspecified() || addr.is_loopback() || broadcast {
            return Some("not a unicast address");
        }
        if c.subnets.iter().any(|n| n.addr() == addr) {
            return Some("the host's own address (the kernel answers it)");
        }
        if self.subnet_edge(addr) {
            return Some("a subnet's network or broadcast address");
        }
        match c.link {
            Link::Ethernet if !c.subnets.iter().any(|n| n.contains(&addr)) => {
                Some("outside the tap's subnets (a tap's hosts are those of its subnets)")
            }
            _ => None,
        }
    }

    /// Handles the packet in `buf[..len]`; on `Reply(n)`, `buf[..n]` holds the
    /// answer. `buf` should be at least [`MIN_BUFFER`] bytes (a read buffer
    /// always is); a shorter one makes neighbour solicitations go unanswered.
    pub fn handle(&mut self, buf: &mut [u8], len: usize) -> Outcome {
        self.stats.received += 1;
        let len = len.min(buf.len());
        let outcome = match self.config.link {
            Link::Ip => self.handle_ip(buf, len, 0),
            Link::Ethernet => self.handle_ethernet(buf, len),
        };
        let s = &mut self.stats;
        match outcome {
            Outcome::Reply(_) => {}
            Outcome::Ignored(Ignored::NotForUs) => s.not_for_us += 1,
            Outcome::Ignored(Ignored::Fragment) => s.fragments += 1,
            Outcome::Ignored(Ignored::NotEcho) => s.not_echo += 1,
            Outcome::Ignored(Ignored::Malformed) => s.malformed += 1,
            Outcome::Ignored(Ignored::BadChecksum) => s.bad_checksum += 1,
        }
        outcome
    }

    fn handle_ip(&mut self, buf: &mut [u8], len: usize, at: usize) -> Outcome {
        match buf.get(at).map(|b| b >> 4) {
            Some(4) => self.echo_v4(buf, len, at),
            Some(6) => self.echo_v6(buf, len, at),
            _ => Outcome::Ignored(Ignored::Malformed),
        }
    }

    fn handle_ethernet(&mut self, buf: &mut [u8], len: usize) -> Outcome {
        if len < ETH_LEN {
            return Outcome::Ignored(Ignored::Malformed);
        }
        let mac = self.config.mac;
        let ethertype = be16(buf, 12);
        let to_us = buf[0..6] == mac;
        let outcome = match ethertype {
            ETHERTYPE_ARP => return self.arp(buf, len),
            ETHERTYPE_IPV6 if buf[0] == 0x33 && buf[1] == 0x33 || to_us => {
                if let Some(outcome) = self.neighbour_solicitation(buf, len) {
                    return outcome;
                }
                if !to_us {
                    return Outcome::Ignored(Ignored::NotForUs);
                }
                self.echo_v6(buf, len, ETH_LEN)
            }
            ETHERTYPE_IPV4 if to_us => self.echo_v4(buf, len, ETH_LEN),
            ETHERTYPE_IPV4 | ETHERTYPE_IPV6 => return Outcome::Ignored(Ignored::NotForUs),
            _ => return Outcome::Ignored(Ignored::NotEcho),
        };
        if let Outcome::Reply(_) = outcome {
            buf.copy_within(6..12, 0);
            buf[6..12].copy_from_slice(&mac);
        }
        outcome
    }

    fn echo_v4(&mut self, buf: &mut [u8], len: usize, at: usize) -> Outcome {
        let Some(ip) = buf.get(at..len) else {
            return Outcome::Ignored(Ignored::Malformed);
        };
        if ip.len() < 20 || ip[0] >> 4 != 4 {
            return Outcome::Ignored(Ignored::Malformed);
        }
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let total = usize::from(be16(ip, 2));
        if ihl < 20 || total < ihl || total > ip.len() {
            return Outcome::Ignored(Ignored::Malformed);
        }
        if !checksum::verify(&ip[..ihl]) {
            return Outcome::Ignored(Ignored::BadChecksum);
        }
        // More-fragments set or a non-zero offset.
        if be16(ip, 6) & 0x3fff != 0 {
            return Outcome::Ignored(Ignored::Fragment);
        }
        if ip[9] != PROTO_ICMP {
            return Outcome::Ignored(Ignored::NotEcho);
        }
        let icmp = &ip[ihl..total];
        if icmp.len() < 8 {
            return Outcome::Ignored(Ignored::Malformed);
        }
        if icmp[0] != ICMP_ECHO_REQUEST || icmp[1] != 0 {
            return Outcome::Ignored(Ignored::NotEcho);
        }
        if !checksum::verify(icmp) {
            return Outcome::Ignored(Ignored::BadChecksum);
        }
        let (src, dst) = (v4(ip, 12), v4(ip, 16));
        // Nor to a source a reply cannot go back to (0.0.0.0), or would go
        // to many (a broadcast address).
        if !self.serves(IpAddr::V4(dst))
            || src.is_broadcast()
            || src.is_multicast()
            || src.is_unspecified()
            || self.subnet_edge(IpAddr::V4(src))
        {
            return Outcome::Ignored(Ignored::NotForUs);
        }
        let ip = &mut buf[at..at + total];
        // Swapping source and destination leaves both checksums as they are;
        // the TTL and the ICMP type are single-word edits. IPv4 options are
        // kept as they came.
        let (s, d) = (src.octets(), dst.octets());
        ip[12..16].copy_from_slice(&d);
        ip[16..20].copy_from_slice(&s);
        let old = be16(ip, 8);
        ip[8] = REPLY_HOP_LIMIT;
        let check = checksum::update16(be16(ip, 10), old, be16(ip, 8));
        put16(ip, 10, check);
        let icmp = &mut ip[ihl..];
        let old = be16(icmp, 0);
        icmp[0] = ICMP_ECHO_REPLY;
        let check = checksum::update16(be16(icmp, 2), old, be16(icmp, 0));
        put16(icmp, 2, check);
        self.stats.echo_replies += 1;
        Outcome::Reply(at + total)
    }

    /// Walks IPv6 extension headers: the offset (from the IPv6 header) and
    /// protocol of the upper layer, or why not.
    fn upper_layer(ip: &[u8], end: usize) -> Result<(usize, u8), Ignored> {
        let mut next = ip[6];
        let mut off = 40;
        loop {
            match next {
                // Hop-by-hop, routing, destination options: skip.
                0 | 43 | 60 => {
                    let Some(h) = ip.get(off..off + 2).filter(|_| off + 8 <= end) else {
                        return Err(Ignored::Malformed);
                    };
                    next = h[0];
                    off += (usize::from(h[1]) + 1) * 8;
                    if off > end {
                        return Err(Ignored::Malformed);
                    }
                }
                // A fragment header: an atomic fragment (offset 0, no
                // more to come) is the whole packet, processed as such
                // (RFC 6946); a real fragment is not answered.
                44 => {
                    let Some(h) = ip.get(off..off + 8).filter(|_| off + 8 <= end) else {
                        return Err(Ignored::Malformed);
                    };
                    if u16::from_be_bytes([h[2], h[3]]) & 0xfff9 != 0 {
                        return Err(Ignored::Fragment);
                    }
                    next = h[0];
                    off += 8;
                }
                p => return Ok((off, p)),
            }
        }
    }

    fn echo_v6(&mut self, buf: &mut [u8], len: usize, at: usize) -> Outcome {
        let Some(ip) = buf.get(at..len) else {
            return Outcome::Ignored(Ignored::Malformed);
        };
        if ip.len() < 40 || ip[0] >> 4 != 6 {
            return Outcome::Ignored(Ignored::Malformed);
        }
        let end = 40 + usize::from(be16(ip, 4));
        if end > ip.len() {
            return Outcome::Ignored(Ignored::Malformed);
        }
        let (off, proto) = match Self::upper_layer(ip, end) {
            Ok(x) => x,
            Err(why) => return Outcome::Ignored(why),
        };
        if proto != PROTO_ICMPV6 {
            return Outcome::Ignored(Ignored::NotEcho);
        }
        let icmp = &ip[off..end];
        if icmp.len() < 8 {
            return Outcome::Ignored(Ignored::Malformed);
        }
        if icmp[0] != ICMPV6_ECHO_REQUEST || icmp[1] != 0 {
            return Outcome::Ignored(Ignored::NotEcho);
        }
        let src: [u8; 16] = ip[8..24].try_into().expect("16 bytes");
        let dst: [u8; 16] = ip[24..40].try_into().expect("16 bytes");
        let pseudo = checksum::ipv6_pseudo(&src, &dst, icmp.len() as u32, PROTO_ICMPV6);
        if checksum::finish(checksum::add(pseudo, icmp)) != 0 {
            return Outcome::Ignored(Ignored::BadChecksum);
        }
        let (s, d) = (Ipv6Addr::from(src), Ipv6Addr::from(dst));
        if !self.serves(IpAddr::V6(d)) || s.is_multicast() || s.is_unspecified() {
            return Outcome::Ignored(Ignored::NotForUs);
        }
        let icmp_len = end - off;
        let ip = &mut buf[at..];
        if off > 40 {
            // Extension headers are not echoed (a routing header would be
            // wrong on the way back): the reply carries ICMPv6 alone.
            ip.copy_within(off..end, 40);
            ip[6] = PROTO_ICMPV6;
            put16(ip, 4, icmp_len as u16);
        }
        ip[8..24].copy_from_slice(&dst);
        ip[24..40].copy_from_slice(&src);
        ip[7] = REPLY_HOP_LIMIT;
        // The pseudo-header sum is the same with source and destination
        // swapped and the length unchanged: only the type word moves.
        let icmp = &mut ip[40..40 + icmp_len];
        let old = be16(icmp, 0);
        icmp[0] = ICMPV6_ECHO_REPLY;
        let check = checksum::update16(be16(icmp, 2), old, be16(icmp, 0));
        put16(icmp, 2, check);
        self.stats.echo_replies += 1;
        Outcome::Reply(at + 40 + icmp_len)
    }

    fn arp(&mut self, buf: &mut [u8], len: usize) -> Outcome {
        let Some(arp) = buf.get(ETH_LEN..len).filter(|a| a.len() >= 28) else {
            return Outcome::Ignored(Ignored::Malformed);
        };
        // Ethernet/IPv4 only: htype 1, ptype 0x0800, hlen 6, plen 4.
        if be16(arp, 0) != 1 || be16(arp, 2) != ETHERTYPE_IPV4 || arp[4] != 6 || arp[5] != 4 {
            return Outcome::Ignored(Ignored::NotEcho);
        }
        if be16(arp, 6) != 1 {
            return Outcome::Ignored(Ignored::NotEcho);
        }
        // A request sent to another station (a unicast ARP on a bridge) is
        // theirs to answer.
        if buf[0..6] != [0xff; 6] && buf[0..6] != self.config.mac {
            return Outcome::Ignored(Ignored::NotForUs);
        }
        let sender_ip = v4(arp, 14);
        let target_ip = v4(arp, 24);
        // A gratuitous ARP announces; it asks nothing.
        if sender_ip == target_ip || !self.serves(IpAddr::V4(target_ip)) {
            return Outcome::Ignored(Ignored::NotForUs);
        }
        let mac = self.config.mac;
        let mut sender_mac = [0u8; 6];
        sender_mac.copy_from_slice(&arp[8..14]);
        buf[0..6].copy_from_slice(&sender_mac);
        buf[6..12].copy_from_slice(&mac);
        let arp = &mut buf[ETH_LEN..];
        put16(arp, 6, 2);
        arp[18..24].copy_from_slice(&sender_mac);
        arp[24..28].copy_from_slice(&sender_ip.octets());
        arp[8..14].copy_from_slice(&mac);
        arp[14..18].copy_from_slice(&target_ip.octets());
        self.stats.arp_replies += 1;
        Outcome::Reply(ETH_LEN + 28)
    }

    /// A neighbour solicitation for a served address, answered in place;
    /// `None` if the frame is not a neighbour solicitation at all.
    fn neighbour_solicitation(&mut self, buf: &mut [u8], len: usize) -> Option<Outcome> {
        let ip = buf.get(ETH_LEN..len)?;
        if ip.len() < 40 || ip[0] >> 4 != 6 || ip[6] != PROTO_ICMPV6 {
            return None;
        }
        let end = 40 + usize::from(be16(ip, 4));
        if end > ip.len() || end < 40 + 24 || ip[40] != ICMPV6_NS {
            return None;
        }
        // RFC 4861 §7.1.1: hop limit 255, code 0, valid checksum.
        let icmp = &ip[40..end];
        if ip[7] != 255 || icmp[1] != 0 {
            return Some(Outcome::Ignored(Ignored::Malformed));
        }
        let src: [u8; 16] = ip[8..24].try_into().expect("16 bytes");
        let dst: [u8; 16] = ip[24..40].try_into().expect("16 bytes");
        let pseudo = checksum::ipv6_pseudo(&src, &dst, icmp.len() as u32, PROTO_ICMPV6);
        if checksum::finish(checksum::add(pseudo, icmp)) != 0 {
            return Some(Outcome::Ignored(Ignored::BadChecksum));
        }
        let target = v6(icmp, 8);
        if target.is_multicast() || !self.serves(IpAddr::V6(target)) {
            return Some(Outcome::Ignored(Ignored::NotForUs));
        }
        // Sent to the target's solicited-node group or to the target itself
        // (§7.1.1 says which; one to all nodes is not a solicitation for it).
        let t = target.octets();
        let solicited = [
            0xff02,
            0,
            0,
            0,
            0,
            1,
            0xff00 | u16::from(t[13]),
            u16::from_be_bytes([t[14], t[15]]),
        ];
        let to = Ipv6Addr::from(dst);
        if to != Ipv6Addr::from(solicited) && to != target {
            return Some(Outcome::Ignored(Ignored::NotForUs));
        }
        // A duplicate address detection probe (from ::) is someone taking
        // the address for itself, here the host or a guest on its bridge:
        // given up, not defended (defended, the host's new address failed).
        if Ipv6Addr::from(src).is_unspecified() {
            return Some(Outcome::Ignored(Ignored::NotForUs));
        }
        if buf.len() < MIN_BUFFER {
            return Some(Outcome::Ignored(Ignored::Malformed));
        }
        let (reply_dst, flags): ([u8; 16], u8) = (src, 0x60);
        let mac = self.config.mac;
        let eth_dst = {
            let mut m = [0u8; 6];
            m.copy_from_slice(&buf[6..12]);
            m
        };
        buf[0..6].copy_from_slice(&eth_dst);
        buf[6..12].copy_from_slice(&mac);
        let ip = &mut buf[ETH_LEN..ETH_LEN + 72];
        ip[0..4].copy_from_slice(&[0x60, 0, 0, 0]);
        put16(ip, 4, 32);
        ip[6] = PROTO_ICMPV6;
        ip[7] = 255;
        ip[8..24].copy_from_slice(&target.octets());
        ip[24..40].copy_from_slice(&reply_dst);
        let icmp = &mut ip[40..72];
        icmp[0] = ICMPV6_NA;
        icmp[1] = 0;
        icmp[2..4].fill(0);
        icmp[4..8].copy_from_slice(&[flags, 0, 0, 0]);
        icmp[8..24].copy_from_slice(&target.octets());
        // Target link-layer address option: type 2, length 1 (8 bytes).
        icmp[24] = 2;
        icmp[25] = 1;
        icmp[26..32].copy_from_slice(&mac);
        let pseudo = checksum::ipv6_pseudo(&target.octets(), &reply_dst, 32, PROTO_ICMPV6);
        let check = checksum::finish(checksum::add(pseudo, icmp));
        put16(icmp, 2, check);
        self.stats.nd_replies += 1;
        Some(Outcome::Reply(ETH_LEN + 72))
    }
}

#[cfg(test)]
mod tests;
