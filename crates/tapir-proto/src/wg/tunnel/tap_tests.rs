//! Tap mode over a simulated link: a hub and two spokes that know only the
//! hub, switching Ethernet frames (flooding, learning, forwarding between
//! spokes), the per-peer limits, and a tun end against a tap end.

use super::tests::{Rng, key};
use super::*;

fn addr(i: usize) -> SocketAddr {
    format!("192.0.2.{}:51820", i + 1).parse().unwrap()
}

const MAC: [Mac; 3] = [
    [2, 0, 0, 0, 0, 0xa0],
    [2, 0, 0, 0, 0, 0xa1],
    [2, 0, 0, 0, 0, 0xa2],
];
const BCAST: Mac = [0xff; 6];

/// An Ethernet frame (ethertype 0x88b5, local experimental) of `len` bytes.
fn frame(dst: Mac, src: Mac, len: usize) -> Vec<u8> {
    let mut f = vec![0x5a; len.max(14)];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    f
}

/// An ARP request from `mac` claiming `ip`.
fn arp(mac: Mac, ip: [u8; 4]) -> Vec<u8> {
    let mut f = frame(BCAST, mac, 42);
    f[12..14].copy_from_slice(&[0x08, 0x06]);
    f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip);
    f
}

/// Node 0 is the hub; nodes 1 and 2 are spokes with the hub as their only peer.
struct Net {
    nodes: Vec<Tunnel>,
    keys: Vec<PublicKey>,
    now: Instant,
    wall: Duration,
    rng: Rng,
    /// (to node, from address, bytes)
    link: VecDeque<(usize, SocketAddr, Vec<u8>)>,
    /// Frames each node wrote to its tap.
    tap: Vec<Vec<Vec<u8>>>,
    drops: Vec<(usize, DropReason)>,
}

impl Net {
    fn new(spoke_allowed: &[&str], layers: [Layer; 3]) -> Self {
        let ks: Vec<PrivateKey> = (1..=3).map(key).collect();
        let keys: Vec<PublicKey> = ks.iter().map(PrivateKey::public_key).collect();
        let peer = |i: usize, endpoint: bool, allowed: &[&str]| PeerConfig {
            public: keys[i],
            psk: None,
            endpoint: endpoint.then(|| addr(i)),
            allowed_ips: allowed.iter().map(|s| s.parse().unwrap()).collect(),
            keepalive: None,
            rate: None,
        };
        let aging = Duration::from_secs(300);
        let nodes = vec![
            Tunnel::with_layer(
                ks[0].clone(),
                vec![peer(1, false, spoke_allowed), peer(2, false, &[])],
                layers[0],
                aging,
                4,
            ),
            Tunnel::with_layer(ks[1].clone(), vec![peer(0, true, &[])], layers[1], aging, 4),
            Tunnel::with_layer(ks[2].clone(), vec![peer(0, true, &[])], layers[2], aging, 4),
        ];
        Self {
            nodes,
            keys,
            now: Instant::now(),
            wall: Duration::from_secs(1_700_000_000),
            rng: Rng(0x9e3779b97f4a7c15),
            link: VecDeque::new(),
            tap: vec![vec![]; 3],
            drops: vec![],
        }
    }

    fn node_of(&self, a: SocketAddr) -> usize {
        (0..3).find(|&i| addr(i) == a).unwrap()
    }

    fn collect(&mut self) {
        let mut buf = [0u8; 2048];
        for i in 0..3 {
            while let Some((to, n)) = self.nodes[i].poll_transmit(self.now, &mut buf) {
                let dst = self.node_of(to);
                self.link.push_back((dst, addr(i), buf[..n].to_vec()));
            }
        }
    }

    /// Seals `f` at node `i` for peer `p`, onto the link.
    fn seal_to(&mut self, i: usize, p: usize, f: &[u8]) -> Encapsulated {
        let mut buf = vec![0u8; 2048];
        buf[16..16 + f.len()].copy_from_slice(f);
        let (now, wall) = (self.now, self.wall);
        let r = self.nodes[i].encapsulate_to(p, now, wall, &mut self.rng, &mut buf, f.len());
        if let Encapsulated::Send { to, len } = r {
            let dst = self.node_of(to);
            self.link.push_back((dst, addr(i), buf[..len].to_vec()));
        }
        r
    }

