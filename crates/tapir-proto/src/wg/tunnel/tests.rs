//! A `Pair` of tunnels over a simulated link: deterministic time and
//! randomness, with loss, duplication, reordering, roaming and restarts.

use super::*;
use crate::wg::handshake::{Identity, PeerStatic};
use crate::wg::ratelimit;

pub(super) struct Rng(pub(super) u64);

impl Random for Rng {
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *b = self.0 as u8;
        }
    }
}

const A_ADDR: &str = "192.0.2.1:51820";
const B_ADDR: &str = "192.0.2.2:51820";

pub(super) fn key(seed: u8) -> PrivateKey {
    PrivateKey::from_random([seed; 32])
}

/// An IPv4 packet from `src` to `dst` with `payload` bytes of 0xab.
fn packet(src: [u8; 4], dst: [u8; 4], payload: usize) -> Vec<u8> {
    let mut p = vec![0u8; 20 + payload];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&((20 + payload) as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p[20..].fill(0xab);
    p
}

struct Pair {
    a: Tunnel,
    b: Tunnel,
    now: Instant,
    wall: Duration,
    rng: Rng,
    /// Datagrams in flight: (to b?, from, bytes).
    link: VecDeque<(bool, SocketAddr, Vec<u8>)>,
    a_addr: SocketAddr,
    /// Packets delivered to each side's tun.
    got_a: Vec<Vec<u8>>,
    got_b: Vec<Vec<u8>>,
    drops: Vec<DropReason>,
    /// Datagrams go to `decapsulate_lone` first (and to `decapsulate` when
    /// it declines), as a lone datagram does in the daemon; how many it took.
    lone: bool,
    lone_taken: usize,
}

impl Pair {
    fn new() -> Self {
        let (ka, kb) = (key(1), key(2));
        let (pa, pb) = (ka.public_key(), kb.public_key());
        let psk = PresharedKey::from_random([7; 32]);
        let a = Tunnel::new(
            ka,
            vec![PeerConfig {
                public: pb,
                psk: Some(psk.clone()),
                endpoint: Some(B_ADDR.parse().unwrap()),
                allowed_ips: vec!["10.0.0.2/32".parse().unwrap()],
                keepalive: None,
                rate: None,
            }],
        );
        let b = Tunnel::new(
            kb,
            vec![PeerConfig {
                public: pa,
                psk: Some(psk),
                endpoint: None,
                allowed_ips: vec!["10.0.0.1/32".parse().unwrap()],
                keepalive: None,
                rate: None,
            }],
        );
        Self {
            a,
            b,
            now: Instant::now(),
            wall: Duration::from_secs(1_700_000_000),
            rng: Rng(0x9e3779b97f4a7c15),
            link: VecDeque::new(),
            a_addr: A_ADDR.parse().unwrap(),
            got_a: vec![],
            got_b: vec![],
            drops: vec![],
            lone: false,
            lone_taken: 0,
        }
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.wall += d;
        self.a.handle_timeout(self.now, self.wall, &mut self.rng);
        self.b.handle_timeout(self.now, self.wall, &mut self.rng);
        self.collect();
    }

    /// Moves what each side wants to send onto the link.
    fn collect(&mut self) {
        let mut buf = [0u8; 2048];
        while let Some((_, n)) = self.a.poll_transmit(self.now, &mut buf) {
            self.link.push_back((true, self.a_addr, buf[..n].to_vec()));
        }
        while let Some((_, n)) = self.b.poll_transmit(self.now, &mut buf) {
            self.link
                .push_back((false, B_ADDR.parse().unwrap(), buf[..n].to_vec()));
        }
    }

    fn send_a(&mut self, p: &[u8]) -> Encapsulated {
        let mut buf = vec![0u8; 2048];
        buf[16..16 + p.len()].copy_from_slice(p);
        let r = self
            .a
            .encapsulate(self.now, self.wall, &mut self.rng, &mut buf, p.len());
        if let Encapsulated::Send { len, .. } = r {
            self.link
                .push_back((true, self.a_addr, buf[..len].to_vec()));
        }
        self.collect();
        r
    }

    fn send_b(&mut self, p: &[u8]) -> Encapsulated {
        let mut buf = vec![0u8; 2048];
        buf[16..16 + p.len()].copy_from_slice(p);
        let r = self
            .b
            .encapsulate(self.now, self.wall, &mut self.rng, &mut buf, p.len());
        if let Encapsulated::Send { to, len } = r {
            assert_eq!(to, self.a_addr, "b sends to where a was last heard from");
            self.link
                .push_back((false, B_ADDR.parse().unwrap(), buf[..len].to_vec()));
        }
        self.collect();
        r
    }

    fn deliver(&mut self, to_b: bool, from: SocketAddr, mut bytes: Vec<u8>) {
        let n = bytes.len();
        let (t, got) = if to_b {
            (&mut self.b, &mut self.got_b)
        } else {
            (&mut self.a, &mut self.got_a)
        };
        let lone = if self.lone {
            t.decapsulate_lone(self.now, from, &mut bytes, n)
        } else {
            None
        };
        self.lone_taken += usize::from(lone.is_some());
        let d = match lone {
            Some(d) => d,
            None => t.decapsulate(self.now, self.wall, &mut self.rng, from, &mut bytes, n),
        };
        match d {
            Decapsulated::Packet(r) => got.push(bytes[r].to_vec()),
            Decapsulated::Nothing => {}
            Decapsulated::Dropped(why) => self.drops.push(why),
            other => panic!("an IP tunnel never switches: {other:?}"),
        }
        self.collect();
    }

    /// Delivers everything in flight, in order, until the link is quiet.
    fn run(&mut self) {
        let mut steps = 0;
        while let Some((to_b, from, bytes)) = self.link.pop_front() {
            self.deliver(to_b, from, bytes);
            steps += 1;
            assert!(steps < 1000, "the link never went quiet");
        }
    }
}

/// Both ends start a handshake at once and b's is lost: once a's completes
/// (b the responder, its session confirmed by a's data), b stops retrying
/// its own, as the kernel does (wg_timers_handshake_complete); it went on
/// sending initiations to a peer whose session worked.
#[test]
fn a_handshake_completed_as_responder_ends_our_own_retries() {
    let mut p = Pair::new();
    p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 1));
    let init_a = p.link.pop_front().unwrap();
    p.deliver(init_a.0, init_a.1, init_a.2);
    // b, its session not yet confirmed, has something for a: it initiates
    // too, and that initiation is lost.
    assert_eq!(
        p.send_b(&packet([10, 0, 0, 2], [10, 0, 0, 1], 1)),
        Encapsulated::Queued
    );
    p.link
        .retain(|(to_b, _, b)| *to_b || b.len() != INITIATION_LEN);
    p.run();
    assert_eq!((p.got_a.len(), p.got_b.len()), (1, 1), "{:?}", p.drops);
    p.advance(Duration::from_millis(5500));
    let retries = p
        .link
        .iter()
        .filter(|(to_b, _, b)| !to_b && b.len() == INITIATION_LEN)
        .count();
    assert_eq!(retries, 0, "b retried a handshake it no longer needs");
}

/// The responder's latest handshake is the time the initiator's first
/// message confirmed it, as the kernel and wireguard-go say: a response
/// that led nowhere (a preshared key that differs) is none.
#[test]
fn the_responder_counts_a_handshake_once_it_is_confirmed() {
    let handshake_of_b = |p: &Pair| p.b.peers().next().unwrap().2.last_handshake;
    let mut p = Pair::new();
    p.b.update_peer(&p.a.public_key(), |c| {
        c.psk = Some(PresharedKey::from_random([8; 32]))
    });
    p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 1));
    p.run();
    assert!(p.got_b.is_empty());
    assert_eq!(handshake_of_b(&p), None, "answered, never completed");
    let mut p = Pair::new();
    p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 1));
    p.run();
    assert_eq!(p.got_b.len(), 1);
    assert_eq!(handshake_of_b(&p), Some(p.wall));
}

