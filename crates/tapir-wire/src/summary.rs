//! One line per packet, in the manner of tcpdump, decoded by etherparse.
//!
//! Unknown ethertypes and IP protocols are shown by number, malformed packets
//! say what is wrong; nothing here panics on any input (see the fuzz target).

use std::fmt::Write as _;

use etherparse::{
    EtherType, Icmpv4Type, Icmpv6Type, IpNumber, NetSlice, SlicedPacket, TransportSlice,
};

/// What the bytes start with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// An IPv4 or IPv6 packet (tun devices, `LINKTYPE_RAW`).
    Ip,
    /// An Ethernet frame (tap devices).
    Ethernet,
}

/// The target address of a neighbour solicitation or advertisement, from
/// the ICMPv6 payload as etherparse gives it: after the 8-byte header (type,
/// code, checksum and the 4 bytes of reserved bits or flags), its first 16
/// bytes.
fn nd_target(payload: &[u8]) -> Option<std::net::Ipv6Addr> {
    <[u8; 16]>::try_from(payload.get(..16)?)
        .ok()
        .map(std::net::Ipv6Addr::from)
}

/// A MAC address as `02:00:5e:10:00:01`.
pub fn mac(m: &[u8]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Summarizes one packet: `IP 10.0.0.1 > 10.0.0.2: ICMP echo request, id 7, seq 1, length 64`.
pub fn summarize(link: Link, data: &[u8]) -> String {
    let parsed = match link {
        Link::Ip => {
            if data.is_empty() {
                return "empty packet".into();
            }
            SlicedPacket::from_ip(data)
        }
        Link::Ethernet => SlicedPacket::from_ethernet(data),
    };
    let mut out = String::new();
    if let Link::Ethernet = link {
        let Some(eth) = data.get(..14) else {
            return format!("truncated Ethernet frame, length {}", data.len());
        };
        let _ = write!(out, "{} > {}, ", mac(&eth[6..12]), mac(&eth[0..6]));
    }
    let packet = match parsed {
        Ok(p) => p,
        Err(e) => {
            let _ = write!(
                out,
                "malformed ({}), length {}",
                short_error(&e.to_string()),
                data.len()
            );
            return out;
        }
    };
    // VLAN tags, outer first, as tcpdump shows them.
    for ext in &packet.link_exts {
        if let etherparse::LinkExtSlice::Vlan(v) = ext {
            let _ = write!(
                out,
                "vlan {}, p {}, ",
                v.vlan_identifier(),
                v.priority_code_point().value()
            );
        }
    }
    match &packet.net {
        None => {
            // The type after the tags (the frame's own if it has none).
            let at = 12 + 4 * packet.link_exts.len();
            let ether_type = data
                .get(at..at + 2)
                .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
            let _ = if ether_type < 0x0600 {
                // A length, not a type: an 802.3 frame (LLC: STP, and such).
                write!(out, "802.3 LLC, length {}", data.len())
            } else {
                match ether_type_name(EtherType(ether_type)) {
                    Some(name) => write!(out, "{name}, length {}", data.len()),
                    None => write!(out, "ethertype {ether_type:#06x}, length {}", data.len()),
                }
            };
        }
        Some(NetSlice::Arp(arp)) => match arp.to_packet().try_eth_ipv4() {
            Ok(a) => {
                let s = std::net::Ipv4Addr::from(a.sender_ipv4);
                let t = std::net::Ipv4Addr::from(a.target_ipv4);
                match a.operation.0 {
                    1 => {
                        let _ = write!(
                            out,
                            "ARP, Request who-has {t} tell {s}, length {}",
                            data.len()
                        );
                    }
                    2 => {
                        let _ = write!(
                            out,
                            "ARP, Reply {s} is-at {}, length {}",
                            mac(&a.sender_mac),
                            data.len()
                        );
                    }
                    op => {
                        let _ = write!(out, "ARP, operation {op}, length {}", data.len());
                    }
                }
            }
            Err(_) => {
                let _ = write!(out, "ARP (not Ethernet/IPv4), length {}", data.len());
            }
        },
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header();
            let (s, d) = (h.source_addr(), h.destination_addr());
            let _ = match ports(&packet) {
                Some((sp, dp)) => write!(out, "IP {s}.{sp} > {d}.{dp}: "),
                None => write!(out, "IP {s} > {d}: "),
            };
            let fragment = ip.payload().fragmented.then(|| {
                format!(
                    "id {}, offset {}{}",
                    h.identification(),
                    h.fragments_offset().byte_offset(),
                    if h.more_fragments() { ", more" } else { "" }
                )
            });
            transport(
                &mut out,
                &packet,
                ip.payload().ip_number,
                fragment,
                ip.payload().payload.len(),
            );
            let _ = write!(out, " (ttl {}, length {})", h.ttl(), h.total_len());
        }
        Some(NetSlice::Ipv6(ip)) => {
            let h = ip.header();
            let (s, d) = (h.source_addr(), h.destination_addr());
            let _ = match ports(&packet) {
                Some((sp, dp)) => write!(out, "IP6 {s}.{sp} > {d}.{dp}: "),
                None => write!(out, "IP6 {s} > {d}: "),
            };
            // Where a fragment goes, from its fragment header, as for IPv4.
            let fragment = ip.payload().fragmented.then(|| {
                ip.extensions()
                    .clone()
                    .into_iter()
                    .find_map(|e| match e {
                        etherparse::Ipv6ExtensionSlice::Fragment(f) => Some(format!(
                            "id {}, offset {}{}",
                            f.identification(),
                            f.fragment_offset().byte_offset(),
                            if f.more_fragments() { ", more" } else { "" }
                        )),
                        _ => None,
                    })
                    .unwrap_or_default()
            });
            transport(
                &mut out,
                &packet,
                ip.payload().ip_number,
                fragment,
                ip.payload().payload.len(),
            );
            let _ = write!(
                out,
                " (hlim {}, payload length {})",
                h.hop_limit(),
                h.payload_length()
            );
        }
    }
    out
}

