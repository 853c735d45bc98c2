//! The tunnel's datagram handler: whatever arrives at the UDP port. Nothing
//! unauthenticated may produce a reply, a packet for the tun, or a panic.
#![no_main]
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tapir_proto::wg::keys::PrivateKey;
use tapir_proto::wg::tunnel::{Decapsulated, PeerConfig, Random, Tunnel};

struct Counter(u8);
impl Random for Counter {
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 = self.0.wrapping_add(1);
            *b = self.0;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let peer = PrivateKey::from_random([2; 32]).public_key();
    let mut t = Tunnel::new(
        PrivateKey::from_random([1; 32]),
        vec![PeerConfig {
            public: peer,
            psk: None,
            endpoint: Some("192.0.2.2:51820".parse().unwrap()),
            allowed_ips: vec!["10.0.0.2/32".parse().unwrap()],
            keepalive: None,
            rate: None,
        }],
    );
    let now = Instant::now();
    let mut rng = Counter(0);
    // The input is split into several datagrams at 0xff bytes.
    for chunk in data.split(|&b| b == 0xff) {
        // Told apart as a coalesced run where a receive was not told so
        // (lone mode): a size inside it, or nothing.
        if let Some(size) = tapir_proto::wg::messages::coalesced_size(chunk) {
            assert!(size >= 32 && size < chunk.len(), "size {size} of {}", chunk.len());
        }
        let mut buf = chunk.to_vec();
        let n = buf.len();
        let out = t.decapsulate(now, Duration::from_secs(1), &mut rng, "198.51.100.1:1".parse().unwrap(), &mut buf, n);
        assert!(!matches!(out, Decapsulated::Packet(_)), "forged data reached the tun");
        let mut tx = [0u8; 2048];
        assert!(t.poll_transmit(now, &mut tx).is_none(), "a reply to the unauthenticated");
    }
});