/// A persistent keepalive counts from the last authenticated message
/// either way, as the kernel's timer does: a peer that hears from the
/// other every half second sends none of its own (only the passive one
/// that answers data); and one turned on with `wg set` goes at once.
#[test]
fn persistent_keepalives_count_from_any_traffic_and_start_at_once() {
    let keepalives = |p: &Pair| {
        p.link
            .iter()
            .filter(|(to_b, _, b)| *to_b && b.len() == 32)
            .count()
    };
    let mut p = Pair::new();
    p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 1));
    p.run();
    let b_key = p.b.public_key();
    p.a.update_peer(&b_key, |c| c.keepalive = Some(Duration::from_secs(5)));
    p.advance(Duration::from_millis(10));
    assert_eq!(keepalives(&p), 1, "turned on: the first at once");
    p.run();
    let mut sent = 0;
    for _ in 0..40 {
        p.send_b(&packet([10, 0, 0, 2], [10, 0, 0, 1], 1));
        p.advance(Duration::from_millis(500));
        sent += keepalives(&p);
        p.run();
    }
    // 20 s of hearing b: the passive keepalives alone (one per 10 s).
    assert!(sent <= 2, "{sent} keepalives while b was heard every 0.5 s");
}

#[test]
fn handshake_then_data_both_ways() {
    let mut p = Pair::new();
    let ping = packet([10, 0, 0, 1], [10, 0, 0, 2], 100);
    assert_eq!(p.send_a(&ping), Encapsulated::Queued);
    p.run();
    assert_eq!(
        p.got_b,
        vec![ping.clone()],
        "the queued packet arrives after the handshake"
    );
    let pong = packet([10, 0, 0, 2], [10, 0, 0, 1], 33);
    assert!(matches!(p.send_b(&pong), Encapsulated::Send { .. }));
    p.run();
    assert_eq!(p.got_a, vec![pong]);
    assert!(p.drops.is_empty(), "{:?}", p.drops);
    // Padding is removed: the 33-byte payload arrived as 53 bytes, not 64.
    assert_eq!(p.got_a[0].len(), 53);
}

#[test]
fn a_lost_initiation_is_retried_with_jitter() {
    let mut p = Pair::new();
    p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 10));
    assert_eq!(p.link.len(), 1);
    p.link.clear(); // lost
    p.advance(Duration::from_secs(4));
    assert!(p.link.is_empty(), "not before REKEY_TIMEOUT");
    assert_eq!(p.a.take_doubtful().count(), 0, "nothing in doubt yet");
    p.advance(Duration::from_millis(1400));
    assert_eq!(p.link.len(), 1, "retried after 5 s plus jitter");
    // The way to b is in doubt now (a sender with a chosen source drops it).
    let doubtful: Vec<SocketAddr> = p.a.take_doubtful().collect();
    assert_eq!(doubtful, vec![B_ADDR.parse::<SocketAddr>().unwrap()]);
    p.run();
    assert_eq!(p.got_b.len(), 1);
}

#[test]
fn handshake_attempts_stop_after_20_initiations() {
    let mut p = Pair::new();
    p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 10));
    let (mut initiations, mut last) = (0, Duration::ZERO);
    for i in 0..2000u64 {
        if !p.link.is_empty() {
            last = Duration::from_millis(i * 100);
        }
        initiations += p.link.len();
        p.link.clear();
        p.advance(Duration::from_millis(100));
    }
    // The first and 19 retries, every 5 s plus jitter, as the kernel and
    // wireguard-go send them (tapir sent 18 and stopped at 90 s).
    assert_eq!(initiations, 20, "in 200 s");
    assert!(
        last >= Duration::from_secs(95) && last < Duration::from_secs(102),
        "the last at {last:?}"
    );
}

#[test]
fn duplicates_reordering_and_forgeries() {
    let mut p = Pair::new();
    p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 1));
    p.run();
    let mut datagrams = vec![];
    for i in 0..5 {
        p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 10 + i));
        datagrams.push(p.link.pop_back().unwrap());
    }
    // Reordered: 4, 2, 0, 3, 1; then everything again (replays).
    for i in [4, 2, 0, 3, 1, 0, 1, 2, 3, 4] {
        let (to_b, from, bytes) = datagrams[i].clone();
        p.deliver(to_b, from, bytes);
    }
    assert_eq!(p.got_b.len(), 1 + 5);
    assert_eq!(
        p.drops
            .iter()
            .filter(|d| matches!(d, DropReason::Session(SessionError::Replay)))
            .count(),
        5
    );
    // A forged datagram: one bit flipped.
    let (to_b, from, mut bytes) = datagrams[0].clone();
    bytes[8] = 200; // an unseen counter
    bytes[30] ^= 1;
    p.deliver(to_b, from, bytes);
    assert!(matches!(
        p.drops.last(),
        Some(DropReason::Session(SessionError::Decrypt))
    ));
    // Garbage of every length: dropped, nothing sent back.
    let mut rng = Rng(5);
    for len in 0..300 {
        let mut junk = vec![0u8; len];
        rng.fill(&mut junk);
        if let Some(b) = junk.first_mut() {
            *b = (len % 5) as u8;
        }
        if len > 4 {
            junk[1..4].fill(0);
        }
        p.deliver(true, "198.51.100.9:1".parse().unwrap(), junk);
    }
    assert!(p.link.is_empty(), "no reply to the unauthenticated");
    assert_eq!(p.got_b.len(), 6);
}

#[test]
fn the_endpoint_follows_the_last_authenticated_packet() {
    let mut p = Pair::new();
    p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 1));
    p.run();
    // a moves to another address.
    p.a_addr = "203.0.113.7:40000".parse().unwrap();
    p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 2));
    p.run();
    // send_b asserts that b answers to the new address.
    assert!(matches!(
        p.send_b(&packet([10, 0, 0, 2], [10, 0, 0, 1], 3)),
        Encapsulated::Send { .. }
    ));
    p.run();
    assert_eq!(p.got_a.len(), 1);
    // A forged packet from a third address (a real datagram of a's, altered:
    // the right receiver index, a counter not seen yet, a bad tag) does not
    // move the endpoint.
    p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 4));
    let (to_b, _, mut forged) = p.link.pop_back().unwrap();
    forged[8] = forged[8].wrapping_add(100);
    let last = forged.len() - 1;
    forged[last] ^= 1;
    p.deliver(to_b, "198.51.100.1:9".parse().unwrap(), forged);
    assert!(
        matches!(
            p.drops.last(),
            Some(DropReason::Session(SessionError::Decrypt))
        ),
        "{:?}",
        p.drops
    );
    assert!(matches!(
        p.send_b(&packet([10, 0, 0, 2], [10, 0, 0, 1], 3)),
        Encapsulated::Send { .. }
    ));
}

#[test]
fn a_restarted_peer_handshakes_again_and_old_initiations_are_refused() {
    let mut p = Pair::new();
    p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 1));
    let first_initiation = p.link.front().cloned().unwrap();
    p.run();
    // a restarts: same key, no state.
    p.advance(Duration::from_secs(3));
    let b_public = key(2).public_key();
    p.a = Tunnel::new(
        key(1),
        vec![PeerConfig {
            public: b_public,
            psk: Some(PresharedKey::from_random([7; 32])),
            endpoint: Some(B_ADDR.parse().unwrap()),
            allowed_ips: vec!["10.0.0.2/32".parse().unwrap()],
            keepalive: None,
            rate: None,
        }],
    );
    p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 2));
    p.run();
    assert_eq!(p.got_b.len(), 2, "traffic resumes without touching b");
    // The recorded first initiation, replayed: refused by its timestamp.
    let (to_b, from, bytes) = first_initiation;
    p.deliver(to_b, from, bytes);
    assert_eq!(p.drops.last(), Some(&DropReason::StaleInitiation));
    assert!(p.link.is_empty());
}