/// The name of an ethertype no decoder here takes, where it has one.
fn ether_type_name(t: EtherType) -> Option<&'static str> {
    Some(match t.0 {
        0x8035 => "RARP",
        0x8100 => "802.1Q",
        0x88a8 => "802.1ad",
        0x8847 => "MPLS unicast",
        0x8848 => "MPLS multicast",
        0x8863 => "PPPoE discovery",
        0x8864 => "PPPoE session",
        0x888e => "EAPOL",
        0x88cc => "LLDP",
        0x88e5 => "MACsec",
        0x88f7 => "PTP",
        0x8906 => "FCoE",
        0x9000 => "Loopback",
        _ => return None,
    })
}

/// A parser's error in a few words: its first clause (etherparse's say
/// what was needed at length).
fn short_error(e: &str) -> String {
    let first = e.split([':', '(']).next().unwrap_or(e).trim();
    first.chars().take(60).collect()
}

/// A TCP segment's or UDP datagram's ports, which tcpdump writes after
/// the addresses (`10.0.0.1.48880 > 10.0.0.2.80`).
fn ports(packet: &SlicedPacket<'_>) -> Option<(u16, u16)> {
    match &packet.transport {
        Some(TransportSlice::Tcp(t)) => Some((t.source_port(), t.destination_port())),
        Some(TransportSlice::Udp(u)) => Some((u.source_port(), u.destination_port())),
        _ => None,
    }
}

/// An ICMP (v4) message other than echo, as tcpdump names them.
fn icmp4_words(kind: u8, code: u8, rest: [u8; 4]) -> String {
    let mtu = u16::from_be_bytes([rest[2], rest[3]]);
    match (kind, code) {
        (3, 0) => "net unreachable".into(),
        (3, 1) => "host unreachable".into(),
        (3, 2) => "protocol unreachable".into(),
        (3, 3) => "port unreachable".into(),
        (3, 4) => format!("unreachable - need to frag (mtu {mtu})"),
        (3, 5) => "unreachable - source route failed".into(),
        (3, 6 | 7) => "unreachable - unknown net or host".into(),
        (3, 9 | 10) => "unreachable - admin prohibited".into(),
        (3, 13) => "unreachable - admin prohibited filter".into(),
        (3, c) => format!("unreachable, code {c}"),
        (4, _) => "source quench".into(),
        (5, c) => format!("redirect, code {c}"),
        (11, 0) => "time exceeded in-transit".into(),
        (11, 1) => "ip reassembly time exceeded".into(),
        (12, _) => "parameter problem".into(),
        (13, _) => "time stamp request".into(),
        (14, _) => "time stamp reply".into(),
        (t, c) => format!("type {t} code {c}"),
    }
}

