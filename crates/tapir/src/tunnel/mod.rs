//! `tapir run`: one tunnel in the foreground. One datapath for every kind:
//! device (tun: IP packets | tap: Ethernet frames) x transport (UDP | TCP)
//! x forwarding (allowed IPs | the tap-mode switch, in `tapir-proto`).
//!
//! ```text
//!   TunnelConfig ─▶ resolve endpoints ─▶ bind UDP or TCP [::]:port ─▶ create tun/tap (transient)
//!                ─▶ MAC, bridge, MTU, addresses, up, routes ─▶ loop:
//!     poll(device, transport fds, control socket; until the next timer)
//!     device: read (TSO super-packets, vnet header) ─▶ segment into tx slots ─▶ encapsulate
//!             (tap: flood = one sealed copy per peer) ─▶ tx batch
//!     transport: rx batch (recvmmsg, or whole frames from TCP connections)
//!             ─▶ decapsulate in place ─▶ Packet: GRO ─▶ device
//!                                     ─▶ Forward / Flood (tap hub): sealed again into the tx batch
//!     tx batch ─▶ sendmmsg (UDP) or each connection's bounded queue (TCP)
//!     timers, handshakes, keepalives (poll_transmit) ─▶ tx batch
//!   shutdown: the device goes with its descriptor, and its addresses and
//!   routes with it; a bridge this tunnel created is removed
//! ```
//! Batches hold 64 datagrams of up to 64 KiB, allocated once: nothing is
//! allocated per packet. The transport is a small enum, so the UDP path is
//! a `sendmmsg` of the batch and TCP's is a copy into connection queues.

use std::io;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6, ToSocketAddrs, UdpSocket};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tapir_proto::wg::keys::{PrivateKey, PublicKey};
use tapir_proto::wg::tunnel::{
    Decapsulated, Encapsulated, Layer, PeerConfig, Random, Target, Tunnel,
};
use tapir_sys::mmsg::Batch;
use tapir_sys::poll::PollSet;
use tapir_sys::{IfName, Mode, Netlink, TunDevice, TunOptions, offload};
use tapir_wire::vnet::{self, VnetHeader};

pub mod control;
pub mod tcp;
use tcp::TcpTransport;

/// Datagrams per system call.
const BATCH: usize = 64;
/// Bytes per batch slot: the largest UDP datagram, or a tun packet with the
/// WireGuard header before and padding and tag after.
const SLOT: usize = 65536 + 64;

use crate::config::{Transport, TunnelConfig};
use crate::dev::DevError;

/// Randomness from the kernel (`getrandom(2)`).
pub struct OsRandom(());

impl OsRandom {
    /// Checks that the kernel gives randomness (it always does once booted).
    pub fn new() -> io::Result<Self> {
        tapir_sys::random::fill(&mut [0u8; 1])?;
        Ok(Self(()))
    }
}

impl Random for OsRandom {
    fn fill(&mut self, buf: &mut [u8]) {
        // getrandom cannot fail once `new` succeeded (it blocks only until
        // the kernel's pool is initialised, which `new` waited for); a tunnel
        // without randomness must not go on.
        tapir_sys::random::fill(buf).expect("getrandom failed after it worked");
    }
}

/// 32 random bytes from the kernel (keys).
pub fn random32() -> io::Result<[u8; 32]> {
    let mut b = [0u8; 32];
    tapir_sys::random::fill(&mut b)?;
    Ok(b)
}

pub(crate) fn to_v6(a: SocketAddr) -> SocketAddrV6 {
    match a {
        SocketAddr::V4(v4) => SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0),
        SocketAddr::V6(v6) => v6,
    }
}

