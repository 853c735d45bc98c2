//! The tunnel with an established session: any plaintext a real peer seals
//! (so it authenticates) goes through the inner-packet checks, and any
//! bytes under a live receiver index go through decryption and the replay
//! window. Nothing panics; what reaches the tun is a whole IPv4/IPv6 packet
//! from the peer's allowed IPs; a replayed message is never accepted twice.
#![no_main]
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tapir_proto::wg::keys::PrivateKey;
use tapir_proto::wg::tunnel::{Decapsulated, Encapsulated, PeerConfig, Random, Tunnel};

struct Counter(u8);
impl Random for Counter {
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 = self.0.wrapping_add(13);
            *b = self.0;
        }
    }
}

fn tunnel(me: u8, them: u8, endpoint: Option<&str>, allowed: &str) -> Tunnel {
    Tunnel::new(
        PrivateKey::from_random([me; 32]),
        vec![PeerConfig {
            public: PrivateKey::from_random([them; 32]).public_key(),
            psk: None,
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            allowed_ips: vec![allowed.parse().unwrap()],
            keepalive: None,
            rate: None,
        }],
    )
}

fuzz_target!(|data: &[u8]| {
    let a_addr: SocketAddr = "192.0.2.1:1".parse().unwrap();
    let b_addr: SocketAddr = "192.0.2.2:1".parse().unwrap();
    // a may send as 10.0.0.1 only; b routes 0.0.0.0/0 to a for sealing anything.
    let mut a = tunnel(1, 2, Some("192.0.2.2:1"), "0.0.0.0/0");
    let mut b = tunnel(2, 1, None, "10.0.0.1/32");
    let now = Instant::now();
    let wall = Duration::from_secs(1_700_000_000);
    let mut rng = Counter(0);
    let mut buf = vec![0u8; 70_000];
    // Handshake.
    buf[16] = 0x45;
    buf[16 + 16..16 + 20].copy_from_slice(&[10, 0, 0, 2]);
    let _ = a.encapsulate(now, wall, &mut rng, &mut buf, 20);
    let mut wire = [0u8; 2048];
    for _ in 0..4 {
        while let Some((_, n)) = a.poll_transmit(now, &mut wire) {
            let mut m = wire[..n].to_vec();
            b.decapsulate(now, wall, &mut rng, a_addr, &mut m, n);
        }
        while let Some((_, n)) = b.poll_transmit(now, &mut wire) {
            let mut m = wire[..n].to_vec();
            a.decapsulate(now, wall, &mut rng, b_addr, &mut m, n);
        }
    }
    // Inputs are split into messages at 0xfe 0xfe; the first byte of each
    // says what to do with the rest.
    let mut rest = data;
    let mut sealed: Vec<Vec<u8>> = Vec::new();
    while let Some((&op, tail)) = rest.split_first() {
        let end = tail.windows(2).position(|w| w == [0xfe, 0xfe]).unwrap_or(tail.len());
        let body = &tail[..end];
        rest = tail.get(end + 2..).unwrap_or(&[]);
        let mut msg = match op % 3 {
            // Sealed by a: authenticates, then the inner checks.
            0 => {
                if body.len() > 65_000 {
                    continue;
                }
                buf[16..16 + body.len()].copy_from_slice(body);
                // a's one peer is b, whatever the packet says.
                match a.encapsulate_to(0, now, wall, &mut rng, &mut buf, body.len()) {
                    Encapsulated::Send { len, .. } => buf[..len].to_vec(),
                    _ => continue,
                }
            }
            // A replay of something sealed earlier.
            1 => match sealed.get(usize::from(body.first().copied().unwrap_or(0)) % sealed.len().max(1)) {
                Some(m) => m.clone(),
                None => continue,
            },
            // Raw bytes, as they come.
            _ => body.to_vec(),
        };
        let n = msg.len();
        let first_time = op % 3 == 0;
        if first_time {
            sealed.push(msg.clone());
        }
        match b.decapsulate(now, wall, &mut rng, a_addr, &mut msg, n) {
            Decapsulated::Packet(r) => {
                assert!(first_time, "a replay or forgery reached the tun");
                assert!(r.end <= n && r.len() >= 20);
                let p = &msg[r];
                assert!(matches!(p[0] >> 4, 4 | 6));
                if p[0] >> 4 == 4 {
                    assert_eq!(&p[12..16], &[10, 0, 0, 1], "a source outside the allowed IPs");
                } else {
                    panic!("IPv6 is outside b's allowed IPs for a");
                }
            }
            Decapsulated::Forward { .. } | Decapsulated::Flood { .. } => panic!("an IP tunnel never switches"),
            _ => {}
        }
    }
});