    /// Node `i`'s tap emits `f`.
    fn send(&mut self, i: usize, f: &[u8]) -> Encapsulated {
        let mut buf = vec![0u8; 2048];
        buf[16..16 + f.len()].copy_from_slice(f);
        let (now, wall) = (self.now, self.wall);
        let r = self.nodes[i].encapsulate(now, wall, &mut self.rng, &mut buf, f.len());
        match r {
            Encapsulated::Send { to, len } => {
                let dst = self.node_of(to);
                self.link.push_back((dst, addr(i), buf[..len].to_vec()));
            }
            Encapsulated::Flood => {
                for p in 0..self.nodes[i].peer_count() {
                    self.seal_to(i, p, f);
                }
            }
            _ => {}
        }
        self.collect();
        r
    }

    fn run(&mut self) {
        let mut steps = 0;
        while let Some((to, from, mut bytes)) = self.link.pop_front() {
            steps += 1;
            assert!(steps < 1000, "the link never went quiet");
            let n = bytes.len();
            let (now, wall) = (self.now, self.wall);
            match self.nodes[to].decapsulate(now, wall, &mut self.rng, from, &mut bytes, n) {
                Decapsulated::Packet(r) => self.tap[to].push(bytes[r].to_vec()),
                Decapsulated::Forward { range, to: p } => {
                    let f = bytes[range].to_vec();
                    self.seal_to(to, p, &f);
                }
                Decapsulated::Flood { range, from } => {
                    let f = bytes[range].to_vec();
                    self.tap[to].push(f.clone());
                    for p in (0..self.nodes[to].peer_count()).filter(|&p| p != from) {
                        self.seal_to(to, p, &f);
                    }
                }
                Decapsulated::Nothing => {}
                Decapsulated::Dropped(why) => self.drops.push((to, why)),
            }
            self.collect();
        }
    }

    /// Both spokes say hello (a broadcast), so the hub has sessions and endpoints for both.
    fn warm_up(&mut self) {
        for (i, mac) in MAC.iter().enumerate().skip(1) {
            self.send(i, &frame(BCAST, *mac, 60));
            self.run();
        }
        for t in &mut self.tap {
            t.clear();
        }
    }
}

/// A spoke removed at the hub takes its MACs with it; the other spoke,
/// moved into its place, keeps its own, its sessions and its unicast.
#[test]
fn a_removed_spoke_takes_its_macs_and_the_moved_one_keeps_its_own() {
    let mut n = Net::new(&[], [Layer::Ethernet; 3]);
    n.warm_up();
    let (one, two) = (n.keys[1], n.keys[2]);
    assert_eq!(n.nodes[0].peer_index(&two), Some(1));
    assert_eq!(n.nodes[0].peer_mac_count(&one), 1);
    assert!(n.nodes[0].remove_peer(&one));
    n.nodes[0].check_indices();
    assert_eq!(n.nodes[0].peer_index(&two), Some(0), "moved into the place");
    assert_eq!(n.nodes[0].peer_mac_count(&one), 0, "its MAC forgotten");
    assert_eq!(n.nodes[0].peer_mac_count(&two), 1);
    // The hub's tap to spoke 2's MAC: straight to it, on its old session.
    let u = frame(MAC[2], MAC[0], 100);
    assert!(matches!(n.send(0, &u), Encapsulated::Send { .. }));
    n.run();
    assert_eq!(n.tap[2], vec![u]);
    // And back.
    let back = frame(MAC[0], MAC[2], 100);
    n.send(2, &back);
    n.run();
    assert_eq!(n.tap[0], vec![back], "{:?}", n.drops);
}