#[test]
fn sources_outside_the_allowed_ips_are_dropped() {
    let mut p = Pair::new();
    p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 1));
    p.run();
    // a sends a packet with a spoofed source (a's allowed IP on b is 10.0.0.1).
    p.send_a(&packet([10, 9, 9, 9], [10, 0, 0, 2], 1));
    p.run();
    assert_eq!(p.drops.last(), Some(&DropReason::NotAllowed));
    assert_eq!(p.got_b.len(), 1);
    // No route on a for other destinations.
    assert_eq!(
        p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 3], 1)),
        Encapsulated::NoRoute
    );
}

#[test]
fn rekey_after_time_and_keepalives() {
    let mut p = Pair::new();
    p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 1));
    p.run();
    // b got data and sends nothing for 10 s: a keepalive (32 bytes) goes out.
    p.advance(Duration::from_secs(11));
    assert_eq!(p.link.len(), 1);
    assert_eq!(p.link[0].2.len(), 32);
    p.run();
    // After REKEY_AFTER_TIME, a's next packet also starts a new handshake.
    p.advance(Duration::from_secs(110));
    p.link.clear();
    p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 1));
    assert_eq!(p.link.len(), 2, "the data and a new initiation");
    assert_eq!(p.link[1].2.len(), INITIATION_LEN);
    p.run();
    p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 1));
    p.run();
    assert_eq!(p.got_b.len(), 3);
    // Sessions expire: after 180 s without a new handshake, a must handshake again.
    p.advance(Duration::from_secs(200));
    p.link.clear();
    assert_eq!(
        p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 1)),
        Encapsulated::Queued
    );
}

#[test]
fn under_load_a_cookie_is_required_and_works() {
    let mut p = Pair::new();
    // A flood of (replayed) initiations puts b under load.
    p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 1));
    let init = p.link.pop_front().unwrap();
    for _ in 0..200 {
        let (to_b, from, bytes) = init.clone();
        p.deliver(to_b, from, bytes);
    }
    assert!(p.drops.contains(&DropReason::Cookie));
    // Cookie replies went back to a; deliver only the last one, then let a retry.
    let cookie = p
        .link
        .iter()
        .rev()
        .find(|(to_b, _, b)| !to_b && b.len() == COOKIE_LEN)
        .cloned()
        .unwrap();
    p.link.clear();
    p.deliver(cookie.0, cookie.1, cookie.2);
    p.advance(Duration::from_millis(5400));
    assert_eq!(p.link.len(), 1, "a retried");
    let retry = p.link.pop_front().unwrap();
    // Put b under load again, then deliver the retry: its mac2 lets it through.
    let cookies_before = p.drops.iter().filter(|d| **d == DropReason::Cookie).count();
    for _ in 0..200 {
        let (to_b, from, bytes) = init.clone();
        p.deliver(to_b, from, bytes);
    }
    assert!(
        p.drops.iter().filter(|d| **d == DropReason::Cookie).count() > cookies_before,
        "b is under load"
    );
    p.link.clear();
    let drops_before = p.drops.len();
    p.deliver(retry.0, retry.1, retry.2);
    assert_eq!(
        p.drops.len(),
        drops_before,
        "the retry with mac2 is not refused: {:?}",
        &p.drops[drops_before..]
    );
    p.run();
    assert_eq!(
        p.got_b.len(),
        1,
        "and the handshake completes while b is under load"
    );
}

/// Over a transport that proved the sender's address (TCP), load asks for
/// no cookie: the first initiation is answered, though the responder is
/// under load (a client that reconnected lost its cookie, and waited 5 s
/// for each new one).
#[test]
fn under_load_proven_sources_need_no_cookie() {
    for proven in [false, true] {
        let mut p = Pair::new();
        p.b.set_sources_proven(proven);
        p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 1));
        let first = p.link.pop_front().unwrap();
        p.advance(Duration::from_millis(5400));
        let retry = p.link.pop_front().expect("a retried");
        // The first initiation, replayed 200 times from elsewhere: b is
        // under load (and that address's handshakes over their rate).
        let elsewhere: SocketAddr = "192.0.2.99:40000".parse().unwrap();
        for _ in 0..200 {
            p.deliver(first.0, elsewhere, first.2.clone());
        }
        p.link.clear();
        p.advance(Duration::from_millis(30));
        p.link.clear();
        let drops = p.drops.len();
        p.deliver(retry.0, retry.1, retry.2);
        if proven {
            assert_eq!(p.drops.len(), drops, "{:?}", &p.drops[drops..]);
            p.run();
            assert_eq!(p.got_b.len(), 1, "the handshake completed under load");
        } else {
            assert_eq!(
                p.drops[drops..],
                [DropReason::Cookie],
                "over UDP: a cookie first"
            );
        }
    }
}

#[test]
fn under_load_the_initiator_gets_its_cookie_to_the_responder() {
    // A handshake, keeping b's response to replay to a later.
    let mut p = Pair::new();
    p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 1));
    let init = p.link.pop_front().unwrap();
    p.deliver(init.0, init.1, init.2);
    let resp = p.link.front().cloned().unwrap();
    assert_eq!(resp.2.len(), RESPONSE_LEN);
    p.run();
    assert_eq!(p.got_b.len(), 1);
    // The sessions expire; a, which sent last and heard nothing back,
    // starts a new handshake.
    p.advance(Duration::from_secs(200));
    let first = p.link.pop_front().unwrap();
    assert_eq!(first.2.len(), INITIATION_LEN);
    p.link.clear();
    // The response replayed: messages with a valid mac1 put a under load.
    let flood = |p: &mut Pair| {
        for _ in 0..200 {
            p.deliver(resp.0, resp.1, resp.2.clone());
        }
        p.link.clear();
    };
    flood(&mut p);
    assert_eq!(
        p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 2)),
        Encapsulated::Queued
    );
    // b's response has no mac2, so a, under load, answers it with a
    // cookie reply to b's index in it, which b must take.
    let drops_before = p.drops.len();
    p.deliver(first.0, first.1, first.2);
    p.run();
    assert_eq!(
        &p.drops[drops_before..],
        &[DropReason::Cookie],
        "a refused b's response for its mac2, and b took the cookie reply"
    );
    // a retries; still under load, it lets b's response with a mac2 in.
    p.advance(Duration::from_millis(5400));
    let retry = p.link.pop_front().unwrap();
    assert_eq!(retry.2.len(), INITIATION_LEN);
    flood(&mut p);
    let drops_before = p.drops.len();
    p.deliver(retry.0, retry.1, retry.2);
    p.run();
    assert_eq!(&p.drops[drops_before..], &[], "nothing refused");
    assert_eq!(p.got_b.len(), 2, "the handshake completed under load");
}

#[test]
fn one_way_traffic_gets_keepalives_and_no_rehandshakes() {
    let mut p = Pair::new();
    p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 1));
    p.run();
    let mut keepalives = 0;
    let mut initiations = 0;
    // a streams to b for 60 s; b never sends data.
    for _ in 0..60 {
        p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 100));
        p.advance(Duration::from_secs(1));
        keepalives += p
            .link
            .iter()
            .filter(|(to_b, _, d)| !to_b && d.len() == 32)
            .count();
        initiations += p
            .link
            .iter()
            .filter(|(_, _, d)| d.len() == INITIATION_LEN)
            .count();
        p.run();
    }
    assert!(
        (5..=7).contains(&keepalives),
        "b answers about every 10 s: {keepalives}"
    );
    assert_eq!(initiations, 0, "so a never concludes b is gone");
    assert_eq!(p.got_b.len(), 61);
}

