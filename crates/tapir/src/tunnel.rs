//! `tapir run`: one WireGuard tunnel in the foreground.
//!
//! ```text
//!   TunnelConfig ─▶ resolve endpoints ─▶ create tun (transient) ─▶ MTU, addresses, up, routes
//!                ─▶ bind UDP [::]:port ─▶ loop:
//!        poll(tun, udp, 250 ms)
//!        tun readable: read up to 64 packets into batch slots ─▶ Tunnel::encapsulate ─▶ sendmmsg
//!        udp readable: recvmmsg up to 64 ─▶ Tunnel::decapsulate in place ─▶ write to tun
//!        then: poll_transmit (handshakes, keepalives, queued) ─▶ sendto; handle_timeout
//!   shutdown: the tun goes with its descriptor, and its addresses and routes with it
//! ```
//! UDP moves in batches of up to 64 datagrams per system call (recvmmsg,
//! sendmmsg). The tun device has the virtio-net header with TSO and checksum
//! offload: a read can be a 64 KiB TCP super-packet, cut here into segments
//! directly in the send batch; on the way in, consecutive TCP segments are
//! joined again (GRO) and written as one super-packet.

use std::fs::File;
use std::io::{self, Read};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6, ToSocketAddrs, UdpSocket};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tapir_proto::wg::tunnel::{Decapsulated, Encapsulated, PeerConfig, Random, Tunnel};
use tapir_sys::mmsg::Batch;
use tapir_sys::{Mode, Netlink, TunDevice, TunOptions, offload};
use tapir_wire::vnet::{self, VnetHeader};

/// Datagrams per system call.
const BATCH: usize = 64;
/// Bytes per batch slot: the largest UDP datagram, or a tun packet with the
/// WireGuard header before and padding and tag after.
const SLOT: usize = 65536 + 64;

use crate::config::TunnelConfig;
use crate::dev::DevError;

/// Randomness from the kernel.
pub struct OsRandom(File);

impl OsRandom {
    /// Opens `/dev/urandom`.
    pub fn new() -> io::Result<Self> {
        File::open("/dev/urandom").map(Self)
    }
}

impl Random for OsRandom {
    fn fill(&mut self, buf: &mut [u8]) {
        self.0
            .read_exact(buf)
            .expect("/dev/urandom does not run dry");
    }
}

/// 32 random bytes from the kernel (keys).
pub fn random32() -> io::Result<[u8; 32]> {
    let mut b = [0u8; 32];
    OsRandom::new()?.0.read_exact(&mut b)?;
    Ok(b)
}

fn to_v6(a: SocketAddr) -> SocketAddrV6 {
    match a {
        SocketAddr::V4(v4) => SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0),
        SocketAddr::V6(v6) => v6,
    }
}

fn from_v6(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => SocketAddr::V6(v6),
        },
        v4 => v4,
    }
}

fn wall() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Resolves the peers' endpoints (once, at start).
pub fn peer_configs(config: &TunnelConfig) -> Result<Vec<PeerConfig>, DevError> {
    config
        .peers
        .iter()
        .map(|p| {
            let endpoint = match &p.endpoint {
                Some(e) => Some(
                    e.to_socket_addrs()
                        .ok()
                        .and_then(|mut it| it.next())
                        .ok_or_else(|| {
                            DevError::Invalid(format!(
                                "{}:{}: Endpoint {e} does not resolve",
                                config.file.display(),
                                p.line
                            ))
                        })?,
                ),
                None => None,
            };
            Ok(PeerConfig {
                public: p.public_key,
                psk: p.psk.clone(),
                endpoint,
                allowed_ips: p.allowed_ips.clone(),
                keepalive: p.keepalive.map(|k| Duration::from_secs(k.into())),
                rate: None,
            })
        })
        .collect()
}

/// How often an unreachable peer's host name is looked up again.
pub const RERESOLVE_EVERY: Duration = Duration::from_secs(30);
/// How long without a handshake counts as "reconnecting".
pub const RERESOLVE_AFTER: Duration = Duration::from_secs(180);

/// Whether a peer with a host-name endpoint should have it resolved again:
/// no handshake for [`RERESOLVE_AFTER`] (or never since `started`), and no
/// lookup in the last [`RERESOLVE_EVERY`].
pub fn reresolve_due(
    last_handshake: Option<Duration>,
    wall_now: Duration,
    started: Duration,
    last_try: Option<Instant>,
    now: Instant,
) -> bool {
    let since = last_handshake.unwrap_or(started);
    wall_now.saturating_sub(since) >= RERESOLVE_AFTER
        && last_try.is_none_or(|t| now.saturating_duration_since(t) >= RERESOLVE_EVERY)
}