#[test]
fn a_broadcast_floods_to_every_member_but_its_sender() {
    let mut n = Net::new(&[], [Layer::Ethernet; 3]);
    n.warm_up();
    let b = frame(BCAST, MAC[1], 60);
    assert_eq!(n.send(1, &b), Encapsulated::Flood);
    n.run();
    assert_eq!(n.tap[0], vec![b.clone()], "the hub's tap");
    assert_eq!(
        n.tap[2],
        vec![b.clone()],
        "the other spoke, through the hub"
    );
    assert!(n.tap[1].is_empty(), "never back to where it came from");
    assert!(n.drops.is_empty(), "{:?}", n.drops);
}

#[test]
fn learned_unicast_between_spokes_bypasses_the_hubs_tap() {
    let mut n = Net::new(&[], [Layer::Ethernet; 3]);
    n.warm_up();
    // Spoke 1 to spoke 2's MAC, learned by the hub during the warm-up.
    let u = frame(MAC[2], MAC[1], 100);
    // Spoke 1 does not know MAC 2 (it came through the hub's flood, so
    // spoke 1 learned it on the hub): it sends to its one peer.
    n.send(1, &u);
    n.run();
    assert_eq!(n.tap[2], vec![u.clone()]);
    assert!(
        n.tap[0].is_empty(),
        "the hub forwarded without its tap seeing it"
    );
    // The reply goes straight back the same way.
    let r = frame(MAC[1], MAC[2], 100);
    n.send(2, &r);
    n.run();
    assert_eq!(n.tap[1], vec![r]);
    assert!(n.tap[0].is_empty());
    // Frames are carried unpadded: length preserved exactly.
    assert_eq!(n.tap[2][0].len(), 100);
}

#[test]
fn unicast_to_the_hubs_own_mac_goes_to_its_tap_only() {
    let mut n = Net::new(&[], [Layer::Ethernet; 3]);
    n.warm_up();
    // The hub's host speaks once: its MAC is learned as local.
    n.send(0, &frame(BCAST, MAC[0], 60));
    n.run();
    for t in &mut n.tap {
        t.clear();
    }
    let u = frame(MAC[0], MAC[1], 70);
    n.send(1, &u);
    n.run();
    assert_eq!(n.tap[0], vec![u]);
    assert!(n.tap[2].is_empty());
}

#[test]
fn the_mac_cap_holds_and_other_spokes_keep_working() {
    let mut n = Net::new(&[], [Layer::Ethernet; 3]);
    n.warm_up();
    for i in 0..50u8 {
        n.send(1, &frame(BCAST, [2, 1, 0, 0, 0, i], 60));
        n.run();
    }
    // The cap is 4 in this net: the hub holds spoke 1's newest four, each
    // new one displacing its oldest (the frames go on).
    let k1 = n.keys[1];
    assert_eq!(n.nodes[0].peer_mac_count(&k1), 4);
    let stats = n.nodes[0].peers().next().unwrap().2.clone();
    assert_eq!(stats.macs_evicted, 47);
    // Spoke 1's own station, displaced by its flood, is learned again by
    // its next frame, and reached.
    n.send(1, &frame(BCAST, MAC[1], 60));
    n.run();
    let to_1 = frame(MAC[1], MAC[0], 60);
    n.tap[1].clear();
    n.send(0, &to_1);
    n.run();
    assert_eq!(n.tap[1], vec![to_1]);
    // Spoke 2, whose one peer (the hub) carried spoke 1's flood to it, still
    // learns a station new to it and takes its frames.
    let newcomer = frame(MAC[2], [2, 9, 9, 9, 9, 9], 60);
    n.tap[2].clear();
    n.send(0, &newcomer);
    n.run();
    assert_eq!(n.tap[2], vec![newcomer]);
    // Spoke 2 is unaffected.
    let u = frame(MAC[0], MAC[2], 60);
    n.tap[0].clear();
    n.send(2, &u);
    n.run();
    assert_eq!(n.tap[0].len(), 1);
}

#[test]
fn multicast_sources_and_loops_are_dropped_and_counted() {
    let mut n = Net::new(&[], [Layer::Ethernet; 3]);
    n.warm_up();
    n.send(1, &frame(BCAST, [0x33, 0x33, 0, 0, 0, 1], 60));
    n.run();
    // To a MAC the hub learned on spoke 1 itself.
    n.seal_to(1, 0, &frame(MAC[1], [2, 0, 0, 0, 0, 0xee], 60));
    n.run();
    let d = &n.nodes[0].peers().next().unwrap().2.drops;
    assert_eq!((d.multicast_source, d.loop_back), (1, 1));
    assert!(n.tap[0].is_empty() && n.tap[2].is_empty());
}