#[test]
fn an_allowed_ip_belongs_to_the_peer_it_was_given_to_last() {
    let mut t = Tunnel::new(key(1), vec![]);
    let x = key(2).public_key();
    let y = key(3).public_key();
    let cfg = |public, ips: &[&str]| PeerConfig {
        public,
        psk: None,
        endpoint: Some(B_ADDR.parse().unwrap()),
        allowed_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
        keepalive: None,
        rate: None,
    };
    t.add_peer(cfg(x, &["10.0.0.2/32", "10.9.0.0/16"]));
    t.add_peer(cfg(y, &["10.0.0.3/32"]));
    assert!(t.update_peer(&y, |c| c.allowed_ips.push("10.9.0.0/16".parse().unwrap())));
    let owners: Vec<(PublicKey, Vec<String>)> = t
        .peers()
        .map(|(c, _, _)| {
            (
                c.public,
                c.allowed_ips.iter().map(ToString::to_string).collect(),
            )
        })
        .collect();
    assert_eq!(owners[0], (x, vec!["10.0.0.2/32".to_string()]));
    assert_eq!(
        owners[1],
        (
            y,
            vec!["10.0.0.3/32".to_string(), "10.9.0.0/16".to_string()]
        )
    );
    assert_eq!(t.route("10.9.1.1".parse().unwrap()), Some(1));
}

/// With nothing armed there is no deadline at all (the caller sleeps
/// until traffic or a change, which it asks about again); traffic arms
/// the timers it should, and each fires when it says.
#[test]
fn next_deadline_is_none_until_something_is_armed() {
    let mut p = Pair::new();
    assert_eq!(p.a.next_deadline(p.now), None);
    assert_eq!(p.a.poll_timeout(p.now), p.now + Duration::from_secs(1));
    p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 10));
    // The handshake's retry, 5 s (and jitter) out.
    let retry = p.a.next_deadline(p.now).expect("a handshake in flight");
    assert!(retry >= p.now + REKEY_TIMEOUT, "{:?}", retry - p.now);
    p.run();
    assert_eq!(p.got_b.len(), 1);
    // a sent data and heard nothing back yet: a rehandshake 15 s out,
    // unless an answer comes; b got data: a keepalive 10 s out.
    let a_due = p.a.next_deadline(p.now).expect("data unanswered");
    assert_eq!(a_due, p.now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT);
    let b_due = p.b.next_deadline(p.now).expect("a keepalive owed");
    assert_eq!(b_due, p.now + KEEPALIVE_TIMEOUT);
    // Nothing happens before b's deadline, its keepalive at it.
    p.now = b_due - Duration::from_millis(1);
    p.b.handle_timeout(p.now, p.wall, &mut p.rng);
    p.collect();
    assert!(p.link.is_empty(), "not early");
    p.now = b_due;
    p.b.handle_timeout(p.now, p.wall, &mut p.rng);
    p.collect();
    assert_eq!(p.link.len(), 1, "b's keepalive");
    p.run();
    // The keepalive answered a's data: what is left is the sessions' end.
    let expiry = p.a.next_deadline(p.now).expect("a session");
    assert!(
        expiry > p.now + Duration::from_secs(500),
        "{:?}",
        expiry - p.now
    );
}

#[test]
fn poll_timeout_names_the_next_timer_and_it_fires_then() {
    let mut p = Pair::new();
    p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 10));
    p.link.clear(); // the initiation is lost
    // Idle: nothing sooner than a second.
    assert_eq!(p.a.poll_timeout(p.now), p.now + Duration::from_secs(1));
    p.advance(Duration::from_millis(4500));
    assert!(p.link.is_empty());
    // The retry is due 5 s (plus up to 333 ms of jitter) after the first try.
    let due = p.a.poll_timeout(p.now);
    assert!(
        due > p.now && due < p.now + Duration::from_millis(834),
        "{:?}",
        due - p.now
    );
    // Just before it: nothing; at it: the retry.
    p.now = due - Duration::from_millis(1);
    p.a.handle_timeout(p.now, p.wall, &mut p.rng);
    p.collect();
    assert!(p.link.is_empty(), "not early");
    p.now = due;
    p.a.handle_timeout(p.now, p.wall, &mut p.rng);
    p.collect();
    assert_eq!(p.link.len(), 1, "retried exactly when poll_timeout said");
}

/// An attacker at `addr` with a key of its own (unknown to b) who knows b's
/// public key: its initiations carry a valid mac1, and once it holds a
/// cookie, a valid mac2. Each one it gets processed costs b two X25519.
struct Flooder {
    id: Identity,
    victim: PeerStatic,
    addr: SocketAddr,
    cookie: Option<[u8; 16]>,
    last_mac1: [u8; 16],
}

impl Flooder {
    fn new(victim: PublicKey) -> Self {
        let id = Identity::new(key(9));
        let victim = PeerStatic::new(&id, victim, None);
        Self {
            id,
            victim,
            addr: "198.51.100.7:4444".parse().unwrap(),
            cookie: None,
            last_mac1: [0; 16],
        }
    }

    fn initiation(&mut self, rng: &mut Rng, wall: Duration) -> Vec<u8> {
        let mut msg = [0u8; INITIATION_LEN];
        let pending = handshake::write_initiation(
            &self.id,
            &self.victim,
            7,
            random(rng),
            wall,
            self.cookie.as_ref(),
            &mut msg,
        )
        .unwrap();
        self.last_mac1 = pending.mac1;
        msg.to_vec()
    }
}

#[test]
fn a_flood_with_valid_cookies_is_held_to_the_rate_and_a_peer_still_gets_in() {
    let mut p = Pair::new();
    let mut f = Flooder::new(p.b.public_key());
    let mut processed = 0;
    let mut limited = 0;
    // One attacker datagram into b; b's replies to the attacker are read
    // for a cookie, those to a go onto the link.
    let hit = |p: &mut Pair, f: &mut Flooder, processed: &mut usize, limited: &mut usize| {
        let mut m = f.initiation(&mut p.rng, p.wall);
        let n = m.len();
        match p
            .b
            .decapsulate(p.now, p.wall, &mut p.rng, f.addr, &mut m, n)
        {
            Decapsulated::Dropped(DropReason::RateLimited) => *limited += 1,
            Decapsulated::Dropped(DropReason::Cookie) => {}
            _ => *processed += 1,
        }
        let mut buf = [0u8; 2048];
        while let Some((to, n)) = p.b.poll_transmit(p.now, &mut buf) {
            if to == f.addr {
                if let Ok(c) = handshake::read_cookie_reply(&f.victim, &f.last_mac1, &buf[..n]) {
                    f.cookie = Some(c);
                }
            } else {
                p.link
                    .push_back((false, B_ADDR.parse().unwrap(), buf[..n].to_vec()));
            }
        }
    };
    // Put b under load; the attacker collects a cookie.
    for _ in 0..300 {
        hit(&mut p, &mut f, &mut processed, &mut limited);
    }
    assert!(f.cookie.is_some(), "the attacker holds a cookie");
    processed = 0;
    limited = 0;
    // a wants to talk while the flood runs: 200 initiations with a valid
    // mac2 every 100 ms (2,000 a second) for 8 simulated seconds.
    let start = p.now;
    p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 10));
    let mut done_at = None;
    for _ in 0..80 {
        for _ in 0..200 {
            hit(&mut p, &mut f, &mut processed, &mut limited);
        }
        p.run();
        if done_at.is_none() && !p.got_b.is_empty() {
            done_at = Some(p.now - start);
        }
        p.advance(Duration::from_millis(100));
    }
    // 16,000 attacker initiations over 8 s: the burst and 20 a second reach
    // the Diffie-Hellman, no more.
    let allowed = ratelimit::BURST as usize + 8 * ratelimit::PER_SECOND as usize + 1;
    assert!(
        processed <= allowed,
        "{processed} processed, {limited} limited"
    );
    assert!(limited >= 15_000, "{limited}");
    let took = done_at.expect("a's handshake completed during the flood");
    eprintln!("flood: {processed} processed, {limited} limited; a's handshake took {took:?}");
    assert!(
        took <= Duration::from_millis(6500),
        "took {took:?}: one cookie round trip"
    );
}

