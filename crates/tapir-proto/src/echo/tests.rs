//! The responder against packets the Linux 6.18 kernel sent into a tun and a
//! tap device in a network namespace (read from the device and hex-dumped;
//! `ping -s 8`), and against every way they can be broken.

use super::*;

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// `ping -c1 -p 61 -s 8 10.0.0.2` from a tun with 10.0.0.1/24: id 0x38b8, seq 1.
const TUN_PING4: &str = "450000243ce440004001e9f20a0000010a00000208005e4638b800016100000000000000";
/// `ping -6 -c1 -s 8 fd00::2` from a tun with fd00::1/64: id 0x38b9, seq 1.
const TUN_PING6: &str = "6006fdef00103a40fd000000000000000000000000000001fd000000000000000000000000000002800040e638b900010001020304050607";
/// The router solicitation a tun sends when it comes up.
const TUN_RS: &str = "6000000000083afffe80000000000000b21244de4b9c5ae2ff0200000000000000000000000000028500dfc700000000";
/// A tap with 10.1.0.1/24 asking for 10.1.0.3 (MAC 62:6e:1d:43:aa:7a).
const TAP_ARP: &str =
    "ffffffffffff626e1d43aa7a08060001080006040001626e1d43aa7a0a0100010000000000000a010003";
/// A tap with fd01::1/64 soliciting fd01::3 (MAC ea:7a:c5:71:06:bf).
const TAP_NS: &str = "3333ff000003ea7ac57106bf86dd6000000000203afffd010000000000000000000000000001ff0200000000000000000001ff0000038700c8e800000000fd0100000000000000000000000000030101ea7ac57106bf";
/// `ping -c1 -s 8 10.1.0.2` once 10.1.0.2 resolved to 02:00:00:00:00:02.
const TAP_PING4: &str = "020000000002ea7ac57106bf080045000024bd2c4000400169a80a0100010a0100020800b2c0392e00010001020304050607";
/// `ping -6 -c1 -s 8 fd01::2` once fd01::2 resolved to 02:00:00:00:00:02.
const TAP_PING6: &str = "020000000002ea7ac57106bf86dd600b9b5900103a40fd010000000000000000000000000001fd0100000000000000000000000000028000406e392f00010001020304050607";
/// The MLD report a tap sends when it comes up (hop-by-hop router alert).
const TAP_MLD: &str = "333300000016626e1d43aa7a86dd6000000000380001fe80000000000000606e1dfffe43aa7aff0200000000000000000000000000163a000502000001008f009d040000000204000000ff0200000000000000000001ff43aa7a04000000ff0200000000000000000001ff000001";

const OUR_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];

fn tun() -> Responder {
    Responder::new(Config {
        link: Link::Ip,
        mac: [0; 6],
        subnets: vec![
            "10.0.0.1/24".parse().unwrap(),
            "fd00::1/64".parse().unwrap(),
        ],
        only: vec![],
    })
}

fn tap(subnets: &[&str]) -> Responder {
    Responder::new(Config {
        link: Link::Ethernet,
        mac: OUR_MAC,
        subnets: subnets.iter().map(|s| s.parse().unwrap()).collect(),
        only: vec![],
    })
}

fn run(r: &mut Responder, packet: &[u8]) -> (Outcome, Vec<u8>) {
    let mut buf = vec![0u8; 2048];
    buf[..packet.len()].copy_from_slice(packet);
    let out = r.handle(&mut buf, packet.len());
    let n = match out {
        Outcome::Reply(n) => n,
        Outcome::Ignored(_) => 0,
    };
    (out, buf[..n].to_vec())
}

fn icmp6_ok(ip: &[u8]) -> bool {
    let end = 40 + usize::from(be16(ip, 4));
    let src: [u8; 16] = ip[8..24].try_into().unwrap();
    let dst: [u8; 16] = ip[24..40].try_into().unwrap();
    let pseudo = checksum::ipv6_pseudo(&src, &dst, (end - 40) as u32, 58);
    checksum::finish(checksum::add(pseudo, &ip[40..end])) == 0
}