#[test]
fn allowed_ips_stop_spoofed_senders_in_tap_mode() {
    let mut n = Net::new(&["10.0.0.1/32"], [Layer::Ethernet; 3]);
    n.warm_up();
    n.send(1, &arp(MAC[1], [10, 0, 0, 1]));
    n.run();
    assert_eq!(n.tap[0].len(), 1, "its own address passes");
    n.send(1, &arp(MAC[1], [10, 0, 0, 9]));
    n.run();
    assert_eq!(n.tap[0].len(), 1, "another's address does not");
    n.send(1, &arp(MAC[1], [0, 0, 0, 0]));
    n.run();
    assert_eq!(
        n.tap[0].len(),
        2,
        "an ARP probe (unspecified sender) passes"
    );
    let d = &n.nodes[0].peers().next().unwrap().2.drops;
    assert_eq!(d.not_allowed, 1);
}

/// In tap mode allowed IPs only filter, so one prefix may be several
/// peers' (the segment's link-local fe80::/10): none is taken from the
/// other, and each may send from it.
#[test]
fn in_tap_mode_peers_may_share_an_allowed_prefix() {
    let mut n = Net::new(&["10.0.0.1/32", "fe80::/10"], [Layer::Ethernet; 3]);
    let k2 = n.keys[2];
    assert!(n.nodes[0].update_peer(&k2, |c| c.allowed_ips =
        vec!["10.0.0.2/32".parse().unwrap(), "fe80::/10".parse().unwrap(),]));
    let lists: Vec<usize> = n.nodes[0]
        .peers()
        .map(|(c, _, _)| c.allowed_ips.len())
        .collect();
    assert_eq!(lists, vec![2, 2], "fe80::/10 kept by both");
    n.warm_up();
    // An IPv6 echo request from each spoke's link-local address.
    let from = |mac: Mac, last: u8| {
        let mut f = frame(BCAST, mac, 14 + 40 + 8);
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        f[14..22].copy_from_slice(&[0x60, 0, 0, 0, 0, 8, 58, 255]);
        f[22..38].copy_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, last]);
        f[38..54].copy_from_slice(&[0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        f[54..62].copy_from_slice(&[128, 0, 0, 0, 0, 1, 0, 1]);
        f
    };
    n.send(1, &from(MAC[1], 1));
    n.run();
    n.send(2, &from(MAC[2], 2));
    n.run();
    assert_eq!(n.tap[0].len(), 2, "{:?}", n.drops);
    let d: u64 = n.nodes[0]
        .peers()
        .map(|(_, _, s)| s.drops.not_allowed)
        .sum();
    assert_eq!(d, 0);
}

/// A frame from `src` to the broadcast address: `types` are the
/// EtherTypes in order (VLAN tags first, each with VLAN 7), then `l3`.
fn tagged(src: Mac, types: &[u16], l3: &[u8]) -> Vec<u8> {
    let mut f = frame(BCAST, src, 14);
    f.truncate(12);
    for (i, t) in types.iter().enumerate() {
        f.extend_from_slice(&t.to_be_bytes());
        if i + 1 < types.len() {
            f.extend_from_slice(&[0, 7]);
        }
    }
    f.extend_from_slice(l3);
    f
}

/// An IPv4 header from `src`, protocol `proto`, then `rest`.
fn ipv4(src: [u8; 4], proto: u8, rest: &[u8]) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0];
    p.extend_from_slice(&src);
    p.extend_from_slice(&[255, 255, 255, 255]);
    p.extend_from_slice(rest);
    let len = p.len() as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p
}

/// An IPv6 header from `src`, next header `next`, then `rest`.
fn ipv6(src: &str, next: u8, rest: &[u8]) -> Vec<u8> {
    let src: std::net::Ipv6Addr = src.parse().unwrap();
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(rest.len() as u16).to_be_bytes());
    p.extend_from_slice(&[next, 255]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&"ff02::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
    p.extend_from_slice(rest);
    p
}