/// An ICMPv6 message other than echo and neighbour discovery, by name.
fn icmp6_words(kind: u8, code: u8, rest: [u8; 4]) -> String {
    match (kind, code) {
        (1, 0) => "destination unreachable, no route".into(),
        (1, 1) => "destination unreachable, administratively prohibited".into(),
        (1, 3) => "destination unreachable, unreachable address".into(),
        (1, 4) => "destination unreachable, unreachable port".into(),
        (1, c) => format!("destination unreachable, code {c}"),
        (2, _) => format!("packet too big, mtu {}", u32::from_be_bytes(rest)),
        (3, 0) => "time exceeded in-transit".into(),
        (3, 1) => "ip reassembly time exceeded".into(),
        (4, c) => format!("parameter problem, code {c}"),
        (130, _) => "multicast listener query".into(),
        (131, _) => "multicast listener report".into(),
        (132, _) => "multicast listener done".into(),
        (137, _) => "redirect".into(),
        (143, _) => "multicast listener report v2".into(),
        (t, c) => format!("type {t} code {c}"),
    }
}

fn transport(
    out: &mut String,
    packet: &SlicedPacket<'_>,
    proto: IpNumber,
    fragment: Option<String>,
    len: usize,
) {
    // A fragment: the protocol and where it goes (IPv4), not decoded (tcpdump
    // decodes a first fragment's header; its length would be the whole's).
    if let Some(at) = fragment {
        let name = match proto.0 {
            1 => "ICMP",
            58 => "ICMP6",
            _ => proto.keyword_str().unwrap_or("unknown"),
        };
        let at = if at.is_empty() {
            String::new()
        } else {
            format!(" ({at})")
        };
        let _ = write!(out, "fragment of {name}{at}, length {len}");
        return;
    }
    match &packet.transport {
        Some(TransportSlice::Icmpv4(icmp)) => {
            let _ = match icmp.icmp_type() {
                Icmpv4Type::EchoRequest(e) => {
                    write!(out, "ICMP echo request, id {}, seq {}", e.id, e.seq)
                }
                Icmpv4Type::EchoReply(e) => {
                    write!(out, "ICMP echo reply, id {}, seq {}", e.id, e.seq)
                }
                _ => {
                    let rest = icmp.bytes5to8();
                    write!(
                        out,
                        "ICMP {}",
                        icmp4_words(icmp.type_u8(), icmp.code_u8(), rest)
                    )
                }
            };
            let _ = write!(out, ", length {len}");
        }
        Some(TransportSlice::Icmpv6(icmp)) => {
            let _ = match icmp.icmp_type() {
                Icmpv6Type::EchoRequest(e) => {
                    write!(out, "ICMP6, echo request, id {}, seq {}", e.id, e.seq)
                }
                Icmpv6Type::EchoReply(e) => {
                    write!(out, "ICMP6, echo reply, id {}, seq {}", e.id, e.seq)
                }
                Icmpv6Type::NeighborSolicitation => match nd_target(icmp.payload()) {
                    Some(t) => write!(out, "ICMP6, neighbor solicitation, who has {t}"),
                    None => write!(out, "ICMP6, neighbor solicitation (truncated)"),
                },
                Icmpv6Type::NeighborAdvertisement(_) => match nd_target(icmp.payload()) {
                    Some(t) => write!(out, "ICMP6, neighbor advertisement, tgt is {t}"),
                    None => write!(out, "ICMP6, neighbor advertisement (truncated)"),
                },
                Icmpv6Type::RouterSolicitation => write!(out, "ICMP6, router solicitation"),
                Icmpv6Type::RouterAdvertisement(_) => write!(out, "ICMP6, router advertisement"),
                _ => {
                    let rest = icmp.bytes5to8();
                    write!(
                        out,
                        "ICMP6, {}",
                        icmp6_words(icmp.type_u8(), icmp.code_u8(), rest)
                    )
                }
            };
            let _ = write!(out, ", length {len}");
        }
        // (Their ports follow the addresses, as tcpdump writes them.)
        Some(TransportSlice::Udp(udp)) => {
            let _ = write!(out, "UDP, length {}", udp.payload().len());
        }
        Some(TransportSlice::Tcp(tcp)) => {
            let mut flags = String::new();
            for (on, c) in [
                (tcp.syn(), 'S'),
                (tcp.fin(), 'F'),
                (tcp.rst(), 'R'),
                (tcp.psh(), 'P'),
                (tcp.urg(), 'U'),
                (tcp.ece(), 'E'),
                (tcp.cwr(), 'W'),
            ] {
                if on {
                    flags.push(c);
                }
            }
            if tcp.ack() {
                flags.push('.');
            }
            let _ = write!(out, "Flags [{flags}], seq {}", tcp.sequence_number());
            if tcp.ack() {
                let _ = write!(out, ", ack {}", tcp.acknowledgment_number());
            }
            let _ = write!(
                out,
                ", win {}, length {}",
                tcp.window_size(),
                tcp.payload().len()
            );
        }
        Some(TransportSlice::Igmp(_)) => {
            let _ = write!(out, "IGMP, length {len}");
        }
        None => {
            let name = proto.keyword_str().unwrap_or("unknown");
            let _ = write!(out, "ip-proto-{} ({name}), length {len}", proto.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_and_short_input_never_panic() {
        for len in 0..64 {
            let data: Vec<u8> = (0..len as u8)
                .map(|i| i.wrapping_mul(91).wrapping_add(0x45))
                .collect();
            summarize(Link::Ip, &data);
            summarize(Link::Ethernet, &data);
        }
        assert_eq!(summarize(Link::Ip, &[]), "empty packet");
        assert!(summarize(Link::Ethernet, &[0; 5]).starts_with("truncated Ethernet"));
        assert!(summarize(Link::Ip, &[0x45, 0, 0]).starts_with("malformed"));
    }

    /// An IPv6 packet from `src` to `dst` carrying `icmp`.
    fn ipv6(src: [u8; 16], dst: [u8; 16], icmp: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
        p.extend_from_slice(&[58, 255]);
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(icmp);
        p
    }

    #[test]
    fn tcp_and_udp_ports_follow_the_addresses_as_tcpdump_writes_them() {
        let mut tcp = Vec::new();
        etherparse::PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(48880, 80, 1000, 64240)
            .syn()
            .write(&mut tcp, &[])
            .unwrap();
        assert_eq!(
            summarize(Link::Ip, &tcp),
            "IP 10.0.0.1.48880 > 10.0.0.2.80: Flags [S], seq 1000, win 64240, length 0 (ttl 64, length 40)"
        );
        let mut udp = Vec::new();
        let (a, b): (std::net::Ipv6Addr, std::net::Ipv6Addr) =
            ("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap());
        etherparse::PacketBuilder::ipv6(a.octets(), b.octets(), 64)
            .udp(5353, 53)
            .write(&mut udp, &[0; 32])
            .unwrap();
        assert_eq!(
            summarize(Link::Ip, &udp),
            "IP6 fd00::1.5353 > fd00::2.53: UDP, length 32 (hlim 64, payload length 40)"
        );
    }

    #[test]
    fn neighbour_discovery_names_its_target_as_tcpdump_does() {
        let target: std::net::Ipv6Addr = "fe80::146d:d4ff:fe0b:3bb7".parse().unwrap();
        // Solicitation: type 135, reserved, target, a source link-layer
        // address option (whose bytes were once read into the target).
        let mut ns = vec![135, 0, 0, 0, 0, 0, 0, 0];
        ns.extend_from_slice(&target.octets());
        ns.extend_from_slice(&[1, 1, 0x16, 0x6d, 0xd4, 0x0b, 0x3b, 0xb7]);
        let dst: std::net::Ipv6Addr = "ff02::1:ff0b:3bb7".parse().unwrap();
        let line = summarize(Link::Ip, &ipv6([0; 16], dst.octets(), &ns));
        assert!(
            line.contains("neighbor solicitation, who has fe80::146d:d4ff:fe0b:3bb7,"),
            "{line}"
        );
        // Advertisement: type 136, flags (solicited, override), target.
        let mut na = vec![136, 0, 0, 0, 0x60, 0, 0, 0];
        na.extend_from_slice(&target.octets());
        let line = summarize(Link::Ip, &ipv6(target.octets(), [0xff; 16], &na));
        assert!(
            line.contains("neighbor advertisement, tgt is fe80::146d:d4ff:fe0b:3bb7,"),
            "{line}"
        );
    }

    #[test]
    fn a_fragment_says_of_what_and_where() {
        // IPv4, id 0x1234, more fragments, offset 0; then offset 1480, last.
        let mut first = vec![
            0x45, 0, 0, 48, 0x12, 0x34, 0x20, 0, 64, 1, 0, 0, 10, 3, 0, 1, 10, 3, 0, 5,
        ];
        first.extend_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]);
        first.extend_from_slice(&[0; 20]);
        let line = summarize(Link::Ip, &first);
        assert!(
            line.starts_with(
                "IP 10.3.0.1 > 10.3.0.5: fragment of ICMP (id 4660, offset 0, more), length 28"
            ),
            "{line}"
        );
        let mut last = first.clone();
        last[6..8].copy_from_slice(&(1480u16 / 8).to_be_bytes());
        let line = summarize(Link::Ip, &last);
        assert!(
            line.contains("fragment of ICMP (id 4660, offset 1480), length 28"),
            "{line}"
        );
        // IPv6: a fragment header (next header 58, offset 1448, more, id 7).
        let mut frag = vec![58, 0];
        frag.extend_from_slice(&((1448u16 / 8) << 3 | 1).to_be_bytes());
        frag.extend_from_slice(&7u32.to_be_bytes());
        frag.extend_from_slice(&[0; 16]);
        let mut p = ipv6([0; 16], [1; 16], &frag);
        p[6] = 44;
        let line = summarize(Link::Ip, &p);
        assert!(
            line.contains("fragment of ICMP6 (id 7, offset 1448, more)"),
            "{line}"
        );
    }

    /// What tcpdump names, named (it printed Rust's debug text, or the
    /// number twice); VLAN tags shown; 802.3 lengths not taken for types.
    #[test]
    fn icmp_errors_vlans_and_other_frames_in_words() {
        let mut icmp = vec![
            0x45, 0, 0, 36, 0, 0, 0, 0, 64, 1, 0, 0, 10, 3, 0, 1, 10, 3, 0, 5,
        ];
        icmp.extend_from_slice(&[3, 4, 0, 0, 0, 0, 0x05, 0x78]);
        icmp.extend_from_slice(&[0; 8]);
        let line = summarize(Link::Ip, &icmp);
        assert!(
            line.contains("ICMP unreachable - need to frag (mtu 1400)"),
            "{line}"
        );
        icmp[20..22].copy_from_slice(&[11, 0]);
        let line = summarize(Link::Ip, &icmp);
        assert!(line.contains("ICMP time exceeded in-transit"), "{line}");
        let too_big = [2, 0, 0, 0, 0, 0, 0x05, 0x00, 0, 0, 0, 0];
        let line = summarize(Link::Ip, &ipv6([0; 16], [1; 16], &too_big));
        assert!(line.contains("ICMP6, packet too big, mtu 1280"), "{line}");
        let eth = |rest: &[u8]| {
            let mut f = vec![0xff; 6];
            f.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
            f.extend_from_slice(rest);
            f
        };
        let mut tagged = eth(&[0x81, 0, 0x20, 5, 0x08, 0x06]);
        tagged.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 10, 1, 0, 1]);
        tagged.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 1, 0, 9]);
        let line = summarize(Link::Ethernet, &tagged);
        assert!(
            line.contains("vlan 5, p 1, ARP, Request who-has 10.1.0.9"),
            "{line}"
        );
        let line = summarize(Link::Ethernet, &eth(&[0x88, 0xcc, 0, 0]));
        assert!(line.ends_with("LLDP, length 16"), "{line}");
        let line = summarize(Link::Ethernet, &eth(&[0x00, 0x26, 0x42, 0x42, 3]));
        assert!(line.ends_with("802.3 LLC, length 17"), "{line}");
    }
}