/// The IPv4 reply to `req`: everything the classic program promises.
fn check_v4_reply(req: &[u8], rep: &[u8]) {
    assert_eq!(rep.len(), req.len());
    let ihl = usize::from(req[0] & 0xf) * 4;
    assert_eq!(&rep[12..16], &req[16..20], "source is the old destination");
    assert_eq!(&rep[16..20], &req[12..16]);
    assert_eq!(rep[8], 64, "fresh TTL");
    assert_eq!(&rep[..8], &req[..8], "version, length, id, flags unchanged");
    assert_eq!(&rep[20..ihl], &req[20..ihl], "options kept");
    assert!(checksum::verify(&rep[..ihl]), "header checksum");
    assert_eq!(rep[ihl], 0, "echo reply");
    assert_eq!(rep[ihl + 1], 0);
    assert!(checksum::verify(&rep[ihl..]), "ICMP checksum");
    assert_eq!(
        &rep[ihl + 4..],
        &req[ihl + 4..],
        "id, seq and payload untouched"
    );
}

#[test]
fn tun_ipv4_echo() {
    let req = hex(TUN_PING4);
    let mut r = tun();
    let (out, rep) = run(&mut r, &req);
    assert_eq!(out, Outcome::Reply(req.len()));
    check_v4_reply(&req, &rep);
    assert_eq!(r.stats().echo_replies, 1);
    // Not to a subnet's broadcast or network address (the reply would come
    // from it, RFC 1122 §3.2.2.6), nor from 0.0.0.0 or a broadcast source.
    for (at, addr) in [
        (16, [10, 0, 0, 255]),
        (16, [10, 0, 0, 0]),
        (12, [0, 0, 0, 0]),
        (12, [10, 0, 0, 255]),
    ] {
        let mut p = req.clone();
        p[at..at + 4].copy_from_slice(&addr);
        fix_ipv4_header(&mut p);
        assert_eq!(
            run(&mut r, &p).0,
            Outcome::Ignored(Ignored::NotForUs),
            "{at} {addr:?}"
        );
    }
}

#[test]
fn tun_ipv6_echo() {
    let req = hex(TUN_PING6);
    let mut r = tun();
    let (out, rep) = run(&mut r, &req);
    assert_eq!(out, Outcome::Reply(req.len()));
    assert_eq!(&rep[8..24], &req[24..40]);
    assert_eq!(&rep[24..40], &req[8..24]);
    assert_eq!(rep[7], 64, "fresh hop limit");
    assert_eq!(&rep[..7], &req[..7]);
    assert_eq!(rep[40], 129);
    assert!(icmp6_ok(&rep));
    assert_eq!(&rep[44..], &req[44..], "id, seq and payload untouched");
}

#[test]
fn tap_ipv4_and_ipv6_echo_come_from_our_mac() {
    let mut r = tap(&["10.1.0.1/24", "fd01::1/64"]);
    for packet in [TAP_PING4, TAP_PING6] {
        let req = hex(packet);
        let (out, rep) = run(&mut r, &req);
        assert_eq!(out, Outcome::Reply(req.len()), "{packet}");
        assert_eq!(&rep[0..6], &req[6..12], "back to the sender");
        assert_eq!(&rep[6..12], &OUR_MAC);
        assert_eq!(&rep[12..14], &req[12..14]);
        if req[12] == 0x08 {
            check_v4_reply(&req[14..], &rep[14..]);
        } else {
            assert!(icmp6_ok(&rep[14..]));
            assert_eq!(rep[14 + 40], 129);
        }
    }
    assert_eq!(r.stats().echo_replies, 2);
}