/// A Neighbor Advertisement (override flag set) for `target`.
fn advert(target: &str) -> Vec<u8> {
    let mut m = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
    m.extend_from_slice(&target.parse::<std::net::Ipv6Addr>().unwrap().octets());
    m
}

#[test]
fn what_a_frame_claims_is_checked_under_tags_and_without_an_address() {
    let mut n = Net::new(&["10.0.0.1/32", "fd00::1/128"], [Layer::Ethernet; 3]);
    n.warm_up();
    let icmp = [8, 0, 0, 0, 0, 0, 0, 0];
    let own = ipv4([10, 0, 0, 1], 1, &icmp);
    let other = ipv4([10, 0, 0, 9], 1, &icmp);
    let (v4, v6, q, ad) = (0x0800, 0x86dd, 0x8100, 0x88a8);
    // Behind a hop-by-hop header (router alert) or destination options.
    let behind = |header: u8, upper: &[u8]| {
        let mut m = vec![58, 0, 5, 2, 0, 0, 1, 0];
        if header == 60 {
            m = vec![58, 0, 1, 4, 0, 0, 0, 0];
        }
        m.extend_from_slice(upper);
        m
    };
    let cases: [(&[u16], Vec<u8>, bool, &str); 18] = [
        (&[v4], own.clone(), true, "its own address"),
        (&[q, v4], own.clone(), true, "one tag"),
        (&[q, v4], other.clone(), false, "another's, one tag"),
        (&[ad, q, v4], own.clone(), true, "two tags"),
        (&[ad, q, v4], other, false, "another's, QinQ"),
        (&[q, q, q, v4], own, false, "three tags"),
        // No address yet: a DHCP client's discover passes, a ping does not.
        (
            &[v4],
            ipv4([0; 4], 17, &[0, 68, 0, 67, 0, 8, 0, 0]),
            true,
            "DHCP from 0.0.0.0",
        ),
        (&[v4], ipv4([0; 4], 1, &icmp), false, "a ping from 0.0.0.0"),
        // IPv6: duplicate address detection from ::, UDP from :: not; an
        // advertisement for its own address, not for another's.
        (
            &[v6],
            ipv6("::", 58, &[135, 0, 0, 0, 0, 0, 0, 0]),
            true,
            "DAD from ::",
        ),
        (&[v6], ipv6("::", 17, &[0; 8]), false, "UDP from ::"),
        (
            &[v6],
            ipv6("fd00::1", 58, &advert("fd00::1")),
            true,
            "advertising its own",
        ),
        (
            &[v6],
            ipv6("fd00::1", 58, &advert("fd00::2")),
            false,
            "advertising another's",
        ),
        (
            &[v6],
            ipv6("fd00::9", 58, &icmp),
            false,
            "another's IPv6 address",
        ),
        (
            &[v6],
            ipv6("fd00::1", 0, &behind(0, &advert("fd00::2"))),
            false,
            "advertising another's behind a hop-by-hop header",
        ),
        (
            &[v6],
            ipv6("fd00::1", 60, &behind(60, &advert("fd00::1"))),
            true,
            "advertising its own behind destination options",
        ),
        (
            &[v6],
            ipv6("::", 58, &[128, 0, 0, 0, 0, 0, 0, 0]),
            false,
            "a ping from ::",
        ),
        (
            &[v6],
            ipv6("::", 0, &behind(0, &[143, 0, 0, 0, 0, 0, 0, 0])),
            true,
            "an MLD report from ::",
        ),
        (
            &[v6],
            ipv6("::", 58, &[133, 0, 0, 0, 0, 0, 0, 0]),
            true,
            "a router solicitation from ::",
        ),
    ];
    let mut passed = 0;
    for (types, l3, passes, what) in cases {
        n.send(1, &tagged(MAC[1], types, &l3));
        n.run();
        passed += usize::from(passes);
        assert_eq!(n.tap[0].len(), passed, "{what}: {:?}", n.drops);
    }
    let d = &n.nodes[0].peers().next().unwrap().2.drops;
    assert_eq!(d.not_allowed, 8, "{:?}", n.drops);
}