/// A tunnel whose device, addresses, routes and socket are set up, ready to run.
pub struct Started {
    name: tapir_sys::IfName,
    dev: TunDevice,
    socket: UdpSocket,
    tunnel: Tunnel,
    control: Option<crate::uapi::ControlSocket>,
    private_key: tapir_proto::wg::keys::PrivateKey,
    port: u16,
    /// Peers whose endpoint is a host name, to look up again on reconnect.
    hostnames: Vec<(tapir_proto::wg::keys::PublicKey, String)>,
}

/// Sets a tunnel up: resolves its peers, binds its port, creates and
/// configures its device. On failure nothing is left: the device is
/// transient and goes with its descriptor.
pub fn start(config: &TunnelConfig, tun_path: &Path) -> Result<Started, DevError> {
    let peers = peer_configs(config)?;
    if !crate::caps::has_net_admin() {
        return Err(DevError::Permission(crate::caps::net_admin_missing(
            "running a tunnel",
        )));
    }
    let name = &config.name;
    let mut nl = Netlink::open()?;
    if nl.link(name.as_str())?.is_some() {
        return Err(DevError::Invalid(format!(
            "{name} already exists: another tunnel (or device) has that name; take it down (tapir dev del {name}) or rename {}",
            config.file.display()
        )));
    }
    let socket = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, config.listen_port.unwrap_or(0)))
        .map_err(|e| {
            DevError::Invalid(format!(
                "cannot listen on UDP port {}: {e}{}",
                config.listen_port.unwrap_or(0),
                if e.kind() == io::ErrorKind::AddrInUse {
                    " (another program uses it: choose another ListenPort)"
                } else {
                    ""
                }
            ))
        })?;
    socket
        .set_nonblocking(true)
        .map_err(|e| DevError::Runtime(format!("UDP socket: {e}")))?;
    // Not persistent: the device, its addresses and its routes go away with
    // the descriptor, on any exit.
    // With the virtio-net header the kernel hands us TCP super-packets (TSO)
    // and leaves checksums to us: fewer reads, and no per-segment TCP work in
    // the sender's kernel.
    let options = TunOptions {
        vnet_hdr: true,
        ..TunOptions::new(Mode::Tun)
    };
    let dev = TunDevice::create(tun_path, name, options)?;
    if let Err(e) = dev.set_offload(offload::CSUM | offload::TSO4 | offload::TSO6) {
        eprintln!("tapir: {name}: no TSO ({e}): one packet per read");
    }
    dev.set_nonblocking(true)
        .map_err(|e| DevError::Runtime(format!("{name}: {e}")))?;
    let index = nl
        .link(name.as_str())?
        .ok_or_else(|| DevError::NotFound(name.to_string()))?
        .index;
    nl.set_mtu(index, config.mtu)?;
    for a in &config.addresses {
        nl.add_address(index, *a, None)?;
    }
    nl.set_up(index, true)?;
    let routes: Vec<ipnet::IpNet> = match &config.routes {
        Some(r) => r.clone(),
        None => config
            .peers
            .iter()
            .flat_map(|p| p.allowed_ips.iter().copied())
            .collect(),
    };
    {
        for net in &routes {
            if net.prefix_len() == 0 && config.routes.is_none() {
                eprintln!(
                    "tapir: {name}: not routing {net} into the tunnel (a default route needs policy routing, which tapir does not set up yet)"
                );
                continue;
            }
            match nl.add_route(index, net.trunc(), None) {
                Ok(()) => {}
                Err(e) if e.errno() == Some(17) => {} // EEXIST: covered by an address's prefix route
                Err(e) => return Err(e.into()),
            }
        }
    }
    let port = socket.local_addr().map(|a| a.port()).unwrap_or(0);
    let tunnel = Tunnel::new(config.private_key.clone(), peers);
    eprintln!(
        "tapir: {name}: up, public key {}, listening on UDP port {port}, {} peer(s)",
        tunnel.public_key(),
        config.peers.len()
    );
    let control = match crate::uapi::ControlSocket::bind(name.as_str()) {
        Ok(c) => Some(c),
        Err(why) => {
            eprintln!(
                "tapir: {name}: warning: no control socket, so wg show will not see this tunnel: {why}"
            );
            None
        }
    };
    Ok(Started {
        name: name.clone(),
        dev,
        socket,
        tunnel,
        control,
        private_key: config.private_key.clone(),
        port,
        hostnames: config
            .peers
            .iter()
            .filter_map(|p| {
                let e = p.endpoint.as_ref()?;
                e.parse::<SocketAddr>()
                    .is_err()
                    .then(|| (p.public_key, e.clone()))
            })
            .collect(),
    })
}

