//! Packets through a real tun device, with the library calls the example and
//! the seed program use: what the host sends is read, what is written arrives.

use std::net::UdpSocket;
use std::path::Path;
use std::time::Duration;

use netlab::{Lab, require_root};
use tapir_sys::{DEFAULT_TUN_PATH, IfName, Mode, Netlink, TunDevice, TunOptions};

/// The RFC 1071 checksum of an IPv4 header.
fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[test]
fn read_what_the_host_sends_and_write_what_it_receives() {
    require_root!();
    let lab = Lab::new();
    let ns = lab.netns("io");
    ns.run(|| {
        let name = IfName::new("tun%d").unwrap();
        let dev = TunDevice::open(
            Path::new(DEFAULT_TUN_PATH),
            &name,
            TunOptions::new(Mode::Tun),
        )
        .unwrap();
        assert_eq!(dev.name().as_str(), "tun0");
        let mut nl = Netlink::open().unwrap();
        let index = nl.link("tun0").unwrap().unwrap().index;
        nl.set_up(index, true).unwrap();
        nl.add_address(index, "10.20.0.1/24".parse().unwrap(), None)
            .unwrap();
        nl.add_route(index, "10.21.0.0/16".parse().unwrap(), None)
            .unwrap();

        // Host -> device: a datagram to a routed address comes out of the tun.
        let sock = UdpSocket::bind("10.20.0.1:5555").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        sock.send_to(b"hello tun", "10.21.3.4:7777").unwrap();
        let mut buf = [0u8; 2048];
        let n = loop {
            assert!(
                dev.wait_readable(Duration::from_secs(5)).unwrap(),
                "nothing came out of the tun within 5 s"
            );
            let n = dev.read(&mut buf).unwrap();
            // Skip anything else the stack sends (none expected on a fresh tun).
            if n >= 20 && buf[0] >> 4 == 4 && buf[9] == 17 {
                break n;
            }
        };
        let pkt = &buf[..n];
        assert_eq!(n, 20 + 8 + 9);
        assert_eq!(&pkt[12..16], &[10, 20, 0, 1], "source");
        assert_eq!(&pkt[16..20], &[10, 21, 3, 4], "destination");
        assert_eq!(u16::from_be_bytes([pkt[22], pkt[23]]), 7777);
        assert_eq!(&pkt[28..], b"hello tun");

        // Device -> host: a datagram written into the tun reaches the socket.
        let mut reply = Vec::new();
        reply.extend_from_slice(&[0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0]);
        reply.extend_from_slice(&[10, 21, 3, 4, 10, 20, 0, 1]);
        let total = (20 + 8 + 5) as u16;
        reply[2..4].copy_from_slice(&total.to_be_bytes());
        let csum = ipv4_checksum(&reply);
        reply[10..12].copy_from_slice(&csum.to_be_bytes());
        reply.extend_from_slice(&7777u16.to_be_bytes());
        reply.extend_from_slice(&5555u16.to_be_bytes());
        reply.extend_from_slice(&13u16.to_be_bytes());
        reply.extend_from_slice(&[0, 0]); // no UDP checksum (allowed over IPv4)
        reply.extend_from_slice(b"howdy");
        assert_eq!(dev.write(&reply).unwrap(), reply.len());
        let (m, from) = sock.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..m], b"howdy");
        assert_eq!(from.to_string(), "10.21.3.4:7777");

        // Not persistent: it goes away with its descriptor.
        drop(dev);
        assert!(nl.link("tun0").unwrap().is_none());
    });
}
