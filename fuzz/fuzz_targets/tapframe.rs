//! Tap mode's frame classification: any frames, sealed by a real peer (so
//! they authenticate) or read from the local tap, never panic; what is
//! delivered lies within the buffer; the switch never holds more MACs per
//! peer than its cap.
#![no_main]
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tapir_proto::wg::keys::PrivateKey;
use tapir_proto::wg::tunnel::{Decapsulated, Encapsulated, Layer, PeerConfig, Random, Tunnel};

struct Counter(u8);
impl Random for Counter {
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 = self.0.wrapping_add(7);
            *b = self.0;
        }
    }
}

const CAP: usize = 8;

fn tunnel(me: u8, them: u8, endpoint: Option<&str>, allowed: &[&str]) -> Tunnel {
    Tunnel::with_layer(
        PrivateKey::from_random([me; 32]),
        vec![PeerConfig {
            public: PrivateKey::from_random([them; 32]).public_key(),
            psk: None,
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            allowed_ips: allowed.iter().map(|a| a.parse().unwrap()).collect(),
            keepalive: None,
            rate: None,
        }],
        Layer::Ethernet,
        Duration::from_secs(300),
        CAP,
    )
}

fuzz_target!(|data: &[u8]| {
    let a_addr: SocketAddr = "192.0.2.1:1".parse().unwrap();
    let mut a = tunnel(1, 2, Some("192.0.2.2:1"), &[]);
    // b checks senders against allowed IPs on half the inputs.
    let allowed: &[&str] = if data.first().is_some_and(|b| b & 1 == 1) { &["10.0.0.0/8", "fd00::/8"] } else { &[] };
    let mut b = tunnel(2, 1, None, allowed);
    let now = Instant::now();
    let wall = Duration::from_secs(1_700_000_000);
    let mut rng = Counter(0);
    let mut buf = vec![0u8; 70000];
    // Handshake: a's first frame queues and starts it.
    buf[16..30].copy_from_slice(&[0xff; 14]);
    assert_eq!(a.encapsulate(now, wall, &mut rng, &mut buf, 14), Encapsulated::Flood);
    a.encapsulate_to(0, now, wall, &mut rng, &mut buf, 14);
    let mut wire = [0u8; 2048];
    for _ in 0..4 {
        while let Some((_, n)) = a.poll_transmit(now, &mut wire) {
            let mut m = wire[..n].to_vec();
            b.decapsulate(now, wall, &mut rng, a_addr, &mut m, n);
        }
        while let Some((_, n)) = b.poll_transmit(now, &mut wire) {
            let mut m = wire[..n].to_vec();
            a.decapsulate(now, wall, &mut rng, "192.0.2.2:1".parse().unwrap(), &mut m, n);
        }
    }
    // The input is split into frames at 0xfe 0xfe.
    let mut rest = data;
    while !rest.is_empty() {
        let end = rest.windows(2).position(|w| w == [0xfe, 0xfe]).unwrap_or(rest.len());
        let frame = &rest[..end];
        rest = rest.get(end + 2..).unwrap_or(&[]);
        // From a's tap: classified, then sealed for b whatever it is.
        buf[16..16 + frame.len()].copy_from_slice(frame);
        let _ = a.encapsulate(now, wall, &mut rng, &mut buf, frame.len());
        buf[16..16 + frame.len()].copy_from_slice(frame);
        if let Encapsulated::Send { len, .. } = a.encapsulate_to(0, now, wall, &mut rng, &mut buf, frame.len()) {
            let mut m = buf[..len].to_vec();
            match b.decapsulate(now, wall, &mut rng, a_addr, &mut m, len) {
                Decapsulated::Packet(r) | Decapsulated::Forward { range: r, .. } | Decapsulated::Flood { range: r, .. } => {
                    assert!(r.end <= len && r.len() == frame.len());
                    assert_eq!(&m[r], frame);
                }
                _ => {}
            }
        }
        let key = PrivateKey::from_random([1; 32]).public_key();
        assert!(b.peer_mac_count(&key) <= CAP);
    }
});