/// Writes a coalesced super-packet. A kernel that refuses GSO writes (EINVAL)
/// turns GRO off for the rest of the run, said once; TCP resends what was lost.
fn write_super(dev: &TunDevice, bytes: &[u8], gro_on: &mut bool, name: &tapir_sys::IfName) {
    if let Err(e) = dev.write(bytes) {
        if e.raw_os_error() == Some(22) && *gro_on {
            *gro_on = false;
            eprintln!(
                "tapir: {name}: the kernel refuses coalesced writes ({e}): GRO off, one packet per write"
            );
        }
    }
}

/// Starts every tunnel first (dropping those started if one fails), then
/// runs each on a thread of its own until `shutdown`, or until one fails,
/// which stops the others.
pub fn run_all(
    configs: &[TunnelConfig],
    tun_path: &Path,
    shutdown: &AtomicBool,
) -> Result<(), DevError> {
    let mut started = Vec::new();
    for c in configs {
        started.push(start(c, tun_path)?);
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = started
            .into_iter()
            .map(|t| {
                s.spawn(move || {
                    let result = t.run(shutdown);
                    if result.is_err() {
                        shutdown.store(true, Ordering::Relaxed);
                    }
                    result
                })
            })
            .collect();
        let mut first = Ok(());
        for h in handles {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(DevError::Runtime("a tunnel thread panicked".into())));
            if first.is_ok() {
                first = r;
            }
        }
        first
    })
}