#[test]
fn tap_answers_arp_for_served_addresses() {
    let req = hex(TAP_ARP);
    let mut r = tap(&["10.1.0.1/24"]);
    let (out, rep) = run(&mut r, &req);
    assert_eq!(out, Outcome::Reply(42));
    assert_eq!(&rep[0..6], &req[6..12]);
    assert_eq!(&rep[6..12], &OUR_MAC);
    assert_eq!(&rep[12..14], &[0x08, 0x06]);
    assert_eq!(&rep[14..20], &req[14..20], "htype, ptype, hlen, plen");
    assert_eq!(be16(&rep, 20), 2, "reply");
    assert_eq!(&rep[22..28], &OUR_MAC, "sender is us");
    assert_eq!(&rep[28..32], &[10, 1, 0, 3], "with the asked address");
    assert_eq!(&rep[32..38], &req[22..28], "target is the asker");
    assert_eq!(&rep[38..42], &[10, 1, 0, 1]);
    assert_eq!(r.stats().arp_replies, 1);

    // Not for the host's own address, nor outside the subnet, nor under --only.
    let mut own = req.clone();
    own[38..42].copy_from_slice(&[10, 1, 0, 1]);
    assert_eq!(run(&mut r, &own).0, Outcome::Ignored(Ignored::NotForUs));
    let mut outside = req.clone();
    outside[38..42].copy_from_slice(&[10, 2, 0, 3]);
    assert_eq!(run(&mut r, &outside).0, Outcome::Ignored(Ignored::NotForUs));
    let mut bcast = req.clone();
    bcast[38..42].copy_from_slice(&[10, 1, 0, 255]);
    assert_eq!(run(&mut r, &bcast).0, Outcome::Ignored(Ignored::NotForUs));
    let mut only = tap(&["10.1.0.1/24"]);
    only.config.only = vec!["10.1.0.9".parse().unwrap()];
    assert_eq!(run(&mut only, &req).0, Outcome::Ignored(Ignored::NotForUs));
    // `only` narrows, never widens: not the broadcast, nor outside the subnet.
    only.config.only = vec!["10.1.0.255".parse().unwrap(), "10.2.0.3".parse().unwrap()];
    assert_eq!(
        run(&mut only, &bcast).0,
        Outcome::Ignored(Ignored::NotForUs)
    );
    assert_eq!(
        run(&mut only, &outside).0,
        Outcome::Ignored(Ignored::NotForUs)
    );
    // A request sent to another station's MAC is theirs.
    let mut unicast = req.clone();
    unicast[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 0x77]);
    assert_eq!(run(&mut r, &unicast).0, Outcome::Ignored(Ignored::NotForUs));
}

