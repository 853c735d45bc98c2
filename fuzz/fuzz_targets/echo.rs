//! The echo responder: any bytes, tun and tap. A reply must fit the buffer
//! and, when it is an IP echo reply, keep the request's length.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tapir_proto::echo::{Config, Link, Outcome, Responder};

fuzz_target!(|data: &[u8]| {
    for link in [Link::Ip, Link::Ethernet] {
        let mut r = Responder::new(Config {
            link,
            mac: [2, 0, 0, 0, 0, 1],
            subnets: vec!["10.0.0.1/24".parse().unwrap(), "fd00::1/64".parse().unwrap()],
            only: vec![],
        });
        // Both a roomy buffer and one exactly the packet's size.
        for extra in [0usize, 2048] {
            let mut buf = data.to_vec();
            buf.resize(data.len() + extra, 0);
            if let Outcome::Reply(n) = r.handle(&mut buf, data.len()) {
                assert!(n <= buf.len());
                assert!(n >= 20);
                // A tun echo reply is a whole IPv4/IPv6 packet whose length
                // field matches, and an IPv4 header whose checksum verifies.
                if link == Link::Ip {
                    match buf[0] >> 4 {
                        4 => {
                            let ihl = usize::from(buf[0] & 0xf) * 4;
                            assert_eq!(usize::from(u16::from_be_bytes([buf[2], buf[3]])), n);
                            assert!(tapir_wire::checksum::verify(&buf[..ihl]));
                        }
                        6 => assert_eq!(40 + usize::from(u16::from_be_bytes([buf[4], buf[5]])), n),
                        v => panic!("reply of IP version {v}"),
                    }
                }
            }
        }
    }
});