#[test]
fn a_tun_end_against_a_tap_end_is_named_not_crashed() {
    // Spoke 1 is in tun mode; the hub and spoke 2 in tap mode.
    let mut n = Net::new(
        &["10.0.0.0/24"],
        [Layer::Ethernet, Layer::Ip, Layer::Ethernet],
    );
    let k0 = n.keys[0];
    n.nodes[1].update_peer(&k0, |c| c.allowed_ips = vec!["0.0.0.0/0".parse().unwrap()]);
    let mut ip = vec![0u8; 60];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&60u16.to_be_bytes());
    ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
    let c = tapir_wire::checksum::checksum(&ip[..20]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    n.send(1, &ip);
    n.run();
    let d = &n.nodes[0].peers().next().unwrap().2.drops;
    assert_eq!(d.wrong_layer, 1, "{:?}", n.drops);
    // And the other way: the hub floods an Ethernet frame to the tun spoke.
    n.send(0, &frame(BCAST, MAC[0], 60));
    n.run();
    let d = &n.nodes[1].peers().next().unwrap().2.drops;
    assert_eq!(d.wrong_layer, 1, "{:?}", n.drops);
    assert!(n.tap[1].is_empty());
}

#[test]
fn frames_whose_mac_reads_like_an_ip_length_are_frames() {
    // A destination MAC whose first byte reads as IPv4 (0x46: version 4,
    // header 24 bytes) and whose next two as a total length of 0x05d3
    // (1491): a frame of 1504 bytes (a multiple of 16, within 16 of it)
    // was once taken for a tun peer's padded IP packet and dropped, each
    // time. The same with 0x66 (IPv6) and a payload length of 0x05ab
    // (1451, 1491 with the header). Frames with a usual EtherType, with
    // bytes after that length, and with an IPv4 header that does not sum.
    let mut n = Net::new(&[], [Layer::Ethernet; 3]);
    n.warm_up();
    let mut delivered = 0;
    for (dst, ethertype, fill) in [
        ([0x46, 0x00, 0x05, 0xd3, 0x00, 0x01], [0x08, 0x00], 0x5a),
        ([0x46, 0x00, 0x05, 0xd3, 0x00, 0x02], [0x88, 0xb5], 0x5a),
        ([0x46, 0x00, 0x05, 0xd3, 0x00, 0x03], [0x88, 0xb5], 0),
        ([0x66, 0x00, 0x00, 0x00, 0x05, 0xab], [0x86, 0xdd], 0),
        ([0x66, 0x00, 0x00, 0x00, 0x05, 0xac], [0x88, 0xb5], 0x5a),
    ] {
        let mut f = frame(dst, MAC[1], 1504);
        f[12..14].copy_from_slice(&ethertype);
        f[14..].fill(fill);
        n.send(1, &f);
        n.run();
        delivered += 1;
        assert_eq!(n.tap[0].len(), delivered, "to {dst:02x?}: {:?}", n.drops);
    }
    let d = &n.nodes[0].peers().next().unwrap().2.drops;
    assert_eq!(d.wrong_layer, 0);
}

#[test]
fn a_rate_limit_passes_the_burst_queues_a_little_and_drops_the_rest() {
    let mut n = Net::new(&[], [Layer::Ethernet; 3]);
    n.warm_up();
    let k0 = n.keys[0];
    // 8 kbit/s (1000 bytes a second): the burst is the 64 KiB minimum, the
    // queue the 16 KiB minimum.
    n.nodes[1].update_peer(&k0, |c| c.rate = Some(8_000));
    let (mut sent, mut queued) = (0, 0);
    for _ in 0..100 {
        match n.seal_to(1, 0, &frame(MAC[0], MAC[1], 1400)) {
            Encapsulated::Send { .. } => sent += 1,
            Encapsulated::Queued => queued += 1,
            _ => {}
        }
    }
    assert_eq!(sent, crate::bucket::MIN_BURST as usize / 1400);
    assert_eq!(queued, crate::bucket::MIN_QUEUE / 1402);
    let d = &n.nodes[1].peers().next().unwrap().2.drops;
    assert_eq!(d.rate_tx, 100 - sent as u64 - queued as u64);
    // The queue drains at the rate: 1400 bytes take 1.4 s.
    n.run();
    n.tap[0].clear();
    let t0 = n.now;
    let release = n.nodes[1].next_release(t0).unwrap();
    assert!(release > t0 && release <= t0 + Duration::from_millis(1400));
    n.now = release;
    n.collect();
    n.run();
    assert_eq!(n.tap[0].len(), 1, "one queued frame released");
    n.now += Duration::from_secs(14);
    n.collect();
    n.run();
    assert_eq!(n.tap[0].len(), queued, "all of them after their time");
}

