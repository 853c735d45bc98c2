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
            }
        }
    }
});