#[test]
fn ipv4_packets_shorter_than_their_header_are_dropped() {
    let mut p = Pair::new();
    p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 10));
    p.run();
    p.got_b.clear();
    for total in [0u16, 12, 19] {
        let mut bad = packet([10, 0, 0, 1], [10, 0, 0, 2], 10);
        bad[2..4].copy_from_slice(&total.to_be_bytes());
        p.send_a(&bad);
        p.run();
    }
    // An IHL below 5 as well.
    let mut bad = packet([10, 0, 0, 1], [10, 0, 0, 2], 10);
    bad[0] = 0x44;
    p.send_a(&bad);
    p.run();
    assert!(p.got_b.is_empty(), "{:?}", p.got_b);
    assert_eq!(
        p.drops
            .iter()
            .filter(|d| **d == DropReason::Malformed)
            .count(),
        4
    );
}

#[test]
fn the_responder_rekeys_after_too_many_messages_too() {
    let mut p = Pair::new();
    p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 10));
    p.run();
    // b answered a's handshake: it is the responder. Its counter reaches the limit.
    p.b.set_sent(0, REKEY_AFTER_MESSAGES);
    let r = p.send_b(&packet([10, 0, 0, 2], [10, 0, 0, 1], 10));
    assert!(matches!(r, Encapsulated::Send { .. }));
    let initiations = p
        .link
        .iter()
        .filter(|(to_b, _, b)| !to_b && b.len() == INITIATION_LEN)
        .count();
    assert_eq!(initiations, 1, "b starts a new handshake");
    p.run();
    assert!(p.drops.is_empty(), "{:?}", p.drops);
}

#[test]
fn a_new_connection_does_not_double_an_initiation_still_queued() {
    let mut p = Pair::new();
    let mut buf = vec![0u8; 2048];
    let ping = packet([10, 0, 0, 1], [10, 0, 0, 2], 10);
    buf[16..16 + ping.len()].copy_from_slice(&ping);
    let r =
        p.a.encapsulate(p.now, p.wall, &mut p.rng, &mut buf, ping.len());
    assert_eq!(r, Encapsulated::Queued);
    // The TCP connection to b opens before the initiation was sent.
    p.a.path_opened(p.now, p.wall, &mut p.rng, B_ADDR.parse().unwrap());
    let mut n = 0;
    while p.a.poll_transmit(p.now, &mut buf).is_some() {
        n += 1;
    }
    assert_eq!(n, 1, "one initiation, not two crossing");
    // Once it has gone (and was lost with the old connection), a new
    // connection starts a fresh one at once.
    p.a.path_opened(p.now, p.wall, &mut p.rng, B_ADDR.parse().unwrap());
    assert!(p.a.poll_transmit(p.now, &mut buf).is_some());
}

#[test]
fn halves_seal_and_open_out_of_order_and_a_racing_replay_is_dropped() {
    // What a thread per direction does: counters taken under the tunnel,
    // sealing and opening outside it, in any order.
    let mut p = Pair::new();
    p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 1));
    p.run();
    assert_eq!(p.got_b.len(), 1);
    let mut bufs: Vec<Vec<u8>> = Vec::new();
    let mut jobs = Vec::new();
    for i in 0..3 {
        let pkt = packet([10, 0, 0, 1], [10, 0, 0, 2], 40 + i);
        let mut buf = vec![0u8; 2048];
        buf[16..16 + pkt.len()].copy_from_slice(&pkt);
        match p
            .a
            .prepare_to(0, p.now, p.wall, &mut p.rng, &buf, pkt.len())
        {
            Sealing::Seal { job, to } => {
                assert_eq!(to, B_ADDR.parse::<SocketAddr>().unwrap());
                jobs.push((job, pkt.len()));
            }
            Sealing::Not(why) => panic!("{why:?}"),
        }
        bufs.push(buf);
    }
    // Sealed last to first.
    let mut sealed = Vec::new();
    for (i, (job, len)) in jobs.into_iter().enumerate().rev() {
        let n = job.seal(&mut bufs[i], len).unwrap();
        sealed.push(bufs[i][..n].to_vec());
    }
    // Opened: both halves of the first message start before either ends.
    let from = p.a_addr;
    let mut one = sealed[0].clone();
    let mut twin = sealed[0].clone();
    let n = one.len();
    let Received::Open(o1) = p.b.receive(p.now, p.wall, &mut p.rng, from, &mut one, n) else {
        panic!("a fresh data message is opened");
    };
    let Received::Open(o2) = p.b.receive(p.now, p.wall, &mut p.rng, from, &mut twin, n) else {
        panic!("its copy too: the counter is recorded only once opened");
    };
    let r1 = o1.open(&mut one);
    let r2 = o2.open(&mut twin);
    assert!(matches!(
        p.b.accept(p.now, p.wall, &mut p.rng, from, o1, r1, &one),
        Decapsulated::Packet(_)
    ));
    assert_eq!(
        p.b.accept(p.now, p.wall, &mut p.rng, from, o2, r2, &twin),
        Decapsulated::Dropped(DropReason::Session(SessionError::Replay)),
        "the copy that lost the race is a replay"
    );
    for mut m in sealed.into_iter().skip(1) {
        let n = m.len();
        let d = p.b.decapsulate(p.now, p.wall, &mut p.rng, from, &mut m, n);
        assert!(matches!(d, Decapsulated::Packet(_)), "{d:?}");
    }
    // A message whose session went while it was being opened is dropped.
    let pkt = packet([10, 0, 0, 1], [10, 0, 0, 2], 5);
    assert!(matches!(p.send_a(&pkt), Encapsulated::Send { .. }));
    let (_, from, mut late) = p.link.pop_back().unwrap();
    let n = late.len();
    let Received::Open(o) = p.b.receive(p.now, p.wall, &mut p.rng, from, &mut late, n) else {
        panic!("fresh");
    };
    let r = o.open(&mut late);
    assert!(p.b.remove_peer(&key(1).public_key()));
    assert_eq!(
        p.b.accept(p.now, p.wall, &mut p.rng, from, o, r, &late),
        Decapsulated::Dropped(DropReason::UnknownIndex)
    );
}