#[test]
fn tap_answers_neighbour_solicitations() {
    let req = hex(TAP_NS);
    let mut r = tap(&["fd01::1/64"]);
    let (out, rep) = run(&mut r, &req);
    assert_eq!(out, Outcome::Reply(86));
    assert_eq!(&rep[0..6], &req[6..12]);
    assert_eq!(&rep[6..12], &OUR_MAC);
    let ip = &rep[14..];
    assert_eq!(ip[7], 255, "hop limit 255 (RFC 4861)");
    assert_eq!(
        &ip[8..24],
        &req[14 + 48..14 + 64],
        "from the target address"
    );
    assert_eq!(&ip[24..40], &req[14 + 8..14 + 24], "to the solicitor");
    assert_eq!(ip[40], 136);
    assert_eq!(ip[44], 0x60, "solicited, override");
    assert_eq!(&ip[48..64], &req[14 + 48..14 + 64]);
    assert_eq!(&ip[64..66], &[2, 1], "target link-layer option");
    assert_eq!(&ip[66..72], &OUR_MAC);
    assert!(icmp6_ok(ip));
    assert_eq!(r.stats().nd_replies, 1);

    // A DAD probe (from ::) is someone taking the address: not defended
    // (the host's address added while echo ran failed its DAD).
    let mut dad = req.clone();
    dad[14 + 8..14 + 24].fill(0);
    fix_icmp6(&mut dad[14..]);
    assert_eq!(run(&mut r, &dad).0, Outcome::Ignored(Ignored::NotForUs));
    // Nor a solicitation sent to all nodes rather than to the target's
    // solicited-node group or the target.
    let mut all = req.clone();
    all[14 + 24..14 + 40]
        .copy_from_slice(&"ff02::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
    fix_icmp6(&mut all[14..]);
    assert_eq!(run(&mut r, &all).0, Outcome::Ignored(Ignored::NotForUs));
    // An address the host takes while echo runs is no longer served.
    let target: std::net::Ipv6Addr = <[u8; 16]>::try_from(&req[14 + 48..14 + 64]).unwrap().into();
    r.set_subnets(vec![
        "fd01::1/64".parse().unwrap(),
        format!("{target}/64").parse().unwrap(),
    ]);
    assert_eq!(run(&mut r, &req).0, Outcome::Ignored(Ignored::NotForUs));

    // Hop limit other than 255: not a valid solicitation.
    let mut hops = req.clone();
    hops[14 + 7] = 64;
    assert_eq!(run(&mut r, &hops).0, Outcome::Ignored(Ignored::Malformed));
}

/// Recomputes the ICMPv6 checksum of an edited test packet.
fn fix_icmp6(ip: &mut [u8]) {
    let end = 40 + usize::from(be16(ip, 4));
    let src: [u8; 16] = ip[8..24].try_into().unwrap();
    let dst: [u8; 16] = ip[24..40].try_into().unwrap();
    let off = if ip[6] == 58 { 40 } else { 48 };
    ip[off + 2..off + 4].fill(0);
    let pseudo = checksum::ipv6_pseudo(&src, &dst, (end - off) as u32, 58);
    let c = checksum::finish(checksum::add(pseudo, &ip[off..end]));
    put16(ip, off + 2, c);
}

fn fix_ipv4_header(ip: &mut [u8]) {
    let ihl = usize::from(ip[0] & 0xf) * 4;
    ip[10..12].fill(0);
    let c = checksum::checksum(&ip[..ihl]);
    put16(ip, 10, c);
}

#[test]
fn other_traffic_is_counted_not_answered() {
    let mut r = tun();
    assert_eq!(
        run(&mut r, &hex(TUN_RS)).0,
        Outcome::Ignored(Ignored::NotEcho)
    );
    let mut t = tap(&["fd01::1/64"]);
    // Multicast frames other than neighbour solicitations are not for us.
    assert_eq!(
        run(&mut t, &hex(TAP_MLD)).0,
        Outcome::Ignored(Ignored::NotForUs)
    );
    // An echo reply is not a request.
    let mut reply = hex(TUN_PING4);
    reply[20] = 0;
    let c = checksum::update16(be16(&reply, 22), 0x0800, 0x0000);
    put16(&mut reply, 22, c);
    assert_eq!(run(&mut r, &reply).0, Outcome::Ignored(Ignored::NotEcho));
    // UDP.
    let mut udp = hex(TUN_PING4);
    udp[9] = 17;
    fix_ipv4_header(&mut udp);
    assert_eq!(run(&mut r, &udp).0, Outcome::Ignored(Ignored::NotEcho));
    // To the host's own address.
    let mut own = hex(TUN_PING4);
    own[16..20].copy_from_slice(&[10, 0, 0, 1]);
    fix_ipv4_header(&mut own);
    assert_eq!(run(&mut r, &own).0, Outcome::Ignored(Ignored::NotForUs));
    // To a broadcast or multicast address.
    for dst in [[255, 255, 255, 255], [224, 0, 0, 1]] {
        let mut b = hex(TUN_PING4);
        b[16..20].copy_from_slice(&dst);
        fix_ipv4_header(&mut b);
        assert_eq!(run(&mut r, &b).0, Outcome::Ignored(Ignored::NotForUs));
    }
    // A tap echo to another MAC.
    let mut other = hex(TAP_PING4);
    other[5] = 9;
    assert_eq!(run(&mut t, &other).0, Outcome::Ignored(Ignored::NotForUs));
    let s = r.stats();
    assert_eq!(s.received, 6);
    assert_eq!(s.not_for_us, 3);
    assert_eq!(s.not_echo, 3);
    assert_eq!(s.echo_replies, 0);
}

#[test]
fn every_truncation_is_ignored_without_panic() {
    let cases = [
        (tun(), TUN_PING4),
        (tun(), TUN_PING6),
        (tun(), TUN_RS),
        (tap(&["10.1.0.1/24", "fd01::1/64"]), TAP_ARP),
        (tap(&["10.1.0.1/24", "fd01::1/64"]), TAP_NS),
        (tap(&["10.1.0.1/24", "fd01::1/64"]), TAP_PING4),
        (tap(&["10.1.0.1/24", "fd01::1/64"]), TAP_PING6),
        (tap(&["10.1.0.1/24", "fd01::1/64"]), TAP_MLD),
    ];
    for (mut r, packet) in cases {
        let full = hex(packet);
        for cut in 0..full.len() {
            let (out, _) = run(&mut r, &full[..cut]);
            assert!(
                matches!(out, Outcome::Ignored(_)),
                "{packet} cut at {cut}: {out:?}"
            );
        }
    }
}

#[test]
fn bad_checksums_are_refused() {
    let mut r = tun();
    let mut payload = hex(TUN_PING4);
    payload[30] ^= 1;
    assert_eq!(
        run(&mut r, &payload).0,
        Outcome::Ignored(Ignored::BadChecksum)
    );
    let mut header = hex(TUN_PING4);
    header[8] = 1; // TTL changed, header checksum not
    assert_eq!(
        run(&mut r, &header).0,
        Outcome::Ignored(Ignored::BadChecksum)
    );
    let mut v6 = hex(TUN_PING6);
    v6[50] ^= 0x80;
    assert_eq!(run(&mut r, &v6).0, Outcome::Ignored(Ignored::BadChecksum));
    let mut ns = hex(TAP_NS);
    ns[70] ^= 1;
    assert_eq!(
        run(&mut tap(&["fd01::1/64"]), &ns).0,
        Outcome::Ignored(Ignored::BadChecksum)
    );
    assert_eq!(r.stats().bad_checksum, 3);
}

#[test]
fn bad_lengths_and_versions() {
    let mut r = tun();
    let mut long = hex(TUN_PING4);
    put16(&mut long, 2, 200); // total length beyond the packet
    fix_ipv4_header(&mut long);
    assert_eq!(run(&mut r, &long).0, Outcome::Ignored(Ignored::Malformed));
    let mut short_ihl = hex(TUN_PING4);
    short_ihl[0] = 0x44;
    assert_eq!(
        run(&mut r, &short_ihl).0,
        Outcome::Ignored(Ignored::Malformed)
    );
    let mut v5 = hex(TUN_PING4);
    v5[0] = 0x55;
    assert_eq!(run(&mut r, &v5).0, Outcome::Ignored(Ignored::Malformed));
    let mut v6_long = hex(TUN_PING6);
    put16(&mut v6_long, 4, 100);
    assert_eq!(
        run(&mut r, &v6_long).0,
        Outcome::Ignored(Ignored::Malformed)
    );
    // Ethernet padding after the IP packet is fine: the reply is the packet's length.
    let mut padded = hex(TAP_PING4);
    let real = padded.len();
    padded.extend_from_slice(&[0; 20]);
    let mut t = tap(&["10.1.0.1/24"]);
    assert_eq!(run(&mut t, &padded).0, Outcome::Reply(real));
}

#[test]
fn ipv4_options_are_kept_and_fragments_ignored() {
    // The request with 4 bytes of options (NOP NOP NOP EOL) after the header.
    let base = hex(TUN_PING4);
    let mut req = base[..20].to_vec();
    req.extend_from_slice(&[1, 1, 1, 0]);
    req.extend_from_slice(&base[20..]);
    req[0] = 0x46;
    let n = req.len() as u16;
    put16(&mut req, 2, n);
    fix_ipv4_header(&mut req);
    let mut r = tun();
    let (out, rep) = run(&mut r, &req);
    assert_eq!(out, Outcome::Reply(req.len()));
    check_v4_reply(&req, &rep);

    for frag in [0x2000u16, 0x0001, 0x2010] {
        let mut f = hex(TUN_PING4);
        put16(&mut f, 6, frag);
        fix_ipv4_header(&mut f);
        assert_eq!(
            run(&mut r, &f).0,
            Outcome::Ignored(Ignored::Fragment),
            "{frag:#x}"
        );
    }
    // "Don't fragment" alone is not a fragment.
    let mut df = hex(TUN_PING4);
    put16(&mut df, 6, 0x4000);
    fix_ipv4_header(&mut df);
    assert!(matches!(run(&mut r, &df).0, Outcome::Reply(_)));
}

#[test]
fn ipv6_extension_headers() {
    let base = hex(TUN_PING6);
    let with_ext = |kind: u8, body: [u8; 8]| {
        let mut p = base[..40].to_vec();
        p[6] = kind;
        p.extend_from_slice(&body);
        p.extend_from_slice(&base[40..]);
        let n = (p.len() - 40) as u16;
        put16(&mut p, 4, n);
        p
    };
    // Hop-by-hop with PadN: answered, the reply without the extension.
    let req = with_ext(0, [58, 0, 1, 4, 0, 0, 0, 0]);
    let mut r = tun();
    let (out, rep) = run(&mut r, &req);
    assert_eq!(out, Outcome::Reply(base.len()));
    assert_eq!(rep[6], 58);
    assert_eq!(be16(&rep, 4) as usize, base.len() - 40);
    assert!(icmp6_ok(&rep));
    assert_eq!(&rep[44..], &base[44..]);
    // A fragment header: ignored.
    let frag = with_ext(44, [58, 0, 0, 1, 0, 0, 0, 7]);
    assert_eq!(run(&mut r, &frag).0, Outcome::Ignored(Ignored::Fragment));
    let later = with_ext(44, [58, 0, 0x05, 0xa8, 0, 0, 0, 7]);
    assert_eq!(run(&mut r, &later).0, Outcome::Ignored(Ignored::Fragment));
    // An atomic fragment (offset 0, no more): the whole packet, answered
    // (RFC 6946), the reply without the header.
    let atomic = with_ext(44, [58, 0, 0, 0, 0, 0, 0, 7]);
    let (out, rep) = run(&mut r, &atomic);
    assert_eq!(out, Outcome::Reply(base.len()));
    assert!(icmp6_ok(&rep));
    // An extension header running past the packet: malformed.
    let mut bad = with_ext(60, [58, 9, 0, 0, 0, 0, 0, 0]);
    bad.truncate(48 + 8);
    put16(&mut bad, 4, 16);
    assert_eq!(run(&mut r, &bad).0, Outcome::Ignored(Ignored::Malformed));
    // An unknown upper layer: not echo.
    let unknown = with_ext(60, [253, 0, 1, 4, 0, 0, 0, 0]);
    assert_eq!(run(&mut r, &unknown).0, Outcome::Ignored(Ignored::NotEcho));
}

#[test]
fn a_short_buffer_never_panics() {
    let mut r = tap(&["fd01::1/64"]);
    // A solicitation without its source link-layer option (78 bytes) in a
    // buffer of its own size: no room for the advertisement.
    let mut ns = hex(TAP_NS);
    ns.truncate(78);
    put16(&mut ns[14..], 4, 24);
    fix_icmp6(&mut ns[14..]);
    let mut small = ns.clone();
    assert_eq!(
        r.handle(&mut small, ns.len()),
        Outcome::Ignored(Ignored::Malformed)
    );
    let mut roomy = ns.clone();
    roomy.resize(MIN_BUFFER, 0);
    assert_eq!(r.handle(&mut roomy, ns.len()), Outcome::Reply(MIN_BUFFER));
    // A length beyond the buffer is clamped to it.
    let mut buf = [0u8; 10];
    assert!(matches!(r.handle(&mut buf, 1000), Outcome::Ignored(_)));
}
