//! The guest network's DHCP server: any datagram, at any time, from any
//! client, never panics, and never leaves one address with two clients.
#![no_main]

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tapir_proto::dhcp::Pool;

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let mut pool = Pool::new(
        "192.168.77.0/28".parse().unwrap(),
        Ipv4Addr::new(192, 168, 77, 1),
        Duration::from_secs(60),
    );
    // The input as a sequence of datagrams, each behind a 16-bit length
    // and a time step, so a run holds many exchanges.
    let mut rest = data;
    let mut t = now;
    while rest.len() >= 3 {
        let (head, tail) = rest.split_at(3);
        let (len, step) = (u16::from_be_bytes([head[0], head[1]]), head[2]);
        let n = usize::from(len).min(tail.len());
        t += Duration::from_secs(u64::from(step));
        let _ = pool.handle(t, &tail[..n]);
        rest = &tail[n..];
        let held: Vec<Ipv4Addr> = pool.leases(t).map(|l| l.ip).collect();
        let mut unique = held.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), held.len(), "an address held twice");
    }
});