/// Peers removed one at a time (the last peer taking each one's place)
/// and many at once leave every index true (keys, routes, sessions and
/// handshakes in flight, send hints, rates), in tun and tap mode, and the
/// sessions of the peer that moved go on working both ways.
#[test]
fn removing_peers_keeps_every_index_true() {
    let extra = |i: u8| PeerConfig {
        public: key(100 + i).public_key(),
        psk: None,
        endpoint: Some(SocketAddr::from(([192, 0, 2, 100 + i], 51820))),
        allowed_ips: vec![
            format!("10.1.{i}.0/24").parse().unwrap(),
            format!("fd00::{i:x}/128").parse().unwrap(),
        ],
        keepalive: None,
        rate: (i % 3 == 0).then_some(1_000_000),
    };
    let exchange = |p: &mut Pair, n: usize| {
        let to_b = packet([10, 0, 0, 1], [10, 0, 0, 2], n);
        p.send_a(&to_b);
        p.run();
        assert_eq!(p.got_b.last(), Some(&to_b), "{:?}", p.drops);
        let to_a = packet([10, 0, 0, 2], [10, 0, 0, 1], n);
        p.send_b(&to_a);
        p.run();
        assert_eq!(p.got_a.last(), Some(&to_a), "{:?}", p.drops);
    };
    let mut p = Pair::new();
    let a_at_b = p.b.peers().next().unwrap().0.clone();
    // a last, after 40 others: the first removal moves it.
    let mut peers: Vec<PeerConfig> = (0..40).map(extra).collect();
    peers.push(a_at_b);
    p.b = Tunnel::new(key(2), peers);
    p.b.check_indices();
    exchange(&mut p, 1);
    // Handshakes in flight and packets queued for every fourth of the others.
    for i in (0..40).step_by(4) {
        let pkt = packet([10, 0, 0, 2], [10, 1, i, 1], 1);
        let mut buf = vec![0u8; 2048];
        buf[16..16 + pkt.len()].copy_from_slice(&pkt);
        let r =
            p.b.encapsulate(p.now, p.wall, &mut p.rng, &mut buf, pkt.len());
        assert_eq!(r, Encapsulated::Queued);
    }
    p.collect();
    p.link.clear();
    p.b.check_indices();
    let mut left: Vec<u8> = (0..40).collect();
    let mut rng = Rng(7);
    for round in 0..30 {
        let at = usize::from(random::<1>(&mut rng)[0]) % left.len();
        let gone = left.swap_remove(at);
        assert!(p.b.remove_peer(&key(100 + gone).public_key()));
        assert!(!p.b.remove_peer(&key(100 + gone).public_key()), "once");
        p.b.check_indices();
        exchange(&mut p, round + 2);
    }
    assert_eq!(p.b.peer_count(), 11);
    // Many at once: the rebuild.
    let gone: std::collections::HashSet<PublicKey> =
        left.iter().map(|&i| key(100 + i).public_key()).collect();
    assert_eq!(p.b.remove_peers(&gone), 10);
    p.b.check_indices();
    exchange(&mut p, 40);
    assert_eq!(p.b.peer_count(), 1);

    // Tap mode: no routes, the same indices.
    let mut t = Tunnel::with_layer(
        key(3),
        (0..40).map(extra).collect(),
        Layer::Ethernet,
        switch::DEFAULT_AGING,
        switch::DEFAULT_CAP,
    );
    t.check_indices();
    for i in [39, 0, 17, 5] {
        assert!(t.remove_peer(&key(100 + i).public_key()));
        t.check_indices();
    }
    let gone: std::collections::HashSet<PublicKey> =
        (20..35).map(|i| key(100 + i).public_key()).collect();
    assert_eq!(t.remove_peers(&gone), 15);
    t.check_indices();
    assert_eq!(t.peer_count(), 21);
}

#[test]
fn a_message_whose_session_moved_while_it_was_opened_is_still_accepted() {
    let mut p = Pair::new();
    // b knows another peer before a: removing it moves a's sessions down a place.
    let a_at_b = p.b.peers().next().unwrap().0.clone();
    let other = PeerConfig {
        public: key(9).public_key(),
        psk: None,
        endpoint: None,
        allowed_ips: vec!["10.9.0.0/24".parse().unwrap()],
        keepalive: None,
        rate: None,
    };
    p.b = Tunnel::new(key(2), vec![other.clone(), a_at_b]);
    let first = packet([10, 0, 0, 1], [10, 0, 0, 2], 10);
    assert_eq!(p.send_a(&first), Encapsulated::Queued);
    p.run();
    assert_eq!(p.got_b, vec![first]);
    let pkt = packet([10, 0, 0, 1], [10, 0, 0, 2], 20);
    assert!(matches!(p.send_a(&pkt), Encapsulated::Send { .. }));
    let (_, from, mut msg) = p.link.pop_back().unwrap();
    let n = msg.len();
    let Received::Open(o) = p.b.receive(p.now, p.wall, &mut p.rng, from, &mut msg, n) else {
        panic!("fresh");
    };
    let r = o.open(&mut msg);
    assert!(p.b.remove_peer(&other.public));
    let Decapsulated::Packet(range) = p.b.accept(p.now, p.wall, &mut p.rng, from, o, r, &msg)
    else {
        panic!("the session is still there, one place down");
    };
    assert_eq!(msg[range], pkt[..]);
}

#[test]
fn packets_waiting_for_a_handshake_are_bounded_in_bytes_too() {
    let mut p = Pair::new();
    let big = packet([10, 0, 0, 1], [10, 0, 0, 2], 20_000);
    for _ in 0..10 {
        let mut buf = vec![0u8; 16 + big.len() + 32];
        buf[16..16 + big.len()].copy_from_slice(&big);
        let r =
            p.a.encapsulate(p.now, p.wall, &mut p.rng, &mut buf, big.len());
        assert_eq!(r, Encapsulated::Queued);
    }
    let (_, _, stats) = p.a.peers().next().unwrap();
    // 96 KiB hold four of them: the six oldest went.
    assert_eq!(stats.drops.queue_full, 6);
}

/// What a pair's tunnels have seen, as text: packets delivered, drops,
/// each peer's endpoint and counters.
fn trace(p: &Pair) -> String {
    let peers = |t: &Tunnel| {
        t.peers()
            .map(|(_, e, s)| format!("{e:?} {s:?}"))
            .collect::<Vec<_>>()
            .join("; ")
    };
    format!(
        "a got {:?}\nb got {:?}\ndrops {:?}\na: {}\nb: {}\nlink {}",
        p.got_a,
        p.got_b,
        p.drops,
        peers(&p.a),
        peers(&p.b),
        p.link.len()
    )
}

/// Data both ways, keepalives, replays, reordering, a forgery, a spoofed
/// source, roaming, a rekey on time and an expired session, with the lone
/// path first (`lone`) or not; the trace after every step.
fn lone_scenario(lone: bool) -> (Vec<String>, usize) {
    let mut p = Pair::new();
    p.lone = lone;
    let mut steps = vec![];
    let a_to_b = |n| packet([10, 0, 0, 1], [10, 0, 0, 2], n);
    let b_to_a = |n| packet([10, 0, 0, 2], [10, 0, 0, 1], n);
    p.send_a(&a_to_b(1));
    p.run();
    steps.push(trace(&p));
    for i in 0..5 {
        p.send_a(&a_to_b(10 + i));
        p.send_b(&b_to_a(20 + i));
        p.run();
    }
    steps.push(trace(&p));
    // Reordered and replayed.
    let mut held = vec![];
    for i in 0..4 {
        p.send_a(&a_to_b(30 + i));
        held.push(p.link.pop_back().unwrap());
    }
    for i in [3, 1, 0, 2, 1, 3] {
        let (to_b, from, bytes) = held[i].clone();
        p.deliver(to_b, from, bytes);
    }
    steps.push(trace(&p));
    // Forged: an unseen counter, a bad tag, from elsewhere.
    let (to_b, _, mut forged) = held[0].clone();
    forged[8] = forged[8].wrapping_add(100);
    let last = forged.len() - 1;
    forged[last] ^= 1;
    p.deliver(to_b, "198.51.100.1:9".parse().unwrap(), forged);
    // Truncated, and an unknown index.
    let (to_b, from, bytes) = held[1].clone();
    p.deliver(to_b, from, bytes[..20].to_vec());
    let (to_b, from, mut bytes) = held[2].clone();
    bytes[4] ^= 0xff;
    p.deliver(to_b, from, bytes);
    steps.push(trace(&p));
    // A spoofed source; a moves.
    p.send_a(&packet([10, 9, 9, 9], [10, 0, 0, 2], 1));
    p.run();
    p.a_addr = "203.0.113.7:40000".parse().unwrap();
    p.send_a(&a_to_b(2));
    p.run();
    p.send_b(&b_to_a(3));
    p.run();
    steps.push(trace(&p));
    // Keepalives, then rekeys on time, then an expired session.
    for secs in [11, 11, 110, 10, 200] {
        p.advance(Duration::from_secs(secs));
        p.run();
        p.send_a(&a_to_b(4));
        p.run();
        p.send_b(&b_to_a(5));
        p.run();
        steps.push(trace(&p));
    }
    // A rate limit on b for a: what arrives over its burst (64 KiB) waits
    // (or is dropped).
    p.send_a(&a_to_b(8));
    p.run();
    let a_key = key(1).public_key();
    assert!(p.b.update_peer(&a_key, |c| c.rate = Some(8_000)));
    for _ in 0..100 {
        p.send_a(&a_to_b(1000));
    }
    p.run();
    steps.push(trace(&p));
    // A new pair, silent until the initiator's session nears its end:
    // data from b then makes a rekey (on receipt), which the one pass
    // leaves to the other.
    let taken = p.lone_taken;
    let mut p = Pair::new();
    p.lone = lone;
    p.send_a(&a_to_b(6));
    p.run();
    p.advance(Duration::from_secs(11));
    p.run(); // b's keepalive
    p.advance(Duration::from_secs(155));
    assert!(p.link.is_empty());
    p.send_b(&b_to_a(7));
    p.run();
    steps.push(trace(&p));
    (steps, taken + p.lone_taken)
}