pub(crate) fn from_v6(a: SocketAddr) -> SocketAddr {
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
                rate: p.rate,
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

/// How a tunnel's messages travel.
enum Net {
    Udp(UdpSocket),
    Tcp(Box<TcpTransport>),
}

/// A bridge this tunnel created; removed when dropped (on down, or when
/// start fails after creating it).
struct CreatedBridge {
    index: u32,
    name: IfName,
}

impl Drop for CreatedBridge {
    fn drop(&mut self) {
        if let Ok(mut nl) = Netlink::open() {
            if let Err(e) = nl.del_link(self.index) {
                eprintln!("tapir: cannot remove bridge {}: {e}", self.name);
            }
        }
    }
}

/// A tunnel whose device, addresses, routes and socket are set up, ready to run.
pub struct Started {
    name: IfName,
    dev: TunDevice,
    mode: Mode,
    net: Net,
    tunnel: Tunnel,
    control: Option<crate::uapi::ControlSocket>,
    private_key: PrivateKey,
    port: u16,
    /// Peers whose endpoint is a host name, to look up again on reconnect.
    hostnames: Vec<(PublicKey, String)>,
    bridge: Option<CreatedBridge>,
}

fn bind_udp(port: u16) -> Result<UdpSocket, DevError> {
    let socket = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port)).map_err(|e| {
        DevError::Invalid(format!(
            "cannot listen on UDP port {port}: {e}{}",
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
    Ok(socket)
}

fn bind_tcp(port: Option<u16>, seed: u64) -> Result<TcpTransport, DevError> {
    TcpTransport::new(port, SLOT - 64, seed).map_err(|e| {
        DevError::Invalid(format!(
            "cannot listen on TCP port {}: {e}{}",
            port.unwrap_or(0),
            if e.kind() == io::ErrorKind::AddrInUse {
                " (another program uses it: choose another ListenPort)"
            } else {
                ""
            }
        ))
    })
}

/// Puts the tap `index` on bridge `name`, creating the bridge (up) if it is
/// missing; returns the bridge if it was created here.
fn join_bridge(
    nl: &mut Netlink,
    index: u32,
    name: &IfName,
) -> Result<Option<CreatedBridge>, DevError> {
    let (bridge_index, created) = match nl.link(name.as_str())? {
        Some(l) if l.kind.as_deref() == Some("bridge") => (l.index, None),
        Some(l) => {
            return Err(DevError::Invalid(format!(
                "Bridge = {name}: {name} exists and is not a bridge (it is {}): choose another name",
                l.kind.as_deref().unwrap_or("a plain interface")
            )));
        }
        None => {
            let i = nl.add_bridge(name.as_str())?;
            (
                i,
                Some(CreatedBridge {
                    index: i,
                    name: name.clone(),
                }),
            )
        }
    };
    if created.is_some() {
        nl.set_up(bridge_index, true)?;
    }
    nl.set_master(index, Some(bridge_index))?;
    Ok(created)
}

/// Sets a tunnel up: resolves its peers, binds its port, creates and
/// configures its device. On failure nothing is left: the device is
/// transient and goes with its descriptor, and a bridge created here is removed.
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
    let mut rng = OsRandom::new()
        .map_err(|e| DevError::Runtime(format!("randomness from the kernel: {e}")))?;
    let net = match config.transport {
        Transport::Udp => Net::Udp(bind_udp(config.listen_port.unwrap_or(0))?),
        Transport::Tcp => {
            let mut seed = [0u8; 8];
            rng.fill(&mut seed);
            Net::Tcp(Box::new(bind_tcp(
                config.listen_port,
                u64::from_le_bytes(seed),
            )?))
        }
    };
    // Not persistent: the device, its addresses and its routes go away with
    // the descriptor, on any exit.
    // With the virtio-net header the kernel hands us TCP super-packets (TSO)
    // and leaves checksums to us: fewer reads, and no per-segment TCP work in
    // the sender's kernel. A tap takes the same offloads for the IP inside
    // its frames.
    let options = TunOptions {
        vnet_hdr: true,
        ..TunOptions::new(config.mode)
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
    let mut bridge = None;
    if config.mode == Mode::Tap {
        let mac = match config.mac {
            Some(m) => m,
            None => {
                let mut m = [0u8; 6];
                rng.fill(&mut m);
                // Locally administered, unicast.
                m[0] = (m[0] & 0xfc) | 0x02;
                m
            }
        };
        nl.set_mac(index, mac)?;
        if let Some(b) = &config.bridge {
            bridge = join_bridge(&mut nl, index, b)?;
        }
    }
    nl.set_mtu(index, config.mtu)?;
    for a in &config.addresses {
        nl.add_address(index, *a, None)?;
    }
    nl.set_up(index, true)?;
    // In tap mode the tunnel is a link: its subnet is on-link through the
    // addresses' prefix routes, and allowed IPs are an anti-spoofing filter,
    // not routes.
    let routes: Vec<ipnet::IpNet> = match (&config.routes, config.mode) {
        (Some(r), _) => r.clone(),
        (None, Mode::Tap) => Vec::new(),
        (None, Mode::Tun) => config
            .peers
            .iter()
            .flat_map(|p| p.allowed_ips.iter().copied())
            .collect(),
    };
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
    let port = match &net {
        Net::Udp(s) => s.local_addr().map(|a| a.port()).unwrap_or(0),
        Net::Tcp(t) => t.local_port(),
    };
    let layer = match config.mode {
        Mode::Tun => Layer::Ip,
        Mode::Tap => Layer::Ethernet,
    };
    let tunnel = Tunnel::with_layer(
        config.private_key.clone(),
        peers,
        layer,
        tapir_proto::switch::DEFAULT_AGING,
        tapir_proto::switch::DEFAULT_CAP,
    );
    eprintln!(
        "tapir: {name}: up ({} mode), public key {}, {}, {} peer(s)",
        config.mode,
        tunnel.public_key(),
        match (&net, port) {
            (Net::Tcp(_), 0) => "TCP, connecting out only".to_string(),
            (Net::Tcp(_), p) => format!("listening on TCP port {p}"),
            (Net::Udp(_), p) => format!("listening on UDP port {p}"),
        },
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
        mode: config.mode,
        net,
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
        bridge,
    })
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
    // Set up: from here on the process parses what arrives from the network,
    // so it keeps CAP_NET_ADMIN alone (to take a bridge it made down again)
    // and can gain nothing back. Before the threads start: they inherit it.
    // TAPIR_KEEP_CAPS=1 keeps them all (for debugging).
    if std::env::var_os("TAPIR_KEEP_CAPS").is_none() {
        if let Err(e) = tapir_sys::caps::keep_only_net_admin(true) {
            eprintln!("tapir: warning: could not give up capabilities: {e}");
        }
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

/// The moving parts of a running tunnel's packet path.
struct Datapath {
    name: IfName,
    dev: TunDevice,
    tap: bool,
    net: Net,
    tunnel: Tunnel,
    rng: OsRandom,
    /// Datagrams to send: slots `0..pending` are set.
    tx: Batch,
    pending: usize,
    /// A frame being flooded, copied out of its slot.
    scratch: Vec<u8>,
    /// A packet a rate limit held back on arrival, released.
    held: Vec<u8>,
    gro: vnet::Coalescer,
    gro_on: bool,
    /// One device read: the vnet header and up to 64 KiB.
    big: Vec<u8>,
    /// Errors writing to the device.
    device_write_errors: u64,
    /// UDP segmentation offload in use (probed at start, off after an EIO).
    gso_on: bool,
    /// UDP coalescing on receive in use.
    gro_udp: bool,
    /// What the UDP sends did.
    udp: UdpCounters,
}

/// Totals of the UDP sends, for `tapir status`.
#[derive(Debug, Default)]
struct UdpCounters {
    sent: u64,
    messages: u64,
    refused: u64,
    blocked: u64,
}

/// How long a send waits for room in a full socket buffer before dropping.
const SEND_PATIENCE: Duration = Duration::from_millis(20);

impl Datapath {
    /// Sends what is queued.
    fn flush(&mut self, now: Instant) -> Result<(), DevError> {
        if self.pending == 0 {
            return Ok(());
        }
        match &mut self.net {
            Net::Udp(socket) => {
                let was = self.gso_on;
                let r = self.tx.send_gso(
                    socket.as_fd(),
                    self.pending,
                    &mut self.gso_on,
                    SEND_PATIENCE,
                );
                self.udp.sent += r.sent as u64;
                self.udp.messages += r.messages as u64;
                self.udp.refused += r.refused as u64;
                self.udp.blocked += r.blocked as u64;
                if was && !self.gso_on {
                    eprintln!(
                        "tapir: {}: the kernel refuses segmented UDP sends (EIO): UDP GSO off, one datagram per message",
                        self.name
                    );
                }
            }
            Net::Tcp(t) => t.send(&self.tx, self.pending, now),
        }
        self.pending = 0;
        Ok(())
    }

    /// Slot `pending` holds a datagram of `len` bytes for `to`: queue it.
    fn queue(&mut self, to: SocketAddr, len: usize, now: Instant) -> Result<(), DevError> {
        self.tx.set(self.pending, len, &to_v6(to));
        self.pending += 1;
        if self.pending == BATCH {
            self.flush(now)?;
        }
        Ok(())
    }

    /// Seals a copy of the frame in `scratch[..len]` for peer `p` into the next slot.
    fn seal_copy(
        &mut self,
        p: usize,
        len: usize,
        now: Instant,
        wall: Duration,
    ) -> Result<(), DevError> {
        let slot = self.tx.slot_mut(self.pending);
        slot[16..16 + len].copy_from_slice(&self.scratch[..len]);
        if let Encapsulated::Send { to, len } =
            self.tunnel
                .encapsulate_to(p, now, wall, &mut self.rng, slot, len)
        {
            self.queue(to, len, now)?;
        }
        Ok(())
    }

    /// Floods the frame in `scratch[..len]` to every peer but `except`.
    fn flood(
        &mut self,
        len: usize,
        except: Option<usize>,
        now: Instant,
        wall: Duration,
    ) -> Result<(), DevError> {
        for p in 0..self.tunnel.peer_count() {
            if Some(p) != except {
                self.seal_copy(p, len, now, wall)?;
            }
        }
        Ok(())
    }

    /// Reads the device until it is empty or a batch's worth was read.
    fn read_device(&mut self, now: Instant, wall: Duration) -> Result<(), DevError> {
        let mut big = std::mem::take(&mut self.big);
        let result = self.read_device_into(&mut big, now, wall);
        self.big = big;
        result
    }

    fn read_device_into(
        &mut self,
        big: &mut [u8],
        now: Instant,
        wall: Duration,
    ) -> Result<(), DevError> {
        for _ in 0..BATCH {
            let n = match self.dev.read(big) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    return Err(DevError::Runtime(format!(
                        "{}: reading the device: {e}",
                        self.name
                    )));
                }
            };
            let Some(hdr) = VnetHeader::parse(&big[..n]) else {
                continue;
            };
            let packet = &mut big[vnet::LEN..n];
            // Where the IP header starts: 0 on a tun, after the Ethernet header on a tap.
            let l2 = if self.tap {
                vnet::ip_offset(packet)
            } else {
                Some(0)
            };
            let count = match (hdr.is_gso(), l2) {
                (true, Some(l2)) => match vnet::segment_count_at(&hdr, packet, l2) {
                    Ok(c) => c,
                    Err(_) => continue,
                },
                (true, None) => continue,
                (false, _) => {
                    if vnet::finish_checksum(&hdr, packet).is_err() {
                        continue;
                    }
                    1
                }
            };
            // One routing decision for all the segments: they share their headers.
            let target = self.tunnel.target(now, packet);
            if let Target::Nowhere(_) = target {
                continue;
            }
            for i in 0..count {
                let slot = self.tx.slot_mut(self.pending);
                let len = if hdr.is_gso() {
                    match vnet::segment_at(
                        &hdr,
                        packet,
                        l2.unwrap_or(0),
                        i,
                        &mut slot[16..SLOT - 48],
                    ) {
                        Ok(len) => len,
                        Err(_) => break,
                    }
                } else {
                    let len = packet.len().min(SLOT - 64);
                    slot[16..16 + len].copy_from_slice(&packet[..len]);
                    len
                };
                match target {
                    Target::Peer(p) => {
                        if let Encapsulated::Send { to, len } =
                            self.tunnel
                                .encapsulate_to(p, now, wall, &mut self.rng, slot, len)
                        {
                            self.queue(to, len, now)?;
                        }
                    }
                    Target::Flood => {
                        let slot = self.tx.slot_mut(self.pending);
                        self.scratch[..len].copy_from_slice(&slot[16..16 + len]);
                        self.flood(len, None, now, wall)?;
                    }
                    Target::Nowhere(_) => {}
                }
            }
        }
        Ok(())
    }

    /// Writes `buf[range]` to the device, joining TCP segments (GRO). The
    /// 10 bytes before `range` are spent (a WireGuard header) and become the
    /// vnet header of a packet written on its own.
    fn deliver(&mut self, buf: &mut [u8], range: std::ops::Range<usize>) {
        let l2 = if self.tap {
            vnet::ip_offset(&buf[range.clone()])
        } else {
            Some(0)
        };
        if let Some(l2) = l2.filter(|_| self.gro_on) {
            // Consecutive TCP segments of one flow join into one
            // super-packet (GRO): one write instead of dozens.
            if self.gro.push_at(&buf[range.clone()], l2) {
                return;
            }
            self.flush_gro();
            if self.gro.push_at(&buf[range.clone()], l2) {
                return;
            }
        }
        self.flush_gro();
        let start = range.start - vnet::LEN;
        buf[start..range.start].fill(0);
        if self.dev.write(&buf[start..range.end]).is_err() {
            self.device_write_errors += 1;
        }
    }

    /// Writes a coalesced super-packet. A kernel that refuses GSO writes
    /// (EINVAL) turns GRO off for the rest of the run, said once; TCP
    /// resends what was lost.
    fn flush_gro(&mut self) {
        let Some(bytes) = self.gro.flush() else {
            return;
        };
        if let Err(e) = self.dev.write(bytes) {
            self.device_write_errors += 1;
            if e.raw_os_error() == Some(22) && self.gro_on {
                self.gro_on = false;
                eprintln!(
                    "tapir: {}: the kernel refuses coalesced writes ({e}): GRO off, one packet per write",
                    self.name
                );
            }
        }
    }

    /// Opens the `got` datagrams in `rx` and sends each where it belongs.
    /// A datagram the kernel coalesced (UDP GRO) is cut at its segment size
    /// and each piece opened where it lies.
    fn open_received(
        &mut self,
        rx: &mut Batch,
        got: usize,
        now: Instant,
        wall: Duration,
    ) -> Result<(), DevError> {
        for i in 0..got {
            let seg = rx.segment_size(i);
            let (datagram, from) = rx.datagram_mut(i);
            let total = datagram.len();
            let from = from_v6(SocketAddr::V6(from));
            let (slot, _) = rx.slot_with_len(i);
            let step = seg.unwrap_or(total).max(1);
            let mut at = 0;
            while at < total {
                let len = step.min(total - at);
                let buf = &mut slot[at..];
                let result = self
                    .tunnel
                    .decapsulate(now, wall, &mut self.rng, from, buf, len);
                if !matches!(result, Decapsulated::Dropped(_)) {
                    if let Net::Tcp(t) = &mut self.net {
                        t.authenticated(from);
                    }
                }
                self.dispatch(buf, result, now, wall)?;
                at += len;
            }
        }
        self.flush_gro();
        Ok(())
    }

    /// Sends an opened packet where [`Tunnel::decapsulate`] says: to the
    /// device, or (tap hub) sealed again for other peers.
    fn dispatch(
        &mut self,
        buf: &mut [u8],
        result: Decapsulated,
        now: Instant,
        wall: Duration,
    ) -> Result<(), DevError> {
        match result {
            Decapsulated::Packet(range) => self.deliver(buf, range),
            Decapsulated::Forward { range, to } => {
                let len = range.len();
                self.scratch[..len].copy_from_slice(&buf[range]);
                self.seal_copy(to, len, now, wall)?;
            }
            Decapsulated::Flood { range, from } => {
                let len = range.len();
                self.scratch[..len].copy_from_slice(&buf[range.clone()]);
                self.deliver(buf, range);
                self.flood(len, Some(from), now, wall)?;
            }
            Decapsulated::Nothing | Decapsulated::Dropped(_) => {}
        }
        Ok(())
    }

    /// Packets that a peer's rate limit held back on arrival, now due.
    fn release_held(&mut self, now: Instant, wall: Duration) -> Result<(), DevError> {
        let mut held = std::mem::take(&mut self.held);
        let mut result = Ok(());
        while let Some(r) = self.tunnel.poll_received(now, &mut held) {
            result = self.dispatch(&mut held, r, now, wall);
            if result.is_err() {
                break;
            }
        }
        self.held = held;
        self.flush_gro();
        result
    }

    /// Handshakes, cookie replies, keepalives and queued packets.
    fn transmit(&mut self, now: Instant) -> Result<(), DevError> {
        loop {
            let slot = self.tx.slot_mut(self.pending);
            let Some((to, len)) = self.tunnel.poll_transmit(now, slot) else {
                break;
            };
            self.queue(to, len, now)?;
        }
        self.flush(now)
    }
}

impl Started {
    /// Moves packets until `shutdown`; the device goes away when this
    /// returns. The control socket and host-name look-ups run on a thread
    /// of their own for as long.
    pub fn run(self, shutdown: &AtomicBool) -> Result<(), DevError> {
        let (link, end) =
            control::pair().map_err(|e| DevError::Runtime(format!("control channel: {e}")))?;
        let done = AtomicBool::new(false);
        let mut this = self;
        let control = this.control.take();
        std::thread::scope(|s| {
            let socket = control.as_ref();
            let done = &done;
            s.spawn(move || {
                let stop = || shutdown.load(Ordering::Relaxed) || done.load(Ordering::Relaxed);
                end.run(socket, &stop)
            });
            let result = this.packet_loop(shutdown, &link);
            done.store(true, Ordering::Relaxed);
            result
        })
    }

    fn packet_loop(
        self,
        shutdown: &AtomicBool,
        link: &control::ControlLink,
    ) -> Result<(), DevError> {
        let Started {
            name,
            dev,
            mode,
            net,
            tunnel,
            control: _,
            private_key,
            port,
            hostnames,
            bridge,
        } = self;
        let started = wall();
        let mut last_lookup: Vec<Option<Instant>> = vec![None; hostnames.len()];
        let rng = OsRandom::new()
            .map_err(|e| DevError::Runtime(format!("randomness from the kernel: {e}")))?;
        // UDP offloads, probed: segmentation on send, coalescing on receive.
        // TAPIR_UDP_GSO=off / TAPIR_UDP_GRO=off turn them off (to measure
        // what they bring, or to rule them out).
        let off = |var: &str| std::env::var(var).is_ok_and(|v| v == "off" || v == "0");
        let (net_kind, gro_udp) = match &net {
            Net::Udp(s) => (
                Some(!off("TAPIR_UDP_GSO") && tapir_sys::mmsg::gso_supported(s.as_fd())),
                !off("TAPIR_UDP_GRO") && tapir_sys::mmsg::enable_gro(s.as_fd()),
            ),
            Net::Tcp(_) => (None, false),
        };
        // Batches allocated once: the datapath allocates nothing per packet.
        let mut rx = Batch::new(BATCH, SLOT);
        let mut d = Datapath {
            name,
            dev,
            tap: mode == Mode::Tap,
            net,
            tunnel,
            rng,
            tx: Batch::new(BATCH, SLOT),
            pending: 0,
            scratch: vec![0u8; SLOT],
            held: vec![0u8; SLOT],
            gro: vnet::Coalescer::new(),
            gro_on: true,
            big: vec![0u8; vnet::LEN + 65536],
            device_write_errors: 0,
            gso_on: matches!(&net_kind, Some(true)),
            gro_udp,
            udp: UdpCounters::default(),
        };
        // Fresh sessions with every peer we know where to find (a restart
        // is over for them as soon as this completes).
        d.tunnel.handshake_all(Instant::now(), wall(), &mut d.rng);
        let mut warned_layer: Vec<(PublicKey, u64)> = Vec::new();
        let mut set = PollSet::new();
        let mut next_timer = Instant::now();
        let mut dials_at = None;
        while !shutdown.load(Ordering::Relaxed) {
            let now = Instant::now();
            // TCP: keep a connection to every configured endpoint.
            if let Net::Tcp(t) = &mut d.net {
                if dials_at.is_none_or(|at: Instant| {
                    now.saturating_duration_since(at) >= Duration::from_secs(1)
                }) {
                    dials_at = Some(now);
                    let wanted: Vec<SocketAddr> = d
                        .tunnel
                        .peers()
                        .filter_map(|(c, _, _)| c.endpoint)
                        .collect();
                    t.set_dials(&wanted, now);
                }
            }
            set.clear();
            let dev_at = set.add(d.dev.as_fd(), true, false);
            let control_at = set.add(link.wake.as_fd(), true, false);
            let mut timeout = next_timer.saturating_duration_since(now);
            // A rate limit holding packets back wakes the loop when they are due.
            if let Some(at) = d.tunnel.next_release(now) {
                timeout = timeout.min(at.saturating_duration_since(now));
            }
            let udp_at = match &mut d.net {
                Net::Udp(s) => Some(set.add(s.as_fd(), true, false)),
                Net::Tcp(t) => {
                    t.register(&mut set, now);
                    if let Some(at) = t.next_deadline(now) {
                        timeout = timeout.min(at.saturating_duration_since(now));
                    }
                    if t.has_input() {
                        timeout = Duration::ZERO;
                    }
                    None
                }
            };
            set.wait(timeout)
                .map_err(|e| DevError::Runtime(format!("poll: {e}")))?;
            let now = Instant::now();
            let wall_now = wall();
            if set.readable(dev_at) {
                d.read_device(now, wall_now)?;
                d.flush(now)?;
            }
            let got = match &mut d.net {
                Net::Udp(s) if udp_at.is_some_and(|i| set.readable(i)) => rx
                    .recv(s.as_fd())
                    .map_err(|e| DevError::Runtime(format!("UDP receive: {e}")))?,
                Net::Udp(_) => 0,
                Net::Tcp(t) => {
                    t.service(&set, now);
                    t.receive(&mut rx, now)
                }
            };
            if got > 0 {
                d.open_received(&mut rx, got, now, wall_now)?;
                d.flush(now)?;
            }
            if set.readable(control_at) {
                // Requests read whole by the control thread: answered from
                // memory, never waiting on a client.
                link.drain_wake();
                while let Ok(m) = link.messages.try_recv() {
                    match m {
                        control::Message::Request(request, reply) => {
                            let ex = match request {
                                crate::uapi::Request::TapirGet => extras(&d, mode),
                                _ => String::new(),
                            };
                            let _ = reply.send(crate::uapi::answer(
                                request,
                                &mut d.tunnel,
                                &private_key,
                                port,
                                &ex,
                            ));
                        }
                        control::Message::Resolved(key, addr) => {
                            d.tunnel.update_peer(&key, |c| c.endpoint = Some(addr));
                        }
                    }
                }
            }
            if let Net::Tcp(t) = &mut d.net {
                // Its own deadlines (backoff over, connect or handshake
                // timed out), as soon as one has passed.
                if t.next_deadline(now).is_some_and(|at| at <= now) {
                    t.handle_timeout(now);
                }
                // A connection (re)opened: handshake over it at once.
                for addr in t.take_connected() {
                    d.tunnel.path_opened(now, wall_now, &mut d.rng, addr);
                }
            }
            if now >= next_timer {
                // Endpoints given as host names are looked up again when the
                // peer has been unreachable for a while (it may have moved).
                for (i, (key, host)) in hostnames.iter().enumerate() {
                    let last = d
                        .tunnel
                        .peers()
                        .find(|(c, _, _)| c.public == *key)
                        .and_then(|(_, _, s)| s.last_handshake);
                    if reresolve_due(last, wall_now, started, last_lookup[i], now) {
                        last_lookup[i] = Some(now);
                        // Looked up on the control thread; the answer comes back as a message.
                        let _ = link.resolve.send((*key, host.clone()));
                    }
                }
                // A peer in the other mode is named once, not per packet.
                for (c, _, s) in d.tunnel.peers() {
                    let seen = warned_layer
                        .iter()
                        .find(|(k, _)| *k == c.public)
                        .map(|(_, n)| *n);
                    if s.drops.wrong_layer > 0 && seen.is_none() {
                        eprintln!(
                            "tapir: {}: peer {} sends {}: is it in {} mode? (dropped)",
                            d.name,
                            c.public,
                            if d.tap {
                                "IP packets, not Ethernet frames"
                            } else {
                                "Ethernet frames, not IP packets"
                            },
                            if d.tap { "tun" } else { "tap" },
                        );
                        warned_layer.push((c.public, s.drops.wrong_layer));
                    }
                }
                d.tunnel.handle_timeout(now, wall_now, &mut d.rng);
                next_timer = d.tunnel.poll_timeout(now);
            }
            d.release_held(now, wall_now)?;
            d.transmit(now)?;
        }
        eprintln!("tapir: {}: down", d.name);
        drop(d);
        drop(bridge);
        Ok(())
    }
}

/// tapir's own status lines, after WireGuard's (see `uapi::Request::TapirGet`).
fn extras(d: &Datapath, mode: Mode) -> String {
    let mut out = format!(
        "tapir_mode={mode}\ntapir_transport={}\ntapir_datapath={}{}\ntapir_device_write_errors={}\n",
        match d.net {
            Net::Udp(_) => "udp",
            Net::Tcp(_) => "tcp",
        },
        match (&d.net, d.tap) {
            (Net::Udp(_), false) =>
                "UDP in batches of 64 (recvmmsg/sendmmsg); tun via the vnet header: TSO and checksum offload on reads, TCP segments coalesced (GRO) on writes",
            (Net::Udp(_), true) =>
                "UDP in batches of 64 (recvmmsg/sendmmsg); tap via the vnet header: TSO and checksum offload on reads, GRO on writes; a learning switch between peers",
            (Net::Tcp(_), false) =>
                "TCP, one connection per peer, 16-bit length framing; tun via the vnet header: TSO on reads, GRO on writes",
            (Net::Tcp(_), true) =>
                "TCP, one connection per peer, 16-bit length framing; tap via the vnet header, a learning switch between peers",
        },
        match &d.net {
            Net::Udp(_) => format!(
                "; UDP GSO {}, UDP GRO {}",
                if d.gso_on { "on" } else { "off" },
                if d.gro_udp { "on" } else { "off" }
            ),
            Net::Tcp(_) => String::new(),
        },
        d.device_write_errors
    );
    if let Net::Udp(_) = &d.net {
        out += &format!(
            "tapir_udp_sent={}\ntapir_udp_send_calls={}\ntapir_udp_refused={}\ntapir_udp_blocked={}\n",
            d.udp.sent, d.udp.messages, d.udp.refused, d.udp.blocked
        );
    }
    if let Net::Tcp(t) = &d.net {
        let (open, pending) = t.connection_counts();
        out += &format!(
            "tapir_tcp_connections={open}\ntapir_tcp_unauthenticated={pending}\ntapir_tcp_accepted={}\ntapir_tcp_pending_closed={}\ntapir_tcp_bad_frames={}\ntapir_tcp_queue_full={}\ntapir_tcp_no_connection={}\n",
            t.stats.accepted,
            t.stats.pending_closed,
            t.stats.bad_frames,
            t.stats.queue_full,
            t.stats.no_connection
        );
    }
    let now = Instant::now();
    for (c, endpoint, s) in d.tunnel.peers() {
        out += &format!("tapir_peer={}\n", c.public.to_hex());
        if let Some(r) = c.rate {
            out += &format!("tapir_rate={r}\n");
        }
        if d.tap {
            out += &format!("tapir_mac_count={}\n", d.tunnel.peer_mac_count(&c.public));
            for m in d.tunnel.peer_macs(now, &c.public).iter().take(64) {
                out += &format!("tapir_mac={}\n", tapir_wire::summary::mac(m));
            }
        }
        let dr = &s.drops;
        for (k, v) in [
            ("not_allowed", dr.not_allowed),
            ("mac_cap", dr.mac_cap),
            ("multicast_source", dr.multicast_source),
            ("loop_back", dr.loop_back),
            ("wrong_layer", dr.wrong_layer),
            ("rate_rx", dr.rate_rx),
            ("rate_tx", dr.rate_tx),
            ("queue_full", dr.queue_full),
            ("invalid", s.dropped),
        ] {
            if v > 0 {
                out += &format!("tapir_drop_{k}={v}\n");
            }
        }
        if let Net::Tcp(t) = &d.net {
            let target = c.endpoint.or(endpoint);
            let state = match target.and_then(|a| t.dial_state(a)) {
                Some((tcp::DialState::Open, _, _)) => "connected".to_string(),
                Some((tcp::DialState::Connecting, _, _)) => "connecting".to_string(),
                Some((tcp::DialState::Waiting { until }, failures, err)) => format!(
                    "reconnecting in {:.1} s (attempt {}{})",
                    until.saturating_duration_since(now).as_secs_f64(),
                    failures + 1,
                    err.map(|e| format!(", last: {e}")).unwrap_or_default()
                ),
                None if endpoint.is_some_and(|a| t.connected_to(a)) => {
                    "connected (accepted)".into()
                }
                None => "no connection (waits to be contacted)".into(),
            };
            out += &format!("tapir_connection={state}\n");
        }
    }
    out
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