impl Started {
    /// Moves packets until `shutdown`; the device goes away when this returns.
    pub fn run(self, shutdown: &AtomicBool) -> Result<(), DevError> {
        let Started {
            name,
            dev,
            socket,
            mut tunnel,
            control,
            private_key,
            port,
            hostnames,
        } = self;
        let started = wall();
        let mut last_lookup: Vec<Option<Instant>> = vec![None; hostnames.len()];
        let mut rng =
            OsRandom::new().map_err(|e| DevError::Runtime(format!("/dev/urandom: {e}")))?;
        // Batches allocated once: the datapath allocates nothing per packet.
        let mut rx = Batch::new(BATCH, SLOT);
        let mut tx = Batch::new(BATCH, SLOT);
        let mut out = vec![0u8; SLOT];
        let mut big = vec![0u8; vnet::LEN + 65536];
        let mut gro = vnet::Coalescer::new();
        let mut gro_on = true;
        let mut next_timer = Instant::now();
        while !shutdown.load(Ordering::Relaxed) {
            // Without a control socket, the UDP socket stands in as the third fd.
            let control_fd = control
                .as_ref()
                .map_or(socket.as_fd(), |c| c.listener().as_fd());
            let [tun_ready, udp_ready, control_ready] = tapir_sys::poll::readable(
                [dev.as_fd(), socket.as_fd(), control_fd],
                Duration::from_millis(250),
            )
            .map_err(|e| DevError::Runtime(format!("poll: {e}")))?;
            let now = Instant::now();
            let wall_now = wall();
            if tun_ready {
                // Read packets (TCP super-packets with TSO), cut them into
                // segments straight into the send batch, seal each where it
                // lies, and send the batch in one call.
                let mut k = 0;
                for _ in 0..BATCH {
                    let n = match dev.read(&mut big) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            return Err(DevError::Runtime(format!(
                                "{name}: reading the device: {e}"
                            )));
                        }
                    };
                    let Some(hdr) = VnetHeader::parse(&big[..n]) else {
                        continue;
                    };
                    let packet = &mut big[vnet::LEN..n];
                    let count = if hdr.is_gso() {
                        match vnet::segment_count(&hdr, packet) {
                            Ok(c) => c,
                            Err(_) => continue,
                        }
                    } else {
                        if vnet::finish_checksum(&hdr, packet).is_err() {
                            continue;
                        }
                        1
                    };
                    for i in 0..count {
                        let slot = tx.slot_mut(k);
                        let len = if hdr.is_gso() {
                            match vnet::segment(&hdr, packet, i, &mut slot[16..SLOT - 48]) {
                                Ok(len) => len,
                                Err(_) => break,
                            }
                        } else {
                            let len = packet.len().min(SLOT - 64);
                            slot[16..16 + len].copy_from_slice(&packet[..len]);
                            len
                        };
                        if let Encapsulated::Send { to, len } =
                            tunnel.encapsulate(now, wall_now, &mut rng, slot, len)
                        {
                            tx.set(k, len, &to_v6(to));
                            k += 1;
                            if k == BATCH {
                                tx.send(socket.as_fd(), k)
                                    .map_err(|e| DevError::Runtime(format!("UDP send: {e}")))?;
                                k = 0;
                            }
                        }
                    }
                }
                if k > 0 {
                    tx.send(socket.as_fd(), k)
                        .map_err(|e| DevError::Runtime(format!("UDP send: {e}")))?;
                }
            }
            if udp_ready {
                let got = rx
                    .recv(socket.as_fd())
                    .map_err(|e| DevError::Runtime(format!("UDP receive: {e}")))?;
                for i in 0..got {
                    let (datagram, from) = rx.datagram_mut(i);
                    let n = datagram.len();
                    if let Decapsulated::Packet(range) = tunnel.decapsulate(
                        now,
                        wall_now,
                        &mut rng,
                        from_v6(SocketAddr::V6(from)),
                        datagram,
                        n,
                    ) {
                        // Consecutive TCP segments of one flow join into one
                        // super-packet (GRO): one write instead of dozens.
                        if gro_on && gro.push(&datagram[range.clone()]) {
                            continue;
                        }
                        if let Some(bytes) = gro.flush() {
                            write_super(&dev, bytes, &mut gro_on, &name);
                        }
                        if gro_on && gro.push(&datagram[range.clone()]) {
                            continue;
                        }
                        // Not TCP data: written as it is. The header bytes
                        // before it are spent; an empty virtio-net header goes there.
                        let start = range.start - vnet::LEN;
                        datagram[start..range.start].fill(0);
                        let _ = dev.write(&datagram[start..range.end]);
                    }
                }
                if let Some(bytes) = gro.flush() {
                    write_super(&dev, bytes, &mut gro_on, &name);
                }
            }
            if let Some(c) = control.as_ref().filter(|_| control_ready) {
                c.serve(&mut tunnel, &private_key, port);
            }
            if now >= next_timer {
                // Endpoints given as host names are looked up again when the
                // peer has been unreachable for a while (it may have moved).
                for (i, (key, host)) in hostnames.iter().enumerate() {
                    let last = tunnel
                        .peers()
                        .find(|(c, _, _)| c.public == *key)
                        .and_then(|(_, _, s)| s.last_handshake);
                    if reresolve_due(last, wall_now, started, last_lookup[i], now) {
                        last_lookup[i] = Some(now);
                        if let Some(addr) = host.to_socket_addrs().ok().and_then(|mut a| a.next()) {
                            tunnel.update_peer(key, |c| c.endpoint = Some(addr));
                        }
                    }
                }
                tunnel.handle_timeout(now, wall_now, &mut rng);
                next_timer = tunnel.poll_timeout(now);
            }
            while let Some((to, len)) = tunnel.poll_transmit(now, &mut out) {
                let _ = socket.send_to(&out[..len], SocketAddr::V6(to_v6(to)));
            }
        }
        eprintln!("tapir: {name}: down");
        drop(dev);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_looked_up_again_only_when_unreachable() {
        let t0 = Instant::now();
        let start = Duration::from_secs(1_000_000);
        let min = |m: u64| start + Duration::from_secs(60 * m);
        // Fresh start, no handshake yet: not before three minutes.
        assert!(!reresolve_due(None, min(2), start, None, t0));
        assert!(reresolve_due(None, min(3), start, None, t0));
        // A recent handshake: no lookup.
        assert!(!reresolve_due(Some(min(9)), min(10), start, None, t0));
        // Handshakes stopped: look up, then not again within 30 s.
        assert!(reresolve_due(Some(min(1)), min(10), start, None, t0));
        assert!(!reresolve_due(
            Some(min(1)),
            min(10),
            start,
            Some(t0),
            t0 + Duration::from_secs(29)
        ));
        assert!(reresolve_due(
            Some(min(1)),
            min(10),
            start,
            Some(t0),
            t0 + Duration::from_secs(30)
        ));
    }

    #[test]
    fn v4_addresses_travel_mapped() {
        let a: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        assert_eq!(to_v6(a).to_string(), "[::ffff:192.0.2.1]:51820");
        assert_eq!(from_v6(SocketAddr::V6(to_v6(a))), a);
        let b: SocketAddr = "[2001:db8::1]:1".parse().unwrap();
        assert_eq!(from_v6(SocketAddr::V6(to_v6(b))), b);
    }
}