#[test]
fn a_lone_datagram_opened_in_one_pass_comes_to_what_the_two_halves_make_of_it() {
    let (general, _) = lone_scenario(false);
    let (lone, taken) = lone_scenario(true);
    for (i, (g, l)) in general.iter().zip(&lone).enumerate() {
        assert_eq!(g, l, "step {i}");
    }
    assert_eq!(general.len(), lone.len());
    // The one-pass path carried most of it (and left handshakes, rekeys
    // and the rest to the other).
    assert!(taken >= 20, "{taken} datagrams took the one-pass path");
}

#[test]
fn a_new_private_key_drops_the_sessions_and_handshakes_again_under_it() {
    let mut p = Pair::new();
    let ping = packet([10, 0, 0, 1], [10, 0, 0, 2], 100);
    p.send_a(&ping);
    p.run();
    assert_eq!(p.got_b.len(), 1);
    // The same key: nothing changes.
    assert!(!p.a.set_private_key(key(1)));
    assert!(matches!(p.send_a(&ping), Encapsulated::Send { .. }));
    p.run();
    assert_eq!(p.got_b.len(), 2);
    // A new one: b learns it (as its admin would: the peer replaced).
    let old = key(1).public_key();
    assert!(p.a.set_private_key(key(3)));
    assert_eq!(p.a.public_key(), key(3).public_key());
    let psk = PresharedKey::from_random([7; 32]);
    p.b.remove_peer(&old);
    p.b.add_peer(PeerConfig {
        public: key(3).public_key(),
        psk: Some(psk),
        endpoint: None,
        allowed_ips: vec!["10.0.0.1/32".parse().unwrap()],
        keepalive: None,
        rate: None,
    });
    // No session left under the old identity: the packet waits for a new
    // handshake, which b answers.
    assert_eq!(p.send_a(&ping), Encapsulated::Queued);
    p.run();
    assert_eq!(p.got_b.len(), 3, "{:?}", p.drops);
    // A key that is a peer's: that peer goes (a tunnel is not its own peer).
    assert!(p.a.set_private_key(key(2)));
    assert_eq!(p.a.peer_count(), 0);
}

#[test]
fn what_no_peer_can_be_named_for_is_counted_by_kind() {
    let mut p = Pair::new();
    let from: SocketAddr = "192.0.2.99:4000".parse().unwrap();
    // Garbage, and a data message for no session.
    let mut junk = vec![9u8; 40];
    p.a.decapsulate(p.now, p.wall, &mut p.rng, from, &mut junk, 40);
    let mut data = vec![0u8; 48];
    data[0] = 4;
    data[4..8].copy_from_slice(&0x1234_5678u32.to_le_bytes());
    p.a.decapsulate(p.now, p.wall, &mut p.rng, from, &mut data, 48);
    // An initiation from a key that is not a's peer (a knows 2 only).
    let mut stranger = Tunnel::new(
        key(9),
        vec![PeerConfig {
            public: key(1).public_key(),
            psk: None,
            endpoint: Some(A_ADDR.parse().unwrap()),
            allowed_ips: vec!["10.0.0.1/32".parse().unwrap()],
            keepalive: None,
            rate: None,
        }],
    );
    let mut buf = vec![0u8; 2048];
    buf[16..16 + 20].copy_from_slice(&packet([10, 0, 0, 9], [10, 0, 0, 1], 0)[..20]);
    stranger.encapsulate(p.now, p.wall, &mut p.rng, &mut buf, 20);
    let (_, n) = stranger
        .poll_transmit(p.now, &mut buf)
        .expect("an initiation");
    p.a.decapsulate(p.now, p.wall, &mut p.rng, from, &mut buf, n);
    let u = p.a.unattributed();
    assert_eq!(
        (u.malformed, u.no_session, u.unknown_key, u.bad_handshake),
        (1, 1, 1, 0),
        "{u:?}"
    );
}

#[test]
fn an_endpoint_given_again_is_used_though_the_peer_roamed_from_it() {
    let mut p = Pair::new();
    let pa = key(1).public_key();
    let home: SocketAddr = A_ADDR.parse().unwrap();
    assert!(p.b.set_endpoint(&pa, home));
    p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 1));
    p.run();
    p.a_addr = "203.0.113.7:40000".parse().unwrap();
    p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 2));
    p.run();
    let live = |t: &Tunnel| t.peers().next().unwrap().1;
    assert_eq!(live(&p.b), Some(p.a_addr), "roamed");
    // The configuration alone, the same as before: where packets go stays.
    p.b.update_peer(&pa, |c| c.endpoint = Some(home));
    assert_eq!(live(&p.b), Some(p.a_addr));
    // Given (wg set ... endpoint): sent there from now on.
    assert!(p.b.set_endpoint(&pa, home));
    assert_eq!(live(&p.b), Some(home));
}

/// A tunnel that carries keepalives alone (PersistentKeepalive, no data)
/// rekeys after REKEY_AFTER_TIME as one with data does, as the kernel's
/// does: it rekeyed only when the session ran out, at 180 s, and a peer
/// that had restarted meanwhile was cut off a minute longer.
#[test]
fn keepalives_alone_keep_the_key_fresh() {
    let mut p = Pair::new();
    p.a.update_peer(&key(2).public_key(), |c| {
        c.keepalive = Some(Duration::from_secs(5))
    });
    p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 1));
    p.run();
    let mut first_rekey = None;
    for s in 1..=130u64 {
        p.advance(Duration::from_secs(1));
        if p.link
            .iter()
            .any(|(to_b, _, m)| *to_b && m.len() == INITIATION_LEN)
        {
            first_rekey.get_or_insert(s);
        }
        p.run();
    }
    let at = first_rekey.expect("no rekey in 130 s");
    assert!((118..=126).contains(&at), "rekeyed at {at} s");
}