#[test]
fn arriving_traffic_over_the_rate_waits_and_comes_out_in_order() {
    let mut n = Net::new(&[], [Layer::Ethernet; 3]);
    n.warm_up();
    let k1 = n.keys[1];
    n.nodes[0].update_peer(&k1, |c| c.rate = Some(8_000));
    for i in 0..70u8 {
        let mut f = frame(MAC[0], MAC[1], 1400);
        f[20] = i;
        n.seal_to(1, 0, &f);
    }
    n.run();
    let direct = n.tap[0].len();
    assert_eq!(direct, crate::bucket::MIN_BURST as usize / 1400);
    let mut buf = vec![0u8; 4096];
    n.now += Duration::from_secs(30);
    let mut released = Vec::new();
    while let Some(d) = n.nodes[0].poll_received(n.now, &mut buf) {
        if let Decapsulated::Packet(r) | Decapsulated::Flood { range: r, .. } = d {
            released.push(buf[r][20]);
        }
    }
    let held = crate::bucket::MIN_QUEUE / 1402;
    assert_eq!(released.len(), held, "a queue of 16 KiB holds 11");
    assert!(released.windows(2).all(|w| w[0] < w[1]), "{released:?}");
    let dropped = (70 - direct - held) as u64;
    assert_eq!(n.nodes[0].peers().next().unwrap().2.drops.rate_rx, dropped);
}

/// An IPv4 frame from MAC `src` to MAC `dst`, addresses `from` to `to`.
fn ipv4_frame(dst: Mac, src: Mac, from: [u8; 4], to: [u8; 4]) -> Vec<u8> {
    let mut l3 = ipv4(from, 17, &[0, 9, 0, 9, 0, 8, 0, 0]);
    l3[16..20].copy_from_slice(&to);
    let mut f = tagged(src, &[0x0800], &l3);
    f[0..6].copy_from_slice(&dst);
    f
}

#[test]
fn a_spoke_that_takes_anothers_mac_gets_none_of_its_traffic() {
    // Spoke 1 may use 10.0.0.1 alone; spoke 2 is 10.0.0.2 (unrestricted).
    let mut n = Net::new(&["10.0.0.1/32"], [Layer::Ethernet; 3]);
    n.warm_up();
    // Spoke 1 sends as spoke 2's MAC (from its own address): the hub's
    // switch moves that MAC to spoke 1.
    n.send(
        1,
        &ipv4_frame(MAC[0], MAC[2], [10, 0, 0, 1], [10, 0, 0, 100]),
    );
    n.run();
    assert_eq!(n.tap[0].len(), 1, "{:?}", n.drops);
    // The hub writes to spoke 2's MAC and address: not to spoke 1, which
    // took the MAC, but flooded, so that spoke 2 still gets it (one frame
    // from a thief no longer cuts the station off).
    let to_victim = ipv4_frame(MAC[2], MAC[0], [10, 0, 0, 100], [10, 0, 0, 2]);
    assert_eq!(n.send(0, &to_victim), Encapsulated::Flood);
    n.run();
    assert!(n.tap[1].is_empty(), "spoke 1 got spoke 2's traffic");
    assert_eq!(n.tap[2], vec![to_victim], "spoke 2 still gets its own");
    let (_, _, s) = n.nodes[0].peers().next().unwrap();
    assert_eq!(s.drops.not_theirs, 1);
    // What is for spoke 1's own address still reaches it, whatever MAC.
    n.send(
        0,
        &ipv4_frame(MAC[2], MAC[0], [10, 0, 0, 100], [10, 0, 0, 1]),
    );
    n.run();
    assert_eq!(n.tap[1].len(), 1);
    // A broadcast frame is not held to a destination.
    n.send(
        0,
        &tagged(MAC[0], &[0x0800], &ipv4([10, 0, 0, 100], 17, &[0; 8])),
    );
    n.run();
    assert_eq!(n.tap[1].len(), 2);
    // Flooded to a MAC nobody learned: not to spoke 1, and not counted
    // against it (a flood passes it by).
    let unknown = [2, 0, 0, 0, 0, 0xee];
    n.send(
        0,
        &ipv4_frame(unknown, MAC[0], [10, 0, 0, 100], [10, 0, 0, 2]),
    );
    n.run();
    assert_eq!(n.tap[1].len(), 2);
    let (_, _, s) = n.nodes[0].peers().next().unwrap();
    assert_eq!(s.drops.not_theirs, 1);
}

#[test]
fn peers_that_share_a_prefix_from_the_start_keep_it_in_tap_mode() {
    let cfg = |seed: u8, ips: &[&str]| PeerConfig {
        public: key(seed).public_key(),
        psk: None,
        endpoint: None,
        allowed_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
        keepalive: None,
        rate: None,
    };
    let t = Tunnel::with_layer(
        key(1),
        vec![
            cfg(2, &["10.0.0.2/32", "fe80::/10"]),
            cfg(3, &["10.0.0.3/32", "fe80::/10"]),
        ],
        Layer::Ethernet,
        Duration::from_secs(300),
        4,
    );
    let lists: Vec<usize> = t.peers().map(|(c, _, _)| c.allowed_ips.len()).collect();
    assert_eq!(lists, vec![2, 2], "fe80::/10 kept by both");
}

/// A station of the hub's own side, quiet for 20 s: a spoke held to its
/// allowed IPs may not take its MAC (it would take the station's traffic
/// from the hub's host and LAN into the tunnel), a spoke without may (the
/// station moved there). And a unicast ARP to a taken MAC follows the
/// station's address, not the MAC.
#[test]
fn only_a_trusted_spoke_takes_a_quiet_station_of_the_hub() {
    let mut n = Net::new(&["10.0.0.1/32"], [Layer::Ethernet; 3]);
    n.warm_up();
    let station: Mac = [2, 0, 0, 0, 0, 0x5a];
    n.send(0, &frame(BCAST, station, 60));
    n.run();
    n.now += Duration::from_secs(20);
    // Spoke 1 (10.0.0.1 only) sends from the station's MAC: refused.
    n.send(
        1,
        &ipv4_frame(MAC[0], station, [10, 0, 0, 1], [10, 0, 0, 100]),
    );
    n.run();
    let local_mac = |n: &Net| n.nodes[0].peers().next().unwrap().2.drops.local_mac;
    assert_eq!(local_mac(&n), 1);
    // Spoke 2 (no allowed IPs): the station moved there.
    let before = n.tap[0].len();
    n.send(2, &frame(MAC[0], station, 60));
    n.run();
    assert_eq!(n.tap[0].len(), before + 1, "{:?}", n.drops);
    // Spoke 1 takes spoke 2's MAC with a frame of its own; a unicast ARP
    // to that MAC for spoke 2's address is flooded, not sent to spoke 1.
    n.send(
        1,
        &ipv4_frame(MAC[0], MAC[2], [10, 0, 0, 1], [10, 0, 0, 100]),
    );
    n.run();
    let got = n.tap[1].len();
    let mut arp = arp(MAC[0], [10, 0, 0, 100]);
    arp[0..6].copy_from_slice(&MAC[2]);
    arp[38..42].copy_from_slice(&[10, 0, 0, 2]);
    assert_eq!(n.send(0, &arp), Encapsulated::Flood);
    n.run();
    assert_eq!(
        n.tap[1].len(),
        got,
        "spoke 1 got an ARP for spoke 2's address"
    );
}