/// A hub that starts with more peers than the load threshold (128
/// handshakes a second) initiates to all of them at once: their answers
/// to its own handshakes do not put it under load, so none is answered
/// with a cookie (each waited 5 s for a retry).
#[test]
fn a_hub_hears_the_answers_to_its_own_handshakes_without_cookies() {
    let n = 200u16;
    let addr = |i: u16| -> SocketAddr {
        format!("198.51.100.{}:{}", i % 250, 40000 + i)
            .parse()
            .unwrap()
    };
    let hub_key = PrivateKey::from_random([9; 32]);
    let keys: Vec<PrivateKey> = (0..n)
        .map(|i| {
            let mut b = [0u8; 32];
            b[1..3].copy_from_slice(&i.to_le_bytes());
            b[3] = 0x5a;
            PrivateKey::from_random(b)
        })
        .collect();
    let mut hub = Tunnel::new(
        hub_key.clone(),
        keys.iter()
            .enumerate()
            .map(|(i, k)| PeerConfig {
                public: k.public_key(),
                psk: None,
                endpoint: Some(addr(i as u16)),
                allowed_ips: vec![],
                keepalive: None,
                rate: None,
            })
            .collect(),
    );
    let mut spokes: Vec<Tunnel> = keys
        .iter()
        .map(|k| {
            Tunnel::new(
                k.clone(),
                vec![PeerConfig {
                    public: hub_key.public_key(),
                    psk: None,
                    endpoint: None,
                    allowed_ips: vec![],
                    keepalive: None,
                    rate: None,
                }],
            )
        })
        .collect();
    let (now, wall) = (Instant::now(), Duration::from_secs(1_700_000_000));
    let mut rng = Rng(7);
    hub.handshake_all();
    let mut buf = [0u8; 2048];
    let mut initiations = Vec::new();
    // Made by the timers, a slice a pass, the next pass at once.
    let mut passes = Vec::new();
    while hub.poll_timeout(now) <= now {
        hub.handle_timeout(now, wall, &mut rng);
        let before = initiations.len();
        while let Some((to, len)) = hub.poll_transmit(now, &mut buf) {
            initiations.push((to, buf[..len].to_vec()));
        }
        passes.push(initiations.len() - before);
    }
    assert_eq!(passes, [64, 64, 64, 8], "initiations a pass");
    assert_eq!(initiations.len(), usize::from(n));
    let hub_addr: SocketAddr = "192.0.2.1:51820".parse().unwrap();
    let mut cookies = 0;
    for (to, mut msg) in initiations {
        let i = (0..n).find(|&i| addr(i) == to).unwrap();
        let spoke = &mut spokes[usize::from(i)];
        let len = msg.len();
        spoke.decapsulate(now, wall, &mut rng, hub_addr, &mut msg, len);
        let (_, rlen) = spoke.poll_transmit(now, &mut buf).expect("a response");
        let mut resp = buf[..rlen].to_vec();
        match hub.decapsulate(now, wall, &mut rng, to, &mut resp, rlen) {
            Decapsulated::Dropped(DropReason::Cookie) => cookies += 1,
            Decapsulated::Dropped(other) => panic!("{other:?}"),
            _ => {}
        }
    }
    assert_eq!(
        cookies, 0,
        "answers to the hub's own handshakes met cookies"
    );
    assert_eq!(
        hub.peers()
            .filter(|(_, _, s)| s.last_handshake.is_some())
            .count(),
        usize::from(n)
    );
}

/// An initiator whose session nears its end rekeys when a keepalive
/// arrives, as for data (the kernel's keep_key_fresh on receipt): a
/// tunnel kept up by the other end's keepalives alone lost its session at
/// 180 s and waited for a new handshake.
#[test]
fn a_keepalive_received_near_the_end_of_a_session_rekeys_too() {
    let mut p = Pair::new();
    p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 1));
    p.run();
    let a_key = p.a.public_key();
    p.b.update_peer(&a_key, |c| c.keepalive = Some(Duration::from_secs(1)));
    let handshake = |p: &Pair| p.a.peers().next().unwrap().2.last_handshake;
    let first = handshake(&p);
    let mut rekeyed_at = None;
    for s in 1..=175u64 {
        p.advance(Duration::from_secs(1));
        p.run();
        if handshake(&p) != first {
            rekeyed_at = Some(s);
            break;
        }
    }
    let at = rekeyed_at.expect("a never rekeyed before its session ran out");
    assert!((160..=170).contains(&at), "rekeyed at {at} s");
}

/// Forged answers to a handshake of ours (its index read off our
/// initiation, a valid mac1 from our public key, the rest random) each
/// cost a Diffie-Hellman before they fail: a flood of them puts the
/// tunnel under load as any other handshake flood (they were never asked
/// for a cookie).
#[test]
fn forged_answers_to_our_handshake_count_toward_the_load() {
    let mut p = Pair::new();
    p.send_a(&packet([10, 0, 0, 1], [10, 0, 0, 2], 1));
    let init = p.link.pop_front().unwrap();
    let index: [u8; 4] = init.2[field::INIT_SENDER].try_into().unwrap();
    let mac1_key = crate::wg::crypto::hash(&[crate::wg::crypto::LABEL_MAC1, &p.a.public_key().0]);
    let forger: SocketAddr = "198.51.100.9:5555".parse().unwrap();
    let mut rng = Rng(3);
    let mut cookies = 0;
    for _ in 0..300 {
        let mut msg = [0u8; RESPONSE_LEN];
        msg[0] = 2;
        msg[field::RESP_RECEIVER].copy_from_slice(&index);
        msg[field::RESP_EPHEMERAL].copy_from_slice(&random::<32>(&mut rng));
        let m1 = crate::wg::crypto::mac(&mac1_key, &[&msg[..field::RESP_MAC1.start]]);
        msg[field::RESP_MAC1].copy_from_slice(&m1);
        let n = msg.len();
        let mut buf = msg.to_vec();
        if let Decapsulated::Dropped(DropReason::Cookie) =
            p.a.decapsulate(p.now, p.wall, &mut p.rng, forger, &mut buf, n)
        {
            cookies += 1;
        }
    }
    assert!(
        cookies > 100,
        "{cookies} of 300 forged answers met a cookie"
    );
}

/// Peers due for a handshake together (here 200 with a persistent
/// keepalive and no session, as after `wg syncconf` on a hub) are
/// initiated a slice at a time, the next slice at once: one pass for
/// 10,000 held the tunnel's packets for 964 ms.
#[test]
fn handshakes_due_together_start_a_slice_at_a_time() {
    let n = 200u16;
    let peers = (0..n)
        .map(|i| {
            let mut b = [0u8; 32];
            b[1..3].copy_from_slice(&i.to_le_bytes());
            b[3] = 0x6b;
            PeerConfig {
                public: PrivateKey::from_random(b).public_key(),
                psk: None,
                endpoint: Some(
                    format!("198.51.100.{}:{}", i % 250, 40000 + i)
                        .parse()
                        .unwrap(),
                ),
                allowed_ips: vec![],
                keepalive: Some(Duration::from_secs(25)),
                rate: None,
            }
        })
        .collect();
    let mut hub = Tunnel::new(PrivateKey::from_random([10; 32]), peers);
    let (now, wall) = (Instant::now(), Duration::from_secs(1_700_000_000));
    let mut rng = Rng(9);
    let mut buf = [0u8; 2048];
    let mut slices = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..10 {
        hub.handle_timeout(now, wall, &mut rng);
        let mut sent = 0;
        while let Some((to, _)) = hub.poll_transmit(now, &mut buf) {
            assert!(seen.insert(to), "a second initiation to {to}");
            sent += 1;
        }
        slices.push(sent);
        if hub.poll_timeout(now) > now {
            break;
        }
    }
    let per = INITIATIONS_PER_PASS;
    assert_eq!(
        slices,
        [per, per, per, usize::from(n) - 3 * per],
        "{slices:?}"
    );
    // None due again until their retry.
    hub.handle_timeout(now, wall, &mut rng);
    assert!(hub.poll_transmit(now, &mut buf).is_none());
}

/// A persistent keepalive shorter than the handshake's retry, to a peer
/// that does not answer: the next timer is the retry, not the keepalive
/// already past (a keepalive of 1 s spun a tunnel's loop at 84% of a core
/// until the retry).
#[test]
fn a_short_keepalive_to_a_silent_peer_waits_for_the_retry() {
    let peer = PeerConfig {
        public: PrivateKey::from_random([11; 32]).public_key(),
        psk: None,
        endpoint: Some("198.51.100.9:51820".parse().unwrap()),
        allowed_ips: vec![],
        keepalive: Some(Duration::from_secs(1)),
        rate: None,
    };
    let mut t = Tunnel::new(PrivateKey::from_random([12; 32]), vec![peer]);
    let (now, wall) = (Instant::now(), Duration::from_secs(1_700_000_000));
    let mut rng = Rng(3);
    let mut buf = [0u8; 2048];
    t.handle_timeout(now, wall, &mut rng);
    assert!(t.poll_transmit(now, &mut buf).is_some(), "an initiation");
    let later = now + Duration::from_millis(1500);
    let next = t.poll_timeout(later);
    assert!(
        next > later,
        "next timer {:?} after the initiation: at once, again and again",
        next - now
    );
}
